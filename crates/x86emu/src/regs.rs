//! Mapping of iced-x86 register names onto the general-register file.

use iced_x86::Register;
use std::sync::LazyLock;

/// Packed description of a general-purpose register name: bits 0-3 index into `Cpu::gpr`,
/// bits 4-7 size in bytes, bit 8 set for AH/CH/DH/BH, bit 15 set if not a GPR.
pub(crate) static GPR_INFO: LazyLock<[u16; 256]> = LazyLock::new(|| {
    let mut t = [0x8000u16; 256];
    for r in Register::values() {
        let i = r as usize;
        if i >= 256 || !r.is_gpr() {
            continue;
        }
        let idx = r.full_register().number() as u16;
        let size = r.size() as u16;
        let high = matches!(r, Register::AH | Register::CH | Register::DH | Register::BH);
        t[i] = idx | (size << 4) | if high { 0x100 } else { 0 };
    }
    t
});

/// Size mask for an operand of `size` bytes.
#[inline(always)]
pub(crate) fn mask(size: usize) -> u64 {
    // One table load: 1 → 0xff, 2 → 0xffff, 4 → 0xffff_ffff, 8 (or anything else) → all ones.
    const MASKS: [u64; 16] = {
        let mut t = [u64::MAX; 16];
        t[1] = 0xff;
        t[2] = 0xffff;
        t[4] = 0xffff_ffff;
        t
    };
    MASKS[size & 15]
}

/// Sign-extends the low `size` bytes of `v`.
#[inline(always)]
pub(crate) fn sext(v: u64, size: usize) -> u64 {
    match size {
        1 => v as u8 as i8 as i64 as u64,
        2 => v as u16 as i16 as i64 as u64,
        4 => v as u32 as i32 as i64 as u64,
        _ => v,
    }
}
