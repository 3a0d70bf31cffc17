//! The baseline tier: warm 64-bit guest blocks turned into host code by templates, in
//! microseconds, before they are hot enough for Cranelift.
//!
//! Cranelift costs ~0.7 ms of compiler time per block on the hosts we measured, so only
//! blocks run [`super::HOT`] times are worth it; blocks that run tens to hundreds of times
//! (a boot interprets ~50 M such instructions at ~19 ns each) were left to the
//! interpreter. Here every fast form (`crate::uop`) is a fixed sequence of host
//! instructions assembled with `dynasmrt` (V8's Sparkplug, SpiderMonkey's baseline JIT,
//! QEMU's TCG templates in spirit): no IR, no register allocation, a few microseconds per
//! block. Code quality is modest: guest registers stay in the `Cpu` (every use is a load,
//! every definition a store), RFLAGS lives in host R14 for the whole block (each flag
//! producer runs the same host instruction the interpreter runs in `crate::alu` and merges
//! the host's arithmetic flags; partial writers and condition consumers first load the
//! guest's flags into the host's, as `crate::alu` does with SAHF and an overflowing ADD),
//! so results and flags are bit-exact with the interpreter by construction.
//!
//! Memory goes through the same inline TLB test as the Cranelift tier (`translate::tlb_hit`)
//! and `super::jit_read`/`super::jit_write` otherwise; a store retires code on the page it
//! hits (`super::jit_note_write`) and ends the block when the block's own page changed.
//! Every other instruction is a call to `super::jit_generic` (registers and flags are
//! already in the `Cpu`). A normal exit stores RIP and goes on in the next block: through
//! a patched jump to its chain entry when the target is a constant on the block's page
//! ([`Emit::exit_link`], [`chain_entry`]), else through the baseline probe ([`probe`]),
//! which finds baseline or Cranelift code, or returns to `super::enter` (storing RFLAGS)
//! when it finds none; every other exit returns there.
//!
//! A block's code is `extern "sysv64" fn(cpu: *mut Cpu, ctx: *mut JitCtx) -> u64` returning
//! the same exit word as Cranelift's blocks (instructions retired, kind << 32); Cranelift's
//! `tail` convention passes two arguments, saves registers and returns as System V does,
//! so that either tier's code tail-calls the other's. Host registers: RBX = cpu, R12 =
//! ctx, R13 = the TLB, R14 = guest RFLAGS, R15 = a linear address kept across a helper
//! call; RAX, RCX, RDX, RSI, RDI, R8, R9 scratch; one 8-byte stack slot at [RSP].

use super::{codemem::DualMapped, jc_layout, JitCtx, BJC_BATCH, EXIT_FAULT, EXIT_GP, EXIT_NORMAL, JC_SIZE};
use crate::alu::Op2;
use crate::cpu::{flags, sreg, Cpu, Seg};
use crate::decode::Op;
use crate::mmu::{tlb_layout, GEN_CODE, P_EXEC, P_RAM, P_READ, P_USER, P_WRITE, TLB_SIZE, TLB_VALID};
use crate::uop::{MemOp, Src, Uop, HIGH8, NONE};
use cranelift_jit::{JITMemoryKind, JITMemoryProvider};
use dynasmrt::{dynasm, x64::X64Relocation, DynamicLabel, DynasmApi, DynasmLabelApi, VecAssembler};
use iced_x86::{ConditionCode, Instruction};
use std::mem::offset_of;
use std::sync::atomic::AtomicU32;

/// The entry of a block's baseline code (see the module docs for its signature).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(transparent)]
pub(crate) struct BaseFn(pub(crate) std::ptr::NonNull<u8>);

// SAFETY: the address of finalized code that is never written while it may run.
unsafe impl Send for BaseFn {}

/// Bytes of baseline code a vCPU may hold before all of it is thrown away.
pub(crate) const BASE_LIMIT: usize = 16 << 20;

/// A vCPU's baseline code: one [`DualMapped`] region filled from the start, and the
/// copies of the instructions its calls to `jit_generic` point to.
pub(crate) struct BaseCode {
    mem: DualMapped,
    exec: isize,
    used: usize,
    insns: Vec<Box<[Instruction]>>,
    asm: Option<VecAssembler<X64Relocation>>,
    /// The baseline probe's code (see [`probe`]), copied to the start of the region.
    probe_code: Vec<u8>,
    /// Where the probe runs.
    probe: u64,
    /// Bytes of every block's prologue: where the probe enters a block.
    body: usize,
    /// Bytes of every block's chain entry, which precedes its prologue (see [`chain_entry`]).
    chain: usize,
    /// The blocks' run counters (see [`chain_entry`]), in chunks that never move.
    counts: Vec<Box<[AtomicU32]>>,
    /// Counters handed out from the last chunk.
    counts_used: usize,
}

/// Counters per chunk of [`BaseCode::counts`].
const COUNT_CHUNK: usize = 1024;

impl BaseCode {
    /// A region of [`BASE_LIMIT`] bytes; None where the host refuses the double mapping
    /// (valgrind): then blocks are interpreted until Cranelift compiles them.
    pub(crate) fn new() -> Option<BaseCode> {
        let mem = DualMapped::new(BASE_LIMIT).ok()?;
        let exec = mem.exec_offset();
        let mut a = VecAssembler::<X64Relocation>::new(0);
        prologue(&mut a);
        let body = a.offset().0;
        let mut a = VecAssembler::<X64Relocation>::new(0);
        let labels = [a.new_dynamic_label(), a.new_dynamic_label(), a.new_dynamic_label()];
        chain_entry(&mut a, &Env::default(), labels);
        let chain = a.offset().0;
        let mut a = VecAssembler::<X64Relocation>::new(0);
        probe(&mut a, body);
        let probe_code = a.finalize().ok()?;
        let mut b = BaseCode {
            mem,
            exec,
            used: 0,
            insns: Vec::new(),
            asm: None,
            probe_code,
            probe: 0,
            body,
            chain,
            counts: Vec::new(),
            counts_used: COUNT_CHUNK,
        };
        b.install_probe()?;
        Some(b)
    }

    /// Copies the probe to the start of the (empty) region.
    fn install_probe(&mut self) -> Option<()> {
        let n = self.probe_code.len();
        let at = self.mem.allocate(n, 16, JITMemoryKind::Executable).ok()?;
        // SAFETY: `allocate` returned room for `n` bytes in the read-write view.
        unsafe { std::ptr::copy_nonoverlapping(self.probe_code.as_ptr(), at, n) };
        let run = at.expose_provenance().wrapping_add_signed(self.exec);
        self.probe = run as u64;
        super::perf_map_note(std::ptr::with_exposed_provenance::<u8>(run), n, format_args!("rv-emu base probe"));
        Some(())
    }

    /// Forgets all code (the caller moved the baseline epoch on, so none runs again).
    pub(crate) fn clear(&mut self) {
        // SAFETY: per the caller, no code of the region runs or is entered again.
        unsafe { self.mem.free_memory() };
        self.used = 0;
        self.insns.clear();
        self.counts.clear();
        self.counts_used = COUNT_CHUNK;
        // Back at the start of the region, where it was: it cannot fail.
        let _ = self.install_probe();
    }

