//! The virtio-pci path end to end on both accelerators, driven by a tiny hand-assembled
//! 64-bit guest acting as a driver (no kernel, no `Vm`): PCI configuration mechanism #1, BAR
//! sizing and placement, the capability list, MSI-X enable and table programming, the virtio
//! 1.2 bring-up sequence (§3.1.1) in the common configuration structure, one virtio-rng
//! request through a split virtqueue, the queue notification, and the MSI-X interrupt
//! delivered through the guest's IDT via the local APIC.
//!
//! The test wires the devices the way `Vm::build` does, through the accelerator seam
//! (`accel::Vm`): `PciBus` on the conf1 ports and over the PCI MMIO window, a `VirtioPci`
//! around `virtio::rng::Rng` with its BAR at 0xC000_0000 whose MSIs go to the VM's
//! `msi_sink()`, and per accelerator
//!
//! - emu: the VM's userspace irqchip (its LAPIC page at 0xFEE0_0000 served inside the VM);
//!   no ioeventfds, so queue notifications reach the transport through the userspace MMIO
//!   bus; device DMA is reported to the emulator through the VM's device-writes source;
//! - kvm: the in-kernel irqchip fed through an irqfd and an MSI route, notifications
//!   registered as ioeventfds through `VmIoEvents`, so they must never reach the userspace
//!   MMIO bus; no DMA log is kept.
//!
//! The guest reports each check it makes: a failed check writes its step number to the done
//! port (after writing the offending value to the record port), an unexpected exception
//! writes 0x80 + vector; success writes 0.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use accel::emu::EmuHypervisor;
use accel::kvm::KvmVm;
use accel::{CpuState, ExitHandler, Hypervisor, Segment, Table, Vcpu, VcpuExit, VcpuStopper, VmSpec};
use devices::{MmioBus, MsiSink, PciBus, PioBus};
use iced_x86::code_asm::*;
use virtio::pci::{IoEventRegistrar, VirtioPci};
use virtio::DmaLog;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::virtio_devices::VmIoEvents;

const RAM_SIZE: usize = 2 << 20;
/// BAR 0 of the virtio device (00:01.0), and the PCI MMIO window it sits in.
const BAR: u64 = 0xc000_0000;
const PCI_WINDOW_END: u64 = 0xfec0_0000;
const LAPIC: u64 = 0xfee0_0000;
/// Offsets in BAR 0 (crates/virtio/src/pci.rs).
const ISR_OFF: i32 = 0x1000;
const NOTIFY_OFF: u64 = 0x3000;
const MSIX_TABLE_OFF: u64 = 0x4000;
/// The MSI-X vector used for queue 0 and the CPU vector it raises.
const MSIX_ENTRY: u32 = 1;
const IRQ_VECTOR: u8 = 0x40;
const QUEUE_SIZE: u32 = 8;
const BUF_LEN: u32 = 64;

/// Test ports: a write ends the guest (0 = success, else the failed step), and a port whose
/// 4-byte writes are recorded.
const DONE_PORT: u16 = 0x501;
const RECORD_PORT: u16 = 0x502;
const CONF1_ADDR: u16 = 0xcf8;
const CONF1_DATA: u16 = 0xcfc;
/// CONFIG_ADDRESS of 00:01.0, register 0.
const CFG_DEV1: u32 = 0x8000_0800;

// Guest RAM layout.
const GDT_ADDR: u64 = 0x500;
const PML4_ADDR: u64 = 0x1000;
const PDPT_ADDR: u64 = 0x2000;
const PD_LOW_ADDR: u64 = 0x3000;
const PD_3G_ADDR: u64 = 0x4000;
const IDT_ADDR: u64 = 0x6000;
/// Incremented by the vector 0x40 handler.
const IRQ_COUNT_ADDR: u64 = 0x7000;
/// The ISR status byte the handler read.
const ISR_SEEN_ADDR: u64 = 0x7004;
const IDTR_IMAGE_ADDR: u64 = 0x7100;
/// Exception stubs, 32 bytes each.
const EXC_STUBS_ADDR: u64 = 0x8000;
const IRQ_HANDLER_ADDR: u64 = 0x9000;
const CODE_ADDR: u64 = 0x1_0000;
const DESC_ADDR: u64 = 0x2_0000;
const AVAIL_ADDR: u64 = 0x2_1000;
const USED_ADDR: u64 = 0x2_2000;
const BUF_ADDR: u64 = 0x2_3000;
const STACK_TOP: u64 = 0x8_0000;

