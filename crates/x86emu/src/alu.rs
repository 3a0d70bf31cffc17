//! Integer arithmetic with bit-exact RFLAGS, computed by the host CPU.
//!
//! The host is x86-64 as well, so each ALU operation is executed natively in inline
//! assembly and the resulting arithmetic flags are captured with PUSHFQ. This gives exactly
//! the flags the real CPU produces, including the architecturally undefined ones. Operations
//! that consume flags (ADC, SBB, RCL, RCR, INC/DEC's preserved CF, rotates) load the guest's
//! arithmetic flags first with POPFQ. Only CF, PF, AF, ZF, SF and OF are ever taken from or
//! given to the host.

use crate::cpu::flags::ARITH;
use crate::regs::{low64, low8};
use std::arch::asm;

/// Two-operand ALU operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op2 {
    Add,
    Or,
    Adc,
    Sbb,
    And,
    Sub,
    Xor,
    Shl,
    Shr,
    Sar,
    Rol,
    Ror,
    Rcl,
    Rcr,
    Bt,
    Bts,
    Btr,
    Btc,
    Bsf,
    Bsr,
    Imul,
}

/// One-operand ALU operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op1 {
    Inc,
    Dec,
    Neg,
    Not,
}

macro_rules! bin_asm {
    ($ins:literal, $a:ident, $b:ident, $fl:ident, $m:literal) => {{
        // Guest flags in: OF through an ADD that overflows iff OF is set, the other five
        // through SAHF. Flags out: LAHF and SETO. (Much cheaper than POPFQ/PUSHFQ.)
        let seed: u64 = if $fl & crate::cpu::flags::OF != 0 { 0x40 } else { 0 };
        let h: u64 = $fl & 0xff;
        let lo: u64;
        let o: u64;
        // SAFETY: pure register arithmetic; RAX is declared clobbered for AH.
        unsafe {
            asm!(
                "add {s:l}, {s:l}",
                "mov ah, {h:l}",
                "sahf",
                concat!($ins, " {a", $m, "}, {b", $m, "}"),
                "lahf",
                "seto {s:l}",
                a = inout(reg) $a,
                b = in(reg) $b,
                s = inout(reg) seed => o,
                h = in(reg_abcd) h,
                out("rax") lo,
                options(nostack),
            )
        }
        $fl = ((lo >> 8) & 0xd5) | if o & 1 != 0 { crate::cpu::flags::OF } else { 0 };
    }};
}

macro_rules! bin_asm_nf {
    ($ins:literal, $a:ident, $b:ident, $fl:ident, $m:literal) => {{
        let lo: u64;
        let o: u64;
        // SAFETY: pure register arithmetic whose flags do not depend on the input flags;
        // RAX is declared clobbered for LAHF.
        unsafe {
            asm!(
                concat!($ins, " {a", $m, "}, {b", $m, "}"),
                "lahf",
                "seto {s:l}",
                a = inout(reg) $a,
                b = in(reg) $b,
                s = out(reg) o,
                out("rax") lo,
                options(nostack),
            )
        }
        $fl = ((lo >> 8) & 0xd5) | if o & 1 != 0 { crate::cpu::flags::OF } else { 0 };
    }};
}

macro_rules! shift_asm {
    ($ins:literal, $a:ident, $c:ident, $fl:ident, $m:literal) => {{
        let seed: u64 = if $fl & crate::cpu::flags::OF != 0 { 0x40 } else { 0 };
        let h: u64 = $fl & 0xff;
        let lo: u64;
        let o: u64;
        // SAFETY: as in bin_asm; the count lives in CL.
        unsafe {
            asm!(
                "add {s:l}, {s:l}",
                "mov ah, {h:l}",
                "sahf",
                concat!($ins, " {a", $m, "}, cl"),
                "lahf",
                "seto {s:l}",
                a = inout(reg) $a,
                in("cl") low8($c),
                s = inout(reg) seed => o,
                h = in(reg_abcd) h,
                out("rax") lo,
                options(nostack),
            )
        }
        $fl = ((lo >> 8) & 0xd5) | if o & 1 != 0 { crate::cpu::flags::OF } else { 0 };
    }};
}

