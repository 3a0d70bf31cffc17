//! Tiny guests shared by the KVM and emu accelerator tests: guest RAM, the test's device
//! model ([`TestIo`]), the guest builders and the checks of what each guest must produce.
//!
//! Guest code is assembled at test time with iced-x86's `code_asm`; guest RAM is a 2 MiB
//! anonymous mapping. Every guest is built once here and run unchanged on both
//! accelerators, and its results (serial bytes, port and MMIO accesses) are checked by the
//! same `check_*` function; only the way a run ends differs per accelerator:
//!
//! - `hlt` with IF=0 in real mode: KVM without irqchip reports `VcpuExit::Hlt`; the emulator
//!   reports `VcpuExit::Shutdown` (nothing can wake the CPU).
//! - The "done" port 0x501 ([`emit_done`]): the handler raises the vCPU's stop flag. KVM
//!   returns `VcpuExit::Interrupted` before re-entering the guest; the emulator finishes its
//!   instruction slice, which runs into the `cli; hlt` after the `out`, so it returns
//!   `VcpuExit::Shutdown`. Either way [`TestIo::done`] is `Some(0)`.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use accel::{CpuState, ExitHandler, RamRegion, Segment, Table};
use iced_x86::code_asm::*;

pub const RAM_SIZE: usize = 2 << 20;
pub const SERIAL_THR: u16 = 0x3f8;
pub const SERIAL_LSR: u16 = 0x3fd;
/// Test port: a write ends the guest (value 0 = success).
pub const DONE_PORT: u16 = 0x501;
/// Test port: writes are recorded verbatim.
pub const RECORD_PORT: u16 = 0x502;
/// A port nobody claims.
pub const UNCLAIMED_PORT: u16 = 0x1234;
/// MMIO address used by the long-mode guest (not RAM).
pub const MMIO_GPA: u64 = 0xd000_0000;

pub const GDT_ADDR: u64 = 0x500;
pub const PML4_ADDR: u64 = 0x1000;
pub const PDPT_ADDR: u64 = 0x2000;
pub const PD_LOW_ADDR: u64 = 0x3000;
pub const PD_3G_ADDR: u64 = 0x4000;
/// 4 KiB page table for linear 2 MiB..4 MiB (page-fault guest).
pub const PT_2M_ADDR: u64 = 0x5000;
/// IDT of the page-fault guest.
pub const IDT_ADDR: u64 = 0x6000;
/// Real-mode soft-interrupt handler: IVT entry 0x10 points to `SOFTINT_SEG:SOFTINT_OFF`.
pub const SOFTINT_SEG: u16 = 0x0700;
pub const SOFTINT_OFF: u16 = 0x0100;
/// Hex digit table of the page-fault guest.
pub const HEX_ADDR: u64 = 0x7d00;
pub const STRING_ADDR: u64 = 0x7e00;
pub const BUF_ADDR: u64 = 0x7f00;
/// IDTR image (10 bytes) of the page-fault guest.
pub const IDTR_IMAGE_ADDR: u64 = 0x7fc0;
pub const CODE16_ADDR: u64 = 0x7c00;
pub const REAL_MODE_SP: u64 = 0x7000;
pub const CODE_ADDR: u64 = 0x1_0000;
/// #PF handler of the page-fault guest.
pub const PF_HANDLER_ADDR: u64 = 0x1_1000;
pub const STACK_TOP: u64 = 0x8_0000;
/// Page-fault guest: linear address of the first access (not present until the handler
/// maps it), and the RAM page the handler maps there.
pub const PF_LINEAR: u64 = 0x20_0123;
pub const PF_TARGET_PAGE: u64 = 0x9000;

/// Anonymous private mapping used as guest RAM at GPA 0.
pub struct GuestRam {
    ptr: *mut u8,
    size: usize,
}

impl GuestRam {
    pub fn new(size: usize) -> Self {
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected and the
        // result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap guest RAM");
        Self { ptr: ptr.cast(), size }
    }

