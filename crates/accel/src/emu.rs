//! The `emu` accelerator: guest code runs on rustvisor's own x86-64 interpreter (`x86emu`).
//!
//! Port I/O and MMIO go to the same [`ExitHandler`] as on KVM. Interrupts come from a
//! userspace interrupt controller (PIC/IOAPIC/LAPIC, plus the PIT) that the VMM supplies
//! through [`InterruptController`]; guest time is a nanosecond clock shared with it.
//!
//! # Snapshots
//!
//! [`EmuVcpu::save_state`] / [`EmuVcpu::restore_state`] capture and reload everything the
//! emulated CPU needs to continue (see [`x86emu::snapshot`] for the contents and for what is
//! deliberately left out). The interrupt controller is not part of it: the VMM saves it
//! separately (`devices::EmuIrqchip::state`). Guest RAM is the VMM's to copy; build the new
//! vCPU over the restored RAM, restore its state, and make the shared clock continue from
//! the reading it had at save time (the TSC is derived from it).
//!
//! # As a [`crate::Hypervisor`]
//!
//! [`EmuHypervisor`] makes [`EmuVm`]s: the VM owns the userspace interrupt controllers
//! (`devices::EmuIrqchip`: PIC pair, IOAPIC, LAPIC, PIT), serves their ports and MMIO pages
//! itself before the VMM's [`ExitHandler`] sees an exit (as KVM's in-kernel irqchip does),
//! and feeds its vCPU from them. [`EmuVcpu`] is the bare CPU underneath, for tests and tools
//! that bring their own interrupt controller.

mod hypervisor;
mod wakeup;

use crate::{Clock, CpuState, Error, ExitHandler, RamRegion, Result, Segment, Table, Vcpu, VcpuExit, VcpuStopper};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use x86emu::{Cpu, CpuConfig, Exit, Seg, SharedRam};

pub use crate::vm::DeviceWrites;
pub use hypervisor::{EmuHypervisor, EmuVm, EmuVmState, TSC_HZ};
pub use wakeup::Wakeup;
pub use x86emu::StateError;

/// The userspace interrupt controller the emulated vCPU takes interrupts from.
pub trait InterruptController: Send {
    /// Whether the CPU's INTR input is asserted.
    fn interrupt_pending(&mut self) -> bool;
    /// Interrupt acknowledge: the vector to deliver, now in service.
    fn acknowledge(&mut self) -> Option<u8>;
    /// Runs timers up to `now_ns`; returns the next timer deadline in ns, if any.
    fn poll(&mut self, now_ns: u64) -> Option<u64>;
    /// Takes a non-maskable interrupt latched for this vCPU (NMI IPI, IOAPIC/MSI message
    /// with NMI delivery), clearing the latch; the CPU asks only when it can take one (see
    /// `x86emu::Bus::take_nmi`). A controller without NMIs has none.
    fn take_nmi(&mut self) -> bool {
        false
    }
    /// Whether an NMI is latched for this vCPU, without taking it (a halted vCPU whose
    /// NMIs are not blocked wakes for it).
    fn nmi_pending(&mut self) -> bool {
        false
    }
    /// Takes the INIT and start-up IPIs sent to this vCPU since the last call (Intel SDM
    /// Vol. 3A §9.4.4). A controller without IPIs has none.
    fn take_startup(&mut self) -> devices::Startup {
        devices::Startup::default()
    }
}

/// Snapshot of one emulated vCPU (see [`EmuVcpu::save_state`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EmuVcpuState {
    /// The CPU: registers, segment caches, control/debug registers, MSRs, x87/SSE state,
    /// `hlt` and interrupt-shadow flags, TSC frequency and APIC ID. This is the emulator's
    /// own save format, a superset of the architectural [`CpuState`] the seam exchanges.
    pub cpu: x86emu::CpuSnapshot,
    /// The vCPU is an application processor waiting for a start-up IPI (after power-on or
    /// INIT) and runs nothing until one comes. Absent in states saved before SMP support,
    /// where it is `false` (the one vCPU ran).
    #[serde(default)]
    pub wait_for_sipi: bool,
}

/// Instructions run between looks at timers and the stop flag.
const SLICE: u64 = 100_000;
/// Longest time one [`Vcpu::run`] call keeps the CPU before returning `Interrupted`.
const RUN_QUANTUM: Duration = Duration::from_millis(20);

