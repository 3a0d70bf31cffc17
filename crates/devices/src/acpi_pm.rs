//! ACPI fixed-hardware power-management registers (ACPI 6.4 §4.8): the PM1a event block
//! (PM1_STS, PM1_EN) and the PM1a control block (PM1_CNT), at I/O ports described by the
//! FADT. Writing SLP_EN with the S5 sleep type from the DSDT's `_S5` package powers the VM
//! off; other sleep states are ignored (the guest stays running).

use serde::{Deserialize, Serialize};

use crate::bus::PioDevice;
use crate::StateError;

/// I/O port of the PM1a event block (4 bytes: PM1_STS then PM1_EN).
pub const PM1A_EVT_BLK: u16 = 0x600;
/// I/O port of the PM1a control block (2 bytes).
pub const PM1A_CNT_BLK: u16 = 0x604;
/// SLP_TYP value the DSDT's `_S5` object gives for soft-off.
pub const S5_SLP_TYP: u16 = 5;

const SCI_EN: u16 = 1 << 0;
const SLP_EN: u16 = 1 << 13;

/// Snapshot of the PM1a registers (see [`AcpiPm::state`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AcpiPmState {
    /// PM1_STS.
    pub sts: u16,
    /// PM1_EN.
    pub en: u16,
    /// PM1_CNT (SCI_EN always set, SLP_EN always clear).
    pub cnt: u16,
}

/// The PM1a register blocks.
pub struct AcpiPm {
    sts: u16,
    en: u16,
    cnt: u16,
    power_off: Box<dyn Fn() + Send>,
    /// The SCI (level-triggered, asserted while an enabled status bit is set).
    sci: Option<std::sync::Arc<dyn crate::IrqLine>>,
}

/// PM1_STS / PM1_EN: power button (ACPI 6.4 §4.8.3.1).
pub const PWRBTN: u16 = 1 << 8;

impl AcpiPm {
    /// `power_off` runs when the guest enters S5.
    pub fn new(power_off: Box<dyn Fn() + Send>) -> Self {
        // SCI_EN set: the platform is always in ACPI mode (the FADT has no SMI_CMD).
        AcpiPm { sts: 0, en: 0, cnt: SCI_EN, power_off, sci: None }
    }

    /// Connects the SCI interrupt line (the FADT's SCI_INT).
    pub fn set_sci(&mut self, sci: std::sync::Arc<dyn crate::IrqLine>) {
        self.sci = Some(sci);
        self.update_sci();
    }

    /// Presses the power button: sets PWRBTN_STS and raises the SCI if the guest enabled it.
    /// What happens next is the guest's choice (Linux reports a KEY_POWER event).
    pub fn press_power_button(&mut self) {
        self.sts |= PWRBTN;
        self.update_sci();
    }

    fn update_sci(&self) {
        if let Some(l) = &self.sci {
            l.set_level(self.sts & self.en & PWRBTN != 0);
        }
    }

    /// Snapshot of PM1_STS, PM1_EN and PM1_CNT.
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState { sts: self.sts, en: self.en, cnt: self.cnt }
    }

    /// Checks `s` without applying it (see [`AcpiPm::restore`]).
    pub fn validate(&self, s: &AcpiPmState) -> Result<(), StateError> {
        StateError::check(
            s.cnt & SCI_EN != 0 && s.cnt & SLP_EN == 0,
            "acpi_pm.cnt",
            format!("{:#x}: SCI_EN clear or SLP_EN set", s.cnt),
        )
    }

    /// Loads a snapshot taken by [`AcpiPm::state`], keeping the power-off
    /// callback (not called by the restore).  On error the registers are
    /// left unchanged.
    pub fn restore(&mut self, s: &AcpiPmState) -> Result<(), StateError> {
        self.validate(s)?;
        self.sts = s.sts;
        self.en = s.en;
        self.cnt = s.cnt;
        self.update_sci();
        Ok(())
    }

    fn read_reg(&self, off: u16) -> u16 {
        match off {
            0 => self.sts,
            2 => self.en,
            4 => self.cnt,
            _ => 0,
        }
    }

    fn write_reg(&mut self, off: u16, v: u16) {
        match off {
            // PM1_STS bits are write-one-to-clear.
            0 => {
                self.sts &= !v;
                self.update_sci();
            }
            2 => {
                self.en = v;
                self.update_sci();
            }
            4 => {
                self.cnt = (v & !SLP_EN) | SCI_EN;
                let slp_typ = (v >> 10) & 7;
                if v & SLP_EN != 0 && slp_typ == S5_SLP_TYP {
                    (self.power_off)();
                }
            }
            _ => {}
        }
    }
}

