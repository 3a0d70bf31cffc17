//! The decode layer: blocks of decoded instructions fetched through the MMU, lowered to
//! their fast forms ([`crate::uop`]) and cached by guest physical address.

use crate::cpu::{sreg, Cpu};
use crate::mmu::Access;
use crate::regs::hash_index;
use crate::uop::Uop;
use crate::{Fault, SRes, Stop};
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};

/// Blocks the decode cache holds: [`WAYS`]-way set associative. 64 K: a Debian boot decodes
/// ~140 K blocks; with 32 K, evictions threw away hit counts on the way to compilation
/// (interpreted instructions per boot 68.9 M -> 65.3 M, decodes -26 %, boot -1.3 %, for
/// ~10 MB more of the VMM's memory at the end of a boot: 80-byte slots and the blocks' ops).
const BCACHE_SIZE: usize = 1 << 16;
/// Ways per set: two hot blocks whose GPAs map to the same set (a loop and its caller, 32
/// KiB apart, thrashed a direct-mapped cache in a Debian boot, and each eviction threw the
/// block's compiled code away) both stay cached.
const WAYS: usize = 2;
/// log2 of the number of sets.
const SET_BITS: u32 = (BCACHE_SIZE / WAYS).trailing_zeros();

/// The first slot of the set of the block at `gpa` (Fibonacci hashing: every bit of the
/// GPA moves the set, unlike `gpa ^ gpa >> 12`, under which code 32 KiB apart collided).
#[inline]
fn set_base(gpa: u64) -> usize {
    hash_index(gpa, SET_BITS) * WAYS
}
/// Longest block decoded at once, in instructions.
const BLOCK_MAX: usize = 64;

/// A straight-line run of decoded instructions within one 4 KiB page, ending at a control
/// transfer (or an instruction that may change how code is fetched).
struct Block {
    gpa: u64,
    /// RIP of the first instruction.
    ip: u64,
    gen: u32,
    page: usize,
    bits: u32,
    ops: std::rc::Rc<[Op]>,
    /// The translation tier's view of the block; retired with it.
    jit: JitSlot,
}

/// What the translation tier keeps on a cached block.
#[derive(Clone, Copy)]
pub(crate) struct JitSlot {
    /// Executions counted by the translation tier (saturating).
    pub(crate) hits: u32,
    /// The vCPU's retired-instruction count / 1024 when the first execution was counted
    /// (wrapping): how fast the block became hot orders the compiler's queue.
    pub(crate) born: u32,
    /// The block's compiled form.
    pub(crate) code: Compiled,
    /// The block's baseline code (`crate::jit::baseline`), if any: valid while its epoch
    /// is the vCPU's baseline epoch, for the privilege it was compiled for (true: CPL 3).
    pub(crate) base: Option<(crate::jit::BaseFn, u32, bool)>,
}

/// The entry of a compiled block: a function `(cpu, ctx) -> exit code` in Cranelift's
/// `tail` calling convention (so that blocks can jump to each other), called from Rust only
/// through the translation tier's trampoline (see `crate::jit`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(transparent)]
pub(crate) struct JitFn(pub(crate) std::ptr::NonNull<u8>);

// SAFETY: a JitFn is the address of finalized, never-written code; sending it to another
// thread (the compiler thread's results) shares nothing mutable.
unsafe impl Send for JitFn {}

/// What the translation tier made of a cached block.
#[derive(Clone, Copy)]
pub(crate) enum Compiled {
    /// Not compiled (yet).
    None,
    /// Not to be compiled (Cranelift refused it).
    Never,
    /// Compiled: the entry point, the block's length in instructions, the JIT epoch it
    /// belongs to (code of an older epoch was freed) and the privilege (CPL 3 or not) its
    /// memory accesses check.
    Code { f: JitFn, len: u32, epoch: u32, user: bool },
    /// Being compiled in the background (tier Auto) since this JIT epoch.
    Pending { epoch: u32 },
}

/// One decoded instruction of a block: its fast form, its addresses and the full decode.
#[derive(Clone, Copy)]
pub(crate) struct Op {
    pub(crate) uop: Uop,
    pub(crate) ip: u64,
    pub(crate) next_ip: u64,
    pub(crate) insn: Instruction,
}

impl Op {
    fn new(insn: Instruction, bits: u32) -> Op {
        Op { uop: crate::uop::lower(&insn, bits), ip: insn.ip(), next_ip: insn.next_ip(), insn }
    }
}

