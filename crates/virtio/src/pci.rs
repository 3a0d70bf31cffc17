//! The modern virtio-pci transport (virtio 1.2 §4.1) with MSI-X (PCI 3.0 §6.8.2).
//!
//! Everything lives in one 32 KiB memory BAR (BAR 0):
//!
//! | offset | structure                                   |
//! |--------|---------------------------------------------|
//! | 0x0000 | common configuration (§4.1.4.3)             |
//! | 0x1000 | ISR status (§4.1.4.5)                       |
//! | 0x2000 | device-specific configuration (§4.1.4.6)    |
//! | 0x3000 | notifications, 4 bytes per queue (§4.1.4.4) |
//! | 0x4000 | MSI-X table, 16 bytes per vector            |
//! | 0x6000 | MSI-X pending bit array                     |
//!
//! Vector count = queues + 1. Legacy INTx is not offered (interrupt pin 0): drivers use
//! MSI-X. A driver writing a queue notification makes the transport write that queue's
//! kick eventfd; on KVM the same eventfds are registered as ioeventfds through
//! [`IoEventRegistrar`], so those writes never leave the kernel.
//!
//! **Reset is asynchronous** (§2.4, §4.1.4.3): a write of 0 to `device_status` returns at
//! once; the device model's worker is told to stop and, while the request it is in (a slow
//! `fsync`, say) runs on, `device_status` keeps reading its old, non-zero value and the
//! common configuration ignores writes. Once the worker has let go of the queues the transport
//! state is reset and 0 is read, which is what the driver waits for before reinitializing
//! (§4.1.4.3.2; Linux polls `device_status` after writing 0). Nothing on a vCPU path ever
//! waits for the worker: the transport checks for completion on each access to BAR 0.
//! Activations wait (without blocking) for the previous stop in the same way, so a device
//! has at most one activation queued on its worker.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::pci::{PciConfig, PciDevice, PciId, CMD_BUS_MASTER};
use devices::MsiSink;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{ActivateContext, DmaLog, GuestMem, Interrupt, VirtioDevice};
use crate::worker::Completion;
use crate::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// Size of BAR 0 in bytes.
pub const BAR_SIZE: u32 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = COMMON_BYTES as u64;
/// Size of the common configuration structure (§4.1.4.3) in bytes.
const COMMON_BYTES: usize = 0x40;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
/// Offset of the notification area in BAR 0.
pub const NOTIFY: u64 = 0x3000;
/// Bytes between two queues' notification addresses (`notify_off_multiplier`).
pub const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
/// "No vector" (§4.1.4.3).
pub const NO_VECTOR: u16 = 0xffff;

/// Device status bits (§2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: the device may serve its queues.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Registers a queue's kick eventfd at a guest-physical notification address (KVM's
/// ioeventfd), and removes it again.
pub trait IoEventRegistrar: Send + Sync {
    /// Guest writes of any width to `gpa` signal `evt` from now on.
    fn register(&self, gpa: u64, evt: &EventFd);
    /// Undoes [`IoEventRegistrar::register`].
    fn unregister(&self, gpa: u64, evt: &EventFd);
}

/// MSI-X state shared by the transport (table writes) and the device's interrupts.
struct Msix {
    /// Per vector: address low, address high, data, vector control.
    table: Vec<[u32; 4]>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    sink: Arc<dyn MsiSink>,
}

impl Msix {
    fn signal(&mut self, vector: u16) {
        let v = usize::from(vector);
        if vector == NO_VECTOR || v >= self.table.len() || !self.enabled {
            return;
        }
        let Some(&e) = self.table.get(v) else { return };
        if self.function_masked || e[3] & 1 != 0 {
            if let Some(p) = self.pending.get_mut(v) {
                *p = true;
            }
            return;
        }
        self.sink.send_msi(u64::from(e[0]) | (u64::from(e[1]) << 32), e[2]);
    }

    /// Sends what became unmasked while pending.
    fn flush_pending(&mut self) {
        for v in 0..self.table.len() {
            let unmasked = self.table.get(v).is_some_and(|e| e[3] & 1 == 0);
            let Some(p) = self.pending.get_mut(v) else { continue };
            if *p && self.enabled && !self.function_masked && unmasked {
                *p = false;
                // The table has at most 2048 entries (MSI-X table size is 11 bits).
                if let Ok(v) = u16::try_from(v) {
                    self.signal(v);
                }
            }
        }
    }
}

/// The low byte of `v`: a register write wider than the register keeps its low bytes.
fn low_u8(v: u64) -> u8 {
    v.to_le_bytes()[0]
}

/// The low 16 bits of `v` (see [`low_u8`]).
fn low_u16(v: u64) -> u16 {
    let [a, b, ..] = v.to_le_bytes();
    u16::from_le_bytes([a, b])
}

/// The low 32 bits of `v` (see [`low_u8`]).
fn low_u32(v: u64) -> u32 {
    let [a, b, c, d, ..] = v.to_le_bytes();
    u32::from_le_bytes([a, b, c, d])
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device's [`Interrupt`]: ISR bits and MSI-X vectors.
struct PciInterrupt {
    msix: Arc<Mutex<Msix>>,
    isr: Arc<AtomicU8>,
}

impl Interrupt for PciInterrupt {
    fn notify_queue(&self, queue: u16) {
        self.isr.fetch_or(1, Ordering::SeqCst);
        let mut m = lock(&self.msix);
        let v = m.queue_vectors.get(usize::from(queue)).copied().unwrap_or(NO_VECTOR);
        m.signal(v);
    }
    fn notify_config(&self) {
        self.isr.fetch_or(2, Ordering::SeqCst);
        let mut m = lock(&self.msix);
        let v = m.config_vector;
        m.signal(v);
    }
}

/// Driver-side configuration of one queue.
#[derive(Clone, Copy)]
struct QueueCfg {
    max: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueCfg {
    fn new(max: u16) -> QueueCfg {
        QueueCfg { max, size: max, enabled: false, desc: 0, driver: 0, device: 0 }
    }
}

/// How long [`VirtioPci::quiesce`] callers should let the request in flight take (a slow
/// `fsync` on a busy host disk can take seconds).
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Error from [`VirtioPci::quiesce`].
#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    /// The device model's worker was still busy with a request when the time was up; it
    /// stops once that request completes, and [`VirtioPci::resume_device`] then restarts it.
    #[error("virtio device type {device_type}: the request in flight did not complete within {timeout:?}")]
    Timeout {
        /// virtio device type (§5).
        device_type: u32,
        /// How long was waited.
        timeout: Duration,
    },
}

/// What the transport does once the device model has stopped serving its queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterStop {
    /// Finish the driver's reset: clear the transport state; `device_status` reads 0.
    Reset,
    /// Activate the device (the driver set `DRIVER_OK`, or a snapshot ended), continuing
    /// from the used rings' indices when `resume`.
    Activate { resume: bool },
    /// Nothing: quiesced for a snapshot.
    Stay,
}

/// A stop of the device model in progress.
#[derive(Debug)]
struct Stopping {
    done: Completion,
    then: AfterStop,
}

/// A virtio device on the PCI bus.
pub struct VirtioPci {
    config: PciConfig,
    msix_cap: usize,
    device: Box<dyn VirtioDevice>,
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueCfg>,
    msix: Arc<Mutex<Msix>>,
    isr: Arc<AtomicU8>,
    /// Kick eventfds, one per queue, while active.
    kicks: Vec<EventFd>,
    /// Notification GPAs registered as ioeventfds while active.
    registered: Vec<u64>,
    mem: GuestMem,
    dma: Arc<DmaLog>,
    ioevents: Option<Arc<dyn IoEventRegistrar>>,
    /// The device model was told to stop and has not finished yet.
    stopping: Option<Stopping>,
}

