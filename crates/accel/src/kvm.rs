//! KVM accelerator (kvm-ioctls).
//!
//! [`KvmVm`] owns one KVM virtual machine: `/dev/kvm` (`KVM_CREATE_VM`), its guest RAM slots
//! (`KVM_SET_USER_MEMORY_REGION`), and by default the in-kernel interrupt controllers
//! (`KVM_CREATE_IRQCHIP`: PIC pair, IOAPIC, one LAPIC per vCPU) and i8254 PIT
//! (`KVM_CREATE_PIT2`). [`KvmVcpu`] is one vCPU of it and implements [`crate::Vcpu`]: port
//! I/O and MMIO that KVM cannot complete in the kernel leave `KVM_RUN` and are handed to the
//! caller's [`ExitHandler`].
//!
//! Section names in these docs ("KVM_RUN", "KVM_SET_SREGS", ...) refer to the kernel's
//! `Documentation/virt/kvm/api.rst`.
//!
//! # PVM hosts
//!
//! Some hosts expose `/dev/kvm` through the PVM backend (`kvm_pvm` module: no VT-x/AMD-V,
//! the guest runs as a para-virtualized process). There guest user-mode code runs natively
//! but guest kernel-mode (CPL0) code is emulated instruction by instruction in the host
//! kernel, slowly (about 2 M instructions per second) and incompletely: instructions the
//! emulator lacks end the run with `KVM_EXIT_INTERNAL_ERROR`, which [`KvmVcpu::run`]
//! reports as [`Error::Internal`] with a PVM hint. [`is_pvm_host`] detects such a host.
//! Nothing else in this module differs between PVM and VT-x/AMD-V hosts.
//!
//! # As a [`crate::Hypervisor`]
//!
//! [`KvmHypervisor`] makes [`KvmVm`]s with the production options; [`KvmVm`] implements
//! [`crate::Vm`]: interrupt lines are "KVM_IRQ_LINE", MSIs go through irqfds and GSI routes
//! (see [`msi`]), notifications through ioeventfds, and its VM state is [`KvmVmState`].
//! [`KvmVcpu::stopper`](crate::Vcpu::stopper) kicks the vCPU's thread out of `KVM_RUN`
//! with a signal (SIGRTMIN, whose no-op handler the first vCPU installs).
//!
//! # Snapshots
//!
//! [`KvmVm::save_state`] / [`KvmVm::restore_state`] and [`KvmVcpu::save_state`] /
//! [`KvmVcpu::restore_state`] capture and reload the state KVM keeps in the kernel (see the
//! [`snapshot`] module for what is saved, in which order, and what a host may not support);
//! guest RAM is the caller's to copy.

mod hypervisor;
pub mod msi;
mod regs;
pub mod snapshot;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_pit_config, kvm_run, kvm_userspace_memory_region, CpuId, Msrs,
    KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_INTERNAL_ERROR_SIMUL_EX, KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};

use crate::{CpuState, Error, ExitHandler, RamRegion, Result, Vcpu, VcpuExit, VcpuStopper};

pub use hypervisor::KvmHypervisor;
pub use msi::MAX_MSI_ROUTES;
pub use regs::DEFAULT_APIC_BASE_BSP;
pub use snapshot::{KvmPod, KvmVcpuState, KvmVmState, MsrValue, Raw, RawFpu, SkippedState};

/// Guest-physical address given to `KVM_SET_TSS_ADDR`: three pages just below the 4 GiB
/// BIOS area that Intel VT-x needs for real-mode emulation (same value as Firecracker).
/// Guest RAM must not overlap `0xfffb_d000..0xfffc_0000`.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// I/O-APIC / PIC pin count of the in-kernel irqchip (GSIs `0..24`).
pub const IRQCHIP_NUM_PINS: u32 = 24;

/// IA32_MISC_ENABLE (Intel SDM Vol. 4 §2.1).
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MISC_ENABLE bit 0: fast-strings enable (what Firecracker sets at boot).
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_MTRR_DEF_TYPE: MTRRs enabled (bit 11), default memory type write-back (6).
const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

/// LAPIC register offsets in `kvm_lapic_state::regs` (xAPIC MMIO layout).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
/// LVT delivery modes (bits 10:8).
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// x87 control word and MXCSR after `FNINIT`/reset (Intel SDM Vol. 1 §8.1.5, §10.2.3).
const FPU_DEFAULT_FCW: u16 = 0x37f;
const FPU_DEFAULT_MXCSR: u32 = 0x1f80;

