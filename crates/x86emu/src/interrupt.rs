//! Exceptions, interrupts and far control transfers (Intel SDM Vol. 3 ch. 5-6, Vol. 2
//! IRET/RET far/JMP far/SYSCALL/SYSRET).

use crate::cpu::{ctl, flags::*, seg_index, sreg, Cpu, Exit, Fault2, Seg};
use crate::regs::{low16, low32, mask};
use crate::{Bus, Fault, Res};
use iced_x86::{Code, Instruction, Register};

const ATTR_UNUSABLE: u32 = 1 << 16;

/// Reads the 8-byte descriptor for `sel` from the GDT or LDT. Returns (low, high) dwords.
pub(crate) fn read_desc(cpu: &mut Cpu, bus: &mut dyn Bus, sel: u16) -> Res<(u32, u32)> {
    let (base, limit) =
        if sel & 4 != 0 { (cpu.ldtr.base, cpu.ldtr.limit) } else { (cpu.gdtr_base, u32::from(cpu.gdtr_limit)) };
    let off = u64::from(sel & !7);
    if off + 7 > u64::from(limit) {
        return Err(Fault::GeneralProtection(sel & !3));
    }
    let v = cpu.read_sys(bus, base.wrapping_add(off), 8)?;
    Ok((low32(v), (v >> 32) as u32))
}

/// Builds the cached form of a code/data descriptor.
pub(crate) fn seg_from_desc(sel: u16, lo: u32, hi: u32) -> Seg {
    let base = u64::from((lo >> 16) | ((hi & 0xff) << 16) | (hi & 0xff00_0000));
    let mut limit = (lo & 0xffff) | (hi & 0xf_0000);
    if hi & (1 << 23) != 0 {
        limit = (limit << 12) | 0xfff;
    }
    Seg { selector: sel, base, limit, attr: Seg::attr_from_desc_hi(hi) }
}

/// MOV/POP to a data segment register or SS.
pub(crate) fn load_seg_reg(cpu: &mut Cpu, bus: &mut dyn Bus, r: Register, sel: u16) -> Res<()> {
    let i = seg_index(r);
    if i == sreg::CS {
        return Err(Fault::InvalidOpcode);
    }
    if cpu.cr0 & ctl::CR0_PE == 0 {
        let s = cpu.seg_at_mut(i);
        s.selector = sel;
        s.base = u64::from(sel) << 4;
        s.attr = (s.attr & !ATTR_UNUSABLE) | 0x80;
        if i == sreg::SS {
            cpu.interrupt_shadow = true;
        }
        return Ok(());
    }
    let cpl = cpu.cpl();
    if sel & !3 == 0 {
        if i == sreg::SS && !(cpu.in_64bit_mode() && cpl != 3 && u16::from(cpl) == sel & 3) {
            return Err(Fault::GeneralProtection(0));
        }
        let s = cpu.seg_at_mut(i);
        s.selector = sel;
        s.base = 0;
        s.attr = ATTR_UNUSABLE | if i == sreg::SS { u32::from(cpl) << 5 | 0x93 } else { 0 };
        return Ok(());
    }
    let (lo, hi) = read_desc(cpu, bus, sel)?;
    let seg = seg_from_desc(sel, lo, hi);
    if seg.attr & 0x10 == 0 {
        return Err(Fault::GeneralProtection(sel & !3));
    }
    if seg.attr & 0x80 == 0 {
        return Err(if i == sreg::SS { Fault::StackFault(sel & !3) } else { Fault::SegmentNotPresent(sel & !3) });
    }
    *cpu.seg_at_mut(i) = seg;
    if i == sreg::SS {
        cpu.interrupt_shadow = true;
    }
    Ok(())
}

