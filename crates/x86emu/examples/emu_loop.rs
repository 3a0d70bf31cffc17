//! A fixed guest workload for measuring the interpreter: a loop mixing loads, stores, ALU,
//! ADC, IMUL, shifts, CMOV, CALL/RET and branches, in 64-bit mode. Prints guest
//! instructions and the time taken; run it under `valgrind --tool=callgrind` for a
//! host-instructions-per-guest-instruction figure that does not depend on machine noise.

use iced_x86::code_asm::*;
use std::time::Instant;
use x86emu::cpu::ctl;
use x86emu::{Cpu, CpuConfig, Exit, NullBus, RamRegion, Seg};

fn main() {
    let iterations: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let mut ram = vec![0u8; 4 << 20];
    let put = |ram: &mut [u8], at: usize, v: u64| ram[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put(&mut ram, 0x1000, 0x2000 | 3);
    put(&mut ram, 0x2000, 0x3000 | 3);
    put(&mut ram, 0x3000, 0x83);

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
    let code = a.assemble(0x10000).unwrap();
    ram[0x10000..0x10000 + code.len()].copy_from_slice(&code);

    let r = RamRegion { gpa: 0, size: ram.len() as u64, host_addr: ram.as_mut_ptr() };
    let mut c = Cpu::new(vec![r], CpuConfig::default());
    c.cr0 = ctl::CR0_PE | ctl::CR0_PG | ctl::CR0_WP | 0x10;
    c.cr4 = ctl::CR4_PAE;
    c.cr3 = 0x1000;
    c.efer = ctl::EFER_LME | ctl::EFER_LMA;
    c.seg[1] = Seg { selector: 8, base: 0, limit: 0xffff_ffff, attr: 0xa09b };
    c.gpr[4] = 0x8000;
    c.rip = 0x10000;
    let t = Instant::now();
    loop {
        match c.run(&mut NullBus, 1 << 20) {
            Exit::Budget => continue,
            Exit::HaltedForever => break,
            e => panic!("unexpected exit {e:?}"),
        }
    }
    let dt = t.elapsed().as_secs_f64();
    let n = c.stats.instructions;
    println!("guest instructions: {n}, {dt:.3} s, {:.1} M instructions/s", n as f64 / dt / 1e6);
    // The final state, to compare tiers (RUSTVISOR_EMU_TIER=interp|jit|auto).
    let mem = u64::from_le_bytes(ram[0x20008..0x20010].try_into().unwrap())
        ^ u64::from_le_bytes(ram[0x20010..0x20018].try_into().unwrap()).rotate_left(17);
    println!("tier {:?}: gpr {:x?} rflags {:#x} mem {mem:#x}", c.tier(), c.gpr, c.rflags);
}