    /// Bytes of code and instruction copies held.
    pub(crate) fn used(&self) -> usize {
        self.used
    }

    /// Assembles the block `ops` for privilege `user` (1: CPL 3). `gen_ptr`/`gen`: the code
    /// generation of the block's RAM page and its value when the block was decoded. None
    /// when the region is full (the caller clears it) or nothing could be assembled.
    pub(crate) fn compile(&mut self, ops: &[Op], user: bool, gen_ptr: u64, gen: u32) -> Option<(BaseFn, usize)> {
        let insns: Box<[Instruction]> = ops.iter().map(|o| o.insn).collect();
        let cnt = self.counter();
        let env = Env {
            user,
            gen_ptr,
            gen,
            insns: insns.as_ptr() as u64,
            probe: self.probe,
            body: self.body,
            chain: self.chain,
            start: ops.first().map_or(0, |o| o.ip) & !0xfff,
            len: u32::try_from(ops.len()).ok()?,
            cnt: cnt as u64,
        };
        let mut asm = self.asm.take().unwrap_or_else(|| VecAssembler::new(0));
        let code = {
            let mut e = Emit {
                a: &mut asm,
                env: &env,
                cold: Vec::new(),
                fault: vec![None; ops.len()],
                ret: None,
                cc_in_dl: None,
            };
            let ok = e.block(ops);
            asm.take().ok().filter(|_| ok)
        };
        self.asm = Some(asm);
        let code = code?;
        let at = self.mem.allocate(code.len(), 16, JITMemoryKind::Executable).ok()?;
        // SAFETY: `allocate` returned room for `code.len()` bytes in the read-write view,
        // which nothing else refers to.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), at, code.len()) };
        self.used += code.len() + std::mem::size_of_val(&*insns);
        self.insns.push(insns);
        // The block's entry is its prologue, after its chain entry.
        let run = at.expose_provenance().wrapping_add_signed(self.exec).wrapping_add(self.chain);
        let f = std::ptr::NonNull::new(std::ptr::with_exposed_provenance_mut::<u8>(run))?;
        Some((BaseFn(f), code.len()))
    }

    /// A fresh run counter (at [`BJC_BATCH`]) for a block's chain entry.
    fn counter(&mut self) -> *const AtomicU32 {
        if self.counts_used == COUNT_CHUNK {
            self.counts.push((0..COUNT_CHUNK).map(|_| AtomicU32::new(BJC_BATCH)).collect());
            self.counts_used = 0;
        }
        let chunk = self.counts.last().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: counts_used < COUNT_CHUNK, the chunk's length.
        let c = unsafe { chunk.add(self.counts_used) };
        self.counts_used += 1;
        self.used += 4;
        c
    }

    /// Links the normal exit at `site` (the address of its `jmp rel32`, still jumping to the
    /// next instruction: the exit's way to the probe) to block `to`'s chain entry. The caller
    /// checked that the exit's constant target is `to`'s RIP, on the page of the exiting
    /// block's first instruction, and that `to` is code of this region for the privilege
    /// that block runs at. False (nothing written) if `site` is not such an exit of this
    /// region.
    pub(crate) fn link(&mut self, site: u64, to: BaseFn) -> bool {
        let Some(w) = self.mem.writable(site, 5) else { return false };
        let target = (to.0.as_ptr().expose_provenance() as u64).wrapping_sub(self.chain as u64);
        let Ok(rel) = i32::try_from(target.wrapping_sub(site.wrapping_add(5)).cast_signed()) else { return false };
        // SAFETY: `writable` checked the 5 bytes lie in allocated code, in the read-write
        // view; no Rust reference to that memory exists, and none of this region's code
        // runs while the vCPU's thread is here.
        unsafe {
            if w.read() != 0xe9 || w.add(1).cast::<[u8; 4]>().read() != [0; 4] {
                return false;
            }
            w.add(1).cast::<[u8; 4]>().write(rel.to_le_bytes());
        }
        true
    }

    /// Sends the chain entry at `entry` (from `JitCtx::credit`) to the probe: its block has
    /// Cranelift code now, which the probe finds (the baseline jump cache no longer holds
    /// the block), so that linked exits to it go on there. Nothing is written unless
    /// `entry` is a chain entry of this region.
    pub(crate) fn retire_chain_entry(&mut self, entry: u64) {
        let Some(w) = self.mem.writable(entry, self.chain) else { return };
        let Ok(rel) = i32::try_from(self.probe.wrapping_sub(entry.wrapping_add(5)).cast_signed()) else { return };
        // SAFETY: as in `link`: allocated code of this region, in the read-write view, not
        // running now.
        unsafe {
            // Every chain entry starts with `mov rax, imm64` (REX.W B8).
            if w.cast::<[u8; 2]>().read() != [0x48, 0xb8] {
                return;
            }
            let mut jmp = [0xe9, 0, 0, 0, 0];
            jmp[1..].copy_from_slice(&rel.to_le_bytes());
            w.cast::<[u8; 5]>().write(jmp);
        }
    }
}

/// What the templates of one block need to know.
#[derive(Default)]
struct Env {
    user: bool,
    gen_ptr: u64,
    gen: u32,
    /// Address of the block's first `Instruction` copy.
    insns: u64,
    /// Where the baseline probe runs.
    probe: u64,
    /// Bytes of the prologue (checked).
    body: usize,
    /// Bytes of the chain entry (checked).
    chain: usize,
    /// The linear page of the block's first instruction: exits to constant targets on it
    /// can be linked.
    start: u64,
    /// The block's instructions.
    len: u32,
    /// Address of the block's run counter (an `AtomicU32`).
    cnt: u64,
}

/// Code placed after the block's main path (rarely run).
enum Cold {
    /// TLB miss of an access of `size` bytes (la in RSI): `jit_read` (result in RAX), or
    /// for a `write` `jit_write` (value in RDX).
    Miss { at: DynamicLabel, join: DynamicLabel, size: u8, write: bool, fault: DynamicLabel },
    /// A store hit a page holding code (its generation's address in RAX).
    Note { at: DynamicLabel, join: DynamicLabel },
    /// An exit with RIP `rip` returning `word` (that may be linked: see [`Emit::exit_link`]).
    Exit { at: DynamicLabel, rip: u64, word: u64, link: bool },
    /// `jit_generic` asked to exit (its word in RAX) after `before` instructions.
    Generic { at: DynamicLabel, before: u64 },
}

fn off(o: usize) -> i32 {
    i32::try_from(o).unwrap_or(i32::MAX)
}

fn gpr(r: u8) -> i32 {
    off(offset_of!(Cpu, gpr) + 8 * usize::from(r & 15))
}

const RIP: usize = offset_of!(Cpu, rip);
const RFLAGS: usize = offset_of!(Cpu, rflags);
/// The arithmetic flags (CF PF AF ZF SF OF).
const ARITH: i32 = 0x8d5;

