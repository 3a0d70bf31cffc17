//! Building a VM from a [`VmConfig`] and running it to the end.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use accel::emu::{EmuVcpu, InterruptController};
use accel::kvm::KvmVm;
use accel::{ExitHandler, Vcpu, VcpuExit};
use devices::{AcpiPm, Cmos, EmuIrqchip, EmuMsi, GsiLine, IrqLine, MmioBus, MsiSink, PciBus, PioBus, Serial, I8042};
use virtio::DmaLog;
use vm_memory::GuestMemoryMmap;

use crate::clock::VirtualClock;
use crate::config::{Accel, SerialOut, VmConfig};
use crate::{arch, memory, Error, Result};

/// TSC frequency advertised to emulated guests (Hz); also their LAPIC bus clock.
pub const EMU_TSC_HZ: u64 = 1_000_000_000;
/// Most vCPUs a VM may have (the MP table's APIC IDs, the IOAPIC taking the next one).
pub const MAX_CPUS: u8 = 64;
/// COM1 I/O base and IRQ.
const COM1: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;

/// How a VM run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest powered itself off.
    PowerOff,
    /// The guest asked for a reset (i8042 pulse, reboot) or triple-faulted; the string says which.
    Reset(String),
    /// The user quit from the console escape sequence.
    UserQuit,
}

/// The bus a vCPU's exits go to: port I/O and MMIO devices.
#[derive(Clone)]
pub struct DeviceBus {
    pio: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    exits: Arc<ExitCounts>,
}

/// One vCPU's exits by kind (reported by the API's `vm.counters`).
#[derive(Debug, Default)]
pub struct ExitCounts {
    /// Port I/O reads (`IN`).
    pub pio_read: AtomicU64,
    /// Port I/O writes (`OUT`).
    pub pio_write: AtomicU64,
    /// MMIO loads.
    pub mmio_read: AtomicU64,
    /// MMIO stores.
    pub mmio_write: AtomicU64,
    /// Halts seen by the VMM (KVM without in-kernel HLT handling).
    pub hlt: AtomicU64,
    /// Returns to the VMM with nothing to do (time slices, signals, pause requests).
    pub interrupted: AtomicU64,
}

impl ExitCounts {
    /// `(kind, count)` pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("pio_read", l(&self.pio_read)),
            ("pio_write", l(&self.pio_write)),
            ("mmio_read", l(&self.mmio_read)),
            ("mmio_write", l(&self.mmio_write)),
            ("hlt", l(&self.hlt)),
            ("interrupted", l(&self.interrupted)),
        ]
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

impl ExitHandler for DeviceBus {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        bump(&self.exits.pio_read);
        if !self.pio.read(port, data) {
            data.fill(0xff);
        }
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        bump(&self.exits.pio_write);
        let _ = self.pio.write(port, data);
    }
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        bump(&self.exits.mmio_read);
        if !self.mmio.read(gpa, data) {
            data.fill(0xff);
        }
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        bump(&self.exits.mmio_write);
        let _ = self.mmio.write(gpa, data);
    }
}

/// The emulator's view of the userspace irqchip.
struct EmuIc(Arc<Mutex<EmuIrqchip>>);

impl InterruptController for EmuIc {
    fn interrupt_pending(&mut self) -> bool {
        self.0.lock().map(|c| c.interrupt_pending()).unwrap_or(false)
    }
    fn acknowledge(&mut self) -> Option<u8> {
        self.0.lock().ok().and_then(|mut c| c.acknowledge())
    }
    fn poll(&mut self, now_ns: u64) -> Option<u64> {
        self.0.lock().ok().and_then(|mut c| c.poll(now_ns))
    }
}

/// An interrupt line into KVM's in-kernel irqchip.
struct KvmIrq {
    vm: Arc<KvmVm>,
    gsi: u32,
}

impl IrqLine for KvmIrq {
    fn set_level(&self, level: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, level) {
            tracing::warn!("KVM_IRQ_LINE gsi {}: {e}", self.gsi);
        }
    }
}

/// The console's interrupt line, where MSIs go, the KVM VM (kvm) and the userspace irqchip
/// (emu).
type InterruptParts = (Arc<dyn IrqLine>, Arc<dyn MsiSink>, Option<Arc<KvmVm>>, Option<Arc<Mutex<EmuIrqchip>>>);