/// Loads CS for a far transfer to `sel:off` at privilege `cpl`.
fn load_cs(cpu: &mut Cpu, bus: &mut dyn Bus, sel: u16, off: u64, cpl: u8) -> Res<()> {
    if cpu.cr0 & ctl::CR0_PE == 0 {
        let s = &mut cpu.seg[sreg::CS];
        s.selector = sel;
        s.base = u64::from(sel) << 4;
        cpu.rip = off & 0xffff;
        return Ok(());
    }
    if sel & !3 == 0 {
        return Err(Fault::GeneralProtection(0));
    }
    let (lo, hi) = read_desc(cpu, bus, sel)?;
    let mut seg = seg_from_desc((sel & !3) | u16::from(cpl), lo, hi);
    if seg.attr & 0x18 != 0x18 {
        return Err(Fault::GeneralProtection(sel & !3));
    }
    if seg.attr & 0x80 == 0 {
        return Err(Fault::SegmentNotPresent(sel & !3));
    }
    // The CPL is the DPL field of the cached CS in our model.
    seg.attr = (seg.attr & !0x60) | (u32::from(cpl) << 5);
    cpu.seg[sreg::CS] = seg;
    let long = cpu.efer & ctl::EFER_LMA != 0 && seg.long();
    cpu.rip = if long {
        off
    } else if seg.big() {
        off & 0xffff_ffff
    } else {
        off & 0xffff
    };
    Ok(())
}

/// JMP ptr16:16/32 or m16:xx.
pub(crate) fn far_jump(cpu: &mut Cpu, bus: &mut dyn Bus, sel: u16, off: u64) -> Res<()> {
    let cpl = cpu.cpl();
    load_cs(cpu, bus, sel, off, cpl)
}

/// RET far (RETF/LRET) with optional stack adjustment.
pub(crate) fn far_ret(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction) -> Res<()> {
    let size = match insn.code() {
        Code::Retfw | Code::Retfw_imm16 => 2,
        Code::Retfq | Code::Retfq_imm16 => 8,
        _ => 4,
    };
    let extra = if insn.op_count() > 0 { insn.immediate(0) } else { 0 };
    let off = cpu.peek(bus, 0, size)?;
    let sel = low16(cpu.peek(bus, size as u64, size)?);
    let cpl = cpu.cpl();
    let rpl = (sel & 3) as u8;
    if cpu.cr0 & ctl::CR0_PE != 0 && rpl > cpl {
        let sp = cpu.peek(bus, 2 * size as u64 + extra, size)?;
        let ss = low16(cpu.peek(bus, 3 * size as u64 + extra, size)?);
        load_cs(cpu, bus, sel, off, rpl)?;
        load_ss_for(cpu, bus, ss, rpl)?;
        cpu.gpr[4] = sp.wrapping_add(extra);
        return Ok(());
    }
    load_cs(cpu, bus, sel, off, if cpu.cr0 & ctl::CR0_PE != 0 { cpl } else { 0 })?;
    let sp = cpu.rsp().wrapping_add(2 * size as u64 + extra);
    cpu.set_rsp(sp);
    Ok(())
}

/// Loads SS on a privilege change to `cpl` (IRET, RET far, interrupt delivery).
fn load_ss_for(cpu: &mut Cpu, bus: &mut dyn Bus, sel: u16, cpl: u8) -> Res<()> {
    if sel & !3 == 0 {
        if cpu.efer & ctl::EFER_LMA != 0 && cpl != 3 {
            cpu.seg[sreg::SS] =
                Seg { selector: sel, base: 0, limit: 0, attr: ATTR_UNUSABLE | 0x93 | (u32::from(cpl) << 5) };
            return Ok(());
        }
        return Err(Fault::GeneralProtection(0));
    }
    let (lo, hi) = read_desc(cpu, bus, sel)?;
    let seg = seg_from_desc(sel, lo, hi);
    if seg.attr & 0x80 == 0 {
        return Err(Fault::StackFault(sel & !3));
    }
    cpu.seg[sreg::SS] = seg;
    Ok(())
}