/// Set-associative cache of decoded blocks keyed by the GPA of their first instruction; a
/// block is valid while its page's code generation is unchanged (a store to the page
/// retires it). A miss replaces an empty or retired way first, else the way of the set
/// used least recently.
pub(crate) struct DecodeCache {
    /// Slot `set * WAYS + way`.
    e: Vec<Option<Block>>,
    /// Per set: the way hit or filled last.
    mru: Vec<u8>,
}

impl DecodeCache {
    pub(crate) fn new() -> DecodeCache {
        DecodeCache { e: (0..BCACHE_SIZE).map(|_| None).collect(), mru: vec![0; BCACHE_SIZE / WAYS] }
    }
}

/// A block handed to the run loop.
pub(crate) struct BlockRef {
    /// Instructions and their fast forms.
    pub(crate) ops: std::rc::Rc<[Op]>,
    /// RAM page index (usize::MAX if uncached).
    pub(crate) page: usize,
    /// The page's code generation.
    pub(crate) gen: u32,
    /// Decode-cache slot of the block (usize::MAX if uncached).
    pub(crate) slot: usize,
    /// GPA of the block's first instruction.
    pub(crate) gpa: u64,
}

impl DecodeCache {
    /// The translation tier's state of the block in `slot` (the one `fetch_block` just
    /// returned).
    #[inline]
    pub(crate) fn jit_slot(&mut self, slot: usize) -> Option<&mut JitSlot> {
        match self.e.get_mut(slot) {
            Some(Some(b)) => Some(&mut b.jit),
            _ => None,
        }
    }

    /// The translation tier's state of the block in `slot` if that is still the block at
    /// `gpa` and `ip` decoded at page generation `gen` (blocks do not move between ways).
    pub(crate) fn jit_slot_of(&mut self, slot: usize, gpa: u64, ip: u64, gen: u32) -> Option<&mut JitSlot> {
        match self.e.get_mut(slot) {
            Some(Some(b)) if b.gpa == gpa && b.ip == ip && b.gen == gen => Some(&mut b.jit),
            _ => None,
        }
    }

    /// The slot a block decoded now at `gpa` goes to: an empty way of its set, else one
    /// whose page moved on (`gen_now` gives a page's current generation), else the way not
    /// used last.
    fn victim(&self, base: usize, gen_now: impl Fn(usize) -> u32) -> usize {
        for w in 0..WAYS {
            match self.e.get(base + w) {
                Some(Some(b)) if gen_now(b.page) == b.gen => {}
                _ => return base + w,
            }
        }
        let mru = usize::from(self.mru.get(base / WAYS).copied().unwrap_or(0));
        base + (mru + 1) % WAYS
    }
}

/// Whether decoding must stop after `insn`: control transfers and instructions that change
/// paging, segments or the fetch mode.
pub(crate) fn ends_block(insn: &Instruction) -> bool {
    use iced_x86::FlowControl;
    if insn.flow_control() != FlowControl::Next {
        return true;
    }
    match insn.mnemonic() {
        Mnemonic::Mov => {
            let r = insn.op0_register();
            r.is_cr() || r.is_segment_register()
        }
        Mnemonic::Wrmsr
        | Mnemonic::Invlpg
        | Mnemonic::Lgdt
        | Mnemonic::Lidt
        | Mnemonic::Ltr
        | Mnemonic::Hlt
        | Mnemonic::Sti
        | Mnemonic::Popf
        | Mnemonic::Popfq
        | Mnemonic::Popfd
        | Mnemonic::Out
        | Mnemonic::Lmsw
        | Mnemonic::Swapgs
        | Mnemonic::Pop => insn.mnemonic() != Mnemonic::Pop || insn.op0_register().is_segment_register(),
        _ => false,
    }
}

/// Whether `insn` ends decoded blocks only because it may open the interrupt window (or
/// latch an I/O device's interrupt): STI, IRET, OUT, POPF. Compiled code that runs one goes
/// on when no interrupt (or NMI) is pending right after it (see `jit::jit_generic`).
pub(crate) fn opens_window(insn: &Instruction) -> bool {
    matches!(
        insn.mnemonic(),
        Mnemonic::Sti
            | Mnemonic::Iret
            | Mnemonic::Iretd
            | Mnemonic::Iretq
            | Mnemonic::Out
            | Mnemonic::Popf
            | Mnemonic::Popfd
            | Mnemonic::Popfq
    )
}

