//! Two vCPUs on KVM with the in-kernel irqchip: the boot processor wakes the application
//! processor with INIT + STARTUP IPIs through its local APIC (Intel MP spec B.4), the AP
//! starts in real mode at the SIPI vector, prints over the serial port and raises a flag in
//! guest memory that the BSP waits for. Skipped only where /dev/kvm is unavailable.

mod common;

use std::time::{Duration, Instant};

use accel::kvm::KvmVm;
use accel::{Vcpu, VcpuExit};
use common::*;
use iced_x86::code_asm::*;

/// Real-mode start address of the AP: the SIPI vector 0x08 means 0800:0000.
const AP_START: u64 = 0x8000;
/// Byte the AP sets to 1 when it has run.
const AP_FLAG: u64 = 0x7f00;

#[test]
fn bsp_starts_ap_with_init_sipi() {
    if !KvmVm::available() {
        println!("skipping: /dev/kvm unavailable");
        return;
    }
    let ram = GuestRam::new(RAM_SIZE);
    let gdt = write_gdt(&ram, false);

    // AP (16-bit real mode at 0800:0000): print "AP\n", set the flag, report done, halt.
    let mut ap = CodeAssembler::new(16).unwrap();
    for b in b"AP\n" {
        ap.mov(dx, SERIAL_THR as u32).unwrap();
        ap.mov(al, *b as u32).unwrap();
        ap.out(dx, al).unwrap();
    }
    ap.xor(ax, ax).unwrap();
    ap.mov(ds, ax).unwrap();
    ap.mov(byte_ptr(AP_FLAG as u32), 1u32).unwrap();
    ap.mov(dx, DONE_PORT as u32).unwrap();
    ap.mov(al, 0xa0u32).unwrap();
    ap.out(dx, al).unwrap();
    ap.cli().unwrap();
    ap.hlt().unwrap();
    ram.write(AP_START, &ap.assemble(AP_START).unwrap());

    // BSP (32-bit protected mode): INIT, then STARTUP with vector 0x08, to APIC ID 1; wait
    // (bounded) for the flag; report done with the flag's value.
    let mut b = CodeAssembler::new(32).unwrap();
    let mut wait = b.create_label();
    let mut delay = b.create_label();
    b.mov(dword_ptr(0xfee0_0310u32), 0x0100_0000u32).unwrap(); // ICR high: destination 1
    b.mov(dword_ptr(0xfee0_0300u32), 0x0000_4500u32).unwrap(); // INIT, level assert
    b.mov(ecx, 100_000u32).unwrap();
    b.set_label(&mut delay).unwrap();
    b.dec(ecx).unwrap();
    b.jnz(delay).unwrap();
    b.mov(dword_ptr(0xfee0_0300u32), 0x0000_4608u32).unwrap(); // STARTUP, vector 0x08
    b.mov(ecx, 2_000_000u32).unwrap();
    b.set_label(&mut wait).unwrap();
    b.cmp(byte_ptr(AP_FLAG as u32), 1u32).unwrap();
    b.loopne(wait).unwrap();
    // done = 0xb0 + flag: 0xb1 when the AP ran before the bounded wait ran out.
    b.mov(al, byte_ptr(AP_FLAG as u32)).unwrap();
    b.add(al, 0xb0u32).unwrap();
    b.mov(dx, DONE_PORT as u32).unwrap();
    b.out(dx, al).unwrap();
    b.cli().unwrap();
    b.hlt().unwrap();
    ram.write(CODE_ADDR, &b.assemble(CODE_ADDR).unwrap());

    let vm = KvmVm::new(&ram.regions()).unwrap();
    let mut bsp = vm.create_vcpu(0).unwrap();
    let mut ap = vm.create_vcpu(1).unwrap();
    let st = protected_state(bsp.state().unwrap(), gdt, false);
    bsp.set_state(&st).unwrap();

    let t0 = Instant::now();
    let ap_stop = ap.stop_flag();
    let ap_thread = std::thread::spawn(move || {
        let mut io = TestIo::new(Instant::now());
        io.stop = Some(ap_stop);
        // An AP waiting for its SIPI may leave KVM_RUN early (EINTR); run it again.
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let r = ap.run(&mut io);
            if io.done.is_some() || !matches!(r, Ok(VcpuExit::Interrupted)) || Instant::now() > end {
                return (r, io);
            }
        }
    });
    let mut io = TestIo::new(t0);
    io.stop = Some(bsp.stop_flag());
    let exit = bsp.run(&mut io);
    if let Err(accel::Error::Internal(e)) = &exit {
        if vm.is_pvm() {
            // PVM's in-kernel emulation of the BSP's kernel-mode code may refuse it.
            println!("skipping the rest: PVM refused the BSP: {e}");
            return;
        }
    }
    assert_eq!(exit.unwrap(), VcpuExit::Interrupted);
    assert_eq!(io.done, Some(0xb1), "the BSP must see the AP's flag");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ap_thread.is_finished() {
        assert!(Instant::now() < deadline, "AP thread did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (r, ap_io) = ap_thread.join().unwrap();
    assert_eq!(r.unwrap(), VcpuExit::Interrupted);
    assert_eq!(ap_io.serial_str(), "AP\n");
    assert_eq!(ap_io.done, Some(0xa0));
    eprintln!("timing: INIT/SIPI round trip {:.2} ms", t0.elapsed().as_secs_f64() * 1e3);
}

/// KVM's paravirtual features (CPUID 0x4000_0001 EAX) reach every vCPU as the host's KVM
/// offers them — among them KVM_FEATURE_STEAL_TIME (bit 5), through which a Linux guest
/// reads the time its vCPU waited for a host CPU (`st` in top, the guest's view of the
/// daemon's CPU ready time).
#[test]
fn kvm_paravirt_features_such_as_steal_time_reach_every_vcpu() {
    if !KvmVm::available() {
        println!("skipped: /dev/kvm unavailable");
        return;
    }
    let leaf =
        |entries: &[kvm_bindings::kvm_cpuid_entry2]| entries.iter().find(|e| e.function == 0x4000_0001).map(|e| e.eax);
    let supported = kvm_ioctls::Kvm::new().unwrap().get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
    let offered = leaf(supported.as_slice());
    let ram = GuestRam::new(RAM_SIZE);
    let vm = KvmVm::new(&ram.regions()).unwrap();
    for id in 0..2 {
        let vcpu = vm.create_vcpu(id).unwrap();
        let cpuid = vcpu.vcpu_fd().get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        assert_eq!(leaf(cpuid.as_slice()), offered, "vCPU {id}");
    }
    match offered {
        Some(f) if f & (1 << 5) != 0 => println!("KVM_FEATURE_STEAL_TIME offered and passed to the vCPUs ({f:#x})"),
        Some(f) => println!("note: this host's KVM offers paravirt features {f:#x} without steal time"),
        None => println!("note: this host's KVM offers no paravirt CPUID leaf"),
    }
}
