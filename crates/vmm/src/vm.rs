//! Building a VM from a [`VmConfig`] and running it to the end.

use std::io::Write;
use std::sync::{Arc, Mutex};

use accel::{Hypervisor, Vcpu};
use devices::{AcpiPm, Cmos, MmioBus, PciBus, PioBus, Serial, I8042};
use virtio::DmaLog;
use vm_memory::GuestMemoryMmap;

use crate::clock::VirtualClock;
use crate::config::{Accel, ConsoleOut, VmConfig};
use crate::console_mux::{ConsoleMux, MuxError};
use crate::{arch, memory, Error, Result};

pub use crate::device_bus::{DeviceBus, ExitCounts};
pub use crate::vstate::{RunControl, RunOutcome, RunState};

/// Most vCPUs a VM may have (the MP table's APIC IDs, the IOAPIC taking the next one).
pub const MAX_CPUS: u8 = crate::config::MAX_CPUS;
/// COM1 I/O base and IRQ.
const COM1: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;

/// The 8250 console type.
pub type SerialDev = Serial;

/// A vCPU of the VM's accelerator, ready to move to its thread.
type BoxedVcpu = Box<dyn Vcpu + Send>;

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
    /// PCI bus 0.
    pub pci: Arc<Mutex<PciBus>>,
}

/// A built VM, ready to run.
pub struct Vm {
    memory: GuestMemoryMmap,
    /// The accelerator's VM (memory slots, interrupt controllers, VM-level state).
    accel: Arc<dyn accel::Vm>,
    /// [`accel::Hypervisor::name`] of the accelerator.
    accelerator: &'static str,
    /// The vCPUs (boot vCPU first) until [`Vm::start`] hands them to their threads.
    vcpus: Vec<BoxedVcpu>,
    bus: DeviceBus,
    ctl: Arc<RunControl>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Per vCPU exit counters (once started).
    pub exit_counts: Vec<Arc<ExitCounts>>,
    /// Legacy device handles.
    pub devices: LegacyDevices,
    /// The guest clock (the accelerator's userspace timers run on it; paused with the VM).
    pub clock: Arc<VirtualClock>,
    /// Device writes to guest RAM, for accelerators that need them (disabled otherwise).
    dma: Arc<DmaLog>,
    /// The virtio devices on PCI bus 0.
    pub virtio: Vec<crate::virtio_devices::PciVirtio>,
    /// The balloon's host handle (set the target, read the guest's statistics), when the VM
    /// has a balloon.
    pub balloon: Option<virtio::balloon::BalloonHandle>,
    /// Which accelerator was chosen, and why.
    pub accel_note: String,
    /// The serial console's socket, for [`ConsoleOut::Socket`] (dropped with the VM: the
    /// socket goes and its clients see the end of the stream).
    console: Option<ConsoleMux>,
    /// Messages from the devices, until [`Vm::take_device_events`].
    events: Option<std::sync::mpsc::Receiver<crate::virtio_devices::DeviceEvent>>,
}

/// The 8250's output sink for `out`, and the console socket's multiplexer for
/// [`ConsoleOut::Socket`] (started once the UART exists, [`start_console`]).
fn serial_sink(out: &ConsoleOut) -> Result<(Box<dyn Write + Send>, Option<ConsoleMux>)> {
    Ok(match out {
        ConsoleOut::Stdio => (Box::new(std::io::stdout()), None),
        ConsoleOut::Null => (Box::new(std::io::sink()), None),
        ConsoleOut::File(p) => (
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|err| Error::Io { path: p.display().to_string(), err })?,
            ),
            None,
        ),
        ConsoleOut::Socket { path, log } => {
            let mux = ConsoleMux::new(path, log.as_deref()).map_err(|e| match e {
                MuxError::NotASocket(_) | MuxError::InUse(_) => Error::Config { field: "--serial", msg: e.to_string() },
                MuxError::Io { source, .. } => Error::DeviceIo { name: format!("serial console {out}"), source },
            })?;
            (Box::new(mux.writer()), Some(mux))
        }
    })
}