/// One vCPU on the emulator.
pub struct EmuVcpu {
    cpu: Cpu,
    /// Index of the vCPU (= its APIC ID); 0 is the bootstrap processor.
    id: u8,
    /// An application processor waiting for a start-up IPI (SDM Vol. 3A §9.4.4.1).
    wait_for_sipi: bool,
    ic: Box<dyn InterruptController>,
    clock: Clock,
    stop: Arc<AtomicBool>,
    /// What the vCPU sleeps on while halted (rung by interrupts from other threads and by
    /// its stopper).
    wakeup: Arc<Wakeup>,
    device_writes: Option<DeviceWrites>,
    /// Debugging aid (RUSTVISOR_EMU_PROFILE=PATH): guest RIP samples, one per slice.
    profile: Option<(std::path::PathBuf, std::collections::HashMap<u64, u64>)>,
}

impl Drop for EmuVcpu {
    fn drop(&mut self) {
        tracing::debug!("emu vCPU statistics: {:?}; translation tier: {:?}", self.cpu.stats, self.cpu.jit_stats());
        if let Some((path, samples)) = self.profile.take() {
            let mut v: Vec<_> = samples.into_iter().collect();
            v.sort_by_key(|e| std::cmp::Reverse(e.1));
            let text: String = v.iter().map(|(rip, n)| format!("{n} {rip:x}\n")).collect();
            let _ = std::fs::write(path, text);
        }
    }
}

struct Adapter<'a> {
    h: &'a mut dyn ExitHandler,
    ic: &'a mut dyn InterruptController,
    clock: &'a Clock,
    /// Next timer deadline (ns) of the interrupt controller.
    deadline: Option<u64>,
    device_writes: Option<&'a DeviceWrites>,
}

impl x86emu::Bus for Adapter<'_> {
    fn io_in(&mut self, port: u16, size: u8) -> u32 {
        let mut b = [0xffu8; 4];
        let n = usize::from(size.clamp(1, 4));
        self.h.pio_read(port, &mut b[..n]);
        u32::from_le_bytes(b) & if n == 4 { u32::MAX } else { (1u32 << (8 * n)) - 1 }
    }
    fn io_out(&mut self, port: u16, size: u8, value: u32) {
        let n = usize::from(size.clamp(1, 4));
        self.h.pio_write(port, &value.to_le_bytes()[..n]);
        // The write may have (re)armed a timer: look again at the next check.
        self.deadline = Some(0);
    }
    fn mmio_read(&mut self, gpa: u64, size: u8) -> u64 {
        let mut b = [0xffu8; 8];
        let n = usize::from(size.clamp(1, 8));
        self.h.mmio_read(gpa, &mut b[..n]);
        u64::from_le_bytes(b) & if n == 8 { u64::MAX } else { (1u64 << (8 * n)) - 1 }
    }
    fn mmio_write(&mut self, gpa: u64, size: u8, value: u64) {
        let n = usize::from(size.clamp(1, 8));
        self.h.mmio_write(gpa, &value.to_le_bytes()[..n]);
        self.deadline = Some(0);
    }
    fn interrupt_pending(&mut self) -> bool {
        // Timers fire on time: the CPU asks here every few thousand instructions.
        if let Some(d) = self.deadline {
            let now = (self.clock)();
            if now >= d {
                self.deadline = self.ic.poll(now);
            }
        }
        self.ic.interrupt_pending()
    }
    fn ack_interrupt(&mut self) -> Option<u8> {
        self.ic.acknowledge()
    }
    fn take_nmi(&mut self) -> bool {
        self.ic.take_nmi()
    }
    fn nmi_pending(&mut self) -> bool {
        self.ic.nmi_pending()
    }
    fn now_ns(&mut self) -> u64 {
        (self.clock)()
    }
    fn take_device_writes(&mut self) -> Vec<(u64, u64)> {
        self.device_writes.map(|f| f()).unwrap_or_default()
    }
}

fn seg_to_emu(s: &Segment) -> Seg {
    let attr = u32::from(s.type_ & 0xf)
        | (u32::from(s.s) << 4)
        | (u32::from(s.dpl & 3) << 5)
        | (u32::from(s.present) << 7)
        | (u32::from(s.avl) << 12)
        | (u32::from(s.l) << 13)
        | (u32::from(s.db) << 14)
        | (u32::from(s.g) << 15)
        | (u32::from(s.unusable) << 16);
    Seg { selector: s.selector, base: s.base, limit: s.limit, attr }
}

