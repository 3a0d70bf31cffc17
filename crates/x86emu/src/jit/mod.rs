//! The translation tier: warm 64-bit guest blocks assembled from templates (`baseline`),
//! hot ones compiled to host code with Cranelift.
//!
//! The interpreter (`crate::exec`) stays the reference and runs cold code and every mode
//! but 64-bit. Tier [`Tier::Auto`] gives a block baseline code once it ran [`WARM`] times
//! (assembled on the vCPU's thread in microseconds, see `baseline`) and Cranelift's code
//! once it ran [`HOT`] times; what follows describes Cranelift's tier. A decoded block (`crate::decode`) that has been fetched [`HOT`] times (tier
//! [`Tier::Auto`]; on first use with [`Tier::Jit`]) is compiled whole into one host function
//! `fn(cpu: *mut Cpu, ctx: *mut JitCtx) -> u64` in Cranelift's `tail` convention
//! (`translate`): its fast forms (`crate::uop`) become inline code, every other instruction
//! a call to `jit_generic`, which runs it through the interpreter between a store and a
//! reload of the registers. The
//! compiled entry is stored in the decode-cache entry of the block, so whatever retires the
//! block (a store into its page by any vCPU, DMA, a flush) retires the code with it.
//!
//! Tier Auto compiles on a thread of its own per vCPU (`worker`): the vCPU interprets a hot
//! block until its code arrives and never waits for Cranelift. Tier Jit compiles in place.
//!
//! Compiled blocks run one after another without the run loop while the chunk's instruction
//! budget lasts: a direct branch to the same page goes through a `Link` of the block
//! (filled on first use), which the block's own code follows with a tail call of the
//! target's code when the target fits in the budget and the page kept its generation
//! (blocks use Cranelift's `tail` convention; Rust enters them through a trampoline). Any
//! other exit (a branch to another page, RET, an indirect transfer, the end of a loop or of
//! a block) tail-calls the jump-cache probe (`translate::probe`, QEMU's
//! `lookup_and_goto_ptr`), which goes on in the compiled block that the jump cache (a small
//! table from RIP to compiled code, QEMU's `tb_jmp_cache`) holds for RIP if RIP still
//! translates to it through the TLB, its page kept its code generation and the epoch and
//! privilege are the current ones; otherwise the block returns to `enter`, which looks
//! again (filling the TLB) and returns to the run loop on a miss.
//!
//! Semantics are exactly those of the interpreter: guest registers live in SSA variables
//! (loaded at entry, stored at every exit), memory goes through an inline TLB-hit test and
//! a call to `jit_read`/`jit_write` otherwise, arithmetic flags are computed lazily (a
//! compare feeding a branch becomes a host compare) and materialised bit-exactly (as the
//! host CPU computes them, see `crate::alu`) wherever they can be observed: at every exit
//! and before every instruction that may fault, so a fault leaves the architectural state
//! of the faulting instruction (exits rarely taken materialise them through
//! `jit_flags`). ADC, SBB, IMUL, shifts and rotates compute their results inline; their
//! flags, where observed, come from `crate::alu` through `jit_alu_flags`.
//!
//! Code memory (`codemem`) is one region per module mapped twice, written through a
//! read-write view and run through a read-execute one, so handing new code over costs no
//! system call. It is bounded: past [`CODE_LIMIT`] bytes the whole module is freed and
//! every compiled entry retired (the epoch moves on), so a guest that rewrites code
//! forever cannot grow host memory.

mod baseline;
mod codemem;
mod translate;
mod worker;

use crate::cpu::Cpu;
use crate::decode::{Compiled, JitFn, Op};
use crate::regs::host_usize;
use crate::{Bus, Exit, Fault, Stop};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::FuncId;
use iced_x86::Instruction;
use std::sync::OnceLock;

pub(crate) use baseline::BaseFn;

/// Which execution tier runs 64-bit guest code (`RUSTVISOR_EMU_TIER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The interpreter only.
    Interp,
    /// Compile every 64-bit block on its first execution (for tests).
    Jit,
    /// Compile every 64-bit block on its first execution with the baseline tier only (for
    /// tests).
    Base,
    /// Baseline code for blocks run [`WARM`] times, Cranelift's for blocks run [`HOT`]
    /// times.
    Auto,
}

impl Tier {
    /// The tier named by `RUSTVISOR_EMU_TIER` (`interp`, `jit` or `auto`; read once per
    /// process; `base` for [`Tier::Base`]). Unset or anything else: [`Tier::Auto`].
    pub fn from_env() -> Tier {
        static T: OnceLock<Tier> = OnceLock::new();
        *T.get_or_init(|| match std::env::var("RUSTVISOR_EMU_TIER").as_deref() {
            Ok("jit") => Tier::Jit,
            Ok("interp") => Tier::Interp,
            Ok("base") => Tier::Base,
            _ => Tier::Auto,
        })
    }
}

/// Executions of a block after which tier [`Tier::Auto`] compiles it.
pub const HOT: u32 = 1024;

/// Executions of a block after which tier [`Tier::Auto`] gives it baseline code.
pub const WARM: u32 = 16;

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
    /// Entries into compiled code from the run loop.
    pub entries: u64,
    /// Compiled blocks entered after another through a jump cache (either tier's probe, or
    /// `enter` between blocks); links and patched jumps are not counted (a count there
    /// cost a read-modify-write of the context per block transition).
    pub chained: u64,
    /// Guest instructions retired in compiled code.
    pub instructions: u64,
    /// Host time spent compiling, nanoseconds.
    pub compile_ns: u64,
    /// Blocks given baseline code.
    pub base_compiled: u64,
    /// Bytes of baseline code generated (all epochs).
    pub base_bytes: u64,
    /// Entries into baseline code.
    pub base_entries: u64,
    /// Guest instructions retired in baseline code.
    pub base_instructions: u64,
    /// Host time spent assembling baseline code, nanoseconds.
    pub base_ns: u64,
    /// Baseline exits linked straight to their target's baseline code.
    pub base_links: u64,
    /// Blocks compiled (or sent to be) with the blocks they jump or call to on their page
    /// (see `trace`).
    pub traces: u64,
}

/// Per-vCPU JIT state: the Cranelift module holding this vCPU's code and reusable
/// compilation contexts.
pub(crate) struct Jit {
    pub(crate) tier: Tier,
    module: Option<CodeModule>,
    cl_ctx: Option<cranelift_codegen::Context>,
    fctx: cranelift_frontend::FunctionBuilderContext,
    /// Compiled entries of an older epoch belong to freed code.
    pub(crate) epoch: u32,
    /// Code bytes in the current module (and its link tables).
    held: usize,
    /// The link tables of the current module's blocks (from `Box::into_raw`).
    links: Vec<*mut [Link; 2]>,
    /// Copies of the instructions of the current module's blocks, which their code passes
    /// to [`jit_generic`] (owned here so that they live as long as the code, whatever
    /// happens to the decode cache).
    insns: Vec<Box<[Instruction]>>,
    /// The jump cache (see [`JcEntry`]).
    jc: Box<[JcEntry<JitFn>]>,
    /// Tier Auto's compiler thread (started on the first hot block).
    worker: Option<worker::Worker>,
    /// Baseline code (made on the first warm block; None after the host refused it).
    base: Option<baseline::BaseCode>,
    base_refused: bool,
    /// Baseline code of an older epoch was thrown away.
    pub(crate) base_epoch: u32,
    /// The baseline tier's jump cache (see [`JcEntry`]).
    bjc: Box<[JcEntry<BaseFn>]>,
    /// Code bytes allowed before the module is thrown away.
    limit: usize,
    pub(crate) stats: JitStats,
    /// Compiled code of this vCPU may run SSE arithmetic inline, whose exception flags
    /// the host's MXCSR collects (see [`collect_fp_flags`]).
    pub(crate) host_fp: bool,
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
            insns: Vec::new(),
            jc: vec![JcEntry::EMPTY; JC_SIZE].into_boxed_slice(),
            worker: None,
            base: None,
            base_refused: false,
            base_epoch: 0,
            bjc: vec![JcEntry::EMPTY; JC_SIZE].into_boxed_slice(),
            limit: CODE_LIMIT,
            stats: JitStats::default(),
            host_fp: false,
        }
    }

    fn free_module(&mut self) {
        self.cl_ctx = None;
        if let Some(m) = self.module.take() {
            // SAFETY: compiled code runs only inside `enter`, which holds `&mut Cpu` (and so
            // this `Jit`) for the call; none runs now, and moving the epoch on makes every
            // stored entry of this module stale, so none is called again.
            unsafe { m.m.free_memory() };
        }
        for l in self.links.drain(..) {
            // SAFETY: each pointer came from Box::into_raw in `compile` and is freed once,
            // here, when no code that refers to it can run again (see above).
            drop(unsafe { Box::from_raw(l) });
        }
        self.insns.clear();
        self.epoch = self.epoch.wrapping_add(1);
        if let Some(w) = self.worker.as_mut() {
            w.flush();
        }
        self.held = 0;
    }
}

