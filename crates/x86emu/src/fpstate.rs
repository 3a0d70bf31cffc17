//! Checks and constants on the x87/SSE register state ([`crate::cpu::FpuState`]) that both
//! executors, x87 ([`crate::fpu`]) and SSE/MMX ([`crate::sse`]), and snapshot validation
//! use, so that neither executor imports the other.

use crate::cpu::{ctl, Cpu};
use crate::{Fault, Res};

/// FSW.ES: error summary, set while an unmasked x87 exception is pending.
pub(crate) const FSW_ES: u16 = 1 << 7;

/// MXCSR bits software may set (reported as MXCSR_MASK by FXSAVE): exception flags, DAZ,
/// exception masks, rounding control and FTZ.
pub(crate) const MXCSR_MASK: u32 = 0xffff;

/// Raises #MF if an unmasked x87 exception is pending and CR0.NE selects native error
/// reporting (SDM Vol. 1 §8.7). Used by waiting x87 instructions and MMX instructions.
pub(crate) fn check_pending(cpu: &Cpu) -> Res<()> {
    if cpu.fpu.fsw & FSW_ES != 0 && cpu.cr0 & ctl::CR0_NE != 0 {
        return Err(Fault::FpuError);
    }
    Ok(())
}