impl VirtioPci {
    /// Wraps `device` with its BAR 0 at GPA `bar_base` (aligned to [`BAR_SIZE`]); MSIs go to
    /// `sink`; device DMA is recorded in `dma`; `ioevents` (KVM) takes the kick eventfds.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bar_base: u32,
        mem: GuestMem,
        sink: Arc<dyn MsiSink>,
        dma: Arc<DmaLog>,
        ioevents: Option<Arc<dyn IoEventRegistrar>>,
    ) -> VirtioPci {
        let ty = device.device_type();
        let class = match ty {
            crate::TYPE_NET => 0x02_00_00,
            crate::TYPE_BLOCK => 0x01_80_00,
            crate::TYPE_CONSOLE => 0x07_80_00,
            _ => 0xff_00_00,
        };
        let mut config = PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1040u16.saturating_add(u16::try_from(ty).unwrap_or(u16::MAX)),
            class,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_mem_bar32(0, BAR_SIZE, bar_base);
        let nq = device.queue_max_sizes().len();
        let vectors = nq + 1;
        // virtio_pci_cap: vndr, next, len, cfg_type, bar, id, pad[2], offset, length.
        // Offsets and lengths are inside the 32 KiB BAR; `extra` is at most 4 bytes.
        let cap = |ty: u8, off: u64, len: u64, extra: &[u8]| {
            let mut c = vec![0x09, 0, u8::try_from(16 + extra.len()).unwrap_or(u8::MAX), ty, 0, 0, 0, 0];
            c.extend_from_slice(&low_u32(off).to_le_bytes());
            c.extend_from_slice(&low_u32(len).to_le_bytes());
            c.extend_from_slice(extra);
            c
        };
        config.add_capability(&cap(1, COMMON, COMMON_LEN, &[]), &[]);
        config.add_capability(
            &cap(2, NOTIFY, nq as u64 * u64::from(NOTIFY_MULTIPLIER), &NOTIFY_MULTIPLIER.to_le_bytes()),
            &[],
        );
        config.add_capability(&cap(3, ISR, 4, &[]), &[]);
        config.add_capability(&cap(4, DEVICE_CFG, DEVICE_CFG_LEN, &[]), &[]);
        // MSI-X: message control (table size - 1; enable and function mask writable),
        // table offset/BIR 0, PBA offset/BIR 0.
        let mut msix = vec![0x11, 0];
        // One vector per queue plus the configuration vector: far below the 2048 MSI-X allows.
        msix.extend_from_slice(&u16::try_from(vectors - 1).unwrap_or(u16::MAX).to_le_bytes());
        msix.extend_from_slice(&low_u32(MSIX_TABLE).to_le_bytes());
        msix.extend_from_slice(&low_u32(MSIX_PBA).to_le_bytes());
        let msix_cap = config.add_capability(&msix, &[0, 0, 0, 0xc0]).unwrap_or(0);
        let msix_state = Msix {
            table: vec![[0, 0, 0, 1]; vectors],
            pending: vec![false; vectors],
            enabled: false,
            function_masked: false,
            config_vector: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; nq],
            sink,
        };
        let queues = device.queue_max_sizes().into_iter().map(QueueCfg::new).collect();
        let device_features = device.device_features() | VIRTIO_F_VERSION_1;
        VirtioPci {
            config,
            msix_cap,
            device,
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            msix: Arc::new(Mutex::new(msix_state)),
            isr: Arc::new(AtomicU8::new(0)),
            kicks: Vec::new(),
            registered: Vec::new(),
            mem,
            dma,
            ioevents,
            stopping: None,
        }
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<crate::Counters> {
        self.device.counters()
    }

    /// The device's statistics beyond its counters ([`VirtioDevice::stats`]).
    pub fn stats(&self) -> crate::DeviceStats {
        self.device.stats()
    }

    /// The device's virtio type (§5).
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn common_bytes(&self) -> [u8; COMMON_BYTES] {
        let mut b = [0u8; COMMON_BYTES];
        // Every field below is at a constant offset inside the structure.
        let put = |b: &mut [u8], off: usize, v: &[u8]| {
            if let Some(d) = b.get_mut(off..off + v.len()) {
                d.copy_from_slice(v);
            }
        };
        put(&mut b, 0x00, &self.device_feature_select.to_le_bytes());
        let f = match self.device_feature_select {
            0 => low_u32(self.device_features),
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        };
        put(&mut b, 0x04, &f.to_le_bytes());
        put(&mut b, 0x08, &self.driver_feature_select.to_le_bytes());
        let d = match self.driver_feature_select {
            0 => low_u32(self.driver_features),
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(&mut b, 0x0c, &d.to_le_bytes());
        let m = lock(&self.msix);
        put(&mut b, 0x10, &m.config_vector.to_le_bytes());
        put(&mut b, 0x12, &u16::try_from(self.queues.len()).unwrap_or(u16::MAX).to_le_bytes());
        b[0x14] = self.status;
        b[0x15] = self.config_generation;
        put(&mut b, 0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            put(&mut b, 0x18, &q.size.to_le_bytes());
            let v = m.queue_vectors.get(usize::from(self.queue_select)).copied().unwrap_or(NO_VECTOR);
            put(&mut b, 0x1a, &v.to_le_bytes());
            put(&mut b, 0x1c, &u16::from(q.enabled).to_le_bytes());
            put(&mut b, 0x1e, &self.queue_select.to_le_bytes());
            put(&mut b, 0x20, &q.desc.to_le_bytes());
            put(&mut b, 0x28, &q.driver.to_le_bytes());
            put(&mut b, 0x30, &q.device.to_le_bytes());
        }
        b
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        if self.resetting() {
            // §4.1.4.3.2: the driver waits for device_status to read 0 before reinitializing.
            tracing::debug!("virtio-pci: common config write at {off:#x} during a reset ignored");
            return;
        }
        let mut v8 = [0u8; 8];
        let n = data.len().min(8);
        for (d, &s) in v8.iter_mut().zip(data) {
            *d = s;
        }
        let v = u64::from_le_bytes(v8);
        let active = self.status & status::DRIVER_OK != 0;
        let qs = usize::from(self.queue_select);
        match off {
            0x00 => self.device_feature_select = low_u32(v),
            0x08 => self.driver_feature_select = low_u32(v),
            0x0c => {
                if self.status & status::FEATURES_OK == 0 {
                    let shift = match self.driver_feature_select {
                        0 => 0,
                        1 => 32,
                        _ => return,
                    };
                    let mask = 0xffff_ffffu64 << shift;
                    self.driver_features = (self.driver_features & !mask) | (((v & 0xffff_ffff) << shift) & mask);
                }
            }
            0x10 => {
                let mut m = lock(&self.msix);
                let v = low_u16(v);
                m.config_vector = if usize::from(v) < m.table.len() { v } else { NO_VECTOR };
            }
            0x14 => self.write_status(low_u8(v)),
            0x16 => self.queue_select = low_u16(v),
            0x18 if !active => {
                if let Some(q) = self.queues.get_mut(qs) {
                    // A split virtqueue's size is a power of 2 (virtio 1.2 §2.7; the driver
                    // MUST NOT write anything else, §4.1.4.3.2): other values, 0 included, are
                    // ignored, as QEMU ignores 0. Accepting them let a guest enable a queue
                    // that no restore accepts, so its VM's snapshots could not be restored
                    // (found by the virtio_pci fuzz target).
                    let size = low_u16(v).min(q.max);
                    if size.is_power_of_two() {
                        q.size = size;
                    } else {
                        tracing::debug!("virtio-pci: queue {qs}: size {} ignored (not a power of 2)", low_u16(v));
                    }
                }
            }
            0x1a => {
                let mut m = lock(&self.msix);
                let nv = if usize::from(low_u16(v)) < m.table.len() { low_u16(v) } else { NO_VECTOR };
                if let Some(slot) = m.queue_vectors.get_mut(qs) {
                    *slot = nv;
                }
            }
            0x1c if !active => {
                if let Some(q) = self.queues.get_mut(qs) {
                    q.enabled = v & 1 == 1;
                }
            }
            0x20..=0x37 if !active => {
                if let Some(q) = self.queues.get_mut(qs) {
                    let field = match off & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.driver,
                        _ => &mut q.device,
                    };
                    match (off & 7, n) {
                        (0, 8) => *field = v,
                        (0, 4) => *field = (*field & !0xffff_ffff) | (v & 0xffff_ffff),
                        (4, 4) => *field = (*field & 0xffff_ffff) | ((v & 0xffff_ffff) << 32),
                        _ => tracing::debug!("virtio-pci: ignored {n}-byte queue address write at {off:#x}"),
                    }
                }
            }
            _ => tracing::debug!("virtio-pci: ignored common config write at {off:#x}"),
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.after_stop(AfterStop::Reset);
            return;
        }
        let old = self.status;
        let mut new = v | (old & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let ok =
                self.driver_features & !self.device_features == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                devices::guest_warn!(
                    "virtio-pci: driver features {:#x} not acceptable (offered {:#x}, VERSION_1 required)",
                    self.driver_features,
                    self.device_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        self.status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            if new & status::FEATURES_OK == 0 {
                self.needs_reset("DRIVER_OK without FEATURES_OK".into());
                return;
            }
            // A device still active (the driver cleared DRIVER_OK without a reset, which
            // §2.1.2 forbids, and set it again) or still stopping is stopped first, so its
            // worker never has more than one activation queued.
            self.after_stop(AfterStop::Activate { resume: false });
        }
    }

    /// Whether a driver-initiated reset is waiting for the device model to stop.
    fn resetting(&self) -> bool {
        self.stopping.as_ref().is_some_and(|s| s.then == AfterStop::Reset)
    }

    /// Tells the device model to stop serving its queues (never blocks) and takes the kick
    /// eventfds back; returns when the stop is complete.
    fn stop_device(&mut self) -> Completion {
        let done = self.device.reset();
        self.drop_kicks();
        done
    }

    /// Has `then` done once the device model has stopped: now, if it is idle; at a later
    /// access to BAR 0 ([`VirtioPci::poll_stop`]) otherwise. A stop already in progress gets
    /// `then` instead of what it had, except that a pending driver reset stays one.
    fn after_stop(&mut self, then: AfterStop) {
        match &mut self.stopping {
            Some(s) if s.then == AfterStop::Reset => {}
            Some(s) => s.then = then,
            None => {
                let done = self.stop_device();
                self.stopping = Some(Stopping { done, then });
            }
        }
        self.poll_stop();
    }

    /// Finishes a stop of the device model that has completed (never blocks).
    fn poll_stop(&mut self) {
        if !self.stopping.as_ref().is_some_and(|s| s.done.is_done()) {
            return;
        }
        let Some(s) = self.stopping.take() else { return };
        match s.then {
            AfterStop::Reset => self.reset_transport(),
            AfterStop::Activate { resume } => self.start_device(resume),
            AfterStop::Stay => {}
        }
    }

    /// Activates the device model if the driver has set `DRIVER_OK` and the device does not
    /// need a reset; an activation that fails sets `DEVICE_NEEDS_RESET`.
    fn start_device(&mut self, resume: bool) {
        if self.status & status::DRIVER_OK == 0 || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        if let Err(e) = self.activate_queues(resume) {
            self.needs_reset(e);
        }
    }

    fn needs_reset(&mut self, why: String) {
        devices::guest_warn!("virtio-pci ({}): device needs reset: {why}", self.device.device_type());
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        PciInterrupt { msix: self.msix.clone(), isr: self.isr.clone() }.notify_config();
    }

    /// Builds the queues from the driver's configuration and activates the device. With
    /// `resume`, each queue continues from its used ring's index (a device quiesced for a
    /// snapshot has completed every chain it took, so next_avail = next_used = used.idx).
    fn activate_queues(&mut self, resume: bool) -> Result<(), String> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, c) in self.queues.iter().enumerate() {
            let mut q = Queue::new(c.max).map_err(|e| format!("queue {i}: {e:?}"))?;
            if c.enabled {
                q.try_set_size(c.size).map_err(|e| format!("queue {i} size {}: {e:?}", c.size))?;
                q.try_set_desc_table_address(vm_memory::GuestAddress(c.desc))
                    .map_err(|e| format!("queue {i} descriptor table {:#x}: {e:?}", c.desc))?;
                q.try_set_avail_ring_address(vm_memory::GuestAddress(c.driver))
                    .map_err(|e| format!("queue {i} driver area {:#x}: {e:?}", c.driver))?;
                q.try_set_used_ring_address(vm_memory::GuestAddress(c.device))
                    .map_err(|e| format!("queue {i} device area {:#x}: {e:?}", c.device))?;
                q.set_event_idx(event_idx);
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return Err(format!("queue {i}: rings outside guest memory or misaligned"));
                }
                if resume {
                    use vm_memory::Bytes;
                    let idx: u16 = self
                        .mem
                        .read_obj(vm_memory::GuestAddress(c.device.wrapping_add(2)))
                        .map_err(|e| format!("queue {i} used index: {e}"))?;
                    q.set_next_avail(idx);
                    q.set_next_used(idx);
                }
            }
            queues.push(q);
        }
        let mut kicks = Vec::new();
        let mut device_kicks = Vec::new();
        for _ in 0..self.queues.len() {
            let e = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
            device_kicks.push(e.try_clone().map_err(|e| format!("eventfd: {e}"))?);
            kicks.push(e);
        }
        if let (Some(r), Some((base, _))) = (&self.ioevents, self.config.mem_bar(0)) {
            for (i, e) in kicks.iter().enumerate() {
                let gpa = base + NOTIFY + i as u64 * u64::from(NOTIFY_MULTIPLIER);
                r.register(gpa, e);
                self.registered.push(gpa);
            }
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            acked_features: self.driver_features,
            queues,
            queue_evts: device_kicks,
            interrupt: Arc::new(PciInterrupt { msix: self.msix.clone(), isr: self.isr.clone() }),
            dma: self.dma.clone(),
            resumed: resume,
        };
        self.kicks = kicks;
        self.device.activate(ctx).map_err(|e| e.to_string())?;
        // Buffers made available before DRIVER_OK are served now.
        for k in &self.kicks {
            let _ = k.write(1);
        }
        Ok(())
    }

    /// Unregisters the kick eventfds (ioeventfds) and drops them.
    fn drop_kicks(&mut self) {
        if let Some(r) = &self.ioevents {
            for (gpa, e) in self.registered.drain(..).zip(self.kicks.iter()) {
                r.unregister(gpa, e);
            }
        }
        self.registered.clear();
        self.kicks.clear();
    }

    /// The transport's side of a reset, once the device model has stopped: `device_status`
    /// reads 0 from now on.
    fn reset_transport(&mut self) {
        self.drop_kicks();
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueCfg::new(q.max);
        }
        self.isr.store(0, Ordering::SeqCst);
        let mut m = lock(&self.msix);
        m.config_vector = NO_VECTOR;
        m.queue_vectors.fill(NO_VECTOR);
    }

    fn msix_control_changed(&mut self) {
        if self.msix_cap == 0 {
            return;
        }
        let ctrl = self.config.get16(self.msix_cap + 2);
        let mut m = lock(&self.msix);
        m.enabled = ctrl & (1 << 15) != 0;
        m.function_masked = ctrl & (1 << 14) != 0;
        m.flush_pending();
    }

    fn msix_table_read(&self, off: u64, data: &mut [u8]) {
        let m = lock(&self.msix);
        let mut bytes = Vec::with_capacity(m.table.len() * 16);
        for e in &m.table {
            for w in e {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
        }
        crate::device::read_config_bytes(&bytes, off, data);
    }

    fn msix_table_write(&self, off: u64, data: &[u8]) {
        let mut m = lock(&self.msix);
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = usize::try_from(off).ok().and_then(|o| o.checked_add(i)) else { continue };
            let (v, w, byte) = (o / 16, (o % 16) / 4, o % 4);
            if let Some(word) = m.table.get_mut(v).and_then(|e| e.get_mut(w)) {
                let mut le = word.to_le_bytes();
                if let Some(x) = le.get_mut(byte) {
                    *x = b;
                }
                *word = u32::from_le_bytes(le);
            }
        }
        m.flush_pending();
    }

    fn msix_pba_read(&self, off: u64, data: &mut [u8]) {
        let m = lock(&self.msix);
        let mut bits = vec![0u8; m.pending.len().div_ceil(64) * 8];
        for (byte, pending) in bits.iter_mut().zip(m.pending.chunks(8)) {
            *byte = pending.iter().enumerate().fold(0, |acc, (j, &p)| acc | (u8::from(p) << j));
        }
        crate::device::read_config_bytes(&bits, off, data);
    }
}

