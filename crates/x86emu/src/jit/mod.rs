//! The translation tier: hot 64-bit guest blocks compiled to host code with Cranelift.
//!
//! The interpreter (`crate::exec`) stays the reference and runs cold code, rare
//! instructions and every mode but 64-bit. A decoded block (`crate::decode`) that has been
//! fetched [`HOT`] times (tier [`Tier::Auto`]; on first use with [`Tier::Jit`]) has its
//! leading run of fast forms (`crate::uop`, up to the first `Uop::Generic`) compiled into
//! one host function `extern "C" fn(cpu: *mut Cpu, ctx: *mut JitCtx) -> u64`
//! (`translate`). The compiled entry is stored in the decode-cache entry of the block, so
//! whatever retires the block (a store into its page by any vCPU, DMA, a flush) retires the
//! code with it.
//!
//! Semantics are exactly those of the fast forms: guest registers live in SSA variables
//! (loaded at entry, stored at every exit), memory goes through an inline TLB-hit test and
//! a call to `jit_read`/`jit_write` otherwise, arithmetic flags are computed lazily (a
//! compare feeding a branch becomes a host compare) and materialised bit-exactly (as the
//! host CPU computes them, see `crate::alu`) wherever they can be observed: at every exit
//! and before every instruction that may fault, so a fault leaves the architectural state
//! of the faulting instruction. ADC/SBB/IMUL and shifts call `crate::alu` through
//! `jit_alu`.
//!
//! Code memory is bounded: past [`CODE_LIMIT`] bytes the whole module is freed and every
//! compiled entry retired (the epoch moves on), so a guest that rewrites code forever
//! cannot grow host memory.

mod translate;

use crate::cpu::Cpu;
use crate::decode::{Compiled, JitFn, Op};
use crate::{Bus, Fault};
use cranelift_jit::{JITBuilder, JITModule};
use std::sync::OnceLock;

/// Which execution tier runs 64-bit guest code (`RUSTVISOR_EMU_TIER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The interpreter only.
    Interp,
    /// Compile every 64-bit block on its first execution (for tests).
    Jit,
    /// Compile blocks once they are hot ([`HOT`] executions).
    Auto,
}

impl Tier {
    /// The tier named by `RUSTVISOR_EMU_TIER` (`interp`, `jit` or `auto`; read once per
    /// process). Unset or anything else: [`Tier::Interp`].
    pub fn from_env() -> Tier {
        static T: OnceLock<Tier> = OnceLock::new();
        *T.get_or_init(|| match std::env::var("RUSTVISOR_EMU_TIER").as_deref() {
            Ok("jit") => Tier::Jit,
            Ok("auto") => Tier::Auto,
            _ => Tier::Interp,
        })
    }
}

/// Executions of a block after which tier [`Tier::Auto`] compiles it.
pub const HOT: u32 = 2048;

/// Shortest run of fast forms worth compiling in tier [`Tier::Auto`].
const MIN_LEN: usize = 3;

/// Bytes of generated code a vCPU may hold before all of it is thrown away.
pub const CODE_LIMIT: usize = 64 << 20;

/// Counters of the translation tier (per vCPU).
#[derive(Clone, Debug, Default)]
pub struct JitStats {
    /// Blocks compiled.
    pub compiled: u64,
    /// Bytes of host code generated (all epochs).
    pub code_bytes: u64,
    /// Times the code memory was thrown away (limit reached).
    pub flushes: u64,
    /// Entries into compiled code.
    pub entries: u64,
    /// Guest instructions retired in compiled code.
    pub instructions: u64,
}

/// Per-vCPU JIT state: the Cranelift module holding this vCPU's code and reusable
/// compilation contexts.
pub(crate) struct Jit {
    pub(crate) tier: Tier,
    module: Option<JITModule>,
    cl_ctx: Option<cranelift_codegen::Context>,
    fctx: cranelift_frontend::FunctionBuilderContext,
    /// Compiled entries of an older epoch belong to freed code.
    pub(crate) epoch: u32,
    /// Code bytes in the current module (and its link tables).
    held: usize,
    /// The link tables of the current module's blocks (from `Box::into_raw`).
    links: Vec<*mut [Link; 2]>,
    /// Code bytes allowed before the module is thrown away.
    limit: usize,
    pub(crate) stats: JitStats,
}