/// Guest steps (the value written to the done port when that check fails).
mod step {
    pub const VENDOR_DEVICE: u32 = 1;
    pub const BAR_SIZE_MASK: u32 = 2;
    pub const BAR_PLACED: u32 = 3;
    pub const COMMAND: u32 = 4;
    pub const CAP_LIST: u32 = 5;
    pub const MSIX_CAP_FOUND: u32 = 6;
    pub const MSIX_TABLE_SIZE: u32 = 7;
    pub const MSIX_TABLE_BIR: u32 = 8;
    pub const MSIX_ENABLED: u32 = 9;
    pub const MSIX_ENTRY_READBACK: u32 = 10;
    pub const RESET: u32 = 11;
    pub const VERSION_1_OFFERED: u32 = 12;
    pub const FEATURES_OK: u32 = 13;
    pub const NUM_QUEUES: u32 = 14;
    pub const QUEUE_SIZE_MAX: u32 = 15;
    pub const QUEUE_VECTOR: u32 = 16;
    pub const DRIVER_OK: u32 = 17;
    pub const ONE_INTERRUPT: u32 = 18;
    pub const ISR_STATUS: u32 = 19;
    pub const USED_IDX: u32 = 20;
    pub const USED_ID: u32 = 21;
    pub const USED_LEN: u32 = 22;
    pub const BUFFER_FILLED: u32 = 23;
}

fn step_name(code: u8) -> String {
    let names = [
        "vendor/device ID",
        "BAR size mask",
        "BAR placement",
        "command register",
        "capability list",
        "MSI-X capability",
        "MSI-X table size",
        "MSI-X table offset/BIR",
        "MSI-X enable",
        "MSI-X entry read-back",
        "device reset",
        "VERSION_1 offered",
        "FEATURES_OK",
        "num_queues",
        "queue_size",
        "queue_msix_vector",
        "DRIVER_OK",
        "exactly one interrupt",
        "ISR status",
        "used->idx",
        "used id",
        "used len",
        "buffer filled",
    ];
    match code {
        0 => "success".into(),
        c @ 0x80..=0x9f => format!("exception vector {}", c - 0x80),
        c => names.get(usize::from(c) - 1).map_or_else(|| format!("unknown code {c}"), |n| format!("step {c}: {n}")),
    }
}

// ---------------------------------------------------------------------------------------
// The guest.

/// A 64-bit interrupt gate (type 0xe, DPL 0, present) to `handler` in code segment 0x08.
fn idt_gate64(handler: u64) -> [u64; 2] {
    let lo = (handler & 0xffff) | (0x08 << 16) | (0x8e_u64 << 40) | (((handler >> 16) & 0xffff) << 48);
    [lo, handler >> 32]
}

