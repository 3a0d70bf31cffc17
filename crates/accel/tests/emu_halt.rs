//! A halted vCPU on the emu accelerator (an [`EmuVm`] with its userspace irqchip) costs no
//! host CPU: it blocks until its next timer deadline, an interrupt raised by another thread
//! or a stop, with no polling in between; and a guest's hostile timer cannot make it spin.
//!
//! The guests run in real mode: they program the PIC (IRQ 0 → vector 0x20, IRQ 4 → 0x24,
//! handlers that write the IRQ number to the record port and EOI), optionally the PIT, then
//! `sti` and `hlt` in a loop. Host CPU is the vCPU thread's own CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`), which other load on the machine does not inflate.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use accel::emu::EmuHypervisor;
use accel::{Clock, ExitHandler, Hypervisor, Vm, VmSpec};
use common::*;
use iced_x86::code_asm::*;

const HANDLER_IRQ0: u16 = 0x600;
const HANDLER_IRQ4: u16 = 0x640;

/// What the guest does with the PIT before it halts.
#[derive(Clone, Copy)]
enum Pit {
    /// Leave it stopped (no timer deadline at all).
    Off,
    /// Channel 0, mode 0 (one-shot), count 0xffff: IRQ 0 after 54.9 ms.
    OneShot55ms,
    /// Channel 0, mode 2 (rate generator), reload 1: a period of 838 ns.
    Periodic1Tick,
}

/// A real-mode guest: PIC with the IRQs in `unmasked` enabled, the PIT as `pit`, then
/// `sti; hlt` forever; every interrupt writes its IRQ number to the record port.
fn guest(unmasked: &[u8], pit: Pit) -> GuestRam {
    let ram = GuestRam::new(RAM_SIZE);
    for (irq, handler) in [(0u8, HANDLER_IRQ0), (4, HANDLER_IRQ4)] {
        let mut h = CodeAssembler::new(16).unwrap();
        h.push(ax).unwrap();
        h.push(dx).unwrap();
        h.mov(al, u32::from(irq)).unwrap();
        h.mov(dx, u32::from(RECORD_PORT)).unwrap();
        h.out(dx, al).unwrap();
        h.mov(al, 0x20).unwrap();
        h.out(0x20, al).unwrap();
        h.pop(dx).unwrap();
        h.pop(ax).unwrap();
        h.iret().unwrap();
        ram.write(u64::from(handler), &h.assemble(u64::from(handler)).unwrap());
        let vector = 0x20 + u64::from(irq);
        ram.write(vector * 4, &[handler.to_le_bytes(), [0, 0]].concat());
    }
    let mask = !unmasked.iter().fold(0u8, |m, irq| m | (1 << irq));
    let mut a = CodeAssembler::new(16).unwrap();
    for (port, v) in [(0x20u8, 0x11u8), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, mask)] {
        a.mov(al, u32::from(v)).unwrap();
        a.out(u32::from(port), al).unwrap();
    }
    let program: &[(u8, u8)] = match pit {
        Pit::Off => &[],
        Pit::OneShot55ms => &[(0x43, 0x30), (0x40, 0xff), (0x40, 0xff)],
        Pit::Periodic1Tick => &[(0x43, 0x34), (0x40, 1), (0x40, 0)],
    };
    for &(port, v) in program {
        a.mov(al, u32::from(v)).unwrap();
        a.out(u32::from(port), al).unwrap();
    }
    a.sti().unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.hlt().unwrap();
    a.jmp(top).unwrap();
    ram.write(CODE16_ADDR, &a.assemble(CODE16_ADDR).unwrap());
    ram
}

/// Interrupts the guest took: (IRQ, when).
type Taken = Arc<Mutex<Vec<(u8, Instant)>>>;

struct Io(Taken);

impl ExitHandler for Io {
    fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        if port == RECORD_PORT {
            self.0.lock().unwrap().push((data[0], Instant::now()));
        }
    }
    fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant the kernel knows.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) }, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A running guest: its VM, the interrupts it took, and its vCPU thread.
struct Running {
    vm: Arc<dyn Vm>,
    taken: Taken,
    started: Instant,
    stopping: Arc<AtomicBool>,
    stopper: accel::VcpuStopper,
    /// The vCPU thread's CPU time when it ends.
    done: mpsc::Receiver<Duration>,
    // Declared last: dropped after the vCPU thread has ended (see `stop`).
    _ram: GuestRam,
}