impl Jit {
    pub(crate) fn new() -> Jit {
        Jit {
            tier: Tier::from_env(),
            module: None,
            cl_ctx: None,
            fctx: cranelift_frontend::FunctionBuilderContext::new(),
            epoch: 0,
            held: 0,
            links: Vec::new(),
            limit: CODE_LIMIT,
            stats: JitStats::default(),
        }
    }

    fn free_module(&mut self) {
        self.cl_ctx = None;
        if let Some(m) = self.module.take() {
            // SAFETY: compiled code runs only inside `enter`, which holds `&mut Cpu` (and so
            // this `Jit`) for the call; none runs now, and moving the epoch on makes every
            // stored entry of this module stale, so none is called again.
            unsafe { m.free_memory() };
        }
        for l in self.links.drain(..) {
            // SAFETY: each pointer came from Box::into_raw in `compile` and is freed once,
            // here, when no code that refers to it can run again (see above).
            drop(unsafe { Box::from_raw(l) });
        }
        self.epoch = self.epoch.wrapping_add(1);
        self.held = 0;
    }
}

impl Drop for Jit {
    fn drop(&mut self) {
        self.free_module();
    }
}

fn new_module() -> Option<JITModule> {
    let b = JITBuilder::with_flags(
        &[("opt_level", "speed"), ("enable_verifier", "false")],
        cranelift_module::default_libcall_names(),
    )
    .ok()?;
    Some(JITModule::new(b))
}

/// Exit kinds in bits 32..40 of a compiled block's return value (bits 0..32: instructions
/// retired, the faulting one included).
pub(crate) const EXIT_NORMAL: u64 = 0;
/// A helper stored a fault in [`JitCtx`]; RIP is the faulting instruction's.
pub(crate) const EXIT_FAULT: u64 = 1;
/// #GP(0) raised by generated code (a non-canonical RET target); RIP as for a fault.
pub(crate) const EXIT_GP: u64 = 2;
/// A branch to a block on the same page; `JitCtx::link` points to its [`Link`].
pub(crate) const EXIT_LINK: u64 = 3;

/// What compiled code and its helpers share besides the `Cpu` (laid out for generated
/// code: the offsets are taken with `offset_of!`).
#[repr(C)]
pub(crate) struct JitCtx {
    /// The vCPU's TLB (`mmu::tlb_layout`).
    pub(crate) tlb: *const u8,
    /// Flags result of [`jit_alu`].
    pub(crate) flags_out: u64,
    /// Non-zero after a helper stored a fault in `fault`.
    pub(crate) faulted: u64,
    /// Instructions the block may retire in this entry (a block that loops onto itself
    /// runs again only while a whole pass fits).
    pub(crate) left: u64,
    /// The link of the exit taken (EXIT_LINK).
    pub(crate) link: *mut Link,
    /// `*mut &mut dyn Bus` of the running `Cpu::run`.
    bus: *mut u8,
    fault: Option<Fault>,
}

/// Reads `size` bytes at linear `la` for generated code (TLB miss, MMIO, page crossing).
/// On a fault stores it in `ctx` (faulted = 1) and returns 0.
///
/// # Safety
/// `cpu` and `ctx` are the pointers `enter` passed to the compiled block now running.
pub(crate) unsafe extern "C" fn jit_read(cpu: *mut Cpu, ctx: *mut JitCtx, la: u64, size: u64) -> u64 {
    // SAFETY: per the contract, both point to live objects that no Rust reference
    // aliases while compiled code runs; `bus` points to the `&mut dyn Bus` on enter's stack.
    let (cpu, ctx) = unsafe { (&mut *cpu, &mut *ctx) };
    // SAFETY: as above.
    let bus = unsafe { &mut **(ctx.bus as *mut &mut dyn Bus) };
    let user = cpu.cur_user;
    match cpu.read_la(bus, la, crate::regs::host_usize(size), user) {
        Ok(v) => v,
        Err(f) => {
            ctx.fault = Some(f);
            ctx.faulted = 1;
            0
        }
    }
}

