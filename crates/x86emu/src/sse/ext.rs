//! SSE3, SSSE3 (XMM and MMX forms), SSE4.1, SSE4.2, AES-NI and PCLMULQDQ: the vector
//! instructions of the x86-64-v2 level and the cryptographic extensions, in their legacy SSE
//! encodings (Intel SDM Vol. 1 ch. 12 and Vol. 2 instruction pages; the VEX forms belong to
//! AVX, which is not implemented). CRC32 and POPCNT, general-purpose instructions of the
//! same extensions, are in `exec.rs` and `intext.rs`.
//!
//! As in the parent module, arithmetic is replayed on the host CPU in inline assembly, so
//! results, MXCSR flags and the flags of PTEST and PCMPxSTRx are bit-exact. The host must
//! have the extension: [`classify`] accepts an instruction only if [`cpuid::has`] says so,
//! which is also what CPUID advertises. An operation with an immediate control byte is a
//! function generic over the byte (it is part of the host instruction's encoding), reached
//! through a table with one entry per value; bits the SDM marks reserved are masked first so
//! that identical entries share one instantiation. Data movement (blends, inserts,
//! extracts, PALIGNR, MOVDDUP, ...) is plain software.
//!
//! Alignment follows the SDM's exception classes: 16-byte memory operands must be 16-byte
//! aligned (#GP(0)) except for LDDQU and PCMPESTRI/PCMPESTRM/PCMPISTRI/PCMPISTRM (SDM
//! Vol. 2 §2.4, exception types 4 and 5: "this instruction does not cause #GP if the memory
//! operand is not aligned"); smaller memory operands (PMOVSX/ZX, MOVDDUP, INSERTPS, ROUNDSS,
//! PINSR*, PEXTR*) never need alignment.

use super::{fp_run, lane, read, read_mem, write_mem, write_reg, xmm, xmm_mut, Io, V};
use crate::cpu::{flags::ARITH, Cpu};
use crate::cpuid::{self, Ext};
use crate::regs::low64;
use crate::{Bus, Fault, Res};
use iced_x86::{Instruction, Mnemonic};
use std::arch::asm;

/// A host-replayed integer operation: runs with XMM0 = `io.a`, XMM1 = `io.b` and RAX, RDX,
/// RCX = the arguments; `io.a` gets XMM0 and `io.fl` RFLAGS; returns RCX.
type IntFn = fn(&mut Io, u64, u64, u64) -> u64;

/// A host-replayed floating-point operation: XMM0 = `io.a`, XMM1 = `io.b`, under MXCSR
/// `io.csr` (see [`fp_run`]).
type FpFn = fn(&mut Io);

/// Integer operations `$t` on XMM0/XMM1 (`{i}`: the immediate), each a function generic over
/// the immediate.
macro_rules! int_ops {
    ($($name:ident = $t:literal),* $(,)?) => { $(
        fn $name<const I: u8>(io: &mut Io, rax: u64, rdx: u64, rcx: u64) -> u64 {
            let p: *mut Io = io;
            let mut rcx = rcx;
            // SAFETY: `p` points to a live, 16-byte aligned `Io`; the code reads and writes
            // its first 48 bytes, clobbers XMM0/XMM1 (declared) and RCX (an in/out operand)
            // and uses the stack for PUSHFQ/POP (no `nostack`). The instruction belongs to an
            // extension the host has: this function is reachable only through an operation
            // that `classify` returned after checking `cpuid::has`.
            unsafe {
                asm!(
                    "movdqa xmm0, [{p}]",
                    "movdqa xmm1, [{p} + 16]",
                    $t,
                    "pushfq",
                    "pop qword ptr [{p} + 40]",
                    "movdqa [{p}], xmm0",
                    p = in(reg) p,
                    i = const I,
                    in("rax") rax,
                    in("rdx") rdx,
                    inout("rcx") rcx,
                    out("xmm0") _,
                    out("xmm1") _,
                )
            }
            rcx
        }
    )* };
}

