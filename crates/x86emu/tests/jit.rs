//! The translation tier (`x86emu::jit`): compiled blocks against the interpreter on
//! self-modifying code, faults in the middle of a block, interrupts during a long compiled
//! loop, the code-memory bound, and hostile random code.
//!
//! The compiled tier under test is Cranelift's ([`compiled_tier()`]), or the baseline tier's
//! with `RUSTVISOR_EMU_TIER=base` (scripts/test.sh runs this file both ways).

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use iced_x86::ConditionCode;
use x86emu::cpu::ctl;
use x86emu::jit::Tier;
use x86emu::{Bus, Cpu, CpuConfig, Exit, RamRegion, Seg};

const RAM: usize = 4 << 20;
const CODE: u64 = 0x10000;
const IDT: u64 = 0x4000;
const GDT: u64 = 0x500;
const HANDLERS: u64 = 0x6000;
const STACK: u64 = 0x9000;
/// Not mapped (PDPT entry 1 is empty).
const UNMAPPED: u64 = 0x4000_0000;

/// The compiled tier under test (see the module docs).
fn compiled_tier() -> Tier {
    match std::env::var("RUSTVISOR_EMU_TIER").as_deref() {
        Ok("base") => Tier::Base,
        _ => Tier::Jit,
    }
}

/// Blocks compiled by the tier under test.
fn blocks_compiled(s: &x86emu::jit::JitStats) -> u64 {
    s.compiled + s.base_compiled
}

/// A bus whose interrupt line rises after `after` looks at it.
struct IrqBus {
    looks: u64,
    after: u64,
    vector: u8,
}

impl Bus for IrqBus {
    fn io_in(&mut self, _: u16, _: u8) -> u32 {
        !0
    }
    fn io_out(&mut self, _: u16, _: u8, _: u32) {}
    fn mmio_read(&mut self, _: u64, _: u8) -> u64 {
        !0
    }
    fn mmio_write(&mut self, _: u64, _: u8, _: u64) {}
    fn interrupt_pending(&mut self) -> bool {
        self.looks += 1;
        self.looks > self.after
    }
    fn ack_interrupt(&mut self) -> Option<u8> {
        self.after = u64::MAX;
        Some(self.vector)
    }
    fn now_ns(&mut self) -> u64 {
        0
    }
}

fn never() -> IrqBus {
    IrqBus { looks: 0, after: u64::MAX, vector: 0 }
}

/// A 64-bit guest: 4 MiB identity-mapped with 2 MiB pages, a GDT, an IDT whose every
/// vector goes to a `hlt` stub at HANDLERS + 16·vector, `code` at CODE.
struct Machine {
    ram: Vec<u8>,
    cpu: Cpu,
}

impl Machine {
    fn new(code: &[u8], tier: Tier) -> Machine {
        let mut ram = vec![0u8; RAM];
        let put = |ram: &mut [u8], at: u64, v: u64| {
            let at = at as usize;
            ram[at..at + 8].copy_from_slice(&v.to_le_bytes())
        };
        put(&mut ram, 0x1000, 0x2000 | 3);
        put(&mut ram, 0x2000, 0x3000 | 3);
        put(&mut ram, 0x3000, 0x83);
        put(&mut ram, 0x3008, 0x20_0000 | 0x83);
        put(&mut ram, GDT + 8, 0x00af_9b00_0000_ffff);
        put(&mut ram, GDT + 16, 0x00cf_9300_0000_ffff);
        for v in 0..256u64 {
            let target = HANDLERS + 16 * v;
            let lo = (target & 0xffff) | (8 << 16) | (0xe << 40) | (1 << 47) | ((target >> 16) & 0xffff) << 48;
            put(&mut ram, IDT + 16 * v, lo);
            put(&mut ram, IDT + 16 * v + 8, target >> 32);
        }
        ram[HANDLERS as usize..HANDLERS as usize + 4096].fill(0xf4);
        ram[CODE as usize..CODE as usize + code.len()].copy_from_slice(code);
        let r = RamRegion { gpa: 0, size: RAM as u64, host_addr: ram.as_mut_ptr() };
        let mut c = Cpu::new(vec![r], CpuConfig::default());
        c.set_tier(tier);
        c.cr0 = ctl::CR0_PE | ctl::CR0_PG | ctl::CR0_WP | 0x10;
        c.cr4 = ctl::CR4_PAE;
        c.cr3 = 0x1000;
        c.efer = ctl::EFER_LME | ctl::EFER_LMA;
        c.seg[1] = Seg { selector: 8, base: 0, limit: 0xffff_ffff, attr: 0xa09b };
        for i in [0, 2, 3, 4, 5] {
            c.seg[i] = Seg { selector: 0x10, base: 0, limit: 0xffff_ffff, attr: 0xc093 };
        }
        c.gdtr_base = GDT;
        c.gdtr_limit = 0x17;
        c.idtr_base = IDT;
        c.idtr_limit = 0xfff;
        c.gpr[4] = STACK;
        c.rip = CODE;
        Machine { ram, cpu: c }
    }

    /// Runs until `hlt` with IF clear (or `max` instructions); returns the exit.
    fn run(&mut self, bus: &mut IrqBus, max: u64) -> Exit {
        let mut left = max;
        loop {
            let before = self.cpu.stats.instructions;
            let e = self.cpu.run(bus, left.min(1 << 20));
            left = left.saturating_sub(self.cpu.stats.instructions - before);
            match e {
                Exit::Budget if left > 0 => continue,
                e => return e,
            }
        }
    }

    /// Runs in calls of `slice` instructions each (no interrupts) until one ends otherwise
    /// than on its budget; returns that exit.
    fn run_in_slices(&mut self, slice: u64) -> Exit {
        loop {
            match self.cpu.run(&mut never(), slice) {
                Exit::Budget => {}
                e => return e,
            }
        }
    }

    fn u64_at(&self, at: u64) -> u64 {
        let at = at as usize;
        u64::from_le_bytes(self.ram[at..at + 8].try_into().unwrap())
    }

    /// Everything an instruction may change that the tests compare.
    fn state(&self) -> (Vec<u64>, u64, u64, u64, u64) {
        let stack: u64 = (0..64).map(|i| self.u64_at(STACK - 0x200 + 8 * i)).fold(0, |a, v| a.rotate_left(5) ^ v);
        let data: u64 = (0..512).map(|i| self.u64_at(0x20000 + 8 * i)).fold(0, |a, v| a.rotate_left(7) ^ v);
        (self.cpu.gpr.to_vec(), self.cpu.rip, self.cpu.rflags, self.cpu.cr2, stack ^ data.rotate_left(1))
    }
}

fn asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(CODE).unwrap()
}

/// One step of xorshift64 on R8 (clobbers RAX).
fn xorshift_r8(a: &mut CodeAssembler) -> Result<(), IcedError> {
    for (sh, left) in [(13, true), (7, false), (17, true)] {
        a.mov(rax, r8)?;
        if left {
            a.shl(rax, sh)?;
        } else {
            a.shr(rax, sh)?;
        }
        a.xor(r8, rax)?;
    }
    Ok(())
}

/// Runs `code` in both tiers; asserts the same exit and state, and that compiled code ran.
fn both(code: &[u8], max: u64) -> (Machine, Machine) {
    let mut i = Machine::new(code, Tier::Interp);
    let mut j = Machine::new(code, compiled_tier());
    let ei = i.run(&mut never(), max);
    let ej = j.run(&mut never(), max);
    assert_eq!(ei, ej, "exit");
    assert_eq!(i.state(), j.state(), "state (gpr, rip, rflags, cr2, memory)");
    assert_eq!(i.cpu.stats.instructions, j.cpu.stats.instructions, "instructions retired");
    assert!(j.cpu.jit_stats().instructions > 0, "no compiled code ran: {:?}", j.cpu.jit_stats());
    assert_eq!(i.cpu.jit_stats().entries, 0);
    (i, j)
}

#[test]
fn page_fault_in_the_middle_of_a_compiled_block() {
    let code = asm(|a| {
        a.mov(rax, 5u64)?;
        a.mov(rbx, 0x7fff_ffff_ffff_fffeu64)?;
        a.add(rbx, rax)?; // OF, SF: flags the fault must keep
        a.mov(rcx, UNMAPPED + 0x18)?;
        a.mov(qword_ptr(rcx), rdx)?; // #PF: RIP, RAX, RBX and flags as before it
        a.mov(rax, 7u64)?;
        a.add(rax, rax)?;
        a.hlt()
    });
    let (_, j) = both(&code, 1000);
    // The #PF stub halted; the frame holds the faulting MOV's RIP and the flags of the ADD.
    assert_eq!(j.cpu.rip, HANDLERS + 16 * 14 + 1);
    assert_eq!(j.cpu.cr2, UNMAPPED + 0x18);
    let rsp_ = j.cpu.gpr[4];
    assert_eq!(j.u64_at(rsp_), 2, "error code: write, not present");
    let faulting = CODE + 10 + 10 + 3 + 10;
    assert_eq!(j.u64_at(rsp_ + 8), faulting, "RIP of the faulting instruction");
    let fl = j.u64_at(rsp_ + 24);
    // 0x7fff_ffff_ffff_fffe + 5 = 0x8000_0000_0000_0003: OF, SF, AF (0xe + 5 carries out
    // of bit 3) and PF (0x03 has two bits set); CF and ZF clear.
    assert_eq!(fl & 0x8d5, 0x894, "flags of the ADD: {fl:#x}");
    assert_eq!(j.cpu.gpr[0], 5);
    assert_eq!(j.cpu.gpr[3], 0x8000_0000_0000_0003);
    // Faults and retired counts are exact: 5 instructions, then the stub's hlt.
    assert_eq!(j.cpu.stats.instructions, 6);
}

#[test]
fn faulting_loads_stores_and_ret_in_every_position() {
    // A mix of fast forms whose memory operand is unmapped at one position at a time.
    for pos in 0..6 {
        let code = asm(|a| {
            let mut f = a.create_label();
            a.mov(rsi, 0x20000u64)?;
            a.mov(rdi, UNMAPPED)?;
            a.xor(eax, eax)?;
            for i in 0..6 {
                let base = if i == pos { rdi } else { rsi };
                match i {
                    0 => a.add(rax, qword_ptr(base + 8))?,
                    1 => a.mov(qword_ptr(base + 16), rax)?,
                    2 => a.sub(dword_ptr(base + 24), 3)?,
                    3 => a.movzx(ecx, word_ptr(base + 4))?,
                    4 => a.cmp(qword_ptr(base), rcx)?,
                    _ => {
                        a.mov(rsp, base)?;
                        a.add(rsp, 0x100)?;
                        a.call(f)?;
                    }
                }
                a.inc(rax)?;
            }
            a.hlt()?;
            a.set_label(&mut f)?;
            a.ret()
        });
        both(&code, 1000);
    }
}

