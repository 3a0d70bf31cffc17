//! System instructions: control/debug registers, MSRs, descriptor tables, TLB control,
//! CPUID and the time-stamp counter. Anything not handled here goes on to SSE and x87.

use crate::cpu::{ctl, flags::*, sreg, Cpu, Exit};
use crate::interrupt::{read_desc, seg_from_desc};
use crate::regs::{low16, low32, low64};
use crate::{Bus, Fault, Res, SRes, Stop};
use iced_x86::{Instruction, Mnemonic, OpKind, Register};

/// MOV to CR0/2/3/4/8 or DR0-7 (Intel SDM Vol. 3 §2.5).
pub(crate) fn write_cr_dr(cpu: &mut Cpu, r: Register, v: u64) -> SRes<()> {
    match r {
        Register::CR0 => {
            let v = v | 0x10; // ET is hardwired to 1
            if v & ctl::CR0_PG != 0 && v & ctl::CR0_PE == 0 {
                return Err(Fault::GeneralProtection(0).into());
            }
            let old = cpu.cr0;
            cpu.cr0 = v & 0xffff_ffff;
            if (old ^ cpu.cr0) & (ctl::CR0_PG | ctl::CR0_WP | ctl::CR0_PE) != 0 {
                cpu.mmu.flush_all();
            }
            if cpu.efer & ctl::EFER_LME != 0 && cpu.cr0 & ctl::CR0_PG != 0 {
                if cpu.cr4 & ctl::CR4_PAE == 0 {
                    return Err(Fault::GeneralProtection(0).into());
                }
                cpu.efer |= ctl::EFER_LMA;
            } else if cpu.cr0 & ctl::CR0_PG == 0 {
                cpu.efer &= !ctl::EFER_LMA;
            }
        }
        Register::CR2 => cpu.cr2 = v,
        Register::CR3 => {
            cpu.cr3 = v & 0x000f_ffff_ffff_f000 | (v & 0x18);
            cpu.mmu.flush_non_global();
        }
        Register::CR4 => {
            // Reject bits for features we do not advertise (VMXE, SMXE, PKE, CET, ...).
            const OK: u64 = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400;
            if v & !OK != 0 {
                return Err(Fault::GeneralProtection(0).into());
            }
            cpu.cr4 = v;
            cpu.mmu.flush_all();
        }
        Register::CR8 => {
            cpu.cr8 = v & 0xf;
            cpu.check_irq = true;
        }
        Register::DR0 | Register::DR1 | Register::DR2 | Register::DR3 => {
            if let Some(d) = cpu.dr.get_mut((r as usize) - (Register::DR0 as usize)) {
                *d = v;
            }
        }
        Register::DR6 => cpu.dr[6] = (v & 0xf00f) | 0xffff_0ff0,
        Register::DR7 => cpu.dr[7] = (v & 0xffff_2bff) | 0x400,
        _ => return Err(Fault::InvalidOpcode.into()),
    }
    Ok(())
}

/// MOV from a control or debug register.
pub(crate) fn read_cr_dr(cpu: &mut Cpu, _bus: &mut dyn Bus, r: Register) -> u64 {
    match r {
        Register::CR0 => cpu.cr0,
        Register::CR2 => cpu.cr2,
        Register::CR3 => cpu.cr3,
        Register::CR4 => cpu.cr4,
        Register::CR8 => cpu.cr8,
        Register::DR0 | Register::DR1 | Register::DR2 | Register::DR3 => {
            cpu.dr.get((r as usize) - (Register::DR0 as usize)).copied().unwrap_or(0)
        }
        Register::DR6 => cpu.dr[6],
        Register::DR7 => cpu.dr[7],
        _ => 0,
    }
}

/// MSR numbers (Intel SDM Vol. 4).
mod msr {
    pub const TSC: u32 = 0x10;
    pub const PLATFORM_ID: u32 = 0x17;
    pub const APIC_BASE: u32 = 0x1b;
    pub const FEATURE_CONTROL: u32 = 0x3a;
    pub const TSC_ADJUST: u32 = 0x3b;
    pub const BIOS_SIGN_ID: u32 = 0x8b;
    pub const MTRRCAP: u32 = 0xfe;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MCG_CAP: u32 = 0x179;
    pub const MCG_STATUS: u32 = 0x17a;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const PAT: u32 = 0x277;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const EFER: u32 = 0xc000_0080;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SFMASK: u32 = 0xc000_0084;
    pub const FS_BASE: u32 = 0xc000_0100;
    pub const GS_BASE: u32 = 0xc000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;
}

impl Cpu {
    /// Guest TSC: guest time scaled to the advertised frequency, plus the WRMSR offset.
    pub(crate) fn tsc(&self, bus: &mut dyn Bus) -> u64 {
        let ns = bus.now_ns();
        let t = low64(u128::from(ns) * u128::from(self.config.tsc_hz) / 1_000_000_000);
        t.wrapping_add(self.msr.tsc_offset as u64)
    }

