//! The vCPU state: registers, flags, segments, MSRs, x87/SSE state, the [`Cpu`] that holds
//! them, and the register file as instructions see it.

use crate::mmu::{Mmu, RamRegion, SharedRam};
use crate::regs::mask;
use crate::{Fault, Res};
use flags::*;
use iced_x86::{ConditionCode, Instruction, Register};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// RFLAGS bits (Intel SDM Vol. 1 §3.4.3).
#[allow(dead_code)]
pub mod flags {
    /// Carry flag (bit 0).
    pub const CF: u64 = 1 << 0;
    /// Parity flag (bit 2): even parity of the low result byte.
    pub const PF: u64 = 1 << 2;
    /// Auxiliary carry flag (bit 4): carry out of bit 3, for BCD.
    pub const AF: u64 = 1 << 4;
    /// Zero flag (bit 6).
    pub const ZF: u64 = 1 << 6;
    /// Sign flag (bit 7): the result's top bit.
    pub const SF: u64 = 1 << 7;
    /// Trap flag (bit 8): single-step #DB after each instruction.
    pub const TF: u64 = 1 << 8;
    /// Interrupt enable flag (bit 9): maskable external interrupts are taken when set.
    pub const IF: u64 = 1 << 9;
    /// Direction flag (bit 10): string instructions step downwards when set.
    pub const DF: u64 = 1 << 10;
    /// Overflow flag (bit 11): signed overflow.
    pub const OF: u64 = 1 << 11;
    /// I/O privilege level (bits 12-13, two bits).
    pub const IOPL: u64 = 3 << 12;
    /// Nested task flag (bit 14).
    pub const NT: u64 = 1 << 14;
    /// Resume flag (bit 16): suppresses instruction breakpoints for one instruction.
    pub const RF: u64 = 1 << 16;
    /// Virtual-8086 mode (bit 17).
    pub const VM: u64 = 1 << 17;
    /// Alignment check / SMAP access override (bit 18).
    pub const AC: u64 = 1 << 18;
    /// Virtual interrupt flag (bit 19).
    pub const VIF: u64 = 1 << 19;
    /// Virtual interrupt pending (bit 20).
    pub const VIP: u64 = 1 << 20;
    /// CPUID-available flag (bit 21): software-toggleable.
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic status flags.
    pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
}

/// Control-register and EFER bits used by the emulator.
#[allow(dead_code)]
pub mod ctl {
    /// CR0.PE (bit 0): protected mode enable.
    pub const CR0_PE: u64 = 1 << 0;
    /// CR0.MP (bit 1): WAIT/FWAIT honours CR0.TS.
    pub const CR0_MP: u64 = 1 << 1;
    /// CR0.EM (bit 2): x87 emulation; x87 instructions raise #NM.
    pub const CR0_EM: u64 = 1 << 2;
    /// CR0.TS (bit 3): task switched; the next x87/SSE instruction raises #NM.
    pub const CR0_TS: u64 = 1 << 3;
    /// CR0.NE (bit 5): native x87 error reporting (#MF).
    pub const CR0_NE: u64 = 1 << 5;
    /// CR0.WP (bit 16): supervisor writes honour read-only pages.
    pub const CR0_WP: u64 = 1 << 16;
    /// CR0.PG (bit 31): paging enable.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4.PSE (bit 4): 4 MiB pages in 32-bit paging.
    pub const CR4_PSE: u64 = 1 << 4;
    /// CR4.PAE (bit 5): physical address extension (required for long mode).
    pub const CR4_PAE: u64 = 1 << 5;
    /// CR4.PGE (bit 7): global pages survive CR3 writes.
    pub const CR4_PGE: u64 = 1 << 7;
    /// CR4.OSFXSR (bit 9): the OS supports FXSAVE/FXRSTOR and SSE.
    pub const CR4_OSFXSR: u64 = 1 << 9;
    /// CR4.PCIDE (bit 17): process-context identifiers in CR3 bits 0-11.
    pub const CR4_PCIDE: u64 = 1 << 17;
    /// EFER.SCE (bit 0): SYSCALL/SYSRET enable.
    pub const EFER_SCE: u64 = 1 << 0;
    /// EFER.LME (bit 8): long mode enable.
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER.LMA (bit 10): long mode active (set by the CPU when paging turns on with LME).
    pub const EFER_LMA: u64 = 1 << 10;
    /// EFER.NXE (bit 11): the no-execute bit (63) in page-table entries is honoured.
    pub const EFER_NXE: u64 = 1 << 11;
}