/// Writes the low `size` bytes of `val` at linear `la` for generated code (the slow path);
/// a fault is stored in `ctx` as for [`jit_read`].
///
/// # Safety
/// As for [`jit_read`].
pub(crate) unsafe extern "C" fn jit_write(cpu: *mut Cpu, ctx: *mut JitCtx, la: u64, size: u64, val: u64) {
    // SAFETY: see jit_read.
    let (cpu, ctx) = unsafe { (&mut *cpu, &mut *ctx) };
    // SAFETY: see jit_read.
    let bus = unsafe { &mut **(ctx.bus as *mut &mut dyn Bus) };
    let user = cpu.cur_user;
    if let Err(f) = cpu.write_la(bus, la, crate::regs::host_usize(size), val, user) {
        ctx.fault = Some(f);
        ctx.faulted = 1;
    }
}

/// ALU operations that generated code leaves to `crate::alu` (codes of [`jit_alu`]).
pub(crate) mod aluop {
    pub(crate) const ADC: u64 = 0;
    pub(crate) const SBB: u64 = 1;
    pub(crate) const IMUL: u64 = 2;
    pub(crate) const SHL: u64 = 3;
    pub(crate) const SHR: u64 = 4;
    pub(crate) const SAR: u64 = 5;
    pub(crate) const ROL: u64 = 6;
    pub(crate) const ROR: u64 = 7;
}

/// `crate::alu` for generated code: `op` (an [`aluop`] code) on `a`, `b` at `size` bytes
/// with guest flags `flags`; returns the result, the new RFLAGS go to `ctx.flags_out`.
///
/// # Safety
/// `ctx` as for [`jit_read`].
pub(crate) unsafe extern "C" fn jit_alu(op: u64, size: u64, a: u64, b: u64, flags: u64, ctx: *mut JitCtx) -> u64 {
    use crate::alu::{self, Op2};
    let size = crate::regs::host_usize(size);
    let (r, f) = match op {
        aluop::ADC => alu::adc_sbb_imul(Op2::Adc, size, a, b, flags),
        aluop::SBB => alu::adc_sbb_imul(Op2::Sbb, size, a, b, flags),
        aluop::IMUL => alu::adc_sbb_imul(Op2::Imul, size, a, b, flags),
        aluop::SHL => alu::op2(Op2::Shl, size, a, b, flags),
        aluop::SHR => alu::op2(Op2::Shr, size, a, b, flags),
        aluop::SAR => alu::op2(Op2::Sar, size, a, b, flags),
        aluop::ROL => alu::op2(Op2::Rol, size, a, b, flags),
        _ => alu::op2(Op2::Ror, size, a, b, flags),
    };
    // SAFETY: see jit_read.
    unsafe { (*ctx).flags_out = f };
    r
}

/// A store by generated code hit a page holding code: retire it.
///
/// # Safety
/// `g` is the non-null `gen` of a TLB entry of the running vCPU.
pub(crate) unsafe extern "C" fn jit_note_write(g: *const u8) {
    // SAFETY: per the contract (see mmu::jit_note_write).
    unsafe { crate::mmu::jit_note_write(g as *const std::sync::atomic::AtomicU32) };
}

/// A link from a branch exit of a compiled block to the compiled block at its target, on
/// the same page (filled by the run loop, followed by [`enter`] without a lookup).
#[repr(C)]
pub(crate) struct Link {
    /// The target's code (None: not linked yet).
    pub(crate) f: Option<JitFn>,
    /// The target's length in instructions.
    pub(crate) len: u64,
}

