//! Pre-decoded fast forms of the most frequent 64-bit-mode instructions.
//!
//! When a block is decoded, each instruction is also lowered to a [`Uop`]: the common forms
//! (MOV/LEA/ALU between 32/64-bit registers, immediates and simple memory operands, Jcc,
//! JMP/CALL rel, RET, PUSH/POP r64) carry their operands pre-extracted, so executing them
//! needs no calls back into the decoder's operand accessors. Everything else is
//! [`Uop::Generic`] and runs through the full interpreter. Fast forms have exactly the
//! semantics of the generic path; the differential tests run through both.

use crate::alu::{self, Op2};
use crate::cpu::{sreg, Cpu};
use crate::regs::mask;
use crate::{Bus, Fault, Res};
use iced_x86::{ConditionCode, Instruction, Mnemonic, OpKind, Register};

/// No register (in a [`MemOp`]).
pub(crate) const NONE: u8 = 0xff;

/// Or'ed into a [`Uop::MovXR`] source: the high byte (bits 8-15) of GPR 0-3 (AH..BH).
pub(crate) const HIGH8: u8 = 0x10;

/// A memory operand with 64-bit addressing: base + (index << scale) + disp (+ FS/GS base).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MemOp {
    /// Base GPR, or NONE.
    pub(crate) base: u8,
    /// Index GPR, or NONE.
    pub(crate) index: u8,
    /// log2 of the index scale.
    pub(crate) scale: u8,
    /// 0: no segment base, 1: FS, 2: GS.
    pub(crate) seg: u8,
    /// Displacement (RIP-relative operands have the absolute address here).
    pub(crate) disp: u64,
}

impl MemOp {
    fn from(insn: &Instruction) -> Option<MemOp> {
        let b = insn.memory_base();
        let i = insn.memory_index();
        let seg = match insn.memory_segment() {
            Register::FS => 1,
            Register::GS => 2,
            _ => 0,
        };
        let gpr64 = |r: Register| r.is_gpr64();
        let base = if b == Register::None || b == Register::RIP {
            NONE
        } else if gpr64(b) {
            u8::try_from(b.number()).ok()?
        } else {
            return None;
        };
        let index = if i == Register::None {
            NONE
        } else if gpr64(i) {
            u8::try_from(i.number()).ok()?
        } else {
            return None;
        };
        Some(MemOp {
            base,
            index,
            scale: u8::try_from(insn.memory_index_scale().trailing_zeros()).ok()?,
            seg,
            disp: insn.memory_displacement64(),
        })
    }

    #[inline(always)]
    fn la(&self, cpu: &Cpu) -> u64 {
        let mut a = self.disp;
        if self.base != NONE {
            a = a.wrapping_add(cpu.gpr_at(usize::from(self.base)));
        }
        if self.index != NONE {
            a = a.wrapping_add(cpu.gpr_at(usize::from(self.index)) << self.scale);
        }
        match self.seg {
            1 => a.wrapping_add(cpu.seg[sreg::FS].base),
            2 => a.wrapping_add(cpu.seg[sreg::GS].base),
            _ => a,
        }
    }
}

/// Source operand of a fast ALU/MOV form.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Src {
    Reg(u8),
    Imm(u64),
    Mem(MemOp),
}

/// An XMM-or-memory source of an SSE fast form.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Xs {
    /// XMM register 0..=15.
    X(u8),
    /// Memory.
    M(MemOp),
}

/// Floating-point operation of an SSE fast form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FpOp {
    Add,
    Sub,
    Mul,
    Div,
    Sqrt,
}

/// The lanes an SSE floating-point operation works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lanes {
    /// Scalar single (low 32 bits; the rest of the destination kept).
    Ss,
    /// Scalar double (low 64 bits; the rest kept).
    Sd,
    /// Packed single (4 lanes).
    Ps,
    /// Packed double (2 lanes).
    Pd,
}

impl Lanes {
    /// Bytes of a memory source operand.
    pub(crate) fn mem_size(self) -> u8 {
        match self {
            Lanes::Ss => 4,
            Lanes::Sd => 8,
            Lanes::Ps | Lanes::Pd => 16,
        }
    }
}

/// 128-bit bitwise and integer operations of an SSE fast form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VecOp {
    And,
    /// `!d & s` (PANDN/ANDNPS/ANDNPD).
    Andn,
    Or,
    Xor,
    /// PADDB/W/D/Q, PSUBB/W/D/Q.
    AddB,
    AddW,
    AddD,
    AddQ,
    SubB,
    SubW,
    SubD,
    SubQ,
    /// PCMPEQB/W/D: all ones in equal lanes.
    CmpEqB,
    CmpEqW,
    CmpEqD,
    /// PMINUB, PMAXUB.
    MinUB,
    MaxUB,
    /// PSHUFB (SSSE3).
    Pshufb,
    /// PUNPCKL/PUNPCKH BW, WD, DQ, QDQ (and UNPCKL/UNPCKH PS/PD): lanes of the low (`high`
    /// false) or high halves of d and s interleaved, d first; `lane` in bytes (1, 2, 4, 8).
    Unpack {
        high: bool,
        lane: u8,
    },
}

/// Shifts of every lane by an immediate count (PSLLW/D/Q, PSRLW/D/Q, PSRAW/D).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VShift {
    Shl,
    Shr,
    Sar,
}

/// An SSE fast form: compiled inline by the translation tier (the interpreter runs these
/// through the full SSE path, `crate::sse`, which stays the reference). Every form first
/// checks what the SSE path checks (CR0.EM/TS, CR4.OSFXSR; for floating point, an MXCSR
/// with every exception masked, round to nearest, no DAZ/FTZ; a memory operand the TLB
/// maps and, where legacy SSE requires it, 16-byte aligned) and hands the instruction to
/// the interpreter where that does not hold.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Sse {
    /// XMM d = s, 128 bits (MOVAPS/MOVAPD/MOVDQA with `aligned`, MOVUPS/MOVUPD/MOVDQU).
    Mov { d: u8, s: Xs, aligned: bool },
    /// The low `size` bytes (4, 8 or 16) of XMM s to memory (MOVSS/MOVD, MOVSD/MOVQ,
    /// MOVAPS/MOVUPS... m, xmm).
    Store { m: MemOp, s: u8, size: u8, aligned: bool },
    /// XMM d = the low `size` bytes (4 or 8) of s, zero-extended (MOVSS/MOVSD xmm, m;
    /// MOVD/MOVQ xmm, m; MOVQ xmm, xmm).
    LoadZ { d: u8, s: Xs, size: u8 },
    /// The low `size` bytes (4 or 8) of XMM d = those of XMM s, the rest kept (MOVSS/MOVSD
    /// xmm, xmm).
    Merge { d: u8, s: u8, size: u8 },
    /// XMM d = GPR s zero-extended (MOVD/MOVQ xmm, r32/r64; `size` 4 or 8).
    FromGpr { d: u8, s: u8, size: u8 },
    /// GPR d = the low `size` bytes of XMM s (MOVD/MOVQ r32/r64, xmm).
    ToGpr { d: u8, s: u8, size: u8 },
    /// ADD/SUB/MUL/DIV/SQRT SS/SD/PS/PD: d = d op s (SQRT: d = sqrt s), lane-wise.
    Fp { op: FpOp, lanes: Lanes, d: u8, s: Xs },
    /// PAND/PANDN/POR/PXOR (and the PS/PD forms), PADDD/PSUBD/PADDQ/PSUBQ: d = d op s.
    Vec { op: VecOp, d: u8, s: Xs },
    /// Lane-wise shift of XMM d by `count` (the immediate: counts of the lane width or more
    /// give zeros, or sign copies for PSRA); `bits` the lane width (16, 32, 64).
    ShiftImm { op: VShift, bits: u8, d: u8, count: u8 },
    /// PSLLDQ (`left`) / PSRLDQ: XMM d shifted by `count` bytes (16 or more: zero).
    ByteShift { left: bool, d: u8, count: u8 },
    /// PSHUFD: dword i of XMM d = dword `imm >> 2i & 3` of s.
    Pshufd { d: u8, s: Xs, imm: u8 },
    /// PALIGNR (SSSE3): XMM d = bytes `imm..imm + 16` of the 32 bytes d:s (s low).
    Palignr { d: u8, s: Xs, imm: u8 },
    /// PMOVMSKB r32/r64, xmm: GPR d = the top bit of each byte of XMM s.
    Pmovmskb { d: u8, s: u8 },
    /// AESENC (`kind` 0), AESENCLAST (1), AESDEC (2), AESDECLAST (3): one round on XMM d
    /// with the round key s (lowered only where the host has AES-NI, as the CPU model
    /// advertises it only then).
    Aes { kind: u8, d: u8, s: Xs },
    /// UCOMISS (`dbl` false) / UCOMISD: ZF, PF, CF from comparing XMM a with s; OF, SF,
    /// AF cleared.
    Ucomi { dbl: bool, a: u8, s: Xs },
    /// CVTSI2SS / CVTSI2SD (`dbl`): the low lane of XMM d = the signed `ssz`-byte (4 or 8)
    /// integer s.
    CvtI2F { dbl: bool, d: u8, s: Src, ssz: u8 },
}

