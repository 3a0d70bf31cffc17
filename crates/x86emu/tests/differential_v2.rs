//! Differential tests of the extensions beyond SSE2 (x86-64-v2: SSE3, SSSE3, SSE4.1, SSE4.2,
//! POPCNT, CMPXCHG16B; and AES-NI, PCLMULQDQ, MOVBE): every instruction form runs natively
//! on the host CPU and in the emulator from the same random states and the final states must
//! be identical, as in `differential.rs`. RDRAND and RDSEED cannot be compared; their tests
//! check CF, the destination sizes and that the numbers do not repeat. Emulator-only tests
//! check alignment faults, #UD/#NM, and what CPUID advertises.
//!
//! The emulator implements these extensions only where the host has them, and the native
//! runs need them too: without them the tests say so and check nothing else.

mod common;

use common::*;
use iced_x86::code_asm::*;

/// Multiplier applied to every case count.
const SCALE: usize = 4;

type X = AsmRegisterXmm;
type M = AsmRegisterMm;
const XP: [(X, X); 3] = [(xmm0, xmm1), (xmm3, xmm12), (xmm15, xmm7)];
const MP: [(M, M); 2] = [(mm0, mm1), (mm3, mm6)];

/// Whether the host has every extension these tests run natively.
fn host_ok() -> bool {
    let ok = is_x86_feature_detected!("sse3")
        && is_x86_feature_detected!("ssse3")
        && is_x86_feature_detected!("sse4.1")
        && is_x86_feature_detected!("sse4.2")
        && is_x86_feature_detected!("popcnt")
        && is_x86_feature_detected!("cmpxchg16b")
        && is_x86_feature_detected!("aes")
        && is_x86_feature_detected!("pclmulqdq")
        && is_x86_feature_detected!("movbe");
    if !ok {
        eprintln!("host lacks an x86-64-v2/AES/PCLMUL/MOVBE feature: not run");
    }
    ok
}

fn run_all(seed: u64, what: &str, forms: Vec<Form>, n: usize, setup: impl Fn(&mut State, &mut Rng, u64)) {
    if !host_ok() {
        return;
    }
    let mut c = Checker::new(seed);
    for f in &forms {
        c.check(f, n * SCALE, &setup);
    }
    c.finish(what);
}

/// Aligned R12 with 48 bytes of vector data at [R12], a random MXCSR (exceptions masked)
/// half of the time, and equal operands sometimes.
fn v2_setup(st: &mut State, r: &mut Rng, base: u64) {
    ptr_aligned(st, r, base);
    if r.chance(2) {
        st.random_mxcsr(r);
    }
    let o = scratch_off(st, base, R12);
    for k in 0..3 {
        let v = xmm_val(r);
        put_scratch(st, o + 16 * k, &v.to_le_bytes());
    }
    if r.chance(4) {
        st.xmm[1] = st.xmm[0];
        st.xmm[12] = st.xmm[3];
        st.mm[1] = st.mm[0];
    }
}

/// `op` on each XMM pair and with a memory source `$mem(r12 + $off)`.
macro_rules! xmm_ops {
    ($f:ident, $mem:ident, $off:expr; $($op:ident),* $(,)?) => {{ $(
        for (d, s) in XP {
            $f.push(Form::new(format!("{} {d:?},{s:?}", stringify!($op)), move |a| a.$op(d, s)));
        }
        $f.push(Form::new(format!("{} xmm5,mem", stringify!($op)), |a| a.$op(xmm5, $mem(r12 + $off))));
    )* }};
}

/// `op` with each immediate in `$imms`, on a register pair and with a memory source.
macro_rules! xmm_imm_ops {
    ($f:ident, $mem:ident, $off:expr, $imms:expr; $($op:ident),* $(,)?) => {{ $(
        for i in $imms {
            let n = stringify!($op);
            $f.push(Form::new(format!("{n} xmm2,xmm9,{i:#x}"), move |a| a.$op(xmm2, xmm9, i)));
            $f.push(Form::new(format!("{n} xmm0,xmm0,{i:#x}"), move |a| a.$op(xmm0, xmm0, i)));
            $f.push(Form::new(format!("{n} xmm14,mem,{i:#x}"), move |a| a.$op(xmm14, $mem(r12 + $off), i)));
        }
    )* }};
}

/// `op` on MM register pairs and with a 64-bit memory source (any alignment).
macro_rules! mmx_ops {
    ($f:ident; $($op:ident),* $(,)?) => {{ $(
        for (d, s) in MP {
            $f.push(Form::new(format!("{} {d:?},{s:?}", stringify!($op)), move |a| a.$op(d, s)).mmx());
        }
        $f.push(Form::new(format!("{} mm5,mem", stringify!($op)), |a| a.$op(mm5, qword_ptr(r12 + 3))).mmx());
    )* }};
}

#[test]
fn sse3() {
    let mut f = Vec::new();
    xmm_ops!(f, xmmword_ptr, 16; addsubps, addsubpd, haddps, haddpd, hsubps, hsubpd, movshdup, movsldup);
    xmm_ops!(f, qword_ptr, 5; movddup);
    f.push(Form::new("lddqu xmm4,m128", |a| a.lddqu(xmm4, xmmword_ptr(r12 + 3))));
    f.push(Form::new("lddqu xmm11,m128 aligned", |a| a.lddqu(xmm11, xmmword_ptr(r12))));
    run_all(100, "sse3", f, 24, v2_setup);
}