impl Drop for Jit {
    fn drop(&mut self) {
        self.free_module();
    }
}

/// Bytes of code memory a module maps beyond [`CODE_LIMIT`]: the code compiled after the
/// limit was passed and before the vCPU threw the module away (at most `worker::QUEUE`
/// blocks in flight, tens of KiB each). Kept small: a host with strict overcommit
/// (`vm.overcommit_memory=2`) charges the whole shared mapping. A block that does not
/// fit is not compiled.
const CODE_HEADROOM: usize = 16 << 20;

/// A Cranelift module whose code lives in a [`codemem::DualMapped`] region (written at one
/// address, run at another), or in Cranelift's own memory where the host refuses that.
pub(crate) struct CodeModule {
    pub(crate) m: JITModule,
    /// [`codemem::DualMapped::exec_offset`] (0 in Cranelift's own memory).
    exec: isize,
}

impl CodeModule {
    /// The address function `id` (defined and finalized) runs at.
    pub(crate) fn entry(&self, id: FuncId) -> *const u8 {
        // An address in the other mapping of the same pages, which the region exposed.
        let at = self.m.get_finalized_function(id).expose_provenance().wrapping_add_signed(self.exec);
        std::ptr::with_exposed_provenance(at)
    }
}

/// A module with `size` bytes of code memory; None if Cranelift or the host refuses.
pub(super) fn new_module(size: usize) -> Option<CodeModule> {
    // opt_level none: the translator already emits simple IR (constants made once, no
    // redundant loads); Cranelift's e-graph pass cost a third of the compile time for no
    // measurable gain in the code (a boot: compiler thread 2.5 s -> 2.0 s, vCPU ~5 % less).
    let mut b = JITBuilder::with_flags(
        &[("opt_level", "none"), ("enable_verifier", "false"), ("preserve_frame_pointers", "true")],
        cranelift_module::default_libcall_names(),
    )
    .ok()?;
    // Where the host refuses the second mapping (valgrind does), Cranelift's own memory:
    // code written and run at one address, `mprotect`ed when finalized.
    let exec = match codemem::DualMapped::new(size) {
        Ok(mem) => {
            let exec = mem.exec_offset();
            b.memory_provider(Box::new(mem));
            exec
        }
        Err(_) => 0,
    };
    Some(CodeModule { m: JITModule::new(b), exec })
}

/// Where compiled code is described for `perf` (see [`set_perf_map`]).
static PERF_MAP: OnceLock<std::sync::Mutex<std::fs::File>> = OnceLock::new();

/// Describes every block compiled from now on in `map`, one line per function in the
/// format `perf report` reads from `/tmp/perf-PID.map`: `START SIZE NAME` (hexadecimal
/// host address and size in bytes; the name carries the guest RIP of the block). The file
/// is opened by the caller before the VMM's threads and seccomp filters start, and only
/// written to afterwards. Only the first call takes effect.
///
/// Cranelift's own JIT writes such a map when `PERF_BUILDID_DIR` is set (`perf record`
/// sets it), by opening the file for every function, which a seccomp-filtered thread may
/// not do: a process that calls this should remove that variable first.
pub fn set_perf_map(map: std::fs::File) {
    let _ = PERF_MAP.set(std::sync::Mutex::new(map));
}

/// Appends compiled code at `at`, `size` bytes, to the perf map if there is one.
pub(crate) fn perf_map_note(at: *const u8, size: usize, what: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Some(m) = PERF_MAP.get() {
        if let Ok(mut f) = m.lock() {
            // One write per line, so that lines of concurrent compiler threads do not mix;
            // a failed write loses a symbol, nothing else.
            let line = format!("{:x} {size:x} {what}\n", at.addr());
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// How Rust calls a compiled block (which uses Cranelift's `tail` convention, so that
/// blocks can tail-call each other): `tramp(cpu, ctx, block)`.
type Tramp = unsafe extern "C" fn(*mut Cpu, *mut u8, *const u8) -> u64;

/// The code every vCPU's blocks share, compiled once per process into a module of its own
/// that is never freed (a few hundred bytes): the trampoline and the jump-cache probe
/// (`translate::probe`, its address). None if Cranelift or the host refuses: then nothing
/// is compiled.
fn shared_code() -> Option<(Tramp, u64)> {
    static T: OnceLock<Option<(usize, usize)>> = OnceLock::new();
    let (t, p) = (*T.get_or_init(|| {
        let mut m = new_module(64 << 10)?;
        let t = translate::trampoline(&mut m)?;
        let p = translate::probe(&mut m)?;
        // Its code must outlive every vCPU: the module is never freed.
        std::mem::forget(m);
        Some((t as usize, p as usize))
    }))?;
    // SAFETY: `t` is the finalized entry of the function `translate::trampoline` compiled
    // with exactly this signature in the host's C convention, in memory never freed.
    let tramp = unsafe { std::mem::transmute::<*const u8, Tramp>(t as *const u8) };
    Some((tramp, p as u64))
}

/// The trampoline (see [`shared_code`]).
fn trampoline() -> Option<Tramp> {
    shared_code().map(|c| c.0)
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
/// [`jit_generic`] met a reason to leave `Cpu::run` (stored in `JitCtx::exit`); RIP is the
/// instruction's.
pub(crate) const EXIT_STOP: u64 = 4;
/// [`jit_generic`] ran an instruction after which the run loop must look at the vCPU
/// (a transfer, HLT, a mode, privilege or interrupt-window change): no chaining.
pub(crate) const EXIT_YIELD: u64 = 5;

/// What compiled code and its helpers share besides the `Cpu` (laid out for generated
/// code: the offsets are taken with `offset_of!`).
#[repr(C)]
pub(crate) struct JitCtx {
    /// The vCPU's TLB (`mmu::tlb_layout`).
    pub(crate) tlb: *const u8,
    /// Non-zero after a helper stored a fault in `fault`.
    pub(crate) faulted: u64,
    /// Instructions the running block and those after it may retire in this entry (a
    /// block that loops onto itself runs again only while a whole pass fits); a block left
    /// for another in compiled code (either tier) takes its count from here, so that what
    /// it went down by is what those blocks retired.
    pub(crate) left: u64,
    /// The link of the exit taken (EXIT_LINK), or of a link exit not filled yet on its way
    /// through the probe (null otherwise: `enter` clears it before every run).
    pub(crate) link: *mut Link,
    /// Blocks entered through either tier's probe in this call.
    pub(crate) chained: u64,
    /// `*mut &mut dyn Bus` of the running `Cpu::run`.
    bus: *mut u8,
    fault: Option<Fault>,
    /// The reason to leave `Cpu::run` of an [`EXIT_STOP`].
    exit: Option<Exit>,
    /// The vCPU's jump cache (`[JcEntry<JitFn>; JC_SIZE]`), for `translate::probe`.
    pub(crate) jc: *const JcEntry<JitFn>,
    /// The code generations of the RAM pages (`SharedRam::gen_ptr(0)`), for the probe.
    pub(crate) gens: *const u8,
    /// The current epoch, for the probe.
    pub(crate) epoch: u64,
    /// The privilege (1: CPL 3) of the running code, for the probe.
    pub(crate) user: u64,
    /// RAM page and code generation of the block that took an [`EXIT_LINK`] (the link's
    /// target must lie on that page, decoded at that generation, to be filled).
    pub(crate) link_page: u64,
    pub(crate) link_gen: u64,
    /// The vCPU's baseline jump cache (`[JcEntry<BaseFn>; JC_SIZE]`), for the baseline
    /// probe.
    pub(crate) bjc: *const u8,
    /// The current baseline epoch, for the baseline probe.
    pub(crate) base_epoch: u64,
    /// Address of the `jmp rel32` of the baseline exit that just went to the probe, when
    /// it can be linked (`baseline::Emit::exit_link`); the probe then leaves its target to
    /// `enter`, which links it.
    pub(crate) link_site: u64,
    /// Address of the chain entry of a baseline block whose run counter counted a batch of
    /// runs (`baseline::chain_entry`), for `enter`.
    pub(crate) credit: u64,
    /// The arithmetic flags left lazily by the last Cranelift block (QEMU's `cc_op`): 0, or
    /// the `kind << 8 | size` of [`jit_flags`] for an operation on `lf_a`, `lf_b` giving
    /// `lf_r`, which RFLAGS's arithmetic flags are then computed from (`Cpu::rflags`
    /// holds the others, and CF before an INC or DEC). Set only at Cranelift blocks' exits
    /// and read by the next block where it looks at flags; made 0 (RFLAGS materialised)
    /// before anything else runs: a helper that needs RFLAGS, the baseline code the probe
    /// goes on in, and `enter` after every run ([`JitCtx::settle_flags`]).
    pub(crate) lf_kind: u64,
    pub(crate) lf_a: u64,
    pub(crate) lf_b: u64,
    pub(crate) lf_r: u64,
}

impl JitCtx {
    /// Materialises the lazily kept arithmetic flags (`lf_kind`) into `cpu.rflags`.
    #[inline]
    fn settle_flags(&mut self, cpu: &mut Cpu) {
        if self.lf_kind != 0 {
            cpu.rflags = jit_flags(self.lf_kind, self.lf_a, self.lf_b, self.lf_r, cpu.rflags);
            self.lf_kind = 0;
        }
    }
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
    let fp = cpu.jit.host_fp;
    if fp {
        collect_fp_flags(cpu);
    }
    let r = match cpu.read_la(bus, la, crate::regs::host_usize(size), user) {
        Ok(v) => v,
        Err(f) => {
            ctx.fault = Some(f);
            ctx.faulted = 1;
            0
        }
    };
    if fp {
        discard_fp_flags();
    }
    r
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
    let fp = cpu.jit.host_fp;
    if fp {
        collect_fp_flags(cpu);
    }
    if let Err(f) = cpu.write_la(bus, la, crate::regs::host_usize(size), val, user) {
        ctx.fault = Some(f);
        ctx.faulted = 1;
    }
    if fp {
        discard_fp_flags();
    }
}

/// The host thread's MXCSR.
#[inline]
fn host_mxcsr() -> u32 {
    let mut v = 0u32;
    // SAFETY: STMXCSR writes the 4 bytes of `v`; SSE is part of x86-64.
    unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack, preserves_flags)) };
    v
}

/// Clears the host MXCSR's exception flags (bits 0-5), keeping its control bits.
#[inline]
fn clear_host_flags(csr: u32) {
    let v = csr & !0x3f;
    // SAFETY: LDMXCSR of a value STMXCSR returned with flags cleared: no reserved bit set,
    // the host's own masks and rounding kept.
    unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &v, options(nostack, preserves_flags, readonly)) };
}

