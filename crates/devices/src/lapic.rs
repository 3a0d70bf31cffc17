//! Local xAPIC of a single vCPU, per Intel SDM Vol. 3A chapter 11
//! ("Advanced Programmable Interrupt Controller (APIC)").
//!
//! MMIO page at [`LAPIC_BASE`] (4 KiB); registers are 32 bits wide at
//! 16-byte strides and must be accessed with aligned 32-bit loads/stores
//! (narrower loads inside the first dword of a register are also served;
//! any other access reads as zero / is ignored, never panics).
//!
//! | offset | register |
//! |---|---|
//! | 0x020 | APIC ID (bits 31:24, default 0) |
//! | 0x030 | version, read-only [`LAPIC_VERSION`] (version 0x14, 6 LVT entries) |
//! | 0x080 / 0x090 / 0x0A0 | TPR / APR (reads 0) / PPR |
//! | 0x0B0 | EOI (write-only) |
//! | 0x0D0 / 0x0E0 | LDR / DFR |
//! | 0x0F0 | SVR: bits 7:0 spurious vector, bit 8 APIC software enable |
//! | 0x100-0x170 / 0x180-0x1F0 / 0x200-0x270 | ISR / TMR / IRR, 256 bits each |
//! | 0x280 | ESR (write latches accumulated errors) |
//! | 0x300 / 0x310 | ICR low / high |
//! | 0x320-0x370 | LVT timer, thermal, perf counters, LINT0, LINT1, error |
//! | 0x380 / 0x390 / 0x3E0 | timer initial count / current count / divide configuration |
//!
//! The APIC timer counts down at `timer_hz / divisor` (the "bus clock"
//! frequency given at construction) in one-shot or periodic mode;
//! TSC-deadline mode is not supported (the CPU must not advertise it).
//! IPIs: a write of ICR low (0x300) latches the command as an [`Ipi`] that
//! the owner takes with [`Lapic::take_ipi`] and routes to the destination
//! APICs (`crate::irqchip` does, for every delivery mode: fixed,
//! lowest-priority, NMI, INIT, SIPI); the delivery-status bit (12) always
//! reads idle, the IPI being delivered within the write.

use serde::{Deserialize, Serialize};

use crate::ioapic::DeliveryMode;
use crate::{Clock, StateError, MIN_PERIODIC_TIMER_NS};

/// Default guest-physical base address of the local APIC page.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Size of the local APIC MMIO page, in bytes.
pub const LAPIC_SIZE: u64 = 0x1000;
/// Version register value: version 0x14 (integrated APIC), max LVT entry 5.
pub const LAPIC_VERSION: u32 = 0x0005_0014;
/// IA32_APIC_BASE MSR number.
pub const MSR_IA32_APIC_BASE: u32 = 0x1b;

const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_ENABLE: u64 = 1 << 11;

const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;

const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
/// Writable bits of each LVT entry (timer, thermal, perf, LINT0, LINT1, error).
const LVT_WRITABLE: [u32; 6] = [0x0003_00ff, 0x0001_07ff, 0x0001_07ff, 0x0001_a7ff, 0x0001_a7ff, 0x0001_00ff];

const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECV_ILLEGAL_VECTOR: u32 = 1 << 6;

const NS_PER_SEC: u128 = 1_000_000_000;

/// 256-bit vector register (ISR, TMR, IRR).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bits256([u32; 8]);

impl Bits256 {
    // `v >> 5` of a `u8` is 0-7, so the word lookups below always succeed.
    fn set(&mut self, v: u8) {
        if let Some(w) = self.0.get_mut(usize::from(v >> 5)) {
            *w |= 1 << (v & 31);
        }
    }
    fn clear(&mut self, v: u8) {
        if let Some(w) = self.0.get_mut(usize::from(v >> 5)) {
            *w &= !(1 << (v & 31));
        }
    }
    fn get(&self, v: u8) -> bool {
        self.0.get(usize::from(v >> 5)).is_some_and(|w| w & (1 << (v & 31)) != 0)
    }
    /// 32-bit word `i` (0-7) as the guest reads it; zero past the end.
    fn word(&self, i: usize) -> u32 {
        self.0.get(i).copied().unwrap_or(0)
    }
    fn highest(&self) -> Option<u8> {
        // A non-zero word has at most 31 leading zeros, so the bit number is 0-31.
        self.0
            .iter()
            .zip(0u8..8)
            .rev()
            .find(|&(&w, _)| w != 0)
            .map(|(&w, i)| i * 32 + ((31 - w.leading_zeros()) & 31) as u8)
    }
}

/// Running APIC timer.
#[derive(Debug, Clone, Copy)]
struct Timer {
    start_ns: u64,
    /// Counter decrements elapsed before `start_ns` (after a divide change).
    base_ticks: u64,
    /// Expirations already delivered.
    fired: u64,
}

/// Snapshot of a running APIC timer (see [`LapicState::timer`]).
///
/// Times are absolute readings of the shared [`Clock`] in nanoseconds: the
/// VMM keeps that clock continuous across a snapshot (it restores the clock
/// offset), so the timer resumes exactly where it was.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LapicTimerState {
    /// Clock time (ns) from which the current count is measured.
    pub start_ns: u64,
    /// Counter decrements that had elapsed before `start_ns` (after a divide
    /// configuration change).
    pub base_ticks: u64,
    /// Expirations already delivered since the initial count was written.
    pub fired: u64,
}

