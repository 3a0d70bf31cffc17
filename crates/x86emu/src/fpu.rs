//! x87 FPU, MMX state and FXSAVE/FXRSTOR (Intel SDM Vol. 1 ch. 8, Vol. 2 FXSAVE).
//!
//! The register stack, tags, TOP, control/status words and the last-instruction pointers
//! are kept in software ([`crate::cpu::FpuState`]: `st` holds the physical registers R0-R7,
//! `ftw` the abridged tag byte FXSAVE uses). Stack overflow and underflow are detected here.
//!
//! Arithmetic is computed by the host's own x87 unit, which works on the same 80-bit
//! extended format: each operation loads its operands into the host FPU as 80-bit values
//! (exact and exception-free), runs the guest's instruction (with its memory-operand form
//! where it has one) and stores the 80-bit result back. Before that, FLDENV gives the host
//! FPU the guest's control word (precision and rounding control, with every exception
//! masked so that the host cannot trap) and the guest's condition codes, so results,
//! exception flags and C0-C3 are those of real hardware, undefined condition codes
//! included. The host's control word is restored afterwards and its exception flags are
//! cleared; the host register stack is empty again at the end of every operation.
//!
//! Exceptions: flags the host raised are merged into the guest's FSW; an unmasked one sets
//! ES and B, and the next waiting x87/MMX instruction raises #MF when CR0.NE is set (with
//! CR0.NE clear the FERR#/IGNNE# legacy path is not modelled and nothing happens). For an
//! unmasked invalid-operation, denormal or zero-divide exception the destination and the
//! stack are left unchanged, as the SDM specifies; for an unmasked numeric overflow or
//! underflow on a register destination the masked result is stored (hardware would store
//! the exponent-bias-adjusted value) — a documented approximation; memory stores are
//! suppressed for any of those unmasked exceptions.

use crate::cpu::{ctl, flags::*, Cpu};
use crate::fpstate::{check_pending, FSW_ES as ES, MXCSR_MASK};
use crate::regs::{low16, low32};
use crate::{Bus, Fault, Res, SRes};
use iced_x86::{ConditionCode, Instruction, Mnemonic, OpKind, Register};
use std::arch::asm;

/// FSW bits.
const IE: u16 = 1 << 0;
const DE: u16 = 1 << 1;
const ZE: u16 = 1 << 2;
const OE: u16 = 1 << 3;
const UE: u16 = 1 << 4;
const SF: u16 = 1 << 6;
const C0: u16 = 1 << 8;
const C1: u16 = 1 << 9;
const C2: u16 = 1 << 10;
const C3: u16 = 1 << 14;
const B: u16 = 1 << 15;
const CC: u16 = C0 | C1 | C2 | C3;
/// Exception flag bits (IE..PE) in FSW, and the mask bits in FCW.
const EXC: u16 = 0x3f;

/// An 80-bit extended-precision value, little-endian (64-bit significand, then sign and
/// 15-bit exponent).
type F80 = [u8; 10];

// Byte-image helpers for the fixed layouts (80-bit registers, FNSTENV/FNSAVE/FXSAVE images).
// Offsets are constants of those layouts and lie inside the fixed-size images; the range
// checks only keep a layout mistake from panicking: a write out of range is dropped and a
// read out of range gives zeros.

/// Copies `bytes` into `img` at byte offset `at`.
fn put(img: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(d) = img.get_mut(at..at + bytes.len()) {
        d.copy_from_slice(bytes);
    }
}

/// The `N` bytes of `img` at byte offset `at`.
fn take<const N: usize>(img: &[u8], at: usize) -> [u8; N] {
    img.get(at..at + N).and_then(|s| <[u8; N]>::try_from(s).ok()).unwrap_or([0; N])
}

/// The first `n` bytes of `img` (all of it if shorter).
fn prefix(img: &[u8], n: usize) -> &[u8] {
    img.get(..n).unwrap_or(img)
}

/// Physical x87 register `p` (0..=7) as its 16-byte slot (80-bit value in bytes 0-9).
#[allow(clippy::indexing_slicing)] // `p & 7` < 8 = st.len()
fn st_phys(cpu: &Cpu, p: usize) -> &[u8; 16] {
    &cpu.fpu.st[p & 7]
}

/// Physical x87 register `p` (0..=7), for writing.
#[allow(clippy::indexing_slicing)] // `p & 7` < 8 = st.len()
fn st_phys_mut(cpu: &mut Cpu, p: usize) -> &mut [u8; 16] {
    &mut cpu.fpu.st[p & 7]
}

/// The real indefinite (default QNaN), also the packed-BCD indefinite.
const INDEFINITE: F80 = [0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff];

// ---------------------------------------------------------------------------------------
// Host x87 engine
// ---------------------------------------------------------------------------------------

/// Operand block shared with the host x87 code (offsets are used by the assembly).
#[repr(C, align(16))]
struct X87 {
    /// First operand / result (80-bit). Offset 0.
    a: [u8; 16],
    /// Second operand / second result. Offset 16.
    b: [u8; 16],
    /// Memory operand image (up to 10 bytes). Offset 32.
    m: [u8; 16],
    /// RFLAGS after FCOMI/FUCOMI. Offset 48.
    fl: u64,
    _pad: u64,
    /// FLDENV image (32-bit protected-mode format). Offset 64.
    env: [u8; 28],
    /// Host FSW right after the operation. Offset 92.
    sw: u16,
    /// The host's control word while the operation runs. Offset 94.
    saved_cw: u16,
}

const _: () = {
    assert!(std::mem::offset_of!(X87, b) == 16);
    assert!(std::mem::offset_of!(X87, m) == 32);
    assert!(std::mem::offset_of!(X87, fl) == 48);
    assert!(std::mem::offset_of!(X87, env) == 64);
    assert!(std::mem::offset_of!(X87, sw) == 92);
    assert!(std::mem::offset_of!(X87, saved_cw) == 94);
};