    /// RDMSR. Unknown MSRs raise #GP(0), which Linux's `rdmsr_safe` expects.
    pub fn read_msr(&mut self, bus: &mut dyn Bus, index: u32) -> Option<u64> {
        Some(match index {
            msr::TSC => self.tsc(bus),
            msr::PLATFORM_ID => 0,
            msr::APIC_BASE => self.msr.apic_base,
            msr::FEATURE_CONTROL => 1, // locked, VMX off
            // The TSC's offset from guest time (Intel SDM Vol. 3 §18.17.3): what WRMSR to
            // IA32_TSC or IA32_TSC_ADJUST has added.
            msr::TSC_ADJUST => self.msr.tsc_offset as u64,
            msr::BIOS_SIGN_ID => 0,
            msr::MTRRCAP => 0,
            msr::MTRR_DEF_TYPE => 0,
            msr::SYSENTER_CS => self.msr.sysenter_cs,
            msr::SYSENTER_ESP => self.msr.sysenter_esp,
            msr::SYSENTER_EIP => self.msr.sysenter_eip,
            msr::MCG_CAP | msr::MCG_STATUS => 0,
            msr::MISC_ENABLE => self.msr.misc_enable | 1, // fast strings
            msr::PAT => self.msr.pat,
            msr::EFER => self.efer,
            msr::STAR => self.msr.star,
            msr::LSTAR => self.msr.lstar,
            msr::CSTAR => self.msr.cstar,
            msr::SFMASK => self.msr.sfmask,
            msr::FS_BASE => self.seg[sreg::FS].base,
            msr::GS_BASE => self.seg[sreg::GS].base,
            msr::KERNEL_GS_BASE => self.msr.kernel_gs_base,
            msr::TSC_AUX => self.msr.tsc_aux,
            _ => return None,
        })
    }

    /// WRMSR. Returns `false` for an unknown MSR or a reserved value (the caller raises #GP).
    pub fn write_msr(&mut self, bus: &mut dyn Bus, index: u32, v: u64) -> bool {
        let canonical = ((v as i64) << 16 >> 16) as u64 == v;
        match index {
            msr::TSC => {
                let now = self.tsc(bus).wrapping_sub(self.msr.tsc_offset as u64);
                self.msr.tsc_offset = v.wrapping_sub(now) as i64;
            }
            // Writing the adjustment moves the TSC by the difference; writing the TSC moves
            // the adjustment (above): both are `tsc_offset`.
            msr::TSC_ADJUST => self.msr.tsc_offset = v as i64,
            msr::APIC_BASE => self.msr.apic_base = v,
            msr::BIOS_SIGN_ID | msr::MCG_STATUS | msr::MTRR_DEF_TYPE => {}
            msr::SYSENTER_CS => self.msr.sysenter_cs = v,
            msr::SYSENTER_ESP => self.msr.sysenter_esp = v,
            msr::SYSENTER_EIP => self.msr.sysenter_eip = v,
            msr::MISC_ENABLE => self.msr.misc_enable = v,
            msr::PAT => self.msr.pat = v,
            msr::EFER => {
                let allowed = ctl::EFER_SCE | ctl::EFER_LME | ctl::EFER_NXE | ctl::EFER_LMA;
                if v & !allowed != 0 {
                    return false;
                }
                let lma = self.efer & ctl::EFER_LMA;
                self.efer = (v & !ctl::EFER_LMA) | lma;
                self.mmu.flush_all();
            }
            msr::STAR => self.msr.star = v,
            msr::LSTAR if canonical => self.msr.lstar = v,
            msr::CSTAR if canonical => self.msr.cstar = v,
            msr::SFMASK => self.msr.sfmask = v & 0xffff_ffff,
            msr::FS_BASE if canonical => self.seg[sreg::FS].base = v,
            msr::GS_BASE if canonical => self.seg[sreg::GS].base = v,
            msr::KERNEL_GS_BASE if canonical => self.msr.kernel_gs_base = v,
            msr::TSC_AUX => self.msr.tsc_aux = v & 0xffff_ffff,
            _ => return false,
        }
        true
    }
}

fn need_cpl0(cpu: &Cpu) -> Res<()> {
    if cpu.cpl() != 0 {
        return Err(Fault::GeneralProtection(0));
    }
    Ok(())
}

