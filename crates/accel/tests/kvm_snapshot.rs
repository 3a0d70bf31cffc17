//! Snapshot and restore on the KVM accelerator with a tiny 64-bit guest.
//!
//! The guest programs the in-kernel devices (PIC mask, PIT channel 0, an I/O APIC
//! redirection entry, the LAPIC timer LVT) and an MSR (KERNEL_GS_BASE with `wrmsr`), then
//! counts to [`TOTAL`] in RBX and in a memory word, writing each count to the record port
//! and adding a byte read from the test's ticket port (a counter) to R10.
//! At the end it reads all of that back (`in`, MMIO loads, `rdmsr`) to the record port,
//! prints "end\n" on the serial port and reports done.
//!
//! The test stops it inside the [`STOP_AT`]-th ticket read (so `run` must complete that `in`
//! before the snapshot), saves the vCPU and VM state, sends them
//! through serde, copies guest RAM, drops the original VM and its RAM, and restores into a
//! new `KvmVm` + vCPU over the copy. The restored guest must continue at count
//! `STOP_AT + 1` and produce exactly what an uninterrupted run produces, including the
//! device and MSR read-backs (which only come out right if the irqchip, PIT, LAPIC and MSRs
//! were restored). The same is done on a VM without the in-kernel irqchip.
//!
//! Skipped (with a printed line) only where /dev/kvm is unavailable.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use accel::kvm::{KvmVcpu, KvmVcpuState, KvmVm, KvmVmOptions, KvmVmState, Raw};
use accel::{ExitHandler, Vcpu, VcpuExit};
use common::*;
use iced_x86::code_asm::*;

/// How far the guest counts.
const TOTAL: u32 = 12;
/// After how many counts the first run is stopped and snapshotted.
const STOP_AT: u32 = 5;
/// GPA of the guest's memory counter.
const COUNTER_ADDR: u64 = 0x7e80;
/// KERNEL_GS_BASE and the value the guest writes to it.
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const KGS_VALUE: u64 = 0xffff_8123_4567_89a8; // canonical, or wrmsr faults
const IOAPIC_BASE: u64 = 0xfec0_0000;
const LAPIC_BASE: u64 = 0xfee0_0000;
/// I/O APIC redirection entry 2 (low dword): masked, vector 0xa5.
const IOAPIC_REDIR2: u32 = 0x0001_00a5;
/// LAPIC LVT timer: masked, vector 0xa6.
const LVT_TIMER: u32 = 0x0001_00a6;
/// PIT channel 0: lobyte/hibyte, mode 2, binary (control word and read-back status bits 5:0).
const PIT_MODE: u32 = 0x34;
const PIC_MASTER_MASK: u32 = 0xfb;
/// Test port whose reads return `TICKET_BASE` + 1, + 2, + 3, ... (one byte).
const TICKET_PORT: u16 = 0x503;
/// Keeps a ticket different from the count that RAX holds before the `in`.
const TICKET_BASE: u8 = 0x40;

fn skip() -> bool {
    if KvmVm::available() {
        false
    } else {
        println!("skipping: /dev/kvm unavailable");
        true
    }
}