/// Guest RAM holding the driver guest: GDT, page tables (0-2 MiB identity, 2 MiB pages
/// uncached at the BAR and at the LAPIC), IDT, exception stubs, the vector 0x40 handler and
/// the main code at `CODE_ADDR`.
fn build_guest() -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
    let w64 = |gpa: u64, v: u64| mem.write_obj(v, GuestAddress(gpa)).unwrap();
    let wbytes = |gpa: u64, b: &[u8]| mem.write_slice(b, GuestAddress(gpa)).unwrap();

    // GDT: null, 64-bit code at 0x08, data at 0x10.
    w64(GDT_ADDR, 0);
    w64(GDT_ADDR + 8, 0x00af_9a00_0000_ffff);
    w64(GDT_ADDR + 16, 0x00cf_9200_0000_ffff);

    // Page tables.
    const P_RW: u64 = 0x3;
    const PCD: u64 = 0x10;
    const PS: u64 = 0x80;
    w64(PML4_ADDR, PDPT_ADDR | P_RW);
    w64(PDPT_ADDR, PD_LOW_ADDR | P_RW);
    w64(PDPT_ADDR + 3 * 8, PD_3G_ADDR | P_RW);
    w64(PD_LOW_ADDR, P_RW | PS);
    for base in [BAR, LAPIC] {
        w64(PD_3G_ADDR + ((base - 0xc000_0000) >> 21) * 8, base | P_RW | PCD | PS);
    }

    // Exception stubs: `out DONE_PORT, 0x80 + vector; cli; hlt`.
    for v in 0..32u64 {
        let mut s = CodeAssembler::new(64).unwrap();
        s.mov(al, 0x80 + v as u32).unwrap();
        s.mov(dx, u32::from(DONE_PORT)).unwrap();
        s.out(dx, al).unwrap();
        s.cli().unwrap();
        s.hlt().unwrap();
        let at = EXC_STUBS_ADDR + v * 32;
        let code = s.assemble(at).unwrap();
        assert!(code.len() <= 32);
        wbytes(at, &code);
        let [lo, hi] = idt_gate64(at);
        w64(IDT_ADDR + v * 16, lo);
        w64(IDT_ADDR + v * 16 + 8, hi);
    }

    // Vector 0x40: read (and so clear) the ISR status byte, count the interrupt, EOI.
    let mut h = CodeAssembler::new(64).unwrap();
    h.push(rax).unwrap();
    h.push(rbx).unwrap();
    h.push(rcx).unwrap();
    h.mov(rbx, BAR).unwrap();
    h.movzx(eax, byte_ptr(rbx + ISR_OFF)).unwrap();
    h.mov(ecx, ISR_SEEN_ADDR as u32).unwrap();
    h.mov(byte_ptr(rcx), al).unwrap();
    h.mov(ecx, IRQ_COUNT_ADDR as u32).unwrap();
    h.inc(dword_ptr(rcx)).unwrap();
    h.mov(ecx, (LAPIC + 0xb0) as u32).unwrap();
    h.mov(dword_ptr(rcx), 0u32).unwrap();
    h.pop(rcx).unwrap();
    h.pop(rbx).unwrap();
    h.pop(rax).unwrap();
    h.iretq().unwrap();
    wbytes(IRQ_HANDLER_ADDR, &h.assemble(IRQ_HANDLER_ADDR).unwrap());
    let [lo, hi] = idt_gate64(IRQ_HANDLER_ADDR);
    w64(IDT_ADDR + u64::from(IRQ_VECTOR) * 16, lo);
    w64(IDT_ADDR + u64::from(IRQ_VECTOR) * 16 + 8, hi);
    let mut idtr = (256u16 * 16 - 1).to_le_bytes().to_vec();
    idtr.extend_from_slice(&IDT_ADDR.to_le_bytes());
    wbytes(IDTR_IMAGE_ADDR, &idtr);

    wbytes(CODE_ADDR, &driver_code().unwrap());
    mem
}

/// `eax` = config dword `reg` of 00:01.0 (`reg` is a byte offset, dword aligned).
fn cfg_read(a: &mut CodeAssembler, reg: u32) -> Result<(), IcedError> {
    a.mov(eax, CFG_DEV1 | reg)?;
    a.mov(dx, u32::from(CONF1_ADDR))?;
    a.out(dx, eax)?;
    a.mov(dx, u32::from(CONF1_DATA))?;
    a.in_(eax, dx)
}

/// Config dword `reg` of 00:01.0 = `value`.
fn cfg_write(a: &mut CodeAssembler, reg: u32, value: u32) -> Result<(), IcedError> {
    a.mov(eax, CFG_DEV1 | reg)?;
    a.mov(dx, u32::from(CONF1_ADDR))?;
    a.out(dx, eax)?;
    a.mov(eax, value)?;
    a.mov(dx, u32::from(CONF1_DATA))?;
    a.out(dx, eax)
}

/// Selects config dword `ebx & 0xfc` of 00:01.0 (a capability found at run time).
fn cfg_select_ebx(a: &mut CodeAssembler, plus: i32) -> Result<(), IcedError> {
    a.lea(eax, ptr(rbx + plus))?;
    a.and(eax, 0xfc)?;
    a.or(eax, CFG_DEV1 as i32)?;
    a.mov(dx, u32::from(CONF1_ADDR))?;
    a.out(dx, eax)
}

