//! The n-body benchmark's advance step (5 bodies, 10 pairs) in scalar SSE2 double, in the
//! shape gcc -O2 gives the C version (MOVSD/SUBSD/MULSD/ADDSD/SQRTSD/DIVSD on memory and
//! registers, MOVAPD copies): the userland benchmark's `nbody` step. Prints nanoseconds
//! per guest instruction and the final positions (to compare
//! `RUSTVISOR_EMU_TIER=interp|jit|auto`).

mod common;

use common::put;
use iced_x86::code_asm::*;

/// Bodies: x, y, z, vx, vy, vz, mass (doubles, 56 bytes each) at this GPA.
const BODIES: u64 = 0x30000;
/// The time step (a double) at this GPA.
const DT: u64 = 0x2f000;

fn main() {
    let steps: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let mut ram = vec![0u8; 4 << 20];
    let init: [[f64; 7]; 5] = [
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 39.47],
        [4.84, -1.16, -0.10, 0.606, 2.81, -0.02, 0.037],
        [8.34, 4.12, -0.40, -1.01, 1.82, 0.008, 0.011],
        [12.89, -15.11, -0.22, 1.08, 0.868, -0.01, 0.0017],
        [15.37, -25.91, 0.179, 0.979, 0.594, -0.034, 0.002],
    ];
    for (i, b) in init.iter().enumerate() {
        for (k, v) in b.iter().enumerate() {
            put(&mut ram, BODIES as usize + i * 56 + k * 8, v.to_bits());
        }
    }
    put(&mut ram, DT as usize, 0.01f64.to_bits());
    let mut a = CodeAssembler::new(64).unwrap();
    let (mut step, mut outer, mut inner, mut pos) =
        (a.create_label(), a.create_label(), a.create_label(), a.create_label());
    a.mov(r15, steps).unwrap();
    a.mov(rbx, BODIES).unwrap();
    a.set_label(&mut step).unwrap();
    a.xor(edi, edi).unwrap();
    a.set_label(&mut outer).unwrap();
    a.lea(rsi, qword_ptr(rdi + 56)).unwrap();
    a.set_label(&mut inner).unwrap();
    for (k, x) in [xmm0, xmm1, xmm2].into_iter().enumerate() {
        let o = 8 * k as i32;
        a.movsd_2(x, qword_ptr(rbx + rdi + o)).unwrap();
        a.subsd(x, qword_ptr(rbx + rsi + o)).unwrap();
    }
    a.movapd(xmm3, xmm0).unwrap();
    a.mulsd(xmm3, xmm0).unwrap();
    a.movapd(xmm4, xmm1).unwrap();
    a.mulsd(xmm4, xmm1).unwrap();
    a.addsd(xmm3, xmm4).unwrap();
    a.movapd(xmm4, xmm2).unwrap();
    a.mulsd(xmm4, xmm2).unwrap();
    a.addsd(xmm3, xmm4).unwrap(); // d2
    a.sqrtsd(xmm4, xmm3).unwrap();
    a.mulsd(xmm4, xmm3).unwrap();
    a.movsd_2(xmm5, qword_ptr(DT)).unwrap();
    a.divsd(xmm5, xmm4).unwrap(); // mag = dt / (d2 * sqrt(d2))
    a.movsd_2(xmm6, qword_ptr(rbx + rsi + 48)).unwrap();
    a.mulsd(xmm6, xmm5).unwrap(); // mj * mag
    a.movsd_2(xmm7, qword_ptr(rbx + rdi + 48)).unwrap();
    a.mulsd(xmm7, xmm5).unwrap(); // mi * mag
    for (k, x) in [xmm0, xmm1, xmm2].into_iter().enumerate() {
        let o = 24 + 8 * k as i32;
        a.movapd(xmm8, x).unwrap();
        a.mulsd(xmm8, xmm6).unwrap();
        a.movsd_2(xmm9, qword_ptr(rbx + rdi + o)).unwrap();
        a.subsd(xmm9, xmm8).unwrap();
        a.movsd_2(qword_ptr(rbx + rdi + o), xmm9).unwrap();
        a.mulsd(x, xmm7).unwrap();
        a.addsd(x, qword_ptr(rbx + rsi + o)).unwrap();
        a.movsd_2(qword_ptr(rbx + rsi + o), x).unwrap();
    }
    a.add(rsi, 56).unwrap();
    a.cmp(rsi, 5 * 56).unwrap();
    a.jb(inner).unwrap();
    a.add(rdi, 56).unwrap();
    a.cmp(rdi, 4 * 56).unwrap();
    a.jb(outer).unwrap();
    a.xor(edi, edi).unwrap();
    a.set_label(&mut pos).unwrap();
    for k in 0..3 {
        a.movsd_2(xmm0, qword_ptr(DT)).unwrap();
        a.mulsd(xmm0, qword_ptr(rbx + rdi + 24 + 8 * k)).unwrap();
        a.addsd(xmm0, qword_ptr(rbx + rdi + 8 * k)).unwrap();
        a.movsd_2(qword_ptr(rbx + rdi + 8 * k), xmm0).unwrap();
    }
    a.add(rdi, 56).unwrap();
    a.cmp(rdi, 5 * 56).unwrap();
    a.jb(pos).unwrap();
    a.dec(r15).unwrap();
    a.jnz(step).unwrap();
    a.hlt().unwrap();
    let (c, dt) = common::run_code(&mut ram, &mut a);
    let n = c.stats.instructions;
    println!("guest instructions: {n}, {dt:.3} s, {:.2} ns per guest instruction", dt * 1e9 / n as f64);
    let x = |i: usize| f64::from_bits(u64::from_le_bytes(ram[0x30000 + i * 56..0x30008 + i * 56].try_into().unwrap()));
    println!(
        "tier {:?}: x {:?} mxcsr {:#x}; {:?}",
        c.tier(),
        (0..5).map(x).collect::<Vec<_>>(),
        c.fpu.mxcsr,
        c.jit_stats()
    );
}