impl Sse {
    /// Whether the form does floating-point arithmetic (which runs on the host's MXCSR).
    pub(crate) fn host_fp(&self) -> bool {
        matches!(self, Sse::Fp { .. } | Sse::Ucomi { .. } | Sse::CvtI2F { .. })
    }
}

/// A pre-decoded instruction.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Uop {
    /// Run through the full interpreter.
    Generic,
    /// An SSE form the translation tier compiles inline (the interpreter runs it as
    /// `Generic`).
    Sse(Sse),
    /// MOV r32/64, src.
    MovR { d: u8, s: Src, sz: u8 },
    /// MOV m, r32/64 or imm.
    MovM { m: MemOp, s: Src, sz: u8 },
    /// LEA r64, m (`sz` 8) or LEA r32, m (`sz` 4: the address truncated, zero-extended).
    Lea { d: u8, m: MemOp, sz: u8 },
    /// NOT or NEG r32/64.
    Unary { neg: bool, d: u8, sz: u8 },
    /// SHL/SHR/SAR r32/64, CL.
    ShiftCl { op: Op2, d: u8, sz: u8 },
    /// ADD/OR/AND/SUB/XOR r, src (write = false for CMP/TEST). For CMP/TEST r8, `d` may
    /// be [`HIGH8`] | 0..=3 for AH/CH/DH/BH (`test ah, 2` tests IF in saved flags).
    Alu { op: Op2, d: u8, s: Src, sz: u8, write: bool },
    /// ALU m, r32/64 or imm (any size); write = false for CMP/TEST.
    AluM { op: Op2, m: MemOp, s: Src, sz: u8, write: bool },
    /// ADC/SBB/IMUL r32/64, src (operations whose flags go through the host with the
    /// guest's flags loaded).
    AluF { op: Op2, d: u8, s: Src, sz: u8 },
    /// IMUL r32/64, r/m, imm.
    Imul3 { d: u8, s: Src, imm: u64, sz: u8 },
    /// SETcc on a low-byte register (not AH/CH/DH/BH).
    Setcc { cc: ConditionCode, d: u8 },
    /// CMOVcc r32/64, src.
    Cmov { cc: ConditionCode, d: u8, s: Src, sz: u8 },
    /// MOVZX/MOVSX r32/64, r8/r16; `s` is a GPR number, or [`HIGH8`] | 0..=3 for
    /// AH/CH/DH/BH.
    MovXR { d: u8, s: u8, ssz: u8, dsz: u8, signed: bool },
    /// BSWAP r32/r64.
    Bswap { d: u8, sz: u8 },
    /// DIV r/m32, r/m64 (unsigned): EDX:EAX or RDX:RAX / s, quotient to RAX, remainder to
    /// RDX; #DE for a zero divisor or a quotient that does not fit; flags unchanged.
    Div { s: Src, sz: u8 },
    /// BSF r32/64, r/m (and TZCNT, which executes as BSF without BMI1 in the CPU model): a
    /// zero source leaves the destination (a 32-bit one zero-extended).
    Bsf { d: u8, s: Src, sz: u8 },
    /// MOVZX/MOVSX r32/64, m8/m16.
    MovX { d: u8, m: MemOp, ssz: u8, dsz: u8, signed: bool },
    /// INC/DEC r32/64.
    IncDec { d: u8, sz: u8, dec: bool },
    /// INC/DEC m (any size, no LOCK prefix: locked forms stay with the interpreter's
    /// atomic path).
    IncDecM { m: MemOp, sz: u8, dec: bool },
    /// SHL/SHR/SAR/ROL/ROR r32/64, imm8.
    Shift { op: Op2, d: u8, c: u8, sz: u8 },
    /// NOP forms (including multi-byte NOPs and PAUSE).
    Nop,
    /// Jcc rel.
    Jcc { cc: ConditionCode, target: u64 },
    /// JMP rel.
    Jmp { target: u64 },
    /// CALL rel.
    Call { target: u64 },
    /// RET (near, no immediate).
    Ret,
    /// JMP r/m64 (near, indirect).
    JmpInd { s: Src },
    /// CALL r/m64 (near, indirect).
    CallInd { s: Src },
    /// PUSH r64.
    Push { r: u8 },
    /// POP r64.
    Pop { r: u8 },
    /// PUSH imm8/imm32 (sign-extended to 64 bits, in `v`).
    PushI { v: u64 },
    /// PUSHFQ: RFLAGS with VM and RF cleared (SDM Vol. 2 PUSHF).
    Pushf,
    /// MOV r32/r64, Sreg: the selector of segment register `s` (`crate::cpu::sreg`),
    /// zero-extended.
    MovSreg { d: u8, s: u8, sz: u8 },
    /// SETcc m8.
    SetccM { cc: ConditionCode, m: MemOp },
    /// BT/BTS/BTR/BTC r/m16/32/64, imm8 (no LOCK): bit `bit` (the immediate modulo the
    /// operand's width) of `s` (a register or memory, never an immediate) to CF, the other
    /// flags as `crate::alu` computes them; BTS/BTR/BTC then set, clear or complement it.
    /// `op` is `Op2::Bt`, `Bts`, `Btr` or `Btc` (SDM Vol. 2A BT).
    BitI { op: Op2, s: Src, bit: u8, sz: u8 },
    /// CMPXCHG m32/m64, r32/r64 (no LOCK): compares the accumulator with the memory
    /// operand (flags as CMP), stores `s` there if equal, else stores the operand back
    /// unchanged (the locked cycle's write) and loads it into the accumulator (EAX
    /// zero-extended); an equal compare leaves RAX whole (SDM Vol. 2A CMPXCHG).
    CmpxchgM { m: MemOp, s: u8, sz: u8 },
    /// CLI: clears RFLAGS.IF. The interpreter raises #GP(0) where CPL > IOPL; compiled
    /// code has the form only in blocks compiled for CPL 0.
    Cli,
}

fn gpr(r: Register, sz: usize) -> Option<u8> {
    if (sz == 8 && r.is_gpr64()) || (sz == 4 && r.is_gpr32()) {
        u8::try_from(r.number()).ok()
    } else {
        None
    }
}

/// GPR index of a register of `sz` bytes: a low-byte register (not AH/CH/DH/BH), a 16-,
/// 32- or 64-bit one.
fn gpr_sized(r: Register, sz: usize) -> Option<u8> {
    match sz {
        1 => low8(r),
        2 if r.is_gpr16() => u8::try_from(r.number()).ok(),
        _ => gpr(r, sz),
    }
}

/// GPR index of a low-byte register (AL..R15L, SPL..DIL); None for AH/CH/DH/BH.
fn low8(r: Register) -> Option<u8> {
    if !r.is_gpr8() || matches!(r, Register::AH | Register::CH | Register::DH | Register::BH) {
        return None;
    }
    u8::try_from(r.full_register().number()).ok()
}

fn src(insn: &Instruction, i: u32, sz: usize) -> Option<Src> {
    match insn.op_kind(i) {
        OpKind::Register => gpr_sized(insn.op_register(i), sz).map(Src::Reg),
        OpKind::Memory => MemOp::from(insn).map(Src::Mem),
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate8to16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => Some(Src::Imm(insn.immediate(i) & mask(sz))),
        _ => None,
    }
}

/// Lowers `insn` (decoded in 64-bit mode) to a fast form where one exists.
pub(crate) fn lower(insn: &Instruction, bits: u32) -> Uop {
    if bits != 64 || insn.has_lock_prefix() || insn.has_rep_prefix() || insn.has_repne_prefix() {
        return Uop::Generic;
    }
    lower64(insn).unwrap_or(Uop::Generic)
}

/// XMM register number of `r`.
fn xmm(r: Register) -> Option<u8> {
    if r.is_xmm() {
        u8::try_from(r.number()).ok()
    } else {
        None
    }
}

/// Operand `i` as an XMM register or memory.
fn xs(insn: &Instruction, i: u32) -> Option<Xs> {
    match insn.op_kind(i) {
        OpKind::Register => xmm(insn.op_register(i)).map(Xs::X),
        OpKind::Memory => MemOp::from(insn).map(Xs::M),
        _ => None,
    }
}