/// The driver: every check sets r15d to its step number first and jumps to `fail` (which
/// records eax and reports the step) when it does not hold.
fn driver_code() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut fail = a.create_label();

    // 1. Vendor/device ID through conf1: virtio (0x1af4), modern entropy device (0x1044).
    a.mov(r15d, step::VENDOR_DEVICE)?;
    cfg_read(&mut a, 0x00)?;
    a.mov(dx, u32::from(RECORD_PORT))?;
    a.out(dx, eax)?;
    a.cmp(eax, 0x1044_1af4)?;
    a.jne(fail)?;

    // 2. BAR 0: size it (all ones reads back the size mask), then place it at BAR.
    a.mov(r15d, step::BAR_SIZE_MASK)?;
    cfg_write(&mut a, 0x10, 0xffff_ffff)?;
    cfg_read(&mut a, 0x10)?;
    a.mov(dx, u32::from(RECORD_PORT))?;
    a.out(dx, eax)?;
    a.cmp(eax, 0xffff_8000_u32 as i32)?;
    a.jne(fail)?;
    a.mov(r15d, step::BAR_PLACED)?;
    cfg_write(&mut a, 0x10, BAR as u32)?;
    cfg_read(&mut a, 0x10)?;
    a.cmp(eax, BAR as u32 as i32)?;
    a.jne(fail)?;

    // Command register (16-bit write): memory space + bus master.
    a.mov(r15d, step::COMMAND)?;
    a.mov(eax, CFG_DEV1 | 0x04)?;
    a.mov(dx, u32::from(CONF1_ADDR))?;
    a.out(dx, eax)?;
    a.mov(ax, 0x6)?;
    a.mov(dx, u32::from(CONF1_DATA))?;
    a.out(dx, ax)?;
    cfg_read(&mut a, 0x04)?;
    a.mov(ecx, eax)?;
    a.and(ecx, 0x6)?;
    a.cmp(ecx, 0x6)?;
    a.jne(fail)?;

    // Walk the capability list to the MSI-X capability (ID 0x11); at most 48 entries.
    a.mov(r15d, step::CAP_LIST)?;
    a.test(eax, 1 << 20)?; // status: capability list present
    a.jz(fail)?;
    cfg_read(&mut a, 0x34)?;
    a.movzx(ebx, al)?;
    a.mov(r15d, step::MSIX_CAP_FOUND)?;
    a.mov(ecx, 48)?;
    let mut walk = a.create_label();
    let mut found = a.create_label();
    a.set_label(&mut walk)?;
    a.test(ebx, ebx)?;
    a.jz(fail)?;
    cfg_select_ebx(&mut a, 0)?;
    a.mov(dx, u32::from(CONF1_DATA))?;
    a.in_(eax, dx)?;
    a.cmp(al, 0x11)?;
    a.je(found)?;
    a.movzx(ebx, ah)?;
    a.dec(ecx)?;
    a.jnz(walk)?;
    a.jmp(fail)?;
    a.set_label(&mut found)?;
    // Message control: table size - 1 (queues + 1 vectors: 2 for virtio-rng).
    a.mov(r15d, step::MSIX_TABLE_SIZE)?;
    a.mov(ecx, eax)?;
    a.shr(ecx, 16)?;
    a.and(ecx, 0x7ff)?;
    a.cmp(ecx, 1)?;
    a.jne(fail)?;
    // Table offset/BIR: 0x4000 in BAR 0.
    a.mov(r15d, step::MSIX_TABLE_BIR)?;
    cfg_select_ebx(&mut a, 4)?;
    a.mov(dx, u32::from(CONF1_DATA))?;
    a.in_(eax, dx)?;
    a.cmp(eax, MSIX_TABLE_OFF as i32)?;
    a.jne(fail)?;
    // Enable MSI-X: read-modify-write of the message control word (cap + 2, port 0xcfe).
    cfg_select_ebx(&mut a, 0)?;
    a.mov(dx, u32::from(CONF1_DATA) + 2)?;
    a.in_(ax, dx)?;
    a.or(ax, 0x8000_u32 as i16 as i32)?;
    a.out(dx, ax)?;
    a.mov(r15d, step::MSIX_ENABLED)?;
    cfg_select_ebx(&mut a, 0)?;
    a.mov(dx, u32::from(CONF1_DATA))?;
    a.in_(eax, dx)?;
    a.test(eax, 0x8000_0000_u32 as i32)?;
    a.jz(fail)?;

    // 3. MSI-X table entry 1: LAPIC of CPU 0, fixed delivery of IRQ_VECTOR, unmasked.
    a.mov(rbx, BAR)?;
    let entry = (MSIX_TABLE_OFF + u64::from(MSIX_ENTRY) * 16) as i32;
    a.mov(dword_ptr(rbx + entry), LAPIC as u32)?;
    a.mov(dword_ptr(rbx + entry + 4), 0u32)?;
    a.mov(dword_ptr(rbx + entry + 8), u32::from(IRQ_VECTOR))?;
    a.mov(dword_ptr(rbx + entry + 12), 0u32)?;
    a.mov(r15d, step::MSIX_ENTRY_READBACK)?;
    a.mov(eax, dword_ptr(rbx + entry + 8))?;
    a.cmp(eax, i32::from(IRQ_VECTOR))?;
    a.jne(fail)?;

    // 4. virtio 1.2 §3.1.1 in the common configuration (BAR 0 + 0).
    a.mov(r15d, step::RESET)?;
    a.mov(byte_ptr(rbx + 0x14), 0u32)?;
    a.movzx(eax, byte_ptr(rbx + 0x14))?;
    a.test(eax, eax)?;
    a.jnz(fail)?;
    a.mov(byte_ptr(rbx + 0x14), 0x3u32)?; // ACKNOWLEDGE | DRIVER
    a.mov(r15d, step::VERSION_1_OFFERED)?;
    a.mov(dword_ptr(rbx + 0x00), 1u32)?; // device_feature_select = 1
    a.mov(eax, dword_ptr(rbx + 0x04))?;
    a.test(eax, 1)?; // bit 32: VERSION_1
    a.jz(fail)?;
    a.mov(dword_ptr(rbx + 0x08), 0u32)?; // driver_feature_select = 0: nothing of 0..31
    a.mov(dword_ptr(rbx + 0x0c), 0u32)?;
    a.mov(dword_ptr(rbx + 0x08), 1u32)?; // driver_feature_select = 1: VERSION_1
    a.mov(dword_ptr(rbx + 0x0c), 1u32)?;
    a.mov(byte_ptr(rbx + 0x14), 0xbu32)?; // + FEATURES_OK
    a.mov(r15d, step::FEATURES_OK)?;
    a.movzx(eax, byte_ptr(rbx + 0x14))?;
    a.cmp(eax, 0xb)?;
    a.jne(fail)?;
    a.mov(r15d, step::NUM_QUEUES)?;
    a.movzx(eax, word_ptr(rbx + 0x12))?;
    a.cmp(eax, 1)?;
    a.jne(fail)?;
    a.mov(word_ptr(rbx + 0x16), 0u32)?; // queue_select = 0
    a.mov(r15d, step::QUEUE_SIZE_MAX)?;
    a.movzx(eax, word_ptr(rbx + 0x18))?;
    a.cmp(eax, QUEUE_SIZE as i32)?;
    a.jb(fail)?;
    a.mov(word_ptr(rbx + 0x18), QUEUE_SIZE)?;
    a.mov(word_ptr(rbx + 0x1a), MSIX_ENTRY)?; // queue_msix_vector
    a.mov(r15d, step::QUEUE_VECTOR)?;
    a.movzx(eax, word_ptr(rbx + 0x1a))?;
    a.cmp(eax, MSIX_ENTRY as i32)?;
    a.jne(fail)?;
    // Ring addresses as two 32-bit halves, like Linux's vp_iowrite64_twopart.
    for (off, gpa) in [(0x20, DESC_ADDR), (0x28, AVAIL_ADDR), (0x30, USED_ADDR)] {
        a.mov(dword_ptr(rbx + off), gpa as u32)?;
        a.mov(dword_ptr(rbx + off + 4), (gpa >> 32) as u32)?;
    }
    a.mov(word_ptr(rbx + 0x1c), 1u32)?; // queue_enable
    a.mov(byte_ptr(rbx + 0x14), 0xfu32)?; // + DRIVER_OK
    a.mov(r15d, step::DRIVER_OK)?;
    a.movzx(eax, byte_ptr(rbx + 0x14))?;
    a.cmp(eax, 0xf)?;
    a.jne(fail)?;

    // 5. LAPIC software enable (SVR bit 8, spurious vector 0xff), IDT, interrupts on.
    a.mov(r14, LAPIC)?;
    a.mov(eax, dword_ptr(r14 + 0xf0))?;
    a.or(eax, 0x1ff)?;
    a.mov(dword_ptr(r14 + 0xf0), eax)?;
    a.mov(eax, IDTR_IMAGE_ADDR as u32)?;
    a.lidt(ptr(rax))?;
    a.sti()?;

    // 6. One device-writable buffer: descriptor 0, avail ring entry 0, avail->idx = 1.
    a.mov(edi, DESC_ADDR as u32)?;
    a.mov(qword_ptr(rdi), BUF_ADDR as u32 as i32)?;
    a.mov(dword_ptr(rdi + 8), BUF_LEN)?;
    a.mov(word_ptr(rdi + 12), 2u32)?; // VIRTQ_DESC_F_WRITE
    a.mov(word_ptr(rdi + 14), 0u32)?;
    a.mov(edi, AVAIL_ADDR as u32)?;
    a.mov(word_ptr(rdi), 0u32)?; // flags: interrupts wanted
    a.mov(word_ptr(rdi + 4), 0u32)?; // ring[0] = descriptor 0
    a.mov(word_ptr(rdi + 2), 1u32)?; // idx

    // Notify queue 0 (16-bit write of the queue index, like Linux's vp_notify).
    a.mov(word_ptr(rbx + NOTIFY_OFF as i32), 0u32)?;
    // Wait for the interrupt; `sti; hlt` is atomic (interrupt shadow), so none is lost.
    let mut wait = a.create_label();
    let mut got = a.create_label();
    a.mov(esi, IRQ_COUNT_ADDR as u32)?;
    a.set_label(&mut wait)?;
    a.cli()?;
    a.cmp(dword_ptr(rsi), 0)?;
    a.jne(got)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(wait)?;
    a.set_label(&mut got)?;
    a.sti()?;

    a.mov(r15d, step::ONE_INTERRUPT)?;
    a.mov(eax, dword_ptr(rsi))?;
    a.cmp(eax, 1)?;
    a.jne(fail)?;
    a.mov(r15d, step::ISR_STATUS)?;
    a.movzx(eax, byte_ptr(rsi + (ISR_SEEN_ADDR - IRQ_COUNT_ADDR) as i32))?;
    a.cmp(eax, 1)?; // queue interrupt
    a.jne(fail)?;
    a.mov(edi, USED_ADDR as u32)?;
    a.mov(r15d, step::USED_IDX)?;
    a.movzx(eax, word_ptr(rdi + 2))?;
    a.cmp(eax, 1)?;
    a.jne(fail)?;
    a.mov(r15d, step::USED_ID)?;
    a.mov(eax, dword_ptr(rdi + 4))?;
    a.cmp(eax, 0)?;
    a.jne(fail)?;
    a.mov(r15d, step::USED_LEN)?;
    a.mov(eax, dword_ptr(rdi + 8))?;
    a.cmp(eax, BUF_LEN as i32)?;
    a.jne(fail)?;
    // The buffer is no longer all zeros (64 random bytes are, with probability 2^-512).
    a.mov(r15d, step::BUFFER_FILLED)?;
    a.mov(edi, BUF_ADDR as u32)?;
    a.mov(ecx, (BUF_LEN / 8) as i32)?;
    a.xor(eax, eax)?;
    let mut or_loop = a.create_label();
    a.set_label(&mut or_loop)?;
    a.or(rax, qword_ptr(rdi))?;
    a.add(rdi, 8)?;
    a.dec(ecx)?;
    a.jnz(or_loop)?;
    a.test(rax, rax)?;
    a.jz(fail)?;

    // Done: success.
    a.mov(al, 0)?;
    a.mov(dx, u32::from(DONE_PORT))?;
    a.out(dx, al)?;
    a.cli()?;
    a.hlt()?;

    // Failure: the offending value to the record port, the step to the done port.
    a.set_label(&mut fail)?;
    a.mov(dx, u32::from(RECORD_PORT))?;
    a.out(dx, eax)?;
    a.mov(eax, r15d)?;
    a.mov(dx, u32::from(DONE_PORT))?;
    a.out(dx, al)?;
    a.cli()?;
    a.hlt()?;
    a.assemble(CODE_ADDR)
}