/// Path whose existence marks a PVM host (the `kvm_pvm` module is loaded).
const PVM_MODULE_PATH: &str = "/sys/module/kvm_pvm";

/// Maps a kvm-ioctls error to [`Error::Kvm`] naming the ioctl that failed.
fn kvm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(format!("{ioctl}: {e}"))
}

/// Whether `/dev/kvm` is backed by PVM (see the [module docs](self)): true when
/// `/sys/module/kvm_pvm` exists.
pub fn is_pvm_host() -> bool {
    Path::new(PVM_MODULE_PATH).exists()
}

/// Whether this process can use KVM: `/dev/kvm` opens and `KVM_CREATE_VM` succeeds (the
/// VM is dropped again at once). Never panics; any failure means `false`.
pub fn available() -> bool {
    Kvm::new().and_then(|kvm| kvm.create_vm()).is_ok()
}

/// Options of [`KvmVm::new_with_options`].
#[derive(Clone, Copy, Debug)]
pub struct KvmVmOptions {
    /// Create the in-kernel irqchip (PIC, IOAPIC, LAPICs; "KVM_CREATE_IRQCHIP") and the
    /// in-kernel PIT ("KVM_CREATE_PIT2", speaker port 0x61 as a dummy). Default `true`; this is
    /// what a real guest (Linux) needs.
    ///
    /// With `false` the VM has no interrupt controllers at all and `hlt` leaves `KVM_RUN`
    /// as `KVM_EXIT_HLT` ([`VcpuExit::Hlt`]); with `true` KVM handles `hlt` in the kernel
    /// (the vCPU sleeps until an interrupt) and [`VcpuExit::Hlt`] is never reported. Tiny
    /// test guests that end with `hlt` therefore use `false`.
    pub irqchip: bool,
}

impl Default for KvmVmOptions {
    fn default() -> Self {
        Self { irqchip: true }
    }
}

/// One KVM virtual machine with its guest RAM registered.
///
/// The host mappings described by the [`RamRegion`]s must stay valid (and must not be
/// unmapped) for as long as this VM or any of its vCPUs exists: KVM keeps using them.
pub struct KvmVm {
    kvm: Kvm,
    vm: Arc<VmFd>,
    irqchip: bool,
    pvm: bool,
    /// `KVM_GET_SUPPORTED_CPUID` result, fetched once and specialised per vCPU.
    supported_cpuid: CpuId,
    /// What this host offers for snapshots (capabilities, MSR list), shared with the vCPUs.
    snap: Arc<snapshot::SnapshotCaps>,
    /// MSIs through irqfds (see [`msi`]).
    msi: Arc<msi::MsiRouter>,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm").field("irqchip", &self.irqchip).field("pvm", &self.pvm).finish_non_exhaustive()
    }
}

impl KvmVm {
    /// Same as the free function [`available`]: whether `/dev/kvm` opens and a VM can be
    /// created.
    pub fn available() -> bool {
        available()
    }

