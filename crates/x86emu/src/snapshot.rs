//! Snapshot support: the complete guest-visible state of a [`Cpu`] as a serializable value.
//!
//! [`Cpu::save_state`] captures everything a paused guest needs to continue in a fresh
//! process: the architectural registers (GPRs, RIP, RFLAGS, segment registers with their
//! hidden descriptor caches, LDTR, TR, GDTR, IDTR, control and debug registers, XCR0, EFER),
//! every MSR the emulator keeps ([`Msrs`]), the x87/SSE state ([`FpuState`]), the
//! `hlt`, interrupt-shadow (STI / MOV SS) and NMI-blocking flags, and the CPU's static
//! configuration (TSC frequency and APIC ID, which CPUID reports). [`Cpu::restore_state`] loads it back
//! after checking it, and drops every cached translation and decoded block.
//!
//! Deliberately *not* saved (host-side or derived data, rebuilt on demand):
//!
//! * guest RAM and its host mapping ([`crate::RamRegion`]): the VMM saves RAM itself and
//!   builds the new CPU over the restored mapping;
//! * the software TLB and the decoded-block cache with its per-page code generations: pure
//!   caches of guest memory, flushed on restore;
//! * `check_irq`, `cur_user` and the register-name table: run-loop scratch state recomputed
//!   at the next [`Cpu::run`];
//! * [`crate::Stats`], the recent-block ring ([`Cpu::recent_rips`]) and the instruction trace
//!   writer: host-side diagnostics.
//!
//! # Time
//!
//! The guest TSC is not stored as a count: it is derived from the bus clock
//! ([`crate::Bus::now_ns`]) scaled to [`CpuSnapshot::tsc_hz`], plus [`Msrs::tsc_offset`]. The
//! VMM keeps its guest clock continuous across a snapshot (it restores the clock's offset),
//! so restoring `tsc_offset` makes the TSC continue exactly where it stopped.

use crate::cpu::{ctl, Cpu, CpuConfig, FpuState, Msrs, Seg};
use serde::{Deserialize, Serialize};

/// Guest-visible state of one emulated CPU (see the [module documentation](self) for what is
/// and is not included): the emulator's own save format.
///
/// Not to be confused with `accel::CpuState`, the architectural register file both
/// accelerators exchange with the VMM (boot state, register reads). That one is a subset
/// (GPRs, segments in KVM's unpacked form, descriptor tables, control registers, EFER) with
/// no MSRs, x87/SSE, debug registers, `hlt`/interrupt-shadow flags or CPU configuration; this
/// one is everything needed to resume the emulator exactly, in its internal layout (segment
/// access rights packed as in VMX), and is serialized inside snapshots (its field names are
/// the on-disk JSON keys). The two are kept apart on purpose: KVM saves its own complete state
/// through its ioctls, so only the emulator needs this format.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CpuSnapshot {
    /// RAX..R15 in hardware encoding order.
    pub gpr: [u64; 16],
    /// Instruction pointer (offset in CS).
    pub rip: u64,
    /// RFLAGS (bit 1 set, reserved bits clear).
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS with their descriptor caches (`attr` in the VMX access-rights
    /// layout, see [`Seg`]). FS.base and GS.base are IA32_FS_BASE / IA32_GS_BASE.
    pub seg: [Seg; 6],
    /// LDTR.
    pub ldtr: Seg,
    /// Task register.
    pub tr: Seg,
    /// GDTR base (linear address).
    pub gdtr_base: u64,
    /// GDTR limit in bytes (size - 1).
    pub gdtr_limit: u16,
    /// IDTR base (linear address).
    pub idtr_base: u64,
    /// IDTR limit in bytes (size - 1).
    pub idtr_limit: u16,
    /// CR0 (32 bits used).
    pub cr0: u64,
    /// CR2: linear address of the last page fault.
    pub cr2: u64,
    /// CR3: page-table root GPA and flags.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8: task priority, 0-15.
    pub cr8: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// XCR0.
    pub xcr0: u64,
    /// DR0-DR7 (DR4/DR5 are the reset values of the DR6/DR7 aliases).
    pub dr: [u64; 8],
    /// The other MSRs: SYSCALL (STAR/LSTAR/CSTAR/SFMASK), KERNEL_GS_BASE, TSC_AUX, PAT,
    /// APIC_BASE, MISC_ENABLE, SYSENTER_CS/ESP/EIP and the TSC offset.
    pub msr: Msrs,
    /// x87 and SSE registers, control/status/tag words, MXCSR and last-instruction
    /// pointers.
    pub fpu: FpuState,
    /// The CPU sits in `hlt`, waiting for an interrupt.
    pub halted: bool,
    /// Interrupts are inhibited for one instruction (after STI, MOV SS or POP SS).
    pub interrupt_shadow: bool,
    /// NMIs are blocked: an NMI handler has not executed IRET yet (Intel SDM Vol. 3
    /// §6.7.1). Absent in states saved before NMI delivery, where it is `false` (the CPU
    /// never took an NMI). A latched NMI waiting behind it is the interrupt controller's
    /// state, not the CPU's.
    #[serde(default)]
    pub nmi_blocked: bool,
    /// TSC frequency in Hz (CPUID leaf 0x15/0x16 and the RDTSC rate); non-zero.
    pub tsc_hz: u64,
    /// APIC ID reported by CPUID leaf 1.
    pub apic_id: u8,
}

