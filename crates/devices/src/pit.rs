//! Intel 8254 programmable interval timer (PIT) at ports 0x40-0x43, plus the
//! PC/AT "system control port B" at port 0x61 (channel 2 gate, speaker, OUT2
//! read-back), following the Intel 8254 datasheet (order no. 231164).
//!
//! * Input clock: [`PIT_HZ`] = 1.193182 MHz.
//! * Channel 0 OUT drives ISA IRQ 0 (rising edges are signalled by
//!   [`Pit::poll`]); channel 1 (DRAM refresh) is a free-running counter;
//!   channel 2's gate is port 0x61 bit 0 and its OUT is readable at port
//!   0x61 bit 5.  Gates of channels 0 and 1 are tied high.
//! * Modes 0-5 are implemented (counts, OUT levels, gate effects), as well as
//!   the counter-latch and read-back commands and LSB / MSB / LSB-then-MSB
//!   access.  BCD counting is accepted but the counter counts in binary.
//!   In mode 3 an odd count behaves like the next lower even count.
//!
//! Time is virtual: the device reads a [`Clock`] (nanoseconds) on every port
//! access, and counter values are computed from the elapsed time since the
//! count was loaded, so they decrease with time exactly as Linux's TSC
//! calibration (`pit_calibrate_tsc`, `quick_pit_calibrate`) expects.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::{read_bytes, write_bytes, PioDevice};
use crate::irq::IrqLine;
use crate::MIN_PERIODIC_TIMER_NS;
use crate::{Clock, StateError};

/// PIT input clock frequency in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// First PIT port (channel 0 data); ports 0x40-0x42 are channel data, 0x43
/// is the mode/command register.
pub const PIT_BASE: u16 = 0x40;
/// Number of PIT ports starting at [`PIT_BASE`].
pub const PIT_PORTS: u16 = 4;
/// System control port B (NMI status and control) — PC/AT speaker port.
pub const SPEAKER_PORT: u16 = 0x61;

const NS_PER_SEC: u128 = 1_000_000_000;
/// [`MIN_PERIODIC_TIMER_NS`] in input-clock ticks (239).
const MIN_PERIODIC_TICKS: u64 = (MIN_PERIODIC_TIMER_NS * PIT_HZ).div_ceil(1_000_000_000);
/// Period of the port 0x61 bit 4 "refresh request" toggle, in ns.
const REFRESH_TOGGLE_NS: u64 = 15_085;

/// Whole PIT input-clock ticks in `ns` nanoseconds (floor).
pub fn ns_to_ticks(ns: u64) -> u64 {
    // PIT_HZ < NS_PER_SEC, so the quotient is at most `ns`: it always fits.
    u64::try_from(u128::from(ns) * u128::from(PIT_HZ) / NS_PER_SEC).unwrap_or(u64::MAX)
}

/// Nanoseconds until at least `ticks` PIT input-clock ticks have elapsed
/// (ceiling), saturating at `u64::MAX`.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * NS_PER_SEC).div_ceil(u128::from(PIT_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Not counting: the counter holds `count`, OUT is `out`.
    Stopped { count: u16, out: bool },
    /// Counting since `start_ns`; `base_ticks` had elapsed before that
    /// (non-zero after a gate pause in modes 0/4).
    Counting { start_ns: u64, base_ticks: u64 },
    /// Mode 0/4 with gate low: counting suspended after `ticks`.
    Paused { ticks: u64 },
}

/// Counting state of a PIT channel in a snapshot ([`PitChannelState::run`]).
///
/// Times are absolute readings of the shared [`Clock`] in nanoseconds: the
/// VMM keeps that clock continuous across a snapshot (it restores the clock
/// offset), so counters resume exactly where they were.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PitRunState {
    /// Not counting: the counter holds `count` and OUT is `out`.
    Stopped {
        /// Counter value.
        count: u16,
        /// OUT level.
        out: bool,
    },
    /// Counting since clock time `start_ns`, with `base_ticks` input-clock
    /// ticks elapsed before it (after a gate pause in modes 0/4).
    Counting {
        /// Clock time (ns) counting (re)started.
        start_ns: u64,
        /// Input-clock ticks counted before `start_ns`.
        base_ticks: u64,
    },
    /// Mode 0/4 with the gate low: counting suspended after `ticks`
    /// input-clock ticks.
    Paused {
        /// Input-clock ticks counted so far.
        ticks: u64,
    },
}

