//! Serving a split virtqueue (virtio 1.2 §2.7) with `virtio-queue`: popping descriptor
//! chains, returning them through the used ring and deciding whether to interrupt.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use crate::device::GuestMem;

/// Pops every available chain of `queue`, hands it to `serve` (which returns the number of
/// bytes it wrote into the chain's device-writable buffers) and puts it in the used ring,
/// re-checking after re-enabling notifications when `VIRTIO_RING_F_EVENT_IDX` is on.
///
/// Returns whether the driver must be interrupted. A corrupt ring (avail index out of range,
/// rings outside guest memory) stops the walk: the error is logged and what was done so far
/// is reported. Never panics on guest-controlled ring contents.
pub fn drain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMem,
    mut serve: impl FnMut(DescriptorChain<&'m GuestMem>) -> u32,
) -> bool {
    walk(queue, mem, &mut (), |_| true, |_, c| serve(c), true)
}

fn finish(queue: &mut Queue, mem: &GuestMem, used_any: bool) -> bool {
    used_any && queue.needs_notification(mem).unwrap_or(true)
}

/// Like [`drain`], for a queue the device only uses when it has something to put in it (a
/// receive queue) or may refuse to serve for a while (back-pressure): pops chains only while
/// `has_work(state)` holds, so the others stay in the available ring for later. When work
/// remains but the ring is empty it re-arms driver notifications (`VIRTIO_RING_F_EVENT_IDX`'s
/// `avail_event`) and re-checks, so the driver kicks the queue when it adds buffers.
///
/// `serve` fills one chain and returns the bytes it wrote into its device-writable buffers
/// (after recording them in the [`crate::DmaLog`]); the chain then goes in the used ring.
/// Returns whether the driver must be interrupted. A corrupt ring stops the walk as in
/// [`drain`]; never panics on guest-controlled ring contents.
pub fn fill<'m, S>(
    queue: &mut Queue,
    mem: &'m GuestMem,
    state: &mut S,
    has_work: impl FnMut(&mut S) -> bool,
    serve: impl FnMut(&mut S, DescriptorChain<&'m GuestMem>) -> u32,
) -> bool {
    walk(queue, mem, state, has_work, serve, false)
}

/// The walk behind [`drain`] and [`fill`]. With `quiet`, driver notifications are turned
/// off while chains are served (they are re-armed before returning, with event index).
fn walk<'m, S>(
    queue: &mut Queue,
    mem: &'m GuestMem,
    state: &mut S,
    mut has_work: impl FnMut(&mut S) -> bool,
    mut serve: impl FnMut(&mut S, DescriptorChain<&'m GuestMem>) -> u32,
    quiet: bool,
) -> bool {
    if !queue.ready() {
        return false;
    }
    let mut used_any = false;
    loop {
        if quiet && queue.event_idx_enabled() {
            if let Err(e) = queue.disable_notification(mem) {
                devices::guest_warn!("virtqueue: disable notification: {e}");
                return used_any;
            }
        }
        while has_work(state) {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    devices::guest_warn!("virtqueue: corrupt avail ring: {e}");
                    return finish(queue, mem, used_any);
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = serve(state, chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                devices::guest_warn!("virtqueue: add_used: {e}");
                return finish(queue, mem, used_any);
            }
            used_any = true;
        }
        if !queue.event_idx_enabled() || !has_work(state) {
            break;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                devices::guest_warn!("virtqueue: enable notification: {e}");
                break;
            }
        }
    }
    finish(queue, mem, used_any)
}

/// Why [`ChainBuffers::new`] refused a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain has no descriptor (head index out of range, broken indirect table).
    #[error("empty descriptor chain")]
    Empty,
    /// A buffer has the wrong direction (device-readable where device-writable was expected,
    /// or the reverse).
    #[error("descriptor with the wrong direction")]
    WrongDirection,
    /// The chain does not end: a loop, more descriptors than the queue size, a `next` index out
    /// of range, a nested indirect table or a descriptor table outside guest memory.
    #[error("descriptor chain does not end")]
    Truncated,
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer outside guest memory")]
    OutOfMemory,
}

/// The buffers of one descriptor chain, all of one direction and all inside guest memory:
/// a scatter-gather list the device reads or writes at byte offsets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainBuffers {
    /// `(gpa, len)` of each non-empty buffer, in chain order.
    pub bufs: Vec<(u64, u32)>,
    /// Sum of the lengths, in bytes.
    pub total: u64,
}

impl ChainBuffers {
    /// Collects `chain`'s buffers, requiring each to be device-writable when `writable`
    /// (device-readable otherwise) and inside `mem`, and the chain to end properly (its last
    /// descriptor has no `NEXT` flag). Zero-length buffers are skipped.
    ///
    /// Errors: see [`ChainError`].
    pub fn new(chain: DescriptorChain<&GuestMem>, mem: &GuestMem, writable: bool) -> Result<ChainBuffers, ChainError> {
        use vm_memory::GuestMemoryBackend;
        let mut out = ChainBuffers::default();
        let mut last_has_next = None;
        for desc in chain {
            last_has_next = Some(desc.has_next());
            if desc.is_write_only() != writable {
                return Err(ChainError::WrongDirection);
            }
            if desc.len() == 0 {
                continue;
            }
            if desc.addr().0.checked_add(u64::from(desc.len())).is_none()
                || !mem.check_range(desc.addr(), desc.len() as usize)
            {
                return Err(ChainError::OutOfMemory);
            }
            out.bufs.push((desc.addr().0, desc.len()));
            out.total += u64::from(desc.len());
        }
        match last_has_next {
            None => Err(ChainError::Empty),
            Some(true) => Err(ChainError::Truncated),
            Some(false) => Ok(out),
        }
    }

    /// Copies `out.len()` bytes starting `offset` bytes into the buffers into `out`.
    /// Returns false (with `out` partly filled) when the buffers hold fewer bytes or guest
    /// memory could not be read.
    pub fn read_at(&self, mem: &GuestMem, mut offset: u64, out: &mut [u8]) -> bool {
        use vm_memory::{Bytes, GuestAddress};
        let mut done = 0usize;
        for &(addr, len) in &self.bufs {
            if done == out.len() {
                break;
            }
            let len = u64::from(len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = ((len - offset) as usize).min(out.len() - done);
            if mem.read_slice(&mut out[done..done + n], GuestAddress(addr + offset)).is_err() {
                return false;
            }
            done += n;
            offset = 0;
        }
        done == out.len()
    }

    /// Writes `data` starting `offset` bytes into the buffers, recording each write in `dma`.
    /// Returns false when the buffers hold fewer bytes or guest memory could not be written
    /// (what fit was written and recorded).
    pub fn write_at(&self, mem: &GuestMem, dma: &crate::DmaLog, mut offset: u64, data: &[u8]) -> bool {
        use vm_memory::{Bytes, GuestAddress};
        let mut done = 0usize;
        for &(addr, len) in &self.bufs {
            if done == data.len() {
                break;
            }
            let len = u64::from(len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = ((len - offset) as usize).min(data.len() - done);
            let gpa = addr + offset;
            if mem.write_slice(&data[done..done + n], GuestAddress(gpa)).is_err() {
                return false;
            }
            dma.record(gpa, n as u64);
            done += n;
            offset = 0;
        }
        done == data.len()
    }
}