    pub fn regions(&self) -> Vec<RamRegion> {
        vec![RamRegion { gpa: 0, size: self.size as u64, host_addr: self.ptr }]
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let off = usize::try_from(gpa).unwrap();
        assert!(off + bytes.len() <= self.size, "write outside guest RAM");
        // SAFETY: the range was bounds-checked against the mapping above; the guest is not
        // running while the test writes (all writes happen before `run`).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) };
    }

    pub fn write_u64(&self, gpa: u64, value: u64) {
        self.write(gpa, &value.to_le_bytes());
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        let off = usize::try_from(gpa).unwrap();
        assert!(off + 8 <= self.size, "read outside guest RAM");
        let mut b = [0u8; 8];
        // SAFETY: bounds-checked above; only called while no vCPU runs.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), b.as_mut_ptr(), 8) };
        u64::from_le_bytes(b)
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; every test drops the vCPU/VM
        // (declared after the RAM) before this runs.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

/// The test's device model: a polling-only serial port, test ports, and one MMIO register.
pub struct TestIo {
    pub serial: Vec<u8>,
    /// VM creation time and time of the first serial byte, for the timing line.
    pub t0: Instant,
    pub first_byte: Option<Duration>,
    pub done: Option<u8>,
    pub stop: Option<Arc<AtomicBool>>,
    pub recorded: Vec<Vec<u8>>,
    pub pio_reads: Vec<(u16, usize)>,
    pub mmio_writes: Vec<(u64, Vec<u8>)>,
    pub mmio_reads: Vec<(u64, usize)>,
    /// What MMIO loads return (little-endian, truncated to the access size).
    pub mmio_value: u64,
}

impl TestIo {
    pub fn new(t0: Instant) -> Self {
        Self {
            serial: Vec::new(),
            t0,
            first_byte: None,
            done: None,
            stop: None,
            recorded: Vec::new(),
            pio_reads: Vec::new(),
            mmio_writes: Vec::new(),
            mmio_reads: Vec::new(),
            mmio_value: u64::from_le_bytes(*b"MMIO\0\0\0\0"),
        }
    }

    pub fn serial_str(&self) -> String {
        String::from_utf8_lossy(&self.serial).into_owned()
    }

    pub fn report_timing(&self, name: &str) {
        match self.first_byte {
            Some(d) => eprintln!("timing: {name}: VM creation to first serial byte {:.2} ms", d.as_secs_f64() * 1e3),
            None => eprintln!("timing: {name}: no serial output"),
        }
    }
}

impl ExitHandler for TestIo {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.pio_reads.push((port, data.len()));
        match port {
            // Line status: THR empty (bit 5) and transmitter empty (bit 6).
            SERIAL_LSR => {
                data.fill(0);
                data[0] = 0x60;
            }
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) {
        match port {
            SERIAL_THR => {
                if self.first_byte.is_none() {
                    self.first_byte = Some(self.t0.elapsed());
                }
                self.serial.push(data[0]);
            }
            DONE_PORT => {
                self.done = Some(data[0]);
                if let Some(stop) = &self.stop {
                    stop.store(true, Ordering::Release);
                }
            }
            RECORD_PORT => self.recorded.push(data.to_vec()),
            _ => {}
        }
    }

    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        self.mmio_reads.push((gpa, data.len()));
        let bytes = self.mmio_value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        self.mmio_writes.push((gpa, data.to_vec()));
    }
}

/// Emits a NUL-terminated string print loop: string at `[si/esi/rsi]` (set by the caller),
/// polling the LSR before each byte, writing to the THR. Works in 16, 32 and 64-bit code.
pub fn emit_puts(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut next = a.create_label();
    let mut wait = a.create_label();
    let mut end = a.create_label();
    a.set_label(&mut next)?;
    a.mov(dx, SERIAL_LSR as u32)?;
    a.set_label(&mut wait)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jz(wait)?;
    a.lodsb()?;
    a.test(al, al)?;
    a.jz(end)?;
    a.mov(dx, SERIAL_THR as u32)?;
    a.out(dx, al)?;
    a.jmp(next)?;
    a.set_label(&mut end)?;
    Ok(())
}

/// `out DONE_PORT, 0` followed by `cli; hlt`: KVM stops at the `out` (stop flag), the
/// emulator runs on to the `cli; hlt` (shutdown) before it looks at the flag.
pub fn emit_done(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, DONE_PORT as u32)?;
    a.mov(al, 0)?;
    a.out(dx, al)?;
    a.cli()?;
    a.hlt()
}

