//! The `x86emu` target: the emulator runs arbitrary code in a small machine and must stop
//! within its instruction budget, whatever the code does (no panic, no hang).
//!
//! Input: byte 0 picks the mode (`% 3`: real mode at the reset state's segments but CS:IP =
//! 0:0x8000; 32-bit protected mode, flat segments, paging off; 64-bit long mode, the first
//! 2 MiB identity-mapped, user-accessible, writable), byte 1 the interrupt pattern (bit `k`
//! set: the INTR line is asserted on the `k`-th look, vector `0x20 + k`), then code and data
//! loaded at GPA 0x8000 (at most 64 KiB). Port and MMIO reads return a pattern of the
//! address. The machine has 1 MiB of RAM; the page tables, GDT and IDT (every vector to a
//! `hlt`) of the protected modes live below 0x8000, where the code may overwrite them.
//!
//! After the run the CPU's state is saved and restored: the emulator must accept any state
//! it reached itself.

use x86emu::{Bus, Cpu, CpuConfig, RamRegion, Seg};

use crate::Input;

const RAM: usize = 1 << 20;
const CODE: usize = 0x8000;
const PML4: usize = 0x1000;
const PDPT: usize = 0x2000;
const PD: usize = 0x3000;
const GDT: usize = 0x4000;
const IDT: usize = 0x5000;
/// One `hlt` per vector (vector `v` at `STUBS + v`).
const STUBS: usize = 0x6000;
/// Instructions per run: enough for loops to matter, few enough for 1000s of runs a second.
pub const BUDGET: u64 = 20_000;

/// Port and MMIO reads give a pattern of the address; interrupts come as the input says.
struct FuzzBus {
    irq_pattern: u8,
    looks: u32,
    now: u64,
}

impl Bus for FuzzBus {
    fn io_in(&mut self, port: u16, size: u8) -> u32 {
        (0x5a5a_0000 | u32::from(port)) & if size >= 4 { u32::MAX } else { (1u32 << (8 * u32::from(size))) - 1 }
    }
    fn io_out(&mut self, _: u16, _: u8, _: u32) {}
    fn mmio_read(&mut self, gpa: u64, _size: u8) -> u64 {
        gpa.rotate_left(17) ^ 0xa5a5_a5a5
    }
    fn mmio_write(&mut self, _: u64, _: u8, _: u64) {}
    fn interrupt_pending(&mut self) -> bool {
        let k = self.looks % 8;
        self.looks = self.looks.wrapping_add(1);
        self.irq_pattern & (1 << k) != 0
    }
    fn ack_interrupt(&mut self) -> Option<u8> {
        Some(0x20 + (self.looks % 8) as u8)
    }
    fn now_ns(&mut self) -> u64 {
        self.now += 100;
        self.now
    }
}