/// One queue's driver configuration in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueConfigState {
    /// Queue size chosen by the driver.
    pub size: u16,
    /// `queue_enable`.
    pub enabled: bool,
    /// Descriptor table, driver area and device area GPAs.
    pub desc: u64,
    /// Driver (available) ring GPA.
    pub driver: u64,
    /// Device (used) ring GPA.
    pub device: u64,
}

/// Why [`VirtioPci::restore_state`] refused a saved transport state: the field that does not
/// match the VM this VMM built, or is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot is of another device type.
    #[error("device type {snapshot} in the snapshot, {vm} in the VM")]
    DeviceType {
        /// virtio device type in the snapshot.
        snapshot: u32,
        /// virtio device type of this transport's device.
        vm: u32,
    },
    /// The saved PCI configuration space has the wrong size.
    #[error("config space of {len} bytes (expected {want})")]
    ConfigSpace {
        /// Its length in the snapshot.
        len: usize,
        /// The PCI configuration space size.
        want: usize,
    },
    /// The number of queues (or of their MSI-X vector numbers) differs.
    #[error("{snapshot} queues in the snapshot, {vm} in the VM")]
    QueueCount {
        /// Queues in the snapshot.
        snapshot: usize,
        /// Queue vector numbers in the snapshot.
        vectors: usize,
        /// Queues of this transport.
        vm: usize,
    },
    /// A queue size that is not a power of 2 up to the queue's maximum (or 0 while enabled).
    #[error("queue {index}: size {size} (accepted: a power of 2 up to {max})")]
    QueueSize {
        /// The queue's index.
        index: usize,
        /// Its size in the snapshot.
        size: u16,
        /// The largest size the device accepts.
        max: u16,
    },
    /// The number of MSI-X vectors (or of their pending bits) differs.
    #[error("{snapshot} MSI-X vectors in the snapshot, {vm} in the VM")]
    MsixVectors {
        /// MSI-X table entries in the snapshot.
        snapshot: usize,
        /// MSI-X pending bits in the snapshot.
        pending: usize,
        /// MSI-X vectors of this transport.
        vm: usize,
    },
}

