//! Guest physical memory, 4-level paging (Intel SDM Vol. 3 §4.5) and the software TLB.

use crate::cpu::{ctl, Cpu};
use crate::regs::{host_usize, low16, low32, low64, low8, size_u8};
use crate::{Bus, Fault, Res};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// One contiguous block of guest RAM mapped in the VMM.
///
/// The one definition for the whole hypervisor: `accel` re-exports it as
/// `accel::RamRegion` (the VMM describes guest memory with it once, for either engine).
#[derive(Clone, Copy, Debug)]
pub struct RamRegion {
    /// Guest physical address (GPA) of the first byte.
    pub gpa: u64,
    /// Size in bytes, a multiple of 4096 (the emulator does not map a partial last page).
    pub size: u64,
    /// Host virtual address of the first byte; valid for `size` bytes for as long as the
    /// VM (or a [`crate::Cpu`] built over it) exists.
    pub host_addr: *mut u8,
}

// SAFETY: a RamRegion is a plain description of a mapping that outlives the VM; the mapping
// itself is shared guest memory that the guest may change at any time, so no Rust aliasing
// guarantees are claimed for it by any user of this type, and it holds no thread-affine state.
unsafe impl Send for RamRegion {}
// SAFETY: see the `Send` impl above: sharing the description shares only the address.
unsafe impl Sync for RamRegion {}

pub(crate) const TLB_SIZE: usize = 1024;
pub(crate) const TLB_VALID: u64 = 1;

/// Permission bits of a TLB entry.
pub(crate) const P_USER: u8 = 1;
/// Writable (W on every level and D already set).
pub(crate) const P_WRITE: u8 = 2;
/// Executable (no NX on any level).
pub(crate) const P_EXEC: u8 = 4;
/// Global page (survives CR3 writes).
pub(crate) const P_GLOBAL: u8 = 8;
/// Readable at all (always set on valid entries).
pub(crate) const P_READ: u8 = 16;
/// The page is RAM (`host` is not null): the translation tier's inline accesses need it.
pub(crate) const P_RAM: u8 = 32;

/// Code generation bit 0: the page holds decoded code (a store to it must retire that code).
pub(crate) const GEN_CODE: u32 = 1;
/// Code generation bit 1: the page was marked as code and every other vCPU's stores made
/// before the mark are visible (see [`SharedRam::mark_code`]).
const GEN_FENCED: u32 = 2;
/// Step between two generations of a page (the two flag bits are below it).
const GEN_STEP: u32 = 4;

#[derive(Clone, Copy)]
pub(crate) struct TlbEntry {
    /// Linear page address | TLB_VALID.
    tag: u64,
    /// Host address of the page, or null for MMIO.
    host: *mut u8,
    /// The page's code generation in the [`SharedRam`] (null for MMIO); valid while the
    /// `Mmu` holding this entry holds its `Arc<SharedRam>`.
    gen: *const AtomicU32,
    /// GPA of the page.
    gpa: u64,
    perm: u8,
}

/// Byte layout of a [`TlbEntry`], for code that the translation tier (`crate::jit`)
/// generates: size of an entry and offsets of `tag` (u64), `host` (pointer), `gen`
/// (pointer to the page's `AtomicU32` code generation) and `perm` (u8).
pub(crate) mod tlb_layout {
    use super::TlbEntry;
    /// Size of one entry in bytes.
    pub(crate) const SIZE: usize = std::mem::size_of::<TlbEntry>();
    /// Offset of `tag` (linear page | TLB_VALID).
    pub(crate) const TAG: usize = std::mem::offset_of!(TlbEntry, tag);
    /// Offset of `host` (host page address, null for MMIO).
    pub(crate) const HOST: usize = std::mem::offset_of!(TlbEntry, host);
    /// Offset of `gen` (the page's code generation, null for MMIO).
    pub(crate) const GEN: usize = std::mem::offset_of!(TlbEntry, gen);
    /// Offset of `perm` (P_* bits).
    pub(crate) const PERM: usize = std::mem::offset_of!(TlbEntry, perm);
    /// Offset of `gpa` (GPA of the page, u64).
    pub(crate) const GPA: usize = std::mem::offset_of!(TlbEntry, gpa);
}

const EMPTY: TlbEntry = TlbEntry { tag: 0, host: std::ptr::null_mut(), gen: std::ptr::null(), gpa: 0, perm: 0 };

/// Kind of memory access, for permission checks and page-fault error codes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Access {
    Read,
    Write,
    Exec,
}

/// What the vCPUs of one VM share about guest RAM (QEMU's MTTCG model: every vCPU runs the
/// emulator on its own host thread over the same guest memory).
///
/// * The code generation of every 4 KiB RAM page. A vCPU that decodes code from a page marks
///   it (`SharedRam::mark_code`); every store into RAM (by any vCPU, after the store) looks
///   at the page's generation and, if the page holds code, moves it on, which retires every
///   vCPU's decoded blocks from that page before their next fetch (blocks are checked
///   against the generation at block entry). Device DMA does the same through
///   [`SharedRam::invalidate_code`]. No lock is taken on these paths.
/// * The fallback lock for locked read-modify-write accesses that no host atomic can do
///   (misaligned or page-crossing): every such access holds it.
///
/// Build one per VM over its RAM and give it to each vCPU ([`crate::Cpu::with_shared`]).
pub struct SharedRam {
    /// The RAM regions (whole pages only, see `SharedRam::new`).
    ram: Vec<RamRegion>,
    /// First page index of each region in `gens`.
    page_base: Vec<usize>,
    /// Per RAM page: code generation (see the `GEN_*` bits).
    gens: Box<[AtomicU32]>,
    /// The lock of locked accesses that cannot use a host atomic.
    pub(crate) atomic_lock: Mutex<()>,
    /// vCPUs built over this RAM and not yet dropped.
    cpus: AtomicUsize,
}

impl std::fmt::Debug for SharedRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRam").field("ram", &self.ram).field("pages", &self.gens.len()).finish_non_exhaustive()
    }
}

impl SharedRam {
    /// Shared state over `ram`. Only whole 4 KiB pages are RAM: a region that does not start
    /// on a page boundary is dropped and a partial last page is cut off (the VMM refuses such
    /// layouts; this keeps every RAM access inside the per-page tables regardless).
    pub fn new(ram: &[RamRegion]) -> Arc<SharedRam> {
        let ram: Vec<RamRegion> = ram
            .iter()
            .filter(|r| r.gpa.is_multiple_of(4096))
            .map(|r| RamRegion { size: r.size & !0xfff, ..*r })
            .filter(|r| r.size > 0)
            .collect();
        let mut page_base = Vec::with_capacity(ram.len());
        let mut pages = 0usize;
        for r in &ram {
            page_base.push(pages);
            pages += host_usize(r.size / 4096);
        }
        let gens = (0..pages).map(|_| AtomicU32::new(0)).collect();
        Arc::new(SharedRam { ram, page_base, gens, atomic_lock: Mutex::new(()), cpus: AtomicUsize::new(0) })
    }