/// System instructions not handled by the integer core.
pub(crate) fn execute_system(cpu: &mut Cpu, bus: &mut dyn Bus, insn: &Instruction) -> SRes<()> {
    use Mnemonic as M;
    match insn.mnemonic() {
        M::Cpuid => {
            let (a, b, c, d) = crate::cpuid::cpuid(cpu, low32(cpu.gpr[0]), low32(cpu.gpr[1]));
            cpu.gpr[0] = u64::from(a);
            cpu.gpr[3] = u64::from(b);
            cpu.gpr[1] = u64::from(c);
            cpu.gpr[2] = u64::from(d);
            Ok(())
        }
        M::Rdtsc => {
            let t = cpu.tsc(bus);
            cpu.gpr[0] = t & 0xffff_ffff;
            cpu.gpr[2] = t >> 32;
            Ok(())
        }
        M::Rdtscp => {
            let t = cpu.tsc(bus);
            cpu.gpr[0] = t & 0xffff_ffff;
            cpu.gpr[2] = t >> 32;
            cpu.gpr[1] = cpu.msr.tsc_aux & 0xffff_ffff;
            Ok(())
        }
        M::Rdmsr => {
            need_cpl0(cpu)?;
            let v = cpu.read_msr(bus, low32(cpu.gpr[1])).ok_or(Fault::GeneralProtection(0))?;
            cpu.gpr[0] = v & 0xffff_ffff;
            cpu.gpr[2] = v >> 32;
            Ok(())
        }
        M::Wrmsr => {
            need_cpl0(cpu)?;
            let v = (cpu.gpr[0] & 0xffff_ffff) | (cpu.gpr[2] << 32);
            if !cpu.write_msr(bus, low32(cpu.gpr[1]), v) {
                return Err(Fault::GeneralProtection(0).into());
            }
            Ok(())
        }
        M::Lgdt | M::Lidt => {
            need_cpl0(cpu)?;
            let la = cpu.mem_la(insn);
            let limit = low16(cpu.rmem(bus, la, 2)?);
            let mut base = cpu.rmem(bus, la.wrapping_add(2), if cpu.in_64bit_mode() { 8 } else { 4 })?;
            if !cpu.in_64bit_mode() && insn.memory_size().size() == 6 && cpu.bitness() == 16 {
                base &= 0x00ff_ffff;
            }
            if insn.mnemonic() == M::Lgdt {
                cpu.gdtr_base = base;
                cpu.gdtr_limit = limit;
            } else {
                cpu.idtr_base = base;
                cpu.idtr_limit = limit;
            }
            Ok(())
        }
        M::Sgdt | M::Sidt => {
            let la = cpu.mem_la(insn);
            let (base, limit) = if insn.mnemonic() == M::Sgdt {
                (cpu.gdtr_base, cpu.gdtr_limit)
            } else {
                (cpu.idtr_base, cpu.idtr_limit)
            };
            let bsize = if cpu.in_64bit_mode() { 8 } else { 4 };
            cpu.probe_write(la, 2 + bsize, cpu.user())?;
            cpu.wmem(bus, la, 2, u64::from(limit))?;
            cpu.wmem(bus, la.wrapping_add(2), bsize, base)?;
            Ok(())
        }
        M::Lldt | M::Ltr => {
            need_cpl0(cpu)?;
            let sel = low16(cpu.rd(bus, cpu.loc(insn, 0), 2)?);
            if sel & !3 == 0 {
                if insn.mnemonic() == M::Ltr {
                    return Err(Fault::GeneralProtection(0).into());
                }
                cpu.ldtr = crate::cpu::Seg { selector: sel, base: 0, limit: 0, attr: 1 << 16 };
                return Ok(());
            }
            let (lo, hi) = read_desc(cpu, bus, sel)?;
            let mut seg = seg_from_desc(sel, lo, hi);
            if cpu.efer & ctl::EFER_LMA != 0 {
                let upper = cpu.read_sys(bus, cpu.gdtr_base.wrapping_add(u64::from(sel & !7) + 8), 4)?;
                seg.base |= upper << 32;
            }
            if insn.mnemonic() == M::Ltr {
                let t = seg.attr & 0xf;
                if t != 9 && t != 1 {
                    return Err(Fault::GeneralProtection(sel & !3).into());
                }
                // Mark the TSS busy in the GDT.
                let a = cpu.gdtr_base.wrapping_add(u64::from(sel & !7) + 4);
                cpu.write_sys(bus, a, 4, u64::from(hi | 0x200))?;
                seg.attr |= 2;
                cpu.tr = seg;
            } else {
                cpu.ldtr = seg;
            }
            Ok(())
        }
        M::Sldt | M::Str | M::Smsw => {
            let v = match insn.mnemonic() {
                M::Sldt => u64::from(cpu.ldtr.selector),
                M::Str => u64::from(cpu.tr.selector),
                _ => cpu.cr0 & 0xffff,
            };
            let size = if insn.op0_kind() == OpKind::Register { insn.op0_register().size() } else { 2 };
            let l = cpu.loc(insn, 0);
            cpu.wr(bus, l, size, v)?;
            Ok(())
        }
        M::Lmsw => {
            need_cpl0(cpu)?;
            let v = cpu.rd(bus, cpu.loc(insn, 0), 2)?;
            // LMSW can set but not clear PE.
            let nv = (cpu.cr0 & !0xe) | (v & 0xf) | (cpu.cr0 & 1);
            write_cr_dr(cpu, Register::CR0, nv)
        }
        M::Clts => {
            need_cpl0(cpu)?;
            cpu.cr0 &= !ctl::CR0_TS;
            Ok(())
        }
        M::Invlpg => {
            need_cpl0(cpu)?;
            let la = cpu.mem_la(insn);
            cpu.mmu.flush_page(la);
            Ok(())
        }
        M::Invpcid => {
            need_cpl0(cpu)?;
            cpu.mmu.flush_all();
            Ok(())
        }
        M::Wbinvd | M::Invd | M::Wbnoinvd => {
            need_cpl0(cpu)?;
            Ok(())
        }
        M::Verw | M::Verr => {
            // Only used as a buffer-clearing idiom; report "not accessible".
            cpu.rflags &= !ZF;
            Ok(())
        }
        M::Rdpid => {
            let r = insn.op0_register();
            cpu.set_reg(r, cpu.msr.tsc_aux);
            Ok(())
        }
        M::Lss | M::Lfs | M::Lgs | M::Lds | M::Les => {
            let la = cpu.mem_la(insn);
            let r0 = insn.op0_register();
            let osize = r0.size();
            let off = cpu.rmem(bus, la, osize)?;
            let sel = low16(cpu.rmem(bus, la.wrapping_add(osize as u64), 2)?);
            let sr = match insn.mnemonic() {
                M::Lss => Register::SS,
                M::Lfs => Register::FS,
                M::Lgs => Register::GS,
                M::Lds => Register::DS,
                _ => Register::ES,
            };
            crate::interrupt::load_seg_reg(cpu, bus, sr, sel)?;
            cpu.set_reg(r0, off);
            Ok(())
        }
        M::Crc32 | M::Movbe | M::Rdrand | M::Rdseed => {
            if crate::intext::execute(cpu, bus, insn)? {
                return Ok(());
            }
            unsupported(cpu, insn)
        }
        _ => {
            if crate::sse::execute(cpu, bus, insn)? {
                return Ok(());
            }
            if crate::fpu::execute(cpu, bus, insn)? {
                return Ok(());
            }
            unsupported(cpu, insn)
        }
    }
}

