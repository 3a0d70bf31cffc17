//! x87 FPU, MMX state and FXSAVE/FXRSTOR (Intel SDM Vol. 1 ch. 8, Vol. 2 FXSAVE).

use crate::cpu::Cpu;
use crate::exec::SRes;
use crate::Bus;
use iced_x86::Instruction;

/// Executes an x87 or FXSAVE-family instruction; returns `Ok(false)` if `insn` is not one.
pub(crate) fn execute(_cpu: &mut Cpu, _bus: &mut dyn Bus, _insn: &Instruction) -> SRes<bool> {
    Ok(false)
}