/// Where a cached block is: its RAM page, that page's code generation and its slot in the
/// decode cache.
#[derive(Clone, Copy)]
pub(crate) struct BlockAt {
    pub(crate) page: usize,
    pub(crate) gen: u32,
    pub(crate) slot: usize,
}

/// A branch exit of compiled code waiting to be linked to the block the run loop fetches
/// next (see [`enter`]).
#[derive(Clone, Copy)]
pub(crate) struct WantLink {
    link: *mut Link,
    epoch: u32,
    rip: u64,
    page: usize,
    gen: u32,
    user: bool,
}

/// The compiled code for the block `ops` at `b` if it should run now: compiles it first when it is hot
/// enough. `None`: interpret. The caller has checked that the block is in 64-bit mode.
/// `want` is the link the previous compiled block asked for: it is filled when `b` is its
/// target.
#[inline]
pub(crate) fn lookup(cpu: &mut Cpu, ops: &[Op], b: BlockAt, want: Option<WantLink>) -> Option<(JitFn, u32)> {
    let (epoch, user, tier) = (cpu.jit.epoch, cpu.cur_user, cpu.jit.tier);
    let s = cpu.dcache.jit_slot(b.slot)?;
    let (f, len) = match s.code {
        Compiled::Code { f, len, epoch: e, user: u } if e == epoch => {
            if u != user {
                // Compiled for the other privilege (rare): interpret rather than compile
                // again on every switch.
                return None;
            }
            (f, len)
        }
        Compiled::Never => return None,
        _ => {
            s.hits = s.hits.saturating_add(1);
            if tier == Tier::Auto && s.hits < HOT {
                return None;
            }
            compile(cpu, ops, b)?
        }
    };
    if let Some(w) = want {
        let ip = ops.first().map_or(0, |o| o.ip);
        if w.epoch == cpu.jit.epoch && w.rip == ip && w.page == b.page && w.gen == b.gen && w.user == user {
            // SAFETY: `w.link` points into a link table of the current epoch (checked),
            // which lives until the module is freed; no reference to it exists.
            unsafe { *w.link = Link { f: Some(f), len: u64::from(len) } };
        }
    }
    Some((f, len))
}

#[cold]
fn compile(cpu: &mut Cpu, ops: &[Op], b: BlockAt) -> Option<(JitFn, u32)> {
    let len = ops.iter().take_while(|o| !matches!(o.uop, crate::uop::Uop::Generic)).count();
    // Entering compiled code costs about as much as interpreting two fast forms: in tier
    // Auto shorter runs stay with the interpreter (the Debian boot is faster that way);
    // tier Jit compiles every run, for the tests.
    let min = if cpu.jit.tier == Tier::Auto { MIN_LEN } else { 1 };
    if len < min {
        if let Some(s) = cpu.dcache.jit_slot(b.slot) {
            s.code = Compiled::Never;
        }
        return None;
    }
    if cpu.jit.held > cpu.jit.limit {
        cpu.jit.free_module();
        cpu.jit.stats.flushes += 1;
    }
    if cpu.jit.module.is_none() {
        cpu.jit.module = new_module();
    }
    let user = cpu.cur_user;
    let gen_ptr = cpu.mmu.shared.gen_ptr(b.page) as u64;
    let jit = &mut cpu.jit;
    let links = Box::into_raw(Box::new([Link { f: None, len: 0 }, Link { f: None, len: 0 }]));
    jit.links.push(links);
    jit.held += std::mem::size_of::<[Link; 2]>();
    let module = jit.module.as_mut()?;
    let ops = ops.get(..len)?;
    let env = translate::Env { user, gen_ptr, gen: b.gen, links: links as u64 };
    let cl_ctx = jit.cl_ctx.get_or_insert_with(|| cranelift_module::Module::make_context(module));
    let r = translate::compile(module, cl_ctx, &mut jit.fctx, ops, &env);
    let code = match r {
        Some((f, bytes)) => {
            jit.held += bytes;
            jit.stats.compiled += 1;
            jit.stats.code_bytes += bytes as u64;
            let len = u32::try_from(len).ok()?;
            Compiled::Code { f, len, epoch: jit.epoch, user }
        }
        None => Compiled::Never,
    };
    if let Some(s) = cpu.dcache.jit_slot(b.slot) {
        s.code = code;
    }
    match code {
        Compiled::Code { f, len, .. } => Some((f, len)),
        _ => None,
    }
}