/// Compiled SSE arithmetic (`translate`, fast forms of `crate::uop::Sse`) runs on the
/// host's SSE unit under the host thread's MXCSR, which equals the guest's up to the flags
/// (checked inline); the exception flags it raises accumulate in the host MXCSR. This
/// moves them into the guest's MXCSR and clears them: after compiled code ran and before
/// any Rust code it calls (which may use floating point itself, or read or replace the
/// guest's MXCSR: STMXCSR, LDMXCSR, FXSAVE, XRSTOR... in the interpreter).
#[inline]
pub(crate) fn collect_fp_flags(cpu: &mut Cpu) {
    let h = host_mxcsr();
    if h & 0x3f != 0 {
        cpu.fpu.mxcsr |= h & 0x3f;
        clear_host_flags(h);
    }
}

/// Clears flags the host MXCSR holds that are not the guest's (raised by Rust code), before
/// compiled code runs or after a helper it called returns.
#[inline]
pub(crate) fn discard_fp_flags() {
    let h = host_mxcsr();
    if h & 0x3f != 0 {
        clear_host_flags(h);
    }
}

/// Bit of [`jit_generic`]'s `how`: yield to the run loop after the instruction, whatever it
/// did (it ends a decoded block: it may change translations, segments, the interrupt flag).
pub(crate) const GEN_YIELD: u64 = 2;

/// Bit of [`jit_generic`]'s `how` (with [`GEN_YIELD`]): the instruction ends its block only
/// because it may open the interrupt window (`crate::decode::opens_window`): when no
/// interrupt or NMI is pending right after it, and it left the CPU in 64-bit mode at the
/// block's privilege, it ends the block like a branch ([`EXIT_NORMAL`]) instead of
/// yielding to the run loop.
pub(crate) const GEN_WINDOW: u64 = 4;

/// `how` for [`jit_generic`] running `insn` in a block of privilege `user`.
pub(crate) fn generic_how(insn: &Instruction, user: bool) -> u64 {
    let mut how = u64::from(user);
    if crate::decode::ends_block(insn) {
        how |= GEN_YIELD;
        if crate::decode::opens_window(insn) {
            how |= GEN_WINDOW;
        }
    }
    how
}

/// Whether the run loop would deliver something at once: an NMI (when not blocked) or,
/// with RFLAGS.IF set, an external interrupt. Asked by compiled code only after an
/// instruction that set `Cpu::check_irq`.
fn window_pending(cpu: &Cpu, bus: &mut dyn Bus) -> bool {
    (!cpu.nmi_blocked && bus.nmi_pending()) || (cpu.rflags & crate::cpu::flags::IF != 0 && bus.interrupt_pending())
}

/// Runs `insn` (an instruction of the running block without a fast form) through the
/// interpreter for generated code, which has stored every register and RFLAGS first and
/// reloads them after. `how`: bit 0 the block's privilege (CPL 3), [`GEN_YIELD`],
/// [`GEN_WINDOW`]. An instruction that sets `Cpu::check_irq` asks the bus at once whether
/// an interrupt or NMI is pending, and clears it when none is. Returns 0 when the block
/// may go on with its next instruction; otherwise `1 + (kind << 32)` with `kind` the exit
/// to take now ([`EXIT_NORMAL`]: a [`GEN_WINDOW`] instruction retired with nothing pending,
/// in 64-bit mode at the block's privilege; [`EXIT_YIELD`]: the instruction retired but
/// branched, halted, changed mode or privilege, left something pending, opened an STI/MOV
/// SS shadow, or `how` asked to yield; [`EXIT_FAULT`] and [`EXIT_STOP`]: RIP is the
/// instruction's, the fault or exit is in `ctx`).
///
/// # Safety
/// As for [`jit_read`]; `insn` points to an instruction owned by the module of the running
/// code (`Jit::insns`).
pub(crate) unsafe extern "C" fn jit_generic(
    cpu: *mut Cpu,
    ctx: *mut JitCtx,
    insn: *const Instruction,
    how: u64,
) -> u64 {
    // SAFETY: see jit_read; `insn` lives as long as the running code (the contract).
    let (cpu, ctx, insn) = unsafe { (&mut *cpu, &mut *ctx, &*insn) };
    // SAFETY: see jit_read.
    let bus = unsafe { &mut **(ctx.bus as *mut &mut dyn Bus) };
    let next = insn.next_ip();
    cpu.interrupt_shadow = false;
    cpu.rip = next;
    let fp = cpu.jit.host_fp;
    if fp {
        collect_fp_flags(cpu);
    }
    let r = crate::exec::execute(cpu, bus, insn);
    if fp {
        discard_fp_flags();
    }
    match r {
        Ok(()) => {
            // The instruction may have opened the interrupt window (STI, IRET, POPF) or
            // raised a device's interrupt (OUT): the run loop need only look now when
            // something is pending; otherwise it looks at the end of the chunk, as for an
            // interrupt that arrives while compiled code runs.
            if cpu.check_irq && !cpu.halted && !window_pending(cpu, bus) {
                cpu.check_irq = false;
            }
            let stay = !cpu.halted && !cpu.check_irq && cpu.user() == (how & 1 != 0) && cpu.in_64bit_mode();
            if stay && cpu.rip == next && how & GEN_YIELD == 0 && !cpu.interrupt_shadow {
                0
            } else if stay && how & GEN_WINDOW != 0 {
                // It ends its block: `enter` goes on in the block at RIP. (An STI shadow
                // still covers that block's first instruction: see `enter`.)
                1
            } else {
                1 + (EXIT_YIELD << 32)
            }
        }
        Err(Stop::Fault(f)) => {
            cpu.rip = insn.ip();
            ctx.fault = Some(f);
            1 + (EXIT_FAULT << 32)
        }
        Err(Stop::Exit(e)) => {
            cpu.rip = insn.ip();
            ctx.exit = Some(e);
            1 + (EXIT_STOP << 32)
        }
    }
}