/// IRET / IRETD / IRETQ.
pub(crate) fn iret(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction) -> Res<()> {
    let size = match insn.code() {
        Code::Iretw => 2,
        Code::Iretq => 8,
        _ => 4,
    };
    // IRET ends NMI blocking (SDM Vol. 3 §6.7.1): a latched NMI may be taken next.
    cpu.nmi_blocked = false;
    cpu.check_irq = true;
    if cpu.cr0 & ctl::CR0_PE == 0 {
        let ip = cpu.peek(bus, 0, size)?;
        let cs = low16(cpu.peek(bus, size as u64, size)?);
        let fl = cpu.peek(bus, 2 * size as u64, size)?;
        load_cs(cpu, bus, cs, ip, 0)?;
        let sp = cpu.rsp().wrapping_add(3 * size as u64);
        cpu.set_rsp(sp);
        cpu.write_flags(fl, size);
        return Ok(());
    }
    let ip = cpu.peek(bus, 0, size)?;
    let cs = low16(cpu.peek(bus, size as u64, size)?);
    let fl = cpu.peek(bus, 2 * size as u64, size)?;
    let cpl = cpu.cpl();
    let rpl = (cs & 3) as u8;
    if rpl < cpl {
        return Err(Fault::GeneralProtection(cs & !3));
    }
    let long = cpu.efer & ctl::EFER_LMA != 0;
    if long || rpl > cpl {
        let sp = cpu.peek(bus, 3 * size as u64, size)?;
        let ss = low16(cpu.peek(bus, 4 * size as u64, size)?);
        // Flags are written with the privilege of the IRET itself.
        let old_cs = cpu.seg[sreg::CS];
        let old_rip = cpu.rip;
        load_cs(cpu, bus, cs, ip, rpl)?;
        if let Err(e) = load_ss_for(cpu, bus, ss, rpl) {
            cpu.seg[sreg::CS] = old_cs;
            cpu.rip = old_rip;
            return Err(e);
        }
        let saved_cs = cpu.seg[sreg::CS];
        cpu.seg[sreg::CS] = old_cs;
        cpu.write_flags(fl, size);
        cpu.seg[sreg::CS] = saved_cs;
        cpu.gpr[4] = if size == 8 { sp } else { sp & mask(size) };
        if rpl > cpl {
            // Data segments the new privilege may not use become null.
            for i in [sreg::ES, sreg::DS, sreg::FS, sreg::GS] {
                let s = cpu.seg_at_mut(i);
                let conforming_code = s.attr & 0x1c == 0x1c;
                if s.attr & ATTR_UNUSABLE == 0 && !conforming_code && s.dpl() < rpl {
                    s.selector = 0;
                    s.attr |= ATTR_UNUSABLE;
                }
            }
        }
        return Ok(());
    }
    load_cs(cpu, bus, cs, ip, cpl)?;
    let sp = cpu.rsp().wrapping_add(3 * size as u64);
    cpu.set_rsp(sp);
    cpu.write_flags(fl, size);
    Ok(())
}

/// How the event being delivered arose.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Exception,
    External,
    Software,
}

