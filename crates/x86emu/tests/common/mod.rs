//! Differential-testing harness: runs a code snippet natively on the host CPU and in the
//! emulator, from the same initial state, and returns both final states.
//!
//! A 64 KiB block of host memory (64 KiB aligned) holds the snippet, its input and output
//! areas and scratch memory. The host runs the block in place (it is made RWX with the
//! `mprotect` system call, issued with inline assembly since `libc` is not a dependency).
//! The emulator runs the *same* bytes: its page tables map the block's host virtual
//! addresses onto guest RAM that is the block itself, so every address — code, data,
//! stack — is identical in both runs and outputs compare directly.
//!
//! Snippet layout: prologue (save host callee-saved registers, RSP, MXCSR and FCW; load the
//! input MXCSR, XMM0-15, optionally x87 registers and MMX registers, RSP, RFLAGS and the
//! other general registers), the instructions under test, then an epilogue that stores all
//! of that state (FXSAVE64 for x87 forms) and returns to the host.
//!
//! The emulator is started through an external interrupt (vector 0x20) whose IDT gate
//! points at the snippet, with the interrupted RIP at a `hlt`: the snippet's final `ret`
//! lands there and the CPU stops with `Exit::HaltedForever` (IF = 0). Starting through an
//! interrupt also wakes the CPU from the previous run's `hlt`, so one `Cpu` (and its 4 MB
//! decode cache) serves many runs. Exceptions vector to per-vector `hlt` stubs, so a fault
//! shows as the CPU halted in a stub.
#![allow(dead_code)]

use iced_x86::code_asm::*;
use iced_x86::IcedError;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::arch::asm;
use x86emu::cpu::FpuState;
use x86emu::{Bus, Cpu, CpuConfig, Exit, RamRegion, Seg};

pub const BLOCK: usize = 0x10000;
pub const CODE: usize = 0x0000;
pub const HANDLERS: usize = 0x4000;
pub const HLT_STUB: usize = 0x4400;
pub const GDT: usize = 0x5000;
pub const IDT: usize = 0x5100;
pub const IN: usize = 0x6000;
pub const OUT: usize = 0x6800;
pub const SAVE: usize = 0x7000;
pub const FX_OUT: usize = 0x7200;
pub const EMU_STACK_TOP: usize = 0x8000;
/// Scratch memory, compared after every run (includes the test stack at the top).
pub const SCRATCH: usize = 0x8000;
pub const SCRATCH_LEN: usize = 0x8000;
/// Initial RSP of the code under test.
pub const STACK_PTR: usize = 0xf800;
const ENTRY_VECTOR: usize = 0x20;
const PT_GPA: u64 = 0;
const PT_SIZE: usize = 0x10000;
const BLOCK_GPA: u64 = 0x10_0000;

// Input/output state area offsets.
const S_FLAGS: usize = 0x80;
const S_MXCSR: usize = 0x88;
const S_FCW: usize = 0x8c;
const S_X87: usize = 0xa0;
const S_MM: usize = 0x120;
const S_XMM: usize = 0x200;

pub const RAX: usize = 0;
pub const RCX: usize = 1;
pub const RDX: usize = 2;
pub const RBX: usize = 3;
pub const RSP: usize = 4;
pub const RBP: usize = 5;
pub const RSI: usize = 6;
pub const RDI: usize = 7;
pub const R8: usize = 8;
pub const R9: usize = 9;
pub const R10: usize = 10;
pub const R11: usize = 11;
pub const R12: usize = 12;
pub const R13: usize = 13;
pub const R14: usize = 14;
pub const R15: usize = 15;

pub const CF: u64 = 1;
pub const PF: u64 = 4;
pub const AF: u64 = 0x10;
pub const ZF: u64 = 0x40;
pub const SF: u64 = 0x80;
pub const DF: u64 = 0x400;
pub const OF: u64 = 0x800;
pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;

const GPRS: [AsmRegister64; 16] = [rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15];
const XMMS: [AsmRegisterXmm; 16] =
    [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13, xmm14, xmm15];
const MMS: [AsmRegisterMm; 8] = [mm0, mm1, mm2, mm3, mm4, mm5, mm6, mm7];

/// xorshift64* pseudo-random numbers (fixed seeds: runs are reproducible).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
    pub fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

