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
        // A GPR's number is 0..=15 and its size 1..=8 bytes, so both fit their 4-bit fields.
        let (Ok(idx), Ok(size)) = (u16::try_from(r.full_register().number()), u16::try_from(r.size())) else {
            continue;
        };
        let high = matches!(r, Register::AH | Register::CH | Register::DH | Register::BH);
        if let Some(slot) = t.get_mut(i) {
            *slot = (idx & 0xf) | ((size & 0xf) << 4) | if high { 0x100 } else { 0 };
        }
    }
    t
});

/// Size mask for an operand of `size` bytes.
#[inline(always)]
#[allow(clippy::indexing_slicing)] // `size & 15` < 16 = MASKS.len()
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
        1 => low8(v) as i8 as i64 as u64,
        2 => low16(v) as i16 as i64 as u64,
        4 => low32(v) as i32 as i64 as u64,
        _ => v,
    }
}

// Width conversions. Each cast below keeps the low bits on purpose: operand-size truncation
// (the low 8/16/32 bits of a register or result, the low 64 bits of a wide product) is the
// architecture's semantics, so these are the crate's only truncating casts of guest values.

/// The low 8 bits of `v` (byte operand, port-size byte, vector number).
#[inline(always)]
#[allow(clippy::cast_possible_truncation)] // operand-size truncation is the architecture's semantics
pub(crate) fn low8(v: u64) -> u8 {
    v as u8
}

/// The low 16 bits of `v` (word operand, selector, port number).
#[inline(always)]
#[allow(clippy::cast_possible_truncation)] // operand-size truncation is the architecture's semantics
pub(crate) fn low16(v: u64) -> u16 {
    v as u16
}

/// The low 32 bits of `v` (doubleword operand, EDX:EAX halves).
#[inline(always)]
#[allow(clippy::cast_possible_truncation)] // operand-size truncation is the architecture's semantics
pub(crate) fn low32(v: u64) -> u32 {
    v as u32
}

/// The low 64 bits of a 128-bit value (low half of a wide product or of an XMM register).
#[inline(always)]
#[allow(clippy::cast_possible_truncation)] // the low half is what the instruction keeps
pub(crate) fn low64(v: u128) -> u64 {
    v as u64
}

/// An operand size in bytes (1, 2, 4, 8, or 16 for SSE) as the `u8` the [`crate::Bus`]
/// takes; sizes come from the decoder and from fixed tables, never from guest data.
#[inline(always)]
#[allow(clippy::cast_possible_truncation)] // operand sizes are at most 16
pub(crate) fn size_u8(size: usize) -> u8 {
    size as u8
}

/// `v` as a host `usize`: lossless, because the crate only builds for 64-bit hosts (see the
/// `compile_error!` at the crate root).
#[inline(always)]
#[allow(clippy::cast_possible_truncation)] // usize is 64 bits on every host this builds for
pub(crate) fn host_usize(v: u64) -> usize {
    v as usize
}

/// An index in `0..1 << bits` (1 <= `bits` <= 63) for key `v`, by Fibonacci hashing: every
/// bit of the key moves the index (the decode cache's sets and the jump cache, indexed by
/// guest addresses whose low and page bits alone collide).
#[inline(always)]
pub(crate) fn hash_index(v: u64, bits: u32) -> usize {
    host_usize(v.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits))
}