fn put64(ram: &mut [u8], at: usize, v: u64) {
    if let Some(s) = ram.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// Runs one input (see the module documentation).
pub fn run(data: &[u8]) {
    let _ = run_stats(data);
}

/// [`run`], returning the CPU's statistics and how the run ended.
pub fn run_stats(data: &[u8]) -> (x86emu::Stats, x86emu::Exit) {
    let mut i = Input::new(data);
    let mode = i.u8() % 3;
    let irq_pattern = i.u8();
    let code = i.bytes(64 << 10);
    let mut ram = vec![0u8; RAM];
    if let Some(dst) = ram.get_mut(CODE..CODE + code.len()) {
        dst.copy_from_slice(code);
    }
    // Protected-mode scaffolding: GDT (null, code 64, data, code 32), IDT of interrupt gates
    // to one `hlt` per vector, page tables for the first 2 MiB.
    let gdt: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00cf_9b00_0000_ffff];
    for (k, d) in gdt.iter().enumerate() {
        put64(&mut ram, GDT + 8 * k, *d);
    }
    for v in 0..256usize {
        let target = (STUBS + v) as u64;
        if mode == 2 {
            let lo = (target & 0xffff) | (0x08 << 16) | (0x8e << 40) | (((target >> 16) & 0xffff) << 48);
            put64(&mut ram, IDT + 16 * v, lo);
            put64(&mut ram, IDT + 16 * v + 8, target >> 32);
        } else {
            let lo = (target & 0xffff) | (0x18 << 16) | (0x8e << 40) | (((target >> 16) & 0xffff) << 48);
            put64(&mut ram, IDT + 8 * v, lo);
        }
        if let Some(b) = ram.get_mut(STUBS + v) {
            *b = 0xf4;
        }
    }
    put64(&mut ram, PML4, PDPT as u64 | 7);
    put64(&mut ram, PDPT, PD as u64 | 7);
    put64(&mut ram, PD, 0x87);

    let region = RamRegion { gpa: 0, size: RAM as u64, host_addr: ram.as_mut_ptr() };
    let mut cpu = Cpu::new(vec![region], CpuConfig::default());
    match mode {
        0 => {
            cpu.seg[1] = Seg { selector: 0, base: 0, limit: 0xffff, attr: 0x9b };
            cpu.rip = CODE as u64;
        }
        1 => {
            cpu.cr0 = 0x11;
            cpu.gdtr_base = GDT as u64;
            cpu.gdtr_limit = 0x1f;
            cpu.idtr_base = IDT as u64;
            cpu.idtr_limit = 0x7ff;
            cpu.seg[1] = Seg { selector: 0x18, base: 0, limit: 0xffff_ffff, attr: 0xc09b };
            for (k, s) in cpu.seg.iter_mut().enumerate() {
                if k != 1 {
                    *s = Seg { selector: 0x10, base: 0, limit: 0xffff_ffff, attr: 0xc093 };
                }
            }
            cpu.rip = CODE as u64;
            cpu.gpr[4] = 0x7_0000;
        }
        _ => {
            cpu.cr0 = 0x8000_0011 | (1 << 5) | (1 << 16) | 2;
            cpu.cr3 = PML4 as u64;
            cpu.cr4 = (1 << 5) | (1 << 9) | (1 << 10);
            cpu.efer = (1 << 8) | (1 << 10) | (1 << 11);
            cpu.gdtr_base = GDT as u64;
            cpu.gdtr_limit = 0x1f;
            cpu.idtr_base = IDT as u64;
            cpu.idtr_limit = 0xfff;
            cpu.seg[1] = Seg { selector: 0x08, base: 0, limit: 0xffff_ffff, attr: 0xa09b };
            for (k, s) in cpu.seg.iter_mut().enumerate() {
                if k != 1 {
                    *s = Seg { selector: 0x10, base: 0, limit: 0xffff_ffff, attr: 0xc093 };
                }
            }
            cpu.tr = Seg { selector: 0, base: 0x7000, limit: 0x67, attr: 0x8b };
            cpu.rip = CODE as u64;
            cpu.gpr[4] = 0x7_0000;
        }
    }
    cpu.rflags = 2 | if irq_pattern != 0 { 1 << 9 } else { 0 };
    let mut bus = FuzzBus { irq_pattern, looks: 0, now: 0 };
    let exit = cpu.run(&mut bus, BUDGET);
    let stats = cpu.stats.clone();
    let saved = cpu.save_state();
    if let Err(e) = cpu.restore_state(&saved) {
        panic!("the emulator refused a state it reached: {e}");
    }
    // `cpu` maps `ram`: it goes first.
    drop(cpu);
    drop(ram);
    (stats, exit)
}

#[cfg(test)]
mod tests {
    /// The seeds run code: each retires instructions and stops before its budget.
    #[test]
    fn seeds_run_code() {
        for (target, name, data) in crate::seeds::all() {
            if target == "x86emu" {
                let (stats, exit) = super::run_stats(&data);
                eprintln!("{name}: {exit:?} {stats:?}");
                assert!(stats.instructions > 3, "{name}: {stats:?}");
            }
        }
    }
}