/// A segment register with its hidden descriptor cache.
///
/// `attr` uses the VMX access-rights layout (Intel SDM Vol. 3 §24.4.1): bits 0-3 type,
/// 4 S, 5-6 DPL, 7 P, 12 AVL, 13 L, 14 D/B, 15 G, 16 unusable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seg {
    /// Visible selector.
    pub selector: u16,
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes.
    pub limit: u32,
    /// Access rights (see above).
    pub attr: u32,
}

impl Seg {
    /// Descriptor privilege level.
    pub fn dpl(&self) -> u8 {
        ((self.attr >> 5) & 3) as u8
    }
    /// 64-bit code segment (L bit).
    pub fn long(&self) -> bool {
        self.attr & (1 << 13) != 0
    }
    /// Default operand size 32 (D/B bit).
    pub fn big(&self) -> bool {
        self.attr & (1 << 14) != 0
    }
    /// Builds the access-rights word from a legacy descriptor's high dword.
    pub fn attr_from_desc_hi(hi: u32) -> u32 {
        (hi >> 8) & 0xf0ff
    }
}

/// Segment register indices (hardware encoding order).
pub mod sreg {
    /// ES, index 0.
    pub const ES: usize = 0;
    /// CS, index 1.
    pub const CS: usize = 1;
    /// SS, index 2.
    pub const SS: usize = 2;
    /// DS, index 3.
    pub const DS: usize = 3;
    /// FS, index 4.
    pub const FS: usize = 4;
    /// GS, index 5.
    pub const GS: usize = 5;
}

/// Model-specific registers the emulator keeps (Intel SDM Vol. 4).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msrs {
    /// IA32_STAR (0xC000_0081): SYSCALL/SYSRET selectors.
    pub star: u64,
    /// IA32_LSTAR (0xC000_0082): 64-bit SYSCALL entry.
    pub lstar: u64,
    /// IA32_CSTAR (0xC000_0083): compatibility-mode SYSCALL entry.
    pub cstar: u64,
    /// IA32_FMASK (0xC000_0084): RFLAGS bits cleared by SYSCALL.
    pub sfmask: u64,
    /// IA32_KERNEL_GS_BASE (0xC000_0102), swapped with GS.base by SWAPGS.
    pub kernel_gs_base: u64,
    /// IA32_TSC_AUX (0xC000_0103), read by RDTSCP/RDPID.
    pub tsc_aux: u64,
    /// IA32_PAT (0x277).
    pub pat: u64,
    /// IA32_APIC_BASE (0x1B).
    pub apic_base: u64,
    /// IA32_MISC_ENABLE (0x1A0).
    pub misc_enable: u64,
    /// IA32_SYSENTER_CS (0x174).
    pub sysenter_cs: u64,
    /// IA32_SYSENTER_ESP (0x175).
    pub sysenter_esp: u64,
    /// IA32_SYSENTER_EIP (0x176).
    pub sysenter_eip: u64,
    /// Offset added to the guest-time-derived TSC (written by WRMSR IA32_TSC).
    pub tsc_offset: i64,
}

/// x87/SSE state (the FXSAVE image, Intel SDM Vol. 1 §10.5.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FpuState {
    /// XMM0-15.
    pub xmm: [u128; 16],
    /// MXCSR.
    pub mxcsr: u32,
    /// x87 control word.
    pub fcw: u16,
    /// x87 status word (TOP in bits 11-13).
    pub fsw: u16,
    /// Abridged tag word as stored by FXSAVE (1 bit per register, 1 = valid).
    pub ftw: u8,
    /// x87 registers ST physical slots 0-7, as 80-bit extended values (low 10 bytes used).
    pub st: [[u8; 16]; 8],
    /// Last x87 opcode (11 bits).
    pub fop: u16,
    /// Last x87 instruction pointer.
    pub fip: u64,
    /// Last x87 data pointer.
    pub fdp: u64,
}

