//! virtio-rng, the entropy device (virtio 1.2 §5.4): one request queue whose device-writable
//! buffers the device fills from the host's `getrandom(2)`.

use std::sync::Arc;

use virtio_queue::Queue;

use crate::device::{ActivateContext, ActivateError, Counters, DmaLog, GuestMem, Interrupt, VirtioDevice};
use crate::queue::{self, Chain, ChainError};
use crate::worker::{Completion, EpollCtl, Handler, Worker};
use crate::{TYPE_RNG, VIRTIO_F_VERSION_1};

/// Most bytes given for one request (a driver asking for more gets this much).
pub const MAX_REQUEST: usize = 64 << 10;
const QUEUE_SIZE: u16 = 256;

/// The entropy device.
pub struct Rng {
    counters: Arc<Counters>,
    worker: Worker<RngQueue>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A new, inactive entropy device.
    pub fn new() -> Rng {
        Rng { counters: Arc::default(), worker: Worker::new("virtio-rng") }
    }
}

/// Fills `buf` from the host's getrandom(2).
fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut rest = buf;
    while !rest.is_empty() {
        // SAFETY: the pointer and length describe the writable slice `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // getrandom(2) fills at most `rest.len()` bytes.
        rest = std::mem::take(&mut rest).get_mut(n as usize..).unwrap_or_default();
    }
    Ok(())
}

/// The request queue's state on the worker.
pub(crate) struct RngQueue {
    pub(crate) mem: GuestMem,
    pub(crate) queue: Queue,
    pub(crate) interrupt: Arc<dyn Interrupt>,
    pub(crate) dma: Arc<DmaLog>,
    pub(crate) counters: Arc<Counters>,
}

impl RngQueue {
    /// Serves one chain: fills its device-writable buffers (up to [`MAX_REQUEST`] bytes);
    /// returns the bytes written. Device-readable buffers are ignored; a malformed chain is
    /// returned unused (counted); a buffer outside guest memory ends the request with what was
    /// written so far (counted).
    fn serve(chain: Result<Chain, ChainError>, mem: &GuestMem, dma: &DmaLog, counters: &Counters) -> u32 {
        let chain = match chain {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("virtio-rng: chain: {e}");
                Counters::add(&counters.errors, 1);
                return 0;
            }
        };
        let mut w = chain.writer(mem, dma);
        w.limit(MAX_REQUEST as u64);
        let mut buf = [0u8; 4096];
        while w.remaining() > 0 {
            let n = usize::try_from(w.remaining()).map_or(buf.len(), |r| r.min(buf.len()));
            let Some(chunk) = buf.get_mut(..n) else { break };
            let failed = match host_random(chunk) {
                Err(e) => Some(format!("getrandom: {e}")),
                Ok(()) => w.write(chunk).err().map(|e| e.to_string()),
            };
            if let Some(e) = failed {
                tracing::debug!("virtio-rng: {e}");
                Counters::add(&counters.errors, 1);
                // At most MAX_REQUEST.
                return u32::try_from(w.written()).unwrap_or(u32::MAX);
            }
        }
        // At most MAX_REQUEST.
        let written = u32::try_from(w.written()).unwrap_or(u32::MAX);
        Counters::add(&counters.requests, 1);
        Counters::add(&counters.bytes_written, u64::from(written));
        written
    }

    /// Serves every available request; returns whether the guest must be interrupted.
    pub(crate) fn process(&mut self) -> bool {
        let (mem, dma, counters) = (&self.mem, &self.dma, &self.counters);
        queue::drain(&mut self.queue, mem, |_, chain| Self::serve(chain, mem, dma, counters))
    }
}