fn seg_from_emu(s: &Seg) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: (s.attr & 0xf) as u8,
        s: s.attr & (1 << 4) != 0,
        dpl: ((s.attr >> 5) & 3) as u8,
        present: s.attr & (1 << 7) != 0,
        avl: s.attr & (1 << 12) != 0,
        l: s.attr & (1 << 13) != 0,
        db: s.attr & (1 << 14) != 0,
        g: s.attr & (1 << 15) != 0,
        unusable: s.attr & (1 << 16) != 0,
    }
}

impl EmuVcpu {
    /// Creates a vCPU over guest RAM `ram`, taking interrupts from `ic` and time from `clock`.
    /// `tsc_hz` is the TSC frequency advertised in CPUID leaf 0x15 (and the LAPIC bus clock
    /// the interrupt controller must use).
    pub fn new(ram: &[RamRegion], ic: Box<dyn InterruptController>, clock: Clock, tsc_hz: u64, id: u8) -> EmuVcpu {
        let mut v = EmuVcpu::with_shared(SharedRam::new(ram), ic, clock, tsc_hz, id, 1);
        v.wait_for_sipi = false;
        v
    }

    /// Creates vCPU `id` (its APIC ID) of `cpus` over RAM shared with the VM's other vCPUs
    /// (one [`SharedRam`] per VM; each vCPU then runs on its own thread). vCPU 0 runs from
    /// its reset state (or the state the VMM sets); the others are application processors
    /// that wait for INIT and a start-up IPI from the guest, which
    /// [`InterruptController::take_startup`] reports.
    pub fn with_shared(
        shared: Arc<SharedRam>,
        ic: Box<dyn InterruptController>,
        clock: Clock,
        tsc_hz: u64,
        id: u8,
        cpus: u8,
    ) -> EmuVcpu {
        let mut cpu = Cpu::with_shared(shared, CpuConfig { tsc_hz, apic_id: id, cpus: cpus.max(1) });
        // Debugging aid: RUSTVISOR_EMU_TRACE=PATH writes every instruction's RIP and GPRs.
        if let Some(p) = std::env::var_os("RUSTVISOR_EMU_TRACE") {
            if let Ok(f) = std::fs::File::create(p) {
                cpu.trace = Some(Box::new(std::io::BufWriter::new(f)));
            }
        }
        let profile = std::env::var_os("RUSTVISOR_EMU_PROFILE").map(|p| (p.into(), Default::default()));
        EmuVcpu {
            cpu,
            id,
            wait_for_sipi: id != 0,
            ic,
            clock,
            stop: Arc::new(AtomicBool::new(false)),
            wakeup: Arc::new(Wakeup::new()),
            device_writes: None,
            profile,
        }
    }

    /// Makes the vCPU sleep on `wakeup` while halted, instead of a doorbell of its own: give
    /// it the one that the threads raising its interrupts ring (see [`Wakeup`]). A halted
    /// vCPU blocks until its next timer deadline on the guest clock, a ring, or a stop.
    pub fn with_wakeup(mut self, wakeup: Arc<Wakeup>) -> EmuVcpu {
        self.wakeup = wakeup;
        self
    }

    /// The doorbell this vCPU sleeps on while halted: ring it after raising an interrupt
    /// for it from another thread.
    pub fn wakeup(&self) -> Arc<Wakeup> {
        self.wakeup.clone()
    }

    /// Makes the vCPU ask `f` for guest RAM written by devices before it looks at the
    /// interrupt line (every few thousand instructions), retiring code decoded from those
    /// pages. `f` should be cheap when nothing was written.
    pub fn set_device_writes(&mut self, f: DeviceWrites) {
        self.device_writes = Some(f);
    }

    /// A flag that makes [`Vcpu::run`] return `Interrupted` at its next check (within one
    /// slice of instructions) when set; `run` clears it. Setting it does not wake a halted
    /// vCPU: from other threads use [`Vcpu::stopper`], which also rings its [`Wakeup`].
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    fn log_recent(&self, why: &str) {
        let c = &self.cpu;
        tracing::debug!(
            "emu stop: {why}; rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} cr2={:#x} idt={:#x}/{:#x} stats={:?} recent block starts: {:x?}",
            c.rip, c.gpr[4], c.cr0, c.cr3, c.cr4, c.efer, c.seg[1].selector, c.cr2, c.idtr_base, c.idtr_limit, c.stats, c.recent_rips()
        );
    }

