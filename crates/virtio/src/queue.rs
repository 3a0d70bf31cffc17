//! Serving a split virtqueue (virtio 1.2 §2.7) with `virtio-queue`, and the one
//! descriptor-chain abstraction every device shares.
//!
//! - [`drain`] and [`fill`] pop available chains, hand each to the device as a parsed
//!   [`Chain`] (or the [`ChainError`] that made it unusable), put it in the used ring and
//!   decide whether to interrupt; [`pop`] takes one chain for devices with their own loop
//!   (virtio-net).
//! - [`Chain`] is one descriptor chain walked and checked once: its device-readable buffers,
//!   then its device-writable ones, as guest-physical `(address, length)` [`Segment`]s.
//! - [`ChainReader`] and [`ChainWriter`] copy bytes out of and into those buffers at a cursor;
//!   the writer records every byte it puts in guest memory in the [`DmaLog`].
//!
//! `virtio_queue::{Reader, Writer}` are not used: their iteration silently stops at a loop, a
//! bad `next` index or an over-long chain (so a truncated chain looks well formed), they skip
//! a device-readable buffer that follows a device-writable one instead of refusing the chain,
//! they fail the whole chain when one buffer is outside guest memory (virtio-blk must still
//! report `VIRTIO_BLK_S_IOERR` in the status byte) and they write through host pointers
//! without the guest-physical addresses the [`DmaLog`] needs.
//!
//! Nothing here panics on guest-controlled ring or descriptor contents, and the memory a
//! chain takes is bounded by the queue size.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::device::{DmaLog, GuestMem};

