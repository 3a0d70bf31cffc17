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
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe the writable slice `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
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
            let n = w.remaining().min(buf.len() as u64) as usize;
            let failed = match host_random(&mut buf[..n]) {
                Err(e) => Some(format!("getrandom: {e}")),
                Ok(()) => w.write(&buf[..n]).err().map(|e| e.to_string()),
            };
            if let Some(e) = failed {
                tracing::debug!("virtio-rng: {e}");
                Counters::add(&counters.errors, 1);
                // At most MAX_REQUEST.
                return w.written() as u32;
            }
        }
        // At most MAX_REQUEST.
        let written = w.written() as u32;
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