/// Host x87 operations. In the templates `[{p}]` is operand A, `[{p} + 16]` operand B,
/// `[{p} + 32]` the memory operand; each stores the host FSW at `[{p} + 92]` right after
/// its key instruction and leaves the host register stack empty.
macro_rules! host_x87_ops {
    ($($v:ident = $t:literal),* $(,)?) => {
        /// Host-replayed x87 operation.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum X { $($v),* }

        fn host_x87(op: X, io: &mut X87) {
            let p: *mut X87 = io;
            match op {
                $(X::$v => {
                    // SAFETY: `p` points to a live, aligned `X87` and the code accesses only
                    // its 96 bytes. All x87 registers are declared clobbered, so the host
                    // register stack is empty on entry; every template pops what it loads,
                    // so it is empty on exit. FLDENV loads a control word with all
                    // exceptions masked, so nothing traps; the host's control word is
                    // saved first and restored last, and FNCLEX drops the flags raised.
                    // PUSHFQ/POP (FCOMI forms) use the stack, hence no `nostack`. FISTTP
                    // (SSE3) runs only where the host has SSE3 (`execute` checks).
                    unsafe {
                        asm!(
                            "fnstcw word ptr [{p} + 94]",
                            "fldenv [{p} + 64]",
                            $t,
                            "fnclex",
                            "fldcw word ptr [{p} + 94]",
                            p = in(reg) p,
                            out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                            out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                        )
                    }
                })*
            }
        }
    };
}

host_x87_ops! {
    AddRr = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfadd st(0), st(1)\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]\nfstp st(0)",
    AddM32 = "fld tbyte ptr [{p}]\nfadd dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    AddM64 = "fld tbyte ptr [{p}]\nfadd qword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    AddI16 = "fld tbyte ptr [{p}]\nfiadd word ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    AddI32 = "fld tbyte ptr [{p}]\nfiadd dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    SubRr = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfsub st(0), st(1)\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]\nfstp st(0)",
    SubM32 = "fld tbyte ptr [{p}]\nfsub dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    SubM64 = "fld tbyte ptr [{p}]\nfsub qword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    SubI16 = "fld tbyte ptr [{p}]\nfisub word ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    SubI32 = "fld tbyte ptr [{p}]\nfisub dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    SubrRr = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfsubr st(0), st(1)\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]\nfstp st(0)",
    SubrM32 = "fld tbyte ptr [{p}]\nfsubr dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    SubrM64 = "fld tbyte ptr [{p}]\nfsubr qword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    SubrI16 = "fld tbyte ptr [{p}]\nfisubr word ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    SubrI32 = "fld tbyte ptr [{p}]\nfisubr dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    MulRr = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfmul st(0), st(1)\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]\nfstp st(0)",
    MulM32 = "fld tbyte ptr [{p}]\nfmul dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    MulM64 = "fld tbyte ptr [{p}]\nfmul qword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    MulI16 = "fld tbyte ptr [{p}]\nfimul word ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    MulI32 = "fld tbyte ptr [{p}]\nfimul dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    DivRr = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfdiv st(0), st(1)\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]\nfstp st(0)",
    DivM32 = "fld tbyte ptr [{p}]\nfdiv dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    DivM64 = "fld tbyte ptr [{p}]\nfdiv qword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    DivI16 = "fld tbyte ptr [{p}]\nfidiv word ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    DivI32 = "fld tbyte ptr [{p}]\nfidiv dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    DivrRr = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfdivr st(0), st(1)\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]\nfstp st(0)",
    DivrM32 = "fld tbyte ptr [{p}]\nfdivr dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    DivrM64 = "fld tbyte ptr [{p}]\nfdivr qword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    DivrI16 = "fld tbyte ptr [{p}]\nfidivr word ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    DivrI32 = "fld tbyte ptr [{p}]\nfidivr dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    ComRr = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfcom st(1)\nfnstsw word ptr [{p} + 92]\nfstp st(0)\nfstp st(0)",
    UcomRr = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfucom st(1)\nfnstsw word ptr [{p} + 92]\nfstp st(0)\nfstp st(0)",
    ComM32 = "fld tbyte ptr [{p}]\nfcom dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp st(0)",
    ComM64 = "fld tbyte ptr [{p}]\nfcom qword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp st(0)",
    ComI16 = "fld tbyte ptr [{p}]\nficom word ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp st(0)",
    ComI32 = "fld tbyte ptr [{p}]\nficom dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp st(0)",
    ComiRr = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfcomi st(0), st(1)\nfnstsw word ptr [{p} + 92]\npushfq\npop qword ptr [{p} + 48]\nfstp st(0)\nfstp st(0)",
    UcomiRr = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfucomi st(0), st(1)\nfnstsw word ptr [{p} + 92]\npushfq\npop qword ptr [{p} + 48]\nfstp st(0)\nfstp st(0)",
    Tst = "fld tbyte ptr [{p}]\nftst\nfnstsw word ptr [{p} + 92]\nfstp st(0)",
    Xam = "fld tbyte ptr [{p}]\nfxam\nfnstsw word ptr [{p} + 92]\nfstp st(0)",
    Chs = "fld tbyte ptr [{p}]\nfchs\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Abs = "fld tbyte ptr [{p}]\nfabs\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Sqrt = "fld tbyte ptr [{p}]\nfsqrt\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Rndint = "fld tbyte ptr [{p}]\nfrndint\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    F2xm1 = "fld tbyte ptr [{p}]\nf2xm1\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Sin = "fld tbyte ptr [{p}]\nfsin\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Cos = "fld tbyte ptr [{p}]\nfcos\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Ptan = "fld tbyte ptr [{p}]\nfptan\nfnstsw word ptr [{p} + 92]\ntest byte ptr [{p} + 93], 4\njnz 2f\nfstp tbyte ptr [{p} + 16]\n2:\nfstp tbyte ptr [{p}]",
    Sincos = "fld tbyte ptr [{p}]\nfsincos\nfnstsw word ptr [{p} + 92]\ntest byte ptr [{p} + 93], 4\njnz 2f\nfstp tbyte ptr [{p} + 16]\n2:\nfstp tbyte ptr [{p}]",
    Xtract = "fld tbyte ptr [{p}]\nfxtract\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p} + 16]\nfstp tbyte ptr [{p}]",
    Scale = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfscale\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]\nfstp st(0)",
    Prem = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfprem\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]\nfstp st(0)",
    Prem1 = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfprem1\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]\nfstp st(0)",
    Patan = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfpatan\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p} + 16]",
    Yl2x = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfyl2x\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p} + 16]",
    Yl2xp1 = "fld tbyte ptr [{p} + 16]\nfld tbyte ptr [{p}]\nfyl2xp1\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p} + 16]",
    LdM32 = "fld dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    LdM64 = "fld qword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    IldI16 = "fild word ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    IldI32 = "fild dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    IldI64 = "fild qword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Bld = "fbld tbyte ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Ld1 = "fld1\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Ldz = "fldz\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Ldpi = "fldpi\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Ldl2e = "fldl2e\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Ldl2t = "fldl2t\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Ldlg2 = "fldlg2\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    Ldln2 = "fldln2\nfnstsw word ptr [{p} + 92]\nfstp tbyte ptr [{p}]",
    StM32 = "fld tbyte ptr [{p}]\nfstp dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]",
    StM64 = "fld tbyte ptr [{p}]\nfstp qword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]",
    IstI16 = "fld tbyte ptr [{p}]\nfistp word ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]",
    IstI32 = "fld tbyte ptr [{p}]\nfistp dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]",
    IstI64 = "fld tbyte ptr [{p}]\nfistp qword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]",
    // SSE3; `execute` runs FISTTP only where the host has SSE3.
    IsttI16 = "fld tbyte ptr [{p}]\nfisttp word ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]",
    IsttI32 = "fld tbyte ptr [{p}]\nfisttp dword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]",
    IsttI64 = "fld tbyte ptr [{p}]\nfisttp qword ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]",
    Bstp = "fld tbyte ptr [{p}]\nfbstp tbyte ptr [{p} + 32]\nfnstsw word ptr [{p} + 92]",
}