/// `VIRTQ_DESC_F_NEXT` (§2.7.5): the chain continues at `next`.
const F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: the buffer is device-writable.
const F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT` (§2.7.5.3): the buffer is a table of descriptors.
const F_INDIRECT: u16 = 4;
/// Size of one split-ring descriptor in bytes (§2.7.5).
const DESC_SIZE: u64 = 16;

/// Pops every available chain of `queue`, hands it to `serve` as `(head index, parsed chain
/// or why it is unusable)`; `serve` returns the number of bytes it wrote into the chain's
/// device-writable buffers (after recording them in the [`DmaLog`]), and the chain goes in the
/// used ring with that length. Re-checks after re-enabling notifications when
/// `VIRTIO_RING_F_EVENT_IDX` is on.
///
/// Returns whether the driver must be interrupted. A corrupt ring (avail index out of range,
/// rings outside guest memory) stops the walk: the error is logged (rate-limited) and what
/// was done so far is reported. Never panics on guest-controlled ring contents.
pub fn drain(queue: &mut Queue, mem: &GuestMem, mut serve: impl FnMut(u16, Result<Chain, ChainError>) -> u32) -> bool {
    walk(queue, mem, &mut (), |_| true, |_, h, c| Some(serve(h, c)), true)
}

/// Like [`drain`], for a device that may have to stop in the middle of the ring (virtio-blk's
/// `pause` error policy): `serve` returns `None` to leave the chain at `head` unserved. It is
/// then put back at the front of the available ring (the queue's `next_avail` goes back by
/// one), nothing goes in the used ring for it, the walk stops, and the chains after it stay
/// in the ring behind it; the next walk takes it first. Notifications are left as they are
/// (the device decides when to walk again).
///
/// Returns whether the driver must be interrupted (for the chains served before). Never
/// panics on guest-controlled ring contents.
pub fn drain_in_order(
    queue: &mut Queue,
    mem: &GuestMem,
    mut serve: impl FnMut(u16, Result<Chain, ChainError>) -> Option<u32>,
) -> bool {
    let mut kept = false;
    walk(
        queue,
        mem,
        &mut kept,
        |kept| !*kept,
        |kept, h, c| {
            let r = serve(h, c);
            *kept = r.is_none();
            r
        },
        true,
    )
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
/// `serve` gets `(state, head index, parsed chain)` and returns the bytes it wrote into the
/// chain's device-writable buffers; the chain then goes in the used ring. Returns whether the
/// driver must be interrupted. A corrupt ring stops the walk as in [`drain`]; never panics on
/// guest-controlled ring contents.
pub fn fill<S>(
    queue: &mut Queue,
    mem: &GuestMem,
    state: &mut S,
    has_work: impl FnMut(&mut S) -> bool,
    serve: impl FnMut(&mut S, u16, Result<Chain, ChainError>) -> u32,
) -> bool {
    let mut serve = serve;
    walk(queue, mem, state, has_work, |s, h, c| Some(serve(s, h, c)), false)
}

/// Takes the next available chain of `queue` and parses it (see [`Chain::parse`]): `Ok(None)`
/// when the driver has made none available, otherwise `(head index, parsed chain or why it is
/// unusable)`. The caller must put the head in the used ring.
///
/// Errors: the avail ring is corrupt (its index more than the queue size ahead of the device)
/// or outside guest memory.
#[allow(clippy::type_complexity)]
pub fn pop(queue: &mut Queue, mem: &GuestMem) -> Result<Option<(u16, Result<Chain, ChainError>)>, virtio_queue::Error> {
    let Some(head) = queue.iter(mem)?.next().map(|c| c.head_index()) else { return Ok(None) };
    Ok(Some((head, Chain::parse(mem, queue.desc_table(), queue.size(), head))))
}

/// The walk behind [`drain`], [`drain_in_order`] and [`fill`]. With `quiet`, driver
/// notifications are turned off while chains are served (they are re-armed before
/// returning, with event index). A chain `serve` leaves unserved (`None`) goes back to the
/// front of the available ring and ends the walk.
fn walk<S>(
    queue: &mut Queue,
    mem: &GuestMem,
    state: &mut S,
    mut has_work: impl FnMut(&mut S) -> bool,
    mut serve: impl FnMut(&mut S, u16, Result<Chain, ChainError>) -> Option<u32>,
    quiet: bool,
) -> bool {
    if !queue.ready() {
        return false;
    }
    let mut used_any = false;
    // Re-checks after re-enabling notifications that found nothing to pop: an avail ring
    // whose index is readable but whose entries are not must not make the walk spin.
    let mut idle_rechecks = 0u32;
    loop {
        if quiet && queue.event_idx_enabled() {
            if let Err(e) = queue.disable_notification(mem) {
                devices::guest_warn!("virtqueue: disable notification: {e}");
                return used_any;
            }
        }
        let mut progressed = false;
        while has_work(state) {
            let (head, chain) = match pop(queue, mem) {
                Ok(Some(popped)) => popped,
                Ok(None) => break,
                Err(e) => {
                    devices::guest_warn!("virtqueue: corrupt avail ring: {e}");
                    return finish(queue, mem, used_any);
                }
            };
            let Some(len) = serve(state, head, chain) else {
                // Popping moved next_avail by exactly one: give the chain back.
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                return finish(queue, mem, used_any);
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                devices::guest_warn!("virtqueue: add_used: {e}");
                return finish(queue, mem, used_any);
            }
            used_any = true;
            progressed = true;
        }
        if !queue.event_idx_enabled() || !has_work(state) {
            break;
        }
        match queue.enable_notification(mem) {
            Ok(true) if progressed || idle_rechecks == 0 => {
                idle_rechecks += u32::from(!progressed);
                continue;
            }
            Ok(_) => break,
            Err(e) => {
                devices::guest_warn!("virtqueue: enable notification: {e}");
                break;
            }
        }
    }
    finish(queue, mem, used_any)
}

/// Which side may write a buffer (virtio 1.2 §2.7.5: `VIRTQ_DESC_F_WRITE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device-readable: the driver filled it (no `VIRTQ_DESC_F_WRITE`).
    Readable,
    /// Device-writable: the device fills it (`VIRTQ_DESC_F_WRITE`).
    Writable,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Readable => "device-readable",
            Direction::Writable => "device-writable",
        })
    }
}

