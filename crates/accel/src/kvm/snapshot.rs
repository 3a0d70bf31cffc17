//! Snapshot state of a [`KvmVm`] and its [`KvmVcpu`]s: what KVM keeps in the kernel, read
//! out with the `KVM_GET_*` ioctls and loaded into a new VM with the `KVM_SET_*` ones.
//!
//! Guest RAM is not part of it: the VMM owns the [`crate::RamRegion`] mappings and copies
//! them itself. Device models outside KVM (serial, virtio, ...) are not part of it either.
//!
//! # Taking a snapshot
//!
//! 1. Stop every vCPU: each must be outside [`crate::Vcpu::run`] (its
//!    [`KvmVcpu::stop_flag`] or a signal). `run` completes a port I/O or MMIO access
//!    interrupted by the stop before it returns, so the registers are consistent
//!    ("KVM_RUN": such accesses are only finished on the next entry).
//! 2. [`KvmVcpu::save_state`] for every vCPU, [`KvmVm::save_state`], then copy guest RAM.
//!
//! `KVM_GET_VCPU_EVENTS`/`KVM_SET_VCPU_EVENTS` and `KVM_GET_MP_STATE` are only meaningful
//! while no other vCPU of the VM runs (an IPI could change them underneath).
//!
//! # Restoring
//!
//! Create a new [`KvmVm`] over a copy of the RAM with the same [`super::KvmVmOptions`],
//! call [`KvmVm::restore_state`] first, then create the vCPUs with the same ids
//! ([`KvmVm::create_vcpu`]) and call [`KvmVcpu::restore_state`] on each before it runs.
//! The VM part goes first so that the kvmclock base is in place before the vCPUs' kvmclock
//! MSRs are written, and the irqchip before the LAPICs (Firecracker's order).
//!
//! Saving, per vCPU (Firecracker's order): `KVM_GET_MP_STATE` first (it makes KVM accept
//! pending INIT/SIPI events, which may change the LAPIC and registers), then REGS, SREGS,
//! XSAVE (or FPU), XCRS, DEBUGREGS, LAPIC, TSC_KHZ, CPUID2, MSRS, and `KVM_GET_VCPU_EVENTS`
//! last (earlier GETs may change pending-event state).
//!
//! Restoring, per vCPU:
//!
//! 1. `KVM_SET_CPUID2`: KVM checks MSR and XSAVE contents against the guest CPUID.
//! 2. `KVM_SET_TSC_KHZ`, only when the host's TSC frequency differs from the saved one by
//!    more than 250 ppm (Firecracker's tolerance); before the TSC MSR is written.
//! 3. `KVM_SET_MP_STATE`.
//! 4. `KVM_SET_REGS`, then `KVM_SET_SREGS` (which carries EFER, CR0/3/4 and the APIC base:
//!    it must precede the LAPIC and the MSRs, whose validity depends on them).
//! 5. `KVM_SET_XSAVE` (or `KVM_SET_FPU`), `KVM_SET_XCRS`, `KVM_SET_DEBUGREGS`.
//! 6. `KVM_SET_LAPIC`: after SREGS (APIC base), before the MSRs (IA32_TSC_DEADLINE is only
//!    accepted once the LAPIC's timer mode is restored).
//! 7. `KVM_SET_MSRS`: all saved MSRs, with IA32_TSC_DEADLINE in a second call after
//!    IA32_TSC (KVM arms the deadline timer relative to the TSC).
//! 8. `KVM_SET_VCPU_EVENTS` last: `KVM_SET_REGS`/`KVM_SET_SREGS` drop pending exceptions and
//!    interrupts, and this puts them back.
//!
//! # What a host may not support
//!
//! Each optional part is saved only when KVM offers it: the capability is checked first
//! (`KVM_CHECK_EXTENSION`), and an ioctl that fails with `ENOTTY`, `EOPNOTSUPP` or `ENOSYS`
//! counts as unsupported too. Such a part is `None` in the state and listed in
//! [`KvmVcpuState::skipped`] / [`KvmVmState::skipped`] with the reason; restore then leaves it
//! at the new VM's defaults. Any other failure is an [`Error::Kvm`] naming the ioctl.
//! Registers, special registers, CPUID and MSRs are mandatory.
//!
//! MSRs: the ones `KVM_GET_MSR_INDEX_LIST` names plus [`REQUIRED_MSRS`] (SYSCALL/SYSENTER
//! MSRs, KERNEL_GS_BASE, PAT, TSC, TSC_ADJUST, TSC_DEADLINE, MISC_ENABLE, APIC base, MTRRs,
//! TSC_AUX), of which those `KVM_GET_MSRS` refuses on this vCPU are left out and listed in
//! `skipped` (one entry per MSR, "MSR 0x...").
//!
//! On the PVM host this was written on (see [`super::is_pvm_host`]; Linux 6.18 with
//! `kvm_pvm`), every ioctl named here works and nothing is skipped, except
//! `KVM_SET_TSC_KHZ` (`KVM_CAP_TSC_CONTROL` is not offered; a snapshot from a host whose
//! TSC frequency differs is refused with [`Error::Unsupported`]).
//! `crates/accel/tests/kvm_snapshot.rs` prints what was skipped.
//!
//! Restoring MSRs, KVM may refuse a write that a fresh vCPU does not need, e.g.
//! MSR_KVM_ASYNC_PF_INT (even = 0) on a vCPU without in-kernel LAPIC: a refused MSR is
//! accepted when the vCPU already holds the saved value; otherwise restore fails naming it.
//!
//! # Serialized form
//!
//! The state types derive serde's `Serialize`/`Deserialize`. KVM's structures are held as
//! [`Raw`], which uses kvm-bindings' `serde` feature: the structure's byte image (the kernel
//! ABI layout) as serde `bytes`, so a snapshot is only meant to be restored on the same
//! architecture with a compatible kernel ABI. `kvm_fpu`, which that feature does not cover,
//! is held as [`RawFpu`] and serialized in the same form. This is byte for byte the form
//! rustvisor wrote before it used the crate's impls ("kvm/1" states and kvm vCPU snapshots
//! did not change). Note that kvm-bindings' deserializer zero-pads or truncates a byte image
//! of the wrong length instead of refusing it (meant for structures a newer kernel extends).