/// Arithmetic operation rows (ADD, SUB, SUBR, MUL, DIV, DIVR) by operand form
/// (ST/ST, m32fp, m64fp, m16int, m32int).
/// `ARITH_OPS[row][col]`: `row` (0..=5) and `col` (0..=4) come from exhaustive matches in
/// the arithmetic group, within the table's 6 x 5 shape.
#[allow(clippy::indexing_slicing)] // row < 6, col < 5, see above
fn arith_op(row: usize, col: usize) -> X {
    ARITH_OPS[row][col]
}

const ARITH_OPS: [[X; 5]; 6] = [
    [X::AddRr, X::AddM32, X::AddM64, X::AddI16, X::AddI32],
    [X::SubRr, X::SubM32, X::SubM64, X::SubI16, X::SubI32],
    [X::SubrRr, X::SubrM32, X::SubrM64, X::SubrI16, X::SubrI32],
    [X::MulRr, X::MulM32, X::MulM64, X::MulI16, X::MulI32],
    [X::DivRr, X::DivM32, X::DivM64, X::DivI16, X::DivI32],
    [X::DivrRr, X::DivrM32, X::DivrM64, X::DivrI16, X::DivrI32],
];

fn wide(v: F80) -> [u8; 16] {
    let mut w = [0u8; 16];
    put(&mut w, 0, &v);
    w
}

fn narrow(w: &[u8; 16]) -> F80 {
    take(w, 0)
}

/// Runs `op` on the host with A = `a`, B = `b` and memory image `m` under the guest's
/// control word and condition codes. Updates the guest's C0-C3 and returns the block; the
/// exception flags raised are in `sw & EXC` (see [`signal`]).
fn host(cpu: &mut Cpu, op: X, a: F80, b: F80, m: [u8; 16]) -> X87 {
    let mut io = X87 { a: wide(a), b: wide(b), m, fl: 2, _pad: 0, env: [0; 28], sw: 0, saved_cw: 0 };
    io.env[0..2].copy_from_slice(&(cpu.fpu.fcw | EXC).to_le_bytes());
    io.env[4..6].copy_from_slice(&(cpu.fpu.fsw & CC).to_le_bytes());
    io.env[8..10].copy_from_slice(&0xffffu16.to_le_bytes());
    host_x87(op, &mut io);
    cpu.fpu.fsw = (cpu.fpu.fsw & !CC) | (io.sw & CC);
    io
}

// ---------------------------------------------------------------------------------------
// Register stack
// ---------------------------------------------------------------------------------------

fn top(cpu: &Cpu) -> usize {
    usize::from((cpu.fpu.fsw >> 11) & 7)
}

#[allow(clippy::cast_possible_truncation)] // `t & 7` < 8
fn set_top(cpu: &mut Cpu, t: usize) {
    cpu.fpu.fsw = (cpu.fpu.fsw & !(7 << 11)) | (((t & 7) as u16) << 11);
}

/// Physical register of ST(i).
fn phys(cpu: &Cpu, i: usize) -> usize {
    (top(cpu) + i) & 7
}

fn is_empty(cpu: &Cpu, i: usize) -> bool {
    cpu.fpu.ftw & (1 << phys(cpu, i)) == 0
}

fn get(cpu: &Cpu, i: usize) -> F80 {
    take(st_phys(cpu, phys(cpu, i)), 0)
}

/// Writes ST(i) and tags it valid.
fn set(cpu: &mut Cpu, i: usize, v: F80) {
    let p = phys(cpu, i);
    put(st_phys_mut(cpu, p), 0, &v);
    cpu.fpu.ftw |= 1 << p;
}

fn pop(cpu: &mut Cpu) {
    let p = phys(cpu, 0);
    cpu.fpu.ftw &= !(1 << p);
    set_top(cpu, top(cpu) + 1);
}

/// Pushes without checks (the caller checked ST(7) is free or handled overflow).
fn push_raw(cpu: &mut Cpu, v: F80) {
    set_top(cpu, top(cpu).wrapping_sub(1));
    set(cpu, 0, v);
}

/// Records exception flags `e` (and SF) in FSW; returns the ones unmasked in FCW, after
/// setting ES and B for them.
fn signal(cpu: &mut Cpu, e: u16) -> u16 {
    cpu.fpu.fsw |= e;
    let unmasked = e & EXC & !cpu.fpu.fcw;
    if unmasked != 0 {
        cpu.fpu.fsw |= ES | B;
    }
    unmasked
}

/// Stack underflow (an empty register read): IE|SF with C1 = 0. Returns true if the
/// exception is masked, i.e. the instruction goes on with the indefinite value.
fn underflow(cpu: &mut Cpu) -> bool {
    cpu.fpu.fsw &= !C1;
    signal(cpu, IE | SF) == 0
}

/// Stack overflow on a push: IE|SF with C1 = 1. If masked, the indefinite is pushed.
fn overflow(cpu: &mut Cpu) {
    cpu.fpu.fsw |= C1;
    if signal(cpu, IE | SF) == 0 {
        push_raw(cpu, INDEFINITE);
    }
}

/// Whether a push would overflow (ST(7) holds a value).
fn full(cpu: &Cpu) -> bool {
    !is_empty(cpu, 7)
}

/// Unmasked exceptions that suppress a register result.
const BLOCK_REG: u16 = IE | DE | ZE;
/// Unmasked exceptions that suppress a memory store.
const BLOCK_MEM: u16 = IE | DE | ZE | OE | UE;

