//! SSE/SSE2 instructions on XMM registers, and the MMX instructions on MM registers
//! (Intel SDM Vol. 1 ch. 9-11, Vol. 2 instruction pages). The later extensions (SSE3 to
//! SSE4.2, AES-NI, PCLMULQDQ) are in the child module `ext`, on the same machinery.
//!
//! Arithmetic is done by the host CPU, which is x86-64 and therefore has SSE2: each guest
//! operation that has a register-register form is replayed on the host's XMM0/XMM1 in
//! inline assembly. That makes every result bit-exact, including NaN propagation, the
//! integer-indefinite value of failed conversions and the MXCSR exception flags.
//!
//! Floating-point operations run under the guest's MXCSR (rounding control, DAZ, FTZ) with
//! all host exceptions masked; the exception flags the host raised are merged into the
//! guest's MXCSR afterwards, and if one of them is unmasked in the guest, the instruction
//! raises #XM (or #UD when CR4.OSXMMEXCPT is clear) without writing its destination. The
//! host's own MXCSR is saved and restored around every such operation. Approximation: the
//! flags reported are those of a fully masked run, so for an unmasked exception the sticky
//! flags may include flags real hardware would not have set (e.g. a precision flag after
//! an unmasked invalid operation in another lane).
//!
//! MMX operations are replayed with the equivalent SSE2 instruction on the low 64 bits of
//! an XMM register (pack and unpack-high forms rearrange operands so the lanes line up); the
//! MM registers live in the mantissas of the x87 registers as on real hardware, and every
//! MMX instruction but EMMS sets TOP to 0 and tags all x87 registers valid.

use crate::cpu::{ctl, flags::ARITH, Cpu};
use crate::fpstate::{check_pending, MXCSR_MASK};
use crate::regs::{low32, low64, low8};
use crate::{Bus, Fault, Res, SRes};
use iced_x86::{Code, EncodingKind, Instruction, Mnemonic, OpKind, Register};
use std::arch::asm;

mod ext;
pub(crate) use ext::jit_aes;

/// CR4.OSXMMEXCPT: the OS handles #XM.
const CR4_OSXMMEXCPT: u64 = 1 << 10;

// ---------------------------------------------------------------------------------------
// Host replay engines
// ---------------------------------------------------------------------------------------

/// Operand block shared with the host replay code (offsets are used by the assembly).
#[repr(C, align(16))]
struct Io {
    /// Destination (XMM0) in, result out. Offset 0.
    a: u128,
    /// Source (XMM1). Offset 16.
    b: u128,
    /// MXCSR to run under; exception flags out. Offset 32.
    csr: u32,
    /// The host's MXCSR while the operation runs. Offset 36.
    host_csr: u32,
    /// RFLAGS after the operation. Offset 40.
    fl: u64,
}

const _: () = {
    assert!(std::mem::offset_of!(Io, b) == 16);
    assert!(std::mem::offset_of!(Io, csr) == 32);
    assert!(std::mem::offset_of!(Io, host_csr) == 36);
    assert!(std::mem::offset_of!(Io, fl) == 40);
};

/// Integer (MXCSR-independent) operations replayed as `op xmm0, xmm1`.
macro_rules! host_int_ops {
    ($($v:ident = $t:literal),* $(,)?) => {
        /// Host-replayed integer/logic operation.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum H { $($v),* }

        /// Runs `op` with XMM0 = `a`, XMM1 = `b`; returns XMM0.
        fn host_int(op: H, a: u128, b: u128) -> u128 {
            let mut io = Io { a, b, csr: 0, host_csr: 0, fl: 0 };
            let p: *mut Io = &mut io;
            match op {
                $(H::$v => {
                    // SAFETY: `p` points to a live, 16-byte aligned `Io`; the code only
                    // reads and writes its first 32 bytes and clobbers XMM0/XMM1, which
                    // are declared. SSE2 is part of the x86-64 baseline.
                    unsafe {
                        asm!(
                            "movdqa xmm0, [{p}]",
                            "movdqa xmm1, [{p} + 16]",
                            $t,
                            "movdqa [{p}], xmm0",
                            p = in(reg) p,
                            out("xmm0") _,
                            out("xmm1") _,
                            options(nostack, preserves_flags),
                        )
                    }
                })*
            }
            io.a
        }
    };
}

host_int_ops! {
    Paddb = "paddb xmm0, xmm1", Paddw = "paddw xmm0, xmm1", Paddd = "paddd xmm0, xmm1",
    Paddq = "paddq xmm0, xmm1", Paddsb = "paddsb xmm0, xmm1", Paddsw = "paddsw xmm0, xmm1",
    Paddusb = "paddusb xmm0, xmm1", Paddusw = "paddusw xmm0, xmm1",
    Psubb = "psubb xmm0, xmm1", Psubw = "psubw xmm0, xmm1", Psubd = "psubd xmm0, xmm1",
    Psubq = "psubq xmm0, xmm1", Psubsb = "psubsb xmm0, xmm1", Psubsw = "psubsw xmm0, xmm1",
    Psubusb = "psubusb xmm0, xmm1", Psubusw = "psubusw xmm0, xmm1",
    Pmullw = "pmullw xmm0, xmm1", Pmulhw = "pmulhw xmm0, xmm1", Pmulhuw = "pmulhuw xmm0, xmm1",
    Pmuludq = "pmuludq xmm0, xmm1", Pmaddwd = "pmaddwd xmm0, xmm1",
    Pavgb = "pavgb xmm0, xmm1", Pavgw = "pavgw xmm0, xmm1", Psadbw = "psadbw xmm0, xmm1",
    Pminub = "pminub xmm0, xmm1", Pmaxub = "pmaxub xmm0, xmm1",
    Pminsw = "pminsw xmm0, xmm1", Pmaxsw = "pmaxsw xmm0, xmm1",
    Pcmpeqb = "pcmpeqb xmm0, xmm1", Pcmpeqw = "pcmpeqw xmm0, xmm1", Pcmpeqd = "pcmpeqd xmm0, xmm1",
    Pcmpgtb = "pcmpgtb xmm0, xmm1", Pcmpgtw = "pcmpgtw xmm0, xmm1", Pcmpgtd = "pcmpgtd xmm0, xmm1",
    Pand = "pand xmm0, xmm1", Pandn = "pandn xmm0, xmm1", Por = "por xmm0, xmm1", Pxor = "pxor xmm0, xmm1",
    Andps = "andps xmm0, xmm1", Andnps = "andnps xmm0, xmm1", Orps = "orps xmm0, xmm1",
    Xorps = "xorps xmm0, xmm1", Andpd = "andpd xmm0, xmm1", Andnpd = "andnpd xmm0, xmm1",
    Orpd = "orpd xmm0, xmm1", Xorpd = "xorpd xmm0, xmm1",
    Punpcklbw = "punpcklbw xmm0, xmm1", Punpcklwd = "punpcklwd xmm0, xmm1",
    Punpckldq = "punpckldq xmm0, xmm1", Punpcklqdq = "punpcklqdq xmm0, xmm1",
    Punpckhbw = "punpckhbw xmm0, xmm1", Punpckhwd = "punpckhwd xmm0, xmm1",
    Punpckhdq = "punpckhdq xmm0, xmm1", Punpckhqdq = "punpckhqdq xmm0, xmm1",
    Unpcklps = "unpcklps xmm0, xmm1", Unpckhps = "unpckhps xmm0, xmm1",
    Unpcklpd = "unpcklpd xmm0, xmm1", Unpckhpd = "unpckhpd xmm0, xmm1",
    Packsswb = "packsswb xmm0, xmm1", Packuswb = "packuswb xmm0, xmm1", Packssdw = "packssdw xmm0, xmm1",
    Psllw = "psllw xmm0, xmm1", Pslld = "pslld xmm0, xmm1", Psllq = "psllq xmm0, xmm1",
    Psrlw = "psrlw xmm0, xmm1", Psrld = "psrld xmm0, xmm1", Psrlq = "psrlq xmm0, xmm1",
    Psraw = "psraw xmm0, xmm1", Psrad = "psrad xmm0, xmm1",
}