/// Delivers vector `vec` through the IDT (or the real-mode IVT). RIP must already hold the
/// return address the handler should see.
fn deliver(cpu: &mut Cpu, bus: &mut dyn Bus, vec: u8, err: Option<u32>, src: Source) -> Res<()> {
    let ext = if src == Source::External { 1 } else { 0 };
    let idt_err = (u16::from(vec) << 3) | 2 | ext;
    if cpu.cr0 & ctl::CR0_PE == 0 {
        let off = u64::from(vec) * 4;
        if off + 3 > u64::from(cpu.idtr_limit) {
            return Err(Fault::GeneralProtection(idt_err));
        }
        let v = cpu.read_sys(bus, cpu.idtr_base.wrapping_add(off), 4)?;
        let fl = cpu.rflags;
        cpu.push(bus, 2, fl & 0xffff)?;
        cpu.push(bus, 2, u64::from(cpu.seg[sreg::CS].selector))?;
        cpu.push(bus, 2, cpu.rip & 0xffff)?;
        cpu.rflags &= !(IF | TF | AC);
        let sel = low16(v >> 16);
        cpu.seg[sreg::CS].selector = sel;
        cpu.seg[sreg::CS].base = u64::from(sel) << 4;
        cpu.rip = v & 0xffff;
        return Ok(());
    }
    let long = cpu.efer & ctl::EFER_LMA != 0;
    let gsize: u64 = if long { 16 } else { 8 };
    let off = u64::from(vec) * gsize;
    if off + gsize - 1 > u64::from(cpu.idtr_limit) {
        return Err(Fault::GeneralProtection(idt_err));
    }
    let lo = cpu.read_sys(bus, cpu.idtr_base.wrapping_add(off), 8)?;
    let hi = if long { cpu.read_sys(bus, cpu.idtr_base.wrapping_add(off + 8), 8)? } else { 0 };
    let gtype = ((lo >> 40) & 0xf) as u8;
    let gdpl = ((lo >> 45) & 3) as u8;
    let present = (lo >> 47) & 1 == 1;
    let cpl = cpu.cpl();
    let is_trap = gtype & 1 == 1;
    let valid =
        if long { gtype == 0xe || gtype == 0xf } else { gtype == 0xe || gtype == 0xf || gtype == 6 || gtype == 7 };
    if !valid {
        return Err(Fault::GeneralProtection(idt_err));
    }
    if src == Source::Software && gdpl < cpl {
        return Err(Fault::GeneralProtection(idt_err));
    }
    if !present {
        return Err(Fault::SegmentNotPresent(idt_err));
    }
    let sel = ((lo >> 16) & 0xffff) as u16;
    let mut target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
    if long {
        target |= hi << 32;
    }
    let (dlo, dhi) = read_desc(cpu, bus, sel).map_err(|_| Fault::GeneralProtection((sel & !3) | ext))?;
    let cs_desc = seg_from_desc(sel, dlo, dhi);
    if cs_desc.attr & 0x18 != 0x18 {
        return Err(Fault::GeneralProtection((sel & !3) | ext));
    }
    let new_cpl = cs_desc.dpl().min(cpl);
    let old_ss = u64::from(cpu.seg[sreg::SS].selector);
    let old_rsp = cpu.gpr[4];
    let old_cs = u64::from(cpu.seg[sreg::CS].selector);
    let old_fl = cpu.rflags;
    if long {
        let ist = (lo >> 32) & 7;
        let mut rsp = if ist != 0 {
            cpu.read_sys(bus, cpu.tr.base.wrapping_add(0x24 + (ist - 1) * 8), 8)?
        } else if new_cpl < cpl {
            cpu.read_sys(bus, cpu.tr.base.wrapping_add(4 + u64::from(new_cpl) * 8), 8)?
        } else {
            old_rsp
        };
        rsp &= !0xf;
        let mut frame = vec![old_ss, old_rsp, old_fl, old_cs, cpu.rip];
        if let Some(e) = err {
            frame.push(u64::from(e));
        }
        let top = rsp.wrapping_sub(8 * frame.len() as u64);
        for (k, v) in frame.iter().enumerate() {
            let a = rsp.wrapping_sub(8 * (k as u64 + 1));
            cpu.write_sys(bus, a, 8, *v)?;
        }
        let mut cs = cs_desc;
        cs.selector = (sel & !3) | u16::from(new_cpl);
        cs.attr = (cs.attr & !0x60) | (u32::from(new_cpl) << 5);
        cpu.seg[sreg::CS] = cs;
        if new_cpl != cpl {
            cpu.seg[sreg::SS] = Seg {
                selector: u16::from(new_cpl),
                base: 0,
                limit: 0,
                attr: ATTR_UNUSABLE | 0x93 | (u32::from(new_cpl) << 5),
            };
        }
        cpu.gpr[4] = top;
        cpu.rip = target;
    } else {
        // 32-bit protected mode gate.
        let (mut esp, mut pushed_ss) = (old_rsp & 0xffff_ffff, false);
        if new_cpl < cpl {
            let ss0 = low16(cpu.read_sys(bus, cpu.tr.base.wrapping_add(8 + u64::from(new_cpl) * 8), 2)?);
            esp = cpu.read_sys(bus, cpu.tr.base.wrapping_add(4 + u64::from(new_cpl) * 8), 4)?;
            load_ss_for(cpu, bus, ss0, new_cpl)?;
            pushed_ss = true;
        }
        let mut frame = Vec::new();
        if pushed_ss {
            frame.push(old_ss);
            frame.push(old_rsp & 0xffff_ffff);
        }
        frame.extend_from_slice(&[old_fl & 0xffff_ffff, old_cs, cpu.rip & 0xffff_ffff]);
        if let Some(e) = err {
            frame.push(u64::from(e));
        }
        let ssb = cpu.seg[sreg::SS].base;
        for v in frame {
            esp = esp.wrapping_sub(4) & 0xffff_ffff;
            cpu.write_sys(bus, (ssb + esp) & 0xffff_ffff, 4, v)?;
        }
        let mut cs = cs_desc;
        cs.selector = (sel & !3) | u16::from(new_cpl);
        cs.attr = (cs.attr & !0x60) | (u32::from(new_cpl) << 5);
        cpu.seg[sreg::CS] = cs;
        cpu.gpr[4] = esp;
        cpu.rip = target & 0xffff_ffff;
    }
    cpu.rflags &= !(TF | NT | RF | VM);
    if !is_trap {
        cpu.rflags &= !IF;
    }
    Ok(())
}

