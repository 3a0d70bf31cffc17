//! ACPI fixed-hardware power-management registers (ACPI 6.4 §4.8): the PM1a event block
//! (PM1_STS, PM1_EN) and the PM1a control block (PM1_CNT), at I/O ports described by the
//! FADT. Writing SLP_EN with the S5 sleep type from the DSDT's `_S5` package powers the VM
//! off; other sleep states are ignored (the guest stays running).

use crate::bus::PioDevice;

/// I/O port of the PM1a event block (4 bytes: PM1_STS then PM1_EN).
pub const PM1A_EVT_BLK: u16 = 0x600;
/// I/O port of the PM1a control block (2 bytes).
pub const PM1A_CNT_BLK: u16 = 0x604;
/// SLP_TYP value the DSDT's `_S5` object gives for soft-off.
pub const S5_SLP_TYP: u16 = 5;

const SCI_EN: u16 = 1 << 0;
const SLP_EN: u16 = 1 << 13;

/// The PM1a register blocks.
pub struct AcpiPm {
    sts: u16,
    en: u16,
    cnt: u16,
    power_off: Box<dyn Fn() + Send>,
}

impl AcpiPm {
    /// `power_off` runs when the guest enters S5.
    pub fn new(power_off: Box<dyn Fn() + Send>) -> Self {
        // SCI_EN set: the platform is always in ACPI mode (the FADT has no SMI_CMD).
        AcpiPm { sts: 0, en: 0, cnt: SCI_EN, power_off }
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
            0 => self.sts &= !v,
            2 => self.en = v,
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
        for (i, b) in data.iter_mut().enumerate() {
            let p = port.wrapping_sub(PM1A_EVT_BLK).wrapping_add(i as u16);
            let r = self.read_reg(p & !1);
            *b = if p & 1 == 0 { r as u8 } else { (r >> 8) as u8 };
        }
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        let off = port.wrapping_sub(PM1A_EVT_BLK);
        match data.len() {
            2 | 4 if off & 1 == 0 => {
                let v = u16::from_le_bytes([data[0], data[1]]);
                self.write_reg(off, v);
                if data.len() == 4 {
                    self.write_reg(off.wrapping_add(2), u16::from_le_bytes([data[2], data[3]]));
                }
            }
            1 => {
                let cur = self.read_reg(off & !1);
                let v = if off & 1 == 0 {
                    (cur & 0xff00) | u16::from(data[0])
                } else {
                    (cur & 0xff) | (u16::from(data[0]) << 8)
                };
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