/// Floating-point operations `$t` on XMM0/XMM1 under a given MXCSR (`{i}`: the immediate).
macro_rules! fp_ops {
    ($($name:ident = $t:literal),* $(,)?) => { $(
        fn $name<const I: u8>(io: &mut Io) {
            let p: *mut Io = io;
            // SAFETY: `p` points to a live, 16-byte aligned `Io` that the code reads and
            // writes within its 48 bytes. The host MXCSR is saved first and restored last;
            // the one loaded in between has every exception masked and no reserved bit set
            // (`fp_run` builds it from the validated guest MXCSR), so nothing traps.
            // XMM0/XMM1 are declared clobbered; PUSHFQ/POP use the stack. The host has the
            // extension (see `int_ops`).
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
                    i = const I,
                    out("xmm0") _,
                    out("xmm1") _,
                )
            }
        }
    )* };
}

int_ops! {
    // SSSE3
    pabsb = "pabsb xmm0, xmm1 /* {i} */", pabsw = "pabsw xmm0, xmm1 /* {i} */",
    pabsd = "pabsd xmm0, xmm1 /* {i} */",
    phaddw = "phaddw xmm0, xmm1 /* {i} */", phaddd = "phaddd xmm0, xmm1 /* {i} */",
    phaddsw = "phaddsw xmm0, xmm1 /* {i} */", phsubw = "phsubw xmm0, xmm1 /* {i} */",
    phsubd = "phsubd xmm0, xmm1 /* {i} */", phsubsw = "phsubsw xmm0, xmm1 /* {i} */",
    pmaddubsw = "pmaddubsw xmm0, xmm1 /* {i} */", pmulhrsw = "pmulhrsw xmm0, xmm1 /* {i} */",
    pshufb = "pshufb xmm0, xmm1 /* {i} */", psignb = "psignb xmm0, xmm1 /* {i} */",
    psignw = "psignw xmm0, xmm1 /* {i} */", psignd = "psignd xmm0, xmm1 /* {i} */",
    // SSE4.1
    pmulld = "pmulld xmm0, xmm1 /* {i} */", pmuldq = "pmuldq xmm0, xmm1 /* {i} */",
    pminsb = "pminsb xmm0, xmm1 /* {i} */", pminsd = "pminsd xmm0, xmm1 /* {i} */",
    pminuw = "pminuw xmm0, xmm1 /* {i} */", pminud = "pminud xmm0, xmm1 /* {i} */",
    pmaxsb = "pmaxsb xmm0, xmm1 /* {i} */", pmaxsd = "pmaxsd xmm0, xmm1 /* {i} */",
    pmaxuw = "pmaxuw xmm0, xmm1 /* {i} */", pmaxud = "pmaxud xmm0, xmm1 /* {i} */",
    pcmpeqq = "pcmpeqq xmm0, xmm1 /* {i} */", packusdw = "packusdw xmm0, xmm1 /* {i} */",
    phminposuw = "phminposuw xmm0, xmm1 /* {i} */", ptest = "ptest xmm0, xmm1 /* {i} */",
    pmovsxbw = "pmovsxbw xmm0, xmm1 /* {i} */", pmovsxbd = "pmovsxbd xmm0, xmm1 /* {i} */",
    pmovsxbq = "pmovsxbq xmm0, xmm1 /* {i} */", pmovsxwd = "pmovsxwd xmm0, xmm1 /* {i} */",
    pmovsxwq = "pmovsxwq xmm0, xmm1 /* {i} */", pmovsxdq = "pmovsxdq xmm0, xmm1 /* {i} */",
    pmovzxbw = "pmovzxbw xmm0, xmm1 /* {i} */", pmovzxbd = "pmovzxbd xmm0, xmm1 /* {i} */",
    pmovzxbq = "pmovzxbq xmm0, xmm1 /* {i} */", pmovzxwd = "pmovzxwd xmm0, xmm1 /* {i} */",
    pmovzxwq = "pmovzxwq xmm0, xmm1 /* {i} */", pmovzxdq = "pmovzxdq xmm0, xmm1 /* {i} */",
    mpsadbw = "mpsadbw xmm0, xmm1, {i}",
    // SSE4.2
    pcmpgtq = "pcmpgtq xmm0, xmm1 /* {i} */",
    pcmpestri = "pcmpestri xmm0, xmm1, {i}", pcmpestrm = "pcmpestrm xmm0, xmm1, {i}",
    pcmpistri = "pcmpistri xmm0, xmm1, {i}", pcmpistrm = "pcmpistrm xmm0, xmm1, {i}",
    // AES-NI
    aesenc = "aesenc xmm0, xmm1 /* {i} */", aesenclast = "aesenclast xmm0, xmm1 /* {i} */",
    aesdec = "aesdec xmm0, xmm1 /* {i} */", aesdeclast = "aesdeclast xmm0, xmm1 /* {i} */",
    aesimc = "aesimc xmm0, xmm1 /* {i} */",
    aeskeygenassist = "aeskeygenassist xmm0, xmm1, {i}",
    // PCLMULQDQ
    pclmulqdq = "pclmulqdq xmm0, xmm1, {i}",
}