/// Floating-point operations replayed under a given MXCSR; `{g}` is a general register
/// operand (source of CVTSI2SS, destination of CVTSS2SI).
macro_rules! host_fp_ops {
    ($($v:ident = $t:literal),* $(,)?) => {
        /// Host-replayed floating-point operation.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[allow(clippy::upper_case_acronyms)]
        enum F { $($v),* }

        /// Runs `op` with XMM0 = `io.a`, XMM1 = `io.b`, the general register = `g`, under
        /// MXCSR `io.csr`. Returns the general register; `io.a` gets XMM0, `io.csr` the
        /// resulting MXCSR and `io.fl` RFLAGS.
        fn host_fp(op: F, io: &mut Io, g: u64) -> u64 {
            let p: *mut Io = io;
            let mut g = g;
            match op {
                $(F::$v => {
                    // SAFETY: `p` points to a live, 16-byte aligned `Io` that the code reads
                    // and writes within its 48 bytes. The host MXCSR is saved first and
                    // restored last; the MXCSR loaded in between has every exception masked
                    // and no reserved bit set (the guest's is validated on load), so the
                    // operation cannot trap. XMM0/XMM1 are declared clobbered; PUSHFQ/POP
                    // use the stack (no `nostack`).
                    unsafe {
                        asm!(
                            "stmxcsr [{p} + 36]",
                            "ldmxcsr [{p} + 32]",
                            "movdqa xmm0, [{p}]",
                            "movdqa xmm1, [{p} + 16]",
                            $t,
                            "pushfq",
                            "pop qword ptr [{p} + 40]",
                            "movdqa [{p}], xmm0",
                            "stmxcsr [{p} + 32]",
                            "ldmxcsr [{p} + 36]",
                            p = in(reg) p,
                            g = inout(reg) g,
                            out("xmm0") _,
                            out("xmm1") _,
                        )
                    }
                })*
            }
            g
        }
    };
}

host_fp_ops! {
    Addps = "addps xmm0, xmm1 /* {g} */", Addss = "addss xmm0, xmm1 /* {g} */",
    Addpd = "addpd xmm0, xmm1 /* {g} */", Addsd = "addsd xmm0, xmm1 /* {g} */",
    Subps = "subps xmm0, xmm1 /* {g} */", Subss = "subss xmm0, xmm1 /* {g} */",
    Subpd = "subpd xmm0, xmm1 /* {g} */", Subsd = "subsd xmm0, xmm1 /* {g} */",
    Mulps = "mulps xmm0, xmm1 /* {g} */", Mulss = "mulss xmm0, xmm1 /* {g} */",
    Mulpd = "mulpd xmm0, xmm1 /* {g} */", Mulsd = "mulsd xmm0, xmm1 /* {g} */",
    Divps = "divps xmm0, xmm1 /* {g} */", Divss = "divss xmm0, xmm1 /* {g} */",
    Divpd = "divpd xmm0, xmm1 /* {g} */", Divsd = "divsd xmm0, xmm1 /* {g} */",
    Minps = "minps xmm0, xmm1 /* {g} */", Minss = "minss xmm0, xmm1 /* {g} */",
    Minpd = "minpd xmm0, xmm1 /* {g} */", Minsd = "minsd xmm0, xmm1 /* {g} */",
    Maxps = "maxps xmm0, xmm1 /* {g} */", Maxss = "maxss xmm0, xmm1 /* {g} */",
    Maxpd = "maxpd xmm0, xmm1 /* {g} */", Maxsd = "maxsd xmm0, xmm1 /* {g} */",
    Sqrtps = "sqrtps xmm0, xmm1 /* {g} */", Sqrtss = "sqrtss xmm0, xmm1 /* {g} */",
    Sqrtpd = "sqrtpd xmm0, xmm1 /* {g} */", Sqrtsd = "sqrtsd xmm0, xmm1 /* {g} */",
    Rcpps = "rcpps xmm0, xmm1 /* {g} */", Rcpss = "rcpss xmm0, xmm1 /* {g} */",
    Rsqrtps = "rsqrtps xmm0, xmm1 /* {g} */", Rsqrtss = "rsqrtss xmm0, xmm1 /* {g} */",
    Cvtss2sd = "cvtss2sd xmm0, xmm1 /* {g} */", Cvtsd2ss = "cvtsd2ss xmm0, xmm1 /* {g} */",
    Cvtdq2ps = "cvtdq2ps xmm0, xmm1 /* {g} */", Cvtps2dq = "cvtps2dq xmm0, xmm1 /* {g} */",
    Cvttps2dq = "cvttps2dq xmm0, xmm1 /* {g} */", Cvtdq2pd = "cvtdq2pd xmm0, xmm1 /* {g} */",
    Cvtpd2dq = "cvtpd2dq xmm0, xmm1 /* {g} */", Cvttpd2dq = "cvttpd2dq xmm0, xmm1 /* {g} */",
    Cvtps2pd = "cvtps2pd xmm0, xmm1 /* {g} */", Cvtpd2ps = "cvtpd2ps xmm0, xmm1 /* {g} */",
    Comiss = "comiss xmm0, xmm1 /* {g} */", Ucomiss = "ucomiss xmm0, xmm1 /* {g} */",
    Comisd = "comisd xmm0, xmm1 /* {g} */", Ucomisd = "ucomisd xmm0, xmm1 /* {g} */",
    Cvtsi2ss32 = "cvtsi2ss xmm0, {g:e}", Cvtsi2ss64 = "cvtsi2ss xmm0, {g}",
    Cvtsi2sd32 = "cvtsi2sd xmm0, {g:e}", Cvtsi2sd64 = "cvtsi2sd xmm0, {g}",
    Cvtss2si32 = "cvtss2si {g:e}, xmm1", Cvtss2si64 = "cvtss2si {g}, xmm1",
    Cvttss2si32 = "cvttss2si {g:e}, xmm1", Cvttss2si64 = "cvttss2si {g}, xmm1",
    Cvtsd2si32 = "cvtsd2si {g:e}, xmm1", Cvtsd2si64 = "cvtsd2si {g}, xmm1",
    Cvttsd2si32 = "cvttsd2si {g:e}, xmm1", Cvttsd2si64 = "cvttsd2si {g}, xmm1",
    Cmpps0 = "cmpps xmm0, xmm1, 0 /* {g} */", Cmpps1 = "cmpps xmm0, xmm1, 1 /* {g} */",
    Cmpps2 = "cmpps xmm0, xmm1, 2 /* {g} */", Cmpps3 = "cmpps xmm0, xmm1, 3 /* {g} */",
    Cmpps4 = "cmpps xmm0, xmm1, 4 /* {g} */", Cmpps5 = "cmpps xmm0, xmm1, 5 /* {g} */",
    Cmpps6 = "cmpps xmm0, xmm1, 6 /* {g} */", Cmpps7 = "cmpps xmm0, xmm1, 7 /* {g} */",
    Cmpss0 = "cmpss xmm0, xmm1, 0 /* {g} */", Cmpss1 = "cmpss xmm0, xmm1, 1 /* {g} */",
    Cmpss2 = "cmpss xmm0, xmm1, 2 /* {g} */", Cmpss3 = "cmpss xmm0, xmm1, 3 /* {g} */",
    Cmpss4 = "cmpss xmm0, xmm1, 4 /* {g} */", Cmpss5 = "cmpss xmm0, xmm1, 5 /* {g} */",
    Cmpss6 = "cmpss xmm0, xmm1, 6 /* {g} */", Cmpss7 = "cmpss xmm0, xmm1, 7 /* {g} */",
    Cmppd0 = "cmppd xmm0, xmm1, 0 /* {g} */", Cmppd1 = "cmppd xmm0, xmm1, 1 /* {g} */",
    Cmppd2 = "cmppd xmm0, xmm1, 2 /* {g} */", Cmppd3 = "cmppd xmm0, xmm1, 3 /* {g} */",
    Cmppd4 = "cmppd xmm0, xmm1, 4 /* {g} */", Cmppd5 = "cmppd xmm0, xmm1, 5 /* {g} */",
    Cmppd6 = "cmppd xmm0, xmm1, 6 /* {g} */", Cmppd7 = "cmppd xmm0, xmm1, 7 /* {g} */",
    Cmpsd0 = "cmpsd xmm0, xmm1, 0 /* {g} */", Cmpsd1 = "cmpsd xmm0, xmm1, 1 /* {g} */",
    Cmpsd2 = "cmpsd xmm0, xmm1, 2 /* {g} */", Cmpsd3 = "cmpsd xmm0, xmm1, 3 /* {g} */",
    Cmpsd4 = "cmpsd xmm0, xmm1, 4 /* {g} */", Cmpsd5 = "cmpsd xmm0, xmm1, 5 /* {g} */",
    Cmpsd6 = "cmpsd xmm0, xmm1, 6 /* {g} */", Cmpsd7 = "cmpsd xmm0, xmm1, 7 /* {g} */",
}

