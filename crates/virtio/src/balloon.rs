//! virtio-balloon, the traditional memory balloon (virtio 1.2 §5.5): the host asks the guest
//! to give back memory by raising `num_pages` in the configuration space; the guest's driver
//! allocates that many 4 KiB pages and hands their page frame numbers (PFNs) to the device
//! through the inflate queue, and the device discards them from the host mapping of guest RAM
//! (`madvise(MADV_DONTNEED)`; `MADV_REMOVE` for shared or file-backed memory), so the VMM's
//! RSS falls. Lowering `num_pages` makes the driver deflate: the PFNs come back through the
//! deflate queue and the pages simply fault in again (zero-filled) when the guest touches them,
//! since `VIRTIO_BALLOON_F_MUST_TELL_HOST` is not offered.
//!
//! Queues, in order: inflateq, deflateq, then statsq when statistics are on
//! (`VIRTIO_BALLOON_F_STATS_VQ`), then reporting_vq when free page reporting is on
//! (`VIRTIO_BALLOON_F_PAGE_REPORTING`). Like Linux and QEMU, the queues the driver uses are
//! packed: a driver that does not accept the statistics feature has its reporting queue at
//! index 2, which the device follows from the accepted features.
//!
//! - **Statistics** (§5.5.6.3): the driver makes one buffer of `(le16 tag, le64 value)` pairs
//!   available at start; the device keeps the values with the time they arrived and holds the
//!   buffer. Every `stats_interval` it gives the buffer back (used, length 0), which asks the
//!   driver for fresh values in a new buffer.
//! - **Free page reporting** (§5.5.6.4): the driver reports ranges of free guest memory
//!   (2 MiB blocks for Linux); the device discards them and gives the buffers back.
//! - `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` may be offered, so that the guest takes pages back from
//!   the balloon rather than run out of memory.
//!
//! The guest is hostile: a malformed chain, a device-writable buffer in an inflate or deflate
//! request, a length that is not a whole number of PFNs or more than [`MAX_PFNS`] PFNs fail
//! that request (counted); PFNs outside guest RAM are ignored with a rate-limited warning.
//! The device holds at most one statistics buffer and reads at most [`MAX_STATS`] entries
//! from it, so nothing the guest sends makes it allocate without bound.
//!
//! Discarded memory reads as zeros afterwards: the device records it in the [`DmaLog`] like
//! any device write, so the `emu` accelerator retires code it had decoded from those pages.
//! Hugetlbfs-backed memory is only discarded in whole huge pages (a reported 2 MiB block); a
//! 4 KiB balloon page there stays allocated on the host.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{ActivateContext, ActivateError, Counters, DmaLog, GuestMem, Interrupt, VirtioDevice};
use crate::queue::{self, Chain, ChainError, Direction};
use crate::worker::{Completion, EpollCtl, Handler, Worker, FIRST_DEVICE_TOKEN};
use crate::{TYPE_BALLOON, VIRTIO_F_VERSION_1};

/// `VIRTIO_BALLOON_F_MUST_TELL_HOST` (not offered: deflated pages need no host action).
pub const F_MUST_TELL_HOST: u64 = 1 << 0;
/// `VIRTIO_BALLOON_F_STATS_VQ`: the statistics queue is present.
pub const F_STATS_VQ: u64 = 1 << 1;
/// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: the guest deflates when it runs out of memory.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// `VIRTIO_BALLOON_F_FREE_PAGE_HINT` (not offered).
pub const F_FREE_PAGE_HINT: u64 = 1 << 3;
/// `VIRTIO_BALLOON_F_PAGE_POISON` (not offered).
pub const F_PAGE_POISON: u64 = 1 << 4;
/// `VIRTIO_BALLOON_F_PAGE_REPORTING`: the free page reporting queue is present.
pub const F_PAGE_REPORTING: u64 = 1 << 5;

/// The balloon's page size: PFNs count 4 KiB pages whatever the guest's page size (§5.5.6).
pub const PAGE_SIZE: u64 = 4096;
const PAGE_BYTES: usize = 4096;
const PAGE_SHIFT: u32 = 12;
/// Most PFNs one inflate or deflate request may carry (Linux sends at most 256).
pub const MAX_PFNS: u64 = 1 << 16;
/// Most statistics entries read from one buffer (§5.5.6.3 defines 10 tags).
pub const MAX_STATS: usize = 64;
/// Bytes of one statistics entry: `le16 tag`, `le64 val`, packed.
const STAT_BYTES: usize = 10;
const QUEUE_SIZE: u16 = 256;
/// PFNs read and discarded at a time.
const PFN_BATCH: usize = 256;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const TIMER_TOKEN: u64 = FIRST_DEVICE_TOKEN;

/// What the balloon offers (from the VM configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonOptions {
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// How often to ask the driver for fresh statistics; `None`: no statistics queue.
    pub stats_interval: Option<Duration>,
    /// Offer free page reporting (`VIRTIO_BALLOON_F_PAGE_REPORTING`).
    pub free_page_reporting: bool,
}

impl Default for BalloonOptions {
    fn default() -> Self {
        BalloonOptions {
            deflate_on_oom: true,
            stats_interval: Some(Duration::from_secs(5)),
            free_page_reporting: false,
        }
    }
}

