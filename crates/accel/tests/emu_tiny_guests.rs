//! The tiny guests of `kvm_tiny_guests.rs` (built in `common`) on the emu accelerator:
//! real mode, 32-bit protected mode, 64-bit long mode with MMIO, a triple fault, an
//! unclaimed port and string I/O, plus a #PF handler in long mode and a real-mode software
//! interrupt through the IVT.
//!
//! The results the guests produce are checked by the same functions as on KVM. How a run
//! ends follows emu semantics: `hlt` with IF=0 is `VcpuExit::Shutdown` (nothing can wake
//! the CPU) where KVM without irqchip reports `VcpuExit::Hlt`; after the "done" port the
//! emulator finishes its instruction slice, which reaches the guest's `cli; hlt`, so it also
//! ends in `Shutdown` (with the done value recorded) where KVM returns `Interrupted`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use accel::emu::{EmuVcpu, InterruptController};
use accel::Clock;
use accel::{Vcpu, VcpuExit};
use common::*;

/// An interrupt controller with nothing attached: never an interrupt, never a timer.
struct NoInterrupts;

impl InterruptController for NoInterrupts {
    fn interrupt_pending(&mut self) -> bool {
        false
    }

    fn acknowledge(&mut self) -> Option<u8> {
        None
    }

    fn poll(&mut self, _now_ns: u64) -> Option<u64> {
        None
    }
}

/// An emulated vCPU over the guest's RAM, in the guest's initial state.
fn vcpu_for(g: &Guest) -> EmuVcpu {
    let t0 = Instant::now();
    let clock: Clock = Arc::new(move || t0.elapsed().as_nanos() as u64);
    let mut vcpu = EmuVcpu::new(&g.ram.regions(), Box::new(NoInterrupts), clock, 1_000_000_000, 0);
    let st = g.initial_state(vcpu.state().unwrap());
    vcpu.set_state(&st).unwrap();
    vcpu
}

/// Runs until the vCPU stops for a reason other than the end of its time quantum (or the
/// guest reported done); gives up after 10 s.
fn run(vcpu: &mut EmuVcpu, io: &mut TestIo) -> accel::Result<VcpuExit> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let exit = vcpu.run(io)?;
        if exit != VcpuExit::Interrupted || io.done.is_some() {
            return Ok(exit);
        }
        assert!(Instant::now() < deadline, "guest still running after 10 s");
    }
}

#[test]
fn real_mode_hello_hlt() {
    let g = real_mode_hello();
    let t0 = Instant::now();
    let mut vcpu = vcpu_for(&g);
    let mut io = TestIo::new(t0);
    let exit = run(&mut vcpu, &mut io).unwrap();
    io.report_timing("real mode");
    assert_eq!(exit, VcpuExit::Shutdown);
    check_real_mode_hello(&io);
}

#[test]
fn protected_mode_sum() {
    let g = common::protected_mode_sum();
    let mut vcpu = vcpu_for(&g);
    let mut io = TestIo::new(Instant::now());
    io.stop = Some(vcpu.stop_flag());
    let exit = run(&mut vcpu, &mut io).unwrap();
    io.report_timing("32-bit protected mode");
    assert_eq!(exit, VcpuExit::Shutdown);
    check_protected_mode_sum(&io, &vcpu.state().unwrap());
}

#[test]
fn long_mode_serial_and_mmio() {
    let g = common::long_mode_serial_and_mmio();
    let mut vcpu = vcpu_for(&g);
    let mut io = TestIo::new(Instant::now());
    io.stop = Some(vcpu.stop_flag());
    let exit = run(&mut vcpu, &mut io).unwrap();
    io.report_timing("64-bit long mode");
    assert_eq!(exit, VcpuExit::Shutdown);
    check_long_mode_serial_and_mmio(&io, &vcpu.state().unwrap());
}

#[test]
fn triple_fault_is_reset() {
    let g = triple_fault();
    let mut vcpu = vcpu_for(&g);
    let mut io = TestIo::new(Instant::now());
    io.stop = Some(vcpu.stop_flag());
    let exit = run(&mut vcpu, &mut io).unwrap();
    match &exit {
        VcpuExit::Reset(why) => assert!(why.starts_with("triple fault"), "{why}"),
        other => panic!("expected a triple-fault reset, got {other:?}"),
    }
    assert_eq!(io.done, None);
}

#[test]
fn unclaimed_port_reads_handler_value() {
    let g = unclaimed_port_and_string_io();
    let mut vcpu = vcpu_for(&g);
    let mut io = TestIo::new(Instant::now());
    let exit = run(&mut vcpu, &mut io).unwrap();
    assert_eq!(exit, VcpuExit::Shutdown);
    check_unclaimed_port_and_string_io(&io);
}

/// `popcnt`, which PVM's kernel-mode emulator refuses on KVM, runs on the emulator.
#[test]
fn popcnt_runs() {
    let g = popcnt();
    let mut vcpu = vcpu_for(&g);
    let mut io = TestIo::new(Instant::now());
    io.stop = Some(vcpu.stop_flag());
    let exit = run(&mut vcpu, &mut io).unwrap();
    assert_eq!(exit, VcpuExit::Shutdown);
    check_popcnt(&io, &vcpu.state().unwrap());
}

#[test]
fn long_mode_page_fault_handler() {
    let g = long_mode_page_fault();
    let mut vcpu = vcpu_for(&g);
    let mut io = TestIo::new(Instant::now());
    io.stop = Some(vcpu.stop_flag());
    let exit = run(&mut vcpu, &mut io).unwrap();
    assert_eq!(exit, VcpuExit::Shutdown);
    check_long_mode_page_fault(&g, &io, &vcpu.state().unwrap());
}

#[test]
fn real_mode_soft_int_through_ivt() {
    let g = real_mode_soft_int();
    let mut vcpu = vcpu_for(&g);
    let mut io = TestIo::new(Instant::now());
    let exit = run(&mut vcpu, &mut io).unwrap();
    assert_eq!(exit, VcpuExit::Shutdown);
    check_real_mode_soft_int(&io, &vcpu.state().unwrap());
}

#[test]
fn state_round_trip() {
    let ram = GuestRam::new(RAM_SIZE);
    let gdt = write_gdt(&ram, true);
    let g = Guest { ram, mode: Mode::Long(gdt), idt: None };
    let mut vcpu = vcpu_for(&g);
    let mut st = vcpu.state().unwrap();
    for (i, r) in st.gprs.iter_mut().enumerate() {
        *r = 0x0101_0101_0101_0101 * (i as u64 + 1);
    }
    st.cr2 = 0xdead_b000;
    st.cr8 = 0x5;
    vcpu.set_state(&st).unwrap();
    assert_eq!(vcpu.state().unwrap(), st);
}