/// Flat 64-bit long mode at `CODE_ADDR`, derived from the vCPU's reset state.
fn long_mode_state(base: CpuState) -> CpuState {
    let seg = |selector: u16, code: bool| Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl: 0,
        db: !code,
        s: true,
        l: code,
        g: true,
        avl: false,
        unusable: false,
    };
    let mut st = base;
    st.gprs = [0; 16];
    st.gprs[4] = STACK_TOP;
    st.rip = CODE_ADDR;
    st.rflags = 0x2;
    st.gdt = Table { base: GDT_ADDR, limit: 23 };
    st.idt = Table { base: 0, limit: 0 };
    for (i, s) in st.segs.iter_mut().enumerate() {
        *s = if i == 1 { seg(0x08, true) } else { seg(0x10, false) };
    }
    st.tr = Segment { base: 0, limit: 0x67, selector: 0, type_: 11, present: true, ..Default::default() };
    st.cr0 = 0x8000_0011; // PG | ET | PE
    st.cr3 = PML4_ADDR;
    st.cr4 = 0x20; // PAE
    st.efer = 0x500; // LMA | LME
    st
}

// ---------------------------------------------------------------------------------------
// The VMM side.

/// The vCPU's exits: the test ports, then the device buses; counts what reached the
/// userspace MMIO bus.
struct Io {
    pio: PioBus,
    mmio: MmioBus,
    stop: VcpuStopper,
    done: Option<u8>,
    recorded: Vec<u32>,
    /// MMIO writes into the notification area of BAR 0.
    notify_writes: usize,
    /// MMIO reads and writes anywhere in BAR 0.
    bar_accesses: usize,
}

