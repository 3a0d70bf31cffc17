//! Operands and the stack: an instruction's register, immediate or memory operand, and
//! segmented memory and stack accesses at the current privilege, through the MMU.

use crate::cpu::Cpu;
use crate::regs::mask;
use crate::{Bus, Fault, Res};
use iced_x86::{Instruction, OpKind, Register};

/// Where an operand lives.
#[derive(Clone, Copy)]
pub(crate) enum Loc {
    Reg(Register),
    Mem(u64),
    Imm(u64),
}

impl Cpu {
    #[inline(always)]
    pub(crate) fn loc(&self, insn: &Instruction, i: u32) -> Loc {
        match insn.op_kind(i) {
            OpKind::Register => Loc::Reg(insn.op_register(i)),
            OpKind::Memory => Loc::Mem(self.mem_la(insn)),
            _ => Loc::Imm(insn.immediate(i)),
        }
    }

    #[inline(always)]
    pub(crate) fn rd(&mut self, bus: &mut dyn Bus, l: Loc, size: usize) -> Res<u64> {
        match l {
            Loc::Reg(r) => Ok(self.get_reg(r)),
            Loc::Mem(la) => {
                let u = self.user();
                self.read_la(bus, la, size, u)
            }
            Loc::Imm(v) => Ok(v & mask(size)),
        }
    }

    #[inline(always)]
    pub(crate) fn wr(&mut self, bus: &mut dyn Bus, l: Loc, size: usize, v: u64) -> Res<()> {
        match l {
            Loc::Reg(r) => {
                self.set_reg(r, v);
                Ok(())
            }
            Loc::Mem(la) => {
                let u = self.user();
                self.write_la(bus, la, size, v & mask(size), u)
            }
            Loc::Imm(_) => Err(Fault::InvalidOpcode),
        }
    }

    /// Reads `size` bytes at linear `la` with the current privilege.
    #[inline(always)]
    pub(crate) fn rmem(&mut self, bus: &mut dyn Bus, la: u64, size: usize) -> Res<u64> {
        let u = self.user();
        self.read_la(bus, la, size, u)
    }

    #[inline(always)]
    pub(crate) fn wmem(&mut self, bus: &mut dyn Bus, la: u64, size: usize, v: u64) -> Res<()> {
        let u = self.user();
        self.write_la(bus, la, size, v, u)
    }

    #[inline(always)]
    pub(crate) fn push(&mut self, bus: &mut dyn Bus, size: usize, v: u64) -> Res<()> {
        let sp = self.rsp().wrapping_sub(size as u64) & mask(self.stack_size());
        let la = self.seg_la(Register::SS, sp);
        self.wmem(bus, la, size, v)?;
        self.set_rsp(sp);
        Ok(())
    }

    #[inline(always)]
    pub(crate) fn pop(&mut self, bus: &mut dyn Bus, size: usize) -> Res<u64> {
        let sp = self.rsp();
        let la = self.seg_la(Register::SS, sp);
        let v = self.rmem(bus, la, size)?;
        self.set_rsp(sp.wrapping_add(size as u64));
        Ok(v)
    }

    /// Reads the value that a POP would return, `off` bytes above the stack top, without
    /// changing RSP.
    pub(crate) fn peek(&mut self, bus: &mut dyn Bus, off: u64, size: usize) -> Res<u64> {
        let sp = self.rsp().wrapping_add(off) & mask(self.stack_size());
        let la = self.seg_la(Register::SS, sp);
        self.rmem(bus, la, size)
    }
}