/// Why a descriptor chain is unusable, or why copying to or from its buffers failed: the one
/// chain error of every device. Memory access failures keep the `vm-memory` error as their
/// source.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A head or `next` index at or past the end of its descriptor table (§2.7.5.2).
    #[error("descriptor index {index} outside a table of {table_size}")]
    BadIndex {
        /// The index.
        index: u16,
        /// Entries in the table (the queue size, or the indirect table's length / 16).
        table_size: u16,
    },
    /// A descriptor table entry outside guest memory.
    #[error("descriptor at {gpa:#x} outside guest memory")]
    TableOutOfMemory {
        /// Guest-physical address of the entry.
        gpa: u64,
        /// The failed read.
        #[source]
        source: GuestMemoryError,
    },
    /// More descriptors than the queue size, or a loop (§2.7.5.2: a chain is at most the queue
    /// size long, indirect descriptors included).
    #[error("descriptor chain longer than {limit} (a loop?)")]
    TooLong {
        /// The queue size.
        limit: u16,
    },
    /// An indirect descriptor inside an indirect table, or one with `NEXT` set (§2.7.5.3.1).
    #[error("nested indirect table, or indirect descriptor with NEXT")]
    BadIndirect,
    /// An indirect table whose length in bytes is 0, not a multiple of 16 or above 65535
    /// entries (§2.7.5.3.1).
    #[error("indirect table of {0} bytes")]
    BadIndirectLen(u32),
    /// A device-readable buffer after a device-writable one (§2.7.4.2).
    #[error("device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
    /// A buffer of the other direction in a chain the device only reads or only writes.
    #[error("buffer of the wrong direction (only {expected} buffers allowed)")]
    WrongDirection {
        /// The direction every buffer must have.
        expected: Direction,
    },
    /// A buffer not entirely inside guest memory (or whose end overflows 64 bits).
    #[error("buffer {addr:#x}+{len} outside guest memory")]
    OutOfMemory {
        /// Guest-physical address of the buffer.
        addr: u64,
        /// Its length in bytes.
        len: u32,
    },
    /// The buffers hold more bytes than the device accepts for one request.
    #[error("{len} bytes of buffers, more than the {max} accepted")]
    TooBig {
        /// Bytes in the buffers.
        len: u64,
        /// Most bytes accepted.
        max: u64,
    },
    /// The buffers hold fewer bytes than the device needs (a short header, or no room).
    #[error("{len} bytes of buffers, fewer than the {min} needed")]
    TooSmall {
        /// Bytes available.
        len: u64,
        /// Bytes needed.
        min: u64,
    },
    /// Reading or writing guest memory failed.
    #[error("guest memory access at {gpa:#x}")]
    Memory {
        /// Guest-physical address of the access.
        gpa: u64,
        /// The failed access.
        #[source]
        source: GuestMemoryError,
    },
}

/// One buffer of a chain: `len` bytes at guest-physical address `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes (may be 0).
    pub len: u32,
}

/// One descriptor chain (virtio 1.2 §2.7.5), walked and checked once: its device-readable
/// buffers, then its device-writable ones, in chain order, with indirect tables (§2.7.5.3)
/// followed. Zero-length buffers are kept (they count for the direction checks) and ignored
/// by the copies. Buffers are *not* checked against guest memory when parsing (virtio-blk
/// must answer such a request with an error status); see [`Chain::check_memory`] and
/// [`Chain::validate`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    head: u16,
    segs: Vec<Segment>,
    /// `segs[..first_writable]` are device-readable, the rest device-writable.
    first_writable: usize,
}

impl Chain {
    /// Walks the chain starting at descriptor `head` of the descriptor table at guest-physical
    /// `table` holding `size` descriptors (the queue size), following at most one level of
    /// indirection.
    ///
    /// Errors: [`ChainError::BadIndex`], [`ChainError::TableOutOfMemory`],
    /// [`ChainError::TooLong`] (more than `size` buffers, or a loop),
    /// [`ChainError::BadIndirect`], [`ChainError::BadIndirectLen`],
    /// [`ChainError::ReadableAfterWritable`]. Allocates at most `size` segments.
    pub fn parse(mem: &GuestMem, table: u64, size: u16, head: u16) -> Result<Chain, ChainError> {
        let mut chain = Chain { head, segs: Vec::new(), first_writable: 0 };
        let (mut table, mut table_size, mut idx) = (table, size, head);
        let mut indirect = false;
        // Descriptors visited in the current table: more than its size means a loop.
        let mut visited: u32 = 0;
        let mut writable = false;
        loop {
            if idx >= table_size {
                return Err(ChainError::BadIndex { index: idx, table_size });
            }
            visited += 1;
            if visited > u32::from(table_size) {
                return Err(ChainError::TooLong { limit: size });
            }
            // No overflow in the product (u16 × 16); the sum is checked.
            let at = table.checked_add(u64::from(idx) * DESC_SIZE).ok_or(ChainError::TableOutOfMemory {
                gpa: table,
                source: GuestMemoryError::InvalidGuestAddress(GuestAddress(table)),
            })?;
            let d: Descriptor =
                mem.read_obj(GuestAddress(at)).map_err(|source| ChainError::TableOutOfMemory { gpa: at, source })?;
            let flags = d.flags();
            if flags & F_INDIRECT != 0 {
                if indirect || flags & F_NEXT != 0 {
                    return Err(ChainError::BadIndirect);
                }
                let len = d.len();
                let entries = match u16::try_from(u64::from(len) / DESC_SIZE) {
                    Ok(n) if n > 0 && u64::from(len) % DESC_SIZE == 0 => n,
                    _ => return Err(ChainError::BadIndirectLen(len)),
                };
                table = d.addr().0;
                table_size = entries;
                idx = 0;
                visited = 0;
                indirect = true;
                continue;
            }
            let w = flags & F_WRITE != 0;
            if w {
                writable = true;
            } else if writable {
                return Err(ChainError::ReadableAfterWritable);
            }
            if chain.segs.len() >= usize::from(size) {
                return Err(ChainError::TooLong { limit: size });
            }
            chain.segs.push(Segment { addr: d.addr().0, len: d.len() });
            if !w {
                chain.first_writable = chain.segs.len();
            }
            if flags & F_NEXT == 0 {
                return Ok(chain);
            }
            idx = d.next();
        }
    }