const CMPPS: [F; 8] = [F::Cmpps0, F::Cmpps1, F::Cmpps2, F::Cmpps3, F::Cmpps4, F::Cmpps5, F::Cmpps6, F::Cmpps7];
const CMPSS: [F; 8] = [F::Cmpss0, F::Cmpss1, F::Cmpss2, F::Cmpss3, F::Cmpss4, F::Cmpss5, F::Cmpss6, F::Cmpss7];
const CMPPD: [F; 8] = [F::Cmppd0, F::Cmppd1, F::Cmppd2, F::Cmppd3, F::Cmppd4, F::Cmppd5, F::Cmppd6, F::Cmppd7];
const CMPSD: [F; 8] = [F::Cmpsd0, F::Cmpsd1, F::Cmpsd2, F::Cmpsd3, F::Cmpsd4, F::Cmpsd5, F::Cmpsd6, F::Cmpsd7];

/// The fault for an unmasked SIMD floating-point exception (SDM Vol. 3 §6.15, #XM).
fn simd_fault(cpu: &Cpu) -> Fault {
    if cpu.cr4 & CR4_OSXMMEXCPT != 0 {
        Fault::SimdError
    } else {
        Fault::InvalidOpcode
    }
}

/// Runs a floating-point operation under the guest's MXCSR. Returns (XMM0, general
/// register, RFLAGS), or the #XM/#UD fault if an unmasked exception occurred (the guest's
/// MXCSR flags are updated either way).
fn fp(cpu: &mut Cpu, op: F, a: u128, b: u128, g: u64) -> Res<(u128, u64, u64)> {
    let mut g = g;
    let io = fp_run(cpu, a, b, |io| g = host_fp(op, io, g))?;
    Ok((io.a, g, io.fl))
}

/// Runs `host` (a replay that loads `io.csr` as the host MXCSR) with XMM0 = `a`, XMM1 =
/// `b` under the guest's rounding, DAZ and FTZ with every exception masked, merges the
/// exception flags it raised into the guest's MXCSR, and returns the `Io` afterwards, or the
/// #XM/#UD fault if one of those flags is unmasked in the guest.
fn fp_run(cpu: &mut Cpu, a: u128, b: u128, host: impl FnOnce(&mut Io)) -> Res<Io> {
    let guest = cpu.fpu.mxcsr;
    // Clear the flags so only this operation's show, and mask every exception.
    let mut io = Io { a, b, csr: (guest & MXCSR_MASK & !0x3f) | 0x1f80, host_csr: 0, fl: 2 };
    host(&mut io);
    let raised = io.csr & 0x3f;
    cpu.fpu.mxcsr |= raised;
    if raised & !(guest >> 7) & 0x3f != 0 {
        return Err(simd_fault(cpu));
    }
    Ok(io)
}

// ---------------------------------------------------------------------------------------
// Register and memory access
// ---------------------------------------------------------------------------------------

/// An operand of a SIMD instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum V {
    /// XMM register.
    X(usize),
    /// MMX register.
    M(usize),
    /// General-purpose register.
    G(Register),
    /// Memory at a linear address.
    Mem(u64),
    /// Immediate.
    Imm(u64),
}

