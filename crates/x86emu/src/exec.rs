//! The interpreter: the run loop and the integer instruction set (the top layer; see the
//! crate root for the module layers).

use crate::alu::{self, Op1, Op2};
use crate::cpu::cond;
use crate::cpu::{ctl, flags::*, sreg, Cpu, Exit};
use crate::decode::fetch_block;
use crate::operand::Loc;
use crate::regs::{host_usize, low16, low32, low8, mask, sext, size_u8};
use crate::{Bus, Fault, Res, SRes, Stop};
use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

impl Cpu {
    /// Runs until something the VMM must act on happens, or `budget` instructions retired.
    pub fn run(&mut self, bus: &mut dyn Bus, budget: u64) -> Exit {
        run(self, bus, budget)
    }
}

/// Instructions run between looks at the interrupt line (and at device writes to code):
/// an interrupt waits at most this long (~10-40 us at the translation tier's speed).
/// Every chunk's end costs a return to the run loop, and ends early where a compiled block
/// does not fit in what is left of it: at 4,096, ~360,000 times per boot of the test guest.
const CHUNK: u64 = 16_384;

fn run(cpu: &mut Cpu, bus: &mut dyn Bus, budget: u64) -> Exit {
    let mut done = 0u64;
    loop {
        for (gpa, len) in bus.take_device_writes() {
            cpu.invalidate_code(gpa, len);
        }
        // NMI window: whatever IF says, unless an NMI handler has not yet returned (IRET)
        // or in an STI/MOV SS shadow (SDM Vol. 3 §6.7.1); NMIs come before INTR.
        if !cpu.nmi_blocked && !cpu.interrupt_shadow && bus.take_nmi() {
            cpu.halted = false;
            cpu.stats.nmis += 1;
            if let Err(e) = crate::interrupt::raise_nmi(cpu, bus) {
                return e;
            }
        }
        // Interrupt window: IF set and not in an STI/MOV SS shadow.
        if cpu.rflags & IF != 0 && !cpu.interrupt_shadow && bus.interrupt_pending() {
            if let Some(v) = bus.ack_interrupt() {
                cpu.halted = false;
                cpu.stats.interrupts += 1;
                if let Err(e) = crate::interrupt::raise_interrupt(cpu, bus, v) {
                    return e;
                }
            }
        }
        if cpu.halted {
            return if cpu.rflags & IF != 0 { Exit::Halted } else { Exit::HaltedForever };
        }
        cpu.check_irq = false;
        crate::jit::poll(cpu);
        // A branch exit of compiled code to link to the next block (see jit::enter).
        let mut want = None;
        // Run a chunk without looking at the interrupt line.
        let chunk = (budget - done).min(CHUNK);
        // Whether the chunk ends before the budget does: then a compiled block that does
        // not fit in what is left of it ends the chunk early instead of being interpreted
        // (the next chunk runs it compiled); only the budget's own end is exact.
        let soft_end = budget - done > chunk;
        let mut n = 0;
        'chunk: while n < chunk {
            let crate::decode::BlockRef { ops, page, gen, slot, gpa } = match fetch_block(cpu) {
                Ok(b) => b,
                Err(Stop::Fault(f)) => {
                    n += 1;
                    if let Err(e) = crate::interrupt::raise_fault(cpu, bus, f) {
                        cpu.stats.instructions += n;
                        return e;
                    }
                    continue;
                }
                Err(Stop::Exit(e)) => {
                    cpu.stats.instructions += n;
                    return e;
                }
            };
            cpu.note_recent(cpu.rip);
            let tracing = cpu.trace.is_some();
            let mut skip = 0;
            // The translation tier: run the block's compiled leading part, if it has one
            // and it fits in what is left of the chunk (the budget stays exact). Out of
            // line, so that the interpreter's loop stays as it was.
            if cpu.jit.tier != crate::jit::Tier::Interp && !tracing && slot != usize::MAX {
                let at = crate::jit::BlockAt { page, gen, slot, gpa };
                let (step, done) = jit_step(cpu, bus, &ops, at, (n, chunk, soft_end), &mut want);
                n = done;
                match step {
                    JitStep::Interpret(k) => skip = k,
                    JitStep::NextBlock => continue 'chunk,
                    JitStep::EndChunk => break 'chunk,
                    JitStep::Exit(e) => {
                        cpu.stats.instructions += n;
                        return e;
                    }
                }
            }
            for op in ops.get(skip..).unwrap_or_default() {
                if cpu.rip != op.ip {
                    break;
                }
                cpu.interrupt_shadow = false;
                if tracing {
                    write_trace(cpu);
                }
                let old = cpu.rip;
                cpu.rip = op.next_ip;
                n += 1;
                let r = match op.uop {
                    crate::uop::Uop::Generic | crate::uop::Uop::Sse(_) => {
                        let r = execute(cpu, bus, &op.insn);
                        if r.is_ok() && (cpu.halted || (cpu.check_irq && !cpu.interrupt_shadow)) {
                            break 'chunk;
                        }
                        r
                    }
                    ref u => {
                        let r = crate::uop::exec(cpu, bus, u).map_err(Stop::Fault);
                        // The instruction an STI shadow covered (compiled code left the
                        // window check to the run loop): look at the interrupt line now.
                        if r.is_ok() && cpu.check_irq && !cpu.interrupt_shadow {
                            break 'chunk;
                        }
                        r
                    }
                };
                match r {
                    Ok(()) => {}
                    Err(Stop::Fault(f)) => {
                        cpu.rip = old;
                        if let Err(e) = crate::interrupt::raise_fault(cpu, bus, f) {
                            cpu.stats.instructions += n;
                            return e;
                        }
                        continue 'chunk;
                    }
                    Err(Stop::Exit(e)) => {
                        cpu.rip = old;
                        cpu.stats.instructions += n;
                        return e;
                    }
                }
                if n >= chunk || (op.uop.may_store() && page != usize::MAX && cpu.mmu.shared.gen(page) != gen) {
                    continue 'chunk;
                }
            }
        }
        cpu.stats.instructions += n;
        done += n;
        if done >= budget {
            return Exit::Budget;
        }
    }
}

/// What the run loop does after [`jit_step`].
enum JitStep {
    /// Interpret the block from this instruction on.
    Interpret(usize),
    /// Fetch the next block.
    NextBlock,
    /// Leave the chunk (look at interrupts, or halt).
    EndChunk,
    /// Return this from `run`.
    Exit(Exit),
}

/// The translation tier's part of a block: runs its compiled code (and linked blocks) when
/// it has some (compiling it when it is hot) and it fits in what is left of the chunk;
/// raises a fault it took. `n` counts the instructions retired in the chunk of `chunk`
/// instructions, which `soft_end` says may end early; returns what to do next and the
/// new count.
#[inline(never)]
fn jit_step(
    cpu: &mut Cpu,
    bus: &mut dyn Bus,
    ops: &[crate::decode::Op],
    at: crate::jit::BlockAt,
    (n, chunk, soft_end): (u64, u64, bool),
    want: &mut Option<crate::jit::WantLink>,
) -> (JitStep, u64) {
    // An instruction in an STI shadow with the interrupt line to look at right after it
    // runs in the interpreter, which looks there. Otherwise compiled code may run it: it
    // runs a block's first instruction before anything looks at the interrupt line (and
    // `enter` ends the shadow).
    if !cpu.in_64bit_mode() || (cpu.interrupt_shadow && cpu.check_irq) {
        return (JitStep::Interpret(0), n);
    }
    let Some(code) = crate::jit::lookup(cpu, ops, at, want.take()) else {
        return (JitStep::Interpret(0), n);
    };
    let len = match code {
        crate::jit::Code::Opt(_, len) | crate::jit::Code::Base(_, len) => len,
    };
    if chunk - n < u64::from(len) {
        if soft_end && n > 0 {
            // The next chunk starts with this block (`lookup` has linked it already).
            return (JitStep::EndChunk, n);
        }
        return (JitStep::Interpret(0), n);
    }
    // Compiled SSE arithmetic collects its exception flags in the host's MXCSR.
    let fp = cpu.jit.host_fp;
    if fp {
        crate::jit::discard_fp_flags();
    }
    let (k, fault, w) = crate::jit::enter(cpu, bus, code, chunk - n, at.page);
    if fp {
        crate::jit::collect_fp_flags(cpu);
    }
    *want = w;
    let n = n + k;
    match fault {
        Some(Stop::Fault(f)) => {
            if let Err(e) = crate::interrupt::raise_fault(cpu, bus, f) {
                return (JitStep::Exit(e), n);
            }
            return (JitStep::NextBlock, n);
        }
        Some(Stop::Exit(e)) => return (JitStep::Exit(e), n),
        None => {}
    }
    // An instruction run for compiled code halted or may have opened the interrupt window.
    if cpu.halted || (cpu.check_irq && !cpu.interrupt_shadow) {
        return (JitStep::EndChunk, n);
    }
    if n >= chunk || cpu.mmu.shared.gen(at.page) != at.gen {
        return (JitStep::NextBlock, n);
    }
    // (After a trace, longer than the block, nothing of the block is left.)
    (JitStep::Interpret(len as usize), n)
}