/// The guest's memory statistics (§5.5.6.3), each `None` until the driver reports it. Sizes
/// are in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// `VIRTIO_BALLOON_S_SWAP_IN` (tag 0): memory swapped in.
    pub swap_in: Option<u64>,
    /// `VIRTIO_BALLOON_S_SWAP_OUT` (1): memory swapped out.
    pub swap_out: Option<u64>,
    /// `VIRTIO_BALLOON_S_MAJFLT` (2): major page faults.
    pub major_faults: Option<u64>,
    /// `VIRTIO_BALLOON_S_MINFLT` (3): minor page faults.
    pub minor_faults: Option<u64>,
    /// `VIRTIO_BALLOON_S_MEMFREE` (4): memory not used at all.
    pub free_memory: Option<u64>,
    /// `VIRTIO_BALLOON_S_MEMTOT` (5): memory the guest can use (the balloon excluded).
    pub total_memory: Option<u64>,
    /// `VIRTIO_BALLOON_S_AVAIL` (6): memory available for new work without swapping.
    pub available_memory: Option<u64>,
    /// `VIRTIO_BALLOON_S_CACHES` (7): disk caches that can be dropped.
    pub disk_caches: Option<u64>,
    /// `VIRTIO_BALLOON_S_HTLB_PGALLOC` (8): successful hugetlb page allocations.
    pub hugetlb_allocations: Option<u64>,
    /// `VIRTIO_BALLOON_S_HTLB_PGFAIL` (9): failed hugetlb page allocations.
    pub hugetlb_failures: Option<u64>,
}

impl BalloonStats {
    /// Records `val` for `tag`; unknown tags are ignored (§5.5.6.3.1: the device MUST ignore
    /// them).
    fn set(&mut self, tag: u16, val: u64) {
        let slot = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            _ => return,
        };
        *slot = Some(val);
    }
}

/// The balloon's state in a snapshot: the host's target and the guest's last account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonState {
    /// `num_pages`: 4 KiB pages the host asks the guest to give back.
    pub target_pages: u32,
    /// `actual`: 4 KiB pages the guest says are in the balloon.
    pub actual_pages: u32,
}

/// What the device and its [`BalloonHandle`]s share.
#[derive(Default)]
struct Shared {
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    stats: Mutex<Option<(BalloonStats, Instant)>>,
    /// The device's interrupts while it is active (for configuration changes).
    interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
    /// 4 KiB pages discarded by inflation, since the VMM started.
    inflated_pages: AtomicU64,
    /// 4 KiB pages given back by deflation, since the VMM started.
    deflated_pages: AtomicU64,
    /// Bytes of free memory reported by the guest, since the VMM started.
    reported_bytes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The host side's handle on a balloon: set the target, read what the guest reports. Cheap to
/// clone; usable from any thread.
#[derive(Clone)]
pub struct BalloonHandle(Arc<Shared>);

impl std::fmt::Debug for BalloonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonHandle").field("state", &self.state()).finish()
    }
}

impl BalloonHandle {
    /// Asks the guest to hold `pages` 4 KiB pages in its balloon (`num_pages`), and tells an
    /// active driver that the configuration changed.
    pub fn set_target_pages(&self, pages: u32) {
        self.0.target_pages.store(pages, Ordering::SeqCst);
        let irq = lock(&self.0.interrupt).clone();
        if let Some(irq) = irq {
            irq.notify_config();
        }
    }

    /// The host's target, in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.0.target_pages.load(Ordering::SeqCst)
    }

    /// The pages the guest says are in the balloon (`actual`), in 4 KiB pages.
    pub fn actual_pages(&self) -> u32 {
        self.0.actual_pages.load(Ordering::SeqCst)
    }

    /// The guest's last statistics and how long ago they arrived; `None` before the first.
    pub fn stats(&self) -> Option<(BalloonStats, Duration)> {
        lock(&self.0.stats).as_ref().map(|(s, at)| (*s, at.elapsed()))
    }

    /// 4 KiB pages discarded by inflation since the VMM started.
    pub fn inflated_pages(&self) -> u64 {
        self.0.inflated_pages.load(Ordering::Relaxed)
    }

    /// 4 KiB pages returned by deflation since the VMM started.
    pub fn deflated_pages(&self) -> u64 {
        self.0.deflated_pages.load(Ordering::Relaxed)
    }

    /// Bytes of free memory the guest reported (and the device discarded) since the VMM
    /// started.
    pub fn reported_bytes(&self) -> u64 {
        self.0.reported_bytes.load(Ordering::Relaxed)
    }

    /// The state a snapshot keeps.
    pub fn state(&self) -> BalloonState {
        BalloonState { target_pages: self.target_pages(), actual_pages: self.actual_pages() }
    }

    /// Loads a snapshot's state into a balloon that is not active yet (no notification).
    pub fn restore_state(&self, s: &BalloonState) {
        self.0.target_pages.store(s.target_pages, Ordering::SeqCst);
        self.0.actual_pages.store(s.actual_pages, Ordering::SeqCst);
    }
}

/// The balloon device.
pub struct Balloon {
    opts: BalloonOptions,
    shared: Arc<Shared>,
    counters: Arc<Counters>,
    worker: Worker<BalloonQueues>,
}

impl Balloon {
    /// A new, inactive balloon with a target of 0.
    pub fn new(opts: BalloonOptions) -> Balloon {
        Balloon { opts, shared: Arc::default(), counters: Arc::default(), worker: Worker::new("virtio-balloon") }
    }

    /// A handle for the host side (the API).
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle(self.shared.clone())
    }

    fn config_bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        let (t, a) = b.split_at_mut(4);
        t.copy_from_slice(&self.shared.target_pages.load(Ordering::SeqCst).to_le_bytes());
        a.copy_from_slice(&self.shared.actual_pages.load(Ordering::SeqCst).to_le_bytes());
        b
    }
}

/// How a host mapping of guest RAM is given back to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    /// Private anonymous memory: `MADV_DONTNEED`.
    Private,
    /// Shared or file-backed memory: `MADV_REMOVE` punches the hole in the backing.
    Shared,
    /// Hugetlbfs pages of this many bytes: only whole, aligned huge pages are discarded.
    Huge(u64),
    /// Hugetlbfs of unknown page size: nothing is discarded.
    Unknown,
}