/// Edge values of integer operands (for every operand width).
pub const EDGES: [u64; 24] = [
    0,
    1,
    2,
    3,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    0xffff_ffff_ffff_ffff,
    0xffff_ffff_ffff_fffe,
    0x8000_0000_0000_0001,
    0x5555_5555_5555_5555,
    0xaaaa_aaaa_aaaa_aaaa,
    0x0123_4567_89ab_cdef,
];

/// An integer operand: edge values (optionally with random bits above a random width),
/// small signed numbers, sign-extended random values and fully random ones.
pub fn int_val(r: &mut Rng) -> u64 {
    match r.below(6) {
        0 => r.pick(&EDGES),
        1 => {
            let w = r.pick(&[8u32, 16, 32]);
            (r.pick(&EDGES) & ((1u64 << w) - 1)) | (r.next() << w)
        }
        2 => (r.below(65) as i64 - 32) as u64,
        3 => {
            let w = r.pick(&[8u32, 16, 32]);
            let v = r.next() & ((1u64 << w) - 1);
            let s = 64 - w;
            (((v << s) as i64) >> s) as u64
        }
        _ => r.next(),
    }
}

/// f32 edge values: zeros, ones, infinities, NaNs (quiet and signalling), denormals,
/// extremes and rounding-sensitive values.
pub const F32_EDGES: [u32; 20] = [
    0x0000_0000,
    0x8000_0000,
    0x3f80_0000,
    0xbf80_0000,
    0x7f80_0000,
    0xff80_0000,
    0x7fc0_0000,
    0xffc0_0000,
    0x7f80_0001,
    0x7fa0_0000,
    0x0000_0001,
    0x807f_ffff,
    0x0080_0000,
    0x7f7f_ffff,
    0xff7f_ffff,
    0x4f00_0000,
    0xcf00_0000,
    0x3eaa_aaab,
    0x4b80_0000,
    0x3f00_0000,
];

pub const F64_EDGES: [u64; 20] = [
    0,
    0x8000_0000_0000_0000,
    0x3ff0_0000_0000_0000,
    0xbff0_0000_0000_0000,
    0x7ff0_0000_0000_0000,
    0xfff0_0000_0000_0000,
    0x7ff8_0000_0000_0000,
    0xfff8_0000_0000_0000,
    0x7ff0_0000_0000_0001,
    0x7ff4_0000_0000_0000,
    0x0000_0000_0000_0001,
    0x800f_ffff_ffff_ffff,
    0x0010_0000_0000_0000,
    0x7fef_ffff_ffff_ffff,
    0x43e0_0000_0000_0000,
    0xc3e0_0000_0000_0000,
    0x41e0_0000_0000_0000,
    0xc1e0_0000_0000_0000,
    0x3fd5_5555_5555_5555,
    0x3fe0_0000_0000_0000,
];

pub fn f32_val(r: &mut Rng) -> u32 {
    match r.below(4) {
        0 | 1 => r.pick(&F32_EDGES),
        2 => {
            // A moderate number (sign, exponent near 0).
            let e = 127u32.wrapping_add(r.below(64) as u32).wrapping_sub(32) & 0xff;
            ((r.next() as u32) & 0x807f_ffff) | (e << 23)
        }
        _ => r.next() as u32,
    }
}

pub fn f64_val(r: &mut Rng) -> u64 {
    match r.below(4) {
        0 | 1 => r.pick(&F64_EDGES),
        2 => {
            let e = (1023 + r.below(128) - 64) & 0x7ff;
            (r.next() & 0x800f_ffff_ffff_ffff) | (e << 52)
        }
        _ => r.next(),
    }
}

/// A 128-bit vector: random bits, four f32 lanes, two f64 lanes, or integer edges.
pub fn xmm_val(r: &mut Rng) -> u128 {
    match r.below(5) {
        0 => (0..4).fold(0, |v, i| v | (u128::from(f32_val(r)) << (32 * i))),
        1 => (0..2).fold(0, |v, i| v | (u128::from(f64_val(r)) << (64 * i))),
        2 => u128::from(int_val(r)) | (u128::from(int_val(r)) << 64),
        3 => {
            // Bytes/words from a small set so that equal lanes occur.
            let set = [0u8, 0x80, 0x7f, 0xff, 1, 0x41];
            (0..16).fold(0, |v, i| v | (u128::from(r.pick(&set)) << (8 * i)))
        }
        _ => u128::from(r.next()) | (u128::from(r.next()) << 64),
    }
}