    /// Host pointer and global page index for a GPA in RAM.
    #[inline]
    pub(crate) fn ram_lookup(&self, gpa: u64) -> Option<(*mut u8, usize)> {
        for (r, &base) in self.ram.iter().zip(&self.page_base) {
            if gpa >= r.gpa && gpa - r.gpa < r.size {
                let off = gpa - r.gpa;
                // SAFETY: off < r.size, so the pointer stays inside the mapped region.
                let p = unsafe { r.host_addr.add(host_usize(off)) };
                return Some((p, base + host_usize(off >> 12)));
            }
        }
        None
    }

    /// The code generation of RAM page `page`; 0 ("no code") for an index out of range, which
    /// no cached block carries.
    #[inline(always)]
    pub(crate) fn gen(&self, page: usize) -> u32 {
        self.gens.get(page).map_or(0, |g| g.load(Ordering::Acquire))
    }

    /// The code generation of RAM page `page` as a pointer (null for an index out of
    /// range); valid while this `SharedRam` exists.
    pub(crate) fn gen_ptr(&self, page: usize) -> *const AtomicU32 {
        self.gens.get(page).map_or(std::ptr::null(), |g| g as *const AtomicU32)
    }

    /// A store hit RAM page `page`: retire its decoded code, if any.
    #[inline]
    pub(crate) fn note_write(&self, page: usize) {
        if let Some(g) = self.gens.get(page) {
            note_write_gen(g);
        }
    }

    /// Marks RAM page `page` as holding decoded code and returns its generation, which
    /// stays the same until a store to the page. Call it before reading the code bytes.
    ///
    /// With several vCPUs, a store by another vCPU may sit in its host core's store buffer
    /// while its check of the generation already read "no code" (x86-TSO lets a load pass an
    /// earlier store). Before the page is trusted, every other thread of the process is made
    /// to execute a full memory barrier (`membarrier(2)`, private expedited): after that,
    /// every such store is visible to the decoder, or the storing vCPU's check comes later
    /// and sees the mark. That is the asymmetric form of Dekker's algorithm; the store side
    /// pays nothing.
    pub(crate) fn mark_code(&self, page: usize) -> u32 {
        let Some(g) = self.gens.get(page) else {
            return 0;
        };
        let mut v = g.load(Ordering::Acquire);
        loop {
            if v & (GEN_CODE | GEN_FENCED) == GEN_CODE | GEN_FENCED {
                return v;
            }
            if v & GEN_CODE == 0 {
                match g.compare_exchange(v, v | GEN_CODE, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => v |= GEN_CODE,
                    Err(now) => {
                        v = now;
                        continue;
                    }
                }
            }
            if self.cpus.load(Ordering::Acquire) > 1 {
                store_barrier_all_threads();
            }
            match g.compare_exchange(v, v | GEN_FENCED, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return v | GEN_FENCED,
                Err(now) => v = now,
            }
        }
    }

    /// Retires code decoded from the RAM pages overlapping `len` bytes at GPA `gpa`, for
    /// every vCPU sharing this RAM (after a device wrote them by DMA). Non-RAM addresses are
    /// ignored.
    pub fn invalidate_code(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa >> 12;
        let last = gpa.saturating_add(len - 1) >> 12;
        for page in first..=last {
            if let Some((_, idx)) = self.ram_lookup(page << 12) {
                self.note_write(idx);
            }
        }
    }

    /// Retires all decoded code (after the VMM rewrote guest memory, e.g. on restore).
    pub fn invalidate_all_code(&self) {
        for g in self.gens.iter() {
            note_write_gen(g);
        }
    }

    /// How many vCPUs are built over this RAM and still exist.
    pub fn vcpus(&self) -> usize {
        self.cpus.load(Ordering::Acquire)
    }
}

/// A store hit the page whose generation is `g`: if the page holds code, move it to the next
/// generation (without the code bit), which retires every block decoded from it.
#[inline(always)]
fn note_write_gen(g: &AtomicU32) {
    let v = g.load(Ordering::Relaxed);
    if v & GEN_CODE != 0 {
        retire_gen(g, v);
    }
}

#[cold]
#[inline(never)]
fn retire_gen(g: &AtomicU32, mut v: u32) {
    while v & GEN_CODE != 0 {
        match g.compare_exchange(
            v,
            (v & !(GEN_CODE | GEN_FENCED)).wrapping_add(GEN_STEP),
            Ordering::AcqRel,
            Ordering::Relaxed,
        ) {
            Ok(_) => return,
            Err(now) => v = now,
        }
    }
}