/// Snapshot of one 8254 counter (see [`PitState`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PitChannelState {
    /// Counter mode, 0-5.
    pub mode: u8,
    /// Access mode: 1 = LSB, 2 = MSB, 3 = LSB then MSB.
    pub rw: u8,
    /// BCD flag of the control word (counting is binary).
    pub bcd: bool,
    /// Initial count, 1..=0x10000 (a written 0 means 0x10000).
    pub reload: u32,
    /// Control word written but no count loaded since (status bit 6).
    pub null_count: bool,
    /// Counting state.
    pub run: PitRunState,
    /// Gate input level (always high for channels 0 and 1; port 0x61 bit 0
    /// for channel 2).
    pub gate: bool,
    /// First byte of an LSB-then-MSB count write awaiting its MSB.
    pub write_lsb: Option<u8>,
    /// Read flip-flop of LSB-then-MSB reads: the next byte read is the MSB.
    pub read_msb: bool,
    /// Latched count not yet fully read.
    pub latched_count: Option<u16>,
    /// Latched status byte not yet read.
    pub latched_status: Option<u8>,
    /// OUT rising edges already signalled since the count was loaded
    /// (channel 0 interrupts).
    pub fired: u64,
}

/// Snapshot of the PIT and port 0x61 (see [`Pit::state`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PitState {
    /// Channels 0, 1 and 2.
    pub channels: [PitChannelState; 3],
    /// Port 0x61 bits 3:0 as last written (bit 0 = channel 2 gate, bit 1 =
    /// speaker data enable, bits 2-3 parity/IOCHK check enables).
    pub port61: u8,
}