/// Builds the counting guest (see the file docs).
fn counting_guest() -> Guest {
    const P_RW_PCD_PS: u64 = 0x3 | 0x10 | 0x80;
    let ram = GuestRam::new(RAM_SIZE);
    let gdt = write_gdt(&ram, true);
    write_page_tables(&ram);
    // 2 MiB pages for the I/O APIC and the LAPIC (PD_3G covers 3 GiB..4 GiB).
    for base in [IOAPIC_BASE, LAPIC_BASE] {
        ram.write_u64(PD_3G_ADDR + ((base - 0xc000_0000) >> 21) * 8, base | P_RW_PCD_PS);
    }
    ram.write(STRING_ADDR, b"end\n\0");

    let mut a = CodeAssembler::new(64).unwrap();
    let record32 = |a: &mut CodeAssembler| {
        a.mov(dx, RECORD_PORT as u32).unwrap();
        a.out(dx, eax).unwrap();
    };
    // In-kernel devices.
    a.mov(al, PIC_MASTER_MASK).unwrap();
    a.out(0x21, al).unwrap();
    a.mov(al, 0xff).unwrap();
    a.out(0xa1, al).unwrap();
    a.mov(al, PIT_MODE).unwrap();
    a.out(0x43, al).unwrap();
    a.mov(al, 0x34).unwrap();
    a.out(0x40, al).unwrap();
    a.mov(al, 0x12).unwrap();
    a.out(0x40, al).unwrap();
    a.mov(ebx, IOAPIC_BASE as u32).unwrap();
    a.mov(dword_ptr(rbx), 0x14).unwrap(); // IOREGSEL: redirection entry 2, low dword
    a.mov(dword_ptr(rbx + 0x10), IOAPIC_REDIR2).unwrap();
    a.mov(ebx, LAPIC_BASE as u32).unwrap();
    a.mov(dword_ptr(rbx + 0x320), LVT_TIMER).unwrap();
    a.mov(ecx, MSR_KERNEL_GS_BASE).unwrap();
    a.mov(eax, KGS_VALUE as u32).unwrap();
    a.mov(edx, (KGS_VALUE >> 32) as u32).unwrap();
    a.wrmsr().unwrap();
    // Count.
    a.xor(ebx, ebx).unwrap();
    a.xor(r10d, r10d).unwrap();
    a.mov(qword_ptr(COUNTER_ADDR), 0).unwrap();
    let mut count = a.create_label();
    a.set_label(&mut count).unwrap();
    a.inc(rbx).unwrap();
    a.inc(qword_ptr(COUNTER_ADDR)).unwrap();
    a.mov(eax, ebx).unwrap();
    record32(&mut a);
    a.mov(dx, TICKET_PORT as u32).unwrap();
    a.in_(al, dx).unwrap();
    a.movzx(eax, al).unwrap();
    a.add(r10, rax).unwrap();
    a.cmp(rbx, TOTAL as i32).unwrap();
    a.jne(count).unwrap();
    // Read everything back (RBX keeps the count; R8/R9 are scratch).
    a.xor(eax, eax).unwrap();
    a.in_(al, 0x21).unwrap();
    record32(&mut a);
    a.mov(al, 0xe2).unwrap(); // PIT read-back: status of channel 0
    a.out(0x43, al).unwrap();
    a.xor(eax, eax).unwrap();
    a.in_(al, 0x40).unwrap();
    a.and(eax, 0x3f).unwrap();
    record32(&mut a);
    a.mov(r8d, IOAPIC_BASE as u32).unwrap();
    a.mov(dword_ptr(r8), 0x14).unwrap();
    a.mov(eax, dword_ptr(r8 + 0x10)).unwrap();
    record32(&mut a);
    a.mov(r8d, LAPIC_BASE as u32).unwrap();
    a.mov(eax, dword_ptr(r8 + 0x320)).unwrap();
    record32(&mut a);
    a.mov(ecx, MSR_KERNEL_GS_BASE).unwrap();
    a.rdmsr().unwrap();
    a.mov(r9d, eax).unwrap();
    a.mov(eax, edx).unwrap();
    record32(&mut a);
    a.mov(eax, r9d).unwrap();
    record32(&mut a);
    a.mov(rax, qword_ptr(COUNTER_ADDR)).unwrap();
    record32(&mut a);
    a.mov(rax, r10).unwrap();
    record32(&mut a);
    a.mov(esi, STRING_ADDR as u32).unwrap();
    emit_puts(&mut a).unwrap();
    emit_done(&mut a).unwrap();
    ram.write(CODE_ADDR, &a.assemble(CODE_ADDR).unwrap());
    Guest { ram, mode: Mode::Long(gdt), idt: None }
}

/// [`TestIo`] plus the ticket port; raises the stop flag inside the `stop_after`-th ticket
/// read. The ticket counter is device state: a restored VM continues with the saved one.
struct TicketIo {
    io: TestIo,
    tickets: u8,
    stop_after: Option<u8>,
    stop: Arc<AtomicBool>,
}

impl TicketIo {
    fn new(vcpu: &KvmVcpu, tickets: u8, stop_after: Option<u8>) -> Self {
        let mut io = TestIo::new(Instant::now());
        io.stop = Some(vcpu.stop_flag());
        Self { io, tickets, stop_after, stop: vcpu.stop_flag() }
    }
}