    /// The chain's head descriptor index (what goes in the used ring).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Number of buffers (descriptors other than indirect ones), zero-length ones included.
    pub fn descriptors(&self) -> usize {
        self.segs.len()
    }

    /// The buffers of `dir`, in chain order.
    pub fn segments(&self, dir: Direction) -> &[Segment] {
        match dir {
            // `first_writable` ≤ `segs.len()` by construction ([`Chain::parse`]).
            Direction::Readable => self.segs.get(..self.first_writable).unwrap_or_default(),
            Direction::Writable => self.segs.get(self.first_writable..).unwrap_or_default(),
        }
    }

    /// Total length in bytes of the buffers of `dir` (up to 2^16 × (2^32 − 1), so no
    /// overflow).
    pub fn len(&self, dir: Direction) -> u64 {
        self.segments(dir).iter().map(|s| u64::from(s.len)).sum()
    }

    /// Whether the chain holds no byte at all.
    pub fn is_empty(&self) -> bool {
        self.segs.iter().all(|s| s.len == 0)
    }

    /// Checks that every non-empty buffer of `dir` lies inside guest memory (and that its end
    /// does not overflow).
    ///
    /// Errors: [`ChainError::OutOfMemory`] naming the first buffer that does not.
    // Out of line: inlined into virtio-blk's `serve`, it made LLVM stop inlining vm-memory's
    // range iterator there (+4% instructions per 4 KiB read under callgrind).
    #[inline(never)]
    pub fn check_memory(&self, mem: &GuestMem, dir: Direction) -> Result<(), ChainError> {
        for s in self.segments(dir).iter().filter(|s| s.len > 0) {
            let ok =
                s.addr.checked_add(u64::from(s.len)).is_some() && mem.check_range(GuestAddress(s.addr), s.len as usize);
            if !ok {
                return Err(ChainError::OutOfMemory { addr: s.addr, len: s.len });
            }
        }
        Ok(())
    }

    /// For a device that only reads (`dir` = [`Direction::Readable`]) or only writes the
    /// chain: checks that every buffer has direction `dir` and lies inside guest memory, and
    /// returns their total length in bytes.
    ///
    /// Errors: [`ChainError::WrongDirection`], [`ChainError::OutOfMemory`].
    pub fn validate(&self, mem: &GuestMem, dir: Direction) -> Result<u64, ChainError> {
        let other = match dir {
            Direction::Readable => Direction::Writable,
            Direction::Writable => Direction::Readable,
        };
        if !self.segments(other).is_empty() {
            return Err(ChainError::WrongDirection { expected: dir });
        }
        self.check_memory(mem, dir)?;
        Ok(self.len(dir))
    }

    /// Guest-physical address of the last byte of the device-writable buffers (zero-length
    /// buffers skipped): where virtio-blk puts its status byte. `None` when there is no
    /// device-writable byte or the address overflows.
    pub fn last_writable_byte(&self) -> Option<u64> {
        let s = self.segments(Direction::Writable).iter().rev().find(|s| s.len > 0)?;
        s.addr.checked_add(u64::from(s.len) - 1)
    }

    /// A cursor reading the device-readable buffers from their first byte.
    pub fn reader<'c>(&'c self, mem: &'c GuestMem) -> ChainReader<'c> {
        ChainReader { mem, cur: Cursor::new(self.segments(Direction::Readable)) }
    }

