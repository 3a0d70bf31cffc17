//! A fixed guest workload for measuring the interpreter: a loop mixing loads, stores, ALU,
//! ADC, IMUL, shifts, CMOV, CALL/RET and branches, in 64-bit mode. Prints guest
//! instructions and the time taken; run it under `valgrind --tool=callgrind` for a
//! host-instructions-per-guest-instruction figure that does not depend on machine noise.

mod common;

use iced_x86::code_asm::*;

fn main() {
    let iterations: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let mut ram = vec![0u8; 4 << 20];

    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    let mut func = a.create_label();
    a.mov(rcx, iterations).unwrap();
    a.mov(rsi, 0x20000u64).unwrap();
    a.mov(rbx, 0x1234_5678_9abc_def1u64).unwrap();
    a.mov(rdi, 3u64).unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(rax, qword_ptr(rsi)).unwrap();
    a.add(rax, rbx).unwrap();
    a.adc(rdx, 0).unwrap();
    a.imul_2(rax, rdi).unwrap();
    a.mov(qword_ptr(rsi + 8), rax).unwrap();
    a.movzx(r10d, byte_ptr(rsi + 8)).unwrap();
    a.call(func).unwrap();
    a.test(r10d, r10d).unwrap();
    a.sete(r11b).unwrap();
    a.dec(rcx).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut func).unwrap();
    a.mov(r8, qword_ptr(rsi + 16)).unwrap();
    a.xor(r8, rax).unwrap();
    a.shr(r8, 3).unwrap();
    a.mov(qword_ptr(rsi + 16), r8).unwrap();
    a.cmp(r8, r9).unwrap();
    a.cmovb(r9, r8).unwrap();
    a.ret().unwrap();
    let (c, dt) = common::run_code(&mut ram, &mut a);
    let n = c.stats.instructions;
    println!("guest instructions: {n}, {dt:.3} s, {:.1} M instructions/s", n as f64 / dt / 1e6);
    // The final state, to compare tiers (RUSTVISOR_EMU_TIER=interp|jit|auto).
    let mem = u64::from_le_bytes(ram[0x20008..0x20010].try_into().unwrap())
        ^ u64::from_le_bytes(ram[0x20010..0x20018].try_into().unwrap()).rotate_left(17);
    println!("tier {:?}: gpr {:x?} rflags {:#x} mem {mem:#x}", c.tier(), c.gpr, c.rflags);
}