/// A restored [`CpuSnapshot`] is malformed (a corrupt or foreign snapshot).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CPU state: {field}: {reason}")]
pub struct StateError {
    /// The offending field, as a path into [`CpuSnapshot`] (e.g. `fpu.mxcsr`, `seg[1].attr`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl StateError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> StateError {
        StateError { field: field.into(), reason: reason.into() }
    }
}

/// RFLAGS bits that exist (CF, 1, PF, AF, ZF, SF, TF, IF, DF, OF, IOPL, NT, RF, VM, AC, VIF,
/// VIP, ID); the others are reserved and always zero.
const RFLAGS_DEFINED: u64 = 0x003f_7fd7;
/// Segment access-rights bits the emulator uses: type, S, DPL, P, AVL, L, D/B, G, unusable.
const SEG_ATTR_DEFINED: u32 = 0x0001_f0ff;
/// CR4 bits the emulator lets the guest set (see `write_cr_dr`).
const CR4_DEFINED: u64 = 0x7ff;
/// EFER bits the emulator lets the guest set (see `write_msr`).
const EFER_DEFINED: u64 = ctl::EFER_SCE | ctl::EFER_LME | ctl::EFER_LMA | ctl::EFER_NXE;

impl CpuSnapshot {
    /// Checks the invariants the emulator itself maintains; a state saved from a running
    /// [`Cpu`] always passes.
    pub fn validate(&self) -> Result<(), StateError> {
        if self.rflags & !RFLAGS_DEFINED != 0 || self.rflags & 2 == 0 {
            return Err(StateError::new("rflags", format!("{:#x}: reserved bits set or bit 1 clear", self.rflags)));
        }
        let segs = self.seg.iter().enumerate().map(|(i, s)| (format!("seg[{i}].attr"), s));
        for (name, s) in segs.chain([("ldtr.attr".to_string(), &self.ldtr), ("tr.attr".to_string(), &self.tr)]) {
            if s.attr & !SEG_ATTR_DEFINED != 0 {
                return Err(StateError::new(name, format!("{:#x}: undefined access-rights bits", s.attr)));
            }
        }
        if self.cr0 >> 32 != 0 {
            return Err(StateError::new("cr0", format!("{:#x}: bits 63:32 set", self.cr0)));
        }
        if self.cr0 & ctl::CR0_PG != 0 && self.cr0 & ctl::CR0_PE == 0 {
            return Err(StateError::new("cr0", format!("{:#x}: paging without protected mode", self.cr0)));
        }
        if self.cr4 & !CR4_DEFINED != 0 {
            return Err(StateError::new("cr4", format!("{:#x}: unsupported bits set", self.cr4)));
        }
        if self.cr8 > 15 {
            return Err(StateError::new("cr8", format!("{:#x}: above 15", self.cr8)));
        }
        if self.efer & !EFER_DEFINED != 0 {
            return Err(StateError::new("efer", format!("{:#x}: unsupported bits set", self.efer)));
        }
        if self.efer & ctl::EFER_LMA != 0 && self.cr0 & ctl::CR0_PG == 0 {
            return Err(StateError::new("efer", format!("{:#x}: long mode active without paging", self.efer)));
        }
        for (i, &d) in self.dr.iter().enumerate().skip(4) {
            if d >> 32 != 0 {
                return Err(StateError::new(format!("dr[{i}]"), format!("{d:#x}: bits 63:32 set")));
            }
        }
        if self.fpu.mxcsr & !crate::fpstate::MXCSR_MASK != 0 {
            return Err(StateError::new("fpu.mxcsr", format!("{:#x}: reserved bits set", self.fpu.mxcsr)));
        }
        if self.fpu.fop > 0x7ff {
            return Err(StateError::new("fpu.fop", format!("{:#x}: wider than 11 bits", self.fpu.fop)));
        }
        if self.tsc_hz == 0 {
            return Err(StateError::new("tsc_hz", "zero"));
        }
        Ok(())
    }
}