use std::fmt;
use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::{kvm_err, KvmVcpu, KvmVm};
use crate::{Error, Result};

/// IA32_TSC_DEADLINE: restored after everything else (see the module docs).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// MSRs saved in addition to `KVM_GET_MSR_INDEX_LIST` (when `KVM_GET_MSRS` can read them):
/// architectural state a 64-bit guest kernel sets up, some of which KVM leaves out of that
/// list. EFER, FS_BASE and GS_BASE travel in `kvm_sregs`.
pub const REQUIRED_MSRS: &[u32] = &[
    0x10,  // IA32_TSC
    0x1b,  // IA32_APIC_BASE (also in kvm_sregs::apic_base)
    0x3b,  // IA32_TSC_ADJUST
    0x174, // IA32_SYSENTER_CS
    0x175, // IA32_SYSENTER_ESP
    0x176, // IA32_SYSENTER_EIP
    0x1a0, // IA32_MISC_ENABLE
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207, // IA32_MTRR_PHYSBASE/MASK0-3
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f, // IA32_MTRR_PHYSBASE/MASK4-7
    0x250, // IA32_MTRR_FIX64K_00000
    0x258, // IA32_MTRR_FIX16K_80000
    0x259, // IA32_MTRR_FIX16K_A0000
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,       // IA32_MTRR_FIX4K_*
    0x277,       // IA32_PAT
    0x2ff,       // IA32_MTRR_DEF_TYPE
    0x6e0,       // IA32_TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Relative TSC frequency difference (parts per million) below which `KVM_SET_TSC_KHZ` is
/// not attempted on restore (calibration noise; Firecracker's tolerance).
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

mod sealed {
    /// Keeps [`super::KvmPod`] implemented only here.
    pub trait Sealed {}
}

/// A KVM UAPI structure that kvm-bindings' `serde` feature covers: it serializes as the
/// structure's byte image (serde `bytes`) and derives zerocopy's `IntoBytes`/`FromBytes`,
/// which prove at compile time that the layout has no padding, so [`Raw`] can view it as
/// bytes and rebuild it from bytes without `unsafe`.
///
/// Implemented (sealed) only for the structures listed in this module, whose sizes are
/// checked at compile time against the kernel ABI. `kvm_fpu` is not one of them (the crate
/// gives it neither serde nor zerocopy impls); see [`RawFpu`].
pub trait KvmPod:
    Copy + Default + IntoBytes + FromBytes + Immutable + Serialize + DeserializeOwned + sealed::Sealed
{
}

macro_rules! kvm_pod {
    ($($t:ty => $size:expr),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl KvmPod for $t {}
        const _: () = assert!(size_of::<$t>() == $size);
    )*};
}

kvm_pod! {
    kvm_regs => 144,
    kvm_sregs => 312,
    kvm_xcrs => 392,
    kvm_debugregs => 128,
    kvm_lapic_state => 1024,
    kvm_vcpu_events => 64,
    kvm_cpuid_entry2 => 40,
    kvm_irqchip => 520,
    kvm_pit_state2 => 112,
    kvm_clock_data => 48,
}

/// A KVM structure held verbatim. Serializes with kvm-bindings' own impls (its byte image as
/// serde `bytes`); equality compares the bytes (kvm-bindings derives neither `Eq` nor, for
/// `kvm_irqchip`, `PartialEq`/`Debug`, which the state types need).
#[derive(Clone, Copy, Default)]
pub struct Raw<T: KvmPod>(pub T);

impl<T: KvmPod> Raw<T> {
    /// The structure's bytes, in the kernel ABI layout.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Rebuilds the structure from [`Raw::as_bytes`] output; `None` when `bytes` is not
    /// exactly `size_of::<T>()` long.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        T::read_from_bytes(bytes).ok().map(Self)
    }
}

impl<T: KvmPod> PartialEq for Raw<T> {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl<T: KvmPod> Eq for Raw<T> {}

impl<T: KvmPod> fmt::Debug for Raw<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = std::any::type_name::<T>().rsplit("::").next().unwrap_or("?");
        write!(f, "Raw<{name}>({} bytes)", size_of::<T>())
    }
}

impl<T: KvmPod> Serialize for Raw<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de, T: KvmPod> Deserialize<'de> for Raw<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        T::deserialize(deserializer).map(Self)
    }
}

