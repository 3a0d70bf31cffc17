//! SSE/SSE2 instructions on XMM registers (Intel SDM Vol. 1 ch. 10-11).

use crate::cpu::Cpu;
use crate::exec::SRes;
use crate::Bus;
use iced_x86::Instruction;

/// Executes an SSE/SSE2 instruction; returns `Ok(false)` if `insn` is not one.
pub(crate) fn execute(_cpu: &mut Cpu, _bus: &mut dyn Bus, _insn: &Instruction) -> SRes<bool> {
    Ok(false)
}
