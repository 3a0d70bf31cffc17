//! Architectural x86-64 register state shared by both accelerators.

/// A segment register in its hidden (descriptor-cache) form, KVM `kvm_segment` style.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes (already scaled by granularity).
    pub limit: u32,
    /// Visible selector.
    pub selector: u16,
    /// Descriptor type field (4 bits, Intel SDM Vol. 3 §3.4.5).
    pub type_: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level (0-3).
    pub dpl: u8,
    /// D/B: default operation size 32-bit.
    pub db: bool,
    /// S: code/data (true) versus system (false) descriptor.
    pub s: bool,
    /// L: 64-bit code segment.
    pub l: bool,
    /// G: limit granularity 4 KiB.
    pub g: bool,
    /// AVL bit.
    pub avl: bool,
    /// Segment is unusable (null selector loaded).
    pub unusable: bool,
}

/// A descriptor table register (GDTR/IDTR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes (size - 1).
    pub limit: u16,
}

/// Architectural state of one vCPU: general registers, segments, control registers, EFER.
///
/// What the VMM sets at boot and reads back, the same for both engines. It is not a snapshot:
/// each engine saves its complete vCPU state in its own format (`x86emu::CpuSnapshot` for
/// the emulator, with MSRs, x87/SSE and the internal flags; KVM's ioctl structures for
/// `kvm`), see [`crate::VcpuSnapshot`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15 (hardware encoding order).
    pub gprs: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// RFLAGS (bit 1 always set).
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS (hardware encoding order).
    pub segs: [Segment; 6],
    /// LDTR.
    pub ldt: Segment,
    /// Task register.
    pub tr: Segment,
    /// GDTR.
    pub gdt: Table,
    /// IDTR.
    pub idt: Table,
    /// CR0.
    pub cr0: u64,
    /// CR2 (last page-fault linear address).
    pub cr2: u64,
    /// CR3 (page-table root GPA and flags).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8 (task priority, 4 bits).
    pub cr8: u64,
    /// IA32_EFER MSR.
    pub efer: u64,
}

/// Register indices into [`CpuState::gprs`].
pub mod reg {
    /// RAX, the accumulator register (encoding 0).
    pub const RAX: usize = 0;
    /// RCX, the counter register (encoding 1).
    pub const RCX: usize = 1;
    /// RDX, the data register (encoding 2).
    pub const RDX: usize = 2;
    /// RBX, the base register (encoding 3).
    pub const RBX: usize = 3;
    /// RSP, the stack pointer register (encoding 4).
    pub const RSP: usize = 4;
    /// RBP, the frame pointer register (encoding 5).
    pub const RBP: usize = 5;
    /// RSI, the source index register (encoding 6).
    pub const RSI: usize = 6;
    /// RDI, the destination index register (encoding 7).
    pub const RDI: usize = 7;
}

/// Segment indices into [`CpuState::segs`].
pub mod seg {
    /// ES, the extra segment (encoding 0).
    pub const ES: usize = 0;
    /// CS, the code segment (encoding 1).
    pub const CS: usize = 1;
    /// SS, the stack segment (encoding 2).
    pub const SS: usize = 2;
    /// DS, the data segment (encoding 3).
    pub const DS: usize = 3;
    /// FS, the FS (thread-local base) segment (encoding 4).
    pub const FS: usize = 4;
    /// GS, the GS (per-CPU base) segment (encoding 5).
    pub const GS: usize = 5;
}