#[derive(Debug, Clone)]
struct Channel {
    /// Counter mode 0-5.
    mode: u8,
    /// Access mode: 1 = LSB, 2 = MSB, 3 = LSB then MSB.
    rw: u8,
    bcd: bool,
    /// Initial count, 1..=0x10000 (a written 0 means 0x10000).
    reload: u32,
    /// Control word written but no count loaded since.
    null_count: bool,
    run: Run,
    gate: bool,
    /// LSB of a pending LSB-then-MSB count write.
    write_lsb: Option<u8>,
    /// Read flip-flop for LSB-then-MSB reads: next byte is the MSB.
    read_msb: bool,
    latched_count: Option<u16>,
    latched_status: Option<u8>,
    /// Number of OUT rising edges already signalled (channel 0 IRQs).
    fired: u64,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Self {
            mode: 0,
            rw: 3,
            bcd: false,
            reload: 0x10000,
            null_count: true,
            run: Run::Stopped { count: 0, out: false },
            gate,
            write_lsb: None,
            read_msb: false,
            latched_count: None,
            latched_status: None,
            fired: 0,
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.mode, 2 | 3)
    }

    /// Input-clock ticks elapsed since the count was loaded (counting time only).
    fn elapsed(&self, now: u64) -> Option<u64> {
        match self.run {
            Run::Stopped { .. } => None,
            Run::Counting { start_ns, base_ticks } => {
                Some(base_ticks.saturating_add(ns_to_ticks(now.saturating_sub(start_ns))))
            }
            Run::Paused { ticks } => Some(ticks),
        }
    }

    fn count(&self, now: u64) -> u16 {
        let Some(d) = self.elapsed(now) else {
            if let Run::Stopped { count, .. } = self.run {
                return count;
            }
            return 0;
        };
        let n = u64::from(self.reload);
        let v = match self.mode {
            2 => n - d % n,
            3 => n - (2 * (d % n)) % n,
            _ => (n + 0x10000 - d % 0x10000) & 0xffff,
        };
        (v & 0xffff) as u16
    }

    fn out(&self, now: u64) -> bool {
        let Some(d) = self.elapsed(now) else {
            return match self.run {
                Run::Stopped { out, .. } => out,
                _ => true,
            };
        };
        let n = u64::from(self.reload);
        match self.mode {
            0 | 1 => d >= n,
            2 => n < 2 || d % n != n - 1,
            3 => d % n < n.div_ceil(2),
            _ => d != n,
        }
    }

    /// Ticks between two interrupt events: the reload value, and in the periodic modes at
    /// least [`MIN_PERIODIC_TIMER_NS`] worth of ticks (the count still runs on the reload
    /// value; only the interrupts are spaced out).
    fn irq_period(&self) -> u64 {
        let n = u64::from(self.reload);
        if self.periodic() {
            n.max(MIN_PERIODIC_TICKS)
        } else {
            n
        }
    }

    /// Interrupt events (OUT rising edges, periodic ones at most every
    /// [`MIN_PERIODIC_TIMER_NS`]) that occurred within `d` ticks.
    fn events(&self, d: u64) -> u64 {
        let n = self.irq_period();
        if self.periodic() {
            d / n
        } else {
            u64::from(d >= n)
        }
    }

    /// Tick at which interrupt event number `k` (1-based) occurs, if any.
    fn event_tick(&self, k: u64) -> Option<u64> {
        let n = self.irq_period();
        if self.periodic() {
            k.checked_mul(n)
        } else {
            (k == 1).then_some(n)
        }
    }

    fn status(&self, now: u64) -> u8 {
        (u8::from(self.out(now)) << 7)
            | (u8::from(self.null_count) << 6)
            | (self.rw << 4)
            | (self.mode << 1)
            | u8::from(self.bcd)
    }

    fn latch_count(&mut self, now: u64) {
        if self.latched_count.is_none() {
            self.latched_count = Some(self.count(now));
        }
    }

    fn latch_status(&mut self, now: u64) {
        if self.latched_status.is_none() {
            self.latched_status = Some(self.status(now));
        }
    }

    fn control(&mut self, mode: u8, rw: u8, bcd: bool, now: u64) {
        let count = self.count(now);
        self.mode = if mode > 5 { mode - 4 } else { mode };
        self.rw = rw;
        self.bcd = bcd;
        self.null_count = true;
        self.write_lsb = None;
        self.read_msb = false;
        self.latched_count = None;
        self.latched_status = None;
        self.run = Run::Stopped { count, out: self.mode != 0 };
    }

    fn load(&mut self, value: u16, now: u64) {
        self.reload = if value == 0 { 0x10000 } else { u32::from(value) };
        self.null_count = false;
        self.fired = 0;
        let reload16 = (self.reload & 0xffff) as u16;
        self.run = match self.mode {
            0 | 4 if self.gate => Run::Counting { start_ns: now, base_ticks: 0 },
            0 | 4 => Run::Paused { ticks: 0 },
            2 | 3 if self.gate => Run::Counting { start_ns: now, base_ticks: 0 },
            // Modes 1/5 wait for a gate trigger; a running one-shot continues.
            _ => match self.run {
                r @ Run::Counting { .. } if !self.periodic() => r,
                _ => Run::Stopped { count: reload16, out: true },
            },
        };
    }

    fn write_data(&mut self, value: u8, now: u64) {
        match self.rw {
            1 => self.load(u16::from(value), now),
            2 => self.load(u16::from(value) << 8, now),
            _ => match self.write_lsb.take() {
                Some(lsb) => self.load(u16::from_le_bytes([lsb, value]), now),
                None => self.write_lsb = Some(value),
            },
        }
    }

    fn read_data(&mut self, now: u64) -> u8 {
        if let Some(s) = self.latched_status.take() {
            return s;
        }
        let (value, latched) = match self.latched_count {
            Some(v) => (v, true),
            None => (self.count(now), false),
        };
        let [lsb, msb] = value.to_le_bytes();
        let (byte, done) = match self.rw {
            1 => (lsb, true),
            2 => (msb, true),
            _ => {
                let msb_now = self.read_msb;
                self.read_msb = !msb_now;
                if msb_now {
                    (msb, true)
                } else {
                    (lsb, false)
                }
            }
        };
        if latched && done {
            self.latched_count = None;
        }
        byte
    }

    fn set_gate(&mut self, gate: bool, now: u64) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        match self.mode {
            0 | 4 => match (gate, self.run) {
                (false, Run::Counting { .. }) => {
                    let ticks = self.elapsed(now).unwrap_or(0);
                    self.run = Run::Paused { ticks };
                }
                (true, Run::Paused { ticks }) => {
                    self.run = Run::Counting { start_ns: now, base_ticks: ticks };
                }
                _ => {}
            },
            _ => {
                if gate {
                    // Rising edge: (re)trigger modes 1/5, restart modes 2/3.
                    if !self.null_count {
                        self.run = Run::Counting { start_ns: now, base_ticks: 0 };
                        self.fired = 0;
                    }
                } else if self.periodic() && matches!(self.run, Run::Counting { .. }) {
                    // Gate low stops modes 2/3 with OUT forced high.
                    self.run = Run::Stopped { count: self.count(now), out: true };
                }
            }
        }
    }
}

/// The 8254 PIT with port 0x61.
///
/// Register the same instance at ports 0x40 (len 4) and 0x61 (len 1).
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bits 0-3 as written (gate 2, speaker enable, parity/IOCHK
    /// check enables).
    port61: u8,
    clock: Clock,
    irq0: Arc<dyn IrqLine>,
}