impl Handler for RngQueue {
    fn queue_event(&mut self, _queue: usize, _ctl: &EpollCtl) {
        if self.process() {
            self.interrupt.notify_queue(0);
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | crate::RING_FEATURES
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let queue = ctx.queues.into_iter().next().ok_or_else(|| ActivateError::BadConfig("no request queue".into()))?;
        let q =
            RngQueue { mem: ctx.mem, queue, interrupt: ctx.interrupt, dma: ctx.dma, counters: self.counters.clone() };
        self.worker.activate(ctx.queue_evts, q).map_err(|e| ActivateError::Host(e.to_string()))
    }
    fn reset(&mut self) -> Completion {
        self.worker.reset()
    }
    fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
}

#[cfg(test)]
// Test fixtures: byte patterns wrap on purpose; sizes and indices are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::testing::{TestQueue, DATA, F_NEXT, F_WRITE};

    struct NoIrq;
    impl Interrupt for NoIrq {
        fn notify_queue(&self, _queue: u16) {}
        fn notify_config(&self) {}
    }

    fn rig() -> (TestQueue, RngQueue) {
        let tq = TestQueue::new(16, 1 << 20);
        let q = RngQueue {
            mem: tq.mem.clone(),
            queue: tq.queue(),
            interrupt: Arc::new(NoIrq),
            dma: Arc::default(),
            counters: Arc::default(),
        };
        (tq, q)
    }

    #[test]
    fn fills_writable_buffers_and_logs_them() {
        let (mut tq, mut q) = rig();
        tq.write(DATA, &[0x55; 8]);
        tq.add_chain(
            0,
            &[(DATA, 8, false), (DATA + 0x100, 64, true), (DATA + 0x1000, 0, true), (DATA + 0x200, 32, true)],
        );
        assert!(q.process());
        assert_eq!((tq.used_idx(), tq.used(0)), (1, (0, 96)));
        assert_eq!(tq.read(DATA, 8), [0x55; 8], "device-readable buffers are left alone");
        assert_ne!(tq.read(DATA + 0x100, 64), vec![0; 64]);
        assert_eq!(q.dma.take(), vec![(DATA + 0x100, 64), (DATA + 0x200, 32)]);
        // A request larger than MAX_REQUEST gets MAX_REQUEST bytes.
        tq.add_chain(4, &[(DATA, 0x30000, true)]);
        assert!(q.process());
        assert_eq!(tq.used(1), (4, MAX_REQUEST as u32));
        assert_eq!(q.counters.requests.load(Ordering::Relaxed), 2);
        assert_eq!(q.counters.bytes_written.load(Ordering::Relaxed), 96 + MAX_REQUEST as u64);
        assert_eq!(q.counters.errors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn hostile_chains() {
        let (mut tq, mut q) = rig();
        let errors = |q: &RngQueue| q.counters.errors.load(Ordering::Relaxed);
        // A loop: returned unused.
        tq.set_desc(0, DATA, 16, F_NEXT | F_WRITE, 0);
        tq.publish(0);
        q.process();
        assert_eq!((tq.used(0), errors(&q)), ((0, 0), 1));
        // A buffer outside guest memory after a good one: what was written is reported.
        tq.add_chain(0, &[(DATA, 16, true), (1 << 40, 16, true), (DATA + 0x100, 16, true)]);
        q.process();
        assert_eq!((tq.used(1), errors(&q)), ((0, 16), 2));
        assert_eq!(q.dma.take(), vec![(DATA, 16)]);
        // Next index out of range, wrapping address, head out of range.
        tq.set_desc(0, DATA, 16, F_NEXT | F_WRITE, 99);
        tq.publish(0);
        tq.add_chain(1, &[(u64::MAX - 3, 16, true)]);
        tq.publish(77);
        q.process();
        assert_eq!((tq.used_idx(), tq.used(2), tq.used(3)), (4, (0, 0), (1, 0)));
        assert_eq!(errors(&q), 5);
        // A corrupt avail index: nothing is served until the driver repairs it.
        let avail = tq.avail_idx();
        tq.set_avail_idx(avail.wrapping_add(100));
        assert!(!q.process());
        tq.set_avail_idx(avail);
        tq.add_chain(0, &[(DATA, 8, true)]);
        assert!(q.process());
        assert_eq!(tq.used(4), (0, 8));
    }
}
