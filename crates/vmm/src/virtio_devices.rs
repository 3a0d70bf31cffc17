//! The VM's virtio devices on PCI bus 0: building each device model from its
//! configuration, wrapping it in the virtio-pci transport and placing its BAR.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use devices::{MsiSink, PciBus};
use virtio::pci::{IoEventRegistrar, VirtioPci, BAR_SIZE};
use virtio::{DmaLog, GuestMem, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::memory::{PCI_MMIO_END, PCI_MMIO_START};
use crate::{Error, Result};

/// Queue notifications as the accelerator's ioeventfds ([`accel::Vm::register_ioevent`]):
/// the transport registers each queue's kick eventfd at its notification address, so guest
/// writes there signal it without leaving the accelerator. Give it to the transport only
/// where [`accel::Vm::supports_ioevents`]; elsewhere notifications arrive as MMIO writes.
pub struct VmIoEvents(pub Arc<dyn accel::Vm>);

impl IoEventRegistrar for VmIoEvents {
    fn register(&self, gpa: u64, evt: &EventFd) {
        if let Err(e) = self.0.register_ioevent(evt, gpa) {
            tracing::warn!("{e}; notifications at {gpa:#x} will exit to userspace");
        }
    }
    fn unregister(&self, gpa: u64, evt: &EventFd) {
        if let Err(e) = self.0.unregister_ioevent(evt, gpa) {
            tracing::warn!("{e}");
        }
    }
}

/// A message from a device to whoever runs the VM (the API controller takes them with
/// [`crate::Vm::take_device_events`]): data flows device → controller, never into the vCPUs.
#[derive(Debug)]
pub enum DeviceEvent {
    /// A disk with `on_error: pause` met a host I/O error: it keeps the request and its
    /// queue waits (see [`virtio::block`]) until [`crate::Vm::retry_stalled_disks`]; the VM
    /// should be paused meanwhile.
    DiskStalled {
        /// The device's name (`disk0`, ...).
        name: String,
        /// What failed, with the host's error.
        stall: virtio::block::Stall,
    },
}

impl std::fmt::Display for DeviceEvent {
    /// `disk disk0: write at 4096: No space left on device (os error 28)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceEvent::DiskStalled { name, stall } => write!(f, "disk {name}: {stall}"),
        }
    }
}

/// A virtio device on the bus, with its name for logs and counters.
pub struct PciVirtio {
    /// "rng", "disk0", "net0", "vsock".
    pub name: String,
    /// The transport (and the device inside it).
    pub dev: Arc<Mutex<VirtioPci>>,
    /// For a disk: its image, shared with the device (backups attach to it), and its index
    /// in the configuration.
    pub disk: Option<(usize, Arc<Mutex<block::DiskImage>>)>,
    /// For a disk with `on_error: pause`: restarts its queue after a stall.
    pub retry: Option<virtio::block::RetryHandle>,
}

/// The devices [`build`] made.
pub struct Built {
    /// In PCI slot order.
    pub devices: Vec<PciVirtio>,
    /// The balloon's host handle, when the VM has one.
    pub balloon: Option<virtio::balloon::BalloonHandle>,
}

/// The balloon device model for `b`.
pub fn balloon_model(b: &crate::config::BalloonConfig) -> virtio::balloon::Balloon {
    virtio::balloon::Balloon::new(virtio::balloon::BalloonOptions {
        deflate_on_oom: b.deflate_on_oom,
        stats_interval: (b.stats_interval_s > 0).then(|| std::time::Duration::from_secs(b.stats_interval_s.into())),
        free_page_reporting: b.free_page_reporting,
    })
}