    /// Captures the vCPU's state. Call it while the vCPU is not running (between two
    /// [`Vcpu::run`] calls).
    pub fn save_state(&self) -> EmuVcpuState {
        EmuVcpuState { cpu: self.cpu.save_state(), wait_for_sipi: self.wait_for_sipi }
    }

    /// Loads a state captured by [`EmuVcpu::save_state`], including the TSC frequency and
    /// APIC ID it was saved with, and drops all cached translations and decoded code. On
    /// error (a malformed state; the error names the field) the vCPU is left unchanged.
    pub fn restore_state(&mut self, s: &EmuVcpuState) -> std::result::Result<(), StateError> {
        self.cpu.restore_state(&s.cpu)?;
        self.wait_for_sipi = s.wait_for_sipi;
        Ok(())
    }

    /// Whether the vCPU is an application processor waiting for a start-up IPI.
    pub fn waits_for_sipi(&self) -> bool {
        self.wait_for_sipi
    }

    /// Acts on INIT and start-up IPIs sent to this vCPU: INIT puts the CPU in its INIT
    /// state (an application processor then waits for a SIPI; the bootstrap processor
    /// restarts at the reset vector), a SIPI starts a waiting processor at its vector and
    /// is ignored by any other (SDM Vol. 3A §9.4.4.1, §11.6.1).
    fn take_startup(&mut self) {
        let st = self.ic.take_startup();
        if st.init {
            self.cpu.init();
            self.wait_for_sipi = self.id != 0;
        }
        if let Some(v) = st.sipi {
            if self.wait_for_sipi {
                self.cpu.start_up(v);
                self.wait_for_sipi = false;
            }
        }
    }

    /// The emulated CPU (statistics, tracing).
    pub fn cpu(&mut self) -> &mut Cpu {
        &mut self.cpu
    }
}

impl Vcpu for EmuVcpu {
    fn save_snapshot(&mut self) -> Result<crate::VcpuSnapshot> {
        Ok(crate::VcpuSnapshot::Emu(Box::new(self.save_state())))
    }

    fn restore_snapshot(&mut self, state: &crate::VcpuSnapshot) -> Result<()> {
        match state {
            crate::VcpuSnapshot::Emu(s) => {
                self.restore_state(s).map_err(|e| Error::InvalidState { what: "emu vCPU", source: Box::new(e) })
            }
            crate::VcpuSnapshot::Kvm(_) => Err(Error::Unsupported("a kvm vCPU state on the emu accelerator".into())),
        }
    }

    fn stopper(&self) -> VcpuStopper {
        VcpuStopper::with_wakeup(self.stop.clone(), self.wakeup.clone())
    }

    fn set_state(&mut self, s: &CpuState) -> Result<()> {
        let c = &mut self.cpu;
        c.gpr = s.gprs;
        c.rip = s.rip;
        c.rflags = s.rflags | 2;
        for (i, seg) in s.segs.iter().enumerate() {
            c.seg[i] = seg_to_emu(seg);
        }
        c.ldtr = seg_to_emu(&s.ldt);
        c.tr = seg_to_emu(&s.tr);
        c.gdtr_base = s.gdt.base;
        c.gdtr_limit = s.gdt.limit;
        c.idtr_base = s.idt.base;
        c.idtr_limit = s.idt.limit;
        c.cr0 = s.cr0;
        c.cr2 = s.cr2;
        c.cr3 = s.cr3;
        c.cr4 = s.cr4;
        c.cr8 = s.cr8;
        c.efer = s.efer;
        c.flush_caches();
        Ok(())
    }

    fn state(&mut self) -> Result<CpuState> {
        let c = &self.cpu;
        let mut segs = [Segment::default(); 6];
        for (i, seg) in segs.iter_mut().enumerate() {
            *seg = seg_from_emu(&c.seg[i]);
        }
        Ok(CpuState {
            gprs: c.gpr,
            rip: c.rip,
            rflags: c.rflags,
            segs,
            ldt: seg_from_emu(&c.ldtr),
            tr: seg_from_emu(&c.tr),
            gdt: Table { base: c.gdtr_base, limit: c.gdtr_limit },
            idt: Table { base: c.idtr_base, limit: c.idtr_limit },
            cr0: c.cr0,
            cr2: c.cr2,
            cr3: c.cr3,
            cr4: c.cr4,
            cr8: c.cr8,
            efer: c.efer,
        })
    }

