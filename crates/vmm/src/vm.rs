//! Building a VM from a [`VmConfig`] and running it to the end.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use accel::emu::{EmuVcpu, InterruptController};
use accel::kvm::KvmVm;
use accel::{ExitHandler, Vcpu, VcpuExit};
use devices::{AcpiPm, Cmos, EmuIrqchip, EmuMsi, GsiLine, IrqLine, MmioBus, MsiSink, PciBus, PioBus, Serial, I8042};
use virtio::DmaLog;
use vm_memory::GuestMemoryMmap;

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
}

impl ExitHandler for DeviceBus {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if !self.pio.read(port, data) {
            data.fill(0xff);
        }
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        let _ = self.pio.write(port, data);
    }
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        if !self.mmio.read(gpa, data) {
            data.fill(0xff);
        }
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
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

/// The boot vCPU, its stop flag, the console's interrupt line, where MSIs go and the KVM VM
/// (if any).
type VcpuParts = (Box<dyn Vcpu>, Arc<AtomicBool>, Arc<dyn IrqLine>, Arc<dyn MsiSink>, Option<Arc<KvmVm>>);

/// A built VM, ready to run.
pub struct Vm {
    _memory: GuestMemoryMmap,
    vcpu: Box<dyn Vcpu>,
    stop: Arc<AtomicBool>,
    bus: DeviceBus,
    /// KVM application processors, started on their own threads by [`Vm::run`].
    aps: Vec<accel::kvm::KvmVcpu>,
    serial: Arc<Mutex<Serial>>,
    reset: Arc<AtomicBool>,
    /// Set by the ACPI PM device when the guest enters S5.
    power_off: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    _kvm: Option<Arc<KvmVm>>,
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

/// Decides the accelerator for `auto` (and checks an explicit `kvm`).
fn choose_accel(a: Accel) -> Result<(bool, String)> {
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
            if pvm {
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
        let ram = memory::regions(&mem);

        let mut pio = PioBus::new();
        let mut mmio = MmioBus::new();
        let reset = Arc::new(AtomicBool::new(false));
        let power_off = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let clock: devices::Clock = Arc::new(move || start.elapsed().as_nanos() as u64);
        let dev_err = |e: devices::Error| Error::Device(e.to_string());

        let dma = Arc::new(DmaLog::default());
        let mut aps = Vec::new();
        let (vcpu, stop, serial_irq, msi, kvm): VcpuParts = if is_emu {
            let chip = Arc::new(Mutex::new(EmuIrqchip::new(clock.clone(), EMU_TSC_HZ)));
            // PIC, ELCR, PIT and port 0x61 ports; LAPIC and IOAPIC pages.
            EmuIrqchip::attach(&chip, &mut pio, &mut mmio).map_err(dev_err)?;
            let line: Arc<dyn IrqLine> = Arc::new(GsiLine::new(&chip, COM1_IRQ));
            let msi: Arc<dyn MsiSink> = Arc::new(EmuMsi::new(&chip, None));
            let mut v = EmuVcpu::new(&ram, Box::new(EmuIc(chip)), clock.clone(), EMU_TSC_HZ, 0);
            // Device DMA into pages the emulator decoded code from retires that code.
            let d = dma.clone();
            v.set_device_writes(Arc::new(move || if d.pending() { d.take() } else { Vec::new() }));
            let stop = v.stop_flag();
            (Box::new(v), stop, line, msi, None)
        } else {
            let vm = Arc::new(KvmVm::new(&ram)?);
            let v = vm.create_vcpu(0)?;
            // Application processors wait in KVM for the guest's INIT/SIPI (MP spec B.4).
            for id in 1..cfg.cpus {
                aps.push(vm.create_vcpu(id)?);
            }
            let stop = v.stop_flag();
            let line: Arc<dyn IrqLine> = Arc::new(KvmIrq { vm: vm.clone(), gsi: COM1_IRQ });
            let msi: Arc<dyn MsiSink> = Arc::new(crate::virtio_devices::KvmMsi(vm.clone()));
            (Box::new(v), stop, line, msi, Some(vm))
        };

        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, serial_sink(&cfg.serial)?)));
        pio.insert(COM1, 8, serial.clone()).map_err(dev_err)?;
        let (r, s) = (reset.clone(), stop.clone());
        let i8042 = Arc::new(Mutex::new(I8042::new(Box::new(move || {
            r.store(true, Ordering::SeqCst);
            s.store(true, Ordering::SeqCst);
        }))));
        pio.insert(0x60, 1, i8042.clone()).map_err(dev_err)?;
        pio.insert(0x64, 1, i8042).map_err(dev_err)?;
        let (pm_stop, pm_off) = (stop.clone(), power_off.clone());
        let pm = Arc::new(Mutex::new(AcpiPm::new(Box::new(move || {
            pm_off.store(true, Ordering::SeqCst);
            pm_stop.store(true, Ordering::SeqCst);
        }))));
        pio.insert(devices::acpi_pm::PM1A_EVT_BLK, 6, pm).map_err(dev_err)?;
        let low = memory::ram_ranges(cfg.mem_size)[0].1;
        let cmos = Arc::new(Mutex::new(Cmos::new(low, arch::high_mem(cfg.mem_size))));
        pio.insert(0x70, 2, cmos).map_err(dev_err)?;

        // PCI bus 0 (conf1) with the virtio devices; their BARs sit in the MMIO window.
        let mut pci = PciBus::new();
        let ioevents = kvm
            .clone()
            .map(|vm| Arc::new(crate::virtio_devices::KvmIoEvents(vm)) as Arc<dyn virtio::pci::IoEventRegistrar>);
        let virtio = crate::virtio_devices::build(cfg, &mem, &mut pci, msi, dma, ioevents)?;
        let pci = Arc::new(Mutex::new(pci));
        pio.insert(devices::pci::CONF1_PORT, devices::pci::CONF1_LEN, pci.clone()).map_err(dev_err)?;
        mmio.insert(memory::PCI_MMIO_START, memory::PCI_MMIO_END - memory::PCI_MMIO_START, pci).map_err(dev_err)?;

        let mut vm = Vm {
            _memory: mem,
            vcpu,
            stop,
            bus: DeviceBus { pio: Arc::new(pio), mmio: Arc::new(mmio) },
            aps,
            serial,
            reset,
            power_off,
            quit: Arc::new(AtomicBool::new(false)),
            _kvm: kvm,
            virtio,
            accel_note,
            is_emu,
        };
        vm.vcpu.set_state(&arch::boot_cpu_state(&info))?;
        Ok(vm)
    }

    /// The console UART, for feeding input.
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    /// A handle that ends [`Vm::run`] with [`RunOutcome::UserQuit`] when set.
    pub fn quit_handle(&self) -> (Arc<AtomicBool>, Arc<AtomicBool>) {
        (self.quit.clone(), self.stop.clone())
    }

    /// Runs the VM until it powers off, resets or the user quits.
    ///
    /// Errors: `Error::Accel` when the accelerator cannot go on (e.g. an instruction the
    /// emulator does not implement, a KVM internal error).
    pub fn run(&mut self) -> Result<RunOutcome> {
        // Each AP runs on its own thread with its own handle on the (shared, internally
        // locked) device buses. An AP that stops the VM (reset, power-off, error) raises the
        // boot vCPU's stop flag so the loop below returns; AP threads end with the process.
        for mut ap in self.aps.drain(..) {
            let mut bus = self.bus.clone();
            let (reset, power_off, stop) = (self.reset.clone(), self.power_off.clone(), self.stop.clone());
            std::thread::Builder::new()
                .name(format!("vcpu{}", ap.id()))
                .spawn(move || loop {
                    match ap.run(&mut bus) {
                        Ok(VcpuExit::Interrupted) => {}
                        Ok(VcpuExit::Hlt) => std::thread::sleep(std::time::Duration::from_millis(1)),
                        Ok(VcpuExit::Shutdown) => {
                            power_off.store(true, Ordering::SeqCst);
                            stop.store(true, Ordering::SeqCst);
                            return;
                        }
                        Ok(VcpuExit::Reset(_)) | Err(_) => {
                            reset.store(true, Ordering::SeqCst);
                            stop.store(true, Ordering::SeqCst);
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Device(format!("vCPU thread: {e}")))?;
        }
        loop {
            let exit = self.vcpu.run(&mut self.bus)?;
            if self.quit.load(Ordering::SeqCst) {
                return Ok(RunOutcome::UserQuit);
            }
            if self.power_off.load(Ordering::SeqCst) {
                return Ok(RunOutcome::PowerOff);
            }
            if self.reset.load(Ordering::SeqCst) {
                return Ok(RunOutcome::Reset("guest requested a reset through the i8042 controller".into()));
            }
            match exit {
                VcpuExit::Interrupted => {}
                VcpuExit::Hlt => {
                    if !self.is_emu {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                VcpuExit::Shutdown => return Ok(RunOutcome::PowerOff),
                VcpuExit::Reset(why) => return Ok(RunOutcome::Reset(why)),
            }
        }
    }
}