impl Default for FpuState {
    fn default() -> Self {
        FpuState { xmm: [0; 16], mxcsr: 0x1f80, fcw: 0x037f, fsw: 0, ftw: 0, st: [[0; 16]; 8], fop: 0, fip: 0, fdp: 0 }
    }
}

/// Counters kept by the emulator.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Instructions retired.
    pub instructions: u64,
    /// Decode-cache misses (instructions decoded).
    pub decodes: u64,
    /// Exceptions delivered.
    pub exceptions: u64,
    /// External interrupts delivered.
    pub interrupts: u64,
    /// Non-maskable interrupts delivered.
    pub nmis: u64,
    /// Port I/O accesses.
    pub pio: u64,
    /// MMIO accesses.
    pub mmio: u64,
    /// Software TLB misses (page walks).
    pub tlb_misses: u64,
}

/// Static configuration of a CPU.
#[derive(Clone, Debug)]
pub struct CpuConfig {
    /// TSC frequency in Hz advertised in CPUID leaf 0x15 (also the LAPIC bus clock).
    pub tsc_hz: u64,
    /// Initial APIC ID (CPUID leaf 1 EBX bits 31:24, leaf 0xB EDX).
    pub apic_id: u8,
    /// vCPUs in the VM (1 to 255), all in one package, one thread per core: the topology
    /// CPUID leaves 1 and 0xB describe (Intel SDM Vol. 3A §9.6, "Detecting Hardware
    /// Multi-Threading Support and Topology").
    pub cpus: u8,
}

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig { tsc_hz: 1_000_000_000, apic_id: 0, cpus: 1 }
    }
}

/// Why [`Cpu::run`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `hlt` with interrupts enabled: nothing to run until an interrupt arrives.
    Halted,
    /// `hlt` with interrupts disabled: the CPU is stopped for good (Linux's power-off and
    /// halt paths end here when no firmware interface is present).
    HaltedForever,
    /// Triple fault: the CPU would signal shutdown and the platform resets.
    TripleFault(String),
    /// The instruction budget given to [`Cpu::run`] was used up.
    Budget,
    /// The emulator met an instruction or state it does not implement.
    Unsupported(String),
}

/// One emulated x86-64 vCPU.
pub struct Cpu {
    /// RAX..R15 in hardware order.
    pub gpr: [u64; 16],
    /// Instruction pointer (offset in CS).
    pub rip: u64,
    /// RFLAGS (see [`flags`]).
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS.
    pub seg: [Seg; 6],
    /// LDTR.
    pub ldtr: Seg,
    /// Task register (its base is where IST/RSP0 stacks are read from).
    pub tr: Seg,
    /// GDTR base (linear address).
    pub gdtr_base: u64,
    /// GDTR limit in bytes (size - 1).
    pub gdtr_limit: u16,
    /// IDTR base (linear address).
    pub idtr_base: u64,
    /// IDTR limit in bytes (size - 1).
    pub idtr_limit: u16,
    /// CR0 (see [`ctl`]).
    pub cr0: u64,
    /// CR2: linear address of the last page fault.
    pub cr2: u64,
    /// CR3: page-table root GPA and flags.
    pub cr3: u64,
    /// CR4 (see [`ctl`]).
    pub cr4: u64,
    /// CR8: task priority (4 bits).
    pub cr8: u64,
    /// IA32_EFER (see [`ctl`]).
    pub efer: u64,
    /// DR0-DR7.
    pub dr: [u64; 8],
    /// XCR0 (XSAVE is not advertised; kept at its reset value).
    pub xcr0: u64,
    /// Other MSRs.
    pub msr: Msrs,
    /// x87/SSE state.
    pub fpu: FpuState,
    pub(crate) mmu: Mmu,
    pub(crate) config: CpuConfig,
    /// Interrupts are inhibited for one instruction (after STI / MOV SS / POP SS).
    pub(crate) interrupt_shadow: bool,
    /// NMIs are blocked: an NMI handler runs and has not executed IRET yet (Intel SDM Vol. 3
    /// §6.7.1). Set when an NMI is delivered, cleared by IRET.
    pub(crate) nmi_blocked: bool,
    pub(crate) halted: bool,
    /// Event counters (instructions, decodes, exceptions, interrupts, I/O, TLB misses).
    pub stats: Stats,
    /// Decoded-instruction cache keyed by GPA.
    pub(crate) dcache: crate::decode::DecodeCache,
    /// The translation tier's state (compiled code of this vCPU).
    pub(crate) jit: crate::jit::Jit,
    /// Set by instructions that may unmask or raise interrupts (STI, POPF, IRET, port and
    /// MMIO writes): the run loop looks at the interrupt line again before the next one.
    pub(crate) check_irq: bool,
    /// CPL 3 for the block being executed (set at each block start; used by fast forms).
    pub(crate) cur_user: bool,
    /// Register-name decoding table (see `regs::GPR_INFO`), kept here so the hot path needs
    /// no lazy-initialisation check.
    pub(crate) gpr_info: [u16; 256],
    /// The RIPs of the last 64 decoded blocks entered (a debugging aid for crashes).
    pub recent: [u64; 64],
    pub(crate) recent_pos: usize,
    /// Optional instruction trace: (rip, cs.selector) of every retired instruction is
    /// written here when set (debugging against a reference trace).
    pub trace: Option<Box<dyn std::io::Write + Send>>,
}

