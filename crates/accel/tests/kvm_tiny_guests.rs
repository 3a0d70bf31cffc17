//! Tiny guests on the KVM accelerator: real mode, 32-bit protected mode, 64-bit long mode,
//! a triple fault, and port/MMIO exits.
//!
//! Guest code is assembled at test time with iced-x86's `code_asm`; guest RAM is a 2 MiB
//! anonymous mapping. Each test prints "skipping: /dev/kvm unavailable" and passes when
//! `KvmVm::available()` is false.
//!
//! Guests end either with `hlt` on a VM created without the in-kernel irqchip (then `hlt`
//! leaves `KVM_RUN` as `VcpuExit::Hlt`), or, on the production configuration with irqchip
//! (where KVM handles `hlt` in the kernel and never reports it), by writing to the test's
//! "done" port 0x501, whose handler raises the vCPU's stop flag so `run` returns
//! `VcpuExit::Interrupted`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use accel::kvm::{KvmVm, KvmVmOptions};
use accel::{CpuState, ExitHandler, RamRegion, Segment, Table, Vcpu, VcpuExit};
use iced_x86::code_asm::*;

const RAM_SIZE: usize = 2 << 20;
const SERIAL_THR: u16 = 0x3f8;
const SERIAL_LSR: u16 = 0x3fd;
/// Test port: a write ends the guest (value 0 = success).
const DONE_PORT: u16 = 0x501;
/// Test port: writes are recorded verbatim.
const RECORD_PORT: u16 = 0x502;
/// A port nobody claims.
const UNCLAIMED_PORT: u16 = 0x1234;
/// MMIO address used by the long-mode guest (not RAM).
const MMIO_GPA: u64 = 0xd000_0000;

const GDT_ADDR: u64 = 0x500;
const PML4_ADDR: u64 = 0x1000;
const PDPT_ADDR: u64 = 0x2000;
const PD_LOW_ADDR: u64 = 0x3000;
const PD_3G_ADDR: u64 = 0x4000;
const STRING_ADDR: u64 = 0x7e00;
const BUF_ADDR: u64 = 0x7f00;
const CODE16_ADDR: u64 = 0x7c00;
const CODE_ADDR: u64 = 0x1_0000;
const STACK_TOP: u64 = 0x8_0000;

/// Anonymous private mapping used as guest RAM at GPA 0.
struct GuestRam {
    ptr: *mut u8,
    size: usize,
}

impl GuestRam {
    fn new(size: usize) -> Self {
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
        Self {
            ptr: ptr.cast(),
            size,
        }
    }

    fn regions(&self) -> Vec<RamRegion> {
        vec![RamRegion {
            gpa: 0,
            size: self.size as u64,
            host_addr: self.ptr,
        }]
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        let off = usize::try_from(gpa).unwrap();
        assert!(off + bytes.len() <= self.size, "write outside guest RAM");
        // SAFETY: the range was bounds-checked against the mapping above; the guest is not
        // running while the test writes (all writes happen before `run`).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) };
    }