impl ExitHandler for TicketIo {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if port != TICKET_PORT {
            return self.io.pio_read(port, data);
        }
        self.tickets += 1;
        data.fill(0);
        data[0] = TICKET_BASE + self.tickets;
        if Some(self.tickets) == self.stop_after {
            self.stop.store(true, Ordering::Release);
        }
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.io.pio_write(port, data);
    }

    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        self.io.mmio_read(gpa, data);
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        self.io.mmio_write(gpa, data);
    }
}

/// Record-port writes as u32 values.
fn records(io: &TestIo) -> Vec<u32> {
    io.recorded.iter().map(|r| u32::from_le_bytes(r.as_slice().try_into().unwrap())).collect()
}

/// What one run of the guest left behind.
struct Outcome {
    records: Vec<u32>,
    serial: String,
    rbx: u64,
    counter: u64,
}

fn new_vm(g: &GuestRam, irqchip: bool) -> KvmVm {
    KvmVm::new_with_options(&g.regions(), KvmVmOptions { irqchip }).unwrap()
}

/// Runs `vcpu` until the guest reports done; the ticket port starts after `tickets`.
fn run_to_done(vcpu: &mut KvmVcpu, tickets: u8) -> TestIo {
    let mut t = TicketIo::new(vcpu, tickets, None);
    let exit = vcpu.run(&mut t).unwrap();
    let io = t.io;
    assert_eq!(exit, VcpuExit::Interrupted, "records {:x?}, state {:x?}", records(&io), vcpu.state().unwrap());
    assert_eq!(io.done, Some(0), "guest did not finish; serial {:?}", io.serial_str());
    io
}

/// The guest run without interruption.
fn reference_run(irqchip: bool) -> Outcome {
    let g = counting_guest();
    let vm = new_vm(&g.ram, irqchip);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let st = g.initial_state(vcpu.state().unwrap());
    vcpu.set_state(&st).unwrap();
    let io = run_to_done(&mut vcpu, 0);
    let rbx_value = vcpu.state().unwrap().gprs[accel::state::reg::RBX];
    Outcome { records: records(&io), serial: io.serial_str(), rbx: rbx_value, counter: g.ram.read_u64(COUNTER_ADDR) }
}

/// A copy of all of `ram` in a new mapping.
fn copy_ram(ram: &GuestRam) -> GuestRam {
    let copy = GuestRam::new(RAM_SIZE);
    let src = ram.regions()[0].host_addr;
    // SAFETY: `src` is the start of `ram`'s live RAM_SIZE-byte mapping, which no vCPU is
    // running on now; the slice only lives for the `write` call, which copies it into the
    // separate mapping `copy`.
    let bytes = unsafe { std::slice::from_raw_parts(src, RAM_SIZE) };
    copy.write(0, bytes);
    copy
}