    /// A cursor writing the device-writable buffers from their first byte, recording every
    /// write in `dma`.
    pub fn writer<'c>(&'c self, mem: &'c GuestMem, dma: &'c DmaLog) -> ChainWriter<'c> {
        ChainWriter { mem, dma, cur: Cursor::new(self.segments(Direction::Writable)), written: 0 }
    }
}

/// A position in a list of segments, with an optional byte limit.
#[derive(Debug, Clone)]
struct Cursor<'c> {
    segs: &'c [Segment],
    idx: usize,
    off: u32,
    /// Bytes left before the limit.
    left: u64,
}

impl<'c> Cursor<'c> {
    fn new(segs: &'c [Segment]) -> Self {
        let left = segs.iter().map(|s| u64::from(s.len)).sum();
        Cursor { segs, idx: 0, off: 0, left }
    }

    /// The next piece `(gpa, len)` of at most `max` bytes (> 0), or `None` at the end.
    /// Does not advance; see [`Cursor::advance`].
    fn peek(&mut self, max: usize) -> Option<Result<(u64, usize), ChainError>> {
        if self.left == 0 || max == 0 {
            return None;
        }
        while let Some(s) = self.segs.get(self.idx) {
            if self.off < s.len {
                // ≤ u32::MAX before the `min(max)`, so the conversion only fails on 16-bit
                // targets, where `max` is the smaller anyway.
                let n = u64::from(s.len - self.off).min(self.left);
                let n = usize::try_from(n).map_or(max, |n| n.min(max));
                return Some(match s.addr.checked_add(u64::from(self.off)) {
                    Some(gpa) => Ok((gpa, n)),
                    None => Err(ChainError::OutOfMemory { addr: s.addr, len: s.len }),
                });
            }
            self.idx += 1;
            self.off = 0;
        }
        None
    }

    /// Moves past `n` bytes of the piece [`Cursor::peek`] returned.
    fn advance(&mut self, n: usize) {
        // n ≤ the piece's length ≤ s.len - off (a u32) and ≤ left, so neither saturates.
        self.off = self.off.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        self.left -= n as u64;
    }
}

/// Reads a chain's device-readable buffers in order ([`Chain::reader`]).
#[derive(Debug, Clone)]
pub struct ChainReader<'c> {
    mem: &'c GuestMem,
    cur: Cursor<'c>,
}

impl ChainReader<'_> {
    /// Bytes left to read, in bytes.
    pub fn remaining(&self) -> u64 {
        self.cur.left
    }

    /// Reads up to `buf.len()` bytes; returns how many (fewer only at the end).
    ///
    /// Errors: [`ChainError::Memory`] or [`ChainError::OutOfMemory`] when guest memory could
    /// not be read (the bytes before it were read and the cursor stays on the failed piece).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChainError> {
        let total = buf.len();
        let mut rest = buf;
        while let Some(piece) = self.cur.peek(rest.len()) {
            let (gpa, n) = piece?;
            // `peek(max)` returns at most `max` bytes: the split always succeeds.
            let Some((dst, tail)) = std::mem::take(&mut rest).split_at_mut_checked(n) else { break };
            self.mem.read_slice(dst, GuestAddress(gpa)).map_err(|source| ChainError::Memory { gpa, source })?;
            self.cur.advance(n);
            rest = tail;
        }
        Ok(total - rest.len())
    }

    /// Reads exactly `buf.len()` bytes.
    ///
    /// Errors: [`ChainError::TooSmall`] when fewer remain (nothing is read), and those of
    /// [`ChainReader::read`].
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ChainError> {
        if (buf.len() as u64) > self.remaining() {
            return Err(ChainError::TooSmall { len: self.remaining(), min: buf.len() as u64 });
        }
        self.read(buf).map(|_| ())
    }
}

/// Writes a chain's device-writable buffers in order, recording each write in the
/// [`DmaLog`] ([`Chain::writer`]).
pub struct ChainWriter<'c> {
    mem: &'c GuestMem,
    dma: &'c DmaLog,
    cur: Cursor<'c>,
    written: u64,
}

impl std::fmt::Debug for ChainWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainWriter").field("cur", &self.cur).field("written", &self.written).finish()
    }
}