/// Returns the decoded block starting at CS:RIP (from the cache or freshly decoded), the
/// RAM page index it lies on (usize::MAX if uncached) and that page's code generation.
#[inline]
pub(crate) fn fetch_block(cpu: &mut Cpu) -> SRes<BlockRef> {
    let bits = cpu.bitness();
    let la = if bits == 64 { cpu.rip } else { cpu.seg[sreg::CS].base.wrapping_add(cpu.rip) & 0xffff_ffff };
    let user = cpu.user();
    // The privilege level cannot change inside a block (transfers end blocks), so the fast
    // forms use this for every access of the block.
    cpu.cur_user = user;
    let gpa = cpu.translate(la, Access::Exec, user)?;
    let base = set_base(gpa);
    for w in 0..WAYS {
        if let Some(Some(b)) = cpu.dcache.e.get(base + w) {
            if b.gpa == gpa && b.ip == cpu.rip && b.bits == bits && cpu.mmu.shared.gen(b.page) == b.gen {
                let r = BlockRef { ops: b.ops.clone(), page: b.page, gen: b.gen, slot: base + w, gpa };
                if let Some(m) = cpu.dcache.mru.get_mut(base / WAYS) {
                    *m = u8::try_from(w).unwrap_or(0);
                }
                return Ok(r);
            }
        }
    }
    decode_block(cpu, la, bits, user, base)
}

#[cold]
fn decode_block(cpu: &mut Cpu, la: u64, bits: u32, user: bool, base: usize) -> SRes<BlockRef> {
    let mut buf = [0u8; 16];
    let (n, loc) = cpu.fetch(la, &mut buf, user)?;
    let off = (la & 0xfff) as usize;
    let Some((gpa, page)) = loc.filter(|(_, p)| *p != usize::MAX) else {
        return Err(Fault::GeneralProtection(0).into());
    };
    let Some((host, _)) = cpu.mmu.ram_lookup(gpa & !0xfff) else {
        return Err(Fault::GeneralProtection(0).into());
    };
    // Mark the page as code before reading it: a store to it from now on (by any vCPU, or
    // one still in flight, see `SharedRam::mark_code`) retires what is decoded here.
    let gen = cpu.mmu.shared.mark_code(page);
    // Decode from a copy of the bytes, so that every instruction is decoded from one
    // consistent view even while another vCPU stores into the page.
    let len = (4096 - off).min(BLOCK_MAX * 15);
    let mut bytes = [0u8; BLOCK_MAX * 15];
    // SAFETY: `host` maps the whole 4 KiB RAM page that holds `gpa`, and off + len <= 4096;
    // `bytes` has room for `len` bytes and does not overlap guest RAM.
    unsafe { std::ptr::copy_nonoverlapping(host.add(off) as *const u8, bytes.as_mut_ptr(), len) };
    let mut dec =
        Decoder::with_ip(bits, bytes.get(..len).unwrap_or_default(), cpu.rip, DecoderOptions::NO_INVALID_CHECK);
    let mut insns = Vec::with_capacity(8);
    while insns.len() < BLOCK_MAX && dec.can_decode() {
        let insn = dec.decode();
        if insn.is_invalid() {
            break;
        }
        let end = ends_block(&insn);
        insns.push(insn);
        if end {
            break;
        }
    }
    cpu.stats.decodes += insns.len() as u64;
    if insns.is_empty() {
        // The first instruction crosses the page end (or is invalid): decode it alone from
        // the bytes fetched across both pages, without caching it.
        let mut dec = Decoder::with_ip(bits, buf.get(..n).unwrap_or(&buf), cpu.rip, DecoderOptions::NO_INVALID_CHECK);
        let insn = dec.decode();
        if insn.is_invalid() {
            if n < 15 && dec.last_error() == iced_x86::DecoderError::NoMoreBytes {
                let next = (la | 0xfff).wrapping_add(1);
                cpu.translate(next, Access::Exec, user)?;
            }
            return Err(Stop::Fault(Fault::InvalidOpcode));
        }
        return Ok(BlockRef {
            ops: std::rc::Rc::from(vec![Op::new(insn, bits)]),
            page: usize::MAX,
            gen: 0,
            slot: usize::MAX,
            gpa,
        });
    }
    let ops: std::rc::Rc<[Op]> = insns.into_iter().map(|i| Op::new(i, bits)).collect();
    let shared = &cpu.mmu.shared;
    let idx = cpu.dcache.victim(base, |p| shared.gen(p));
    if let Some(m) = cpu.dcache.mru.get_mut(base / WAYS) {
        *m = u8::try_from(idx - base).unwrap_or(0);
    }
    if let Some(slot) = cpu.dcache.e.get_mut(idx) {
        *slot = Some(Block {
            gpa,
            ip: cpu.rip,
            gen,
            page,
            bits,
            ops: ops.clone(),
            jit: JitSlot { hits: 0, born: 0, code: Compiled::None, base: None },
        });
    }
    Ok(BlockRef { ops, page, gen, slot: idx, gpa })
}