pub fn flat_segment(selector: u16, code: bool, long: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl: 0,
        db: !long || !code,
        s: true,
        l: long && code,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// Writes a flat GDT (null, code at 0x08, data at 0x10) to `GDT_ADDR` and returns GDTR.
pub fn write_gdt(ram: &GuestRam, long: bool) -> Table {
    let code = if long { 0x00af_9a00_0000_ffff_u64 } else { 0x00cf_9a00_0000_ffff };
    let data = 0x00cf_9200_0000_ffff_u64;
    ram.write_u64(GDT_ADDR, 0);
    ram.write_u64(GDT_ADDR + 8, code);
    ram.write_u64(GDT_ADDR + 16, data);
    Table { base: GDT_ADDR, limit: 23 }
}

/// State for flat 32-bit protected mode (`long == false`) or 64-bit long mode, based on the
/// vCPU's reset state.
pub fn protected_state(base: CpuState, gdt: Table, long: bool) -> CpuState {
    let mut st = base;
    st.gprs = [0; 16];
    st.gprs[4] = STACK_TOP;
    st.rip = CODE_ADDR;
    st.rflags = 0x2;
    st.gdt = gdt;
    st.idt = Table { base: 0, limit: 0 };
    for (i, s) in st.segs.iter_mut().enumerate() {
        *s = if i == 1 { flat_segment(0x08, true, long) } else { flat_segment(0x10, false, long) };
    }
    // A busy TSS: type 11 (required in IA-32e mode by VM entry, valid in 32-bit mode too).
    st.tr = Segment { base: 0, limit: 0x67, selector: 0, type_: 11, present: true, ..Default::default() };
    if long {
        st.cr0 = 0x8000_0011; // PG | ET | PE
        st.cr3 = PML4_ADDR;
        st.cr4 = 0x20; // PAE
        st.efer = 0x500; // LMA | LME
    } else {
        st.cr0 = 0x11; // ET | PE
        st.cr3 = 0;
        st.cr4 = 0;
        st.efer = 0;
    }
    st
}

/// Real mode with all segments 0 and cs:ip = 0000:7c00, like after a BIOS, based on the
/// vCPU's reset state.
pub fn real_mode_state(base: CpuState) -> CpuState {
    let mut st = base;
    for s in &mut st.segs {
        s.selector = 0;
        s.base = 0;
    }
    st.rip = CODE16_ADDR;
    st.gprs[4] = REAL_MODE_SP;
    st
}

/// Identity-maps GPA 0..2 MiB and maps 2 MiB at `MMIO_GPA` with 2 MiB pages.
pub fn write_page_tables(ram: &GuestRam) {
    const P_RW: u64 = 0x3;
    const PS: u64 = 0x80;
    ram.write_u64(PML4_ADDR, PDPT_ADDR | P_RW);
    ram.write_u64(PDPT_ADDR, PD_LOW_ADDR | P_RW);
    ram.write_u64(PDPT_ADDR + 3 * 8, PD_3G_ADDR | P_RW);
    ram.write_u64(PD_LOW_ADDR, P_RW | PS);
    let idx = (MMIO_GPA - 0xc000_0000) >> 21;
    ram.write_u64(PD_3G_ADDR + idx * 8, MMIO_GPA | P_RW | PS);
}

/// The CPU mode a guest starts in.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Real mode at 0000:7c00 ([`real_mode_state`]).
    Real,
    /// Flat 32-bit protected mode at `CODE_ADDR` with this GDT.
    Protected(Table),
    /// 64-bit long mode at `CODE_ADDR` with this GDT (page tables are the builder's).
    Long(Table),
}

