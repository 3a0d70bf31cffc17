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
pub fn drain<'m>(queue: &mut Queue, mem: &'m GuestMem, mut serve: impl FnMut(DescriptorChain<&'m GuestMem>) -> u32) -> bool {
    if !queue.ready() {
        return false;
    }
    let mut used_any = false;
    loop {
        if queue.event_idx_enabled() {
            if let Err(e) = queue.disable_notification(mem) {
                tracing::warn!("virtqueue: disable notification: {e}");
                return used_any;
            }
        }
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    tracing::warn!("virtqueue: corrupt avail ring: {e}");
                    return finish(queue, mem, used_any);
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = serve(chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("virtqueue: add_used: {e}");
                return finish(queue, mem, used_any);
            }
            used_any = true;
        }
        if !queue.event_idx_enabled() {
            break;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                tracing::warn!("virtqueue: enable notification: {e}");
                break;
            }
        }
    }
    finish(queue, mem, used_any)
}

fn finish(queue: &mut Queue, mem: &GuestMem, used_any: bool) -> bool {
    used_any && queue.needs_notification(mem).unwrap_or(true)
}