fn class(f: Fault) -> Fault2 {
    match f {
        Fault::PageFault(..) => Fault2::PageFault,
        Fault::DoubleFault => Fault2::DoubleFault,
        f if f.is_contributory() => Fault2::Contributory,
        _ => Fault2::Benign,
    }
}

/// Delivers an exception raised by an instruction; handles double and triple faults
/// (SDM Vol. 3 Table 6-5). Returns the exit for a triple fault.
pub(crate) fn raise_fault(cpu: &mut Cpu, bus: &mut dyn Bus, f: Fault) -> Result<(), Exit> {
    cpu.stats.exceptions += 1;
    let mut cur = f;
    loop {
        if let Fault::PageFault(addr, _) = cur {
            cpu.cr2 = addr;
        }
        let src = if matches!(cur, Fault::Breakpoint | Fault::Overflow) { Source::Software } else { Source::Exception };
        match deliver(cpu, bus, cur.vector(), cur.error_code(), src) {
            Ok(()) => return Ok(()),
            Err(second) => {
                let (a, b) = (class(cur), class(second));
                if a == Fault2::DoubleFault {
                    return Err(Exit::TripleFault(format!(
                        "fault {second:?} while delivering #DF at rip {:#x}",
                        cpu.rip
                    )));
                }
                let double = matches!(
                    (a, b),
                    (Fault2::Contributory, Fault2::Contributory)
                        | (Fault2::PageFault, Fault2::Contributory)
                        | (Fault2::PageFault, Fault2::PageFault)
                );
                cur = if double { Fault::DoubleFault } else { second };
            }
        }
    }
}

/// Delivers an external interrupt (vector from the interrupt controller).
pub(crate) fn raise_interrupt(cpu: &mut Cpu, bus: &mut dyn Bus, vec: u8) -> Result<(), Exit> {
    match deliver(cpu, bus, vec, None, Source::External) {
        Ok(()) => Ok(()),
        Err(f) => raise_fault(cpu, bus, f),
    }
}

/// Delivers a non-maskable interrupt: vector 2 through the IDT whatever RFLAGS.IF says, as
/// an external event, and blocks further NMIs until the next IRET (Intel SDM Vol. 3 §6.7.1;
/// a fault while delivering it follows the exception rules).
pub(crate) fn raise_nmi(cpu: &mut Cpu, bus: &mut dyn Bus) -> Result<(), Exit> {
    cpu.nmi_blocked = true;
    match deliver(cpu, bus, 2, None, Source::External) {
        Ok(()) => Ok(()),
        Err(f) => raise_fault(cpu, bus, f),
    }
}

/// INT n / INT3 / INTO / INT1: software interrupts. RIP already points past the instruction.
pub(crate) fn soft_int(cpu: &mut Cpu, bus: &mut dyn Bus, vec: u8, exception_like: bool) -> Res<()> {
    let src = if exception_like && vec == 1 { Source::Exception } else { Source::Software };
    deliver(cpu, bus, vec, None, src)
}