/// The operand-size prefix (66h) or REX.W of an operation of `sz` bytes on the legacy
/// registers (none for 1 and 4).
fn size_prefix(sz: u8) -> Option<u8> {
    match sz {
        2 => Some(0x66),
        8 => Some(0x48),
        _ => None,
    }
}

struct Emit<'a> {
    a: &'a mut VecAssembler<X64Relocation>,
    env: &'a Env,
    cold: Vec<Cold>,
    /// The fault exit of each instruction (made on first use).
    fault: Vec<Option<DynamicLabel>>,
    /// The shared epilogue (RAX = the exit word).
    ret: Option<DynamicLabel>,
    /// The instruction (a Jcc) whose condition the instruction before it left in DL
    /// (SETcc right after the host's CMP/TEST/ALU, before the flags were merged).
    cc_in_dl: Option<usize>,
}

impl Emit<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.a.extend(b.iter().copied());
    }

    /// `[prefix] op modrm` for an operation of `sz` bytes (`op8` its byte form).
    fn rr(&mut self, sz: u8, op8: u8, op: u8, modrm: u8) {
        if let Some(p) = size_prefix(sz) {
            self.bytes(&[p]);
        }
        self.bytes(&[if sz == 1 { op8 } else { op }, modrm]);
    }

    fn ret_label(&mut self) -> DynamicLabel {
        match self.ret {
            Some(l) => l,
            None => {
                let l = self.a.new_dynamic_label();
                self.ret = Some(l);
                l
            }
        }
    }

    /// The fault exit of instruction `i` (RIP its own, `i + 1` retired).
    fn fault_label(&mut self, i: usize, ip: u64) -> DynamicLabel {
        if let Some(Some(l)) = self.fault.get(i) {
            return *l;
        }
        let at = self.a.new_dynamic_label();
        self.cold.push(Cold::Exit { at, rip: ip, word: (i as u64 + 1) | (EXIT_FAULT << 32), link: false });
        if let Some(s) = self.fault.get_mut(i) {
            *s = Some(at);
        }
        at
    }

    fn cold_exit(&mut self, rip: u64, word: u64) -> DynamicLabel {
        let at = self.a.new_dynamic_label();
        self.cold.push(Cold::Exit { at, rip, word, link: false });
        at
    }

    /// [`Self::cold_exit`] of a branch to the constant `rip` (see [`Self::exit_link`]).
    fn cold_exit_link(&mut self, rip: u64, word: u64) -> DynamicLabel {
        let at = self.a.new_dynamic_label();
        self.cold.push(Cold::Exit { at, rip, word, link: true });
        at
    }

    /// [`Self::exit`] of a branch or fall-through to the constant `rip`. A normal exit to the
    /// page of the block's first instruction can be linked: it jumps to the probe through a
    /// `jmp rel32` to its next instruction, with its own address in `JitCtx::link_site`;
    /// `super::enter` points that jump at the target block's chain entry when the target
    /// has baseline code. (Within that page, the target translates to the page the block
    /// itself was entered on: compiled code runs nothing that changes translations.)
    fn exit_link(&mut self, rip: u64, word: u64) {
        if word >> 32 != EXIT_NORMAL || rip & !0xfff != self.env.start {
            return self.exit(rip, word);
        }
        self.store_rip(rip);
        let n = i32::try_from(word & 0xffff_ffff).unwrap_or(0);
        let p = self.env.probe.cast_signed();
        let site = self.a.new_dynamic_label();
        dynasm!(self.a
            ; .arch x64
            ; sub QWORD [r12 + off(offset_of!(JitCtx, left))], n
            ; =>site
        );
        // jmp rel32 to the next instruction (until linked).
        self.bytes(&[0xe9, 0, 0, 0, 0]);
        dynasm!(self.a
            ; .arch x64
            ; lea rax, [=>site]
            ; mov [r12 + off(offset_of!(JitCtx, link_site))], rax
            ; mov rax, QWORD p
            ; jmp rax
        );
    }

    /// Stores RIP = `rip` and returns `word`; a normal exit goes on through the probe.
    fn exit(&mut self, rip: u64, word: u64) {
        self.store_rip(rip);
        self.leave(word);
    }

    /// RIP = `rip` (an imm32 sign-extended where it fits: kernel and low user addresses).
    fn store_rip(&mut self, rip: u64) {
        if let Ok(v) = i32::try_from(rip.cast_signed()) {
            dynasm!(self.a ; .arch x64 ; mov QWORD [rbx + off(RIP)], v);
        } else {
            let to = rip.cast_signed();
            dynasm!(self.a
                ; .arch x64
                ; mov rax, QWORD to
                ; mov [rbx + off(RIP)], rax
            );
        }
    }

    /// Leaves the block (RIP stored): returns `word`, or for a normal exit takes its count
    /// from `JitCtx::left` and jumps to the probe, which goes on in the
    /// next block.
    fn leave(&mut self, word: u64) {
        if word >> 32 == EXIT_NORMAL {
            let n = i32::try_from(word & 0xffff_ffff).unwrap_or(0);
            let p = self.env.probe.cast_signed();
            dynasm!(self.a
                ; .arch x64
                ; sub QWORD [r12 + off(offset_of!(JitCtx, left))], n
                ; mov rax, QWORD p
                ; jmp rax
            );
        } else {
            let ret = self.ret_label();
            let w = word.cast_signed();
            dynasm!(self.a
                ; .arch x64
                ; mov rax, QWORD w
                ; jmp =>ret
            );
        }
    }

    /// Emits the block; false if its prologue is not the probe's (never).
    fn block(&mut self, ops: &[Op]) -> bool {
        let [stale, credit, body] =
            [self.a.new_dynamic_label(), self.a.new_dynamic_label(), self.a.new_dynamic_label()];
        let entry = self.a.new_dynamic_label();
        dynasm!(self.a ; .arch x64 ; =>entry);
        chain_entry(self.a, self.env, [stale, credit, body]);
        if self.a.offset().0 != self.env.chain {
            return false;
        }
        prologue(self.a);
        if self.a.offset().0 != self.env.chain + self.env.body {
            return false;
        }
        dynasm!(self.a ; .arch x64 ; =>body);
        let mut ended = false;
        for (i, op) in ops.iter().enumerate() {
            if self.op(i, op, ops.get(i + 1)) {
                ended = true;
                break;
            }
        }
        if !ended {
            let last = ops.last().map_or(0, |o| o.next_ip);
            self.exit_link(last, ops.len() as u64);
        }
        let ret = self.ret_label();
        dynasm!(self.a ; .arch x64 ; =>ret);
        epilogue(self.a);
        // The chain entry's ways out: RIP is the block's own (its predecessor stored it).
        let batch = i32::try_from(BJC_BATCH).unwrap_or(i32::MAX);
        dynasm!(self.a
            ; .arch x64
            ; =>credit
            ; mov DWORD [rax], batch
            ; lea rax, [=>entry]
            ; mov [r12 + off(offset_of!(JitCtx, credit))], rax
            ; =>stale
            ; xor eax, eax
            ; jmp =>ret
        );
        for c in std::mem::take(&mut self.cold) {
            self.emit_cold(c);
        }
        true
    }

    fn emit_cold(&mut self, c: Cold) {
        let ret = self.ret_label();
        let faulted = off(offset_of!(JitCtx, faulted));
        match c {
            Cold::Miss { at, join, size, write, fault } => {
                dynasm!(self.a ; .arch x64 ; =>at ; mov rdi, rbx);
                let f = if write {
                    dynasm!(self.a ; .arch x64 ; mov r8, rdx);
                    super::jit_write as *const () as i64
                } else {
                    super::jit_read as *const () as i64
                };
                dynasm!(self.a
                    ; .arch x64
                    ; mov rdx, rsi
                    ; mov rsi, r12
                    ; mov ecx, i32::from(size)
                    ; mov rax, QWORD f
                    ; call rax
                    ; cmp QWORD [r12 + faulted], 0
                    ; jne =>fault
                    ; jmp =>join
                );
            }
            Cold::Note { at, join } => {
                let f = super::jit_note_write as *const () as i64;
                dynasm!(self.a
                    ; .arch x64
                    ; =>at
                    ; mov rdi, rax
                    ; mov rax, QWORD f
                    ; call rax
                    ; jmp =>join
                );
            }
            Cold::Exit { at, rip, word, link } => {
                dynasm!(self.a ; .arch x64 ; =>at);
                if link {
                    self.exit_link(rip, word);
                } else {
                    self.exit(rip, word);
                }
            }
            Cold::Generic { at, before } => {
                let b = i32::try_from(before).unwrap_or(i32::MAX);
                dynasm!(self.a
                    ; .arch x64
                    ; =>at
                    ; add rax, b
                    ; jmp =>ret
                );
            }
        }
    }

    /// RSI = the effective address of `m` (no segment base); clobbers RAX.
    fn ea(&mut self, m: &MemOp) {
        let disp = m.disp.cast_signed();
        match (m.base != NONE, i32::try_from(disp)) {
            (true, Ok(0)) => dynasm!(self.a ; .arch x64 ; mov rsi, [rbx + gpr(m.base)]),
            (true, Ok(d)) => dynasm!(self.a ; .arch x64 ; mov rsi, [rbx + gpr(m.base)] ; add rsi, d),
            (false, Ok(d)) => dynasm!(self.a ; .arch x64 ; mov rsi, d),
            (b, Err(_)) => {
                dynasm!(self.a ; .arch x64 ; mov rsi, QWORD disp);
                if b {
                    dynasm!(self.a ; .arch x64 ; add rsi, [rbx + gpr(m.base)]);
                }
            }
        }
        if m.index != NONE {
            dynasm!(self.a ; .arch x64 ; mov rax, [rbx + gpr(m.index)]);
            if m.scale > 0 {
                dynasm!(self.a ; .arch x64 ; shl rax, m.scale as i8);
            }
            dynasm!(self.a ; .arch x64 ; add rsi, rax);
        }
    }

    /// RSI = the linear address of `m`; clobbers RAX.
    fn la(&mut self, m: &MemOp) {
        self.ea(m);
        let s = match m.seg {
            1 => sreg::FS,
            2 => sreg::GS,
            _ => return,
        };
        let o = off(offset_of!(Cpu, seg) + s * std::mem::size_of::<Seg>() + offset_of!(Seg, base));
        dynasm!(self.a ; .arch x64 ; add rsi, [rbx + o]);
    }

    /// The TLB-hit test for `size` bytes at RSI: on a hit RDI = the host address and RAX
    /// = the entry, else jumps to `slow`. Clobbers RCX.
    fn tlb(&mut self, size: u8, write: bool, slow: DynamicLabel) {
        let need = i32::from(P_RAM | (if write { P_WRITE } else { P_READ }) | if self.env.user { P_USER } else { 0 });
        let esz = off(tlb_layout::SIZE);
        let mask = off(TLB_SIZE - 1);
        dynasm!(self.a
            ; .arch x64
            ; mov rax, rsi
            ; shr rax, 12
            ; and eax, mask
            ; imul eax, eax, esz
            ; add rax, r13
            ; lea rcx, [rsi + i32::from(size) - 1]
            ; and rcx, -4096
            ; or rcx, 1
            ; cmp rcx, [rax + off(tlb_layout::TAG)]
            ; jne =>slow
            ; movzx ecx, BYTE [rax + off(tlb_layout::PERM)]
            ; and ecx, need
            ; cmp ecx, need
            ; jne =>slow
            ; mov rdi, rsi
            ; and edi, 0xfff
            ; add rdi, [rax + off(tlb_layout::HOST)]
        );
    }

    /// RAX = `size` bytes at linear RSI, zero-extended (a fault exits as instruction `i`).
    /// Clobbers every scratch register but RSI on a hit.
    fn read(&mut self, size: u8, i: usize, ip: u64) {
        let slow = self.a.new_dynamic_label();
        let join = self.a.new_dynamic_label();
        self.tlb(size, false, slow);
        match size {
            1 => dynasm!(self.a ; .arch x64 ; movzx eax, BYTE [rdi]),
            2 => dynasm!(self.a ; .arch x64 ; movzx eax, WORD [rdi]),
            4 => dynasm!(self.a ; .arch x64 ; mov eax, [rdi]),
            _ => dynasm!(self.a ; .arch x64 ; mov rax, [rdi]),
        }
        dynasm!(self.a ; .arch x64 ; =>join);
        let fault = self.fault_label(i, ip);
        self.cold.push(Cold::Miss { at: slow, join, size, write: false, fault });
    }

    /// Writes the low `size` bytes of RDX at linear RSI (a fault exits as instruction `i`),
    /// retiring code on the page written. Clobbers every scratch register.
    fn write(&mut self, size: u8, i: usize, ip: u64) {
        let slow = self.a.new_dynamic_label();
        let join = self.a.new_dynamic_label();
        let note = self.a.new_dynamic_label();
        self.tlb(size, true, slow);
        match size {
            1 => dynasm!(self.a ; .arch x64 ; mov [rdi], dl),
            2 => dynasm!(self.a ; .arch x64 ; mov [rdi], dx),
            4 => dynasm!(self.a ; .arch x64 ; mov [rdi], edx),
            _ => dynasm!(self.a ; .arch x64 ; mov [rdi], rdx),
        }
        dynasm!(self.a
            ; .arch x64
            ; mov rax, [rax + off(tlb_layout::GEN)]
            ; test rax, rax
            ; jz =>join
            ; test DWORD [rax], GEN_CODE as i32
            ; jnz =>note
            ; =>join
        );
        let fault = self.fault_label(i, ip);
        self.cold.push(Cold::Miss { at: slow, join, size, write: true, fault });
        self.cold.push(Cold::Note { at: note, join });
    }

    /// After a store by instruction `i` that is not the block's last: if the block's own
    /// page changed generation, end here (RIP = `next`).
    fn check_gen(&mut self, next: u64, i: usize) {
        let out = self.cold_exit(next, (i as u64 + 1) | (EXIT_NORMAL << 32));
        let (p, g) = (self.env.gen_ptr.cast_signed(), self.env.gen.cast_signed());
        dynasm!(self.a
            ; .arch x64
            ; mov rax, QWORD p
            ; cmp DWORD [rax], g
            ; jne =>out
        );
    }

    /// RAX = source `s` at `sz` bytes, zero-extended.
    fn src(&mut self, s: Src, sz: u8, i: usize, ip: u64) {
        match s {
            Src::Reg(r) => self.load_reg(r, sz),
            Src::Imm(v) => {
                let v = v.cast_signed();
                dynasm!(self.a ; .arch x64 ; mov rax, QWORD v);
            }
            Src::Mem(m) => {
                self.la(&m);
                self.read(sz, i, ip);
            }
        }
    }

    /// RAX = GPR `r` at `sz` bytes, zero-extended.
    fn load_reg(&mut self, r: u8, sz: u8) {
        let o = gpr(r);
        match sz {
            1 => dynasm!(self.a ; .arch x64 ; movzx eax, BYTE [rbx + o]),
            2 => dynasm!(self.a ; .arch x64 ; movzx eax, WORD [rbx + o]),
            4 => dynasm!(self.a ; .arch x64 ; mov eax, [rbx + o]),
            _ => dynasm!(self.a ; .arch x64 ; mov rax, [rbx + o]),
        }
    }

    /// GPR `d` = RAX at `sz` bytes (32-bit results zero-extended, 8- and 16-bit ones
    /// merged).
    fn set(&mut self, d: u8, sz: u8) {
        let o = gpr(d);
        match sz {
            1 => dynasm!(self.a ; .arch x64 ; mov [rbx + o], al),
            2 => dynasm!(self.a ; .arch x64 ; mov [rbx + o], ax),
            4 => dynasm!(self.a ; .arch x64 ; mov eax, eax ; mov [rbx + o], rax),
            _ => dynasm!(self.a ; .arch x64 ; mov [rbx + o], rax),
        }
    }

    /// Loads the guest's arithmetic flags (R14) into the host's: OF through an ADD that
    /// overflows iff OF is set, the other five through SAHF (as `crate::alu`). Clobbers
    /// RAX, RCX.
    fn flags_in(&mut self) {
        dynasm!(self.a
            ; .arch x64
            ; mov rax, r14
            ; mov ecx, eax
            ; shr ecx, 5
            ; and ecx, 0x40
            ; add cl, cl
            ; mov ah, al
            ; sahf
        );
    }

    /// RCX = the host's arithmetic flags now.
    fn flags_capture(&mut self) {
        dynasm!(self.a
            ; .arch x64
            ; pushfq
            ; pop rcx
            ; and ecx, ARITH
        );
    }

    /// Guest RFLAGS's arithmetic flags = RCX's.
    fn flags_merge(&mut self) {
        dynasm!(self.a
            ; .arch x64
            ; and r14, !ARITH
            ; or r14, rcx
        );
    }

    /// Guest arithmetic flags = the host's now. Clobbers RCX.
    fn flags_out(&mut self) {
        self.flags_capture();
        self.flags_merge();
    }

    /// Host condition `cc` (flags loaded) to AL (SETcc AL).
    fn setcc_al(&mut self, cc: ConditionCode) -> bool {
        let Some(n) = cc_num(cc) else { return false };
        self.bytes(&[0x0f, 0x90 + n, 0xc0]);
        true
    }

    /// Emits instruction `i`; returns whether it ended the block (an exit on every path).
    fn op(&mut self, i: usize, op: &Op, next_op: Option<&Op>) -> bool {
        let last = next_op.is_none();
        let (ip, next) = (op.ip, op.next_ip);
        let done = (i as u64 + 1) | (EXIT_NORMAL << 32);
        match op.uop {
            Uop::Nop => {}
            Uop::MovR { d, s, sz } => {
                self.src(s, sz, i, ip);
                self.set(d, sz);
            }
            Uop::MovM { m, s: s @ (Src::Reg(_) | Src::Imm(_)), sz } => {
                self.src(s, sz, i, ip);
                dynasm!(self.a ; .arch x64 ; mov rdx, rax);
                self.la(&m);
                self.write(sz, i, ip);
                if !last {
                    self.check_gen(next, i);
                }
            }
            Uop::Lea { d, m, sz } => {
                self.ea(&m);
                dynasm!(self.a ; .arch x64 ; mov rax, rsi);
                self.set(d, sz);
            }
            Uop::Alu { op: o, d, s, sz, write } if d & HIGH8 == 0 => {
                let Some(code) = alu_code(o) else { return self.generic(i, op) };
                self.src(s, sz, i, ip);
                dynasm!(self.a ; .arch x64 ; mov rdx, rax);
                self.load_reg(d, sz);
                // op rax, rdx
                self.rr(sz, code - 1, code, 0xd0);
                // A Jcc right after (CMP/TEST + Jcc): its condition from the host's flags
                // now, into DL (the source is not needed any more).
                if let Some(Op { uop: Uop::Jcc { cc, .. }, .. }) = next_op {
                    if let Some(n) = cc_num(*cc) {
                        self.bytes(&[0x0f, 0x90 + n, 0xc2]); // setcc dl
                        self.cc_in_dl = Some(i + 1);
                    }
                }
                self.flags_out();
                if write {
                    self.set(d, sz);
                }
            }
            Uop::AluM { op: o, m, s: s @ (Src::Reg(_) | Src::Imm(_)), sz, write } => {
                let Some(code) = alu_code(o) else { return self.generic(i, op) };
                self.la(&m);
                dynasm!(self.a ; .arch x64 ; mov r15, rsi);
                self.read(sz, i, ip);
                dynasm!(self.a ; .arch x64 ; mov r8, rax);
                self.src(s, sz, i, ip);
                dynasm!(self.a ; .arch x64 ; mov rdx, rax ; mov rax, r8);
                self.rr(sz, code - 1, code, 0xd0);
                self.flags_capture();
                if write {
                    dynasm!(self.a
                        ; .arch x64
                        ; mov [rsp], rcx
                        ; mov rdx, rax
                        ; mov rsi, r15
                    );
                    self.write(sz, i, ip);
                    dynasm!(self.a ; .arch x64 ; mov rcx, [rsp]);
                }
                self.flags_merge();
                if write && !last {
                    self.check_gen(next, i);
                }
            }
            Uop::Jcc { cc, target } => {
                let Some(n) = cc_num(cc) else { return self.generic(i, op) };
                let taken = self.cold_exit_link(target, done);
                if self.cc_in_dl == Some(i) {
                    dynasm!(self.a ; .arch x64 ; test dl, dl ; jnz =>taken);
                } else {
                    self.flags_in();
                    // jcc rel32 to the cold exit: SETcc + TEST keeps dynasm's label handling.
                    self.bytes(&[0x0f, 0x90 + n, 0xc0]);
                    dynasm!(self.a ; .arch x64 ; test al, al ; jnz =>taken);
                }
                if last {
                    self.exit_link(next, done);
                    return true;
                }
            }
            Uop::Jmp { target } => {
                self.exit_link(target, done);
                return true;
            }
            Uop::Call { target } => {
                let n = next.cast_signed();
                dynasm!(self.a ; .arch x64 ; mov rdx, QWORD n);
                self.push(i, ip);
                self.exit_link(target, done);
                return true;
            }
            Uop::Ret => {
                dynasm!(self.a ; .arch x64 ; mov rsi, [rbx + gpr(4)]);
                self.read(8, i, ip);
                self.canonical(i, ip);
                dynasm!(self.a ; .arch x64 ; add QWORD [rbx + gpr(4)], 8);
                self.exit_to_rax(done);
                return true;
            }
            Uop::JmpInd { s } => {
                self.src(s, 8, i, ip);
                self.canonical(i, ip);
                self.exit_to_rax(done);
                return true;
            }
            Uop::CallInd { s } => {
                self.src(s, 8, i, ip);
                self.canonical(i, ip);
                let n = next.cast_signed();
                dynasm!(self.a ; .arch x64 ; mov [rsp], rax ; mov rdx, QWORD n);
                self.push(i, ip);
                dynasm!(self.a ; .arch x64 ; mov rax, [rsp]);
                self.exit_to_rax(done);
                return true;
            }
            Uop::Push { r } => {
                dynasm!(self.a ; .arch x64 ; mov rdx, [rbx + gpr(r)]);
                self.push(i, ip);
                if !last {
                    self.check_gen(next, i);
                }
            }
            Uop::PushI { v } => {
                let v = v.cast_signed();
                dynasm!(self.a ; .arch x64 ; mov rdx, QWORD v);
                self.push(i, ip);
                if !last {
                    self.check_gen(next, i);
                }
            }
            Uop::Pushf => {
                let keep = !((flags::RF | flags::VM).cast_signed());
                dynasm!(self.a ; .arch x64 ; mov rdx, QWORD keep ; and rdx, r14);
                self.push(i, ip);
                if !last {
                    self.check_gen(next, i);
                }
            }
            Uop::Pop { r } => {
                dynasm!(self.a ; .arch x64 ; mov rsi, [rbx + gpr(4)]);
                self.read(8, i, ip);
                dynasm!(self.a
                    ; .arch x64
                    ; add QWORD [rbx + gpr(4)], 8
                    ; mov [rbx + gpr(r)], rax
                );
            }
            Uop::IncDec { d, sz, dec } => {
                // INC/DEC keep CF: the guest's flags go in first.
                self.flags_in();
                self.load_reg(d, sz);
                self.rr(sz, 0xfe, 0xff, if dec { 0xc8 } else { 0xc0 });
                self.flags_out();
                self.set(d, sz);
            }
            Uop::IncDecM { m, sz, dec } => {
                self.la(&m);
                dynasm!(self.a ; .arch x64 ; mov r15, rsi);
                self.read(sz, i, ip);
                dynasm!(self.a ; .arch x64 ; mov rdx, rax);
                self.flags_in();
                // inc/dec rdx
                self.rr(sz, 0xfe, 0xff, if dec { 0xca } else { 0xc2 });
                self.flags_capture();
                dynasm!(self.a ; .arch x64 ; mov [rsp], rcx ; mov rsi, r15);
                self.write(sz, i, ip);
                dynasm!(self.a ; .arch x64 ; mov rcx, [rsp]);
                self.flags_merge();
                if !last {
                    self.check_gen(next, i);
                }
            }
            Uop::Unary { neg, d, sz } => {
                self.load_reg(d, sz);
                self.rr(sz, 0xf6, 0xf7, if neg { 0xd8 } else { 0xd0 });
                if neg {
                    self.flags_out();
                }
                self.set(d, sz);
            }
            Uop::Shift { op: o, d, c, sz } => {
                let Some(ext) = shift_ext(o) else { return self.generic(i, op) };
                // Rotates keep SF ZF AF PF, shifts by a masked count of 0 every flag.
                self.flags_in();
                self.load_reg(d, sz);
                self.rr(sz, 0xc0, 0xc1, 0xc0 | (ext << 3));
                self.bytes(&[c]);
                self.flags_out();
                self.set(d, sz);
            }
            Uop::ShiftCl { op: o, d, sz } => {
                let Some(ext) = shift_ext(o) else { return self.generic(i, op) };
                self.flags_in();
                dynasm!(self.a ; .arch x64 ; mov rcx, [rbx + gpr(1)]);
                self.load_reg(d, sz);
                self.rr(sz, 0xd2, 0xd3, 0xc0 | (ext << 3));
                self.flags_out();
                self.set(d, sz);
            }
            Uop::AluF { op: o, d, s, sz } if sz >= 2 => {
                self.src(s, sz, i, ip);
                dynasm!(self.a ; .arch x64 ; mov rdx, rax);
                self.flags_in();
                self.load_reg(d, sz);
                match o {
                    Op2::Adc => self.rr(sz, 0x10, 0x11, 0xd0),
                    Op2::Sbb => self.rr(sz, 0x18, 0x19, 0xd0),
                    Op2::Imul => self.imul_rax_rdx(sz),
                    _ => return self.generic(i, op),
                }
                self.flags_out();
                self.set(d, sz);
            }
            Uop::Imul3 { d, s, imm, sz } if sz >= 2 => {
                self.src(s, sz, i, ip);
                dynasm!(self.a ; .arch x64 ; mov rdx, rax);
                self.flags_in();
                let v = imm.cast_signed();
                dynasm!(self.a ; .arch x64 ; mov rax, QWORD v);
                self.imul_rax_rdx(sz);
                self.flags_out();
                self.set(d, sz);
            }
            Uop::Setcc { cc, d } => {
                self.flags_in();
                if !self.setcc_al(cc) {
                    return self.generic(i, op);
                }
                dynasm!(self.a ; .arch x64 ; mov [rbx + gpr(d)], al);
            }
            Uop::SetccM { cc, m } => {
                let Some(n) = cc_num(cc) else { return self.generic(i, op) };
                self.la(&m);
                self.flags_in();
                self.bytes(&[0x0f, 0x90 + n, 0xc2]); // setcc dl
                self.write(1, i, ip);
                if !last {
                    self.check_gen(next, i);
                }
            }
            Uop::Cmov { cc, d, s, sz } if sz >= 2 => {
                let Some(n) = cc_num(cc) else { return self.generic(i, op) };
                self.src(s, sz, i, ip);
                dynasm!(self.a ; .arch x64 ; mov rdx, rax);
                self.flags_in();
                dynasm!(self.a ; .arch x64 ; mov rax, [rbx + gpr(d)]);
                // cmovcc rax, rdx (a 32-bit CMOV zero-extends whether or not it moves).
                if let Some(p) = size_prefix(sz) {
                    self.bytes(&[p]);
                }
                self.bytes(&[0x0f, 0x40 + n, 0xc2]);
                self.set(d, sz);
            }
            Uop::MovX { d, m, ssz, dsz, signed } => {
                self.la(&m);
                self.read(ssz, i, ip);
                if signed {
                    self.sext_rax(ssz);
                }
                self.set(d, dsz);
            }
            Uop::MovXR { d, s, ssz, dsz, signed } if s & HIGH8 == 0 => {
                self.load_reg(s, ssz);
                if signed {
                    self.sext_rax(ssz);
                }
                self.set(d, dsz);
            }
            Uop::Bswap { d, sz: sz @ (4 | 8) } => {
                self.load_reg(d, sz);
                if sz == 8 {
                    dynasm!(self.a ; .arch x64 ; bswap rax);
                } else {
                    dynasm!(self.a ; .arch x64 ; bswap eax);
                }
                self.set(d, sz);
            }
            _ => return self.generic(i, op),
        }
        false
    }

    /// imul rax, rdx at `sz` (2, 4 or 8) bytes.
    fn imul_rax_rdx(&mut self, sz: u8) {
        match sz {
            2 => self.bytes(&[0x66, 0x0f, 0xaf, 0xc2]),
            4 => self.bytes(&[0x0f, 0xaf, 0xc2]),
            _ => self.bytes(&[0x48, 0x0f, 0xaf, 0xc2]),
        }
    }

    /// RAX = the low `ssz` bytes of RAX sign-extended to 64 bits.
    fn sext_rax(&mut self, ssz: u8) {
        match ssz {
            1 => dynasm!(self.a ; .arch x64 ; movsx rax, al),
            2 => dynasm!(self.a ; .arch x64 ; movsx rax, ax),
            4 => dynasm!(self.a ; .arch x64 ; movsxd rax, eax),
            _ => {}
        }
    }

    /// Pushes RDX (RSP - 8 written first, RSP updated only when the write succeeded).
    fn push(&mut self, i: usize, ip: u64) {
        dynasm!(self.a
            ; .arch x64
            ; mov rsi, [rbx + gpr(4)]
            ; sub rsi, 8
            ; mov r15, rsi
        );
        self.write(8, i, ip);
        dynasm!(self.a ; .arch x64 ; mov [rbx + gpr(4)], r15);
    }

    /// #GP(0) as instruction `i` unless RAX is canonical.
    fn canonical(&mut self, i: usize, ip: u64) {
        let gp = self.cold_exit(ip, (i as u64 + 1) | (EXIT_GP << 32));
        dynasm!(self.a
            ; .arch x64
            ; mov rcx, rax
            ; shl rcx, 16
            ; sar rcx, 16
            ; cmp rcx, rax
            ; jne =>gp
        );
    }

    /// Exits with RIP = RAX (as [`Self::exit`]).
    fn exit_to_rax(&mut self, word: u64) {
        dynasm!(self.a ; .arch x64 ; mov [rbx + off(RIP)], rax);
        self.leave(word);
    }

    /// Instruction `i` through `jit_generic` (registers are in the `Cpu` already; RFLAGS is
    /// stored before and reloaded after). Returns false: the block goes on after it unless
    /// the helper asks to exit.
    fn generic(&mut self, i: usize, op: &Op) -> bool {
        let at = (self.env.insns + (i * std::mem::size_of::<Instruction>()) as u64).cast_signed();
        let how = super::generic_how(&op.insn, self.env.user);
        let how = i32::try_from(how).unwrap_or(0);
        let f = super::jit_generic as *const () as i64;
        let out = self.a.new_dynamic_label();
        self.cold.push(Cold::Generic { at: out, before: i as u64 });
        dynasm!(self.a
            ; .arch x64
            ; mov [rbx + off(RFLAGS)], r14
            ; mov rdi, rbx
            ; mov rsi, r12
            ; mov rdx, QWORD at
            ; mov ecx, how
            ; mov rax, QWORD f
            ; call rax
            ; mov r14, [rbx + off(RFLAGS)]
            ; test rax, rax
            ; jnz =>out
        );
        false
    }
}