/// Exception class being delivered (for the double-fault rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault2 {
    Benign,
    Contributory,
    PageFault,
    DoubleFault,
}

impl Cpu {
    /// A CPU in the architectural reset state (real mode, CS:IP = F000:FFF0), with guest RAM
    /// given as host mappings, alone on that RAM.
    pub fn new(ram: Vec<RamRegion>, config: CpuConfig) -> Cpu {
        Cpu::with_shared(SharedRam::new(&ram), config)
    }

    /// A CPU in the architectural reset state over RAM that other vCPUs of the same VM share
    /// (build one [`SharedRam`] per VM and give a clone to each vCPU; each then runs on its
    /// own thread).
    pub fn with_shared(shared: Arc<SharedRam>, config: CpuConfig) -> Cpu {
        let mut seg = [Seg { selector: 0, base: 0, limit: 0xffff, attr: 0x93 }; 6];
        seg[sreg::CS] = Seg { selector: 0xf000, base: 0xffff0000, limit: 0xffff, attr: 0x9b };
        let apic_base = 0xfee0_0000 | (1 << 11) | if config.apic_id == 0 { 1 << 8 } else { 0 };
        Cpu {
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: 2,
            seg,
            ldtr: Seg { selector: 0, base: 0, limit: 0xffff, attr: 0x82 },
            tr: Seg { selector: 0, base: 0, limit: 0xffff, attr: 0x8b },
            gdtr_base: 0,
            gdtr_limit: 0xffff,
            idtr_base: 0,
            idtr_limit: 0xffff,
            cr0: 0x6000_0010,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            dr: [0, 0, 0, 0, 0xffff0ff0, 0x400, 0xffff0ff0, 0x400],
            xcr0: 1,
            msr: Msrs { apic_base, pat: 0x0007_0406_0007_0406, ..Msrs::default() },
            fpu: FpuState::default(),
            mmu: Mmu::new(shared),
            config,
            interrupt_shadow: false,
            nmi_blocked: false,
            halted: false,
            stats: Stats::default(),
            dcache: crate::decode::DecodeCache::new(),
            jit: crate::jit::Jit::new(),
            check_irq: true,
            trace: None,
            cur_user: false,
            gpr_info: *crate::regs::GPR_INFO,
            recent: [0; 64],
            recent_pos: 0,
        }
    }

