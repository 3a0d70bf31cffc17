//! rustvisor's x86-64 CPU emulator.
//!
//! An interpreter for the x86-64 architecture as a Linux guest uses it: instructions are
//! decoded by `iced-x86` and cached by guest physical address (GPA); 4-level paging with
//! A/D bits, NX, global pages and a software TLB; the exception and interrupt model (IDT,
//! TSS/IST, error codes, nested faults, triple fault); system instructions and MSRs; the
//! x86-64-v2 level (SSE to SSE4.2, SSSE3, POPCNT, CMPXCHG16B, LAHF/SAHF) with AES-NI,
//! PCLMULQDQ, MOVBE, RDRAND and RDSEED, and the x87 subset Linux needs. ALU flag results are computed by the host CPU itself (the
//! host is x86-64 too), which makes them bit-exact, including "undefined" flags.
//!
//! The emulator knows nothing about devices: port I/O, MMIO and interrupt acknowledge go
//! through the [`Bus`] trait that the VMM implements.

// Modules in layers; each imports only from its own layer or those above it in this list
// (the crate root's `Bus`, `Fault`, `Res`, `Stop` are at the bottom):
//
// 1. state: `cpu` (registers, flags, segments, MSRs, x87/SSE state, the `Cpu` struct and its
//    register-file accessors), `regs` (register-name table, size masks), `alu` (flag-exact
//    host arithmetic), `fpstate` (x87/SSE state checks), `cpuid`;
// 2. memory: `mmu` (RAM, paging, software TLB), `operand` (operands and the stack through
//    the MMU);
// 3. decode: `uop` (fast forms of common instructions, and their execution), `decode`
//    (blocks, the decode cache);
// 4. execution: `interrupt` (exception and interrupt delivery, segment loads, far
//    transfers), `fpu` (x87), `sse` (SSE/MMX; its child `sse::ext` has SSE3 to SSE4.2,
//    AES-NI and PCLMULQDQ), `intext` (CRC32, MOVBE, RDRAND, RDSEED), `system` (system
//    instructions, MSRs; it dispatches to `intext`, `sse` and `fpu`), `jit` (the
//    translation tier: hot 64-bit blocks of fast forms compiled with Cranelift), and `exec`
//    (the run loop and the integer instruction set, dispatching to `system` and `jit`).
//
// `snapshot` sits beside them (save/restore of the state layer). The one upward name is in
// `cpu`: the `Cpu` struct owns every layer's state, so it names `mmu::Mmu`,
// `decode::DecodeCache` and `jit::Jit` as field types and builds them in `Cpu::new`; no
// code in a lower layer calls into a higher one (the decode cache stores the compiled entry
// of a block as an opaque function pointer, `decode::Compiled`).
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::cast_possible_truncation)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::indexing_slicing))]

// Guest addresses and lengths are `u64` and are turned into host offsets as `usize`; the ALU
// also runs the host's own x86-64 instructions.
#[cfg(not(all(target_arch = "x86_64", target_pointer_width = "64")))]
compile_error!("x86emu runs only on 64-bit x86-64 hosts");

mod alu;
pub mod cpu;
mod cpuid;
mod decode;
mod exec;
mod fpstate;
mod fpu;
mod interrupt;
mod intext;
pub mod jit;
mod mmu;
mod operand;
mod regs;
pub mod snapshot;
mod sse;
mod system;
mod uop;

pub use cpu::{Cpu, CpuConfig, Exit, Seg, Stats};
pub use mmu::{RamRegion, SharedRam};
pub use snapshot::{CpuSnapshot, StateError};

/// What the emulated CPU sees outside RAM: port I/O, MMIO and the interrupt controller.
///
/// Sizes are in bytes (1, 2, 4 or 8). Values are little-endian in the low bits.
pub trait Bus {
    /// `in` from `port`; `size` is 1, 2 or 4.
    fn io_in(&mut self, port: u16, size: u8) -> u32;
    /// `out` to `port`; `size` is 1, 2 or 4.
    fn io_out(&mut self, port: u16, size: u8, value: u32);
    /// Load of `size` bytes from a GPA that is not RAM.
    fn mmio_read(&mut self, gpa: u64, size: u8) -> u64;
    /// Store of `size` bytes to a GPA that is not RAM.
    fn mmio_write(&mut self, gpa: u64, size: u8, value: u64);
    /// Whether an external interrupt is pending for this CPU (INTR line asserted).
    fn interrupt_pending(&mut self) -> bool;
    /// Interrupt acknowledge cycle: returns the vector of the highest-priority pending
    /// interrupt and marks it in service, or `None` if it went away.
    fn ack_interrupt(&mut self) -> Option<u8>;
    /// Guest time in nanoseconds since the VM started; drives the TSC.
    fn now_ns(&mut self) -> u64;
    /// Takes a non-maskable interrupt latched for this CPU (an NMI IPI, an IOAPIC or MSI
    /// message with NMI delivery), clearing the latch. The CPU
    /// asks only when it can take one at once (not while an NMI handler runs, i.e. before
    /// its IRET, nor in an STI/MOV SS shadow; Intel SDM Vol. 3 §6.7.1), so an NMI that
    /// arrives while blocked stays latched in the interrupt controller, and further ones
    /// collapse into it, as on hardware. It asks regardless of RFLAGS.IF, whenever it looks
    /// at the interrupt line. The default has none.
    fn take_nmi(&mut self) -> bool {
        false
    }
    /// Whether an NMI is latched for this CPU, without taking it: compiled code asks after
    /// an IRET (which ends NMI blocking) whether it must stop for one. The default has none.
    fn nmi_pending(&mut self) -> bool {
        false
    }
    /// Guest RAM written by devices (DMA) since the last call, as `(GPA, length in bytes)`
    /// ranges. The CPU retires code it decoded from those pages before it next looks at the
    /// interrupt line, so a device must report its writes before it raises the interrupt
    /// that announces them.
    fn take_device_writes(&mut self) -> Vec<(u64, u64)> {
        Vec::new()
    }
}