/// Full two-bit tag of physical register `p` (FNSTENV/FNSAVE format).
fn full_tag(cpu: &Cpu, p: usize) -> u16 {
    if cpu.fpu.ftw & (1 << p) == 0 {
        return 3;
    }
    let r = st_phys(cpu, p);
    let exp = u16::from_le_bytes(take(r, 8)) & 0x7fff;
    let mant = u64::from_le_bytes(take(r, 0));
    if exp == 0x7fff {
        2
    } else if exp == 0 {
        if mant == 0 {
            1
        } else {
            2
        }
    } else if mant >> 63 == 0 {
        2
    } else {
        0
    }
}

fn full_tag_word(cpu: &Cpu) -> u16 {
    (0..8).fold(0, |w, p| w | (full_tag(cpu, p) << (2 * p)))
}

/// Abridged tag byte from a full tag word.
fn abridge(tw: u16) -> u8 {
    (0..8).fold(0, |t, p| if (tw >> (2 * p)) & 3 != 3 { t | (1 << p) } else { t })
}

// ---------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------

fn la_add(cpu: &Cpu, la: u64, off: u64) -> u64 {
    let a = la.wrapping_add(off);
    if cpu.in_64bit_mode() {
        a
    } else {
        a & 0xffff_ffff
    }
}

/// Reads `n` bytes (n <= 16) at `la` into a zero-padded image.
fn mem_read(cpu: &mut Cpu, bus: &mut dyn Bus, la: u64, n: usize) -> Res<[u8; 16]> {
    let mut out = [0u8; 16];
    let mut k = 0;
    while k < n {
        let chunk = match n - k {
            c if c >= 8 => 8,
            c if c >= 4 => 4,
            c if c >= 2 => 2,
            _ => 1,
        };
        let a = la_add(cpu, la, k as u64);
        let v = cpu.rmem(bus, a, chunk)?;
        put(&mut out, k, prefix(&v.to_le_bytes(), chunk));
        k += chunk;
    }
    Ok(out)
}

/// Writes `data` at `la`, all or nothing with respect to page faults.
fn mem_write(cpu: &mut Cpu, bus: &mut dyn Bus, la: u64, data: &[u8]) -> Res<()> {
    cpu.probe_write(la, data.len(), cpu.user())?;
    let mut k = 0;
    while k < data.len() {
        let chunk = match data.len() - k {
            c if c >= 8 => 8,
            c if c >= 4 => 4,
            c if c >= 2 => 2,
            _ => 1,
        };
        let mut b = [0u8; 8];
        put(&mut b, 0, data.get(k..k + chunk).unwrap_or_default());
        let a = la_add(cpu, la, k as u64);
        cpu.wmem(bus, a, chunk, u64::from_le_bytes(b))?;
        k += chunk;
    }
    Ok(())
}

fn st_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::ST0 as usize) & 7
}

fn fcmov_cc(m: Mnemonic) -> ConditionCode {
    use Mnemonic as M;
    match m {
        M::Fcmovb => ConditionCode::b,
        M::Fcmovnb => ConditionCode::ae,
        M::Fcmove => ConditionCode::e,
        M::Fcmovne => ConditionCode::ne,
        M::Fcmovbe => ConditionCode::be,
        M::Fcmovnbe => ConditionCode::a,
        M::Fcmovu => ConditionCode::p,
        _ => ConditionCode::np,
    }
}

// ---------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------

/// Whether this module implements the mnemonic (besides WAIT and FXSAVE/FXRSTOR).
fn is_x87(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Fadd
            | M::Faddp
            | M::Fiadd
            | M::Fsub
            | M::Fsubp
            | M::Fisub
            | M::Fsubr
            | M::Fsubrp
            | M::Fisubr
            | M::Fmul
            | M::Fmulp
            | M::Fimul
            | M::Fdiv
            | M::Fdivp
            | M::Fidiv
            | M::Fdivr
            | M::Fdivrp
            | M::Fidivr
            | M::Fcom
            | M::Fcomp
            | M::Fcompp
            | M::Fucom
            | M::Fucomp
            | M::Fucompp
            | M::Ficom
            | M::Ficomp
            | M::Fcomi
            | M::Fcomip
            | M::Fucomi
            | M::Fucomip
            | M::Ftst
            | M::Fxam
            | M::Fchs
            | M::Fabs
            | M::Fsqrt
            | M::Frndint
            | M::F2xm1
            | M::Fsin
            | M::Fcos
            | M::Fptan
            | M::Fsincos
            | M::Fxtract
            | M::Fscale
            | M::Fprem
            | M::Fprem1
            | M::Fpatan
            | M::Fyl2x
            | M::Fyl2xp1
            | M::Fld
            | M::Fild
            | M::Fbld
            | M::Fld1
            | M::Fldz
            | M::Fldpi
            | M::Fldl2e
            | M::Fldl2t
            | M::Fldlg2
            | M::Fldln2
            | M::Fst
            | M::Fstp
            | M::Fist
            | M::Fistp
            | M::Fisttp
            | M::Fbstp
            | M::Fxch
            | M::Ffree
            | M::Ffreep
            | M::Fincstp
            | M::Fdecstp
            | M::Fnop
            | M::Fninit
            | M::Finit
            | M::Fnclex
            | M::Fclex
            | M::Fnstcw
            | M::Fstcw
            | M::Fldcw
            | M::Fnstsw
            | M::Fstsw
            | M::Fnstenv
            | M::Fstenv
            | M::Fldenv
            | M::Fnsave
            | M::Fsave
            | M::Frstor
            | M::Fneni
            | M::Fndisi
            | M::Fnsetpm
            | M::Feni
            | M::Fdisi
            | M::Fsetpm
            | M::Fcmovb
            | M::Fcmovnb
            | M::Fcmove
            | M::Fcmovne
            | M::Fcmovbe
            | M::Fcmovnbe
            | M::Fcmovu
            | M::Fcmovnu
    )
}

