//! The engine itself: [`Hypervisor`], and choosing one for this host ([`select`]).

use std::sync::Arc;

use crate::{emu, kvm, Error, Result, Vm, VmSpec};

/// One accelerator on this host: makes [`Vm`]s.
pub trait Hypervisor: Send + Sync {
    /// The accelerator's name for the user and for logs: "kvm" or "emu" (what
    /// [`Choice`]'s `FromStr` accepts for it).
    fn name(&self) -> &'static str;

    /// The most vCPUs one VM of this engine can run (at least 1).
    fn max_vcpus(&self) -> u8;

    /// Creates a VM over `spec.ram` with its interrupt controllers; no vCPUs yet.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] for a RAM region the engine cannot map (empty, unaligned);
    /// the engine's error naming what failed (for KVM, the ioctl).
    fn create_vm(&self, spec: &VmSpec<'_>) -> Result<Arc<dyn Vm>>;
}

/// Which accelerator the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Choice {
    /// KVM where it can run a stock guest kernel, the emulator otherwise.
    Auto,
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// rustvisor's x86-64 emulator.
    Emu,
}

impl std::str::FromStr for Choice {
    type Err = String;

    /// Parses "auto", "kvm" or "emu"; the error names the accepted values.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Choice::Auto),
            "kvm" => Ok(Choice::Kvm),
            "emu" => Ok(Choice::Emu),
            _ => Err(format!("unknown accelerator '{s}' (accepted: auto, kvm, emu)")),
        }
    }
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Choice::Auto => "auto",
            Choice::Kvm => "kvm",
            Choice::Emu => "emu",
        })
    }
}

/// Host policy for [`select`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SelectOptions {
    /// Let an explicit `kvm` run on a PVM host ([`kvm::is_pvm_host`]), which runs small
    /// hand-made guests but not a stock Linux kernel (tests use it). `auto` never picks KVM
    /// there.
    pub allow_kvm_on_pvm: bool,
}

/// The result of [`select`].
pub struct Selection {
    /// The engine.
    pub hypervisor: Box<dyn Hypervisor>,
    /// Why it was chosen, for the log: "kvm: requested", "emu: /dev/kvm is not available", ...
    pub reason: String,
}

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selection").field("hypervisor", &self.hypervisor.name()).field("reason", &self.reason).finish()
    }
}

/// Picks the accelerator for `choice` on this host: `emu` always works; `kvm` needs a
/// usable `/dev/kvm` (opens, creates a VM) that is not the PVM backend unless
/// `options.allow_kvm_on_pvm`; `auto` is `kvm` where that holds and `emu` otherwise.
///
/// # Errors
///
/// [`Error::Unavailable`] when `kvm` was asked for and cannot run here; the message says why
/// and names the accepted values.
pub fn select(choice: Choice, options: SelectOptions) -> Result<Selection> {
    let emu = |reason: &str| Selection { hypervisor: Box::new(emu::EmuHypervisor), reason: format!("emu: {reason}") };
    match choice {
        Choice::Emu => Ok(emu("requested")),
        Choice::Kvm => {
            if !kvm::available() {
                return Err(Error::Unavailable(
                    "kvm: /dev/kvm is not usable on this host (accepted here: emu, auto)".into(),
                ));
            }
            if kvm::is_pvm_host() && !options.allow_kvm_on_pvm {
                return Err(Error::Unavailable(
                    "kvm: this host's KVM is the PVM backend (no VT-x/AMD-V), which cannot run a stock Linux \
                     kernel (accepted here: emu, auto)"
                        .into(),
                ));
            }
            Ok(Selection { hypervisor: Box::new(kvm::KvmHypervisor::new()?), reason: "kvm: requested".into() })
        }
        Choice::Auto => {
            let pvm = kvm::is_pvm_host();
            if !pvm && kvm::available() {
                let hypervisor = Box::new(kvm::KvmHypervisor::new()?);
                Ok(Selection { hypervisor, reason: "kvm: /dev/kvm with hardware virtualization".into() })
            } else if pvm {
                Ok(emu("/dev/kvm is the PVM backend, which cannot run a stock kernel"))
            } else {
                Ok(emu("/dev/kvm is not available"))
            }
        }
    }
}

/// The accelerators `auto` or an explicit choice can run a stock guest on, on this host, in
/// order of preference: `["kvm", "emu"]` or `["emu"]`.
pub fn usable_engines() -> Vec<&'static str> {
    let mut names = Vec::new();
    if kvm::available() && !kvm::is_pvm_host() {
        names.push("kvm");
    }
    names.push("emu");
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_names_round_trip_and_errors_name_the_accepted_values() {
        for c in [Choice::Auto, Choice::Kvm, Choice::Emu] {
            assert_eq!(c.to_string().parse::<Choice>(), Ok(c));
        }
        let e = "hvf".parse::<Choice>().unwrap_err();
        assert!(e.contains("'hvf'") && e.contains("auto, kvm, emu"), "{e}");
    }

    #[test]
    fn selection_names_the_engine_and_why() {
        let s = select(Choice::Emu, SelectOptions::default()).unwrap();
        assert_eq!((s.hypervisor.name(), s.reason.as_str()), ("emu", "emu: requested"));
        let auto = select(Choice::Auto, SelectOptions::default()).unwrap();
        assert_eq!(auto.hypervisor.name(), usable_engines()[0], "{auto:?}");
        assert!(auto.reason.starts_with(auto.hypervisor.name()), "{auto:?}");
        match select(Choice::Kvm, SelectOptions::default()) {
            Ok(s) => assert_eq!(s.hypervisor.name(), "kvm"),
            Err(Error::Unavailable(m)) => assert!(m.contains("accepted here: emu, auto"), "{m}"),
            Err(e) => panic!("{e}"),
        }
        // The engine a choice selects parses back to that choice.
        assert_eq!(s.hypervisor.name().parse::<Choice>(), Ok(Choice::Emu));
    }
}