fn start(ram: GuestRam) -> Running {
    let t0 = Instant::now();
    let clock: Clock = Arc::new(move || t0.elapsed().as_nanos() as u64);
    let vm = EmuHypervisor.create_vm(&VmSpec { ram: &ram.regions(), clock, cpus: 1 }).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let st = real_mode_state(vcpu.state().unwrap());
    vcpu.set_state(&st).unwrap();
    let taken = Taken::default();
    let stopping = Arc::new(AtomicBool::new(false));
    let stopper = vcpu.stopper();
    let (tx, done) = mpsc::channel();
    let (io, quit) = (Io(taken.clone()), stopping.clone());
    std::thread::spawn(move || {
        let mut io = io;
        let cpu0 = thread_cpu();
        while !quit.load(Ordering::SeqCst) {
            assert_eq!(vcpu.run(&mut io).unwrap(), accel::VcpuExit::Interrupted);
        }
        let cpu = thread_cpu() - cpu0;
        // The vCPU goes before the test may unmap its RAM.
        drop(vcpu);
        tx.send(cpu).unwrap();
    });
    Running { vm, taken, started: Instant::now(), stopping, stopper, done, _ram: ram }
}

impl Running {
    /// Stops the vCPU; returns how long the stop took and the thread's CPU time.
    fn stop(self) -> (Duration, Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        let t = Instant::now();
        self.stopper.stop();
        let cpu = self.done.recv_timeout(Duration::from_secs(10)).expect("the stop woke the halted vCPU");
        (t.elapsed(), cpu)
    }

    fn wait_for(&self, irq: u8, timeout: Duration) -> Option<Instant> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(&(_, at)) = self.taken.lock().unwrap().iter().find(|(i, _)| *i == irq) {
                return Some(at);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }
}

#[test]
fn a_halted_vcpu_with_no_timer_blocks_until_stopped() {
    let r = start(guest(&[4], Pit::Off));
    std::thread::sleep(Duration::from_millis(500));
    let (latency, cpu) = r.stop();
    eprintln!("idle halt: vCPU thread CPU {cpu:?} over 500 ms, stop latency {latency:?}");
    // It used to wake every millisecond (about 18 ms of CPU per 500 ms here).
    assert!(cpu < Duration::from_millis(5), "vCPU thread used {cpu:?} while halted");
    assert!(latency < Duration::from_secs(2), "stop took {latency:?}");
}

#[test]
fn an_interrupt_from_another_thread_wakes_a_halted_vcpu() {
    let r = start(guest(&[4], Pit::Off));
    let line = r.vm.irq_line(4).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..3 {
        r.taken.lock().unwrap().clear();
        let sent = Instant::now();
        line.pulse();
        let at = r.wait_for(4, Duration::from_secs(10)).expect("the interrupt woke the vCPU (nothing else would)");
        eprintln!("IRQ 4 from another thread taken after {:?}", at - sent);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, cpu) = r.stop();
    assert!(cpu < Duration::from_millis(20), "vCPU thread used {cpu:?}");
}

#[test]
fn a_timer_deadline_wakes_a_halted_vcpu_on_time() {
    let r = start(guest(&[0], Pit::OneShot55ms));
    let at = r.wait_for(0, Duration::from_secs(10)).expect("the PIT interrupt");
    let after = at - r.started;
    eprintln!("one-shot PIT (54.9 ms) taken after {after:?}");
    assert!(after >= Duration::from_millis(54), "{after:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(r.taken.lock().unwrap().len(), 1, "one-shot");
    let (_, cpu) = r.stop();
    assert!(cpu < Duration::from_millis(10), "vCPU thread used {cpu:?}");
}

#[test]
fn a_hostile_periodic_timer_cannot_make_the_host_spin() {
    // Masked: the PIT runs with a period of 838 ns and never interrupts. The vCPU wakes at
    // most every 200 us (the minimum period), to find nothing to do.
    let r = start(guest(&[], Pit::Periodic1Tick));
    std::thread::sleep(Duration::from_millis(500));
    let (_, cpu) = r.stop();
    eprintln!("masked 838 ns periodic PIT: vCPU thread CPU {cpu:?} over 500 ms");
    assert!(cpu < Duration::from_millis(150), "vCPU thread used {cpu:?} over 500 ms");
    // Unmasked: interrupts at most every 200 us.
    let r = start(guest(&[0], Pit::Periodic1Tick));
    std::thread::sleep(Duration::from_millis(500));
    let n = r.taken.lock().unwrap().len();
    let elapsed = r.started.elapsed();
    let (_, cpu) = r.stop();
    eprintln!("unmasked: {n} interrupts in {elapsed:?}, vCPU thread CPU {cpu:?}");
    let bound = elapsed.as_nanos() / u128::from(devices::MIN_PERIODIC_TIMER_NS) + 2;
    assert!(n > 0 && n as u128 <= bound, "{n} interrupts in {elapsed:?}");
}
