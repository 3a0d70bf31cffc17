//! A multi-precision multiply-and-subtract loop (`res[i] -= s1[i] * limb` with borrow, over
//! 64 limbs, called 100,000 times), in the shape gcc gives the generic C of Linux's
//! `mpihelp_submul_1`: the 64x64->128 product from four IMULs of 32-bit halves, SHR/SHL,
//! CMOV, SETB, ADC and a load/store per limb. Linux runs it for RSA during boot (about half
//! of the guest instructions of the test guest's boot). Prints nanoseconds per guest
//! instruction; compare `RUSTVISOR_EMU_TIER=interp|jit|auto`.

mod common;

use common::put;
use iced_x86::code_asm::*;

fn main() {
    let calls: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let mut ram = vec![0u8; 4 << 20];
    for i in 0..64 {
        put(&mut ram, 0x30000 + i * 8, 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1));
    }
    let mut a = CodeAssembler::new(64).unwrap();
    let (mut top, mut func, mut limb) = (a.create_label(), a.create_label(), a.create_label());
    a.mov(r15, calls).unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(rdi, 0x20000u64).unwrap(); // res
    a.mov(rsi, 0x30000u64).unwrap(); // s1
    a.mov(edx, 64u32).unwrap(); // limbs
    a.mov(rcx, 0x1234_5678_9abc_def1u64).unwrap(); // the multiplier limb
    a.call(func).unwrap();
    a.dec(r15).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();
    // func(res = rdi, s1 = rsi, n = edx, v = rcx) -> borrow in rax
    a.set_label(&mut func).unwrap();
    a.push(r14).unwrap();
    a.push(r13).unwrap();
    a.push(r12).unwrap();
    a.push(rbp).unwrap();
    a.push(rbx).unwrap();
    a.mov(r11, rdi).unwrap();
    a.mov(rbx, rsi).unwrap();
    a.mov(r10, rcx).unwrap();
    a.shr(r10, 32).unwrap(); // v high half
    a.mov(r9d, ecx).unwrap(); // v low half
    a.mov(r8d, edx).unwrap();
    a.neg(r8d).unwrap(); // i = -n .. 0
    a.movsxd(r12, r8d).unwrap();
    a.mov(rbp, 0x1_0000_0000u64).unwrap();
    a.xor(esi, esi).unwrap(); // borrow
    a.set_label(&mut limb).unwrap();
    a.movsxd(rax, r8d).unwrap();
    a.sub(rax, r12).unwrap();
    a.mov(rcx, qword_ptr(rbx + rax * 8)).unwrap();
    a.lea(rdi, qword_ptr(rax * 8)).unwrap();
    a.mov(rdx, rcx).unwrap();
    a.mov(ecx, ecx).unwrap();
    a.shr(rdx, 32).unwrap();
    a.mov(rax, rcx).unwrap();
    a.imul_2(rax, r9).unwrap();
    a.mov(r13, rdx).unwrap();
    a.imul_2(r13, r9).unwrap();
    a.imul_2(rcx, r10).unwrap();
    a.imul_2(rdx, r10).unwrap();
    a.mov(r14, rax).unwrap();
    a.mov(eax, eax).unwrap();
    a.shr(r14, 32).unwrap();
    a.add(rcx, r13).unwrap();
    a.add(rcx, r14).unwrap();
    a.mov(r14, rdx).unwrap();
    a.add(rdx, rbp).unwrap();
    a.cmp(rcx, r13).unwrap();
    a.mov(r13, rcx).unwrap();
    a.cmovae(rdx, r14).unwrap();
    a.add(rax, rsi).unwrap();
    a.shl(r13, 32).unwrap();
    a.add(rax, r13).unwrap();
    a.cmp(rax, rsi).unwrap();
    a.setb(sil).unwrap();
    a.add(rdi, r11).unwrap();
    a.shr(rcx, 32).unwrap();
    a.mov(r13, qword_ptr(rdi)).unwrap();
    a.movzx(esi, sil).unwrap();
    a.sub(r13, rax).unwrap();
    a.adc(rsi, rcx).unwrap();
    a.mov(qword_ptr(rdi), r13).unwrap();
    a.add(rsi, rdx).unwrap();
    a.add(r8d, 1).unwrap();
    a.jne(limb).unwrap();
    a.mov(rax, rsi).unwrap();
    a.pop(rbx).unwrap();
    a.pop(rbp).unwrap();
    a.pop(r12).unwrap();
    a.pop(r13).unwrap();
    a.pop(r14).unwrap();
    a.ret().unwrap();
    let (c, dt) = common::run_code(&mut ram, &mut a);
    let n = c.stats.instructions;
    println!("guest instructions: {n}, {dt:.3} s, {:.2} ns per guest instruction", dt * 1e9 / n as f64);
    // The final state, to compare tiers.
    let res: u64 = (0..64)
        .map(|i| u64::from_le_bytes(ram[0x20000 + i * 8..0x20008 + i * 8].try_into().unwrap()))
        .fold(0, |a, v| a.rotate_left(9) ^ v);
    println!("tier {:?}: rax {:#x} rflags {:#x} res {res:#x}; {:?}", c.tier(), c.gpr[0], c.rflags, c.jit_stats());
}