/// The SSE fast forms (legacy encodings only: VEX forms are not in the CPU model).
fn lower_sse(insn: &Instruction) -> Option<Sse> {
    use iced_x86::Code as C;
    if insn.encoding() != iced_x86::EncodingKind::Legacy {
        return None;
    }
    let x0 = || xmm(insn.op0_register());
    let fp = |op: FpOp, lanes: Lanes| Some(Sse::Fp { op, lanes, d: x0()?, s: xs(insn, 1)? });
    let vec = |op: VecOp| Some(Sse::Vec { op, d: x0()?, s: xs(insn, 1)? });
    let gpr_of = |r: Register| u8::try_from(r.full_register().number()).ok();
    Some(match insn.code() {
        C::Movaps_xmm_xmmm128 | C::Movapd_xmm_xmmm128 | C::Movdqa_xmm_xmmm128 => {
            Sse::Mov { d: x0()?, s: xs(insn, 1)?, aligned: true }
        }
        C::Movups_xmm_xmmm128 | C::Movupd_xmm_xmmm128 | C::Movdqu_xmm_xmmm128 => {
            Sse::Mov { d: x0()?, s: xs(insn, 1)?, aligned: false }
        }
        C::Movaps_xmmm128_xmm
        | C::Movapd_xmmm128_xmm
        | C::Movdqa_xmmm128_xmm
        | C::Movups_xmmm128_xmm
        | C::Movupd_xmmm128_xmm
        | C::Movdqu_xmmm128_xmm => {
            let s = xmm(insn.op1_register())?;
            let aligned = matches!(insn.code(), C::Movaps_xmmm128_xmm | C::Movapd_xmmm128_xmm | C::Movdqa_xmmm128_xmm);
            match xs(insn, 0)? {
                Xs::X(d) => Sse::Mov { d, s: Xs::X(s), aligned },
                Xs::M(m) => Sse::Store { m, s, size: 16, aligned },
            }
        }
        C::Movsd_xmm_xmmm64 | C::Movss_xmm_xmmm32 => {
            let size = if insn.code() == C::Movsd_xmm_xmmm64 { 8 } else { 4 };
            match xs(insn, 1)? {
                Xs::X(s) => Sse::Merge { d: x0()?, s, size },
                m => Sse::LoadZ { d: x0()?, s: m, size },
            }
        }
        C::Movsd_xmmm64_xmm | C::Movss_xmmm32_xmm => {
            let size = if insn.code() == C::Movsd_xmmm64_xmm { 8 } else { 4 };
            let s = xmm(insn.op1_register())?;
            match xs(insn, 0)? {
                Xs::X(d) => Sse::Merge { d, s, size },
                Xs::M(m) => Sse::Store { m, s, size, aligned: false },
            }
        }
        C::Movq_xmm_xmmm64 => Sse::LoadZ { d: x0()?, s: xs(insn, 1)?, size: 8 },
        C::Movq_xmmm64_xmm => {
            let s = xmm(insn.op1_register())?;
            match xs(insn, 0)? {
                Xs::X(d) => Sse::LoadZ { d, s: Xs::X(s), size: 8 },
                Xs::M(m) => Sse::Store { m, s, size: 8, aligned: false },
            }
        }
        C::Movd_xmm_rm32 | C::Movq_xmm_rm64 => {
            let size = if insn.code() == C::Movd_xmm_rm32 { 4 } else { 8 };
            match insn.op1_kind() {
                OpKind::Register => Sse::FromGpr { d: x0()?, s: gpr_of(insn.op1_register())?, size },
                _ => Sse::LoadZ { d: x0()?, s: Xs::M(MemOp::from(insn)?), size },
            }
        }
        C::Movd_rm32_xmm | C::Movq_rm64_xmm => {
            let size = if insn.code() == C::Movd_rm32_xmm { 4 } else { 8 };
            let s = xmm(insn.op1_register())?;
            match insn.op0_kind() {
                OpKind::Register => Sse::ToGpr { d: gpr_of(insn.op0_register())?, s, size },
                _ => Sse::Store { m: MemOp::from(insn)?, s, size, aligned: false },
            }
        }
        C::Addss_xmm_xmmm32 => fp(FpOp::Add, Lanes::Ss)?,
        C::Addsd_xmm_xmmm64 => fp(FpOp::Add, Lanes::Sd)?,
        C::Addps_xmm_xmmm128 => fp(FpOp::Add, Lanes::Ps)?,
        C::Addpd_xmm_xmmm128 => fp(FpOp::Add, Lanes::Pd)?,
        C::Subss_xmm_xmmm32 => fp(FpOp::Sub, Lanes::Ss)?,
        C::Subsd_xmm_xmmm64 => fp(FpOp::Sub, Lanes::Sd)?,
        C::Subps_xmm_xmmm128 => fp(FpOp::Sub, Lanes::Ps)?,
        C::Subpd_xmm_xmmm128 => fp(FpOp::Sub, Lanes::Pd)?,
        C::Mulss_xmm_xmmm32 => fp(FpOp::Mul, Lanes::Ss)?,
        C::Mulsd_xmm_xmmm64 => fp(FpOp::Mul, Lanes::Sd)?,
        C::Mulps_xmm_xmmm128 => fp(FpOp::Mul, Lanes::Ps)?,
        C::Mulpd_xmm_xmmm128 => fp(FpOp::Mul, Lanes::Pd)?,
        C::Divss_xmm_xmmm32 => fp(FpOp::Div, Lanes::Ss)?,
        C::Divsd_xmm_xmmm64 => fp(FpOp::Div, Lanes::Sd)?,
        C::Divps_xmm_xmmm128 => fp(FpOp::Div, Lanes::Ps)?,
        C::Divpd_xmm_xmmm128 => fp(FpOp::Div, Lanes::Pd)?,
        C::Sqrtss_xmm_xmmm32 => fp(FpOp::Sqrt, Lanes::Ss)?,
        C::Sqrtsd_xmm_xmmm64 => fp(FpOp::Sqrt, Lanes::Sd)?,
        C::Sqrtps_xmm_xmmm128 => fp(FpOp::Sqrt, Lanes::Ps)?,
        C::Sqrtpd_xmm_xmmm128 => fp(FpOp::Sqrt, Lanes::Pd)?,
        C::Pand_xmm_xmmm128 | C::Andps_xmm_xmmm128 | C::Andpd_xmm_xmmm128 => vec(VecOp::And)?,
        C::Pandn_xmm_xmmm128 | C::Andnps_xmm_xmmm128 | C::Andnpd_xmm_xmmm128 => vec(VecOp::Andn)?,
        C::Por_xmm_xmmm128 | C::Orps_xmm_xmmm128 | C::Orpd_xmm_xmmm128 => vec(VecOp::Or)?,
        C::Pxor_xmm_xmmm128 | C::Xorps_xmm_xmmm128 | C::Xorpd_xmm_xmmm128 => vec(VecOp::Xor)?,
        C::Paddb_xmm_xmmm128 => vec(VecOp::AddB)?,
        C::Paddw_xmm_xmmm128 => vec(VecOp::AddW)?,
        C::Paddd_xmm_xmmm128 => vec(VecOp::AddD)?,
        C::Paddq_xmm_xmmm128 => vec(VecOp::AddQ)?,
        C::Psubb_xmm_xmmm128 => vec(VecOp::SubB)?,
        C::Psubw_xmm_xmmm128 => vec(VecOp::SubW)?,
        C::Psubd_xmm_xmmm128 => vec(VecOp::SubD)?,
        C::Psubq_xmm_xmmm128 => vec(VecOp::SubQ)?,
        C::Pcmpeqb_xmm_xmmm128 => vec(VecOp::CmpEqB)?,
        C::Pcmpeqw_xmm_xmmm128 => vec(VecOp::CmpEqW)?,
        C::Pcmpeqd_xmm_xmmm128 => vec(VecOp::CmpEqD)?,
        C::Pminub_xmm_xmmm128 => vec(VecOp::MinUB)?,
        C::Pmaxub_xmm_xmmm128 => vec(VecOp::MaxUB)?,
        C::Pshufb_xmm_xmmm128 => vec(VecOp::Pshufb)?,
        C::Punpcklbw_xmm_xmmm128 => vec(VecOp::Unpack { high: false, lane: 1 })?,
        C::Punpcklwd_xmm_xmmm128 => vec(VecOp::Unpack { high: false, lane: 2 })?,
        C::Punpckldq_xmm_xmmm128 | C::Unpcklps_xmm_xmmm128 => vec(VecOp::Unpack { high: false, lane: 4 })?,
        C::Punpcklqdq_xmm_xmmm128 | C::Unpcklpd_xmm_xmmm128 => vec(VecOp::Unpack { high: false, lane: 8 })?,
        C::Punpckhbw_xmm_xmmm128 => vec(VecOp::Unpack { high: true, lane: 1 })?,
        C::Punpckhwd_xmm_xmmm128 => vec(VecOp::Unpack { high: true, lane: 2 })?,
        C::Punpckhdq_xmm_xmmm128 | C::Unpckhps_xmm_xmmm128 => vec(VecOp::Unpack { high: true, lane: 4 })?,
        C::Punpckhqdq_xmm_xmmm128 | C::Unpckhpd_xmm_xmmm128 => vec(VecOp::Unpack { high: true, lane: 8 })?,
        C::Psllw_xmm_imm8
        | C::Pslld_xmm_imm8
        | C::Psllq_xmm_imm8
        | C::Psrlw_xmm_imm8
        | C::Psrld_xmm_imm8
        | C::Psrlq_xmm_imm8
        | C::Psraw_xmm_imm8
        | C::Psrad_xmm_imm8 => {
            let (op, bits) = match insn.code() {
                C::Psllw_xmm_imm8 => (VShift::Shl, 16),
                C::Pslld_xmm_imm8 => (VShift::Shl, 32),
                C::Psllq_xmm_imm8 => (VShift::Shl, 64),
                C::Psrlw_xmm_imm8 => (VShift::Shr, 16),
                C::Psrld_xmm_imm8 => (VShift::Shr, 32),
                C::Psrlq_xmm_imm8 => (VShift::Shr, 64),
                C::Psraw_xmm_imm8 => (VShift::Sar, 16),
                _ => (VShift::Sar, 32),
            };
            Sse::ShiftImm { op, bits, d: x0()?, count: insn.immediate8() }
        }
        C::Pslldq_xmm_imm8 | C::Psrldq_xmm_imm8 => {
            Sse::ByteShift { left: insn.code() == C::Pslldq_xmm_imm8, d: x0()?, count: insn.immediate8() }
        }
        C::Pshufd_xmm_xmmm128_imm8 => Sse::Pshufd { d: x0()?, s: xs(insn, 1)?, imm: insn.immediate8() },
        C::Palignr_xmm_xmmm128_imm8 => Sse::Palignr { d: x0()?, s: xs(insn, 1)?, imm: insn.immediate8() },
        C::Aesenc_xmm_xmmm128 | C::Aesenclast_xmm_xmmm128 | C::Aesdec_xmm_xmmm128 | C::Aesdeclast_xmm_xmmm128
            if crate::cpuid::has(crate::cpuid::Ext::Aes) =>
        {
            let kind = match insn.code() {
                C::Aesenc_xmm_xmmm128 => 0,
                C::Aesenclast_xmm_xmmm128 => 1,
                C::Aesdec_xmm_xmmm128 => 2,
                _ => 3,
            };
            Sse::Aes { kind, d: x0()?, s: xs(insn, 1)? }
        }
        C::Pmovmskb_r32_xmm | C::Pmovmskb_r64_xmm => {
            Sse::Pmovmskb { d: gpr_of(insn.op0_register())?, s: xmm(insn.op1_register())? }
        }
        C::Ucomiss_xmm_xmmm32 => Sse::Ucomi { dbl: false, a: x0()?, s: xs(insn, 1)? },
        C::Ucomisd_xmm_xmmm64 => Sse::Ucomi { dbl: true, a: x0()?, s: xs(insn, 1)? },
        C::Cvtsi2ss_xmm_rm32 | C::Cvtsi2ss_xmm_rm64 | C::Cvtsi2sd_xmm_rm32 | C::Cvtsi2sd_xmm_rm64 => {
            let dbl = matches!(insn.code(), C::Cvtsi2sd_xmm_rm32 | C::Cvtsi2sd_xmm_rm64);
            let ssz: u8 = if matches!(insn.code(), C::Cvtsi2ss_xmm_rm32 | C::Cvtsi2sd_xmm_rm32) { 4 } else { 8 };
            let s = match insn.op1_kind() {
                OpKind::Register => Src::Reg(gpr_of(insn.op1_register())?),
                _ => Src::Mem(MemOp::from(insn)?),
            };
            Sse::CvtI2F { dbl, d: x0()?, s, ssz }
        }
        _ => return None,
    })
}

