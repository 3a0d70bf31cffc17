//! Guest physical memory, 4-level paging (Intel SDM Vol. 3 §4.5) and the software TLB.

use crate::cpu::{ctl, Cpu};
use crate::regs::{host_usize, low16, low32, low8, size_u8};
use crate::{Bus, Fault, Res};

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

const TLB_SIZE: usize = 1024;
const TLB_VALID: u64 = 1;

/// Permission bits of a TLB entry.
pub(crate) const P_USER: u8 = 1;
/// Writable (W on every level, D already set, page holds no cached code).
pub(crate) const P_WRITE: u8 = 2;
/// Executable (no NX on any level).
pub(crate) const P_EXEC: u8 = 4;
/// Global page (survives CR3 writes).
pub(crate) const P_GLOBAL: u8 = 8;
/// Readable at all (always set on valid entries).
pub(crate) const P_READ: u8 = 16;

#[derive(Clone, Copy)]
pub(crate) struct TlbEntry {
    /// Linear page address | TLB_VALID.
    tag: u64,
    /// Host address of the page, or null for MMIO.
    host: *mut u8,
    /// GPA of the page.
    gpa: u64,
    perm: u8,
}

const EMPTY: TlbEntry = TlbEntry { tag: 0, host: std::ptr::null_mut(), gpa: 0, perm: 0 };

/// Kind of memory access, for permission checks and page-fault error codes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Access {
    Read,
    Write,
    Exec,
}

pub(crate) struct Mmu {
    pub(crate) ram: Vec<RamRegion>,
    /// First page index of each region in `code_gen`.
    page_base: Vec<usize>,
    tlb: Box<[TlbEntry; TLB_SIZE]>,
    /// Per RAM page: generation of decoded code (odd = page holds cached decodes).
    pub(crate) code_gen: Vec<u32>,
}