    /// Creates a VM with the in-kernel irqchip and PIT (the production configuration, see
    /// [`KvmVmOptions::default`]) and registers `ram`, one memory slot per region in order
    /// (slot `i` for `ram[i]`).
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] naming the failing ioctl ("KVM_CREATE_VM", "KVM_SET_TSS_ADDR",
    /// "KVM_CREATE_IRQCHIP", "KVM_CREATE_PIT2", "KVM_SET_USER_MEMORY_REGION",
    /// "KVM_GET_SUPPORTED_CPUID") or `/dev/kvm` itself; [`Error::Unsupported`] for a RAM
    /// region that is empty or not 4 KiB aligned (GPA, size or host address).
    pub fn new(ram: &[RamRegion]) -> Result<Self> {
        Self::new_with_options(ram, KvmVmOptions::default())
    }

    /// Like [`KvmVm::new`] with explicit [`KvmVmOptions`].
    ///
    /// # Errors
    ///
    /// As [`KvmVm::new`].
    pub fn new_with_options(ram: &[RamRegion], options: KvmVmOptions) -> Result<Self> {
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        let supported_cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let snap = Arc::new(snapshot::SnapshotCaps::probe(&kvm, &vm));
        let vm = Arc::new(vm);
        let msi = Arc::new(msi::MsiRouter::new(vm.clone(), options.irqchip, msi::MAX_MSI_ROUTES));
        let this = Self { kvm, vm, irqchip: options.irqchip, pvm: is_pvm_host(), supported_cpuid, snap, msi };
        // Memory slots go in before the irqchip and PIT: once those exist, every
        // KVM_SET_USER_MEMORY_REGION waits for an SRCU grace period (measured: ~7 ms per slot
        // versus ~30 us before), which dominated tiny-guest start-up.
        for (slot, region) in ram.iter().enumerate() {
            this.add_ram(slot as u32, region)?;
        }
        if options.irqchip {
            this.vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
            this.vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        }
        Ok(this)
    }

    /// Registers one RAM region as memory slot `slot` ("KVM_SET_USER_MEMORY_REGION").
    fn add_ram(&self, slot: u32, region: &RamRegion) -> Result<()> {
        const PAGE: u64 = 4096;
        let host = region.host_addr as u64;
        if region.size == 0
            || !region.gpa.is_multiple_of(PAGE)
            || !region.size.is_multiple_of(PAGE)
            || !host.is_multiple_of(PAGE)
        {
            return Err(Error::Unsupported(format!(
                "RAM region gpa {:#x} size {:#x} host {:#x}: must be non-empty and 4 KiB aligned",
                region.gpa, region.size, host
            )));
        }
        let mem = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.gpa,
            memory_size: region.size,
            userspace_addr: host,
        };
        // SAFETY: `RamRegion`'s contract is that `host_addr` is a mapping valid for `size`
        // bytes for the VM's lifetime (documented on `KvmVm` too), so KVM may read and write
        // it through the guest; Rust code never holds references into it.
        unsafe { self.vm.set_user_memory_region(mem) }.map_err(|e| {
            Error::Kvm(format!(
                "KVM_SET_USER_MEMORY_REGION slot {slot} gpa {:#x} size {:#x}: {e}",
                region.gpa, region.size
            ))
        })
    }

    /// Whether this VM has the in-kernel irqchip and PIT.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// Whether the host is a PVM host (see [`is_pvm_host`]); sampled at VM creation.
    pub fn is_pvm(&self) -> bool {
        self.pvm
    }

    /// The underlying kvm-ioctls VM, for facilities this type does not wrap (irqfd,
    /// ioeventfd, MSI, dirty logging, clock).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Drives in-kernel irqchip input `gsi` (`0..24`: PIC pins 0-15 and IOAPIC pins 0-23,
    /// KVM's default routing) to `level` ("KVM_IRQ_LINE"). Edge-triggered sources pulse it:
    /// `true` then `false`.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] when the VM was created without the irqchip or `gsi` is out of
    /// range; [`Error::Kvm`] when the ioctl fails.
    pub fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()> {
        if !self.irqchip {
            return Err(Error::Unsupported("KVM_IRQ_LINE on a VM without in-kernel irqchip".into()));
        }
        if gsi >= IRQCHIP_NUM_PINS {
            return Err(Error::Unsupported(format!("GSI {gsi} out of range (0..{IRQCHIP_NUM_PINS})")));
        }
        self.vm.set_irq_line(gsi, level).map_err(|e| Error::Kvm(format!("KVM_IRQ_LINE gsi {gsi} level {level}: {e}")))
    }

    /// Injects a message-signalled interrupt ("KVM_SIGNAL_MSI"): address `addr`
    /// (0xFEEx_xxxx), data `data` (Intel SDM Vol. 3 §11.11).
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] without the in-kernel irqchip; [`Error::Kvm`] when the ioctl
    /// fails.
    pub fn signal_msi(&self, addr: u64, data: u32) -> Result<()> {
        if !self.irqchip {
            return Err(Error::Unsupported("KVM_SIGNAL_MSI on a VM without in-kernel irqchip".into()));
        }
        msi::signal_msi(&self.vm, addr, data)
    }

    /// Installs the VM's GSI routing table ("KVM_SET_GSI_ROUTING"): KVM's default routes
    /// for the in-kernel irqchip (GSIs 0-15 to the PIC pins and GSIs 0-23 to the IOAPIC
    /// pins), plus one MSI route per `(gsi, address, data)` in `msi` (GSIs ≥ 24). The VM's
    /// own MSI sink ([`crate::Vm::msi_sink`]) manages the table itself; use this only on a
    /// VM whose MSIs go elsewhere.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] without the in-kernel irqchip or for a GSI below 24;
    /// [`Error::Kvm`] when the ioctl fails.
    pub fn set_msi_routes(&self, msi: &[(u32, u64, u32)]) -> Result<()> {
        if !self.irqchip {
            return Err(Error::Unsupported("MSI routes on a VM without in-kernel irqchip".into()));
        }
        msi::set_gsi_routes(&self.vm, msi)
    }

    /// How many MSI messages the VM's MSI sink currently delivers through an irqfd (at most
    /// [`MAX_MSI_ROUTES`]; 0 once routing failed and every MSI uses "KVM_SIGNAL_MSI").
    pub fn irqfd_routes(&self) -> usize {
        self.msi.irqfd_routes()
    }

    /// Makes a write to `evt` inject GSI `gsi` ("KVM_IRQFD"); with an MSI route on that
    /// GSI, the write delivers the MSI without a VMM ioctl.
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] when the ioctl fails.
    pub fn register_irqfd(&self, evt: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()> {
        self.vm.register_irqfd(evt, gsi).map_err(|e| Error::Kvm(format!("KVM_IRQFD gsi {gsi}: {e}")))
    }

    /// Makes guest writes (any width) to MMIO GPA `gpa` signal `evt` inside KVM
    /// ("KVM_IOEVENTFD"), without an exit to userspace (virtio queue notifications).
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] when the ioctl fails.
    pub fn register_ioevent(&self, evt: &vmm_sys_util::eventfd::EventFd, gpa: u64) -> Result<()> {
        self.vm
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(gpa), kvm_ioctls::NoDatamatch)
            .map_err(|e| Error::Kvm(format!("KVM_IOEVENTFD {gpa:#x}: {e}")))
    }

    /// Undoes [`KvmVm::register_ioevent`].
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] when the ioctl fails.
    pub fn unregister_ioevent(&self, evt: &vmm_sys_util::eventfd::EventFd, gpa: u64) -> Result<()> {
        self.vm
            .unregister_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(gpa), kvm_ioctls::NoDatamatch)
            .map_err(|e| Error::Kvm(format!("KVM_IOEVENTFD deassign {gpa:#x}: {e}")))
    }

    /// Creates vCPU `id` ("KVM_CREATE_VCPU") and prepares it for boot:
    ///
    /// - CPUID ("KVM_SET_CPUID2"): everything `KVM_GET_SUPPORTED_CPUID` offers, with the
    ///   per-CPU fields fixed up for this vCPU: leaf 1 EBX\[31:24\] (initial APIC id) and
    ///   leaf 0xb / 0x1f EDX (x2APIC id) become `id`, and leaf 1 ECX bit 31 (hypervisor
    ///   present) is set. Topology fields (leaf 1 EBX\[23:16\], leaf 4, leaf 0xb/0x1f
    ///   EAX/EBX) are left as KVM reports them: enough for one or a few vCPUs, not an
    ///   accurate multi-core topology.
    /// - MSRs ("KVM_SET_MSRS"): IA32_MISC_ENABLE fast strings, IA32_MTRR_DEF_TYPE enabled
    ///   with write-back default (so a Linux guest does not see all RAM as uncached).
    /// - FPU ("KVM_SET_FPU"): FCW 0x37f, MXCSR 0x1f80.
    /// - With the irqchip, the LAPIC ("KVM_GET_LAPIC"/"KVM_SET_LAPIC"): LVT LINT0 in ExtINT
    ///   mode (the PIC's output) and LINT1 in NMI mode, as a BIOS leaves them.
    ///
    /// Registers are left at KVM's reset state (real mode, `cs:ip = f000:fff0`); call
    /// [`Vcpu::set_state`] before running.
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] naming the failing ioctl.
    pub fn create_vcpu(&self, id: u8) -> Result<KvmVcpu> {
        let fd = self.vm.create_vcpu(u64::from(id)).map_err(|e| Error::Kvm(format!("KVM_CREATE_VCPU {id}: {e}")))?;

        let mut cpuid = self.supported_cpuid.clone();
        fixup_cpuid(&mut cpuid, id);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;

        let entries = [
            kvm_msr_entry { index: MSR_IA32_MISC_ENABLE, data: MSR_IA32_MISC_ENABLE_FAST_STRING, ..Default::default() },
            kvm_msr_entry { index: MSR_MTRR_DEF_TYPE, data: MTRR_DEF_TYPE_ENABLED_WB, ..Default::default() },
        ];
        let msrs =
            Msrs::from_entries(&entries).map_err(|e| Error::Kvm(format!("KVM_SET_MSRS: building kvm_msrs: {e:?}")))?;
        let written = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if written != entries.len() {
            let failed = entries.get(written).map_or(0, |e| e.index);
            return Err(Error::Kvm(format!(
                "KVM_SET_MSRS: only {written} of {} MSRs set, MSR {failed:#x} refused",
                entries.len()
            )));
        }

        let fpu = kvm_fpu { fcw: FPU_DEFAULT_FCW, mxcsr: FPU_DEFAULT_MXCSR, ..Default::default() };
        fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;

        if self.irqchip {
            let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
            set_lint(&mut lapic);
            fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        }

        let stop = Arc::new(AtomicBool::new(false));
        let stopper = match kick_signal() {
            Some(signal) => VcpuStopper::with_signal(stop.clone(), signal),
            None => VcpuStopper::new(stop.clone()),
        };
        Ok(KvmVcpu { fd, id, pvm: self.pvm, irqchip: self.irqchip, snap: Arc::clone(&self.snap), stop, stopper })
    }

    /// The number of memory slots KVM offers ("KVM_CAP_NR_MEMSLOTS").
    pub fn max_memslots(&self) -> usize {
        self.kvm.get_nr_memslots()
    }
}