impl Cpu {
    /// Captures the CPU's guest-visible state (between two [`Cpu::run`] calls, i.e. at an
    /// instruction boundary).
    pub fn save_state(&self) -> CpuSnapshot {
        CpuSnapshot {
            gpr: self.gpr,
            rip: self.rip,
            rflags: self.rflags,
            seg: self.seg,
            ldtr: self.ldtr,
            tr: self.tr,
            gdtr_base: self.gdtr_base,
            gdtr_limit: self.gdtr_limit,
            idtr_base: self.idtr_base,
            idtr_limit: self.idtr_limit,
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
            xcr0: self.xcr0,
            dr: self.dr,
            msr: self.msr.clone(),
            fpu: self.fpu.clone(),
            halted: self.halted,
            interrupt_shadow: self.interrupt_shadow,
            nmi_blocked: self.nmi_blocked,
            tsc_hz: self.config.tsc_hz,
            apic_id: self.config.apic_id,
        }
    }

    /// Loads a state saved by [`Cpu::save_state`] (typically into a new CPU built over the
    /// restored guest RAM), replacing the configuration given to [`Cpu::new`] with the saved
    /// TSC frequency and APIC ID. Flushes the TLB and the decoded-code cache, since guest
    /// memory and page tables may have changed behind the CPU's back.
    ///
    /// On error (a malformed state, see [`CpuSnapshot::validate`]) the CPU is left unchanged.
    pub fn restore_state(&mut self, s: &CpuSnapshot) -> Result<(), StateError> {
        s.validate()?;
        self.gpr = s.gpr;
        self.rip = s.rip;
        self.rflags = s.rflags;
        self.seg = s.seg;
        self.ldtr = s.ldtr;
        self.tr = s.tr;
        self.gdtr_base = s.gdtr_base;
        self.gdtr_limit = s.gdtr_limit;
        self.idtr_base = s.idtr_base;
        self.idtr_limit = s.idtr_limit;
        self.cr0 = s.cr0;
        self.cr2 = s.cr2;
        self.cr3 = s.cr3;
        self.cr4 = s.cr4;
        self.cr8 = s.cr8;
        self.efer = s.efer;
        self.xcr0 = s.xcr0;
        self.dr = s.dr;
        self.msr = s.msr.clone();
        self.fpu = s.fpu.clone();
        self.halted = s.halted;
        self.interrupt_shadow = s.interrupt_shadow;
        self.nmi_blocked = s.nmi_blocked;
        self.config = CpuConfig { tsc_hz: s.tsc_hz, apic_id: s.apic_id, cpus: self.config.cpus };
        // Run-loop scratch state: look at the interrupt line before the first instruction.
        self.check_irq = true;
        self.cur_user = false;
        self.flush_caches();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Exit;
    use crate::tests_support::long_mode_cpu;
    use crate::{NullBus, RamRegion};
    use iced_x86::code_asm::*;

    const RAM: usize = 4 << 20;
    const CODE: u64 = 0x10000;
    const DATA: u64 = 0x40000;

    /// A guest that exercises integer, memory, stack, SSE, x87 and MSR state in a loop and
    /// ends in `cli; hlt`.
    fn program() -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut top = a.create_label();
        // MSRs: STAR, LSTAR, KERNEL_GS_BASE, TSC_AUX.
        for (msr, v) in [(0xc000_0081u32, 0x0023_0010_0000_0000u64), (0xc000_0082, 0xffff_8000_1234_5000)] {
            a.mov(ecx, msr).unwrap();
            a.mov(eax, crate::regs::low32(v)).unwrap();
            a.mov(edx, (v >> 32) as u32).unwrap();
            a.wrmsr().unwrap();
        }
        a.mov(ecx, 0xc000_0102u32).unwrap();
        a.mov(eax, 0x1357_9bdfu32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, 0xc000_0103u32).unwrap();
        a.mov(eax, 7u32).unwrap();
        a.wrmsr().unwrap();
        a.mov(rsi, DATA).unwrap();
        a.mov(rbx, 0x1234_5678_9abc_def0u64).unwrap();
        a.mov(r15d, 500u32).unwrap();
        a.pxor(xmm0, xmm0).unwrap();
        a.mov(eax, 3u32).unwrap();
        a.movd(xmm1, eax).unwrap();
        a.pshufd(xmm1, xmm1, 0).unwrap();
        a.fld1().unwrap();
        a.fldz().unwrap();
        a.set_label(&mut top).unwrap();
        // Integer work with flags and a data-dependent store.
        a.imul_3(rax, rbx, 0x9e37).unwrap();
        a.rol(rbx, 13).unwrap();
        a.xor(rbx, rax).unwrap();
        a.mov(rdx, r15).unwrap();
        a.and(edx, 0xff).unwrap();
        a.mov(qword_ptr(rsi + rdx * 8), rbx).unwrap();
        a.adc(r14, qword_ptr(rsi + rdx * 8)).unwrap();
        a.push(rbx).unwrap();
        a.pop(r13).unwrap();
        // SSE and x87 accumulators.
        a.paddd(xmm0, xmm1).unwrap();
        a.movdqu(xmmword_ptr(rsi + 0x1000), xmm0).unwrap();
        a.fadd_2(st0, st1).unwrap();
        a.dec(r15d).unwrap();
        a.jnz(top).unwrap();
        a.fstp(qword_ptr(rsi + 0x2000)).unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
        a.assemble(CODE).unwrap()
    }