/// The transport's state in a snapshot (the device model is rebuilt from the VM
/// configuration and re-activated from this).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioPciState {
    /// virtio device type, checked on restore.
    pub device_type: u32,
    /// PCI configuration space (256 bytes).
    pub config_space: Vec<u8>,
    /// Feature select registers and the driver's accepted features.
    pub device_feature_select: u32,
    /// Driver feature select.
    pub driver_feature_select: u32,
    /// Accepted features.
    pub driver_features: u64,
    /// Device status byte.
    pub status: u8,
    /// Configuration generation.
    pub config_generation: u8,
    /// `queue_select`.
    pub queue_select: u16,
    /// Per queue.
    pub queues: Vec<QueueConfigState>,
    /// MSI-X table entries (address low, high, data, control).
    pub msix_table: Vec<[u32; 4]>,
    /// MSI-X pending bits.
    pub msix_pending: Vec<bool>,
    /// MSI-X enable and function mask.
    pub msix_enabled: bool,
    /// Function mask.
    pub msix_masked: bool,
    /// Configuration-change vector.
    pub config_vector: u16,
    /// Per-queue vectors.
    pub queue_vectors: Vec<u16>,
    /// ISR status.
    pub isr: u8,
}

impl VirtioPci {
    /// Stops the device model's worker so that neither guest memory nor the rings change,
    /// waiting up to `timeout` (see [`QUIESCE_TIMEOUT`]) for the request in flight to
    /// complete; the transport keeps its state. A driver reset in progress is waited for
    /// and finished (the state then has `device_status` 0). Call before saving guest memory
    /// (not from a vCPU: this waits); [`VirtioPci::resume_device`] starts serving again.
    ///
    /// Errors: [`QuiesceError::Timeout`] when the worker is still busy after `timeout`; the
    /// device stays stopped-in-progress, and [`VirtioPci::resume_device`] (which must still
    /// be called) restarts it once the worker is free.
    pub fn quiesce(&mut self, timeout: Duration) -> Result<(), QuiesceError> {
        self.after_stop(AfterStop::Stay);
        if let Some(s) = &self.stopping {
            if !s.done.wait(timeout) {
                return Err(QuiesceError::Timeout { device_type: self.device.device_type(), timeout });
            }
        }
        self.poll_stop();
        Ok(())
    }

    /// Makes the device's host backend durable ([`VirtioDevice::flush_backend`]); call after
    /// [`VirtioPci::quiesce`].
    ///
    /// Errors: the backend's I/O error.
    pub fn flush_backend(&self) -> std::io::Result<()> {
        self.device.flush_backend()
    }

    /// Serves the queues again after [`VirtioPci::quiesce`] or a restore, continuing from
    /// the used rings' indices. Does nothing when the driver has not set `DRIVER_OK`. Never
    /// blocks: a device still serving (one that was not quiesced, or whose quiesce timed
    /// out) is stopped first and restarts at the first access to BAR 0 after its worker is
    /// free, so the used rings' indices are read only once nothing else writes them.
    pub fn resume_device(&mut self) {
        self.after_stop(AfterStop::Activate { resume: true });
    }

    /// Keeps the ioeventfds at the notification addresses of BAR 0 as the guest moves it
    /// (or turns memory decoding off: then none are registered).
    fn follow_bar(&mut self) {
        let Some(r) = self.ioevents.clone() else { return };
        if self.kicks.is_empty() {
            return;
        }
        let want: Vec<u64> = match self.config.mem_bar(0) {
            Some((base, _)) => {
                (0..self.kicks.len() as u64).map(|i| base + NOTIFY + i * u64::from(NOTIFY_MULTIPLIER)).collect()
            }
            None => Vec::new(),
        };
        if want == self.registered {
            return;
        }
        for (gpa, e) in self.registered.drain(..).zip(self.kicks.iter()) {
            r.unregister(gpa, e);
        }
        for (gpa, e) in want.iter().zip(self.kicks.iter()) {
            r.register(*gpa, e);
        }
        self.registered = want;
    }