#[cold]
fn write_trace(cpu: &mut Cpu) {
    let g = cpu.gpr;
    let (rip, fl) = (cpu.rip, cpu.rflags);
    if let Some(t) = cpu.trace.as_mut() {
        let _ = writeln!(
            t,
            "{:x} a={:x} c={:x} d={:x} b={:x} sp={:x} bp={:x} si={:x} di={:x} fl={:x}",
            rip, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], fl
        );
    }
}
use std::io::Write as _;

/// Maps ALU mnemonics onto host operations.
fn op2_of(m: Mnemonic) -> Option<Op2> {
    Some(match m {
        Mnemonic::Add => Op2::Add,
        Mnemonic::Or => Op2::Or,
        Mnemonic::Adc => Op2::Adc,
        Mnemonic::Sbb => Op2::Sbb,
        Mnemonic::And => Op2::And,
        Mnemonic::Sub => Op2::Sub,
        Mnemonic::Xor => Op2::Xor,
        Mnemonic::Shl | Mnemonic::Sal => Op2::Shl,
        Mnemonic::Shr => Op2::Shr,
        Mnemonic::Sar => Op2::Sar,
        Mnemonic::Rol => Op2::Rol,
        Mnemonic::Ror => Op2::Ror,
        Mnemonic::Rcl => Op2::Rcl,
        Mnemonic::Rcr => Op2::Rcr,
        _ => return None,
    })
}

/// Operand size of operand 0 in bytes.
#[inline(always)]
fn size0(insn: &Instruction) -> usize {
    match insn.op0_kind() {
        OpKind::Register => insn.op0_register().size(),
        _ => insn.memory_size().size(),
    }
}

/// Address size in bytes of a string instruction (from its implicit memory operand).
fn string_asize(insn: &Instruction) -> usize {
    for i in 0..insn.op_count() {
        match insn.op_kind(i) {
            OpKind::MemorySegSI | OpKind::MemoryESDI | OpKind::MemorySegDI => return 2,
            OpKind::MemorySegESI | OpKind::MemoryESEDI | OpKind::MemorySegEDI => return 4,
            OpKind::MemorySegRSI | OpKind::MemoryESRDI | OpKind::MemorySegRDI => return 8,
            _ => {}
        }
    }
    8
}

const REG_RCX: usize = 1;
const REG_RSI: usize = 6;
const REG_RDI: usize = 7;

#[derive(Clone, Copy, PartialEq, Eq)]
enum StrOp {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
    Ins,
    Outs,
}

/// Maximum iterations of a REP string instruction per step (keeps interrupts timely).
const REP_CHUNK: u64 = 1 << 14;

fn string_op(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction, op: StrOp, size: usize) -> SRes<()> {
    let asz = string_asize(insn);
    let am = mask(asz);
    let rep = insn.has_rep_prefix() || insn.has_repne_prefix();
    let step: u64 = if cpu.rflags & DF != 0 { (size as u64).wrapping_neg() } else { size as u64 };
    let src_seg = insn.memory_segment();
    let mut iters = 0u64;
    if matches!(op, StrOp::Ins | StrOp::Outs) {
        // Checked once per execution, before the count (as QEMU, Bochs and KVM's emulator
        // do): neither the port nor the privilege changes while it runs.
        let port = low16(cpu.gpr[2]);
        io_check(cpu, bus, port, size)?;
    }
    if rep
        && matches!(op, StrOp::Movs | StrOp::Stos)
        && step == size as u64
        && asz == 8
        && cpu.in_64bit_mode()
        && !matches!(src_seg, Register::FS | Register::GS)
    {
        iters = rep_bulk(cpu, op, size)?;
    }
    loop {
        if rep {
            if cpu.gpr[REG_RCX] & am == 0 {
                return Ok(());
            }
            if iters == REP_CHUNK {
                // Come back to this instruction later; lets interrupts in.
                cpu.rip = insn.ip();
                cpu.check_irq = true;
                return Ok(());
            }
        }
        let si = cpu.gpr[REG_RSI] & am;
        let di = cpu.gpr[REG_RDI] & am;
        let mut zf_stop = None;
        match op {
            StrOp::Movs => {
                // Fast path: forward byte/qword copies within one RAM page each.
                let v = cpu.rmem(bus, cpu.seg_la(src_seg, si), size)?;
                cpu.wmem(bus, cpu.seg_la(Register::ES, di), size, v)?;
                upd(cpu, REG_RSI, si.wrapping_add(step), asz);
                upd(cpu, REG_RDI, di.wrapping_add(step), asz);
            }
            StrOp::Stos => {
                let v = cpu.gpr[0] & mask(size);
                cpu.wmem(bus, cpu.seg_la(Register::ES, di), size, v)?;
                upd(cpu, REG_RDI, di.wrapping_add(step), asz);
            }
            StrOp::Lods => {
                let v = cpu.rmem(bus, cpu.seg_la(src_seg, si), size)?;
                set_acc(cpu, size, v);
                upd(cpu, REG_RSI, si.wrapping_add(step), asz);
            }
            StrOp::Cmps => {
                let a = cpu.rmem(bus, cpu.seg_la(src_seg, si), size)?;
                let b = cpu.rmem(bus, cpu.seg_la(Register::ES, di), size)?;
                let (_, f) = alu::arith(Op2::Sub, size, a, b, cpu.rflags);
                cpu.rflags = f;
                upd(cpu, REG_RSI, si.wrapping_add(step), asz);
                upd(cpu, REG_RDI, di.wrapping_add(step), asz);
                zf_stop = Some(f & ZF != 0);
            }
            StrOp::Scas => {
                let b = cpu.rmem(bus, cpu.seg_la(Register::ES, di), size)?;
                let (_, f) = alu::arith(Op2::Sub, size, cpu.gpr[0], b, cpu.rflags);
                cpu.rflags = f;
                upd(cpu, REG_RDI, di.wrapping_add(step), asz);
                zf_stop = Some(f & ZF != 0);
            }
            StrOp::Ins => {
                let port = low16(cpu.gpr[2]);
                let la = cpu.seg_la(Register::ES, di);
                cpu.probe_write(la, size, cpu.user())?;
                let v = bus.io_in(port, size_u8(size));
                cpu.stats.pio += 1;
                cpu.wmem(bus, la, size, u64::from(v))?;
                upd(cpu, REG_RDI, di.wrapping_add(step), asz);
            }
            StrOp::Outs => {
                let port = low16(cpu.gpr[2]);
                let v = cpu.rmem(bus, cpu.seg_la(src_seg, si), size)?;
                bus.io_out(port, size_u8(size), low32(v));
                cpu.stats.pio += 1;
                cpu.check_irq = true;
                upd(cpu, REG_RSI, si.wrapping_add(step), asz);
            }
        }
        if !rep {
            return Ok(());
        }
        let c = (cpu.gpr[REG_RCX] & am).wrapping_sub(1) & am;
        upd(cpu, REG_RCX, c, asz);
        iters += 1;
        if let Some(zf) = zf_stop {
            if insn.has_repe_prefix() && !zf {
                return Ok(());
            }
            if insn.has_repne_prefix() && zf {
                return Ok(());
            }
        }
    }
}

/// Forward REP MOVS/STOS in 64-bit mode, a page at a time with host copies (the kernel's
/// clear_page/copy_page and memset/memcpy). Stops where the per-element path must take
/// over: an element crossing a page, MMIO, overlapping forward copies, or REP_CHUNK elements
/// done. Registers are updated after every page, so a fault leaves a restartable state.
/// Returns the number of elements done.
fn rep_bulk(cpu: &mut Cpu, op: StrOp, size: usize) -> SRes<u64> {
    let user = cpu.user();
    let mut done = 0u64;
    while done < REP_CHUNK {
        let count = cpu.gpr[REG_RCX];
        if count == 0 {
            break;
        }
        let di = cpu.gpr[REG_RDI];
        let si = cpu.gpr[REG_RSI];
        let mut n = ((4096 - (di & 0xfff)) / size as u64).min(count).min(REP_CHUNK - done);
        if op == StrOp::Movs {
            n = n.min((4096 - (si & 0xfff)) / size as u64);
        }
        if n == 0 {
            break;
        }
        let bytes = host_usize(n) * size;
        let (dst, dst_gen) = cpu.page_host_for_write(di, user)?;
        if dst.is_null() {
            break;
        }
        match op {
            StrOp::Stos => {
                let v = cpu.gpr[0];
                // SAFETY: `dst` maps the whole 4 KiB page holding `di`, and `bytes` stays
                // within that page by construction of `n`.
                unsafe {
                    let p = dst.add((di & 0xfff) as usize);
                    match size {
                        1 => std::ptr::write_bytes(p, low8(v), bytes),
                        2 => (0..host_usize(n)).for_each(|i| (p as *mut u16).add(i).write_unaligned(low16(v))),
                        4 => (0..host_usize(n)).for_each(|i| (p as *mut u32).add(i).write_unaligned(low32(v))),
                        _ => (0..host_usize(n)).for_each(|i| (p as *mut u64).add(i).write_unaligned(v)),
                    }
                }
            }
            _ => {
                let src = cpu.page_host_for_read(si, user)?;
                if src.is_null() {
                    break;
                }
                // SAFETY: both pointers stay within their mapped 4 KiB pages (see `n`).
                unsafe {
                    let s = src.add((si & 0xfff) as usize) as *const u8;
                    let d = dst.add((di & 0xfff) as usize);
                    // A forward element-wise copy into an overlapping higher destination
                    // replicates data; memmove would not. Leave that to the slow path.
                    if (d as usize) > (s as usize) && (d as usize) < (s as usize) + bytes {
                        break;
                    }
                    std::ptr::copy(s, d, bytes);
                }
                cpu.gpr[REG_RSI] = si.wrapping_add(bytes as u64);
            }
        }
        dst_gen.written();
        cpu.gpr[REG_RDI] = di.wrapping_add(bytes as u64);
        cpu.gpr[REG_RCX] = count - n;
        done += n;
    }
    Ok(done)
}