/// Size of `kvm_fpu` in the kernel ABI.
const FPU_SIZE: usize = 416;
const _: () = assert!(size_of::<kvm_fpu>() == FPU_SIZE);

/// `kvm_fpu` held verbatim. kvm-bindings 0.14's `serde` feature leaves this structure out
/// (no `Serialize`/`Deserialize`, no zerocopy derives), so it is serialized here, in the same
/// form as [`Raw`]: its 416-byte kernel ABI image as serde `bytes`, built and parsed field by
/// field (native byte order), so no `unsafe` is needed. Deserializing requires exactly 416
/// bytes.
#[derive(Clone, Copy, Default, PartialEq)]
pub struct RawFpu(pub kvm_fpu);

/// `kvm_fpu` is integers and integer arrays only, so its `PartialEq` is an equivalence.
impl Eq for RawFpu {}

impl RawFpu {
    /// The structure's bytes, in the kernel ABI layout: `fpr`, `fcw`, `fsw`, `ftwx`, `pad1`,
    /// `last_opcode`, `last_ip`, `last_dp`, `xmm`, `mxcsr`, `pad2`, without padding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let f = &self.0;
        let mut out = Vec::with_capacity(FPU_SIZE);
        f.fpr.iter().for_each(|r| out.extend_from_slice(r));
        out.extend_from_slice(&f.fcw.to_ne_bytes());
        out.extend_from_slice(&f.fsw.to_ne_bytes());
        out.push(f.ftwx);
        out.push(f.pad1);
        out.extend_from_slice(&f.last_opcode.to_ne_bytes());
        out.extend_from_slice(&f.last_ip.to_ne_bytes());
        out.extend_from_slice(&f.last_dp.to_ne_bytes());
        f.xmm.iter().for_each(|r| out.extend_from_slice(r));
        out.extend_from_slice(&f.mxcsr.to_ne_bytes());
        out.extend_from_slice(&f.pad2.to_ne_bytes());
        debug_assert_eq!(out.len(), FPU_SIZE);
        out
    }

    /// Rebuilds the structure from [`RawFpu::to_bytes`] output; `None` when `bytes` is not
    /// exactly 416 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        fn take<const N: usize>(rest: &mut &[u8]) -> Option<[u8; N]> {
            let (head, tail) = rest.split_first_chunk::<N>()?;
            *rest = tail;
            Some(*head)
        }
        if bytes.len() != FPU_SIZE {
            return None;
        }
        let rest = &mut &bytes[..];
        let mut f = kvm_fpu::default();
        for r in &mut f.fpr {
            *r = take(rest)?;
        }
        f.fcw = u16::from_ne_bytes(take(rest)?);
        f.fsw = u16::from_ne_bytes(take(rest)?);
        f.ftwx = u8::from_ne_bytes(take(rest)?);
        f.pad1 = u8::from_ne_bytes(take(rest)?);
        f.last_opcode = u16::from_ne_bytes(take(rest)?);
        f.last_ip = u64::from_ne_bytes(take(rest)?);
        f.last_dp = u64::from_ne_bytes(take(rest)?);
        for r in &mut f.xmm {
            *r = take(rest)?;
        }
        f.mxcsr = u32::from_ne_bytes(take(rest)?);
        f.pad2 = u32::from_ne_bytes(take(rest)?);
        Some(Self(f))
    }
}

impl fmt::Debug for RawFpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawFpu({FPU_SIZE} bytes)")
    }
}

impl Serialize for RawFpu {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.to_bytes())
    }
}

impl<'de> Deserialize<'de> for RawFpu {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawFpu;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{FPU_SIZE} bytes of kvm_fpu")
            }

            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<RawFpu, E> {
                RawFpu::from_bytes(v).ok_or_else(|| E::invalid_length(v.len(), &self))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<RawFpu, A::Error> {
                let mut bytes = Vec::with_capacity(FPU_SIZE);
                while let Some(b) = seq.next_element::<u8>()? {
                    bytes.push(b);
                }
                RawFpu::from_bytes(&bytes).ok_or_else(|| serde::de::Error::invalid_length(bytes.len(), &self))
            }
        }

        deserializer.deserialize_bytes(Visitor)
    }
}

/// One saved MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// MSR index (ECX of `rdmsr`).
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// A part of the state that was not saved, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedState {
    /// The ioctl (e.g. "KVM_GET_XCRS") or "MSR 0x..." that was skipped.
    pub item: String,
    /// Why: a missing capability, the errno KVM returned, or the VM's configuration.
    pub reason: String,
}