    /// INIT (Intel SDM Vol. 3A §9.1.1, Table 9-1): registers, control registers, MSRs and
    /// x87/SSE state go back to their power-up values, as after [`Cpu::new`]; the TLB and
    /// decoded code are dropped. The configuration (APIC ID), statistics and trace stay.
    /// The caller keeps the vCPU waiting for a startup IPI ([`Cpu::start_up`]) unless it is
    /// the bootstrap processor.
    pub fn init(&mut self) {
        let mut fresh = Cpu::with_shared(self.mmu.shared.clone(), self.config.clone());
        fresh.jit.tier = self.jit.tier;
        let Cpu { stats, trace, recent, recent_pos, .. } = std::mem::replace(self, fresh);
        self.stats = stats;
        self.trace = trace;
        self.recent = recent;
        self.recent_pos = recent_pos;
    }

    /// A startup IPI with `vector` (SDM Vol. 3A §11.6.1 and §9.4.4.1): execution begins in
    /// real mode at CS:IP = `vector`·0x100:0, i.e. physical address `vector`·0x1000.
    pub fn start_up(&mut self, vector: u8) {
        let cs = self.seg_at_mut(sreg::CS);
        cs.selector = u16::from(vector) << 8;
        cs.base = u64::from(vector) << 12;
        cs.limit = 0xffff;
        self.rip = 0;
        self.halted = false;
    }

    /// Current privilege level (CS.DPL; SS.DPL in real mode is 0).
    #[inline]
    pub fn cpl(&self) -> u8 {
        if self.cr0 & ctl::CR0_PE == 0 {
            0
        } else {
            self.seg[sreg::CS].dpl()
        }
    }

    /// Long mode active and a 64-bit code segment.
    #[inline]
    pub fn in_64bit_mode(&self) -> bool {
        self.efer & ctl::EFER_LMA != 0 && self.seg[sreg::CS].long()
    }

    /// Code size in bits (16, 32 or 64) that the decoder must use at the current CS.
    #[inline]
    pub fn bitness(&self) -> u32 {
        if self.in_64bit_mode() {
            64
        } else if self.cr0 & ctl::CR0_PE != 0 && self.seg[sreg::CS].big() {
            32
        } else {
            16
        }
    }

    /// Whether the CPU sits in `hlt` waiting for an interrupt.
    pub fn is_halted(&self) -> bool {
        self.halted
    }

    /// Whether NMIs are blocked because an NMI handler has not yet executed IRET (Intel SDM
    /// Vol. 3 §6.7.1). While they are, a latched NMI neither wakes the CPU from `hlt` nor is
    /// taken ([`Bus::take_nmi`](crate::Bus::take_nmi) is not asked).
    pub fn nmi_blocked(&self) -> bool {
        self.nmi_blocked
    }

    /// The start RIPs of the last blocks entered, oldest first.
    pub fn recent_rips(&self) -> Vec<u64> {
        self.recent.iter().cycle().skip(self.recent_pos % 64).take(64).copied().collect()
    }
}

/// Whether condition `cc` holds for the current RFLAGS (Jcc, SETcc, CMOVcc, FCMOVcc).
#[inline(always)]
pub(crate) fn cond(cpu: &Cpu, cc: ConditionCode) -> bool {
    let f = cpu.rflags;
    let cf = f & CF != 0;
    let zf = f & ZF != 0;
    let sf = f & SF != 0;
    let of = f & OF != 0;
    let pf = f & PF != 0;
    match cc {
        ConditionCode::o => of,
        ConditionCode::no => !of,
        ConditionCode::b => cf,
        ConditionCode::ae => !cf,
        ConditionCode::e => zf,
        ConditionCode::ne => !zf,
        ConditionCode::be => cf || zf,
        ConditionCode::a => !cf && !zf,
        ConditionCode::s => sf,
        ConditionCode::ns => !sf,
        ConditionCode::p => pf,
        ConditionCode::np => !pf,
        ConditionCode::l => sf != of,
        ConditionCode::ge => sf == of,
        ConditionCode::le => zf || sf != of,
        ConditionCode::g => !zf && sf == of,
        ConditionCode::None => true,
    }
}

// `Cpu::gpr_info_of` indexes a 256-entry table by `Register as usize`; that is in bounds
// because iced-x86's `Register` is one byte.
const _: () = assert!(std::mem::size_of::<Register>() == 1);