/// 80-bit extended values: edge values and random finite numbers.
pub fn f80_val(r: &mut Rng) -> [u8; 10] {
    let (mant, se): (u64, u16) = match r.below(8) {
        0 => r.pick(&[
            (0, 0),
            (0, 0x8000),
            (1 << 63, 0x3fff),
            (1 << 63, 0xbfff),
            (1 << 63, 0x7fff),
            (1 << 63, 0xffff),
            (0xc000_0000_0000_0000, 0x7fff),
            (0xc000_0000_0000_0000, 0xffff),
            (0xa000_0000_0000_0000, 0x7fff),
            (1, 0),
            (0x8000_0000_0000_0001, 0x0001),
            (u64::MAX, 0x7ffe),
            (u64::MAX, 0x3ffe),
            (0xc90f_daa2_2168_c235, 0x4000),
            (0xc90f_daa2_2168_c235, 0x403f),
            (1 << 63, 0x403e),
        ]),
        1 => (r.next() | (1 << 63), (0x3fff - 70 + r.below(140) as u16) | ((r.below(2) as u16) << 15)),
        2 => {
            // An integer value (exact in every integer format), possibly negative.
            let n = r.below(1 << 20) + 1;
            let lz = n.leading_zeros();
            (n << lz, (0x3fff + 63 - lz as u16) | (r.below(2) as u16) << 15)
        }
        3 => (r.next() | (1 << 63), (0x3fff - 16000 + r.below(32000)) as u16 | (r.below(2) as u16) << 15),
        _ => (r.next() | (1 << 63), (0x3fff - 20 + r.below(40) as u16) | ((r.below(2) as u16) << 15)),
    };
    let mut v = [0u8; 10];
    v[..8].copy_from_slice(&mant.to_le_bytes());
    v[8..].copy_from_slice(&se.to_le_bytes());
    v
}

/// 80-bit value of an f64 (exact).
pub fn f80_from_f64(v: f64) -> [u8; 10] {
    let b = v.to_bits();
    let sign = ((b >> 63) as u16) << 15;
    let e = ((b >> 52) & 0x7ff) as i32;
    let m = b & ((1 << 52) - 1);
    let mut out = [0u8; 10];
    if e == 0 && m == 0 {
        out[8..].copy_from_slice(&sign.to_le_bytes());
        return out;
    }
    let mant = (1u64 << 63) | (m << 11);
    let exp = (e - 1023 + 16383) as u16 | sign;
    out[..8].copy_from_slice(&mant.to_le_bytes());
    out[8..].copy_from_slice(&exp.to_le_bytes());
    out
}

/// Initial state of one run.
#[derive(Clone, Debug)]
pub struct State {
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub mxcsr: u32,
    pub fcw: u16,
    /// x87 registers, ST(0) first (the form says how many are loaded).
    pub x87: Vec<[u8; 10]>,
    pub mm: [u64; 8],
    pub xmm: [u128; 16],
    pub scratch: Vec<u8>,
}

impl State {
    /// Random registers and scratch memory, random arithmetic flags and DF, default MXCSR
    /// and FCW, RSP at [`STACK_PTR`].
    pub fn random(r: &mut Rng, base: u64) -> State {
        let mut gpr = [0u64; 16];
        for g in gpr.iter_mut() {
            *g = int_val(r);
        }
        gpr[RSP] = base + STACK_PTR as u64;
        let mut scratch = vec![0u8; SCRATCH_LEN];
        for c in scratch.chunks_mut(8) {
            c.copy_from_slice(&r.next().to_le_bytes());
        }
        State {
            gpr,
            rflags: (r.next() & (ARITH | DF)) | 2,
            mxcsr: 0x1f80,
            fcw: 0x037f,
            x87: (0..8).map(|_| f80_val(r)).collect(),
            mm: [0; 8].map(|_: u64| int_val(r)),
            xmm: [0; 16].map(|_: u128| xmm_val(r)),
            scratch,
        }
    }

    /// A random MXCSR with all exceptions masked: random rounding, DAZ, FTZ and flags.
    pub fn random_mxcsr(&mut self, r: &mut Rng) {
        self.mxcsr = 0x1f80 | ((r.next() as u32) & 0xe07f);
    }
}

/// Final state of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct Out {
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub mxcsr: u32,
    pub xmm: [u128; 16],
    pub mm: [u64; 8],
    pub fx: Vec<u8>,
    pub mem: Vec<u8>,
}

/// Emits the instructions under test.
pub type Emit = Box<dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>>;