    /// The transport state (the VM must be paused and the device quiesced).
    pub fn save_state(&self) -> VirtioPciState {
        let m = lock(&self.msix);
        VirtioPciState {
            device_type: self.device.device_type(),
            config_space: (0..64).flat_map(|r| self.config.read_reg(r).to_le_bytes()).collect(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .map(|q| QueueConfigState {
                    size: q.size,
                    enabled: q.enabled,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                })
                .collect(),
            msix_table: m.table.clone(),
            msix_pending: m.pending.clone(),
            msix_enabled: m.enabled,
            msix_masked: m.function_masked,
            config_vector: m.config_vector,
            queue_vectors: m.queue_vectors.clone(),
            isr: self.isr.load(Ordering::SeqCst),
        }
    }

    /// Loads a saved transport state into this (freshly built, never activated) transport;
    /// call [`VirtioPci::resume_device`] afterwards. Errors name the mismatching field.
    pub fn restore_state(&mut self, s: &VirtioPciState) -> Result<(), RestoreError> {
        if s.device_type != self.device.device_type() {
            return Err(RestoreError::DeviceType { snapshot: s.device_type, vm: self.device.device_type() });
        }
        if s.config_space.len() != devices::pci::CONFIG_SIZE {
            return Err(RestoreError::ConfigSpace { len: s.config_space.len(), want: devices::pci::CONFIG_SIZE });
        }
        if s.queues.len() != self.queues.len() || s.queue_vectors.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                snapshot: s.queues.len(),
                vectors: s.queue_vectors.len(),
                vm: self.queues.len(),
            });
        }
        for (i, (q, st)) in self.queues.iter().zip(&s.queues).enumerate() {
            // A split virtqueue's size is a power of 2 no larger than the device's maximum
            // (virtio 1.2 §2.7); an enabled queue of any other size would stall the guest.
            if st.size > q.max || (st.size != 0 && !st.size.is_power_of_two()) || (st.enabled && st.size == 0) {
                return Err(RestoreError::QueueSize { index: i, size: st.size, max: q.max });
            }
        }
        let mut m = lock(&self.msix);
        if s.msix_table.len() != m.table.len() || s.msix_pending.len() != m.table.len() {
            return Err(RestoreError::MsixVectors {
                snapshot: s.msix_table.len(),
                pending: s.msix_pending.len(),
                vm: m.table.len(),
            });
        }
        self.config.bytes_mut().copy_from_slice(&s.config_space);
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features & self.device_features;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.queue_select = s.queue_select;
        for (q, st) in self.queues.iter_mut().zip(&s.queues) {
            q.size = st.size;
            q.enabled = st.enabled;
            q.desc = st.desc;
            q.driver = st.driver;
            q.device = st.device;
        }
        m.table.clone_from(&s.msix_table);
        m.pending.clone_from(&s.msix_pending);
        m.enabled = s.msix_enabled;
        m.function_masked = s.msix_masked;
        let n = m.table.len();
        let vec_ok = |v: u16| if usize::from(v) < n { v } else { NO_VECTOR };
        m.config_vector = vec_ok(s.config_vector);
        m.queue_vectors = s.queue_vectors.iter().map(|&v| vec_ok(v)).collect();
        self.isr.store(s.isr, Ordering::SeqCst);
        Ok(())
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.poll_stop();
        self.config.write(offset, data);
        let cap = self.msix_cap;
        if cap != 0 && offset < cap + 4 && offset + data.len() > cap + 2 {
            self.msix_control_changed();
        }
        self.follow_bar();
        if self.config.command() & CMD_BUS_MASTER == 0 && self.status & status::DRIVER_OK != 0 {
            tracing::debug!("virtio-pci: bus mastering turned off while the device is active");
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        self.poll_stop();
        match offset {
            o if o < COMMON + COMMON_LEN => {
                let b = self.common_bytes();
                crate::device::read_config_bytes(&b, o, data);
            }
            // Reading the ISR byte clears it (§4.1.4.5).
            ISR => {
                if let Some(d) = data.first_mut() {
                    *d = self.isr.swap(0, Ordering::SeqCst);
                }
            }
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG, data)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.msix_table_read(o - MSIX_TABLE, data),
            o if o >= MSIX_PBA => self.msix_pba_read(o - MSIX_PBA, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        self.poll_stop();
        match offset {
            o if o < COMMON + COMMON_LEN => self.common_write(o, data),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG, data)
            }
            o if (NOTIFY..MSIX_TABLE).contains(&o) => {
                let q = (o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER);
                if let Some(k) = usize::try_from(q).ok().and_then(|q| self.kicks.get(q)) {
                    let _ = k.write(1);
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.msix_table_write(o - MSIX_TABLE, data),
            _ => {}
        }
    }
}

