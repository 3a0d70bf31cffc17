//! The emulator behind the seam: [`EmuHypervisor`] and [`EmuVm`], which owns the userspace
//! irqchip.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use devices::irqchip::EmuIrqchipState;
use devices::{EmuIrqchip, EmuMsi, GsiLine, IrqLine, MmioBus, MsiSink, PioBus};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::{EmuVcpu, InterruptController, Wakeup};
use crate::vm::VmStateRepr;
use crate::{
    Clock, CpuState, DeviceWrites, Error, ExitHandler, Hypervisor, IrqTables, Result, Vcpu, VcpuExit, VcpuSnapshot,
    VcpuStopper, Vm, VmSpec, VmState,
};
use x86emu::SharedRam;

/// TSC frequency advertised to emulated guests in CPUID leaf 0x15 (Hz); also the bus clock
/// of the emulated LAPIC timer.
pub const TSC_HZ: u64 = 1_000_000_000;

/// Interrupt inputs of the userspace irqchip (PIC pins 0-15, IOAPIC pins 0-23).
const GSIS: u32 = 24;

/// The emulator as a [`Hypervisor`]: always available. Each vCPU runs the emulator on its
/// own host thread over the shared guest RAM (QEMU's MTTCG model), so a VM may have up to
/// four vCPUs per host CPU, at most 64 (more would only time-slice the host).
#[derive(Clone, Copy, Debug, Default)]
pub struct EmuHypervisor;

/// Most vCPUs of one emulated VM.
pub const MAX_EMU_VCPUS: u8 = 64;

impl Hypervisor for EmuHypervisor {
    fn name(&self) -> &'static str {
        "emu"
    }

    fn max_vcpus(&self) -> u8 {
        let host = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        u8::try_from(host.saturating_mul(4)).unwrap_or(u8::MAX).clamp(1, MAX_EMU_VCPUS)
    }

    fn create_vm(&self, spec: &VmSpec<'_>) -> Result<Arc<dyn Vm>> {
        Ok(Arc::new(EmuVm::new(spec)?))
    }
}

/// Saved VM-level state of an [`EmuVm`]: its interrupt controllers and PIT. Timer times are
/// absolute readings of the guest clock, which the VMM saves and continues.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmuVmState {
    /// PIC pair and ELCR, IOAPIC, LAPIC, PIT.
    pub irqchip: EmuIrqchipState,
}

/// One VM on the emulator: guest RAM (with the state its vCPUs share about it,
/// [`SharedRam`]), the userspace irqchip with one LAPIC per vCPU (shared as
/// `Arc<Mutex<EmuIrqchip>>`, see `devices::irqchip` for its lock order) and the buses that
/// serve its ports (PIC 0x20/0xA0, ELCR 0x4D0, PIT 0x40-0x43 and 0x61) and MMIO pages
/// (IOAPIC 0xFEC0_0000; the LAPIC page 0xFEE0_0000, each vCPU's own) ahead of the VMM's
/// exit handler.
pub struct EmuVm {
    clock: Clock,
    shared: Arc<SharedRam>,
    chip: Arc<Mutex<EmuIrqchip>>,
    pio: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    device_writes: Arc<OnceLock<DeviceWrites>>,
    /// Serialises taking the device-write log and retiring the code it names, so that no
    /// vCPU sees an interrupt before the writes it announces have retired their code.
    dma_lock: Arc<Mutex<()>>,
    /// Which vCPUs exist.
    created: Vec<AtomicBool>,
    /// The doorbell each vCPU sleeps on while halted (or waiting for a SIPI), rung by the
    /// IRQ lines, the MSI sink and the other vCPUs' IPIs for the vCPUs the irqchip
    /// delivered to. They exist before the vCPUs because the VMM wires its devices first.
    wakeups: Arc<[Arc<Wakeup>]>,
}

impl std::fmt::Debug for EmuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmuVm").field("ram", &self.shared).field("vcpus", &self.created.len()).finish_non_exhaustive()
    }
}