thread_local! {
    /// While this thread is inside [`KvmVcpu::run`]: that vCPU's `kvm_run.immediate_exit`
    /// byte, which the kick signal's handler sets (null otherwise). Constant-initialised with
    /// no destructor, so reading it allocates nothing and is safe in a signal handler.
    static IMMEDIATE_EXIT: std::cell::Cell<*mut u8> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// The kick signal's handler: makes the next (or the current) `KVM_RUN` of the vCPU this
/// thread is running return at once. A signal handled while the thread is between its
/// stop-flag check and the `KVM_RUN` ioctl would otherwise be lost: the kernel would see no
/// pending signal and the vCPU could sleep in `hlt` (Firecracker does the same).
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let immediate_exit = IMMEDIATE_EXIT.with(|p| p.get());
    if !immediate_exit.is_null() {
        // SAFETY: the pointer is set only while this thread is inside `KvmVcpu::run`, where
        // the vCPU (and so its mmap'd `kvm_run`) is alive, and cleared before `run` returns;
        // a signal handler runs on the thread it interrupts, so that is this `run`. The byte
        // is shared with the kernel (it reads it at `KVM_RUN` entry): a volatile store of 1
        // is what the KVM API asks for ("immediate_exit").
        unsafe { immediate_exit.write_volatile(1) };
    }
}