#[inline(always)]
fn upd(cpu: &mut Cpu, r: usize, v: u64, asz: usize) {
    *cpu.gpr_at_mut(r) = match asz {
        8 => v,
        4 => v & 0xffff_ffff,
        _ => (cpu.gpr_at(r) & !0xffff) | (v & 0xffff),
    };
}

#[inline(always)]
fn set_acc(cpu: &mut Cpu, size: usize, v: u64) {
    let r = match size {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    };
    cpu.set_reg(r, v);
}

/// Port I/O permission for an access of `size` bytes at `port` (Intel SDM Vol. 1 §19.5):
/// always granted in real mode and when CPL <= IOPL outside virtual-8086 mode; otherwise
/// the TSS I/O permission bitmap decides. Ring 0 never reaches the bitmap.
#[inline(always)]
fn io_check(cpu: &mut Cpu, bus: &mut dyn Bus, port: u16, size: usize) -> Res<()> {
    if cpu.cr0 & ctl::CR0_PE != 0
        && (u64::from(cpu.seg[sreg::CS].dpl()) > (cpu.rflags >> 12) & 3 || cpu.rflags & VM != 0)
    {
        return io_bitmap_check(cpu, bus, port, size);
    }
    Ok(())
}

/// The I/O permission bitmap check of the current TSS (TR), for CPL > IOPL or virtual-8086
/// mode. The 16-bit map base sits at offset 0x66; the processor reads the two bitmap bytes
/// holding the bits of `port` and the ports after it, both of which must lie within the TSS
/// limit (hence the all-ones byte a TSS carries after a full bitmap), and every bit of the
/// `size` ports accessed must be clear. Anything else is #GP(0). The reads are implicit
/// supervisor accesses, so they may page-fault like any other.
#[cold]
#[inline(never)]
fn io_bitmap_check(cpu: &mut Cpu, bus: &mut dyn Bus, port: u16, size: usize) -> Res<()> {
    const GP: Fault = Fault::GeneralProtection(0);
    // Only a 32/64-bit TSS has an I/O map: type 9 or 11 (bit 1 is "busy"), a system
    // descriptor (S = 0), usable; and it must be long enough to hold the map base.
    let limit = u64::from(cpu.tr.limit);
    if cpu.tr.attr & 0x1_001d != 0x9 || limit < 0x67 {
        return Err(GP);
    }
    // Linear addresses wrap at 4 GiB outside long mode.
    let (base, amask) = (cpu.tr.base, if cpu.efer & ctl::EFER_LMA != 0 { u64::MAX } else { 0xffff_ffff });
    let tss_la = move |off: u64| base.wrapping_add(off) & amask;
    let io_base = cpu.read_sys(bus, tss_la(0x66), 2)?;
    let off = io_base + u64::from(port >> 3);
    if off + 1 > limit {
        return Err(GP);
    }
    let bits = cpu.read_sys(bus, tss_la(off), 2)?;
    let want = ((1u64 << size) - 1) << (port & 7);
    if bits & want != 0 {
        return Err(GP);
    }
    Ok(())
}

fn need_cpl0(cpu: &Cpu) -> Res<()> {
    if cpu.cpl() != 0 {
        return Err(Fault::GeneralProtection(0));
    }
    Ok(())
}

/// Whether `insn` (with a LOCK prefix, or an XCHG/CMPXCHG8B/CMPXCHG16B) is executed by
/// [`locked`]: XCHG only with a memory operand, the others always.
fn locked_form(insn: &Instruction, m: Mnemonic) -> bool {
    match m {
        Mnemonic::Xchg => insn.op0_kind() == OpKind::Memory || insn.op1_kind() == OpKind::Memory,
        _ => true,
    }
}

/// The atomic read-modify-write instructions (Intel SDM Vol. 3A §9.1.2.2, "Software
/// Controlled Bus Locking"): the LOCK-prefixed forms of ADD, ADC, AND, BTC, BTR, BTS,
/// CMPXCHG, DEC, INC, NEG, NOT, OR, SBB, SUB, XOR and XADD with a memory destination, XCHG
/// with memory (locked with or without the prefix), CMPXCHG8B and CMPXCHG16B. Each reads,
/// computes and writes its memory operand as one atomic access ([`Cpu::atomic_rmw`]), so
/// concurrent vCPUs see them as the hardware's locked cycles. A LOCK prefix on any other
/// instruction, or with a register destination, raises #UD (SDM Vol. 2A, "LOCK").
fn locked(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction, m: Mnemonic) -> SRes<()> {
    use Mnemonic as M;
    if m == M::Xchg {
        let (reg, size) = if insn.op0_kind() == OpKind::Memory {
            (insn.op1_register(), insn.memory_size().size())
        } else {
            (insn.op0_register(), insn.memory_size().size())
        };
        let la = cpu.mem_la(insn);
        let v = cpu.get_reg(reg) & mask(size);
        let old = cpu.atomic_rmw(bus, la, size, &mut |_| Some(v))?;
        cpu.set_reg(reg, old);
        return Ok(());
    }
    if insn.op0_kind() != OpKind::Memory {
        return Err(Fault::InvalidOpcode.into());
    }
    let size = insn.memory_size().size();
    let fl = cpu.rflags;
    match m {
        M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor => {
            let la = cpu.mem_la(insn);
            let b = match insn.op1_kind() {
                OpKind::Register => cpu.get_reg(insn.op1_register()),
                _ => insn.immediate(1),
            };
            let op = op2_of(m).unwrap_or(Op2::Add);
            let old = cpu.atomic_rmw(bus, la, size, &mut |a| Some(alu::arith(op, size, a, b, fl).0))?;
            cpu.rflags = alu::arith(op, size, old, b, fl).1;
        }
        M::Inc | M::Dec | M::Neg | M::Not => {
            let la = cpu.mem_la(insn);
            let op = match m {
                M::Inc => Op1::Inc,
                M::Dec => Op1::Dec,
                M::Neg => Op1::Neg,
                _ => Op1::Not,
            };
            let old = cpu.atomic_rmw(bus, la, size, &mut |a| Some(alu::op1(op, size, a, fl).0))?;
            cpu.rflags = alu::op1(op, size, old, fl).1;
        }
        M::Xadd => {
            let la = cpu.mem_la(insn);
            let r = insn.op1_register();
            let b = cpu.get_reg(r);
            let old = cpu.atomic_rmw(bus, la, size, &mut |a| Some(alu::arith(Op2::Add, size, a, b, fl).0))?;
            cpu.rflags = alu::arith(Op2::Add, size, old, b, fl).1;
            cpu.set_reg(r, old);
        }
        M::Cmpxchg => {
            let la = cpu.mem_la(insn);
            let acc = cpu.gpr[0] & mask(size);
            let src = cpu.get_reg(insn.op1_register()) & mask(size);
            let old = cpu.atomic_rmw(bus, la, size, &mut |d| (d == acc).then_some(src))?;
            let f = alu::arith(Op2::Sub, size, acc, old, fl).1;
            if f & ZF == 0 {
                set_acc(cpu, size, old);
            }
            cpu.rflags = f;
        }
        M::Bts | M::Btr | M::Btc => {
            let bits = (size * 8) as u64;
            let (la, bit) = if insn.op1_kind() == OpKind::Register {
                // Register bit offsets address memory beyond the operand (signed).
                let off = sext(cpu.get_reg(insn.op1_register()), size) as i64;
                let byte = off.div_euclid(bits as i64) * size as i64;
                let la = cpu.mem_la(insn).wrapping_add(byte as u64);
                (if cpu.in_64bit_mode() { la } else { la & 0xffff_ffff }, off.rem_euclid(bits as i64) as u64)
            } else {
                (cpu.mem_la(insn), insn.immediate(1) % bits)
            };
            let op = match m {
                M::Bts => Op2::Bts,
                M::Btr => Op2::Btr,
                _ => Op2::Btc,
            };
            let old = cpu.atomic_rmw(bus, la, size, &mut |a| Some(alu::op2(op, size, a, bit, fl).0))?;
            cpu.rflags = alu::op2(op, size, old, bit, fl).1;
        }
        M::Cmpxchg8b => {
            let la = cpu.mem_la(insn);
            let expected = (cpu.gpr[0] & 0xffff_ffff) | (cpu.gpr[2] << 32);
            let new = (cpu.gpr[3] & 0xffff_ffff) | (cpu.gpr[1] << 32);
            let old = cpu.atomic_rmw(bus, la, 8, &mut |d| (d == expected).then_some(new))?;
            if old == expected {
                cpu.rflags |= ZF;
            } else {
                // 32-bit halves zero-extend into RAX/RDX, as 32-bit register writes do.
                cpu.gpr[0] = old & 0xffff_ffff;
                cpu.gpr[2] = old >> 32;
                cpu.rflags &= !ZF;
            }
        }
        M::Cmpxchg16b => {
            let la = cpu.mem_la(insn);
            if la & 15 != 0 {
                return Err(Fault::GeneralProtection(0).into());
            }
            let expected = u128::from(cpu.gpr[0]) | (u128::from(cpu.gpr[2]) << 64);
            let new = u128::from(cpu.gpr[3]) | (u128::from(cpu.gpr[1]) << 64);
            let old = cpu.atomic_cmpxchg16(bus, la, expected, new)?;
            if old == expected {
                cpu.rflags |= ZF;
            } else {
                cpu.gpr[0] = crate::regs::low64(old);
                cpu.gpr[2] = crate::regs::low64(old >> 64);
                cpu.rflags &= !ZF;
            }
        }
        _ => return Err(Fault::InvalidOpcode.into()),
    }
    Ok(())
}