/// The 8250 console type.
pub type SerialDev = Serial;

/// A vCPU handed to its thread.
struct SendVcpu(Box<dyn Vcpu>);

// SAFETY: the one part of a vCPU that is not `Send` is the emulator's decoded-block cache
// (`Rc`-shared blocks). Every clone of those `Rc`s lives inside that vCPU (its cache, or the
// stack of its run loop while it runs), so moving the whole vCPU to another thread moves
// all clones together and no `Rc` is ever shared between threads. KVM vCPUs are `Send`.
unsafe impl Send for SendVcpu {}

/// Handles on the legacy devices (for snapshots and the power button).
pub struct LegacyDevices {
    /// The 8250 console.
    pub serial: Arc<Mutex<Serial>>,
    /// The i8042 (reset line).
    pub i8042: Arc<Mutex<I8042>>,
    /// CMOS/RTC.
    pub cmos: Arc<Mutex<Cmos>>,
    /// ACPI PM1 blocks.
    pub pm: Arc<Mutex<AcpiPm>>,
    /// The userspace interrupt controllers and PIT (emu only).
    pub irqchip: Option<Arc<Mutex<EmuIrqchip>>>,
    /// PCI bus 0.
    pub pci: Arc<Mutex<PciBus>>,
}

/// How the VM's vCPU threads are told to pause, resume and stop, and how they report back.
pub struct RunControl {
    m: Mutex<Ctl>,
    cv: Condvar,
    /// Per vCPU: its stop flag, and its thread once started (for a signal kick on KVM).
    vcpus: Mutex<Vec<(Arc<AtomicBool>, Option<libc::pthread_t>)>>,
    /// Set by devices: the guest powered off (ACPI S5) or reset (i8042); the user quit.
    power_off: AtomicBool,
    reset: AtomicBool,
    quit: AtomicBool,
    kvm: bool,
}

#[derive(Default)]
struct Ctl {
    pause: bool,
    parked: usize,
    alive: usize,
    outcome: Option<std::result::Result<RunOutcome, String>>,
    /// Snapshot requests to parked vCPUs: a generation, and each vCPU's answer.
    snap_gen: u64,
    snaps: Vec<Option<std::result::Result<accel::VcpuSnapshot, String>>>,
}