/// Starts `mux` typing into `serial` with the back-pressure of its 64-byte FIFO (what does
/// not fit is offered again). The thread holds the UART weakly: it never keeps it alive.
fn start_console(mux: &mut ConsoleMux, serial: &Arc<Mutex<Serial>>) -> Result<()> {
    let uart = Arc::downgrade(serial);
    let input = Box::new(move |bytes: &[u8]| match uart.upgrade() {
        Some(s) => s.lock().unwrap_or_else(|e| e.into_inner()).enqueue_input(bytes),
        // The VM is going away: the bytes go nowhere.
        None => bytes.len(),
    });
    mux.start(input).map_err(|source| Error::DeviceIo { name: "serial console".into(), source })
}

/// Environment variable that lets `--accel kvm` run on a PVM host anyway: PVM runs small
/// hand-made guests (the kvm tests use it) but not a stock Linux kernel.
pub const KVM_ON_PVM_ENV: &str = "RUSTVISOR_KVM_ON_PVM";

/// Picks the accelerator for `a` ([`accel::select`]), letting an explicit `kvm` through on
/// a PVM host when [`KVM_ON_PVM_ENV`] is set.
///
/// Errors: `Error::Config` for `--accel` when the requested accelerator cannot run here.
pub(crate) fn choose_accel(a: Accel) -> Result<accel::Selection> {
    let options = accel::SelectOptions { allow_kvm_on_pvm: std::env::var_os(KVM_ON_PVM_ENV).is_some() };
    accel::select(crate::config::engine(a), options).map_err(|e| match e {
        accel::Error::Unavailable(msg) => Error::Config { field: "--accel", msg },
        other => Error::Accel(other),
    })
}

impl Vm {
    /// Builds guest memory, loads the kernel and sets up devices and the boot vCPU.
    pub fn new(cfg: &VmConfig) -> Result<Vm> {
        crate::config::validate(cfg)?;
        let selection = choose_accel(cfg.accel)?;
        let hv = selection.hypervisor.as_ref();
        let max = hv.max_vcpus().min(MAX_CPUS);
        if cfg.cpus > max {
            return Err(Error::Config {
                field: "--cpus",
                msg: format!(
                    "{} vCPUs requested; the {} accelerator runs at most {max} (accepted: {})",
                    cfg.cpus,
                    hv.name(),
                    if max == 1 { "1".to_string() } else { format!("1 to {max}") }
                ),
            });
        }
        let mem = memory::create(cfg.memory_bytes(), &cfg.memory_options)?;
        let info = arch::load(
            &mem,
            cfg.memory_bytes(),
            std::path::Path::new(&cfg.kernel),
            cfg.initrd.as_deref().map(std::path::Path::new),
            &cfg.cmdline,
        )?;
        let mut vm = Self::build(cfg, mem, hv, selection.reason)?;
        // The interrupt controllers, as the accelerator's irqchip is wired: every vCPU's
        // local APIC and the IOAPIC.
        match vm.accel.irq_tables() {
            accel::IrqTables::None => {}
            accel::IrqTables::MpTable => arch::mptable::write(&vm.memory, cfg.cpus)?,
            accel::IrqTables::Madt => arch::acpi::write_madt(&vm.memory, cfg.cpus)?,
        }
        if let Some(v) = vm.vcpus.first_mut() {
            v.set_state(&arch::boot_cpu_state(&info))?;
        }
        Ok(vm)
    }