#[inline]
pub(crate) fn execute(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction) -> SRes<()> {
    use Mnemonic as M;
    let m = insn.mnemonic();
    if (insn.has_lock_prefix() || matches!(m, M::Xchg | M::Cmpxchg8b | M::Cmpxchg16b)) && locked_form(insn, m) {
        return locked(cpu, bus, insn, m);
    }
    match m {
        M::Mov => {
            let k0 = insn.op0_kind();
            if k0 == OpKind::Register {
                let r0 = insn.op0_register();
                if r0.is_segment_register() {
                    let v = low16(cpu.rd(bus, cpu.loc(insn, 1), 2)?);
                    return crate::interrupt::load_seg_reg(cpu, bus, r0, v).map_err(Stop::from);
                }
                if r0.is_cr() || r0.is_dr() {
                    need_cpl0(cpu)?;
                    let v = cpu.get_reg(insn.op1_register());
                    return crate::system::write_cr_dr(cpu, r0, v);
                }
                let r1k = insn.op1_kind();
                if r1k == OpKind::Register {
                    let r1 = insn.op1_register();
                    if r1.is_cr() || r1.is_dr() {
                        need_cpl0(cpu)?;
                        let v = crate::system::read_cr_dr(cpu, bus, r1);
                        cpu.set_reg(r0, v);
                        return Ok(());
                    }
                    if r1.is_segment_register() {
                        let v = cpu.get_reg(r1);
                        // mov r32/64, sreg zero-extends
                        cpu.set_reg(r0, v);
                        return Ok(());
                    }
                }
                let size = r0.size();
                let v = cpu.rd(bus, cpu.loc(insn, 1), size)?;
                cpu.set_reg(r0, v);
                Ok(())
            } else {
                let size = size0(insn);
                let v = cpu.rd(bus, cpu.loc(insn, 1), size)?;
                let l = cpu.loc(insn, 0);
                cpu.wr(bus, l, size, v)?;
                Ok(())
            }
        }
        M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor => {
            let size = size0(insn);
            let l0 = cpu.loc(insn, 0);
            let a = cpu.rd(bus, l0, size)?;
            let b = match insn.op1_kind() {
                OpKind::Register => cpu.get_reg(insn.op1_register()),
                OpKind::Memory => cpu.rd(bus, cpu.loc(insn, 1), size)?,
                _ => insn.immediate(1),
            };
            let op = op2_of(m).unwrap_or(Op2::Add);
            let (r, f) = alu::arith(op, size, a, b, cpu.rflags);
            cpu.wr(bus, l0, size, r)?;
            cpu.rflags = f;
            Ok(())
        }
        M::Cmp => {
            let size = size0(insn);
            let a = cpu.rd(bus, cpu.loc(insn, 0), size)?;
            let b = cpu.rd(bus, cpu.loc(insn, 1), size)?;
            let (_, f) = alu::arith(Op2::Sub, size, a, b, cpu.rflags);
            cpu.rflags = f;
            Ok(())
        }
        M::Test => {
            let size = size0(insn);
            let a = cpu.rd(bus, cpu.loc(insn, 0), size)?;
            let b = cpu.rd(bus, cpu.loc(insn, 1), size)?;
            cpu.rflags = alu::arith(Op2::And, size, a, b, cpu.rflags).1;
            Ok(())
        }
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr => {
            let size = size0(insn);
            let l0 = cpu.loc(insn, 0);
            let a = cpu.rd(bus, l0, size)?;
            let c = if insn.op_count() > 1 { cpu.rd(bus, cpu.loc(insn, 1), 1)? } else { 1 };
            let (r, f) = alu::op2(op2_of(m).unwrap_or(Op2::Shl), size, a, c, cpu.rflags);
            cpu.wr(bus, l0, size, r)?;
            cpu.rflags = f;
            Ok(())
        }
        M::Shld | M::Shrd => {
            let size = size0(insn);
            let l0 = cpu.loc(insn, 0);
            let a = cpu.rd(bus, l0, size)?;
            let b = cpu.get_reg(insn.op1_register());
            let c = cpu.rd(bus, cpu.loc(insn, 2), 1)?;
            let (r, f) = alu::shd(m == M::Shld, size, a, b, c, cpu.rflags);
            cpu.wr(bus, l0, size, r)?;
            cpu.rflags = f;
            Ok(())
        }
        M::Inc | M::Dec | M::Neg | M::Not => {
            let size = size0(insn);
            let l0 = cpu.loc(insn, 0);
            let a = cpu.rd(bus, l0, size)?;
            let op = match m {
                M::Inc => Op1::Inc,
                M::Dec => Op1::Dec,
                M::Neg => Op1::Neg,
                _ => Op1::Not,
            };
            let (r, f) = alu::op1(op, size, a, cpu.rflags);
            cpu.wr(bus, l0, size, r)?;
            cpu.rflags = f;
            Ok(())
        }
        M::Lea => {
            let r0 = insn.op0_register();
            let v = cpu.ea(insn);
            cpu.set_reg(r0, v & mask(r0.size()));
            Ok(())
        }
        M::Movzx => {
            let r0 = insn.op0_register();
            let s1 = match insn.op1_kind() {
                OpKind::Register => insn.op1_register().size(),
                _ => insn.memory_size().size(),
            };
            let v = cpu.rd(bus, cpu.loc(insn, 1), s1)?;
            cpu.set_reg(r0, v & mask(s1));
            Ok(())
        }
        M::Movsx | M::Movsxd => {
            let r0 = insn.op0_register();
            let s1 = match insn.op1_kind() {
                OpKind::Register => insn.op1_register().size(),
                _ => insn.memory_size().size(),
            };
            let v = cpu.rd(bus, cpu.loc(insn, 1), s1)?;
            cpu.set_reg(r0, sext(v, s1) & mask(r0.size()));
            Ok(())
        }
        M::Push => {
            let size = insn.stack_pointer_increment().unsigned_abs() as usize;
            let v = match insn.op0_kind() {
                OpKind::Register => {
                    let r = insn.op0_register();
                    cpu.get_reg(r)
                }
                OpKind::Memory => cpu.rd(bus, cpu.loc(insn, 0), size)?,
                _ => insn.immediate(0),
            };
            cpu.push(bus, size, v & mask(size))?;
            Ok(())
        }
        M::Pop => {
            let size = insn.stack_pointer_increment().unsigned_abs() as usize;
            if insn.op0_kind() == OpKind::Register && insn.op0_register().is_segment_register() {
                let v = cpu.peek(bus, 0, size)?;
                crate::interrupt::load_seg_reg(cpu, bus, insn.op0_register(), low16(v))?;
                let sp = cpu.rsp().wrapping_add(size as u64);
                cpu.set_rsp(sp);
                return Ok(());
            }
            let v = cpu.peek(bus, 0, size)?;
            if insn.op0_kind() == OpKind::Memory {
                // The address is computed after RSP is incremented (SDM POP).
                let old = cpu.gpr[4];
                let sp = cpu.rsp().wrapping_add(size as u64);
                cpu.set_rsp(sp);
                let l = cpu.loc(insn, 0);
                if let Err(e) = cpu.wr(bus, l, size, v) {
                    cpu.gpr[4] = old;
                    return Err(e.into());
                }
            } else {
                let sp = cpu.rsp().wrapping_add(size as u64);
                cpu.set_rsp(sp);
                cpu.set_reg(insn.op0_register(), v);
            }
            Ok(())
        }
        M::Xchg => {
            let size = size0(insn);
            let l0 = cpu.loc(insn, 0);
            let l1 = cpu.loc(insn, 1);
            let a = cpu.rd(bus, l0, size)?;
            let b = cpu.rd(bus, l1, size)?;
            if let Loc::Mem(_) = l1 {
                cpu.wr(bus, l1, size, a)?;
                cpu.wr(bus, l0, size, b)?;
            } else {
                cpu.wr(bus, l0, size, b)?;
                cpu.wr(bus, l1, size, a)?;
            }
            Ok(())
        }
        M::Xadd => {
            let size = size0(insn);
            let l0 = cpu.loc(insn, 0);
            let a = cpu.rd(bus, l0, size)?;
            let b = cpu.get_reg(insn.op1_register());
            let (r, f) = alu::arith(Op2::Add, size, a, b, cpu.rflags);
            cpu.wr(bus, l0, size, r)?;
            cpu.set_reg(insn.op1_register(), a);
            cpu.rflags = f;
            Ok(())
        }
        M::Cmpxchg => {
            let size = size0(insn);
            let l0 = cpu.loc(insn, 0);
            let d = cpu.rd(bus, l0, size)?;
            let acc = cpu.gpr[0] & mask(size);
            let (_, f) = alu::arith(Op2::Sub, size, acc, d, cpu.rflags);
            if f & ZF != 0 {
                let s = cpu.get_reg(insn.op1_register());
                cpu.wr(bus, l0, size, s)?;
            } else {
                // A memory destination is written back with its own value (the locked
                // cycle); a register destination is left untouched, upper half included.
                if let Loc::Mem(_) = l0 {
                    cpu.wr(bus, l0, size, d)?;
                }
                set_acc(cpu, size, d);
            }
            cpu.rflags = f;
            Ok(())
        }
        M::Cmpxchg8b | M::Cmpxchg16b => {
            let half = if m == M::Cmpxchg8b { 4 } else { 8 };
            let la = cpu.mem_la(insn);
            if half == 8 && la & 15 != 0 {
                return Err(Fault::GeneralProtection(0).into());
            }
            let lo = cpu.rmem(bus, la, half)?;
            let hi = cpu.rmem(bus, la.wrapping_add(half as u64), half)?;
            let m_ = mask(half);
            if lo == cpu.gpr[0] & m_ && hi == cpu.gpr[2] & m_ {
                cpu.probe_write(la, half * 2, cpu.user())?;
                cpu.wmem(bus, la, half, cpu.gpr[3] & m_)?;
                cpu.wmem(bus, la.wrapping_add(half as u64), half, cpu.gpr[1] & m_)?;
                cpu.rflags |= ZF;
            } else {
                cpu.probe_write(la, half * 2, cpu.user())?;
                cpu.wmem(bus, la, half, lo)?;
                cpu.wmem(bus, la.wrapping_add(half as u64), half, hi)?;
                // 32-bit halves zero-extend into RAX/RDX, as 32-bit register writes do.
                cpu.gpr[0] = lo;
                cpu.gpr[2] = hi;
                cpu.rflags &= !ZF;
            }
            Ok(())
        }
        M::Jmp => match insn.op0_kind() {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                cpu.rip = insn.near_branch_target();
                Ok(())
            }
            OpKind::FarBranch16 | OpKind::FarBranch32 => {
                let off = if insn.op0_kind() == OpKind::FarBranch16 {
                    u64::from(insn.far_branch16())
                } else {
                    u64::from(insn.far_branch32())
                };
                crate::interrupt::far_jump(cpu, bus, insn.far_branch_selector(), off)?;
                Ok(())
            }
            OpKind::Memory if is_far(insn) => {
                let (sel, off) = read_far_ptr(cpu, bus, insn)?;
                crate::interrupt::far_jump(cpu, bus, sel, off)?;
                Ok(())
            }
            _ => {
                let size = size0(insn);
                let t = cpu.rd(bus, cpu.loc(insn, 0), size)?;
                cpu.branch(t)?;
                Ok(())
            }
        },
        M::Call => match insn.op0_kind() {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                let size = insn.stack_pointer_increment().unsigned_abs() as usize;
                cpu.push(bus, size, insn.next_ip())?;
                cpu.rip = insn.near_branch_target();
                Ok(())
            }
            OpKind::FarBranch16 | OpKind::FarBranch32 | OpKind::Memory
                if is_far(insn) || insn.op0_kind() != OpKind::Memory =>
            {
                let (sel, off) = if insn.op0_kind() == OpKind::Memory {
                    read_far_ptr(cpu, bus, insn)?
                } else if insn.op0_kind() == OpKind::FarBranch16 {
                    (insn.far_branch_selector(), u64::from(insn.far_branch16()))
                } else {
                    (insn.far_branch_selector(), u64::from(insn.far_branch32()))
                };
                let size = insn.stack_pointer_increment().unsigned_abs() as usize / 2;
                let cs = u64::from(cpu.seg[sreg::CS].selector);
                let ret = insn.next_ip();
                let old_sp = cpu.gpr[4];
                cpu.push(bus, size, cs)?;
                cpu.push(bus, size, ret)?;
                if let Err(e) = crate::interrupt::far_jump(cpu, bus, sel, off) {
                    cpu.gpr[4] = old_sp;
                    return Err(e.into());
                }
                Ok(())
            }
            _ => {
                let size = size0(insn);
                let t = cpu.rd(bus, cpu.loc(insn, 0), size)?;
                let ssize = insn.stack_pointer_increment().unsigned_abs() as usize;
                if cpu.in_64bit_mode() && ((t as i64) << 16 >> 16) as u64 != t {
                    return Err(Fault::GeneralProtection(0).into());
                }
                cpu.push(bus, ssize, insn.next_ip())?;
                cpu.rip = t;
                Ok(())
            }
        },
        M::Ret => {
            let size = match cpu.bitness() {
                64 => {
                    if insn.code() == Code::Retnw || insn.code() == Code::Retnw_imm16 {
                        2
                    } else {
                        8
                    }
                }
                32 => {
                    if insn.code() == Code::Retnw || insn.code() == Code::Retnw_imm16 {
                        2
                    } else {
                        4
                    }
                }
                _ => {
                    if insn.code() == Code::Retnd || insn.code() == Code::Retnd_imm16 {
                        4
                    } else {
                        2
                    }
                }
            };
            let t = cpu.peek(bus, 0, size)?;
            cpu.branch(t)?;
            let extra = if insn.op_count() > 0 { insn.immediate(0) } else { 0 };
            let sp = cpu.rsp().wrapping_add(size as u64 + extra);
            cpu.set_rsp(sp);
            Ok(())
        }
        M::Retf => crate::interrupt::far_ret(cpu, bus, insn).map_err(Stop::from),
        M::Iret | M::Iretd | M::Iretq => crate::interrupt::iret(cpu, bus, insn).map_err(Stop::from),
        M::Jo
        | M::Jno
        | M::Jb
        | M::Jae
        | M::Je
        | M::Jne
        | M::Jbe
        | M::Ja
        | M::Js
        | M::Jns
        | M::Jp
        | M::Jnp
        | M::Jl
        | M::Jge
        | M::Jle
        | M::Jg => {
            if cond(cpu, insn.condition_code()) {
                cpu.rip = insn.near_branch_target();
            }
            Ok(())
        }
        M::Jrcxz | M::Jecxz | M::Jcxz => {
            let sz = match m {
                M::Jrcxz => 8,
                M::Jecxz => 4,
                _ => 2,
            };
            if cpu.gpr[1] & mask(sz) == 0 {
                cpu.rip = insn.near_branch_target();
            }
            Ok(())
        }
        M::Loop | M::Loope | M::Loopne => {
            let sz = insn.op0_register_or_count();
            let c = cpu.gpr[1].wrapping_sub(1) & mask(sz);
            upd(cpu, 1, c, sz);
            let zf = cpu.rflags & ZF != 0;
            let take = c != 0
                && match m {
                    M::Loope => zf,
                    M::Loopne => !zf,
                    _ => true,
                };
            if take {
                cpu.rip = insn.near_branch_target();
            }
            Ok(())
        }
        M::Sete
        | M::Setne
        | M::Seto
        | M::Setno
        | M::Setb
        | M::Setae
        | M::Setbe
        | M::Seta
        | M::Sets
        | M::Setns
        | M::Setp
        | M::Setnp
        | M::Setl
        | M::Setge
        | M::Setle
        | M::Setg => {
            let v = cond(cpu, insn.condition_code()) as u64;
            let l = cpu.loc(insn, 0);
            cpu.wr(bus, l, 1, v)?;
            Ok(())
        }
        M::Cmove
        | M::Cmovne
        | M::Cmovo
        | M::Cmovno
        | M::Cmovb
        | M::Cmovae
        | M::Cmovbe
        | M::Cmova
        | M::Cmovs
        | M::Cmovns
        | M::Cmovp
        | M::Cmovnp
        | M::Cmovl
        | M::Cmovge
        | M::Cmovle
        | M::Cmovg => {
            let r0 = insn.op0_register();
            let size = r0.size();
            let v = cpu.rd(bus, cpu.loc(insn, 1), size)?;
            if cond(cpu, insn.condition_code()) {
                cpu.set_reg(r0, v);
            } else if size == 4 {
                // A 32-bit CMOV zero-extends even when the condition is false.
                let cur = cpu.get_reg(r0);
                cpu.set_reg(r0, cur);
            }
            Ok(())
        }
        M::Imul if insn.op_count() >= 2 => {
            let r0 = insn.op0_register();
            let size = r0.size();
            let (a, b) = if insn.op_count() == 3 {
                (cpu.rd(bus, cpu.loc(insn, 1), size)?, insn.immediate(2))
            } else {
                (cpu.get_reg(r0), cpu.rd(bus, cpu.loc(insn, 1), size)?)
            };
            let (r, f) = alu::op2(Op2::Imul, size, a, b, cpu.rflags);
            cpu.set_reg(r0, r);
            cpu.rflags = f;
            Ok(())
        }
        M::Mul | M::Imul => {
            let size = size0(insn);
            let b = cpu.rd(bus, cpu.loc(insn, 0), size)?;
            let a = if size == 1 { cpu.gpr[0] & 0xff } else { cpu.gpr[0] };
            let (lo, hi, f) = alu::mul_wide(m == M::Imul, size, a, b, cpu.rflags);
            if size == 1 {
                cpu.set_reg(Register::AX, lo | (hi << 8));
            } else {
                set_acc(cpu, size, lo);
                let r = match size {
                    2 => Register::DX,
                    4 => Register::EDX,
                    _ => Register::RDX,
                };
                cpu.set_reg(r, hi);
            }
            cpu.rflags = f;
            Ok(())
        }
        M::Div | M::Idiv => {
            let size = size0(insn);
            let d = cpu.rd(bus, cpu.loc(insn, 0), size)?;
            let (lo, hi) =
                if size == 1 { (cpu.gpr[0] & 0xff, (cpu.gpr[0] >> 8) & 0xff) } else { (cpu.gpr[0], cpu.gpr[2]) };
            let Some((q, r, f)) = alu::div_wide(m == M::Idiv, size, lo, hi, d, cpu.rflags) else {
                return Err(Fault::DivideError.into());
            };
            if size == 1 {
                cpu.set_reg(Register::AX, (q & 0xff) | ((r & 0xff) << 8));
            } else {
                set_acc(cpu, size, q);
                let rr = match size {
                    2 => Register::DX,
                    4 => Register::EDX,
                    _ => Register::RDX,
                };
                cpu.set_reg(rr, r);
            }
            cpu.rflags = f;
            Ok(())
        }
        M::Cbw => {
            cpu.set_reg(Register::AX, sext(cpu.gpr[0], 1));
            Ok(())
        }
        M::Cwde => {
            cpu.set_reg(Register::EAX, sext(cpu.gpr[0], 2));
            Ok(())
        }
        M::Cdqe => {
            cpu.gpr[0] = sext(cpu.gpr[0], 4);
            Ok(())
        }
        M::Cwd => {
            let v = if cpu.gpr[0] & 0x8000 != 0 { 0xffff } else { 0 };
            cpu.set_reg(Register::DX, v);
            Ok(())
        }
        M::Cdq => {
            let v = if cpu.gpr[0] & 0x8000_0000 != 0 { 0xffff_ffff } else { 0 };
            cpu.set_reg(Register::EDX, v);
            Ok(())
        }
        M::Cqo => {
            cpu.gpr[2] = if (cpu.gpr[0] as i64) < 0 { u64::MAX } else { 0 };
            Ok(())
        }
        M::Bt | M::Bts | M::Btr | M::Btc => {
            let size = size0(insn);
            let bits = (size * 8) as u64;
            let (l0, bit) = match (insn.op0_kind(), insn.op1_kind()) {
                (OpKind::Memory, OpKind::Register) => {
                    // Register bit offsets address memory beyond the operand (signed).
                    let off = sext(cpu.get_reg(insn.op1_register()), size) as i64;
                    let byte = off.div_euclid(bits as i64) * size as i64;
                    let la = cpu.mem_la(insn).wrapping_add(byte as u64);
                    let la = if cpu.in_64bit_mode() { la } else { la & 0xffff_ffff };
                    (Loc::Mem(la), off.rem_euclid(bits as i64) as u64)
                }
                _ => {
                    let b = cpu.rd(bus, cpu.loc(insn, 1), size)?;
                    (cpu.loc(insn, 0), b % bits)
                }
            };
            let a = cpu.rd(bus, l0, size)?;
            let op = match m {
                M::Bt => Op2::Bt,
                M::Bts => Op2::Bts,
                M::Btr => Op2::Btr,
                _ => Op2::Btc,
            };
            let (r, f) = alu::op2(op, size, a, bit, cpu.rflags);
            if m != M::Bt {
                cpu.wr(bus, l0, size, r)?;
            }
            cpu.rflags = f;
            Ok(())
        }
        M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt => {
            // Without BMI1/ABM advertised, TZCNT/LZCNT encodings execute as BSF/BSR.
            let r0 = insn.op0_register();
            let size = r0.size();
            let s = cpu.rd(bus, cpu.loc(insn, 1), size)?;
            let op = if matches!(m, M::Bsf | M::Tzcnt) { Op2::Bsf } else { Op2::Bsr };
            let (r, f) = alu::op2(op, size, cpu.get_reg(r0), s, cpu.rflags);
            if s & mask(size) != 0 || size == 4 {
                cpu.set_reg(r0, r);
            }
            cpu.rflags = f;
            Ok(())
        }
        M::Popcnt => {
            let r0 = insn.op0_register();
            let size = r0.size();
            let s = cpu.rd(bus, cpu.loc(insn, 1), size)? & mask(size);
            cpu.set_reg(r0, u64::from(s.count_ones()));
            cpu.rflags = (cpu.rflags & !ARITH) | if s == 0 { ZF } else { 0 };
            Ok(())
        }
        M::Bswap => {
            let r0 = insn.op0_register();
            let v = cpu.get_reg(r0);
            let nv = if r0.size() == 8 {
                v.swap_bytes()
            } else if r0.size() == 4 {
                u64::from(low32(v).swap_bytes())
            } else {
                0
            };
            cpu.set_reg(r0, nv);
            Ok(())
        }
        M::Leave => {
            let size = match insn.code() {
                Code::Leavew => 2,
                Code::Leaved => 4,
                _ => 8,
            };
            let bp = cpu.gpr[5] & mask(cpu.stack_size());
            let la = cpu.seg_la(Register::SS, bp);
            let v = cpu.rmem(bus, la, size)?;
            cpu.set_rsp(bp.wrapping_add(size as u64));
            let r = match size {
                2 => Register::BP,
                4 => Register::EBP,
                _ => Register::RBP,
            };
            cpu.set_reg(r, v);
            Ok(())
        }
        M::Enter => {
            let size = match cpu.bitness() {
                64 => 8,
                32 => 4,
                _ => 2,
            };
            let alloc = insn.immediate(0) & 0xffff;
            let level = insn.immediate(1) & 31;
            let old = cpu.gpr[4];
            let r = cpu.enter(bus, size, alloc, level);
            if r.is_err() {
                cpu.gpr[4] = old;
            }
            r.map_err(Stop::from)
        }
        M::Nop
        | M::Pause
        | M::Lfence
        | M::Mfence
        | M::Sfence
        | M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Prefetchw
        | M::Prefetch
        | M::Endbr64
        | M::Endbr32
        | M::Clflush
        | M::Clflushopt
        | M::Clwb => Ok(()),
        M::Lahf => {
            let ah = (cpu.rflags & (SF | ZF | AF | PF | CF)) | 2;
            cpu.set_reg(Register::AH, ah);
            Ok(())
        }
        M::Sahf => {
            let ah = cpu.get_reg(Register::AH);
            cpu.rflags = (cpu.rflags & !(SF | ZF | AF | PF | CF)) | (ah & (SF | ZF | AF | PF | CF));
            Ok(())
        }
        M::Clc => {
            cpu.rflags &= !CF;
            Ok(())
        }
        M::Stc => {
            cpu.rflags |= CF;
            Ok(())
        }
        M::Cmc => {
            cpu.rflags ^= CF;
            Ok(())
        }
        M::Cld => {
            cpu.rflags &= !DF;
            Ok(())
        }
        M::Std => {
            cpu.rflags |= DF;
            Ok(())
        }
        M::Cli => {
            if u64::from(cpu.cpl()) > (cpu.rflags >> 12) & 3 && cpu.cr0 & ctl::CR0_PE != 0 {
                return Err(Fault::GeneralProtection(0).into());
            }
            cpu.rflags &= !IF;
            Ok(())
        }
        M::Sti => {
            if u64::from(cpu.cpl()) > (cpu.rflags >> 12) & 3 && cpu.cr0 & ctl::CR0_PE != 0 {
                return Err(Fault::GeneralProtection(0).into());
            }
            if cpu.rflags & IF == 0 {
                cpu.rflags |= IF;
                cpu.check_irq = true;
                // The next instruction runs before interrupts are recognised.
                cpu.interrupt_shadow = true;
            }
            Ok(())
        }
        M::Pushf | M::Pushfd | M::Pushfq => {
            let size = insn.stack_pointer_increment().unsigned_abs() as usize;
            // VM and RF are never pushed.
            cpu.push(bus, size, cpu.rflags & !(RF | VM) & mask(size))?;
            Ok(())
        }
        M::Popf | M::Popfd | M::Popfq => {
            let size = insn.stack_pointer_increment().unsigned_abs() as usize;
            let v = cpu.pop(bus, size)?;
            cpu.write_flags(v, size);
            Ok(())
        }
        M::Hlt => {
            need_cpl0(cpu)?;
            cpu.halted = true;
            Ok(())
        }
        M::In => {
            let r0 = insn.op0_register();
            let size = r0.size();
            let port = if insn.op1_kind() == OpKind::Register { low16(cpu.gpr[2]) } else { low16(insn.immediate(1)) };
            io_check(cpu, bus, port, size)?;
            cpu.stats.pio += 1;
            let v = bus.io_in(port, size_u8(size));
            cpu.set_reg(r0, u64::from(v));
            Ok(())
        }
        M::Out => {
            let r1 = insn.op1_register();
            let size = r1.size();
            let port = if insn.op0_kind() == OpKind::Register { low16(cpu.gpr[2]) } else { low16(insn.immediate(0)) };
            io_check(cpu, bus, port, size)?;
            cpu.stats.pio += 1;
            bus.io_out(port, size_u8(size), low32(cpu.get_reg(r1)));
            cpu.check_irq = true;
            Ok(())
        }
        M::Movsb
        | M::Movsw
        | M::Movsq
        | M::Stosb
        | M::Stosw
        | M::Stosd
        | M::Stosq
        | M::Lodsb
        | M::Lodsw
        | M::Lodsd
        | M::Lodsq
        | M::Cmpsb
        | M::Cmpsw
        | M::Cmpsq
        | M::Scasb
        | M::Scasw
        | M::Scasd
        | M::Scasq
        | M::Insb
        | M::Insw
        | M::Insd
        | M::Outsb
        | M::Outsw
        | M::Outsd => {
            let (op, size) = match m {
                M::Movsb => (StrOp::Movs, 1),
                M::Movsw => (StrOp::Movs, 2),
                M::Movsq => (StrOp::Movs, 8),
                M::Stosb => (StrOp::Stos, 1),
                M::Stosw => (StrOp::Stos, 2),
                M::Stosd => (StrOp::Stos, 4),
                M::Stosq => (StrOp::Stos, 8),
                M::Lodsb => (StrOp::Lods, 1),
                M::Lodsw => (StrOp::Lods, 2),
                M::Lodsd => (StrOp::Lods, 4),
                M::Lodsq => (StrOp::Lods, 8),
                M::Cmpsb => (StrOp::Cmps, 1),
                M::Cmpsw => (StrOp::Cmps, 2),
                M::Cmpsq => (StrOp::Cmps, 8),
                M::Scasb => (StrOp::Scas, 1),
                M::Scasw => (StrOp::Scas, 2),
                M::Scasd => (StrOp::Scas, 4),
                M::Scasq => (StrOp::Scas, 8),
                M::Insb => (StrOp::Ins, 1),
                M::Insw => (StrOp::Ins, 2),
                M::Insd => (StrOp::Ins, 4),
                M::Outsb => (StrOp::Outs, 1),
                M::Outsw => (StrOp::Outs, 2),
                _ => (StrOp::Outs, 4),
            };
            string_op(cpu, bus, insn, op, size)
        }
        M::Movsd if insn.code() == Code::Movsd_m32_m32 => string_op(cpu, bus, insn, StrOp::Movs, 4),
        M::Cmpsd if insn.code() == Code::Cmpsd_m32_m32 => string_op(cpu, bus, insn, StrOp::Cmps, 4),
        M::Xlatb => {
            let asz = string_asize(insn).max(if cpu.in_64bit_mode() { 8 } else { 4 });
            let off = cpu.gpr[3].wrapping_add(cpu.gpr[0] & 0xff) & mask(asz);
            let la = cpu.seg_la(insn.memory_segment(), off);
            let v = cpu.rmem(bus, la, 1)?;
            cpu.set_reg(Register::AL, v);
            Ok(())
        }
        M::Int3 => crate::interrupt::soft_int(cpu, bus, 3, true).map_err(Stop::from),
        M::Int => crate::interrupt::soft_int(cpu, bus, low8(insn.immediate(0)), false).map_err(Stop::from),
        M::Int1 => crate::interrupt::soft_int(cpu, bus, 1, true).map_err(Stop::from),
        M::Into => {
            if cpu.rflags & OF != 0 {
                crate::interrupt::soft_int(cpu, bus, 4, true).map_err(Stop::from)
            } else {
                Ok(())
            }
        }
        M::Ud0 | M::Ud1 | M::Ud2 => Err(Fault::InvalidOpcode.into()),
        M::Syscall => crate::interrupt::syscall(cpu).map_err(Stop::from),
        M::Sysret | M::Sysretq => crate::interrupt::sysret(cpu, insn).map_err(Stop::from),
        M::Swapgs => {
            if !cpu.in_64bit_mode() {
                return Err(Fault::InvalidOpcode.into());
            }
            need_cpl0(cpu)?;
            std::mem::swap(&mut cpu.seg[sreg::GS].base, &mut cpu.msr.kernel_gs_base);
            Ok(())
        }
        _ => crate::system::execute_system(cpu, bus, insn),
    }
}