/// SYSCALL (64-bit mode): Intel SDM Vol. 2B.
pub(crate) fn syscall(cpu: &mut Cpu) -> Res<()> {
    if cpu.efer & ctl::EFER_SCE == 0 || cpu.efer & ctl::EFER_LMA == 0 {
        return Err(Fault::InvalidOpcode);
    }
    let sel = ((cpu.msr.star >> 32) & 0xfffc) as u16;
    cpu.gpr[1] = cpu.rip;
    cpu.gpr[11] = cpu.rflags & !RF;
    if cpu.in_64bit_mode() {
        cpu.rip = cpu.msr.lstar;
    } else {
        cpu.rip = cpu.msr.cstar;
    }
    cpu.seg[sreg::CS] = Seg { selector: sel, base: 0, limit: 0xffff_ffff, attr: 0xa09b };
    cpu.seg[sreg::SS] = Seg { selector: sel.wrapping_add(8), base: 0, limit: 0xffff_ffff, attr: 0xc093 };
    cpu.rflags = (cpu.rflags & !cpu.msr.sfmask & !RF) | 2;
    Ok(())
}

/// SYSRET: back to CPL 3 (64-bit with REX.W, else compatibility mode).
pub(crate) fn sysret(cpu: &mut Cpu, insn: &Instruction) -> Res<()> {
    if cpu.efer & ctl::EFER_SCE == 0 {
        return Err(Fault::InvalidOpcode);
    }
    if !cpu.in_64bit_mode() || cpu.cpl() != 0 {
        return Err(Fault::GeneralProtection(0));
    }
    let base = ((cpu.msr.star >> 48) & 0xffff) as u16;
    let to64 = insn.code() == Code::Sysretq;
    if to64 {
        let rcx = cpu.gpr[1];
        if ((rcx as i64) << 16 >> 16) as u64 != rcx {
            return Err(Fault::GeneralProtection(0));
        }
        cpu.seg[sreg::CS] = Seg { selector: base.wrapping_add(16) | 3, base: 0, limit: 0xffff_ffff, attr: 0xa0fb };
        cpu.rip = rcx;
    } else {
        cpu.seg[sreg::CS] = Seg { selector: base | 3, base: 0, limit: 0xffff_ffff, attr: 0xc0fb };
        cpu.rip = cpu.gpr[1] & 0xffff_ffff;
    }
    cpu.seg[sreg::SS] = Seg { selector: base.wrapping_add(8) | 3, base: 0, limit: 0xffff_ffff, attr: 0xc0f3 };
    let old = cpu.rflags;
    cpu.rflags = (cpu.gpr[11] & 0x3c_7fd7) | 2;
    if old & IF == 0 && cpu.rflags & IF != 0 {
        cpu.check_irq = true;
    }
    Ok(())
}

#[cfg(test)]
mod nmi_tests {
    use crate::cpu::{Cpu, Exit};
    use crate::tests_support::long_mode_cpu;
    use crate::Bus;
    use iced_x86::code_asm::*;

    const RAM: usize = 4 << 20;
    const GDT: usize = 0x5000;
    const IDT: usize = 0x6000;
    const NMI_HANDLER: u64 = 0x7000;
    const MAIN: u64 = 0x10000;
    /// Nesting depth of the NMI handler (a dword the handler keeps).
    const DEPTH: u64 = 0x9000;

    /// An interrupt controller with an NMI latch; each `out` is recorded, and an `out` to
    /// `latch_on_out` latches one more NMI (one arriving while the handler runs).
    #[derive(Default)]
    struct NmiBus {
        latched: bool,
        latch_on_out: Option<u16>,
        outs: Vec<(u16, u8)>,
    }

    impl Bus for NmiBus {
        fn io_in(&mut self, _: u16, _: u8) -> u32 {
            !0
        }
        fn io_out(&mut self, port: u16, _: u8, value: u32) {
            self.outs.push((port, value.to_le_bytes()[0]));
            if self.latch_on_out == Some(port) {
                self.latch_on_out = None;
                self.latched = true;
            }
        }
        fn mmio_read(&mut self, _: u64, _: u8) -> u64 {
            !0
        }
        fn mmio_write(&mut self, _: u64, _: u8, _: u64) {}
        fn interrupt_pending(&mut self) -> bool {
            false
        }
        fn ack_interrupt(&mut self) -> Option<u8> {
            None
        }
        fn now_ns(&mut self) -> u64 {
            0
        }
        fn take_nmi(&mut self) -> bool {
            std::mem::take(&mut self.latched)
        }
        fn nmi_pending(&mut self) -> bool {
            self.latched
        }
    }