#[test]
fn sse3_fisttp() {
    let f = vec![
        Form::new("fisttp m16", |a| a.fisttp(word_ptr(r12 + 1))).x87(2),
        Form::new("fisttp m32", |a| a.fisttp(dword_ptr(r12 + 2))).x87(2),
        Form::new("fisttp m64", |a| a.fisttp(qword_ptr(r12 + 3))).x87(1),
        Form::new("fisttp m32 twice", |a| {
            a.fisttp(dword_ptr(r12))?;
            a.fisttp(dword_ptr(r12 + 4))
        })
        .x87(2),
        // Empty ST(0): stack underflow, the integer indefinite.
        Form::new("fisttp m64 empty", |a| {
            a.ffree(st0)?;
            a.fisttp(qword_ptr(r12))
        })
        .x87(1),
    ];
    run_all(101, "sse3_fisttp", f, 40, |st, r, base| {
        ptr_aligned(st, r, base);
        // Any rounding control: FISTTP truncates regardless.
        st.fcw = 0x37f | (r.below(4) as u16) << 10;
        for i in 0..2 {
            if r.chance(2) {
                let v = (r.next() as i64 >> r.below(64)) as f64 / (1u64 << r.below(8)) as f64;
                st.x87[i] = f80_from_f64(v);
            }
        }
    });
}

#[test]
fn ssse3() {
    let mut f = Vec::new();
    xmm_ops!(f, xmmword_ptr, 16; pabsb, pabsw, pabsd, phaddw, phaddd, phaddsw, phsubw, phsubd,
        phsubsw, pmaddubsw, pmulhrsw, pshufb, psignb, psignw, psignd);
    mmx_ops!(f; pabsb, pabsw, pabsd, phaddw, phaddd, phaddsw, phsubw, phsubd, phsubsw, pmaddubsw,
        pmulhrsw, pshufb, psignb, psignw, psignd);
    xmm_imm_ops!(f, xmmword_ptr, 0, [0i32, 1, 4, 8, 15, 16, 17, 24, 31, 32, 33, 0xff]; palignr);
    for i in [0i32, 1, 7, 8, 9, 15, 16, 17, 0xff] {
        f.push(Form::new(format!("palignr mm2,mm7,{i}"), move |a| a.palignr(mm2, mm7, i)).mmx());
        f.push(Form::new(format!("palignr mm2,m64,{i}"), move |a| a.palignr(mm2, qword_ptr(r12 + 1), i)).mmx());
    }
    // MMX forms make the x87 stack all valid with TOP = 0, as FXSAVE shows.
    f.push(Form::new("pshufb mm3,mm4 + x87 state", |a| a.pshufb(mm3, mm4)).x87(3));
    f.push(Form::new("phaddw mm3,mm4 + x87 state", |a| a.phaddw(mm3, mm4)).x87(2));
    run_all(102, "ssse3", f, 16, |st, r, base| {
        v2_setup(st, r, base);
        // PSHUFB indices with the zeroing bit; PMULHRSW/PMADDUBSW extremes.
        for i in [1usize, 7, 12] {
            if r.chance(3) {
                let set = [0u8, 1, 2, 7, 8, 15, 0x80, 0x8f, 0x7f, 0xff];
                st.xmm[i] = (0..16).fold(0, |v, k| v | (u128::from(r.pick(&set)) << (8 * k)));
                st.mm[i & 7] = st.xmm[i] as u64;
            }
        }
    });
}