macro_rules! by_size {
    ($mac:ident, $ins:literal, $size:expr, $($args:ident),*) => {
        match $size {
            1 => $mac!($ins, $($args),*, ":l"),
            2 => $mac!($ins, $($args),*, ":x"),
            4 => $mac!($ins, $($args),*, ":e"),
            _ => $mac!($ins, $($args),*, ""),
        }
    };
}

/// Runs `op` on `a` and `b` at operand size `size` (1, 2, 4, 8 bytes) with guest flags
/// `flags`; returns (result, new RFLAGS). For shifts and rotates `b` is the raw count; the
/// count is masked as the CPU does, and a masked count of zero leaves the flags untouched.
/// For BSF/BSR a zero source returns `a` unchanged with ZF set, as Intel CPUs do.
#[inline]
pub(crate) fn op2(op: Op2, size: usize, a: u64, b: u64, flags: u64) -> (u64, u64) {
    let mut r = a;
    let mut fl = (flags & ARITH) | 2;
    match op {
        Op2::Add => by_size!(bin_asm, "add", size, r, b, fl),
        Op2::Or => by_size!(bin_asm, "or", size, r, b, fl),
        Op2::Adc => by_size!(bin_asm, "adc", size, r, b, fl),
        Op2::Sbb => by_size!(bin_asm, "sbb", size, r, b, fl),
        Op2::And => by_size!(bin_asm, "and", size, r, b, fl),
        Op2::Sub => by_size!(bin_asm, "sub", size, r, b, fl),
        Op2::Xor => by_size!(bin_asm, "xor", size, r, b, fl),
        Op2::Shl | Op2::Shr | Op2::Sar | Op2::Rol | Op2::Ror | Op2::Rcl | Op2::Rcr => {
            let c = if size == 8 { b & 63 } else { b & 31 };
            if c == 0 {
                return (a, flags);
            }
            match op {
                Op2::Shl => by_size!(shift_asm, "shl", size, r, c, fl),
                Op2::Shr => by_size!(shift_asm, "shr", size, r, c, fl),
                Op2::Sar => by_size!(shift_asm, "sar", size, r, c, fl),
                Op2::Rol => by_size!(shift_asm, "rol", size, r, c, fl),
                Op2::Ror => by_size!(shift_asm, "ror", size, r, c, fl),
                Op2::Rcl => by_size!(shift_asm, "rcl", size, r, c, fl),
                _ => by_size!(shift_asm, "rcr", size, r, c, fl),
            }
        }
        Op2::Bt | Op2::Bts | Op2::Btr | Op2::Btc => {
            // 8-bit forms do not exist; the caller has already reduced the bit offset.
            let sz = size.max(2);
            match op {
                Op2::Bt => by_size!(bin_asm, "bt", sz, r, b, fl),
                Op2::Bts => by_size!(bin_asm, "bts", sz, r, b, fl),
                Op2::Btr => by_size!(bin_asm, "btr", sz, r, b, fl),
                _ => by_size!(bin_asm, "btc", sz, r, b, fl),
            }
        }
        Op2::Bsf | Op2::Bsr => {
            // r = a (destination's old value), source = b
            let sz = size.max(2);
            let mut d = a;
            let s = b;
            match (op, sz) {
                (Op2::Bsf, 2) => bin_asm!("bsf", d, s, fl, ":x"),
                (Op2::Bsf, 4) => bin_asm!("bsf", d, s, fl, ":e"),
                (Op2::Bsf, _) => bin_asm!("bsf", d, s, fl, ""),
                (_, 2) => bin_asm!("bsr", d, s, fl, ":x"),
                (_, 4) => bin_asm!("bsr", d, s, fl, ":e"),
                _ => bin_asm!("bsr", d, s, fl, ""),
            }
            if b & crate::regs::mask(size) == 0 {
                d = a;
            }
            r = d;
        }
        Op2::Imul => {
            let sz = size.max(2);
            match sz {
                2 => bin_asm!("imul", r, b, fl, ":x"),
                4 => bin_asm!("imul", r, b, fl, ":e"),
                _ => bin_asm!("imul", r, b, fl, ""),
            }
        }
    }
    (r, (flags & !ARITH) | (fl & ARITH))
}