fn backing(r: &vm_memory::GuestRegionMmap) -> Backing {
    let flags = r.flags();
    if flags & libc::MAP_HUGETLB != 0 || r.is_hugetlbfs() == Some(true) {
        let shift = (flags >> libc::MAP_HUGE_SHIFT) & libc::MAP_HUGE_MASK;
        return match u32::try_from(shift) {
            Ok(s) if (12..40).contains(&s) => Backing::Huge(1 << s),
            _ => Backing::Unknown,
        };
    }
    if flags & libc::MAP_SHARED != 0 || r.file_offset().is_some() {
        Backing::Shared
    } else {
        Backing::Private
    }
}

/// Gives `len` bytes of guest RAM at `gpa` back to the host (they read as zeros afterwards)
/// and records what was discarded in `dma`. Parts outside guest RAM are skipped; on hugetlbfs
/// only the whole huge pages inside the range are discarded. Returns the bytes discarded.
pub fn discard(mem: &GuestMem, gpa: u64, len: u64, dma: &DmaLog) -> u64 {
    let end = gpa.saturating_add(len);
    let mut at = gpa;
    let mut done = 0;
    while at < end {
        let Some(region) = mem.find_region(GuestAddress(at)) else { break };
        let start = region.start_addr().0;
        // `find_region` returned the region holding `at`: start ≤ at < start + len.
        let off = at - start;
        let n = (region.len() - off).min(end - at);
        let (lo, hi) = match backing(region) {
            Backing::Private | Backing::Shared => (off, off + n),
            Backing::Huge(h) => (off.next_multiple_of(h), (off + n) / h * h),
            Backing::Unknown => (0, 0),
        };
        if hi > lo {
            let advice = if backing(region) == Backing::Shared { libc::MADV_REMOVE } else { libc::MADV_DONTNEED };
            match (region.get_host_address(MemoryRegionAddress(lo)), usize::try_from(hi - lo)) {
                (Ok(host), Ok(bytes)) => {
                    // SAFETY: `host..host + bytes` lies inside this region's mapping (lo < hi ≤
                    // the region's length). Discarding only replaces the pages' contents with
                    // zeros (or a hole in the backing file): the mapping stays valid, and guest
                    // memory is only ever accessed through raw pointers and volatile slices,
                    // never Rust references that could observe the change.
                    let rc = unsafe { libc::madvise(host.cast(), bytes, advice) };
                    if rc == 0 {
                        dma.record(start + lo, hi - lo);
                        done += hi - lo;
                    } else {
                        tracing::warn!(
                            "virtio-balloon: madvise of {:#x}+{:#x}: {}",
                            start + lo,
                            hi - lo,
                            std::io::Error::last_os_error()
                        );
                    }
                }
                _ => tracing::warn!("virtio-balloon: no host mapping for {:#x}", start + lo),
            }
        }
        at += n;
    }
    done
}

/// Which queue serves what in one activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Roles {
    stats: Option<usize>,
    report: Option<usize>,
}

impl Roles {
    /// Queues are packed by the features the driver accepted among those offered.
    fn of(acked: u64, offered: u64) -> Roles {
        let on = |f: u64| acked & offered & f != 0;
        let mut next = 2;
        let stats = on(F_STATS_VQ).then(|| {
            next += 1;
            next - 1
        });
        let report = on(F_PAGE_REPORTING).then_some(next);
        Roles { stats, report }
    }
}

/// The balloon's queues on the worker (one activation).
pub(crate) struct BalloonQueues {
    mem: GuestMem,
    queues: Vec<Queue>,
    roles: Roles,
    interrupt: Arc<dyn Interrupt>,
    dma: Arc<DmaLog>,
    counters: Arc<Counters>,
    shared: Arc<Shared>,
    stats_interval: Option<Duration>,
    /// The statistics buffer the device holds until it wants fresh values. It is not in the
    /// used ring, so after a quiesce (snapshot) the resumed device, which continues from the
    /// used ring's index, pops it again; a reset drops it with the rings.
    stats_head: Option<u16>,
    timer: Option<TimerFd>,
}

/// What one inflate or deflate request did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct PfnOutcome {
    /// PFNs inside guest RAM.
    pages: u64,
    /// PFNs outside guest RAM (ignored).
    ignored: u64,
    /// The first ignored PFN.
    first_ignored: Option<u32>,
}

impl BalloonQueues {
    fn queue_mut(&mut self, i: usize) -> Option<&mut Queue> {
        self.queues.get_mut(i)
    }

    /// Checks an inflate or deflate chain: device-readable buffers inside guest memory
    /// holding a whole number of PFNs, at most [`MAX_PFNS`]. Returns how many PFNs.
    fn pfn_count(chain: &Chain, mem: &GuestMem) -> Result<u64, ChainError> {
        let len = chain.validate(mem, Direction::Readable)?;
        if len % 4 != 0 {
            return Err(ChainError::TooSmall { len, min: len.next_multiple_of(4) });
        }
        if len / 4 > MAX_PFNS {
            return Err(ChainError::TooBig { len, max: MAX_PFNS * 4 });
        }
        Ok(len / 4)
    }