/// Publishes this vCPU's `immediate_exit` byte to [`kick_handler`] for the duration of
/// [`KvmVcpu::run`].
struct ImmediateExitSlot;

impl ImmediateExitSlot {
    fn publish(fd: &mut VcpuFd) -> ImmediateExitSlot {
        let run: *mut kvm_run = fd.get_kvm_run();
        // SAFETY: `run` points at the vCPU's live kvm_run mapping; only the field's address
        // is taken, nothing is read or referenced.
        let byte = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
        IMMEDIATE_EXIT.with(|p| p.set(byte));
        ImmediateExitSlot
    }
}

impl Drop for ImmediateExitSlot {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` (SIGRTMIN), once [`kick_handler`]
/// is installed; `None` if installing it failed (stoppers then only set the flag).
fn kick_signal() -> Option<libc::c_int> {
    static SIGNAL: std::sync::OnceLock<Option<libc::c_int>> = std::sync::OnceLock::new();
    *SIGNAL.get_or_init(|| {
        let signal = libc::SIGRTMIN();
        match vmm_sys_util::signal::register_signal_handler(signal, kick_handler) {
            Ok(()) => Some(signal),
            Err(e) => {
                tracing::warn!("vCPU kick signal handler: {e}; stopping a vCPU waits for its next exit");
                None
            }
        }
    })
}

/// Specialises the supported CPUID table for vCPU `id` (see [`KvmVm::create_vcpu`]).
fn fixup_cpuid(cpuid: &mut CpuId, id: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(id) << 24);
                entry.ecx |= 1 << 31;
            }
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
}

/// Reads the 32-bit LAPIC register at byte offset `off` of `lapic.regs`.
fn lapic_reg(lapic: &kvm_lapic_state, off: usize) -> u32 {
    let b = |i: usize| lapic.regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// Writes the 32-bit LAPIC register at byte offset `off` of `lapic.regs`.
fn set_lapic_reg(lapic: &mut kvm_lapic_state, off: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[off + i] = byte as std::os::raw::c_char;
    }
}

/// LINT0 = ExtINT, LINT1 = NMI (Firecracker's `set_lint`): bits 10:8 are the delivery mode.
fn set_lint(lapic: &mut kvm_lapic_state) {
    let mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, mode(lvt1, APIC_MODE_NMI));
}

/// One vCPU of a [`KvmVm`].
pub struct KvmVcpu {
    fd: VcpuFd,
    id: u8,
    pvm: bool,
    /// Whether the VM has the in-kernel irqchip (and so this vCPU an in-kernel LAPIC).
    irqchip: bool,
    /// The VM's snapshot capabilities (see [`snapshot`]).
    snap: Arc<snapshot::SnapshotCaps>,
    stop: Arc<AtomicBool>,
    /// Sets `stop` and signals the thread inside `run`.
    stopper: VcpuStopper,
}

impl std::fmt::Debug for KvmVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVcpu").field("id", &self.id).field("pvm", &self.pvm).finish_non_exhaustive()
    }
}

/// What the run loop does after `KVM_RUN` returned, once the borrow of `kvm_run` ends.
enum Step {
    /// `KVM_EXIT_IO`: decode it from `kvm_run` and complete it through the handler.
    Io,
    /// `KVM_EXIT_INTERNAL_ERROR`: decode the suberror from `kvm_run`.
    InternalError,
    /// Return this to the caller.
    Done(Result<VcpuExit>),
}

impl KvmVcpu {
    /// The vCPU index given to [`KvmVm::create_vcpu`].
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The underlying kvm-ioctls vCPU, for state this type does not wrap (individual MSRs,
    /// the LAPIC, guest debugging); snapshots use [`KvmVcpu::save_state`].
    pub fn vcpu_fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// A flag that makes [`Vcpu::run`] return [`VcpuExit::Interrupted`]: `run` checks (and
    /// clears) it before every `KVM_RUN` entry, i.e. on entry and after each port I/O or MMIO
    /// exit it completed. An [`ExitHandler`] holding a clone can so stop the vCPU from inside
    /// an I/O callback (a reset or power-off register, a test's "done" port). Setting it from
    /// another thread while the guest computes without exits has no effect until the next
    /// exit; kick the thread with a signal for that (`KVM_RUN` then fails with EINTR, also
    /// reported as `Interrupted`).
    ///
    /// When the flag stops `run` right after a port I/O or MMIO exit, `run` first re-enters
    /// `KVM_RUN` once with `kvm_run.immediate_exit` set: KVM finishes the interrupted
    /// instruction (an `in` or MMIO load stores its value, rip moves past it) and returns
    /// without running further guest code. KVM keeps that pending completion in no state
    /// userspace can read (KVM API "KVM_RUN"), so without it a snapshot taken now
    /// ([`KvmVcpu::save_state`]) would lose the load or repeat the `out`.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Completes a `KVM_EXIT_IO` exit: one handler call per element of a string
    /// (`rep ins`/`rep outs`) transfer, each `size` bytes.
    fn complete_io(&mut self, handler: &mut dyn ExitHandler) {
        let run: &mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_IO (kvm-ioctls decoded it as IoIn/IoOut just
        // before), so `io` is the union member the kernel filled in.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        let len = size * io.count as usize;
        let base = (run as *mut kvm_run).cast::<u8>();
        // SAFETY: the kernel places the I/O data `data_offset` bytes into the vCPU's mmap'd
        // kvm_run area (a page after the struct), `count * size` bytes long; the mapping lives
        // as long as `self.fd` and nothing else references those bytes during this call.
        // This is the same access kvm-ioctls' own `VcpuFd::run` does.
        let data = unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len) };
        if size == 0 {
            return;
        }
        let port = io.port;
        if u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_IN {
            for chunk in data.chunks_exact_mut(size) {
                handler.pio_read(port, chunk);
            }
        } else {
            for chunk in data.chunks_exact(size) {
                handler.pio_write(port, chunk);
            }
        }
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR` exit (KVM API "KVM_RUN", `internal` and
    /// `emulation_failure` members) as an [`Error::Internal`].
    fn internal_error(&mut self) -> Error {
        let run: &mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which the kernel fills the
        // `internal` member (and, for emulation failures with the flag set, the layout-
        // compatible `emulation_failure` member).
        let internal = unsafe { run.__bindgen_anon_1.internal };
        // SAFETY: as above; only read when suberror and flags say it is valid.
        let emul = unsafe { run.__bindgen_anon_1.emulation_failure };
        let suberror = internal.suberror;
        let name = match suberror {
            KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
            KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected hardware exit reason",
            _ => "unknown suberror",
        };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let mut msg = format!("KVM_EXIT_INTERNAL_ERROR suberror {suberror} ({name})");
        if suberror == KVM_INTERNAL_ERROR_EMULATION
            && ndata >= 1
            && emul.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
        {
            // SAFETY: reading plain bytes out of a `Copy` union whose only member is this
            // struct; validity is signalled by the flag checked above.
            let insn = unsafe { emul.__bindgen_anon_1.__bindgen_anon_1 };
            let n = usize::from(insn.insn_size).min(insn.insn_bytes.len());
            msg.push_str(&format!(", instruction bytes (from rip) {:02x?}", &insn.insn_bytes[..n]));
        } else {
            msg.push_str(&format!(", data {:x?}", &internal.data[..ndata]));
        }
        if let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) {
            msg.push_str(&format!(
                ", at cs:rip {:#x}:{:#x} (cpl {}, cr0 {:#x}, efer {:#x})",
                s.cs.selector, r.rip, s.cs.dpl, s.cr0, s.efer
            ));
        }
        if self.pvm {
            msg.push_str(
                "; this host's /dev/kvm is PVM (kvm_pvm), which runs guest kernel (CPL0) code in \
                 a limited software emulator that cannot execute this guest's code; use the \
                 emu accelerator or a VT-x/AMD-V host",
            );
        }
        Error::Internal(msg)
    }
}