impl ChainWriter<'_> {
    /// Room left, in bytes.
    pub fn remaining(&self) -> u64 {
        self.cur.left
    }

    /// Bytes written so far (what goes in the used ring's `len`).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Caps the room left at `max` bytes (e.g. to keep virtio-blk's status byte out of the
    /// data).
    pub fn limit(&mut self, max: u64) {
        self.cur.left = self.cur.left.min(max);
    }

    /// Writes up to `data.len()` bytes (fewer when the room runs out); returns how many. Each
    /// write is recorded in the [`DmaLog`] once it is done.
    ///
    /// Errors: [`ChainError::Memory`] or [`ChainError::OutOfMemory`] when guest memory could
    /// not be written (the bytes before it were written, recorded and counted in
    /// [`ChainWriter::written`]).
    pub fn write(&mut self, data: &[u8]) -> Result<usize, ChainError> {
        let mut rest = data;
        while let Some(piece) = self.cur.peek(rest.len()) {
            let (gpa, n) = piece?;
            // `peek(max)` returns at most `max` bytes: the split always succeeds.
            let Some((src, tail)) = rest.split_at_checked(n) else { break };
            self.mem.write_slice(src, GuestAddress(gpa)).map_err(|source| ChainError::Memory { gpa, source })?;
            self.dma.record(gpa, n as u64);
            self.cur.advance(n);
            self.written += n as u64;
            rest = tail;
        }
        Ok(data.len() - rest.len())
    }

    /// Writes all of `data`.
    ///
    /// Errors: [`ChainError::TooSmall`] when the room left is smaller (nothing is written),
    /// and those of [`ChainWriter::write`].
    pub fn write_all(&mut self, data: &[u8]) -> Result<(), ChainError> {
        if (data.len() as u64) > self.remaining() {
            return Err(ChainError::TooSmall { len: self.remaining(), min: data.len() as u64 });
        }
        self.write(data).map(|_| ())
    }
}