    fn write_u64(&self, gpa: u64, value: u64) {
        self.write(gpa, &value.to_le_bytes());
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; every test drops the VM (declared
        // after the RAM) before this runs.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

/// The test's device model: a polling-only serial port, test ports, and one MMIO register.
struct TestIo {
    serial: Vec<u8>,
    /// VM creation time and time of the first serial byte, for the timing line.
    t0: Instant,
    first_byte: Option<Duration>,
    done: Option<u8>,
    stop: Option<Arc<AtomicBool>>,
    recorded: Vec<Vec<u8>>,
    pio_reads: Vec<(u16, usize)>,
    mmio_writes: Vec<(u64, Vec<u8>)>,
    mmio_reads: Vec<(u64, usize)>,
    /// What MMIO loads return (little-endian, truncated to the access size).
    mmio_value: u64,
}

impl TestIo {
    fn new(t0: Instant) -> Self {
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

    fn serial_str(&self) -> String {
        String::from_utf8_lossy(&self.serial).into_owned()
    }

    fn report_timing(&self, name: &str) {
        match self.first_byte {
            Some(d) => eprintln!(
                "timing: {name}: VM creation to first serial byte {:.2} ms",
                d.as_secs_f64() * 1e3
            ),
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

/// True (after printing the skip line) when the test cannot run here.
fn skip() -> bool {
    if KvmVm::available() {
        false
    } else {
        println!("skipping: /dev/kvm unavailable");
        true
    }
}

/// Emits a NUL-terminated string print loop: string at `[si/esi/rsi]` (set by the caller),
/// polling the LSR before each byte, writing to the THR. Works in 16, 32 and 64-bit code.
fn emit_puts(a: &mut CodeAssembler) -> Result<(), IcedError> {
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

/// `out DONE_PORT, 0` followed by `hlt` (never reached once the stop flag works).
fn emit_done(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, DONE_PORT as u32)?;
    a.mov(al, 0)?;
    a.out(dx, al)?;
    a.hlt()
}

fn flat_segment(selector: u16, code: bool, long: bool) -> Segment {
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
fn write_gdt(ram: &GuestRam, long: bool) -> Table {
    let code = if long {
        0x00af_9a00_0000_ffff_u64
    } else {
        0x00cf_9a00_0000_ffff
    };
    let data = 0x00cf_9200_0000_ffff_u64;
    ram.write_u64(GDT_ADDR, 0);
    ram.write_u64(GDT_ADDR + 8, code);
    ram.write_u64(GDT_ADDR + 16, data);
    Table {
        base: GDT_ADDR,
        limit: 23,
    }
}

/// State for flat 32-bit protected mode (`long == false`) or 64-bit long mode, based on the
/// vCPU's reset state.
fn protected_state(base: CpuState, gdt: Table, long: bool) -> CpuState {
    let mut st = base;
    st.gprs = [0; 16];
    st.gprs[4] = STACK_TOP;
    st.rip = CODE_ADDR;
    st.rflags = 0x2;
    st.gdt = gdt;
    st.idt = Table { base: 0, limit: 0 };
    for (i, s) in st.segs.iter_mut().enumerate() {
        *s = if i == 1 {
            flat_segment(0x08, true, long)
        } else {
            flat_segment(0x10, false, long)
        };
    }
    // A busy TSS: type 11 (required in IA-32e mode by VM entry, valid in 32-bit mode too).
    st.tr = Segment {
        base: 0,
        limit: 0x67,
        selector: 0,
        type_: 11,
        present: true,
        ..Default::default()
    };
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

/// Identity-maps GPA 0..2 MiB and maps 2 MiB at `MMIO_GPA` with 2 MiB pages.
fn write_page_tables(ram: &GuestRam) {
    const P_RW: u64 = 0x3;
    const PS: u64 = 0x80;
    ram.write_u64(PML4_ADDR, PDPT_ADDR | P_RW);
    ram.write_u64(PDPT_ADDR, PD_LOW_ADDR | P_RW);
    ram.write_u64(PDPT_ADDR + 3 * 8, PD_3G_ADDR | P_RW);
    ram.write_u64(PD_LOW_ADDR, P_RW | PS);
    let idx = (MMIO_GPA - 0xc000_0000) >> 21;
    ram.write_u64(PD_3G_ADDR + idx * 8, MMIO_GPA | P_RW | PS);
}

#[test]
fn real_mode_hello_hlt() {
    if skip() {
        return;
    }
    let ram = GuestRam::new(RAM_SIZE);
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(si, STRING_ADDR as u32).unwrap();
    emit_puts(&mut a).unwrap();
    a.hlt().unwrap();
    ram.write(CODE16_ADDR, &a.assemble(CODE16_ADDR).unwrap());
    ram.write(STRING_ADDR, b"real\n\0");

    let t0 = Instant::now();
    let vm = KvmVm::new_with_options(&ram.regions(), KvmVmOptions { irqchip: false }).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    // Start from KVM's reset state (real mode) with cs:ip = 0000:7c00, like after a BIOS.
    let mut st = vcpu.state().unwrap();
    for s in &mut st.segs {
        s.selector = 0;
        s.base = 0;
    }
    st.rip = CODE16_ADDR;
    st.gprs[4] = 0x7000;
    vcpu.set_state(&st).unwrap();

    let mut io = TestIo::new(t0);
    let exit = vcpu.run(&mut io).unwrap();
    io.report_timing("real mode");
    eprintln!(
        "total real-mode run: {:.2} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(exit, VcpuExit::Hlt);
    assert_eq!(io.serial_str(), "real\n");
    // One LSR read before each byte plus one before the terminator.
    let lsr_reads = io.pio_reads.iter().filter(|r| r.0 == SERIAL_LSR).count();
    assert_eq!(lsr_reads, 6);
}

#[test]
fn protected_mode_sum_irqchip() {
    if skip() {
        return;
    }
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

    let t0 = Instant::now();
    let vm = KvmVm::new(&ram.regions()).unwrap();
    assert!(vm.has_irqchip());
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let st = protected_state(vcpu.state().unwrap(), gdt, false);
    vcpu.set_state(&st).unwrap();

    let mut io = TestIo::new(t0);
    io.stop = Some(vcpu.stop_flag());
    let exit = vcpu.run(&mut io).unwrap();
    io.report_timing("32-bit protected mode");
    assert_eq!(exit, VcpuExit::Interrupted);
    assert_eq!(io.done, Some(0));
    assert_eq!(io.serial_str(), "5050\n");
    let after = vcpu.state().unwrap();
    assert_eq!(after.segs[accel::state::seg::DS].selector, 0x10);
    assert_eq!(after.gprs[accel::state::reg::RAX] & 0xff, 0);
}

#[test]
fn long_mode_serial_and_mmio() {
    if skip() {
        return;
    }
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

    let t0 = Instant::now();
    let vm = KvmVm::new(&ram.regions()).unwrap();
    let t_vm = t0.elapsed();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let t_vcpu = t0.elapsed();
    eprintln!(
        "timing: 64-bit long mode: KvmVm::new {:.2} ms, +create_vcpu {:.2} ms",
        t_vm.as_secs_f64() * 1e3,
        (t_vcpu - t_vm).as_secs_f64() * 1e3
    );
    let st = protected_state(vcpu.state().unwrap(), gdt, true);
    vcpu.set_state(&st).unwrap();

    let mut io = TestIo::new(t0);
    io.stop = Some(vcpu.stop_flag());
    let exit = vcpu.run(&mut io).unwrap();
    io.report_timing("64-bit long mode");
    assert_eq!(exit, VcpuExit::Interrupted);
    assert_eq!(io.done, Some(0));
    assert_eq!(io.serial_str(), "long mode ok\nMMIO\n");
    assert_eq!(
        io.mmio_writes,
        vec![(MMIO_GPA, 0x1122_3344_5566_7788_u64.to_le_bytes().to_vec())]
    );
    assert_eq!(io.mmio_reads, vec![(MMIO_GPA + 8, 4)]);

    // The state read back is still long mode.
    let after = vcpu.state().unwrap();
    assert!(after.segs[1].l);
    assert_eq!(after.efer & 0x500, 0x500);
    assert_eq!(after.cr3, PML4_ADDR);
}

#[test]
fn triple_fault_is_reset() {
    if skip() {
        return;
    }
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

    let vm = KvmVm::new(&ram.regions()).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut st = protected_state(vcpu.state().unwrap(), gdt, false);
    st.idt = Table {
        base: 0,
        limit: 0xffff,
    };
    vcpu.set_state(&st).unwrap();

    let mut io = TestIo::new(Instant::now());
    io.stop = Some(vcpu.stop_flag());
    let exit = vcpu.run(&mut io).unwrap();
    assert_eq!(exit, VcpuExit::Reset("triple fault".into()));
    assert_eq!(io.done, None);
}

#[test]
fn unclaimed_port_reads_handler_value() {
    if skip() {
        return;
    }
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

    let vm = KvmVm::new_with_options(&ram.regions(), KvmVmOptions { irqchip: false }).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut st = vcpu.state().unwrap();
    for s in &mut st.segs {
        s.selector = 0;
        s.base = 0;
    }
    st.rip = CODE16_ADDR;
    vcpu.set_state(&st).unwrap();

    let mut io = TestIo::new(Instant::now());
    let exit = vcpu.run(&mut io).unwrap();
    assert_eq!(exit, VcpuExit::Hlt);
    assert_eq!(
        io.recorded,
        vec![
            vec![0xff],
            vec![0xff, 0xff],
            vec![0xff, 0xff, 0xff, 0xff],
            b"a".to_vec(),
            b"b".to_vec(),
            b"c".to_vec(),
        ]
    );
    assert_eq!(
        io.pio_reads,
        vec![
            (UNCLAIMED_PORT, 1),
            (UNCLAIMED_PORT, 2),
            (UNCLAIMED_PORT, 4)
        ]
    );
}

#[test]
fn state_round_trip_and_irq_line() {
    if skip() {
        return;
    }
    let ram = GuestRam::new(RAM_SIZE);
    let gdt = write_gdt(&ram, true);
    let vm = KvmVm::new(&ram.regions()).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut st = protected_state(vcpu.state().unwrap(), gdt, true);
    for (i, g) in st.gprs.iter_mut().enumerate() {
        *g = 0x0101_0101_0101_0101 * (i as u64 + 1);
    }
    st.cr2 = 0xdead_b000;
    st.cr8 = 0x5;
    vcpu.set_state(&st).unwrap();
    let back = vcpu.state().unwrap();
    assert_eq!(back.gprs, st.gprs);
    assert_eq!(back.rip, st.rip);
    assert_eq!(back.rflags, st.rflags);
    assert_eq!(back.cr0, st.cr0);
    assert_eq!(back.cr2, st.cr2);
    assert_eq!(back.cr3, st.cr3);
    assert_eq!(back.cr4, st.cr4);
    assert_eq!(back.cr8, st.cr8);
    assert_eq!(back.efer, st.efer);
    assert_eq!(back.gdt, st.gdt);
    assert_eq!(back.idt, st.idt);
    assert_eq!(back.segs[1].selector, 0x08);
    assert!(back.segs[1].l);
    assert_eq!(back.segs[3].selector, 0x10);

    vm.set_irq_line(4, true).unwrap();
    vm.set_irq_line(4, false).unwrap();
    assert!(vm.set_irq_line(24, true).is_err());
    let no_chip = KvmVm::new_with_options(&[], KvmVmOptions { irqchip: false }).unwrap();
    assert!(no_chip.set_irq_line(4, true).is_err());
}

/// A CPL0 instruction that the PVM backend's kernel-mode emulator refuses (`popcnt`): on
/// VT-x/AMD-V hosts it runs (the guest reports done); on PVM hosts `run` must fail with
/// `Error::Internal` carrying the PVM hint, never panic.
#[test]
fn refused_instruction_is_an_error_not_a_panic() {
    if skip() {
        return;
    }
    let ram = GuestRam::new(RAM_SIZE);
    let gdt = write_gdt(&ram, true);
    write_page_tables(&ram);
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(ecx, 0xf0f0_u32).unwrap();
    a.popcnt(eax, ecx).unwrap();
    emit_done(&mut a).unwrap();
    ram.write(CODE_ADDR, &a.assemble(CODE_ADDR).unwrap());

    let vm = KvmVm::new(&ram.regions()).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let st = protected_state(vcpu.state().unwrap(), gdt, true);
    vcpu.set_state(&st).unwrap();
    let mut io = TestIo::new(Instant::now());
    io.stop = Some(vcpu.stop_flag());
    match vcpu.run(&mut io) {
        Ok(exit) => {
            assert_eq!(exit, VcpuExit::Interrupted);
            assert_eq!(io.done, Some(0));
            assert_eq!(vcpu.state().unwrap().gprs[0] & 0xff, 8);
        }
        Err(accel::Error::Internal(msg)) => {
            eprintln!("refused instruction: {msg}");
            assert!(vm.is_pvm(), "internal error on a non-PVM host: {msg}");
            assert!(msg.contains("PVM"), "{msg}");
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}