    fn run(&mut self, handler: &mut dyn ExitHandler) -> Result<VcpuExit> {
        let mut start = Instant::now();
        loop {
            if self.stop.swap(false, Ordering::AcqRel) {
                return Ok(VcpuExit::Interrupted);
            }
            self.take_startup();
            if self.wait_for_sipi {
                // Nothing runs until a SIPI (or a stop) rings the doorbell; a ring between
                // the look above and the wait is kept by the doorbell.
                self.wakeup.clear();
                self.take_startup();
                if self.wait_for_sipi && !self.stop.load(Ordering::Acquire) {
                    self.wakeup.wait(None);
                }
                start = Instant::now();
                continue;
            }
            let now = (self.clock)();
            let deadline = self.ic.poll(now);
            let exit = {
                let mut bus = Adapter {
                    h: handler,
                    ic: self.ic.as_mut(),
                    clock: &self.clock,
                    deadline,
                    device_writes: self.device_writes.as_ref(),
                };
                self.cpu.run(&mut bus, SLICE)
            };
            if let Some((_, samples)) = self.profile.as_mut() {
                *samples.entry(self.cpu.rip).or_default() += 1;
            }
            match exit {
                Exit::Budget => {}
                Exit::Halted => {
                    self.sleep_while_halted();
                    // The time asleep was not time on the host CPU.
                    start = Instant::now();
                }
                Exit::HaltedForever if self.id != 0 => {
                    // `cli; hlt` on an application processor: Linux parks CPUs it takes
                    // offline or stops this way; an NMI, an INIT or a stop ends it.
                    self.sleep_until_nmi();
                    start = Instant::now();
                }
                Exit::HaltedForever => {
                    // `cli; hlt` on the bootstrap processor: only an NMI could wake it, and
                    // Linux ends power-off this way when no firmware interface exists.
                    return Ok(VcpuExit::Shutdown);
                }
                Exit::TripleFault(why) => {
                    self.log_recent(&why);
                    return Ok(VcpuExit::Reset(format!("triple fault: {why}")));
                }
                Exit::Unsupported(what) => {
                    self.log_recent(&what);
                    return Err(Error::Internal(format!("emu: unimplemented instruction {what}")));
                }
            }
            if start.elapsed() >= RUN_QUANTUM {
                return Ok(VcpuExit::Interrupted);
            }
        }
    }
}

impl EmuVcpu {
    /// The CPU is halted with interrupts enabled: blocks until something can change that —
    /// the interrupt controller's next timer deadline (guest time runs at host speed while
    /// the vCPU runs, so the wait is that many host nanoseconds), an interrupt or NMI raised
    /// by another thread, or a stop — with no periodic wake-ups in between. Returns at once
    /// if an interrupt (or an NMI the CPU may take) is already pending or a timer is due;
    /// the caller's loop takes it.
    fn sleep_while_halted(&mut self) {
        // Rings from before this point are about interrupts the CPU has already seen, or
        // are looked at just below (pending interrupts, the stop flag): forget them first,
        // so a ring after these checks is not lost, and one before them does not cause a
        // spurious wake-up.
        self.wakeup.clear();
        if self.stop.load(Ordering::Acquire) {
            return;
        }
        let now = (self.clock)();
        let deadline = self.ic.poll(now);
        if self.ic.interrupt_pending() || (!self.cpu.nmi_blocked() && self.ic.nmi_pending()) {
            return;
        }
        let timeout = match deadline {
            Some(d) if d <= now => return,
            Some(d) => Some(Duration::from_nanos(d - now)),
            None => None,
        };
        self.wakeup.wait(timeout);
    }
}