/// Saved state of one [`KvmVcpu`] (see the [module docs](self)). Optional parts are `None`
/// when this host does not support them; [`KvmVcpuState::skipped`] says why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmVcpuState {
    /// The vCPU id (initial APIC id) it was saved from; restore requires the same id.
    pub vcpu_id: u8,
    /// Guest CPUID ("KVM_GET_CPUID2").
    pub cpuid: Vec<Raw<kvm_cpuid_entry2>>,
    /// Guest TSC frequency in kHz ("KVM_GET_TSC_KHZ").
    pub tsc_khz: Option<u32>,
    /// Multiprocessing state, a `KVM_MP_STATE_*` value ("KVM_GET_MP_STATE").
    pub mp_state: Option<u32>,
    /// General registers, rip, rflags ("KVM_GET_REGS").
    pub regs: Raw<kvm_regs>,
    /// Segments, descriptor tables, control registers, EFER, APIC base, pending external
    /// interrupt ("KVM_GET_SREGS").
    pub sregs: Raw<kvm_sregs>,
    /// XSAVE area as 32-bit words ("KVM_GET_XSAVE2" with the size `KVM_CAP_XSAVE2` gives, or
    /// the 4 KiB "KVM_GET_XSAVE"): x87, SSE, AVX and other XSAVE-managed state.
    pub xsave: Option<Vec<u32>>,
    /// Legacy x87/SSE state ("KVM_GET_FPU"); only saved when XSAVE is not available.
    pub fpu: Option<RawFpu>,
    /// Extended control registers, XCR0 ("KVM_GET_XCRS").
    pub xcrs: Option<Raw<kvm_xcrs>>,
    /// DR0-3, DR6, DR7 ("KVM_GET_DEBUGREGS").
    pub debug_regs: Option<Raw<kvm_debugregs>>,
    /// In-kernel local APIC registers ("KVM_GET_LAPIC"); `None` on VMs without irqchip.
    pub lapic: Option<Raw<kvm_lapic_state>>,
    /// MSRs ("KVM_GET_MSRS"), in the order they are restored.
    pub msrs: Vec<MsrValue>,
    /// Pending exception, interrupt, NMI, SMI, interrupt shadow ("KVM_GET_VCPU_EVENTS").
    pub vcpu_events: Option<Raw<kvm_vcpu_events>>,
    /// What was not saved, and why.
    pub skipped: Vec<SkippedState>,
}

impl KvmVcpuState {
    /// The saved value of MSR `index`, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }
}

/// Saved VM-wide state of a [`KvmVm`] (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmVmState {
    /// Whether the VM had the in-kernel irqchip and PIT; restore requires the same.
    pub irqchip: bool,
    /// Master i8259 ("KVM_GET_IRQCHIP", `KVM_IRQCHIP_PIC_MASTER`).
    pub pic_master: Option<Raw<kvm_irqchip>>,
    /// Slave i8259 ("KVM_GET_IRQCHIP", `KVM_IRQCHIP_PIC_SLAVE`).
    pub pic_slave: Option<Raw<kvm_irqchip>>,
    /// I/O APIC ("KVM_GET_IRQCHIP", `KVM_IRQCHIP_IOAPIC`).
    pub ioapic: Option<Raw<kvm_irqchip>>,
    /// i8254 PIT ("KVM_GET_PIT2").
    pub pit: Option<Raw<kvm_pit_state2>>,
    /// kvmclock ("KVM_GET_CLOCK").
    pub clock: Option<Raw<kvm_clock_data>>,
    /// What was not saved, and why.
    pub skipped: Vec<SkippedState>,
}

/// What this host offers for snapshots, probed once per [`KvmVm`] and shared with its vCPUs.
#[derive(Debug)]
pub(crate) struct SnapshotCaps {
    /// `KVM_GET_MSR_INDEX_LIST` plus [`REQUIRED_MSRS`], sorted, without duplicates.
    msrs: Vec<u32>,
    /// Why `KVM_GET_MSR_INDEX_LIST` gave nothing, if it failed.
    msr_list_error: Option<String>,
    /// `KVM_CAP_XSAVE2`: size in bytes of the XSAVE buffer, when offered.
    xsave2_size: Option<usize>,
    xsave: bool,
    xcrs: bool,
    debugregs: bool,
    vcpu_events: bool,
    mp_state: bool,
    pit_state2: bool,
    adjust_clock: bool,
    get_tsc_khz: bool,
    tsc_control: bool,
}

impl SnapshotCaps {
    /// Asks KVM (`KVM_CHECK_EXTENSION`, `KVM_GET_MSR_INDEX_LIST`); never fails.
    pub(crate) fn probe(kvm: &Kvm, vm: &VmFd) -> Self {
        let (mut msrs, msr_list_error) = match kvm.get_msr_index_list() {
            Ok(list) => (list.as_slice().to_vec(), None),
            Err(e) => (Vec::new(), Some(format!("KVM_GET_MSR_INDEX_LIST: {e}"))),
        };
        msrs.extend_from_slice(REQUIRED_MSRS);
        msrs.sort_unstable();
        msrs.dedup();
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        Self {
            msrs,
            msr_list_error,
            xsave2_size: usize::try_from(xsave2).ok().filter(|&n| n >= size_of::<kvm_xsave>()),
            xsave: vm.check_extension(Cap::Xsave),
            xcrs: vm.check_extension(Cap::Xcrs),
            debugregs: vm.check_extension(Cap::Debugregs),
            vcpu_events: vm.check_extension(Cap::VcpuEvents),
            mp_state: vm.check_extension(Cap::MpState),
            pit_state2: vm.check_extension(Cap::PitState2),
            adjust_clock: vm.check_extension(Cap::AdjustClock),
            get_tsc_khz: vm.check_extension(Cap::GetTscKhz),
            tsc_control: vm.check_extension(Cap::TscControl),
        }
    }
}