#[test]
fn self_modifying_code_inside_a_compiled_loop() {
    // The loop rewrites the immediate of its own `add rbx, imm32` every iteration (and so
    // retires its own block, compiled or not); the sum shows which code each pass ran.
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    let mut patch = a.create_label();
    a.mov(rcx, 1000u64).unwrap();
    a.xor(ebx, ebx).unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(rax, rcx).unwrap();
    a.lea(rdx, ptr(patch)).unwrap();
    a.mov(dword_ptr(rdx + 3), eax).unwrap(); // imm32 of the add below (48 81 c3 imm32)
    a.set_label(&mut patch).unwrap();
    a.add(rbx, 0x1234_5678).unwrap();
    a.dec(rcx).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let (_, j) = both(&code, 100_000);
    assert_eq!(j.cpu.gpr[3], (1..=1000).sum::<u64>());
}

#[test]
fn self_modifying_store_then_fallthrough_in_one_block() {
    // A store rewrites the next instruction of the same straight-line block.
    let code = asm(|a| {
        let mut next = a.create_label();
        a.lea(rdx, ptr(next))?;
        a.mov(dword_ptr(rdx + 3), 42)?; // new imm32 of `add rbx, imm32`
        a.set_label(&mut next)?;
        a.add(rbx, 0x1111)?;
        a.hlt()
    });
    let (_, j) = both(&code, 1000);
    assert_eq!(j.cpu.gpr[3], 42);
}

#[test]
fn interrupt_arrives_during_a_long_compiled_loop() {
    // An endless compiled loop: only the interrupt ends it.
    let code = asm(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.add(rax, 1)?;
        a.mov(qword_ptr(0x20000u64), rax)?;
        a.cmp(rax, rbx)?;
        a.jne(top)
    });
    let mut m = Machine::new(&code, compiled_tier());
    m.cpu.rflags = 0x202;
    m.cpu.gpr[3] = u64::MAX;
    let mut bus = IrqBus { looks: 0, after: 50, vector: 0x40 };
    let e = m.run(&mut bus, 50_000_000);
    assert_eq!(e, Exit::HaltedForever);
    assert_eq!(m.cpu.rip, HANDLERS + 16 * 0x40 + 1, "the interrupt was delivered");
    assert!(m.cpu.jit_stats().instructions > 100_000, "{:?}", m.cpu.jit_stats());
    assert_eq!(m.cpu.stats.interrupts, 1);
    // The interrupted RIP is a block boundary of the loop, and the loop's state is exact.
    let rsp_ = m.cpu.gpr[4];
    assert_eq!(m.u64_at(rsp_), CODE);
    assert_eq!(m.u64_at(0x20000), m.cpu.gpr[0]);
}

#[test]
fn budget_stays_exact_with_compiled_blocks() {
    let code = asm(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.add(rax, 1)?;
        a.add(rbx, 2)?;
        a.add(rcx, 3)?;
        a.jmp(top)
    });
    let mut m = Machine::new(&code, compiled_tier());
    for budget in [1u64, 2, 3, 5, 4095, 4096, 4097, 100_003] {
        let before = m.cpu.stats.instructions;
        assert_eq!(m.cpu.run(&mut never(), budget), Exit::Budget);
        assert_eq!(m.cpu.stats.instructions - before, budget);
    }
    // Every pass of the loop is 4 instructions: the registers count whole passes.
    let n = m.cpu.stats.instructions;
    let passes = n / 4;
    let (a, b, c) = (m.cpu.gpr[0], m.cpu.gpr[3] / 2, m.cpu.gpr[1] / 3);
    let rest = n % 4;
    assert_eq!(
        (a, b, c),
        (passes + u64::from(rest >= 1), passes + u64::from(rest >= 2), passes + u64::from(rest >= 3))
    );
}

/// A compiled block that does not fit in what is left of one of the run loop's chunks (its
/// interrupt checks, every 16,384 instructions) ends the chunk early and runs compiled in the
/// next one: only the end of the budget itself is interpreted (it was: the rest of every
/// chunk, and the next chunk started in the middle of the block).
#[test]
fn compiled_blocks_run_compiled_across_the_run_loops_chunks() {
    // 7 instructions per pass: no number of passes fills a chunk.
    let code = asm(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        for r in [rax, rbx, rcx, rdx, rsi, rdi] {
            a.add(r, 1)?;
        }
        a.jmp(top)
    });
    let mut m = Machine::new(&code, compiled_tier());
    let budget = 100_003;
    assert_eq!(m.cpu.run(&mut never(), budget), Exit::Budget);
    assert_eq!(m.cpu.stats.instructions, budget);
    let interpreted = budget - m.cpu.jit_stats().instructions;
    assert!(interpreted < 7, "{interpreted} instructions interpreted; {:?}", m.cpu.jit_stats());
    // 100_003 = 14_286 passes and 1 instruction.
    assert_eq!(m.cpu.gpr[0], 14_287);
    assert_eq!(m.cpu.gpr[7], 14_286);
}

#[test]
fn code_memory_stays_bounded_under_endless_rewriting() {
    // Every pass rewrites the loop's own code: each pass compiles a new block. With a small
    // limit the JIT must throw its code away many times and still compute the same.
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    let mut patch = a.create_label();
    a.mov(rcx, 3000u64).unwrap();
    a.set_label(&mut top).unwrap();
    a.lea(rdx, ptr(patch)).unwrap();
    a.mov(dword_ptr(rdx + 3), ecx).unwrap();
    a.set_label(&mut patch).unwrap();
    a.add(rbx, 0x1234_5678).unwrap();
    a.xor(rbx, rcx).unwrap();
    a.dec(rcx).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let mut i = Machine::new(&code, Tier::Interp);
    let mut j = Machine::new(&code, compiled_tier());
    j.cpu.set_jit_code_limit(16 << 10);
    assert_eq!(i.run(&mut never(), 1_000_000), Exit::HaltedForever);
    assert_eq!(j.run(&mut never(), 1_000_000), Exit::HaltedForever);
    assert_eq!(i.state(), j.state());
    let s = j.cpu.jit_stats();
    assert!(blocks_compiled(s) >= 3000 && s.flushes > 10, "{s:?}");
}

/// A random instruction: mostly fast forms over registers that point into the code and
/// data pages (so stores rewrite code), some random bytes.
fn random_insn(r: &mut u64, out: &mut Vec<u8>) {
    let mut next = || {
        *r ^= *r << 13;
        *r ^= *r >> 7;
        *r ^= *r << 17;
        *r
    };
    let k = next() % 16;
    let modrm = (next() & 0xff) as u8;
    let rex = 0x48 | (next() & 7) as u8;
    let ops: [u8; 14] = [0x01, 0x03, 0x29, 0x2b, 0x31, 0x33, 0x39, 0x3b, 0x85, 0x89, 0x8b, 0x8d, 0x21, 0x09];
    match k {
        0..=7 => {
            out.extend([rex, ops[(next() % 14) as usize], modrm]);
            out.extend((next() as u32).to_le_bytes().iter().take((next() % 5) as usize));
        }
        8 => out.extend([0x70 | (next() & 15) as u8, (next() % 32) as u8]),
        9 => out.push(0x50 | (next() & 7) as u8),
        10 => out.push(0x58 | (next() & 7) as u8),
        11 => out.extend([0x0f, 0x40 | (next() & 15) as u8, modrm]),
        12 => out.extend([0x0f, 0x90 | (next() & 15) as u8, 0xc0 | (modrm & 7)]),
        13 => out.extend([rex, 0xc1, 0xe0 | (modrm & 0x1f), (next() & 0x3f) as u8]),
        14 => out.extend([0xe8, (next() % 64) as u8, 0, 0, 0]),
        _ => out.extend((0..(next() % 6)).map(|_| (next() & 0xff) as u8)),
    }
}

#[test]
fn hostile_random_code_in_the_jit_tier() {
    let t = std::time::Instant::now();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let (mut compiled, mut jit_time, mut interp_time) = (0, 0.0, 0.0);
    for case in 0..300 {
        let mut code = Vec::new();
        while code.len() < 3000 {
            random_insn(&mut seed, &mut code);
        }
        let mut i = Machine::new(&code, Tier::Interp);
        let mut j = Machine::new(&code, compiled_tier());
        for m in [&mut i, &mut j] {
            for (k, g) in m.cpu.gpr.iter_mut().enumerate() {
                *g = if k == 4 { STACK } else { CODE + (k as u64 * 0x123) % 0x1000 };
            }
            // Faults go to the hlt stubs with IF clear; a fault there ends the run.
        }
        let t0 = std::time::Instant::now();
        let ei = i.run(&mut never(), 20_000);
        let t1 = std::time::Instant::now();
        let ej = j.run(&mut never(), 20_000);
        interp_time += (t1 - t0).as_secs_f64();
        jit_time += t1.elapsed().as_secs_f64();
        compiled += blocks_compiled(j.cpu.jit_stats());
        assert_eq!(ei, ej, "case {case}: exit");
        assert_eq!(i.state(), j.state(), "case {case}: state");
        assert_eq!(i.cpu.stats.instructions, j.cpu.stats.instructions, "case {case}");
    }
    eprintln!(
        "{compiled} blocks compiled; interpreter {interp_time:.2} s, jit tier {jit_time:.2} s ({:.0} us per block)",
        (jit_time - interp_time) / compiled as f64 * 1e6
    );
    assert!(t.elapsed().as_secs() < 120, "took {:?}", t.elapsed());
}

#[test]
fn fault_in_a_later_pass_of_a_compiled_loop() {
    // A loop that walks up through memory until it reaches the unmapped 4 MiB mark: the
    // fault comes in a later pass of the same compiled block, after every register of the
    // block was written.
    let code = asm(|a| {
        let mut top = a.create_label();
        a.mov(rsi, (RAM as u64) - 0x1000 * 40)?;
        a.set_label(&mut top)?;
        a.add(rax, qword_ptr(rsi))?;
        a.add(rsi, 0x1000)?;
        a.inc(rcx)?;
        a.sub(rdx, rcx)?;
        a.jmp(top)
    });
    let (_, j) = both(&code, 100_000);
    assert_eq!(j.cpu.rip, HANDLERS + 16 * 14 + 1);
    assert_eq!(j.cpu.cr2, RAM as u64);
    assert_eq!(j.cpu.gpr[1], 40);
}

