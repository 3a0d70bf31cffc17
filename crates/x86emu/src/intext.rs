//! General-purpose-register instructions of the extensions beyond the x86-64 baseline:
//! CRC32 (SSE4.2), MOVBE, RDRAND and RDSEED (Intel SDM Vol. 2A CRC32, Vol. 2B MOVBE, RDRAND,
//! RDSEED). POPCNT and CMPXCHG16B are in `exec.rs`.
//!
//! CRC32 and MOVBE are computed in software. RDRAND and RDSEED take their numbers from the
//! host's own RDRAND/RDSEED, so they exist (and are advertised) only where the host has
//! them.

use crate::cpu::{flags::ARITH, flags::CF, Cpu};
use crate::cpuid::{self, Ext};
use crate::regs::{low32, mask};
use crate::{Bus, Res};
use iced_x86::{Instruction, Mnemonic, OpKind};
use std::arch::asm;

/// The CRC-32C (Castagnoli) table for the bit-reflected polynomial 0x82F63B78, which is
/// 0x1EDC6F41 reflected (SDM Vol. 2A CRC32).
#[allow(clippy::indexing_slicing)] // evaluated at compile time: `i` < 256 = `t.len()`
static CRC32C: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0u32;
    while i < 256 {
        let mut c = i;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
            k += 1;
        }
        t[i as usize] = c;
        i += 1;
    }
    t
};

/// CRC32 of the low `bytes` bytes of `data` (least significant first) onto `crc`, without
/// the initial and final inversions (the instruction leaves those to software).
fn crc32c(crc: u32, data: u64, bytes: usize) -> u32 {
    data.to_le_bytes().iter().take(bytes).fold(crc, |c, &b| {
        let i = ((c ^ u32::from(b)) & 0xff) as usize;
        CRC32C.get(i).copied().unwrap_or(0) ^ (c >> 8)
    })
}

/// One number from the host's RDRAND (`seed` false) or RDSEED, retried a few times when the
/// host has none ready; `None` if it still has none (the guest sees CF = 0 and retries, as
/// the SDM tells software to).
fn host_random(seed: bool) -> Option<u64> {
    for _ in 0..16 {
        let (v, ok): (u64, u8);
        if seed {
            // SAFETY: RDSEED only writes the two output registers and the flags (no
            // `preserves_flags`); the host has it: `execute` checked `cpuid::has`.
            unsafe { asm!("rdseed {v}", "setc {ok}", v = out(reg) v, ok = out(reg_byte) ok, options(nomem, nostack)) };
        } else {
            // SAFETY: as for RDSEED above, for RDRAND.
            unsafe { asm!("rdrand {v}", "setc {ok}", v = out(reg) v, ok = out(reg_byte) ok, options(nomem, nostack)) };
        }
        if ok != 0 {
            return Some(v);
        }
        std::hint::spin_loop();
    }
    None
}

/// Executes CRC32, MOVBE, RDRAND or RDSEED; returns `Ok(false)` if `insn` is none of them or
/// belongs to an extension the host lacks.
pub(crate) fn execute(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction) -> Res<bool> {
    use Mnemonic as M;
    match insn.mnemonic() {
        M::Crc32 if cpuid::has(Ext::Sse42) => {
            // CRC32 r32, r/m8/16/32 or r64, r/m8/64: the CRC is the low 32 bits of the
            // destination, and the result is zero-extended into it.
            let r0 = insn.op0_register();
            let size = match insn.op1_kind() {
                OpKind::Register => insn.op1_register().size(),
                _ => insn.memory_size().size(),
            };
            let data = cpu.rd(bus, cpu.loc(insn, 1), size)?;
            let crc = crc32c(low32(cpu.get_reg(r0)), data, size);
            cpu.set_reg(r0, u64::from(crc));
        }
        M::Movbe => {
            // MOVBE r, m / m, r: a load or store with the bytes reversed. A 16-bit
            // destination register keeps its upper bits, a 32-bit one is zero-extended.
            let swap = |v: u64, size: usize| v.swap_bytes() >> (64 - 8 * size.clamp(1, 8));
            if insn.op0_kind() == OpKind::Register {
                let r0 = insn.op0_register();
                let size = r0.size();
                let v = cpu.rd(bus, cpu.loc(insn, 1), size)?;
                cpu.set_reg(r0, swap(v, size));
            } else {
                let r1 = insn.op1_register();
                let size = r1.size();
                let v = cpu.get_reg(r1) & mask(size);
                let l = cpu.loc(insn, 0);
                cpu.wr(bus, l, size, swap(v, size))?;
            }
        }
        M::Rdrand | M::Rdseed => {
            let seed = insn.mnemonic() == M::Rdseed;
            if !cpuid::has(if seed { Ext::Rdseed } else { Ext::Rdrand }) {
                return Ok(false);
            }
            // CF = 1 and the number, or CF = 0 and zero; OF, SF, ZF, AF, PF are cleared.
            let r0 = insn.op0_register();
            let v = host_random(seed);
            cpu.set_reg(r0, v.unwrap_or(0) & mask(r0.size()));
            cpu.rflags = (cpu.rflags & !ARITH) | if v.is_some() { CF } else { 0 };
        }
        _ => return Ok(false),
    }
    Ok(true)
}