/// A snippet under test.
pub struct Form {
    pub name: String,
    pub emit: Emit,
    /// Number of x87 registers loaded from the state (and FXSAVE64 of the final state).
    pub x87: usize,
    /// Load and store MM0-7.
    pub mmx: bool,
    /// RFLAGS bits compared.
    pub flags: u64,
}

impl Form {
    pub fn new(name: impl Into<String>, emit: impl Fn(&mut CodeAssembler) -> Result<(), IcedError> + 'static) -> Form {
        Form { name: name.into(), emit: Box::new(emit), x87: 0, mmx: false, flags: ARITH | DF }
    }
    pub fn x87(mut self, n: usize) -> Form {
        self.x87 = n;
        self
    }
    pub fn mmx(mut self) -> Form {
        self.mmx = true;
        self
    }
    pub fn flags(mut self, f: u64) -> Form {
        self.flags = f;
        self
    }
}

/// How an emulator run ended, when not at the final `hlt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EmuEnd {
    /// An exception was delivered to the stub of this vector.
    Fault(u8),
    /// `Cpu::run` returned this.
    Exit(Exit),
}

struct TestBus {
    pending: bool,
}

impl Bus for TestBus {
    fn io_in(&mut self, _: u16, _: u8) -> u32 {
        !0
    }
    fn io_out(&mut self, _: u16, _: u8, _: u32) {}
    fn mmio_read(&mut self, _: u64, _: u8) -> u64 {
        !0
    }
    fn mmio_write(&mut self, _: u64, _: u8, _: u64) {}
    fn interrupt_pending(&mut self) -> bool {
        self.pending
    }
    fn ack_interrupt(&mut self) -> Option<u8> {
        self.pending = false;
        Some(ENTRY_VECTOR as u8)
    }
    fn now_ns(&mut self) -> u64 {
        0
    }
}

