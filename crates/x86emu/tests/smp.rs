//! Several emulated vCPUs on their own host threads over one guest RAM (the MTTCG model):
//! locked read-modify-write instructions are atomic across vCPUs, and code that one vCPU
//! rewrites while another runs it is retired everywhere.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use x86emu::cpu::ctl;
use x86emu::{Cpu, CpuConfig, Exit, NullBus, RamRegion, Seg, SharedRam};

const RAM: usize = 4 << 20;

/// Guest RAM shared by the test's threads: a leaked buffer, so it outlives every vCPU.
struct Ram(RamRegion);

impl Ram {
    fn new() -> Ram {
        let buf: &'static mut [u8] = Box::leak(vec![0u8; RAM].into_boxed_slice());
        // Page tables at 0x1000: the 4 MiB identity-mapped with two 2 MiB pages.
        let put = |buf: &mut [u8], at: usize, v: u64| buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(buf, 0x1000, 0x2000 | 3);
        put(buf, 0x2000, 0x3000 | 3);
        put(buf, 0x3000, 0x83);
        put(buf, 0x3008, 0x20_0000 | 0x83);
        Ram(RamRegion { gpa: 0, size: RAM as u64, host_addr: buf.as_mut_ptr() })
    }

    fn write(&self, at: usize, bytes: &[u8]) {
        assert!(at + bytes.len() <= RAM);
        // SAFETY: in bounds of the leaked buffer; no vCPU runs yet.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0.host_addr.add(at), bytes.len()) };
    }

    fn read_u64(&self, at: usize) -> u64 {
        assert!(at + 8 <= RAM);
        // SAFETY: in bounds of the leaked buffer; the vCPUs have finished.
        unsafe { (self.0.host_addr.add(at) as *const u64).read_unaligned() }
    }
}

/// A 64-bit vCPU over `shared` starting at `rip`, interrupts off, stack below `stack`.
fn vcpu(shared: &Arc<SharedRam>, id: u8, cpus: u8, rip: u64, stack: u64) -> Cpu {
    let mut c = Cpu::with_shared(shared.clone(), CpuConfig { tsc_hz: 1_000_000_000, apic_id: id, cpus });
    c.cr0 = ctl::CR0_PE | ctl::CR0_PG | ctl::CR0_WP | 0x10;
    c.cr4 = ctl::CR4_PAE;
    c.cr3 = 0x1000;
    c.efer = ctl::EFER_LME | ctl::EFER_LMA;
    c.seg[1] = Seg { selector: 8, base: 0, limit: 0xffff_ffff, attr: 0xa09b };
    c.seg[2] = Seg { selector: 0x10, base: 0, limit: 0xffff_ffff, attr: 0xc093 };
    c.gpr[4] = stack;
    c.rip = rip;
    c
}

/// Runs `cpu` until `cli; hlt` (or `deadline`); returns its exit.
fn run_to_halt(cpu: &mut Cpu, deadline: Instant) -> Exit {
    loop {
        match cpu.run(&mut NullBus, 200_000) {
            Exit::Budget if Instant::now() < deadline => continue,
            other => return other,
        }
    }
}

const CODE: u64 = 0x10000;
/// Counters: aligned (lock xadd), aligned (lock cmpxchg loop), crossing a cache line
/// (lock add), crossing a page (lock xadd), lock inc on a word, xchg-based spin lock.
const XADD: u64 = 0x20000;
const CAS: u64 = 0x20040;
const LINE: u64 = 0x2007c;
const PAGE: u64 = 0x20ffc;
const WORD: u64 = 0x20100;
const LOCKED: u64 = 0x20200;
const GUARDED: u64 = 0x20208;
const BITS: u64 = 0x20300;