impl Mmu {
    /// Builds the MMU over `ram`. Only whole 4 KiB pages are RAM: a region that does not
    /// start on a page boundary is dropped and a partial last page is cut off (the VMM refuses
    /// such layouts; this keeps every RAM access inside the per-page tables regardless).
    pub(crate) fn new(ram: Vec<RamRegion>) -> Mmu {
        let ram: Vec<RamRegion> = ram
            .into_iter()
            .filter(|r| r.gpa.is_multiple_of(4096))
            .map(|r| RamRegion { size: r.size & !0xfff, ..r })
            .filter(|r| r.size > 0)
            .collect();
        let mut page_base = Vec::with_capacity(ram.len());
        let mut pages = 0usize;
        for r in &ram {
            page_base.push(pages);
            pages += host_usize(r.size / 4096);
        }
        Mmu { ram, page_base, tlb: Box::new([EMPTY; TLB_SIZE]), code_gen: vec![0; pages] }
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

    /// Reads a naturally aligned u64 of guest RAM (page-table entries). MMIO reads as 0.
    pub(crate) fn read_phys_u64(&self, gpa: u64) -> u64 {
        match self.ram_lookup(gpa & !7) {
            // SAFETY: the GPA is inside RAM and 8-byte aligned, so 8 bytes are mapped.
            Some((p, _)) => unsafe { (p as *const u64).read_volatile() },
            None => 0,
        }
    }

    pub(crate) fn write_phys_u64(&mut self, gpa: u64, val: u64) {
        if let Some((p, page)) = self.ram_lookup(gpa & !7) {
            self.note_write(page);
            // SAFETY: as in read_phys_u64.
            unsafe { (p as *mut u64).write_volatile(val) }
        }
    }

    /// A write hit RAM page `page`: retire its cached decodes.
    #[inline]
    pub(crate) fn note_write(&mut self, page: usize) {
        if let Some(g) = self.code_gen.get_mut(page) {
            if *g & 1 == 1 {
                *g = g.wrapping_add(1);
            }
        }
    }

    /// Marks RAM page `page` as holding cached decodes and revokes fast writes to it.
    pub(crate) fn mark_code(&mut self, page: usize, gpa_page: u64) -> u32 {
        // `page` comes from `ram_lookup`, so it is in range; were it not, generation 0 (even,
        // "no code") makes every later cache lookup miss instead of trusting stale code.
        let Some(g) = self.code_gen.get_mut(page) else {
            return 0;
        };
        if *g & 1 == 1 {
            return *g;
        }
        *g = g.wrapping_add(1);
        let gen = *g;
        for e in self.tlb.iter_mut() {
            if e.gpa == gpa_page {
                e.perm &= !P_WRITE;
            }
        }
        gen
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
        for g in self.code_gen.iter_mut() {
            if *g & 1 == 1 {
                *g = g.wrapping_add(1);
            }
        }
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

    /// Retires code decoded from the guest RAM pages overlapping `len` bytes at GPA `gpa`
    /// (written behind the CPU's back, e.g. by device DMA). Non-RAM addresses are ignored.
    pub fn invalidate_code(&mut self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa >> 12;
        let last = gpa.saturating_add(len - 1) >> 12;
        for page in first..=last {
            if let Some((_, idx)) = self.mmu.ram_lookup(page << 12) {
                self.mmu.note_write(idx);
            }
        }
    }

    /// Translates a linear address, filling the TLB. Returns the TLB entry.
    #[cold]
    fn tlb_fill(&mut self, la: u64, acc: Access, user: bool) -> Res<TlbEntry> {
        self.stats.tlb_misses += 1;
        let page = la & !0xfff;
        let (gpa_page, mut perm) = if self.cr0 & ctl::CR0_PG == 0 {
            (page & 0xffff_ffff, P_USER | P_WRITE | P_EXEC | P_READ)
        } else if self.efer & ctl::EFER_LMA != 0 {
            self.walk4(la, acc, user)?
        } else if self.cr4 & ctl::CR4_PAE != 0 {
            self.walk_pae(la, acc, user)?
        } else {
            self.walk2(la, acc, user)?
        };
        let (host, pidx) = match self.mmu.ram_lookup(gpa_page) {
            Some((p, i)) => (p, Some(i)),
            None => (std::ptr::null_mut(), None),
        };
        if let Some(i) = pidx {
            // An unknown page (not possible: `i` is from `ram_lookup`) is treated as code.
            if self.mmu.code_gen.get(i).is_none_or(|g| g & 1 == 1) {
                perm &= !P_WRITE;
            }
        }
        let e = TlbEntry { tag: page | TLB_VALID, host, gpa: gpa_page, perm };
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
    fn walk4(&mut self, la: u64, acc: Access, user: bool) -> Res<(u64, u8)> {
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
                    pte |= 0x20;
                    self.mmu.write_phys_u64(pte_addr, pte);
                }
                table = pte & ADDR;
                level -= 1;
                continue;
            }
            self.check_perm(la, acc, user, w, u, x)?;
            let want = if acc == Access::Write { 0x60 } else { 0x20 };
            if pte & want != want {
                pte |= want;
                self.mmu.write_phys_u64(pte_addr, pte);
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
            return Ok((gpa, perm));
        }
    }

    /// PAE walk (3 levels, 64-bit entries) for 32-bit protected mode with CR4.PAE.
    fn walk_pae(&mut self, la: u64, acc: Access, user: bool) -> Res<(u64, u8)> {
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
                    pte |= 0x20;
                    self.mmu.write_phys_u64(pte_addr, pte);
                }
                table = pte & ADDR;
                continue;
            }
            self.check_perm(la, acc, user, w, u, x)?;
            let want = if acc == Access::Write { 0x60 } else { 0x20 };
            if pte & want != want {
                pte |= want;
                self.mmu.write_phys_u64(pte_addr, pte);
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
            return Ok((gpa, perm));
        }
        Err(self.pf(la, acc, user, false))
    }

    /// Legacy 2-level 32-bit paging (4 KiB and, with CR4.PSE, 4 MiB pages).
    fn walk2(&mut self, la: u64, acc: Access, user: bool) -> Res<(u64, u8)> {
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
            self.write_phys_u32(pte_addr, pte | want);
        }
        let mut perm = P_READ | P_EXEC;
        if u {
            perm |= P_USER;
        }
        if w && (pte | want) & 0x40 != 0 {
            perm |= P_WRITE;
        }
        Ok((gpa, perm))
    }

    fn read_phys_u32(&self, gpa: u64) -> u32 {
        let v = self.mmu.read_phys_u64(gpa & !7);
        low32(v >> ((gpa & 4) * 8))
    }

    fn write_phys_u32(&mut self, gpa: u64, val: u32) {
        let v = self.mmu.read_phys_u64(gpa & !7);
        let sh = (gpa & 4) * 8;
        let nv = (v & !(0xffff_ffffu64 << sh)) | (u64::from(val) << sh);
        self.mmu.write_phys_u64(gpa & !7, nv);
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
            return Ok(());
        }
        self.stats.mmio += 1;
        bus.mmio_write(e.gpa | off as u64, size_u8(size), val);
        Ok(())
    }

    /// Slow path of a write: walk (setting D), retire cached code on the page, and return an
    /// entry that may be used for this one write.
    #[cold]
    fn write_slow_entry(&mut self, la: u64, user: bool) -> Res<TlbEntry> {
        let e = self.tlb_fill(la, Access::Write, user)?;
        if let Some((_, page)) = self.mmu.ram_lookup(e.gpa) {
            self.mmu.note_write(page);
        }
        Ok(e)
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

    /// Host address of the 4 KiB page holding `la`, checked for writing (sets D, retires
    /// cached code on the page); null for MMIO.
    pub(crate) fn page_host_for_write(&mut self, la: u64, user: bool) -> Res<*mut u8> {
        let e = *self.mmu.tlb_slot(la);
        let need = P_WRITE | if user { P_USER } else { 0 };
        let e = if e.tag == (la & !0xfff) | TLB_VALID && e.perm & need == need {
            e
        } else {
            self.write_slow_entry(la, user)?
        };
        Ok(e.host)
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
