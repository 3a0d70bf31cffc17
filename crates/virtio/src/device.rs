//! The contract between a virtio device model and its transport (virtio 1.2 §2, §3).
//!
//! A transport (here: modern virtio-pci, [`crate::pci`]) owns the feature negotiation, the
//! queue configuration registers and the interrupt vectors; the device model owns what the
//! queues carry. When the driver sets `DRIVER_OK` the transport calls
//! [`VirtioDevice::activate`] with the configured queues, one kick [`EventFd`] per queue and an
//! [`Interrupt`] handle; the device then serves its queues on its own worker thread (see
//! [`crate::worker`]) until [`VirtioDevice::reset`], which never waits for that thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::worker::Completion;

/// Guest memory as the devices see it.
pub type GuestMem = GuestMemoryMmap;

/// Raises a device's interrupts (the transport maps them to MSI-X vectors).
pub trait Interrupt: Send + Sync {
    /// The device put buffers in the used ring of queue `queue` (virtio 1.2 §2.7.14).
    fn notify_queue(&self, queue: u16);
    /// The device configuration space changed, or the device needs a reset (§2.1.2).
    fn notify_config(&self);
}

/// Guest RAM written by devices (DMA), reported to accelerators that need it (the `emu`
/// accelerator retires code it decoded from those pages before the guest can run it). A
/// device records every device-writable buffer it filled *before* it puts the chain in the
/// used ring. Where the accelerator does not need it, the VMM makes a
/// [`DmaLog::disabled`] log, which records nothing (so nothing accumulates undrained).
pub struct DmaLog {
    enabled: bool,
    pending: AtomicBool,
    ranges: Mutex<Vec<(u64, u64)>>,
}

impl Default for DmaLog {
    /// An enabled, empty log.
    fn default() -> Self {
        DmaLog { enabled: true, pending: AtomicBool::new(false), ranges: Mutex::new(Vec::new()) }
    }
}

impl DmaLog {
    /// A log that ignores [`DmaLog::record`]: always empty, never pending.
    pub fn disabled() -> DmaLog {
        DmaLog { enabled: false, ..DmaLog::default() }
    }

    /// Whether [`DmaLog::record`] keeps anything.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Notes that `len` bytes at GPA `gpa` were written by a device (nothing for a disabled
    /// log or a zero length).
    pub fn record(&self, gpa: u64, len: u64) {
        if len == 0 || !self.enabled {
            return;
        }
        let mut r = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        // Coalesce with the previous range (sequential buffers are common).
        if let Some(last) = r.last_mut() {
            if last.0 + last.1 == gpa {
                last.1 += len;
                self.pending.store(true, Ordering::Release);
                return;
            }
        }
        r.push((gpa, len));
        self.pending.store(true, Ordering::Release);
    }

    /// Whether anything was recorded since the last [`DmaLog::take`] (cheap; no lock).
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Takes the recorded `(gpa, len)` ranges.
    pub fn take(&self) -> Vec<(u64, u64)> {
        let mut r = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        self.pending.store(false, Ordering::Release);
        std::mem::take(&mut *r)
    }
}

/// Per-device request counters (read by the API's `vm.counters`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests (descriptor chains) completed successfully.
    pub requests: AtomicU64,
    /// Payload bytes read from the guest (device-readable buffers consumed).
    pub bytes_read: AtomicU64,
    /// Payload bytes written to the guest (device-writable buffers filled).
    pub bytes_written: AtomicU64,
    /// Requests failed (malformed chains, I/O errors, unsupported requests).
    pub errors: AtomicU64,
}

impl Counters {
    /// Adds `n` to counter `c`.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// What a device gets when the driver sets `DRIVER_OK`.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMem,
    /// The features the driver accepted (a subset of [`VirtioDevice::device_features`]).
    pub acked_features: u64,
    /// The queues, in index order, with the driver's sizes and ring addresses; a queue the
    /// driver did not enable has `ready() == false`. Event-index suppression is already set
    /// up from the negotiated features.
    pub queues: Vec<Queue>,
    /// One kick eventfd per queue (same order): the transport (or KVM's ioeventfd) writes it
    /// when the driver notifies the queue.
    pub queue_evts: Vec<EventFd>,
    /// Interrupts to the guest.
    pub interrupt: Arc<dyn Interrupt>,
    /// Where to record guest RAM written by the device.
    pub dma: Arc<DmaLog>,
    /// The device resumes after a snapshot (restore, or the end of a snapshot) rather than
    /// starting fresh: host-side connections were lost (vsock sends a transport reset).
    pub resumed: bool,
}

/// Error returned by [`VirtioDevice::activate`]; the transport then sets `DEVICE_NEEDS_RESET`.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured the device in a way it cannot work with.
    #[error("bad configuration: {0}")]
    BadConfig(String),
    /// A host resource (thread, file, socket) could not be set up.
    #[error("host resource: {0}")]
    Host(String),
}

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// Device ID (virtio 1.2 §5: 1 net, 2 block, 3 console, 4 entropy, 5 balloon, 19 vsock).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered to the driver, including `VIRTIO_F_VERSION_1` (bit 32).
    fn device_features(&self) -> u64;
    /// Reads `data.len()` bytes of device configuration space at `offset`; bytes past its
    /// end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Driver write to device configuration space; ignored where read-only.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues (the driver set `DRIVER_OK`).
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stop serving the queues and return to the state before activation: the driver reset
    /// the device (virtio 1.2 §2.4), or a snapshot quiesces it. Never blocks: the device tells
    /// its worker (see [`crate::worker::Worker::reset`]) and returns a [`Completion`] that is
    /// done once the device no longer reads or writes the queues or guest memory (the
    /// request in flight, if any, completed). Until then the transport reports the reset as
    /// in progress (§4.1.4.3.2). Safe to call when not active (then already done).
    fn reset(&mut self) -> Completion;
    /// Makes everything the guest wrote so far durable in the device's host backend (a disk
    /// image's data and metadata caches written and fsynced), so a copy of the backend taken
    /// while the device stays quiesced is consistent. Called after a quiesce, never from a
    /// vCPU. Default: nothing to do.
    ///
    /// Errors: the backend's I/O error.
    fn flush_backend(&self) -> std::io::Result<()> {
        Ok(())
    }
    /// The device's counters.
    fn counters(&self) -> Arc<Counters>;
    /// The device's statistics beyond [`Counters`] (virtio-blk, virtio-net). Default: none.
    fn stats(&self) -> crate::DeviceStats {
        crate::DeviceStats::None
    }
}

/// Copies `src` into `data` from `offset`, zero-filling past the end (config-space reads).
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)).and_then(|o| src.get(o)).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_log_coalesces_and_a_disabled_one_keeps_nothing() {
        let log = DmaLog::default();
        assert!(log.is_enabled() && !log.pending());
        log.record(0x1000, 0x100);
        log.record(0x1100, 0x100);
        log.record(0x5000, 0);
        log.record(0x8000, 8);
        assert!(log.pending());
        assert_eq!(log.take(), vec![(0x1000, 0x200), (0x8000, 8)]);
        assert!(!log.pending() && log.take().is_empty());

        let off = DmaLog::disabled();
        assert!(!off.is_enabled());
        for i in 0..10_000u64 {
            off.record(i * 0x1000, 0x1000);
        }
        assert!(!off.pending());
        assert!(off.ranges.lock().unwrap().is_empty() && off.ranges.lock().unwrap().capacity() == 0);
        assert!(off.take().is_empty());
    }
}