impl PioDevice for AcpiPm {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        // Accesses are byte or word wide; assemble from 16-bit registers.
        let mut p = port.wrapping_sub(PM1A_EVT_BLK);
        for b in data.iter_mut() {
            let [lo, hi] = self.read_reg(p & !1).to_le_bytes();
            *b = if p & 1 == 0 { lo } else { hi };
            p = p.wrapping_add(1);
        }
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        let off = port.wrapping_sub(PM1A_EVT_BLK);
        match *data {
            [b0, b1] if off & 1 == 0 => self.write_reg(off, u16::from_le_bytes([b0, b1])),
            [b0, b1, b2, b3] if off & 1 == 0 => {
                self.write_reg(off, u16::from_le_bytes([b0, b1]));
                self.write_reg(off.wrapping_add(2), u16::from_le_bytes([b2, b3]));
            }
            [b] => {
                let cur = self.read_reg(off & !1);
                let v = if off & 1 == 0 { (cur & 0xff00) | u16::from(b) } else { (cur & 0xff) | (u16::from(b) << 8) };
                self.write_reg(off & !1, v);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn s5_powers_off_and_sci_en_reads_set() {
        let off = Arc::new(AtomicBool::new(false));
        let o = off.clone();
        let mut pm = AcpiPm::new(Box::new(move || o.store(true, Ordering::SeqCst)));
        let mut b = [0u8; 2];
        pm.read(PM1A_CNT_BLK, &mut b);
        assert_eq!(u16::from_le_bytes(b) & SCI_EN, SCI_EN);
        // S3 (sleep type 3) is ignored.
        pm.write(PM1A_CNT_BLK, &((3 << 10) | SLP_EN).to_le_bytes());
        assert!(!off.load(Ordering::SeqCst));
        pm.write(PM1A_CNT_BLK, &((S5_SLP_TYP << 10) | SLP_EN).to_le_bytes());
        assert!(off.load(Ordering::SeqCst));
    }

    #[test]
    fn state_round_trip() {
        let mut pm = AcpiPm::new(Box::new(|| {}));
        pm.sts = 0x8101;
        pm.write(PM1A_EVT_BLK + 2, &0x0120u16.to_le_bytes());
        pm.write(PM1A_CNT_BLK, &((3 << 10) | SCI_EN).to_le_bytes());
        let s = pm.state();
        let json = serde_json::to_string(&s).unwrap();
        let s2: AcpiPmState = serde_json::from_str(&json).unwrap();
        assert_eq!(s2, s);
        let off = Arc::new(AtomicBool::new(false));
        let o = off.clone();
        let mut other = AcpiPm::new(Box::new(move || o.store(true, Ordering::SeqCst)));
        other.restore(&s2).unwrap();
        assert_eq!(other.state(), s);
        let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
        pm.read(PM1A_EVT_BLK, &mut a);
        other.read(PM1A_EVT_BLK, &mut b);
        assert_eq!(a, b);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), 0x8101);
        pm.read(PM1A_CNT_BLK, &mut a[..2]);
        other.read(PM1A_CNT_BLK, &mut b[..2]);
        assert_eq!(a[..2], b[..2]);
        other.write(PM1A_CNT_BLK, &((S5_SLP_TYP << 10) | SLP_EN).to_le_bytes());
        assert!(off.load(Ordering::SeqCst), "power-off callback kept");
    }

    #[test]
    fn malformed_state_is_rejected() {
        let mut pm = AcpiPm::new(Box::new(|| {}));
        let good = pm.state();
        let bad = AcpiPmState { cnt: SLP_EN | SCI_EN, ..good.clone() };
        assert_eq!(pm.restore(&bad).unwrap_err().field, "acpi_pm.cnt");
        let bad = AcpiPmState { cnt: 0, ..good.clone() };
        assert_eq!(pm.restore(&bad).unwrap_err().field, "acpi_pm.cnt");
        assert_eq!(pm.state(), good);
    }

    #[test]
    fn status_is_write_one_to_clear_and_odd_accesses_do_not_panic() {
        let mut pm = AcpiPm::new(Box::new(|| {}));
        pm.sts = 0x8001;
        pm.write(PM1A_EVT_BLK, &0x0001u16.to_le_bytes());
        assert_eq!(pm.sts, 0x8000);
        pm.write(PM1A_EVT_BLK + 3, &[0xff]);
        pm.write(PM1A_EVT_BLK + 1, &[1, 2, 3]);
        let mut b = [0u8; 8];
        pm.read(PM1A_EVT_BLK + 7, &mut b);
    }
}