/// Executes an x87 or FXSAVE-family instruction; returns `Ok(false)` if `insn` is not one.
pub(crate) fn execute(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction) -> SRes<bool> {
    use Mnemonic as M;
    let m = insn.mnemonic();
    match m {
        M::Wait => {
            if cpu.cr0 & (ctl::CR0_MP | ctl::CR0_TS) == (ctl::CR0_MP | ctl::CR0_TS) {
                return Err(Fault::DeviceNotAvailable.into());
            }
            check_pending(cpu)?;
            return Ok(true);
        }
        M::Fxsave | M::Fxsave64 | M::Fxrstor | M::Fxrstor64 => {
            if cpu.cr0 & (ctl::CR0_EM | ctl::CR0_TS) != 0 {
                return Err(Fault::DeviceNotAvailable.into());
            }
            let la = cpu.mem_la(insn);
            if la & 15 != 0 {
                return Err(Fault::GeneralProtection(0).into());
            }
            let wide = matches!(m, M::Fxsave64 | M::Fxrstor64);
            if matches!(m, M::Fxsave | M::Fxsave64) {
                fxsave(cpu, bus, la, wide)?;
            } else {
                fxrstor(cpu, bus, la, wide)?;
            }
            return Ok(true);
        }
        _ => {}
    }
    if !is_x87(m) || (m == M::Fisttp && !crate::cpuid::has(crate::cpuid::Ext::Sse3)) {
        return Ok(false);
    }
    if cpu.cr0 & (ctl::CR0_EM | ctl::CR0_TS) != 0 {
        return Err(Fault::DeviceNotAvailable.into());
    }
    let no_wait = matches!(
        m,
        M::Fninit | M::Fnclex | M::Fnstcw | M::Fnstsw | M::Fnstenv | M::Fnsave | M::Fneni | M::Fndisi | M::Fnsetpm
    );
    if !no_wait {
        check_pending(cpu)?;
    }
    let control = no_wait
        || matches!(
            m,
            M::Finit
                | M::Fclex
                | M::Fstcw
                | M::Fstsw
                | M::Fstenv
                | M::Fsave
                | M::Fldcw
                | M::Fldenv
                | M::Frstor
                | M::Feni
                | M::Fdisi
                | M::Fsetpm
        );
    exec(cpu, bus, insn, m)?;
    if !control {
        // Last non-control instruction: its address, opcode and data operand.
        cpu.fpu.fip = insn.ip();
        cpu.fpu.fop = opcode(cpu, bus, insn);
        if insn.op_count() > 0 && insn.op0_kind() == OpKind::Memory {
            cpu.fpu.fdp = cpu.ea(insn);
        }
    }
    Ok(true)
}

/// FOP: the low three bits of the escape opcode byte and the ModR/M byte (11 bits).
fn opcode(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction) -> u16 {
    let la = cpu.seg_la(Register::CS, insn.ip());
    for k in 0..insn.len() as u64 {
        let Ok(b) = cpu.rmem(bus, la_add(cpu, la, k), 1) else {
            return 0;
        };
        if (0xd8..=0xdf).contains(&b) {
            let modrm = cpu.rmem(bus, la_add(cpu, la, k + 1), 1).unwrap_or(0);
            return low16(((b & 7) << 8) | modrm);
        }
    }
    0
}