#[test]
fn sse41_integer() {
    let mut f = Vec::new();
    xmm_ops!(f, xmmword_ptr, 16; pmulld, pmuldq, pminsb, pminsd, pminuw, pminud, pmaxsb, pmaxsd,
        pmaxuw, pmaxud, pcmpeqq, packusdw, phminposuw, ptest);
    // The sign/zero extensions read 8, 4 or 2 bytes, any alignment.
    xmm_ops!(f, qword_ptr, 1; pmovsxbw, pmovsxwd, pmovsxdq, pmovzxbw, pmovzxwd, pmovzxdq);
    xmm_ops!(f, dword_ptr, 3; pmovsxbd, pmovsxwq, pmovzxbd, pmovzxwq);
    xmm_ops!(f, word_ptr, 5; pmovsxbq, pmovzxbq);
    xmm_imm_ops!(f, xmmword_ptr, 0, [0i32, 1, 2, 3, 4, 5, 6, 7, 0xf8, 0xff]; mpsadbw);
    xmm_imm_ops!(f, xmmword_ptr, 16, [0i32, 1, 2, 4, 5, 7, 8, 0xa, 0xf, 0x10, 0xff]; blendps);
    xmm_imm_ops!(f, xmmword_ptr, 16, [0i32, 1, 2, 3, 0xfe, 0xff]; blendpd);
    xmm_imm_ops!(f, xmmword_ptr, 16, [0i32, 1, 0x55, 0xaa, 0x0f, 0xf0, 0x81, 0x3c, 0xff]; pblendw);
    xmm_ops!(f, xmmword_ptr, 0; blendvps, blendvpd, pblendvb);
    f.push(Form::new("movntdqa", |a| a.movntdqa(xmm6, xmmword_ptr(r12 + 16))));
    for i in [0i32, 1, 2, 3, 4, 7, 8, 15, 16, 0xff] {
        f.push(Form::new(format!("pextrb eax,xmm3,{i}"), move |a| a.pextrb(eax, xmm3, i)));
        f.push(Form::new(format!("pextrb r9,xmm13,{i}"), move |a| a.pextrb(r9, xmm13, i)));
        f.push(Form::new(format!("pextrb m8,xmm3,{i}"), move |a| a.pextrb(byte_ptr(r12 + 1), xmm3, i)));
        f.push(Form::new(format!("pextrw m16,xmm3,{i}"), move |a| a.pextrw(word_ptr(r12 + 1), xmm3, i)));
        f.push(Form::new(format!("pextrd ecx,xmm8,{i}"), move |a| a.pextrd(ecx, xmm8, i)));
        f.push(Form::new(format!("pextrd m32,xmm8,{i}"), move |a| a.pextrd(dword_ptr(r12 + 2), xmm8, i)));
        f.push(Form::new(format!("pextrq r10,xmm8,{i}"), move |a| a.pextrq(r10, xmm8, i)));
        f.push(Form::new(format!("pextrq m64,xmm8,{i}"), move |a| a.pextrq(qword_ptr(r12 + 3), xmm8, i)));
        f.push(Form::new(format!("extractps eax,xmm2,{i}"), move |a| a.extractps(eax, xmm2, i)));
        f.push(Form::new(format!("extractps r11,xmm2,{i}"), move |a| a.extractps(r11, xmm2, i)));
        f.push(Form::new(format!("extractps m32,xmm2,{i}"), move |a| a.extractps(dword_ptr(r12 + 1), xmm2, i)));
        f.push(Form::new(format!("pinsrb xmm3,ecx,{i}"), move |a| a.pinsrb(xmm3, ecx, i)));
        f.push(Form::new(format!("pinsrb xmm3,m8,{i}"), move |a| a.pinsrb(xmm3, byte_ptr(r12 + 1), i)));
        f.push(Form::new(format!("pinsrd xmm9,esi,{i}"), move |a| a.pinsrd(xmm9, esi, i)));
        f.push(Form::new(format!("pinsrd xmm9,m32,{i}"), move |a| a.pinsrd(xmm9, dword_ptr(r12 + 2), i)));
        f.push(Form::new(format!("pinsrq xmm9,r8,{i}"), move |a| a.pinsrq(xmm9, r8, i)));
        f.push(Form::new(format!("pinsrq xmm9,m64,{i}"), move |a| a.pinsrq(xmm9, qword_ptr(r12 + 3), i)));
    }
    for i in [0i32, 0x10, 0x20, 0x30, 0x40, 0x80, 0xc0, 0x0f, 0xcf, 0x1e, 0x5a, 0xa5, 0xff] {
        f.push(Form::new(format!("insertps xmm2,xmm9,{i:#x}"), move |a| a.insertps(xmm2, xmm9, i)));
        f.push(Form::new(format!("insertps xmm4,xmm4,{i:#x}"), move |a| a.insertps(xmm4, xmm4, i)));
        f.push(Form::new(format!("insertps xmm2,m32,{i:#x}"), move |a| a.insertps(xmm2, dword_ptr(r12 + 1), i)));
    }
    run_all(103, "sse41_integer", f, 16, |st, r, base| {
        v2_setup(st, r, base);
        // PTEST: disjoint and covering operands.
        match r.below(4) {
            0 => st.xmm[12] = !st.xmm[3],
            1 => st.xmm[12] = st.xmm[3] & xmm_val(r),
            _ => {}
        }
    });
}

#[test]
fn sse41_float() {
    let mut f = Vec::new();
    let dpps = [0i32, 0xff, 0xf1, 0x31, 0x7f, 0x55, 0xa2, 0x0f, 0xf0, 0x11, 0x88, 0x3c, 0xe4];
    xmm_imm_ops!(f, xmmword_ptr, 16, dpps; dpps);
    xmm_imm_ops!(f, xmmword_ptr, 16, [0i32, 0x33, 0x31, 0x13, 0x22, 0x11, 0x32, 0xff, 0xcc]; dppd);
    let round = [0i32, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0xf4, 0x89];
    xmm_imm_ops!(f, xmmword_ptr, 16, round; roundps, roundpd);
    xmm_imm_ops!(f, dword_ptr, 1, round; roundss);
    xmm_imm_ops!(f, qword_ptr, 3, round; roundsd);
    run_all(104, "sse41_float", f, 16, |st, r, base| {
        v2_setup(st, r, base);
        // Values with fractions, near .5, and large ones for ROUND*.
        for i in [0usize, 9] {
            if r.chance(2) {
                let v = (r.below(1 << 24) as f64 - (1u64 << 23) as f64) / (1u64 << r.below(12)) as f64;
                st.xmm[i] = if r.chance(2) {
                    u128::from(v.to_bits()) | (u128::from((-v).to_bits()) << 64)
                } else {
                    let x = (v as f32).to_bits();
                    (0..4).fold(0, |a, k| a | (u128::from(x ^ ((k & 1) << 31)) << (32 * k)))
                };
            }
        }
    });
}