/// Snapshot of the local APIC (see [`Lapic::state`]).  Register values are
/// as the guest reads them at the offsets listed in the module
/// documentation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LapicState {
    /// APIC ID (register 0x020 bits 31:24).
    pub id: u8,
    /// IA32_APIC_BASE MSR value (base address, bit 8 BSP, bit 11 enable).
    pub apic_base: u64,
    /// Task priority register.
    pub tpr: u8,
    /// Logical destination register (bits 31:24 used).
    pub ldr: u32,
    /// Destination format register (bits 27:0 read as ones).
    pub dfr: u32,
    /// Spurious-interrupt vector register (bits 9:0).
    pub svr: u32,
    /// Error status register as last latched by a guest write.
    pub esr: u32,
    /// Errors accumulated since the last ESR write.
    pub esr_pending: u32,
    /// In-service register, 256 bits: bit `v % 32` of word `v / 32` is vector `v`.
    pub isr: [u32; 8],
    /// Trigger-mode register (1 = level), same layout as `isr`.
    pub tmr: [u32; 8],
    /// Interrupt request register, same layout as `isr`.
    pub irr: [u32; 8],
    /// Interrupt command register, low dword.
    pub icr_lo: u32,
    /// Interrupt command register, high dword (destination in bits 31:24).
    pub icr_hi: u32,
    /// LVT entries: timer, thermal, performance counters, LINT0, LINT1, error.
    pub lvt: [u32; 6],
    /// Timer initial count.
    pub timer_initial: u32,
    /// Timer divide configuration register (bits 0, 1, 3).
    pub timer_dcr: u32,
    /// The running timer, or `None` when stopped (initial count 0 or never written).
    pub timer: Option<LapicTimerState>,
    /// Timer input clock in Hz before the divider (the value the guest was
    /// told, e.g. through CPUID leaf 0x15); restored as well, non-zero.
    pub timer_hz: u64,
    /// An NMI (from an IPI or an IOAPIC message) waits for the CPU.
    pub nmi_pending: bool,
}

/// An interprocessor interrupt as the guest wrote it to the ICR (Intel SDM Vol. 3A §11.6.1,
/// Figure 11-12), for the owner of the APICs to route (see [`Lapic::take_ipi`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    /// Vector (bits 7:0); for a SIPI, the start page (the AP starts at `vector`·0x1000).
    pub vector: u8,
    /// Delivery mode (bits 10:8).
    pub mode: DeliveryMode,
    /// Logical destination mode (bit 11).
    pub logical: bool,
    /// Level (bit 14): 0 with level trigger is the INIT level de-assert, which does nothing.
    pub assert: bool,
    /// Level-triggered (bit 15).
    pub level_triggered: bool,
    /// Destination shorthand (bits 19:18): 0 none (use `dest`), 1 self, 2 all including
    /// self, 3 all excluding self.
    pub shorthand: u8,
    /// Destination (ICR high bits 31:24): an APIC ID, 0xFF for all, or a logical mask.
    pub dest: u8,
}

/// The local APIC.
pub struct Lapic {
    id: u8,
    apic_base: u64,
    tpr: u8,
    ldr: u32,
    dfr: u32,
    svr: u32,
    esr: u32,
    esr_pending: u32,
    isr: Bits256,
    tmr: Bits256,
    irr: Bits256,
    icr_lo: u32,
    icr_hi: u32,
    lvt: [u32; 6],
    timer_initial: u32,
    timer_dcr: u32,
    timer: Option<Timer>,
    timer_hz: u64,
    clock: Clock,
    nmi_pending: bool,
    /// An IPI written to the ICR and not yet taken by the owner.
    outgoing: Option<Ipi>,
}

impl Lapic {
    /// Creates the APIC of the bootstrap processor (APIC ID 0, globally
    /// enabled at [`LAPIC_BASE`], software-disabled, all LVTs masked).
    ///
    /// `timer_hz`: APIC timer input ("bus") clock in Hz before the divider
    /// (e.g. 1_000_000_000); `clock`: virtual time in ns, read on register
    /// accesses (current count, initial count writes).
    pub fn new(timer_hz: u64, clock: Clock) -> Self {
        Self::with_id(0, timer_hz, clock)
    }

    /// Creates the APIC with APIC ID `id`: the bootstrap processor's (IA32_APIC_BASE bit 8
    /// set) when `id` is 0, an application processor's otherwise; globally enabled at
    /// [`LAPIC_BASE`], software-disabled, all LVTs masked. `timer_hz` and `clock` as in
    /// [`Lapic::new`].
    pub fn with_id(id: u8, timer_hz: u64, clock: Clock) -> Self {
        let bsp = if id == 0 { APIC_BASE_BSP } else { 0 };
        let mut l = Self {
            id,
            apic_base: LAPIC_BASE | bsp | APIC_BASE_ENABLE,
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            esr: 0,
            esr_pending: 0,
            isr: Bits256::default(),
            tmr: Bits256::default(),
            irr: Bits256::default(),
            icr_lo: 0,
            icr_hi: 0,
            lvt: [0; 6],
            timer_initial: 0,
            timer_dcr: 0,
            timer: None,
            timer_hz: timer_hz.max(1),
            clock,
            nmi_pending: false,
            outgoing: None,
        };
        l.reset_registers();
        l
    }

    /// INIT (SDM §11.4.7.3): every register back to its power-up state except the APIC
    /// ID; IA32_APIC_BASE is unchanged.
    pub fn init(&mut self) {
        self.reset_registers();
        self.nmi_pending = false;
        self.outgoing = None;
    }