impl Pit {
    /// Creates a PIT whose counters are timed by `clock` (ns) and whose
    /// channel 0 output is signalled (as one pulse per rising edge, see
    /// [`Pit::poll`]) on `irq0` (ISA IRQ 0 / GSI 2 on the IOAPIC).
    ///
    /// All channels start unprogrammed (no count loaded, no interrupts).
    pub fn new(clock: Clock, irq0: Arc<dyn IrqLine>) -> Self {
        Self { channels: [Channel::new(true), Channel::new(true), Channel::new(false)], port61: 0, clock, irq0 }
    }

    fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Snapshot of the three channels and port 0x61.
    pub fn state(&self) -> PitState {
        let ch = |c: &Channel| PitChannelState {
            mode: c.mode,
            rw: c.rw,
            bcd: c.bcd,
            reload: c.reload,
            null_count: c.null_count,
            run: match c.run {
                Run::Stopped { count, out } => PitRunState::Stopped { count, out },
                Run::Counting { start_ns, base_ticks } => PitRunState::Counting { start_ns, base_ticks },
                Run::Paused { ticks } => PitRunState::Paused { ticks },
            },
            gate: c.gate,
            write_lsb: c.write_lsb,
            read_msb: c.read_msb,
            latched_count: c.latched_count,
            latched_status: c.latched_status,
            fired: c.fired,
        };
        PitState {
            channels: [ch(&self.channels[0]), ch(&self.channels[1]), ch(&self.channels[2])],
            port61: self.port61,
        }
    }

    /// Checks `s` without applying it (see [`Pit::restore`]).
    pub fn validate(&self, s: &PitState) -> Result<(), StateError> {
        StateError::check(s.port61 & !0x0f == 0, "pit.port61", format!("{:#x}: bits 7:4 set", s.port61))?;
        for (i, c) in s.channels.iter().enumerate() {
            let f = |name: &str| format!("pit.channels[{i}].{name}");
            StateError::check(c.mode <= 5, f("mode"), format!("{} > 5", c.mode))?;
            StateError::check((1..=3).contains(&c.rw), f("rw"), format!("{} not 1-3", c.rw))?;
            StateError::check(
                (1..=0x10000).contains(&c.reload),
                f("reload"),
                format!("{:#x} not 1-0x10000", c.reload),
            )?;
            let gate = if i == 2 { s.port61 & 1 != 0 } else { true };
            StateError::check(c.gate == gate, f("gate"), format!("{} disagrees with the wiring", c.gate))?;
        }
        Ok(())
    }

    /// Loads a snapshot taken by [`Pit::state`]; the clock and IRQ 0 line stay
    /// those given to [`Pit::new`], and nothing is signalled on IRQ 0.  Times
    /// are clock readings (see [`PitRunState`]).  On error the PIT is left
    /// unchanged.
    pub fn restore(&mut self, s: &PitState) -> Result<(), StateError> {
        self.validate(s)?;
        for (c, st) in self.channels.iter_mut().zip(s.channels.iter()) {
            *c = Channel {
                mode: st.mode,
                rw: st.rw,
                bcd: st.bcd,
                reload: st.reload,
                null_count: st.null_count,
                run: match st.run {
                    PitRunState::Stopped { count, out } => Run::Stopped { count, out },
                    PitRunState::Counting { start_ns, base_ticks } => Run::Counting { start_ns, base_ticks },
                    PitRunState::Paused { ticks } => Run::Paused { ticks },
                },
                gate: st.gate,
                write_lsb: st.write_lsb,
                read_msb: st.read_msb,
                latched_count: st.latched_count,
                latched_status: st.latched_status,
                fired: st.fired,
            };
        }
        self.port61 = s.port61;
        Ok(())
    }

    /// Signals channel 0's OUT rising edges that happened up to `now_ns` on
    /// IRQ 0 — at most one pulse per call however many periods elapsed
    /// (lost ticks are coalesced, as with a real edge-triggered PIC that was
    /// not serviced) — and returns the virtual time (ns) of the next edge,
    /// or `None` if channel 0 will not produce one (stopped, one-shot done).
    ///
    /// Call it whenever the returned deadline passes and after guest accesses
    /// to the PIT ports (which may reprogram channel 0).
    pub fn poll(&mut self, now_ns: u64) -> Option<u64> {
        let ch = &mut self.channels[0];
        let Run::Counting { start_ns, base_ticks } = ch.run else {
            return None;
        };
        let d = base_ticks.saturating_add(ns_to_ticks(now_ns.saturating_sub(start_ns)));
        let n = ch.events(d);
        if n > ch.fired {
            ch.fired = n;
            self.irq0.pulse();
        } else if n < ch.fired {
            // Counted on another grid (a state saved before the minimum period existed):
            // count from here on.
            ch.fired = n;
        }
        let next = ch.event_tick(n.saturating_add(1))?;
        Some(start_ns.saturating_add(ticks_to_ns(next.saturating_sub(base_ticks))))
    }