/// x86 condition number (the low nibble of Jcc/SETcc/CMOVcc opcodes).
fn cc_num(cc: ConditionCode) -> Option<u8> {
    use ConditionCode as C;
    Some(match cc {
        C::o => 0,
        C::no => 1,
        C::b => 2,
        C::ae => 3,
        C::e => 4,
        C::ne => 5,
        C::be => 6,
        C::a => 7,
        C::s => 8,
        C::ns => 9,
        C::p => 10,
        C::np => 11,
        C::l => 12,
        C::ge => 13,
        C::le => 14,
        C::g => 15,
        _ => return None,
    })
}

/// The opcode of `op r/m, r` (its byte form is one less).
fn alu_code(op: Op2) -> Option<u8> {
    Some(match op {
        Op2::Add => 0x01,
        Op2::Or => 0x09,
        Op2::And => 0x21,
        Op2::Sub => 0x29,
        Op2::Xor => 0x31,
        _ => return None,
    })
}

/// The ModRM reg field of a shift or rotate (group 2).
fn shift_ext(op: Op2) -> Option<u8> {
    Some(match op {
        Op2::Rol => 0,
        Op2::Ror => 1,
        Op2::Shl => 4,
        Op2::Shr => 5,
        Op2::Sar => 7,
        _ => return None,
    })
}

