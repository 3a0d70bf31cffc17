//! Motorola MC146818 CMOS RTC + NVRAM, as found on PC/AT compatibles at
//! ports 0x70 (index, write-only; bit 7 = NMI disable) and 0x71 (data).
//!
//! Register map (MC146818A datasheet, plus the IBM PC/AT CMOS layout):
//!
//! | index | contents |
//! |---|---|
//! | 0x00, 0x02, 0x04 | seconds, minutes, hours (hours bit 7 = PM in 12-hour mode) |
//! | 0x01, 0x03, 0x05 | alarm seconds/minutes/hours (plain storage) |
//! | 0x06, 0x07, 0x08, 0x09 | day of week (1 = Sunday), day of month, month, year (00-99) |
//! | 0x0A | status A: UIP (bit 7) always 0, divider/rate bits writable (default 0x26) |
//! | 0x0B | status B: bit 7 SET, bit 2 DM (1 = binary), bit 1 24/12 (1 = 24 h); default 0x02 |
//! | 0x0C | status C: interrupt flags, always 0 (no RTC interrupts are generated) |
//! | 0x0D | status D: 0x80 (valid RAM and time) |
//! | 0x15-0x16 | base memory in KiB (640) |
//! | 0x17-0x18, 0x30-0x31 | memory between 1 MiB and 64 MiB in KiB |
//! | 0x2E-0x2F | checksum of 0x10-0x2D (big endian) |
//! | 0x32 | century |
//! | 0x34-0x35 | memory between 16 MiB and 4 GiB in 64 KiB units |
//! | 0x5B-0x5D | memory above 4 GiB in 64 KiB units |
//!
//! Time is read from a wall clock (host UTC by default) plus an offset the
//! guest can change by writing the time registers (either directly, or with
//! status B's SET bit held while it writes them all, like Linux does).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bus::{read_bytes, write_bytes, PioDevice};
use crate::StateError;

/// Index port (write: bits 6..0 register index, bit 7 NMI disable).
pub const INDEX_PORT: u16 = 0x70;
/// Data port.
pub const DATA_PORT: u16 = 0x71;

const REG_SEC: usize = 0x00;
const REG_MIN: usize = 0x02;
const REG_HOUR: usize = 0x04;
const REG_WDAY: usize = 0x06;
const REG_MDAY: usize = 0x07;
const REG_MON: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const REG_CENTURY: usize = 0x32;

const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// A wall clock returning seconds since the UNIX epoch (UTC).
pub type WallClock = Box<dyn Fn() -> i64 + Send>;

/// Number of CMOS registers (RTC and NVRAM bytes) at indexes 0-127.
pub const CMOS_SIZE: usize = 128;

/// Snapshot of the CMOS (see [`Cmos::state`]).
///
/// The RTC's time base is the wall clock: the snapshot keeps the guest's
/// offset from it (`offset_secs`), not an absolute time, so after a restore
/// the RTC shows wall-clock time plus that offset, like a battery-backed
/// RTC that kept running while the machine was off.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CmosState {
    /// Selected register index (0-127).
    pub index: u8,
    /// Bit 7 of the last index-port write (NMI disabled).
    pub nmi_disabled: bool,
    /// The 128 registers: NVRAM bytes, status registers A-D, and the time
    /// registers as last refreshed or written (they matter while status B's
    /// SET bit freezes them).
    pub regs: Vec<u8>,
    /// Guest-chosen RTC offset from the wall clock, in seconds.
    pub offset_secs: i64,
}

/// The CMOS RTC/NVRAM device.  Register it at port 0x70 with length 2.
pub struct Cmos {
    index: u8,
    nmi_disabled: bool,
    regs: [u8; CMOS_SIZE],
    wall_clock: WallClock,
    /// Guest-chosen offset from the wall clock, in seconds.
    offset: i64,
}

fn host_utc_seconds() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10 % 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> Option<u8> {
    let (hi, lo) = (v >> 4, v & 0xf);
    (hi <= 9 && lo <= 9).then_some(hi * 10 + lo)
}

/// `v` modulo 100, as a byte.  Every RTC field (second, minute, hour, day,
/// month, year of the century) is below 100, so on them this is the identity.
fn two_digits(v: i64) -> u8 {
    // `rem_euclid(100)` is in 0..100, which always fits a byte.
    u8::try_from(v.rem_euclid(100)).unwrap_or(0)
}