fn opnd(cpu: &Cpu, insn: &Instruction, i: u32) -> V {
    match insn.op_kind(i) {
        OpKind::Register => {
            let r = insn.op_register(i);
            if r.is_xmm() {
                V::X(r.number())
            } else if r.is_mm() {
                V::M(r.number())
            } else {
                V::G(r)
            }
        }
        OpKind::Memory => V::Mem(cpu.mem_la(insn)),
        OpKind::Immediate8
        | OpKind::Immediate8_2nd
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => V::Imm(insn.immediate(i)),
        // Implicit operands (MASKMOVDQU's DS:rDI) are handled by their instruction.
        _ => V::Imm(0),
    }
}

/// XMM register `i` (0..=15: an iced-x86 XMM register number).
#[inline(always)]
#[allow(clippy::indexing_slicing)] // `i & 15` < 16 = xmm.len()
fn xmm(cpu: &Cpu, i: usize) -> u128 {
    cpu.fpu.xmm[i & 15]
}

/// XMM register `i` (0..=15), for writing.
#[inline(always)]
#[allow(clippy::indexing_slicing)] // `i & 15` < 16 = xmm.len()
fn xmm_mut(cpu: &mut Cpu, i: usize) -> &mut u128 {
    &mut cpu.fpu.xmm[i & 15]
}

/// The 16-byte slot of physical x87 register `i` (0..=7: an MMX register number).
#[inline(always)]
#[allow(clippy::indexing_slicing)] // `i & 7` < 8 = st.len()
fn st_slot(cpu: &mut Cpu, i: usize) -> &mut [u8; 16] {
    &mut cpu.fpu.st[i & 7]
}

/// Entry `k & 7` of an 8-entry CMPPS/CMPSS predicate table (the predicate is imm8 bits 0-2).
#[allow(clippy::indexing_slicing)] // `k & 7` < 8 = table.len()
fn cmp_predicate(table: &[F; 8], k: u8) -> F {
    table[usize::from(k & 7)]
}

/// MMX register `i` (the mantissa of physical x87 register `i`).
#[allow(clippy::indexing_slicing)] // `i & 7` < 8 = st.len()
fn mm_get(cpu: &Cpu, i: usize) -> u64 {
    let [b0, b1, b2, b3, b4, b5, b6, b7, ..] = cpu.fpu.st[i & 7];
    u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7])
}

/// Writes MMX register `i`; the exponent and sign of the x87 register become all ones.
fn mm_set(cpu: &mut Cpu, i: usize, v: u64) {
    let s = st_slot(cpu, i);
    for (d, b) in s.iter_mut().zip(v.to_le_bytes()) {
        *d = b;
    }
    s[8] = 0xff;
    s[9] = 0xff;
}

/// The x87 state change of every MMX instruction but EMMS: TOP = 0, all registers valid.
fn mmx_enter(cpu: &mut Cpu) {
    cpu.fpu.fsw &= !(7 << 11);
    cpu.fpu.ftw = 0xff;
}

/// Linear address `off` bytes after `la`, wrapped to 32 bits outside 64-bit mode.
fn la_add(cpu: &Cpu, la: u64, off: u64) -> u64 {
    let a = la.wrapping_add(off);
    if cpu.in_64bit_mode() {
        a
    } else {
        a & 0xffff_ffff
    }
}

/// Reads `size` bytes (1, 2, 4, 8 or 16) of memory. A 16-byte access with `aligned` set
/// must be 16-byte aligned (#GP(0) otherwise), as legacy SSE requires.
fn read_mem(cpu: &mut Cpu, bus: &mut dyn Bus, la: u64, size: usize, aligned: bool) -> Res<u128> {
    if size == 16 {
        if aligned && la & 15 != 0 {
            return Err(Fault::GeneralProtection(0));
        }
        let lo = cpu.rmem(bus, la, 8)?;
        let hi = cpu.rmem(bus, la_add(cpu, la, 8), 8)?;
        return Ok(u128::from(lo) | (u128::from(hi) << 64));
    }
    Ok(u128::from(cpu.rmem(bus, la, size.clamp(1, 8))?))
}

/// Writes `size` bytes (1, 2, 4, 8 or 16) of memory; see [`read_mem`] for `aligned`.
fn write_mem(cpu: &mut Cpu, bus: &mut dyn Bus, la: u64, size: usize, v: u128, aligned: bool) -> Res<()> {
    if size == 16 {
        if aligned && la & 15 != 0 {
            return Err(Fault::GeneralProtection(0));
        }
        // Both halves or neither.
        cpu.probe_write(la, 16, cpu.user())?;
        cpu.wmem(bus, la, 8, low64(v))?;
        let hi = la_add(cpu, la, 8);
        return cpu.wmem(bus, hi, 8, (v >> 64) as u64);
    }
    cpu.wmem(bus, la, size.clamp(1, 8), low64(v) & crate::regs::mask(size))
}

/// Reads a source operand. Memory reads the instruction's memory-operand size.
fn read(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction, v: V, aligned: bool) -> Res<u128> {
    Ok(match v {
        V::X(i) => xmm(cpu, i),
        V::M(i) => u128::from(mm_get(cpu, i)),
        V::G(r) => u128::from(cpu.get_reg(r)),
        V::Mem(la) => read_mem(cpu, bus, la, insn.memory_size().size(), aligned)?,
        V::Imm(x) => u128::from(x),
    })
}

/// Writes a destination register operand (XMM: all 128 bits; MM: the low 64).
fn write_reg(cpu: &mut Cpu, v: V, val: u128) {
    match v {
        V::X(i) => *xmm_mut(cpu, i) = val,
        V::M(i) => mm_set(cpu, i, low64(val)),
        V::G(r) => cpu.set_reg(r, low64(val)),
        V::Mem(_) | V::Imm(_) => {}
    }
}

// ---------------------------------------------------------------------------------------
// Software helpers for the immediate-controlled shuffles
// ---------------------------------------------------------------------------------------

fn lane(v: u128, bits: u32, i: u32) -> u128 {
    (v >> (bits * i)) & ((1u128 << bits) - 1)
}

fn pshufd(src: u128, imm: u8) -> u128 {
    (0..4).fold(0, |r, i| r | (lane(src, 32, u32::from(imm >> (2 * i)) & 3) << (32 * i)))
}

/// PSHUFLW on the low four words; the high 64 bits come from `src` unchanged.
fn pshuflw(src: u128, imm: u8) -> u128 {
    let lo = (0..4).fold(0, |r, i| r | (lane(src, 16, u32::from(imm >> (2 * i)) & 3) << (16 * i)));
    (src & !(u128::from(u64::MAX))) | lo
}

fn pshufhw(src: u128, imm: u8) -> u128 {
    let hi = (0..4).fold(0, |r, i| r | (lane(src, 16, 4 + (u32::from(imm >> (2 * i)) & 3)) << (16 * (4 + i))));
    (src & u128::from(u64::MAX)) | hi
}

fn shufps(dst: u128, src: u128, imm: u8) -> u128 {
    let sel = |i: u32| u32::from(imm >> (2 * i)) & 3;
    lane(dst, 32, sel(0))
        | (lane(dst, 32, sel(1)) << 32)
        | (lane(src, 32, sel(2)) << 64)
        | (lane(src, 32, sel(3)) << 96)
}