#[cfg(test)]
// Test fixtures: byte patterns wrap on purpose; sizes and indices are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::error::Error as _;

    use virtio_queue::{Queue, QueueT};

    use super::*;
    use crate::testing::{TestQueue, DATA, DESC, F_INDIRECT, F_NEXT, F_WRITE};

    const SIZE: u16 = 8;
    const MEM: usize = 1 << 20;

    fn parse(tq: &TestQueue, head: u16) -> Result<Chain, ChainError> {
        Chain::parse(&tq.mem, DESC, tq.size, head)
    }

    /// Writes `descs` as an indirect table at `table`.
    fn table(tq: &TestQueue, table: u64, descs: &[(u64, u32, u16, u16)]) {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let mut d = addr.to_le_bytes().to_vec();
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            tq.write(table + 16 * i as u64, &d);
        }
    }

    #[test]
    fn parses_directions_lengths_and_indirect_tables() {
        let tq = TestQueue::new(SIZE, MEM);
        tq.set_desc(2, DATA, 5, F_NEXT, 3);
        tq.set_desc(3, DATA + 0x100, 0, F_NEXT, 4);
        tq.set_desc(4, DATA + 0x200, 7, F_NEXT | F_WRITE, 5);
        tq.set_desc(5, DATA + 0x300, 9, F_WRITE, 0);
        let c = parse(&tq, 2).unwrap();
        assert_eq!((c.head(), c.descriptors()), (2, 4));
        assert_eq!(
            c.segments(Direction::Readable),
            [Segment { addr: DATA, len: 5 }, Segment { addr: DATA + 0x100, len: 0 }]
        );
        assert_eq!((c.len(Direction::Readable), c.len(Direction::Writable)), (5, 16));
        assert_eq!(c.last_writable_byte(), Some(DATA + 0x300 + 8));
        assert!(!c.is_empty());
        // The same buffers behind an indirect descriptor (in the middle of nothing: head).
        let t = DATA + 0x8000;
        table(&tq, t, &[(DATA, 5, F_NEXT, 1), (DATA + 0x200, 7, F_NEXT | F_WRITE, 2), (DATA + 0x300, 9, F_WRITE, 0)]);
        tq.set_desc(0, t, 48, F_INDIRECT, 0);
        let c = parse(&tq, 0).unwrap();
        assert_eq!((c.head(), c.descriptors(), c.len(Direction::Writable)), (0, 3, 16));
    }

    #[test]
    fn hostile_chains_are_refused() {
        let tq = TestQueue::new(SIZE, MEM);
        let t = DATA + 0x8000;
        // Head and next indices out of range.
        assert!(matches!(parse(&tq, SIZE), Err(ChainError::BadIndex { index: SIZE, table_size: SIZE })));
        tq.set_desc(0, DATA, 4, F_NEXT, u16::MAX);
        assert!(matches!(parse(&tq, 0), Err(ChainError::BadIndex { index: u16::MAX, .. })));
        // A self-loop and a loop back to the second descriptor.
        tq.set_desc(0, DATA, 4, F_NEXT, 0);
        assert!(matches!(parse(&tq, 0), Err(ChainError::TooLong { limit: SIZE })));
        tq.set_desc(0, DATA, 4, F_NEXT, 1);
        tq.set_desc(1, DATA, 4, F_NEXT, 2);
        tq.set_desc(2, DATA, 4, F_NEXT, 1);
        assert!(matches!(parse(&tq, 0), Err(ChainError::TooLong { .. })));
        // Readable after writable.
        tq.set_desc(0, DATA, 4, F_NEXT | F_WRITE, 1);
        tq.set_desc(1, DATA, 4, 0, 0);
        assert!(matches!(parse(&tq, 0), Err(ChainError::ReadableAfterWritable)));
        // Indirect: with NEXT, nested, bad lengths, outside memory, longer than the queue.
        tq.set_desc(0, t, 16, F_INDIRECT | F_NEXT, 1);
        assert!(matches!(parse(&tq, 0), Err(ChainError::BadIndirect)));
        table(&tq, t, &[(t, 16, F_INDIRECT, 0)]);
        tq.set_desc(0, t, 16, F_INDIRECT, 0);
        assert!(matches!(parse(&tq, 0), Err(ChainError::BadIndirect)));
        for len in [0, 24, !15] {
            tq.set_desc(0, t, len, F_INDIRECT, 0);
            assert!(matches!(parse(&tq, 0), Err(ChainError::BadIndirectLen(l)) if l == len), "{len}");
        }
        tq.set_desc(0, 1 << 40, 16, F_INDIRECT, 0);
        let e = parse(&tq, 0).unwrap_err();
        assert!(matches!(e, ChainError::TableOutOfMemory { gpa: 0x100_0000_0000, .. }), "{e:?}");
        assert!(e.source().is_some(), "the vm-memory error is kept");
        tq.set_desc(0, u64::MAX - 15, 32, F_INDIRECT, 0);
        assert!(matches!(parse(&tq, 0), Err(ChainError::TableOutOfMemory { .. })));
        let long: Vec<_> = (0..=SIZE).map(|i| (DATA, 1, if i < SIZE { F_NEXT } else { 0 }, i + 1)).collect();
        table(&tq, t, &long);
        tq.set_desc(0, t, 16 * (u32::from(SIZE) + 1), F_INDIRECT, 0);
        assert!(matches!(parse(&tq, 0), Err(ChainError::TooLong { limit: SIZE })));
        // Exactly the queue size is fine.
        let exact: Vec<_> = (0..SIZE).map(|i| (DATA, 1, if i + 1 < SIZE { F_NEXT } else { 0 }, i + 1)).collect();
        table(&tq, t, &exact);
        tq.set_desc(0, t, 16 * u32::from(SIZE), F_INDIRECT, 0);
        assert_eq!(parse(&tq, 0).unwrap().descriptors(), usize::from(SIZE));
    }

    #[test]
    fn validate_checks_direction_and_memory() {
        let tq = TestQueue::new(SIZE, MEM);
        let check = |bufs: &[(u64, u32, u16)], dir| {
            for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
                let next = if i + 1 < bufs.len() { F_NEXT } else { 0 };
                tq.set_desc(i as u16, addr, len, flags | next, i as u16 + 1);
            }
            parse(&tq, 0).unwrap().validate(&tq.mem, dir)
        };
        assert_eq!(check(&[(DATA, 4, 0), (DATA, 0, 0), (DATA, 6, 0)], Direction::Readable).unwrap(), 10);
        assert_eq!(check(&[(DATA, 4, F_WRITE)], Direction::Writable).unwrap(), 4);
        // A zero-length buffer of the wrong direction still counts.
        assert!(matches!(
            check(&[(DATA, 4, 0), (DATA, 0, F_WRITE)], Direction::Readable),
            Err(ChainError::WrongDirection { expected: Direction::Readable })
        ));
        assert!(matches!(check(&[(DATA, 4, 0)], Direction::Writable), Err(ChainError::WrongDirection { .. })));
        for (addr, len) in [(1u64 << 40, 4u32), (u64::MAX - 2, 4), (MEM as u64 - 2, 4), (DATA, u32::MAX)] {
            assert!(
                matches!(check(&[(addr, len, 0)], Direction::Readable), Err(ChainError::OutOfMemory { addr: a, len: l }) if a == addr && l == len),
                "{addr:#x}+{len}"
            );
        }
        // Zero-length buffers are not checked against memory.
        assert_eq!(check(&[(u64::MAX, 0, 0)], Direction::Readable).unwrap(), 0);
    }

    #[test]
    fn reader_and_writer_walk_segments() {
        let tq = TestQueue::new(SIZE, MEM);
        tq.write(DATA, b"abc");
        tq.write(DATA + 0x100, b"defgh");
        tq.set_desc(0, DATA, 3, F_NEXT, 1);
        tq.set_desc(1, DATA + 0x80, 0, F_NEXT, 2);
        tq.set_desc(2, DATA + 0x100, 5, F_NEXT, 3);
        tq.set_desc(3, DATA + 0x1000, 2, F_NEXT | F_WRITE, 4);
        tq.set_desc(4, DATA + 0x2000, 0, F_NEXT | F_WRITE, 5);
        tq.set_desc(5, DATA + 0x3000, 4, F_WRITE, 0);
        let c = parse(&tq, 0).unwrap();
        let mut r = c.reader(&tq.mem);
        let mut b = [0u8; 4];
        r.read_exact(&mut b).unwrap();
        assert_eq!((&b, r.remaining()), (b"abcd", 4));
        assert!(matches!(r.read_exact(&mut [0; 5]), Err(ChainError::TooSmall { len: 4, min: 5 })));
        assert_eq!(r.read(&mut [0; 16]).unwrap(), 4);
        assert_eq!(r.read(&mut [0; 16]).unwrap(), 0);

        let dma = DmaLog::default();
        let mut w = c.writer(&tq.mem, &dma);
        w.limit(5);
        assert!(matches!(w.write_all(b"123456"), Err(ChainError::TooSmall { len: 5, min: 6 })));
        assert_eq!(w.written(), 0, "write_all writes nothing when it cannot write all");
        assert_eq!(w.write(b"1234567").unwrap(), 5);
        assert_eq!((w.written(), w.remaining()), (5, 0));
        assert_eq!(tq.read(DATA + 0x1000, 2), b"12");
        assert_eq!(tq.read(DATA + 0x3000, 4), b"345\0");
        assert_eq!(dma.take(), vec![(DATA + 0x1000, 2), (DATA + 0x3000, 3)], "every write is in the DMA log");
    }

    #[test]
    fn writer_stops_at_memory_errors_and_keeps_what_it_wrote() {
        let tq = TestQueue::new(SIZE, MEM);
        tq.set_desc(0, DATA, 4, F_NEXT | F_WRITE, 1);
        tq.set_desc(1, 1 << 40, 4, F_NEXT | F_WRITE, 2);
        tq.set_desc(2, u64::MAX, 4, F_WRITE, 0);
        let c = parse(&tq, 0).unwrap();
        let dma = DmaLog::default();
        let mut w = c.writer(&tq.mem, &dma);
        let e = w.write(b"abcdefgh").unwrap_err();
        assert!(matches!(e, ChainError::Memory { gpa: 0x100_0000_0000, .. }), "{e:?}");
        assert!(e.source().is_some(), "the vm-memory error is kept");
        assert_eq!((w.written(), dma.take()), (4, vec![(DATA, 4)]));
        assert_eq!(tq.read(DATA, 4), b"abcd");
        // Reading from a wrapping address fails too.
        tq.set_desc(3, u64::MAX, 4, 0, 0);
        let c = parse(&tq, 3).unwrap();
        assert!(matches!(
            c.reader(&tq.mem).read(&mut [0; 4]),
            Err(ChainError::Memory { .. } | ChainError::OutOfMemory { .. })
        ));
    }

    /// An avail ring whose index is readable but whose entries are not: the walk re-checks
    /// once after re-enabling notifications and then stops instead of spinning.
    #[test]
    fn walk_does_not_spin_on_unreadable_avail_entries() {
        let tq = TestQueue::new(SIZE, MEM);
        let avail = MEM as u64 - 4; // flags and idx in memory, ring[0] past the end
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(crate::testing::USED as u32), Some(0));
        q.set_ready(true);
        q.set_event_idx(true);
        tq.mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mem = tq.mem.clone();
        std::thread::spawn(move || {
            let mut served = 0;
            let notify = drain(&mut q, &mem, |_, _| {
                served += 1;
                0
            });
            let _ = tx.send((notify, served));
        });
        let (notify, served) = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("drain returned");
        assert_eq!((notify, served), (false, 0));
    }
}