/// Every block's chain entry, placed before its prologue: where a linked exit of a block
/// on the same page jumps (in that block's frame, RIP stored, its count taken from
/// `JitCtx::left`). It goes on in the block's body when the block's page kept its
/// generation, the block's length fits in what is left of `JitCtx::left`, and its run
/// counter has not run out; the counter counts down [`super::BJC_BATCH`] runs, after which
/// the block leaves (`credit`: the counter reset, its address in `JitCtx::credit`) so that
/// `super::enter` counts the batch toward Cranelift's threshold, as the probe's batches
/// are. Otherwise (`stale`) it returns an exit word of 0 (`EXIT_NORMAL`). (This vCPU's
/// own stores to the page end the block that made them before it links on; the generation
/// check catches other vCPUs' stores, as the probe's does.) Every
/// instruction has a fixed size (checked), so every chain entry is as long.
fn chain_entry(a: &mut VecAssembler<X64Relocation>, env: &Env, [stale, credit, body]: [DynamicLabel; 3]) {
    let (p, g) = (env.gen_ptr.cast_signed(), env.gen.cast_signed());
    let len = i32::try_from(env.len).unwrap_or(i32::MAX);
    let cnt = env.cnt.cast_signed();
    dynasm!(a
        ; .arch x64
        ; mov rax, QWORD p
        ; cmp DWORD [rax], g
        ; jne =>stale
        ; cmp QWORD [r12 + off(offset_of!(JitCtx, left))], len
        ; jb =>stale
        ; mov rax, QWORD cnt
        ; dec DWORD [rax]
        ; jz =>credit
        ; jmp =>body
    );
}