/// SHLD/SHRD: shifts `a` left/right by `count`, filling from `b`. Returns (result, flags).
pub(crate) fn shd(left: bool, size: usize, a: u64, b: u64, count: u64, flags: u64) -> (u64, u64) {
    let c = if size == 8 { count & 63 } else { count & 31 };
    if c == 0 {
        return (a, flags);
    }
    let mut r = a;
    let mut fl = (flags & ARITH) | 2;
    macro_rules! go {
        ($ins:literal, $m:literal) => {
            // SAFETY: register-only arithmetic as in bin_asm.
            unsafe {
                asm!(
                    "push {fl}",
                    "popfq",
                    concat!($ins, " {a", $m, "}, {b", $m, "}, cl"),
                    "pushfq",
                    "pop {fl}",
                    a = inout(reg) r,
                    b = in(reg) b,
                    in("cl") low8(c),
                    fl = inout(reg) fl,
                )
            }
        };
    }
    match (left, size) {
        (true, 2) => go!("shld", ":x"),
        (true, 4) => go!("shld", ":e"),
        (true, _) => go!("shld", ""),
        (false, 2) => go!("shrd", ":x"),
        (false, 4) => go!("shrd", ":e"),
        (false, _) => go!("shrd", ""),
    }
    (r, (flags & !ARITH) | (fl & ARITH))
}

/// One-operand MUL/IMUL: RDX:RAX-style widening multiply of `a` (accumulator) by `b`.
/// Returns (low, high, flags). For size 1 the result is AX: low = AL, high = AH.
pub(crate) fn mul_wide(signed: bool, size: usize, a: u64, b: u64, flags: u64) -> (u64, u64, u64) {
    let mut lo = a;
    let mut hi: u64 = 0;
    let mut fl = (flags & ARITH) | 2;
    macro_rules! go {
        ($ins:literal, $m:literal) => {
            // SAFETY: register-only arithmetic; RAX/RDX are declared as clobbered operands.
            unsafe {
                asm!(
                    "push {fl}",
                    "popfq",
                    concat!($ins, " {b", $m, "}"),
                    "pushfq",
                    "pop {fl}",
                    b = in(reg) b,
                    fl = inout(reg) fl,
                    inout("rax") lo,
                    inout("rdx") hi,
                )
            }
        };
    }
    match (signed, size) {
        (false, 1) => go!("mul", ":l"),
        (false, 2) => go!("mul", ":x"),
        (false, 4) => go!("mul", ":e"),
        (false, _) => go!("mul", ""),
        (true, 1) => go!("imul", ":l"),
        (true, 2) => go!("imul", ":x"),
        (true, 4) => go!("imul", ":e"),
        (true, _) => go!("imul", ""),
    }
    if size == 1 {
        hi = (lo >> 8) & 0xff;
        lo &= 0xff;
    }
    (lo, hi, (flags & !ARITH) | (fl & ARITH))
}

/// One-operand DIV/IDIV of hi:lo by `d`. Returns `None` for #DE (zero divisor or quotient
/// overflow), else (quotient, remainder, flags).
pub(crate) fn div_wide(signed: bool, size: usize, lo: u64, hi: u64, d: u64, flags: u64) -> Option<(u64, u64, u64)> {
    let m = crate::regs::mask(size);
    let bits = u32::from(crate::regs::size_u8(size)) * 8;
    let d = d & m;
    if d == 0 {
        return None;
    }
    if signed {
        let dividend: i128 = if size == 8 {
            (((hi as u128) << 64) | lo as u128) as i128
        } else {
            let v = ((hi & m) << bits) | (lo & m);
            // sign-extend from 2*bits
            let sh = 128 - 2 * bits;
            ((v as i128) << sh) >> sh
        };
        let dv = crate::regs::sext(d, size) as i64 as i128;
        if dividend == i128::MIN && dv == -1 {
            return None;
        }
        let q = dividend / dv;
        let r = dividend % dv;
        let (qmin, qmax) = (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1);
        if q < qmin || q > qmax {
            return None;
        }
        Some((low64(q as u128) & m, low64(r as u128) & m, flags))
    } else {
        let dividend: u128 =
            if size == 8 { ((hi as u128) << 64) | lo as u128 } else { (((hi & m) << bits) | (lo & m)) as u128 };
        let q = dividend / d as u128;
        if q > m as u128 {
            return None;
        }
        let r = dividend % d as u128;
        Some((low64(q), low64(r), flags))
    }
}