/// A [`Bus`] with nothing attached: port and MMIO reads return all ones, writes are
/// dropped, no interrupt is ever pending and time stands still. For tests and benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct NullBus;

impl Bus for NullBus {
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
        0
    }
}

/// Architectural exceptions (Intel SDM Vol. 3 §6.15), with error codes where defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// #DE, vector 0.
    DivideError,
    /// #DB, vector 1.
    Debug,
    /// #BP, vector 3 (from int3).
    Breakpoint,
    /// #OF, vector 4.
    Overflow,
    /// #UD, vector 6.
    InvalidOpcode,
    /// #NM, vector 7.
    DeviceNotAvailable,
    /// #DF, vector 8.
    DoubleFault,
    /// #TS, vector 10.
    InvalidTss(u16),
    /// #NP, vector 11.
    SegmentNotPresent(u16),
    /// #SS, vector 12.
    StackFault(u16),
    /// #GP, vector 13.
    GeneralProtection(u16),
    /// #PF, vector 14: faulting linear address (to CR2) and error code.
    PageFault(u64, u32),
    /// #MF, vector 16.
    FpuError,
    /// #AC, vector 17.
    AlignmentCheck,
    /// #XM, vector 19.
    SimdError,
}

impl Fault {
    /// IDT vector number.
    pub fn vector(self) -> u8 {
        match self {
            Fault::DivideError => 0,
            Fault::Debug => 1,
            Fault::Breakpoint => 3,
            Fault::Overflow => 4,
            Fault::InvalidOpcode => 6,
            Fault::DeviceNotAvailable => 7,
            Fault::DoubleFault => 8,
            Fault::InvalidTss(_) => 10,
            Fault::SegmentNotPresent(_) => 11,
            Fault::StackFault(_) => 12,
            Fault::GeneralProtection(_) => 13,
            Fault::PageFault(..) => 14,
            Fault::FpuError => 16,
            Fault::AlignmentCheck => 17,
            Fault::SimdError => 19,
        }
    }

    /// Error code pushed on the stack, if the exception has one.
    pub fn error_code(self) -> Option<u32> {
        match self {
            Fault::DoubleFault | Fault::AlignmentCheck => Some(0),
            Fault::InvalidTss(c) | Fault::SegmentNotPresent(c) | Fault::StackFault(c) | Fault::GeneralProtection(c) => {
                Some(u32::from(c))
            }
            Fault::PageFault(_, c) => Some(c),
            _ => None,
        }
    }

    /// Contributory exceptions for the double-fault rules (SDM Vol. 3 Table 6-4).
    pub fn is_contributory(self) -> bool {
        matches!(
            self,
            Fault::DivideError
                | Fault::InvalidTss(_)
                | Fault::SegmentNotPresent(_)
                | Fault::StackFault(_)
                | Fault::GeneralProtection(_)
        )
    }
}

/// Result of one instruction step inside the emulator.
pub(crate) type Res<T> = std::result::Result<T, Fault>;

/// Why an instruction did not complete normally.
pub(crate) enum Stop {
    /// An exception to deliver through the IDT.
    Fault(Fault),
    /// A reason to leave [`Cpu::run`].
    Exit(Exit),
}

impl From<Fault> for Stop {
    fn from(f: Fault) -> Stop {
        Stop::Fault(f)
    }
}

/// Result of executing one instruction: it completed, faulted, or the run loop must return.
pub(crate) type SRes<T> = std::result::Result<T, Stop>;

/// Shared by the unit tests of several modules.
#[cfg(test)]
pub(crate) mod tests_support {
    use crate::cpu::{ctl, Cpu, CpuConfig, Seg};
    pub(crate) use crate::NullBus;
    use crate::RamRegion;

    /// A 64-bit CPU over `ram` with the first 2 MiB identity-mapped.
    pub(crate) fn long_mode_cpu(ram: &mut [u8]) -> Cpu {
        let put = |ram: &mut [u8], at: usize, v: u64| ram[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(ram, 0x1000, 0x2000 | 3);
        put(ram, 0x2000, 0x3000 | 3);
        put(ram, 0x3000, 0x83);
        let r = RamRegion { gpa: 0, size: ram.len() as u64, host_addr: ram.as_mut_ptr() };
        let mut c = Cpu::new(vec![r], CpuConfig::default());
        c.cr0 = ctl::CR0_PE | ctl::CR0_PG | ctl::CR0_WP | 0x10;
        c.cr4 = ctl::CR4_PAE;
        c.cr3 = 0x1000;
        c.efer = ctl::EFER_LME | ctl::EFER_LMA;
        c.seg[1] = Seg { selector: 8, base: 0, limit: 0xffff_ffff, attr: 0xa09b };
        c.gpr[4] = 0x8000;
        c
    }
}