impl Io {
    fn new(pio: PioBus, mmio: MmioBus, stop: VcpuStopper) -> Io {
        Io { pio, mmio, stop, done: None, recorded: Vec::new(), notify_writes: 0, bar_accesses: 0 }
    }

    fn count_bar(&mut self, gpa: u64) {
        if (BAR..BAR + u64::from(virtio::pci::BAR_SIZE)).contains(&gpa) {
            self.bar_accesses += 1;
        }
    }
}

impl ExitHandler for Io {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if !self.pio.read(port, data) {
            data.fill(0xff);
        }
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) {
        match port {
            DONE_PORT => {
                self.done = Some(data[0]);
                self.stop.stop();
            }
            RECORD_PORT => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                self.recorded.push(u32::from_le_bytes(b));
            }
            _ => {
                let _ = self.pio.write(port, data);
            }
        }
    }

    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        self.count_bar(gpa);
        if !self.mmio.read(gpa, data) {
            data.fill(0xff);
        }
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        self.count_bar(gpa);
        if (BAR + NOTIFY_OFF..BAR + MSIX_TABLE_OFF).contains(&gpa) {
            self.notify_writes += 1;
        }
        let _ = self.mmio.write(gpa, data);
    }
}

/// The PCI bus with the virtio-rng transport in slot 1, on the conf1 ports and over the PCI
/// MMIO window of `pio`/`mmio`.
fn attach_virtio_rng(
    mem: &GuestMemoryMmap,
    pio: &mut PioBus,
    mmio: &mut MmioBus,
    msi: Arc<dyn MsiSink>,
    dma: Arc<DmaLog>,
    ioevents: Option<Arc<dyn IoEventRegistrar>>,
) -> Arc<Mutex<VirtioPci>> {
    let dev = Arc::new(Mutex::new(VirtioPci::new(
        Box::new(virtio::rng::Rng::new()),
        BAR as u32,
        mem.clone(),
        msi,
        dma,
        ioevents,
    )));
    let mut bus = PciBus::new();
    assert_eq!(bus.add(dev.clone()), Some(1), "virtio-rng is 00:01.0");
    let bus = Arc::new(Mutex::new(bus));
    pio.insert(devices::pci::CONF1_PORT, devices::pci::CONF1_LEN, bus.clone()).unwrap();
    mmio.insert(BAR, PCI_WINDOW_END - BAR, bus).unwrap();
    dev
}