#[cfg(test)]
// Test fixtures: byte patterns wrap on purpose; sizes and indices are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::testing::{TestQueue, AVAIL, DATA, DESC, USED};
    use crate::worker::{EpollCtl, Handler, Worker};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    struct ChanSink(Mutex<mpsc::Sender<(u64, u32)>>);
    impl MsiSink for ChanSink {
        fn send_msi(&self, addr: u64, data: u32) {
            let _ = lock(&self.0).send((addr, data));
        }
    }

    fn w(dev: &mut VirtioPci, off: u64, v: u64, len: usize) {
        dev.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    fn r(dev: &mut VirtioPci, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        dev.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn rng_device(tq: &TestQueue) -> (VirtioPci, mpsc::Receiver<(u64, u32)>) {
        let (tx, rx) = mpsc::channel();
        let dev = VirtioPci::new(
            Box::new(crate::rng::Rng::new()),
            0xc000_0000,
            tq.mem.clone(),
            Arc::new(ChanSink(Mutex::new(tx))),
            Arc::new(DmaLog::default()),
            None,
        );
        (dev, rx)
    }

    /// Resets the device as Linux's `vp_modern_set_status(0)` + `vp_modern_get_status` loop
    /// does (virtio 1.2 §4.1.4.3.2): writes 0, then polls until `device_status` reads 0.
    fn reset_and_wait(dev: &mut VirtioPci) {
        w(dev, 0x14, 0, 1);
        wait_status_zero(dev);
    }

    /// Polls `device_status` (sleeping 1 ms in between, as Linux does) until it reads 0.
    fn wait_status_zero(dev: &mut VirtioPci) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while r(dev, 0x14, 1) != 0 {
            assert!(Instant::now() < deadline, "device_status never read 0 after a reset");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The Linux driver's bring-up sequence (virtio 1.2 §3.1.1) with MSI-X vectors.
    fn bring_up(dev: &mut VirtioPci, size: u16) {
        dev.config_write(0x04, &(CMD_BUS_MASTER | devices::pci::CMD_MEMORY).to_le_bytes());
        let cap = dev.msix_cap;
        dev.config_write(cap + 2, &(1u16 << 15).to_le_bytes());
        // Vector 0: config, vector 1: queue 0.
        for (v, data) in [(0u64, 0x30u64), (1, 0x31)] {
            w(dev, MSIX_TABLE + v * 16, 0xfee0_0000, 4);
            w(dev, MSIX_TABLE + v * 16 + 8, data, 4);
            w(dev, MSIX_TABLE + v * 16 + 12, 0, 4);
        }
        reset_and_wait(dev);
        w(dev, 0x14, u64::from(status::ACKNOWLEDGE | status::DRIVER), 1);
        w(dev, 0x00, 1, 4);
        assert_ne!(r(dev, 0x04, 4) & 1, 0, "VERSION_1 offered");
        w(dev, 0x08, 1, 4);
        w(dev, 0x0c, 1, 4);
        w(dev, 0x14, u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK), 1);
        assert_ne!(r(dev, 0x14, 1) as u8 & status::FEATURES_OK, 0);
        w(dev, 0x10, 0, 2);
        assert_eq!(r(dev, 0x12, 2), 1, "num_queues");
        w(dev, 0x16, 0, 2);
        w(dev, 0x18, u64::from(size), 2);
        w(dev, 0x1a, 1, 2);
        assert_eq!(r(dev, 0x1a, 2), 1);
        w(dev, 0x20, DESC, 4);
        w(dev, 0x24, 0, 4);
        w(dev, 0x28, AVAIL, 8);
        w(dev, 0x30, USED, 4);
        w(dev, 0x34, 0, 4);
        w(dev, 0x1c, 1, 2);
        w(dev, 0x14, u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK), 1);
    }

    #[test]
    fn driver_bring_up_request_and_msix_interrupt() {
        let mut tq = TestQueue::new(16, 1 << 20);
        let (mut dev, rx) = rng_device(&tq);
        bring_up(&mut dev, 16);
        assert_eq!(r(&mut dev, 0x14, 1) as u8 & status::DEVICE_NEEDS_RESET, 0);
        tq.add_chain(0, &[(DATA, 64, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        let (addr, data) = rx.recv_timeout(Duration::from_secs(5)).expect("queue interrupt");
        assert_eq!((addr, data), (0xfee0_0000, 0x31));
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used(0), (0, 64));
        assert_eq!(r(&mut dev, ISR, 1), 1, "ISR: queue interrupt");
        assert_eq!(r(&mut dev, ISR, 1), 0, "ISR clears on read");
        // A masked vector is held pending and sent on unmask.
        w(&mut dev, MSIX_TABLE + 16 + 12, 1, 4);
        tq.add_chain(1, &[(DATA + 64, 8, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "masked");
        assert_eq!(r(&mut dev, MSIX_PBA, 8), 0b10);
        w(&mut dev, MSIX_TABLE + 16 + 12, 0, 4);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (0xfee0_0000, 0x31));
        // Reset stops the device and clears its configuration.
        w(&mut dev, 0x14, 0, 1);
        assert_eq!(r(&mut dev, 0x14, 1), 0);
        assert_eq!(r(&mut dev, 0x1a, 2), u64::from(NO_VECTOR));
    }

    #[test]
    fn state_survives_quiesce_save_and_restore_into_a_new_transport() {
        let mut tq = TestQueue::new(16, 1 << 20);
        let (mut dev, rx) = rng_device(&tq);
        bring_up(&mut dev, 16);
        tq.add_chain(0, &[(DATA, 32, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        rx.recv_timeout(Duration::from_secs(5)).expect("first interrupt");
        dev.quiesce(QUIESCE_TIMEOUT).unwrap();
        let st = dev.save_state();
        drop(dev);
        // A new transport (as in a fresh VMM process) over the same guest memory.
        let (mut dev2, rx2) = rng_device(&tq);
        dev2.restore_state(&st).unwrap();
        assert_eq!(dev2.save_state(), st);
        dev2.resume_device();
        tq.add_chain(1, &[(DATA + 64, 16, true)]);
        w(&mut dev2, NOTIFY, 0, 2);
        assert_eq!(rx2.recv_timeout(Duration::from_secs(5)).unwrap(), (0xfee0_0000, 0x31));
        assert_eq!(tq.used_idx(), 2, "continues after the first request");
        assert_eq!(tq.used(1), (1, 16));
        // A state for another device type, or with the wrong shape, is refused.
        let mut bad = st.clone();
        bad.device_type = 2;
        assert!(matches!(dev2.restore_state(&bad), Err(RestoreError::DeviceType { snapshot: 2, .. })));
        let mut bad = st.clone();
        bad.queues[0].size = 1000;
        let e = dev2.restore_state(&bad).unwrap_err();
        assert!(matches!(e, RestoreError::QueueSize { index: 0, size: 1000, .. }), "{e:?}");
        assert!(e.to_string().contains("queue 0: size 1000"), "{e}");
        let mut bad = st;
        bad.queues.clear();
        assert!(matches!(dev2.restore_state(&bad), Err(RestoreError::QueueCount { snapshot: 0, .. })));
    }

    /// Records the notification addresses registered as ioeventfds.
    #[derive(Default)]
    struct Registrar(Mutex<Vec<u64>>);
    impl IoEventRegistrar for Registrar {
        fn register(&self, gpa: u64, _evt: &EventFd) {
            lock(&self.0).push(gpa);
        }
        fn unregister(&self, gpa: u64, _evt: &EventFd) {
            lock(&self.0).retain(|g| *g != gpa);
        }
    }

    #[test]
    fn ioeventfds_follow_the_bar() {
        let tq = TestQueue::new(16, 1 << 20);
        let (tx, _rx) = mpsc::channel();
        let reg = Arc::new(Registrar::default());
        let mut dev = VirtioPci::new(
            Box::new(crate::rng::Rng::new()),
            0xc000_0000,
            tq.mem.clone(),
            Arc::new(ChanSink(Mutex::new(tx))),
            Arc::new(DmaLog::default()),
            Some(reg.clone()),
        );
        bring_up(&mut dev, 16);
        assert_eq!(*lock(&reg.0), vec![0xc000_0000 + NOTIFY]);
        dev.config_write(0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(*lock(&reg.0), vec![0xd000_0000 + NOTIFY], "moved with the BAR");
        dev.config_write(0x04, &0u16.to_le_bytes());
        assert!(lock(&reg.0).is_empty(), "memory decoding off");
        dev.config_write(0x04, &(CMD_BUS_MASTER | devices::pci::CMD_MEMORY).to_le_bytes());
        assert_eq!(*lock(&reg.0), vec![0xd000_0000 + NOTIFY]);
        w(&mut dev, 0x14, 0, 1);
        assert!(lock(&reg.0).is_empty(), "reset unregisters");
    }

    #[test]
    fn bad_features_and_bad_rings_are_refused() {
        let tq = TestQueue::new(16, 1 << 20);
        let (mut dev, rx) = rng_device(&tq);
        // Without VERSION_1, FEATURES_OK does not stick.
        w(&mut dev, 0x14, u64::from(status::ACKNOWLEDGE | status::DRIVER), 1);
        w(&mut dev, 0x14, u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK), 1);
        assert_eq!(r(&mut dev, 0x14, 1) as u8 & status::FEATURES_OK, 0);
        // Rings outside guest memory: DRIVER_OK ends in DEVICE_NEEDS_RESET and a config
        // interrupt, not a panic.
        w(&mut dev, 0x14, 0, 1);
        bring_up(&mut dev, 16);
        // The worker may still be taking up the activation: wait for the reset (§4.1.4.3.2).
        reset_and_wait(&mut dev);
        let cap = dev.msix_cap;
        dev.config_write(cap + 2, &(1u16 << 15).to_le_bytes());
        w(&mut dev, 0x14, 3, 1);
        w(&mut dev, 0x08, 1, 4);
        w(&mut dev, 0x0c, 1, 4);
        w(&mut dev, 0x14, 11, 1);
        w(&mut dev, 0x10, 0, 2);
        w(&mut dev, 0x16, 0, 2);
        w(&mut dev, 0x20, 0xffff_ffff_0000, 8);
        w(&mut dev, 0x1c, 1, 2);
        w(&mut dev, 0x14, 15, 1);
        assert_ne!(r(&mut dev, 0x14, 1) as u8 & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (0xfee0_0000, 0x30));
        // Queue sizes above the maximum are clamped; sizes that are not a power of 2 (0
        // included) are ignored; out-of-range vectors read NO_VECTOR.
        reset_and_wait(&mut dev);
        w(&mut dev, 0x18, 4096, 2);
        assert_eq!(r(&mut dev, 0x18, 2), 256);
        w(&mut dev, 0x18, 16, 2);
        w(&mut dev, 0x18, 0, 2);
        w(&mut dev, 0x18, 24, 2);
        assert_eq!(r(&mut dev, 0x18, 2), 16);
        w(&mut dev, 0x1a, 77, 2);
        assert_eq!(r(&mut dev, 0x1a, 2), u64::from(NO_VECTOR));
    }

    #[test]
    fn random_bar_and_config_accesses_do_not_panic() {
        let tq = TestQueue::new(16, 1 << 20);
        let (mut dev, _rx) = rng_device(&tq);
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = x % u64::from(BAR_SIZE);
            let len = [1usize, 2, 4, 8][(x >> 40) as usize % 4];
            if x & (1 << 20) != 0 {
                dev.bar_write(0, off, &x.to_le_bytes()[..len]);
            } else {
                let mut b = [0u8; 8];
                dev.bar_read(0, off, &mut b[..len]);
            }
            if x & (1 << 21) != 0 {
                dev.config_write((x >> 24) as usize % 256, &x.to_le_bytes()[..len.min(4)]);
            }
        }
        // Post-condition: after the noise a driver can still bring the device up.
        bring_up(&mut dev, 16);
        let st = r(&mut dev, 0x14, 1) as u8;
        assert_eq!(st & status::DEVICE_NEEDS_RESET, 0, "device_status {st:#x} after the noise");
        assert_ne!(st & status::DRIVER_OK, 0, "device_status {st:#x} after the noise");
        w(&mut dev, 0x14, 0, 1);
    }

    // Asynchronous reset (virtio 1.2 §2.4, §4.1.4.3.2), quiesce and the persistent worker.

    /// What a driver does to its rings before re-initializing: empty available and used rings.
    fn clear_rings(tq: &mut TestQueue) {
        tq.set_avail_idx(0);
        tq.write(USED, &[0; 4]);
    }

    /// Shared by [`SlowDevice`] and its handlers.
    struct Gate {
        /// One message per request the handler may finish.
        go: Mutex<mpsc::Receiver<()>>,
        /// Told each time the handler starts waiting for `go`.
        entered: Mutex<mpsc::Sender<()>>,
        /// Calls to [`VirtioDevice::activate`].
        activations: std::sync::atomic::AtomicU64,
    }

    /// A one-queue device whose handler, when a request is available, tells the test that it
    /// started and then waits for the test's go-ahead before serving it (filling its buffers
    /// with 0xab): a request stuck in a slow host operation (a multi-second fsync on a
    /// virtio-blk FLUSH, a blocked TAP).
    struct SlowDevice {
        gate: Arc<Gate>,
        worker: Worker<SlowQueue>,
    }

    struct SlowQueue {
        mem: GuestMem,
        queue: Queue,
        interrupt: Arc<dyn Interrupt>,
        gate: Arc<Gate>,
    }

    impl Handler for SlowQueue {
        fn queue_event(&mut self, _queue: usize, _ctl: &EpollCtl) {
            let avail = self.queue.avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire);
            if avail.map_or(true, |a| a.0 == self.queue.next_avail()) {
                return;
            }
            let _ = lock(&self.gate.entered).send(());
            // Bounded so that a broken test cannot leave the thread behind for ever.
            let _ = lock(&self.gate.go).recv_timeout(Duration::from_secs(30));
            let mem = &self.mem;
            let used = crate::queue::drain(&mut self.queue, mem, |_, chain| {
                let Ok(chain) = chain else { return 0 };
                let dma = DmaLog::disabled();
                let mut w = chain.writer(mem, &dma);
                let fill = vec![0xab; w.remaining().min(1 << 20) as usize];
                let _ = w.write(&fill);
                w.written() as u32
            });
            if used {
                self.interrupt.notify_queue(0);
            }
        }
    }

    impl VirtioDevice for SlowDevice {
        fn device_type(&self) -> u32 {
            crate::TYPE_RNG
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16]
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), crate::ActivateError> {
            let queue =
                ctx.queues.into_iter().next().ok_or_else(|| crate::ActivateError::BadConfig("no queue".into()))?;
            self.gate.activations.fetch_add(1, Ordering::SeqCst);
            let h = SlowQueue { mem: ctx.mem, queue, interrupt: ctx.interrupt, gate: self.gate.clone() };
            self.worker.activate(ctx.queue_evts, h).map_err(|e| crate::ActivateError::Host(e.to_string()))
        }
        fn reset(&mut self) -> Completion {
            self.worker.reset()
        }
        fn counters(&self) -> Arc<crate::Counters> {
            Arc::default()
        }
    }

    /// A transport over a [`SlowDevice`] and the test's ends of its channels.
    struct Slow {
        dev: VirtioPci,
        /// MSIs sent (address, data).
        msi: mpsc::Receiver<(u64, u32)>,
        /// Lets the handler finish one request.
        go: mpsc::Sender<()>,
        /// Told each time the handler starts waiting.
        entered: mpsc::Receiver<()>,
        /// The device's side of the channels, and its activation count.
        gate: Arc<Gate>,
    }

    fn slow_device(tq: &TestQueue) -> Slow {
        let (msi_tx, msi_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        let (entered_tx, entered_rx) = mpsc::channel();
        let gate = Arc::new(Gate { go: Mutex::new(go_rx), entered: Mutex::new(entered_tx), activations: 0.into() });
        let dev = VirtioPci::new(
            Box::new(SlowDevice { gate: gate.clone(), worker: Worker::new("virtio-test-slow") }),
            0xc000_0000,
            tq.mem.clone(),
            Arc::new(ChanSink(Mutex::new(msi_tx))),
            Arc::new(DmaLog::default()),
            None,
        );
        Slow { dev, msi: msi_rx, go: go_tx, entered: entered_rx, gate }
    }

    #[test]
    fn reset_does_not_wait_for_a_busy_worker() {
        let mut tq = TestQueue::new(16, 1 << 20);
        let Slow { mut dev, msi, go, entered, .. } = slow_device(&tq);
        bring_up(&mut dev, 16);
        tq.add_chain(0, &[(DATA, 64, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        entered.recv_timeout(Duration::from_secs(10)).expect("the handler took the request");
        // The handler is now blocked. Let it go after 500 ms from another thread, so that a
        // reset that waits for it ends (and fails the timing check) instead of hanging.
        let opener = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            go.send(()).unwrap();
            go
        });
        let t = Instant::now();
        w(&mut dev, 0x14, 0, 1);
        let took = t.elapsed();
        assert!(took < Duration::from_millis(100), "the status write of 0 took {took:?}");
        // Until the worker lets go of the queue, the reset is in progress (§4.1.4.3.2).
        assert_ne!(r(&mut dev, 0x14, 1), 0, "device_status reads non-zero while the request is in flight");
        assert_eq!(tq.used_idx(), 0);
        wait_status_zero(&mut dev);
        // Status 0 is read only after the request in flight completed.
        assert_eq!(tq.used_idx(), 1, "the request in flight completed before the reset did");
        assert_eq!(tq.used(0), (0, 64));
        assert!(t.elapsed() >= Duration::from_millis(400), "reset completed before the handler returned");
        let go = opener.join().unwrap();
        assert_eq!(r(&mut dev, 0x1a, 2), u64::from(NO_VECTOR), "transport state reset");
        while msi.try_recv().is_ok() {}
        // The device works again after re-initialization.
        clear_rings(&mut tq);
        bring_up(&mut dev, 16);
        go.send(()).unwrap();
        tq.add_chain(1, &[(DATA + 0x100, 32, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        assert_eq!(msi.recv_timeout(Duration::from_secs(10)).unwrap(), (0xfee0_0000, 0x31));
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used(0), (1, 32));
        assert_eq!(tq.read(DATA + 0x100, 32), vec![0xab; 32]);
    }

    #[test]
    fn reset_and_driver_ok_cycles_reuse_one_worker_thread() {
        let mut tq = TestQueue::new(16, 1 << 20);
        let (mut dev, msi) = rng_device(&tq);
        bring_up(&mut dev, 16);
        let spawned = crate::worker::spawned_on_this_thread();
        let t = Instant::now();
        for i in 0..1000u64 {
            clear_rings(&mut tq);
            bring_up(&mut dev, 16);
            let len = 1 + (i % 64) as u32;
            tq.add_chain(0, &[(DATA, len, true)]);
            w(&mut dev, NOTIFY, 0, 2);
            assert_eq!(msi.recv_timeout(Duration::from_secs(10)).unwrap(), (0xfee0_0000, 0x31), "cycle {i}");
            assert_eq!(tq.used_idx(), 1, "cycle {i}");
            assert_eq!(tq.used(0), (0, len), "cycle {i}");
        }
        assert_eq!(crate::worker::spawned_on_this_thread(), spawned, "worker threads started by 1000 cycles");
        assert!(t.elapsed() < Duration::from_secs(60), "1000 cycles took {:?}", t.elapsed());
        w(&mut dev, 0x14, 0, 1);
        wait_status_zero(&mut dev);
    }

    /// Lets the slow handler finish one request after `ms` milliseconds, from another thread.
    fn open_gate_after(go: mpsc::Sender<()>, ms: u64) -> std::thread::JoinHandle<mpsc::Sender<()>> {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            go.send(()).unwrap();
            go
        })
    }

    #[test]
    fn quiesce_completes_the_request_in_flight() {
        let mut tq = TestQueue::new(16, 1 << 20);
        let Slow { mut dev, msi, go, entered, .. } = slow_device(&tq);
        bring_up(&mut dev, 16);
        tq.add_chain(0, &[(DATA, 64, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        entered.recv_timeout(Duration::from_secs(10)).expect("the handler took the request");
        let opener = open_gate_after(go, 200);
        dev.quiesce(Duration::from_secs(10)).expect("quiesced");
        assert_eq!(tq.used_idx(), 1, "the request in flight completed before the snapshot");
        let st = dev.save_state();
        assert_ne!(st.status & status::DRIVER_OK, 0);
        dev.resume_device();
        let go = opener.join().unwrap();
        while msi.try_recv().is_ok() {}
        // Serving continues after the first request.
        go.send(()).unwrap();
        tq.add_chain(1, &[(DATA + 0x100, 16, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        assert_eq!(msi.recv_timeout(Duration::from_secs(10)).unwrap(), (0xfee0_0000, 0x31));
        assert_eq!(tq.used_idx(), 2);
        assert_eq!(tq.used(1), (1, 16));
    }

    #[test]
    fn quiesce_times_out_and_the_device_resumes_once_its_worker_is_free() {
        let mut tq = TestQueue::new(16, 1 << 20);
        let Slow { mut dev, msi, go, entered, .. } = slow_device(&tq);
        bring_up(&mut dev, 16);
        tq.add_chain(0, &[(DATA, 64, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        entered.recv_timeout(Duration::from_secs(10)).expect("the handler took the request");
        let t = Instant::now();
        let e = dev.quiesce(Duration::from_millis(100)).expect_err("the worker is busy");
        assert!(t.elapsed() < Duration::from_secs(5), "quiesce is bounded");
        assert!(matches!(e, QuiesceError::Timeout { device_type: crate::TYPE_RNG, .. }), "{e}");
        // The snapshot is abandoned; resuming does not wait for the worker.
        let t = Instant::now();
        dev.resume_device();
        assert!(t.elapsed() < Duration::from_millis(100));
        // A second request, posted while the first is stuck, is served with it.
        tq.add_chain(1, &[(DATA + 0x100, 16, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        go.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while tq.used_idx() != 2 {
            assert!(Instant::now() < deadline, "the old activation finishes its requests");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The next access to BAR 0 restarts the device from the used ring, so nothing is
        // served twice and new requests are served.
        assert_ne!(r(&mut dev, 0x14, 1) as u8 & status::DRIVER_OK, 0);
        while msi.try_recv().is_ok() {}
        go.send(()).unwrap();
        tq.add_chain(2, &[(DATA + 0x200, 8, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        assert_eq!(msi.recv_timeout(Duration::from_secs(10)).unwrap(), (0xfee0_0000, 0x31));
        assert_eq!(tq.used_idx(), 3);
        assert_eq!([tq.used(0), tq.used(1), tq.used(2)], [(0, 64), (1, 16), (2, 8)]);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(tq.used_idx(), 3, "no request served twice");
        assert_eq!(dev.quiesce(Duration::from_secs(10)).map_err(|e| e.to_string()), Ok(()));
    }

    #[test]
    fn quiesce_finishes_a_driver_reset_in_progress() {
        let mut tq = TestQueue::new(16, 1 << 20);
        let Slow { mut dev, go, entered, .. } = slow_device(&tq);
        bring_up(&mut dev, 16);
        tq.add_chain(0, &[(DATA, 64, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        entered.recv_timeout(Duration::from_secs(10)).expect("the handler took the request");
        w(&mut dev, 0x14, 0, 1);
        assert_ne!(r(&mut dev, 0x14, 1), 0);
        // Writes during the reset are ignored (the driver must wait for status 0).
        w(&mut dev, 0x14, u64::from(status::ACKNOWLEDGE), 1);
        w(&mut dev, 0x16, 0, 2);
        w(&mut dev, 0x20, 0x1234_5000, 8);
        assert_eq!(r(&mut dev, 0x20, 8), DESC);
        let opener = open_gate_after(go, 100);
        dev.quiesce(Duration::from_secs(10)).expect("quiesced");
        let st = dev.save_state();
        assert_eq!(st.status, 0, "the reset finished");
        assert_eq!(st.queues[0].desc, 0);
        dev.resume_device();
        assert_eq!(r(&mut dev, 0x14, 1), 0);
        opener.join().unwrap();
    }

    #[test]
    fn resuming_a_device_that_was_not_quiesced_serves_nothing_twice() {
        let mut tq = TestQueue::new(16, 1 << 20);
        let Slow { mut dev, msi, go, entered, .. } = slow_device(&tq);
        bring_up(&mut dev, 16);
        tq.add_chain(0, &[(DATA, 64, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        entered.recv_timeout(Duration::from_secs(10)).expect("the handler took the request");
        // As when an earlier device's quiesce failed: the snapshot resumes every device.
        let t = Instant::now();
        dev.resume_device();
        assert!(t.elapsed() < Duration::from_millis(100), "resume does not wait for the worker");
        go.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while tq.used_idx() != 1 {
            assert!(Instant::now() < deadline, "the request in flight completes");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_ne!(r(&mut dev, 0x14, 1) as u8 & status::DRIVER_OK, 0);
        while msi.try_recv().is_ok() {}
        go.send(()).unwrap();
        tq.add_chain(1, &[(DATA + 0x100, 16, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        assert_eq!(msi.recv_timeout(Duration::from_secs(10)).unwrap(), (0xfee0_0000, 0x31));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(tq.used_idx(), 2, "no request served twice");
        assert_eq!([tq.used(0), tq.used(1)], [(0, 64), (1, 16)]);
    }

    #[test]
    fn status_writes_while_the_worker_is_stuck_queue_nothing() {
        let mut tq = TestQueue::new(16, 1 << 20);
        let Slow { mut dev, msi, go, entered, gate } = slow_device(&tq);
        bring_up(&mut dev, 16);
        tq.add_chain(0, &[(DATA, 64, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        entered.recv_timeout(Duration::from_secs(10)).expect("the handler took the request");
        assert_eq!(gate.activations.load(Ordering::SeqCst), 1);
        // A hostile driver clears and sets DRIVER_OK without a reset, over and over: the
        // device is stopped once and activated once, when the worker is free.
        let (features_ok, driver_ok) = (11u64, 15u64);
        let t = Instant::now();
        for _ in 0..10_000 {
            w(&mut dev, 0x14, features_ok, 1);
            w(&mut dev, 0x14, driver_ok, 1);
        }
        assert!(t.elapsed() < Duration::from_secs(5), "status writes never wait: {:?}", t.elapsed());
        assert_eq!(gate.activations.load(Ordering::SeqCst), 1, "activations queued behind the stuck request");
        // Then resets, and status writes during them: all O(1), nothing queued.
        for _ in 0..10_000 {
            w(&mut dev, 0x14, 0, 1);
            w(&mut dev, 0x14, driver_ok, 1);
        }
        assert_ne!(r(&mut dev, 0x14, 1), 0, "reset in progress");
        go.send(()).unwrap();
        wait_status_zero(&mut dev);
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(gate.activations.load(Ordering::SeqCst), 1, "the reset cancelled the pending activation");
        clear_rings(&mut tq);
        bring_up(&mut dev, 16);
        assert_eq!(gate.activations.load(Ordering::SeqCst), 2);
        while msi.try_recv().is_ok() {}
        go.send(()).unwrap();
        tq.add_chain(1, &[(DATA + 0x100, 16, true)]);
        w(&mut dev, NOTIFY, 0, 2);
        assert_eq!(msi.recv_timeout(Duration::from_secs(10)).unwrap(), (0xfee0_0000, 0x31));
        assert_eq!(tq.used(0), (1, 16));
    }
}