/// Every block's prologue: saves the callee-saved registers it uses, keeps RSP 16-byte
/// aligned for helper calls, loads RBX = cpu, R12 = ctx, R13 = the TLB, R14 = RFLAGS.
fn prologue(a: &mut VecAssembler<X64Relocation>) {
    dynasm!(a
        ; .arch x64
        ; push rbp
        ; mov rbp, rsp
        ; push rbx
        ; push r12
        ; push r13
        ; push r14
        ; push r15
        ; sub rsp, 8
        ; mov rbx, rdi
        ; mov r12, rsi
        ; mov r13, [rsi + off(offset_of!(JitCtx, tlb))]
        ; mov r14, [rbx + off(RFLAGS)]
    );
}

/// Every block's epilogue (RAX = the exit word): stores RFLAGS and returns.
fn epilogue(a: &mut VecAssembler<X64Relocation>) {
    leave_frame(a);
    dynasm!(a ; .arch x64 ; ret);
}

/// Stores RFLAGS and takes down the frame [`prologue`] made, restoring the caller's
/// registers (RAX, RCX, RDX, RSI, RDI and R8-R11 untouched).
fn leave_frame(a: &mut VecAssembler<X64Relocation>) {
    dynasm!(a
        ; .arch x64
        ; mov [rbx + off(RFLAGS)], r14
        ; add rsp, 8
        ; pop r15
        ; pop r14
        ; pop r13
        ; pop r12
        ; pop rbx
        ; pop rbp
    );
}

