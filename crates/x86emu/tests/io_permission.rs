//! Protection of port I/O in protected and long mode (Intel SDM Vol. 1 §19.5): IN, OUT,
//! INS and OUTS run when CPL <= IOPL, and otherwise only if the I/O permission bitmap of the
//! current TSS clears every bit of the ports accessed; the bitmap is read two bytes at a time
//! and must lie within the TSS limit. POPF/IRET change IOPL only at CPL 0.
//!
//! Each test builds a small long-mode machine: identity-mapped user-accessible RAM, a GDT
//! with kernel and user segments and a 64-bit TSS, an IDT whose every vector leads to its own
//! `hlt` stub, and code that ends with `int 0x80` (a DPL 3 gate). The test then reads which
//! stub the CPU stopped in and the frame the exception pushed.

use iced_x86::code_asm::*;
use iced_x86::IcedError;
use x86emu::{Bus, Cpu, CpuConfig, Exit, RamRegion, Seg};

const RAM: usize = 4 << 20;
const PML4: usize = 0x1000;
const PDPT: usize = 0x2000;
const PD: usize = 0x3000;
const GDT: usize = 0x5000;
const IDT: usize = 0x6000;
/// One `hlt` per vector: vector v halts at STUBS + v.
const STUBS: usize = 0x8000;
const TSS: usize = 0x10000;
const KSTACK: u64 = 0x20000;
const CODE: u64 = 0x30000;
const KCODE: u64 = 0x38000;
const USTACK: u64 = 0x40000;
const DATA: u64 = 0x50000;
const DONE: u8 = 0x80;

const KERNEL_CS: u16 = 0x08;
const KERNEL_SS: u16 = 0x10;
const USER_CS32: u16 = 0x18 | 3;
const USER_SS: u16 = 0x20 | 3;
const USER_CS: u16 = 0x28 | 3;
const TSS_SEL: u16 = 0x30;

const IOPL3: u64 = 3 << 12;
const GP: u8 = 13;

/// A port access the bus saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Io {
    In(u16, u8),
    Out(u16, u8, u32),
}

/// What `in` returns: a pattern derived from the port.
fn in_value(port: u16, size: u8) -> u32 {
    let v = 0xa5c3_0000 | u32::from(port);
    match size {
        1 => v & 0xff,
        2 => v & 0xffff,
        _ => v,
    }
}

#[derive(Default)]
struct RecBus {
    log: Vec<Io>,
}