fn lower64(insn: &Instruction) -> Option<Uop> {
    if let Some(s) = lower_sse(insn) {
        return Some(Uop::Sse(s));
    }
    let m = insn.mnemonic();
    let k0 = insn.op0_kind();
    Some(match m {
        Mnemonic::Mov
            if k0 == OpKind::Register
                && insn.op1_kind() == OpKind::Register
                && insn.op1_register().is_segment_register() =>
        {
            let r0 = insn.op0_register();
            let sz = r0.size();
            if sz < 4 {
                return None;
            }
            Uop::MovSreg {
                d: gpr(r0, sz)?,
                s: u8::try_from(insn.op1_register().number()).ok()?,
                sz: u8::try_from(sz).ok()?,
            }
        }
        Mnemonic::Mov => {
            if k0 == OpKind::Register {
                let r0 = insn.op0_register();
                let sz = r0.size();
                Uop::MovR { d: gpr_sized(r0, sz)?, s: src(insn, 1, sz)?, sz: u8::try_from(sz).ok()? }
            } else if k0 == OpKind::Memory {
                let sz = insn.memory_size().size();
                let s = match (sz, insn.op1_kind()) {
                    (4 | 8, _) => src(insn, 1, sz)?,
                    (1, OpKind::Register) => Src::Reg(low8(insn.op1_register())?),
                    (2, OpKind::Register) if insn.op1_register().is_gpr16() => {
                        Src::Reg(u8::try_from(insn.op1_register().number()).ok()?)
                    }
                    (1 | 2, OpKind::Immediate8 | OpKind::Immediate16) => Src::Imm(insn.immediate(1) & mask(sz)),
                    _ => return None,
                };
                if let Src::Mem(_) = s {
                    return None;
                }
                Uop::MovM { m: MemOp::from(insn)?, s, sz: u8::try_from(sz).ok()? }
            } else {
                return None;
            }
        }
        Mnemonic::Lea => {
            let r0 = insn.op0_register();
            let sz = r0.size();
            Uop::Lea { d: gpr(r0, sz)?, m: MemOp::from(insn)?, sz: u8::try_from(sz).ok()? }
        }
        Mnemonic::Not | Mnemonic::Neg if k0 == OpKind::Register => {
            let r0 = insn.op0_register();
            let sz = r0.size();
            Uop::Unary { neg: m == Mnemonic::Neg, d: gpr_sized(r0, sz)?, sz: u8::try_from(sz).ok()? }
        }
        Mnemonic::Shl | Mnemonic::Shr | Mnemonic::Sar
            if k0 == OpKind::Register && insn.op_count() == 2 && insn.op1_kind() == OpKind::Register =>
        {
            if insn.op1_register() != Register::CL {
                return None;
            }
            let r0 = insn.op0_register();
            let sz = r0.size();
            let op = match m {
                Mnemonic::Shl => Op2::Shl,
                Mnemonic::Shr => Op2::Shr,
                _ => Op2::Sar,
            };
            Uop::ShiftCl { op, d: gpr(r0, sz)?, sz: u8::try_from(sz).ok()? }
        }
        Mnemonic::Cmp
        | Mnemonic::Test
        | Mnemonic::Add
        | Mnemonic::Sub
        | Mnemonic::And
        | Mnemonic::Or
        | Mnemonic::Xor
            if k0 == OpKind::Memory =>
        {
            let sz = insn.memory_size().size();
            let s = match insn.op1_kind() {
                // Any size; AH..BH are not fast-form operands.
                OpKind::Register => Src::Reg(gpr_sized(insn.op1_register(), sz)?),
                OpKind::Memory => return None,
                _ => Src::Imm(insn.immediate(1) & mask(sz)),
            };
            let (op, write) = match m {
                Mnemonic::Cmp => (Op2::Sub, false),
                Mnemonic::Test => (Op2::And, false),
                Mnemonic::Add => (Op2::Add, true),
                Mnemonic::Sub => (Op2::Sub, true),
                Mnemonic::And => (Op2::And, true),
                Mnemonic::Or => (Op2::Or, true),
                _ => (Op2::Xor, true),
            };
            Uop::AluM { op, m: MemOp::from(insn)?, s, sz: u8::try_from(sz).ok()?, write }
        }
        Mnemonic::Adc | Mnemonic::Sbb if k0 == OpKind::Register => {
            let r0 = insn.op0_register();
            let sz = r0.size();
            let op = if m == Mnemonic::Adc { Op2::Adc } else { Op2::Sbb };
            Uop::AluF { op, d: gpr_sized(r0, sz)?, s: src(insn, 1, sz)?, sz: u8::try_from(sz).ok()? }
        }
        Mnemonic::Imul if k0 == OpKind::Register && insn.op_count() == 2 => {
            let r0 = insn.op0_register();
            let sz = r0.size();
            Uop::AluF { op: Op2::Imul, d: gpr_sized(r0, sz)?, s: src(insn, 1, sz)?, sz: u8::try_from(sz).ok()? }
        }
        Mnemonic::Imul if k0 == OpKind::Register && insn.op_count() == 3 => {
            let r0 = insn.op0_register();
            let sz = r0.size();
            Uop::Imul3 {
                d: gpr(r0, sz)?,
                s: src(insn, 1, sz)?,
                imm: insn.immediate(2) & mask(sz),
                sz: u8::try_from(sz).ok()?,
            }
        }
        Mnemonic::Sete
        | Mnemonic::Setne
        | Mnemonic::Seto
        | Mnemonic::Setno
        | Mnemonic::Setb
        | Mnemonic::Setae
        | Mnemonic::Setbe
        | Mnemonic::Seta
        | Mnemonic::Sets
        | Mnemonic::Setns
        | Mnemonic::Setp
        | Mnemonic::Setnp
        | Mnemonic::Setl
        | Mnemonic::Setge
        | Mnemonic::Setle
        | Mnemonic::Setg => match k0 {
            OpKind::Register => Uop::Setcc { cc: insn.condition_code(), d: low8(insn.op0_register())? },
            OpKind::Memory => Uop::SetccM { cc: insn.condition_code(), m: MemOp::from(insn)? },
            _ => return None,
        },
        Mnemonic::Cmove
        | Mnemonic::Cmovne
        | Mnemonic::Cmovo
        | Mnemonic::Cmovno
        | Mnemonic::Cmovb
        | Mnemonic::Cmovae
        | Mnemonic::Cmovbe
        | Mnemonic::Cmova
        | Mnemonic::Cmovs
        | Mnemonic::Cmovns
        | Mnemonic::Cmovp
        | Mnemonic::Cmovnp
        | Mnemonic::Cmovl
        | Mnemonic::Cmovge
        | Mnemonic::Cmovle
        | Mnemonic::Cmovg => {
            let r0 = insn.op0_register();
            let sz = r0.size();
            Uop::Cmov { cc: insn.condition_code(), d: gpr(r0, sz)?, s: src(insn, 1, sz)?, sz: u8::try_from(sz).ok()? }
        }
        Mnemonic::Movzx | Mnemonic::Movsx if k0 == OpKind::Register && insn.op1_kind() == OpKind::Register => {
            let r0 = insn.op0_register();
            let r1 = insn.op1_register();
            let dsz = r0.size();
            let ssz = r1.size();
            let s = if ssz == 1 {
                match r1 {
                    Register::AH | Register::CH | Register::DH | Register::BH => {
                        HIGH8 | u8::try_from(r1.number() - Register::AH.number()).ok()?
                    }
                    _ => low8(r1)?,
                }
            } else if r1.is_gpr16() {
                u8::try_from(r1.number()).ok()?
            } else {
                return None;
            };
            Uop::MovXR {
                d: gpr(r0, dsz)?,
                s,
                ssz: u8::try_from(ssz).ok()?,
                dsz: u8::try_from(dsz).ok()?,
                signed: m == Mnemonic::Movsx,
            }
        }
        Mnemonic::Movsxd if k0 == OpKind::Register && insn.op0_register().is_gpr64() => {
            let r0 = insn.op0_register();
            match insn.op1_kind() {
                OpKind::Memory if insn.memory_size().size() == 4 => {
                    Uop::MovX { d: gpr(r0, 8)?, m: MemOp::from(insn)?, ssz: 4, dsz: 8, signed: true }
                }
                OpKind::Register if insn.op1_register().is_gpr32() => Uop::MovXR {
                    d: gpr(r0, 8)?,
                    s: u8::try_from(insn.op1_register().number()).ok()?,
                    ssz: 4,
                    dsz: 8,
                    signed: true,
                },
                _ => return None,
            }
        }
        Mnemonic::Test | Mnemonic::Cmp if k0 == OpKind::Register && insn.op0_register().size() == 1 => {
            let r0 = insn.op0_register();
            let d = match r0 {
                Register::AH | Register::CH | Register::DH | Register::BH => {
                    HIGH8 | u8::try_from(r0.number() - Register::AH.number()).ok()?
                }
                _ => low8(r0)?,
            };
            let s = match insn.op1_kind() {
                OpKind::Register => Src::Reg(low8(insn.op1_register())?),
                OpKind::Memory => Src::Mem(MemOp::from(insn)?),
                _ => Src::Imm(insn.immediate(1) & 0xff),
            };
            let op = if m == Mnemonic::Cmp { Op2::Sub } else { Op2::And };
            Uop::Alu { op, d, s, sz: 1, write: false }
        }
        Mnemonic::Movzx | Mnemonic::Movsx if k0 == OpKind::Register && insn.op1_kind() == OpKind::Memory => {
            let r0 = insn.op0_register();
            let dsz = r0.size();
            Uop::MovX {
                d: gpr(r0, dsz)?,
                m: MemOp::from(insn)?,
                ssz: u8::try_from(insn.memory_size().size()).ok()?,
                dsz: u8::try_from(dsz).ok()?,
                signed: m == Mnemonic::Movsx,
            }
        }
        Mnemonic::Inc | Mnemonic::Dec if k0 == OpKind::Memory => Uop::IncDecM {
            m: MemOp::from(insn)?,
            sz: u8::try_from(insn.memory_size().size()).ok()?,
            dec: m == Mnemonic::Dec,
        },
        Mnemonic::Inc | Mnemonic::Dec if k0 == OpKind::Register => {
            let r0 = insn.op0_register();
            let sz = r0.size();
            Uop::IncDec { d: gpr_sized(r0, sz)?, sz: u8::try_from(sz).ok()?, dec: m == Mnemonic::Dec }
        }
        Mnemonic::Shl | Mnemonic::Shr | Mnemonic::Sar | Mnemonic::Rol | Mnemonic::Ror
            if k0 == OpKind::Register && insn.op_count() == 2 && insn.op1_kind() == OpKind::Immediate8 =>
        {
            let r0 = insn.op0_register();
            let sz = r0.size();
            let op = match m {
                Mnemonic::Shl => Op2::Shl,
                Mnemonic::Shr => Op2::Shr,
                Mnemonic::Sar => Op2::Sar,
                Mnemonic::Rol => Op2::Rol,
                _ => Op2::Ror,
            };
            if sz < 4 && matches!(op, Op2::Rol | Op2::Ror) {
                return None;
            }
            Uop::Shift { op, d: gpr_sized(r0, sz)?, c: insn.immediate8(), sz: u8::try_from(sz).ok()? }
        }
        // A prefetch is a hint: it never faults (SDM Vol. 2 PREFETCHh).
        Mnemonic::Nop
        | Mnemonic::Pause
        | Mnemonic::Prefetchnta
        | Mnemonic::Prefetcht0
        | Mnemonic::Prefetcht1
        | Mnemonic::Prefetcht2
        | Mnemonic::Prefetchw
        | Mnemonic::Prefetch => Uop::Nop,
        // RAX = sign-extended EAX: MOVSXD RAX, EAX.
        Mnemonic::Cdqe => Uop::MovXR { d: 0, s: 0, ssz: 4, dsz: 8, signed: true },
        Mnemonic::Div if matches!(insn.code(), iced_x86::Code::Div_rm32 | iced_x86::Code::Div_rm64) => {
            let sz = if insn.code() == iced_x86::Code::Div_rm32 { 4 } else { 8 };
            Uop::Div { s: src(insn, 0, sz)?, sz: u8::try_from(sz).ok()? }
        }
        Mnemonic::Bswap if k0 == OpKind::Register => {
            let r0 = insn.op0_register();
            let sz = r0.size();
            Uop::Bswap { d: gpr(r0, sz)?, sz: u8::try_from(sz).ok()? }
        }
        Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc if insn.op1_kind() == OpKind::Immediate8 => {
            let (s, sz) = if k0 == OpKind::Register {
                let r0 = insn.op0_register();
                let sz = r0.size();
                if sz == 1 {
                    return None;
                }
                (Src::Reg(gpr_sized(r0, sz)?), sz)
            } else {
                (Src::Mem(MemOp::from(insn)?), insn.memory_size().size())
            };
            let op = match m {
                Mnemonic::Bt => Op2::Bt,
                Mnemonic::Bts => Op2::Bts,
                Mnemonic::Btr => Op2::Btr,
                _ => Op2::Btc,
            };
            let bits = u32::try_from(sz * 8).ok()?;
            Uop::BitI { op, s, bit: u8::try_from(insn.immediate8() as u32 % bits).ok()?, sz: u8::try_from(sz).ok()? }
        }
        Mnemonic::Cli => Uop::Cli,
        Mnemonic::Cmpxchg if k0 == OpKind::Memory && insn.op1_kind() == OpKind::Register => {
            let r1 = insn.op1_register();
            let sz = r1.size();
            Uop::CmpxchgM { m: MemOp::from(insn)?, s: gpr(r1, sz)?, sz: u8::try_from(sz).ok()? }
        }
        Mnemonic::Bsf | Mnemonic::Tzcnt if k0 == OpKind::Register => {
            let r0 = insn.op0_register();
            let sz = r0.size();
            Uop::Bsf { d: gpr(r0, sz)?, s: src(insn, 1, sz)?, sz: u8::try_from(sz).ok()? }
        }
        Mnemonic::Add
        | Mnemonic::Or
        | Mnemonic::And
        | Mnemonic::Sub
        | Mnemonic::Xor
        | Mnemonic::Cmp
        | Mnemonic::Test => {
            if k0 != OpKind::Register {
                return None;
            }
            let r0 = insn.op0_register();
            let sz = r0.size();
            let d = gpr_sized(r0, sz)?;
            let s = src(insn, 1, sz)?;
            let (op, write) = match m {
                Mnemonic::Add => (Op2::Add, true),
                Mnemonic::Or => (Op2::Or, true),
                Mnemonic::And => (Op2::And, true),
                Mnemonic::Sub => (Op2::Sub, true),
                Mnemonic::Xor => (Op2::Xor, true),
                Mnemonic::Cmp => (Op2::Sub, false),
                _ => (Op2::And, false),
            };
            Uop::Alu { op, d, s, sz: u8::try_from(sz).ok()?, write }
        }
        Mnemonic::Jo
        | Mnemonic::Jno
        | Mnemonic::Jb
        | Mnemonic::Jae
        | Mnemonic::Je
        | Mnemonic::Jne
        | Mnemonic::Jbe
        | Mnemonic::Ja
        | Mnemonic::Js
        | Mnemonic::Jns
        | Mnemonic::Jp
        | Mnemonic::Jnp
        | Mnemonic::Jl
        | Mnemonic::Jge
        | Mnemonic::Jle
        | Mnemonic::Jg => {
            if k0 != OpKind::NearBranch64 {
                return None;
            }
            Uop::Jcc { cc: insn.condition_code(), target: insn.near_branch_target() }
        }
        Mnemonic::Jmp if k0 == OpKind::NearBranch64 => Uop::Jmp { target: insn.near_branch_target() },
        Mnemonic::Call if k0 == OpKind::NearBranch64 => Uop::Call { target: insn.near_branch_target() },
        Mnemonic::Ret if insn.op_count() == 0 && insn.code() == iced_x86::Code::Retnq => Uop::Ret,
        Mnemonic::Jmp if insn.code() == iced_x86::Code::Jmp_rm64 => Uop::JmpInd { s: src(insn, 0, 8)? },
        Mnemonic::Call if insn.code() == iced_x86::Code::Call_rm64 => Uop::CallInd { s: src(insn, 0, 8)? },
        Mnemonic::Push if k0 == OpKind::Register && insn.op0_register().is_gpr64() => {
            Uop::Push { r: u8::try_from(insn.op0_register().number()).ok()? }
        }
        Mnemonic::Push
            if matches!(k0, OpKind::Immediate8to64 | OpKind::Immediate32to64)
                && insn.stack_pointer_increment() == -8 =>
        {
            Uop::PushI { v: insn.immediate(0) }
        }
        Mnemonic::Pushfq => Uop::Pushf,
        Mnemonic::Pop if k0 == OpKind::Register && insn.op0_register().is_gpr64() => {
            Uop::Pop { r: u8::try_from(insn.op0_register().number()).ok()? }
        }
        _ => return None,
    })
}