/// Whether an ioctl failure means "not supported by this KVM" rather than a real error.
fn is_unsupported(e: &kvm_ioctls::Error) -> bool {
    matches!(e.errno(), libc::ENOTTY | libc::EOPNOTSUPP | libc::ENOSYS)
}

/// `Some(reason)` when capability `cap` is missing.
fn missing_cap(have: bool, cap: &str) -> Option<String> {
    (!have).then(|| format!("{cap} not offered by this host"))
}

/// Runs an optional GET ioctl: `None` (recorded in `skipped`) when `missing` says it
/// cannot be used or KVM reports it unsupported; any other failure is an error.
fn optional<T>(
    skipped: &mut Vec<SkippedState>,
    ioctl: &str,
    missing: Option<String>,
    get: impl FnOnce() -> std::result::Result<T, kvm_ioctls::Error>,
) -> Result<Option<T>> {
    if let Some(reason) = missing {
        skipped.push(SkippedState { item: ioctl.into(), reason });
        return Ok(None);
    }
    match get() {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_unsupported(&e) => {
            skipped.push(SkippedState { item: ioctl.into(), reason: format!("unsupported here: {e}") });
            Ok(None)
        }
        Err(e) => Err(Error::Kvm(format!("{ioctl}: {e}"))),
    }
}