/// Stops the guest after `STOP_AT` counts, snapshots it, restores into a new VM over a copy
/// of the RAM and runs that to the end; returns the combined outcome and both states.
fn snapshot_run(irqchip: bool) -> (Outcome, KvmVcpuState, KvmVmState) {
    let g = counting_guest();
    let vm = new_vm(&g.ram, irqchip);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let st = g.initial_state(vcpu.state().unwrap());
    vcpu.set_state(&st).unwrap();

    let mut first = TicketIo::new(&vcpu, 0, Some(STOP_AT as u8));
    assert_eq!(vcpu.run(&mut first).unwrap(), VcpuExit::Interrupted);
    assert_eq!(records(&first.io), (1..=STOP_AT).collect::<Vec<_>>());
    assert_eq!(first.io.done, None);
    assert_eq!(first.tickets, STOP_AT as u8);

    let t = Instant::now();
    let vcpu_state = vcpu.save_state().unwrap();
    let vm_state = vm.save_state().unwrap();
    eprintln!("irqchip={irqchip}: save_state (vCPU + VM) {:.3} ms", t.elapsed().as_secs_f64() * 1e3);
    eprintln!("irqchip={irqchip}: vCPU skipped: {:#?}", vcpu_state.skipped);
    eprintln!("irqchip={irqchip}: VM skipped: {:#?}", vm_state.skipped);
    eprintln!(
        "irqchip={irqchip}: {} MSRs saved: {:x?}",
        vcpu_state.msrs.len(),
        vcpu_state.msrs.iter().map(|m| m.index).collect::<Vec<_>>()
    );

    // The run stopped inside the STOP_AT-th ticket `in`, which `run` completed: AL holds the
    // ticket and rip is past the `in`.
    assert_eq!(vcpu_state.regs.0.rbx, u64::from(STOP_AT));
    assert_eq!(vcpu_state.regs.0.rax, u64::from(TICKET_BASE) + u64::from(STOP_AT));
    assert_eq!(g.ram.read_u64(COUNTER_ADDR), u64::from(STOP_AT));
    assert_eq!(vcpu_state.msr(MSR_KERNEL_GS_BASE), Some(KGS_VALUE), "guest's wrmsr not in the saved MSRs");
    for msr in [0x10, 0x1b, 0x174, 0x175, 0x176, 0x1a0, 0x277, 0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084] {
        let saved = vcpu_state.msr(msr).is_some();
        let skipped = vcpu_state.skipped.iter().any(|s| s.item == format!("MSR {msr:#x}"));
        assert!(saved || skipped, "MSR {msr:#x} neither saved nor reported skipped");
        assert!(saved, "MSR {msr:#x} is not readable on this host");
    }
    assert_eq!(vcpu_state.vcpu_id, 0);
    assert!(!vcpu_state.cpuid.is_empty());
    assert_eq!(vcpu_state.lapic.is_some(), irqchip);
    assert_eq!(vm_state.irqchip, irqchip);
    assert_eq!(vm_state.pic_master.is_some(), irqchip);
    assert_eq!(vm_state.ioapic.is_some(), irqchip);
    assert_eq!(vm_state.pit.is_some(), irqchip);
    if !irqchip {
        for item in ["KVM_GET_LAPIC", "KVM_GET_IRQCHIP (PIC master)", "KVM_GET_PIT2"] {
            assert!(
                vcpu_state.skipped.iter().chain(&vm_state.skipped).any(|s| s.item == item),
                "{item} not reported skipped"
            );
        }
    }

    // Through serde and back.
    let vcpu_state2: KvmVcpuState = value::round_trip(&vcpu_state);
    let vm_state2: KvmVmState = value::round_trip(&vm_state);
    assert_eq!(vcpu_state2, vcpu_state);
    assert_eq!(vm_state2, vm_state);

    // A new VM over a copy of the RAM; the original is gone before the copy runs.
    let ram2 = copy_ram(&g.ram);
    drop(vcpu);
    drop(vm);
    drop(g);
    let vm2 = new_vm(&ram2, irqchip);
    let t = Instant::now();
    vm2.restore_state(&vm_state2).unwrap();
    let mut vcpu2 = vm2.create_vcpu(0).unwrap();
    vcpu2.restore_state(&vcpu_state2).unwrap();
    eprintln!("irqchip={irqchip}: restore (VM + new vCPU) {:.3} ms", t.elapsed().as_secs_f64() * 1e3);

    check_restored(&vcpu2, &vcpu_state, &vm2, &vm_state);

    let second = run_to_done(&mut vcpu2, first.tickets);
    let second_records = records(&second);
    // The counter continues where it stopped, not from 0.
    assert_eq!(second_records.first(), Some(&(STOP_AT + 1)), "{second_records:x?}");
    let mut all = records(&first.io);
    all.extend(second_records);
    let rbx_value = vcpu2.state().unwrap().gprs[accel::state::reg::RBX];
    let outcome =
        Outcome { records: all, serial: second.serial_str(), rbx: rbx_value, counter: ram2.read_u64(COUNTER_ADDR) };
    (outcome, vcpu_state, vm_state)
}