/// The baseline probe (QEMU's `lookup_and_goto_ptr` for this tier), jumped to by a block's
/// normal exits in the block's frame after they stored RIP and moved their count from
/// `JitCtx::left`. It goes on in the baseline code that the baseline
/// jump cache holds for RIP when `super::bjc_next` would without its batch of hits: the
/// entry is RIP's, of the current baseline epoch and privilege, its length fits in what is
/// left (`JitCtx::left`), RIP translates to its GPA through a TLB entry that allows
/// execution (a miss returns), its page kept its generation, and fewer than `BJC_BATCH`
/// runs were counted in it (the Rust side adds the batch to the block's hits). It enters
/// the block after its prologue (`body` bytes), with the registers as they are. Else, when
/// Cranelift's jump cache holds code for RIP under the same conditions (of the current
/// epoch), it leaves the frame and jumps to it as a tail call with `(cpu, ctx)` (Cranelift's
/// `tail` convention passes them, saves registers and returns as System V does, so that
/// code returns to this block's caller). Otherwise it returns an exit word of 0
/// (`EXIT_NORMAL`, the count being taken from `JitCtx::left`).
fn probe(a: &mut VecAssembler<X64Relocation>, body: usize) {
    let (bmiss, miss) = (a.new_dynamic_label(), a.new_dynamic_label());
    let shift = i8::try_from(64 - JC_SIZE.trailing_zeros()).unwrap_or(52);
    let esz = off(jc_layout::SIZE);
    let ctx = |f: usize| off(f);
    let fib = 0x9e37_79b9_7f4a_7c15_u64.cast_signed();
    let body = off(body);
    dynasm!(a
        ; .arch x64
        ; mov rsi, [rbx + off(RIP)]
        // super::jc_index: Fibonacci hashing (R9: the entry's offset in either table).
        ; mov rax, QWORD fib
        ; imul rax, rsi
        ; shr rax, shift
        ; imul r9d, eax, esz
        ; mov rax, [r12 + ctx(offset_of!(JitCtx, bjc))]
        ; add rax, r9
    );
    probe_entry(a, offset_of!(JitCtx, base_epoch), bmiss);
    dynasm!(a
        ; .arch x64
        // A linkable exit: `super::enter` links it on the way to the block.
        ; cmp QWORD [r12 + ctx(offset_of!(JitCtx, link_site))], 0
        ; jne =>miss
        ; mov ecx, [rax + off(jc_layout::RUNS)]
        ; inc ecx
        ; cmp ecx, BJC_BATCH as i32
        ; jae =>miss
        ; mov [rax + off(jc_layout::RUNS)], ecx
        ; inc QWORD [r12 + ctx(offset_of!(JitCtx, chained))]
        ; add rdi, body
        ; jmp rdi
        ; =>bmiss
        ; mov rax, [r12 + ctx(offset_of!(JitCtx, jc))]
        ; add rax, r9
    );
    probe_entry(a, offset_of!(JitCtx, epoch), miss);
    dynasm!(a
        ; .arch x64
        ; inc QWORD [r12 + ctx(offset_of!(JitCtx, chained))]
        ; mov QWORD [r12 + ctx(offset_of!(JitCtx, link_site))], 0
        ; mov rax, rdi
        ; mov rdi, rbx
        ; mov rsi, r12
    );
    leave_frame(a);
    dynasm!(a
        ; .arch x64
        ; jmp rax
        ; =>miss
        ; xor eax, eax
    );
    epilogue(a);
}