/// PCMPxSTRx inputs: strings over a small alphabet with NULs, and explicit lengths around
/// and beyond the saturation points, with random upper bits in RAX/RDX.
fn str_setup(st: &mut State, r: &mut Rng, base: u64) {
    v2_setup(st, r, base);
    let alpha = [0u8, b'a', b'b', b'c', b'A', b'z', 0x80, 0xff, b'0', b'9'];
    for i in [0usize, 2, 9, 3, 12] {
        if r.chance(4) {
            continue;
        }
        let n = r.below(4) + 2;
        let set: Vec<u8> = (0..n).map(|_| r.pick(&alpha)).collect();
        st.xmm[i] = (0..16).fold(0, |v, k| v | (u128::from(r.pick(&set)) << (8 * k)));
    }
    let o = scratch_off(st, base, R12) + 1;
    let v = st.xmm[r.pick(&[2usize, 9, 12])];
    put_scratch(st, o, &v.to_le_bytes());
    for g in [RAX, RDX] {
        st.gpr[g] = match r.below(5) {
            0 => r.pick(&[
                0x8000_0000,
                0x7fff_ffff,
                0xffff_ffff,
                0x1_0000_0003,
                0x8000_0000_0000_0000,
                0x7fff_ffff_ffff_ffff,
                0xffff_ffff_0000_0010,
            ]),
            1 => (r.below(41) as i64 - 20) as u64,
            2 => (r.below(41) as i64 - 20) as u64 | (r.next() << 32),
            _ => r.below(18),
        };
    }
}

#[test]
fn sse42_string_compare() {
    let mut f = Vec::new();
    // Every control byte (bit 7 reserved) for the register forms.
    for i in 0i32..0x80 {
        f.push(Form::new(format!("pcmpistri {i:#x}"), move |a| a.pcmpistri(xmm2, xmm9, i)));
        f.push(Form::new(format!("pcmpestri {i:#x}"), move |a| a.pcmpestri(xmm3, xmm12, i)));
    }
    for i in [0i32, 0x04, 0x08, 0x0c, 0x18, 0x1a, 0x30, 0x3a, 0x40, 0x44, 0x4c, 0x70, 0x7e, 0x80, 0x8c, 0xff] {
        f.push(Form::new(format!("pcmpistrm {i:#x}"), move |a| a.pcmpistrm(xmm2, xmm9, i)));
        f.push(Form::new(format!("pcmpestrm {i:#x}"), move |a| a.pcmpestrm(xmm3, xmm12, i)));
        f.push(Form::new(format!("pcmpestri64 {i:#x}"), move |a| a.pcmpestri64(xmm3, xmm12, i)));
        f.push(Form::new(format!("pcmpestrm64 {i:#x}"), move |a| a.pcmpestrm64(xmm0, xmm12, i)));
        f.push(Form::new(format!("pcmpistri {i:#x} (bit 7)"), move |a| a.pcmpistri(xmm9, xmm2, i | 0x80)));
        // Memory operands need no alignment.
        f.push(Form::new(format!("pcmpistri m {i:#x}"), move |a| a.pcmpistri(xmm2, xmmword_ptr(r12 + 1), i)));
        f.push(Form::new(format!("pcmpistrm m {i:#x}"), move |a| a.pcmpistrm(xmm2, xmmword_ptr(r12 + 1), i)));
        f.push(Form::new(format!("pcmpestri m {i:#x}"), move |a| a.pcmpestri(xmm2, xmmword_ptr(r12 + 1), i)));
        f.push(Form::new(format!("pcmpestrm m {i:#x}"), move |a| a.pcmpestrm(xmm9, xmmword_ptr(r12 + 1), i)));
    }
    run_all(105, "sse42_string_compare", f, 8, str_setup);
}