/// Runs `vcpu` until the guest writes the done port; fails after 20 s. A watchdog thread
/// stops the vCPU at the deadline through its stopper (which also kicks a KVM vCPU halted in
/// the kernel out of `KVM_RUN`).
fn run_bounded(vcpu: &mut dyn Vcpu, io: &mut Io) {
    const LIMIT: Duration = Duration::from_secs(20);
    let start = Instant::now();
    let stop = io.stop.clone();
    let (cancel, cancelled) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(LIMIT) {
            stop.stop();
        }
    });
    let result = loop {
        let exit = vcpu.run(io);
        if io.done.is_some() {
            break Ok(());
        }
        match exit {
            Ok(VcpuExit::Interrupted) if start.elapsed() < LIMIT => {}
            Ok(VcpuExit::Interrupted) => break Err(format!("guest not done after {LIMIT:?}")),
            Ok(other) => break Err(format!("unexpected exit {other:?}")),
            Err(e) => break Err(format!("vCPU error: {e}")),
        }
    };
    drop(cancel);
    watchdog.join().unwrap();
    if let Err(e) = result {
        let rip = vcpu.state().map(|s| format!("{:#x}", s.rip)).unwrap_or_else(|e| e.to_string());
        panic!("{e} (rip {rip}, recorded {:#x?})", io.recorded);
    }
}