/// A guest in its RAM, ready to run on either accelerator.
pub struct Guest {
    pub ram: GuestRam,
    pub mode: Mode,
    /// IDTR to start with instead of the mode's default.
    pub idt: Option<Table>,
}

impl Guest {
    fn new(mode: Mode, ram: GuestRam) -> Self {
        Self { ram, mode, idt: None }
    }

    /// The initial register state, derived from the vCPU's reset state `base`.
    pub fn initial_state(&self, base: CpuState) -> CpuState {
        let mut st = match self.mode {
            Mode::Real => real_mode_state(base),
            Mode::Protected(gdt) => protected_state(base, gdt, false),
            Mode::Long(gdt) => protected_state(base, gdt, true),
        };
        if let Some(idt) = self.idt {
            st.idt = idt;
        }
        st
    }
}

/// Real mode: prints "real\n" and halts with IF=0.
pub fn real_mode_hello() -> Guest {
    let ram = GuestRam::new(RAM_SIZE);
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(si, STRING_ADDR as u32).unwrap();
    emit_puts(&mut a).unwrap();
    a.hlt().unwrap();
    ram.write(CODE16_ADDR, &a.assemble(CODE16_ADDR).unwrap());
    ram.write(STRING_ADDR, b"real\n\0");
    Guest::new(Mode::Real, ram)
}

pub fn check_real_mode_hello(io: &TestIo) {
    assert_eq!(io.serial_str(), "real\n");
    // One LSR read before each byte plus one before the terminator.
    let lsr_reads = io.pio_reads.iter().filter(|r| r.0 == SERIAL_LSR).count();
    assert_eq!(lsr_reads, 6);
}

/// 32-bit protected mode: reloads data segments from the GDT, computes 1 + ... + 100,
/// prints it in decimal and reports done.
pub fn protected_mode_sum() -> Guest {
    let ram = GuestRam::new(RAM_SIZE);
    let gdt = write_gdt(&ram, false);
    let mut a = CodeAssembler::new(32).unwrap();
    // Reload data segments from the GDT in guest memory.
    a.mov(ax, 0x10).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(es, ax).unwrap();
    a.mov(ss, ax).unwrap();
    // eax = 1 + 2 + ... + 100
    a.xor(eax, eax).unwrap();
    a.mov(ecx, 100).unwrap();
    let mut sum = a.create_label();
    a.set_label(&mut sum).unwrap();
    a.add(eax, ecx).unwrap();
    a.loop_(sum).unwrap();
    // Decimal digits, backwards from BUF_ADDR + 16: "...\n\0".
    a.mov(edi, (BUF_ADDR + 16) as u32).unwrap();
    a.mov(byte_ptr(edi), 0).unwrap();
    a.dec(edi).unwrap();
    a.mov(byte_ptr(edi), b'\n' as u32).unwrap();
    a.mov(ecx, 10).unwrap();
    let mut conv = a.create_label();
    a.set_label(&mut conv).unwrap();
    a.xor(edx, edx).unwrap();
    a.div(ecx).unwrap();
    a.add(dl, b'0' as u32).unwrap();
    a.dec(edi).unwrap();
    a.mov(byte_ptr(edi), dl).unwrap();
    a.test(eax, eax).unwrap();
    a.jnz(conv).unwrap();
    a.mov(esi, edi).unwrap();
    emit_puts(&mut a).unwrap();
    emit_done(&mut a).unwrap();
    ram.write(CODE_ADDR, &a.assemble(CODE_ADDR).unwrap());
    Guest::new(Mode::Protected(gdt), ram)
}

pub fn check_protected_mode_sum(io: &TestIo, after: &CpuState) {
    assert_eq!(io.done, Some(0));
    assert_eq!(io.serial_str(), "5050\n");
    assert_eq!(after.segs[accel::state::seg::DS].selector, 0x10);
    assert_eq!(after.gprs[accel::state::reg::RAX] & 0xff, 0);
}