fn exec(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction, m: Mnemonic) -> Res<()> {
    use Mnemonic as M;
    let mem = insn.op_count() > 0 && insn.op0_kind() == OpKind::Memory;
    let la = if mem { cpu.mem_la(insn) } else { 0 };
    let msize = insn.memory_size().size();
    let reg = |k: u32| st_index(insn.op_register(k));
    match m {
        M::Fadd
        | M::Faddp
        | M::Fiadd
        | M::Fsub
        | M::Fsubp
        | M::Fisub
        | M::Fsubr
        | M::Fsubrp
        | M::Fisubr
        | M::Fmul
        | M::Fmulp
        | M::Fimul
        | M::Fdiv
        | M::Fdivp
        | M::Fidiv
        | M::Fdivr
        | M::Fdivrp
        | M::Fidivr => {
            let row = match m {
                M::Fadd | M::Faddp | M::Fiadd => 0,
                M::Fsub | M::Fsubp | M::Fisub => 1,
                M::Fsubr | M::Fsubrp | M::Fisubr => 2,
                M::Fmul | M::Fmulp | M::Fimul => 3,
                M::Fdiv | M::Fdivp | M::Fidiv => 4,
                _ => 5,
            };
            let popping = matches!(m, M::Faddp | M::Fsubp | M::Fsubrp | M::Fmulp | M::Fdivp | M::Fdivrp);
            let int = matches!(m, M::Fiadd | M::Fisub | M::Fisubr | M::Fimul | M::Fidiv | M::Fidivr);
            let (dst, src, col, img) = if mem {
                let col = match (int, msize) {
                    (false, 4) => 1,
                    (false, _) => 2,
                    (true, 2) => 3,
                    (true, _) => 4,
                };
                (0, None, col, mem_read(cpu, bus, la, msize)?)
            } else {
                (reg(0), Some(reg(1)), 0, [0; 16])
            };
            if is_empty(cpu, dst) || src.is_some_and(|s| is_empty(cpu, s)) {
                if underflow(cpu) {
                    set(cpu, dst, INDEFINITE);
                    if popping {
                        pop(cpu);
                    }
                }
                return Ok(());
            }
            let b = src.map(|s| get(cpu, s)).unwrap_or_default();
            let io = host(cpu, arith_op(row, col), get(cpu, dst), b, img);
            if signal(cpu, io.sw & EXC) & BLOCK_REG == 0 {
                set(cpu, dst, narrow(&io.a));
                if popping {
                    pop(cpu);
                }
            }
        }
        M::Fcom | M::Fcomp | M::Fcompp | M::Fucom | M::Fucomp | M::Fucompp | M::Ficom | M::Ficomp | M::Ftst => {
            let pops = match m {
                M::Fcomp | M::Fucomp | M::Ficomp => 1,
                M::Fcompp | M::Fucompp => 2,
                _ => 0,
            };
            let unordered = matches!(m, M::Fucom | M::Fucomp | M::Fucompp);
            let (op, src, img) = if m == M::Ftst {
                (X::Tst, None, [0; 16])
            } else if mem {
                let op = match (matches!(m, M::Ficom | M::Ficomp), msize) {
                    (false, 4) => X::ComM32,
                    (false, _) => X::ComM64,
                    (true, 2) => X::ComI16,
                    (true, _) => X::ComI32,
                };
                (op, None, mem_read(cpu, bus, la, msize)?)
            } else {
                let s = if insn.op_count() > 1 { reg(1) } else { 1 };
                (if unordered { X::UcomRr } else { X::ComRr }, Some(s), [0; 16])
            };
            if is_empty(cpu, 0) || src.is_some_and(|s| is_empty(cpu, s)) {
                if underflow(cpu) {
                    cpu.fpu.fsw |= C0 | C2 | C3;
                    for _ in 0..pops {
                        pop(cpu);
                    }
                }
                return Ok(());
            }
            let b = src.map(|s| get(cpu, s)).unwrap_or_default();
            let io = host(cpu, op, get(cpu, 0), b, img);
            if signal(cpu, io.sw & EXC) & BLOCK_REG == 0 {
                for _ in 0..pops {
                    pop(cpu);
                }
            }
        }
        M::Fcomi | M::Fcomip | M::Fucomi | M::Fucomip => {
            let s = reg(1);
            let popping = matches!(m, M::Fcomip | M::Fucomip);
            if is_empty(cpu, 0) || is_empty(cpu, s) {
                if underflow(cpu) {
                    cpu.rflags = (cpu.rflags & !ARITH) | ZF | PF | CF;
                    if popping {
                        pop(cpu);
                    }
                }
                return Ok(());
            }
            let op = if matches!(m, M::Fcomi | M::Fcomip) { X::ComiRr } else { X::UcomiRr };
            let io = host(cpu, op, get(cpu, 0), get(cpu, s), [0; 16]);
            if signal(cpu, io.sw & EXC) & BLOCK_REG == 0 {
                cpu.rflags = (cpu.rflags & !ARITH) | (io.fl & ARITH);
                if popping {
                    pop(cpu);
                }
            }
        }
        M::Fxam => {
            if is_empty(cpu, 0) {
                // Empty: C3 = 1, C2 = 0, C0 = 1; C1 is the sign of the stale contents.
                let sign = st_phys(cpu, phys(cpu, 0))[9] & 0x80 != 0;
                cpu.fpu.fsw = (cpu.fpu.fsw & !CC) | C3 | C0 | if sign { C1 } else { 0 };
                return Ok(());
            }
            let io = host(cpu, X::Xam, get(cpu, 0), [0; 10], [0; 16]);
            signal(cpu, io.sw & EXC);
        }
        M::Fchs | M::Fabs | M::Fsqrt | M::Frndint | M::F2xm1 | M::Fsin | M::Fcos => {
            if is_empty(cpu, 0) {
                if underflow(cpu) {
                    set(cpu, 0, INDEFINITE);
                }
                return Ok(());
            }
            let op = match m {
                M::Fchs => X::Chs,
                M::Fabs => X::Abs,
                M::Fsqrt => X::Sqrt,
                M::Frndint => X::Rndint,
                M::F2xm1 => X::F2xm1,
                M::Fsin => X::Sin,
                _ => X::Cos,
            };
            let io = host(cpu, op, get(cpu, 0), [0; 10], [0; 16]);
            if signal(cpu, io.sw & EXC) & BLOCK_REG == 0 {
                set(cpu, 0, narrow(&io.a));
            }
        }
        M::Fptan | M::Fsincos | M::Fxtract => {
            if is_empty(cpu, 0) || full(cpu) {
                let over = !is_empty(cpu, 0);
                if over {
                    cpu.fpu.fsw |= C1;
                } else {
                    cpu.fpu.fsw &= !C1;
                }
                if signal(cpu, IE | SF) == 0 {
                    set(cpu, 0, INDEFINITE);
                    push_raw(cpu, INDEFINITE);
                }
                return Ok(());
            }
            let op = match m {
                M::Fptan => X::Ptan,
                M::Fsincos => X::Sincos,
                _ => X::Xtract,
            };
            let io = host(cpu, op, get(cpu, 0), [0; 10], [0; 16]);
            let partial = m != M::Fxtract && io.sw & C2 != 0;
            if signal(cpu, io.sw & EXC) & BLOCK_REG == 0 && !partial {
                set(cpu, 0, narrow(&io.a));
                push_raw(cpu, narrow(&io.b));
            }
        }
        M::Fscale | M::Fprem | M::Fprem1 | M::Fpatan | M::Fyl2x | M::Fyl2xp1 => {
            let to_st1 = matches!(m, M::Fpatan | M::Fyl2x | M::Fyl2xp1);
            if is_empty(cpu, 0) || is_empty(cpu, 1) {
                if underflow(cpu) {
                    if to_st1 {
                        set(cpu, 1, INDEFINITE);
                        pop(cpu);
                    } else {
                        set(cpu, 0, INDEFINITE);
                    }
                }
                return Ok(());
            }
            let op = match m {
                M::Fscale => X::Scale,
                M::Fprem => X::Prem,
                M::Fprem1 => X::Prem1,
                M::Fpatan => X::Patan,
                M::Fyl2x => X::Yl2x,
                _ => X::Yl2xp1,
            };
            let io = host(cpu, op, get(cpu, 0), get(cpu, 1), [0; 16]);
            if signal(cpu, io.sw & EXC) & BLOCK_REG == 0 {
                if to_st1 {
                    set(cpu, 1, narrow(&io.b));
                    pop(cpu);
                } else {
                    set(cpu, 0, narrow(&io.a));
                }
            }
        }
        M::Fld | M::Fild | M::Fbld | M::Fld1 | M::Fldz | M::Fldpi | M::Fldl2e | M::Fldl2t | M::Fldlg2 | M::Fldln2 => {
            if !mem && m == M::Fld {
                // FLD ST(i): the source is read before the push.
                let s = reg(0);
                let v = if is_empty(cpu, s) {
                    if !underflow(cpu) {
                        return Ok(());
                    }
                    INDEFINITE
                } else {
                    get(cpu, s)
                };
                if full(cpu) {
                    overflow(cpu);
                } else {
                    cpu.fpu.fsw &= !C1;
                    push_raw(cpu, v);
                }
                return Ok(());
            }
            let img = if mem { mem_read(cpu, bus, la, msize)? } else { [0; 16] };
            if full(cpu) {
                overflow(cpu);
                return Ok(());
            }
            if m == M::Fld && msize == 10 {
                cpu.fpu.fsw &= !C1;
                push_raw(cpu, narrow(&img));
                return Ok(());
            }
            let op = match m {
                M::Fld if msize == 4 => X::LdM32,
                M::Fld => X::LdM64,
                M::Fild if msize == 2 => X::IldI16,
                M::Fild if msize == 4 => X::IldI32,
                M::Fild => X::IldI64,
                M::Fbld => X::Bld,
                M::Fld1 => X::Ld1,
                M::Fldz => X::Ldz,
                M::Fldpi => X::Ldpi,
                M::Fldl2e => X::Ldl2e,
                M::Fldl2t => X::Ldl2t,
                M::Fldlg2 => X::Ldlg2,
                _ => X::Ldln2,
            };
            let io = host(cpu, op, [0; 10], [0; 10], img);
            if signal(cpu, io.sw & EXC) & BLOCK_REG == 0 {
                push_raw(cpu, narrow(&io.a));
            }
        }
        M::Fst | M::Fstp | M::Fist | M::Fistp | M::Fisttp | M::Fbstp => {
            let popping = matches!(m, M::Fstp | M::Fistp | M::Fisttp | M::Fbstp);
            if !mem {
                // FST/FSTP ST(i).
                let d = reg(0);
                if is_empty(cpu, 0) {
                    if !underflow(cpu) {
                        return Ok(());
                    }
                    set(cpu, d, INDEFINITE);
                } else {
                    cpu.fpu.fsw &= !C1;
                    let v = get(cpu, 0);
                    set(cpu, d, v);
                }
                if popping {
                    pop(cpu);
                }
                return Ok(());
            }
            cpu.probe_write(la, msize, cpu.user())?;
            let int = matches!(m, M::Fist | M::Fistp | M::Fisttp);
            let bytes: [u8; 16] = if is_empty(cpu, 0) {
                if !underflow(cpu) {
                    return Ok(());
                }
                // Masked response: the indefinite of the destination format.
                let mut w = [0u8; 16];
                match (int, msize) {
                    (false, 4) => w[..4].copy_from_slice(&0xffc0_0000u32.to_le_bytes()),
                    (false, 8) => w[..8].copy_from_slice(&0xfff8_0000_0000_0000u64.to_le_bytes()),
                    (true, 2) => w[..2].copy_from_slice(&0x8000u16.to_le_bytes()),
                    (true, 4) => w[..4].copy_from_slice(&0x8000_0000u32.to_le_bytes()),
                    (true, _) => w[..8].copy_from_slice(&(1u64 << 63).to_le_bytes()),
                    (false, _) => w[..10].copy_from_slice(&INDEFINITE),
                }
                w
            } else if m != M::Fbstp && !int && msize == 10 {
                cpu.fpu.fsw &= !C1;
                wide(get(cpu, 0))
            } else {
                let op = match (m, msize) {
                    (M::Fbstp, _) => X::Bstp,
                    (M::Fst | M::Fstp, 4) => X::StM32,
                    (M::Fst | M::Fstp, _) => X::StM64,
                    (M::Fisttp, 2) => X::IsttI16,
                    (M::Fisttp, 4) => X::IsttI32,
                    (M::Fisttp, _) => X::IsttI64,
                    (_, 2) => X::IstI16,
                    (_, 4) => X::IstI32,
                    _ => X::IstI64,
                };
                let io = host(cpu, op, get(cpu, 0), [0; 10], [0; 16]);
                if signal(cpu, io.sw & EXC) & BLOCK_MEM != 0 {
                    return Ok(());
                }
                io.m
            };
            mem_write(cpu, bus, la, prefix(&bytes, msize))?;
            if popping {
                pop(cpu);
            }
        }
        M::Fxch => {
            let s = reg(1);
            if is_empty(cpu, 0) || is_empty(cpu, s) {
                if !underflow(cpu) {
                    return Ok(());
                }
                for i in [0, s] {
                    if is_empty(cpu, i) {
                        set(cpu, i, INDEFINITE);
                    }
                }
            } else {
                cpu.fpu.fsw &= !C1;
            }
            let (a, b) = (get(cpu, 0), get(cpu, s));
            set(cpu, 0, b);
            set(cpu, s, a);
        }
        M::Fcmovb | M::Fcmovnb | M::Fcmove | M::Fcmovne | M::Fcmovbe | M::Fcmovnbe | M::Fcmovu | M::Fcmovnu => {
            let s = reg(1);
            if is_empty(cpu, 0) || is_empty(cpu, s) {
                if underflow(cpu) {
                    set(cpu, 0, INDEFINITE);
                }
                return Ok(());
            }
            if crate::cpu::cond(cpu, fcmov_cc(m)) {
                let v = get(cpu, s);
                set(cpu, 0, v);
            }
        }
        M::Ffree | M::Ffreep => {
            let p = phys(cpu, reg(0));
            cpu.fpu.ftw &= !(1 << p);
            if m == M::Ffreep {
                pop(cpu);
            }
        }
        M::Fincstp | M::Fdecstp => {
            let t = if m == M::Fincstp { top(cpu) + 1 } else { top(cpu).wrapping_sub(1) };
            set_top(cpu, t);
            cpu.fpu.fsw &= !C1;
        }
        M::Fnop | M::Fneni | M::Fndisi | M::Fnsetpm | M::Feni | M::Fdisi | M::Fsetpm => {}
        M::Fninit | M::Finit => init(cpu),
        M::Fnclex | M::Fclex => cpu.fpu.fsw &= !(EXC | SF | ES | B),
        M::Fnstcw | M::Fstcw => cpu.wmem(bus, la, 2, u64::from(cpu.fpu.fcw))?,
        M::Fldcw => {
            let v = low16(cpu.rmem(bus, la, 2)?);
            set_fcw(cpu, v);
        }
        M::Fnstsw | M::Fstsw => {
            let v = u64::from(cpu.fpu.fsw);
            if mem {
                cpu.wmem(bus, la, 2, v)?;
            } else {
                cpu.set_reg(Register::AX, v);
            }
        }
        M::Fnstenv | M::Fstenv => {
            let env = env_image(cpu, msize == 14);
            mem_write(cpu, bus, la, prefix(&env, msize))?;
            // FNSTENV masks all exceptions after saving.
            cpu.fpu.fcw |= EXC;
        }
        M::Fldenv => {
            let img = read_block(cpu, bus, la, msize)?;
            load_env(cpu, &img, msize == 14);
        }
        M::Fnsave | M::Fsave => {
            let small = msize == 94;
            let env_len = if small { 14 } else { 28 };
            let mut img = env_image(cpu, small);
            for i in 0..8 {
                let o = env_len + 10 * i;
                put(&mut img, o, &get(cpu, i));
            }
            mem_write(cpu, bus, la, prefix(&img, msize))?;
            init(cpu);
        }
        M::Frstor => {
            let small = msize == 94;
            let env_len = if small { 14 } else { 28 };
            let img = read_block(cpu, bus, la, msize)?;
            load_env(cpu, &img, small);
            for i in 0..8 {
                let o = env_len + 10 * i;
                let v: F80 = take(&img, o);
                let p = phys(cpu, i);
                put(st_phys_mut(cpu, p), 0, &v);
            }
        }
        _ => return Err(Fault::InvalidOpcode),
    }
    Ok(())
}