impl Vcpu for KvmVcpu {
    /// Sets the [`KvmVcpu::stop_flag`] and sends SIGRTMIN to the thread inside `run`, so a
    /// vCPU waiting in the kernel (`hlt` with the in-kernel irqchip) returns too.
    fn stopper(&self) -> VcpuStopper {
        self.stopper.clone()
    }

    fn save_snapshot(&mut self) -> Result<crate::VcpuSnapshot> {
        Ok(crate::VcpuSnapshot::Kvm(Box::new(self.save_state()?)))
    }

    fn restore_snapshot(&mut self, state: &crate::VcpuSnapshot) -> Result<()> {
        match state {
            crate::VcpuSnapshot::Kvm(s) => self.restore_state(s),
            crate::VcpuSnapshot::Emu(_) => Err(Error::Unsupported("an emu vCPU state on the kvm accelerator".into())),
        }
    }

    /// Loads `state` ("KVM_SET_REGS", then "KVM_GET_SREGS" + "KVM_SET_SREGS"). Fields
    /// `CpuState` does not cover (pending interrupt bitmap, APIC base) keep their current
    /// value; a zero APIC base becomes [`DEFAULT_APIC_BASE_BSP`] (BSP bit only for vCPU 0).
    fn set_state(&mut self, state: &CpuState) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        regs::apply_to_kvm_sregs(state, self.id, &mut sregs);
        self.fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        self.fd.set_regs(&regs::to_kvm_regs(state)).map_err(kvm_err("KVM_SET_REGS"))
    }

    /// Reads the state back ("KVM_GET_REGS", "KVM_GET_SREGS").
    fn state(&mut self) -> Result<CpuState> {
        let r = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let s = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let mut st = CpuState::default();
        regs::from_kvm_regs(&r, &mut st);
        regs::from_kvm_sregs(&s, &mut st);
        Ok(st)
    }

    /// Enters the guest ("KVM_RUN") until an exit the VMM must see. Port I/O
    /// (`KVM_EXIT_IO`, string I/O split into single accesses) and MMIO (`KVM_EXIT_MMIO`) are
    /// completed through `handler` and the guest re-entered.
    ///
    /// Returns [`VcpuExit::Hlt`] for `KVM_EXIT_HLT` (VMs without irqchip only),
    /// [`VcpuExit::Reset`] for `KVM_EXIT_SHUTDOWN` (triple fault) and
    /// `KVM_SYSTEM_EVENT_RESET`, [`VcpuExit::Shutdown`] for `KVM_SYSTEM_EVENT_SHUTDOWN`,
    /// [`VcpuExit::Interrupted`] for `KVM_EXIT_INTR`, EINTR/EAGAIN from `KVM_RUN`, or the
    /// [`KvmVcpu::stop_flag`].
    ///
    /// # Errors
    ///
    /// [`Error::Internal`] for `KVM_EXIT_INTERNAL_ERROR` (with suberror, instruction bytes
    /// and rip; on PVM hosts with a hint), guest crash events and any other exit reason;
    /// [`Error::Kvm`] for `KVM_EXIT_FAIL_ENTRY` (with the hardware reason) and other
    /// `KVM_RUN` failures.
    fn run(&mut self, handler: &mut dyn ExitHandler) -> Result<VcpuExit> {
        let stopper = self.stopper.clone();
        let _running = stopper.enter_run();
        let slot = ImmediateExitSlot::publish(&mut self.fd);
        let result = self.run_loop(handler);
        drop(slot);
        // `run_loop` or a kick may have set it; a stop requested after this point is still
        // in the flag, which the next `run` checks before entering the guest.
        self.fd.set_kvm_immediate_exit(0);
        result
    }
}