impl EmuVm {
    /// A VM over `spec.ram` with the irqchip at its power-on state, on `spec.clock`.
    ///
    /// # Errors
    ///
    /// [`Error::Internal`] if the irqchip's ranges cannot be placed (a bug, not an input).
    pub fn new(spec: &VmSpec<'_>) -> Result<EmuVm> {
        let cpus = spec.cpus.max(1);
        let chip = Arc::new(Mutex::new(EmuIrqchip::with_cpus(spec.clock.clone(), TSC_HZ, cpus)));
        let (mut pio, mut mmio) = (PioBus::new(), MmioBus::new());
        EmuIrqchip::attach(&chip, &mut pio, &mut mmio).map_err(|e| Error::Internal(format!("emu irqchip: {e}")))?;
        Ok(EmuVm {
            clock: spec.clock.clone(),
            shared: SharedRam::new(spec.ram),
            chip,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            device_writes: Arc::new(OnceLock::new()),
            dma_lock: Arc::new(Mutex::new(())),
            created: (0..cpus).map(|_| AtomicBool::new(false)).collect(),
            wakeups: (0..cpus).map(|_| Arc::new(Wakeup::new())).collect(),
        })
    }

    /// What the IRQ lines and the MSI sink run after delivering an interrupt: wake the
    /// vCPUs it went to, if they sleep.
    fn notify(&self) -> devices::Kick {
        let w = self.wakeups.clone();
        Arc::new(move |cpus| wake(&w, cpus))
    }

    /// The userspace interrupt controllers (for tests and debugging).
    pub fn irqchip(&self) -> &Arc<Mutex<EmuIrqchip>> {
        &self.chip
    }