/// Signal used to kick a KVM vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl RunControl {
    fn new(kvm: bool) -> Arc<RunControl> {
        if kvm {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
                    tracing::warn!("vCPU kick signal handler: {e}");
                }
            });
        }
        Arc::new(RunControl {
            m: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            vcpus: Mutex::new(Vec::new()),
            power_off: AtomicBool::new(false),
            reset: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            kvm,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ctl> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every vCPU leave guest mode soon: stop flags, plus a signal on KVM.
    fn kick_all(&self) {
        let v = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        for (stop, thread) in v.iter() {
            stop.store(true, Ordering::SeqCst);
            if let (true, Some(t)) = (self.kvm, thread) {
                // SAFETY: `t` is the pthread of a vCPU thread that is still alive (threads
                // clear their entry before exiting, under this lock).
                unsafe { libc::pthread_kill(*t, kick_signal()) };
            }
        }
    }

    /// Ends the run with `outcome` (the first reason wins) and stops every vCPU.
    fn end(&self, outcome: std::result::Result<RunOutcome, String>) {
        {
            let mut c = self.lock();
            if c.outcome.is_none() {
                c.outcome = Some(outcome);
            }
        }
        self.cv.notify_all();
        self.kick_all();
    }

    /// A device or the user asked the VM to end: that outcome, if any.
    fn requested_end(&self) -> Option<RunOutcome> {
        if self.quit.load(Ordering::SeqCst) {
            Some(RunOutcome::UserQuit)
        } else if self.power_off.load(Ordering::SeqCst) {
            Some(RunOutcome::PowerOff)
        } else if self.reset.load(Ordering::SeqCst) {
            Some(RunOutcome::Reset("guest requested a reset through the i8042 controller".into()))
        } else {
            None
        }
    }

    /// Asks the user-quit outcome (console escape).
    pub fn quit(&self) {
        self.quit.store(true, Ordering::SeqCst);
        self.kick_all();
    }

    /// Whether the run has ended (and how).
    pub fn outcome(&self) -> Option<std::result::Result<RunOutcome, String>> {
        self.lock().outcome.clone()
    }

    /// Parks every vCPU outside guest mode; returns once all are parked (or the run ended).
    pub fn pause(&self) {
        self.lock().pause = true;
        loop {
            self.kick_all();
            let c = self.lock();
            if c.parked >= c.alive || c.outcome.is_some() {
                return;
            }
            let _ = self.cv.wait_timeout(c, std::time::Duration::from_millis(2));
        }
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.lock().pause = false;
        self.cv.notify_all();
    }

    /// Asks every (parked) vCPU for its state; the VM must be paused.
    ///
    /// Errors: the VM is not paused, a vCPU failed to save, or no answer within 10 s.
    pub fn save_vcpus(&self) -> std::result::Result<Vec<accel::VcpuSnapshot>, String> {
        let n = self.vcpus.lock().unwrap_or_else(|e| e.into_inner()).len();
        let mut c = self.lock();
        if !c.pause || c.parked < c.alive || c.alive != n {
            return Err("the vCPUs are not all paused".into());
        }
        c.snap_gen += 1;
        c.snaps = vec![None; n];
        self.cv.notify_all();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while c.snaps.iter().any(|s| s.is_none()) {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err("timed out waiting for the vCPUs' state".into());
            }
            c = self.cv.wait_timeout(c, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        std::mem::take(&mut c.snaps).into_iter().map(|s| s.unwrap_or_else(|| Err("no answer".into()))).collect()
    }

    /// Waits until the run ends; returns its outcome.
    pub fn wait(&self) -> std::result::Result<RunOutcome, String> {
        let mut c = self.lock();
        loop {
            if let Some(o) = &c.outcome {
                return o.clone();
            }
            c = self.cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// One vCPU's loop: runs it until the VM ends, parking while paused.
    fn vcpu_loop(&self, id: usize, mut vcpu: Box<dyn Vcpu>, mut bus: DeviceBus, emu: bool) {
        let mut snap_seen = 0u64;
        loop {
            if let Some(o) = self.requested_end() {
                self.end(Ok(o));
            }
            {
                let mut c = self.lock();
                if c.outcome.is_some() {
                    break;
                }
                if c.pause {
                    c.parked += 1;
                    self.cv.notify_all();
                    while c.pause && c.outcome.is_none() {
                        if c.snap_gen > snap_seen {
                            // Save this vCPU's state for a snapshot (it is parked, so stable).
                            snap_seen = c.snap_gen;
                            drop(c);
                            let r = vcpu.save_snapshot().map_err(|e| format!("vCPU {id}: {e}"));
                            c = self.lock();
                            if let Some(slot) = c.snaps.get_mut(id) {
                                *slot = Some(r);
                            }
                            self.cv.notify_all();
                            continue;
                        }
                        c = self.cv.wait(c).unwrap_or_else(|e| e.into_inner());
                    }
                    c.parked -= 1;
                    continue;
                }
            }
            match vcpu.run(&mut bus) {
                Ok(VcpuExit::Interrupted) => bump(&bus.exits.interrupted),
                Ok(VcpuExit::Hlt) => {
                    bump(&bus.exits.hlt);
                    if !emu {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                Ok(VcpuExit::Shutdown) => self.end(Ok(RunOutcome::PowerOff)),
                Ok(VcpuExit::Reset(why)) => self.end(Ok(RunOutcome::Reset(why))),
                Err(e) => self.end(Err(format!("vCPU {id}: {e}"))),
            }
        }
        let mut v = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = v.get_mut(id) {
            e.1 = None;
        }
        drop(v);
        let mut c = self.lock();
        c.alive -= 1;
        self.cv.notify_all();
    }
}

/// A built VM, ready to run.
pub struct Vm {
    memory: GuestMemoryMmap,
    /// The vCPUs (boot vCPU first) until [`Vm::start`] hands them to their threads.
    vcpus: Vec<SendVcpu>,
    bus: DeviceBus,
    ctl: Arc<RunControl>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Per vCPU exit counters (once started).
    pub exit_counts: Vec<Arc<ExitCounts>>,
    /// Legacy device handles.
    pub devices: LegacyDevices,
    /// The guest clock (emu).
    pub clock: Arc<VirtualClock>,
    kvm: Option<Arc<KvmVm>>,
    /// The virtio devices on PCI bus 0.
    pub virtio: Vec<crate::virtio_devices::PciVirtio>,
    /// Which accelerator was chosen, and why.
    pub accel_note: String,
    /// Whether the vCPU runs on the emulator.
    pub is_emu: bool,
}

fn serial_sink(out: &SerialOut) -> Result<Box<dyn Write + Send>> {
    Ok(match out {
        SerialOut::Stdio => Box::new(std::io::stdout()),
        SerialOut::Null => Box::new(std::io::sink()),
        SerialOut::File(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|err| Error::Io { path: p.display().to_string(), err })?,
        ),
    })
}

/// Environment variable that lets `--accel kvm` run on a PVM host anyway: PVM runs small
/// hand-made guests (the kvm tests use it) but not a stock Linux kernel.
pub const KVM_ON_PVM_ENV: &str = "RUSTVISOR_KVM_ON_PVM";

/// Decides the accelerator for `auto` (and checks an explicit `kvm`).
pub(crate) fn choose_accel(a: Accel) -> Result<(bool, String)> {
    let kvm_ok = accel::kvm::available();
    let pvm = accel::kvm::is_pvm_host();
    match a {
        Accel::Emu => Ok((true, "emu: requested".into())),
        Accel::Kvm => {
            if !kvm_ok {
                return Err(Error::Config {
                    field: "--accel",
                    msg: "kvm: /dev/kvm is not usable on this host (accepted here: emu, auto)".into(),
                });
            }
            if pvm && std::env::var_os(KVM_ON_PVM_ENV).is_none() {
                return Err(Error::Config {
                    field: "--accel",
                    msg: "kvm: this host's KVM is the PVM backend (no VT-x/AMD-V), which cannot run a stock Linux kernel (accepted here: emu, auto)".into(),
                });
            }
            Ok((false, "kvm: requested".into()))
        }
        Accel::Auto => {
            if kvm_ok && !pvm {
                Ok((false, "kvm: /dev/kvm with hardware virtualization".into()))
            } else if pvm {
                Ok((true, "emu: /dev/kvm is the PVM backend, which cannot run a stock kernel".into()))
            } else {
                Ok((true, "emu: /dev/kvm is not available".into()))
            }
        }
    }
}

impl Vm {
    /// Builds guest memory, loads the kernel and sets up devices and the boot vCPU.
    pub fn new(cfg: &VmConfig) -> Result<Vm> {
        cfg.validate()?;
        let (is_emu, accel_note) = choose_accel(cfg.accel)?;
        if is_emu && cfg.cpus > 1 {
            return Err(Error::Config {
                field: "--cpus",
                msg: format!("{} vCPUs requested; the emu accelerator runs 1 vCPU for now (accepted: 1)", cfg.cpus),
            });
        }
        if cfg.cpus > MAX_CPUS {
            return Err(Error::Config {
                field: "--cpus",
                msg: format!("{} vCPUs requested (accepted: 1 to {MAX_CPUS})", cfg.cpus),
            });
        }
        let mem = memory::create(cfg.mem_size)?;
        let info = arch::load(&mem, cfg.mem_size, &cfg.kernel, cfg.initrd.as_deref(), &cfg.cmdline)?;
        if !is_emu {
            // The MP table lists every vCPU's local APIC and the in-kernel IOAPIC.
            arch::mptable::write(&mem, cfg.cpus)?;
        }
        let mut vm = Self::build(cfg, mem, is_emu, accel_note)?;
        if let Some(v) = vm.vcpus.first_mut() {
            v.0.set_state(&arch::boot_cpu_state(&info))?;
        }
        Ok(vm)
    }

    /// Memory, devices and vCPUs for `cfg` over `mem` (already holding the guest), without
    /// touching vCPU registers.
    pub(crate) fn build(cfg: &VmConfig, mem: GuestMemoryMmap, is_emu: bool, accel_note: String) -> Result<Vm> {
        let ram = memory::regions(&mem);
        let mut pio = PioBus::new();
        let mut mmio = MmioBus::new();
        let vclock = Arc::new(VirtualClock::new(0));
        let vc = vclock.clone();
        let clock: devices::Clock = Arc::new(move || vc.now());
        let dev_err = |e: devices::Error| Error::Device(e.to_string());
        let ctl = RunControl::new(!is_emu);

        let dma = Arc::new(DmaLog::default());
        let mut vcpus: Vec<SendVcpu> = Vec::new();
        let mut stops = Vec::new();
        let (serial_irq, msi, kvm, irqchip): InterruptParts = if is_emu {
            let chip = Arc::new(Mutex::new(EmuIrqchip::new(clock.clone(), EMU_TSC_HZ)));
            // PIC, ELCR, PIT and port 0x61 ports; LAPIC and IOAPIC pages.
            EmuIrqchip::attach(&chip, &mut pio, &mut mmio).map_err(dev_err)?;
            let line: Arc<dyn IrqLine> = Arc::new(GsiLine::new(&chip, COM1_IRQ));
            let msi: Arc<dyn MsiSink> = Arc::new(EmuMsi::new(&chip, None));
            let mut v = EmuVcpu::new(&ram, Box::new(EmuIc(chip.clone())), clock.clone(), EMU_TSC_HZ, 0);
            // Device DMA into pages the emulator decoded code from retires that code.
            let d = dma.clone();
            v.set_device_writes(Arc::new(move || if d.pending() { d.take() } else { Vec::new() }));
            stops.push(v.stop_flag());
            vcpus.push(SendVcpu(Box::new(v)));
            (line, msi, None, Some(chip))
        } else {
            let vm = Arc::new(KvmVm::new(&ram)?);
            // Application processors wait in KVM for the guest's INIT/SIPI (MP spec B.4).
            for id in 0..cfg.cpus {
                let v = vm.create_vcpu(id)?;
                stops.push(v.stop_flag());
                vcpus.push(SendVcpu(Box::new(v)));
            }
            let line: Arc<dyn IrqLine> = Arc::new(KvmIrq { vm: vm.clone(), gsi: COM1_IRQ });
            let msi: Arc<dyn MsiSink> = Arc::new(crate::virtio_devices::KvmMsi::new(vm.clone()));
            (line, msi, Some(vm), None)
        };
        *ctl.vcpus.lock().unwrap_or_else(|e| e.into_inner()) = stops.into_iter().map(|s| (s, None)).collect();

        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, serial_sink(&cfg.serial)?)));
        pio.insert(COM1, 8, serial.clone()).map_err(dev_err)?;
        let c = Arc::downgrade(&ctl);
        let i8042 = Arc::new(Mutex::new(I8042::new(Box::new(move || {
            if let Some(c) = c.upgrade() {
                c.reset.store(true, Ordering::SeqCst);
                c.kick_all();
            }
        }))));
        pio.insert(0x60, 1, i8042.clone()).map_err(dev_err)?;
        pio.insert(0x64, 1, i8042.clone()).map_err(dev_err)?;
        let c = Arc::downgrade(&ctl);
        let pm = Arc::new(Mutex::new(AcpiPm::new(Box::new(move || {
            if let Some(c) = c.upgrade() {
                c.power_off.store(true, Ordering::SeqCst);
                c.kick_all();
            }
        }))));
        pio.insert(devices::acpi_pm::PM1A_EVT_BLK, 6, pm.clone()).map_err(dev_err)?;
        let sci: Arc<dyn IrqLine> = match (&irqchip, &kvm) {
            (Some(chip), _) => Arc::new(GsiLine::new(chip, arch::acpi::SCI_IRQ.into())),
            (None, Some(vm)) => Arc::new(KvmIrq { vm: vm.clone(), gsi: arch::acpi::SCI_IRQ.into() }),
            (None, None) => Arc::new(devices::NoIrq),
        };
        pm.lock().unwrap_or_else(|e| e.into_inner()).set_sci(sci);
        let low = memory::ram_ranges(cfg.mem_size)[0].1;
        let cmos = Arc::new(Mutex::new(Cmos::new(low, arch::high_mem(cfg.mem_size))));
        pio.insert(0x70, 2, cmos.clone()).map_err(dev_err)?;

        // PCI bus 0 (conf1) with the virtio devices; their BARs sit in the MMIO window.
        let mut pci = PciBus::new();
        let ioevents = kvm
            .clone()
            .map(|vm| Arc::new(crate::virtio_devices::KvmIoEvents(vm)) as Arc<dyn virtio::pci::IoEventRegistrar>);
        let virtio = crate::virtio_devices::build(cfg, &mem, &mut pci, msi, dma, ioevents)?;
        let pci = Arc::new(Mutex::new(pci));
        pio.insert(devices::pci::CONF1_PORT, devices::pci::CONF1_LEN, pci.clone()).map_err(dev_err)?;
        mmio.insert(memory::PCI_MMIO_START, memory::PCI_MMIO_END - memory::PCI_MMIO_START, pci.clone())
            .map_err(dev_err)?;

        Ok(Vm {
            memory: mem,
            vcpus,
            bus: DeviceBus { pio: Arc::new(pio), mmio: Arc::new(mmio), exits: Arc::default() },
            ctl,
            threads: Vec::new(),
            exit_counts: Vec::new(),
            devices: LegacyDevices { serial, i8042, cmos, pm, irqchip, pci },
            clock: vclock,
            kvm,
            virtio,
            accel_note,
            is_emu,
        })
    }

    /// The console UART, for feeding input.
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.devices.serial.clone()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The run control (pause, resume, quit, wait).
    pub fn control(&self) -> Arc<RunControl> {
        self.ctl.clone()
    }

    /// Starts one thread per vCPU (idempotent). On KVM the application processors wait in
    /// KVM for the guest's INIT/SIPI.
    ///
    /// Errors: `Error::Device` when a thread cannot be created.
    pub fn start(&mut self) -> Result<()> {
        let emu = self.is_emu;
        for (id, v) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let ctl = self.ctl.clone();
            let mut bus = self.bus.clone();
            bus.exits = Arc::new(ExitCounts::default());
            self.exit_counts.push(bus.exits.clone());
            ctl.lock().alive += 1;
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let v = v;
                    {
                        let mut vs = ctl.vcpus.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(e) = vs.get_mut(id) {
                            // SAFETY: pthread_self has no preconditions.
                            e.1 = Some(unsafe { libc::pthread_self() });
                        }
                    }
                    ctl.vcpu_loop(id, v.0, bus, emu);
                })
                .map_err(|e| {
                    self.ctl.lock().alive -= 1;
                    Error::Device(format!("vCPU thread: {e}"))
                })?;
            self.threads.push(t);
        }
        Ok(())
    }

    /// Like [`Vm::start`], with every vCPU parked before it runs guest code (a restored VM
    /// waits for `vm.resume`).
    pub fn start_paused(&mut self) -> Result<()> {
        self.ctl.lock().pause = true;
        self.clock.pause();
        self.start()?;
        self.ctl.pause();
        Ok(())
    }

    /// The vCPUs, before [`Vm::start`] (boot vCPU first; empty once started).
    pub fn vcpus_mut(&mut self) -> impl Iterator<Item = &mut Box<dyn Vcpu>> {
        self.vcpus.iter_mut().map(|v| &mut v.0)
    }

    /// Number of vCPUs not yet started.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The KVM VM, on the kvm accelerator.
    pub fn kvm(&self) -> Option<&Arc<KvmVm>> {
        self.kvm.as_ref()
    }

    /// Presses the guest-visible ACPI power button (the guest decides what to do).
    pub fn press_power_button(&self) {
        self.devices.pm.lock().unwrap_or_else(|e| e.into_inner()).press_power_button();
    }

    /// Pauses the vCPUs and the guest clock; returns once no vCPU runs guest code.
    pub fn pause(&self) {
        self.ctl.pause();
        self.clock.pause();
    }

    /// Resumes after [`Vm::pause`].
    pub fn resume(&self) {
        self.clock.resume();
        self.ctl.resume();
    }

    /// Stops every vCPU and waits for their threads.
    pub fn stop(&mut self) {
        self.ctl.end(Ok(RunOutcome::UserQuit));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Runs the VM until it powers off, resets or the user quits.
    ///
    /// Errors: `Error::Accel` when the accelerator cannot go on (e.g. an instruction the
    /// emulator does not implement, a KVM internal error).
    pub fn run(&mut self) -> Result<RunOutcome> {
        self.start()?;
        let outcome = self.ctl.wait();
        self.ctl.kick_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        outcome.map_err(|e| Error::Accel(accel::Error::Internal(e)))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
        // Device workers stop with their devices.
        let _ = &self.kvm;
    }
}