/// An instruction the emulator does not implement: #UD for user code (a program probing
/// for a feature), a VM stop with the instruction's name for kernel code.
fn unsupported(cpu: &mut Cpu, insn: &Instruction) -> SRes<()> {
    if cpu.cpl() == 3 {
        return Err(Fault::InvalidOpcode.into());
    }
    Err(Stop::Exit(Exit::Unsupported(format!("{:?} ({:?}) at {:#x}", insn.mnemonic(), insn.code(), insn.ip()))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuConfig;

    /// A bus whose clock reads `self.0` ns.
    struct At(u64);

    impl Bus for At {
        fn io_in(&mut self, _: u16, _: u8) -> u32 {
            !0
        }
        fn io_out(&mut self, _: u16, _: u8, _: u32) {}
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
            self.0
        }
    }

    #[test]
    fn tsc_adjust_and_tsc_writes_move_each_other() {
        let mut c = Cpu::new(Vec::new(), CpuConfig { tsc_hz: 1_000_000_000, apic_id: 0, cpus: 1 });
        let mut bus = At(5_000);
        assert_eq!(c.read_msr(&mut bus, msr::TSC_ADJUST), Some(0));
        assert_eq!(c.read_msr(&mut bus, msr::TSC), Some(5_000));
        // Adjust by +1000: the TSC moves by as much.
        assert!(c.write_msr(&mut bus, msr::TSC_ADJUST, 1_000));
        assert_eq!(c.read_msr(&mut bus, msr::TSC), Some(6_000));
        // Write the TSC back by 4000: the adjustment follows (SDM Vol. 3 §18.17.3).
        assert!(c.write_msr(&mut bus, msr::TSC, 2_000));
        assert_eq!(c.read_msr(&mut bus, msr::TSC_ADJUST), Some((-3_000i64) as u64));
        bus.0 = 7_000;
        assert_eq!(c.read_msr(&mut bus, msr::TSC), Some(4_000));
        // Back to 0: the TSC is guest time again.
        assert!(c.write_msr(&mut bus, msr::TSC_ADJUST, 0));
        assert_eq!(c.read_msr(&mut bus, msr::TSC), Some(7_000));
    }
}