/// AESENC (`kind` 0), AESENCLAST (1), AESDEC (2) or AESDECLAST (3) of the state at `d`
/// with the round key at `s`, for compiled code (`crate::jit`): the host's instruction, as
/// the interpreter runs it. Only reachable for a fast form lowered where
/// `cpuid::has(Ext::Aes)` (the host has AES-NI).
///
/// # Safety
/// `d` points to a live XMM register of the running vCPU that no Rust reference aliases,
/// `s` to 16 readable bytes (an XMM register or guest RAM through the TLB).
pub(crate) unsafe extern "C" fn jit_aes(d: *mut u128, s: *const u128, kind: u64) {
    // SAFETY: per the contract; unaligned accesses are allowed for both.
    let (a, b) = unsafe { (d.read_unaligned(), s.read_unaligned()) };
    let mut io = Io { a, b, csr: 0, host_csr: 0, fl: 0 };
    match kind {
        0 => aesenc::<0>(&mut io, 0, 0, 0),
        1 => aesenclast::<0>(&mut io, 0, 0, 0),
        2 => aesdec::<0>(&mut io, 0, 0, 0),
        _ => aesdeclast::<0>(&mut io, 0, 0, 0),
    };
    // SAFETY: per the contract.
    unsafe { d.write_unaligned(io.a) };
}

fp_ops! {
    // SSE3
    addsubps = "addsubps xmm0, xmm1 /* {i} */", addsubpd = "addsubpd xmm0, xmm1 /* {i} */",
    haddps = "haddps xmm0, xmm1 /* {i} */", haddpd = "haddpd xmm0, xmm1 /* {i} */",
    hsubps = "hsubps xmm0, xmm1 /* {i} */", hsubpd = "hsubpd xmm0, xmm1 /* {i} */",
    // SSE4.1
    dpps = "dpps xmm0, xmm1, {i}", dppd = "dppd xmm0, xmm1, {i}",
    roundps = "roundps xmm0, xmm1, {i}", roundpd = "roundpd xmm0, xmm1, {i}",
    roundss = "roundss xmm0, xmm1, {i}", roundsd = "roundsd xmm0, xmm1, {i}",
}

/// `[f::<0 & mask>, f::<1 & mask>, ..., f::<255 & mask>]`: a table indexed by the immediate
/// byte, with the reserved bits (outside `mask`) ignored.
macro_rules! imm_table {
    ($f:ident, $mask:expr) => {
        imm_table!(@ $f, $mask;
            0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34
            35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64 65 66
            67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94 95 96 97 98
            99 100 101 102 103 104 105 106 107 108 109 110 111 112 113 114 115 116 117 118 119 120 121 122
            123 124 125 126 127 128 129 130 131 132 133 134 135 136 137 138 139 140 141 142 143 144 145 146
            147 148 149 150 151 152 153 154 155 156 157 158 159 160 161 162 163 164 165 166 167 168 169 170
            171 172 173 174 175 176 177 178 179 180 181 182 183 184 185 186 187 188 189 190 191 192 193 194
            195 196 197 198 199 200 201 202 203 204 205 206 207 208 209 210 211 212 213 214 215 216 217 218
            219 220 221 222 223 224 225 226 227 228 229 230 231 232 233 234 235 236 237 238 239 240 241 242
            243 244 245 246 247 248 249 250 251 252 253 254 255)
    };
    (@ $f:ident, $mask:expr; $($i:literal)*) => { [$($f::<{ $i & $mask }>),*] };
}

