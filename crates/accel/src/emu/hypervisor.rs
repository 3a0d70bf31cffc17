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
    Clock, CpuState, DeviceWrites, Error, ExitHandler, Hypervisor, IrqTables, RamRegion, Result, Vcpu, VcpuExit,
    VcpuSnapshot, VcpuStopper, Vm, VmSpec, VmState,
};

/// TSC frequency advertised to emulated guests in CPUID leaf 0x15 (Hz); also the bus clock
/// of the emulated LAPIC timer.
pub const TSC_HZ: u64 = 1_000_000_000;

/// Interrupt inputs of the userspace irqchip (PIC pins 0-15, IOAPIC pins 0-23).
const GSIS: u32 = 24;

/// The emulator as a [`Hypervisor`]: always available, one vCPU per VM for now.
#[derive(Clone, Copy, Debug, Default)]
pub struct EmuHypervisor;

impl Hypervisor for EmuHypervisor {
    fn name(&self) -> &'static str {
        "emu"
    }

    fn max_vcpus(&self) -> u8 {
        1
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

/// One VM on the emulator: guest RAM, the userspace irqchip (shared as
/// `Arc<Mutex<EmuIrqchip>>`, see `devices::irqchip` for its lock order) and the buses that
/// serve its ports (PIC 0x20/0xA0, ELCR 0x4D0, PIT 0x40-0x43 and 0x61) and MMIO pages
/// (IOAPIC 0xFEC0_0000, LAPIC 0xFEE0_0000) ahead of the VMM's exit handler.
pub struct EmuVm {
    ram: Vec<RamRegion>,
    clock: Clock,
    chip: Arc<Mutex<EmuIrqchip>>,
    pio: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    device_writes: Arc<OnceLock<DeviceWrites>>,
    /// Whether vCPU 0 exists (one vCPU per VM).
    vcpu_created: AtomicBool,
    /// The doorbell vCPU 0 sleeps on while halted, rung by the IRQ lines and the MSI sink
    /// when an interrupt they raise is pending for the CPU. It exists before the vCPU
    /// because the VMM wires its devices first. (With several vCPUs, each gets its own, and
    /// the irqchip must name the LAPICs that took an interrupt so that only those vCPUs
    /// are woken.)
    wakeup: Arc<Wakeup>,
}

impl std::fmt::Debug for EmuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmuVm").field("ram", &self.ram).finish_non_exhaustive()
    }
}

impl EmuVm {
    /// A VM over `spec.ram` with the irqchip at its power-on state, on `spec.clock`.
    ///
    /// # Errors
    ///
    /// [`Error::Internal`] if the irqchip's ranges cannot be placed (a bug, not an input).
    pub fn new(spec: &VmSpec<'_>) -> Result<EmuVm> {
        let chip = Arc::new(Mutex::new(EmuIrqchip::new(spec.clock.clone(), TSC_HZ)));
        let (mut pio, mut mmio) = (PioBus::new(), MmioBus::new());
        EmuIrqchip::attach(&chip, &mut pio, &mut mmio).map_err(|e| Error::Internal(format!("emu irqchip: {e}")))?;
        Ok(EmuVm {
            ram: spec.ram.to_vec(),
            clock: spec.clock.clone(),
            chip,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            device_writes: Arc::new(OnceLock::new()),
            vcpu_created: AtomicBool::new(false),
            wakeup: Arc::new(Wakeup::new()),
        })
    }

    /// What the IRQ lines and the MSI sink run after raising an interrupt the CPU will
    /// take: wake vCPU 0 if it is halted.
    fn notify(&self) -> Arc<dyn Fn() + Send + Sync> {
        let w = self.wakeup.clone();
        Arc::new(move || w.wake())
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
        if id != 0 || self.vcpu_created.swap(true, Ordering::AcqRel) {
            return Err(Error::Unsupported(format!("the emu accelerator runs 1 vCPU (id 0); vCPU {id} requested")));
        }
        let mut cpu =
            EmuVcpu::new(&self.ram, Box::new(ChipInterrupts(self.chip.clone())), self.clock.clone(), TSC_HZ, id)
                .with_wakeup(self.wakeup.clone());
        let writes = self.device_writes.clone();
        cpu.set_device_writes(Arc::new(move || writes.get().map_or_else(Vec::new, |f| f())));
        Ok(Box::new(PlatformVcpu { cpu, pio: self.pio.clone(), mmio: self.mmio.clone() }))
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
        Ok(VmState(VmStateRepr::Emu1(Box::new(EmuVmState { irqchip: self.lock_chip().state() }))))
    }

    fn restore_state(&self, state: &VmState) -> Result<()> {
        match &state.0 {
            VmStateRepr::Emu1(s) => self
                .lock_chip()
                .restore(&s.irqchip)
                .map_err(|e| Error::InvalidState { what: "emu irqchip", source: Box::new(e) }),
            VmStateRepr::Kvm1(_) => Err(Error::Unsupported("a kvm VM state on the emu accelerator".into())),
        }
    }
}

/// The CPU's view of the irqchip.
struct ChipInterrupts(Arc<Mutex<EmuIrqchip>>);

impl InterruptController for ChipInterrupts {
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

/// An [`EmuVcpu`] whose port I/O and MMIO go to the VM's irqchip first and to the VMM's
/// handler otherwise.
struct PlatformVcpu {
    cpu: EmuVcpu,
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

/// Exit dispatch: the irqchip's ranges, then the VMM.
struct PlatformExits<'a> {
    pio: &'a PioBus,
    mmio: &'a MmioBus,
    vmm: &'a mut dyn ExitHandler,
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
        if !self.mmio.read(gpa, data) {
            self.vmm.mmio_read(gpa, data);
        }
    }
    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
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
        let mut exits = PlatformExits { pio: &self.pio, mmio: &self.mmio, vmm: handler };
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
        EmuVm::new(&VmSpec { ram: &[], clock: Arc::new(|| 0) }).unwrap()
    }

    #[test]
    fn irqchip_accesses_stay_in_the_vm_and_the_rest_reaches_the_vmm() {
        let vm = vm();
        let mut vmm = Vmm::default();
        let mut x = PlatformExits { pio: &vm.pio, mmio: &vm.mmio, vmm: &mut vmm };
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
        assert_eq!((saved.engine(), saved.version()), (crate::Choice::Emu, 1));

        let other = self::vm();
        assert!(!other.lock_chip().interrupt_pending());
        other.restore_state(&saved).unwrap();
        assert!(other.lock_chip().interrupt_pending());
        assert_eq!(other.save_state().unwrap(), saved);
        // The serialized form names the engine and layout.
        let json = serde_json::to_string(&saved).unwrap();
        assert!(json.starts_with("{\"emu/1\":"), "{json}");
        let back: VmState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        // A corrupt state is refused naming the part, and leaves the VM as it was.
        let mut bad = saved.clone();
        if let VmStateRepr::Emu1(s) = &mut bad.0 {
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
        let rung = |vm: &EmuVm| vm.wakeup.wait(Some(std::time::Duration::ZERO));
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
    fn one_vcpu_and_no_ioevents() {
        let vm = vm();
        assert!(vm.create_vcpu(1).is_err());
        assert!(vm.create_vcpu(0).is_ok());
        assert!(matches!(vm.create_vcpu(0), Err(Error::Unsupported(_))));
        let evt = EventFd::new(0).unwrap();
        assert!(!vm.supports_ioevents());
        assert!(matches!(vm.register_ioevent(&evt, 0xc000_3000), Err(Error::Unsupported(_))));
        assert!(vm.needs_dma_log() && vm.irq_tables() == IrqTables::Madt);
    }
}
