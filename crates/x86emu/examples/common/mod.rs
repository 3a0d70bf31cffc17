//! What the emulator's examples share: a 64-bit guest over a RAM buffer, run to its HLT.

use x86emu::cpu::ctl;
use x86emu::{Cpu, CpuConfig, Exit, NullBus, RamRegion, Seg};

/// Writes little-endian `v` at byte `at` of `ram`.
pub fn put(ram: &mut [u8], at: usize, v: u64) {
    ram[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A 64-bit CPU over `ram` (at GPA 0, its first 2 MiB identity-mapped by page tables at
/// 0x1000-0x3fff) with `code` at 0x10000 and RIP there, RSP 0x8000, SSE enabled.
pub fn long_mode_cpu(ram: &mut [u8], code: &[u8]) -> Cpu {
    put(ram, 0x1000, 0x2000 | 3);
    put(ram, 0x2000, 0x3000 | 3);
    put(ram, 0x3000, 0x83);
    ram[0x10000..0x10000 + code.len()].copy_from_slice(code);
    let r = RamRegion { gpa: 0, size: ram.len() as u64, host_addr: ram.as_mut_ptr() };
    let mut c = Cpu::new(vec![r], CpuConfig::default());
    c.cr0 = ctl::CR0_PE | ctl::CR0_PG | ctl::CR0_WP | 0x10;
    c.cr4 = ctl::CR4_PAE | ctl::CR4_OSFXSR;
    c.cr3 = 0x1000;
    c.efer = ctl::EFER_LME | ctl::EFER_LMA;
    c.seg[1] = Seg { selector: 8, base: 0, limit: 0xffff_ffff, attr: 0xa09b };
    c.gpr[4] = 0x8000;
    c.rip = 0x10000;
    c
}

/// Assembles `a` at 0x10000 into `ram`, runs it to its HLT (interrupts off; any other exit
/// panics) and returns the CPU and the seconds it ran.
pub fn run_code(ram: &mut [u8], a: &mut iced_x86::code_asm::CodeAssembler) -> (Cpu, f64) {
    let code = a.assemble(0x10000).unwrap();
    let mut c = long_mode_cpu(ram, &code);
    let t = std::time::Instant::now();
    run_to_halt(&mut c);
    (c, t.elapsed().as_secs_f64())
}

/// Runs `c` until it halts with interrupts off; panics on any other exit.
pub fn run_to_halt(c: &mut Cpu) {
    loop {
        match c.run(&mut NullBus, 1 << 20) {
            Exit::Budget => continue,
            Exit::HaltedForever => break,
            e => panic!("unexpected exit {e:?}"),
        }
    }
}
