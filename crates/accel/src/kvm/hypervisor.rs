//! KVM behind the seam: [`KvmHypervisor`] and the [`Vm`] implementation of [`KvmVm`].

use std::sync::Arc;

use devices::{IrqLine, MsiSink};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{kvm_err, KvmVm, IRQCHIP_NUM_PINS};
use crate::vm::VmStateRepr;
use crate::{DeviceWrites, Error, Hypervisor, IrqTables, Result, Vcpu, Vm, VmSpec, VmState};

/// KVM as a [`Hypervisor`]: VMs with the in-kernel irqchip and PIT ([`KvmVm::new`]).
#[derive(Debug)]
pub struct KvmHypervisor {
    max_vcpus: u8,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm` to read its limits ("KVM_CAP_MAX_VCPUS").
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] when `/dev/kvm` cannot be opened.
    pub fn new() -> Result<KvmHypervisor> {
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        Ok(KvmHypervisor { max_vcpus: u8::try_from(kvm.get_max_vcpus()).unwrap_or(u8::MAX).max(1) })
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn max_vcpus(&self) -> u8 {
        self.max_vcpus
    }

    fn create_vm(&self, spec: &VmSpec<'_>) -> Result<Arc<dyn Vm>> {
        // KVM keeps its own guest clock (kvmclock); `spec.clock` is the VMM's.
        Ok(Arc::new(KvmVm::new(spec.ram)?))
    }
}

/// An interrupt input of the in-kernel irqchip ("KVM_IRQ_LINE").
struct KvmIrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl IrqLine for KvmIrqLine {
    fn set_level(&self, level: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, level) {
            tracing::warn!("KVM_IRQ_LINE gsi {} level {level}: {e}", self.gsi);
        }
    }
}

impl Vm for KvmVm {
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu + Send>> {
        Ok(Box::new(KvmVm::create_vcpu(self, id)?))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        if !self.irqchip {
            return Err(Error::Unsupported("an interrupt line on a VM without in-kernel irqchip".into()));
        }
        if gsi >= IRQCHIP_NUM_PINS {
            return Err(Error::Unsupported(format!("GSI {gsi} out of range (0..{IRQCHIP_NUM_PINS})")));
        }
        Ok(Arc::new(KvmIrqLine { vm: self.vm.clone(), gsi }))
    }

    fn msi_sink(&self) -> Arc<dyn MsiSink> {
        self.msi.clone()
    }

    fn supports_ioevents(&self) -> bool {
        true
    }

    fn register_ioevent(&self, evt: &EventFd, gpa: u64) -> Result<()> {
        KvmVm::register_ioevent(self, evt, gpa)
    }

    fn unregister_ioevent(&self, evt: &EventFd, gpa: u64) -> Result<()> {
        KvmVm::unregister_ioevent(self, evt, gpa)
    }

    fn needs_dma_log(&self) -> bool {
        // Guest code runs on the CPU itself, which sees device writes to RAM like any other.
        false
    }

    fn set_device_writes(&self, _source: DeviceWrites) {}

    fn irq_tables(&self) -> IrqTables {
        if self.irqchip {
            IrqTables::MpTable
        } else {
            IrqTables::None
        }
    }

    fn save_state(&self) -> Result<VmState> {
        Ok(VmState(VmStateRepr::Kvm1(Box::new(KvmVm::save_state(self)?))))
    }

    fn restore_state(&self, state: &VmState) -> Result<()> {
        match &state.0 {
            VmStateRepr::Kvm1(s) => KvmVm::restore_state(self, s),
            VmStateRepr::Emu1(_) | VmStateRepr::Emu2(_) => {
                Err(Error::Unsupported("an emu VM state on the kvm accelerator".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Choice;

    #[test]
    fn kvm_vm_through_the_seam() {
        if !super::super::available() {
            println!("skipping: /dev/kvm unavailable");
            return;
        }
        let hv = KvmHypervisor::new().unwrap();
        assert!(hv.max_vcpus() >= 1);
        let vm = hv.create_vm(&VmSpec { ram: &[], clock: Arc::new(|| 0), cpus: 1 }).unwrap();
        assert!(vm.irq_line(4).is_ok());
        assert!(matches!(vm.irq_line(24), Err(Error::Unsupported(_))));
        vm.irq_line(4).unwrap().pulse();
        assert!(vm.supports_ioevents() && !vm.needs_dma_log() && vm.irq_tables() == IrqTables::MpTable);
        let evt = EventFd::new(0).unwrap();
        vm.register_ioevent(&evt, 0xc000_3000).unwrap();
        vm.unregister_ioevent(&evt, 0xc000_3000).unwrap();
        let state = vm.save_state().unwrap();
        assert_eq!((state.engine(), state.version()), (Choice::Kvm, 1));
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.starts_with("{\"kvm/1\":"), "{}", &json[..20]);
        let back: VmState = serde_json::from_str(&json).unwrap();
        let other = hv.create_vm(&VmSpec { ram: &[], clock: Arc::new(|| 0), cpus: 1 }).unwrap();
        other.restore_state(&back).unwrap();
        let emu = crate::emu::EmuHypervisor.create_vm(&VmSpec { ram: &[], clock: Arc::new(|| 0), cpus: 1 }).unwrap();
        let emu_state = emu.save_state().unwrap();
        assert!(matches!(other.restore_state(&emu_state), Err(Error::Unsupported(_))));
        assert!(matches!(emu.restore_state(&state), Err(Error::Unsupported(_))));
        let v = vm.create_vcpu(0).unwrap();
        v.stopper().stop();
    }
}