/// 64-bit long mode: prints a line, does an 8-byte MMIO store and a 4-byte MMIO load whose
/// value it prints, then reports done.
pub fn long_mode_serial_and_mmio() -> Guest {
    let ram = GuestRam::new(RAM_SIZE);
    let gdt = write_gdt(&ram, true);
    write_page_tables(&ram);
    ram.write(STRING_ADDR, b"long mode ok\n\0");
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(esi, STRING_ADDR as u32).unwrap();
    emit_puts(&mut a).unwrap();
    // 8-byte MMIO store, then a 4-byte MMIO load whose value is printed.
    a.mov(rbx, MMIO_GPA).unwrap();
    a.mov(rax, 0x1122_3344_5566_7788_u64).unwrap();
    a.mov(qword_ptr(rbx), rax).unwrap();
    a.mov(eax, dword_ptr(rbx + 8)).unwrap();
    a.mov(edi, BUF_ADDR as u32).unwrap();
    a.mov(dword_ptr(rdi), eax).unwrap();
    a.mov(byte_ptr(rdi + 4), b'\n' as u32).unwrap();
    a.mov(byte_ptr(rdi + 5), 0).unwrap();
    a.mov(esi, edi).unwrap();
    emit_puts(&mut a).unwrap();
    emit_done(&mut a).unwrap();
    ram.write(CODE_ADDR, &a.assemble(CODE_ADDR).unwrap());
    Guest::new(Mode::Long(gdt), ram)
}

pub fn check_long_mode_serial_and_mmio(io: &TestIo, after: &CpuState) {
    assert_eq!(io.done, Some(0));
    assert_eq!(io.serial_str(), "long mode ok\nMMIO\n");
    assert_eq!(io.mmio_writes, vec![(MMIO_GPA, 0x1122_3344_5566_7788_u64.to_le_bytes().to_vec())]);
    assert_eq!(io.mmio_reads, vec![(MMIO_GPA + 8, 4)]);
    // The state read back is still long mode.
    assert!(after.segs[1].l);
    assert_eq!(after.efer & 0x500, 0x500);
    assert_eq!(after.cr3, PML4_ADDR);
}

/// 32-bit protected mode: loads an empty IDT and executes `ud2`; the #UD cannot be
/// delivered, nor the #DF after it, so the CPU triple-faults.
pub fn triple_fault() -> Guest {
    let ram = GuestRam::new(RAM_SIZE);
    let gdt = write_gdt(&ram, false);
    // IDTR image at BUF_ADDR: limit 0, base 0.
    ram.write(BUF_ADDR, &[0; 6]);
    let mut a = CodeAssembler::new(32).unwrap();
    a.lidt(ptr(BUF_ADDR as u32)).unwrap();
    a.ud2().unwrap();
    // Not reached.
    emit_done(&mut a).unwrap();
    ram.write(CODE_ADDR, &a.assemble(CODE_ADDR).unwrap());
    let mut g = Guest::new(Mode::Protected(gdt), ram);
    g.idt = Some(Table { base: 0, limit: 0xffff });
    g
}