#[inline(always)]
fn set(cpu: &mut Cpu, r: u8, v: u64, sz: u8) {
    let g = cpu.gpr_at_mut(usize::from(r));
    *g = match sz {
        // 8- and 16-bit writes keep the rest of the register.
        1 | 2 => (*g & !mask(sz as usize)) | (v & mask(sz as usize)),
        4 => v & 0xffff_ffff,
        _ => v,
    };
}

#[inline(always)]
fn read_src(cpu: &mut Cpu, bus: &mut dyn Bus, s: Src, sz: u8) -> Res<u64> {
    Ok(match s {
        Src::Reg(r) => cpu.gpr_at(usize::from(r)) & mask(sz as usize),
        Src::Imm(v) => v,
        Src::Mem(m) => {
            let la = m.la(cpu);
            let u = cpu.cur_user;
            cpu.read_la(bus, la, sz as usize, u)?
        }
    })
}

impl Uop {
    /// Whether executing this form may store to memory (and so may modify cached code).
    #[inline(always)]
    pub(crate) fn may_store(&self) -> bool {
        matches!(
            self,
            Uop::Generic
                | Uop::Sse(_)
                | Uop::MovM { .. }
                | Uop::AluM { write: true, .. }
                | Uop::IncDecM { .. }
                | Uop::Call { .. }
                | Uop::CallInd { .. }
                | Uop::Push { .. }
                | Uop::PushI { .. }
                | Uop::Pushf
                | Uop::SetccM { .. }
                | Uop::BitI { .. }
                | Uop::CmpxchgM { .. }
        )
    }
}