    fn lock_chip(&self) -> std::sync::MutexGuard<'_, EmuIrqchip> {
        self.chip.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Vm for EmuVm {
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu + Send>> {
        let n = self.created.len();
        let (Some(created), Some(wakeup)) = (self.created.get(usize::from(id)), self.wakeups.get(usize::from(id)))
        else {
            return Err(Error::Unsupported(format!("vCPU {id} requested; this emu VM has {n} (ids 0 to {})", n - 1)));
        };
        if created.swap(true, Ordering::AcqRel) {
            return Err(Error::Unsupported(format!("vCPU {id} exists already")));
        }
        let nmi_hint = self.lock_chip().nmi_hint();
        let ic = ChipInterrupts {
            chip: self.chip.clone(),
            cpu: usize::from(id),
            wakeups: self.wakeups.clone(),
            nmi_bit: 1u64.checked_shl(u32::from(id)).unwrap_or(0),
            nmi_hint,
        };
        let cpus = u8::try_from(n).unwrap_or(u8::MAX);
        let mut cpu = EmuVcpu::with_shared(self.shared.clone(), Box::new(ic), self.clock.clone(), TSC_HZ, id, cpus)
            .with_wakeup(wakeup.clone());
        // Every vCPU drains the device-write log before it looks at its interrupts, and
        // retires the code those writes hit for all vCPUs (the code generations are shared).
        let (writes, shared, lock) = (self.device_writes.clone(), self.shared.clone(), self.dma_lock.clone());
        cpu.set_device_writes(Arc::new(move || {
            if let Some(f) = writes.get() {
                let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
                for (gpa, len) in f() {
                    shared.invalidate_code(gpa, len);
                }
            }
            Vec::new()
        }));
        Ok(Box::new(PlatformVcpu {
            cpu,
            cpu_index: usize::from(id),
            chip: self.chip.clone(),
            wakeups: self.wakeups.clone(),
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
        }))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        if gsi >= GSIS {
            return Err(Error::Unsupported(format!("GSI {gsi} out of range (0..{GSIS})")));
        }
        Ok(Arc::new(GsiLine::new(&self.chip, gsi).with_notify(self.notify())))
    }

    fn msi_sink(&self) -> Arc<dyn MsiSink> {
        Arc::new(EmuMsi::new(&self.chip, Some(self.notify())))
    }

    fn supports_ioevents(&self) -> bool {
        false
    }

    fn register_ioevent(&self, _evt: &EventFd, gpa: u64) -> Result<()> {
        Err(Error::Unsupported(format!("ioeventfd at {gpa:#x}: the emu accelerator hands every MMIO store to the VMM")))
    }

    fn unregister_ioevent(&self, evt: &EventFd, gpa: u64) -> Result<()> {
        self.register_ioevent(evt, gpa)
    }

    fn needs_dma_log(&self) -> bool {
        true
    }

    fn set_device_writes(&self, source: DeviceWrites) {
        let _ = self.device_writes.set(source);
    }

    fn irq_tables(&self) -> IrqTables {
        // The irqchip is wired like a PC (ISA IRQ 0 on IOAPIC pin 2), which an MP table of
        // ours does not say; and the Debian kernel reads only the MADT.
        IrqTables::Madt
    }

    fn save_state(&self) -> Result<VmState> {
        Ok(VmState(VmStateRepr::Emu2(Box::new(EmuVmState { irqchip: self.lock_chip().state() }))))
    }

    fn restore_state(&self, state: &VmState) -> Result<()> {
        match &state.0 {
            // Layout 1 (one vCPU, before SMP) reads as layout 2 without the APs' parts.
            VmStateRepr::Emu1(s) | VmStateRepr::Emu2(s) => self
                .lock_chip()
                .restore(&s.irqchip)
                .map_err(|e| Error::InvalidState { what: "emu irqchip", source: Box::new(e) }),
            VmStateRepr::Kvm1(_) => Err(Error::Unsupported("a kvm VM state on the emu accelerator".into())),
        }
    }
}

/// Rings the doorbells of the vCPUs in `cpus` (bit `i` for vCPU `i`).
fn wake(wakeups: &[Arc<Wakeup>], mut cpus: u64) {
    while cpus != 0 {
        let i = cpus.trailing_zeros();
        cpus &= cpus - 1;
        if let Some(w) = usize::try_from(i).ok().and_then(|i| wakeups.get(i)) {
            w.wake();
        }
    }
}

/// One vCPU's view of the irqchip: its LAPIC (and the PIC for vCPU 0). Deliveries that a
/// poll makes to other vCPUs (the PIT through the IOAPIC) wake them.
struct ChipInterrupts {
    chip: Arc<Mutex<EmuIrqchip>>,
    cpu: usize,
    wakeups: Arc<[Arc<Wakeup>]>,
    /// The chip's NMI hint word (`EmuIrqchip::nmi_hint`) and this vCPU's bit in it (0 for
    /// a vCPU from 64 on, which always asks the chip).
    nmi_hint: Arc<std::sync::atomic::AtomicU64>,
    nmi_bit: u64,
}

impl ChipInterrupts {
    fn lock(&self) -> std::sync::MutexGuard<'_, EmuIrqchip> {
        self.chip.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether an NMI may be latched for this vCPU (no lock taken).
    fn maybe_nmi(&self) -> bool {
        self.nmi_bit == 0 || self.nmi_hint.load(Ordering::Acquire) & self.nmi_bit != 0
    }
}

impl InterruptController for ChipInterrupts {
    fn interrupt_pending(&mut self) -> bool {
        self.lock().interrupt_pending_for(self.cpu)
    }
    fn acknowledge(&mut self) -> Option<u8> {
        self.lock().acknowledge_for(self.cpu)
    }
    fn poll(&mut self, now_ns: u64) -> Option<u64> {
        let (next, kicks) = {
            let mut c = self.lock();
            let next = c.poll_cpu(self.cpu, now_ns);
            (next, c.take_kicks())
        };
        wake(&self.wakeups, kicks & !(1u64.checked_shl(u32::try_from(self.cpu).unwrap_or(64)).unwrap_or(0)));
        next
    }
    fn take_nmi(&mut self) -> bool {
        self.maybe_nmi() && self.lock().take_nmi_for(self.cpu)
    }
    fn nmi_pending(&mut self) -> bool {
        self.maybe_nmi() && self.lock().nmi_pending_for(self.cpu)
    }
    fn take_startup(&mut self) -> devices::Startup {
        self.lock().take_startup(self.cpu)
    }
}

/// An [`EmuVcpu`] whose port I/O and MMIO go to the VM's irqchip first (its LAPIC page to
/// its own LAPIC) and to the VMM's handler otherwise.
struct PlatformVcpu {
    cpu: EmuVcpu,
    cpu_index: usize,
    chip: Arc<Mutex<EmuIrqchip>>,
    wakeups: Arc<[Arc<Wakeup>]>,
    pio: Arc<PioBus>,
    mmio: Arc<MmioBus>,
}

// SAFETY: the one part of an `EmuVcpu` that is not `Send` is the emulator's decoded-block
// cache (`Rc`-shared blocks). Every clone of those `Rc`s lives inside that vCPU (its cache,
// or the stack of its run loop while it runs), so moving the whole vCPU to another thread
// moves all clones together and no `Rc` is ever shared between threads. The other fields
// (`Arc`s of `Send + Sync` buses, the interrupt controller and clock, which are `Send`) are
// `Send` themselves.
unsafe impl Send for PlatformVcpu {}

/// Where a vCPU's LAPIC page accesses go: its index, the irqchip, the vCPUs' doorbells.
type LapicRoute<'a> = (usize, &'a Mutex<EmuIrqchip>, &'a [Arc<Wakeup>]);

/// Exit dispatch: the vCPU's LAPIC page, the irqchip's ranges, then the VMM.
struct PlatformExits<'a> {
    /// The vCPU and the irqchip holding its LAPIC (`None` in tests of the buses alone).
    lapic: Option<LapicRoute<'a>>,
    pio: &'a PioBus,
    mmio: &'a MmioBus,
    vmm: &'a mut dyn ExitHandler,
}

