//! rustvisor's x86-64 CPU emulator.
//!
//! An interpreter for the x86-64 architecture as a Linux guest uses it: instructions are
//! decoded by `iced-x86` and cached by guest physical address (GPA); 4-level paging with
//! A/D bits, NX, global pages and a software TLB; the exception and interrupt model (IDT,
//! TSS/IST, error codes, nested faults, triple fault); system instructions and MSRs; SSE2
//! and the x87 subset Linux needs. ALU flag results are computed by the host CPU itself (the
//! host is x86-64 too), which makes them bit-exact, including "undefined" flags.
//!
//! The emulator knows nothing about devices: port I/O, MMIO and interrupt acknowledge go
//! through the [`Bus`] trait that the VMM implements.

mod alu;
pub mod cpu;
mod cpuid;
mod exec;
mod fpu;
mod interrupt;
mod mmu;
mod regs;
pub mod snapshot;
mod sse;
mod system;
mod uop;

pub use cpu::{Cpu, CpuConfig, Exit, Seg, Stats};
pub use mmu::RamRegion;
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