/// Runs compiled block `f` (of the block at RAM page `page`, generation `gen`), and the
/// compiled blocks it is linked to while they fit in `left` instructions (>= the block's
/// length) and the page keeps its generation. Returns the instructions retired (the
/// faulting one included), the fault to raise, if any, and the link the last block's exit
/// asks to be filled; RIP, registers and flags are those after the last instruction
/// retired, or of the faulting instruction.
#[inline]
pub(crate) fn enter(
    cpu: &mut Cpu,
    bus: &mut dyn Bus,
    f: JitFn,
    left: u64,
    page: usize,
    gen: u32,
) -> (u64, Option<Fault>, Option<WantLink>) {
    let mut bus_ref: &mut dyn Bus = bus;
    let mut ctx = JitCtx {
        tlb: cpu.mmu.tlb_ptr() as *const u8,
        flags_out: 0,
        faulted: 0,
        left,
        link: std::ptr::null_mut(),
        bus: &mut bus_ref as *mut &mut dyn Bus as *mut u8,
        fault: None,
    };
    cpu.interrupt_shadow = false;
    let mut f = f;
    let mut total = 0u64;
    loop {
        cpu.jit.stats.entries += 1;
        ctx.left = left - total;
        // SAFETY: `f` was compiled by this vCPU's module in the current epoch (checked by
        // `lookup`, or a link of this epoch), so its code is live; it accesses the Cpu only
        // through the fields whose offsets `translate` took, and guest RAM through TLB
        // entries valid for this vCPU, and calls only the helpers above with these same
        // pointers. No Rust reference to `cpu` or `ctx` is used while it runs.
        let r = unsafe { f(cpu as *mut Cpu, &mut ctx as *mut JitCtx as *mut u8) };
        let n = r & 0xffff_ffff;
        cpu.jit.stats.instructions += n;
        total += n;
        let fault = match r >> 32 {
            EXIT_NORMAL => return (total, None, None),
            EXIT_LINK => {
                let l = ctx.link;
                // SAFETY: compiled code of this epoch stores a pointer to one of its own
                // link tables, live while the epoch lasts.
                let (nf, nlen) = unsafe { ((*l).f, (*l).len) };
                match nf {
                    Some(nf) if total + nlen <= left && cpu.mmu.shared.gen(page) == gen => {
                        f = nf;
                        continue;
                    }
                    Some(_) => return (total, None, None),
                    None => {
                        let w = WantLink { link: l, epoch: cpu.jit.epoch, rip: cpu.rip, page, gen, user: cpu.cur_user };
                        return (total, None, Some(w));
                    }
                }
            }
            EXIT_GP => Fault::GeneralProtection(0),
            _ => ctx.fault.unwrap_or(Fault::GeneralProtection(0)),
        };
        return (total, Some(fault), None);
    }
}

impl Cpu {
    /// Selects the execution tier of this vCPU (the default comes from
    /// `RUSTVISOR_EMU_TIER`, see [`Tier::from_env`]).
    pub fn set_tier(&mut self, tier: Tier) {
        self.jit.tier = tier;
    }

    /// The execution tier of this vCPU.
    pub fn tier(&self) -> Tier {
        self.jit.tier
    }

    /// Bytes of generated code this vCPU may hold before all of it is thrown away and
    /// recompiled on demand (default [`CODE_LIMIT`], 64 MiB).
    pub fn set_jit_code_limit(&mut self, bytes: usize) {
        self.jit.limit = bytes;
    }

    /// Counters of the translation tier.
    pub fn jit_stats(&self) -> &JitStats {
        &self.jit.stats
    }
}