/// The restored vCPU and VM read back what was saved (except what moves with time).
fn check_restored(vcpu: &KvmVcpu, saved: &KvmVcpuState, vm: &KvmVm, saved_vm: &KvmVmState) {
    let back = vcpu.save_state().unwrap();
    assert_eq!(back.regs, saved.regs);
    assert_eq!(back.sregs, saved.sregs);
    assert_eq!(back.xsave, saved.xsave);
    assert_eq!(back.fpu, saved.fpu);
    assert_eq!(back.xcrs, saved.xcrs);
    assert_eq!(back.debug_regs, saved.debug_regs);
    assert_eq!(back.lapic, saved.lapic);
    assert_eq!(back.mp_state, saved.mp_state);
    assert_eq!(back.vcpu_events, saved.vcpu_events);
    assert_eq!(back.cpuid, saved.cpuid);
    assert_eq!(back.skipped, saved.skipped);
    assert_eq!(back.msrs.len(), saved.msrs.len());
    for (b, s) in back.msrs.iter().zip(&saved.msrs) {
        assert_eq!(b.index, s.index);
        if s.index == 0x10 {
            // The TSC kept counting from the saved value.
            assert!(b.data >= s.data, "TSC went backwards: {:#x} < {:#x}", b.data, s.data);
        } else {
            assert_eq!(b.data, s.data, "MSR {:#x}", s.index);
        }
    }

    let back_vm = vm.save_state().unwrap();
    assert_eq!(back_vm.pic_master, saved_vm.pic_master);
    assert_eq!(back_vm.pic_slave, saved_vm.pic_slave);
    assert_eq!(back_vm.ioapic, saved_vm.ioapic);
    if let (Some(b), Some(s)) = (&back_vm.pit, &saved_vm.pit) {
        let (b, s) = (&b.0.channels[0], &s.0.channels[0]);
        assert_eq!((b.count, b.mode, b.rw_mode, b.gate), (s.count, s.mode, s.rw_mode, s.gate));
    }
    if let (Some(b), Some(s)) = (&back_vm.clock, &saved_vm.clock) {
        assert!(b.0.clock >= s.0.clock, "kvmclock went backwards");
        assert!(b.0.clock - s.0.clock < 10_000_000_000, "kvmclock jumped by {} ns", b.0.clock - s.0.clock);
    }
}

fn snapshot_matches_uninterrupted_run(irqchip: bool) {
    let reference = reference_run(irqchip);
    assert_eq!(reference.serial, "end\n");
    assert_eq!(reference.rbx, u64::from(TOTAL));
    assert_eq!(reference.counter, u64::from(TOTAL));
    assert_eq!(&reference.records[..TOTAL as usize], (1..=TOTAL).collect::<Vec<_>>());
    let readback = &reference.records[TOTAL as usize..];
    eprintln!("irqchip={irqchip}: read-backs {readback:x?}");
    assert_eq!(
        readback[4..],
        [(KGS_VALUE >> 32) as u32, KGS_VALUE as u32, TOTAL, TOTAL * u32::from(TICKET_BASE) + TOTAL * (TOTAL + 1) / 2]
    );
    if irqchip {
        assert_eq!(readback[..4], [PIC_MASTER_MASK, PIT_MODE, IOAPIC_REDIR2, LVT_TIMER]);
    }

    let (resumed, _, _) = snapshot_run(irqchip);
    assert_eq!(resumed.records, reference.records);
    assert_eq!(resumed.serial, reference.serial);
    assert_eq!(resumed.rbx, reference.rbx);
    assert_eq!(resumed.counter, reference.counter);
}

#[test]
fn snapshot_restore_continues_counting_with_irqchip() {
    if skip() {
        return;
    }
    snapshot_matches_uninterrupted_run(true);
}

#[test]
fn snapshot_restore_continues_counting_without_irqchip() {
    if skip() {
        return;
    }
    snapshot_matches_uninterrupted_run(false);
}

#[test]
fn restore_checks_configuration() {
    if skip() {
        return;
    }
    let ram = GuestRam::new(RAM_SIZE);
    let with = new_vm(&ram, true);
    let without = KvmVm::new_with_options(&[], KvmVmOptions { irqchip: false }).unwrap();
    let vm_state = with.save_state().unwrap();
    assert!(matches!(without.restore_state(&vm_state), Err(accel::Error::Unsupported(_))));
    let vcpu_state = with.create_vcpu(0).unwrap().save_state().unwrap();
    let other_id = with.create_vcpu(1).unwrap();
    assert!(matches!(other_id.restore_state(&vcpu_state), Err(accel::Error::Unsupported(_))));
    let no_lapic = without.create_vcpu(0).unwrap();
    assert!(matches!(no_lapic.restore_state(&vcpu_state), Err(accel::Error::Unsupported(_))));
}