/// A self-loop whose passes start with register moves, LEA and an ADD (every arithmetic
/// flag overwritten before anything could observe them): compiled code does not
/// materialise the flags on its back edge, only where the loop stops. Budgets that end
/// anywhere in a pass (the stop comes at a back edge, the rest is interpreted), ADC reading
/// the pass's CF, INC keeping it and a Jcc on CMP's flags: the same state, RFLAGS
/// included, as the interpreter after every split; and the same after a later pass faults
/// (a load after the head, in a loop whose head may not drop them).
#[test]
fn flags_left_dead_on_a_compiled_loops_back_edge_are_exact_where_it_stops() {
    let code = asm(|a| {
        let mut top = a.create_label();
        a.mov(rbx, 0x8000_0000_0000_0001u64)?;
        a.mov(rax, 0x7fff_ffff_ffff_fff0u64)?;
        a.set_label(&mut top)?;
        a.mov(rdx, rax)?;
        a.lea(rsi, qword_ptr(rax + 1))?;
        a.add(rax, rbx)?;
        a.adc(rcx, 0)?;
        a.inc(rdi)?;
        a.cmp(rdi, 1_000_000)?;
        a.jne(top)
    });
    for max in [9u64, 10, 11, 12, 13, 14, 15, 50, 4095, 4096, 4097, 10_001, 100_003] {
        let (_, j) = both(&code, max);
        assert!(j.cpu.gpr[7] > 0);
    }
    let code = asm(|a| {
        let mut top = a.create_label();
        a.mov(rsi, (RAM as u64) - 0x1000 * 40)?;
        a.set_label(&mut top)?;
        a.mov(rdx, rax)?;
        a.add(rax, qword_ptr(rsi))?;
        a.add(rsi, 0x1000)?;
        a.adc(rcx, 0)?;
        a.cmp(rcx, rdx)?;
        a.jmp(top)
    });
    let (_, j) = both(&code, 100_000);
    assert_eq!(j.cpu.cr2, RAM as u64);
}

/// A chain of operations whose flags compiled code keeps lazily, each depending on the
/// flags before it (SHR, IMUL, INC keeping CF, ADC, ROL, DEC, shift by CL), on data from a
/// xorshift generator: the flags are observed by conditions that need the whole chain
/// (SETB/SETO/SETP/SETL after INC/DEC/ROL), by PUSHFQ (an interpreted instruction), by a
/// page fault in a later pass of the loop, and by the next block after a CALL. Same state as
/// the interpreter in every case.
#[test]
fn chained_lazy_flags_are_exact_wherever_they_are_observed() {
    for observe in 0..4 {
        let code = asm(|a| {
            let mut top = a.create_label();
            let mut f = a.create_label();
            a.mov(r8, 0x9e37_79b9_7f4a_7c15u64)?;
            a.mov(r9, 0x0123_4567_89ab_cdefu64)?;
            // 50 passes before the load reaches the unmapped 4 MiB mark.
            a.mov(rsi, (RAM as u64) - 8 * 50)?;
            a.mov(r14, 200u64)?;
            a.set_label(&mut top)?;
            xorshift_r8(a)?;
            // The chain: nothing in it sets every flag.
            a.mov(rax, r8)?;
            a.add(rax, r9)?;
            a.shr(rax, 7)?;
            a.imul_2(rbx, rax)?;
            a.inc(rdx)?;
            a.adc(rbx, rax)?;
            a.rol(rbx, 3)?;
            a.mov(ecx, r8d)?;
            a.sar(r10, cl)?;
            a.dec(r10d)?;
            match observe {
                0 => {
                    a.setb(r11b)?;
                    a.add(r12, r11)?;
                    a.seto(r11b)?;
                    a.add(r12, r11)?;
                    a.setp(r11b)?;
                    a.add(r12, r11)?;
                    a.setl(r11b)?;
                    a.add(r12, r11)?;
                }
                1 => {
                    a.pushfq()?;
                    a.pop(r11)?;
                    a.add(r12, r11)?;
                }
                2 => {
                    a.mov(r11, qword_ptr(rsi))?;
                    a.add(rsi, 8)?;
                    a.adc(r12, r11)?;
                }
                _ => {
                    a.call(f)?;
                    a.add(r12, r11)?;
                }
            }
            a.dec(r14)?;
            a.jnz(top)?;
            a.hlt()?;
            // On another page: the flags cross a block boundary.
            for _ in 0..4096 {
                a.nop()?;
            }
            a.set_label(&mut f)?;
            a.pushfq()?;
            a.pop(r11)?;
            a.ret()
        });
        let (i, _) = both(&code, 1_000_000);
        if observe == 2 {
            assert_eq!(i.cpu.cr2, RAM as u64, "the load faulted at the 4 MiB mark");
        }
    }
}

/// Flags a Cranelift block leaves lazily at its exits (an ADD, SUB, CMP, logic operation,
/// INC or DEC of every size, kept as operands instead of RFLAGS) are exact wherever a later
/// block observes them: a Jcc, SETcc, CMOVcc or ADC at its head, an interpreted PUSHFQ, a
/// PUSHFQ after a block that does not touch them, a page fault at its head (the frame's
/// RFLAGS), the head of a loop, and an interrupt taken between blocks (its frame). Same
/// state as the interpreter, in slices of odd budgets too.
#[test]
fn flags_left_lazily_at_block_exits_are_exact_where_later_blocks_observe_them() {
    let conds = [
        ConditionCode::b,
        ConditionCode::o,
        ConditionCode::p,
        ConditionCode::l,
        ConditionCode::be,
        ConditionCode::s,
        ConditionCode::e,
        ConditionCode::g,
        ConditionCode::a,
        ConditionCode::ge,
    ];
    for observe in 0..7 {
        let code = asm(|a| {
            let mut top = a.create_label();
            a.mov(r8, 0x9e37_79b9_7f4a_7c15u64)?;
            // Observer 5 loads 10 times a pass: the 30th pass faults at the 4 MiB mark.
            a.mov(rsi, (RAM as u64) - 8 * 10 * 29)?;
            a.mov(r14, 2000u64)?;
            a.set_label(&mut top)?;
            xorshift_r8(a)?;
            for (k, &cc) in conds.iter().enumerate() {
                a.mov(rax, r8)?;
                a.mov(rbx, r8)?;
                a.ror(rbx, (7 * k + 3) as u32)?;
                a.mov(ecx, ebx)?;
                // The block's last flag operation, left lazily at its exit.
                match k {
                    0 => a.add(al, bl)?,
                    1 => a.sub(ax, bx)?,
                    2 => a.cmp(eax, ebx)?,
                    3 => a.cmp(rax, rbx)?,
                    4 => a.and(bx, ax)?,
                    5 => a.xor(ebx, eax)?,
                    6 | 7 => {
                        // INC and DEC keep CF, of the block before.
                        if k == 6 {
                            a.cmp(rbx, rax)?;
                        } else {
                            a.add(rbx, rax)?;
                        }
                        let mut mid = a.create_label();
                        a.jmp(mid)?;
                        a.set_label(&mut mid)?;
                        if k == 6 {
                            a.inc(al)?
                        } else {
                            a.dec(rbx)?
                        }
                    }
                    8 => a.add(rax, rbx)?,
                    _ => a.or(cl, bl)?,
                }
                if observe == 6 {
                    a.mov(r11d, 3)?;
                }
                let mut next = a.create_label();
                a.jmp(next)?;
                a.set_label(&mut next)?;
                match observe {
                    0 => {
                        let mut skip = a.create_label();
                        match cc {
                            ConditionCode::b => a.jb(skip)?,
                            ConditionCode::o => a.jo(skip)?,
                            ConditionCode::p => a.jp(skip)?,
                            ConditionCode::l => a.jl(skip)?,
                            ConditionCode::be => a.jbe(skip)?,
                            ConditionCode::s => a.js(skip)?,
                            ConditionCode::e => a.je(skip)?,
                            ConditionCode::g => a.jg(skip)?,
                            ConditionCode::a => a.ja(skip)?,
                            _ => a.jge(skip)?,
                        }
                        a.add(r12, (k + 1) as i32)?;
                        a.set_label(&mut skip)?;
                    }
                    1 => {
                        a.setb(r9b)?;
                        a.seto(r10b)?;
                        a.setp(r11b)?;
                        a.setl(r13b)?;
                        a.setbe(r15b)?;
                        a.sets(dl)?;
                        a.cmovg(rdi, rbx)?;
                        a.cmovae(rbp, rax)?;
                        for r in [r9, r10, r11, r13, r15, rdx] {
                            a.rol(r12, 1)?;
                            a.add(r12, r)?;
                        }
                    }
                    2 => a.adc(r12, rax)?,
                    3 | 4 => {
                        if observe == 4 {
                            // A block that leaves them as they are.
                            a.mov(r11, rax)?;
                            let mut on = a.create_label();
                            a.jmp(on)?;
                            a.set_label(&mut on)?;
                        }
                        a.pushfq()?;
                        a.pop(r11)?;
                        a.rol(r12, 5)?;
                        a.xor(r12, r11)?;
                    }
                    5 => {
                        a.mov(r11, qword_ptr(rsi))?;
                        a.lea(rsi, qword_ptr(rsi + 8))?;
                        a.adc(r12, r11)?;
                    }
                    _ => {
                        // A loop whose head reads the flags of the block before it (the
                        // NOP's block runs its first pass).
                        let mut l = a.create_label();
                        a.nop()?;
                        a.set_label(&mut l)?;
                        a.adc(r12, rax)?;
                        a.rol(rax, 9)?;
                        a.dec(r11d)?;
                        a.jnz(l)?;
                    }
                }
            }
            a.dec(r14)?;
            a.jnz(top)?;
            a.cli()?;
            a.hlt()
        });
        let (i, _) = both(&code, 1_000_000);
        if observe == 5 {
            assert_eq!(i.cpu.cr2, RAM as u64, "the load at the head of a block faulted");
        }
        // In slices of odd budgets (interrupt checks and budgets end runs between blocks).
        let mut j = Machine::new(&code, compiled_tier());
        assert_eq!(j.run_in_slices(997), Exit::HaltedForever);
        assert_eq!(i.state(), j.state(), "observer {observe}, in slices");
        // An interrupt taken between two blocks: its frame holds the flags the interpreter
        // has after as many instructions.
        if observe == 3 {
            for after in [1u64, 3, 6, 9] {
                let mut j = Machine::new(&code, compiled_tier());
                j.cpu.rflags = 0x202;
                let mut bus = IrqBus { looks: 0, after, vector: 0x40 };
                assert_eq!(j.run(&mut bus, 10_000_000), Exit::HaltedForever);
                assert_eq!(j.cpu.stats.interrupts, 1, "interrupt after {after} looks");
                let frame = j.cpu.gpr[4];
                // Every instruction but the handler's HLT ran before the interrupt.
                let mut i = Machine::new(&code, Tier::Interp);
                i.cpu.rflags = 0x202;
                assert_eq!(i.run(&mut never(), j.cpu.stats.instructions - 1), Exit::Budget);
                assert_eq!(j.u64_at(frame), i.cpu.rip, "interrupted RIP");
                assert_eq!(j.u64_at(frame + 16), i.cpu.rflags, "RFLAGS in the frame, after {after} looks");
            }
        }
    }
}