    fn guest() -> (Vec<u8>, Cpu) {
        let mut ram = vec![0u8; RAM];
        let code = program();
        ram[crate::regs::host_usize(CODE)..crate::regs::host_usize(CODE) + code.len()].copy_from_slice(&code);
        let mut c = long_mode_cpu(&mut ram);
        c.rip = CODE;
        c.cr4 |= ctl::CR4_OSFXSR;
        (ram, c)
    }

    #[test]
    fn save_restore_into_new_cpu_continues_identically() {
        let (ram, mut a) = guest();
        assert_eq!(a.run(&mut NullBus, 2_000), Exit::Budget);
        let saved = a.save_state();
        assert!(saved.validate().is_ok());
        // Through a serializer, as the VMM stores it.
        let json = serde_json::to_string(&saved).unwrap();
        let loaded: CpuSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(loaded, saved);

        let mut ram2 = ram.clone();
        let region = RamRegion { gpa: 0, size: RAM as u64, host_addr: ram2.as_mut_ptr() };
        let mut b = Cpu::new(vec![region], CpuConfig { tsc_hz: 5, apic_id: 9, cpus: 1 });
        b.restore_state(&loaded).unwrap();
        assert_eq!(b.save_state(), saved);

        assert_eq!(a.run(&mut NullBus, 1_000_000), Exit::HaltedForever);
        assert_eq!(b.run(&mut NullBus, 1_000_000), Exit::HaltedForever);
        let (sa, sb) = (a.save_state(), b.save_state());
        assert_eq!(sa, sb);
        assert_eq!(sa.gpr[15], 0, "loop ran to the end");
        assert_eq!(sa.msr.lstar, 0xffff_8000_1234_5000);
        assert_eq!(sa.msr.kernel_gs_base, 0x1357_9bdf);
        assert_eq!(sb.tsc_hz, CpuConfig::default().tsc_hz, "configuration restored");
        assert!(ram == ram2, "guest RAM differs after the restored run");
        // The guest really wrote its results.
        let f = f64::from_le_bytes(
            ram[crate::regs::host_usize(DATA) + 0x2000..crate::regs::host_usize(DATA) + 0x2008].try_into().unwrap(),
        );
        assert_eq!(f, 500.0);
    }