/// The offset in the LAPIC page of `gpa`, if it is in it.
fn lapic_offset(gpa: u64) -> Option<u64> {
    gpa.checked_sub(devices::lapic::LAPIC_BASE).filter(|&o| o < devices::lapic::LAPIC_SIZE)
}

impl ExitHandler for PlatformExits<'_> {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if !self.pio.read(port, data) {
            self.vmm.pio_read(port, data);
        }
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        if !self.pio.write(port, data) {
            self.vmm.pio_write(port, data);
        }
    }
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        if let (Some(off), Some((cpu, chip, _))) = (lapic_offset(gpa), self.lapic) {
            chip.lock().unwrap_or_else(|e| e.into_inner()).lapic_read(cpu, off, data);
            return;
        }
        if !self.mmio.read(gpa, data) {
            self.vmm.mmio_read(gpa, data);
        }
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        if let (Some(off), Some((cpu, chip, wakeups))) = (lapic_offset(gpa), self.lapic) {
            // An ICR write delivers its IPI here: wake the vCPUs it reached.
            let kicks = {
                let mut c = chip.lock().unwrap_or_else(|e| e.into_inner());
                c.lapic_write(cpu, off, data);
                c.take_kicks()
            };
            wake(wakeups, kicks);
            return;
        }
        if !self.mmio.write(gpa, data) {
            self.vmm.mmio_write(gpa, data);
        }
    }
}

impl Vcpu for PlatformVcpu {
    fn set_state(&mut self, state: &CpuState) -> Result<()> {
        self.cpu.set_state(state)
    }
    fn state(&mut self) -> Result<CpuState> {
        self.cpu.state()
    }
    fn run(&mut self, handler: &mut dyn ExitHandler) -> Result<VcpuExit> {
        let mut exits = PlatformExits {
            lapic: Some((self.cpu_index, &self.chip, &self.wakeups)),
            pio: &self.pio,
            mmio: &self.mmio,
            vmm: handler,
        };
        self.cpu.run(&mut exits)
    }
    fn stopper(&self) -> VcpuStopper {
        self.cpu.stopper()
    }
    fn save_snapshot(&mut self) -> Result<VcpuSnapshot> {
        self.cpu.save_snapshot()
    }
    fn restore_snapshot(&mut self, state: &VcpuSnapshot) -> Result<()> {
        self.cpu.restore_snapshot(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what reaches the VMM.
    #[derive(Default)]
    struct Vmm {
        pio: Vec<u16>,
        mmio: Vec<u64>,
    }

    impl ExitHandler for Vmm {
        fn pio_read(&mut self, port: u16, data: &mut [u8]) {
            self.pio.push(port);
            data.fill(0xff);
        }
        fn pio_write(&mut self, port: u16, _data: &[u8]) {
            self.pio.push(port);
        }
        fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
            self.mmio.push(gpa);
            data.fill(0xff);
        }
        fn mmio_write(&mut self, gpa: u64, _data: &[u8]) {
            self.mmio.push(gpa);
        }
    }

    fn vm() -> EmuVm {
        EmuVm::new(&VmSpec { ram: &[], clock: Arc::new(|| 0), cpus: 1 }).unwrap()
    }

    #[test]
    fn irqchip_accesses_stay_in_the_vm_and_the_rest_reaches_the_vmm() {
        let vm = vm();
        let mut vmm = Vmm::default();
        let mut x = PlatformExits { lapic: None, pio: &vm.pio, mmio: &vm.mmio, vmm: &mut vmm };
        // PIC IMR write and read back; PIT; COM1 is the VMM's.
        x.pio_write(0x21, &[0xfb]);
        let mut b = [0u8];
        x.pio_read(0x21, &mut b);
        assert_eq!(b[0], 0xfb);
        x.pio_write(0x43, &[0x34]);
        x.pio_write(0x3f8, b"x");
        // LAPIC version register; a PCI BAR is the VMM's.
        let mut v = [0u8; 4];
        x.mmio_read(0xfee0_0030, &mut v);
        assert_ne!(u32::from_le_bytes(v), u32::MAX);
        x.mmio_write(0xc000_3000, &[1, 0, 0, 0]);
        assert_eq!((vmm.pio, vmm.mmio), (vec![0x3f8], vec![0xc000_3000]));
    }

    #[test]
    fn lines_and_state_go_through_the_irqchip() {
        let vm = vm();
        assert!(vm.irq_line(24).is_err());
        // Unmask IRQ 4 on the master PIC (ICW1-4, then OCW1), raise it through the line.
        for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xef)] {
            devices::PioDevice::write(&mut *vm.lock_chip(), port, &[v]);
        }
        vm.irq_line(4).unwrap().pulse();
        assert!(vm.lock_chip().interrupt_pending());
        let saved = vm.save_state().unwrap();
        assert_eq!((saved.engine(), saved.version()), (crate::Choice::Emu, 2));

