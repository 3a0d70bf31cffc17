//! Tiny guests on the KVM accelerator: real mode, 32-bit protected mode, 64-bit long mode,
//! a triple fault, port/MMIO exits, a #PF handler and a real-mode software interrupt.
//!
//! The guests and the checks of their results live in `common` and run unchanged on the
//! emu accelerator too (`emu_tiny_guests.rs`). Each test prints "skipping: /dev/kvm
//! unavailable" and passes when `KvmVm::available()` is false.
//!
//! Guests end either with `hlt` on a VM created without the in-kernel irqchip (then `hlt`
//! leaves `KVM_RUN` as `VcpuExit::Hlt`), or, on the production configuration with irqchip
//! (where KVM handles `hlt` in the kernel and never reports it), by writing to the test's
//! "done" port 0x501, whose handler raises the vCPU's stop flag so `run` returns
//! `VcpuExit::Interrupted`.

mod common;

use std::time::Instant;

use accel::kvm::{KvmVcpu, KvmVm, KvmVmOptions};
use accel::{Vcpu, VcpuExit};
use common::*;

/// True (after printing the skip line) when the test cannot run here.
fn skip() -> bool {
    if KvmVm::available() {
        false
    } else {
        println!("skipping: /dev/kvm unavailable");
        true
    }
}

/// Creates vCPU 0 of `vm` and loads the guest's initial state.
fn vcpu_for(vm: &KvmVm, g: &Guest) -> KvmVcpu {
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let st = g.initial_state(vcpu.state().unwrap());
    vcpu.set_state(&st).unwrap();
    vcpu
}

/// On a PVM host, guest kernel (CPL0) code runs in a limited software emulator that may
/// refuse a guest's instructions: `run` then fails with `Error::Internal` naming PVM. Returns
/// true (after printing why) when that happened, so the test can stop there.
fn refused_by_pvm(vm: &KvmVm, result: &accel::Result<VcpuExit>) -> bool {
    match result {
        Err(accel::Error::Internal(msg)) if vm.is_pvm() => {
            eprintln!("refused by PVM: {msg}");
            assert!(msg.contains("PVM"), "{msg}");
            true
        }
        _ => false,
    }
}

#[test]
fn real_mode_hello_hlt() {
    if skip() {
        return;
    }
    let g = real_mode_hello();
    let t0 = Instant::now();
    let vm = KvmVm::new_with_options(&g.ram.regions(), KvmVmOptions { irqchip: false }).unwrap();
    // Start from KVM's reset state (real mode) with cs:ip = 0000:7c00, like after a BIOS.
    let mut vcpu = vcpu_for(&vm, &g);

    let mut io = TestIo::new(t0);
    let exit = vcpu.run(&mut io).unwrap();
    io.report_timing("real mode");
    eprintln!("total real-mode run: {:.2} ms", t0.elapsed().as_secs_f64() * 1e3);
    assert_eq!(exit, VcpuExit::Hlt);
    check_real_mode_hello(&io);
}

#[test]
fn protected_mode_sum_irqchip() {
    if skip() {
        return;
    }
    let g = protected_mode_sum();
    let t0 = Instant::now();
    let vm = KvmVm::new(&g.ram.regions()).unwrap();
    assert!(vm.has_irqchip());
    let mut vcpu = vcpu_for(&vm, &g);

    let mut io = TestIo::new(t0);
    io.stop = Some(vcpu.stop_flag());
    let exit = vcpu.run(&mut io).unwrap();
    io.report_timing("32-bit protected mode");
    assert_eq!(exit, VcpuExit::Interrupted);
    check_protected_mode_sum(&io, &vcpu.state().unwrap());
}

#[test]
fn long_mode_serial_and_mmio() {
    if skip() {
        return;
    }
    let g = common::long_mode_serial_and_mmio();
    let t0 = Instant::now();
    let vm = KvmVm::new(&g.ram.regions()).unwrap();
    let t_vm = t0.elapsed();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let t_vcpu = t0.elapsed();
    eprintln!(
        "timing: 64-bit long mode: KvmVm::new {:.2} ms, +create_vcpu {:.2} ms",
        t_vm.as_secs_f64() * 1e3,
        (t_vcpu - t_vm).as_secs_f64() * 1e3
    );
    let st = g.initial_state(vcpu.state().unwrap());
    vcpu.set_state(&st).unwrap();

    let mut io = TestIo::new(t0);
    io.stop = Some(vcpu.stop_flag());
    let exit = vcpu.run(&mut io).unwrap();
    io.report_timing("64-bit long mode");
    assert_eq!(exit, VcpuExit::Interrupted);
    check_long_mode_serial_and_mmio(&io, &vcpu.state().unwrap());
}

#[test]
fn triple_fault_is_reset() {
    if skip() {
        return;
    }
    let g = triple_fault();
    let vm = KvmVm::new(&g.ram.regions()).unwrap();
    let mut vcpu = vcpu_for(&vm, &g);

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
    let g = unclaimed_port_and_string_io();
    let vm = KvmVm::new_with_options(&g.ram.regions(), KvmVmOptions { irqchip: false }).unwrap();
    let mut vcpu = vcpu_for(&vm, &g);

    let mut io = TestIo::new(Instant::now());
    let exit = vcpu.run(&mut io).unwrap();
    assert_eq!(exit, VcpuExit::Hlt);
    check_unclaimed_port_and_string_io(&io);
}

#[test]
fn long_mode_page_fault_handler() {
    if skip() {
        return;
    }
    let g = long_mode_page_fault();
    let vm = KvmVm::new(&g.ram.regions()).unwrap();
    let mut vcpu = vcpu_for(&vm, &g);

    let mut io = TestIo::new(Instant::now());
    io.stop = Some(vcpu.stop_flag());
    let result = vcpu.run(&mut io);
    if refused_by_pvm(&vm, &result) {
        return;
    }
    assert_eq!(result.unwrap(), VcpuExit::Interrupted);
    check_long_mode_page_fault(&g, &io, &vcpu.state().unwrap());
}

#[test]
fn real_mode_soft_int_through_ivt() {
    if skip() {
        return;
    }
    let g = real_mode_soft_int();
    let vm = KvmVm::new_with_options(&g.ram.regions(), KvmVmOptions { irqchip: false }).unwrap();
    let mut vcpu = vcpu_for(&vm, &g);

    let mut io = TestIo::new(Instant::now());
    let result = vcpu.run(&mut io);
    if refused_by_pvm(&vm, &result) {
        return;
    }
    assert_eq!(result.unwrap(), VcpuExit::Hlt);
    check_real_mode_soft_int(&io, &vcpu.state().unwrap());
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
    let g = popcnt();
    let vm = KvmVm::new(&g.ram.regions()).unwrap();
    let mut vcpu = vcpu_for(&vm, &g);
    let mut io = TestIo::new(Instant::now());
    io.stop = Some(vcpu.stop_flag());
    match vcpu.run(&mut io) {
        Ok(exit) => {
            assert_eq!(exit, VcpuExit::Interrupted);
            check_popcnt(&io, &vcpu.state().unwrap());
        }
        Err(accel::Error::Internal(msg)) => {
            eprintln!("refused instruction: {msg}");
            assert!(vm.is_pvm(), "internal error on a non-PVM host: {msg}");
            assert!(msg.contains("PVM"), "{msg}");
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}