/// The probe's checks of the jump-cache entry at RAX for RIP = RSI (see [`probe`]): on
/// success RDI = its code; else jumps to `miss`. `epoch`: the `JitCtx` field holding the
/// table's current epoch. Clobbers RCX, RDX, R8.
fn probe_entry(a: &mut VecAssembler<X64Relocation>, epoch: usize, miss: DynamicLabel) {
    const _: () = assert!(P_USER == 1);
    let valid = i32::try_from(TLB_VALID).unwrap_or(1);
    let tsz = off(tlb_layout::SIZE);
    let tmask = off(TLB_SIZE - 1);
    let ctx = |f: usize| off(f);
    dynasm!(a
        ; .arch x64
        ; cmp rsi, [rax + off(jc_layout::RIP)]
        ; jne =>miss
        ; mov rdi, [rax + off(jc_layout::F)]
        ; test rdi, rdi
        ; jz =>miss
        ; mov ecx, [rax + off(jc_layout::EPOCH)]
        ; cmp rcx, [r12 + ctx(epoch)]
        ; jne =>miss
        ; movzx ecx, BYTE [rax + off(jc_layout::USER)]
        ; cmp rcx, [r12 + ctx(offset_of!(JitCtx, user))]
        ; jne =>miss
        ; mov ecx, [rax + off(jc_layout::LEN)]
        ; cmp rcx, [r12 + ctx(offset_of!(JitCtx, left))]
        ; ja =>miss
        // RIP's TLB entry, as `Cpu::translate` hits it for an instruction fetch: the tag,
        // P_EXEC (and P_USER, bit 0 like `JitCtx::user`, at CPL 3), the GPA.
        ; mov rdx, rsi
        ; shr rdx, 12
        ; and edx, tmask
        ; imul edx, edx, tsz
        ; add rdx, r13
        ; mov rcx, rsi
        ; and rcx, -4096
        ; or rcx, valid
        ; cmp rcx, [rdx + off(tlb_layout::TAG)]
        ; jne =>miss
        ; movzx ecx, BYTE [rdx + off(tlb_layout::PERM)]
        ; mov r8, [r12 + ctx(offset_of!(JitCtx, user))]
        ; or r8d, i32::from(P_EXEC)
        ; and ecx, r8d
        ; cmp ecx, r8d
        ; jne =>miss
        ; mov rcx, rsi
        ; and ecx, 0xfff
        ; or rcx, [rdx + off(tlb_layout::GPA)]
        ; cmp rcx, [rax + off(jc_layout::GPA)]
        ; jne =>miss
        // The page's code generation (`SharedRam` keeps them in one array of u32).
        ; mov rcx, [rax + off(jc_layout::PAGE)]
        ; mov rdx, [r12 + ctx(offset_of!(JitCtx, gens))]
        ; mov ecx, [rdx + rcx * 4]
        ; cmp ecx, [rax + off(jc_layout::GEN)]
        ; jne =>miss
    );
}
