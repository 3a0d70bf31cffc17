//! The decode layer: blocks of decoded instructions fetched through the MMU, lowered to
//! their fast forms ([`crate::uop`]) and cached by guest physical address.

use crate::cpu::{sreg, Cpu};
use crate::mmu::Access;
use crate::regs::host_usize;
use crate::uop::Uop;
use crate::{Fault, SRes, Stop};
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};

const BCACHE_SIZE: usize = 1 << 15;
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
    /// The block's compiled form.
    pub(crate) code: Compiled,
}

/// Signature of a compiled block: `(cpu, ctx) -> exit code` (see `crate::jit`).
pub(crate) type JitFn = unsafe extern "C" fn(*mut Cpu, *mut u8) -> u64;

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

/// Direct-mapped cache of decoded blocks keyed by the GPA of their first instruction; a
/// block is valid while its page's code generation is unchanged (a store to the page
/// retires it).
pub(crate) struct DecodeCache {
    e: Vec<Option<Block>>,
}

impl DecodeCache {
    pub(crate) fn new() -> DecodeCache {
        DecodeCache { e: (0..BCACHE_SIZE).map(|_| None).collect() }
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
    /// `gpa` and `ip` decoded at page generation `gen`.
    pub(crate) fn jit_slot_of(&mut self, slot: usize, gpa: u64, ip: u64, gen: u32) -> Option<&mut JitSlot> {
        match self.e.get_mut(slot) {
            Some(Some(b)) if b.gpa == gpa && b.ip == ip && b.gen == gen => Some(&mut b.jit),
            _ => None,
        }
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
    let idx = host_usize(gpa ^ (gpa >> 12)) & (BCACHE_SIZE - 1);
    if let Some(Some(b)) = cpu.dcache.e.get_mut(idx) {
        if b.gpa == gpa && b.ip == cpu.rip && b.bits == bits && cpu.mmu.shared.gen(b.page) == b.gen {
            return Ok(BlockRef { ops: b.ops.clone(), page: b.page, gen: b.gen, slot: idx, gpa });
        }
    }
    decode_block(cpu, la, bits, user, idx)
}

#[cold]
fn decode_block(cpu: &mut Cpu, la: u64, bits: u32, user: bool, idx: usize) -> SRes<BlockRef> {
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
    if let Some(slot) = cpu.dcache.e.get_mut(idx) {
        *slot = Some(Block {
            gpa,
            ip: cpu.rip,
            gen,
            page,
            bits,
            ops: ops.clone(),
            jit: JitSlot { hits: 0, code: Compiled::None },
        });
    }
    Ok(BlockRef { ops, page, gen, slot: idx, gpa })
}