/// A hot loop (Cranelift code) calls, through a register, 256 functions that each run too
/// rarely for Cranelift but often enough for baseline code: the flags its ADD left lazily
/// are materialised for the baseline code its probe goes on in, which reads them (ADC, a
/// Jcc at its head). Same state as the interpreter.
#[test]
fn flags_left_lazily_reach_baseline_code_the_probe_goes_on_in() {
    const FUNCS: u64 = CODE + 0x1000;
    let code = asm(|a| {
        let mut top = a.create_label();
        a.mov(r8, 0x9e37_79b9_7f4a_7c15u64)?;
        a.mov(r14, 256 * 300u64)?;
        a.set_label(&mut top)?;
        a.mov(rbx, r14)?;
        a.and(ebx, 255)?;
        a.shl(ebx, 5)?;
        a.add(rbx, FUNCS as i32)?;
        xorshift_r8(a)?;
        a.mov(rax, r8)?;
        a.add(rax, r9)?;
        a.call(rbx)?;
        a.rol(r9, 1)?;
        a.add(r9, rax)?;
        a.dec(r14)?;
        a.jnz(top)?;
        a.cli()?;
        a.hlt()
    });
    // 256 functions of 32 bytes on the next page: `adc r12, rax; jb +3; add r13, 1; ret`.
    let mut code = code;
    code.resize(0x1000, 0xcc);
    for _ in 0..256 {
        let f = [0x49, 0x11, 0xc4, 0x72, 0x04, 0x49, 0x83, 0xc5, 0x01, 0xc3];
        let mut slot = [0xccu8; 32];
        slot[..f.len()].copy_from_slice(&f);
        code.extend_from_slice(&slot);
    }
    let mut i = Machine::new(&code, Tier::Interp);
    let mut j = Machine::new(&code, Tier::Auto);
    assert_eq!(i.run(&mut never(), 100_000_000), Exit::HaltedForever);
    assert_eq!(j.run(&mut never(), 100_000_000), Exit::HaltedForever);
    assert_eq!(i.state(), j.state(), "state (gpr, rip, rflags, cr2, memory)");
    let s = j.cpu.jit_stats();
    assert!(s.base_instructions > 0 && s.instructions > s.base_instructions, "both tiers ran: {s:?}");
}

/// Blocks compiled with the blocks they jump and call to on their page (traces): a loop
/// of JMPs and a CALL runs as one compiled loop; a fault in a later block of the trace, a
/// store into the trace's own code (the rewritten ADD runs from then on), and a CALL
/// whose return address overwrites the function it calls (its stack on the trace's page)
/// leave the state the interpreter has, in slices of odd budgets too.
#[test]
fn traces_through_jumps_and_calls_on_a_page_stay_exact() {
    for variant in 0..3 {
        let code = asm(|a| {
            let mut top = a.create_label();
            let (mut b1, mut b2, mut f, mut patched) =
                (a.create_label(), a.create_label(), a.create_label(), a.create_label());
            // (Every pass of variant 2 retires its page's code: it is compiled again.)
            a.mov(rcx, if variant == 2 { 200u64 } else { 3000 })?;
            a.mov(rsi, (RAM as u64) - 8 * 2500)?;
            if variant == 2 {
                // The stack on the code's page, just above the called function: the CALL's
                // push overwrites the function the trace goes on to.
                a.lea(rsp, ptr(f))?;
                a.add(rsp, 8)?;
            }
            a.set_label(&mut top)?;
            a.add(rax, rcx)?;
            a.jmp(b1)?;
            a.set_label(&mut b1)?;
            if variant == 1 {
                // Once, at pass 2,000 from the end: the ADD below adds 5 from then on.
                let mut skip = a.create_label();
                a.cmp(rcx, 1000)?;
                a.jne(skip)?;
                a.lea(rdi, ptr(patched))?;
                a.mov(byte_ptr(rdi + 3), 5)?;
                a.set_label(&mut skip)?;
            }
            a.call(f)?;
            a.xor(rbx, rax)?;
            a.jmp(b2)?;
            a.set_label(&mut b2)?;
            if variant == 0 {
                // Faults at the 4 MiB mark, at pass 2,500.
                a.add(rdx, qword_ptr(rsi))?;
                a.add(rsi, 8)?;
            } else {
                a.nop()?;
            }
            a.set_label(&mut patched)?;
            a.add(rdx, 1)?; // 48 83 C2 01
            a.dec(rcx)?;
            a.jnz(top)?;
            a.cli()?;
            a.hlt()?;
            a.set_label(&mut f)?;
            a.rol(rax, 3)?;
            a.ret()?;
            a.db(&[0xcc; 0x500])
        });
        let (i, j) = both(&code, 1_000_000);
        let s = j.cpu.jit_stats();
        if compiled_tier() == Tier::Jit {
            assert!(s.traces >= 1, "variant {variant}: a block was compiled with the blocks it jumps to: {s:?}");
        }
        match variant {
            0 => assert_eq!(i.cpu.cr2, RAM as u64, "the load in the trace's later block faulted"),
            1 => assert_eq!(i.cpu.gpr[2], 2000 + 1000 * 5, "the rewritten ADD ran from pass 2,000 on"),
            _ => assert_ne!(i.u64_at(i.cpu.gpr[4]), 0, "the return address stored"),
        }
        let mut k = Machine::new(&code, compiled_tier());
        assert_eq!(k.run_in_slices(997), Exit::HaltedForever);
        assert_eq!(i.state(), k.state(), "variant {variant}, in slices");
    }
}

#[test]
fn auto_tier_compiles_in_the_background_and_agrees_with_the_interpreter() {
    // A hot loop that calls a function on another page (a cross-page CALL and a RET through
    // the jump cache) and mixes fast forms with instructions only the interpreter runs
    // (BSWAP, PUSHFQ/POPFQ, CPUID, XCHG), so compiled blocks call back into it.
    let code = asm(|a| {
        let mut top = a.create_label();
        let mut func = a.create_label();
        let mut done = a.create_label();
        a.mov(r8, 300_000u64)?;
        a.mov(rsi, 0x20000u64)?;
        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(rsi))?;
        a.add(rax, r8)?;
        a.bswap(rax)?;
        a.mov(ecx, r8d)?;
        a.shl(rax, cl)?;
        a.call(func)?;
        a.pushfq()?;
        a.popfq()?;
        a.xchg(rbx, rdx)?;
        a.mov(qword_ptr(rsi), rax)?;
        a.dec(r8)?;
        a.jne(top)?;
        a.jmp(done)?;
        a.db(&[0x90; 4096])?;
        a.set_label(&mut func)?;
        a.imul_3(rdx, rax, 7)?;
        a.adc(rbx, rdx)?;
        a.neg(ebx)?;
        a.ret()?;
        a.set_label(&mut done)?;
        a.cli()?;
        a.hlt()
    });
    let mut i = Machine::new(&code, Tier::Interp);
    let mut j = Machine::new(&code, Tier::Auto);
    let ei = i.run(&mut never(), 50_000_000);
    let ej = j.run(&mut never(), 50_000_000);
    assert_eq!(ei, Exit::HaltedForever);
    assert_eq!(ei, ej, "exit");
    assert_eq!(i.state(), j.state(), "state (gpr, rip, rflags, cr2, memory)");
    assert_eq!(i.cpu.stats.instructions, j.cpu.stats.instructions, "instructions retired");
    let s = j.cpu.jit_stats();
    assert!(s.compiled >= 2 && s.instructions > 1_000_000, "the hot blocks ran compiled: {s:?}");
    assert!(s.chained > 100_000, "compiled blocks ran one after another: {s:?}");
}

#[test]
fn warm_blocks_get_baseline_code_chain_and_still_become_hot() {
    // Two blocks that only ever run one after another: once warm they get baseline code
    // and follow each other through the baseline probe without the run loop, yet their
    // runs are still counted, so they reach Cranelift (whose compiler thread may be slow
    // on a loaded host: the loop runs until both are compiled, at most a minute).
    let code = asm(|a| {
        let mut top = a.create_label();
        let mut mid = a.create_label();
        a.mov(r8, u64::MAX)?;
        a.set_label(&mut top)?;
        a.add(rax, r8)?;
        a.xor(rbx, rax)?;
        a.rol(rbx, 3)?;
        a.jmp(mid)?;
        a.set_label(&mut mid)?;
        a.dec(r8)?;
        a.jne(top)?;
        a.cli()?;
        a.hlt()
    });
    let mut j = Machine::new(&code, Tier::Auto);
    let t = std::time::Instant::now();
    while j.cpu.jit_stats().compiled < 2 && t.elapsed().as_secs() < 60 {
        assert_eq!(j.run(&mut never(), 1_000_000), Exit::Budget);
    }
    let n = j.cpu.stats.instructions;
    let mut i = Machine::new(&code, Tier::Interp);
    assert_eq!(i.run(&mut never(), n), Exit::Budget);
    assert_eq!(i.state(), j.state(), "state (gpr, rip, rflags, cr2, memory)");
    assert_eq!(i.cpu.stats.instructions, n, "instructions retired");
    let s = j.cpu.jit_stats();
    assert!(s.base_compiled >= 2 && s.base_instructions > 1_000, "warm blocks ran baseline code: {s:?}");
    // From the run loop at most once per chunk of 16,384 instructions (and while warming).
    assert!(s.base_entries < n / 2_000 + 100, "baseline blocks ran one after another: {s:?}");
    assert!(s.base_links >= 1, "the baseline exits to the other block were linked: {s:?}");
    assert!(s.compiled >= 2, "blocks that ran only chained became hot: {s:?}");
}