impl KvmVcpu {
    /// The body of [`Vcpu::run`]; the caller clears `immediate_exit` afterwards.
    fn run_loop(&mut self, handler: &mut dyn ExitHandler) -> Result<VcpuExit> {
        // Whether the last exit was port I/O or MMIO that KVM completes on the next KVM_RUN
        // (the only exits after which the loop comes back here).
        let mut io_pending = false;
        // Whether `immediate_exit` is set: the next KVM_RUN completes the pending I/O, then
        // fails with EINTR (reported as `Interrupted`) before entering the guest.
        let mut stopping = false;
        loop {
            if !stopping && self.stop.swap(false, Ordering::AcqRel) {
                if !io_pending {
                    return Ok(VcpuExit::Interrupted);
                }
                self.fd.set_kvm_immediate_exit(1);
                stopping = true;
            }
            let step = match self.fd.run() {
                Ok(exit) => match exit {
                    KvmExit::IoIn(..) | KvmExit::IoOut(..) => Step::Io,
                    KvmExit::MmioRead(addr, data) => {
                        handler.mmio_read(addr, data);
                        io_pending = true;
                        continue;
                    }
                    KvmExit::MmioWrite(addr, data) => {
                        handler.mmio_write(addr, data);
                        io_pending = true;
                        continue;
                    }
                    KvmExit::Hlt => Step::Done(Ok(VcpuExit::Hlt)),
                    KvmExit::Shutdown => Step::Done(Ok(VcpuExit::Reset("triple fault".into()))),
                    KvmExit::SystemEvent(kind, data) => Step::Done(match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => Ok(VcpuExit::Shutdown),
                        KVM_SYSTEM_EVENT_RESET => Ok(VcpuExit::Reset("KVM_SYSTEM_EVENT_RESET".into())),
                        KVM_SYSTEM_EVENT_CRASH => Err(Error::Internal(format!(
                            "guest reported a crash (KVM_SYSTEM_EVENT_CRASH, data {data:x?})"
                        ))),
                        other => Err(Error::Internal(format!(
                            "unexpected KVM_EXIT_SYSTEM_EVENT type {other} (data {data:x?})"
                        ))),
                    }),
                    KvmExit::InternalError => Step::InternalError,
                    KvmExit::FailEntry(reason, cpu) => Step::Done(Err(Error::Kvm(format!(
                        "KVM_RUN: KVM_EXIT_FAIL_ENTRY, hardware_entry_failure_reason {reason:#x} \
                         (host cpu {cpu}); the vCPU state is invalid for VM entry"
                    )))),
                    KvmExit::Intr => Step::Done(Ok(VcpuExit::Interrupted)),
                    KvmExit::MemoryFault { flags, gpa, size } => Step::Done(Err(Error::Internal(format!(
                        "KVM_EXIT_MEMORY_FAULT gpa {gpa:#x} size {size:#x} flags {flags:#x}"
                    )))),
                    other => Step::Done(Err(Error::Internal(format!("unexpected KVM exit {other:?}")))),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Step::Done(Ok(VcpuExit::Interrupted))
                }
                Err(e) => Step::Done(Err(Error::Kvm(format!("KVM_RUN: {e}")))),
            };
            match step {
                Step::Io => {
                    self.complete_io(handler);
                    io_pending = true;
                }
                Step::InternalError => return Err(self.internal_error()),
                Step::Done(result) => return result,
            }
        }
    }
}