#[test]
fn sse42_other() {
    let mut f = Vec::new();
    xmm_ops!(f, xmmword_ptr, 16; pcmpgtq);
    f.push(Form::new("crc32 eax,cl", |a| a.crc32(eax, cl)));
    f.push(Form::new("crc32 ecx,bh", |a| a.crc32(ecx, bh)));
    f.push(Form::new("crc32 r9,sil", |a| a.crc32(r9, sil)));
    f.push(Form::new("crc32 edx,r8w", |a| a.crc32(edx, r8w)));
    f.push(Form::new("crc32 esi,edi", |a| a.crc32(esi, edi)));
    f.push(Form::new("crc32 rax,rcx", |a| a.crc32(rax, rcx)));
    f.push(Form::new("crc32 r15,r15", |a| a.crc32(r15, r15)));
    f.push(Form::new("crc32 ecx,m8", |a| a.crc32(ecx, byte_ptr(r12 + 1))));
    f.push(Form::new("crc32 ecx,m16", |a| a.crc32(ecx, word_ptr(r12 + 1))));
    f.push(Form::new("crc32 ecx,m32", |a| a.crc32(ecx, dword_ptr(r12 + 3))));
    f.push(Form::new("crc32 r10,m8", |a| a.crc32(r10, byte_ptr(r12 + 5))));
    f.push(Form::new("crc32 r10,m64", |a| a.crc32(r10, qword_ptr(r12 + 7))));
    f.push(Form::new("popcnt ax,cx", |a| a.popcnt(ax, cx)));
    f.push(Form::new("popcnt r9w,m16", |a| a.popcnt(r9w, word_ptr(r12 + 1))));
    f.push(Form::new("popcnt ecx,edx", |a| a.popcnt(ecx, edx)));
    f.push(Form::new("popcnt esi,m32", |a| a.popcnt(esi, dword_ptr(r12 + 3))));
    f.push(Form::new("popcnt rax,r11", |a| a.popcnt(rax, r11)));
    f.push(Form::new("popcnt r10,m64", |a| a.popcnt(r10, qword_ptr(r12 + 5))));
    run_all(106, "sse42_other", f, 24, v2_setup);
}

#[test]
fn aes_pclmul_movbe_cx16() {
    let mut f = Vec::new();
    xmm_ops!(f, xmmword_ptr, 16; aesenc, aesenclast, aesdec, aesdeclast, aesimc);
    let rcon = [0i32, 1, 2, 4, 8, 0x10, 0x1b, 0x36, 0x5a, 0x80, 0xff];
    xmm_imm_ops!(f, xmmword_ptr, 0, rcon; aeskeygenassist);
    xmm_imm_ops!(f, xmmword_ptr, 16, [0i32, 1, 0x10, 0x11, 0x02, 0x20, 0xee, 0xff]; pclmulqdq);
    f.push(Form::new("aes round trip", |a| {
        a.aesenc(xmm0, xmm1)?;
        a.aesenclast(xmm0, xmm2)?;
        a.aesimc(xmm3, xmm1)?;
        a.aesdec(xmm0, xmm3)?;
        a.aesdeclast(xmm0, xmm4)
    }));
    f.push(Form::new("movbe ax,m16", |a| a.movbe(ax, word_ptr(r12 + 1))));
    f.push(Form::new("movbe ecx,m32", |a| a.movbe(ecx, dword_ptr(r12 + 2))));
    f.push(Form::new("movbe r9,m64", |a| a.movbe(r9, qword_ptr(r12 + 3))));
    f.push(Form::new("movbe m16,dx", |a| a.movbe(word_ptr(r12 + 1), dx)));
    f.push(Form::new("movbe m32,esi", |a| a.movbe(dword_ptr(r12 + 5), esi)));
    f.push(Form::new("movbe m64,r15", |a| a.movbe(qword_ptr(r12 + 7), r15)));
    f.push(Form::new("lock cmpxchg16b", |a| a.lock().cmpxchg16b(xmmword_ptr(r12 + 16))));
    run_all(107, "aes_pclmul_movbe_cx16", f, 16, |st, r, base| {
        v2_setup(st, r, base);
        if r.chance(2) {
            // Let CMPXCHG16B succeed.
            let o = scratch_off(st, base, R12) + 16;
            let (lo, hi) = (st.gpr[RAX], st.gpr[RDX]);
            put_scratch(st, o, &lo.to_le_bytes());
            put_scratch(st, o + 8, &hi.to_le_bytes());
        }
    });
}

// ---------------------------------------------------------------------------------------
// RDRAND / RDSEED (emulator only: the numbers cannot be compared)
// ---------------------------------------------------------------------------------------

const DRAW_REGS: [AsmRegister64; 8] = [rax, rbx, rcx, rdx, rsi, rdi, r8, r9];