fn is_far(insn: &Instruction) -> bool {
    matches!(
        insn.code(),
        Code::Jmp_m1616 | Code::Jmp_m1632 | Code::Jmp_m1664 | Code::Call_m1616 | Code::Call_m1632 | Code::Call_m1664
    )
}

fn read_far_ptr(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction) -> Res<(u16, u64)> {
    let la = cpu.mem_la(insn);
    let osize = match insn.code() {
        Code::Jmp_m1616 | Code::Call_m1616 => 2,
        Code::Jmp_m1664 | Code::Call_m1664 => 8,
        _ => 4,
    };
    let off = cpu.rmem(bus, la, osize)?;
    let sel = low16(cpu.rmem(bus, la.wrapping_add(osize as u64), 2)?);
    Ok((sel, off))
}

impl Cpu {
    fn enter(&mut self, bus: &mut dyn Bus, size: usize, alloc: u64, level: u64) -> Res<()> {
        let bp = self.gpr[5];
        self.push(bus, size, bp & mask(size))?;
        let frame = self.rsp();
        let mut bp_cur = bp;
        for _ in 1..level {
            bp_cur = bp_cur.wrapping_sub(size as u64);
            let la = self.seg_la(Register::SS, bp_cur & mask(self.stack_size()));
            let v = self.rmem(bus, la, size)?;
            self.push(bus, size, v)?;
        }
        if level > 0 {
            self.push(bus, size, frame)?;
        }
        let r = match size {
            2 => Register::BP,
            4 => Register::EBP,
            _ => Register::RBP,
        };
        self.set_reg(r, frame);
        let sp = self.rsp().wrapping_sub(alloc);
        self.set_rsp(sp);
        Ok(())
    }
}