#[test]
fn raw_bytes_round_trip() {
    let mut regs = kvm_bindings::kvm_regs { rax: 1, rip: 0x1234, rflags: 2, ..Default::default() };
    regs.r15 = u64::MAX;
    let raw = Raw(regs);
    assert_eq!(raw.as_bytes().len(), 144);
    assert_eq!(Raw::<kvm_bindings::kvm_regs>::from_bytes(raw.as_bytes()), Some(raw));
    assert_eq!(Raw::<kvm_bindings::kvm_regs>::from_bytes(&raw.as_bytes()[1..]), None);
    let back: Raw<kvm_bindings::kvm_regs> = value::round_trip(&raw);
    assert_eq!(back.0.rip, 0x1234);
    assert_eq!(back.0.r15, u64::MAX);
}

/// A minimal serde data format (a value tree; structs as positional sequences, like
/// bincode) so the test can send the state through `Serialize` and `Deserialize` without
/// another dependency.
mod value {
    use serde::de::value::SeqDeserializer;
    use serde::de::{DeserializeOwned, IntoDeserializer, Visitor};
    use serde::ser::{Impossible, SerializeSeq, SerializeStruct, SerializeTuple, SerializeTupleStruct};
    use serde::{forward_to_deserialize_any, Serialize};
    use std::fmt;

    #[derive(Debug)]
    pub struct FormatError(String);

    impl fmt::Display for FormatError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for FormatError {}

    impl serde::ser::Error for FormatError {
        fn custom<T: fmt::Display>(msg: T) -> Self {
            Self(msg.to_string())
        }
    }

    impl serde::de::Error for FormatError {
        fn custom<T: fmt::Display>(msg: T) -> Self {
            Self(msg.to_string())
        }
    }

    type Res<T> = Result<T, FormatError>;

    #[derive(Clone, Debug, PartialEq)]
    pub enum Value {
        Unit,
        Bool(bool),
        U64(u64),
        I64(i64),
        Str(String),
        Bytes(Vec<u8>),
        None,
        Some(Box<Value>),
        Seq(Vec<Value>),
    }

    /// `value` serialized to a [`Value`] and deserialized back.
    pub fn round_trip<T: Serialize + DeserializeOwned>(value: &T) -> T {
        let tree = value.serialize(ValueSerializer).unwrap();
        T::deserialize(tree).unwrap()
    }

    fn unsupported<T>(what: &str) -> Res<T> {
        Err(FormatError(format!("{what} not supported by the test format")))
    }

    struct ValueSerializer;

    pub struct SeqBuilder(Vec<Value>);