/// DIV of the 128-bit `hi:lo` by `d` for generated code: the quotient, the remainder
/// stored at `rem`. The caller checked `d != 0` and `hi < d` (the quotient fits).
///
/// # Safety
/// `rem` points to 8 writable bytes (a stack slot of the calling code).
pub(crate) unsafe extern "C" fn jit_div128(lo: u64, hi: u64, d: u64, rem: *mut u64) -> u64 {
    let n = (u128::from(hi) << 64) | u128::from(lo);
    let d = u128::from(d.max(1));
    // SAFETY: per the contract.
    unsafe { rem.write(crate::regs::low64(n % d)) };
    crate::regs::low64(n / d)
}

/// Kinds of lazily kept flag computations, for [`jit_flags`].
pub(crate) mod flagk {
    pub(crate) const ADD: u64 = 0;
    pub(crate) const SUB: u64 = 1;
    pub(crate) const LOGIC: u64 = 2;
    pub(crate) const INC: u64 = 3;
    pub(crate) const DEC: u64 = 4;
}

/// RFLAGS after an operation kept lazily by generated code: `ks` = kind ([`flagk`]) << 8 |
/// operand size in bytes; `a`, `b`, `r` the zero-extended operands and result; `old` the
/// RFLAGS before. The same computation as `translate`'s inline one (and so as the host
/// CPU's, see `crate::alu`), for rarely taken exits.
pub(crate) extern "C" fn jit_flags(ks: u64, a: u64, b: u64, r: u64, old: u64) -> u64 {
    use crate::cpu::flags::{ARITH, CF};
    let (kind, bits) = (ks >> 8, (ks & 0xff) * 8);
    let top = bits.clamp(1, 64) - 1;
    let incdec = kind == flagk::INC || kind == flagk::DEC;
    let (cf, of, af) = if kind == flagk::LOGIC {
        (0, 0, 0)
    } else {
        let add = kind == flagk::ADD || kind == flagk::INC;
        let cf = if incdec {
            old & CF
        } else if add {
            u64::from(r < a)
        } else {
            u64::from(a < b)
        };
        let x = if add { (a ^ r) & (b ^ r) } else { (a ^ b) & (a ^ r) };
        (cf, ((x >> top) & 1) << 11, (a ^ b ^ r) & 0x10)
    };
    let zf = u64::from(r == 0) << 6;
    let sf = ((r >> top) & 1) << 7;
    let pf = u64::from((r & 0xff).count_ones() & 1 == 0) << 2;
    let keep = if incdec { !(ARITH & !CF) } else { !ARITH };
    (old & keep) | cf | of | af | zf | sf | pf
}

/// ALU operations whose flags generated code leaves to `crate::alu` (codes of
/// [`jit_alu_flags`]).
pub(crate) mod aluop {
    pub(crate) const ADC: u64 = 0;
    pub(crate) const SBB: u64 = 1;
    pub(crate) const IMUL: u64 = 2;
    pub(crate) const SHL: u64 = 3;
    pub(crate) const SHR: u64 = 4;
    pub(crate) const SAR: u64 = 5;
    pub(crate) const ROL: u64 = 6;
    pub(crate) const ROR: u64 = 7;
    pub(crate) const BSF: u64 = 8;
    pub(crate) const BT: u64 = 9;
    pub(crate) const BTS: u64 = 10;
    pub(crate) const BTR: u64 = 11;
    pub(crate) const BTC: u64 = 12;
    /// Or'ed into a shift's code when its count is only known at run time (it may be 0).
    pub(crate) const DYN: u64 = 0x100;
}

/// RFLAGS after `op` (an [`aluop`] code) on `a`, `b` at `size` bytes with guest flags
/// `flags` before it, as `crate::alu` (the host CPU) computes them: generated code
/// computes such results inline and asks for their flags only where they are observed.
pub(crate) extern "C" fn jit_alu_flags(op: u64, size: u64, a: u64, b: u64, flags: u64) -> u64 {
    use crate::alu::{self, Op2};
    let size = crate::regs::host_usize(size);
    let (_, f) = match op & !aluop::DYN {
        aluop::ADC => alu::adc_sbb_imul(Op2::Adc, size, a, b, flags),
        aluop::SBB => alu::adc_sbb_imul(Op2::Sbb, size, a, b, flags),
        aluop::IMUL => alu::adc_sbb_imul(Op2::Imul, size, a, b, flags),
        aluop::SHL => alu::op2(Op2::Shl, size, a, b, flags),
        aluop::SHR => alu::op2(Op2::Shr, size, a, b, flags),
        aluop::SAR => alu::op2(Op2::Sar, size, a, b, flags),
        aluop::ROL => alu::op2(Op2::Rol, size, a, b, flags),
        aluop::BSF => alu::op2(Op2::Bsf, size, a, b, flags),
        aluop::BT => alu::op2(Op2::Bt, size, a, b, flags),
        aluop::BTS => alu::op2(Op2::Bts, size, a, b, flags),
        aluop::BTR => alu::op2(Op2::Btr, size, a, b, flags),
        aluop::BTC => alu::op2(Op2::Btc, size, a, b, flags),
        _ => alu::op2(Op2::Ror, size, a, b, flags),
    };
    f
}

/// A store by generated code hit a page holding code: retire it.
///
/// # Safety
/// `g` is the non-null `gen` of a TLB entry of the running vCPU.
pub(crate) unsafe extern "C" fn jit_note_write(g: *const u8) {
    // SAFETY: per the contract (see mmu::jit_note_write).
    unsafe { crate::mmu::jit_note_write(g as *const std::sync::atomic::AtomicU32) };
}

/// A link from a branch exit of a compiled block to the compiled block at its constant
/// target (filled by `enter` or the run loop, followed by the block's code without a
/// lookup: see `translate::Translator::exit_to`).
#[repr(C)]
pub(crate) struct Link {
    /// The target's code (None: not linked yet).
    pub(crate) f: Option<JitFn>,
    /// The target's length in instructions.
    pub(crate) len: u64,
    /// For a target on another page than the block's: the GPA of the target's page, its
    /// RAM page and that page's generation when the target was decoded.
    pub(crate) gpa: u64,
    pub(crate) page: u64,
    pub(crate) gen: u64,
}

impl Link {
    const EMPTY: Link = Link { f: None, len: 0, gpa: 0, page: 0, gen: 0 };
}

/// `JitCtx::link_page` of an exit whose link leads to another page.
pub(crate) const FAR_LINK: u64 = u64::MAX;

/// Where a cached block is: its RAM page, that page's code generation and its slot in the
/// decode cache.
#[derive(Clone, Copy)]
pub(crate) struct BlockAt {
    pub(crate) page: usize,
    pub(crate) gen: u32,
    pub(crate) slot: usize,
    /// GPA of the block's first instruction.
    pub(crate) gpa: u64,
}

/// Entries of the jump cache (a power of two): 1 MiB per table, two tables per vCPU. A
/// boot of the test guest compiles ~45,000 blocks (baseline) and ~4,300 (Cranelift): with
/// QEMU's 4,096 entries, collisions sent 1.5 M block exits per boot back to the run loop
/// (no entry for the next block in either table); with 16,384, 0.5 M, and a third fewer
/// entries into compiled code from the run loop.
pub(crate) const JC_SIZE: usize = 16384;