    /// Serves one inflate (`discard`) or deflate request: reads its PFNs in batches, sorted
    /// and coalesced into runs of adjacent pages; with `discard`, each run is given back to
    /// the host. Nothing is written to the chain.
    fn serve_pfns(
        chain: Result<Chain, ChainError>,
        mem: &GuestMem,
        dma: &DmaLog,
        counters: &Counters,
        discard_pages: bool,
    ) -> Result<PfnOutcome, ChainError> {
        let chain = chain?;
        Self::pfn_count(&chain, mem)?;
        let mut r = chain.reader(mem);
        let mut out = PfnOutcome::default();
        let mut raw = [0u8; PFN_BATCH * 4];
        let mut pfns: Vec<u32> = Vec::with_capacity(PFN_BATCH);
        loop {
            let n = r.read(&mut raw)?;
            if n == 0 {
                break;
            }
            Counters::add(&counters.bytes_read, n as u64);
            pfns.clear();
            let bytes = raw.get(..n).unwrap_or_default();
            pfns.extend(bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default())));
            pfns.sort_unstable();
            pfns.dedup();
            // Runs of adjacent pages inside guest RAM.
            let mut run: Option<(u64, u64)> = None;
            for &pfn in &pfns {
                let gpa = u64::from(pfn) << PAGE_SHIFT;
                if !mem.check_range(GuestAddress(gpa), PAGE_BYTES) {
                    out.ignored += 1;
                    out.first_ignored.get_or_insert(pfn);
                    continue;
                }
                out.pages += 1;
                run = match run {
                    Some((s, l)) if s + l == gpa => Some((s, l + PAGE_SIZE)),
                    Some((s, l)) => {
                        if discard_pages {
                            discard(mem, s, l, dma);
                        }
                        Some((gpa, PAGE_SIZE))
                    }
                    None => Some((gpa, PAGE_SIZE)),
                };
            }
            if let (Some((s, l)), true) = (run, discard_pages) {
                discard(mem, s, l, dma);
            }
        }
        Ok(out)
    }

    /// Serves the inflate or deflate queue; returns whether to interrupt.
    fn process_pfns(&mut self, q: usize) -> bool {
        let inflate = q == INFLATE;
        let (mem, dma, counters, shared) = (&self.mem, &self.dma, &self.counters, &self.shared);
        let Some(queue) = self.queues.get_mut(q) else { return false };
        queue::drain(queue, mem, |_, chain| {
            match Self::serve_pfns(chain, mem, dma, counters, inflate) {
                Ok(o) => {
                    Counters::add(&counters.requests, 1);
                    let total = if inflate { &shared.inflated_pages } else { &shared.deflated_pages };
                    total.fetch_add(o.pages, Ordering::Relaxed);
                    if let Some(first) = o.first_ignored {
                        devices::guest_warn!(
                            "virtio-balloon: {} page frame number(s) outside guest RAM ignored (first {first:#x})",
                            o.ignored
                        );
                    }
                }
                Err(e) => {
                    devices::guest_warn!(
                        "virtio-balloon: {} request: {e}",
                        if inflate { "inflate" } else { "deflate" }
                    );
                    Counters::add(&counters.errors, 1);
                }
            }
            0
        })
    }

    /// Reads a statistics buffer (at most [`MAX_STATS`] entries; a trailing partial entry is
    /// ignored).
    fn read_stats(chain: &Chain, mem: &GuestMem) -> Result<BalloonStats, ChainError> {
        chain.validate(mem, Direction::Readable)?;
        let mut raw = [0u8; MAX_STATS * STAT_BYTES];
        let n = chain.reader(mem).read(&mut raw)?;
        let mut stats = BalloonStats::default();
        for e in raw.get(..n).unwrap_or_default().chunks_exact(STAT_BYTES) {
            let (tag, val) = e.split_at(2);
            stats.set(
                u16::from_le_bytes(tag.try_into().unwrap_or_default()),
                u64::from_le_bytes(val.try_into().unwrap_or_default()),
            );
        }
        Ok(stats)
    }

    /// Takes the statistics buffers the driver made available: keeps the values of each and
    /// holds the last buffer; one already held is given back (a driver that sent a second
    /// buffer without being asked). Returns whether to interrupt.
    fn take_stats(&mut self) -> bool {
        let Some(q) = self.roles.stats else { return false };
        let mem = self.mem.clone();
        let mut notify = false;
        let mut rechecked = false;
        loop {
            let Some(queue) = self.queues.get_mut(q) else { return false };
            if !queue.ready() {
                return false;
            }
            let popped = match queue::pop(queue, &mem) {
                Ok(p) => p,
                Err(e) => {
                    devices::guest_warn!("virtio-balloon: statistics queue: corrupt avail ring: {e}");
                    break;
                }
            };
            let Some((head, chain)) = popped else {
                // Re-arm notifications (event index) and look once more.
                if rechecked || !queue.event_idx_enabled() {
                    break;
                }
                rechecked = true;
                match queue.enable_notification(&mem) {
                    Ok(true) => continue,
                    _ => break,
                }
            };
            match chain.and_then(|c| Self::read_stats(&c, &mem)) {
                Ok(s) => {
                    Counters::add(&self.counters.requests, 1);
                    *lock(&self.shared.stats) = Some((s, Instant::now()));
                }
                Err(e) => {
                    devices::guest_warn!("virtio-balloon: statistics buffer: {e}");
                    Counters::add(&self.counters.errors, 1);
                }
            }
            if let Some(old) = self.stats_head.replace(head) {
                notify |= self.give_back(q, old);
            }
        }
        notify
    }

    /// Puts `head` in queue `q`'s used ring (length 0); returns whether to interrupt.
    fn give_back(&mut self, q: usize, head: u16) -> bool {
        let mem = self.mem.clone();
        let Some(queue) = self.queue_mut(q) else { return false };
        if let Err(e) = queue.add_used(&mem, head, 0) {
            devices::guest_warn!("virtio-balloon: add_used: {e}");
            return false;
        }
        queue.needs_notification(&mem).unwrap_or(true)
    }

    /// Asks the driver for fresh statistics: gives the held buffer back.
    fn request_stats(&mut self) {
        let (Some(q), Some(head)) = (self.roles.stats, self.stats_head.take()) else { return };
        if self.give_back(q, head) {
            self.interrupt.notify_queue(u16::try_from(q).unwrap_or(u16::MAX));
        }
    }

    /// Serves one free page report: discards each buffer (whole 4 KiB pages inside it).
    fn serve_report(
        chain: Result<Chain, ChainError>,
        mem: &GuestMem,
        dma: &DmaLog,
        counters: &Counters,
        shared: &Shared,
    ) -> Result<(), ChainError> {
        let chain = chain?;
        for dir in [Direction::Readable, Direction::Writable] {
            chain.check_memory(mem, dir)?;
        }
        for dir in [Direction::Readable, Direction::Writable] {
            for s in chain.segments(dir) {
                let start = s.addr.next_multiple_of(PAGE_SIZE);
                let end = (s.addr + u64::from(s.len)) / PAGE_SIZE * PAGE_SIZE;
                if end > start {
                    let n = discard(mem, start, end - start, dma);
                    shared.reported_bytes.fetch_add(n, Ordering::Relaxed);
                    Counters::add(&counters.bytes_read, end - start);
                }
            }
        }
        Ok(())
    }

    fn process_reports(&mut self, q: usize) -> bool {
        let (mem, dma, counters, shared) = (&self.mem, &self.dma, &self.counters, &self.shared);
        let Some(queue) = self.queues.get_mut(q) else { return false };
        queue::drain(queue, mem, |_, chain| {
            match Self::serve_report(chain, mem, dma, counters, shared) {
                Ok(()) => Counters::add(&counters.requests, 1),
                Err(e) => {
                    devices::guest_warn!("virtio-balloon: free page report: {e}");
                    Counters::add(&counters.errors, 1);
                }
            }
            0
        })
    }

    /// Serves queue `q`'s kick; returns whether to interrupt.
    fn process(&mut self, q: usize) -> bool {
        match q {
            INFLATE | DEFLATE => self.process_pfns(q),
            _ if Some(q) == self.roles.stats => self.take_stats(),
            _ if Some(q) == self.roles.report => self.process_reports(q),
            _ => false,
        }
    }
}