impl Bus for RecBus {
    fn io_in(&mut self, port: u16, size: u8) -> u32 {
        self.log.push(Io::In(port, size));
        in_value(port, size)
    }
    fn io_out(&mut self, port: u16, size: u8, value: u32) {
        self.log.push(Io::Out(port, size, value));
    }
    fn mmio_read(&mut self, _: u64, _: u8) -> u64 {
        !0
    }
    fn mmio_write(&mut self, _: u64, _: u8, _: u64) {}
    fn interrupt_pending(&mut self) -> bool {
        false
    }
    fn ack_interrupt(&mut self) -> Option<u8> {
        None
    }
    fn now_ns(&mut self) -> u64 {
        0
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The code reached its final `int 0x80`.
    Done,
    /// An exception: vector, error code (0 if none), RIP and CS of the faulting instruction.
    Fault { vector: u8, error: u64, rip: u64, cs: u16 },
}

/// The TSS as the test wants it.
struct TssSpec {
    /// TSS limit (inclusive, in bytes).
    limit: u32,
    /// I/O map base (offset 0x66).
    io_base: u16,
    /// Bytes written from TSS + io_base on (RAM beyond the limit included).
    bitmap: Vec<u8>,
}

impl TssSpec {
    /// A full bitmap right after the 0x68-byte TSS that denies every port, followed by the
    /// extra all-ones byte, with the limit covering it.
    fn deny_all() -> TssSpec {
        TssSpec { limit: 0x68 + 0x2000, io_base: 0x68, bitmap: vec![0xff; 0x2001] }
    }
    /// No bitmap: the map base lies beyond the limit of a minimal TSS.
    fn no_bitmap() -> TssSpec {
        TssSpec { limit: 0x67, io_base: 0x68, bitmap: Vec::new() }
    }
    /// Clears the bits of `len` ports from `port` on.
    fn allow(mut self, port: u16, len: u16) -> TssSpec {
        for p in u32::from(port)..u32::from(port) + u32::from(len) {
            self.bitmap[(p / 8) as usize] &= !(1 << (p % 8));
        }
        self
    }
    fn deny(mut self, port: u16) -> TssSpec {
        self.bitmap[usize::from(port / 8)] |= 1 << (port % 8);
        self
    }
}

struct Machine {
    cpu: Cpu,
    bus: RecBus,
    /// Guest RAM; `cpu` holds a raw mapping of it, so it must stay put (it is never resized).
    ram: Vec<u8>,
}

fn put64(ram: &mut [u8], at: usize, v: u64) {
    ram[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get64(ram: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_le_bytes(ram[at..at + 8].try_into().unwrap())
}

fn assemble(bits: u32, ip: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(bits).unwrap();
    f(&mut a).unwrap();
    a.int(u32::from(DONE)).unwrap();
    a.assemble(ip).unwrap()
}

impl Machine {
    /// A long-mode machine about to run `code` (64-bit, at CODE) at privilege `cpl` (0 or 3)
    /// with RFLAGS.IOPL = `iopl`, TR loaded with the TSS described by `tss`.
    fn new(cpl: u8, iopl: u64, tss: &TssSpec, code: &[u8]) -> Machine {
        Machine::with_cs(if cpl == 3 { USER_CS } else { KERNEL_CS }, iopl, tss, code)
    }

    fn with_cs(code_sel: u16, iopl: u64, tss: &TssSpec, code: &[u8]) -> Machine {
        let mut ram = vec![0u8; RAM];
        // Page tables: the first 2 MiB identity-mapped, writable, user-accessible.
        put64(&mut ram, PML4, PDPT as u64 | 7);
        put64(&mut ram, PDPT, PD as u64 | 7);
        put64(&mut ram, PD, 0x87);
        // GDT.
        let gdt: [u64; 6] = [
            0,
            0x00af_9b00_0000_ffff, // 0x08 kernel code 64
            0x00cf_9300_0000_ffff, // 0x10 kernel data
            0x00cf_fb00_0000_ffff, // 0x18 user code 32
            0x00cf_f300_0000_ffff, // 0x20 user data
            0x00af_fb00_0000_ffff, // 0x28 user code 64
        ];
        for (i, d) in gdt.iter().enumerate() {
            put64(&mut ram, GDT + 8 * i, *d);
        }
        // 0x30: available 64-bit TSS (type 9), byte-granular limit.
        let (base, limit) = (TSS as u64, u64::from(tss.limit));
        let lo = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        put64(&mut ram, GDT + 0x30, lo);
        put64(&mut ram, GDT + 0x38, base >> 32);
        // IDT: interrupt gates to the stubs, DPL 3 so `int 0x80` works from ring 3.
        for v in 0..256usize {
            let target = (STUBS + v) as u64;
            let lo =
                (target & 0xffff) | (u64::from(KERNEL_CS) << 16) | (0xee << 40) | (((target >> 16) & 0xffff) << 48);
            put64(&mut ram, IDT + 16 * v, lo);
            put64(&mut ram, IDT + 16 * v + 8, target >> 32);
            ram[STUBS + v] = 0xf4;
        }
        // TSS: RSP0, I/O map base, bitmap.
        put64(&mut ram, TSS + 4, KSTACK);
        ram[TSS + 0x66..TSS + 0x68].copy_from_slice(&tss.io_base.to_le_bytes());
        let bm = TSS + usize::from(tss.io_base);
        ram[bm..bm + tss.bitmap.len()].copy_from_slice(&tss.bitmap);
        // Code and data.
        let entry = if code_sel & 3 == 3 { CODE } else { KCODE };
        ram[entry as usize..entry as usize + code.len()].copy_from_slice(code);
        for i in 0..0x100 {
            ram[DATA as usize + i] = i as u8 ^ 0x5a;
        }

        let region = RamRegion { gpa: 0, size: RAM as u64, host_addr: ram.as_mut_ptr() };
        let mut cpu = Cpu::new(vec![region], CpuConfig::default());
        cpu.cr0 = 1 | 2 | 0x10 | 0x20 | (1 << 16) | (1 << 31);
        cpu.cr3 = PML4 as u64;
        cpu.cr4 = 1 << 5;
        cpu.efer = (1 << 8) | (1 << 10);
        cpu.gdtr_base = GDT as u64;
        cpu.gdtr_limit = 0x3f;
        cpu.idtr_base = IDT as u64;
        cpu.idtr_limit = 0xfff;
        let dpl = u32::from(code_sel & 3) << 5;
        let code_attr = match code_sel {
            USER_CS32 => 0xc09b,
            _ => 0xa09b,
        };
        cpu.seg[1] = Seg { selector: code_sel, base: 0, limit: 0xffff_ffff, attr: code_attr | dpl };
        let data_sel = if code_sel & 3 == 3 { USER_SS } else { KERNEL_SS };
        for i in [0, 2, 3, 4, 5] {
            cpu.seg[i] = Seg { selector: data_sel, base: 0, limit: 0xffff_ffff, attr: 0xc093 | dpl };
        }
        cpu.tr = Seg { selector: TSS_SEL, base: TSS as u64, limit: tss.limit, attr: 0x8b };
        cpu.rflags = 2 | iopl;
        cpu.rip = entry;
        cpu.gpr[4] = if code_sel & 3 == 3 { USTACK } else { KSTACK - 0x1000 };
        Machine { cpu, bus: RecBus::default(), ram }
    }

    fn run(&mut self) -> End {
        let e = self.cpu.run(&mut self.bus, 100_000);
        assert_eq!(e, Exit::HaltedForever, "rip {:#x}", self.cpu.rip);
        let vector = (self.cpu.rip - STUBS as u64 - 1) as u8;
        let top = self.cpu.gpr[4];
        let with_error = matches!(vector, 8 | 10..=14 | 17);
        let (error, frame) = if with_error { (get64(&self.ram, top), top + 8) } else { (0, top) };
        let rip = get64(&self.ram, frame);
        let frame_cs = get64(&self.ram, frame + 8) as u16;
        if vector == DONE {
            End::Done
        } else {
            End::Fault { vector, error, rip, cs: frame_cs }
        }
    }

    fn byte(&self, la: u64) -> u8 {
        self.ram[la as usize]
    }
}

/// Every I/O instruction form, with the ports each touches: imm8 and DX ports, byte, word
/// and dword widths, and the string forms with and without REP. Returns the code and the
/// accesses the bus must see, in order.
fn every_form(bits: u32, ip: u64) -> (Vec<u8>, Vec<Io>) {
    let code = assemble(bits, ip, |a| {
        a.in_(al, 0x60u32)?;
        a.in_(ax, 0x62u32)?;
        a.in_(eax, 0x64u32)?;
        a.out(0x61u32, al)?;
        a.out(0x62u32, ax)?;
        a.out(0x64u32, eax)?;
        a.mov(edx, 0x3f8u32)?;
        a.in_(al, dx)?;
        a.in_(ax, dx)?;
        a.in_(eax, dx)?;
        a.mov(eax, 0x1122_3344u32)?;
        a.out(dx, al)?;
        a.out(dx, ax)?;
        a.out(dx, eax)?;
        a.mov(esi, DATA as u32)?;
        a.mov(edi, DATA as u32 + 0x800)?;
        a.mov(ecx, 3u32)?;
        a.rep().outsb()?;
        a.outsw()?;
        a.outsd()?;
        a.mov(ecx, 2u32)?;
        a.rep().insb()?;
        a.insw()?;
        a.insd()?;
        Ok(())
    });
    let d = |i: u64| u32::from(((DATA + i) as u8) ^ 0x5a);
    let expect = vec![
        Io::In(0x60, 1),
        Io::In(0x62, 2),
        Io::In(0x64, 4),
        Io::Out(0x61, 1, in_value(0x64, 1)),
        Io::Out(0x62, 2, in_value(0x64, 2)),
        Io::Out(0x64, 4, in_value(0x64, 4)),
        Io::In(0x3f8, 1),
        Io::In(0x3f8, 2),
        Io::In(0x3f8, 4),
        Io::Out(0x3f8, 1, 0x44),
        Io::Out(0x3f8, 2, 0x3344),
        Io::Out(0x3f8, 4, 0x1122_3344),
        Io::Out(0x3f8, 1, d(0)),
        Io::Out(0x3f8, 1, d(1)),
        Io::Out(0x3f8, 1, d(2)),
        Io::Out(0x3f8, 2, d(3) | d(4) << 8),
        Io::Out(0x3f8, 4, d(5) | d(6) << 8 | d(7) << 16 | d(8) << 24),
        Io::In(0x3f8, 1),
        Io::In(0x3f8, 1),
        Io::In(0x3f8, 2),
        Io::In(0x3f8, 4),
    ];
    (code, expect)
}

/// The ports `every_form` uses, as (first, count).
const EVERY_FORM_PORTS: [(u16, u16); 2] = [(0x60, 8), (0x3f8, 4)];

fn check_every_form_ran(m: &Machine) {
    let (_, expect) = every_form(64, CODE);
    assert_eq!(m.bus.log, expect);
    assert_eq!(m.cpu.gpr[1], 0, "RCX after the REP forms");
    assert_eq!(m.cpu.gpr[6], DATA + 9);
    assert_eq!(m.cpu.gpr[7], DATA + 0x800 + 8);
    let b = in_value(0x3f8, 4).to_le_bytes();
    let got: Vec<u8> = (0..8).map(|i| m.byte(DATA + 0x800 + i)).collect();
    assert_eq!(got, [b[0], b[0], b[0], b[1], b[0], b[1], b[2], b[3]]);
}

#[test]
fn iopl3_allows_every_form_at_cpl3() {
    let (code, _) = every_form(64, CODE);
    let mut m = Machine::new(3, IOPL3, &TssSpec::no_bitmap(), &code);
    assert_eq!(m.run(), End::Done);
    check_every_form_ran(&m);
}

#[test]
fn bitmap_grants_ports_at_iopl0() {
    let (code, _) = every_form(64, CODE);
    let mut tss = TssSpec::deny_all();
    for (p, n) in EVERY_FORM_PORTS {
        tss = tss.allow(p, n);
    }
    let mut m = Machine::new(3, 0, &tss, &code);
    assert_eq!(m.run(), End::Done);
    check_every_form_ran(&m);
}

/// Linux (since 5.5) emulates `iopl(3)` with an all-zero bitmap rather than RFLAGS.IOPL.
#[test]
fn all_zero_bitmap_grants_every_port() {
    let code = assemble(64, CODE, |a| {
        a.mov(edx, 0xffffu32)?;
        a.in_(al, dx)?;
        a.mov(edx, 0xfffeu32)?;
        a.out(dx, ax)?;
        a.mov(edx, 0u32)?;
        a.out(dx, eax)?;
        Ok(())
    });
    let mut tss = TssSpec::deny_all();
    tss.bitmap[..0x2000].fill(0);
    let mut m = Machine::new(3, 0, &tss, &code);
    assert_eq!(m.run(), End::Done);
    assert_eq!(m.bus.log, [Io::In(0xffff, 1), Io::Out(0xfffe, 2, in_value(0xffff, 2) & 0xff), Io::Out(0, 4, 0xff)]);
}

/// One instruction (after setting up DX/RSI/RDI/RCX) and the ports it accesses.
struct Single {
    name: &'static str,
    port: u16,
    width: u16,
    emit: fn(&mut CodeAssembler) -> Result<(), IcedError>,
    /// Bus accesses when allowed.
    accesses: usize,
}

fn singles() -> Vec<Single> {
    vec![
        Single { name: "in ax,imm", port: 0x71, width: 2, emit: |a| a.in_(ax, 0x71u32), accesses: 1 },
        Single { name: "in eax,imm", port: 0x70, width: 4, emit: |a| a.in_(eax, 0x70u32), accesses: 1 },
        Single { name: "out imm,ax", port: 0x77, width: 2, emit: |a| a.out(0x77u32, ax), accesses: 1 },
        Single { name: "out imm,eax", port: 0x7c, width: 4, emit: |a| a.out(0x7cu32, eax), accesses: 1 },
        Single { name: "in al,dx", port: 0x3ff, width: 1, emit: |a| a.in_(al, dx), accesses: 1 },
        Single { name: "in ax,dx", port: 0x3ff, width: 2, emit: |a| a.in_(ax, dx), accesses: 1 },
        Single { name: "in eax,dx", port: 0x3ff, width: 4, emit: |a| a.in_(eax, dx), accesses: 1 },
        Single { name: "out dx,ax", port: 0x3ff, width: 2, emit: |a| a.out(dx, ax), accesses: 1 },
        Single { name: "out dx,eax", port: 0x3fd, width: 4, emit: |a| a.out(dx, eax), accesses: 1 },
        Single { name: "outsw", port: 0x3ff, width: 2, emit: |a| a.outsw(), accesses: 1 },
        Single { name: "insd", port: 0x3fe, width: 4, emit: |a| a.insd(), accesses: 1 },
        Single { name: "rep outsb", port: 0x3f8, width: 1, emit: |a| a.rep().outsb(), accesses: 5 },
        Single { name: "rep outsw", port: 0x3ff, width: 2, emit: |a| a.rep().outsw(), accesses: 5 },
        Single { name: "rep insd", port: 0x3fd, width: 4, emit: |a| a.rep().insd(), accesses: 5 },
    ]
}

fn single_code(s: &Single) -> (Vec<u8>, u64) {
    let code = assemble(64, CODE, |a| {
        a.mov(edx, u32::from(s.port))?;
        a.mov(esi, DATA as u32)?;
        a.mov(edi, DATA as u32 + 0x800)?;
        a.mov(ecx, 5u32)?;
        a.mov(eax, 0xdead_beefu32)?;
        (s.emit)(a)
    });
    // The instruction under test follows five 5-byte MOVs.
    (code, CODE + 25)
}

/// Denying any single byte of a multi-byte access faults with #GP(0) before the bus is
/// touched (registers of string forms unchanged); granting all of them lets it through.
#[test]
fn bitmap_denying_any_byte_of_the_access_faults() {
    for s in singles() {
        let (code, insn_rip) = single_code(&s);
        for denied in s.port..s.port + s.width {
            let tss = TssSpec::deny_all().allow(s.port, s.width).deny(denied);
            let mut m = Machine::new(3, 0, &tss, &code);
            let end = m.run();
            assert_eq!(
                end,
                End::Fault { vector: GP, error: 0, rip: insn_rip, cs: USER_CS },
                "{} with port {denied:#x} denied",
                s.name
            );
            assert_eq!(m.bus.log, [], "{}: no bus access", s.name);
            assert_eq!((m.cpu.gpr[1], m.cpu.gpr[6], m.cpu.gpr[7]), (5, DATA, DATA + 0x800), "{}", s.name);
        }
        let tss = TssSpec::deny_all().allow(s.port, s.width);
        let mut m = Machine::new(3, 0, &tss, &code);
        assert_eq!(m.run(), End::Done, "{} allowed", s.name);
        assert_eq!(m.bus.log.len(), s.accesses, "{}", s.name);
    }
}

/// A word access whose second byte's bit is the only one set: the classic bug of checking
/// just the first port.
#[test]
fn word_access_with_its_second_port_denied_faults() {
    let code = assemble(64, CODE, |a| {
        a.mov(edx, 0x70u32)?;
        a.out(dx, al)?;
        a.out(dx, ax)?;
        Ok(())
    });
    let tss = TssSpec::deny_all().allow(0x70, 1);
    let mut m = Machine::new(3, 0, &tss, &code);
    assert_eq!(m.run(), End::Fault { vector: GP, error: 0, rip: CODE + 6, cs: USER_CS });
    assert_eq!(m.bus.log, [Io::Out(0x70, 1, 0)]);
}

#[test]
fn io_map_base_at_or_beyond_the_limit_faults() {
    let code = assemble(64, CODE, |a| a.in_(al, 0x60u32));
    let fault = End::Fault { vector: GP, error: 0, rip: CODE, cs: USER_CS };
    // The bitmap bytes in RAM grant every port, but the limit leaves them out of the TSS.
    for (limit, io_base) in [(0x67, 0x68), (0x67, 0x1000), (0x68, 0x68), (0x1000, 0x1000), (0x2067, 0xffff)] {
        let tss = TssSpec { limit, io_base, bitmap: vec![0; 0x2001] };
        let mut m = Machine::new(3, 0, &tss, &code);
        assert_eq!(m.run(), fault, "limit {limit:#x}, io base {io_base:#x}");
        assert_eq!(m.bus.log, []);
    }
    // A TSS too short to hold the I/O map base field.
    let tss = TssSpec { limit: 0x65, io_base: 0x68, bitmap: vec![0; 0x2001] };
    let mut m = Machine::new(3, 0, &tss, &code);
    assert_eq!(m.run(), fault);
    // The same bitmap within the limit is honoured.
    let tss = TssSpec { limit: 0x68 + 0x2000, io_base: 0x68, bitmap: vec![0; 0x2001] };
    let mut m = Machine::new(3, 0, &tss, &code);
    assert_eq!(m.run(), End::Done);
}

/// The processor reads two bitmap bytes per access, so the byte after the last one that
/// holds a port's bit must be within the limit too (SDM: "an extra byte ... must be within
/// the segment limit").
#[test]
fn bitmap_ending_at_the_limit_needs_the_extra_byte() {
    // A 128-byte bitmap (ports 0-0x3ff), all granted.
    let short = |extra: bool| TssSpec { limit: 0x68 + 127 + u32::from(extra), io_base: 0x68, bitmap: vec![0; 129] };
    let fault = End::Fault { vector: GP, error: 0, rip: CODE + 5, cs: USER_CS };
    // (port, allowed without the extra byte, allowed with it). Port 0x400's bit lies in the
    // extra byte itself, and the byte after that is beyond the limit either way.
    for (port, without, with) in
        [(0x3f0u16, true, true), (0x3f8, false, true), (0x3ff, false, true), (0x400, false, false)]
    {
        let code = assemble(64, CODE, |a| {
            a.mov(edx, u32::from(port))?;
            a.in_(al, dx)
        });
        for (extra, ok) in [(false, without), (true, with)] {
            let mut m = Machine::new(3, 0, &short(extra), &code);
            assert_eq!(m.run(), if ok { End::Done } else { fault }, "port {port:#x}, extra byte {extra}");
            assert_eq!(m.bus.log.len(), usize::from(ok));
        }
    }
}

#[test]
fn ring0_ignores_iopl_and_the_bitmap() {
    let (code, _) = every_form(64, KCODE);
    for tss in [TssSpec::deny_all(), TssSpec::no_bitmap(), TssSpec { limit: 0x10, io_base: 0, bitmap: vec![] }] {
        let mut m = Machine::new(0, 0, &tss, &code);
        assert_eq!(m.run(), End::Done);
        let (_, expect) = every_form(64, KCODE);
        assert_eq!(m.bus.log, expect);
    }
}

/// In compatibility mode (32-bit code under a 64-bit kernel) the same rules apply.
#[test]
fn compatibility_mode_user_code_is_checked_too() {
    let (code, expect) = every_form(32, CODE);
    let mut tss = TssSpec::deny_all();
    for (p, n) in EVERY_FORM_PORTS {
        tss = tss.allow(p, n);
    }
    let mut m = Machine::with_cs(USER_CS32, 0, &tss, &code);
    assert_eq!(m.run(), End::Done);
    assert_eq!(m.bus.log, expect);

    let mut m = Machine::with_cs(USER_CS32, 0, &TssSpec::deny_all().allow(0x60, 1), &code);
    assert_eq!(m.run(), End::Fault { vector: GP, error: 0, rip: CODE + 2, cs: USER_CS32 });
    assert_eq!(m.bus.log, [Io::In(0x60, 1)]);
}

/// REP INS/OUTS check the port even when RCX is 0 (as QEMU, Bochs and KVM's emulator do:
/// the permission check precedes the count test).
#[test]
fn rep_string_io_with_zero_count_is_still_checked() {
    let code = assemble(64, CODE, |a| {
        a.mov(edx, 0x3f8u32)?;
        a.xor(ecx, ecx)?;
        a.rep().outsb()
    });
    let mut m = Machine::new(3, 0, &TssSpec::deny_all(), &code);
    assert_eq!(m.run(), End::Fault { vector: GP, error: 0, rip: CODE + 7, cs: USER_CS });
    let mut m = Machine::new(3, 0, &TssSpec::deny_all().allow(0x3f8, 1), &code);
    assert_eq!(m.run(), End::Done);
    assert_eq!(m.bus.log, []);
}

/// A long REP OUTSB (more than one internal chunk) with a granted port completes.
#[test]
fn long_rep_outsb_completes() {
    let code = assemble(64, CODE, |a| {
        a.mov(edx, 0x3f8u32)?;
        a.mov(esi, DATA as u32)?;
        a.mov(ecx, 40_000u32)?;
        a.rep().outsb()
    });
    let mut m = Machine::new(3, 0, &TssSpec::deny_all().allow(0x3f8, 1), &code);
    assert_eq!(m.run(), End::Done);
    assert_eq!(m.bus.log.len(), 40_000);
    assert_eq!(m.cpu.gpr[6], DATA + 40_000);
}

/// POPF and IRET at CPL 3 leave IOPL alone (no fault); at CPL 0 they change it.
#[test]
fn popf_and_iret_at_cpl3_cannot_change_iopl() {
    let code = assemble(64, CODE, |a| {
        // POPF with IOPL = 3 in the image.
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x3000)?;
        a.popfq()?;
        a.pushfq()?;
        a.pop(rbx)?;
        // IRETQ to the next instruction, same privilege, IOPL = 3 in the image.
        a.mov(rax, rsp)?;
        a.push(i32::from(USER_SS))?;
        a.push(rax)?;
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x3000)?;
        a.push(i32::from(USER_CS))?;
        let mut next = a.create_label();
        a.lea(rax, ptr(next))?;
        a.push(rax)?;
        a.iretq()?;
        a.set_label(&mut next)?;
        a.pushfq()?;
        a.pop(rbp)?;
        a.in_(al, 0x60u32)?;
        Ok(())
    });
    let mut m = Machine::new(3, 0, &TssSpec::no_bitmap(), &code);
    let end = m.run();
    assert!(matches!(end, End::Fault { vector: GP, error: 0, .. }), "{end:?}");
    assert_eq!(m.cpu.gpr[3] & IOPL3, 0, "IOPL after POPF");
    assert_eq!(m.cpu.gpr[5] & IOPL3, 0, "IOPL after IRETQ");
    assert_eq!(m.bus.log, []);

    // Nor can CPL 3 lower it.
    let code = assemble(64, CODE, |a| {
        a.push(2)?;
        a.popfq()?;
        a.pushfq()?;
        a.pop(rbx)?;
        a.in_(al, 0x60u32)?;
        Ok(())
    });
    let mut m = Machine::new(3, IOPL3, &TssSpec::no_bitmap(), &code);
    assert_eq!(m.run(), End::Done);
    assert_eq!(m.cpu.gpr[3] & IOPL3, IOPL3);
    assert_eq!(m.bus.log, [Io::In(0x60, 1)]);
}

/// The kernel raises IOPL with POPF at CPL 0 and returns to user mode with IRETQ; the TSS
/// comes from LTR on a GDT descriptor (as Linux loads it), and user code then has every port.
#[test]
fn kernel_grants_iopl3_through_popf_and_iretq() {
    let user = assemble(64, CODE, |a| {
        a.mov(edx, 0x3f8u32)?;
        a.out(dx, al)?;
        a.cli()?;
        a.sti()?;
        Ok(())
    });
    let kernel = {
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(ax, TSS_SEL as u32).unwrap();
        a.ltr(ax).unwrap();
        a.pushfq().unwrap();
        a.or(qword_ptr(rsp), 0x3000).unwrap();
        a.popfq().unwrap();
        a.push(i32::from(USER_SS)).unwrap();
        a.push(USTACK as i32).unwrap();
        a.pushfq().unwrap();
        a.push(i32::from(USER_CS)).unwrap();
        a.push(CODE as i32).unwrap();
        a.iretq().unwrap();
        a.assemble(KCODE).unwrap()
    };
    let mut m = Machine::new(0, 0, &TssSpec::deny_all(), &kernel);
    m.ram[CODE as usize..CODE as usize + user.len()].copy_from_slice(&user);
    m.cpu.tr = Seg::default();
    assert_eq!(m.run(), End::Done);
    assert_eq!(m.cpu.tr.limit, 0x2068);
    assert_eq!(m.bus.log, [Io::Out(0x3f8, 1, u32::from(TSS_SEL))]);
}

/// CLI and STI follow IOPL only: a bitmap that grants every port does not let CPL 3 run them
/// (Linux's emulated iopl(3) relies on this to trap them).
#[test]
fn cli_sti_at_cpl3_need_iopl3_whatever_the_bitmap() {
    for (insn, f) in
        [("cli", CodeAssembler::cli as fn(&mut CodeAssembler) -> Result<(), IcedError>), ("sti", CodeAssembler::sti)]
    {
        let code = assemble(64, CODE, f);
        let mut tss = TssSpec::deny_all();
        tss.bitmap[..0x2000].fill(0);
        let mut m = Machine::new(3, 0, &tss, &code);
        assert_eq!(m.run(), End::Fault { vector: GP, error: 0, rip: CODE, cs: USER_CS }, "{insn}");
        let mut m = Machine::new(3, IOPL3, &tss, &code);
        assert_eq!(m.run(), End::Done, "{insn}");
    }
}

/// A hostile TSS base or map base must not panic the emulator: the bitmap read faults like
/// any other supervisor access (here the TSS is unmapped, so delivery itself fails too).
#[test]
fn unmapped_tss_does_not_panic() {
    let code = assemble(64, CODE, |a| {
        a.mov(edx, 0xffffu32)?;
        a.out(dx, eax)
    });
    // The last case has the map base field mapped but the bitmap unmapped.
    for base in
        [0x7fff_ffff_f000u64, 0x7fff_ffff_fff0, 0x8000_0000_0000_0000, 0xffff_8000_0000_0000, 0x1f_fff8, 0x1f_f000]
    {
        for limit in [0xffff_ffffu32, 0x67, 0x20_0000] {
            let mut m = Machine::new(3, 0, &TssSpec::no_bitmap(), &code);
            m.ram[0x1f_f066..0x1f_f068].copy_from_slice(&0xfff0u16.to_le_bytes());
            m.cpu.tr = Seg { selector: TSS_SEL, base, limit, attr: 0x8b };
            let e = m.cpu.run(&mut m.bus, 10_000);
            assert!(matches!(e, Exit::TripleFault(_) | Exit::HaltedForever), "{e:?}");
            assert_eq!(m.bus.log, [], "TSS at {base:#x}, limit {limit:#x}: {e:?} rip {:#x}", m.cpu.rip);
        }
    }
}

/// Legacy protected mode (no long mode, no paging): a 32-bit TSS, the same I/O map base
/// field, and linear addresses that wrap at 4 GiB.
fn legacy_machine(tss_base: u32, tss: &TssSpec, code: &[u8]) -> Machine {
    let mut ram = vec![0u8; RAM];
    let gdt: [u64; 5] = [
        0,
        0x00cf_9b00_0000_ffff, // 0x08 kernel code 32
        0x00cf_9300_0000_ffff, // 0x10 kernel data
        0x00cf_fb00_0000_ffff, // 0x18 user code 32
        0x00cf_f300_0000_ffff, // 0x20 user data
    ];
    for (i, d) in gdt.iter().enumerate() {
        put64(&mut ram, GDT + 8 * i, *d);
    }
    for v in 0..256usize {
        let target = (STUBS + v) as u64;
        let gate = (target & 0xffff) | (u64::from(KERNEL_CS) << 16) | (0xee << 40) | ((target >> 16) << 48);
        put64(&mut ram, IDT + 8 * v, gate);
        ram[STUBS + v] = 0xf4;
    }
    // The TSS fields at their offsets from `tss_base`, wrapping at 4 GiB (RAM permitting).
    let mut put = |off: u32, bytes: &[u8]| {
        for (i, b) in bytes.iter().enumerate() {
            let at = tss_base.wrapping_add(off).wrapping_add(i as u32) as usize;
            if at < RAM {
                ram[at] = *b;
            }
        }
    };
    put(4, &(KSTACK as u32).to_le_bytes());
    put(8, &u32::from(KERNEL_SS).to_le_bytes());
    put(0x66, &tss.io_base.to_le_bytes());
    put(u32::from(tss.io_base), &tss.bitmap);
    ram[CODE as usize..CODE as usize + code.len()].copy_from_slice(code);

    let region = RamRegion { gpa: 0, size: RAM as u64, host_addr: ram.as_mut_ptr() };
    let mut cpu = Cpu::new(vec![region], CpuConfig::default());
    cpu.cr0 = 0x11;
    cpu.gdtr_base = GDT as u64;
    cpu.gdtr_limit = 0x27;
    cpu.idtr_base = IDT as u64;
    cpu.idtr_limit = 0x7ff;
    cpu.seg[1] = Seg { selector: USER_CS32, base: 0, limit: 0xffff_ffff, attr: 0xc0fb };
    for i in [0, 2, 3, 4, 5] {
        cpu.seg[i] = Seg { selector: USER_SS, base: 0, limit: 0xffff_ffff, attr: 0xc0f3 };
    }
    cpu.tr = Seg { selector: TSS_SEL, base: u64::from(tss_base), limit: tss.limit, attr: 0x8b };
    cpu.rflags = 2;
    cpu.rip = CODE;
    cpu.gpr[4] = USTACK;
    Machine { cpu, bus: RecBus::default(), ram }
}

#[test]
fn legacy_protected_mode_uses_the_32bit_tss() {
    let code = assemble(32, CODE, |a| {
        a.mov(edx, 0x3f8u32)?;
        a.out(dx, al)?;
        a.out(dx, ax)
    });
    let mut m = legacy_machine(TSS as u32, &TssSpec::deny_all().allow(0x3f8, 1), &code);
    assert_eq!(m.cpu.run(&mut m.bus, 1000), Exit::HaltedForever);
    assert_eq!(m.cpu.rip, (STUBS + usize::from(GP) + 1) as u64);
    // 32-bit frame on the ring 0 stack: error code, EIP, CS.
    let top = m.cpu.gpr[4] as usize;
    let word = |at: usize| u32::from_le_bytes(m.ram[at..at + 4].try_into().unwrap());
    assert_eq!((word(top), word(top + 4), word(top + 8)), (0, CODE as u32 + 6, u32::from(USER_CS32)));
    assert_eq!(m.bus.log, [Io::Out(0x3f8, 1, 0)]);

    // A TSS just below 4 GiB: the map base and the bitmap wrap around into low RAM.
    let code = assemble(32, CODE, |a| {
        a.mov(edx, 0x3f8u32)?;
        a.out(dx, al)
    });
    let mut m = legacy_machine(0xffff_ffe0, &TssSpec::deny_all().allow(0x3f8, 1), &code);
    let _ = m.cpu.run(&mut m.bus, 1000);
    assert_eq!(m.bus.log, [Io::Out(0x3f8, 1, 0)]);
}