/// A jump-cache entry: the compiled block last run at linear `rip` (QEMU's
/// `tb_jmp_cache`), with code of type `F` (Cranelift's [`JitFn`] or baseline [`BaseFn`]:
/// one table of each per vCPU). It may be followed from compiled code whose exit lands on
/// `rip` while `rip` still translates to `gpa`, the block's page keeps generation `gen`,
/// the epoch (of its tier) is the current one and the privilege the same (by `enter`, and
/// by generated code through `translate::probe` and the baseline probe, which read it at
/// the offsets of `jc_layout`). `slot` and `runs` are the baseline table's: the block's
/// decode-cache slot and the runs counted since its hits were last updated.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct JcEntry<F> {
    rip: u64,
    gpa: u64,
    f: Option<F>,
    page: usize,
    slot: usize,
    gen: u32,
    len: u32,
    epoch: u32,
    user: bool,
    runs: u32,
}

/// Byte layout of a [`JcEntry`] (of either code type: both are a non-null pointer) for
/// generated code.
pub(crate) mod jc_layout {
    use super::{BaseFn, JcEntry, JitFn};
    use std::mem::offset_of;
    pub(crate) const SIZE: usize = std::mem::size_of::<JcEntry<JitFn>>();
    const _: () = assert!(SIZE == std::mem::size_of::<JcEntry<BaseFn>>());
    pub(crate) const RIP: usize = offset_of!(JcEntry<JitFn>, rip);
    pub(crate) const GPA: usize = offset_of!(JcEntry<JitFn>, gpa);
    /// The code (`Option<JitFn>` or `Option<BaseFn>`: 0 for none).
    pub(crate) const F: usize = offset_of!(JcEntry<JitFn>, f);
    const _: () = assert!(F == offset_of!(JcEntry<BaseFn>, f));
    pub(crate) const PAGE: usize = offset_of!(JcEntry<JitFn>, page);
    /// u32.
    pub(crate) const GEN: usize = offset_of!(JcEntry<JitFn>, gen);
    /// u32.
    pub(crate) const LEN: usize = offset_of!(JcEntry<JitFn>, len);
    /// u32.
    pub(crate) const EPOCH: usize = offset_of!(JcEntry<JitFn>, epoch);
    /// u8 (bool).
    pub(crate) const USER: usize = offset_of!(JcEntry<JitFn>, user);
    /// u32 (the baseline table's).
    pub(crate) const RUNS: usize = offset_of!(JcEntry<JitFn>, runs);
    const _: () = assert!(RUNS == offset_of!(JcEntry<BaseFn>, runs));
}

impl<F> JcEntry<F> {
    const EMPTY: JcEntry<F> =
        JcEntry { rip: 0, gpa: 0, f: None, page: 0, slot: 0, gen: 0, len: 0, epoch: 0, user: false, runs: 0 };
}

/// The jump-cache entry of `rip` (`translate::probe` computes the same).
fn jc_index(rip: u64) -> usize {
    crate::regs::hash_index(rip, JC_SIZE.trailing_zeros())
}

/// Records compiled block `code` of the block at `b` (first instruction at `rip`) in the
/// jump cache.
fn jc_fill(jit: &mut Jit, rip: u64, b: &BlockAt, code: Compiled) {
    if let (Compiled::Code { f, len, epoch, user }, Some(e)) = (code, jit.jc.get_mut(jc_index(rip))) {
        *e = JcEntry { rip, gpa: b.gpa, f: Some(f), page: b.page, slot: b.slot, gen: b.gen, len, epoch, user, runs: 0 };
        // The block's baseline code is not chained to any more: Cranelift's runs.
        if let Some(be) = jit.bjc.get_mut(jc_index(rip)).filter(|be| be.rip == rip) {
            be.f = None;
        }
    }
}

/// Runs counted in a baseline [`JcEntry`] before they are added to the block's hits.
pub(crate) const BJC_BATCH: u32 = 64;

/// The baseline block to run next at `cpu.rip` from the baseline jump cache, if it is
/// valid, fits in `room` instructions and is not due for Cranelift: its code, length and
/// RAM page (see [`jc_next`] for `la_page` and `page`). Every [`BJC_BATCH`] runs the block's
/// hits in the decode cache grow by as much, so that blocks that run only chained still
/// become hot; a block due for Cranelift goes back to the run loop, which compiles it.
#[inline]
fn bjc_next(cpu: &mut Cpu, room: u64, la_page: u64, page: usize) -> Option<(BaseFn, u32, usize)> {
    let rip = cpu.rip;
    let e = *cpu.jit.bjc.get(jc_index(rip))?;
    let f = jc_valid(cpu, &e, cpu.jit.base_epoch, room, la_page, page)?;
    let runs = e.runs + 1;
    if runs >= BJC_BATCH {
        let auto = cpu.jit.tier == Tier::Auto;
        if let Some(be) = cpu.jit.bjc.get_mut(jc_index(rip)) {
            be.runs = 0;
        }
        let s = cpu.dcache.jit_slot_of(e.slot, e.gpa, rip, e.gen)?;
        s.hits = s.hits.saturating_add(BJC_BATCH);
        if auto && s.hits >= HOT && !matches!(s.code, Compiled::Never | Compiled::Pending { .. }) {
            return None;
        }
    } else if let Some(be) = cpu.jit.bjc.get_mut(jc_index(rip)) {
        be.runs = runs;
    }
    Some((f, e.len, e.page))
}

/// The compiled block to run next at `cpu.rip` from the jump cache, if it is valid and
/// its length fits in `room` instructions: its code, length, page and generation. A block
/// that ran in this `enter` call lies on linear page `la_page`, RAM page `page`: a target
/// on the same linear page is on the same RAM page (compiled code runs no instruction that
/// changes translations: `jit_generic` yields after those), so only other pages are
/// translated.
#[inline]
fn jc_next(cpu: &mut Cpu, room: u64, la_page: u64, page: usize) -> Option<(JitFn, u32, usize, u32)> {
    let e = *cpu.jit.jc.get(jc_index(cpu.rip))?;
    let f = jc_valid(cpu, &e, cpu.jit.epoch, room, la_page, page)?;
    Some((f, e.len, e.page, e.gen))
}