impl Handler for BalloonQueues {
    fn init(&mut self, ctl: &EpollCtl) -> std::io::Result<()> {
        if let (Some(_), Some(every)) = (self.roles.stats, self.stats_interval) {
            let mut t = TimerFd::new()?;
            t.reset(every, Some(every))?;
            ctl.add(std::os::fd::AsRawFd::as_raw_fd(&t), EventSet::IN, TIMER_TOKEN)?;
            self.timer = Some(t);
        }
        Ok(())
    }

    fn queue_event(&mut self, q: usize, _ctl: &EpollCtl) {
        if self.process(q) {
            self.interrupt.notify_queue(u16::try_from(q).unwrap_or(u16::MAX));
        }
    }

    fn fd_event(&mut self, token: u64, _events: EventSet, _ctl: &EpollCtl) {
        if token != TIMER_TOKEN {
            return;
        }
        if let Some(t) = &mut self.timer {
            let _ = t.wait();
        }
        self.request_stats();
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        let n = 2 + usize::from(self.opts.stats_interval.is_some()) + usize::from(self.opts.free_page_reporting);
        vec![QUEUE_SIZE; n]
    }
    fn device_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | crate::RING_FEATURES;
        if self.opts.stats_interval.is_some() {
            f |= F_STATS_VQ;
        }
        if self.opts.deflate_on_oom {
            f |= F_DEFLATE_ON_OOM;
        }
        if self.opts.free_page_reporting {
            f |= F_PAGE_REPORTING;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.config_bytes(), offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is writable by the driver.
        let mut actual = self.shared.actual_pages.load(Ordering::SeqCst).to_le_bytes();
        let mut changed = false;
        for (i, &b) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64).and_then(|o| o.checked_sub(4)) else { continue };
            if let Some(slot) = usize::try_from(at).ok().and_then(|a| actual.get_mut(a)) {
                *slot = b;
                changed = true;
            }
        }
        if changed {
            self.shared.actual_pages.store(u32::from_le_bytes(actual), Ordering::SeqCst);
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() < 2 {
            return Err(ActivateError::BadConfig("fewer than 2 queues".into()));
        }
        let roles = Roles::of(ctx.acked_features, self.device_features());
        *lock(&self.shared.interrupt) = Some(ctx.interrupt.clone());
        let q = BalloonQueues {
            mem: ctx.mem,
            queues: ctx.queues,
            roles,
            interrupt: ctx.interrupt,
            dma: ctx.dma,
            counters: self.counters.clone(),
            shared: self.shared.clone(),
            stats_interval: self.opts.stats_interval,
            stats_head: None,
            timer: None,
        };
        self.worker.activate(ctx.queue_evts, q).map_err(|e| ActivateError::Host(e.to_string()))
    }
    fn reset(&mut self) -> Completion {
        *lock(&self.shared.interrupt) = None;
        self.worker.reset()
    }
    fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
}