/// `mprotect(2)` through a raw system call (x86-64 Linux, number 10).
///
/// # Safety
/// `addr..addr+len` must be memory this process owns, page aligned.
unsafe fn mprotect(addr: *mut u8, len: usize, prot: u64) -> i64 {
    let ret: i64;
    // SAFETY: the caller guarantees the range; the syscall clobbers RCX and R11 only.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") 10i64 => ret,
            in("rdi") addr,
            in("rsi") len,
            in("rdx") prot,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

pub struct Harness {
    block: *mut u8,
    _pt: Vec<u8>,
    pub cpu: Cpu,
    bus: TestBus,
    pub base: u64,
    form_x87: usize,
    form_mmx: bool,
}

const CR0: u64 = 1 | 2 | 0x10 | 0x20 | (1 << 16) | (1 << 31); // PE MP ET NE WP PG
const CR4: u64 = (1 << 5) | (1 << 9) | (1 << 10); // PAE OSFXSR OSXMMEXCPT
const EFER: u64 = 1 | (1 << 8) | (1 << 10) | (1 << 11); // SCE LME LMA NXE

impl Harness {
    pub fn new() -> Harness {
        let layout = Layout::from_size_align(BLOCK, BLOCK).unwrap();
        // SAFETY: non-zero size.
        let block = unsafe { alloc_zeroed(layout) };
        assert!(!block.is_null());
        // SAFETY: the block is ours, 64 KiB aligned and sized.
        let r = unsafe { mprotect(block, BLOCK, 7) };
        assert_eq!(r, 0, "mprotect(RWX) failed");
        let base = block as u64;

        // Page tables: one chain mapping the block's virtual addresses onto BLOCK_GPA.
        let mut pt = vec![0u8; PT_SIZE];
        let mut put = |gpa: u64, v: u64| {
            let o = (gpa - PT_GPA) as usize;
            pt[o..o + 8].copy_from_slice(&v.to_le_bytes());
        };
        put(0x1000 + ((base >> 39) & 511) * 8, 0x2003);
        put(0x2000 + ((base >> 30) & 511) * 8, 0x3003);
        put(0x3000 + ((base >> 21) & 511) * 8, 0x4003);
        for i in 0..(BLOCK as u64 / 4096) {
            put(0x4000 + (((base >> 12) & 511) + i) * 8, (BLOCK_GPA + i * 4096) | 3);
        }
        let ram = vec![
            RamRegion { gpa: PT_GPA, size: PT_SIZE as u64, host_addr: pt.as_mut_ptr() },
            RamRegion { gpa: BLOCK_GPA, size: BLOCK as u64, host_addr: block },
        ];
        let cpu = Cpu::new(ram, CpuConfig::default());
        let mut h =
            Harness { block, _pt: pt, cpu, bus: TestBus { pending: false }, base, form_x87: 0, form_mmx: false };

        // Exception stubs and the final hlt.
        h.mem_mut()[HANDLERS..HLT_STUB + 16].fill(0xf4);
        let gdt = [0u64, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
        for (i, d) in gdt.iter().enumerate() {
            h.put64(GDT + 8 * i, *d);
        }
        for v in 0..=ENTRY_VECTOR {
            let target = base + if v == ENTRY_VECTOR { CODE } else { HANDLERS + 16 * v } as u64;
            let lo = (target & 0xffff) | (8 << 16) | (0xe << 40) | (1 << 47) | ((target >> 16) & 0xffff) << 48;
            h.put64(IDT + 16 * v, lo);
            h.put64(IDT + 16 * v + 8, target >> 32);
        }
        h
    }

    pub fn mem_mut(&mut self) -> &mut [u8] {
        // SAFETY: the block is BLOCK bytes, live while `self` is.
        unsafe { std::slice::from_raw_parts_mut(self.block, BLOCK) }
    }

    pub fn mem(&self) -> &[u8] {
        // SAFETY: as in mem_mut.
        unsafe { std::slice::from_raw_parts(self.block, BLOCK) }
    }

    pub fn put64(&mut self, off: usize, v: u64) {
        self.mem_mut()[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    pub fn get64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.mem()[off..off + 8].try_into().unwrap())
    }

    /// Address of `off` within the block.
    pub fn addr(&self, off: usize) -> u64 {
        self.base + off as u64
    }

    /// Assembles the snippet for `form` into the block.
    pub fn load(&mut self, form: &Form) {
        let code = self.assemble(form).unwrap_or_else(|e| panic!("assembling {}: {e}", form.name));
        assert!(code.len() <= HANDLERS - CODE, "snippet too long");
        self.mem_mut()[CODE..CODE + code.len()].copy_from_slice(&code);
        self.form_x87 = form.x87;
        self.form_mmx = form.mmx;
        self.cpu.flush_caches();
    }

    fn assemble(&self, form: &Form) -> Result<Vec<u8>, IcedError> {
        let b = self.base;
        let mut a = CodeAssembler::new(64)?;
        for r in [rbx, rbp, r12, r13, r14, r15] {
            a.push(r)?;
        }
        a.mov(rax, b + SAVE as u64)?;
        a.mov(qword_ptr(rax), rsp)?;
        a.stmxcsr(dword_ptr(rax + 8))?;
        a.fnstcw(word_ptr(rax + 12))?;
        a.mov(rax, b + IN as u64)?;
        a.ldmxcsr(dword_ptr(rax + S_MXCSR))?;
        for (i, x) in XMMS.iter().enumerate() {
            a.movdqu(*x, xmmword_ptr(rax + S_XMM + 16 * i))?;
        }
        if form.x87 > 0 {
            // FNINIT leaves the register contents; zero all eight so FXSAVE images match.
            a.fninit()?;
            for _ in 0..8 {
                a.fldz()?;
            }
            a.fninit()?;
            a.fldcw(word_ptr(rax + S_FCW))?;
            for i in (0..form.x87).rev() {
                a.fld(tbyte_ptr(rax + S_X87 + 16 * i))?;
            }
        }
        if form.mmx {
            for (i, m) in MMS.iter().enumerate() {
                a.movq(*m, qword_ptr(rax + S_MM + 8 * i))?;
            }
        }
        a.mov(rsp, qword_ptr(rax + 8 * RSP))?;
        a.push(qword_ptr(rax + S_FLAGS))?;
        a.popfq()?;
        for (i, r) in GPRS.iter().enumerate() {
            if i != RAX && i != RSP {
                a.mov(*r, qword_ptr(rax + 8 * i))?;
            }
        }
        a.mov(rax, qword_ptr(rax))?;

        (form.emit)(&mut a)?;

        a.mov(qword_ptr(b + OUT as u64), rax)?;
        a.mov(rax, b + OUT as u64)?;
        for (i, r) in GPRS.iter().enumerate() {
            if i != RAX {
                a.mov(qword_ptr(rax + 8 * i), *r)?;
            }
        }
        a.pushfq()?;
        a.pop(qword_ptr(rax + S_FLAGS))?;
        a.mov(qword_ptr(rsp - 8), 0)?;
        a.stmxcsr(dword_ptr(rax + S_MXCSR))?;
        for (i, x) in XMMS.iter().enumerate() {
            a.movdqu(xmmword_ptr(rax + S_XMM + 16 * i), *x)?;
        }
        if form.mmx {
            for (i, m) in MMS.iter().enumerate() {
                a.movq(qword_ptr(rax + S_MM + 8 * i), *m)?;
            }
            a.emms()?;
        }
        if form.x87 > 0 {
            a.mov(rax, b + FX_OUT as u64)?;
            a.fxsave64(ptr(rax))?;
        }
        a.mov(rax, b + SAVE as u64)?;
        a.mov(rsp, qword_ptr(rax))?;
        a.ldmxcsr(dword_ptr(rax + 8))?;
        a.fninit()?;
        a.fldcw(word_ptr(rax + 12))?;
        a.cld()?;
        for r in [r15, r14, r13, r12, rbp, rbx] {
            a.pop(r)?;
        }
        a.ret()?;
        a.assemble(b + CODE as u64)
    }

    fn write_state(&mut self, st: &State) {
        let m = self.mem_mut();
        for (i, g) in st.gpr.iter().enumerate() {
            m[IN + 8 * i..IN + 8 * i + 8].copy_from_slice(&g.to_le_bytes());
        }
        m[IN + S_FLAGS..IN + S_FLAGS + 8].copy_from_slice(&st.rflags.to_le_bytes());
        m[IN + S_MXCSR..IN + S_MXCSR + 4].copy_from_slice(&st.mxcsr.to_le_bytes());
        m[IN + S_FCW..IN + S_FCW + 2].copy_from_slice(&st.fcw.to_le_bytes());
        for (i, v) in st.x87.iter().enumerate().take(8) {
            m[IN + S_X87 + 16 * i..IN + S_X87 + 16 * i + 10].copy_from_slice(v);
        }
        for (i, v) in st.mm.iter().enumerate() {
            m[IN + S_MM + 8 * i..IN + S_MM + 8 * i + 8].copy_from_slice(&v.to_le_bytes());
        }
        for (i, v) in st.xmm.iter().enumerate() {
            m[IN + S_XMM + 16 * i..IN + S_XMM + 16 * i + 16].copy_from_slice(&v.to_le_bytes());
        }
        m[OUT..OUT + 0x400].fill(0);
        m[FX_OUT..FX_OUT + 512].fill(0xa5);
        m[SCRATCH..SCRATCH + SCRATCH_LEN].copy_from_slice(&st.scratch);
    }

    fn read_out(&self) -> Out {
        let m = self.mem();
        let q = |o: usize| u64::from_le_bytes(m[o..o + 8].try_into().unwrap());
        let mut gpr = [0u64; 16];
        for (i, g) in gpr.iter_mut().enumerate() {
            *g = q(OUT + 8 * i);
        }
        let mut xmm = [0u128; 16];
        for (i, x) in xmm.iter_mut().enumerate() {
            *x = u128::from_le_bytes(m[OUT + S_XMM + 16 * i..OUT + S_XMM + 16 * i + 16].try_into().unwrap());
        }
        let mut mm = [0u64; 8];
        if self.form_mmx {
            for (i, v) in mm.iter_mut().enumerate() {
                *v = q(OUT + S_MM + 8 * i);
            }
        }
        Out {
            gpr,
            rflags: q(OUT + S_FLAGS),
            mxcsr: u32::from_le_bytes(m[OUT + S_MXCSR..OUT + S_MXCSR + 4].try_into().unwrap()),
            xmm,
            mm,
            fx: if self.form_x87 > 0 { m[FX_OUT..FX_OUT + 512].to_vec() } else { Vec::new() },
            mem: m[SCRATCH..SCRATCH + SCRATCH_LEN].to_vec(),
        }
    }

    /// Runs the loaded snippet on the host CPU.
    pub fn run_native(&mut self, st: &State) -> Out {
        self.write_state(st);
        let entry = self.base + CODE as u64;
        // SAFETY: the block holds a complete snippet assembled for this address that
        // preserves the callee-saved registers, RSP, MXCSR, FCW and DF of the caller and
        // only touches memory inside the block (the caller makes sure operand addresses
        // do). The block is mapped executable.
        let f: extern "sysv64" fn() = unsafe { std::mem::transmute(entry as usize) };
        f();
        self.read_out()
    }

    /// Resets the emulated CPU to the harness's 64-bit kernel-mode state.
    pub fn reset_cpu(&mut self) {
        let c = &mut self.cpu;
        c.gpr = [0; 16];
        c.gpr[RSP] = self.base + EMU_STACK_TOP as u64;
        c.rip = self.base + HLT_STUB as u64;
        c.rflags = 0x202;
        c.cr0 = CR0;
        c.cr3 = 0x1000;
        c.cr4 = CR4;
        c.efer = EFER;
        c.fpu = FpuState::default();
        c.seg[1] = Seg { selector: 8, base: 0, limit: 0xffff_ffff, attr: 0xa09b };
        for i in [0, 2, 3] {
            c.seg[i] = Seg { selector: 0x10, base: 0, limit: 0xffff_ffff, attr: 0xc093 };
        }
        for i in [4, 5] {
            c.seg[i] = Seg { selector: 0, base: 0, limit: 0xffff_ffff, attr: 0xc093 };
        }
        c.gdtr_base = self.base + GDT as u64;
        c.gdtr_limit = 0x17;
        c.idtr_base = self.base + IDT as u64;
        c.idtr_limit = (16 * (ENTRY_VECTOR + 1) - 1) as u16;
    }

    /// Runs the loaded snippet in the emulator; `tweak` may adjust the CPU first.
    pub fn run_emu_with(&mut self, st: &State, tweak: impl FnOnce(&mut Cpu)) -> Result<Out, EmuEnd> {
        self.write_state(st);
        self.reset_cpu();
        tweak(&mut self.cpu);
        self.bus.pending = true;
        let exit = self.cpu.run(&mut self.bus, 4_000_000);
        if exit != Exit::HaltedForever {
            return Err(EmuEnd::Exit(exit));
        }
        let rip = self.cpu.rip.wrapping_sub(1).wrapping_sub(self.base) as usize;
        if rip == HLT_STUB {
            return Ok(self.read_out());
        }
        if (HANDLERS..HLT_STUB).contains(&rip) {
            return Err(EmuEnd::Fault(((rip - HANDLERS) / 16) as u8));
        }
        Err(EmuEnd::Exit(Exit::Unsupported(format!("halted at {:#x}", self.cpu.rip))))
    }

    pub fn run_emu(&mut self, st: &State) -> Result<Out, EmuEnd> {
        self.run_emu_with(st, |_| {})
    }

    /// Error code of the exception the last emulator run stopped on.
    pub fn fault_error_code(&self) -> u64 {
        let off = (self.cpu.gpr[RSP] - self.base) as usize;
        self.get64(off)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // SAFETY: the block was allocated in `new` with this layout and is no longer
        // executed; make it plain read/write again before giving it back.
        unsafe {
            mprotect(self.block, BLOCK, 3);
            dealloc(self.block, Layout::from_size_align(BLOCK, BLOCK).unwrap());
        }
    }
}

/// Points R12 into the middle of scratch memory (any alignment).
pub fn ptr_any(st: &mut State, r: &mut Rng, base: u64) {
    st.gpr[R12] = base + (SCRATCH + 0x1000) as u64 + r.below(0x2000);
}

/// Points R12 at a 16-byte aligned scratch address.
pub fn ptr_aligned(st: &mut State, r: &mut Rng, base: u64) {
    st.gpr[R12] = (base + (SCRATCH + 0x1000) as u64 + r.below(0x2000)) & !15;
}

pub fn scratch_off(st: &State, base: u64, reg: usize) -> usize {
    (st.gpr[reg] - base) as usize - SCRATCH
}

pub fn put_scratch(st: &mut State, off: usize, bytes: &[u8]) {
    st.scratch[off..off + bytes.len()].copy_from_slice(bytes);
}

/// Masks applied to an FXSAVE image before comparing: FOP, FIP, FDP and MXCSR_MASK are
/// model specific (AMD stores FOP/FIP/FDP only while an exception is pending, Intel
/// always), and so is whether reserved bytes 416-463 are written (the emulator does not
/// write 416-511).
pub fn fx_masked(fx: &[u8]) -> Vec<u8> {
    let mut v = fx.to_vec();
    if v.len() >= 512 {
        v[6..24].fill(0);
        v[28..32].fill(0);
        v[416..464].fill(0);
    }
    v
}

fn diff(form: &Form, st: &State, n: &Out, e: &Out) -> Option<String> {
    let mut s = String::new();
    for i in 0..16 {
        if n.gpr[i] != e.gpr[i] {
            s += &format!("  gpr[{i}]: native {:#018x} emu {:#018x}\n", n.gpr[i], e.gpr[i]);
        }
        if n.xmm[i] != e.xmm[i] {
            s += &format!("  xmm{i}: native {:#034x} emu {:#034x}\n", n.xmm[i], e.xmm[i]);
        }
    }
    if (n.rflags ^ e.rflags) & form.flags != 0 {
        s += &format!(
            "  rflags: native {:#x} emu {:#x} (compared bits {:#x})\n",
            n.rflags & form.flags,
            e.rflags & form.flags,
            form.flags
        );
    }
    if n.mxcsr != e.mxcsr {
        s += &format!("  mxcsr: native {:#x} emu {:#x}\n", n.mxcsr, e.mxcsr);
    }
    if n.mm != e.mm {
        s += &format!("  mm: native {:x?} emu {:x?}\n", n.mm, e.mm);
    }
    let (fa, fb) = (fx_masked(&n.fx), fx_masked(&e.fx));
    if fa != fb {
        let first = fa.iter().zip(&fb).position(|(a, b)| a != b).unwrap_or(0);
        let lo = first & !15;
        s += &format!(
            "  fxsave differs at {first:#x}: native {:02x?} emu {:02x?}\n",
            &fa[lo..(lo + 32).min(512)],
            &fb[lo..(lo + 32).min(512)]
        );
    }
    if n.mem != e.mem {
        let first = n.mem.iter().zip(&e.mem).position(|(a, b)| a != b).unwrap_or(0);
        let lo = first & !7;
        s += &format!(
            "  memory differs at block offset {:#x}: native {:02x?} emu {:02x?}\n",
            SCRATCH + first,
            &n.mem[lo..(lo + 16).min(SCRATCH_LEN)],
            &e.mem[lo..(lo + 16).min(SCRATCH_LEN)]
        );
    }
    if s.is_empty() {
        return None;
    }
    Some(format!(
        "{}:\n  input gpr {:x?}\n  rflags {:#x} mxcsr {:#x} fcw {:#x}\n  xmm0-3 {:#x?}\n  x87 {:02x?}\n{s}",
        form.name,
        st.gpr,
        st.rflags,
        st.mxcsr,
        st.fcw,
        &st.xmm[..4],
        &st.x87[..form.x87.min(st.x87.len())]
    ))
}

/// Collects mismatches over many forms and reports them all at the end.
pub struct Checker {
    pub h: Harness,
    pub rng: Rng,
    failures: Vec<String>,
    pub cases: usize,
    pub forms: usize,
}

impl Checker {
    pub fn new(seed: u64) -> Checker {
        Checker { h: Harness::new(), rng: Rng::new(seed), failures: Vec::new(), cases: 0, forms: 0 }
    }

    /// Runs `form` `n` times from random states adjusted by `setup`, natively and in the
    /// emulator, and records any difference.
    pub fn check(&mut self, form: &Form, n: usize, setup: impl Fn(&mut State, &mut Rng, u64)) {
        self.h.load(form);
        self.forms += 1;
        let mut fails = 0;
        for _ in 0..n {
            let mut st = State::random(&mut self.rng, self.h.base);
            setup(&mut st, &mut self.rng, self.h.base);
            let native = self.h.run_native(&st);
            let emu = self.h.run_emu(&st);
            self.cases += 1;
            let msg = match emu {
                Ok(e) => diff(form, &st, &native, &e),
                Err(end) => Some(format!("{}: emulator ended with {end:?}; input {st:x?}", form.name)),
            };
            if let Some(m) = msg {
                fails += 1;
                if fails <= 2 {
                    self.failures.push(m);
                }
            }
        }
        if fails > 2 {
            self.failures.push(format!("{}: {fails} of {n} cases differ", form.name));
        }
    }

    /// Panics with every recorded mismatch.
    pub fn finish(self, what: &str) {
        eprintln!("{what}: {} forms, {} cases", self.forms, self.cases);
        if !self.failures.is_empty() {
            let n = self.failures.len();
            let shown: Vec<_> = self.failures.into_iter().take(40).collect();
            panic!("{what}: {n} mismatch reports:\n{}", shown.join("\n"));
        }
    }
}