/// Entry `e`'s code if it may run next at `cpu.rip` (see [`jc_next`]): RIP's, of epoch
/// `epoch` and the current privilege, fits in `room`, RIP still translates to its GPA and
/// its page kept its generation.
#[inline]
fn jc_valid<F: Copy>(cpu: &mut Cpu, e: &JcEntry<F>, epoch: u32, room: u64, la_page: u64, page: usize) -> Option<F> {
    let rip = cpu.rip;
    let f = e.f?;
    if e.rip != rip || e.epoch != epoch || e.user != cpu.cur_user || u64::from(e.len) > room {
        return None;
    }
    if rip & !0xfff != la_page || e.page != page {
        let gpa = cpu.translate(rip, crate::mmu::Access::Exec, e.user).ok()?;
        if gpa != e.gpa {
            return None;
        }
    }
    if cpu.mmu.shared.gen(e.page) != e.gen {
        return None;
    }
    Some(f)
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

/// Compiled code of a block, from one tier or the other.
#[derive(Clone, Copy)]
pub(crate) enum Code {
    /// Cranelift's code (run by [`enter`]) and the block's length (a trace's: more than
    /// the block's own instructions, see [`trace`]).
    Opt(JitFn, u32),
    /// Baseline code (run by [`enter`]) and the block's length.
    Base(BaseFn, u32),
}

/// The compiled code for the block `ops` at `b` if it should run now: compiles it first when it is hot
/// enough. `None`: interpret. The caller has checked that the block is in 64-bit mode.
/// `want` is the link the previous compiled block asked for: it is filled when `b` is its
/// target.
#[inline]
pub(crate) fn lookup(cpu: &mut Cpu, ops: &[Op], b: BlockAt, want: Option<WantLink>) -> Option<Code> {
    let (epoch, user, tier) = (cpu.jit.epoch, cpu.cur_user, cpu.jit.tier);
    let now = cpu.stats.instructions;
    let s = cpu.dcache.jit_slot(b.slot)?;
    let hits = match s.code {
        Compiled::Code { f, len, epoch: e, user: u } if e == epoch => {
            if u != user {
                // Compiled for the other privilege (rare): interpret rather than compile
                // again on every switch.
                return None;
            }
            let ip = ops.first().map_or(0, |o| o.ip);
            jc_fill(&mut cpu.jit, ip, &b, Compiled::Code { f, len, epoch, user });
            if let Some(w) = want {
                // A link to another page holds the target's translation, which the run loop
                // has just checked (fetching the block).
                let far = w.page == host_usize(FAR_LINK);
                if w.epoch == cpu.jit.epoch
                    && w.rip == ip
                    && (far || (w.page == b.page && w.gen == b.gen))
                    && w.user == user
                {
                    let l = Link {
                        f: Some(f),
                        len: u64::from(len),
                        gpa: b.gpa & !0xfff,
                        page: b.page as u64,
                        gen: u64::from(b.gen),
                    };
                    // SAFETY: `w.link` points into a link table of the current epoch
                    // (checked), which lives until the module is freed; no reference to it
                    // exists.
                    unsafe { *w.link = l };
                }
            }
            return Some(Code::Opt(f, len));
        }
        Compiled::Never => HOT,
        Compiled::Pending { epoch: e } if e == epoch => HOT,
        _ => {
            if s.hits == 0 {
                s.born = stamp(now);
            }
            s.hits = s.hits.saturating_add(1);
            if (tier == Tier::Jit || (tier == Tier::Auto && s.hits >= HOT)) && compile(cpu, ops, b).is_some() {
                return lookup(cpu, ops, b, want);
            }
            cpu.dcache.jit_slot(b.slot)?.hits
        }
    };
    // Not (yet) Cranelift's: baseline code where it is warm.
    if !matches!(tier, Tier::Base | Tier::Auto) {
        return None;
    }
    let s = cpu.dcache.jit_slot(b.slot)?;
    if let Some((f, e, u)) = s.base {
        if e == cpu.jit.base_epoch && u == user {
            let len = u32::try_from(ops.len()).ok()?;
            bjc_fill(&mut cpu.jit, ops, &b, f, len, user);
            return Some(Code::Base(f, len));
        }
    }
    if tier == Tier::Auto && hits < WARM {
        return None;
    }
    compile_base(cpu, ops, b)
}

/// Gives the block `ops` at `b` baseline code (on the vCPU's thread: microseconds).
#[cold]
fn compile_base(cpu: &mut Cpu, ops: &[Op], b: BlockAt) -> Option<Code> {
    let len = u32::try_from(ops.len()).ok().filter(|&l| l > 0)?;
    if cpu.jit.base_refused {
        return None;
    }
    let user = cpu.cur_user;
    let gen_ptr = cpu.mmu.shared.gen_ptr(b.page) as u64;
    let t0 = std::time::Instant::now();
    let jit = &mut cpu.jit;
    if jit.base.is_none() {
        jit.base = baseline::BaseCode::new();
        jit.base_refused = jit.base.is_none();
    }
    let base = jit.base.as_mut()?;
    // Room for the largest block (tens of KiB) is always left: past that, everything goes.
    if base.used() + (256 << 10) > jit.limit.min(baseline::BASE_LIMIT) {
        base.clear();
        jit.base_epoch = jit.base_epoch.wrapping_add(1);
        jit.stats.flushes += 1;
    }
    let r = base.compile(ops, user, gen_ptr, b.gen);
    let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    jit.stats.base_ns += ns;
    let (f, bytes) = r?;
    jit.stats.base_compiled += 1;
    jit.stats.base_bytes += bytes as u64;
    let rip = ops.first().map_or(0, |o| o.ip);
    perf_map_note(f.0.as_ptr(), bytes, format_args!("rv-emu base {rip:#x}"));
    let epoch = jit.base_epoch;
    bjc_fill(jit, ops, &b, f, len, user);
    if let Some(s) = cpu.dcache.jit_slot(b.slot) {
        s.base = Some((f, epoch, user));
    }
    Some(Code::Base(f, len))
}

/// Records baseline code `f` of the block `ops` (`len` instructions) at `b` in the
/// baseline jump cache, for the current epoch and privilege.
fn bjc_fill(jit: &mut Jit, ops: &[Op], b: &BlockAt, f: BaseFn, len: u32, user: bool) {
    let rip = ops.first().map_or(0, |o| o.ip);
    let epoch = jit.base_epoch;
    if let Some(e) = jit.bjc.get_mut(jc_index(rip)) {
        if e.rip == rip && e.f == Some(f) && e.epoch == epoch && e.user == user && e.gen == b.gen {
            // Keep the runs counted.
            return;
        }
        *e = JcEntry { rip, gpa: b.gpa, f: Some(f), page: b.page, slot: b.slot, gen: b.gen, len, epoch, user, runs: 0 };
    }
}

/// A [`crate::decode::JitSlot::born`] stamp: retired instructions / 1024, wrapping.
#[allow(clippy::cast_possible_truncation)] // wrapping by design
fn stamp(instructions: u64) -> u32 {
    (instructions >> 10) as u32
}

/// Most instructions in a trace (see [`trace`]).
const TRACE_MAX: usize = 64;

/// The block `ops` at `b` followed, within its page, by the blocks it goes on to
/// unconditionally: the target of its last instruction when that is a direct JMP or
/// CALL, and so on while the trace stays under [`TRACE_MAX`] instructions and visits no
/// instruction twice (QEMU's blocks end at every branch and chain with one patched jump; a
/// Cranelift block's transition to the next costs its frame, the state it stores and
/// loads, and the link's checks, which a trace saves). None if it goes nowhere: the block
/// alone. Every block of a trace lies on one page decoded at one generation, so that the
/// page's generation covers all of it. (Going on at a Jcc's fall-through as well, with the
/// taken side leaving through a link of its own, doubled the code and the compile time,
/// left more of the boot to baseline code and cost 17 % of the vCPU's time.)
fn trace(cpu: &Cpu, ops: &[Op], b: &BlockAt) -> Option<Vec<Op>> {
    use crate::uop::Uop;
    let start = ops.first()?.ip;
    let mut t: Option<Vec<Op>> = None;
    loop {
        let all = t.as_deref().unwrap_or(ops);
        let last = all.last()?;
        let next = match last.uop {
            Uop::Jmp { target } | Uop::Call { target } => target,
            _ => break,
        };
        if next & !0xfff != start & !0xfff || all.iter().any(|o| o.ip == next) || all.len() >= TRACE_MAX {
            break;
        }
        let Some(more) = crate::decode::decode_on_page(cpu, b.page, b.gen, b.gpa, next) else { break };
        if all.len() + more.len() > TRACE_MAX {
            break;
        }
        let mut v = t.take().unwrap_or_else(|| ops.to_vec());
        v.extend(more);
        t = Some(v);
    }
    t
}

#[cold]
fn compile(cpu: &mut Cpu, ops: &[Op], b: BlockAt) -> Option<(JitFn, u32)> {
    // Nothing is compiled without the shared code (trampoline and probe).
    let (_, probe) = shared_code()?;
    if ops.is_empty() {
        return None;
    }
    if cpu.jit.held > cpu.jit.limit {
        cpu.jit.free_module();
        cpu.jit.stats.flushes += 1;
    }
    let background = cpu.jit.tier == Tier::Auto;
    if background && cpu.jit.worker.is_none() {
        cpu.jit.worker = worker::Worker::start();
    }
    if background && cpu.jit.worker.as_ref().is_none_or(|w| w.in_flight >= worker::QUEUE) {
        // No thread, or enough in flight: interpret and ask again later.
        return None;
    }
    let traced = trace(cpu, ops, &b);
    if traced.is_some() {
        cpu.jit.stats.traces += 1;
    }
    let ops = traced.as_deref().unwrap_or(ops);
    let len = u32::try_from(ops.len()).ok()?;
    if ops.iter().any(|o| matches!(o.uop, crate::uop::Uop::Sse(s) if s.host_fp())) {
        cpu.jit.host_fp = true;
    }
    let user = cpu.cur_user;
    let gen_ptr = cpu.mmu.shared.gen_ptr(b.page) as u64;
    let jit = &mut cpu.jit;
    let links = Box::into_raw(Box::new([Link::EMPTY, Link::EMPTY]));
    jit.links.push(links);
    jit.held += std::mem::size_of::<[Link; 2]>();
    let insns: Box<[Instruction]> = ops.iter().map(|o| o.insn).collect();
    jit.held += std::mem::size_of_val(&*insns);
    let insns_at = insns.as_ptr() as u64;
    jit.insns.push(insns);
    let env =
        translate::Env { user, gen_ptr, gen: b.gen, page: b.page as u64, links: links as u64, insns: insns_at, probe };
    if background {
        let rip = ops.first().map_or(0, |o| o.ip);
        // Thousands of instructions the vCPU retired while the block's hits grew from 1
        // to HOT: the hottest blocks are compiled first.
        let born = cpu.dcache.jit_slot(b.slot).map_or(0, |s| s.born);
        let age = stamp(cpu.stats.instructions).wrapping_sub(born);
        let jit = &mut cpu.jit;
        let job = worker::Job { ops: ops.into(), env, epoch: jit.epoch, at: b, rip, age };
        if jit.worker.as_mut().is_some_and(|w| w.submit(job)) {
            if let Some(s) = cpu.dcache.jit_slot(b.slot) {
                s.code = Compiled::Pending { epoch: cpu.jit.epoch };
            }
        }
        return None;
    }
    let t0 = std::time::Instant::now();
    if jit.module.is_none() {
        jit.module = new_module(CODE_LIMIT + CODE_HEADROOM);
    }
    let module = jit.module.as_mut()?;
    let cl_ctx = jit.cl_ctx.get_or_insert_with(|| cranelift_module::Module::make_context(&module.m));
    let r = translate::compile(&mut module.m, cl_ctx, &mut jit.fctx, ops, &env).and_then(|(id, bytes)| {
        module.m.finalize_definitions().ok()?;
        let f = translate::entry(module, id)?;
        let rip = ops.first().map_or(0, |o| o.ip);
        perf_map_note(f.0.as_ptr(), bytes, format_args!("rv-emu block {rip:#x}"));
        Some((f, bytes))
    });
    let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let code = install(jit, r, len, user, ns);
    if let Some(s) = cpu.dcache.jit_slot(b.slot) {
        s.code = code;
    }
    match code {
        Compiled::Code { f, len, .. } => Some((f, len)),
        _ => None,
    }
}

/// Accounts for a compilation's result (of `len` instructions, for privilege `user`, that
/// took `ns` nanoseconds) and returns the block's new state.
fn install(jit: &mut Jit, r: Option<(JitFn, usize)>, len: u32, user: bool, ns: u64) -> Compiled {
    jit.stats.compile_ns += ns;
    match r {
        Some((f, bytes)) => {
            jit.held += bytes;
            jit.stats.compiled += 1;
            jit.stats.code_bytes += bytes as u64;
            Compiled::Code { f, len, epoch: jit.epoch, user }
        }
        None => Compiled::Never,
    }
}

/// Installs the blocks the compiler thread (tier Auto) finished, where they are still
/// in the decode cache unchanged. Cheap when there are none.
#[inline]
pub(crate) fn poll(cpu: &mut Cpu) {
    if cpu.jit.worker.as_ref().is_some_and(|w| w.in_flight > 0) {
        poll_done(cpu);
    }
}

#[cold]
fn poll_done(cpu: &mut Cpu) {
    while let Some(d) = cpu.jit.worker.as_mut().and_then(|w| w.poll()) {
        if d.epoch != cpu.jit.epoch {
            // Compiled into freed memory (or about to be): never used.
            continue;
        }
        let code = install(&mut cpu.jit, d.code, d.len, d.user, d.ns);
        let live = cpu.mmu.shared.gen(d.at.page) == d.at.gen;
        if let (true, Some(s)) = (live, cpu.dcache.jit_slot_of(d.at.slot, d.at.gpa, d.rip, d.at.gen)) {
            s.code = code;
            jc_fill(&mut cpu.jit, d.rip, &d.at, code);
        }
    }
}

/// Runs compiled block `code` (of the block at RAM page `page`; Cranelift's or baseline
/// code), and the compiled blocks it leads to through links and the jump caches of both
/// tiers (a block ended normally goes on in the next block's Cranelift code, else in its
/// baseline code: [`chain_next`]) while they fit in `left` instructions (>= the
/// block's length) and their pages keep their generations. Returns the instructions retired (the
/// faulting one included), the fault to raise or the exit to take, if any, and the link
/// the last block's exit asks to be filled; RIP, registers and flags are those after the
/// last instruction retired, or of the faulting instruction.
#[inline]
pub(crate) fn enter(
    cpu: &mut Cpu,
    bus: &mut dyn Bus,
    code: Code,
    left: u64,
    page: usize,
) -> (u64, Option<Stop>, Option<WantLink>) {
    let Some(tramp) = trampoline() else {
        // Unreachable: nothing is compiled without a trampoline.
        return (0, Some(Stop::Exit(Exit::Unsupported("no trampoline for compiled code".into()))), None);
    };
    let mut bus_ref: &mut dyn Bus = bus;
    let mut ctx = JitCtx {
        tlb: cpu.mmu.tlb_ptr() as *const u8,
        faulted: 0,
        left,
        link: std::ptr::null_mut(),
        chained: 0,
        bus: &mut bus_ref as *mut &mut dyn Bus as *mut u8,
        fault: None,
        exit: None,
        jc: cpu.jit.jc.as_ptr(),
        gens: cpu.mmu.shared.gen_ptr(0).cast(),
        epoch: u64::from(cpu.jit.epoch),
        user: u64::from(cpu.cur_user),
        link_page: 0,
        link_gen: 0,
        bjc: cpu.jit.bjc.as_ptr().cast(),
        base_epoch: u64::from(cpu.jit.base_epoch),
        link_site: 0,
        credit: 0,
        lf_kind: 0,
        lf_a: 0,
        lf_b: 0,
        lf_r: 0,
    };
    cpu.interrupt_shadow = false;
    let (mut cur, mut page) = (code, page);
    let mut la_page = cpu.rip & !0xfff;
    let mut total = 0u64;
    match code {
        Code::Opt(..) => cpu.jit.stats.entries += 1,
        Code::Base(..) => cpu.jit.stats.base_entries += 1,
    }
    loop {
        let start = left - total;
        ctx.left = start;
        ctx.chained = 0;
        // (`link_site` and `credit` are taken after every run, below.)
        ctx.link = std::ptr::null_mut();
        let r = match cur {
            // SAFETY: `f` came from `lookup` or `chain_next` (through `bjc_next`), which
            // checked its baseline epoch is the current one; `ctx` was built above.
            Code::Base(f, _) => unsafe { run_base(cpu, &mut ctx, f) },
            // SAFETY: `f` was compiled by this vCPU's module in the current epoch (checked
            // by `lookup`, or a link of this epoch), so its code is live, in the `tail`
            // convention the trampoline calls; it accesses the Cpu only through the fields
            // whose offsets `translate` took, and guest RAM through TLB entries valid for
            // this vCPU, calls only the helpers above with these same pointers, and follows
            // only links of its own epoch and (through the probe) jump-cache entries of the
            // epoch in `ctx`, the current one, read from the jump cache `ctx.jc` points to,
            // which this Cpu owns. No Rust reference to `cpu` or `ctx` is used while it runs.
            Code::Opt(f, _) => unsafe { tramp(cpu as *mut Cpu, &mut ctx as *mut JitCtx as *mut u8, f.0.as_ptr()) },
        };
        ctx.settle_flags(cpu);
        // Blocks followed by the code itself (links, either tier's probe) took their counts
        // from `ctx.left`.
        let n = (r & 0xffff_ffff) + (start - ctx.left);
        cpu.jit.stats.chained += ctx.chained;
        cpu.jit.stats.instructions += n;
        if matches!(cur, Code::Base(..)) {
            cpu.jit.stats.base_instructions += n;
        }
        total += n;
        let (site, credit) = (std::mem::take(&mut ctx.link_site), std::mem::take(&mut ctx.credit));
        let fault = match r >> 32 {
            EXIT_NORMAL => match chain_next_base(cpu, left - total, la_page, page, credit) {
                Some((c, p)) => {
                    if let (true, Code::Base(f, _), Some(base)) = (site != 0, c, cpu.jit.base.as_mut()) {
                        // `site` is a baseline exit to this constant RIP on its block's
                        // first page (so on the page that block was entered on), which
                        // `chain_next` found baseline code of this region and privilege for.
                        if base.link(site, f) {
                            cpu.jit.stats.base_links += 1;
                        }
                    }
                    // The next block's first instruction runs before anything could look
                    // at the interrupt line: it is the one an STI shadow covered.
                    cpu.interrupt_shadow = false;
                    (cur, page) = (c, p);
                    la_page = cpu.rip & !0xfff;
                    cpu.jit.stats.chained += 1;
                    continue;
                }
                None => return (total, None, None),
            },
            EXIT_YIELD => return (total, None, None),
            EXIT_LINK => {
                let l = ctx.link;
                // SAFETY: compiled code of this epoch stores a pointer to one of its own
                // link tables, live while the epoch lasts.
                let filled = unsafe { (*l).f.is_some() };
                if filled {
                    // The block's own code follows a filled link; it comes back only when
                    // the target did not fit in the budget or the page changed.
                    return (total, None, None);
                }
                // The block that took the exit (maybe reached through the probe, on
                // another page than the one this call started on) and the target lie on
                // one page: its page and the generation it was decoded at.
                let (lp, lg) = (host_usize(ctx.link_page), u32::try_from(ctx.link_gen).unwrap_or(0));
                let far = lp == host_usize(FAR_LINK);
                match jc_next(cpu, left - total, la_page, page) {
                    // (`jc_next` checked a target on another page translates to its GPA.)
                    Some((nf, nlen, p, g)) if far || (p == lp && g == lg) => {
                        let gpa = cpu.jit.jc.get(jc_index(cpu.rip)).map_or(0, |e| e.gpa & !0xfff);
                        let link = Link { f: Some(nf), len: u64::from(nlen), gpa, page: p as u64, gen: u64::from(g) };
                        // SAFETY: as above; no reference to the link exists.
                        unsafe { *l = link };
                        (cur, page) = (Code::Opt(nf, nlen), p);
                        la_page = cpu.rip & !0xfff;
                        cpu.jit.stats.chained += 1;
                        continue;
                    }
                    _ => {
                        // The target has no Cranelift code yet: its baseline code, if it
                        // has some (the link is filled on a later exit, once it has).
                        if let Some((bf, blen, p)) = bjc_next(cpu, left - total, la_page, page) {
                            (cur, page) = (Code::Base(bf, blen), p);
                            la_page = cpu.rip & !0xfff;
                            cpu.jit.stats.chained += 1;
                            continue;
                        }
                        let w = WantLink {
                            link: l,
                            epoch: cpu.jit.epoch,
                            rip: cpu.rip,
                            page: lp,
                            gen: lg,
                            user: cpu.cur_user,
                        };
                        return (total, None, Some(w));
                    }
                }
            }
            EXIT_GP => Stop::Fault(Fault::GeneralProtection(0)),
            EXIT_STOP => Stop::Exit(ctx.exit.take().unwrap_or(Exit::Unsupported("translated block stopped".into()))),
            _ => Stop::Fault(ctx.fault.unwrap_or(Fault::GeneralProtection(0))),
        };
        return (total, Some(fault), None);
    }
}

/// [`chain_next`] after a normal exit; `credit` (from `JitCtx::credit`, the chain entry of
/// the baseline block at RIP): the block's run counter, counting runs entered through
/// links, ran out. Its batch of runs counts toward Cranelift's threshold (through
/// `bjc_next`), and once the block has Cranelift code its chain entry is sent to the probe,
/// which finds that code.
#[inline]
fn chain_next_base(cpu: &mut Cpu, room: u64, la_page: u64, page: usize, credit: u64) -> Option<(Code, usize)> {
    if credit != 0 {
        let rip = cpu.rip;
        if let Some(e) = cpu.jit.bjc.get_mut(jc_index(rip)).filter(|e| e.rip == rip) {
            e.runs = BJC_BATCH - 1;
        }
    }
    let next = chain_next(cpu, room, la_page, page);
    if let (true, Some((Code::Opt(..), _)), Some(base)) = (credit != 0, next, cpu.jit.base.as_mut()) {
        base.retire_chain_entry(credit);
    }
    next
}

/// Runs baseline code `f` of the block at the current RIP once: its exit word.
///
/// # Safety
/// `f` is baseline code of `cpu`'s current baseline epoch (checked by `lookup` or
/// `bjc_next`), and `ctx` is the context `enter` built for `cpu` in this call.
#[inline]
unsafe fn run_base(cpu: &mut Cpu, ctx: &mut JitCtx, f: BaseFn) -> u64 {
    // SAFETY: per the contract `f`'s memory is live and holds a function of exactly this
    // signature (`baseline`'s prologue and epilogue follow the System V ABI). It accesses
    // the Cpu only at the offsets `baseline` took, guest RAM through TLB entries valid for
    // this vCPU, and calls only the helpers above with these same pointers. No Rust
    // reference to `cpu` or `ctx` is used while it runs.
    unsafe {
        let code =
            std::mem::transmute::<*const u8, unsafe extern "sysv64" fn(*mut Cpu, *mut JitCtx) -> u64>(f.0.as_ptr());
        code(cpu as *mut Cpu, ctx as *mut JitCtx)
    }
}

/// The compiled block to run next at `cpu.rip` after a block ended normally: Cranelift's
/// from the jump cache, else baseline code from the baseline jump cache (see [`jc_next`],
/// [`bjc_next`]); with its RAM page.
#[inline]
fn chain_next(cpu: &mut Cpu, room: u64, la_page: u64, page: usize) -> Option<(Code, usize)> {
    if let Some((f, len, p, _)) = jc_next(cpu, room, la_page, page) {
        return Some((Code::Opt(f, len), p));
    }
    let (f, len, p) = bjc_next(cpu, room, la_page, page)?;
    Some((Code::Base(f, len), p))
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
    /// recompiled on demand (default and most [`CODE_LIMIT`], 64 MiB; the baseline tier's
    /// code is bounded by the smaller of this and its own 16 MiB).
    pub fn set_jit_code_limit(&mut self, bytes: usize) {
        self.jit.limit = bytes.min(CODE_LIMIT);
    }

    /// Counters of the translation tier.
    pub fn jit_stats(&self) -> &JitStats {
        &self.jit.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alu::{self, Op1, Op2};

    /// `jit_flags` (the flags of rarely taken exits) agrees with the host CPU (`crate::alu`)
    /// for every kind and size, over edge and pseudo-random operands and incoming flags.
    #[test]
    fn jit_flags_match_the_host() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let edges = [0u64, 1, 0x7f, 0x80, 0xff, 0x7fff, 0x8000, 0xffff, 0x7fff_ffff, 0x8000_0000, u64::MAX];
        for i in 0..20_000 {
            let (a, b) = if i < edges.len() * edges.len() {
                (edges[i % edges.len()], edges[i / edges.len()])
            } else {
                (next(), next())
            };
            let old = (next() & 0xcd5) | 2;
            for size in [1usize, 2, 4, 8] {
                let m = crate::regs::mask(size);
                let (a, b) = (a & m, b & m);
                for (op, k) in [(Op2::Add, flagk::ADD), (Op2::Sub, flagk::SUB), (Op2::Xor, flagk::LOGIC)] {
                    let (r, f) = alu::arith(op, size, a, b, old);
                    let ks = k << 8 | size as u64;
                    assert_eq!(jit_flags(ks, a, b, r & m, old), f, "{op:?} size {size} a {a:#x} b {b:#x} old {old:#x}");
                }
                for (op, k) in [(Op1::Inc, flagk::INC), (Op1::Dec, flagk::DEC)] {
                    let (r, f) = alu::op1(op, size, a, old);
                    let ks = k << 8 | size as u64;
                    assert_eq!(jit_flags(ks, a, 1, r & m, old), f, "{op:?} size {size} a {a:#x} old {old:#x}");
                }
            }
        }
    }
}