#[cfg(test)]
// Test fixtures: sizes and indices are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use vm_memory::Bytes;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::testing::{TestQueue, DATA, F_NEXT};

    #[derive(Default)]
    struct Irq {
        queue: AtomicUsize,
        config: AtomicUsize,
    }
    impl Interrupt for Irq {
        fn notify_queue(&self, _queue: u16) {
            self.queue.fetch_add(1, Ordering::SeqCst);
        }
        fn notify_config(&self) {
            self.config.fetch_add(1, Ordering::SeqCst);
        }
    }

    const MEM: usize = 4 << 20;

    /// Queues: inflate at 0x1000 (TestQueue::new), deflate at 0x5000, stats at 0x8000,
    /// reporting at 0xb000.
    struct Rig {
        tqs: Vec<TestQueue>,
        q: BalloonQueues,
        irq: Arc<Irq>,
    }

    fn rig() -> Rig {
        let first = TestQueue::new(16, MEM);
        let mem = first.mem.clone();
        let mut tqs = vec![first];
        for base in [0x5000, 0x8000, 0xb000] {
            tqs.push(TestQueue::at(&mem, 16, base));
        }
        let irq = Arc::new(Irq::default());
        let offered = F_STATS_VQ | F_PAGE_REPORTING;
        let q = BalloonQueues {
            mem: mem.clone(),
            queues: tqs.iter().map(TestQueue::queue).collect(),
            roles: Roles::of(offered, offered),
            interrupt: irq.clone(),
            dma: Arc::default(),
            counters: Arc::default(),
            shared: Arc::default(),
            stats_interval: Some(Duration::from_secs(5)),
            stats_head: None,
            timer: None,
        };
        Rig { tqs, q, irq }
    }

    fn pfns(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|p| p.to_le_bytes()).collect()
    }

    /// Fills `pages` 4 KiB pages from `first_pfn` with a non-zero pattern.
    fn touch(mem: &GuestMem, first_pfn: u64, pages: u64) {
        for p in first_pfn..first_pfn + pages {
            mem.write_slice(&[0xa5; 4096], GuestAddress(p << 12)).unwrap();
        }
    }

    fn page_is_zero(mem: &GuestMem, pfn: u64) -> bool {
        let mut b = vec![1u8; 4096];
        mem.read_slice(&mut b, GuestAddress(pfn << 12)).unwrap();
        b.iter().all(|&x| x == 0)
    }

    fn errors(q: &BalloonQueues) -> u64 {
        q.counters.errors.load(Ordering::Relaxed)
    }

    #[test]
    fn roles_follow_the_accepted_features() {
        let all = F_STATS_VQ | F_PAGE_REPORTING;
        assert_eq!(Roles::of(all, all), Roles { stats: Some(2), report: Some(3) });
        assert_eq!(Roles::of(F_PAGE_REPORTING, all), Roles { stats: None, report: Some(2) });
        assert_eq!(Roles::of(F_STATS_VQ, all), Roles { stats: Some(2), report: None });
        assert_eq!(Roles::of(all, F_STATS_VQ), Roles { stats: Some(2), report: None }, "not offered");
        assert_eq!(Roles::of(0, all), Roles { stats: None, report: None });
    }

    #[test]
    fn inflate_discards_pages_and_deflate_counts_them() {
        let mut r = rig();
        let mem = r.q.mem.clone();
        touch(&mem, 0x100, 8);
        // PFNs out of order, one duplicate: 0x100..0x104 and 0x106.
        let list = pfns(&[0x103, 0x101, 0x100, 0x106, 0x102, 0x101]);
        r.tqs[0].write(DATA, &list);
        r.tqs[0].add_chain(0, &[(DATA, list.len() as u32, false)]);
        assert!(r.q.process(INFLATE));
        assert_eq!((r.tqs[0].used_idx(), r.tqs[0].used(0)), (1, (0, 0)));
        for p in [0x100, 0x101, 0x102, 0x103, 0x106] {
            assert!(page_is_zero(&mem, p), "page {p:#x} discarded");
        }
        for p in [0x104, 0x105, 0x107] {
            assert!(!page_is_zero(&mem, p), "page {p:#x} kept");
        }
        assert_eq!(r.q.dma.take(), vec![(0x100 << 12, 4 << 12), (0x106 << 12, 4096)], "discards are device writes");
        assert_eq!(r.q.shared.inflated_pages.load(Ordering::Relaxed), 5);
        // Deflate: nothing to do but count.
        let list = pfns(&[0x100, 0x101]);
        r.tqs[1].write(DATA + 0x1000, &list);
        r.tqs[1].add_chain(0, &[(DATA + 0x1000, 8, false)]);
        assert!(r.q.process(DEFLATE));
        assert_eq!(r.tqs[1].used(0), (0, 0));
        assert_eq!(r.q.shared.deflated_pages.load(Ordering::Relaxed), 2);
        assert_eq!(r.q.counters.requests.load(Ordering::Relaxed), 2);
        assert_eq!(errors(&r.q), 0);
        assert!(r.q.dma.take().is_empty());
    }

    #[test]
    fn hostile_pfn_requests() {
        let mut r = rig();
        let mem = r.q.mem.clone();
        touch(&mem, 0x200, 1);
        // PFNs outside guest RAM are ignored; the ones inside are discarded.
        let list = pfns(&[u32::MAX, 0x200, (MEM >> 12) as u32, 0x8000_0000]);
        r.tqs[0].write(DATA, &list);
        r.tqs[0].add_chain(0, &[(DATA, list.len() as u32, false)]);
        r.q.process(INFLATE);
        assert!(page_is_zero(&mem, 0x200));
        assert_eq!((r.q.shared.inflated_pages.load(Ordering::Relaxed), errors(&r.q)), (1, 0));
        // A length that is not a whole number of PFNs, a device-writable buffer, a buffer
        // outside memory, a loop, too many PFNs: each request fails, nothing is discarded.
        touch(&mem, 0x300, 1);
        r.tqs[0].write(DATA, &pfns(&[0x300, 0x300]));
        r.tqs[0].add_chain(0, &[(DATA, 6, false)]);
        r.tqs[0].add_chain(1, &[(DATA, 4, false), (DATA + 0x100, 4, true)]);
        r.tqs[0].add_chain(3, &[(1 << 40, 4, false)]);
        r.tqs[0].set_desc(4, DATA, 4, F_NEXT, 4);
        r.tqs[0].publish(4);
        // 4 descriptors of 64 KiB each = 65536 PFNs + 1 more: over MAX_PFNS.
        let big: Vec<_> = (0..4).map(|i| (DATA + i * 0x10000, 0x10000u32, false)).chain([(DATA, 4, false)]).collect();
        r.tqs[0].add_chain(5, &big);
        r.q.process(INFLATE);
        assert_eq!(r.tqs[0].used_idx(), 6, "every request is returned");
        assert_eq!(errors(&r.q), 5);
        assert!(!page_is_zero(&mem, 0x300), "nothing discarded by a failed request");
        // Exactly MAX_PFNS is accepted (all pointing at one page).
        let table: Vec<u8> = pfns(&[0x300; 0x4000]);
        for i in 0..4 {
            r.tqs[0].write(DATA + i * 0x10000, &table);
        }
        let exact: Vec<_> = (0..4).map(|i| (DATA + i * 0x10000, 0x10000u32, false)).collect();
        r.tqs[0].add_chain(10, &exact);
        r.q.process(INFLATE);
        assert_eq!(errors(&r.q), 5);
        assert!(page_is_zero(&mem, 0x300));
        // A corrupt avail index: nothing is served until the driver repairs it.
        let avail = r.tqs[0].avail_idx();
        r.tqs[0].set_avail_idx(avail.wrapping_add(100));
        assert!(!r.q.process(INFLATE));
        r.tqs[0].set_avail_idx(avail);
    }

    fn stats_buffer(entries: &[(u16, u64)]) -> Vec<u8> {
        entries.iter().flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes())).collect()
    }

    #[test]
    fn statistics_are_kept_and_the_buffer_held_until_requested() {
        let mut r = rig();
        let buf = stats_buffer(&[(4, 100 << 20), (5, 512 << 20), (6, 300 << 20), (2, 7), (99, 1)]);
        r.tqs[2].write(DATA, &buf);
        r.tqs[2].add_chain(0, &[(DATA, buf.len() as u32, false)]);
        assert!(!r.q.process(2), "the buffer is held, not used");
        assert_eq!(r.tqs[2].used_idx(), 0);
        let (s, age) = BalloonHandle(r.q.shared.clone()).stats().unwrap();
        assert!(age < Duration::from_secs(5));
        assert_eq!(
            s,
            BalloonStats {
                free_memory: Some(100 << 20),
                total_memory: Some(512 << 20),
                available_memory: Some(300 << 20),
                major_faults: Some(7),
                ..BalloonStats::default()
            }
        );
        // The timer asks for fresh values: the buffer goes back to the driver.
        r.q.request_stats();
        assert_eq!((r.tqs[2].used_idx(), r.tqs[2].used(0)), (1, (0, 0)));
        assert_eq!(r.irq.queue.load(Ordering::SeqCst), 1);
        r.q.request_stats();
        assert_eq!(r.tqs[2].used_idx(), 1, "nothing held, nothing given back");
        // A driver that sends a second buffer while one is held gets the first back; a
        // malformed buffer is counted, and its head held all the same.
        let buf = stats_buffer(&[(4, 1)]);
        r.tqs[2].write(DATA + 0x100, &buf);
        r.tqs[2].add_chain(1, &[(DATA + 0x100, buf.len() as u32, false)]);
        r.tqs[2].add_chain(2, &[(DATA + 0x100, 10, true)]);
        assert!(r.q.process(2));
        assert_eq!((r.tqs[2].used_idx(), r.tqs[2].used(1)), (2, (1, 0)));
        assert_eq!((r.q.stats_head, errors(&r.q)), (Some(2), 1));
        assert_eq!(BalloonHandle(r.q.shared.clone()).stats().unwrap().0.free_memory, Some(1));
        // A huge buffer: only MAX_STATS entries are read.
        r.q.request_stats();
        let many: Vec<(u16, u64)> = (0..1000).map(|i| (4, i)).collect();
        let buf = stats_buffer(&many);
        r.tqs[2].write(DATA + 0x1000, &buf);
        r.tqs[2].add_chain(3, &[(DATA + 0x1000, buf.len() as u32, false)]);
        r.q.process(2);
        assert_eq!(BalloonHandle(r.q.shared.clone()).stats().unwrap().0.free_memory, Some(MAX_STATS as u64 - 1));
    }

    #[test]
    fn free_page_reports_are_discarded_and_returned() {
        let mut r = rig();
        let mem = r.q.mem.clone();
        touch(&mem, 0x200, 0x200);
        // Linux reports device-writable 2 MiB blocks; a partial page at either end is kept.
        r.tqs[3].add_chain(0, &[(0x200 << 12, 0x100 << 12, true), ((0x300 << 12) + 0x10, 0x2000, true)]);
        assert!(r.q.process(3));
        assert_eq!((r.tqs[3].used_idx(), r.tqs[3].used(0)), (1, (0, 0)));
        assert!(page_is_zero(&mem, 0x200) && page_is_zero(&mem, 0x2ff) && page_is_zero(&mem, 0x301));
        assert!(!page_is_zero(&mem, 0x300) && !page_is_zero(&mem, 0x302));
        assert_eq!(r.q.shared.reported_bytes.load(Ordering::Relaxed), (0x100 << 12) + 0x1000);
        // A report reaching outside guest memory fails whole.
        touch(&mem, 0x380, 1);
        r.tqs[3].add_chain(2, &[(0x380 << 12, 4096, true), (MEM as u64 - 4096, 8192, true)]);
        r.q.process(3);
        assert!(!page_is_zero(&mem, 0x380));
        assert_eq!(errors(&r.q), 1);
    }

    #[test]
    fn config_space_and_target_notifications() {
        let mut b = Balloon::new(BalloonOptions::default());
        let h = b.handle();
        assert_eq!(b.queue_max_sizes().len(), 3);
        assert_eq!(
            b.device_features() & (F_STATS_VQ | F_DEFLATE_ON_OOM | F_PAGE_REPORTING),
            F_STATS_VQ | F_DEFLATE_ON_OOM
        );
        let opts = BalloonOptions { deflate_on_oom: false, stats_interval: None, free_page_reporting: true };
        let b2 = Balloon::new(opts);
        assert_eq!(b2.queue_max_sizes().len(), 3);
        assert_eq!(b2.device_features() & (F_STATS_VQ | F_DEFLATE_ON_OOM | F_PAGE_REPORTING), F_PAGE_REPORTING);
        h.set_target_pages(0x1234);
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(c, [0x34, 0x12, 0, 0, 0, 0, 0, 0]);
        // The driver writes `actual`; `num_pages` is read-only; partial and out-of-range
        // writes are harmless.
        b.write_config(4, &0x1000u32.to_le_bytes());
        b.write_config(0, &[0xff; 4]);
        b.write_config(6, &[0x02]);
        b.write_config(100, &[0xff; 8]);
        b.write_config(u64::MAX, &[1, 2]);
        assert_eq!((h.target_pages(), h.actual_pages()), (0x1234, 0x21000));
        let mut c = [0u8; 4];
        b.read_config(4, &mut c);
        assert_eq!(u32::from_le_bytes(c), 0x21000);
        b.read_config(6, &mut c);
        assert_eq!(c, [2, 0, 0, 0], "bytes past the end read as 0");
        // A target change interrupts an active driver only.
        let irq = Arc::new(Irq::default());
        *lock(&b.shared.interrupt) = Some(irq.clone());
        h.set_target_pages(10);
        assert_eq!(irq.config.load(Ordering::SeqCst), 1);
        assert!(b.reset().wait(Duration::from_secs(5)));
        h.set_target_pages(11);
        assert_eq!(irq.config.load(Ordering::SeqCst), 1);
        // Snapshot state.
        let st = h.state();
        assert_eq!(st, BalloonState { target_pages: 11, actual_pages: 0x21000 });
        let h2 = Balloon::new(BalloonOptions::default()).handle();
        h2.restore_state(&st);
        assert_eq!(h2.state(), st);
    }

    #[test]
    fn the_worker_asks_for_statistics_on_its_timer() {
        let opts = BalloonOptions { stats_interval: Some(Duration::from_millis(50)), ..BalloonOptions::default() };
        let mut b = Balloon::new(opts);
        let h = b.handle();
        let mut r = rig();
        let buf = stats_buffer(&[(5, 64 << 20)]);
        r.tqs[2].write(DATA, &buf);
        r.tqs[2].add_chain(0, &[(DATA, buf.len() as u32, false)]);
        let kicks: Vec<EventFd> = (0..3).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
        let ctx = ActivateContext {
            mem: r.q.mem.clone(),
            acked_features: b.device_features(),
            queues: r.tqs.iter().take(3).map(TestQueue::queue).collect(),
            queue_evts: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            interrupt: r.irq.clone(),
            dma: Arc::default(),
            resumed: false,
        };
        b.activate(ctx).unwrap();
        kicks[2].write(1).unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while r.tqs[2].used_idx() == 0 {
            assert!(Instant::now() < end, "the statistics buffer was never given back");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(h.stats().unwrap().0.total_memory, Some(64 << 20));
        assert!(r.irq.queue.load(Ordering::SeqCst) >= 1);
        // The target reaches the active driver as a configuration interrupt.
        h.set_target_pages(5);
        assert_eq!(r.irq.config.load(Ordering::SeqCst), 1);
        assert!(b.reset().wait(Duration::from_secs(5)));
    }

    #[test]
    fn discard_on_hugetlb_keeps_partial_huge_pages() {
        // A region that says it is 2 MiB hugetlbfs, over ordinary memory.
        let plain = vm_memory::MmapRegion::<()>::new(8 << 20).unwrap();
        // SAFETY: `plain` maps 8 MiB at this address and outlives `mem` (dropped first below).
        let huge = unsafe {
            vm_memory::mmap::MmapRegionBuilder::new(8 << 20)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB)
                .with_hugetlbfs(true)
                .with_raw_mmap_pointer(plain.as_ptr())
                .build()
                .unwrap()
        };
        let region = vm_memory::GuestRegionMmap::new(huge, GuestAddress(0)).unwrap();
        assert_eq!(backing(&region), Backing::Huge(2 << 20));
        let mem = GuestMem::from_regions(vec![region]).unwrap();
        let dma = DmaLog::default();
        touch(&mem, 0, 2048);
        assert_eq!(discard(&mem, 0x1000, 0x1000, &dma), 0, "a 4 KiB page of a huge page stays");
        assert_eq!(discard(&mem, 0x1000, 6 << 20, &dma), 4 << 20, "only the whole huge pages inside go");
        assert!(!page_is_zero(&mem, 1) && !page_is_zero(&mem, 0x1ff));
        assert!(page_is_zero(&mem, 0x200) && page_is_zero(&mem, 0x5ff) && !page_is_zero(&mem, 0x600));
        assert_eq!(dma.take(), vec![(2 << 20, 4 << 20)]);
        drop(mem);
        drop(plain);
    }

    #[test]
    fn discard_of_private_memory_takes_any_whole_page() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dma = DmaLog::default();
        touch(&mem, 0, 1024);
        assert_eq!(discard(&mem, 0x1000, 0x1000, &dma), 0x1000);
        assert_eq!(discard(&mem, (4 << 20) - 0x1000, 0x10000, &dma), 0x1000, "clipped at the end of RAM");
        assert_eq!(discard(&mem, 8 << 20, 0x1000, &dma), 0, "outside RAM");
        assert!(page_is_zero(&mem, 1) && !page_is_zero(&mem, 0) && !page_is_zero(&mem, 2));
        let r = mem.find_region(GuestAddress(0)).unwrap();
        assert_eq!(backing(r), Backing::Private);
    }
}