impl KvmVcpu {
    /// Saves this vCPU's KVM state (see the [module docs](self) for what, in which order,
    /// and what is skipped on hosts without support). The vCPU must not be running, and for
    /// a consistent snapshot no other vCPU of the VM either.
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] naming the ioctl that failed for a reason other than "unsupported".
    pub fn save_state(&self) -> Result<KvmVcpuState> {
        let caps = &*self.snap;
        let fd = &self.fd;
        let mut skipped = Vec::new();

        let mp_state =
            optional(&mut skipped, "KVM_GET_MP_STATE", missing_cap(caps.mp_state, "KVM_CAP_MP_STATE"), || {
                fd.get_mp_state().map(|m| m.mp_state)
            })?;
        let regs = Raw(fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?);
        let sregs = Raw(fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?);
        let xsave = optional(&mut skipped, "KVM_GET_XSAVE", missing_cap(caps.xsave, "KVM_CAP_XSAVE"), || {
            self.get_xsave_words()
        })?;
        let fpu = match xsave {
            Some(_) => None,
            None => optional(&mut skipped, "KVM_GET_FPU", None, || fd.get_fpu().map(RawFpu))?,
        };
        let xcrs =
            optional(&mut skipped, "KVM_GET_XCRS", missing_cap(caps.xcrs, "KVM_CAP_XCRS"), || fd.get_xcrs().map(Raw))?;
        let debug_regs =
            optional(&mut skipped, "KVM_GET_DEBUGREGS", missing_cap(caps.debugregs, "KVM_CAP_DEBUGREGS"), || {
                fd.get_debug_regs().map(Raw)
            })?;
        let no_lapic = (!self.irqchip).then(|| "the VM has no in-kernel irqchip (KvmVmOptions::irqchip)".to_string());
        let lapic = optional(&mut skipped, "KVM_GET_LAPIC", no_lapic, || fd.get_lapic().map(Raw))?;
        // The TSC frequency is informational (it only matters on a different host): any
        // failure (e.g. EIO for an unstable host TSC) skips it.
        let tsc_khz = match missing_cap(caps.get_tsc_khz, "KVM_CAP_GET_TSC_KHZ") {
            Some(reason) => {
                skipped.push(SkippedState { item: "KVM_GET_TSC_KHZ".into(), reason });
                None
            }
            None => match fd.get_tsc_khz() {
                Ok(khz) => Some(khz),
                Err(e) => {
                    skipped.push(SkippedState { item: "KVM_GET_TSC_KHZ".into(), reason: e.to_string() });
                    None
                }
            },
        };
        let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_CPUID2"))?;
        // Unused trailing slots come back zeroed; leaf 0 always has a non-zero EAX.
        let cpuid = cpuid
            .as_slice()
            .iter()
            .filter(|e| !(e.function == 0 && e.index == 0 && e.flags == 0 && e.eax == 0))
            .map(|e| Raw(*e))
            .collect();
        let msrs = self.save_msrs(&mut skipped)?;
        let vcpu_events = optional(
            &mut skipped,
            "KVM_GET_VCPU_EVENTS",
            missing_cap(caps.vcpu_events, "KVM_CAP_VCPU_EVENTS"),
            || fd.get_vcpu_events().map(Raw),
        )?;

        Ok(KvmVcpuState {
            vcpu_id: self.id,
            cpuid,
            tsc_khz,
            mp_state,
            regs,
            sregs,
            xsave,
            fpu,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
            skipped,
        })
    }

    /// The XSAVE area as 32-bit words: `KVM_GET_XSAVE2` with the `KVM_CAP_XSAVE2` size when
    /// offered (it includes dynamically enabled features beyond 4 KiB), else `KVM_GET_XSAVE`.
    fn get_xsave_words(&self) -> std::result::Result<Vec<u32>, kvm_ioctls::Error> {
        let Some(size) = self.snap.xsave2_size else {
            return self.fd.get_xsave().map(|x| x.region.to_vec());
        };
        let extra = (size - size_of::<kvm_xsave>()).div_ceil(size_of::<u32>());
        let mut xsave = Xsave::new(extra).map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
        // SAFETY: `xsave` holds `size_of::<kvm_xsave>()` + `extra` words, at least the
        // `KVM_CAP_XSAVE2` size this VM reported, which is what KVM_GET_XSAVE2 writes.
        unsafe { self.fd.get_xsave2(&mut xsave) }?;
        let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
        words.extend_from_slice(xsave.as_slice());
        Ok(words)
    }

    /// Reads every MSR of the VM's list that `KVM_GET_MSRS` accepts; the refused ones are
    /// recorded in `skipped`. IA32_TSC_DEADLINE is moved to the end (restored last).
    fn save_msrs(&self, skipped: &mut Vec<SkippedState>) -> Result<Vec<MsrValue>> {
        if let Some(e) = &self.snap.msr_list_error {
            skipped.push(SkippedState {
                item: "KVM_GET_MSR_INDEX_LIST".into(),
                reason: format!("{e}; only the required MSRs are saved"),
            });
        }
        let mut todo: &[u32] = &self.snap.msrs;
        let mut out = Vec::with_capacity(todo.len());
        while !todo.is_empty() {
            let chunk = &todo[..todo.len().min(KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<kvm_msr_entry> =
                chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| Error::Kvm(format!("KVM_GET_MSRS: building kvm_msrs: {e:?}")))?;
            // KVM_GET_MSRS stops at the first MSR it refuses and returns how many it read.
            let n = self.fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
            out.extend(msrs.as_slice()[..n].iter().map(|e| MsrValue { index: e.index, data: e.data }));
            if n < chunk.len() {
                skipped.push(SkippedState {
                    item: format!("MSR {:#x}", chunk[n]),
                    reason: "KVM_GET_MSRS refuses it on this vCPU".into(),
                });
                todo = &todo[n + 1..];
            } else {
                todo = &todo[n..];
            }
        }
        if let Some(pos) = out.iter().position(|m| m.index == MSR_IA32_TSC_DEADLINE) {
            let deadline = out.remove(pos);
            out.push(deadline);
        }
        Ok(out)
    }

    /// Loads `state` (from [`KvmVcpu::save_state`]) into this vCPU, in the order the
    /// [module docs](self) give. Parts that were skipped at save time keep this vCPU's
    /// current values. Meant for a freshly created vCPU with the same id, in a VM created
    /// with the same options whose [`KvmVm::restore_state`] already ran.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] when the vCPU id differs or the state has a LAPIC and this VM no
    /// irqchip; [`Error::Kvm`] naming the ioctl (or the MSR) KVM refused.
    pub fn restore_state(&self, state: &KvmVcpuState) -> Result<()> {
        if state.vcpu_id != self.id {
            return Err(Error::Unsupported(format!(
                "restoring the state of vCPU {} into vCPU {} (APIC ids differ)",
                state.vcpu_id, self.id
            )));
        }
        if state.lapic.is_some() && !self.irqchip {
            return Err(Error::Unsupported("restoring a LAPIC into a VM without in-kernel irqchip".into()));
        }
        let fd = &self.fd;

        let entries: Vec<kvm_cpuid_entry2> = state.cpuid.iter().map(|e| e.0).collect();
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|e| Error::Kvm(format!("KVM_SET_CPUID2: building kvm_cpuid2: {e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;

        if let Some(saved) = state.tsc_khz {
            self.restore_tsc_khz(saved)?;
        }
        if let Some(mp_state) = state.mp_state {
            fd.set_mp_state(kvm_mp_state { mp_state }).map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
        fd.set_regs(&state.regs.0).map_err(kvm_err("KVM_SET_REGS"))?;
        fd.set_sregs(&state.sregs.0).map_err(kvm_err("KVM_SET_SREGS"))?;
        if let Some(words) = &state.xsave {
            self.set_xsave_words(words)?;
        }
        if let Some(fpu) = &state.fpu {
            fd.set_fpu(&fpu.0).map_err(kvm_err("KVM_SET_FPU"))?;
        }
        if let Some(xcrs) = &state.xcrs {
            fd.set_xcrs(&xcrs.0).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        if let Some(debug_regs) = &state.debug_regs {
            fd.set_debug_regs(&debug_regs.0).map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        }
        if let Some(lapic) = &state.lapic {
            fd.set_lapic(&lapic.0).map_err(kvm_err("KVM_SET_LAPIC"))?;
        }
        let (deadline, msrs): (Vec<MsrValue>, Vec<MsrValue>) =
            state.msrs.iter().partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
        self.set_msrs(&msrs)?;
        self.set_msrs(&deadline)?;
        if let Some(events) = &state.vcpu_events {
            fd.set_vcpu_events(&events.0).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }

    /// Sets the guest TSC frequency to `saved` kHz when this host's differs by more than
    /// [`TSC_KHZ_TOLERANCE_PPM`].
    fn restore_tsc_khz(&self, saved: u32) -> Result<()> {
        if !self.snap.get_tsc_khz {
            return Ok(());
        }
        let Ok(current) = self.fd.get_tsc_khz() else {
            return Ok(());
        };
        let diff = u64::from(current.abs_diff(saved));
        if diff * 1_000_000 <= u64::from(saved) * TSC_KHZ_TOLERANCE_PPM {
            return Ok(());
        }
        if !self.snap.tsc_control {
            return Err(Error::Unsupported(format!(
                "the snapshot's TSC runs at {saved} kHz, this host's at {current} kHz, and KVM_CAP_TSC_CONTROL \
                 (KVM_SET_TSC_KHZ) is not offered"
            )));
        }
        self.fd.set_tsc_khz(saved).map_err(|e| Error::Kvm(format!("KVM_SET_TSC_KHZ {saved}: {e}")))
    }

    /// `KVM_SET_XSAVE` from saved words, padded with zeros to this VM's `KVM_CAP_XSAVE2`
    /// size (KVM reads that many bytes).
    fn set_xsave_words(&self, words: &[u32]) -> Result<()> {
        const REGION: usize = size_of::<kvm_xsave>() / size_of::<u32>();
        let needed = self.snap.xsave2_size.unwrap_or(size_of::<kvm_xsave>()).div_ceil(size_of::<u32>());
        if words.len() > needed.max(REGION) {
            return Err(Error::Unsupported(format!(
                "KVM_SET_XSAVE: the saved XSAVE area ({} bytes) is larger than this host's ({} bytes)",
                words.len() * 4,
                needed * 4
            )));
        }
        let extra = needed.max(REGION) - REGION;
        let mut xsave =
            Xsave::new(extra).map_err(|e| Error::Kvm(format!("KVM_SET_XSAVE: building kvm_xsave: {e:?}")))?;
        // SAFETY: the reference is only used to write `xsave.region`, never the `len` field
        // that `FamStructWrapper` relies on (the one requirement of `as_mut_fam_struct`).
        let fam = unsafe { xsave.as_mut_fam_struct() };
        let head = words.len().min(REGION);
        fam.xsave.region[..head].copy_from_slice(&words[..head]);
        if words.len() > REGION {
            xsave.as_mut_slice()[..words.len() - REGION].copy_from_slice(&words[REGION..]);
        }
        // SAFETY: the buffer holds `REGION + extra` words, at least the KVM_CAP_XSAVE2 size
        // of this VM (or 4 KiB without it), which is all KVM_SET_XSAVE reads.
        unsafe { self.fd.set_xsave2(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))
    }

    /// `KVM_SET_MSRS` for `msrs` (in chunks KVM accepts). An MSR KVM refuses is only
    /// accepted when this vCPU already holds the saved value (e.g. the async-PF interrupt
    /// MSR, which KVM will not write, even with 0, on a vCPU without in-kernel LAPIC).
    fn set_msrs(&self, msrs: &[MsrValue]) -> Result<()> {
        let mut todo = msrs;
        while !todo.is_empty() {
            let chunk = &todo[..todo.len().min(KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<kvm_msr_entry> =
                chunk.iter().map(|m| kvm_msr_entry { index: m.index, data: m.data, ..Default::default() }).collect();
            let kvm_msrs = Msrs::from_entries(&entries)
                .map_err(|e| Error::Kvm(format!("KVM_SET_MSRS: building kvm_msrs: {e:?}")))?;
            // KVM_SET_MSRS stops at the first MSR it refuses and returns how many it set.
            let n = self.fd.set_msrs(&kvm_msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
            if n == chunk.len() {
                todo = &todo[n..];
                continue;
            }
            let refused = chunk[n];
            if self.get_msr(refused.index) != Some(refused.data) {
                return Err(Error::Kvm(format!(
                    "KVM_SET_MSRS: MSR {:#x} = {:#x} refused ({n} of {} set)",
                    refused.index,
                    refused.data,
                    chunk.len()
                )));
            }
            todo = &todo[n + 1..];
        }
        Ok(())
    }

    /// MSR `index` of this vCPU, if `KVM_GET_MSRS` reads it.
    fn get_msr(&self, index: u32) -> Option<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).ok()?;
        match self.fd.get_msrs(&mut msrs) {
            Ok(1) => Some(msrs.as_slice()[0].data),
            _ => None,
        }
    }
}

impl KvmVm {
    /// Saves the VM-wide KVM state: the in-kernel PIC pair and I/O APIC, the PIT and
    /// kvmclock (see the [module docs](self)). Guest RAM and the vCPUs are saved separately.
    ///
    /// # Errors
    ///
    /// [`Error::Kvm`] naming the ioctl that failed for a reason other than "unsupported".
    pub fn save_state(&self) -> Result<KvmVmState> {
        let caps = &*self.snap;
        let mut skipped = Vec::new();
        let no_chip = || (!self.irqchip).then(|| "the VM has no in-kernel irqchip (KvmVmOptions::irqchip)".to_string());
        let chip = |skipped: &mut Vec<SkippedState>, id: u32, ioctl: &str| {
            optional(skipped, ioctl, no_chip(), || {
                let mut chip = kvm_irqchip { chip_id: id, ..Default::default() };
                self.vm.get_irqchip(&mut chip).map(|()| Raw(chip))
            })
        };
        let pic_master = chip(&mut skipped, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?;
        let pic_slave = chip(&mut skipped, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?;
        let ioapic = chip(&mut skipped, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?;
        let pit_missing = no_chip().or_else(|| missing_cap(caps.pit_state2, "KVM_CAP_PIT_STATE2"));
        let pit = optional(&mut skipped, "KVM_GET_PIT2", pit_missing, || self.vm.get_pit2().map(Raw))?;
        let clock =
            optional(&mut skipped, "KVM_GET_CLOCK", missing_cap(caps.adjust_clock, "KVM_CAP_ADJUST_CLOCK"), || {
                self.vm.get_clock().map(Raw)
            })?;
        Ok(KvmVmState { irqchip: self.irqchip, pic_master, pic_slave, ioapic, pit, clock, skipped })
    }

    /// Loads `state` (from [`KvmVm::save_state`]) into this VM: PIC master, PIC slave,
    /// I/O APIC, PIT, kvmclock. Call it before restoring the vCPUs. The kvmclock continues
    /// from the saved value: all of `KVM_GET_CLOCK`'s flags are dropped, so in particular
    /// `KVM_CLOCK_REALTIME` does not advance it by the wall time the snapshot spent stored.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] when the state and this VM differ in having the irqchip;
    /// [`Error::Kvm`] naming the ioctl KVM refused.
    pub fn restore_state(&self, state: &KvmVmState) -> Result<()> {
        if state.irqchip != self.irqchip {
            return Err(Error::Unsupported(format!(
                "restoring a VM state with irqchip = {} into a VM with irqchip = {}",
                state.irqchip, self.irqchip
            )));
        }
        for (chip, name) in [
            (&state.pic_master, "KVM_SET_IRQCHIP (PIC master)"),
            (&state.pic_slave, "KVM_SET_IRQCHIP (PIC slave)"),
            (&state.ioapic, "KVM_SET_IRQCHIP (IOAPIC)"),
        ] {
            if let Some(chip) = chip {
                self.vm.set_irqchip(&chip.0).map_err(kvm_err(name))?;
            }
        }
        if let Some(pit) = &state.pit {
            self.vm.set_pit2(&pit.0).map_err(kvm_err("KVM_SET_PIT2"))?;
        }
        if let Some(clock) = &state.clock {
            let clock = kvm_clock_data { clock: clock.0.clock, ..Default::default() };
            self.vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kvm-bindings' impls serialize a [`Raw`] as its byte image, as serde `bytes` (the form
    /// "kvm/1" states always had), and read that form back.
    #[test]
    fn raw_serializes_as_byte_image() {
        let chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
        let raw = Raw(chip);
        let json = serde_json::to_string(&raw).unwrap();
        assert_eq!(json, serde_json::to_string(&raw.as_bytes().to_vec()).unwrap());
        assert_eq!(serde_json::from_str::<Raw<kvm_irqchip>>(&json).unwrap(), raw);
        assert_eq!(Raw::<kvm_irqchip>::from_bytes(raw.as_bytes()), Some(raw));
        assert_eq!(Raw::<kvm_irqchip>::from_bytes(&raw.as_bytes()[1..]), None);
    }

    /// [`RawFpu`]'s image follows the kernel ABI offsets of `kvm_fpu`, and its serialized
    /// form is that image as serde `bytes`, of exactly 416 bytes.
    #[test]
    fn fpu_byte_image() {
        let mut fpu = kvm_fpu {
            fcw: 0x037f,
            fsw: 0x1234,
            ftwx: 0xaa,
            pad1: 0x55,
            last_opcode: 0x0102,
            last_ip: 0x1122_3344_5566_7788,
            last_dp: u64::MAX - 1,
            mxcsr: 0x1f80,
            pad2: 7,
            ..Default::default()
        };
        fpu.fpr[0][0] = 1;
        fpu.fpr[7][15] = 2;
        fpu.xmm[0][0] = 3;
        fpu.xmm[15][15] = 4;
        let raw = RawFpu(fpu);
        let bytes = raw.to_bytes();
        assert_eq!(bytes.len(), size_of::<kvm_fpu>());
        assert_eq!((bytes[0], bytes[127]), (1, 2));
        assert_eq!(bytes[128..130], 0x037f_u16.to_ne_bytes());
        assert_eq!(bytes[130..132], 0x1234_u16.to_ne_bytes());
        assert_eq!((bytes[132], bytes[133]), (0xaa, 0x55));
        assert_eq!(bytes[134..136], 0x0102_u16.to_ne_bytes());
        assert_eq!(bytes[136..144], 0x1122_3344_5566_7788_u64.to_ne_bytes());
        assert_eq!(bytes[144..152], (u64::MAX - 1).to_ne_bytes());
        assert_eq!((bytes[152], bytes[407]), (3, 4));
        assert_eq!(bytes[408..412], 0x1f80_u32.to_ne_bytes());
        assert_eq!(bytes[412..416], 7_u32.to_ne_bytes());
        assert_eq!(RawFpu::from_bytes(&bytes), Some(raw));
        assert_eq!(RawFpu::from_bytes(&bytes[1..]), None);
        let json = serde_json::to_string(&raw).unwrap();
        assert_eq!(json, serde_json::to_string(&bytes).unwrap());
        assert_eq!(serde_json::from_str::<RawFpu>(&json).unwrap(), raw);
        assert!(serde_json::from_str::<RawFpu>(&serde_json::to_string(&bytes[1..]).unwrap()).is_err());
    }
}