#[test]
fn sse_arithmetic_compiled_inline_agrees_with_the_interpreter() {
    // A loop of the scalar and packed SSE2 forms compiled inline (moves, ADD/SUB/MUL/DIV/
    // SQRT, UCOMISD into a branch, CVTSI2SD, MOVQ to and from GPRs, PXOR/PADDQ), with a NaN
    // operand of a commutative operation (which NaN x86 returns depends on operand order)
    // and a division by zero (ZE), run under the default MXCSR, then under round-down (the
    // inline forms hand every instruction to the interpreter); each phase ends with
    // STMXCSR (the flags the host collected for the guest).
    let code = asm(|a| {
        let mut phase = a.create_label();
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.mov(rsi, 0x20000u64)?;
        a.xor(ebx, ebx)?;
        a.mov(r9, 2u64)?;
        a.set_label(&mut phase)?;
        a.ldmxcsr(dword_ptr(rsi + r9 * 4 + 96))?; // 0x1f80, then 0x3f80 (round down)
        a.mov(r8, 20_000u64)?;
        a.set_label(&mut top)?;
        a.cvtsi2sd(xmm0, r8)?;
        a.movsd_2(xmm1, qword_ptr(rsi))?;
        a.mulsd(xmm1, xmm0)?;
        a.addsd(xmm1, qword_ptr(rsi + 8))?;
        a.sqrtsd(xmm2, xmm1)?;
        a.divsd(xmm2, xmm0)?;
        a.movapd(xmm3, xmm2)?;
        a.subsd(xmm3, xmm1)?;
        a.ucomisd(xmm3, xmm2)?;
        a.jbe(skip)?;
        a.inc(rbx)?;
        a.set_label(&mut skip)?;
        a.movsd_2(xmm5, qword_ptr(rsi + 24))?; // NaN
        a.addsd(xmm1, xmm5)?; // the first operand is a number, the second the NaN
        a.mulpd(xmm5, xmmword_ptr(rsi + 32))?; // a NaN lane and a number lane
        a.movupd(xmmword_ptr(rsi + 48), xmm5)?;
        a.divsd(xmm0, qword_ptr(rsi + 80))?; // / 0.0: ZE
        a.movq(rax, xmm2)?;
        a.add(rbx, rax)?;
        a.movq(xmm4, rbx)?;
        a.pxor(xmm6, xmm4)?;
        a.paddq(xmm6, xmm2)?;
        a.movsd_2(qword_ptr(rsi + 16), xmm3)?;
        a.dec(r8)?;
        a.jne(top)?;
        a.stmxcsr(dword_ptr(rsi + r9 * 4 + 64))?; // default at +72, round-down at +68
        a.dec(r9)?;
        a.jne(phase)?;
        a.movups(xmmword_ptr(rsi + 112), xmm6)?;
        a.hlt()
    });
    let data: [(u64, u64); 7] = [
        (0, 2.5f64.to_bits()),
        (8, 0.125f64.to_bits()),
        (24, 0x7ff8_0000_dead_beef),
        (32, 0xfff0_0000_0000_0001), // an SNaN lane
        (40, 3.0f64.to_bits()),
        (80, 0),
        (100, 0x1f80_0000_3f80), // at +100: 0x3f80, at +104: 0x1f80
    ];
    let machine = |tier| {
        let mut m = Machine::new(&code, tier);
        m.cpu.cr4 |= ctl::CR4_OSFXSR;
        for (o, v) in data {
            let at = (0x20000 + o) as usize;
            m.ram[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        m
    };
    let (mut i, mut j) = (machine(Tier::Interp), machine(compiled_tier()));
    let ei = i.run(&mut never(), 10_000_000);
    let ej = j.run(&mut never(), 10_000_000);
    assert_eq!(ei, Exit::HaltedForever);
    assert_eq!(ei, ej, "exit");
    assert_eq!(i.state(), j.state(), "state (gpr, rip, rflags, cr2, memory)");
    assert_eq!(i.cpu.fpu.xmm, j.cpu.fpu.xmm, "XMM registers");
    assert_eq!(i.cpu.fpu.mxcsr, j.cpu.fpu.mxcsr, "MXCSR");
    assert_eq!(j.u64_at(0x20000 + 72) & 0xffff_ffff, 0x1fa5, "MXCSR after the default phase");
    assert_eq!(i.cpu.stats.instructions, j.cpu.stats.instructions, "instructions retired");
    assert!(j.cpu.jit_stats().instructions > 400_000, "{:?}", j.cpu.jit_stats());
}

#[test]
fn mxcsr_flags_raised_by_compiled_code_are_the_guests_when_run_returns() {
    // A loop of nothing but inline SSE arithmetic (no helper call collects the flags on
    // the way) stopped by the budget: 2.5 / 0.0 raised ZE in its first pass.
    let code = asm(|a| {
        let mut top = a.create_label();
        a.mov(rsi, 0x20000u64)?;
        a.mov(r8, 1_000_000u64)?;
        a.movsd_2(xmm0, qword_ptr(rsi))?;
        a.set_label(&mut top)?;
        a.divsd(xmm0, qword_ptr(rsi + 8))?;
        a.addsd(xmm1, xmm0)?;
        a.dec(r8)?;
        a.jne(top)?;
        a.hlt()
    });
    let machine = |tier| {
        let mut m = Machine::new(&code, tier);
        m.cpu.cr4 |= ctl::CR4_OSFXSR;
        m.ram[0x20000..0x20008].copy_from_slice(&2.5f64.to_bits().to_le_bytes());
        m
    };
    let (mut i, mut j) = (machine(Tier::Interp), machine(compiled_tier()));
    assert_eq!(i.cpu.run(&mut never(), 5_000), Exit::Budget);
    assert_eq!(j.cpu.run(&mut never(), 5_000), Exit::Budget);
    assert_eq!((i.cpu.rip, i.cpu.fpu.xmm), (j.cpu.rip, j.cpu.fpu.xmm));
    assert_eq!(i.cpu.fpu.mxcsr, 0x1f84, "zero divide");
    assert_eq!(j.cpu.fpu.mxcsr, i.cpu.fpu.mxcsr, "MXCSR at the budget's end");
    assert!(j.cpu.jit_stats().instructions > 4_000, "{:?}", j.cpu.jit_stats());
}

#[test]
fn indirect_jumps_and_calls_run_compiled_and_fault_exactly() {
    // A dispatch loop through a jump table in memory (a bytecode interpreter's shape), an
    // indirect CALL through a register and one through memory, then a JMP to a
    // non-canonical address: #GP with RIP and RSP of the JMP, in both tiers.
    let code = asm(|a| {
        let mut top = a.create_label();
        let mut back = a.create_label();
        let mut func = a.create_label();
        let mut h: Vec<CodeLabel> = (0..4).map(|_| a.create_label()).collect();
        a.mov(rsi, 0x20000u64)?;
        for (k, l) in h.iter().enumerate() {
            a.lea(rdx, ptr(*l))?;
            a.mov(qword_ptr(rsi + 8 * k as i32), rdx)?;
        }
        a.lea(rdx, ptr(func))?;
        a.mov(qword_ptr(rsi + 32), rdx)?;
        a.mov(r8, 100_000u64)?;
        a.set_label(&mut top)?;
        a.mov(eax, r8d)?;
        a.and(eax, 3)?;
        a.jmp(qword_ptr(rsi + rax * 8))?;
        a.set_label(&mut h[0])?;
        a.add(rbx, r8)?;
        a.jmp(back)?;
        a.set_label(&mut h[1])?;
        a.xor(rbx, r8)?;
        a.call(rdx)?;
        a.jmp(back)?;
        a.set_label(&mut h[2])?;
        a.call(qword_ptr(rsi + 32))?;
        a.jmp(back)?;
        a.set_label(&mut h[3])?;
        a.rol(rbx, 3)?;
        a.set_label(&mut back)?;
        a.dec(r8)?;
        a.jne(top)?;
        a.mov(rax, 0x8000_0000_0000_0000u64)?;
        a.jmp(rax)?;
        a.set_label(&mut func)?;
        a.imul_3(rbx, rbx, 5)?;
        a.ret()
    });
    let (_, j) = both(&code, 5_000_000);
    assert_eq!(j.cpu.rip, HANDLERS + 16 * 13 + 1, "#GP delivered");
    assert!(j.cpu.jit_stats().chained > 100_000, "{:?}", j.cpu.jit_stats());
}

#[test]
fn bit_scans_byte_swaps_and_high_byte_moves_agree_with_the_interpreter() {
    // BSF/TZCNT (a zero source leaves the destination; a 32-bit one zero-extended), BSWAP
    // r32/r64 and MOVZX/MOVSX from AH..BH, in a loop compiled in tier jit; flags observed
    // by ADC and SETcc.
    let code = asm(|a| {
        let mut top = a.create_label();
        a.mov(r8, 3000u64)?;
        a.mov(rsi, 0x20000u64)?;
        a.set_label(&mut top)?;
        a.mov(rax, r8)?;
        a.imul_3(rax, rax, 0x1e37_79b9)?;
        a.and(eax, 0x0f0f_0f00)?;
        a.mov(rcx, 0xdead_beef_0000_0000u64)?;
        a.bsf(ecx, eax)?; // zero source every 16th pass
        a.setz(dl)?;
        a.adc(rbx, rcx)?;
        a.bsf(r9, rax)?;
        a.tzcnt(r10, qword_ptr(rsi))?;
        a.bswap(eax)?;
        a.bswap(rbx)?;
        a.movzx(edi, ah)?;
        a.movsx(ebp, bh)?;
        a.add(rdi, rbp)?;
        a.add(qword_ptr(rsi), rdi)?;
        a.add(rbx, r10)?;
        a.dec(r8)?;
        a.jne(top)?;
        a.hlt()
    });
    both(&code, 1_000_000);
}

/// Linear page of the callee in `jump_cache_probe_...` (4 KiB pages from a page table).
const CALLEE: u64 = 0x30_0000;
/// The page table that maps 2-4 MiB in that test (its entry 0x100 maps CALLEE).
const PT: u64 = 0x3_0000;
/// A linear alias, 4 MiB above CALLEE (the same TLB slot), of CALLEE's second physical
/// page, through a page table at PT2.
const ALIAS: u64 = 0x70_0000;
const PT2: u64 = 0x3_1000;

#[test]
fn jump_cache_probe_follows_other_pages_only_while_their_translation_and_code_hold() {
    calls_to_another_page_follow_only_while_its_translation_and_code_hold(false);
}

/// The calls of `jump_cache_probe_follows_other_pages_only_while_their_translation_and_
/// code_hold`, indirect (`direct` false: through the jump cache) or direct (through a link
/// checked against the target's TLB entry).
fn calls_to_another_page_follow_only_while_its_translation_and_code_hold(direct: bool) {
    // A loop calls a function on another page (an indirect CALL, then its RET back: both
    // exits go on through the jump cache from compiled code; a direct CALL follows a
    // link to the other page). `mov eax, 1; ret` lies at
    // physical CALLEE, `mov eax, 1000; ret` at CALLEE + 0x1000. The guest, counting
    // down from N:
    // - at 3N/4 maps CALLEE onto the second page (INVLPG) and reads it, so that its TLB
    //   slot holds the new translation while the jump cache still holds the old block;
    // - at N/2 maps it back (INVLPG) and reads ALIAS, so that the slot holds another linear
    //   page whose GPA is the cached block's;
    // - at N/4 rewrites the immediate of the code it calls.
    // The sum shows which code each pass ran; the state must match the interpreter's at
    // every budget exit, including budgets ending inside the chain.
    const N: u64 = 4000;
    let q = N / 4;
    let code = asm(|a| {
        let mut top = a.create_label();
        let mut skip = [a.create_label(), a.create_label(), a.create_label()];
        a.mov(r8, N)?;
        a.mov(r9, CALLEE)?;
        a.xor(ebx, ebx)?;
        a.set_label(&mut top)?;
        if direct {
            a.call(CALLEE)?;
        } else {
            a.call(r9)?;
        }
        a.add(rbx, rax)?;
        a.cmp(r8, (3 * q) as i32)?;
        a.jne(skip[0])?;
        a.mov(rax, (CALLEE + 0x1000) | 3)?;
        a.mov(qword_ptr(PT + 0x100 * 8), rax)?;
        a.invlpg(qword_ptr(r9))?;
        a.mov(rax, qword_ptr(r9))?;
        a.set_label(&mut skip[0])?;
        a.cmp(r8, (2 * q) as i32)?;
        a.jne(skip[1])?;
        a.mov(rax, CALLEE | 3)?;
        a.mov(qword_ptr(PT + 0x100 * 8), rax)?;
        a.invlpg(qword_ptr(r9))?;
        a.mov(rax, qword_ptr(ALIAS))?;
        a.set_label(&mut skip[1])?;
        a.cmp(r8, q as i32)?;
        a.jne(skip[2])?;
        // The imm32 of `mov eax, imm32` (b8 imm32).
        a.mov(dword_ptr(CALLEE + 1), 7)?;
        a.set_label(&mut skip[2])?;
        a.dec(r8)?;
        a.jne(top)?;
        // Last, CALLEE becomes no-execute (its TLB slot refilled by a read): the call
        // faults (#PF on the fetch, the handler's HLT).
        a.bts(qword_ptr(PT + 0x100 * 8), 63)?;
        a.invlpg(qword_ptr(r9))?;
        a.mov(rax, qword_ptr(r9))?;
        if direct {
            a.call(CALLEE)?;
        } else {
            a.call(r9)?;
        }
        a.hlt()
    });
    let setup = |tier: Tier| {
        let mut m = Machine::new(&code, tier);
        m.cpu.efer |= ctl::EFER_NXE;
        let put = |ram: &mut [u8], at: u64, v: u64| {
            let at = at as usize;
            ram[at..at + 8].copy_from_slice(&v.to_le_bytes())
        };
        // 2-4 MiB through a page table, identity-mapped; ALIAS through another.
        put(&mut m.ram, 0x3008, PT | 3);
        for i in 0..512u64 {
            put(&mut m.ram, PT + 8 * i, (0x20_0000 + 0x1000 * i) | 3);
        }
        put(&mut m.ram, 0x3018, PT2 | 3);
        put(&mut m.ram, PT2 + 0x100 * 8, (CALLEE + 0x1000) | 3);
        for (at, v) in [(CALLEE, 1u32), (CALLEE + 0x1000, 1000)] {
            let at = at as usize;
            m.ram[at] = 0xb8;
            m.ram[at + 1..at + 5].copy_from_slice(&v.to_le_bytes());
            m.ram[at + 5] = 0xc3;
        }
        m
    };
    let mut i = setup(Tier::Interp);
    let mut j = setup(compiled_tier());
    for budget in [1u64, 9, 4097, 7777, 12_345, 100_000] {
        let (ei, ej) = (i.run(&mut never(), budget), j.run(&mut never(), budget));
        assert_eq!(ei, ej, "exit after a budget of {budget}");
        assert_eq!(i.state(), j.state(), "state after a budget of {budget}");
        assert_eq!(i.cpu.stats.instructions, j.cpu.stats.instructions);
    }
    // Passes count down from N to 1; each change follows the call of its pass.
    assert_eq!(j.cpu.gpr[3], (q + 1) + 1000 * q + q + 7 * (q - 1), "{:?}", j.cpu.jit_stats());
    assert!(j.cpu.jit_stats().chained > N, "{:?}", j.cpu.jit_stats());
    assert_eq!((j.cpu.rip, j.cpu.cr2), (HANDLERS + 16 * 14 + 1, CALLEE), "#PF on fetching CALLEE");
}

/// A jump to the block's own page goes on in compiled code only while the jump-cache entry
/// for the target is the block at the target's GPA. CALLEE's page is two physical pages in
/// turn, holding the same first block (`mov eax, 1; jmp +0x10`) and different second ones
/// (`add eax, 10; ret` and `add eax, 1000; ret`); halfway the guest maps the second one at
/// CALLEE (INVLPG), so that the jump-cache entry for CALLEE + 0x10 still holds the first
/// page's block when the new first block jumps there. Same state as the interpreter at
/// every budget exit. (A chaining shortcut that left out the GPA check failed it.)
#[test]
fn baseline_exits_within_a_page_follow_only_the_block_at_their_targets_gpa() {
    const N: u64 = 400;
    let code = asm(|a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.mov(r8, N)?;
        a.mov(r9, CALLEE)?;
        a.xor(ebx, ebx)?;
        a.set_label(&mut top)?;
        a.call(r9)?;
        a.add(rbx, rax)?;
        a.cmp(r8, (N / 2) as i32)?;
        a.jne(skip)?;
        a.mov(rax, (CALLEE + 0x1000) | 3)?;
        a.mov(qword_ptr(PT + 0x100 * 8), rax)?;
        a.invlpg(qword_ptr(r9))?;
        a.set_label(&mut skip)?;
        a.dec(r8)?;
        a.jne(top)?;
        a.hlt()
    });
    let setup = |tier: Tier| {
        let mut m = Machine::new(&code, tier);
        let put = |ram: &mut [u8], at: u64, v: u64| {
            let at = at as usize;
            ram[at..at + 8].copy_from_slice(&v.to_le_bytes())
        };
        put(&mut m.ram, 0x3008, PT | 3);
        for i in 0..512u64 {
            put(&mut m.ram, PT + 8 * i, (0x20_0000 + 0x1000 * i) | 3);
        }
        for (page, add) in [(CALLEE, 10u32), (CALLEE + 0x1000, 1000)] {
            let at = page as usize;
            // mov eax, 1; jmp rel32 to +0x10
            m.ram[at] = 0xb8;
            m.ram[at + 1..at + 5].copy_from_slice(&1u32.to_le_bytes());
            m.ram[at + 5] = 0xe9;
            m.ram[at + 6..at + 10].copy_from_slice(&(0x10i32 - 10).to_le_bytes());
            // add eax, imm32; ret
            m.ram[at + 0x10] = 0x05;
            m.ram[at + 0x11..at + 0x15].copy_from_slice(&add.to_le_bytes());
            m.ram[at + 0x15] = 0xc3;
        }
        m
    };
    for tier in [Tier::Base, Tier::Auto] {
        let mut i = setup(Tier::Interp);
        let mut j = setup(tier);
        for budget in [1u64, 9, 777, 4097, 100_000] {
            let (ei, ej) = (i.run(&mut never(), budget), j.run(&mut never(), budget));
            assert_eq!(ei, ej, "{tier:?}: exit after a budget of {budget}");
            assert_eq!(i.state(), j.state(), "{tier:?}: state after a budget of {budget}");
        }
        assert_eq!(j.cpu.gpr[3], (N / 2 + 1) * 11 + (N / 2 - 1) * 1001, "{tier:?}: {:?}", j.cpu.jit_stats());
        assert!(j.cpu.jit_stats().base_instructions > 0, "{tier:?}: {:?}", j.cpu.jit_stats());
    }
}

#[test]
fn memory_increments_and_decrements_agree_with_the_interpreter() {
    // INC/DEC of a byte, word, dword and qword in memory, crossing their signed and
    // unsigned edges, with CF set or clear before (they keep it) and every flag observed
    // (PUSHFQ, Jcc); then INC of an unmapped dword: #PF with the state before it.
    let code = asm(|a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.mov(rsi, 0x20000u64)?;
        a.mov(byte_ptr(rsi), 0x7e)?;
        a.mov(word_ptr(rsi + 2), 1)?;
        a.mov(dword_ptr(rsi + 4), 0x7fff_fffe)?;
        a.mov(qword_ptr(rsi + 8), 2)?;
        a.mov(r8, 600u64)?;
        a.set_label(&mut top)?;
        a.bt(r8, 0)?;
        a.inc(byte_ptr(rsi))?;
        a.pushfq()?;
        a.pop(rax)?;
        a.add(rbx, rax)?;
        a.dec(word_ptr(rsi + 2))?;
        a.pushfq()?;
        a.pop(rax)?;
        a.xor(rbx, rax)?;
        a.bt(r8, 1)?;
        a.inc(dword_ptr(rsi + 4))?;
        a.jno(skip)?;
        a.add(rbx, 0x1000)?;
        a.set_label(&mut skip)?;
        a.dec(qword_ptr(rsi + 8))?;
        a.adc(rbx, 7)?;
        a.rol(rbx, 5)?;
        a.dec(r8)?;
        a.jne(top)?;
        a.mov(rdi, UNMAPPED)?;
        a.inc(dword_ptr(rdi + 4))?;
        a.hlt()
    });
    let (_, j) = both(&code, 1_000_000);
    assert_eq!((j.cpu.rip, j.cpu.cr2), (HANDLERS + 16 * 14 + 1, UNMAPPED + 4), "#PF on the INC");
}