/// FNINIT state (SDM Vol. 2 FINIT/FNINIT): default control word, everything else clear,
/// all registers empty (their contents are kept).
fn init(cpu: &mut Cpu) {
    cpu.fpu.fcw = 0x037f;
    cpu.fpu.fsw = 0;
    cpu.fpu.ftw = 0;
    cpu.fpu.fop = 0;
    cpu.fpu.fip = 0;
    cpu.fpu.fdp = 0;
}

/// Loads FCW (reserved bits: 6 reads as one, 13-15 as zero) and re-evaluates whether an
/// exception is pending against the new masks.
fn set_fcw(cpu: &mut Cpu, v: u16) {
    cpu.fpu.fcw = (v & 0x1f3f) | 0x40;
    if cpu.fpu.fsw & EXC & !cpu.fpu.fcw != 0 {
        cpu.fpu.fsw |= ES | B;
    } else {
        cpu.fpu.fsw &= !(ES | B);
    }
}

fn read_block(cpu: &mut Cpu, bus: &mut dyn Bus, la: u64, n: usize) -> Res<Vec<u8>> {
    let mut out = Vec::with_capacity(n + 8);
    let mut k = 0;
    while k < n {
        let c = (n - k).min(8);
        let img = mem_read(cpu, bus, la_add(cpu, la, k as u64), c)?;
        out.extend_from_slice(prefix(&img, c));
        k += c;
    }
    Ok(out)
}