/// What both accelerators must show after the run: the guest's own verdict, the values it
/// recorded, the device's counters and the rings in guest memory.
fn check_common(name: &str, io: &Io, mem: &GuestMemoryMmap, dev: &Arc<Mutex<VirtioPci>>) {
    let done = io.done.expect("done");
    assert_eq!(done, 0, "{name}: guest failed at {} (recorded {:#x?})", step_name(done), io.recorded);
    assert_eq!(io.recorded, vec![0x1044_1af4, 0xffff_8000], "{name}: vendor/device ID and BAR size mask");
    assert!(io.bar_accesses > 20, "{name}: common config and MSI-X table went through the MMIO bus");
    let counters = dev.lock().unwrap().counters();
    assert_eq!(counters.requests.load(Ordering::Relaxed), 1, "{name}: one request served");
    assert_eq!(counters.bytes_written.load(Ordering::Relaxed), u64::from(BUF_LEN));
    assert_eq!(counters.errors.load(Ordering::Relaxed), 0);
    let used_idx: u16 = mem.read_obj(GuestAddress(USED_ADDR + 2)).unwrap();
    let used_len: u32 = mem.read_obj(GuestAddress(USED_ADDR + 8)).unwrap();
    let irqs: u32 = mem.read_obj(GuestAddress(IRQ_COUNT_ADDR)).unwrap();
    assert_eq!((used_idx, used_len, irqs), (1, BUF_LEN, 1), "{name}: used ring and interrupt count");
    let mut buf = [0u8; BUF_LEN as usize];
    mem.read_slice(&mut buf, GuestAddress(BUF_ADDR)).unwrap();
    assert!(buf.iter().any(|&b| b != 0), "{name}: buffer filled");
}

#[test]
fn virtio_rng_over_pci_msix_on_emu() {
    let t0 = Instant::now();
    let mem = build_guest();
    let ram = vmm::memory::regions(&mem);
    let clock: accel::Clock = Arc::new(move || t0.elapsed().as_nanos() as u64);
    let vm = EmuHypervisor.create_vm(&VmSpec { ram: &ram, clock, cpus: 1 }).unwrap();
    assert!(vm.needs_dma_log() && !vm.supports_ioevents());
    let (mut pio, mut mmio) = (PioBus::new(), MmioBus::new());
    let dma = Arc::new(DmaLog::default());
    let d = dma.clone();
    vm.set_device_writes(Arc::new(move || if d.pending() { d.take() } else { Vec::new() }));
    let dev = attach_virtio_rng(&mem, &mut pio, &mut mmio, vm.msi_sink(), dma.clone(), None);

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let st = long_mode_state(vcpu.state().unwrap());
    vcpu.set_state(&st).unwrap();

    let mut io = Io::new(pio, mmio, vcpu.stopper());
    run_bounded(vcpu.as_mut(), &mut io);
    eprintln!("timing: emu: build + run to done {:.2} ms", t0.elapsed().as_secs_f64() * 1e3);
    check_common("emu", &io, &mem, &dev);
    // Without ioeventfds the notification is an ordinary MMIO write to the transport.
    assert_eq!(io.notify_writes, 1, "emu: the queue notification goes through the MMIO bus");
    assert!(!dma.pending(), "emu: the emulator took the device's DMA report");
}

#[test]
fn virtio_rng_over_pci_msix_on_kvm() {
    if !KvmVm::available() {
        println!("skipping: /dev/kvm unavailable");
        return;
    }
    let t0 = Instant::now();
    let mem = build_guest();
    let ram = vmm::memory::regions(&mem);
    // What `KvmHypervisor::create_vm` makes, kept concrete to read its MSI route count.
    let kvm = Arc::new(KvmVm::new(&ram).unwrap());
    assert!(kvm.has_irqchip());
    let vm: Arc<dyn accel::Vm> = kvm.clone();
    assert!(!vm.needs_dma_log() && vm.supports_ioevents());
    let (mut pio, mut mmio) = (PioBus::new(), MmioBus::new());
    let msi: Arc<dyn MsiSink> = vm.msi_sink();
    let ioevents: Arc<dyn IoEventRegistrar> = Arc::new(VmIoEvents(vm.clone()));
    let dma = Arc::new(DmaLog::disabled());
    let dev = attach_virtio_rng(&mem, &mut pio, &mut mmio, msi, dma.clone(), Some(ioevents));

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let st = long_mode_state(vcpu.state().unwrap());
    vcpu.set_state(&st).unwrap();

    let mut io = Io::new(pio, mmio, vcpu.stopper());
    run_bounded(vcpu.as_mut(), &mut io);
    eprintln!(
        "timing: kvm{}: build + run to done {:.2} ms",
        if kvm.is_pvm() { " (PVM)" } else { "" },
        t0.elapsed().as_secs_f64() * 1e3
    );
    check_common("kvm", &io, &mem, &dev);
    // The notification was an ioeventfd inside KVM: it never left the kernel.
    assert_eq!(io.notify_writes, 0, "kvm: the queue notification must not reach the userspace MMIO bus");
    assert_eq!(kvm.irqfd_routes(), 1, "kvm: the MSI went through an irqfd and an MSI route");
    assert!(!dma.pending() && dma.take().is_empty(), "kvm: no DMA log is kept");
}