#[test]
fn sixteen_bit_alu_with_a_sign_extended_imm8_agrees_with_the_interpreter() {
    // CMP/ADD/SUB/AND/OR/XOR r16, imm8 (sign-extended to 16 bits: `cmp ax, -1` is the
    // 16-bit 0xffff) over values crossing the 16-bit edges, flags observed after each.
    let code = asm(|a| {
        let mut top = a.create_label();
        a.mov(r8, 70_000u64)?;
        a.set_label(&mut top)?;
        a.mov(eax, r8d)?;
        a.cmp(ax, -1)?;
        a.pushfq()?;
        a.pop(rdx)?;
        a.add(rbx, rdx)?;
        a.add(ax, 0x7f)?;
        a.sub(cx, -128)?;
        a.and(dx, -2)?;
        a.or(si, 5)?;
        a.xor(di, -3)?;
        a.pushfq()?;
        a.pop(rdx)?;
        a.xor(rbx, rdx)?;
        a.add(rbx, rax)?;
        a.add(rbx, rcx)?;
        a.rol(rbx, 3)?;
        a.sub(r8, 7)?;
        a.ja(top)?;
        a.hlt()
    });
    let (_, j) = both(&code, 2_000_000);
    assert!(j.cpu.jit_stats().instructions > 100_000, "{:?}", j.cpu.jit_stats());
}

