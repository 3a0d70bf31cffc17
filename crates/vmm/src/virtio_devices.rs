//! The VM's virtio devices on PCI bus 0: building each device model from its
//! configuration, wrapping it in the virtio-pci transport and placing its BAR.

use std::sync::{Arc, Mutex};

use accel::kvm::KvmVm;
use devices::{MsiSink, PciBus};
use virtio::pci::{IoEventRegistrar, VirtioPci, BAR_SIZE};
use virtio::{DmaLog, GuestMem, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::memory::{PCI_MMIO_END, PCI_MMIO_START};
use crate::{Error, Result};

/// MSIs into KVM's in-kernel LAPICs.
pub struct KvmMsi(pub Arc<KvmVm>);

impl MsiSink for KvmMsi {
    fn send_msi(&self, addr: u64, data: u32) {
        if let Err(e) = self.0.signal_msi(addr, data) {
            tracing::warn!("{e}");
        }
    }
}

/// Queue notifications as KVM ioeventfds.
pub struct KvmIoEvents(pub Arc<KvmVm>);

impl IoEventRegistrar for KvmIoEvents {
    fn register(&self, gpa: u64, evt: &EventFd) {
        if let Err(e) = self.0.register_ioevent(evt, gpa) {
            tracing::warn!("{e}; notifications will exit to userspace");
        }
    }
    fn unregister(&self, gpa: u64, evt: &EventFd) {
        if let Err(e) = self.0.unregister_ioevent(evt, gpa) {
            tracing::warn!("{e}");
        }
    }
}

/// A virtio device on the bus, with its name for logs and counters.
pub struct PciVirtio {
    /// "rng", "disk0", "net0", "vsock".
    pub name: String,
    /// The transport (and the device inside it).
    pub dev: Arc<Mutex<VirtioPci>>,
}

/// Builds the devices `cfg` asks for, in PCI slot order: disks, NICs, vsock, rng.
///
/// Errors: `Error::Config` naming the flag when a backing file, TAP or socket cannot be
/// opened (nothing on disk is changed in that case).
pub fn build(
    cfg: &VmConfig,
    mem: &GuestMem,
    bus: &mut PciBus,
    sink: Arc<dyn MsiSink>,
    dma: Arc<DmaLog>,
    ioevents: Option<Arc<dyn IoEventRegistrar>>,
) -> Result<Vec<PciVirtio>> {
    let mut models: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
    if cfg.rng {
        models.push(("rng".into(), Box::new(virtio::rng::Rng::new())));
    }
    let mut out = Vec::new();
    for (i, (name, model)) in models.into_iter().enumerate() {
        let base = PCI_MMIO_START + i as u64 * u64::from(BAR_SIZE);
        if base + u64::from(BAR_SIZE) > PCI_MMIO_END {
            return Err(Error::Device("PCI MMIO window full".into()));
        }
        let dev = Arc::new(Mutex::new(VirtioPci::new(
            model,
            base as u32,
            mem.clone(),
            sink.clone(),
            dma.clone(),
            ioevents.clone(),
        )));
        bus.add(dev.clone()).ok_or_else(|| Error::Device("PCI bus 0 is full (32 slots)".into()))?;
        tracing::debug!("virtio {name}: BAR0 at {base:#x}");
        out.push(PciVirtio { name, dev });
    }
    Ok(out)
}