/// The atomic-counter workload: `iters` times, increment each counter with its locked form
/// (and a plain increment of GUARDED inside an XCHG spin lock), then `cli; hlt`. Each vCPU
/// also sets its own bit in BITS with `lock bts` (the vCPU number is in RSI).
fn counter_code(iters: u32) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    let mut retry = a.create_label();
    let mut spin = a.create_label();
    a.lock().bts(qword_ptr(BITS), rsi).unwrap();
    a.mov(ecx, iters).unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(eax, 1).unwrap();
    a.lock().xadd(qword_ptr(XADD), rax).unwrap();
    a.mov(rax, qword_ptr(CAS)).unwrap();
    a.set_label(&mut retry).unwrap();
    a.lea(rdx, qword_ptr(rax + 1)).unwrap();
    a.lock().cmpxchg(qword_ptr(CAS), rdx).unwrap();
    a.jnz(retry).unwrap();
    a.lock().add(qword_ptr(LINE), 1).unwrap();
    a.mov(eax, 1).unwrap();
    a.lock().xadd(qword_ptr(PAGE), rax).unwrap();
    a.lock().inc(word_ptr(WORD)).unwrap();
    // Spin lock: xchg (implicitly locked) until the old value is 0.
    a.set_label(&mut spin).unwrap();
    a.mov(eax, 1).unwrap();
    a.xchg(qword_ptr(LOCKED), rax).unwrap();
    a.test(rax, rax).unwrap();
    a.jnz(spin).unwrap();
    a.mov(rax, qword_ptr(GUARDED)).unwrap();
    a.add(rax, 1).unwrap();
    a.mov(qword_ptr(GUARDED), rax).unwrap();
    a.mov(qword_ptr(LOCKED), 0).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(top).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    a.assemble(CODE).unwrap()
}

#[test]
fn locked_increments_from_several_vcpus_are_atomic() {
    const ITERS: u32 = 20_000;
    for cpus in [2u8, 4] {
        let ram = Ram::new();
        ram.write(CODE as usize, &counter_code(ITERS));
        let shared = SharedRam::new(&[ram.0]);
        let deadline = Instant::now() + Duration::from_secs(120);
        let threads: Vec<_> = (0..cpus)
            .map(|id| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let mut c = vcpu(&shared, id, cpus, CODE, 0x30000 + u64::from(id) * 0x1000);
                    c.gpr[6] = u64::from(id);
                    run_to_halt(&mut c, deadline)
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), Exit::HaltedForever);
        }
        let want = u64::from(cpus) * u64::from(ITERS);
        assert_eq!(ram.read_u64(XADD as usize), want, "lock xadd, {cpus} vCPUs");
        assert_eq!(ram.read_u64(CAS as usize), want, "lock cmpxchg loop, {cpus} vCPUs");
        assert_eq!(ram.read_u64(LINE as usize), want, "lock add across a cache line, {cpus} vCPUs");
        assert_eq!(ram.read_u64(PAGE as usize), want, "lock xadd across a page, {cpus} vCPUs");
        assert_eq!(ram.read_u64(WORD as usize) & 0xffff, want & 0xffff, "lock inc word, {cpus} vCPUs");
        assert_eq!(ram.read_u64(GUARDED as usize), want, "xchg spin lock, {cpus} vCPUs");
        assert_eq!(ram.read_u64(LOCKED as usize), 0);
        assert_eq!(ram.read_u64(BITS as usize), (1u64 << cpus) - 1, "lock bts, {cpus} vCPUs");
    }
}

/// CMPXCHG16B and CMPXCHG8B as 128/64-bit counters from several vCPUs.
#[test]
fn cmpxchg8b_and_16b_are_atomic_across_vcpus() {
    const ITERS: u32 = 10_000;
    const C16: u64 = 0x20400; // 16-byte aligned
    const C8: u64 = 0x20444; // 4-byte aligned only: the fallback lock
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    let mut r16 = a.create_label();
    let mut retry8 = a.create_label();
    a.mov(edi, ITERS).unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(rax, qword_ptr(C16)).unwrap();
    a.mov(rdx, qword_ptr(C16 + 8)).unwrap();
    a.set_label(&mut r16).unwrap();
    a.mov(rbx, rax).unwrap();
    a.mov(rcx, rdx).unwrap();
    a.add(rbx, 1).unwrap();
    a.add(rcx, 3).unwrap();
    a.lock().cmpxchg16b(xmmword_ptr(C16)).unwrap();
    a.jnz(r16).unwrap();
    a.mov(eax, dword_ptr(C8)).unwrap();
    a.mov(edx, dword_ptr(C8 + 4)).unwrap();
    a.set_label(&mut retry8).unwrap();
    a.lea(ebx, dword_ptr(rax + 1)).unwrap();
    a.lea(ecx, dword_ptr(rdx + 2)).unwrap();
    a.lock().cmpxchg8b(qword_ptr(C8)).unwrap();
    a.jnz(retry8).unwrap();
    a.dec(edi).unwrap();
    a.jnz(top).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    let ram = Ram::new();
    ram.write(CODE as usize, &a.assemble(CODE).unwrap());
    let shared = SharedRam::new(&[ram.0]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let threads: Vec<_> = (0..3u8)
        .map(|id| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                run_to_halt(&mut vcpu(&shared, id, 3, CODE, 0x30000 + u64::from(id) * 0x1000), deadline)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), Exit::HaltedForever);
    }
    let n = 3 * u64::from(ITERS);
    assert_eq!((ram.read_u64(C16 as usize), ram.read_u64(C16 as usize + 8)), (n, 3 * n));
    assert_eq!(ram.read_u64(C8 as usize), n | ((2 * n) << 32));
}