    /// Current count of channel `ch` (0-2) at `now_ns`, for debugging and tests.
    pub fn count(&self, ch: usize, now_ns: u64) -> Option<u16> {
        self.channels.get(ch).map(|c| c.count(now_ns))
    }

    /// OUT level of channel `ch` (0-2) at `now_ns`.
    pub fn out(&self, ch: usize, now_ns: u64) -> Option<bool> {
        self.channels.get(ch).map(|c| c.out(now_ns))
    }

    fn write_control(&mut self, value: u8, now: u64) {
        let sc = value >> 6;
        let rw = (value >> 4) & 3;
        let mode = (value >> 1) & 7;
        let bcd = value & 1 != 0;
        if sc == 3 {
            // Read-back: bit 5 = 0 latch count, bit 4 = 0 latch status,
            // bits 1-3 select channels 0-2.
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if value & (2 << i) == 0 {
                    continue;
                }
                if value & 0x20 == 0 {
                    ch.latch_count(now);
                }
                if value & 0x10 == 0 {
                    ch.latch_status(now);
                }
            }
            return;
        }
        // `sc` is 0-2 here (3 is read-back, handled above).
        let Some(ch) = self.channels.get_mut(usize::from(sc)) else {
            return;
        };
        if rw == 0 {
            ch.latch_count(now);
        } else {
            ch.control(mode, rw, bcd, now);
        }
    }

    fn port61(&self, now: u64) -> u8 {
        let refresh = (now / REFRESH_TOGGLE_NS) & 1 != 0;
        (self.port61 & 0x0f) | (u8::from(refresh) << 4) | (u8::from(self.channels[2].out(now)) << 5)
    }

    fn read_byte(&mut self, port: u16, now: u64) -> u8 {
        match port {
            0x40..=0x42 => self.channels.get_mut(usize::from(port - 0x40)).map_or(0xff, |ch| ch.read_data(now)),
            SPEAKER_PORT => self.port61(now),
            // The control register is write-only.
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, port: u16, value: u8, now: u64) {
        match port {
            0x40..=0x42 => {
                if let Some(ch) = self.channels.get_mut(usize::from(port - 0x40)) {
                    ch.write_data(value, now);
                }
            }
            0x43 => self.write_control(value, now),
            SPEAKER_PORT => {
                self.port61 = value & 0x0f;
                self.channels[2].set_gate(value & 1 != 0, now);
            }
            _ => {}
        }
    }
}