    impl SeqBuilder {
        fn push<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
            self.0.push(v.serialize(ValueSerializer)?);
            Ok(())
        }
    }

    impl SerializeSeq for SeqBuilder {
        type Ok = Value;
        type Error = FormatError;
        fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
            self.push(v)
        }
        fn end(self) -> Res<Value> {
            Ok(Value::Seq(self.0))
        }
    }

    impl SerializeTuple for SeqBuilder {
        type Ok = Value;
        type Error = FormatError;
        fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
            self.push(v)
        }
        fn end(self) -> Res<Value> {
            Ok(Value::Seq(self.0))
        }
    }

    impl SerializeTupleStruct for SeqBuilder {
        type Ok = Value;
        type Error = FormatError;
        fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Res<()> {
            self.push(v)
        }
        fn end(self) -> Res<Value> {
            Ok(Value::Seq(self.0))
        }
    }

    impl SerializeStruct for SeqBuilder {
        type Ok = Value;
        type Error = FormatError;
        fn serialize_field<T: Serialize + ?Sized>(&mut self, _key: &'static str, v: &T) -> Res<()> {
            self.push(v)
        }
        fn end(self) -> Res<Value> {
            Ok(Value::Seq(self.0))
        }
    }

    impl serde::Serializer for ValueSerializer {
        type Ok = Value;
        type Error = FormatError;
        type SerializeSeq = SeqBuilder;
        type SerializeTuple = SeqBuilder;
        type SerializeTupleStruct = SeqBuilder;
        type SerializeTupleVariant = Impossible<Value, FormatError>;
        type SerializeMap = Impossible<Value, FormatError>;
        type SerializeStruct = SeqBuilder;
        type SerializeStructVariant = Impossible<Value, FormatError>;

        fn serialize_bool(self, v: bool) -> Res<Value> {
            Ok(Value::Bool(v))
        }
        fn serialize_i8(self, v: i8) -> Res<Value> {
            Ok(Value::I64(v.into()))
        }
        fn serialize_i16(self, v: i16) -> Res<Value> {
            Ok(Value::I64(v.into()))
        }
        fn serialize_i32(self, v: i32) -> Res<Value> {
            Ok(Value::I64(v.into()))
        }
        fn serialize_i64(self, v: i64) -> Res<Value> {
            Ok(Value::I64(v))
        }
        fn serialize_u8(self, v: u8) -> Res<Value> {
            Ok(Value::U64(v.into()))
        }
        fn serialize_u16(self, v: u16) -> Res<Value> {
            Ok(Value::U64(v.into()))
        }
        fn serialize_u32(self, v: u32) -> Res<Value> {
            Ok(Value::U64(v.into()))
        }
        fn serialize_u64(self, v: u64) -> Res<Value> {
            Ok(Value::U64(v))
        }
        fn serialize_f32(self, _v: f32) -> Res<Value> {
            unsupported("f32")
        }
        fn serialize_f64(self, _v: f64) -> Res<Value> {
            unsupported("f64")
        }
        fn serialize_char(self, v: char) -> Res<Value> {
            Ok(Value::Str(v.to_string()))
        }
        fn serialize_str(self, v: &str) -> Res<Value> {
            Ok(Value::Str(v.to_string()))
        }
        fn serialize_bytes(self, v: &[u8]) -> Res<Value> {
            Ok(Value::Bytes(v.to_vec()))
        }
        fn serialize_none(self) -> Res<Value> {
            Ok(Value::None)
        }
        fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Res<Value> {
            Ok(Value::Some(Box::new(v.serialize(self)?)))
        }
        fn serialize_unit(self) -> Res<Value> {
            Ok(Value::Unit)
        }
        fn serialize_unit_struct(self, _name: &'static str) -> Res<Value> {
            Ok(Value::Unit)
        }
        fn serialize_unit_variant(self, _name: &'static str, _index: u32, _variant: &'static str) -> Res<Value> {
            unsupported("enum")
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, v: &T) -> Res<Value> {
            v.serialize(self)
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _name: &'static str,
            _index: u32,
            _variant: &'static str,
            _v: &T,
        ) -> Res<Value> {
            unsupported("enum")
        }
        fn serialize_seq(self, len: Option<usize>) -> Res<SeqBuilder> {
            Ok(SeqBuilder(Vec::with_capacity(len.unwrap_or(0))))
        }
        fn serialize_tuple(self, len: usize) -> Res<SeqBuilder> {
            Ok(SeqBuilder(Vec::with_capacity(len)))
        }
        fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Res<SeqBuilder> {
            Ok(SeqBuilder(Vec::with_capacity(len)))
        }
        fn serialize_tuple_variant(
            self,
            _name: &'static str,
            _index: u32,
            _variant: &'static str,
            _len: usize,
        ) -> Res<Self::SerializeTupleVariant> {
            unsupported("enum")
        }
        fn serialize_map(self, _len: Option<usize>) -> Res<Self::SerializeMap> {
            unsupported("map")
        }
        fn serialize_struct(self, _name: &'static str, len: usize) -> Res<SeqBuilder> {
            Ok(SeqBuilder(Vec::with_capacity(len)))
        }
        fn serialize_struct_variant(
            self,
            _name: &'static str,
            _index: u32,
            _variant: &'static str,
            _len: usize,
        ) -> Res<Self::SerializeStructVariant> {
            unsupported("enum")
        }
    }

    impl<'de> IntoDeserializer<'de, FormatError> for Value {
        type Deserializer = Value;
        fn into_deserializer(self) -> Value {
            self
        }
    }

    impl<'de> serde::Deserializer<'de> for Value {
        type Error = FormatError;

        fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Res<V::Value> {
            match self {
                Value::Unit => visitor.visit_unit(),
                Value::Bool(b) => visitor.visit_bool(b),
                Value::U64(n) => visitor.visit_u64(n),
                Value::I64(n) => visitor.visit_i64(n),
                Value::Str(s) => visitor.visit_string(s),
                Value::Bytes(b) => visitor.visit_byte_buf(b),
                Value::None => visitor.visit_none(),
                Value::Some(v) => visitor.visit_some(*v),
                Value::Seq(items) => visitor.visit_seq(SeqDeserializer::new(items.into_iter())),
            }
        }

        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
            identifier ignored_any
        }
    }
}