impl EmuVcpu {
    /// The CPU is halted with interrupts disabled: blocks until an NMI it may take, an INIT
    /// (acted on here) or a stop, with no time-out. Returns at once if one is already there.
    fn sleep_until_nmi(&mut self) {
        // As in `sleep_while_halted`: forget older rings, then look, then wait.
        self.wakeup.clear();
        if self.stop.load(Ordering::Acquire) {
            return;
        }
        self.take_startup();
        if !self.cpu.is_halted() || self.wait_for_sipi || (!self.cpu.nmi_blocked() && self.ic.nmi_pending()) {
            return;
        }
        self.wakeup.wait(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;

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

    /// Records port writes; everything else reads as all ones.
    #[derive(Default)]
    struct Ports(Vec<(u16, Vec<u8>)>);

    impl ExitHandler for Ports {
        fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn pio_write(&mut self, port: u16, data: &[u8]) {
            self.0.push((port, data.to_vec()));
        }
        fn mmio_read(&mut self, _gpa: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn mmio_write(&mut self, _gpa: u64, _data: &[u8]) {}
    }

    const RAM: usize = 1 << 20;

    /// Real-mode guest at 0x1000: a loop of arithmetic and stores, then `out 0x80, ax`,
    /// `cli; hlt`.
    fn guest_ram() -> Vec<u8> {
        let mut a = CodeAssembler::new(16).unwrap();
        let mut top = a.create_label();
        a.mov(cx, 3000u32).unwrap();
        a.mov(si, 0x8000u32).unwrap();
        a.mov(bx, 0x1234u32).unwrap();
        a.set_label(&mut top).unwrap();
        a.add(ax, cx).unwrap();
        a.imul_3(bx, bx, 31).unwrap();
        a.xor(ax, bx).unwrap();
        a.mov(word_ptr(si), ax).unwrap();
        a.add(si, 2).unwrap();
        a.and(si, 0x9fff).unwrap();
        a.dec(cx).unwrap();
        a.jnz(top).unwrap();
        a.out(0x80, ax).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
        let code = a.assemble(0x1000).unwrap();
        let mut ram = vec![0u8; RAM];
        ram[0x1000..0x1000 + code.len()].copy_from_slice(&code);
        ram
    }

    fn vcpu_over(ram: &mut [u8], tsc_hz: u64) -> EmuVcpu {
        let regions = [RamRegion { gpa: 0, size: RAM as u64, host_addr: ram.as_mut_ptr() }];
        let clock: Clock = Arc::new(|| 0);
        EmuVcpu::new(&regions, Box::new(NoInterrupts), clock, tsc_hz, 0)
    }

    fn run_to_end(v: &mut EmuVcpu, io: &mut Ports) {
        for _ in 0..1000 {
            match v.run(io).unwrap() {
                VcpuExit::Interrupted => continue,
                VcpuExit::Shutdown => return,
                other => panic!("unexpected exit {other:?}"),
            }
        }
        panic!("guest did not finish");
    }

    #[test]
    fn save_restore_into_new_vcpu_continues_identically() {
        let mut ram_a = guest_ram();
        let mut a = vcpu_over(&mut ram_a, 1_000_000_000);
        let mut st = a.state().unwrap();
        st.segs[crate::state::seg::CS].base = 0;
        st.segs[crate::state::seg::CS].selector = 0;
        st.rip = 0x1000;
        a.set_state(&st).unwrap();
        a.cpu().msr.sysenter_eip = 0xabcd;
        // Partway through the loop.
        assert_eq!(a.cpu().run(&mut x86emu::NullBus, 5_000), Exit::Budget);
        let saved = a.save_state();
        let loaded = saved.clone();

        let mut ram_b = ram_a.clone();
        let mut b = vcpu_over(&mut ram_b, 42);
        b.restore_state(&loaded).unwrap();
        assert_eq!(b.save_state(), saved);
        assert_eq!(b.state().unwrap(), a.state().unwrap());

        let (mut io_a, mut io_b) = (Ports::default(), Ports::default());
        run_to_end(&mut a, &mut io_a);
        run_to_end(&mut b, &mut io_b);
        assert_eq!(a.save_state(), b.save_state());
        assert_eq!(io_a.0, io_b.0);
        assert_eq!(io_a.0.len(), 1);
        assert_eq!(b.save_state().cpu.msr.sysenter_eip, 0xabcd);
        assert_eq!(b.save_state().cpu.tsc_hz, 1_000_000_000);
        assert!(ram_a == ram_b, "guest RAM differs after the restored run");
    }

    #[test]
    fn malformed_state_is_an_error() {
        let mut ram = guest_ram();
        let mut v = vcpu_over(&mut ram, 1_000_000_000);
        let good = v.save_state();
        let mut bad = good.clone();
        bad.cpu.fpu.mxcsr = u32::MAX;
        let e = v.restore_state(&bad).unwrap_err();
        assert_eq!(e.field, "fpu.mxcsr");
        assert!(e.to_string().contains("fpu.mxcsr"), "{e}");
        assert_eq!(v.save_state(), good);
    }
}