/// DPPS: every bit of imm8 is used (SDM Vol. 2A DPPS).
static DPPS: [FpFn; 256] = imm_table!(dpps, 0xff);
/// DPPD: bits 0-1 (destination lanes) and 4-5 (source lanes); the rest are reserved.
static DPPD: [FpFn; 256] = imm_table!(dppd, 0x33);
/// ROUNDPS/PD/SS/SD: bits 0-3 (rounding mode, MXCSR.RC select, precision mask).
static ROUNDPS: [FpFn; 256] = imm_table!(roundps, 0x0f);
static ROUNDPD: [FpFn; 256] = imm_table!(roundpd, 0x0f);
static ROUNDSS: [FpFn; 256] = imm_table!(roundss, 0x0f);
static ROUNDSD: [FpFn; 256] = imm_table!(roundsd, 0x0f);
/// MPSADBW: bits 0-2 (source and destination block offsets).
static MPSADBW: [IntFn; 256] = imm_table!(mpsadbw, 0x07);
/// PCLMULQDQ: bits 0 and 4 select the quadwords.
static PCLMULQDQ: [IntFn; 256] = imm_table!(pclmulqdq, 0x11);
/// PCMPxSTRx: bits 0-6 (data format, aggregation, polarity, output selection); bit 7 is
/// reserved (SDM Vol. 2B §4.1).
static PCMPESTRI: [IntFn; 256] = imm_table!(pcmpestri, 0x7f);
static PCMPESTRM: [IntFn; 256] = imm_table!(pcmpestrm, 0x7f);
static PCMPISTRI: [IntFn; 256] = imm_table!(pcmpistri, 0x7f);
static PCMPISTRM: [IntFn; 256] = imm_table!(pcmpistrm, 0x7f);

/// Entry `imm` of an immediate table.
#[inline]
#[allow(clippy::indexing_slicing)] // a u8 is < 256 = the table's length
fn entry<T: Copy>(table: &[T; 256], imm: u8) -> T {
    table[usize::from(imm)]
}