/// One vCPU keeps calling a function and checking what it returns; another rewrites the
/// function's immediate while it runs. The caller must see the new code within bounded
/// time (it halts when it does) and never any value but the old or the new one.
#[test]
fn cross_modified_code_is_retired_on_the_other_vcpu() {
    const FUNC: u64 = 0x30000 + 0xf; // `mov eax, imm32` with the immediate 4-byte aligned
    const CALLS: u64 = 0x20000;
    const BAD: u64 = 0x20008;
    const OLD: u32 = 0x1111_1111;
    const NEW: u32 = 0x2222_2222;
    for round in 0..5 {
        let ram = Ram::new();
        // The function: mov eax, OLD; ret.
        let mut f = CodeAssembler::new(64).unwrap();
        f.mov(eax, OLD).unwrap();
        f.ret().unwrap();
        let fcode = f.assemble(FUNC).unwrap();
        assert_eq!(fcode[0], 0xb8);
        ram.write(FUNC as usize, &fcode);
        // The caller: call the function until it returns NEW; count calls; record any
        // other value in BAD.
        let mut c = CodeAssembler::new(64).unwrap();
        let mut top = c.create_label();
        let mut done = c.create_label();
        let mut bad = c.create_label();
        c.set_label(&mut top).unwrap();
        c.mov(rax, FUNC).unwrap();
        c.call(rax).unwrap();
        c.cmp(eax, NEW as i32).unwrap();
        c.je(done).unwrap();
        c.cmp(eax, OLD as i32).unwrap();
        c.jne(bad).unwrap();
        c.inc(qword_ptr(CALLS)).unwrap();
        c.jmp(top).unwrap();
        c.set_label(&mut bad).unwrap();
        c.mov(dword_ptr(BAD), eax).unwrap();
        c.set_label(&mut done).unwrap();
        c.cli().unwrap();
        c.hlt().unwrap();
        ram.write(CODE as usize, &c.assemble(CODE).unwrap());
        // The patcher: wait until the caller has made 2000 calls, then store NEW over the
        // immediate with one aligned 4-byte store.
        const PATCHER: u64 = 0x18000;
        let mut p = CodeAssembler::new(64).unwrap();
        let mut wait = p.create_label();
        p.set_label(&mut wait).unwrap();
        p.pause().unwrap();
        p.cmp(qword_ptr(CALLS), 2000 + round * 500).unwrap();
        p.jb(wait).unwrap();
        p.mov(dword_ptr(FUNC + 1), NEW).unwrap();
        p.cli().unwrap();
        p.hlt().unwrap();
        ram.write(PATCHER as usize, &p.assemble(PATCHER).unwrap());

        let shared = SharedRam::new(&[ram.0]);
        let deadline = Instant::now() + Duration::from_secs(60);
        let stop = Arc::new(AtomicBool::new(false));
        let s = shared.clone();
        let caller = std::thread::spawn(move || run_to_halt(&mut vcpu(&s, 0, 2, CODE, 0x50000), deadline));
        let s = shared.clone();
        let st = stop.clone();
        let patcher = std::thread::spawn(move || {
            let r = run_to_halt(&mut vcpu(&s, 1, 2, PATCHER, 0x60000), deadline);
            st.store(true, Ordering::SeqCst);
            r
        });
        assert_eq!(patcher.join().unwrap(), Exit::HaltedForever);
        let patched_at = Instant::now();
        assert_eq!(caller.join().unwrap(), Exit::HaltedForever, "the caller never saw the new code");
        assert!(patched_at.elapsed() < Duration::from_secs(10), "took {:?} after the patch", patched_at.elapsed());
        assert_eq!(ram.read_u64(BAD as usize), 0, "the caller saw a value that is neither old nor new");
        assert!(ram.read_u64(CALLS as usize) >= 2000);
    }
}