/// The instructions of the block at 64-bit `ip` on RAM page `page` (at GPA `page_gpa`),
/// decoded as [`fetch_block`] would while the page keeps generation `gen`, but not cached:
/// for the translation tier's traces, which go on from a block to another on its page.
/// None if the page's generation moved on, or no whole instruction decodes at `ip` within
/// the page.
pub(crate) fn decode_on_page(cpu: &Cpu, page: usize, gen: u32, page_gpa: u64, ip: u64) -> Option<Vec<Op>> {
    let (host, p) = cpu.mmu.ram_lookup(page_gpa & !0xfff)?;
    if p != page {
        return None;
    }
    let off = (ip & 0xfff) as usize;
    let len = (4096 - off).min(BLOCK_MAX * 15);
    let mut bytes = [0u8; BLOCK_MAX * 15];
    // SAFETY: `host` maps the whole 4 KiB RAM page at `page_gpa` (RAM regions are whole
    // pages, as `decode_block` relies on), and off + len <= 4096; `bytes` has room for
    // `len` bytes and does not overlap guest RAM.
    unsafe { std::ptr::copy_nonoverlapping(host.add(off) as *const u8, bytes.as_mut_ptr(), len) };
    // The page was marked as code when its first block was decoded: a store to it since
    // has moved its generation on (and one after this look retires the trace as well).
    if cpu.mmu.shared.gen(page) != gen {
        return None;
    }
    let mut dec = Decoder::with_ip(64, bytes.get(..len).unwrap_or_default(), ip, DecoderOptions::NO_INVALID_CHECK);
    let mut ops = Vec::new();
    while ops.len() < BLOCK_MAX && dec.can_decode() {
        let insn = dec.decode();
        if insn.is_invalid() {
            break;
        }
        let end = ends_block(&insn);
        ops.push(Op::new(insn, 64));
        if end {
            break;
        }
    }
    (!ops.is_empty()).then_some(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuConfig, RamRegion};

    /// Two blocks whose GPAs fall in the same set, run alternately (a loop and its caller in
    /// a Debian boot did this), both stay cached: each is decoded once, and each keeps its
    /// translation-tier state (hit count) across the other's fetches.
    #[test]
    fn blocks_of_one_set_both_stay_cached() {
        let mut ram = vec![0u8; 1 << 20];
        // Two GPAs in the same set, on different pages: NOP; HLT at each.
        let a = 0x1000u64;
        let b = (a + 0x1000..ram.len() as u64 - 2).find(|&g| set_base(g) == set_base(a)).expect("a colliding GPA");
        for g in [a, b] {
            let g = crate::regs::host_usize(g);
            ram[g] = 0x90;
            ram[g + 1] = 0xf4;
        }
        let r = RamRegion { gpa: 0, size: ram.len() as u64, host_addr: ram.as_mut_ptr() };
        let mut cpu = Cpu::new(vec![r], CpuConfig::default());
        cpu.seg[sreg::CS].base = 0;
        for round in 0..10u32 {
            for g in [a, b] {
                cpu.rip = g;
                let blk = fetch_block(&mut cpu).unwrap_or_else(|_| panic!("fetch at {g:#x}"));
                assert_eq!(blk.gpa, g);
                let s = cpu.dcache.jit_slot(blk.slot).expect("cached");
                assert_eq!(s.hits, round, "block at {g:#x} lost its state");
                s.hits += 1;
            }
        }
        // NOP and HLT (HLT ends the block), decoded once per block.
        assert_eq!(cpu.stats.decodes, 4);
    }
}