    #[test]
    fn halted_and_shadow_survive() {
        let mut ram = vec![0u8; RAM];
        // sti; hlt
        ram[crate::regs::host_usize(CODE)..crate::regs::host_usize(CODE) + 2].copy_from_slice(&[0xfb, 0xf4]);
        let mut a = long_mode_cpu(&mut ram);
        a.rip = CODE;
        assert_eq!(a.run(&mut NullBus, 10), Exit::Halted);
        let mut s = a.save_state();
        assert!(s.halted);
        s.interrupt_shadow = true;
        let mut ram2 = ram.clone();
        let region = RamRegion { gpa: 0, size: RAM as u64, host_addr: ram2.as_mut_ptr() };
        let mut b = Cpu::new(vec![region], CpuConfig::default());
        b.restore_state(&s).unwrap();
        assert!(b.is_halted());
        assert_eq!(b.save_state(), s);
        assert_eq!(b.run(&mut NullBus, 10), Exit::Halted);
    }

    #[test]
    fn restore_flushes_tlb_and_code_cache() {
        let mut ram = vec![0u8; RAM];
        // 0x10000: mov eax, 1 ; hlt
        ram[0x10000..0x10006].copy_from_slice(&[0xb8, 1, 0, 0, 0, 0xf4]);
        // 0x210000: mov eax, 4 ; hlt
        ram[0x210000..0x210006].copy_from_slice(&[0xb8, 4, 0, 0, 0, 0xf4]);
        let host = ram.as_mut_ptr();
        let mut c = long_mode_cpu(&mut ram);
        c.rip = 0x10000;
        let s = c.save_state();
        assert_eq!(c.run(&mut NullBus, 100), Exit::HaltedForever);
        assert_eq!(c.gpr[0], 1);
        // The VMM loads other RAM contents behind the CPU's back (the block at this GPA is
        // cached): the code now loads 2.
        // SAFETY: 0x10001 is inside the 4 MiB buffer the CPU was built over.
        unsafe { host.add(0x10001).write_volatile(2) };
        c.restore_state(&s).unwrap();
        assert_eq!(c.run(&mut NullBus, 100), Exit::HaltedForever);
        assert_eq!(c.gpr[0], 2, "stale decoded block used after restore");
        // New page tables: linear 0 - 2 MiB now maps GPA 2 - 4 MiB (the old translation of
        // linear 0x10000 is in the TLB).
        // SAFETY: the PD entry at 0x3000 is inside the buffer.
        unsafe { (host.add(0x3000) as *mut u64).write_volatile(0x20_0000 | 0x83) };
        c.restore_state(&s).unwrap();
        assert_eq!(c.run(&mut NullBus, 100), Exit::HaltedForever);
        assert_eq!(c.gpr[0], 4, "stale TLB entry used after restore");
    }

    #[test]
    fn malformed_states_are_rejected_without_change() {
        let mut ram = vec![0u8; RAM];
        let mut c = long_mode_cpu(&mut ram);
        let good = c.save_state();
        type Corrupt = (&'static str, fn(&mut CpuSnapshot));
        let cases: [Corrupt; 14] = [
            ("rflags", |s| s.rflags = 0),
            ("rflags", |s| s.rflags |= 1 << 40),
            ("seg[1].attr", |s| s.seg[1].attr |= 0x100),
            ("tr.attr", |s| s.tr.attr = u32::MAX),
            ("cr0", |s| s.cr0 = ctl::CR0_PG),
            ("cr0", |s| s.cr0 |= 1 << 40),
            ("cr4", |s| s.cr4 |= 1 << 13),
            ("cr8", |s| s.cr8 = 16),
            ("efer", |s| s.efer |= 1 << 12),
            ("efer", |s| s.cr0 = ctl::CR0_PE),
            ("dr[7]", |s| s.dr[7] = u64::MAX),
            ("fpu.mxcsr", |s| s.fpu.mxcsr = 0x1_0000),
            ("fpu.fop", |s| s.fpu.fop = 0x800),
            ("tsc_hz", |s| s.tsc_hz = 0),
        ];
        for (field, corrupt) in cases {
            let mut bad = good.clone();
            corrupt(&mut bad);
            let err = c.restore_state(&bad).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert_eq!(c.save_state(), good, "CPU changed by a rejected restore");
        }
        // Wrong array lengths cannot even be deserialized.
        let mut v = serde_json::to_value(&good).unwrap();
        v["gpr"].as_array_mut().unwrap().pop();
        assert!(serde_json::from_value::<CpuSnapshot>(v).is_err());
    }
}