/// What an instruction of these extensions does.
#[derive(Clone, Copy, Debug)]
pub(super) enum XOp {
    /// `dst = op(dst, src)` on the host; for MMX registers, lane by lane on the low 64 bits.
    Int(IntFn),
    /// As `Int`, with the immediate selecting the host function.
    IntImm(&'static [IntFn; 256]),
    /// SSSE3 horizontal add/subtract (PHADDW...): the MMX form runs on both operands packed
    /// into one register so that the pair sums line up.
    Horiz(IntFn),
    /// PSHUFB.
    Pshufb,
    /// PTEST: flags only.
    Ptest,
    /// PCMPESTRI/PCMPESTRM/PCMPISTRI/PCMPISTRM: table, explicit lengths in RAX/RDX, lengths
    /// are 64-bit (REX.W), mask output to XMM0 (otherwise an index to ECX).
    StrCmp {
        table: &'static [IntFn; 256],
        explicit: bool,
        wide: bool,
        mask: bool,
    },
    /// AESKEYGENASSIST: the host's result for RCON 0, with the RCON added in software.
    Aeskeygenassist,
    /// `dst = op(dst, src)` under the guest's MXCSR.
    Fp(FpFn),
    /// As `Fp`, with the immediate selecting the host function.
    FpImm(&'static [FpFn; 256]),
    /// PALIGNR.
    Palignr,
    /// BLENDPS/BLENDPD/PBLENDW: immediate-selected lanes of this width in bits.
    Blend(u32),
    /// BLENDVPS/BLENDVPD/PBLENDVB: lanes selected by the sign bits of XMM0's lanes.
    BlendV(u32),
    Movddup,
    Movshdup,
    Movsldup,
    /// LDDQU (unaligned) and MOVNTDQA (aligned): 128-bit loads.
    Load {
        aligned: bool,
    },
    /// PEXTRB/PEXTRW/PEXTRD/PEXTRQ/EXTRACTPS: a lane of this width to a register or memory.
    Extract(u32),
    /// PINSRB/PINSRD/PINSRQ: a lane of this width from a register or memory.
    Insert(u32),
    Insertps,
}

/// Decides what `insn` is, if it belongs to one of these extensions and the host has that
/// extension.
pub(super) fn classify(insn: &Instruction) -> Option<XOp> {
    use Mnemonic as M;
    use XOp as X;
    let (op, ext) = match insn.mnemonic() {
        M::Addsubps => (X::Fp(addsubps::<0>), Ext::Sse3),
        M::Addsubpd => (X::Fp(addsubpd::<0>), Ext::Sse3),
        M::Haddps => (X::Fp(haddps::<0>), Ext::Sse3),
        M::Haddpd => (X::Fp(haddpd::<0>), Ext::Sse3),
        M::Hsubps => (X::Fp(hsubps::<0>), Ext::Sse3),
        M::Hsubpd => (X::Fp(hsubpd::<0>), Ext::Sse3),
        M::Lddqu => (X::Load { aligned: false }, Ext::Sse3),
        M::Movddup => (X::Movddup, Ext::Sse3),
        M::Movshdup => (X::Movshdup, Ext::Sse3),
        M::Movsldup => (X::Movsldup, Ext::Sse3),

        M::Pabsb => (X::Int(pabsb::<0>), Ext::Ssse3),
        M::Pabsw => (X::Int(pabsw::<0>), Ext::Ssse3),
        M::Pabsd => (X::Int(pabsd::<0>), Ext::Ssse3),
        M::Phaddw => (X::Horiz(phaddw::<0>), Ext::Ssse3),
        M::Phaddd => (X::Horiz(phaddd::<0>), Ext::Ssse3),
        M::Phaddsw => (X::Horiz(phaddsw::<0>), Ext::Ssse3),
        M::Phsubw => (X::Horiz(phsubw::<0>), Ext::Ssse3),
        M::Phsubd => (X::Horiz(phsubd::<0>), Ext::Ssse3),
        M::Phsubsw => (X::Horiz(phsubsw::<0>), Ext::Ssse3),
        M::Pmaddubsw => (X::Int(pmaddubsw::<0>), Ext::Ssse3),
        M::Pmulhrsw => (X::Int(pmulhrsw::<0>), Ext::Ssse3),
        M::Pshufb => (X::Pshufb, Ext::Ssse3),
        M::Psignb => (X::Int(psignb::<0>), Ext::Ssse3),
        M::Psignw => (X::Int(psignw::<0>), Ext::Ssse3),
        M::Psignd => (X::Int(psignd::<0>), Ext::Ssse3),
        M::Palignr => (X::Palignr, Ext::Ssse3),

        M::Pmulld => (X::Int(pmulld::<0>), Ext::Sse41),
        M::Pmuldq => (X::Int(pmuldq::<0>), Ext::Sse41),
        M::Pminsb => (X::Int(pminsb::<0>), Ext::Sse41),
        M::Pminsd => (X::Int(pminsd::<0>), Ext::Sse41),
        M::Pminuw => (X::Int(pminuw::<0>), Ext::Sse41),
        M::Pminud => (X::Int(pminud::<0>), Ext::Sse41),
        M::Pmaxsb => (X::Int(pmaxsb::<0>), Ext::Sse41),
        M::Pmaxsd => (X::Int(pmaxsd::<0>), Ext::Sse41),
        M::Pmaxuw => (X::Int(pmaxuw::<0>), Ext::Sse41),
        M::Pmaxud => (X::Int(pmaxud::<0>), Ext::Sse41),
        M::Pcmpeqq => (X::Int(pcmpeqq::<0>), Ext::Sse41),
        M::Packusdw => (X::Int(packusdw::<0>), Ext::Sse41),
        M::Phminposuw => (X::Int(phminposuw::<0>), Ext::Sse41),
        M::Pmovsxbw => (X::Int(pmovsxbw::<0>), Ext::Sse41),
        M::Pmovsxbd => (X::Int(pmovsxbd::<0>), Ext::Sse41),
        M::Pmovsxbq => (X::Int(pmovsxbq::<0>), Ext::Sse41),
        M::Pmovsxwd => (X::Int(pmovsxwd::<0>), Ext::Sse41),
        M::Pmovsxwq => (X::Int(pmovsxwq::<0>), Ext::Sse41),
        M::Pmovsxdq => (X::Int(pmovsxdq::<0>), Ext::Sse41),
        M::Pmovzxbw => (X::Int(pmovzxbw::<0>), Ext::Sse41),
        M::Pmovzxbd => (X::Int(pmovzxbd::<0>), Ext::Sse41),
        M::Pmovzxbq => (X::Int(pmovzxbq::<0>), Ext::Sse41),
        M::Pmovzxwd => (X::Int(pmovzxwd::<0>), Ext::Sse41),
        M::Pmovzxwq => (X::Int(pmovzxwq::<0>), Ext::Sse41),
        M::Pmovzxdq => (X::Int(pmovzxdq::<0>), Ext::Sse41),
        M::Ptest => (X::Ptest, Ext::Sse41),
        M::Mpsadbw => (X::IntImm(&MPSADBW), Ext::Sse41),
        M::Dpps => (X::FpImm(&DPPS), Ext::Sse41),
        M::Dppd => (X::FpImm(&DPPD), Ext::Sse41),
        M::Roundps => (X::FpImm(&ROUNDPS), Ext::Sse41),
        M::Roundpd => (X::FpImm(&ROUNDPD), Ext::Sse41),
        M::Roundss => (X::FpImm(&ROUNDSS), Ext::Sse41),
        M::Roundsd => (X::FpImm(&ROUNDSD), Ext::Sse41),
        M::Blendps => (X::Blend(32), Ext::Sse41),
        M::Blendpd => (X::Blend(64), Ext::Sse41),
        M::Pblendw => (X::Blend(16), Ext::Sse41),
        M::Blendvps => (X::BlendV(32), Ext::Sse41),
        M::Blendvpd => (X::BlendV(64), Ext::Sse41),
        M::Pblendvb => (X::BlendV(8), Ext::Sse41),
        M::Pextrb => (X::Extract(8), Ext::Sse41),
        // The register form of PEXTRW is SSE2 (the parent module); this is PEXTRW m16.
        M::Pextrw => (X::Extract(16), Ext::Sse41),
        M::Pextrd | M::Extractps => (X::Extract(32), Ext::Sse41),
        M::Pextrq => (X::Extract(64), Ext::Sse41),
        M::Pinsrb => (X::Insert(8), Ext::Sse41),
        M::Pinsrd => (X::Insert(32), Ext::Sse41),
        M::Pinsrq => (X::Insert(64), Ext::Sse41),
        M::Insertps => (X::Insertps, Ext::Sse41),
        M::Movntdqa => (X::Load { aligned: true }, Ext::Sse41),

        M::Pcmpgtq => (X::Int(pcmpgtq::<0>), Ext::Sse42),
        M::Pcmpestri | M::Pcmpestri64 => {
            let wide = insn.mnemonic() == M::Pcmpestri64;
            (X::StrCmp { table: &PCMPESTRI, explicit: true, wide, mask: false }, Ext::Sse42)
        }
        M::Pcmpestrm | M::Pcmpestrm64 => {
            let wide = insn.mnemonic() == M::Pcmpestrm64;
            (X::StrCmp { table: &PCMPESTRM, explicit: true, wide, mask: true }, Ext::Sse42)
        }
        M::Pcmpistri => (X::StrCmp { table: &PCMPISTRI, explicit: false, wide: false, mask: false }, Ext::Sse42),
        M::Pcmpistrm => (X::StrCmp { table: &PCMPISTRM, explicit: false, wide: false, mask: true }, Ext::Sse42),

        M::Aesenc => (X::Int(aesenc::<0>), Ext::Aes),
        M::Aesenclast => (X::Int(aesenclast::<0>), Ext::Aes),
        M::Aesdec => (X::Int(aesdec::<0>), Ext::Aes),
        M::Aesdeclast => (X::Int(aesdeclast::<0>), Ext::Aes),
        M::Aesimc => (X::Int(aesimc::<0>), Ext::Aes),
        M::Aeskeygenassist => (X::Aeskeygenassist, Ext::Aes),
        M::Pclmulqdq => (X::IntImm(&PCLMULQDQ), Ext::Pclmul),
        _ => return None,
    };
    cpuid::has(ext).then_some(op)
}

/// Runs `f` on the host with XMM0 = `a`, XMM1 = `b`; returns (XMM0, RFLAGS).
fn host(f: IntFn, a: u128, b: u128) -> (u128, u64) {
    let mut io = Io { a, b, csr: 0, host_csr: 0, fl: 0 };
    f(&mut io, 0, 0, 0);
    (io.a, io.fl)
}

const LO64: u128 = u64::MAX as u128;

/// A mask of the low `bits` bits (`bits` in 8..=64).
fn lane_mask(bits: u32) -> u128 {
    (1u128 << bits) - 1
}

/// The common shape `dst = f(dst, src)`: reads the destination and the source (a 16-byte
/// memory source must be aligned) and writes the result to the destination register.
fn binary(
    cpu: &mut Cpu,
    bus: &mut dyn Bus,
    insn: &Instruction,
    (d, s): (V, V),
    f: impl FnOnce(u128, u128) -> u128,
) -> Res<()> {
    let a = read(cpu, bus, insn, d, false)?;
    let b = read(cpu, bus, insn, s, true)?;
    write_reg(cpu, d, f(a, b));
    Ok(())
}

/// `dst = f(dst, src)` for a floating-point operation under the guest's MXCSR.
fn fp_binary(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction, (d, s): (V, V), f: FpFn) -> Res<()> {
    let a = read(cpu, bus, insn, d, false)?;
    let b = read(cpu, bus, insn, s, true)?;
    let io = fp_run(cpu, a, b, f)?;
    write_reg(cpu, d, io.a);
    Ok(())
}

/// A mask of the lanes `bits` wide, among the 128 bits, for which `pick(lane)` holds.
fn lanes(bits: u32, pick: impl Fn(u32) -> bool) -> u128 {
    (0..128 / bits).filter(|&i| pick(i)).fold(0, |m, i| m | (lane_mask(bits) << (bits * i)))
}

/// Executes `op`; `d` and `s` are the first two operands, `mmx` says they are MM registers
/// (SSSE3's 64-bit forms).
pub(super) fn run(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction, op: XOp, mmx: bool, d: V, s: V) -> Res<()> {
    let imm = insn.immediate8();
    let ds = (d, s);
    match op {
        XOp::Int(f) => binary(cpu, bus, insn, ds, |a, b| host(f, a, b).0)?,
        XOp::IntImm(t) => binary(cpu, bus, insn, ds, |a, b| host(entry(t, imm), a, b).0)?,
        XOp::Horiz(f) => binary(cpu, bus, insn, ds, |a, b| {
            if mmx {
                // [a0+a1, a2+a3, b0+b1, b2+b3] is the low half of the XMM form's result for
                // the register (a_lo, b_lo).
                let v = (a & LO64) | (b << 64);
                host(f, v, v).0
            } else {
                host(f, a, b).0
            }
        })?,
        XOp::Pshufb => binary(cpu, bus, insn, ds, |a, b| {
            // The MMX form indexes with bits 2:0; with the data in both halves the XMM
            // form's index bit 3 makes no difference.
            let a = if mmx { (a & LO64) | (a << 64) } else { a };
            host(pshufb::<0>, a, b).0
        })?,
        XOp::Ptest => {
            let a = read(cpu, bus, insn, d, false)?;
            let b = read(cpu, bus, insn, s, true)?;
            let fl = host(ptest::<0>, a, b).1;
            cpu.rflags = (cpu.rflags & !ARITH) | (fl & ARITH);
        }
        XOp::StrCmp { table, explicit, wide, mask } => {
            let a = read(cpu, bus, insn, d, false)?;
            let b = read(cpu, bus, insn, s, false)?;
            // The host runs the form with 32-bit lengths; a length's absolute value
            // saturates at 16 bytes (8 words) either way, so clamping a 64-bit one to
            // [-32, 32] keeps its meaning.
            let len = |v: u64| if wide { (v as i64).clamp(-32, 32) as u64 } else { v };
            let (rax, rdx) = if explicit { (len(cpu.gpr[0]), len(cpu.gpr[2])) } else { (0, 0) };
            let mut io = Io { a, b, csr: 0, host_csr: 0, fl: 0 };
            let rcx = entry(table, imm)(&mut io, rax, rdx, cpu.gpr[1]);
            if mask {
                *xmm_mut(cpu, 0) = io.a;
            } else {
                cpu.gpr[1] = rcx;
            }
            cpu.rflags = (cpu.rflags & !ARITH) | (io.fl & ARITH);
        }
        XOp::Aeskeygenassist => binary(cpu, bus, insn, ds, |_, b| {
            // The RCON is XORed into dwords 1 and 3 of the result (SDM Vol. 2A
            // AESKEYGENASSIST); the host computes the rest.
            let rcon = u128::from(imm);
            host(aeskeygenassist::<0>, 0, b).0 ^ (rcon << 32) ^ (rcon << 96)
        })?,
        XOp::Fp(f) => fp_binary(cpu, bus, insn, ds, f)?,
        XOp::FpImm(t) => fp_binary(cpu, bus, insn, ds, entry(t, imm))?,
        XOp::Palignr => binary(cpu, bus, insn, ds, |a, b| {
            let n = u32::from(imm) * 8;
            if mmx {
                // dst:src as 128 bits, shifted right by imm8 bytes; the low 64 bits.
                ((a << 64) | (b & LO64)).checked_shr(n).unwrap_or(0) & LO64
            } else if n >= 128 {
                a.checked_shr(n - 128).unwrap_or(0)
            } else {
                b.checked_shr(n).unwrap_or(0) | a.checked_shl(128 - n).unwrap_or(0)
            }
        })?,
        XOp::Blend(bits) => {
            let pick = lanes(bits, |i| (imm >> i) & 1 != 0);
            binary(cpu, bus, insn, ds, |a, b| (a & !pick) | (b & pick))?;
        }
        XOp::BlendV(bits) => {
            let sel = xmm(cpu, 0);
            let pick = lanes(bits, |i| (sel >> (bits * i + bits - 1)) & 1 != 0);
            binary(cpu, bus, insn, ds, |a, b| (a & !pick) | (b & pick))?;
        }
        XOp::Movddup => {
            let lo = read(cpu, bus, insn, s, false)? & LO64;
            write_reg(cpu, d, lo | (lo << 64));
        }
        XOp::Movshdup | XOp::Movsldup => {
            let k = u32::from(matches!(op, XOp::Movshdup));
            binary(cpu, bus, insn, ds, |_, v| {
                let (x, y) = (lane(v, 32, k), lane(v, 32, 2 + k));
                x | (x << 32) | (y << 64) | (y << 96)
            })?;
        }
        XOp::Load { aligned } => {
            let V::Mem(la) = s else {
                return Err(Fault::InvalidOpcode);
            };
            let v = read_mem(cpu, bus, la, 16, aligned)?;
            write_reg(cpu, d, v);
        }
        XOp::Extract(bits) => {
            let v = read(cpu, bus, insn, s, false)?;
            let x = lane(v, bits, u32::from(imm) & (128 / bits - 1));
            match d {
                V::Mem(la) => write_mem(cpu, bus, la, (bits / 8) as usize, x, false)?,
                // A 32/64-bit register gets the lane zero-extended.
                V::G(r) => cpu.set_reg(r, low64(x)),
                _ => return Err(Fault::InvalidOpcode),
            }
        }
        XOp::Insert(bits) => {
            let at = bits * (u32::from(imm) & (128 / bits - 1));
            let v = read(cpu, bus, insn, s, false)? & lane_mask(bits);
            let a = read(cpu, bus, insn, d, false)?;
            write_reg(cpu, d, (a & !(lane_mask(bits) << at)) | (v << at));
        }
        XOp::Insertps => {
            // A register source supplies its lane imm8[7:6]; a memory source its m32.
            let v = match s {
                V::X(j) => lane(xmm(cpu, j), 32, u32::from(imm >> 6)),
                _ => read(cpu, bus, insn, s, false)? & lane_mask(32),
            };
            let at = 32 * (u32::from(imm >> 4) & 3);
            let zero = lanes(32, |i| (imm >> i) & 1 != 0);
            let a = read(cpu, bus, insn, d, false)?;
            write_reg(cpu, d, ((a & !(lane_mask(32) << at)) | (v << at)) & !zero);
        }
    }
    Ok(())
}