#[test]
fn byte_and_word_memory_alu_with_a_register_agrees_with_the_interpreter() {
    // CMP/TEST/ADD/SUB/AND/OR/XOR m8, r8 and m16, r16 (xz's match finder compares bytes and
    // words in memory with registers), flags observed, the register's upper bits set (only
    // the low byte or word counts); then CMP of an unmapped word: #PF.
    let code = asm(|a| {
        let mut top = a.create_label();
        a.mov(rsi, 0x20000u64)?;
        a.mov(r8, 5000u64)?;
        a.mov(rcx, 0x1234_5678_9abc_de00u64)?;
        a.set_label(&mut top)?;
        a.mov(eax, r8d)?;
        a.imul_3(eax, eax, 0x9e37)?;
        a.mov(word_ptr(rsi + 6), ax)?;
        a.mov(cl, al)?;
        a.xor(cl, 0x55)?;
        a.cmp(byte_ptr(rsi + 7), cl)?;
        a.pushfq()?;
        a.pop(rdx)?;
        a.add(rbx, rdx)?;
        a.cmp(word_ptr(rsi + 6), cx)?;
        a.adc(rbx, 3)?;
        a.test(byte_ptr(rsi + 6), r8b)?;
        a.sbb(rbx, 1)?;
        a.add(byte_ptr(rsi + 8), cl)?;
        a.sub(word_ptr(rsi + 10), cx)?;
        a.and(byte_ptr(rsi + 12), al)?;
        a.or(word_ptr(rsi + 14), ax)?;
        a.xor(byte_ptr(rsi + 16), r8b)?;
        a.pushfq()?;
        a.pop(rdx)?;
        a.xor(rbx, rdx)?;
        a.rol(rbx, 7)?;
        a.dec(r8)?;
        a.jne(top)?;
        a.mov(rdi, UNMAPPED)?;
        a.cmp(word_ptr(rdi + 2), cx)?;
        a.hlt()
    });
    let (_, j) = both(&code, 1_000_000);
    assert_eq!((j.cpu.rip, j.cpu.cr2), (HANDLERS + 16 * 14 + 1, UNMAPPED + 2), "#PF on the CMP");
}

#[test]
fn test_and_cmp_of_high_byte_registers_agree_with_the_interpreter() {
    // TEST/CMP of AH, CH, DH, BH with an immediate or a low-byte register (Linux tests IF in
    // saved flags with `test ah, 2`), flags observed after each, the full registers random.
    let code = asm(|a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.mov(r8, 20_000u64)?;
        a.mov(r9, 0x9e37_79b9_7f4a_7c15u64)?;
        a.set_label(&mut top)?;
        a.imul_2(r9, r9)?;
        a.add(r9, r8)?;
        a.mov(rax, r9)?;
        a.rol(r9, 13)?;
        a.mov(rcx, r9)?;
        a.rol(r9, 11)?;
        a.mov(rdx, r9)?;
        a.test(ah, 2)?;
        a.jz(skip)?;
        a.add(rbx, 1)?;
        a.set_label(&mut skip)?;
        a.cmp(ch, 0x80)?;
        a.adc(rbx, 0)?;
        a.test(dh, cl)?;
        a.pushfq()?;
        a.pop(rsi)?;
        a.xor(rbx, rsi)?;
        a.cmp(bh, dl)?;
        a.pushfq()?;
        a.pop(rsi)?;
        a.add(rbx, rsi)?;
        a.rol(rbx, 9)?;
        a.dec(r8)?;
        a.jne(top)?;
        a.hlt()
    });
    let (_, j) = both(&code, 2_000_000);
    assert!(j.cpu.jit_stats().instructions > 100_000, "{:?}", j.cpu.jit_stats());
}

#[test]
fn pushes_segment_reads_prefetches_and_memory_setcc_agree_with_the_interpreter() {
    // PUSH imm8/imm32, PUSHFQ after flags set by a compare, MOV r32/r64 from a segment
    // register (zero-extended), PREFETCHT0 of an unmapped address (never faults), SETcc
    // into memory; a loop so the values depend on earlier passes, then a SETcc whose
    // store faults (#PF: the state before it, flags included).
    let code = asm(|a| {
        let mut top = a.create_label();
        a.mov(r12, 300u64)?;
        a.mov(rbx, 0x20000u64)?;
        a.mov(rdi, 0x8000_0000_0000_0001u64)?;
        a.set_label(&mut top)?;
        a.mov(rcx, -1i64)?;
        a.mov(ecx, cs)?;
        a.mov(rdx, -1i64)?;
        a.mov(rdx, ds)?;
        a.prefetcht0(byte_ptr(UNMAPPED + 0x40))?;
        a.add(rdi, r12)?;
        a.cmp(rdi, rsi)?;
        a.setb(byte_ptr(rbx + r12))?;
        a.setl(byte_ptr(rbx + r12 + 0x200))?;
        a.pushfq()?;
        a.pop(rsi)?;
        a.push(0x7fff_1234)?;
        a.push(-3)?;
        a.pop(rax)?;
        a.pop(r8)?;
        a.add(rax, r8)?;
        a.xor(rsi, rax)?;
        a.dec(r12)?;
        a.jnz(top)?;
        a.mov(r9, UNMAPPED)?;
        a.cmp(rdi, rsi)?;
        a.setne(byte_ptr(r9 + 5))?;
        a.hlt()
    });
    let (_, j) = both(&code, 100_000);
    assert_eq!(j.cpu.gpr[1], 8, "mov ecx, cs zero-extends");
    assert_eq!(j.cpu.gpr[2], 0x10, "mov rdx, ds");
    assert_eq!(j.cpu.gpr[0], 0x7fff_1234 - 3);
    assert_eq!(j.cpu.cr2, UNMAPPED + 5, "the SETcc store faulted");
    assert_eq!(j.u64_at(j.cpu.gpr[4] + 8), CODE + code.len() as u64 - 1 - 5, "RIP of the faulting SETcc");
    // Every pass stored 0 or 1 at both places.
    for k in 1..=300u64 {
        assert!(j.ram[(0x20000 + k) as usize] <= 1 && j.ram[(0x20200 + k) as usize] <= 1);
    }
    assert!(j.cpu.jit_stats().instructions > 5_000, "{:?}", j.cpu.jit_stats());
}

#[test]
fn bit_tests_by_an_immediate_and_cli_agree_with_the_interpreter() {
    // BT/BTS/BTR/BTC by an immediate on registers (16/32/64-bit) and memory, each BT
    // observed by a JC/ADC (CF), CLI at CPL 0; a loop so the bits depend on earlier passes,
    // then a BTS whose store faults (#PF: the state before it, flags included).
    let code = asm(|a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.sti()?;
        a.nop()?;
        a.mov(r12, 200u64)?;
        a.mov(rbx, 0x20000u64)?;
        a.mov(rsi, 0x5a5a_1234_8765_f0f0u64)?;
        a.set_label(&mut top)?;
        a.cli()?;
        a.bt(rsi, 3)?;
        a.adc(r8, 0)?;
        a.btc(rsi, 63)?;
        a.bts(esi, 40)?; // bit 40 mod 32: zero-extends ESI
        a.btr(si, 17)?;
        a.bt(qword_ptr(rbx + r12 * 8), 0)?;
        a.jc(skip)?;
        a.bts(qword_ptr(rbx + r12 * 8), 0)?;
        a.set_label(&mut skip)?;
        a.btc(dword_ptr(rbx + r12 * 8 + 4), 33)?;
        a.btr(word_ptr(rbx + r12 * 8 + 2), 5)?;
        a.add(rsi, r12)?;
        a.rol(rsi, 7)?;
        a.dec(r12)?;
        a.jnz(top)?;
        a.mov(r9, UNMAPPED)?;
        a.bt(rsi, 9)?;
        a.bts(qword_ptr(r9 + 8), 2)?;
        a.hlt()
    });
    let (_, j) = both(&code, 100_000);
    assert_eq!(j.cpu.cr2, UNMAPPED + 8, "the BTS store faulted");
    assert_eq!(j.u64_at(j.cpu.gpr[4] + 24) & 0x200, 0, "IF cleared by CLI (the #PF frame's RFLAGS)");
    assert_eq!(j.u64_at(j.cpu.gpr[4] + 8), CODE + code.len() as u64 - 1 - 6, "RIP of the faulting BTS");
    assert!(j.cpu.jit_stats().instructions > 2_500, "{:?}", j.cpu.jit_stats());
}