fn shufpd(dst: u128, src: u128, imm: u8) -> u128 {
    lane(dst, 64, u32::from(imm) & 1) | (lane(src, 64, u32::from(imm >> 1) & 1) << 64)
}

/// MOVMSKPS/MOVMSKPD/PMOVMSKB: the sign bit of each `bits`-wide lane of the low `n` lanes.
fn movmsk(v: u128, bits: u32, n: u32) -> u64 {
    (0..n).fold(0, |r, i| r | ((((v >> (bits * i + bits - 1)) & 1) as u64) << i))
}

// ---------------------------------------------------------------------------------------
// Classification
// ---------------------------------------------------------------------------------------

/// What an instruction does, decided before any state is touched (so that unimplemented
/// instructions fall through to #UD without an #NM or #MF taking precedence).
#[derive(Clone, Copy, Debug)]
enum Op {
    /// 128-bit moves; `aligned` for MOVAPS/MOVDQA/MOVNTDQ-style alignment checks.
    Mov128 {
        aligned: bool,
    },
    /// MOVD/MOVQ in all their forms (XMM, MMX, general registers, memory).
    MovDQ,
    /// MOVSS (4) / MOVSD (8).
    MovScalar(usize),
    MovHigh,
    MovLow,
    Movhlps,
    Movlhps,
    /// MOVMSKPS/MOVMSKPD/PMOVMSKB with the lane width in bits.
    Movmsk(u32),
    Maskmov,
    Movq2dq,
    Movdq2q,
    /// MOVNTQ m64, mm.
    Movntq,
    Int(H),
    /// Shifts by an immediate count (replayed with the count in XMM1).
    ShiftImm(H),
    /// PSLLDQ (true) / PSRLDQ (false).
    ByteShift(bool),
    Pshufd,
    Pshuflw,
    Pshufhw,
    Pshufw,
    Shufps,
    Shufpd,
    Pextrw,
    Pinsrw,
    /// Floating-point op with an XMM (or memory) source and XMM destination.
    Fp(F),
    /// CMPPS/CMPSS/CMPPD/CMPSD, predicate from the immediate.
    Cmp(&'static [F; 8]),
    /// COMISS/UCOMISS/COMISD/UCOMISD.
    Comi(F),
    /// CVTSI2SS/SD: (32-bit source op, 64-bit source op).
    CvtI2F(F, F),
    /// CVT(T)SS2SI/SD2SI: (32-bit destination op, 64-bit destination op).
    CvtF2I(F, F),
    /// CVTPI2PS xmm, mm/m64.
    Cvtpi2ps,
    /// CVTPI2PD xmm, mm/m64.
    Cvtpi2pd,
    /// CVT(T)PS2PI / CVT(T)PD2PI mm, xmm/mem: the SSE2 op producing the dwords.
    CvtToPi(F),
    /// SSE3, SSSE3, SSE4.1, SSE4.2, AES-NI, PCLMULQDQ.
    Ext(ext::XOp),
}

fn int_op(m: Mnemonic) -> Option<H> {
    use Mnemonic as M;
    Some(match m {
        M::Paddb => H::Paddb,
        M::Paddw => H::Paddw,
        M::Paddd => H::Paddd,
        M::Paddq => H::Paddq,
        M::Paddsb => H::Paddsb,
        M::Paddsw => H::Paddsw,
        M::Paddusb => H::Paddusb,
        M::Paddusw => H::Paddusw,
        M::Psubb => H::Psubb,
        M::Psubw => H::Psubw,
        M::Psubd => H::Psubd,
        M::Psubq => H::Psubq,
        M::Psubsb => H::Psubsb,
        M::Psubsw => H::Psubsw,
        M::Psubusb => H::Psubusb,
        M::Psubusw => H::Psubusw,
        M::Pmullw => H::Pmullw,
        M::Pmulhw => H::Pmulhw,
        M::Pmulhuw => H::Pmulhuw,
        M::Pmuludq => H::Pmuludq,
        M::Pmaddwd => H::Pmaddwd,
        M::Pavgb => H::Pavgb,
        M::Pavgw => H::Pavgw,
        M::Psadbw => H::Psadbw,
        M::Pminub => H::Pminub,
        M::Pmaxub => H::Pmaxub,
        M::Pminsw => H::Pminsw,
        M::Pmaxsw => H::Pmaxsw,
        M::Pcmpeqb => H::Pcmpeqb,
        M::Pcmpeqw => H::Pcmpeqw,
        M::Pcmpeqd => H::Pcmpeqd,
        M::Pcmpgtb => H::Pcmpgtb,
        M::Pcmpgtw => H::Pcmpgtw,
        M::Pcmpgtd => H::Pcmpgtd,
        M::Pand => H::Pand,
        M::Pandn => H::Pandn,
        M::Por => H::Por,
        M::Pxor => H::Pxor,
        M::Andps => H::Andps,
        M::Andnps => H::Andnps,
        M::Orps => H::Orps,
        M::Xorps => H::Xorps,
        M::Andpd => H::Andpd,
        M::Andnpd => H::Andnpd,
        M::Orpd => H::Orpd,
        M::Xorpd => H::Xorpd,
        M::Punpcklbw => H::Punpcklbw,
        M::Punpcklwd => H::Punpcklwd,
        M::Punpckldq => H::Punpckldq,
        M::Punpcklqdq => H::Punpcklqdq,
        M::Punpckhbw => H::Punpckhbw,
        M::Punpckhwd => H::Punpckhwd,
        M::Punpckhdq => H::Punpckhdq,
        M::Punpckhqdq => H::Punpckhqdq,
        M::Unpcklps => H::Unpcklps,
        M::Unpckhps => H::Unpckhps,
        M::Unpcklpd => H::Unpcklpd,
        M::Unpckhpd => H::Unpckhpd,
        M::Packsswb => H::Packsswb,
        M::Packuswb => H::Packuswb,
        M::Packssdw => H::Packssdw,
        M::Psllw => H::Psllw,
        M::Pslld => H::Pslld,
        M::Psllq => H::Psllq,
        M::Psrlw => H::Psrlw,
        M::Psrld => H::Psrld,
        M::Psrlq => H::Psrlq,
        M::Psraw => H::Psraw,
        M::Psrad => H::Psrad,
        _ => return None,
    })
}

fn fp_op(m: Mnemonic) -> Option<F> {
    use Mnemonic as M;
    Some(match m {
        M::Addps => F::Addps,
        M::Addss => F::Addss,
        M::Addpd => F::Addpd,
        M::Addsd => F::Addsd,
        M::Subps => F::Subps,
        M::Subss => F::Subss,
        M::Subpd => F::Subpd,
        M::Subsd => F::Subsd,
        M::Mulps => F::Mulps,
        M::Mulss => F::Mulss,
        M::Mulpd => F::Mulpd,
        M::Mulsd => F::Mulsd,
        M::Divps => F::Divps,
        M::Divss => F::Divss,
        M::Divpd => F::Divpd,
        M::Divsd => F::Divsd,
        M::Minps => F::Minps,
        M::Minss => F::Minss,
        M::Minpd => F::Minpd,
        M::Minsd => F::Minsd,
        M::Maxps => F::Maxps,
        M::Maxss => F::Maxss,
        M::Maxpd => F::Maxpd,
        M::Maxsd => F::Maxsd,
        M::Sqrtps => F::Sqrtps,
        M::Sqrtss => F::Sqrtss,
        M::Sqrtpd => F::Sqrtpd,
        M::Sqrtsd => F::Sqrtsd,
        M::Rcpps => F::Rcpps,
        M::Rcpss => F::Rcpss,
        M::Rsqrtps => F::Rsqrtps,
        M::Rsqrtss => F::Rsqrtss,
        M::Cvtss2sd => F::Cvtss2sd,
        M::Cvtsd2ss => F::Cvtsd2ss,
        M::Cvtdq2ps => F::Cvtdq2ps,
        M::Cvtps2dq => F::Cvtps2dq,
        M::Cvttps2dq => F::Cvttps2dq,
        M::Cvtdq2pd => F::Cvtdq2pd,
        M::Cvtpd2dq => F::Cvtpd2dq,
        M::Cvttpd2dq => F::Cvttpd2dq,
        M::Cvtps2pd => F::Cvtps2pd,
        M::Cvtpd2ps => F::Cvtpd2ps,
        _ => return None,
    })
}

/// Decides what `insn` is; `None` for anything this module does not implement.
fn classify(insn: &Instruction, has_m: bool) -> Option<Op> {
    use Mnemonic as M;
    let m = insn.mnemonic();
    let imm1 = insn.op1_kind() == OpKind::Immediate8;
    Some(match m {
        M::Movdqa | M::Movaps | M::Movapd | M::Movntdq | M::Movntps | M::Movntpd => Op::Mov128 { aligned: true },
        M::Movdqu | M::Movups | M::Movupd => Op::Mov128 { aligned: false },
        M::Movd | M::Movq => Op::MovDQ,
        M::Movss => Op::MovScalar(4),
        // MOVSD/CMPSD also name the string instructions (handled by the integer core).
        M::Movsd if insn.code() != Code::Movsd_m32_m32 => Op::MovScalar(8),
        M::Movhps | M::Movhpd => Op::MovHigh,
        M::Movlps | M::Movlpd => Op::MovLow,
        M::Movhlps => Op::Movhlps,
        M::Movlhps => Op::Movlhps,
        M::Movmskps => Op::Movmsk(32),
        M::Movmskpd => Op::Movmsk(64),
        M::Pmovmskb => Op::Movmsk(8),
        M::Maskmovdqu | M::Maskmovq => Op::Maskmov,
        M::Movq2dq => Op::Movq2dq,
        M::Movdq2q => Op::Movdq2q,
        M::Movntq => Op::Movntq,
        M::Pslldq => Op::ByteShift(true),
        M::Psrldq => Op::ByteShift(false),
        M::Psllw | M::Pslld | M::Psllq | M::Psrlw | M::Psrld | M::Psrlq | M::Psraw | M::Psrad if imm1 => {
            Op::ShiftImm(int_op(m)?)
        }
        M::Pshufd => Op::Pshufd,
        M::Pshuflw => Op::Pshuflw,
        M::Pshufhw => Op::Pshufhw,
        M::Pshufw => Op::Pshufw,
        M::Shufps => Op::Shufps,
        M::Shufpd => Op::Shufpd,
        // PEXTRW m16 is SSE4.1 (the `ext` module).
        M::Pextrw if insn.op0_kind() == OpKind::Register => Op::Pextrw,
        M::Pinsrw => Op::Pinsrw,
        M::Cmpps => Op::Cmp(&CMPPS),
        M::Cmpss => Op::Cmp(&CMPSS),
        M::Cmppd => Op::Cmp(&CMPPD),
        M::Cmpsd if insn.code() != Code::Cmpsd_m32_m32 => Op::Cmp(&CMPSD),
        M::Comiss => Op::Comi(F::Comiss),
        M::Ucomiss => Op::Comi(F::Ucomiss),
        M::Comisd => Op::Comi(F::Comisd),
        M::Ucomisd => Op::Comi(F::Ucomisd),
        M::Cvtsi2ss => Op::CvtI2F(F::Cvtsi2ss32, F::Cvtsi2ss64),
        M::Cvtsi2sd => Op::CvtI2F(F::Cvtsi2sd32, F::Cvtsi2sd64),
        M::Cvtss2si => Op::CvtF2I(F::Cvtss2si32, F::Cvtss2si64),
        M::Cvttss2si => Op::CvtF2I(F::Cvttss2si32, F::Cvttss2si64),
        M::Cvtsd2si => Op::CvtF2I(F::Cvtsd2si32, F::Cvtsd2si64),
        M::Cvttsd2si => Op::CvtF2I(F::Cvttsd2si32, F::Cvttsd2si64),
        M::Cvtpi2ps => Op::Cvtpi2ps,
        M::Cvtpi2pd => Op::Cvtpi2pd,
        M::Cvtps2pi => Op::CvtToPi(F::Cvtps2dq),
        M::Cvttps2pi => Op::CvtToPi(F::Cvttps2dq),
        M::Cvtpd2pi => Op::CvtToPi(F::Cvtpd2dq),
        M::Cvttpd2pi => Op::CvtToPi(F::Cvttpd2dq),
        _ => {
            if let Some(h) = int_op(m) {
                // Only the forms that exist for the register file at hand.
                if has_m && matches!(h, H::Punpcklqdq | H::Punpckhqdq) {
                    return None;
                }
                Op::Int(h)
            } else if let Some(f) = fp_op(m) {
                Op::Fp(f)
            } else {
                Op::Ext(ext::classify(insn)?)
            }
        }
    })
}

// ---------------------------------------------------------------------------------------
// Execution
// ---------------------------------------------------------------------------------------

/// #UD/#NM checks for instructions on XMM registers and MXCSR (SDM Vol. 3, table
/// "Action Taken for Combinations of OSFXSR, OSXMMEXCPT, SSE, SSE2, EM, MP, and TS"):
/// EM or !OSFXSR give #UD, which takes precedence over TS giving #NM.
fn sse_avail(cpu: &Cpu) -> Res<()> {
    if cpu.cr0 & ctl::CR0_EM != 0 || cpu.cr4 & ctl::CR4_OSFXSR == 0 {
        return Err(Fault::InvalidOpcode);
    }
    if cpu.cr0 & ctl::CR0_TS != 0 {
        return Err(Fault::DeviceNotAvailable);
    }
    Ok(())
}

/// #UD/#NM/#MF checks for MMX instructions (SDM Vol. 2 exception tables of the MMX
/// instructions): EM gives #UD, TS #NM, a pending x87 exception #MF.
fn mmx_avail(cpu: &Cpu) -> Res<()> {
    if cpu.cr0 & ctl::CR0_EM != 0 {
        return Err(Fault::InvalidOpcode);
    }
    if cpu.cr0 & ctl::CR0_TS != 0 {
        return Err(Fault::DeviceNotAvailable);
    }
    check_pending(cpu)
}

/// Executes an SSE-family (SSE to SSE4.2, AES-NI, PCLMULQDQ) or MMX instruction; returns `Ok(false)` if `insn` is not one.
pub(crate) fn execute(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction) -> SRes<bool> {
    use Mnemonic as M;
    if insn.encoding() != EncodingKind::Legacy {
        return Ok(false);
    }
    match insn.mnemonic() {
        M::Ldmxcsr => {
            sse_avail(cpu)?;
            let la = cpu.mem_la(insn);
            let v = low32(cpu.rmem(bus, la, 4)?);
            if v & !MXCSR_MASK != 0 {
                return Err(Fault::GeneralProtection(0).into());
            }
            cpu.fpu.mxcsr = v;
            return Ok(true);
        }
        M::Stmxcsr => {
            sse_avail(cpu)?;
            let la = cpu.mem_la(insn);
            cpu.wmem(bus, la, 4, u64::from(cpu.fpu.mxcsr))?;
            return Ok(true);
        }
        M::Emms => {
            mmx_avail(cpu)?;
            cpu.fpu.ftw = 0;
            return Ok(true);
        }
        M::Movnti => {
            // A general-register store; not affected by CR0.EM/TS.
            let r = insn.op1_register();
            let v = cpu.get_reg(r);
            let la = cpu.mem_la(insn);
            cpu.wmem(bus, la, r.size(), v)?;
            return Ok(true);
        }
        _ => {}
    }
    let (mut has_x, mut has_m) = (false, false);
    for i in 0..insn.op_count() {
        if insn.op_kind(i) == OpKind::Register {
            let r = insn.op_register(i);
            has_x |= r.is_xmm();
            has_m |= r.is_mm();
        }
    }
    let Some(op) = classify(insn, has_m) else {
        return Ok(false);
    };
    // Instructions without an MM register (including the memory-source conversions such
    // as CVTSS2SI r, m32) follow the SSE rules.
    if has_x || !has_m {
        sse_avail(cpu)?;
        if has_m {
            check_pending(cpu)?;
        }
    } else {
        mmx_avail(cpu)?;
    }
    run(cpu, bus, insn, op, has_m)?;
    if has_m {
        mmx_enter(cpu);
    }
    Ok(true)
}

fn run(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction, op: Op, mmx: bool) -> Res<()> {
    let d = opnd(cpu, insn, 0);
    let s = if insn.op_count() > 1 { opnd(cpu, insn, 1) } else { V::Imm(0) };
    let imm = |k: u32| low8(insn.immediate(k));
    match op {
        Op::Mov128 { aligned } => {
            if let V::Mem(la) = d {
                let v = read(cpu, bus, insn, s, false)?;
                write_mem(cpu, bus, la, 16, v, aligned)?;
            } else {
                let v = read(cpu, bus, insn, s, aligned)?;
                write_reg(cpu, d, v);
            }
        }
        Op::MovDQ => {
            let size = match (d, s) {
                (V::G(r), _) | (_, V::G(r)) => r.size(),
                (V::Mem(_), _) | (_, V::Mem(_)) => insn.memory_size().size(),
                _ => 8,
            };
            let v = low64(read(cpu, bus, insn, s, false)?) & crate::regs::mask(size);
            match d {
                V::Mem(la) => cpu.wmem(bus, la, size, v)?,
                _ => write_reg(cpu, d, u128::from(v)),
            }
        }
        Op::MovScalar(size) => {
            let m = (1u128 << (8 * size)) - 1;
            match (d, s) {
                (V::Mem(la), V::X(i)) => write_mem(cpu, bus, la, size, xmm(cpu, i) & m, false)?,
                (V::X(i), V::X(j)) => *xmm_mut(cpu, i) = (xmm(cpu, i) & !m) | (xmm(cpu, j) & m),
                (V::X(i), V::Mem(la)) => *xmm_mut(cpu, i) = read_mem(cpu, bus, la, size, false)?,
                _ => return Err(Fault::InvalidOpcode),
            }
        }
        Op::MovHigh => match (d, s) {
            (V::X(i), V::Mem(la)) => {
                let v = read_mem(cpu, bus, la, 8, false)?;
                *xmm_mut(cpu, i) = (xmm(cpu, i) & u128::from(u64::MAX)) | (v << 64);
            }
            (V::Mem(la), V::X(i)) => write_mem(cpu, bus, la, 8, xmm(cpu, i) >> 64, false)?,
            _ => return Err(Fault::InvalidOpcode),
        },
        Op::MovLow => match (d, s) {
            (V::X(i), V::Mem(la)) => {
                let v = read_mem(cpu, bus, la, 8, false)?;
                *xmm_mut(cpu, i) = (xmm(cpu, i) & !u128::from(u64::MAX)) | v;
            }
            (V::Mem(la), V::X(i)) => write_mem(cpu, bus, la, 8, xmm(cpu, i) & u128::from(u64::MAX), false)?,
            _ => return Err(Fault::InvalidOpcode),
        },
        Op::Movhlps | Op::Movlhps => {
            let (V::X(i), V::X(j)) = (d, s) else {
                return Err(Fault::InvalidOpcode);
            };
            let (dv, sv) = (xmm(cpu, i), xmm(cpu, j));
            let lo = u128::from(u64::MAX);
            *xmm_mut(cpu, i) = if matches!(op, Op::Movhlps) { (dv & !lo) | (sv >> 64) } else { (dv & lo) | (sv << 64) };
        }
        Op::Movmsk(bits) => {
            let v = read(cpu, bus, insn, s, false)?;
            let width = if mmx { 64 } else { 128 };
            write_reg(cpu, d, u128::from(movmsk(v, bits, width / bits)));
        }
        Op::Maskmov => {
            // MASKMOVDQU/MASKMOVQ: implicit DS:rDI destination (operand 0), data, selector.
            let data = read(cpu, bus, insn, opnd(cpu, insn, 1), false)?;
            let sel = read(cpu, bus, insn, opnd(cpu, insn, 2), false)?;
            let n = if mmx { 8 } else { 16 };
            let asz = match insn.op0_kind() {
                OpKind::MemorySegDI => 2,
                OpKind::MemorySegEDI => 4,
                _ => 8,
            };
            let off = cpu.gpr[7] & crate::regs::mask(asz);
            let base = cpu.seg_la(insn.memory_segment(), off);
            let picked = |k: usize| (sel >> (8 * k + 7)) & 1 != 0;
            if (0..n).any(picked) {
                cpu.probe_write(base, n, cpu.user())?;
            }
            for k in (0..n).filter(|&k| picked(k)) {
                let la = la_add(cpu, base, k as u64);
                cpu.wmem(bus, la, 1, ((data >> (8 * k)) & 0xff) as u64)?;
            }
        }
        Op::Movq2dq | Op::Movdq2q => {
            let v = low64(read(cpu, bus, insn, s, false)?);
            write_reg(cpu, d, u128::from(v));
        }
        Op::Movntq => {
            let (V::Mem(la), V::M(i)) = (d, s) else {
                return Err(Fault::InvalidOpcode);
            };
            let v = mm_get(cpu, i);
            cpu.wmem(bus, la, 8, v)?;
        }
        Op::Int(h) => {
            let a = read(cpu, bus, insn, d, false)?;
            let b = read(cpu, bus, insn, s, true)?;
            let r = if mmx {
                match h {
                    // Pack: both halves side by side in one register so the saturated
                    // lanes come out in MMX order in the low 64 bits.
                    H::Packsswb | H::Packuswb | H::Packssdw => {
                        let v = (a & u128::from(u64::MAX)) | (b << 64);
                        host_int(h, v, v)
                    }
                    // Unpack high: the low-unpack of the 64-bit values has them in its
                    // upper half.
                    H::Punpckhbw => host_int(H::Punpcklbw, a, b) >> 64,
                    H::Punpckhwd => host_int(H::Punpcklwd, a, b) >> 64,
                    H::Punpckhdq => host_int(H::Punpckldq, a, b) >> 64,
                    _ => host_int(h, a, b),
                }
            } else {
                host_int(h, a, b)
            };
            write_reg(cpu, d, r);
        }
        Op::ShiftImm(h) => {
            let a = read(cpu, bus, insn, d, false)?;
            write_reg(cpu, d, host_int(h, a, u128::from(imm(1))));
        }
        Op::ByteShift(left) => {
            let a = read(cpu, bus, insn, d, false)?;
            let n = u32::from(imm(1));
            let r = if n > 15 {
                0
            } else if left {
                a << (8 * n)
            } else {
                a >> (8 * n)
            };
            write_reg(cpu, d, r);
        }
        Op::Pshufd | Op::Pshuflw | Op::Pshufhw | Op::Pshufw => {
            let v = read(cpu, bus, insn, s, true)?;
            let i = imm(2);
            let r = match op {
                Op::Pshufd => pshufd(v, i),
                Op::Pshuflw => pshuflw(v, i),
                Op::Pshufhw => pshufhw(v, i),
                _ => pshuflw(v, i) & u128::from(u64::MAX),
            };
            write_reg(cpu, d, r);
        }
        Op::Shufps | Op::Shufpd => {
            let a = read(cpu, bus, insn, d, false)?;
            let b = read(cpu, bus, insn, s, true)?;
            let r = if matches!(op, Op::Shufps) { shufps(a, b, imm(2)) } else { shufpd(a, b, imm(2)) };
            write_reg(cpu, d, r);
        }
        Op::Pextrw => {
            let v = read(cpu, bus, insn, s, false)?;
            let sel = u32::from(imm(2)) & if mmx { 3 } else { 7 };
            write_reg(cpu, d, lane(v, 16, sel));
        }
        Op::Pinsrw => {
            let a = read(cpu, bus, insn, d, false)?;
            let w = read(cpu, bus, insn, s, false)? & 0xffff;
            let sel = u32::from(imm(2)) & if mmx { 3 } else { 7 };
            write_reg(cpu, d, (a & !(0xffffu128 << (16 * sel))) | (w << (16 * sel)));
        }
        Op::Fp(f) => {
            let a = read(cpu, bus, insn, d, false)?;
            let b = read(cpu, bus, insn, s, true)?;
            let (r, _, _) = fp(cpu, f, a, b, 0)?;
            write_reg(cpu, d, r);
        }
        Op::Cmp(table) => {
            let a = read(cpu, bus, insn, d, false)?;
            let b = read(cpu, bus, insn, s, true)?;
            let (r, _, _) = fp(cpu, cmp_predicate(table, imm(2)), a, b, 0)?;
            write_reg(cpu, d, r);
        }
        Op::Comi(f) => {
            let a = read(cpu, bus, insn, d, false)?;
            let b = read(cpu, bus, insn, s, false)?;
            let (_, _, fl) = fp(cpu, f, a, b, 0)?;
            cpu.rflags = (cpu.rflags & !ARITH) | (fl & ARITH);
        }
        Op::CvtI2F(f32op, f64op) => {
            let size = match s {
                V::G(r) => r.size(),
                _ => insn.memory_size().size(),
            };
            let a = read(cpu, bus, insn, d, false)?;
            let g = low64(read(cpu, bus, insn, s, false)?);
            let (r, _, _) = fp(cpu, if size == 8 { f64op } else { f32op }, a, 0, g)?;
            write_reg(cpu, d, r);
        }
        Op::CvtF2I(f32op, f64op) => {
            let V::G(r) = d else {
                return Err(Fault::InvalidOpcode);
            };
            let b = read(cpu, bus, insn, s, false)?;
            let (_, g, _) = fp(cpu, if r.size() == 8 { f64op } else { f32op }, 0, b, 0)?;
            cpu.set_reg(r, g);
        }
        Op::Cvtpi2ps => {
            // CVTDQ2PS of the two dwords (the zero upper lanes raise nothing).
            let a = read(cpu, bus, insn, d, false)?;
            let b = read(cpu, bus, insn, s, false)? & u128::from(u64::MAX);
            let (r, _, _) = fp(cpu, F::Cvtdq2ps, 0, b, 0)?;
            let lo = u128::from(u64::MAX);
            write_reg(cpu, d, (a & !lo) | (r & lo));
        }
        Op::Cvtpi2pd => {
            let b = read(cpu, bus, insn, s, false)? & u128::from(u64::MAX);
            let (r, _, _) = fp(cpu, F::Cvtdq2pd, 0, b, 0)?;
            write_reg(cpu, d, r);
        }
        Op::CvtToPi(f) => {
            // The PS forms read two floats (m64 or the low half of the register).
            let mut b = read(cpu, bus, insn, s, true)?;
            if matches!(f, F::Cvtps2dq | F::Cvttps2dq) {
                b &= u128::from(u64::MAX);
            }
            let (r, _, _) = fp(cpu, f, 0, b, 0)?;
            write_reg(cpu, d, r & u128::from(u64::MAX));
        }
        Op::Ext(x) => ext::run(cpu, bus, insn, x, mmx, d, s)?,
    }
    Ok(())
}