/// Builds the devices `cfg` asks for, in PCI slot order: disks, NICs, vsock, console, rng,
/// balloon. Disks with `on_error: pause` send their stalls to `events`.
///
/// Errors: `Error::Config` naming the flag when a backing file, TAP or socket cannot be
/// opened (nothing on disk is changed in that case); `Error::DeviceIo` when a disk's retry
/// eventfd cannot be created.
pub fn build(
    cfg: &VmConfig,
    mem: &GuestMem,
    bus: &mut PciBus,
    sink: Arc<dyn MsiSink>,
    dma: Arc<DmaLog>,
    ioevents: Option<Arc<dyn IoEventRegistrar>>,
    events: &Sender<DeviceEvent>,
) -> Result<Built> {
    type Disk = Option<(usize, Arc<Mutex<block::DiskImage>>, Option<virtio::block::RetryHandle>)>;
    let mut models: Vec<(String, Box<dyn VirtioDevice>, Disk)> = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let format = match d.format {
            Some(crate::DiskFormat::Raw) => block::Format::Raw,
            Some(crate::DiskFormat::Qcow2) => block::Format::Qcow2,
            None => block::detect_format(&d.path).map_err(|e| Error::Config { field: "--disk", msg: e.to_string() })?,
        };
        let policy =
            block::ImagePolicy { allow_backing_outside: d.allow_backing_outside, allow_data_file: d.allow_data_file };
        let image = block::DiskImage::open_with(&d.path, format, d.readonly, policy)
            .map_err(|e| Error::Config { field: "--disk", msg: e.to_string() })?;
        let name = format!("disk{i}");
        let mut dev = virtio::block::Block::new(image, d.readonly, d.serial.clone());
        if d.on_error == crate::config::DiskErrorPolicy::Pause {
            let (tx, disk_name) = (events.clone(), name.clone());
            let notify: virtio::block::StallNotifier = Arc::new(move |stall| {
                // The receiver is gone only once the VM is going away.
                let _ = tx.send(DeviceEvent::DiskStalled { name: disk_name.clone(), stall });
            });
            dev = dev.pause_on_error(notify).map_err(|source| Error::DeviceIo { name: name.clone(), source })?;
        }
        let disk = dev.disk();
        let retry = dev.retry_handle();
        models.push((name, Box::new(dev), Some((i, disk, retry))));
    }
    for (i, n) in cfg.nets.iter().enumerate() {
        let tap = virtio::tap::Tap::open(&n.tap).map_err(|e| Error::Config { field: "--net", msg: e.to_string() })?;
        let mac = n.mac.map_or_else(|| virtio::net::default_mac(&n.tap), |m| m.0);
        models.push((format!("net{i}"), Box::new(virtio::net::Net::new(tap, mac)), None));
    }
    if let Some(v) = &cfg.vsock {
        let dev = virtio::vsock::Vsock::new(v.cid, v.socket.clone().into())
            .map_err(|e| Error::Config { field: "--vsock", msg: e.to_string() })?;
        models.push(("vsock".into(), Box::new(dev), None));
    }
    if let Some(out) = &cfg.console {
        let (output, input): (Box<dyn std::io::Write + Send>, Option<Box<dyn virtio::console::InputSource>>) = match out
        {
            crate::ConsoleOut::Stdio => (Box::new(std::io::stdout()), Some(Box::new(std::io::stdin()))),
            crate::ConsoleOut::Null => (Box::new(std::io::sink()), None),
            crate::ConsoleOut::File(p) => (
                Box::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .map_err(|e| Error::Config { field: "--console", msg: format!("{}: {e}", p.display()) })?,
                ),
                None,
            ),
            // Refused by `config::validate`.
            crate::ConsoleOut::Socket { .. } => {
                return Err(Error::Config { field: "--console", msg: crate::config::CONSOLE_SOCKET_REFUSED.into() })
            }
        };
        let dev = virtio::console::Console::new(output, input)
            .map_err(|source| Error::DeviceIo { name: "virtio-console".into(), source })?;
        models.push(("console".into(), Box::new(dev), None));
    }
    if cfg.rng {
        models.push(("rng".into(), Box::new(virtio::rng::Rng::new()), None));
    }
    let mut balloon = None;
    if let Some(b) = &cfg.balloon {
        let dev = balloon_model(b);
        balloon = Some(dev.handle());
        models.push(("balloon".into(), Box::new(dev), None));
    }
    let mut out = Vec::new();
    for (i, (name, model, disk)) in models.into_iter().enumerate() {
        let base = PCI_MMIO_START + i as u64 * u64::from(BAR_SIZE);
        if base + u64::from(BAR_SIZE) > PCI_MMIO_END {
            return Err(Error::DeviceSpace { name, space: "PCI MMIO window" });
        }
        let dev = Arc::new(Mutex::new(VirtioPci::new(
            model,
            base as u32,
            mem.clone(),
            sink.clone(),
            dma.clone(),
            ioevents.clone(),
        )));
        bus.add(dev.clone()).ok_or_else(|| Error::DeviceSpace { name: name.clone(), space: "PCI bus 0 (32 slots)" })?;
        tracing::debug!("virtio {name}: BAR0 at {base:#x}");
        let (disk, retry) = match disk {
            Some((i, image, retry)) => (Some((i, image)), retry),
            None => (None, None),
        };
        out.push(PciVirtio { name, dev, disk, retry });
    }
    Ok(Built { devices: out, balloon })
}
