//! The one test-queue helper of every device test (compiled for tests only): split
//! virtqueues (virtio 1.2 §2.7) laid out by hand in a small guest memory, so tests can write
//! any descriptor table (hostile ones included), publish any head or avail index and read the
//! used ring back.
//!
//! `virtio_queue::mock::MockSplitQueue` is not used: it borrows its guest memory for its whole
//! life, while the device rigs own the memory alongside the queue, and it builds well-formed
//! chains where these tests need raw descriptor writes.

// Test fixtures: byte patterns wrap on purpose; sizes and indices are small constants.
#![allow(clippy::cast_possible_truncation)]

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::device::GuestMem;

/// Descriptor flags (virtio 1.2 §2.7.5).
pub const F_NEXT: u16 = 1;
/// Device-writable buffer.
pub const F_WRITE: u16 = 2;
/// Buffer holds an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// GPA of the descriptor table, available ring and used ring of [`TestQueue::new`]'s queue.
pub const DESC: u64 = 0x1000;
/// Available ring GPA.
pub const AVAIL: u64 = 0x3000;
/// Used ring GPA.
pub const USED: u64 = 0x4000;
/// First GPA free for buffers.
pub const DATA: u64 = 0x10000;

/// A split virtqueue of `size` entries in guest memory, with the driver's view of its
/// available index.
pub struct TestQueue {
    /// Guest memory.
    pub mem: GuestMem,
    /// Queue size.
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
}

impl TestQueue {
    /// New memory of `mem_size` bytes (≥ 128 KiB) with an empty queue of `size` entries at
    /// [`DESC`], [`AVAIL`] and [`USED`].
    pub fn new(size: u16, mem_size: usize) -> TestQueue {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).expect("test memory");
        TestQueue { mem, size, desc: DESC, avail: AVAIL, used: USED, avail_idx: 0 }
    }

    /// Another empty queue of `size` (≤ 256) entries in `mem`: descriptors at `base`, avail
    /// ring at `base + 0x1000`, used ring at `base + 0x1800` (0x3000 bytes in all). Use a
    /// `base` of 0x5000 or above next to a [`TestQueue::new`] queue.
    pub fn at(mem: &GuestMem, size: u16, base: u64) -> TestQueue {
        TestQueue { mem: mem.clone(), size, desc: base, avail: base + 0x1000, used: base + 0x1800, avail_idx: 0 }
    }

    /// A `virtio_queue::Queue` configured for this layout (ready).
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index`: buffer `addr`/`len`, `flags`, `next`.
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = self.desc + u64::from(index) * 16;
        self.mem.write_obj(addr, GuestAddress(a)).unwrap();
        self.mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    }

    /// Writes a chain of `(addr, len, writable)` buffers at descriptors `first..` and makes it
    /// available; returns its head index.
    pub fn add_chain(&mut self, first: u16, bufs: &[(u64, u32, bool)]) -> u16 {
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let idx = first + i as u16;
            let last = i + 1 == bufs.len();
            let flags = if last { 0 } else { F_NEXT } | if w { F_WRITE } else { 0 };
            self.set_desc(idx, addr, len, flags, if last { 0 } else { idx + 1 });
        }
        self.publish(first);
        first
    }

    /// Puts descriptor `head` in the available ring and bumps the available index.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + u64::from(self.avail_idx % self.size) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Sets the available index directly (e.g. to a corrupt value, then back).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// The available index the driver last published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used ring element `i`: (descriptor head, bytes written).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let a = self.used + 4 + u64::from(i % self.size) * 8;
        (self.mem.read_obj(GuestAddress(a)).unwrap(), self.mem.read_obj(GuestAddress(a + 4)).unwrap())
    }

    /// Reads `len` bytes of guest memory at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    /// Writes `data` to guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(gpa)).unwrap();
    }
}