/// The register file as instructions see it: registers by their iced-x86 name, effective
/// and linear addresses, the stack pointer at the stack's address size, near branches and
/// RFLAGS writes. Nothing here touches memory.
impl Cpu {
    /// General register `i` (0 = RAX … 15 = R15, the hardware encoding), all 64 bits.
    ///
    /// `i` < 16 by construction: every caller passes an iced-x86 GPR number (0..=15, checked
    /// when the uop is built) or a `GPR_INFO` index masked with 0xf; guest data never reaches
    /// it. A plain index is measurably cheaper here than masking with `& 15` (emu_loop,
    /// callgrind), so an out-of-range `i` would be an emulator bug and would panic.
    #[inline(always)]
    #[allow(clippy::indexing_slicing)] // `i` < 16 = gpr.len(), see above
    pub(crate) fn gpr_at(&self, i: usize) -> u64 {
        self.gpr[i]
    }

    /// General register `i` (0 = RAX … 15 = R15), for writing all 64 bits; `i` < 16 as for
    /// [`Cpu::gpr_at`].
    #[inline(always)]
    #[allow(clippy::indexing_slicing)] // `i` < 16 = gpr.len(), see gpr_at
    pub(crate) fn gpr_at_mut(&mut self, i: usize) -> &mut u64 {
        &mut self.gpr[i]
    }

    /// Segment register `i`, an `sreg` index (0 = ES … 5 = GS).
    #[inline(always)]
    #[allow(clippy::indexing_slicing)] // callers pass `sreg` constants, all < 6 = seg.len()
    pub(crate) fn seg_at_mut(&mut self, i: usize) -> &mut Seg {
        &mut self.seg[i]
    }

    /// Records `rip` as the start of the block just entered, in the ring of [`Cpu::recent`].
    #[inline(always)]
    pub(crate) fn note_recent(&mut self, rip: u64) {
        let pos = self.recent_pos % 64;
        if let Some(slot) = self.recent.get_mut(pos) {
            *slot = rip;
        }
        self.recent_pos = (pos + 1) % 64;
    }

    /// The `GPR_INFO` word for `r` (see `regs::GPR_INFO`).
    #[inline(always)]
    #[allow(clippy::indexing_slicing)] // iced's `Register` is one byte, so `r as usize` < 256 = gpr_info.len()
    fn gpr_info_of(&self, r: Register) -> u16 {
        self.gpr_info[r as usize]
    }

    #[inline(always)]
    pub(crate) fn get_reg(&self, r: Register) -> u64 {
        let info = self.gpr_info_of(r);
        if info & 0x8000 != 0 {
            return self.get_other_reg(r);
        }
        let v = self.gpr_at(usize::from(info & 0xf));
        match (info >> 4) & 0xf {
            1 => {
                if info & 0x100 != 0 {
                    (v >> 8) & 0xff
                } else {
                    v & 0xff
                }
            }
            2 => v & 0xffff,
            4 => v & 0xffff_ffff,
            _ => v,
        }
    }

    #[cold]
    fn get_other_reg(&self, r: Register) -> u64 {
        match r {
            Register::ES => u64::from(self.seg[sreg::ES].selector),
            Register::CS => u64::from(self.seg[sreg::CS].selector),
            Register::SS => u64::from(self.seg[sreg::SS].selector),
            Register::DS => u64::from(self.seg[sreg::DS].selector),
            Register::FS => u64::from(self.seg[sreg::FS].selector),
            Register::GS => u64::from(self.seg[sreg::GS].selector),
            _ => 0,
        }
    }

    #[inline(always)]
    pub(crate) fn set_reg(&mut self, r: Register, v: u64) {
        let info = self.gpr_info_of(r);
        if info & 0x8000 != 0 {
            return;
        }
        let slot = self.gpr_at_mut(usize::from(info & 0xf));
        match (info >> 4) & 0xf {
            1 => {
                if info & 0x100 != 0 {
                    *slot = (*slot & !0xff00) | ((v & 0xff) << 8);
                } else {
                    *slot = (*slot & !0xff) | (v & 0xff);
                }
            }
            2 => *slot = (*slot & !0xffff) | (v & 0xffff),
            4 => *slot = v & 0xffff_ffff,
            _ => *slot = v,
        }
    }