/// Makes every thread of this process that is running on a CPU execute a full memory barrier
/// before returning (Linux `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, registered on
/// first use). Where the kernel lacks it (before Linux 4.14, or filtered by seccomp) this
/// falls back to a full fence on this side only: a store still in another core's store
/// buffer at that moment can then be missed, and the stale block is retired at the next
/// store to the page instead.
fn store_barrier_all_threads() {
    use std::sync::OnceLock;
    const REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;
    const PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    // SAFETY: membarrier takes two integer arguments and touches no memory of ours.
    let ok =
        *REGISTERED.get_or_init(|| unsafe { libc::syscall(libc::SYS_membarrier, REGISTER_PRIVATE_EXPEDITED, 0) } == 0);
    // SAFETY: as above.
    if !ok || unsafe { libc::syscall(libc::SYS_membarrier, PRIVATE_EXPEDITED, 0) } != 0 {
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

pub(crate) struct Mmu {
    pub(crate) shared: Arc<SharedRam>,
    tlb: Box<[TlbEntry; TLB_SIZE]>,
}

impl Drop for Mmu {
    fn drop(&mut self) {
        self.shared.cpus.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Mmu {
    /// Builds the MMU of one vCPU over `shared` RAM.
    pub(crate) fn new(shared: Arc<SharedRam>) -> Mmu {
        shared.cpus.fetch_add(1, Ordering::AcqRel);
        Mmu { shared, tlb: Box::new([EMPTY; TLB_SIZE]) }
    }

    /// The first entry of the TLB (TLB_SIZE entries, see [`tlb_layout`]), for generated
    /// code; valid while this `Mmu` exists (the table never moves).
    pub(crate) fn tlb_ptr(&self) -> *const TlbEntry {
        self.tlb.as_ptr()
    }

    /// The TLB entry that `la` maps to (direct-mapped by linear page number).
    #[inline(always)]
    #[allow(clippy::indexing_slicing)] // the index is masked with TLB_SIZE - 1 (a power of two) < tlb.len()
    fn tlb_slot(&self, la: u64) -> &TlbEntry {
        &self.tlb[host_usize(la >> 12) & (TLB_SIZE - 1)]
    }

    /// The TLB entry that `la` maps to, for filling or flushing it.
    #[inline(always)]
    #[allow(clippy::indexing_slicing)] // as in tlb_slot
    fn tlb_slot_mut(&mut self, la: u64) -> &mut TlbEntry {
        &mut self.tlb[host_usize(la >> 12) & (TLB_SIZE - 1)]
    }

    /// Host pointer and global page index for a GPA in RAM.
    #[inline]
    pub(crate) fn ram_lookup(&self, gpa: u64) -> Option<(*mut u8, usize)> {
        self.shared.ram_lookup(gpa)
    }

    /// The atomic view of the naturally aligned u64 of guest RAM at `gpa` (page-table
    /// entries); `None` for MMIO.
    fn phys_u64(&self, gpa: u64) -> Option<(&AtomicU64, usize)> {
        let (p, page) = self.ram_lookup(gpa & !7)?;
        // SAFETY: the GPA is inside RAM and 8-byte aligned (RAM regions start on page
        // boundaries and host mappings are page-aligned), so 8 bytes are mapped and aligned
        // for an AtomicU64; the mapping outlives the VM and so this `Mmu`, which the returned
        // reference does not outlive. Other vCPUs and the guest access the same bytes only
        // through host atomics or plain x86 loads and stores, which is what AtomicU64 does.
        Some((unsafe { AtomicU64::from_ptr(p as *mut u64) }, page))
    }

    /// Reads a naturally aligned u64 of guest RAM (page-table entries). MMIO reads as 0.
    pub(crate) fn read_phys_u64(&self, gpa: u64) -> u64 {
        self.phys_u64(gpa).map_or(0, |(a, _)| a.load(Ordering::Acquire))
    }

    /// Sets `bits` in the naturally aligned u64 of guest RAM at `gpa` if it still holds
    /// `old` (the accessed and dirty bits of a page-table entry, with a locked operation as
    /// the processor does: SDM Vol. 3A §4.8). Returns whether it did; `false` means another
    /// vCPU changed the entry and the walk must be redone. MMIO: nothing, `true`.
    pub(crate) fn set_phys_bits(&self, gpa: u64, old: u64, bits: u64) -> bool {
        let Some((a, page)) = self.phys_u64(gpa) else {
            return true;
        };
        let ok = a.compare_exchange(old, old | bits, Ordering::AcqRel, Ordering::Acquire).is_ok();
        self.shared.note_write(page);
        ok
    }

    /// Sets `bits` in the naturally aligned u64 of guest RAM at `gpa` with a locked OR,
    /// whatever it holds. MMIO: nothing.
    pub(crate) fn or_phys_bits(&self, gpa: u64, bits: u64) {
        if let Some((a, page)) = self.phys_u64(gpa) {
            a.fetch_or(bits, Ordering::AcqRel);
            self.shared.note_write(page);
        }
    }

    pub(crate) fn flush_all(&mut self) {
        self.tlb.fill(EMPTY);
    }

    pub(crate) fn flush_non_global(&mut self) {
        for e in self.tlb.iter_mut() {
            if e.perm & P_GLOBAL == 0 {
                *e = EMPTY;
            }
        }
    }

    pub(crate) fn flush_page(&mut self, la: u64) {
        *self.tlb_slot_mut(la) = EMPTY;
    }

    pub(crate) fn flush_code(&mut self) {
        self.shared.invalidate_all_code();
    }
}

/// Reads `size` (1, 2, 4, 8) little-endian bytes at `p`.
///
/// # Safety
/// `p` must be valid for reads of `size` bytes.
#[inline(always)]
unsafe fn host_read(p: *const u8, size: usize) -> u64 {
    // SAFETY: the caller guarantees `size` readable bytes at `p`; unaligned reads are used.
    unsafe {
        match size {
            1 => u64::from(p.read()),
            2 => u64::from((p as *const u16).read_unaligned()),
            4 => u64::from((p as *const u32).read_unaligned()),
            _ => (p as *const u64).read_unaligned(),
        }
    }
}

/// Writes the low `size` (1, 2, 4, 8) bytes of `val` at `p`, little-endian.
///
/// # Safety
/// `p` must be valid for writes of `size` bytes.
#[inline(always)]
unsafe fn host_write(p: *mut u8, size: usize, val: u64) {
    // SAFETY: the caller guarantees `size` writable bytes at `p`; unaligned writes are used.
    unsafe {
        match size {
            1 => p.write(low8(val)),
            2 => (p as *mut u16).write_unaligned(low16(val)),
            4 => (p as *mut u32).write_unaligned(low32(val)),
            _ => (p as *mut u64).write_unaligned(val),
        }
    }
}

/// Compare-and-swap loop of `size` (1, 2, 4, 8) bytes at `p`: see [`Cpu::atomic_rmw`].
///
/// # Safety
/// `p` must be valid for reads and writes of `size` bytes, aligned to `size`, for the call.
unsafe fn cas_loop(p: *mut u8, size: usize, f: &mut dyn FnMut(u64) -> Option<u64>) -> u64 {
    macro_rules! cas {
        ($atomic:ty, $t:ty) => {{
            // SAFETY: the caller guarantees `p` is valid and aligned for `$t`.
            let a = unsafe { <$atomic>::from_ptr(p as *mut $t) };
            let mut old = a.load(Ordering::SeqCst);
            loop {
                let Some(new) = f(u64::from(old)) else { break u64::from(old) };
                // Truncation to the operand size is intended: `new` is an operand-size value.
                #[allow(clippy::cast_possible_truncation)]
                match a.compare_exchange_weak(old, new as $t, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => break u64::from(old),
                    Err(now) => old = now,
                }
            }
        }};
    }
    match size {
        1 => cas!(std::sync::atomic::AtomicU8, u8),
        2 => cas!(std::sync::atomic::AtomicU16, u16),
        4 => cas!(AtomicU32, u32),
        _ => cas!(AtomicU64, u64),
    }
}

/// Host `lock cmpxchg16b` at `p`: returns the old value (equal to `expected` iff stored).
///
/// # Safety
/// `p` must be valid for reads and writes of 16 bytes and 16-byte aligned, and the host
/// must have CMPXCHG16B.
unsafe fn cmpxchg16(p: *mut u128, expected: u128, new: u128) -> u128 {
    let (mut lo, mut hi) = (low64(expected), low64(expected >> 64));
    // SAFETY: the caller guarantees 16 valid, aligned bytes at `p` and the instruction.
    // RBX is reserved by the compiler, so the new low half is swapped into it around the
    // instruction and restored afterwards.
    unsafe {
        std::arch::asm!(
            "xchg rdi, rbx",
            "lock cmpxchg16b xmmword ptr [rsi]",
            "mov rbx, rdi",
            in("rsi") p,
            inout("rdi") low64(new) => _,
            in("rcx") low64(new >> 64),
            inout("rax") lo,
            inout("rdx") hi,
            options(nostack),
        );
    }
    u128::from(lo) | (u128::from(hi) << 64)
}

/// The code generation of a RAM page a store went to (from a TLB entry), or nothing (MMIO).
/// Valid while the `Mmu` it came from exists (that holds the [`SharedRam`]).
#[derive(Clone, Copy)]
pub(crate) struct PageGen(*const AtomicU32);

impl PageGen {
    /// To call after storing into the page: retires code decoded from it (every vCPU's).
    #[inline(always)]
    pub(crate) fn written(self) {
        // The store must not move after the generation check (see SharedRam::mark_code):
        // the host keeps them in order on its own except for store-load reordering, which
        // mark_code's membarrier covers; this keeps the compiler from reordering them.
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        if !self.0.is_null() {
            // SAFETY: a non-null pointer comes from `SharedRam::gen_ptr`: it points into the
            // `gens` slice of a SharedRam that the Mmu owning the TLB entry keeps alive, and
            // callers use it only while that Mmu exists (within one instruction).
            note_write_gen(unsafe { &*self.0 });
        }
    }
}

/// A store by generated code hit a RAM page whose generation `g` has the code bit set:
/// retire that page's code (as [`PageGen::written`] does).
///
/// # Safety
/// `g` must come from a TLB entry's `gen` of a live `Mmu` (see [`PageGen`]), non-null.
pub(crate) unsafe fn jit_note_write(g: *const AtomicU32) {
    // SAFETY: the caller guarantees `g` points into a live SharedRam's `gens`.
    note_write_gen(unsafe { &*g });
}

#[inline]
fn is_canonical(la: u64) -> bool {
    ((la as i64) << 16 >> 16) as u64 == la
}

impl Cpu {
    /// Drops all cached translations and decoded instructions (after the VMM wrote guest
    /// memory or page tables behind the CPU's back, e.g. on restore).
    pub fn flush_caches(&mut self) {
        self.mmu.flush_all();
        self.mmu.flush_code();
    }

    /// The RAM state this vCPU shares with the other vCPUs of its VM.
    pub fn shared(&self) -> &Arc<SharedRam> {
        &self.mmu.shared
    }

    /// Retires code decoded from the guest RAM pages overlapping `len` bytes at GPA `gpa`
    /// (written behind the CPU's back, e.g. by device DMA). Non-RAM addresses are ignored.
    pub fn invalidate_code(&mut self, gpa: u64, len: u64) {
        self.mmu.shared.invalidate_code(gpa, len);
    }

    /// Translates a linear address, filling the TLB. Returns the TLB entry.
    #[cold]
    fn tlb_fill(&mut self, la: u64, acc: Access, user: bool) -> Res<TlbEntry> {
        self.stats.tlb_misses += 1;
        let page = la & !0xfff;
        // A walk whose accessed/dirty update lost a race with another vCPU's change of the
        // entry is redone; after a few tries the next one sets the bits regardless (as a
        // locked OR would), so a guest rewriting its tables in a loop cannot stall us.
        let mut tries = 0;
        let (gpa_page, perm) = loop {
            tries += 1;
            let force = tries > 8;
            let r = if self.cr0 & ctl::CR0_PG == 0 {
                Some((page & 0xffff_ffff, P_USER | P_WRITE | P_EXEC | P_READ))
            } else if self.efer & ctl::EFER_LMA != 0 {
                self.walk4(la, acc, user, force)?
            } else if self.cr4 & ctl::CR4_PAE != 0 {
                self.walk_pae(la, acc, user, force)?
            } else {
                self.walk2(la, acc, user, force)?
            };
            if let Some(r) = r {
                break r;
            }
        };
        let (host, gen) = match self.mmu.ram_lookup(gpa_page) {
            Some((p, i)) => (p, self.mmu.shared.gen_ptr(i)),
            None => (std::ptr::null_mut(), std::ptr::null()),
        };
        let perm = if host.is_null() { perm } else { perm | P_RAM };
        let e = TlbEntry { tag: page | TLB_VALID, host, gen, gpa: gpa_page, perm };
        *self.mmu.tlb_slot_mut(la) = e;
        Ok(e)
    }

    fn pf(&self, la: u64, acc: Access, user: bool, present: bool) -> Fault {
        let mut code = 0u32;
        if present {
            code |= 1;
        }
        if acc == Access::Write {
            code |= 2;
        }
        if user {
            code |= 4;
        }
        if acc == Access::Exec && self.efer & ctl::EFER_NXE != 0 {
            code |= 16;
        }
        Fault::PageFault(la, code)
    }

    /// Checks the accumulated permissions of a walk against the access.
    fn check_perm(&self, la: u64, acc: Access, user: bool, w: bool, u: bool, x: bool) -> Res<()> {
        let wp = self.cr0 & ctl::CR0_WP != 0;
        if user && !u {
            return Err(self.pf(la, acc, user, true));
        }
        if acc == Access::Write && !w && (user || wp) {
            return Err(self.pf(la, acc, user, true));
        }
        if acc == Access::Exec && !x {
            return Err(self.pf(la, acc, user, true));
        }
        Ok(())
    }

    /// 4-level walk (IA-32e paging). Returns the GPA of the 4 KiB page and permissions.
    /// `None`: an accessed/dirty update raced with a change of the entry (redo the walk);
    /// with `force` the bits are set without that check.
    fn walk4(&mut self, la: u64, acc: Access, user: bool, force: bool) -> Res<Option<(u64, u8)>> {
        if !is_canonical(la) {
            return Err(Fault::GeneralProtection(0));
        }
        let nxe = self.efer & ctl::EFER_NXE != 0;
        const ADDR: u64 = 0x000f_ffff_ffff_f000;
        let mut table = self.cr3 & ADDR;
        let (mut w, mut u, mut x) = (true, true, true);
        let mut level = 4;
        loop {
            let shift = 12 + 9 * (level - 1);
            let idx = (la >> shift) & 0x1ff;
            let pte_addr = table + idx * 8;
            let mut pte = self.mmu.read_phys_u64(pte_addr);
            if pte & 1 == 0 {
                return Err(self.pf(la, acc, user, false));
            }
            w &= pte & 2 != 0;
            u &= pte & 4 != 0;
            if nxe {
                x &= pte & (1 << 63) == 0;
            }
            let leaf = level == 1 || (level <= 3 && pte & 0x80 != 0);
            if !leaf {
                if pte & 0x20 == 0 {
                    if !self.set_pte_bits(pte_addr, pte, 0x20, force) {
                        return Ok(None);
                    }
                    pte |= 0x20;
                }
                table = pte & ADDR;
                level -= 1;
                continue;
            }
            self.check_perm(la, acc, user, w, u, x)?;
            let want = if acc == Access::Write { 0x60 } else { 0x20 };
            if pte & want != want {
                if !self.set_pte_bits(pte_addr, pte, want, force) {
                    return Ok(None);
                }
                pte |= want;
            }
            let page_mask: u64 = (1u64 << shift) - 1;
            let base = if level == 1 { pte & ADDR } else { pte & ADDR & !page_mask };
            let gpa = base | (la & page_mask & !0xfff);
            let mut perm = P_READ;
            if u {
                perm |= P_USER;
            }
            if w && pte & 0x40 != 0 {
                perm |= P_WRITE;
            }
            if x {
                perm |= P_EXEC;
            }
            if pte & 0x100 != 0 && self.cr4 & ctl::CR4_PGE != 0 {
                perm |= P_GLOBAL;
            }
            return Ok(Some((gpa, perm)));
        }
    }

    /// PAE walk (3 levels, 64-bit entries) for 32-bit protected mode with CR4.PAE.
    fn walk_pae(&mut self, la: u64, acc: Access, user: bool, force: bool) -> Res<Option<(u64, u8)>> {
        let la = la & 0xffff_ffff;
        let nxe = self.efer & ctl::EFER_NXE != 0;
        const ADDR: u64 = 0x000f_ffff_ffff_f000;
        let pdpte = self.mmu.read_phys_u64((self.cr3 & 0xffff_ffe0) + ((la >> 30) & 3) * 8);
        if pdpte & 1 == 0 {
            return Err(self.pf(la, acc, user, false));
        }
        let (mut w, mut u, mut x) = (true, true, true);
        let mut table = pdpte & ADDR;
        for level in [2u32, 1] {
            let shift = 12 + 9 * (level - 1);
            let pte_addr = table + ((la >> shift) & 0x1ff) * 8;
            let mut pte = self.mmu.read_phys_u64(pte_addr);
            if pte & 1 == 0 {
                return Err(self.pf(la, acc, user, false));
            }
            w &= pte & 2 != 0;
            u &= pte & 4 != 0;
            if nxe {
                x &= pte & (1 << 63) == 0;
            }
            if level == 2 && pte & 0x80 == 0 {
                if pte & 0x20 == 0 {
                    if !self.set_pte_bits(pte_addr, pte, 0x20, force) {
                        return Ok(None);
                    }
                    pte |= 0x20;
                }
                table = pte & ADDR;
                continue;
            }
            self.check_perm(la, acc, user, w, u, x)?;
            let want = if acc == Access::Write { 0x60 } else { 0x20 };
            if pte & want != want {
                if !self.set_pte_bits(pte_addr, pte, want, force) {
                    return Ok(None);
                }
                pte |= want;
            }
            let mask: u64 = (1u64 << shift) - 1;
            let gpa = (pte & ADDR & !mask) | (la & mask & !0xfff);
            let mut perm = P_READ;
            if u {
                perm |= P_USER;
            }
            if w && pte & 0x40 != 0 {
                perm |= P_WRITE;
            }
            if x {
                perm |= P_EXEC;
            }
            return Ok(Some((gpa, perm)));
        }
        Err(self.pf(la, acc, user, false))
    }

    /// Legacy 2-level 32-bit paging (4 KiB and, with CR4.PSE, 4 MiB pages).
    fn walk2(&mut self, la: u64, acc: Access, user: bool, force: bool) -> Res<Option<(u64, u8)>> {
        let la = la & 0xffff_ffff;
        let pde_addr = (self.cr3 & 0xffff_f000) + ((la >> 22) & 0x3ff) * 4;
        let pde = self.read_phys_u32(pde_addr);
        if pde & 1 == 0 {
            return Err(self.pf(la, acc, user, false));
        }
        let (mut w, mut u) = (pde & 2 != 0, pde & 4 != 0);
        let (gpa, pte_addr, pte) = if pde & 0x80 != 0 && self.cr4 & ctl::CR4_PSE != 0 {
            (u64::from(pde & 0xffc0_0000) | (la & 0x003f_f000), pde_addr, pde)
        } else {
            let pte_addr = u64::from(pde & 0xffff_f000) + ((la >> 12) & 0x3ff) * 4;
            let pte = self.read_phys_u32(pte_addr);
            if pte & 1 == 0 {
                return Err(self.pf(la, acc, user, false));
            }
            w &= pte & 2 != 0;
            u &= pte & 4 != 0;
            (u64::from(pte & 0xffff_f000), pte_addr, pte)
        };
        self.check_perm(la, acc, user, w, u, true)?;
        let want = if acc == Access::Write { 0x60 } else { 0x20 };
        if pte & want != want {
            let sh = (pte_addr & 4) * 8;
            let whole = self.mmu.read_phys_u64(pte_addr & !7);
            if low32(whole >> sh) != pte && !force {
                return Ok(None);
            }
            if !self.set_pte_bits(pte_addr & !7, whole, u64::from(want) << sh, force) {
                return Ok(None);
            }
        }
        let mut perm = P_READ | P_EXEC;
        if u {
            perm |= P_USER;
        }
        if w && (pte | want) & 0x40 != 0 {
            perm |= P_WRITE;
        }
        Ok(Some((gpa, perm)))
    }

    /// Sets `bits` (accessed/dirty) in the page-table entry at `gpa` that the walk read as
    /// `old`, atomically; `false` if the entry changed since (unless `force`, which sets the
    /// bits in whatever the entry holds now).
    fn set_pte_bits(&mut self, gpa: u64, old: u64, bits: u64, force: bool) -> bool {
        if force {
            self.mmu.or_phys_bits(gpa, bits);
            return true;
        }
        self.mmu.set_phys_bits(gpa, old, bits)
    }

    fn read_phys_u32(&self, gpa: u64) -> u32 {
        let v = self.mmu.read_phys_u64(gpa & !7);
        low32(v >> ((gpa & 4) * 8))
    }

    /// Looks up (or fills) the TLB entry for `la` with the rights `acc` needs.
    #[inline(always)]
    fn tlb_get(&mut self, la: u64, acc: Access, user: bool) -> Res<TlbEntry> {
        let e = *self.mmu.tlb_slot(la);
        let need = match acc {
            Access::Read => P_READ,
            Access::Write => P_WRITE,
            Access::Exec => P_EXEC,
        } | if user { P_USER } else { 0 };
        if e.tag == (la & !0xfff) | TLB_VALID && e.perm & need == need {
            return Ok(e);
        }
        self.tlb_fill(la, acc, user)
    }

    /// Translates a linear address to a GPA (used by the decoder and debug tools).
    pub(crate) fn translate(&mut self, la: u64, acc: Access, user: bool) -> Res<u64> {
        let e = self.tlb_get(la, acc, user)?;
        Ok(e.gpa | (la & 0xfff))
    }

    /// Reads `size` (1, 2, 4, 8) bytes at linear address `la`. The TLB-hit RAM case is
    /// inlined; everything else (miss, MMIO, page-crossing) goes to [`Cpu::read_la_slow`].
    #[inline(always)]
    pub(crate) fn read_la(&mut self, bus: &mut dyn Bus, la: u64, size: usize, user: bool) -> Res<u64> {
        let off = (la & 0xfff) as usize;
        let e = self.mmu.tlb_slot(la);
        let need = P_READ | if user { P_USER } else { 0 };
        if off + size <= 4096 && e.tag == (la & !0xfff) | TLB_VALID && e.perm & need == need && !e.host.is_null() {
            // SAFETY: the entry maps a whole 4 KiB RAM page and off + size <= 4096.
            return Ok(unsafe { host_read(e.host.add(off), size) });
        }
        self.read_la_slow(bus, la, size, user)
    }

    #[cold]
    #[inline(never)]
    fn read_la_slow(&mut self, bus: &mut dyn Bus, la: u64, size: usize, user: bool) -> Res<u64> {
        let off = (la & 0xfff) as usize;
        if off + size > 4096 {
            return self.read_split(bus, la, size, user);
        }
        let e = self.tlb_get(la, Access::Read, user)?;
        if !e.host.is_null() {
            // SAFETY: the entry maps a whole 4 KiB RAM page and off + size <= 4096.
            return Ok(unsafe { host_read(e.host.add(off), size) });
        }
        self.stats.mmio += 1;
        Ok(bus.mmio_read(e.gpa | off as u64, size_u8(size)))
    }

    #[cold]
    fn read_split(&mut self, bus: &mut dyn Bus, la: u64, size: usize, user: bool) -> Res<u64> {
        // Translate both pages first so a fault leaves nothing half done.
        self.tlb_get(la, Access::Read, user)?;
        self.tlb_get(la.wrapping_add(size as u64 - 1), Access::Read, user)?;
        let mut v = 0u64;
        for i in 0..size {
            let b = self.read_la(bus, la.wrapping_add(i as u64), 1, user)?;
            v |= b << (8 * i);
        }
        Ok(v)
    }

    /// Writes `size` (1, 2, 4, 8) bytes at linear address `la`. The TLB-hit RAM case is
    /// inlined; everything else goes to [`Cpu::write_la_slow`].
    #[inline(always)]
    pub(crate) fn write_la(&mut self, bus: &mut dyn Bus, la: u64, size: usize, val: u64, user: bool) -> Res<()> {
        let off = (la & 0xfff) as usize;
        let e = self.mmu.tlb_slot(la);
        let need = P_WRITE | if user { P_USER } else { 0 };
        if off + size <= 4096 && e.tag == (la & !0xfff) | TLB_VALID && e.perm & need == need && !e.host.is_null() {
            // SAFETY: the entry maps a whole 4 KiB RAM page and off + size <= 4096.
            unsafe { host_write(e.host.add(off), size, val) };
            PageGen(e.gen).written();
            return Ok(());
        }
        self.write_la_slow(bus, la, size, val, user)
    }

    #[cold]
    #[inline(never)]
    fn write_la_slow(&mut self, bus: &mut dyn Bus, la: u64, size: usize, val: u64, user: bool) -> Res<()> {
        let off = (la & 0xfff) as usize;
        if off + size > 4096 {
            return self.write_split(bus, la, size, val, user);
        }
        let e = *self.mmu.tlb_slot(la);
        let need = P_WRITE | if user { P_USER } else { 0 };
        let e = if e.tag == (la & !0xfff) | TLB_VALID && e.perm & need == need {
            e
        } else {
            self.write_slow_entry(la, user)?
        };
        if !e.host.is_null() {
            // SAFETY: the entry maps a whole 4 KiB RAM page and off + size <= 4096.
            unsafe { host_write(e.host.add(off), size, val) };
            PageGen(e.gen).written();
            return Ok(());
        }
        self.stats.mmio += 1;
        bus.mmio_write(e.gpa | off as u64, size_u8(size), val);
        Ok(())
    }

    /// Slow path of a write: walk (setting D) and return the entry (the caller retires code
    /// on the page after it stored, see [`PageGen::written`]).
    #[cold]
    fn write_slow_entry(&mut self, la: u64, user: bool) -> Res<TlbEntry> {
        self.tlb_fill(la, Access::Write, user)
    }

    #[cold]
    fn write_split(&mut self, bus: &mut dyn Bus, la: u64, size: usize, val: u64, user: bool) -> Res<()> {
        self.write_slow_entry(la, user)?;
        self.write_slow_entry(la.wrapping_add(size as u64 - 1), user)?;
        for i in 0..size {
            self.write_la(bus, la.wrapping_add(i as u64), 1, val >> (8 * i), user)?;
        }
        Ok(())
    }

    /// Host address of the 4 KiB page holding `la`, checked for writing (sets D), null for
    /// MMIO; and the page's code generation, whose [`PageGen::written`] the caller must call
    /// after its stores.
    pub(crate) fn page_host_for_write(&mut self, la: u64, user: bool) -> Res<(*mut u8, PageGen)> {
        let e = *self.mmu.tlb_slot(la);
        let need = P_WRITE | if user { P_USER } else { 0 };
        let e = if e.tag == (la & !0xfff) | TLB_VALID && e.perm & need == need {
            e
        } else {
            self.write_slow_entry(la, user)?
        };
        Ok((e.host, PageGen(e.gen)))
    }

    /// A locked read-modify-write of `size` (1, 2, 4, 8) bytes at linear `la` with the
    /// current privilege (Intel SDM Vol. 3A §9.1.2.2, "Software Controlled Bus Locking"):
    /// `f` gets the old value and returns the new one, or `None` to leave memory as it is
    /// (a failed CMPXCHG); returns the old value. The access needs write permission either
    /// way. `f` may run more than once (it must be a pure function of its argument).
    ///
    /// A naturally aligned access to RAM is a host compare-and-swap loop on the guest page,
    /// atomic against every other vCPU's accesses. Any other RAM access (misaligned or
    /// crossing a page) is done under the VM's fallback lock ([`SharedRam`]), atomic against
    /// every other locked access that cannot use a host atomic. MMIO cannot be locked: it is a
    /// plain read then write of the device (as KVM emulates it).
    pub(crate) fn atomic_rmw(
        &mut self,
        bus: &mut dyn Bus,
        la: u64,
        size: usize,
        f: &mut dyn FnMut(u64) -> Option<u64>,
    ) -> Res<u64> {
        let user = self.user();
        if la.is_multiple_of(size as u64) {
            let (host, gen) = self.page_host_for_write(la, user)?;
            if host.is_null() {
                let e = self.tlb_get(la, Access::Write, user)?;
                self.stats.mmio += 1;
                let gpa = e.gpa | (la & 0xfff);
                let old = bus.mmio_read(gpa, size_u8(size));
                if let Some(new) = f(old) {
                    bus.mmio_write(gpa, size_u8(size), new);
                }
                return Ok(old);
            }
            // SAFETY: `host` maps the whole 4 KiB RAM page holding `la`, and a naturally
            // aligned access of `size` bytes lies inside it; host mappings are page-aligned,
            // so the pointer is aligned for the atomic type of that size. The mapping outlives
            // the VM (RamRegion's contract), hence this call. Every other access to these
            // bytes is a host x86 load, store or locked instruction, which is what the atomic
            // types compile to, so mixing them is sound on this host.
            let old = unsafe { cas_loop(host.add((la & 0xfff) as usize), size, f) };
            gen.written();
            return Ok(old);
        }
        let shared = self.mmu.shared.clone();
        let _guard = shared.atomic_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.probe_write(la, size, user)?;
        let old = self.read_la(bus, la, size, user)?;
        if let Some(new) = f(old) {
            self.write_la(bus, la, size, new, user)?;
        }
        Ok(old)
    }

    /// A locked CMPXCHG16B at linear `la` (16-byte aligned: the caller raises #GP
    /// otherwise): if the 16 bytes equal `expected`, stores `new`. Returns the old value;
    /// the store happened if it equals `expected`. Host CMPXCHG16B on RAM; MMIO is a plain
    /// read then write.
    pub(crate) fn atomic_cmpxchg16(&mut self, bus: &mut dyn Bus, la: u64, expected: u128, new: u128) -> Res<u128> {
        let user = self.user();
        let (host, gen) = self.page_host_for_write(la, user)?;
        if host.is_null() || !is_x86_feature_detected!("cmpxchg16b") {
            let shared = self.mmu.shared.clone();
            let _guard = shared.atomic_lock.lock().unwrap_or_else(|e| e.into_inner());
            let lo = self.read_la(bus, la, 8, user)?;
            let hi = self.read_la(bus, la.wrapping_add(8), 8, user)?;
            let old = u128::from(lo) | (u128::from(hi) << 64);
            if old == expected {
                self.write_la(bus, la, 8, low64(new), user)?;
                self.write_la(bus, la.wrapping_add(8), 8, low64(new >> 64), user)?;
            }
            return Ok(old);
        }
        let p = host.wrapping_add((la & 0xfff) as usize) as *mut u128;
        // SAFETY: `la` is 16-byte aligned and its page is mapped RAM (`host` non-null, the
        // whole 4 KiB page), so the 16 bytes are inside the page and aligned as cmpxchg16b
        // needs; the host has the instruction (checked above); see atomic_rmw for why a host
        // atomic on guest RAM is sound here.
        let old = unsafe { cmpxchg16(p, expected, new) };
        gen.written();
        Ok(old)
    }

    /// Host address of the 4 KiB page holding `la`, checked for reading; null for MMIO.
    pub(crate) fn page_host_for_read(&mut self, la: u64, user: bool) -> Res<*mut u8> {
        Ok(self.tlb_get(la, Access::Read, user)?.host)
    }

    /// Checks that `size` bytes at `la` are writable without writing (for instructions that
    /// must not fault half-way).
    pub(crate) fn probe_write(&mut self, la: u64, size: usize, user: bool) -> Res<()> {
        self.write_slow_entry(la, user)?;
        if (la & 0xfff) as usize + size > 4096 {
            self.write_slow_entry(la.wrapping_add(size as u64 - 1), user)?;
        }
        Ok(())
    }

    /// Fetches up to 15 instruction bytes at linear `la` into `buf`; returns how many were
    /// readable (at least 1 or a fault) and the GPA of the first byte (None if MMIO).
    pub(crate) fn fetch(&mut self, la: u64, buf: &mut [u8; 16], user: bool) -> Res<(usize, Option<(u64, usize)>)> {
        let e = self.tlb_get(la, Access::Exec, user)?;
        let off = (la & 0xfff) as usize;
        let first = (4096 - off).min(15);
        if e.host.is_null() {
            return Err(Fault::GeneralProtection(0));
        }
        // SAFETY: off + first <= 4096 within a mapped RAM page.
        unsafe { std::ptr::copy_nonoverlapping(e.host.add(off), buf.as_mut_ptr(), first) };
        let page = self.mmu.ram_lookup(e.gpa).map(|(_, i)| i).unwrap_or(usize::MAX);
        let mut n = first;
        if first < 15 {
            // The instruction may cross into the next page; fetch it only if mapped.
            if let Ok(e2) = self.tlb_get(la.wrapping_add(first as u64), Access::Exec, user) {
                if !e2.host.is_null() {
                    // SAFETY: copies 15 - first bytes from the start of a mapped RAM page.
                    unsafe { std::ptr::copy_nonoverlapping(e2.host, buf.as_mut_ptr().add(first), 15 - first) };
                    n = 15;
                }
            }
        }
        Ok((n, Some((e.gpa | off as u64, page))))
    }

    /// Is this access made with user privileges (CPL 3)?
    #[inline(always)]
    pub(crate) fn user(&self) -> bool {
        self.cpl() == 3
    }

    /// Reads `buf.len()` bytes at linear `la` with supervisor rights (descriptor tables, TSS).
    pub(crate) fn read_sys(&mut self, bus: &mut dyn Bus, la: u64, size: usize) -> Res<u64> {
        self.read_la(bus, la, size, false)
    }

    /// Writes with supervisor rights.
    pub(crate) fn write_sys(&mut self, bus: &mut dyn Bus, la: u64, size: usize, v: u64) -> Res<()> {
        self.write_la(bus, la, size, v, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuConfig;
    use crate::NullBus;

    fn cpu_with_ram(ram: &mut Vec<u8>) -> Cpu {
        let r = RamRegion { gpa: 0, size: ram.len() as u64, host_addr: ram.as_mut_ptr() };
        let mut c = Cpu::new(vec![r], CpuConfig::default());
        c.cr0 = ctl::CR0_PE | ctl::CR0_PG | ctl::CR0_WP;
        c.cr4 = ctl::CR4_PAE;
        c.efer = ctl::EFER_LME | ctl::EFER_LMA | ctl::EFER_NXE;
        c.cr3 = 0x1000;
        c
    }

    fn put(ram: &mut [u8], gpa: usize, v: u64) {
        ram[gpa..gpa + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn get(ram: &[u8], gpa: usize) -> u64 {
        u64::from_le_bytes(ram[gpa..gpa + 8].try_into().unwrap())
    }

    /// Issue 8: a RAM size that is not a whole number of pages used to panic on any access
    /// to the partial last page. The partial page is now not RAM (it goes to the bus, like
    /// MMIO) and writes to it do not reach the host buffer.
    #[test]
    fn partial_last_page_is_not_ram() {
        let mut ram = vec![0u8; (1 << 20) + 1];
        let mut c = cpu_with_ram(&mut ram);
        c.cr0 = 0;
        c.cr4 = 0;
        c.efer = 0;
        let mut bus = NullBus;
        let edge = 1u64 << 20;
        c.write_la(&mut bus, edge, 1, 0xab, false).unwrap();
        assert_ne!(c.read_la(&mut bus, edge, 1, false).unwrap(), 0xab, "the byte went to the bus, not RAM");
        c.write_la(&mut bus, edge - 1, 1, 0xcd, false).unwrap();
        assert_eq!(c.read_la(&mut bus, edge - 1, 1, false).unwrap(), 0xcd);
        drop(c);
        assert_eq!(ram[1 << 20], 0, "the partial page was not written");
    }

    #[test]
    fn walk_4k_sets_accessed_and_dirty() {
        let mut ram = vec![0u8; 1 << 20];
        // la 0x40_0000 -> PML4[0] -> PDPT@0x2000 [0] -> PD@0x3000 [2] -> PT@0x4000 [0] -> 0x8000
        put(&mut ram, 0x1000, 0x2000 | 7);
        put(&mut ram, 0x2000, 0x3000 | 7);
        put(&mut ram, 0x3000 + 2 * 8, 0x4000 | 7);
        put(&mut ram, 0x4000, 0x8000 | 3);
        let mut c = cpu_with_ram(&mut ram);
        let mut bus = NullBus;
        c.write_la(&mut bus, 0x40_0010, 8, 0x1122_3344_5566_7788, false).unwrap();
        assert_eq!(c.read_la(&mut bus, 0x40_0010, 8, false).unwrap(), 0x1122_3344_5566_7788);
        drop(c);
        assert_eq!(get(&ram, 0x8010), 0x1122_3344_5566_7788);
        assert_eq!(get(&ram, 0x4000) & 0x60, 0x60, "A and D set on the PTE");
        assert_eq!(get(&ram, 0x1000) & 0x20, 0x20, "A set on the PML4E");
    }

    #[test]
    fn faults_have_right_error_codes() {
        let mut ram = vec![0u8; 1 << 20];
        put(&mut ram, 0x1000, 0x2000 | 7);
        put(&mut ram, 0x2000, 0x3000 | 7);
        put(&mut ram, 0x3000, 0x4000 | 7);
        put(&mut ram, 0x4000, 0x8000 | 1); // present, read-only, supervisor
        put(&mut ram, 0x4008, 0x9000 | 3 | (1 << 63)); // NX
        let mut c = cpu_with_ram(&mut ram);
        let mut bus = NullBus;
        // not present
        assert_eq!(c.read_la(&mut bus, 0x2000, 4, false), Err(Fault::PageFault(0x2000, 0)));
        // write to read-only with WP
        assert_eq!(c.write_la(&mut bus, 0x10, 4, 0, false), Err(Fault::PageFault(0x10, 3)));
        // user read of supervisor page
        assert_eq!(c.read_la(&mut bus, 0x10, 4, true), Err(Fault::PageFault(0x10, 5)));
        // instruction fetch from NX page
        let mut buf = [0u8; 16];
        assert_eq!(c.fetch(0x1000, &mut buf, false).err(), Some(Fault::PageFault(0x1000, 0x11)));
        // non-canonical
        assert_eq!(c.read_la(&mut bus, 0x0000_8000_0000_0000, 8, false), Err(Fault::GeneralProtection(0)));
    }

    #[test]
    fn large_pages_and_split_access() {
        let mut ram = vec![0u8; 8 << 20];
        put(&mut ram, 0x1000, 0x2000 | 7);
        put(&mut ram, 0x2000, 0x3000 | 7);
        put(&mut ram, 0x3000, 0x20_0000 | 0x83); // la 0..2M -> 2M..4M
        put(&mut ram, 0x3008, 0x40_0000 | 0x83); // la 2M..4M -> 4M..6M
        let mut c = cpu_with_ram(&mut ram);
        let mut bus = NullBus;
        c.write_la(&mut bus, 0x1f_fffc, 8, 0x0102_0304_0506_0708, false).unwrap();
        assert_eq!(c.read_la(&mut bus, 0x1f_fffc, 8, false).unwrap(), 0x0102_0304_0506_0708);
        drop(c);
        assert_eq!(&ram[0x3f_fffc..0x40_0000], &[8, 7, 6, 5]);
        assert_eq!(&ram[0x40_0000..0x40_0004], &[4, 3, 2, 1]);
    }
}