/// PUSH of a qword in 64-bit mode (flat SS, 64-bit RSP); RSP changes only if the store
/// succeeds.
#[inline(always)]
fn push64(cpu: &mut Cpu, bus: &mut dyn Bus, v: u64) -> Res<()> {
    let sp = cpu.gpr[4].wrapping_sub(8);
    let u = cpu.cur_user;
    cpu.write_la(bus, sp, 8, v, u)?;
    cpu.gpr[4] = sp;
    Ok(())
}

/// [`Uop::BitI`].
#[inline(never)]
fn bit_test_imm(cpu: &mut Cpu, bus: &mut dyn Bus, op: Op2, s: Src, bit: u8, sz: u8) -> Res<()> {
    let (szu, b) = (sz as usize, u64::from(bit));
    match s {
        Src::Reg(d) => {
            let a = cpu.gpr_at(usize::from(d)) & mask(szu);
            let (r, f) = alu::op2(op, szu, a, b, cpu.rflags);
            if op != Op2::Bt {
                set(cpu, d, r, sz);
            }
            cpu.rflags = f;
        }
        Src::Mem(m) => {
            let la = m.la(cpu);
            let u = cpu.cur_user;
            let a = cpu.read_la(bus, la, szu, u)?;
            let (r, f) = alu::op2(op, szu, a, b, cpu.rflags);
            if op != Op2::Bt {
                cpu.write_la(bus, la, szu, r & mask(szu), u)?;
            }
            cpu.rflags = f;
        }
        // Never lowered with an immediate operand.
        Src::Imm(_) => {}
    }
    Ok(())
}

/// [`Uop::CmpxchgM`].
#[inline(never)]
fn cmpxchg_mem(cpu: &mut Cpu, bus: &mut dyn Bus, m: MemOp, s: u8, sz: u8) -> Res<()> {
    let la = m.la(cpu);
    let u = cpu.cur_user;
    let szu = sz as usize;
    let d = cpu.read_la(bus, la, szu, u)?;
    let acc = cpu.gpr[0] & mask(szu);
    let (_, f) = alu::arith(Op2::Sub, szu, acc, d, cpu.rflags);
    if f & crate::cpu::flags::ZF != 0 {
        let v = cpu.gpr_at(usize::from(s)) & mask(szu);
        cpu.write_la(bus, la, szu, v, u)?;
    } else {
        cpu.write_la(bus, la, szu, d, u)?;
        set(cpu, 0, d, sz);
    }
    cpu.rflags = f;
    Ok(())
}

/// [`Uop::Cli`].
#[inline(never)]
fn cli(cpu: &mut Cpu) -> Res<()> {
    // 64-bit mode: protected mode, so only CPL against IOPL decides.
    if u64::from(cpu.cpl()) > (cpu.rflags >> 12) & 3 {
        return Err(Fault::GeneralProtection(0));
    }
    cpu.rflags &= !crate::cpu::flags::IF;
    Ok(())
}