/// Real mode: `in` of 1, 2 and 4 bytes from an unclaimed port, each value echoed to the
/// record port, then `rep outsb` of "abc" to the record port; halts with IF=0.
pub fn unclaimed_port_and_string_io() -> Guest {
    let ram = GuestRam::new(RAM_SIZE);
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(dx, UNCLAIMED_PORT as u32).unwrap();
    a.in_(al, dx).unwrap();
    a.mov(dx, RECORD_PORT as u32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(dx, UNCLAIMED_PORT as u32).unwrap();
    a.in_(ax, dx).unwrap();
    a.mov(dx, RECORD_PORT as u32).unwrap();
    a.out(dx, ax).unwrap();
    a.mov(dx, UNCLAIMED_PORT as u32).unwrap();
    a.in_(eax, dx).unwrap();
    a.mov(dx, RECORD_PORT as u32).unwrap();
    a.out(dx, eax).unwrap();
    // String I/O: `rep outsb` of 3 bytes arrives as three 1-byte writes.
    a.mov(si, STRING_ADDR as u32).unwrap();
    a.mov(cx, 3).unwrap();
    a.cld().unwrap();
    a.rep().outsb().unwrap();
    a.hlt().unwrap();
    ram.write(CODE16_ADDR, &a.assemble(CODE16_ADDR).unwrap());
    ram.write(STRING_ADDR, b"abc");
    Guest::new(Mode::Real, ram)
}

pub fn check_unclaimed_port_and_string_io(io: &TestIo) {
    assert_eq!(
        io.recorded,
        vec![vec![0xff], vec![0xff, 0xff], vec![0xff, 0xff, 0xff, 0xff], b"a".to_vec(), b"b".to_vec(), b"c".to_vec(),]
    );
    assert_eq!(io.pio_reads, vec![(UNCLAIMED_PORT, 1), (UNCLAIMED_PORT, 2), (UNCLAIMED_PORT, 4)]);
}

/// 64-bit long mode: `popcnt ebx, ecx` with ecx = 0xf0f0 (rbx = 8 afterwards), then done.
pub fn popcnt() -> Guest {
    let ram = GuestRam::new(RAM_SIZE);
    let gdt = write_gdt(&ram, true);
    write_page_tables(&ram);
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(ecx, 0xf0f0_u32).unwrap();
    a.popcnt(ebx, ecx).unwrap();
    emit_done(&mut a).unwrap();
    ram.write(CODE_ADDR, &a.assemble(CODE_ADDR).unwrap());
    Guest::new(Mode::Long(gdt), ram)
}

pub fn check_popcnt(io: &TestIo, after: &CpuState) {
    assert_eq!(io.done, Some(0));
    assert_eq!(after.gprs[accel::state::reg::RBX], 8);
}

/// A 64-bit interrupt gate (type 0xe, DPL 0, present) to `handler` in code segment 0x08.
fn idt_gate64(handler: u64) -> [u64; 2] {
    let lo = (handler & 0xffff) | (0x08 << 16) | (0x8e_u64 << 40) | (((handler >> 16) & 0xffff) << 48);
    [lo, handler >> 32]
}

/// 64-bit long mode with a #PF handler (IDT in guest memory, 64-bit interrupt gate,
/// loaded with `lidt`). Linear 2 MiB..4 MiB is mapped by a 4 KiB page table whose entries
/// are all not present. The guest loads a dword from `PF_LINEAR`; the handler prints
/// "CR2=<16 hex digits>\n", echoes the error code to the record port, maps the page to
/// `PF_TARGET_PAGE`, `invlpg`s it and returns with `iretq`. The load then completes (its
/// value is echoed to the record port) and the guest prints the string at `PF_LINEAR`,
/// "resumed\n", and reports done.
pub fn long_mode_page_fault() -> Guest {
    const P_RW: u64 = 0x3;
    let ram = GuestRam::new(RAM_SIZE);
    let gdt = write_gdt(&ram, true);
    write_page_tables(&ram);
    // PD entry 1 (linear 2 MiB) -> 4 KiB page table, all entries not present.
    ram.write_u64(PD_LOW_ADDR + 8, PT_2M_ADDR | P_RW);
    ram.write(PT_2M_ADDR, &[0; 4096]);
    let pte_addr = PT_2M_ADDR + ((PF_LINEAR >> 12) & 0x1ff) * 8;
    ram.write(PF_TARGET_PAGE + (PF_LINEAR & 0xfff), b"resumed\n\0");
    ram.write(HEX_ADDR, b"0123456789abcdef");
    ram.write(STRING_ADDR, b"CR2=\0");

    // IDT: vector 14 only.
    let [lo, hi] = idt_gate64(PF_HANDLER_ADDR);
    ram.write_u64(IDT_ADDR + 14 * 16, lo);
    ram.write_u64(IDT_ADDR + 14 * 16 + 8, hi);
    let idt_limit: u16 = 15 * 16 - 1;
    let mut idtr = idt_limit.to_le_bytes().to_vec();
    idtr.extend_from_slice(&IDT_ADDR.to_le_bytes());
    ram.write(IDTR_IMAGE_ADDR, &idtr);

    // The #PF handler.
    let mut h = CodeAssembler::new(64).unwrap();
    h.push(rax).unwrap();
    h.push(rcx).unwrap();
    h.push(rdx).unwrap();
    h.push(rsi).unwrap();
    h.push(rdi).unwrap();
    h.mov(esi, STRING_ADDR as u32).unwrap();
    emit_puts(&mut h).unwrap();
    h.mov(rax, cr2).unwrap();
    h.mov(edi, BUF_ADDR as u32).unwrap();
    h.mov(ecx, 16).unwrap();
    let mut hex = h.create_label();
    h.set_label(&mut hex).unwrap();
    h.rol(rax, 4).unwrap();
    h.mov(edx, eax).unwrap();
    h.and(edx, 0xf).unwrap();
    h.mov(dl, byte_ptr(rdx + HEX_ADDR as i32)).unwrap();
    h.mov(byte_ptr(rdi), dl).unwrap();
    h.inc(rdi).unwrap();
    h.dec(ecx).unwrap();
    h.jnz(hex).unwrap();
    h.mov(byte_ptr(rdi), b'\n' as u32).unwrap();
    h.mov(byte_ptr(rdi + 1), 0).unwrap();
    h.mov(esi, BUF_ADDR as u32).unwrap();
    emit_puts(&mut h).unwrap();
    // Error code, above the five saved registers.
    h.mov(eax, dword_ptr(rsp + 40)).unwrap();
    h.mov(dx, RECORD_PORT as u32).unwrap();
    h.out(dx, eax).unwrap();
    // Fix the mapping and drop the stale translation.
    h.mov(rax, PF_TARGET_PAGE | P_RW).unwrap();
    h.mov(ecx, pte_addr as u32).unwrap();
    h.mov(qword_ptr(rcx), rax).unwrap();
    h.mov(rax, cr2).unwrap();
    h.invlpg(ptr(rax)).unwrap();
    h.pop(rdi).unwrap();
    h.pop(rsi).unwrap();
    h.pop(rdx).unwrap();
    h.pop(rcx).unwrap();
    h.pop(rax).unwrap();
    h.add(rsp, 8).unwrap();
    h.iretq().unwrap();
    ram.write(PF_HANDLER_ADDR, &h.assemble(PF_HANDLER_ADDR).unwrap());

    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(eax, IDTR_IMAGE_ADDR as u32).unwrap();
    a.lidt(ptr(rax)).unwrap();
    a.mov(rbx, PF_LINEAR).unwrap();
    a.mov(ecx, dword_ptr(rbx)).unwrap(); // #PF, then completes after the handler.
    a.mov(eax, ecx).unwrap();
    a.mov(dx, RECORD_PORT as u32).unwrap();
    a.out(dx, eax).unwrap();
    a.mov(rsi, rbx).unwrap();
    emit_puts(&mut a).unwrap();
    emit_done(&mut a).unwrap();
    ram.write(CODE_ADDR, &a.assemble(CODE_ADDR).unwrap());
    Guest::new(Mode::Long(gdt), ram)
}

pub fn check_long_mode_page_fault(g: &Guest, io: &TestIo, after: &CpuState) {
    assert_eq!(io.serial_str(), "CR2=0000000000200123\nresumed\n");
    assert_eq!(
        io.recorded,
        vec![
            // Error code: not present, read, supervisor.
            vec![0, 0, 0, 0],
            b"resu".to_vec(),
        ]
    );
    assert_eq!(io.done, Some(0));
    assert_eq!(after.cr2, PF_LINEAR);
    assert_eq!(after.idt.base, IDT_ADDR);
    assert_eq!(after.idt.limit, 15 * 16 - 1);
    // The handler's stack was unwound completely.
    assert_eq!(after.gprs[accel::state::reg::RSP], STACK_TOP);
    let pte = g.ram.read_u64(PT_2M_ADDR + ((PF_LINEAR >> 12) & 0x1ff) * 8);
    assert_eq!(pte & !0xfff, PF_TARGET_PAGE);
    // The CPU set the accessed bit when the load went through the new mapping.
    assert_eq!(pte & 0x21, 0x21);
}

/// Real mode: prints "int10\n" one character at a time through `int 0x10` (ah = 0x0e,
/// BIOS teletype style) to a handler at `SOFTINT_SEG:SOFTINT_OFF` found through IVT entry
/// 0x10. The handler echoes its CS to the record port before each character and returns
/// with `iret`; at the end the guest echoes SP (balanced stack) and halts with IF=0.
pub fn real_mode_soft_int() -> Guest {
    let ram = GuestRam::new(RAM_SIZE);
    let mut ivt = SOFTINT_OFF.to_le_bytes().to_vec();
    ivt.extend_from_slice(&SOFTINT_SEG.to_le_bytes());
    ram.write(0x10 * 4, &ivt);
    ram.write(STRING_ADDR, b"int10\n\0");

    let mut h = CodeAssembler::new(16).unwrap();
    let mut wait = h.create_label();
    let mut out = h.create_label();
    h.push(dx).unwrap();
    h.push(ax).unwrap();
    h.cmp(ah, 0x0e).unwrap();
    h.jne(out).unwrap();
    h.mov(dx, SERIAL_LSR as u32).unwrap();
    h.set_label(&mut wait).unwrap();
    h.in_(al, dx).unwrap();
    h.test(al, 0x20).unwrap();
    h.jz(wait).unwrap();
    h.mov(ax, cs).unwrap();
    h.mov(dx, RECORD_PORT as u32).unwrap();
    h.out(dx, ax).unwrap();
    h.pop(ax).unwrap();
    h.push(ax).unwrap();
    h.mov(dx, SERIAL_THR as u32).unwrap();
    h.out(dx, al).unwrap();
    h.set_label(&mut out).unwrap();
    h.pop(ax).unwrap();
    h.pop(dx).unwrap();
    h.iret().unwrap();
    let handler_linear = (u64::from(SOFTINT_SEG) << 4) + u64::from(SOFTINT_OFF);
    ram.write(handler_linear, &h.assemble(u64::from(SOFTINT_OFF)).unwrap());

    let mut a = CodeAssembler::new(16).unwrap();
    let mut next = a.create_label();
    let mut end = a.create_label();
    a.mov(si, STRING_ADDR as u32).unwrap();
    a.cld().unwrap();
    a.set_label(&mut next).unwrap();
    a.lodsb().unwrap();
    a.test(al, al).unwrap();
    a.jz(end).unwrap();
    a.mov(ah, 0x0e).unwrap();
    a.int(0x10).unwrap();
    a.jmp(next).unwrap();
    a.set_label(&mut end).unwrap();
    a.mov(ax, sp).unwrap();
    a.mov(dx, RECORD_PORT as u32).unwrap();
    a.out(dx, ax).unwrap();
    a.hlt().unwrap();
    ram.write(CODE16_ADDR, &a.assemble(CODE16_ADDR).unwrap());
    Guest::new(Mode::Real, ram)
}

pub fn check_real_mode_soft_int(io: &TestIo, after: &CpuState) {
    assert_eq!(io.serial_str(), "int10\n");
    let mut expected = vec![SOFTINT_SEG.to_le_bytes().to_vec(); 6];
    expected.push((REAL_MODE_SP as u16).to_le_bytes().to_vec());
    assert_eq!(io.recorded, expected);
    assert_eq!(after.segs[accel::state::seg::CS].selector, 0);
    assert_eq!(after.gprs[accel::state::reg::RSP] & 0xffff, REAL_MODE_SP);
}