    /// Memory, devices and vCPUs for `cfg` over `mem` (already holding the guest) on
    /// `hypervisor`, without touching vCPU registers. `accel_note` says why that accelerator
    /// runs it (for the log).
    ///
    /// Errors: `Error::Accel` when the accelerator cannot create the VM or a vCPU;
    /// `Error::Config`/`Error::Device`/`Error::DeviceIo`/`Error::DeviceSpace` for devices that
    /// cannot be opened or placed.
    pub(crate) fn build(
        cfg: &VmConfig,
        mem: GuestMemoryMmap,
        hypervisor: &dyn Hypervisor,
        accel_note: String,
    ) -> Result<Vm> {
        let ram = memory::regions(&mem);
        let mut pio = PioBus::new();
        let mut mmio = MmioBus::new();
        let vclock = Arc::new(VirtualClock::new(0));
        let vc = vclock.clone();
        let clock: devices::Clock = Arc::new(move || vc.now());
        let dev_err = |name: &'static str| move |source: devices::Error| Error::Device { name, source };
        let ctl = RunControl::new();

        let accel = hypervisor.create_vm(&accel::VmSpec { ram: &ram, clock, cpus: cfg.cpus })?;
        // Only an accelerator that retires code on device writes gets them recorded.
        let dma = Arc::new(if accel.needs_dma_log() { DmaLog::default() } else { DmaLog::disabled() });
        let d = dma.clone();
        accel.set_device_writes(Arc::new(move || if d.pending() { d.take() } else { Vec::new() }));
        // Application processors wait in the accelerator for the guest's INIT/SIPI (MP spec B.4).
        let vcpus = (0..cfg.cpus).map(|id| accel.create_vcpu(id)).collect::<accel::Result<Vec<_>>>()?;
        let serial_irq = accel.irq_line(COM1_IRQ)?;

        let (sink, mut console) = serial_sink(&cfg.serial)?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, sink)));
        if let Some(mux) = &mut console {
            start_console(mux, &serial)?;
        }
        pio.insert(COM1, 8, serial.clone()).map_err(dev_err("serial"))?;
        let c = Arc::downgrade(&ctl);
        let i8042 = Arc::new(Mutex::new(I8042::new(Box::new(move || {
            if let Some(c) = c.upgrade() {
                c.finish(Ok(RunOutcome::Reset("guest requested a reset through the i8042 controller".into())));
            }
        }))));
        pio.insert(0x60, 1, i8042.clone()).map_err(dev_err("i8042"))?;
        pio.insert(0x64, 1, i8042.clone()).map_err(dev_err("i8042"))?;
        let c = Arc::downgrade(&ctl);
        let pm = Arc::new(Mutex::new(AcpiPm::new(Box::new(move || {
            if let Some(c) = c.upgrade() {
                c.finish(Ok(RunOutcome::PowerOff));
            }
        }))));
        pio.insert(devices::acpi_pm::PM1A_EVT_BLK, 6, pm.clone()).map_err(dev_err("acpi-pm"))?;
        let sci = accel.irq_line(arch::acpi::SCI_IRQ.into())?;
        pm.lock().unwrap_or_else(|e| e.into_inner()).set_sci(sci);
        let low = memory::ram_ranges(cfg.memory_bytes())[0].1;
        let cmos = Arc::new(Mutex::new(Cmos::new(low, arch::high_mem(cfg.memory_bytes()))));
        pio.insert(0x70, 2, cmos.clone()).map_err(dev_err("cmos"))?;

        // PCI bus 0 (conf1) with the virtio devices; their BARs sit in the MMIO window.
        let mut pci = PciBus::new();
        let ioevents = accel.supports_ioevents().then(|| {
            Arc::new(crate::virtio_devices::VmIoEvents(accel.clone())) as Arc<dyn virtio::pci::IoEventRegistrar>
        });
        let (events_tx, events) = std::sync::mpsc::channel();
        let built =
            crate::virtio_devices::build(cfg, &mem, &mut pci, accel.msi_sink(), dma.clone(), ioevents, &events_tx)?;
        let pci = Arc::new(Mutex::new(pci));
        pio.insert(devices::pci::CONF1_PORT, devices::pci::CONF1_LEN, pci.clone()).map_err(dev_err("pci"))?;
        mmio.insert(memory::PCI_MMIO_START, memory::PCI_MMIO_END - memory::PCI_MMIO_START, pci.clone())
            .map_err(dev_err("pci"))?;

        Ok(Vm {
            memory: mem,
            accelerator: hypervisor.name(),
            accel,
            vcpus,
            bus: DeviceBus::new(pio, mmio),
            ctl,
            threads: Vec::new(),
            exit_counts: Vec::new(),
            devices: LegacyDevices { serial, i8042, cmos, pm, pci },
            clock: vclock,
            dma,
            virtio: built.devices,
            balloon: built.balloon,
            accel_note,
            console,
            events: Some(events),
        })
    }

    /// The devices' messages ([`crate::virtio_devices::DeviceEvent`]: a disk with
    /// `on_error: pause` that stalled), for whoever runs the VM; `None` once taken. The
    /// channel ends when the VM's devices are gone. Without a taker, a stalled disk just
    /// waits (`rustvisor run` refuses `on-error=pause` without `--api-socket`).
    pub fn take_device_events(&mut self) -> Option<std::sync::mpsc::Receiver<crate::virtio_devices::DeviceEvent>> {
        self.events.take()
    }

    /// Tells every disk that stalled on a host I/O error (`on_error: pause`) to retry the
    /// request it kept, then serve the rest of its queue; disks that did not stall are not
    /// affected. Never blocks (the retries run on the disks' workers).
    pub fn retry_stalled_disks(&self) {
        for d in &self.virtio {
            if let Some(r) = &d.retry {
                r.retry();
            }
        }
    }

    /// The console UART, for feeding input.
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.devices.serial.clone()
    }

    /// The serial console's socket multiplexer ([`ConsoleOut::Socket`]), if any.
    pub fn console_mux(&self) -> Option<&ConsoleMux> {
        self.console.as_ref()
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
    /// Errors: `Error::VcpuThread` when a thread cannot be created.
    pub fn start(&mut self) -> Result<()> {
        let role = if self.accelerator == "kvm" { seccomp::Role::VcpuKvm } else { seccomp::Role::VcpuEmu };
        for (id, v) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let mut bus = self.bus.clone();
            bus.exits = Arc::new(ExitCounts::default());
            self.exit_counts.push(bus.exits.clone());
            let t = self.ctl.spawn_vcpu(id, v, bus, role).map_err(|source| Error::VcpuThread { id, source })?;
            self.threads.push(t);
        }
        Ok(())
    }

    /// Like [`Vm::start`], with every vCPU parked before it runs guest code (a restored VM
    /// waits for `vm.resume`).
    pub fn start_paused(&mut self) -> Result<()> {
        self.ctl.pause_before_start();
        self.clock.pause();
        self.start()
    }

    /// The vCPUs, before [`Vm::start`] (boot vCPU first; empty once started).
    pub fn vcpus_mut(&mut self) -> impl Iterator<Item = &mut BoxedVcpu> {
        self.vcpus.iter_mut()
    }

    /// Number of vCPUs not yet started.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The accelerator's VM (its VM-level state for snapshots: [`accel::Vm::save_state`]).
    pub fn accel(&self) -> &Arc<dyn accel::Vm> {
        &self.accel
    }

    /// Device writes to guest RAM (DMA) recorded for the accelerator: enabled only where
    /// [`accel::Vm::needs_dma_log`], so nothing accumulates where no one drains it.
    pub fn dma_log(&self) -> &Arc<DmaLog> {
        &self.dma
    }

    /// Each vCPU's host thread ID, by vCPU index (0 for a thread not started yet).
    pub fn vcpu_tids(&self) -> Vec<u32> {
        self.ctl.vcpu_tids()
    }

    /// The accelerator's name ("kvm", "emu"), for the user.
    pub fn accelerator(&self) -> &'static str {
        self.accelerator
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
        self.ctl.finish(Ok(RunOutcome::UserQuit));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Runs the VM until it powers off, resets or the user quits.
    ///
    /// Errors: `Error::Vcpu` when a vCPU cannot go on (e.g. an instruction the emulator does
    /// not implement, a KVM internal error), keeping the accelerator's error as its source.
    pub fn run(&mut self) -> Result<RunOutcome> {
        self.start()?;
        let outcome = self.ctl.wait();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        outcome.map_err(Error::Vcpu)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
        // Device workers stop with their devices.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(accel: Accel) -> VmConfig {
        VmConfig {
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
            memory_mib: 16,
            cpus: 1,
            accel,
            serial: ConsoleOut::Null,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            rng: false,
            console: None,
            balloon: None,
            memory_options: Default::default(),
        }
    }

    /// Every accelerator this host can build a VM on (kvm also on a PVM host: building needs
    /// no guest kernel).
    fn hypervisors() -> Vec<Box<dyn Hypervisor>> {
        let options = accel::SelectOptions { allow_kvm_on_pvm: true };
        [Accel::Emu, Accel::Kvm]
            .into_iter()
            .filter_map(|c| accel::select(crate::config::engine(c), options).ok())
            .map(|s| s.hypervisor)
            .collect()
    }

    #[test]
    fn dma_log_records_only_where_the_accelerator_needs_it() {
        for hv in hypervisors() {
            let cfg = config(hv.name().parse().unwrap());
            let vm = Vm::build(
                &cfg,
                memory::create(cfg.memory_bytes(), &cfg.memory_options).unwrap(),
                hv.as_ref(),
                "test".into(),
            )
            .unwrap();
            assert_eq!(vm.accelerator(), hv.name());
            let log = vm.dma_log();
            assert_eq!(log.is_enabled(), vm.accel().needs_dma_log(), "{}", hv.name());
            for i in 0..1000u64 {
                log.record(i << 12, 4096);
            }
            if vm.accel().needs_dma_log() {
                assert!(log.pending(), "{}: device writes are recorded for the engine", hv.name());
            } else {
                assert!(!log.pending() && log.take().is_empty(), "{}: nothing kept undrained", hv.name());
            }
        }
    }

    #[test]
    fn a_vm_saves_and_restores_its_accelerator_state_through_the_seam() {
        for hv in hypervisors() {
            let cfg = config(hv.name().parse().unwrap());
            let build = || {
                Vm::build(
                    &cfg,
                    memory::create(cfg.memory_bytes(), &cfg.memory_options).unwrap(),
                    hv.as_ref(),
                    "test".into(),
                )
            };
            let (a, b) = (build().unwrap(), build().unwrap());
            assert_eq!(a.vcpu_count(), 1);
            let state = a.accel().save_state().unwrap();
            assert_eq!(state.engine().to_string(), hv.name(), "the state names its engine");
            b.accel().restore_state(&state).unwrap();
            assert_eq!(b.accel().save_state().unwrap().engine(), state.engine());
        }
    }

    #[test]
    fn cpus_beyond_the_accelerator_are_refused_naming_it() {
        let mut cfg = config(Accel::Emu);
        cfg.kernel = std::env::current_exe().unwrap().display().to_string();
        let max = accel::emu::EmuHypervisor.max_vcpus();
        cfg.cpus = max + 1;
        if cfg.cpus > MAX_CPUS {
            // A host with 16 or more CPUs: the configuration's own limit refuses it.
            assert!(matches!(Vm::new(&cfg), Err(Error::Config { field: "--cpus", .. })));
            return;
        }
        match Vm::new(&cfg) {
            Err(Error::Config { field: "--cpus", msg }) => {
                assert!(msg.contains(&format!("emu accelerator runs at most {max} (accepted: 1 to {max})")), "{msg}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("{} vCPUs accepted on emu", cfg.cpus),
        }
    }
}