/// The FNSTENV image, protected-mode format: 14 bytes (16-bit) or 28 bytes (32-bit, also
/// used in 64-bit mode). Selectors are stored as zero (the CS/DS of the last instruction
/// are not tracked; recent processors deprecate them too). Reserved halves read as ones.
fn env_image(cpu: &Cpu, small: bool) -> [u8; 108] {
    let mut e = [0u8; 108];
    let tw = full_tag_word(cpu);
    let fop = u32::from(cpu.fpu.fop & 0x7ff);
    if small {
        let words = [cpu.fpu.fcw, cpu.fpu.fsw, tw, low16(cpu.fpu.fip), 0, low16(cpu.fpu.fdp), 0];
        for (i, w) in words.iter().enumerate() {
            put(&mut e, 2 * i, &w.to_le_bytes());
        }
    } else {
        let dwords = [
            0xffff_0000 | u32::from(cpu.fpu.fcw),
            0xffff_0000 | u32::from(cpu.fpu.fsw),
            0xffff_0000 | u32::from(tw),
            low32(cpu.fpu.fip),
            fop << 16,
            low32(cpu.fpu.fdp),
            0xffff_0000,
        ];
        for (i, d) in dwords.iter().enumerate() {
            put(&mut e, 4 * i, &d.to_le_bytes());
        }
    }
    e
}

/// FLDENV from a protected-mode image.
fn load_env(cpu: &mut Cpu, img: &[u8], small: bool) {
    let w = |o: usize| u16::from_le_bytes(take(img, o));
    let d = |o: usize| u32::from_le_bytes(take(img, o));
    let (fcw, fsw, tw) = if small {
        cpu.fpu.fip = u64::from(w(6));
        cpu.fpu.fdp = u64::from(w(10));
        (w(0), w(2), w(4))
    } else {
        cpu.fpu.fip = u64::from(d(12));
        cpu.fpu.fop = ((d(16) >> 16) & 0x7ff) as u16;
        cpu.fpu.fdp = u64::from(d(20));
        (w(0), w(4), w(8))
    };
    cpu.fpu.fsw = fsw;
    cpu.fpu.ftw = abridge(tw);
    set_fcw(cpu, fcw);
}

/// FXSAVE/FXSAVE64 (SDM Vol. 2 FXSAVE, Tables 3-53/3-56). `wide` selects the 64-bit
/// format (REX.W) with 64-bit FIP/FDP. Bytes 416-511 are not written.
fn fxsave(cpu: &mut Cpu, bus: &mut dyn Bus, la: u64, wide: bool) -> Res<()> {
    let mut img = [0u8; 416];
    put(&mut img, 0, &cpu.fpu.fcw.to_le_bytes());
    put(&mut img, 2, &cpu.fpu.fsw.to_le_bytes());
    img[4] = cpu.fpu.ftw;
    put(&mut img, 6, &(cpu.fpu.fop & 0x7ff).to_le_bytes());
    if wide {
        put(&mut img, 8, &cpu.fpu.fip.to_le_bytes());
        put(&mut img, 16, &cpu.fpu.fdp.to_le_bytes());
    } else {
        put(&mut img, 8, &low32(cpu.fpu.fip).to_le_bytes());
        put(&mut img, 16, &low32(cpu.fpu.fdp).to_le_bytes());
    }
    put(&mut img, 24, &cpu.fpu.mxcsr.to_le_bytes());
    put(&mut img, 28, &MXCSR_MASK.to_le_bytes());
    for i in 0..8 {
        let o = 32 + 16 * i;
        put(&mut img, o, &get(cpu, i));
    }
    let nx = if cpu.in_64bit_mode() { 16 } else { 8 };
    for (i, x) in cpu.fpu.xmm.iter().take(nx).enumerate() {
        put(&mut img, 160 + 16 * i, &x.to_le_bytes());
    }
    let len = 160 + 16 * nx;
    mem_write(cpu, bus, la, prefix(&img, len))
}

/// FXRSTOR/FXRSTOR64. Reserved MXCSR bits set in the image raise #GP(0).
fn fxrstor(cpu: &mut Cpu, bus: &mut dyn Bus, la: u64, wide: bool) -> Res<()> {
    let nx = if cpu.in_64bit_mode() { 16 } else { 8 };
    let img = read_block(cpu, bus, la, 160 + 16 * nx)?;
    let w = |o: usize| u16::from_le_bytes(take(&img, o));
    let d = |o: usize| u32::from_le_bytes(take(&img, o));
    let q = |o: usize| u64::from(d(o)) | (u64::from(d(o + 4)) << 32);
    let mxcsr = d(24);
    if mxcsr & !MXCSR_MASK != 0 {
        return Err(Fault::GeneralProtection(0));
    }
    cpu.fpu.mxcsr = mxcsr;
    cpu.fpu.fcw = w(0);
    cpu.fpu.fsw = w(2);
    cpu.fpu.ftw = img.get(4).copied().unwrap_or(0);
    cpu.fpu.fop = w(6) & 0x7ff;
    if wide {
        cpu.fpu.fip = q(8);
        cpu.fpu.fdp = q(16);
    } else {
        cpu.fpu.fip = u64::from(d(8));
        cpu.fpu.fdp = u64::from(d(16));
    }
    for i in 0..8 {
        let o = 32 + 16 * i;
        let p = phys(cpu, i);
        let v: F80 = take(&img, o);
        put(st_phys_mut(cpu, p), 0, &v);
    }
    for (i, x) in cpu.fpu.xmm.iter_mut().take(nx).enumerate() {
        *x = u128::from_le_bytes(take(&img, 160 + 16 * i));
    }
    Ok(())
}