    fn put(ram: &mut [u8], at: u64, bytes: &[u8]) {
        let at = usize::try_from(at).unwrap();
        ram[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn asm(at: u64, f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        f(&mut a);
        a.assemble(at).unwrap()
    }

    /// A 64-bit CPU with a GDT (64-bit code at selector 8), an IDT whose vector 2 is an
    /// interrupt gate to `handler`, and `main` at [`MAIN`].
    fn cpu(ram: &mut [u8], handler: &[u8], main: &[u8]) -> Cpu {
        put(ram, GDT as u64 + 8, &0x00af_9b00_0000_ffffu64.to_le_bytes());
        let lo = (NMI_HANDLER & 0xffff) | (8 << 16) | (0x8e << 40) | ((NMI_HANDLER >> 16) << 48);
        put(ram, IDT as u64 + 2 * 16, &lo.to_le_bytes());
        put(ram, NMI_HANDLER, handler);
        put(ram, MAIN, main);
        let mut c = long_mode_cpu(ram);
        c.gdtr_base = GDT as u64;
        c.gdtr_limit = 15;
        c.idtr_base = IDT as u64;
        c.idtr_limit = 16 * 3 - 1;
        c.gpr[4] = 0x8_0000;
        c.rip = MAIN;
        c
    }

    #[test]
    fn nmi_is_taken_with_interrupts_disabled() {
        let mut ram = vec![0u8; RAM];
        let handler = asm(NMI_HANDLER, |a| {
            a.mov(eax, 0x1234u32).unwrap();
            a.hlt().unwrap();
        });
        // cli; a loop that never ends by itself.
        let main = asm(MAIN, |a| {
            let mut top = a.create_label();
            a.cli().unwrap();
            a.set_label(&mut top).unwrap();
            a.inc(rbx).unwrap();
            a.jmp(top).unwrap();
        });
        let mut c = cpu(&mut ram, &handler, &main);
        let mut bus = NmiBus::default();
        assert_eq!(c.run(&mut bus, 10_000), Exit::Budget);
        assert!(!c.nmi_blocked());
        bus.latched = true;
        assert_eq!(c.run(&mut bus, 10_000), Exit::HaltedForever);
        assert_eq!(c.gpr[0], 0x1234, "the NMI handler ran");
        assert_eq!(c.stats.nmis, 1);
        assert!(c.nmi_blocked(), "blocked until IRET");
        // The frame: RIP inside the loop, CS 8, RFLAGS with IF clear, as an external event.
        let stack_top = usize::try_from(c.gpr[4]).unwrap();
        let frame: Vec<u64> = (0..5)
            .map(|i| u64::from_le_bytes(ram[stack_top + 8 * i..stack_top + 8 * i + 8].try_into().unwrap()))
            .collect();
        assert!((MAIN + 1..MAIN + main.len() as u64).contains(&frame[0]), "{frame:x?}");
        assert_eq!(frame[1], 8);
        assert_eq!(frame[2] & crate::cpu::flags::IF, 0);
        // The blocking is part of the CPU's state and survives a snapshot; older states
        // (no field) read as not blocked.
        let s = c.save_state();
        assert!(s.nmi_blocked);
        let mut json: serde_json::Value = serde_json::to_value(&s).unwrap();
        json.as_object_mut().unwrap().remove("nmi_blocked");
        let old: crate::CpuSnapshot = serde_json::from_value(json).unwrap();
        assert!(!old.nmi_blocked);
        let mut ram2 = ram.clone();
        let mut d = long_mode_cpu(&mut ram2);
        d.restore_state(&s).unwrap();
        assert!(d.nmi_blocked());
    }

    /// The handler counts its nesting depth in [`DEPTH`] and reports it on port 0x80, then
    /// returns with IRET; the main program reports 0xee on port 0x81 in a loop with IF clear.
    fn counting_cpu(ram: &mut [u8]) -> Cpu {
        let handler = asm(NMI_HANDLER, |a| {
            a.inc(dword_ptr(DEPTH)).unwrap();
            a.mov(eax, dword_ptr(DEPTH)).unwrap();
            a.out(0x80, al).unwrap();
            // Work after the `out`: an NMI latched by it must wait until the IRET.
            for _ in 0..20 {
                a.nop().unwrap();
            }
            a.dec(dword_ptr(DEPTH)).unwrap();
            a.iretq().unwrap();
        });
        let main = asm(MAIN, |a| {
            let mut top = a.create_label();
            a.cli().unwrap();
            a.set_label(&mut top).unwrap();
            a.mov(al, 0xeeu32).unwrap();
            a.out(0x81, al).unwrap();
            a.jmp(top).unwrap();
        });
        cpu(ram, &handler, &main)
    }

    #[test]
    fn a_second_nmi_waits_for_iret() {
        let mut ram = vec![0u8; RAM];
        let mut c = counting_cpu(&mut ram);
        // One NMI now, and a second one arriving while its handler runs.
        let mut bus = NmiBus { latched: true, latch_on_out: Some(0x80), outs: Vec::new() };
        assert_eq!(c.run(&mut bus, 200), Exit::Budget);
        let handler_outs: Vec<_> = bus.outs.iter().filter(|o| o.0 == 0x80).map(|o| o.1).collect();
        assert_eq!(handler_outs, [1, 1], "the second NMI ran after the first handler's IRET, not nested in it");
        assert_eq!(c.stats.nmis, 2);
        assert!(!c.nmi_blocked());
        // Between the two handlers nothing else ran (the latched NMI is taken right at the
        // IRET), and the main program continued after both.
        let first_main = bus.outs.iter().position(|o| o.0 == 0x81).unwrap();
        assert_eq!(first_main, 2, "{:x?}", bus.outs);
    }

    #[test]
    fn nmis_while_blocked_collapse_into_one() {
        let mut ram = vec![0u8; RAM];
        let mut c = counting_cpu(&mut ram);
        let mut bus = NmiBus { latched: true, latch_on_out: None, outs: Vec::new() };
        // Stop inside the handler, before its IRET: the NMI is blocked.
        assert_eq!(c.run(&mut bus, 3), Exit::Budget);
        assert!(c.nmi_blocked());
        // Two more NMIs while blocked: the controller's one latch holds them as one.
        bus.latched = true;
        bus.latched = true;
        assert_eq!(c.run(&mut bus, 200), Exit::Budget);
        let handler_outs: Vec<_> = bus.outs.iter().filter(|o| o.0 == 0x80).map(|o| o.1).collect();
        assert_eq!(handler_outs, [1, 1]);
        assert_eq!(c.stats.nmis, 2);
    }

    #[test]
    fn nmi_wakes_a_halted_cpu() {
        for sti in [true, false] {
            let mut ram = vec![0u8; RAM];
            let handler = asm(NMI_HANDLER, |a| {
                a.mov(ecx, 0x55u32).unwrap();
                a.iretq().unwrap();
            });
            let main = asm(MAIN, |a| {
                if sti {
                    a.sti().unwrap();
                } else {
                    a.cli().unwrap();
                }
                a.hlt().unwrap();
                a.mov(ebx, 7u32).unwrap();
                a.cli().unwrap();
                a.hlt().unwrap();
            });
            let mut c = cpu(&mut ram, &handler, &main);
            let mut bus = NmiBus::default();
            let halted = if sti { Exit::Halted } else { Exit::HaltedForever };
            assert_eq!(c.run(&mut bus, 100), halted);
            assert!(c.is_halted());
            assert_eq!(c.run(&mut bus, 100), halted, "nothing pending: still halted");
            bus.latched = true;
            assert_eq!(c.run(&mut bus, 100), Exit::HaltedForever, "sti={sti}");
            assert_eq!((c.gpr[1], c.gpr[3]), (0x55, 7), "the handler ran, then the code after hlt (sti={sti})");
            assert_eq!(c.stats.nmis, 1);
        }
    }
}