impl PioDevice for Pit {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        let now = self.now();
        read_bytes(port, data, |p| self.read_byte(p, now));
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        let now = self.now();
        write_bytes(port, data, |p, v| self.write_byte(p, v, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::RecordingIrq;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Env {
        t: Arc<AtomicU64>,
        irq: Arc<RecordingIrq>,
        pit: Pit,
    }

    impl Env {
        fn new() -> Self {
            let t = Arc::new(AtomicU64::new(1_000_000));
            let irq = Arc::new(RecordingIrq::new());
            let tc = t.clone();
            let pit = Pit::new(Arc::new(move || tc.load(Ordering::SeqCst)), irq.clone());
            Self { t, irq, pit }
        }
        fn now(&self) -> u64 {
            self.t.load(Ordering::SeqCst)
        }
        fn advance_ticks(&self, ticks: u64) {
            self.t.fetch_add(ticks_to_ns(ticks), Ordering::SeqCst);
        }
        fn outb(&mut self, port: u16, v: u8) {
            self.pit.write(port, &[v]);
        }
        fn inb(&mut self, port: u16) -> u8 {
            let mut b = [0];
            self.pit.read(port, &mut b);
            b[0]
        }
    }

    #[test]
    fn tick_conversions() {
        assert_eq!(ns_to_ticks(1_000_000_000), PIT_HZ);
        for t in [0, 1, 2, 11_931, 65_536, 1 << 40] {
            assert!(ns_to_ticks(ticks_to_ns(t)) >= t);
            assert!(ns_to_ticks(ticks_to_ns(t).saturating_sub(1)) < t.max(1));
        }
        assert_eq!(ticks_to_ns(u64::MAX), u64::MAX);
    }

    #[test]
    fn count_decrements_with_clock() {
        let mut e = Env::new();
        // Channel 0, LSB/MSB, mode 2, count 1000.
        e.outb(0x43, 0x34);
        e.outb(0x40, 0xe8);
        e.outb(0x40, 0x03);
        let read = |e: &mut Env| {
            e.outb(0x43, 0x00); // latch channel 0
            let lo = e.inb(0x40);
            let hi = e.inb(0x40);
            u16::from_le_bytes([lo, hi])
        };
        assert_eq!(read(&mut e), 1000);
        e.advance_ticks(100);
        assert_eq!(read(&mut e), 900);
        e.advance_ticks(899);
        assert_eq!(read(&mut e), 1);
        e.advance_ticks(1);
        assert_eq!(read(&mut e), 1000, "mode 2 reloads");
        // Latch holds its value until read, even as time passes.
        e.outb(0x43, 0x00);
        e.advance_ticks(10);
        e.outb(0x43, 0x00); // second latch ignored
        assert_eq!(e.inb(0x40), 0xe8);
        assert_eq!(e.inb(0x40), 0x03);
        // Unlatched reads are live.
        assert_eq!(e.inb(0x40), 990u16.to_le_bytes()[0]);
    }

    #[test]
    fn linux_pit_calibrate_tsc_channel2_mode0() {
        let mut e = Env::new();
        // outb((inb(0x61) & ~0x02) | 0x01, 0x61): gate high, speaker off.
        let v = (e.inb(0x61) & !0x02) | 0x01;
        e.outb(0x61, v);
        // Mode 0, channel 2, LSB/MSB; latch = 10 ms.
        let latch = u16::try_from(PIT_HZ / 100).unwrap();
        e.outb(0x43, 0xb0);
        e.outb(0x42, (latch & 0xff) as u8);
        e.outb(0x42, (latch >> 8) as u8);
        assert_eq!(e.inb(0x61) & 0x20, 0, "OUT low while counting");
        // Poll port 0x61 every 1 us until OUT goes high.
        let start = e.now();
        let mut polls = 0u64;
        while e.inb(0x61) & 0x20 == 0 {
            e.t.fetch_add(1_000, Ordering::SeqCst);
            polls += 1;
            assert!(polls < 20_000);
        }
        let elapsed = e.now() - start;
        // Exactly `latch` ticks (within one poll step).
        let expect = ticks_to_ns(u64::from(latch));
        assert!(elapsed >= expect && elapsed < expect + 1_000, "{elapsed} vs {expect}");
        // OUT stays high; the counter keeps wrapping down.
        e.advance_ticks(5);
        assert_ne!(e.inb(0x61) & 0x20, 0);
        // Gate low pauses mode 0 counting.
        let before = e.pit.count(2, e.now()).unwrap();
        e.outb(0x61, 0x00);
        e.advance_ticks(1000);
        assert_eq!(e.pit.count(2, e.now()).unwrap(), before);
        e.outb(0x61, 0x01);
        e.advance_ticks(10);
        assert_eq!(e.pit.count(2, e.now()).unwrap(), before.wrapping_sub(10));
    }

    #[test]
    fn linux_quick_pit_calibrate_msb_reads() {
        let mut e = Env::new();
        e.outb(0x61, 0x01);
        e.outb(0x43, 0xb0);
        e.outb(0x42, 0xff);
        e.outb(0x42, 0xff);
        // pit_verify_msb: read LSB (ignored), then MSB, without latching.
        let mut msb_seen = Vec::new();
        let mut last = 0x100u16;
        for _ in 0..40 {
            let _lsb = e.inb(0x42);
            let msb = u16::from(e.inb(0x42));
            assert!(msb <= last, "count must not increase");
            if msb != last {
                msb_seen.push(msb);
            }
            last = msb;
            e.advance_ticks(64);
        }
        // The MSB walks down 0xff, 0xfe, ... one step per 256 ticks.
        assert_eq!(msb_seen[..4], [0xff, 0xfe, 0xfd, 0xfc]);
    }

    #[test]
    fn periodic_irq0() {
        let mut e = Env::new();
        let period: u16 = 11_932; // ~10 ms
        e.outb(0x43, 0x34);
        e.outb(0x40, (period & 0xff) as u8);
        e.outb(0x40, (period >> 8) as u8);
        let t0 = e.now();
        let next = e.pit.poll(t0).unwrap();
        assert_eq!(e.irq.take_edges(), 0);
        assert_eq!(next, t0 + ticks_to_ns(u64::from(period)));
        assert_eq!(e.pit.poll(next - 1), Some(next));
        assert_eq!(e.irq.take_edges(), 0);
        let next2 = e.pit.poll(next).unwrap();
        assert_eq!(e.irq.take_edges(), 1);
        assert_eq!(next2, t0 + ticks_to_ns(2 * u64::from(period)));
        // Polling again at the same time raises nothing.
        e.pit.poll(next);
        assert_eq!(e.irq.take_edges(), 0);
        // Many periods elapsed: coalesced into one edge.
        let late = t0 + ticks_to_ns(10 * u64::from(period)) + 5;
        let next3 = e.pit.poll(late).unwrap();
        assert_eq!(e.irq.take_edges(), 1);
        assert_eq!(next3, t0 + ticks_to_ns(11 * u64::from(period)));
        // Square wave (mode 3) also yields one edge per period.
        e.outb(0x43, 0x36);
        e.outb(0x40, 0x00);
        e.outb(0x40, 0x10); // 4096
        let t1 = e.now();
        assert!(e.pit.out(0, t1).unwrap());
        assert!(!e.pit.out(0, t1 + ticks_to_ns(2048)).unwrap());
        let n = e.pit.poll(t1).unwrap();
        assert_eq!(n, t1 + ticks_to_ns(4096));
        e.pit.poll(n);
        assert_eq!(e.irq.take_edges(), 1);
    }

    #[test]
    fn periodic_irq0_is_spaced_by_the_minimum_period() {
        let mut e = Env::new();
        // Mode 2, reload 1 (838 ns): the count runs on it, IRQ 0 comes every 239 ticks.
        e.outb(0x43, 0x34);
        e.outb(0x40, 1);
        e.outb(0x40, 0);
        let t0 = e.now();
        let next = e.pit.poll(t0).unwrap();
        assert_eq!(next, t0 + ticks_to_ns(MIN_PERIODIC_TICKS));
        assert!(next - t0 >= MIN_PERIODIC_TIMER_NS);
        assert_eq!(e.pit.poll(next - 1), Some(next));
        assert_eq!(e.irq.take_edges(), 0);
        assert_eq!(e.pit.poll(next), Some(t0 + ticks_to_ns(2 * MIN_PERIODIC_TICKS)));
        assert_eq!(e.irq.take_edges(), 1);
        // A state counted on the 838 ns grid continues instead of going silent.
        let mut s = e.pit.state();
        s.channels[0].fired = 1 << 40;
        e.pit.restore(&s).unwrap();
        let later = t0 + ticks_to_ns(5 * MIN_PERIODIC_TICKS);
        let n = e.pit.poll(later).unwrap();
        assert_eq!(e.irq.take_edges(), 0);
        e.pit.poll(n);
        assert_eq!(e.irq.take_edges(), 1);
    }

    #[test]
    fn oneshot_mode4_irq0_and_readback() {
        let mut e = Env::new();
        e.outb(0x43, 0x38); // ch0, LSB/MSB, mode 4
        assert_eq!(e.pit.poll(e.now()), None, "no count loaded");
        e.outb(0x40, 100);
        e.outb(0x40, 0);
        let t0 = e.now();
        let dl = e.pit.poll(t0).unwrap();
        assert_eq!(dl, t0 + ticks_to_ns(100));
        assert_eq!(e.pit.poll(dl), None);
        assert_eq!(e.irq.take_edges(), 1);
        // Read-back status of channel 0: OUT high (after the strobe), mode 4, rw 3.
        e.advance_ticks(200);
        e.outb(0x43, 0xe2); // read-back, status only, channel 0
        assert_eq!(e.inb(0x40), 0x80 | 0x30 | (4 << 1), "status");
        // Read-back count only.
        e.outb(0x43, 0xd2);
        let lo = e.inb(0x40);
        let hi = e.inb(0x40);
        let c = u16::from_le_bytes([lo, hi]);
        assert_eq!(c, 100u16.wrapping_sub(200));
        // Mode 0 one-shot: single edge.
        e.outb(0x43, 0x30);
        e.outb(0x40, 10);
        e.outb(0x40, 0);
        e.advance_ticks(1000);
        assert_eq!(e.pit.poll(e.now()), None);
        assert_eq!(e.irq.take_edges(), 1);
    }

    #[test]
    fn state_round_trip() {
        let mut e = Env::new();
        // Channel 0: periodic IRQ 0 (mode 2, 1000 ticks), one edge signalled.
        e.outb(0x43, 0x34);
        e.outb(0x40, 0xe8);
        e.outb(0x40, 0x03);
        e.advance_ticks(1500);
        e.pit.poll(e.now());
        assert_eq!(e.irq.take_edges(), 1);
        // Channel 2: mode 0 gated by port 0x61, paused half-way, speaker bit set.
        e.outb(0x61, 0x03);
        e.outb(0x43, 0xb0);
        e.outb(0x42, 0x00);
        e.outb(0x42, 0x10);
        e.advance_ticks(300);
        e.outb(0x61, 0x02);
        // Channel 1: LSB/MSB count latched and half read, then a half-written count.
        e.outb(0x43, 0x74);
        e.outb(0x41, 0x34);
        e.outb(0x41, 0x12);
        e.advance_ticks(7);
        e.outb(0x43, 0x40);
        assert_eq!(e.inb(0x41), (0x1234u16 - 7).to_le_bytes()[0]);
        e.outb(0x43, 0xe4); // read-back: status of channel 1
        e.outb(0x41, 0x99); // LSB of a new count
        let s = e.pit.state();
        assert_eq!(s.channels[1].write_lsb, Some(0x99));
        assert_eq!(s.channels[2].run, PitRunState::Paused { ticks: 300 });
        let json = serde_json::to_string(&s).unwrap();
        let s2: PitState = serde_json::from_str(&json).unwrap();
        assert_eq!(s2, s);
        // A new PIT whose clock continues from the same reading.
        let mut f = Env::new();
        f.t.store(e.now(), Ordering::SeqCst);
        f.pit.restore(&s2).unwrap();
        assert_eq!(f.pit.state(), s);
        assert_eq!(f.irq.take_edges(), 0, "restore signals nothing");
        for step in 0..6u64 {
            for env in [&mut e, &mut f] {
                env.advance_ticks(400 + step);
            }
            assert_eq!(e.pit.poll(e.now()), f.pit.poll(f.now()));
            assert_eq!(e.irq.take_edges(), f.irq.take_edges());
            for p in [0x40, 0x41, 0x42, 0x61] {
                assert_eq!(e.inb(p), f.inb(p), "port {p:#x} at step {step}");
            }
            if step == 2 {
                e.outb(0x61, 0x01);
                f.outb(0x61, 0x01);
                e.outb(0x41, 0x02);
                f.outb(0x41, 0x02);
            }
        }
        assert_eq!(e.pit.state(), f.pit.state());
    }

    #[test]
    fn malformed_state_is_rejected() {
        let mut e = Env::new();
        let good = e.pit.state();
        type Corrupt = (&'static str, fn(&mut PitState));
        let cases: [Corrupt; 6] = [
            ("pit.channels[0].reload", |s| s.channels[0].reload = 0),
            ("pit.channels[1].reload", |s| s.channels[1].reload = 0x10001),
            ("pit.channels[2].mode", |s| s.channels[2].mode = 6),
            ("pit.channels[0].rw", |s| s.channels[0].rw = 0),
            ("pit.channels[2].gate", |s| s.channels[2].gate = true),
            ("pit.port61", |s| s.port61 = 0x10),
        ];
        for (field, corrupt) in cases {
            let mut bad = good.clone();
            corrupt(&mut bad);
            assert_eq!(e.pit.restore(&bad).unwrap_err().field, field);
        }
        assert_eq!(e.pit.state(), good);
    }

    #[test]
    fn lsb_only_msb_only_and_garbage() {
        let mut e = Env::new();
        e.outb(0x43, 0x54); // ch1, LSB only, mode 2
        e.outb(0x41, 0x20);
        assert_eq!(e.inb(0x41), 0x20);
        e.outb(0x43, 0x64); // ch1, MSB only, mode 2
        e.outb(0x41, 0x02);
        assert_eq!(e.inb(0x41), 0x02);
        e.advance_ticks(1);
        assert_eq!(e.pit.count(1, e.now()), Some(0x1ff));
        // Hostile sequences never panic.
        for v in 0..=255u8 {
            e.outb(0x43, v);
            e.outb(0x40 + u16::from(v % 3), v);
            e.outb(0x40 + u16::from(v % 3), v.wrapping_mul(7));
            e.outb(0x61, v);
            e.advance_ticks(u64::from(v));
            for p in [0x40, 0x41, 0x42, 0x43, 0x61] {
                e.inb(p);
            }
            e.pit.poll(e.now());
        }
        let mut w = [0u8; 4];
        e.pit.read(0x40, &mut w);
        e.pit.write(0x40, &w);
        e.pit.poll(u64::MAX);
        e.pit.poll(0);
    }
}