#[test]
fn memory_cmpxchg_agrees_with_the_interpreter() {
    // CMPXCHG m64 and m32 without LOCK, equal on even passes and unequal on odd ones (RAX
    // whole or loaded, EAX zero-extended), ZF observed by SETZ; then one whose access
    // faults (#PF: the state before it, flags included).
    let code = asm(|a| {
        let mut top = a.create_label();
        a.mov(r12, 300u64)?;
        a.mov(rbx, 0x20000u64)?;
        a.mov(r10, 0u64)?;
        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.mov(rdx, r12)?;
        a.and(edx, 1)?;
        a.add(rax, rdx)?;
        a.lea(rcx, qword_ptr(rax + r12 * 2))?;
        a.cmpxchg(qword_ptr(rbx), rcx)?;
        a.setz(dl)?;
        a.add(r10, rdx)?;
        a.mov(rax, -1i64)?;
        a.mov(eax, dword_ptr(rbx + 8))?;
        a.mov(rdx, r12)?;
        a.shl(rdx, 40)?;
        a.or(rax, rdx)?;
        a.xor(eax, r12d)?;
        a.mov(ecx, r12d)?;
        a.cmpxchg(dword_ptr(rbx + 8), ecx)?;
        a.adc(r10, 0)?;
        a.add(r11, rax)?;
        a.dec(r12)?;
        a.jnz(top)?;
        a.mov(r9, UNMAPPED)?;
        a.cmp(rax, r10)?;
        a.cmpxchg(dword_ptr(r9 + 16), ecx)?;
        a.hlt()
    });
    let (_, j) = both(&code, 100_000);
    assert_eq!(j.cpu.cr2, UNMAPPED + 16, "the CMPXCHG faulted");
    assert_eq!(j.u64_at(j.cpu.gpr[4] + 8), CODE + code.len() as u64 - 1 - 5, "RIP of the faulting CMPXCHG");
    assert!(j.cpu.gpr[10] >= 150, "even passes' 64-bit compares succeeded: {}", j.cpu.gpr[10]);
    assert!(j.cpu.jit_stats().instructions > 5_000, "{:?}", j.cpu.jit_stats());
}

/// STI, POPF, OUT and IRET end their blocks only because they may open the interrupt
/// window: when nothing is pending, compiled code goes on in the next block instead of
/// going back to the run loop after each (it did: ~340,000 round trips per boot of the test
/// guest). The state is the interpreter's, and the run loop is entered about once per chunk.
#[test]
fn window_instructions_go_on_in_compiled_code_when_nothing_is_pending() {
    let code = asm(|a| {
        let mut top = a.create_label();
        let mut back = a.create_label();
        a.mov(rcx, 3000u64)?;
        a.set_label(&mut top)?;
        a.cli()?;
        a.add(rax, 1)?;
        a.sti()?;
        a.add(rbx, rax)?;
        a.pushfq()?;
        a.popfq()?;
        a.add(rdx, 1)?;
        a.out(0x80, al)?;
        // IRETQ to the next instruction at the same privilege (Linux's sync_core).
        a.mov(rdx, rsp)?;
        a.push(0x10)?;
        a.push(rdx)?;
        a.pushfq()?;
        a.push(8)?;
        a.lea(r8, ptr(back))?;
        a.push(r8)?;
        a.iretq()?;
        a.set_label(&mut back)?;
        a.cmp(rax, rcx)?;
        a.jne(top)?;
        a.cli()?;
        a.hlt()
    });
    let (_, j) = both(&code, 1_000_000);
    assert_eq!(j.cpu.gpr[0], 3000);
    let s = j.cpu.jit_stats();
    let entries = s.entries + s.base_entries;
    assert!(entries < 300, "{entries} entries from the run loop for 3,000 passes: {s:?}");
}

/// An interrupt pending when compiled code runs STI waits for the instruction in the STI
/// shadow (SDM Vol. 3 §6.8.3) and is taken right where the window is open, in both tiers.
#[test]
fn an_interrupt_pending_at_sti_is_taken_after_the_shadowed_instruction() {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut labels = [a.create_label(), a.create_label(), a.create_label(), a.create_label(), a.create_label()];
    let [top, shadow, add, cmp, jne] = &mut labels;
    a.set_label(top).unwrap();
    a.cli().unwrap();
    a.add(rax, 1).unwrap();
    a.sti().unwrap();
    a.set_label(shadow).unwrap();
    a.mov(qword_ptr(0x20000u64), rax).unwrap();
    a.set_label(add).unwrap();
    a.add(rbx, 1).unwrap();
    a.set_label(cmp).unwrap();
    a.cmp(rax, rcx).unwrap();
    a.set_label(jne).unwrap();
    a.jne(*top).unwrap();
    let r = a.assemble_options(CODE, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS).unwrap();
    let ip = |l: &CodeLabel| r.label_ip(l).unwrap();
    let (shadow, open) = (ip(&labels[1]), [ip(&labels[0]), ip(&labels[2]), ip(&labels[3]), ip(&labels[4])]);
    let code = r.inner.code_buffer;
    for tier in [Tier::Interp, compiled_tier()] {
        let mut m = Machine::new(&code, tier);
        m.cpu.gpr[1] = u64::MAX;
        let mut bus = IrqBus { looks: 0, after: 40, vector: 0x41 };
        let e = m.run(&mut bus, 50_000_000);
        assert_eq!(e, Exit::HaltedForever, "{tier:?}");
        assert_eq!(m.cpu.rip, HANDLERS + 16 * 0x41 + 1, "{tier:?}: the interrupt was delivered");
        assert_eq!(m.cpu.stats.interrupts, 1);
        let at = m.u64_at(m.cpu.gpr[4]);
        assert_ne!(at, shadow, "{tier:?}: interrupt taken in the STI shadow");
        assert!(open.contains(&at), "{tier:?}: interrupted at {at:#x}, where IF is clear");
        assert_eq!(m.u64_at(0x20000), m.cpu.gpr[0], "{tier:?}: the shadowed store ran");
        if tier != Tier::Interp {
            assert!(m.cpu.jit_stats().instructions > 0, "{:?}", m.cpu.jit_stats());
        }
    }
}

/// Baseline exits to a constant target on their block's page are linked (a patched jump to
/// the target's chain entry): the loop's blocks follow each other without the probe or the
/// run loop, the budget stays exact, and code rewritten on the page is decoded again (the
/// chain entry checks the page's generation).
#[test]
fn baseline_exits_to_their_own_page_are_linked_and_stay_exact() {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    let mut mid = a.create_label();
    let mut skip = a.create_label();
    a.mov(rcx, 3000u64).unwrap();
    a.set_label(&mut top).unwrap();
    a.add(rax, 1).unwrap();
    a.jmp(mid).unwrap();
    a.set_label(&mut mid).unwrap();
    a.add(rbx, rax).unwrap();
    a.cmp(rax, 2000).unwrap();
    a.jne(skip).unwrap();
    // Once, at pass 2,000: the ADD below adds 5 from now on.
    a.lea(rsi, ptr(skip)).unwrap();
    a.mov(byte_ptr(rsi + 3), 5).unwrap();
    a.set_label(&mut skip).unwrap();
    a.add(rdx, 1).unwrap(); // 48 83 C2 01
    a.dec(rcx).unwrap();
    a.jnz(top).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let mut i = Machine::new(&code, Tier::Interp);
    let mut j = Machine::new(&code, Tier::Base);
    assert_eq!(i.run(&mut never(), 1_000_000), Exit::HaltedForever);
    // In odd slices: every slice ends exactly at its budget, wherever that falls.
    loop {
        let before = j.cpu.stats.instructions;
        match j.cpu.run(&mut never(), 997) {
            Exit::Budget => assert_eq!(j.cpu.stats.instructions - before, 997),
            e => {
                assert_eq!(e, Exit::HaltedForever);
                break;
            }
        }
    }
    assert_eq!(i.state(), j.state(), "state (gpr, rip, rflags, cr2, memory)");
    assert_eq!(i.cpu.stats.instructions, j.cpu.stats.instructions, "instructions retired");
    assert_eq!(j.cpu.gpr[2], 1999 + 1001 * 5, "the rewritten ADD ran from pass 2,000 on");
    let s = j.cpu.jit_stats();
    assert!(s.base_links >= 3, "{s:?}");
    // From the run loop about once per slice, and after the rewrite.
    let slices = j.cpu.stats.instructions / 997 + 1;
    assert!(s.base_entries < slices + 50, "{} entries for {slices} slices: {s:?}", s.base_entries);
}

/// Blocks of both tiers follow each other in compiled code (either tier's probe finds the
/// other's code, and tail-calls it) while the auto tier moves them from the interpreter to
/// baseline code to Cranelift's at different times: a loop that calls a function on
/// another page, with flags live across the transfers, ends in the interpreter's state.
#[test]
fn blocks_of_both_tiers_follow_each_other_and_agree_with_the_interpreter() {
    let code = asm(|a| {
        let mut top = a.create_label();
        let mut func = a.create_label();
        let mut skip = a.create_label();
        a.mov(r8, 300_000u64)?;
        a.set_label(&mut top)?;
        a.add(rax, r8)?;
        a.call(func)?;
        a.jz(skip)?;
        a.test(r8, 7)?;
        a.jnz(skip)?;
        a.rol(rbx, 1)?;
        a.set_label(&mut skip)?;
        a.dec(r8)?;
        a.jnz(top)?;
        a.cli()?;
        a.hlt()?;
        a.db(&[0xcc; 4096])?;
        // CF of the caller's ADD, and ZF of the XOR through the RET.
        a.set_label(&mut func)?;
        a.adc(rcx, rbx)?;
        a.xor(rbx, rax)?;
        a.ret()
    });
    let mut i = Machine::new(&code, Tier::Interp);
    let mut j = Machine::new(&code, Tier::Auto);
    assert_eq!(i.run(&mut never(), 10_000_000), Exit::HaltedForever);
    assert_eq!(j.run(&mut never(), 10_000_000), Exit::HaltedForever);
    assert_eq!(i.state(), j.state(), "state (gpr, rip, rflags, cr2, memory)");
    assert_eq!(i.cpu.stats.instructions, j.cpu.stats.instructions, "instructions retired");
    let s = j.cpu.jit_stats();
    assert!(s.base_instructions > 0 && s.instructions > s.base_instructions, "both tiers ran: {s:?}");
}

/// Links of direct transfers to other pages hold only while the target's translation and
/// code do (a link followed without its GPA check failed this).
#[test]
fn direct_calls_to_other_pages_follow_links_only_while_their_translation_and_code_hold() {
    calls_to_another_page_follow_only_while_its_translation_and_code_hold(true);
}