    /// Effective address (offset within the segment) of the memory operand.
    #[inline(always)]
    pub(crate) fn ea(&self, insn: &Instruction) -> u64 {
        let base = insn.memory_base();
        let index = insn.memory_index();
        let mut a = insn.memory_displacement64();
        let mut asize = 8;
        if base != Register::None {
            if base == Register::RIP || base == Register::EIP {
                return if base == Register::EIP { a & 0xffff_ffff } else { a };
            }
            a = a.wrapping_add(self.get_reg(base));
            asize = base.size();
        }
        if index != Register::None {
            a = a.wrapping_add(self.get_reg(index) << insn.memory_index_scale().trailing_zeros());
            asize = index.size();
        }
        if base == Register::None && index == Register::None {
            asize = match insn.memory_displ_size() {
                2 => 2,
                4 if !self.in_64bit_mode() => 4,
                _ => 8,
            };
        }
        a & mask(asize)
    }

    /// Linear address of a segment:offset pair.
    #[inline(always)]
    pub(crate) fn seg_la(&self, seg: Register, off: u64) -> u64 {
        if self.in_64bit_mode() {
            match seg {
                Register::FS => self.seg[sreg::FS].base.wrapping_add(off),
                Register::GS => self.seg[sreg::GS].base.wrapping_add(off),
                _ => off,
            }
        } else {
            self.seg.get(seg_index(seg)).map_or(0, |s| s.base).wrapping_add(off) & 0xffff_ffff
        }
    }

    /// Linear address of the instruction's memory operand.
    #[inline(always)]
    pub(crate) fn mem_la(&self, insn: &Instruction) -> u64 {
        self.seg_la(insn.memory_segment(), self.ea(insn))
    }

    /// Stack address size in bytes.
    #[inline(always)]
    pub(crate) fn stack_size(&self) -> usize {
        if self.in_64bit_mode() {
            8
        } else if self.seg[sreg::SS].big() {
            4
        } else {
            2
        }
    }

    #[inline(always)]
    pub(crate) fn rsp(&self) -> u64 {
        self.gpr[4] & mask(self.stack_size())
    }

    #[inline(always)]
    pub(crate) fn set_rsp(&mut self, v: u64) {
        match self.stack_size() {
            8 => self.gpr[4] = v,
            4 => self.gpr[4] = v & 0xffff_ffff,
            _ => self.gpr[4] = (self.gpr[4] & !0xffff) | (v & 0xffff),
        }
    }

    /// Sets RIP for a near branch to `target` (already within the code size).
    #[inline(always)]
    pub(crate) fn branch(&mut self, target: u64) -> Res<()> {
        if self.in_64bit_mode() && ((target as i64) << 16 >> 16) as u64 != target {
            return Err(Fault::GeneralProtection(0));
        }
        self.rip = target;
        Ok(())
    }

    /// Writes RFLAGS as POPF/IRET do at the current privilege (Intel SDM Vol. 2 POPF).
    pub(crate) fn write_flags(&mut self, v: u64, size: usize) {
        let cpl = self.cpl();
        let iopl = ((self.rflags >> 12) & 3) as u8;
        let mut modifiable = CF | PF | AF | ZF | SF | TF | DF | OF | NT | AC | ID;
        if cpl == 0 {
            modifiable |= IOPL | IF;
        } else if cpl <= iopl {
            modifiable |= IF;
        }
        if size == 2 {
            modifiable &= 0xffff;
        }
        let old = self.rflags;
        self.rflags = (self.rflags & !modifiable) | (v & modifiable) | 2;
        if old & IF == 0 && self.rflags & IF != 0 {
            self.check_irq = true;
        }
    }
}

/// Index into [`Cpu::seg`] (the [`sreg`] numbering) of segment register `r`; DS for anything
/// that is not ES, CS, SS, FS or GS (the default data segment).
#[inline(always)]
pub(crate) fn seg_index(r: Register) -> usize {
    match r {
        Register::ES => sreg::ES,
        Register::CS => sreg::CS,
        Register::SS => sreg::SS,
        Register::FS => sreg::FS,
        Register::GS => sreg::GS,
        _ => sreg::DS,
    }
}
