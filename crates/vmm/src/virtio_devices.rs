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

/// First GSI for MSI routes (0-23 are the irqchip's pins).
const FIRST_MSI_GSI: u32 = 24;
/// Most MSI routes this VMM installs; further messages use `KVM_SIGNAL_MSI`.
const MAX_MSI_ROUTES: usize = 512;

/// MSIs into KVM's in-kernel LAPICs through irqfds and GSI routing: the first time a message
/// (address, data) is sent it gets a GSI with an MSI route and an irqfd; from then on
/// sending it is a write to that eventfd. Drivers program their MSI-X vectors once, so the
/// routing table settles after boot. If routing fails, messages go through
/// `KVM_SIGNAL_MSI`.
pub struct KvmMsi {
    vm: Arc<KvmVm>,
    routes: Mutex<MsiRoutes>,
}

#[derive(Default)]
struct MsiRoutes {
    by_msg: std::collections::HashMap<(u64, u32), (u32, EventFd)>,
    broken: bool,
}

impl KvmMsi {
    /// A router for `vm` (which must have the in-kernel irqchip).
    pub fn new(vm: Arc<KvmVm>) -> KvmMsi {
        KvmMsi { vm, routes: Mutex::new(MsiRoutes::default()) }
    }

    /// How many messages are delivered through an irqfd (0 after routing failed).
    pub fn irqfd_routes(&self) -> usize {
        let r = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if r.broken {
            0
        } else {
            r.by_msg.len()
        }
    }

    fn add_route(&self, r: &mut MsiRoutes, addr: u64, data: u32) -> accel::Result<()> {
        let gsi = FIRST_MSI_GSI + r.by_msg.len() as u32;
        let mut table: Vec<(u32, u64, u32)> = r.by_msg.iter().map(|(&(a, d), (g, _))| (*g, a, d)).collect();
        table.push((gsi, addr, data));
        self.vm.set_msi_routes(&table)?;
        let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
            .map_err(|e| accel::Error::Kvm(format!("eventfd: {e}")))?;
        self.vm.register_irqfd(&evt, gsi)?;
        r.by_msg.insert((addr, data), (gsi, evt));
        Ok(())
    }
}

impl MsiSink for KvmMsi {
    fn send_msi(&self, addr: u64, data: u32) {
        let mut r = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if !r.broken && !r.by_msg.contains_key(&(addr, data)) && r.by_msg.len() < MAX_MSI_ROUTES {
            if let Err(e) = self.add_route(&mut r, addr, data) {
                tracing::warn!("MSI routing: {e}; falling back to KVM_SIGNAL_MSI");
                r.broken = true;
            }
        }
        if let Some((_, evt)) = r.by_msg.get(&(addr, data)) {
            if evt.write(1).is_ok() {
                return;
            }
        }
        drop(r);
        if let Err(e) = self.vm.signal_msi(addr, data) {
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

/// qcow2 when the file starts with the qcow2 magic, raw otherwise.
fn detect_format(path: &std::path::Path) -> Result<block::Format> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::Config { field: "--disk", msg: format!("{}: {e}", path.display()) })?;
    let n = f.read(&mut magic).unwrap_or(0);
    Ok(if n == 4 && magic == block::QCOW2_MAGIC { block::Format::Qcow2 } else { block::Format::Raw })
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
    for (i, d) in cfg.disks.iter().enumerate() {
        let format = match d.format {
            Some(crate::DiskFormat::Raw) => block::Format::Raw,
            Some(crate::DiskFormat::Qcow2) => block::Format::Qcow2,
            None => detect_format(&d.path)?,
        };
        let policy =
            block::ImagePolicy { allow_backing_outside: d.allow_backing_outside, allow_data_file: d.allow_data_file };
        let image = block::DiskImage::open_with(&d.path, format, d.readonly, policy)
            .map_err(|e| Error::Config { field: "--disk", msg: e.to_string() })?;
        models.push((format!("disk{i}"), Box::new(virtio::block::Block::new(image, d.readonly, d.serial.clone()))));
    }
    for (i, n) in cfg.nets.iter().enumerate() {
        let tap = virtio::tap::Tap::open(&n.tap).map_err(|e| Error::Config { field: "--net", msg: e.to_string() })?;
        let mac = n.mac.unwrap_or_else(|| virtio::net::default_mac(&n.tap));
        models.push((format!("net{i}"), Box::new(virtio::net::Net::new(tap, mac))));
    }
    if let Some(v) = &cfg.vsock {
        let dev = virtio::vsock::Vsock::new(v.cid, v.socket.clone())
            .map_err(|e| Error::Config { field: "--vsock", msg: e.to_string() })?;
        models.push(("vsock".into(), Box::new(dev)));
    }
    if let Some(out) = &cfg.console {
        let (output, input): (Box<dyn std::io::Write + Send>, Option<Box<dyn virtio::console::InputSource>>) = match out
        {
            crate::SerialOut::Stdio => (Box::new(std::io::stdout()), Some(Box::new(std::io::stdin()))),
            crate::SerialOut::Null => (Box::new(std::io::sink()), None),
            crate::SerialOut::File(p) => (
                Box::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .map_err(|e| Error::Config { field: "--console", msg: format!("{}: {e}", p.display()) })?,
                ),
                None,
            ),
        };
        let dev =
            virtio::console::Console::new(output, input).map_err(|e| Error::Device(format!("virtio-console: {e}")))?;
        models.push(("console".into(), Box::new(dev)));
    }
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