/// Runs `draws` of 8 destinations (`size` bytes) from `emit` in the emulator, `runs` times;
/// checks that every one set CF (counted in R13) and left OF/SF/ZF/AF/PF clear, and that
/// the upper bits of 16-bit destinations are kept and those of 32-bit ones cleared.
/// Returns the numbers drawn.
fn draw(
    name: &str,
    size: usize,
    runs: usize,
    emit: fn(&mut CodeAssembler, usize) -> Result<(), IcedError>,
) -> Vec<u64> {
    let mut h = Harness::new();
    let mut rng = Rng::new(200 + size as u64);
    h.load(&Form::new(name, move |a| {
        a.xor(r13d, r13d)?;
        for k in 0..DRAW_REGS.len() {
            emit(a, k)?;
            a.adc(r13, 0)?;
        }
        // Flags of the last draw.
        emit(a, 0)
    }));
    let mut got = Vec::new();
    let mut empty = 0;
    for _ in 0..runs {
        let st = State::random(&mut rng, h.base);
        let mut out = h.run_emu(&st).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        // The host may have no number ready (RDSEED under load, even after the emulator's
        // retries): the guest then sees CF = 0 with every arithmetic flag clear, and is to
        // try again (SDM Vol. 1 §7.3.17): so does this run, a bounded number of times.
        while (out.gpr[R13] != DRAW_REGS.len() as u64 || out.rflags & CF == 0) && empty < 50 {
            if out.rflags & CF == 0 {
                assert_eq!(out.rflags & ARITH, 0, "{name}: CF = 0 with the other arithmetic flags clear");
            }
            empty += 1;
            out = h.run_emu(&st).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        assert_eq!(out.gpr[R13], DRAW_REGS.len() as u64, "{name}: CF = 1 on every draw ({empty} runs retried)");
        assert_eq!(out.rflags & ARITH, CF, "{name}: CF set, the other arithmetic flags clear");
        for k in 0..DRAW_REGS.len() {
            let i = [RAX, RBX, RCX, RDX, RSI, RDI, R8, R9][k];
            let v = out.gpr[i];
            match size {
                2 => assert_eq!(v >> 16, st.gpr[i] >> 16, "{name}: 16-bit destination keeps bits 63:16"),
                4 => assert_eq!(v >> 32, 0, "{name}: 32-bit destination zero-extended"),
                _ => {}
            }
            if k != 0 {
                got.push(v & (u64::MAX >> (64 - 8 * size)));
            }
        }
    }
    got
}

/// Checks that `vals` (of `bits` bits) repeat no more than chance allows and that every bit
/// takes both values.
fn check_random(name: &str, vals: &[u64], bits: u32) {
    let mut sorted = vals.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let dups = vals.len() - sorted.len();
    // Expected repeats among n draws of b bits: about n²/2^(b+1); allow a wide margin.
    let n = vals.len() as f64;
    let expect = n * n / 2f64.powi(bits as i32 + 1);
    assert!((dups as f64) <= 4.0 * expect + 2.0, "{name}: {dups} repeats among {} draws", vals.len());
    let (or, and) = vals.iter().fold((0u64, u64::MAX), |(o, a), &v| (o | v, a & v));
    let all = u64::MAX >> (64 - bits);
    assert_eq!(or, all, "{name}: some bit never set");
    assert_eq!(and & all, 0, "{name}: some bit always set");
}

#[test]
fn rdrand_rdseed_in_emulator() {
    let mut checked = 0;
    for (ext, seed) in [("rdrand", false), ("rdseed", true)] {
        if !std::is_x86_feature_detected!("rdrand") || (seed && !std::is_x86_feature_detected!("rdseed")) {
            eprintln!("host lacks {ext}: not run");
            continue;
        }
        let r64: fn(&mut CodeAssembler, usize) -> Result<(), IcedError> =
            if seed { |a, k| a.rdseed(DRAW_REGS[k]) } else { |a, k| a.rdrand(DRAW_REGS[k]) };
        let r32: fn(&mut CodeAssembler, usize) -> Result<(), IcedError> = if seed {
            |a, k| a.rdseed([eax, ebx, ecx, edx, esi, edi, r8d, r9d][k])
        } else {
            |a, k| a.rdrand([eax, ebx, ecx, edx, esi, edi, r8d, r9d][k])
        };
        let r16: fn(&mut CodeAssembler, usize) -> Result<(), IcedError> = if seed {
            |a, k| a.rdseed([ax, bx, cx, dx, si, di, r8w, r9w][k])
        } else {
            |a, k| a.rdrand([ax, bx, cx, dx, si, di, r8w, r9w][k])
        };
        let v = draw(&format!("{ext} r64"), 8, 150, r64);
        check_random(&format!("{ext} r64"), &v, 64);
        let v = draw(&format!("{ext} r32"), 4, 150, r32);
        check_random(&format!("{ext} r32"), &v, 32);
        let v = draw(&format!("{ext} r16"), 2, 150, r16);
        check_random(&format!("{ext} r16"), &v, 16);
        checked += 1;
    }
    eprintln!("rdrand_rdseed_in_emulator: {checked} instructions checked");
}

// ---------------------------------------------------------------------------------------
// CPUID and exceptions (emulator only)
// ---------------------------------------------------------------------------------------

/// The emulated CPUID advertises the x86-64-v2 level and the extensions, exactly where the
/// host has them, and nothing of AVX/XSAVE.
#[test]
fn cpuid_advertises_v2_in_emulator() {
    let mut h = Harness::new();
    let mut r = Rng::new(300);
    h.load(&Form::new("cpuid", |a| {
        a.mov(eax, 1)?;
        a.cpuid()?;
        a.mov(r8, rcx)?;
        a.mov(r9, rdx)?;
        a.mov(eax, 7)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(r10, rbx)?;
        a.mov(eax, 0x8000_0001u32)?;
        a.cpuid()?;
        a.mov(r11, rcx)
    }));
    let st = State::random(&mut r, h.base);
    let out = h.run_emu(&st).expect("cpuid");
    let (ecx1, edx1, ebx7, ecx81) = (out.gpr[R8], out.gpr[R9], out.gpr[R10], out.gpr[R11]);
    // SSE3 PCLMUL SSSE3 CX16 SSE4.1 SSE4.2 MOVBE POPCNT AES RDRAND.
    let v2 = [0u32, 1, 9, 13, 19, 20, 22, 23, 25, 30];
    let host = std::arch::x86_64::__cpuid(1).ecx;
    for b in v2 {
        assert_eq!(ecx1 >> b & 1, u64::from(host >> b & 1), "CPUID.1:ECX bit {b} as on the host");
    }
    // No MONITOR, VMX, FMA, XSAVE/OSXSAVE, AVX, F16C, hypervisor...
    let known = v2.iter().fold(0u64, |m, b| m | 1 << b);
    assert_eq!(ecx1 & !known, 0, "CPUID.1:ECX has nothing else: {ecx1:#x}");
    assert_eq!(edx1 & (1 << 25 | 1 << 26), 1 << 25 | 1 << 26, "SSE, SSE2");
    let host7 = std::arch::x86_64::__cpuid_count(7, 0).ebx;
    assert_eq!(ebx7 >> 18 & 1, u64::from(host7 >> 18 & 1), "RDSEED as on the host");
    assert_eq!(ebx7 & (1 << 5 | 1 << 3 | 1 << 8 | 1 << 29), 0, "no AVX2, BMI1, BMI2, SHA");
    assert_eq!(ecx81 & 1, 1, "LAHF/SAHF in 64-bit mode");
    if host_ok() {
        let all = [0u32, 1, 9, 13, 19, 20, 22, 23, 25].iter().fold(0u64, |m, b| m | 1 << b);
        assert_eq!(ecx1 & all, all, "the full x86-64-v2 set, AES, PCLMULQDQ, MOVBE");
    }
}

const CR0_EM: i32 = 1 << 2;
const CR0_TS: i32 = 1 << 3;
const CR4_OSFXSR: i32 = 1 << 9;
const CR4_OSXMMEXCPT: i32 = 1 << 10;

/// Emits `cr = (cr | set) & !clear` for CR4 (`is_cr4`) or CR0 (CPL 0 in the emulator).
fn set_cr(a: &mut CodeAssembler, is_cr4: bool, set: i32, clear: i32) -> Result<(), IcedError> {
    let cr = if is_cr4 { cr4 } else { cr0 };
    a.mov(r13, cr)?;
    a.or(r13, set)?;
    a.and(r13, !clear)?;
    a.mov(cr, r13)
}

/// Runs each form in the emulator from a few random states (R12 16-byte aligned) and
/// checks that it completes (`None`) or stops at the exception vector given.
fn emu_cases(seed: u64, cases: Vec<(Form, Option<u8>)>) {
    if !host_ok() {
        return;
    }
    let mut h = Harness::new();
    let mut r = Rng::new(seed);
    let mut failures = Vec::new();
    for (form, expect) in &cases {
        h.load(form);
        for _ in 0..SCALE {
            let mut st = State::random(&mut r, h.base);
            v2_setup(&mut st, &mut r, h.base);
            st.mxcsr = 0x1f80;
            let got = match h.run_emu(&st) {
                Ok(_) => None,
                Err(EmuEnd::Fault(v)) => Some(v),
                Err(e) => {
                    failures.push(format!("{}: {e:?}", form.name));
                    continue;
                }
            };
            if got != *expect {
                failures.push(format!("{}: expected {expect:?}, got {got:?}", form.name));
            } else if got == Some(13) && h.fault_error_code() != 0 {
                failures.push(format!("{}: #GP error code {}", form.name, h.fault_error_code()));
            }
        }
    }
    eprintln!("{} cases", cases.len() * SCALE);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn v2_exceptions_in_emulator() {
    let gp = Some(13);
    let ud = Some(6);
    let nm = Some(7);
    let m = |off: i32| xmmword_ptr(r12 + off);
    let cases: Vec<(Form, Option<u8>)> = vec![
        // 16-byte memory operands must be aligned...
        (Form::new("haddps misaligned", move |a| a.haddps(xmm0, m(8))), gp),
        (Form::new("movshdup misaligned", move |a| a.movshdup(xmm0, m(4))), gp),
        (Form::new("pshufb misaligned", move |a| a.pshufb(xmm0, m(1))), gp),
        (Form::new("palignr misaligned", move |a| a.palignr(xmm0, m(2), 3)), gp),
        (Form::new("pmulld misaligned", move |a| a.pmulld(xmm0, m(8))), gp),
        (Form::new("ptest misaligned", move |a| a.ptest(xmm0, m(8))), gp),
        (Form::new("blendvps misaligned", move |a| a.blendvps(xmm1, m(8))), gp),
        (Form::new("pblendw misaligned", move |a| a.pblendw(xmm1, m(8), 5)), gp),
        (Form::new("dpps misaligned", move |a| a.dpps(xmm1, m(8), 0xff)), gp),
        (Form::new("roundpd misaligned", move |a| a.roundpd(xmm1, m(8), 1)), gp),
        (Form::new("movntdqa misaligned", move |a| a.movntdqa(xmm1, m(8))), gp),
        (Form::new("mpsadbw misaligned", move |a| a.mpsadbw(xmm1, m(8), 0)), gp),
        (Form::new("pcmpgtq misaligned", move |a| a.pcmpgtq(xmm1, m(8))), gp),
        (Form::new("aesenc misaligned", move |a| a.aesenc(xmm1, m(8))), gp),
        (Form::new("aeskeygenassist misaligned", move |a| a.aeskeygenassist(xmm1, m(8), 1)), gp),
        (Form::new("pclmulqdq misaligned", move |a| a.pclmulqdq(xmm1, m(8), 0)), gp),
        // ...except for these, and for smaller operands.
        (Form::new("lddqu misaligned ok", move |a| a.lddqu(xmm0, m(1))), None),
        (Form::new("pcmpistri misaligned ok", move |a| a.pcmpistri(xmm0, m(1), 0x0c)), None),
        (Form::new("pcmpestrm misaligned ok", move |a| a.pcmpestrm(xmm1, m(3), 0x40)), None),
        (Form::new("pmovzxbw m64 misaligned ok", |a| a.pmovzxbw(xmm0, qword_ptr(r12 + 1))), None),
        (Form::new("movddup m64 misaligned ok", |a| a.movddup(xmm0, qword_ptr(r12 + 1))), None),
        (Form::new("roundss m32 misaligned ok", |a| a.roundss(xmm0, dword_ptr(r12 + 1), 4)), None),
        (Form::new("insertps m32 misaligned ok", |a| a.insertps(xmm0, dword_ptr(r12 + 1), 0x10)), None),
        (Form::new("pshufb m64 (MMX) misaligned ok", |a| a.pshufb(mm0, qword_ptr(r12 + 1))), None),
        // CR0/CR4 rules of SSE and MMX.
        (
            Form::new("pshufb xmm without OSFXSR", |a| {
                set_cr(a, true, 0, CR4_OSFXSR)?;
                a.pshufb(xmm0, xmm1)
            }),
            ud,
        ),
        (
            Form::new("pcmpistri without OSFXSR", |a| {
                set_cr(a, true, 0, CR4_OSFXSR)?;
                a.pcmpistri(xmm0, xmm1, 0)
            }),
            ud,
        ),
        (
            Form::new("aesenc with CR0.EM", |a| {
                set_cr(a, false, CR0_EM, 0)?;
                a.aesenc(xmm0, xmm1)
            }),
            ud,
        ),
        (
            Form::new("roundps with CR0.TS", |a| {
                set_cr(a, false, CR0_TS, 0)?;
                a.roundps(xmm0, xmm1, 0)
            }),
            nm,
        ),
        (
            Form::new("pshufb mm with CR0.EM", |a| {
                set_cr(a, false, CR0_EM, 0)?;
                a.pshufb(mm0, mm1)
            }),
            ud,
        ),
        (
            Form::new("phaddw mm with CR0.TS", |a| {
                set_cr(a, false, CR0_TS, 0)?;
                a.phaddw(mm0, mm1)
            }),
            nm,
        ),
        (
            Form::new("pshufb mm without OSFXSR ok", |a| {
                set_cr(a, true, 0, CR4_OSFXSR)?;
                a.pshufb(mm0, mm1)?;
                a.emms()?;
                set_cr(a, true, CR4_OSFXSR, 0)
            }),
            None,
        ),
        (
            Form::new("fisttp with CR0.TS", |a| {
                set_cr(a, false, CR0_TS, 0)?;
                a.fisttp(dword_ptr(r12))
            }),
            nm,
        ),
        // General-purpose instructions ignore CR0.TS/EM.
        (
            Form::new("crc32/movbe/popcnt with CR0.TS|EM", |a| {
                set_cr(a, false, CR0_TS | CR0_EM, 0)?;
                a.crc32(eax, dword_ptr(r12))?;
                a.movbe(rcx, qword_ptr(r12 + 3))?;
                a.popcnt(rdx, rcx)?;
                set_cr(a, false, 0, CR0_TS | CR0_EM)
            }),
            None,
        ),
        // Unmasked SIMD exceptions: #XM, or #UD without CR4.OSXMMEXCPT.
        (
            Form::new("roundss inexact unmasked -> #XM", |a| {
                a.mov(dword_ptr(r12), 0x1f80 & !0x1000)?;
                a.ldmxcsr(dword_ptr(r12))?;
                a.mov(eax, 0x3fc0_0000)?; // 1.5
                a.movd(xmm1, eax)?;
                a.roundss(xmm0, xmm1, 0)
            }),
            Some(19),
        ),
        (
            Form::new("roundss inexact suppressed ok", |a| {
                a.mov(dword_ptr(r12), 0x1f80 & !0x1000)?;
                a.ldmxcsr(dword_ptr(r12))?;
                a.mov(eax, 0x3fc0_0000)?;
                a.movd(xmm1, eax)?;
                a.roundss(xmm0, xmm1, 8)
            }),
            None,
        ),
        (
            Form::new("haddpd invalid unmasked, no OSXMMEXCPT -> #UD", |a| {
                set_cr(a, true, 0, CR4_OSXMMEXCPT)?;
                a.mov(dword_ptr(r12), 0x1f80 & !0x80)?;
                a.ldmxcsr(dword_ptr(r12))?;
                a.mov(rax, 0x7ff4_0000_0000_0000u64)?; // signalling NaN
                a.movq(xmm0, rax)?;
                a.haddpd(xmm0, xmm0)
            }),
            ud,
        ),
    ];
    emu_cases(400, cases);
}