/// Helper so LOOP can learn its counter width.
trait LoopWidth {
    fn op0_register_or_count(&self) -> usize;
}
impl LoopWidth for Instruction {
    fn op0_register_or_count(&self) -> usize {
        match self.code() {
            Code::Loop_rel8_16_CX
            | Code::Loope_rel8_16_CX
            | Code::Loopne_rel8_16_CX
            | Code::Loop_rel8_32_CX
            | Code::Loope_rel8_32_CX
            | Code::Loopne_rel8_32_CX => 2,
            Code::Loop_rel8_16_ECX
            | Code::Loope_rel8_16_ECX
            | Code::Loopne_rel8_16_ECX
            | Code::Loop_rel8_32_ECX
            | Code::Loope_rel8_32_ECX
            | Code::Loopne_rel8_32_ECX
            | Code::Loop_rel8_64_ECX
            | Code::Loope_rel8_64_ECX
            | Code::Loopne_rel8_64_ECX => 4,
            _ => 8,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cpu::Exit;
    use crate::tests_support::*;

    #[test]
    fn guest_store_to_cached_code_is_seen() {
        let mut ram = vec![0u8; 4 << 20];
        // 0x10000: mov eax, 1 ; hlt
        ram[0x10000..0x10006].copy_from_slice(&[0xb8, 1, 0, 0, 0, 0xf4]);
        // 0x20000: mov byte [0x10001], 2 ; hlt
        ram[0x20000..0x20009].copy_from_slice(&[0xc6, 0x04, 0x25, 0x01, 0x00, 0x01, 0x00, 0x02, 0xf4]);
        let mut c = long_mode_cpu(&mut ram);
        let mut bus = NullBus;
        c.rip = 0x10000;
        assert_eq!(c.run(&mut bus, 100), Exit::HaltedForever);
        assert_eq!(c.gpr[0], 1);
        // The guest patches the immediate of the (now cached) instruction...
        c.halted = false;
        c.rip = 0x20000;
        assert_eq!(c.run(&mut bus, 100), Exit::HaltedForever);
        // ...and running it again executes the new bytes.
        c.halted = false;
        c.rip = 0x10000;
        assert_eq!(c.run(&mut bus, 100), Exit::HaltedForever);
        assert_eq!(c.gpr[0], 2);
    }

    /// A bus whose "device" rewrote guest RAM and reports it once.
    struct DmaBus(Vec<(u64, u64)>);
    impl crate::Bus for DmaBus {
        fn io_in(&mut self, _: u16, _: u8) -> u32 {
            !0
        }
        fn io_out(&mut self, _: u16, _: u8, _: u32) {}
        fn mmio_read(&mut self, _: u64, _: u8) -> u64 {
            !0
        }
        fn mmio_write(&mut self, _: u64, _: u8, _: u64) {}
        fn interrupt_pending(&mut self) -> bool {
            false
        }
        fn ack_interrupt(&mut self) -> Option<u8> {
            None
        }
        fn now_ns(&mut self) -> u64 {
            0
        }
        fn take_device_writes(&mut self) -> Vec<(u64, u64)> {
            std::mem::take(&mut self.0)
        }
    }

    #[test]
    fn device_writes_to_cached_code_are_seen() {
        let mut ram = vec![0u8; 4 << 20];
        ram[0x10000..0x10006].copy_from_slice(&[0xb8, 1, 0, 0, 0, 0xf4]);
        let host = ram.as_mut_ptr();
        let mut c = long_mode_cpu(&mut ram);
        c.rip = 0x10000;
        assert_eq!(c.run(&mut NullBus, 100), Exit::HaltedForever);
        assert_eq!(c.gpr[0], 1);
        // DMA rewrites the immediate behind the CPU's back (as a disk read into a page
        // cache page would), and the bus reports it.
        // SAFETY: 0x10001 is inside the 4 MiB buffer the CPU was built over.
        unsafe { host.add(0x10001).write_volatile(3) };
        c.halted = false;
        c.rip = 0x10000;
        assert_eq!(c.run(&mut DmaBus(vec![(0x10001, 1)]), 100), Exit::HaltedForever);
        assert_eq!(c.gpr[0], 3);
    }

    #[test]
    fn self_modifying_code_within_a_block_stops_the_block() {
        let mut ram = vec![0u8; 4 << 20];
        // 0x10000: mov byte [0x1000a], 7 ; mov eax, 0 (imm at 0x1000a) ; hlt
        // The store patches the very next instruction of the same block.
        let code = [0xc6, 0x04, 0x25, 0x0a, 0x00, 0x01, 0x00, 0x07, 0xb8, 0x00, 0x00, 0x00, 0x00, 0xf4];
        // mov eax, imm32 is at 0x10008; its immediate starts at 0x10009.
        let mut code = code.to_vec();
        code[3] = 0x09;
        ram[0x10000..0x10000 + code.len()].copy_from_slice(&code);
        let mut c = long_mode_cpu(&mut ram);
        let mut bus = NullBus;
        c.rip = 0x10000;
        assert_eq!(c.run(&mut bus, 100), Exit::HaltedForever);
        assert_eq!(c.gpr[0], 7, "the patched instruction must run with its new immediate");
    }
}

#[cfg(test)]
mod rep_string {
    use crate::cpu::Exit;
    use crate::tests_support::*;

    fn run_at(ram: &mut [u8], code: &[u8], regs: &[(usize, u64)]) -> crate::Cpu {
        ram[0x10000..0x10000 + code.len()].copy_from_slice(code);
        let mut c = long_mode_cpu(ram);
        for &(r, v) in regs {
            c.gpr[r] = v;
        }
        c.rip = 0x10000;
        let e = c.run(&mut NullBus, 100_000);
        assert!(matches!(e, Exit::HaltedForever | Exit::TripleFault(_)), "{e:?}");
        c
    }

    #[test]
    fn stosq_across_a_page_boundary() {
        let mut ram = vec![0u8; 4 << 20];
        // rep stosq ; hlt
        let c = run_at(&mut ram, &[0xf3, 0x48, 0xab, 0xf4], &[(0, 0x1122_3344_5566_7788), (1, 4), (7, 0x20ff8)]);
        assert_eq!((c.gpr[1], c.gpr[7]), (0, 0x21018));
        drop(c);
        for i in 0..4 {
            let at = 0x20ff8 + 8 * i;
            assert_eq!(u64::from_le_bytes(ram[at..at + 8].try_into().unwrap()), 0x1122_3344_5566_7788);
        }
        assert_eq!(&ram[0x21018..0x21020], &[0; 8]);
    }

    #[test]
    fn overlapping_forward_movsb_replicates() {
        let mut ram = vec![0u8; 4 << 20];
        ram[0x30000] = 0xab;
        // rep movsb ; hlt  (src 0x30000, dst 0x30001: each byte copies the previous one)
        let c = run_at(&mut ram, &[0xf3, 0xa4, 0xf4], &[(1, 16), (6, 0x30000), (7, 0x30001)]);
        assert_eq!(c.gpr[1], 0);
        drop(c);
        assert!(ram[0x30000..0x30011].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn fault_midway_leaves_restartable_registers() {
        let mut ram = vec![0u8; 4 << 20];
        // rep stosb from 16 bytes below the end of the mapped 2 MiB: the 17th byte faults.
        let c = run_at(&mut ram, &[0xf3, 0xaa, 0xf4], &[(0, 0x5a), (1, 32), (7, 0x1f_fff0)]);
        assert_eq!(c.rip, 0x10000, "RIP stays on the REP instruction");
        assert_eq!((c.gpr[1], c.gpr[7]), (16, 0x20_0000));
        assert_eq!(c.cr2, 0x20_0000);
        drop(c);
        assert!(ram[0x1f_fff0..0x20_0000].iter().all(|&b| b == 0x5a));
    }
}

#[cfg(test)]
mod hostile_guest {
    use crate::cpu::Exit;
    use crate::tests_support::*;

    /// Random bytes executed as kernel code in long mode (with random register values, so
    /// loads and stores land anywhere) must never panic or hang the emulator: every run ends
    /// in an exit (usually a triple fault, as no IDT is installed) within its budget.
    #[test]
    fn random_code_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut ram = vec![0u8; 4 << 20];
        let mut exits = [0usize; 4];
        for _ in 0..3000 {
            for b in ram[0x10000..0x11000].iter_mut() {
                *b = crate::regs::low8(next());
            }
            let mut c = long_mode_cpu(&mut ram);
            for r in 0..16 {
                if r != 4 {
                    c.gpr[r] = match next() % 4 {
                        0 => next(),
                        1 => next() % (4 << 20),
                        2 => 0,
                        _ => next() % 0x100,
                    };
                }
            }
            c.rflags = 2 | (next() & 0xcd5);
            // Let SSE and x87 instructions run too (CR4.OSFXSR | OSXMMEXCPT).
            c.cr4 |= (1 << 9) | (1 << 10);
            c.rip = 0x10000 + next() % 0x800;
            let e = c.run(&mut NullBus, 2000);
            exits[match e {
                Exit::TripleFault(_) => 0,
                Exit::Budget => 1,
                Exit::HaltedForever | Exit::Halted => 2,
                Exit::Unsupported(_) => 3,
            }] += 1;
        }
        // Most random streams fault quickly; the point is that all of them returned.
        assert_eq!(exits.iter().sum::<usize>(), 3000, "{exits:?}");
        assert!(exits[0] > 0, "{exits:?}");
    }
}