    /// Power-up register state (SDM §11.4.7.1), keeping the APIC ID.
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xffff_ffff;
        self.svr = 0xff;
        self.esr = 0;
        self.esr_pending = 0;
        self.isr = Bits256::default();
        self.tmr = Bits256::default();
        self.irr = Bits256::default();
        self.icr_lo = 0;
        self.icr_hi = 0;
        self.lvt = [LVT_MASKED; 6];
        self.timer_initial = 0;
        self.timer_dcr = 0;
        self.timer = None;
    }

    /// Snapshot of every register, the timer and the NMI latch.
    pub fn state(&self) -> LapicState {
        LapicState {
            id: self.id,
            apic_base: self.apic_base,
            tpr: self.tpr,
            ldr: self.ldr,
            dfr: self.dfr,
            svr: self.svr,
            esr: self.esr,
            esr_pending: self.esr_pending,
            isr: self.isr.0,
            tmr: self.tmr.0,
            irr: self.irr.0,
            icr_lo: self.icr_lo,
            icr_hi: self.icr_hi,
            lvt: self.lvt,
            timer_initial: self.timer_initial,
            timer_dcr: self.timer_dcr,
            timer: self.timer.map(|t| LapicTimerState {
                start_ns: t.start_ns,
                base_ticks: t.base_ticks,
                fired: t.fired,
            }),
            timer_hz: self.timer_hz,
            nmi_pending: self.nmi_pending,
        }
    }

    /// Checks `s` without applying it (see [`Lapic::restore`]).
    pub fn validate(&self, s: &LapicState) -> Result<(), StateError> {
        let base_ok = s.apic_base & !(0x0000_000f_ffff_f000 | APIC_BASE_BSP | APIC_BASE_ENABLE) == 0;
        StateError::check(base_ok, "lapic.apic_base", format!("{:#x}: reserved bits set", s.apic_base))?;
        StateError::check(s.ldr & 0x00ff_ffff == 0, "lapic.ldr", format!("{:#x}: reserved bits set", s.ldr))?;
        StateError::check(s.dfr | 0xf000_0000 == u32::MAX, "lapic.dfr", format!("{:#x}: bits 27:0 not ones", s.dfr))?;
        StateError::check(s.svr & !0x3ff == 0, "lapic.svr", format!("{:#x}: reserved bits set", s.svr))?;
        StateError::check(s.esr & !0xff == 0, "lapic.esr", format!("{:#x}: reserved bits set", s.esr))?;
        StateError::check(
            s.esr_pending & !0xff == 0,
            "lapic.esr_pending",
            format!("{:#x}: reserved bits", s.esr_pending),
        )?;
        for (name, bits) in [("lapic.isr", &s.isr), ("lapic.tmr", &s.tmr), ("lapic.irr", &s.irr)] {
            StateError::check(bits[0] & 0xffff == 0, name, format!("vectors 0-15 set ({:#x})", bits[0] & 0xffff))?;
        }
        StateError::check(s.icr_lo & !0x000c_cfff == 0, "lapic.icr_lo", format!("{:#x}: reserved bits", s.icr_lo))?;
        StateError::check(s.icr_hi & 0x00ff_ffff == 0, "lapic.icr_hi", format!("{:#x}: reserved bits", s.icr_hi))?;
        for (i, (&v, &w)) in s.lvt.iter().zip(LVT_WRITABLE.iter()).enumerate() {
            let remote_irr = if i == LVT_LINT0 || i == LVT_LINT1 { 1 << 14 } else { 0 };
            StateError::check(v & !(w | remote_irr) == 0, format!("lapic.lvt[{i}]"), format!("{v:#x}: reserved bits"))?;
        }
        StateError::check(s.timer_dcr & !0xb == 0, "lapic.timer_dcr", format!("{:#x}: reserved bits", s.timer_dcr))?;
        StateError::check(s.timer_hz != 0, "lapic.timer_hz", "zero")
    }

    /// Loads a snapshot taken by [`Lapic::state`] (including the timer input
    /// frequency); the clock stays the one given to [`Lapic::new`].  The
    /// timer's times are clock readings (see [`LapicTimerState`]).  On error
    /// the APIC is left unchanged.
    pub fn restore(&mut self, s: &LapicState) -> Result<(), StateError> {
        self.validate(s)?;
        self.id = s.id;
        self.apic_base = s.apic_base;
        self.tpr = s.tpr;
        self.ldr = s.ldr;
        self.dfr = s.dfr;
        self.svr = s.svr;
        self.esr = s.esr;
        self.esr_pending = s.esr_pending;
        self.isr = Bits256(s.isr);
        self.tmr = Bits256(s.tmr);
        self.irr = Bits256(s.irr);
        self.icr_lo = s.icr_lo;
        self.icr_hi = s.icr_hi;
        self.lvt = s.lvt;
        self.timer_initial = s.timer_initial;
        self.timer_dcr = s.timer_dcr;
        self.timer = s.timer.map(|t| Timer { start_ns: t.start_ns, base_ticks: t.base_ticks, fired: t.fired });
        self.timer_hz = s.timer_hz;
        self.nmi_pending = s.nmi_pending;
        Ok(())
    }

    /// IA32_APIC_BASE MSR value (bit 8 BSP, bit 11 global enable, bits
    /// 35:12 base address).
    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// Guest write of IA32_APIC_BASE.  Clearing bit 11 globally disables the
    /// APIC and resets its registers; x2APIC enable (bit 10) is not
    /// supported and ignored; the BSP bit is read-only.  A relocated base is
    /// recorded but the MMIO page stays where the bus maps it.
    pub fn set_apic_base(&mut self, value: u64) {
        let enable = value & APIC_BASE_ENABLE != 0;
        if !enable && self.global_enabled() {
            self.reset_registers();
        }
        let bsp = self.apic_base & APIC_BASE_BSP;
        self.apic_base = (value & 0x0000_000f_ffff_f000) | bsp | if enable { APIC_BASE_ENABLE } else { 0 };
    }

    fn global_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_ENABLE != 0
    }

    fn sw_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// Whether the APIC is both globally (IA32_APIC_BASE bit 11) and
    /// software (SVR bit 8) enabled, i.e. accepts and delivers interrupts.
    pub fn enabled(&self) -> bool {
        self.global_enabled() && self.sw_enabled()
    }

    /// Whether the 8259 PIC's INT output reaches the CPU: through LINT0 when
    /// LVT LINT0 is unmasked with ExtINT delivery (virtual wire mode), or
    /// directly when the APIC is globally or software disabled.  With the APIC
    /// enabled and LINT0 masked (or not ExtINT), PIC interrupts are blocked,
    /// as on hardware in symmetric I/O mode.
    pub fn accepts_pic_interrupts(&self) -> bool {
        if !self.enabled() {
            return true;
        }
        let lint0 = self.lvt[LVT_LINT0];
        lint0 & LVT_MASKED == 0 && DeliveryMode::from_bits(u64::from(lint0)) == DeliveryMode::ExtInt
    }

    /// APIC ID (bits 31:24 of the ID register).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Task priority register (0-255).
    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    /// Sets the task priority register (0-255).
    pub fn set_tpr(&mut self, tpr: u8) {
        self.tpr = tpr;
    }

    /// CR8 view of the TPR (bits 7:4 of TPR, 0-15) for 64-bit mode `MOV CR8`.
    pub fn cr8(&self) -> u64 {
        u64::from(self.tpr >> 4)
    }

    /// `MOV CR8, value`: sets TPR = (value & 0xf) << 4.
    pub fn set_cr8(&mut self, value: u64) {
        self.tpr = ((value & 0xf) as u8) << 4;
    }

    /// Processor priority (SDM §11.8.3.1): TPR if its class is at least the
    /// class of the highest in-service vector, else that class.
    pub fn ppr(&self) -> u8 {
        let isrv = self.isr.highest().unwrap_or(0);
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// Returns and clears the NMI latch (set by an NMI IPI or an NMI IOAPIC
    /// message).  The CPU should deliver an NMI when it returns `true`.
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi_pending)
    }

    /// Whether an NMI is latched (see [`Lapic::take_nmi`]), without clearing it.
    pub fn nmi_pending(&self) -> bool {
        self.nmi_pending
    }

    /// Latches an NMI for the CPU (see [`Lapic::take_nmi`]).
    pub fn raise_nmi(&mut self) {
        self.nmi_pending = true;
    }

    /// Accepts a fixed interrupt `vector` from the APIC bus or a local
    /// source: sets its IRR bit, and its TMR bit if `level_triggered`
    /// (so that its EOI is broadcast to the IOAPIC).
    ///
    /// Returns `false` if it was dropped: APIC disabled, or illegal vector
    /// (0-15, recorded in ESR).  A vector already pending in IRR coalesces.
    pub fn accept_interrupt(&mut self, vector: u8, level_triggered: bool) -> bool {
        if !self.enabled() {
            return false;
        }
        if vector < 16 {
            self.esr_pending |= ESR_RECV_ILLEGAL_VECTOR;
            return false;
        }
        self.irr.set(vector);
        if level_triggered {
            self.tmr.set(vector);
        } else {
            self.tmr.clear(vector);
        }
        true
    }

    /// Whether the APIC has an interrupt to present to the CPU: the highest
    /// IRR vector's priority class (bits 7:4) exceeds the PPR's.
    pub fn has_interrupt(&self) -> bool {
        self.enabled() && self.irr.highest().is_some_and(|v| v >> 4 > self.ppr() >> 4)
    }

    /// Interrupt acknowledge: moves the highest pending vector from IRR to
    /// ISR and returns it, or `None` if [`Lapic::has_interrupt`] is false.
    pub fn acknowledge(&mut self) -> Option<u8> {
        if !self.has_interrupt() {
            return None;
        }
        let v = self.irr.highest()?;
        self.irr.clear(v);
        self.isr.set(v);
        Some(v)
    }

    /// End of interrupt (a write to the EOI register): retires the highest
    /// in-service vector.  Returns that vector if its TMR bit is set — the
    /// caller must then broadcast the EOI to the IOAPIC ([`crate::IoApic::eoi`]).
    pub fn eoi(&mut self) -> Option<u8> {
        let v = self.isr.highest()?;
        self.isr.clear(v);
        self.tmr.get(v).then_some(v)
    }

    /// Whether this APIC is a target of `dest` (SDM §11.6.2): physical mode
    /// matches the APIC ID or broadcast 0xFF; logical mode uses LDR/DFR
    /// (flat or cluster model).
    pub fn matches_destination(&self, dest: u8, logical: bool) -> bool {
        if !logical {
            return dest == 0xff || dest == self.id;
        }
        if dest == 0xff {
            return true;
        }
        let lid = (self.ldr >> 24) as u8;
        if self.dfr >> 28 == 0xf {
            lid & dest != 0
        } else {
            (dest >> 4 == lid >> 4 || dest >> 4 == 0xf) && (dest & lid & 0xf) != 0
        }
    }

    fn divisor(&self) -> u64 {
        let v = (self.timer_dcr & 3) | ((self.timer_dcr >> 1) & 4);
        1 << ((v + 1) & 7)
    }

    fn periodic(&self) -> bool {
        self.lvt[LVT_TIMER] & LVT_TIMER_PERIODIC != 0
    }

    /// [`MIN_PERIODIC_TIMER_NS`] in counter decrements at the current divider.
    fn min_periodic_ticks(&self) -> u64 {
        let ticks = (u128::from(MIN_PERIODIC_TIMER_NS) * u128::from(self.timer_hz))
            .div_ceil(NS_PER_SEC * u128::from(self.divisor()));
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }

    /// Counter decrements elapsed at `now` for a running timer.
    fn timer_elapsed(&self, t: &Timer, now: u64) -> u64 {
        let ns = u128::from(now.saturating_sub(t.start_ns));
        let ticks = ns * u128::from(self.timer_hz) / (NS_PER_SEC * u128::from(self.divisor()));
        t.base_ticks.saturating_add(u64::try_from(ticks).unwrap_or(u64::MAX))
    }

    /// Virtual time at which the counter has decremented `ticks` times.
    fn timer_deadline(&self, t: &Timer, ticks: u64) -> u64 {
        let rel = u128::from(ticks.saturating_sub(t.base_ticks));
        let ns = (rel * NS_PER_SEC * u128::from(self.divisor())).div_ceil(u128::from(self.timer_hz));
        t.start_ns.saturating_add(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn current_count(&self, now: u64) -> u32 {
        let (Some(t), init) = (self.timer.as_ref(), u64::from(self.timer_initial)) else {
            return 0;
        };
        if init == 0 {
            return 0;
        }
        let d = self.timer_elapsed(t, now);
        let c = if self.periodic() { init - d % init } else { init.saturating_sub(d) };
        // `c` is at most `init`, which came from a `u32`.
        u32::try_from(c).unwrap_or(u32::MAX)
    }

    /// Runs the APIC timer up to `now_ns`: if it expired (once or more
    /// since the last call), sets the LVT timer vector in IRR (once;
    /// expirations are coalesced) unless masked.  Returns the virtual time
    /// (ns) of the next expiration, or `None` if the timer is stopped.
    pub fn poll(&mut self, now_ns: u64) -> Option<u64> {
        let mut t = self.timer?;
        let init = u64::from(self.timer_initial);
        if init == 0 {
            return None;
        }
        let d = self.timer_elapsed(&t, now_ns);
        let periodic = self.periodic();
        // Periodic interrupts come at most every MIN_PERIODIC_TIMER_NS; the count keeps
        // running on the initial count (see `current_count`).
        let period = if periodic { init.max(self.min_periodic_ticks()) } else { init };
        let n = if periodic { d / period } else { u64::from(d >= init) };
        if n > t.fired {
            t.fired = n;
            self.timer = Some(t);
            let lvt = self.lvt[LVT_TIMER];
            if lvt & LVT_MASKED == 0 {
                self.accept_interrupt((lvt & 0xff) as u8, false);
            }
        } else if periodic && n < t.fired {
            // Counted on another grid (a state saved before the minimum period existed):
            // count from here on.
            t.fired = n;
            self.timer = Some(t);
        }
        let next = if periodic {
            n.checked_add(1)?.checked_mul(period)?
        } else if n == 0 {
            init
        } else {
            return None;
        };
        Some(self.timer_deadline(&t, next))
    }

    /// Latches the ICR's command for the owner (see [`Lapic::take_ipi`]). A fixed or
    /// lowest-priority IPI with an illegal vector (0-15) is not sent and sets the "send
    /// illegal vector" error (SDM §11.5.3).
    fn send_ipi(&mut self) {
        let lo = self.icr_lo;
        let ipi = Ipi {
            vector: (lo & 0xff) as u8,
            mode: DeliveryMode::from_bits(u64::from(lo)),
            logical: lo & (1 << 11) != 0,
            assert: lo & (1 << 14) != 0,
            level_triggered: lo & (1 << 15) != 0,
            shorthand: ((lo >> 18) & 3) as u8,
            dest: (self.icr_hi >> 24) as u8,
        };
        if matches!(ipi.mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && ipi.vector < 16 {
            self.esr_pending |= ESR_SEND_ILLEGAL_VECTOR;
            return;
        }
        self.outgoing = Some(ipi);
    }

    /// The IPI the guest last wrote to the ICR, if not taken yet: the owner of the APICs
    /// delivers it to its destinations (an APIC alone cannot reach the others).
    pub fn take_ipi(&mut self) -> Option<Ipi> {
        self.outgoing.take()
    }

    /// Reads the 32-bit register at `offset` (16-byte aligned, 0..0x1000).
    pub fn read_register(&self, offset: u64) -> u32 {
        let idx = ((offset >> 4) & 7) as usize;
        match offset {
            0x020 => u32::from(self.id) << 24,
            0x030 => LAPIC_VERSION,
            0x080 => u32::from(self.tpr),
            0x0a0 => u32::from(self.ppr()),
            0x0d0 => self.ldr,
            0x0e0 => self.dfr,
            0x0f0 => self.svr,
            0x100..=0x170 => self.isr.word(idx),
            0x180..=0x1f0 => self.tmr.word(idx),
            0x200..=0x270 => self.irr.word(idx),
            0x280 => self.esr,
            0x300 => self.icr_lo,
            0x310 => self.icr_hi,
            // LVT entries 0-5.
            0x320..=0x370 => self.lvt.get(((offset - 0x320) >> 4) as usize).copied().unwrap_or(0),
            0x380 => self.timer_initial,
            0x390 => self.current_count((self.clock)()),
            0x3e0 => self.timer_dcr,
            // APR, EOI, RRD and reserved registers read as zero.
            _ => 0,
        }
    }

    /// Writes the 32-bit register at `offset` (16-byte aligned).
    ///
    /// Returns `Some(vector)` when the write was an EOI of a level-triggered
    /// interrupt that must be broadcast to the IOAPIC.
    pub fn write_register(&mut self, offset: u64, value: u32) -> Option<u8> {
        match offset {
            0x020 => self.id = (value >> 24) as u8,
            0x080 => self.tpr = (value & 0xff) as u8,
            0x0b0 => return self.eoi(),
            0x0d0 => self.ldr = value & 0xff00_0000,
            0x0e0 => self.dfr = value | 0x0fff_ffff,
            0x0f0 => {
                self.svr = value & 0x3ff;
                if !self.sw_enabled() {
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            0x280 => {
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            0x300 => {
                self.icr_lo = value & 0x000c_cfff;
                self.send_ipi();
            }
            0x310 => self.icr_hi = value & 0xff00_0000,
            0x320..=0x370 => {
                // LVT entries 0-5: always found.
                let i = ((offset - 0x320) >> 4) as usize;
                let sw_enabled = self.sw_enabled();
                if let Some((l, &writable)) = self.lvt.iter_mut().zip(&LVT_WRITABLE).nth(i) {
                    let mut v = value & writable;
                    if i == LVT_LINT0 || i == LVT_LINT1 {
                        // Remote IRR (bit 14) is read-only.
                        v |= *l & (1 << 14);
                    }
                    if !sw_enabled {
                        v |= LVT_MASKED;
                    }
                    *l = v;
                }
            }
            0x380 => {
                self.timer_initial = value;
                self.timer = (value != 0).then(|| Timer { start_ns: (self.clock)(), base_ticks: 0, fired: 0 });
            }
            0x3e0 => {
                let now = (self.clock)();
                if let Some(mut t) = self.timer {
                    t.base_ticks = self.timer_elapsed(&t, now);
                    t.start_ns = now;
                    self.timer = Some(t);
                }
                self.timer_dcr = value & 0xb;
            }
            // Read-only or reserved.
            _ => {}
        }
        None
    }

    /// Guest load of `data.len()` bytes at `offset` within the APIC page.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let within = (offset & 0xf) as usize;
        let range = within..within.saturating_add(data.len());
        if range.end <= 4 {
            let v = self.read_register(offset & 0xff0).to_le_bytes();
            if let Some(src) = v.get(range) {
                data.copy_from_slice(src);
                return;
            }
        }
        data.fill(0);
    }

    /// Guest store at `offset` within the APIC page; only aligned 4-byte
    /// stores have an effect.  Returns a vector whose EOI must be broadcast
    /// to the IOAPIC, as [`Lapic::write_register`].
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) -> Option<u8> {
        match <[u8; 4]>::try_from(data) {
            Ok(b) if offset & 0xf == 0 && offset < LAPIC_SIZE => self.write_register(offset, u32::from_le_bytes(b)),
            _ => {
                tracing::debug!("lapic: ignored {}-byte write at offset {offset:#x}", data.len());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    fn lapic(hz: u64) -> (Lapic, Arc<AtomicU64>) {
        let t = Arc::new(AtomicU64::new(5_000));
        let tc = t.clone();
        let mut l = Lapic::new(hz, Arc::new(move || tc.load(Ordering::SeqCst)));
        l.write_register(0xf0, 0x1ff); // software enable, spurious 0xff
        (l, t)
    }

    #[test]
    fn reset_and_basic_registers() {
        let t: Clock = Arc::new(|| 0);
        let mut l = Lapic::new(1_000_000_000, t);
        assert_eq!(l.read_register(0x30), 0x0005_0014);
        assert_eq!(l.read_register(0x20), 0);
        assert_eq!(l.read_register(0xe0), 0xffff_ffff);
        assert_eq!(l.read_register(0xf0), 0xff);
        assert_eq!(l.read_register(0x350), LVT_MASKED);
        assert!(!l.enabled());
        assert!(l.accepts_pic_interrupts());
        // Interrupts are dropped while software-disabled.
        assert!(!l.accept_interrupt(0x40, false));
        // LVTs stay masked while software-disabled.
        l.write_register(0x350, 0x700);
        assert_eq!(l.read_register(0x350), 0x10700);
        l.write_register(0xf0, 0x1ff);
        assert!(l.enabled());
        assert!(!l.accepts_pic_interrupts(), "LINT0 masked");
        l.write_register(0x350, 0x700);
        assert!(l.accepts_pic_interrupts(), "virtual wire: LINT0 ExtINT");
        // Partial reads inside a register; odd accesses are harmless.
        let mut b = [0u8; 1];
        l.mmio_read(0x32, &mut b);
        assert_eq!(b[0], 0x05);
        let mut b8 = [0u8; 8];
        l.mmio_read(0x30, &mut b8);
        assert_eq!(b8, [0; 8]);
        assert_eq!(l.mmio_write(0x33, &[1, 2, 3, 4]), None);
        assert_eq!(l.mmio_write(0xff0, &[1, 2]), None);
        // Global disable via IA32_APIC_BASE: PIC goes straight to the CPU.
        l.set_apic_base(LAPIC_BASE);
        assert!(!l.enabled());
        assert!(l.accepts_pic_interrupts());
        assert_eq!(l.read_register(0xf0), 0xff, "registers reset");
        l.set_apic_base(LAPIC_BASE | APIC_BASE_ENABLE);
        assert_eq!(l.apic_base(), 0xfee0_0900);
    }

    #[test]
    fn priority_tpr_and_eoi() {
        let (mut l, _) = lapic(1_000_000_000);
        assert!(l.accept_interrupt(0x51, false));
        assert!(l.accept_interrupt(0x62, false));
        // TPR class 6 blocks both (class must be strictly greater).
        l.write_register(0x80, 0x60);
        assert!(!l.has_interrupt());
        assert_eq!(l.acknowledge(), None);
        l.set_cr8(5);
        assert_eq!(l.read_register(0x80), 0x50);
        assert!(l.has_interrupt());
        assert_eq!(l.acknowledge(), Some(0x62));
        assert_eq!(l.read_register(0xa0), 0x60, "PPR = ISR class");
        // 0x51 is blocked by the in-service 0x62.
        assert!(!l.has_interrupt());
        assert_eq!(l.read_register(0x100 + 0x30) & (1 << 2), 1 << 2, "ISR bit 0x62");
        assert_eq!(l.write_register(0xb0, 0), None, "edge EOI: no broadcast");
        // Still blocked by TPR 0x50 (same class as 0x51).
        assert!(!l.has_interrupt());
        l.write_register(0x80, 0);
        assert_eq!(l.acknowledge(), Some(0x51));
        assert_eq!(l.eoi(), None);
        assert_eq!(l.eoi(), None);
        // Illegal vectors are rejected and recorded in ESR.
        assert!(!l.accept_interrupt(3, false));
        l.write_register(0x280, 0);
        assert_eq!(l.read_register(0x280), ESR_RECV_ILLEGAL_VECTOR);
        // Level-triggered interrupt: EOI reports the vector for the IOAPIC.
        l.accept_interrupt(0x70, true);
        assert_eq!(l.acknowledge(), Some(0x70));
        assert_eq!(l.mmio_write(0xb0, &[0; 4]), Some(0x70));
    }

    #[test]
    fn icr_writes_latch_ipis_for_the_owner() {
        let (mut l, _) = lapic(1_000_000_000);
        assert_eq!(l.take_ipi(), None);
        l.write_register(0x310, 0x0300_0000);
        l.write_register(0x300, 0x0004_0045); // self shorthand, fixed, vector 0x45
        let ipi = l.take_ipi().unwrap();
        assert_eq!((ipi.vector, ipi.mode, ipi.shorthand, ipi.dest), (0x45, DeliveryMode::Fixed, 1, 3));
        assert_eq!(l.take_ipi(), None, "taken once");
        l.write_register(0x300, 0x0000_8500); // INIT level de-assert
        let ipi = l.take_ipi().unwrap();
        assert_eq!((ipi.mode, ipi.assert, ipi.level_triggered), (DeliveryMode::Init, false, true));
        l.write_register(0x300, 0x0000_4698); // SIPI, start page 0x98
        assert_eq!(l.take_ipi().map(|i| (i.mode, i.vector)), Some((DeliveryMode::Startup, 0x98)));
        l.write_register(0x300, 0x0000_0849); // logical, fixed 0x49
        assert!(l.take_ipi().unwrap().logical);
        // An illegal vector is not sent and is an error.
        l.write_register(0x300, 0x0004_0005);
        assert_eq!(l.take_ipi(), None);
        l.write_register(0x280, 0);
        assert_eq!(l.read_register(0x280), ESR_SEND_ILLEGAL_VECTOR);
        // Delivery status always idle.
        l.write_register(0x300, 0x0004_0046);
        assert_eq!(l.read_register(0x300) & (1 << 12), 0);
    }

    #[test]
    fn oneshot_timer() {
        // 100 MHz bus clock, divide by 1: 10 ns per count.
        let (mut l, t) = lapic(100_000_000);
        l.write_register(0x3e0, 0xb);
        l.write_register(0x320, 0x30); // one-shot, vector 0x30, unmasked
        let t0 = t.load(Ordering::SeqCst);
        l.write_register(0x380, 1000);
        assert_eq!(l.read_register(0x390), 1000);
        t.store(t0 + 2_500, Ordering::SeqCst);
        assert_eq!(l.read_register(0x390), 750);
        assert_eq!(l.poll(t0 + 2_500), Some(t0 + 10_000));
        assert!(!l.has_interrupt());
        assert_eq!(l.poll(t0 + 10_000), None);
        assert_eq!(l.acknowledge(), Some(0x30));
        t.store(t0 + 20_000, Ordering::SeqCst);
        assert_eq!(l.read_register(0x390), 0);
        assert_eq!(l.poll(t0 + 50_000), None);
        assert!(!l.has_interrupt(), "one-shot fires once");
        // Divide by 2 doubles the period.
        l.write_register(0x3e0, 0x0);
        let t1 = t.load(Ordering::SeqCst);
        l.write_register(0x380, 1000);
        assert_eq!(l.poll(t1), Some(t1 + 20_000));
        // Writing 0 stops the timer.
        l.write_register(0x380, 0);
        assert_eq!(l.poll(t1 + 100_000), None);
        assert!(!l.has_interrupt());
    }

    #[test]
    fn periodic_timer() {
        let (mut l, t) = lapic(100_000_000);
        l.write_register(0x3e0, 0xb);
        l.write_register(0x320, 0x2_0031); // periodic, vector 0x31
        let t0 = t.load(Ordering::SeqCst);
        l.write_register(0x380, 100_000); // 1 ms period
        assert_eq!(l.poll(t0), Some(t0 + 1_000_000));
        assert_eq!(l.poll(t0 + 1_000_000), Some(t0 + 2_000_000));
        assert_eq!(l.acknowledge(), Some(0x31));
        l.eoi();
        // Several periods late: one interrupt, next deadline on the grid.
        assert_eq!(l.poll(t0 + 5_500_000), Some(t0 + 6_000_000));
        assert_eq!(l.acknowledge(), Some(0x31));
        assert_eq!(l.acknowledge(), None);
        t.store(t0 + 5_500_000, Ordering::SeqCst);
        assert_eq!(l.read_register(0x390), 50_000);
        // Masked: counts but does not interrupt.
        l.write_register(0x320, 0x3_0031);
        assert_eq!(l.poll(t0 + 7_000_000), Some(t0 + 8_000_000));
        assert!(!l.has_interrupt());
    }

    #[test]
    fn periodic_interrupts_are_spaced_by_the_minimum_period() {
        // 1 GHz, divide by 1, initial count 1: a 1 ns period. The count runs on it; the
        // interrupts (and the deadlines the vCPU sleeps to) come every 200 us.
        let (mut l, t) = lapic(1_000_000_000);
        l.write_register(0x3e0, 0xb);
        l.write_register(0x320, 0x2_0031);
        let t0 = t.load(Ordering::SeqCst);
        l.write_register(0x380, 1);
        let min = crate::MIN_PERIODIC_TIMER_NS;
        assert_eq!(l.poll(t0 + 10), Some(t0 + min));
        assert!(!l.has_interrupt());
        assert_eq!(l.poll(t0 + min), Some(t0 + 2 * min));
        assert_eq!(l.acknowledge(), Some(0x31));
        l.eoi();
        t.store(t0 + min + 7, Ordering::SeqCst);
        assert_eq!(l.read_register(0x390), 1, "the count wraps every ns");
        // A slower divider shortens the minimum in counts, not in time.
        l.write_register(0x3e0, 0xa); // divide by 128
        let d = l.poll(t0 + min + 7).unwrap();
        assert!(d > t0 + min + 7 && d <= t0 + 2 * min + 7 + 128, "{d}");
        // (The divider change moved the interrupt grid: whatever it raised is retired.)
        while l.acknowledge().is_some() {
            l.eoi();
        }
        // A state counted on the 1 ns grid (as an older binary saved it) continues without
        // going silent for the billion expirations it claims.
        let mut s = l.state();
        if let Some(timer) = s.timer.as_mut() {
            timer.fired = 1 << 40;
        }
        l.restore(&s).unwrap();
        let next = l.poll(t0 + 3 * min).unwrap();
        assert!(!l.has_interrupt());
        l.poll(next);
        assert_eq!(l.acknowledge(), Some(0x31));
    }

    #[test]
    fn state_round_trip_with_running_timer() {
        // 100 MHz bus clock, divide by 1: 10 ns per count.
        let (mut l, t) = lapic(100_000_000);
        l.write_register(0x20, 0x0300_0000);
        l.write_register(0xd0, 0x0400_0000);
        l.write_register(0xe0, 0x0fff_ffff); // cluster model
        l.write_register(0x80, 0x20);
        l.write_register(0x350, 0x700); // LINT0 ExtINT
        l.write_register(0x370, 0xfe); // error vector
        l.write_register(0x310, 0x0300_0000);
        l.write_register(0x300, 0x0004_4000 | 0x44); // self IPI 0x44 (level bit)
        l.accept_interrupt(0x61, true);
        assert_eq!(l.acknowledge(), Some(0x61));
        l.accept_interrupt(0x30, false);
        l.accept_interrupt(3, false); // illegal: ESR pending
        l.raise_nmi();
        l.write_register(0x3e0, 0xb);
        l.write_register(0x320, 0x2_0031); // periodic, vector 0x31
        let t0 = t.load(Ordering::SeqCst);
        l.write_register(0x380, 100_000); // 1 ms period
        assert_eq!(l.poll(t0 + 1_500_000), Some(t0 + 2_000_000));
        l.write_register(0x3e0, 0x0); // divide by 2 while running: base_ticks
        t.store(t0 + 1_700_000, Ordering::SeqCst);
        let s = l.state();
        assert!(s.timer.is_some());
        let json = serde_json::to_string(&s).unwrap();
        let s2: LapicState = serde_json::from_str(&json).unwrap();
        assert_eq!(s2, s);
        // A fresh APIC in a "new process" whose clock was restored to continue from the
        // same reading.
        let t2 = Arc::new(AtomicU64::new(t0 + 1_700_000));
        let tc = t2.clone();
        let mut other = Lapic::new(1, Arc::new(move || tc.load(Ordering::SeqCst)));
        other.restore(&s2).unwrap();
        assert_eq!(other.state(), s);
        for off in (0..0x400).step_by(16) {
            assert_eq!(l.read_register(off), other.read_register(off), "register {off:#x}");
        }
        assert!(other.take_nmi());
        assert!(l.take_nmi());
        for now in [t0 + 2_000_000, t0 + 3_000_000, t0 + 3_999_999, t0 + 9_000_000] {
            assert_eq!(l.poll(now), other.poll(now), "deadline at {now}");
            t.store(now, Ordering::SeqCst);
            t2.store(now, Ordering::SeqCst);
            assert_eq!(l.read_register(0x390), other.read_register(0x390));
            assert_eq!(l.acknowledge(), other.acknowledge());
            assert_eq!(l.eoi(), other.eoi());
        }
        assert_eq!(l.state(), other.state());
    }

    #[test]
    fn malformed_state_is_rejected() {
        let (mut l, _) = lapic(1_000_000_000);
        let good = l.state();
        type Corrupt = (&'static str, fn(&mut LapicState));
        let cases: [Corrupt; 8] = [
            ("lapic.irr", |s| s.irr[0] = 1 << 3),
            ("lapic.isr", |s| s.isr[0] = 1),
            ("lapic.lvt[0]", |s| s.lvt[0] = 1 << 20),
            ("lapic.timer_hz", |s| s.timer_hz = 0),
            ("lapic.apic_base", |s| s.apic_base |= 1 << 10),
            ("lapic.dfr", |s| s.dfr = 0),
            ("lapic.svr", |s| s.svr = 0x1000),
            ("lapic.timer_dcr", |s| s.timer_dcr = 4),
        ];
        for (field, corrupt) in cases {
            let mut bad = good.clone();
            corrupt(&mut bad);
            assert_eq!(l.restore(&bad).unwrap_err().field, field);
        }
        assert_eq!(l.state(), good);
        let mut v = serde_json::to_value(&good).unwrap();
        v["lvt"].as_array_mut().unwrap().pop();
        assert!(serde_json::from_value::<LapicState>(v).is_err());
    }

    #[test]
    fn hostile_accesses() {
        let (mut l, t) = lapic(0);
        for off in (0..0x1010u64).step_by(4) {
            for v in [0u32, 0xffff_ffff, 0x0004_0010, 0x8000_0000] {
                l.mmio_write(off, &v.to_le_bytes());
                let mut b = [0u8; 4];
                l.mmio_read(off, &mut b);
                l.poll(t.load(Ordering::SeqCst));
                t.fetch_add(1_000_000_007, Ordering::SeqCst);
                l.acknowledge();
                l.eoi();
            }
        }
        l.poll(u64::MAX);
        l.write_register(0x380, u32::MAX);
        l.write_register(0x320, 0x2_0040);
        l.poll(u64::MAX);
        l.poll(0);
        // Post-conditions: the read-only version register survived and the state the noise
        // left is one a snapshot can restore.
        assert_eq!(l.read_register(0x30), 0x0005_0014);
        let st = l.state();
        l.restore(&st).expect("the state hostile accesses leave restores");
        assert_eq!(l.state(), st);
    }
}