/// ADD, OR, AND, SUB, XOR (and CMP/TEST through SUB/AND): operations whose result flags do
/// not depend on the incoming flags, so the host runs them without loading guest flags.
#[inline(always)]
pub(crate) fn arith(op: Op2, size: usize, a: u64, b: u64, flags: u64) -> (u64, u64) {
    let mut r = a;
    let fl: u64;
    match op {
        Op2::Add => by_size!(bin_asm_nf, "add", size, r, b, fl),
        Op2::Or => by_size!(bin_asm_nf, "or", size, r, b, fl),
        Op2::And => by_size!(bin_asm_nf, "and", size, r, b, fl),
        Op2::Sub => by_size!(bin_asm_nf, "sub", size, r, b, fl),
        Op2::Xor => by_size!(bin_asm_nf, "xor", size, r, b, fl),
        _ => return op2(op, size, a, b, flags),
    }
    (r, (flags & !ARITH) | (fl & ARITH))
}

macro_rules! un_asm_nf {
    ($ins:literal, $a:ident, $fl:ident, $m:literal) => {{
        let lo: u64;
        let o: u64;
        // SAFETY: register-only arithmetic whose flags (other than INC/DEC's preserved CF,
        // merged by the caller) do not depend on input flags.
        unsafe {
            asm!(
                concat!($ins, " {a", $m, "}"),
                "lahf",
                "seto {s:l}",
                a = inout(reg) $a,
                s = out(reg) o,
                out("rax") lo,
                options(nostack),
            )
        }
        $fl = ((lo >> 8) & 0xd5) | if o & 1 != 0 { crate::cpu::flags::OF } else { 0 };
    }};
}

/// INC, DEC and NEG without loading guest flags: INC/DEC keep the guest's CF, as the CPU
/// does; NEG defines all six flags.
#[inline(always)]
pub(crate) fn op1(op: Op1, size: usize, a: u64, flags: u64) -> (u64, u64) {
    let mut r = a;
    let fl: u64;
    let keep = match op {
        Op1::Inc => {
            by_size!(un_asm_nf, "inc", size, r, fl);
            ARITH & !crate::cpu::flags::CF
        }
        Op1::Dec => {
            by_size!(un_asm_nf, "dec", size, r, fl);
            ARITH & !crate::cpu::flags::CF
        }
        Op1::Neg => {
            by_size!(un_asm_nf, "neg", size, r, fl);
            ARITH
        }
        Op1::Not => return (!a, flags),
    };
    (r, (flags & !keep) | (fl & keep))
}

/// ADC, SBB and two-operand IMUL, inlined for the fast forms (same semantics as [`op2`]).
#[inline(always)]
pub(crate) fn adc_sbb_imul(op: Op2, size: usize, a: u64, b: u64, flags: u64) -> (u64, u64) {
    let mut r = a;
    let mut fl = (flags & ARITH) | 2;
    match op {
        Op2::Adc => by_size!(bin_asm, "adc", size, r, b, fl),
        Op2::Sbb => by_size!(bin_asm, "sbb", size, r, b, fl),
        Op2::Imul => match size {
            2 => bin_asm!("imul", r, b, fl, ":x"),
            4 => bin_asm!("imul", r, b, fl, ":e"),
            _ => bin_asm!("imul", r, b, fl, ""),
        },
        _ => return op2(op, size, a, b, flags),
    }
    (r, (flags & !ARITH) | (fl & ARITH))
}