/// Days since 1970-01-01 → (year, month 1-12, day 1-31), proleptic
/// Gregorian calendar (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe.saturating_add(era.saturating_mul(400));
    (if m <= 2 { y.saturating_add(1) } else { y }, two_digits(m), two_digits(d))
}

/// Inverse of [`civil_from_days`]; `d` may exceed the month length (it then
/// rolls into the next month, like `mktime`).  Year must be small (|y| < 2^40).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Cmos {
    /// Creates the CMOS with the host's UTC clock.
    ///
    /// `mem_below_4g`: bytes of guest RAM below 4 GiB, counted from address 0
    /// (so it includes the first MiB); `mem_above_4g`: bytes of RAM mapped at
    /// 4 GiB and above.  They fill the BIOS memory-size fields (0x15-0x18,
    /// 0x30-0x31, 0x34-0x35, 0x5B-0x5D), saturating each field.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        Self::with_wall_clock(mem_below_4g, mem_above_4g, Box::new(host_utc_seconds))
    }

    /// Like [`Cmos::new`] with a custom wall clock (seconds since the UNIX
    /// epoch, UTC).
    pub fn with_wall_clock(mem_below_4g: u64, mem_above_4g: u64, wall_clock: WallClock) -> Self {
        let mut regs = [0u8; 128];
        regs[REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz rate.
        regs[REG_B] = B_24H;
        regs[REG_D] = 0x80;
        regs[0x14] = 0x02; // Equipment: math coprocessor present.
        regs[0x15..0x17].copy_from_slice(&640u16.to_le_bytes());
        let ext_kib = (mem_below_4g.saturating_sub(MIB) / KIB).min(0xffff) as u16;
        regs[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        regs[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        let above_16m = (mem_below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xffff) as u16;
        regs[0x34..0x36].copy_from_slice(&above_16m.to_le_bytes());
        let above_4g = (mem_above_4g / (64 * KIB)).min(0xff_ffff) as u32;
        regs[0x5b..0x5e].copy_from_slice(&above_4g.to_le_bytes()[..3]);
        let sum: u16 = regs[0x10..0x2e].iter().fold(0u16, |a, &b| a.wrapping_add(u16::from(b)));
        regs[0x2e..0x30].copy_from_slice(&sum.to_be_bytes());
        let mut cmos = Self { index: 0, nmi_disabled: false, regs, wall_clock, offset: 0 };
        cmos.refresh_time();
        cmos
    }

    /// Snapshot of the registers, index and RTC offset.
    pub fn state(&self) -> CmosState {
        CmosState {
            index: self.index,
            nmi_disabled: self.nmi_disabled,
            regs: self.regs.to_vec(),
            offset_secs: self.offset,
        }
    }

    /// Checks `s` without applying it (see [`Cmos::restore`]).
    pub fn validate(&self, s: &CmosState) -> Result<(), StateError> {
        StateError::check(s.index <= 0x7f, "cmos.index", format!("{:#x} > 0x7f", s.index))?;
        StateError::check(s.regs.len() == CMOS_SIZE, "cmos.regs", format!("{} bytes, not {CMOS_SIZE}", s.regs.len()))
    }

    /// Loads a snapshot taken by [`Cmos::state`]; the wall clock stays the
    /// one given to the constructor (see [`CmosState`] for the time base).
    /// On error the CMOS is left unchanged.
    pub fn restore(&mut self, s: &CmosState) -> Result<(), StateError> {
        self.validate(s)?;
        self.regs.copy_from_slice(&s.regs);
        self.index = s.index;
        self.nmi_disabled = s.nmi_disabled;
        self.offset = s.offset_secs;
        Ok(())
    }

    /// Whether the guest last wrote the index port with bit 7 set (NMI
    /// masked).  Informational: this crate has no NMI source wired to it.
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    fn binary(&self) -> bool {
        self.regs[REG_B] & B_BINARY != 0
    }

    fn h24(&self) -> bool {
        self.regs[REG_B] & B_24H != 0
    }

    fn set_mode(&self) -> bool {
        self.regs[REG_B] & B_SET != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> Option<u8> {
        if self.binary() {
            Some(v)
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, h: u8) -> u8 {
        if self.h24() {
            self.encode(h)
        } else {
            let h12 = match h % 12 {
                0 => 12,
                x => x,
            };
            self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
        }
    }

    fn decode_hour(&self, v: u8) -> Option<u8> {
        if self.h24() {
            self.decode(v).filter(|&h| h < 24)
        } else {
            let h = self.decode(v & 0x7f).filter(|h| (1..=12).contains(h))?;
            Some(h % 12 + if v & 0x80 != 0 { 12 } else { 0 })
        }
    }

    fn now_secs(&self) -> i64 {
        (self.wall_clock)().saturating_add(self.offset)
    }

    /// Writes the current time into the time registers, in the format
    /// selected by status B.
    fn refresh_time(&mut self) {
        let t = self.now_secs();
        let days = t.div_euclid(86_400);
        let sod = t.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let wday = (days.rem_euclid(7) + 4) % 7; // 1970-01-01 was a Thursday; 0 = Sunday.
        self.regs[REG_SEC] = self.encode((sod % 60) as u8);
        self.regs[REG_MIN] = self.encode((sod / 60 % 60) as u8);
        self.regs[REG_HOUR] = self.encode_hour(two_digits(sod / 3600));
        self.regs[REG_WDAY] = self.encode(wday as u8 + 1);
        self.regs[REG_MDAY] = self.encode(d);
        self.regs[REG_MON] = self.encode(m);
        self.regs[REG_YEAR] = self.encode(two_digits(y));
        self.regs[REG_CENTURY] = self.encode(y.div_euclid(100).clamp(0, 99) as u8);
    }

    /// Sets the guest clock offset from the time registers.  Invalid values
    /// (bad BCD, out-of-range fields) leave the clock unchanged.
    fn set_time_from_regs(&mut self) {
        let parsed = (|| {
            let sec = self.decode(self.regs[REG_SEC]).filter(|&v| v < 60)?;
            let min = self.decode(self.regs[REG_MIN]).filter(|&v| v < 60)?;
            let hour = self.decode_hour(self.regs[REG_HOUR])?;
            let mday = self.decode(self.regs[REG_MDAY]).filter(|v| (1..=31).contains(v))?;
            let mon = self.decode(self.regs[REG_MON]).filter(|v| (1..=12).contains(v))?;
            let year = self.decode(self.regs[REG_YEAR]).filter(|&v| v < 100)?;
            let century = self.decode(self.regs[REG_CENTURY]).filter(|&v| v < 100).unwrap_or(20);
            let y = i64::from(century) * 100 + i64::from(year);
            let days = days_from_civil(y, u32::from(mon), u32::from(mday));
            Some(days * 86_400 + i64::from(hour) * 3600 + i64::from(min) * 60 + i64::from(sec))
        })();
        match parsed {
            Some(t) => self.offset = t.saturating_sub((self.wall_clock)()),
            None => tracing::debug!("cmos: guest wrote an invalid time, ignored"),
        }
    }

    /// Register `idx`; all-ones past the end (unreachable: callers mask the
    /// index to 0-127, the size of the register file).
    fn reg(&self, idx: usize) -> u8 {
        self.regs.get(idx).copied().unwrap_or(0xff)
    }

    /// Sets register `idx`; ignored past the end (see [`Self::reg`]).
    fn set_reg(&mut self, idx: usize, value: u8) {
        if let Some(r) = self.regs.get_mut(idx) {
            *r = value;
        }
    }

    fn is_time_reg(idx: usize) -> bool {
        matches!(idx, REG_SEC | REG_MIN | REG_HOUR | REG_WDAY | REG_MDAY | REG_MON | REG_YEAR | REG_CENTURY)
    }

    /// Reads CMOS register `index` (0-127) as the guest would.
    pub fn read_reg(&mut self, index: u8) -> u8 {
        let idx = usize::from(index & 0x7f);
        match idx {
            _ if Self::is_time_reg(idx) => {
                if !self.set_mode() {
                    self.refresh_time();
                }
                self.reg(idx)
            }
            REG_A => self.regs[REG_A] & 0x7f,
            REG_C => 0,
            REG_D => 0x80,
            _ => self.reg(idx),
        }
    }

    /// Writes CMOS register `index` (0-127) as the guest would.
    pub fn write_reg(&mut self, index: u8, value: u8) {
        let idx = usize::from(index & 0x7f);
        match idx {
            _ if Self::is_time_reg(idx) => {
                if self.set_mode() {
                    self.set_reg(idx, value);
                } else {
                    self.refresh_time();
                    self.set_reg(idx, value);
                    self.set_time_from_regs();
                }
            }
            REG_A => self.regs[REG_A] = value & 0x7f,
            REG_B => {
                let was_set = self.set_mode();
                self.regs[REG_B] = value;
                match (was_set, value & B_SET != 0) {
                    // Entering SET: freeze the registers at the current time.
                    (false, true) => self.refresh_time(),
                    // Leaving SET: the registers hold the new time.
                    (true, false) => self.set_time_from_regs(),
                    _ => {}
                }
            }
            REG_C | REG_D => {}
            _ => self.set_reg(idx, value),
        }
    }

    fn read_byte(&mut self, port: u16) -> u8 {
        match port {
            DATA_PORT => self.read_reg(self.index),
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, port: u16, value: u8) {
        match port {
            INDEX_PORT => {
                self.index = value & 0x7f;
                self.nmi_disabled = value & 0x80 != 0;
            }
            DATA_PORT => self.write_reg(self.index, value),
            _ => {}
        }
    }
}

impl PioDevice for Cmos {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        read_bytes(port, data, |p| self.read_byte(p));
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        write_bytes(port, data, |p, v| self.write_byte(p, v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    /// 2024-02-29T13:45:56Z, a Thursday.
    const T0: i64 = 1_709_214_356;

    fn cmos_at(t: Arc<AtomicI64>) -> Cmos {
        Cmos::with_wall_clock(3 * 1024 * MIB, 2 * 1024 * MIB, Box::new(move || t.load(Ordering::SeqCst)))
    }

    fn rd(c: &mut Cmos, idx: u8) -> u8 {
        c.write(0x70, &[idx | 0x80]);
        let mut b = [0];
        c.read(0x71, &mut b);
        b[0]
    }

    fn wr(c: &mut Cmos, idx: u8, v: u8) {
        c.write(0x70, &[idx]);
        c.write(0x71, &[v]);
    }

    #[test]
    fn time_in_bcd() {
        let t = Arc::new(AtomicI64::new(T0));
        let mut c = cmos_at(t.clone());
        assert_eq!(rd(&mut c, 0x00), 0x56);
        assert!(c.nmi_disabled());
        assert_eq!(rd(&mut c, 0x02), 0x45);
        assert_eq!(rd(&mut c, 0x04), 0x13);
        assert_eq!(rd(&mut c, 0x06), 0x05); // Thursday (Sunday = 1).
        assert_eq!(rd(&mut c, 0x07), 0x29);
        assert_eq!(rd(&mut c, 0x08), 0x02);
        assert_eq!(rd(&mut c, 0x09), 0x24);
        assert_eq!(rd(&mut c, 0x32), 0x20);
        assert_eq!(rd(&mut c, 0x0a) & 0x80, 0, "UIP clear");
        assert_eq!(rd(&mut c, 0x0b), 0x02);
        assert_eq!(rd(&mut c, 0x0d), 0x80);
        // The clock advances.
        t.store(T0 + 5, Ordering::SeqCst);
        assert_eq!(rd(&mut c, 0x00), 0x01);
        assert_eq!(rd(&mut c, 0x02), 0x46);
    }

    #[test]
    fn binary_and_12h_modes() {
        let t = Arc::new(AtomicI64::new(T0));
        let mut c = cmos_at(t);
        wr(&mut c, 0x0b, B_BINARY);
        assert_eq!(rd(&mut c, 0x00), 56);
        assert_eq!(rd(&mut c, 0x04), 0x80 | 1, "1 PM");
        assert_eq!(rd(&mut c, 0x09), 24);
        wr(&mut c, 0x0b, 0);
        assert_eq!(rd(&mut c, 0x04), 0x81, "BCD 1 PM");
    }

    #[test]
    fn guest_sets_time() {
        let t = Arc::new(AtomicI64::new(T0));
        let mut c = cmos_at(t.clone());
        // Linux-style: SET, write all fields, clear SET.
        wr(&mut c, 0x0b, B_SET | B_24H);
        wr(&mut c, 0x00, 0x00);
        wr(&mut c, 0x02, 0x00);
        wr(&mut c, 0x04, 0x00);
        wr(&mut c, 0x07, 0x31);
        wr(&mut c, 0x08, 0x12);
        wr(&mut c, 0x09, 0x99);
        wr(&mut c, 0x32, 0x20);
        wr(&mut c, 0x0b, B_24H);
        t.store(T0 + 10, Ordering::SeqCst);
        assert_eq!(rd(&mut c, 0x00), 0x10);
        assert_eq!(rd(&mut c, 0x07), 0x31);
        assert_eq!(rd(&mut c, 0x08), 0x12);
        assert_eq!(rd(&mut c, 0x09), 0x99);
        // Single field write without SET; garbage is ignored.
        wr(&mut c, 0x02, 0x30);
        assert_eq!(rd(&mut c, 0x02), 0x30);
        wr(&mut c, 0x02, 0xff);
        assert_eq!(rd(&mut c, 0x02), 0x30);
    }

    #[test]
    fn memory_fields_and_nvram() {
        let t = Arc::new(AtomicI64::new(T0));
        let mut c = cmos_at(t);
        // 3 GiB below 4G: (3 GiB - 16 MiB) / 64 KiB = 0xbf00.
        assert_eq!(rd(&mut c, 0x34), 0x00);
        assert_eq!(rd(&mut c, 0x35), 0xbf);
        // 2 GiB above 4G: 0x8000 units.
        assert_eq!(rd(&mut c, 0x5b), 0x00);
        assert_eq!(rd(&mut c, 0x5c), 0x80);
        assert_eq!(rd(&mut c, 0x5d), 0x00);
        assert_eq!(rd(&mut c, 0x17), 0xff);
        assert_eq!(rd(&mut c, 0x18), 0xff);
        wr(&mut c, 0x50, 0xab);
        assert_eq!(rd(&mut c, 0x50), 0xab);
        // Status C/D are read-only; every index/value is harmless.
        for i in 0..=255u8 {
            for v in [0u8, 0x80, 0xff, 0x5a] {
                wr(&mut c, i, v);
                rd(&mut c, i);
            }
        }
        assert_eq!(rd(&mut c, 0x0d), 0x80);
    }

    #[test]
    fn state_round_trip() {
        let t = Arc::new(AtomicI64::new(T0));
        let mut c = cmos_at(t.clone());
        wr(&mut c, 0x50, 0xab);
        wr(&mut c, 0x0b, B_BINARY | B_24H);
        wr(&mut c, 0x09, 30); // the guest moves the clock to 2030
        wr(&mut c, 0x0a, 0x2f);
        c.write(0x70, &[0x8d]); // index 0x0d, NMI disabled
        let s = c.state();
        let json = serde_json::to_string(&s).unwrap();
        let s2: CmosState = serde_json::from_str(&json).unwrap();
        assert_eq!(s2, s);
        // Restored a day later on the wall clock: the RTC moved on by a day too.
        let t2 = Arc::new(AtomicI64::new(T0 + 86_400));
        let mut d = cmos_at(t2);
        d.restore(&s2).unwrap();
        assert_eq!(d.state(), s);
        assert!(d.nmi_disabled());
        let mut b = [0];
        d.read(0x71, &mut b);
        assert_eq!(b[0], 0x80, "index kept: status D");
        assert_eq!(rd(&mut d, 0x50), 0xab);
        assert_eq!(rd(&mut d, 0x0a), 0x2f);
        assert_eq!(rd(&mut d, 0x09), 30, "binary year 2030");
        // 2030-02-29 does not exist: the guest's write set 2030-03-01; a day later...
        assert_eq!(rd(&mut d, 0x07), 2);
        assert_eq!(rd(&mut d, 0x08), 3);
        t.store(T0 + 86_400, Ordering::SeqCst);
        for i in 0..128 {
            assert_eq!(rd(&mut c, i), rd(&mut d, i), "register {i:#x}");
        }
    }

    #[test]
    fn malformed_state_is_rejected() {
        let mut c = cmos_at(Arc::new(AtomicI64::new(T0)));
        let good = c.state();
        let mut bad = good.clone();
        bad.regs.truncate(100);
        assert_eq!(c.restore(&bad).unwrap_err().field, "cmos.regs");
        let mut bad = good.clone();
        bad.regs.push(0);
        assert_eq!(c.restore(&bad).unwrap_err().field, "cmos.regs");
        let mut bad = good.clone();
        bad.index = 0x80;
        assert_eq!(c.restore(&bad).unwrap_err().field, "cmos.index");
        assert_eq!(c.state(), good);
    }

    #[test]
    fn calendar_round_trip() {
        for days in [-800_000i64, -1, 0, 59, 19_782, 47_481, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, u32::from(m), u32::from(d)), days);
        }
        assert_eq!(civil_from_days(T0 / 86_400), (2024, 2, 29));
    }
}
