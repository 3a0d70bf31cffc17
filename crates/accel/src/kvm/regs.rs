//! Conversions between [`CpuState`] and KVM's `kvm_regs` / `kvm_sregs`
//! (KVM API sections "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS").
//!
//! Pure data shuffling, no ioctls: kept apart so it can be unit-tested without `/dev/kvm`.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

use crate::state::{CpuState, Segment, Table};

/// APIC base MSR value KVM's `kvm_sregs::apic_base` gets when the vCPU reports none:
/// xAPIC at the architectural default `0xfee0_0000`, globally enabled (bit 11), bootstrap
/// processor (bit 8). Application processors use the same value without bit 8.
pub const DEFAULT_APIC_BASE_BSP: u64 = 0xfee0_0900;

/// IA32_APIC_BASE bit 8: this processor is the BSP.
const APIC_BASE_BSP: u64 = 1 << 8;

/// General registers of `state` in `kvm_regs` form.
pub fn to_kvm_regs(state: &CpuState) -> kvm_regs {
    let g = &state.gprs;
    kvm_regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: g[4],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: state.rip,
        // Bit 1 of RFLAGS is reserved and reads as one; KVM rejects nothing here but a
        // guest would see a malformed value otherwise.
        rflags: state.rflags | 0x2,
    }
}

/// Copies the general registers from `regs` into `state`.
pub fn from_kvm_regs(regs: &kvm_regs, state: &mut CpuState) {
    state.gprs = [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8, regs.r9, regs.r10,
        regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ];
    state.rip = regs.rip;
    state.rflags = regs.rflags;
}

/// One segment register in `kvm_segment` form (all flags as 0/1 bytes).
pub fn to_kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_ & 0xf,
        present: u8::from(s.present),
        dpl: s.dpl & 3,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

/// One `kvm_segment` as a [`Segment`].
pub fn from_kvm_segment(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn to_kvm_dtable(t: &Table) -> kvm_dtable {
    kvm_dtable { base: t.base, limit: t.limit, padding: [0; 3] }
}

fn from_kvm_dtable(t: &kvm_dtable) -> Table {
    Table { base: t.base, limit: t.limit }
}

/// Writes the segment, descriptor-table, control-register and EFER parts of `state` into
/// `sregs`, which should come from `KVM_GET_SREGS` so that the fields [`CpuState`] does not
/// describe (`interrupt_bitmap`, the pending external interrupt) keep their current value.
///
/// `apic_base` is kept as well unless it is zero (no value known yet), in which case it
/// becomes [`DEFAULT_APIC_BASE_BSP`] for vCPU 0 and the same without the BSP bit for the
/// others.
pub fn apply_to_kvm_sregs(state: &CpuState, vcpu_id: u8, sregs: &mut kvm_sregs) {
    let seg = |i: usize| to_kvm_segment(&state.segs[i]);
    sregs.es = seg(0);
    sregs.cs = seg(1);
    sregs.ss = seg(2);
    sregs.ds = seg(3);
    sregs.fs = seg(4);
    sregs.gs = seg(5);
    sregs.ldt = to_kvm_segment(&state.ldt);
    sregs.tr = to_kvm_segment(&state.tr);
    sregs.gdt = to_kvm_dtable(&state.gdt);
    sregs.idt = to_kvm_dtable(&state.idt);
    sregs.cr0 = state.cr0;
    sregs.cr2 = state.cr2;
    sregs.cr3 = state.cr3;
    sregs.cr4 = state.cr4;
    sregs.cr8 = state.cr8;
    sregs.efer = state.efer;
    if sregs.apic_base == 0 {
        sregs.apic_base = if vcpu_id == 0 { DEFAULT_APIC_BASE_BSP } else { DEFAULT_APIC_BASE_BSP & !APIC_BASE_BSP };
    }
}

/// Copies segments, descriptor tables, control registers and EFER from `sregs` into `state`.
pub fn from_kvm_sregs(sregs: &kvm_sregs, state: &mut CpuState) {
    state.segs = [
        from_kvm_segment(&sregs.es),
        from_kvm_segment(&sregs.cs),
        from_kvm_segment(&sregs.ss),
        from_kvm_segment(&sregs.ds),
        from_kvm_segment(&sregs.fs),
        from_kvm_segment(&sregs.gs),
    ];
    state.ldt = from_kvm_segment(&sregs.ldt);
    state.tr = from_kvm_segment(&sregs.tr);
    state.gdt = from_kvm_dtable(&sregs.gdt);
    state.idt = from_kvm_dtable(&sregs.idt);
    state.cr0 = sregs.cr0;
    state.cr2 = sregs.cr2;
    state.cr3 = sregs.cr3;
    state.cr4 = sregs.cr4;
    state.cr8 = sregs.cr8;
    state.efer = sregs.efer;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_state() -> CpuState {
        let mut st = CpuState::default();
        for (i, g) in st.gprs.iter_mut().enumerate() {
            *g = 0x1000 + i as u64;
        }
        st.rip = 0xdead_beef;
        st.rflags = 0x202;
        for (i, s) in st.segs.iter_mut().enumerate() {
            *s = Segment {
                base: 0x10 * i as u64,
                limit: 0xffff_ffff,
                selector: 8 * i as u16,
                type_: 0xb,
                present: true,
                dpl: 0,
                db: i % 2 == 0,
                s: true,
                l: i == 1,
                g: true,
                avl: i == 3,
                unusable: i == 5,
            };
        }
        st.tr = Segment { type_: 11, present: true, limit: 0x67, ..Default::default() };
        st.ldt = Segment { unusable: true, ..Default::default() };
        st.gdt = Table { base: 0x500, limit: 23 };
        st.idt = Table { base: 0, limit: 0 };
        st.cr0 = 0x8000_0011;
        st.cr2 = 0x1234;
        st.cr3 = 0x1000;
        st.cr4 = 0x20;
        st.cr8 = 3;
        st.efer = 0x500;
        st
    }

    #[test]
    fn round_trip() {
        let st = sample_state();
        let mut sregs = kvm_sregs::default();
        apply_to_kvm_sregs(&st, 0, &mut sregs);
        assert_eq!(sregs.apic_base, DEFAULT_APIC_BASE_BSP);
        let regs = to_kvm_regs(&st);
        assert_eq!(regs.rcx, 0x1001);
        assert_eq!(regs.rsp, 0x1004);
        let mut back = CpuState::default();
        from_kvm_regs(&regs, &mut back);
        from_kvm_sregs(&sregs, &mut back);
        assert_eq!(back, st);
    }

    #[test]
    fn apic_base_kept_and_ap_default() {
        let st = sample_state();
        let mut sregs = kvm_sregs { apic_base: 0xfee0_0800, ..Default::default() };
        apply_to_kvm_sregs(&st, 0, &mut sregs);
        assert_eq!(sregs.apic_base, 0xfee0_0800);
        let mut sregs = kvm_sregs::default();
        apply_to_kvm_sregs(&st, 1, &mut sregs);
        assert_eq!(sregs.apic_base, 0xfee0_0800);
    }
}