/// Executes a fast form. RIP already holds the next instruction's address.
#[inline(always)]
pub(crate) fn exec(cpu: &mut Cpu, bus: &mut dyn Bus, u: &Uop) -> Res<()> {
    match *u {
        Uop::Generic | Uop::Sse(_) => {}
        Uop::MovR { d, s, sz } => {
            let v = read_src(cpu, bus, s, sz)?;
            set(cpu, d, v, sz);
        }
        Uop::MovM { m, s, sz } => {
            let v = read_src(cpu, bus, s, sz)?;
            let la = m.la(cpu);
            let u = cpu.cur_user;
            cpu.write_la(bus, la, sz as usize, v, u)?;
        }
        Uop::Lea { d, m, sz } => {
            let mut a = m.disp;
            if m.base != NONE {
                a = a.wrapping_add(cpu.gpr_at(usize::from(m.base)));
            }
            if m.index != NONE {
                a = a.wrapping_add(cpu.gpr_at(usize::from(m.index)) << m.scale);
            }
            set(cpu, d, a, sz);
        }
        Uop::Unary { neg, d, sz } => {
            let a = cpu.gpr_at(usize::from(d)) & mask(sz as usize);
            let op = if neg { alu::Op1::Neg } else { alu::Op1::Not };
            let (r, f) = alu::op1(op, sz as usize, a, cpu.rflags);
            cpu.rflags = f;
            set(cpu, d, r & mask(sz as usize), sz);
        }
        Uop::ShiftCl { op, d, sz } => {
            let a = cpu.gpr_at(usize::from(d)) & mask(sz as usize);
            let c = cpu.gpr[1] & 0xff;
            let (r, f) = alu::op2(op, sz as usize, a, c, cpu.rflags);
            cpu.rflags = f;
            set(cpu, d, r, sz);
        }
        Uop::Alu { op, d, s, sz, write } => {
            let b = read_src(cpu, bus, s, sz)?;
            let a = if d & HIGH8 != 0 { cpu.gpr_at(usize::from(d & 3)) >> 8 } else { cpu.gpr_at(usize::from(d)) };
            let a = a & mask(sz as usize);
            let (r, f) = alu::arith(op, sz as usize, a, b, cpu.rflags);
            cpu.rflags = f;
            if write {
                set(cpu, d, r, sz);
            }
        }
        Uop::AluM { op, m, s, sz, write } => {
            let b = read_src(cpu, bus, s, sz)?;
            let la = m.la(cpu);
            let u = cpu.cur_user;
            let a = cpu.read_la(bus, la, sz as usize, u)?;
            let (r, f) = alu::arith(op, sz as usize, a, b, cpu.rflags);
            if write {
                cpu.write_la(bus, la, sz as usize, r & mask(sz as usize), u)?;
            }
            cpu.rflags = f;
        }
        Uop::AluF { op, d, s, sz } => {
            let b = read_src(cpu, bus, s, sz)?;
            let a = cpu.gpr_at(usize::from(d)) & mask(sz as usize);
            let (r, f) = alu::adc_sbb_imul(op, sz as usize, a, b, cpu.rflags);
            cpu.rflags = f;
            set(cpu, d, r, sz);
        }
        Uop::Imul3 { d, s, imm, sz } => {
            let a = read_src(cpu, bus, s, sz)?;
            let (r, f) = alu::adc_sbb_imul(Op2::Imul, sz as usize, a, imm, cpu.rflags);
            cpu.rflags = f;
            set(cpu, d, r, sz);
        }
        Uop::Setcc { cc, d } => {
            let v = u64::from(crate::cpu::cond(cpu, cc));
            let g = cpu.gpr_at_mut(usize::from(d));
            *g = (*g & !0xff) | v;
        }
        Uop::Cmov { cc, d, s, sz } => {
            let v = read_src(cpu, bus, s, sz)?;
            if crate::cpu::cond(cpu, cc) {
                set(cpu, d, v, sz);
            } else {
                let cur = cpu.gpr_at(usize::from(d));
                set(cpu, d, cur, sz);
            }
        }
        Uop::MovXR { d, s, ssz, dsz, signed } => {
            let v = if s & HIGH8 != 0 { cpu.gpr_at(usize::from(s & 3)) >> 8 } else { cpu.gpr_at(usize::from(s)) };
            let v = v & mask(ssz as usize);
            let v = if signed { crate::regs::sext(v, ssz as usize) } else { v };
            set(cpu, d, v & mask(dsz as usize), dsz);
        }
        Uop::MovX { d, m, ssz, dsz, signed } => {
            let la = m.la(cpu);
            let u = cpu.cur_user;
            let v = cpu.read_la(bus, la, ssz as usize, u)?;
            let v = if signed { crate::regs::sext(v, ssz as usize) } else { v };
            set(cpu, d, v & mask(dsz as usize), dsz);
        }
        Uop::Div { s, sz } => {
            let d = read_src(cpu, bus, s, sz)?;
            let m = mask(sz as usize);
            let (lo, hi) = (cpu.gpr[0] & m, cpu.gpr[2] & m);
            let Some((q, r, _)) = alu::div_wide(false, sz as usize, lo, hi, d, 0) else {
                return Err(Fault::DivideError);
            };
            set(cpu, 0, q, sz);
            set(cpu, 2, r, sz);
        }
        Uop::Bswap { d, sz } => {
            let v = cpu.gpr_at(usize::from(d));
            let r = if sz == 8 { v.swap_bytes() } else { u64::from(crate::regs::low32(v).swap_bytes()) };
            set(cpu, d, r, sz);
        }
        Uop::Bsf { d, s, sz } => {
            let b = read_src(cpu, bus, s, sz)?;
            let a = cpu.gpr_at(usize::from(d)) & mask(sz as usize);
            let (r, f) = alu::op2(Op2::Bsf, sz as usize, a, b, cpu.rflags);
            if b != 0 || sz == 4 {
                set(cpu, d, r, sz);
            }
            cpu.rflags = f;
        }
        Uop::IncDec { d, sz, dec } => {
            let a = cpu.gpr_at(usize::from(d)) & mask(sz as usize);
            let op = if dec { alu::Op1::Dec } else { alu::Op1::Inc };
            let (r, f) = alu::op1(op, sz as usize, a, cpu.rflags);
            cpu.rflags = f;
            set(cpu, d, r, sz);
        }
        Uop::IncDecM { m, sz, dec } => {
            let la = m.la(cpu);
            let u = cpu.cur_user;
            let a = cpu.read_la(bus, la, sz as usize, u)?;
            let op = if dec { alu::Op1::Dec } else { alu::Op1::Inc };
            let (r, f) = alu::op1(op, sz as usize, a, cpu.rflags);
            cpu.write_la(bus, la, sz as usize, r & mask(sz as usize), u)?;
            cpu.rflags = f;
        }
        Uop::Shift { op, d, c, sz } => {
            let a = cpu.gpr_at(usize::from(d)) & mask(sz as usize);
            let (r, f) = alu::op2(op, sz as usize, a, u64::from(c), cpu.rflags);
            cpu.rflags = f;
            // A masked count of zero leaves the register (and its upper half) untouched,
            // except that 32-bit forms still zero-extend.
            set(cpu, d, r, sz);
        }
        Uop::Nop => {}
        Uop::Jcc { cc, target } => {
            if crate::cpu::cond(cpu, cc) {
                cpu.rip = target;
            }
        }
        Uop::Jmp { target } => cpu.rip = target,
        Uop::Call { target } => {
            let ret = cpu.rip;
            push64(cpu, bus, ret)?;
            cpu.rip = target;
        }
        Uop::Ret => {
            let u = cpu.cur_user;
            let t = cpu.read_la(bus, cpu.gpr[4], 8, u)?;
            if ((t as i64) << 16 >> 16) as u64 != t {
                return Err(Fault::GeneralProtection(0));
            }
            cpu.gpr[4] = cpu.gpr[4].wrapping_add(8);
            cpu.rip = t;
        }
        Uop::JmpInd { s } => {
            let t = read_src(cpu, bus, s, 8)?;
            if ((t as i64) << 16 >> 16) as u64 != t {
                return Err(Fault::GeneralProtection(0));
            }
            cpu.rip = t;
        }
        Uop::CallInd { s } => {
            // The target is read and checked before the push (SDM Vol. 2 CALL).
            let t = read_src(cpu, bus, s, 8)?;
            if ((t as i64) << 16 >> 16) as u64 != t {
                return Err(Fault::GeneralProtection(0));
            }
            let ret = cpu.rip;
            push64(cpu, bus, ret)?;
            cpu.rip = t;
        }
        Uop::Push { r } => {
            let v = cpu.gpr_at(usize::from(r));
            push64(cpu, bus, v)?;
        }
        Uop::Pop { r } => {
            let u = cpu.cur_user;
            let v = cpu.read_la(bus, cpu.gpr[4], 8, u)?;
            cpu.gpr[4] = cpu.gpr[4].wrapping_add(8);
            *cpu.gpr_at_mut(usize::from(r)) = v;
        }
        Uop::PushI { v } => push64(cpu, bus, v)?,
        Uop::Pushf => {
            let v = cpu.rflags & !(crate::cpu::flags::RF | crate::cpu::flags::VM);
            push64(cpu, bus, v)?;
        }
        // Out of line: the interpreter's loop, into which this match is inlined, compiled
        // to 6 % more host instructions per guest instruction with them inside.
        Uop::BitI { op, s, bit, sz } => bit_test_imm(cpu, bus, op, s, bit, sz)?,
        Uop::CmpxchgM { m, s, sz } => cmpxchg_mem(cpu, bus, m, s, sz)?,
        Uop::Cli => cli(cpu)?,
        Uop::MovSreg { d, s, sz } => {
            let v = cpu.seg.get(usize::from(s)).map_or(0, |g| u64::from(g.selector));
            set(cpu, d, v, sz);
        }
        Uop::SetccM { cc, m } => {
            let v = u64::from(crate::cpu::cond(cpu, cc));
            let u = cpu.cur_user;
            cpu.write_la(bus, m.la(cpu), 1, v, u)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{lower, Sse, Uop};
    use iced_x86::{Decoder, DecoderOptions};

    fn lowered(bytes: &[u8]) -> Uop {
        let insn = Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode();
        lower(&insn, 64)
    }

    #[test]
    fn stack_segment_and_hint_forms_are_lowered_only_in_their_64_bit_shapes() {
        // push -5; push 0x12345678; pushfq; mov eax,ss; mov rcx,ds; prefetcht0 [rax];
        // setne [rbx+8]
        assert!(matches!(lowered(&[0x6a, 0xfb]), Uop::PushI { v: 0xffff_ffff_ffff_fffb }));
        assert!(matches!(lowered(&[0x68, 0x78, 0x56, 0x34, 0x12]), Uop::PushI { v: 0x1234_5678 }));
        assert!(matches!(lowered(&[0x9c]), Uop::Pushf));
        assert!(matches!(lowered(&[0x8c, 0xd0]), Uop::MovSreg { d: 0, s: 2, sz: 4 }));
        assert!(matches!(lowered(&[0x48, 0x8c, 0xd9]), Uop::MovSreg { d: 1, s: 3, sz: 8 }));
        assert!(matches!(lowered(&[0x0f, 0x18, 0x08]), Uop::Nop));
        assert!(matches!(lowered(&[0x0f, 0x95, 0x43, 0x08]), Uop::SetccM { .. }));
        // push word 5 (16-bit operand size), pushf (16-bit), mov ax,ss and mov ss,ax: the
        // interpreter's.
        assert!(matches!(lowered(&[0x66, 0x6a, 0x05]), Uop::Generic));
        assert!(matches!(lowered(&[0x66, 0x9c]), Uop::Generic));
        assert!(matches!(lowered(&[0x66, 0x8c, 0xd0]), Uop::Generic));
        assert!(matches!(lowered(&[0x8e, 0xd0]), Uop::Generic));
    }

    #[test]
    fn bit_tests_by_an_immediate_cli_and_cmpxchg_are_lowered() {
        use super::{MemOp, Src};
        use crate::alu::Op2;
        // bt rax,3; btr qword [rdi+8],70 (bit 70 mod 64); bts ax,17 (bit 17 mod 16); cli
        assert!(matches!(
            lowered(&[0x48, 0x0f, 0xba, 0xe0, 0x03]),
            Uop::BitI { op: Op2::Bt, s: Src::Reg(0), bit: 3, sz: 8 }
        ));
        assert!(matches!(
            lowered(&[0x48, 0x0f, 0xba, 0x77, 0x08, 0x46]),
            Uop::BitI { op: Op2::Btr, s: Src::Mem(MemOp { base: 7, disp: 8, .. }), bit: 6, sz: 8 }
        ));
        assert!(matches!(
            lowered(&[0x66, 0x0f, 0xba, 0xe8, 0x11]),
            Uop::BitI { op: Op2::Bts, s: Src::Reg(0), bit: 1, sz: 2 }
        ));
        assert!(matches!(lowered(&[0xfa]), Uop::Cli));
        // cmpxchg [rdi],ecx; cmpxchg [rdi+8],rcx; lock cmpxchg [rdi],ecx and cmpxchg
        // [rdi],cx: the interpreter's (atomic; 16-bit).
        assert!(matches!(lowered(&[0x0f, 0xb1, 0x0f]), Uop::CmpxchgM { s: 1, sz: 4, .. }));
        assert!(matches!(lowered(&[0x48, 0x0f, 0xb1, 0x4f, 0x08]), Uop::CmpxchgM { s: 1, sz: 8, .. }));
        assert!(matches!(lowered(&[0xf0, 0x0f, 0xb1, 0x0f]), Uop::Generic));
        assert!(matches!(lowered(&[0x66, 0x0f, 0xb1, 0x0f]), Uop::Generic));
        // lock btr qword [rdi],1 (atomic) and bt rax,rcx (a register bit offset): the
        // interpreter's.
        assert!(matches!(lowered(&[0xf0, 0x48, 0x0f, 0xba, 0x37, 0x01]), Uop::Generic));
        assert!(matches!(lowered(&[0x48, 0x0f, 0xa3, 0xc8]), Uop::Generic));
    }

    #[test]
    fn sse_forms_with_mandatory_prefixes_are_lowered() {
        // movsd xmm1,[rax]; movss [rdi+8],xmm2; addsd xmm0,xmm1; sqrtsd xmm3,xmm3;
        // cvtsi2sd xmm0,rax; movq xmm0,rax; movq rax,xmm0; ucomisd xmm0,xmm1;
        // movapd xmm1,xmm2; pxor xmm0,xmm0; movdqu xmm0,[rsi]; paddd xmm0,xmm1
        let cases: &[(&[u8], &str)] = &[
            (&[0xf2, 0x0f, 0x10, 0x08], "LoadZ"),
            (&[0xf3, 0x0f, 0x11, 0x57, 0x08], "Store"),
            (&[0xf2, 0x0f, 0x58, 0xc1], "Fp"),
            (&[0xf2, 0x0f, 0x51, 0xdb], "Fp"),
            (&[0xf2, 0x48, 0x0f, 0x2a, 0xc0], "CvtI2F"),
            (&[0x66, 0x48, 0x0f, 0x6e, 0xc0], "FromGpr"),
            (&[0x66, 0x48, 0x0f, 0x7e, 0xc0], "ToGpr"),
            (&[0x66, 0x0f, 0x2e, 0xc1], "Ucomi"),
            (&[0x66, 0x0f, 0x28, 0xca], "Mov"),
            (&[0x66, 0x0f, 0xef, 0xc0], "Vec"),
            (&[0xf3, 0x0f, 0x6f, 0x06], "Mov"),
            (&[0x66, 0x0f, 0xfe, 0xc1], "Vec"),
            // pshufb xmm0,xmm1; palignr xmm0,xmm1,4; psrld xmm2,7; pshufd xmm0,xmm1,0x1b;
            // pmovmskb eax,xmm0; psrldq xmm3,8
            (&[0x66, 0x0f, 0x38, 0x00, 0xc1], "Vec"),
            (&[0x66, 0x0f, 0x3a, 0x0f, 0xc1, 0x04], "Palignr"),
            (&[0x66, 0x0f, 0x72, 0xd2, 0x07], "ShiftImm"),
            (&[0x66, 0x0f, 0x70, 0xc1, 0x1b], "Pshufd"),
            (&[0x66, 0x0f, 0xd7, 0xc0], "Pmovmskb"),
            (&[0x66, 0x0f, 0x73, 0xdb, 0x08], "ByteShift"),
        ];
        // aesenc xmm0,xmm1 (where the host has AES-NI)
        if crate::cpuid::has(crate::cpuid::Ext::Aes) {
            assert!(matches!(lowered(&[0x66, 0x0f, 0x38, 0xdc, 0xc1]), Uop::Sse(Sse::Aes { kind: 0, d: 0, .. })));
        } else {
            eprintln!("aesenc lowering: skipped: the host has no AES-NI (the CPU model then has none)");
        }
        for (bytes, want) in cases {
            let u = lowered(bytes);
            let got = match u {
                Uop::Sse(s) => match s {
                    Sse::Mov { .. } => "Mov",
                    Sse::Store { .. } => "Store",
                    Sse::LoadZ { .. } => "LoadZ",
                    Sse::Merge { .. } => "Merge",
                    Sse::FromGpr { .. } => "FromGpr",
                    Sse::ToGpr { .. } => "ToGpr",
                    Sse::Fp { .. } => "Fp",
                    Sse::Vec { .. } => "Vec",
                    Sse::Ucomi { .. } => "Ucomi",
                    Sse::CvtI2F { .. } => "CvtI2F",
                    Sse::ShiftImm { .. } => "ShiftImm",
                    Sse::ByteShift { .. } => "ByteShift",
                    Sse::Pshufd { .. } => "Pshufd",
                    Sse::Palignr { .. } => "Palignr",
                    Sse::Pmovmskb { .. } => "Pmovmskb",
                    Sse::Aes { .. } => "Aes",
                },
                _ => "not lowered",
            };
            assert_eq!(got, *want, "{bytes:02x?}: {u:?}");
        }
        // The string MOVSD (A5) is not an SSE form.
        assert!(matches!(lowered(&[0xa5]), Uop::Generic));
    }
}