        let other = self::vm();
        assert!(!other.lock_chip().interrupt_pending());
        other.restore_state(&saved).unwrap();
        assert!(other.lock_chip().interrupt_pending());
        assert_eq!(other.save_state().unwrap(), saved);
        // The serialized form names the engine and layout.
        let json = serde_json::to_string(&saved).unwrap();
        assert!(json.starts_with("{\"emu/2\":"), "{json}");
        let back: VmState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        // Layout 1 (one vCPU, saved before SMP support) still restores.
        let old = json.replacen("emu/2", "emu/1", 1);
        let old: VmState = serde_json::from_str(&old).unwrap();
        assert_eq!(old.version(), 1);
        let third = self::vm();
        third.restore_state(&old).unwrap();
        assert_eq!(third.save_state().unwrap(), saved);
        // A corrupt state is refused naming the part, and leaves the VM as it was.
        let mut bad = saved.clone();
        if let VmStateRepr::Emu2(s) = &mut bad.0 {
            s.irqchip.pic.master.priority_add = 9;
        }
        let fresh = self::vm();
        let before = fresh.save_state().unwrap();
        let e = fresh.restore_state(&bad).unwrap_err();
        assert!(e.to_string().contains("pic.master.priority_add"), "{e}");
        assert!(std::error::Error::source(&e).is_some(), "the validation error is kept as the source");
        assert_eq!(fresh.save_state().unwrap(), before);
    }

    #[test]
    fn irq_lines_msis_and_stops_ring_the_vcpus_doorbell() {
        let vm = vm();
        let rung = |vm: &EmuVm| vm.wakeups[0].wait(Some(std::time::Duration::ZERO));
        assert!(!rung(&vm));
        // IRQ 4 masked at the PIC: nothing for the CPU, no ring.
        for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xff)] {
            devices::PioDevice::write(&mut *vm.lock_chip(), port, &[v]);
        }
        let line = vm.irq_line(4).unwrap();
        line.pulse();
        assert!(!rung(&vm));
        devices::PioDevice::write(&mut *vm.lock_chip(), 0x21, &[0xef]);
        line.pulse();
        assert!(rung(&vm));
        assert_eq!(vm.lock_chip().acknowledge(), Some(0x24));
        devices::PioDevice::write(&mut *vm.lock_chip(), 0x20, &[0x20]);
        // An MSI to the (enabled) LAPIC.
        devices::MmioDevice::write(&mut *vm.lock_chip(), 0xfee0_00f0, &0x1ffu32.to_le_bytes());
        vm.msi_sink().send_msi(0xfee0_0000, 0x41);
        assert!(rung(&vm));
        // The vCPU sleeps on the same doorbell, and its stopper rings it.
        let vcpu = vm.create_vcpu(0).unwrap();
        assert!(!rung(&vm));
        vcpu.stopper().stop();
        assert!(rung(&vm));
    }

    #[test]
    fn vcpus_by_id_and_no_ioevents() {
        let vm = vm();
        assert!(vm.create_vcpu(1).is_err(), "a one-vCPU VM");
        assert!(vm.create_vcpu(0).is_ok());
        assert!(matches!(vm.create_vcpu(0), Err(Error::Unsupported(_))));
        let evt = EventFd::new(0).unwrap();
        assert!(!vm.supports_ioevents());
        assert!(matches!(vm.register_ioevent(&evt, 0xc000_3000), Err(Error::Unsupported(_))));
        assert!(vm.needs_dma_log() && vm.irq_tables() == IrqTables::Madt);
        let smp = EmuVm::new(&VmSpec { ram: &[], clock: Arc::new(|| 0), cpus: 3 }).unwrap();
        for id in [2, 0, 1] {
            assert!(smp.create_vcpu(id).is_ok());
        }
        assert!(smp.create_vcpu(3).is_err() && smp.create_vcpu(1).is_err());
        assert!(EmuHypervisor.max_vcpus() >= 4, "four per host CPU");
    }

    /// An IPI written to one vCPU's LAPIC rings the target vCPU's doorbell only, and an
    /// MSI to APIC ID 2 rings vCPU 2's.
    #[test]
    fn ipis_and_msis_ring_the_target_vcpus_doorbell() {
        let vm = EmuVm::new(&VmSpec { ram: &[], clock: Arc::new(|| 0), cpus: 3 }).unwrap();
        let rung = |i: usize| vm.wakeups[i].wait(Some(std::time::Duration::ZERO));
        let mut vmm = Vmm::default();
        for cpu in 0..3 {
            let mut x = PlatformExits {
                lapic: Some((cpu, &vm.chip, &vm.wakeups)),
                pio: &vm.pio,
                mmio: &vm.mmio,
                vmm: &mut vmm,
            };
            x.mmio_write(0xfee0_00f0, &0x1ffu32.to_le_bytes());
        }
        let mut x =
            PlatformExits { lapic: Some((0, &vm.chip, &vm.wakeups)), pio: &vm.pio, mmio: &vm.mmio, vmm: &mut vmm };
        x.mmio_write(0xfee0_0310, &(1u32 << 24).to_le_bytes());
        x.mmio_write(0xfee0_0300, &0x41u32.to_le_bytes());
        assert_eq!((rung(0), rung(1), rung(2)), (false, true, false));
        // vCPU 1 reads its own LAPIC: its ID and the IPI in its IRR.
        let mut x =
            PlatformExits { lapic: Some((1, &vm.chip, &vm.wakeups)), pio: &vm.pio, mmio: &vm.mmio, vmm: &mut vmm };
        let mut b = [0u8; 4];
        x.mmio_read(0xfee0_0020, &mut b);
        assert_eq!(u32::from_le_bytes(b) >> 24, 1);
        x.mmio_read(0xfee0_0200 + 0x20, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1 << 1, "vector 0x41 in vCPU 1's IRR");
        vm.msi_sink().send_msi(0xfee0_2000, 0x42);
        assert_eq!((rung(0), rung(1), rung(2)), (false, false, true));
        assert!(vmm.mmio.is_empty(), "LAPIC accesses never reach the VMM");
    }

    use crate::RamRegion;

    /// Guest RAM for a test VM: zeroed, 4 KiB aligned, freed on drop.
    struct TestRam {
        ptr: *mut u8,
        layout: std::alloc::Layout,
    }

    impl TestRam {
        fn new(size: usize) -> TestRam {
            let layout = std::alloc::Layout::from_size_align(size, 4096).unwrap();
            // SAFETY: the layout has a non-zero size.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            TestRam { ptr, layout }
        }
        fn write(&self, gpa: u64, bytes: &[u8]) {
            assert!(gpa as usize + bytes.len() <= self.layout.size());
            // SAFETY: in bounds (checked above) of the allocation this struct owns.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(gpa as usize), bytes.len()) };
        }
        fn regions(&self) -> Vec<RamRegion> {
            vec![RamRegion { gpa: 0, size: self.layout.size() as u64, host_addr: self.ptr }]
        }
    }

    impl Drop for TestRam {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout; the VM using it is gone by now
            // (each test drops its VM and vCPUs before the RAM).
            unsafe { std::alloc::dealloc(self.ptr, self.layout) };
        }
    }

    /// Port writes `(port, first byte)` of a vCPU, shared with the test thread.
    #[derive(Clone, Default)]
    struct PortLog(Arc<Mutex<Vec<(u16, u8)>>>);

    impl ExitHandler for PortLog {
        fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn pio_write(&mut self, port: u16, data: &[u8]) {
            self.0.lock().unwrap().push((port, data.first().copied().unwrap_or(0)));
        }
        fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
    }

    impl PortLog {
        fn wait_for(&self, n: usize) -> Vec<(u16, u8)> {
            let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let got = self.0.lock().unwrap().clone();
                if got.len() >= n || std::time::Instant::now() > end {
                    return got;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// An NMI IPI from vCPU 0 reaches vCPU 1 through the irqchip: it wakes vCPU 1 from
    /// `cli; hlt` (which on an application processor waits, it does not end the VM), runs
    /// the NMI handler (real-mode IVT entry 2) and returns after the `hlt`.
    #[test]
    fn an_nmi_ipi_wakes_an_application_processor_from_cli_hlt() {
        use iced_x86::code_asm::*;
        let ram = TestRam::new(1 << 20);
        // vCPU 1 starts at 0800:0000 (SIPI vector 8): report 1, `cli; hlt`, report 2, park.
        let mut a = CodeAssembler::new(16).unwrap();
        a.cli().unwrap();
        a.mov(al, 1u32).unwrap();
        a.out(0x99, al).unwrap();
        a.hlt().unwrap();
        a.mov(al, 2u32).unwrap();
        a.out(0x99, al).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
        ram.write(0x8000, &a.assemble(0x8000).unwrap());
        // NMI handler at 0000:9000: report 0x4e, IRET.
        let mut h = CodeAssembler::new(16).unwrap();
        h.mov(al, 0x4eu32).unwrap();
        h.out(0x98, al).unwrap();
        h.iret().unwrap();
        ram.write(0x9000, &h.assemble(0x9000).unwrap());
        ram.write(2 * 4, &0x0000_9000u32.to_le_bytes());

        let regions = ram.regions();
        let vm = EmuVm::new(&VmSpec { ram: &regions, clock: Arc::new(|| 0), cpus: 2 }).unwrap();
        let mut ap = vm.create_vcpu(1).unwrap();
        let stop = ap.stopper();
        let log = PortLog::default();
        let (mut handler, exits) = (log.clone(), Arc::new(Mutex::new(Vec::new())));
        let thread_exits = exits.clone();
        let t = std::thread::spawn(move || loop {
            match ap.run(&mut handler) {
                Ok(VcpuExit::Interrupted) if stop_requested(&thread_exits) => return,
                Ok(VcpuExit::Interrupted) => {}
                other => thread_exits.lock().unwrap().push(format!("{other:?}")),
            }
        });
        let mut vmm = Vmm::default();
        let mut bsp =
            PlatformExits { lapic: Some((0, &vm.chip, &vm.wakeups)), pio: &vm.pio, mmio: &vm.mmio, vmm: &mut vmm };
        bsp.mmio_write(0xfee0_0310, &(1u32 << 24).to_le_bytes());
        bsp.mmio_write(0xfee0_0300, &0x4500u32.to_le_bytes()); // INIT
        bsp.mmio_write(0xfee0_0300, &0x4608u32.to_le_bytes()); // STARTUP at 0x8000
        assert_eq!(log.wait_for(1), [(0x99, 1)]);
        // vCPU 1 is in `cli; hlt` now (or about to be): nothing more happens by itself.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(log.0.lock().unwrap().len(), 1);
        assert!(exits.lock().unwrap().is_empty(), "cli; hlt on an AP does not end the VM");
        bsp.mmio_write(0xfee0_0300, &0x0400u32.to_le_bytes()); // NMI
        assert_eq!(log.wait_for(3), [(0x99, 1), (0x98, 0x4e), (0x99, 2)]);
        assert!(!vm.lock_chip().nmi_pending_for(1), "taken");
        exits.lock().unwrap().push("stop".into());
        stop.stop();
        t.join().unwrap();
        assert_eq!(*exits.lock().unwrap(), ["stop"]);
        // The VM (and with it the vCPU's RAM mapping) goes before the RAM.
        drop(vm);
    }

    fn stop_requested(exits: &Mutex<Vec<String>>) -> bool {
        exits.lock().unwrap().last().is_some_and(|e| e == "stop")
    }
}
