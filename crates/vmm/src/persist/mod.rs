//! The persist layer: VM snapshots. A snapshot is a folder with `snapshot.json` (a versioned
//! header, a SHA-256 of the state and the state itself: VM configuration, vCPUs, the
//! accelerator's VM state, legacy devices, virtio transports, guest clock) and `memory.bin`
//! (guest RAM, sparse: see [`memory`]).
//!
//! The on-disk types are this module's own ([`VmState`], which holds the VMM's typed
//! [`VmConfig`], not the REST wire type), versioned by [`VERSION`]; errors are [`Error`], which
//! names the file and field. Mapping them to HTTP is the controller's business, not this
//! module's.
//!
//! A snapshot is taken from a paused VM. Virtio devices are quiesced first (every request in
//! flight completes), so each queue's next available and next used index equal its used
//! ring's index, which the restored device reads back from guest memory. Disk images are not
//! copied: they must be the same files (as with Firecracker). They are flushed (data and
//! metadata caches written and fsynced), so a copy of them taken while the VM stays paused
//! after the snapshot is consistent with it (the host manager's snapshots do that). vsock
//! connections are closed.

pub mod memory;

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::VmConfig;
use crate::vm::Vm;
use memory::MemoryImage;

/// Why a snapshot could not be saved or restored. Every variant names the file, field or
/// device concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A snapshot file could not be opened or read (missing, not a regular file, too large,
    /// unreadable).
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// A snapshot file is not a valid snapshot: wrong format or version, checksum mismatch,
    /// a malformed or out-of-range field (the message starts with the field's name).
    #[error("{}: {msg}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what is accepted.
        msg: String,
    },
    /// A device or vCPU refused its saved state.
    #[error("snapshot corrupt: {what}: {source}")]
    Corrupt {
        /// The part ("vcpu", "disk0", "accelerator VM state", ...).
        what: String,
        /// Why it was refused (the device's or accelerator's error).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The snapshot has a different number of devices or vCPUs than its configuration builds.
    #[error("snapshot corrupt: {what}: {snapshot} in the snapshot, {vm} in the VM")]
    Mismatch {
        /// "virtio devices" or "vcpus".
        what: &'static str,
        /// How many the snapshot has.
        snapshot: usize,
        /// How many the VM has.
        vm: usize,
    },
    /// The destination folder cannot take a snapshot (exists and is not empty, cannot be
    /// created).
    #[error("{}: {msg}", path.display())]
    Destination {
        /// The folder.
        path: PathBuf,
        /// What is wrong, and what is accepted.
        msg: String,
    },
    /// Writing the snapshot failed.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// Saving a part of the VM's state failed.
    #[error("saving {what}: {msg}")]
    Save {
        /// The part.
        what: &'static str,
        /// Why.
        msg: String,
    },
    /// This host cannot run the snapshot's accelerator.
    #[error("{accelerator} snapshot: {source}")]
    Accelerator {
        /// The accelerator that saved the snapshot.
        accelerator: String,
        /// Why it cannot run here.
        #[source]
        source: crate::Error,
    },
    /// Building the VM from the snapshot's configuration failed (a disk that cannot be
    /// opened, guest memory that cannot be allocated, ...).
    #[error(transparent)]
    Vm(#[from] crate::Error),
}

/// `format` of `snapshot.json`.
pub const FORMAT: &str = "rustvisor-snapshot";
/// Current snapshot version (2: the accelerator's VM state is one opaque, versioned
/// `accel::VmState` instead of per-engine fields; 3: the configuration's `balloon` and
/// `memory_options`, and the balloon's state).
pub const VERSION: u32 = 3;
const STATE_FILE: &str = "snapshot.json";
const MEMORY_FILE: &str = "memory.bin";
/// Largest `snapshot.json` read, in bytes: the state is small (a few KiB per vCPU and device)
/// except for the memory runs list (at most ~40 bytes per run), so this covers guests of
/// hundreds of GiB while bounding what a file can make the VMM allocate.
pub const MAX_STATE_BYTES: u64 = 64 << 20;
/// Latest guest clock a snapshot may carry, in ns (about 146 years): far beyond any real
/// uptime, and far enough below `u64::MAX` that timer arithmetic cannot saturate.
pub const MAX_CLOCK_NS: u64 = 1 << 62;

/// Everything but guest memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The VM configuration.
    pub config: VmConfig,
    /// The accelerator's name ("emu", "kvm"), for the user; restore goes by `vm`.
    pub accelerator: String,
    /// Guest clock, ns.
    pub clock_ns: u64,
    /// vCPUs, boot vCPU first.
    pub vcpus: Vec<accel::VcpuSnapshot>,
    /// The accelerator's VM-level state (interrupt controllers, timers, clocks), which also
    /// names the accelerator that saved it.
    pub vm: accel::VmState,
    /// 8250.
    pub serial: devices::serial::SerialSnapshot,
    /// i8042.
    pub i8042: devices::i8042::I8042State,
    /// CMOS/RTC.
    pub cmos: devices::cmos::CmosState,
    /// ACPI PM1.
    pub pm: devices::acpi_pm::AcpiPmState,
    /// PCI CONFIG_ADDRESS latch.
    pub pci_config_address: u32,
    /// Virtio transports in slot order.
    pub virtio: Vec<virtio::pci::VirtioPciState>,
    /// The balloon's target and the guest's last account of it, when the VM has a balloon.
    pub balloon: Option<virtio::balloon::BalloonState>,
    /// Guest memory file.
    pub memory: MemoryImage,
}

/// First line of `snapshot.json`; the state's JSON follows on the next line. (Two parts
/// rather than one document because the state holds 128-bit values, which a generic JSON
/// value cannot carry, and the digest covers the state's exact bytes.)
#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    /// Hex SHA-256 of the state line.
    sha256: String,
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Write { path: path.to_path_buf(), source }
}

fn hex_sha(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// Saves paused `vm`, built from `cfg`, into `dir` (created if absent; must be empty).
///
/// Errors: [`Error::Destination`] for a folder that exists and is not empty or cannot be
/// created, [`Error::Write`] and [`Error::Save`] otherwise.
pub fn save(vm: &Vm, cfg: &VmConfig, dir: &Path) -> Result<(), Error> {
    let dest = |m: String| Error::Destination { path: dir.to_path_buf(), msg: m };
    if dir.exists() {
        let empty = std::fs::read_dir(dir).map_err(|e| dest(e.to_string()))?.next().is_none();
        if !empty {
            return Err(dest("not empty (accepted: an empty or new folder)".into()));
        }
    } else {
        std::fs::create_dir_all(dir).map_err(|e| dest(e.to_string()))?;
    }
    let vcpus = vm.control().save_vcpus().map_err(|e| Error::Save { what: "vcpus", msg: e.to_string() })?;
    let mut transports = Vec::new();
    let mut quiesced = Ok(());
    for d in &vm.virtio {
        let mut t = d.dev.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = t.quiesce(virtio::pci::QUIESCE_TIMEOUT) {
            quiesced = Err(Error::Save { what: "virtio devices (quiesce)", msg: format!("{}: {e}", d.name) });
            break;
        }
        if let Err(e) = t.flush_backend() {
            quiesced = Err(Error::Save { what: "virtio devices (flush)", msg: format!("{}: {e}", d.name) });
            break;
        }
        transports.push(t.save_state());
    }
    let result = (|| {
        quiesced?;
        let l = &vm.devices;
        let state = VmState {
            config: cfg.clone(),
            accelerator: vm.accelerator().into(),
            clock_ns: vm.clock.now(),
            vcpus,
            vm: vm
                .accel()
                .save_state()
                .map_err(|e| Error::Save { what: "accelerator VM state", msg: e.to_string() })?,
            serial: l.serial.lock().unwrap_or_else(|e| e.into_inner()).state(),
            i8042: l.i8042.lock().unwrap_or_else(|e| e.into_inner()).state(),
            cmos: l.cmos.lock().unwrap_or_else(|e| e.into_inner()).state(),
            pm: l.pm.lock().unwrap_or_else(|e| e.into_inner()).state(),
            pci_config_address: l.pci.lock().unwrap_or_else(|e| e.into_inner()).config_address(),
            virtio: transports,
            balloon: vm.balloon.as_ref().map(virtio::balloon::BalloonHandle::state),
            memory: memory::save(vm.memory(), &dir.join(MEMORY_FILE), MEMORY_FILE)?,
        };
        let bytes = serde_json::to_vec(&state).map_err(|e| Error::Save { what: "state", msg: e.to_string() })?;
        let header = Header { format: FORMAT.into(), version: VERSION, sha256: hex_sha(&bytes) };
        let mut out = serde_json::to_vec(&header).map_err(|e| Error::Save { what: "header", msg: e.to_string() })?;
        out.push(b'\n');
        out.extend_from_slice(&bytes);
        out.push(b'\n');
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(write_err(&tmp))?;
        std::io::Write::write_all(&mut f, &out).map_err(write_err(&tmp))?;
        f.sync_all().map_err(write_err(&tmp))?;
        let path = dir.join(STATE_FILE);
        std::fs::rename(&tmp, &path).map_err(write_err(&path))?;
        Ok(())
    })();
    // The VM stays paused; its devices serve their queues again.
    for d in &vm.virtio {
        d.dev.lock().unwrap_or_else(|e| e.into_inner()).resume_device();
    }
    result
}

/// Reads and checks `dir`'s state (nothing in `dir` is modified).
///
/// Errors: [`Error::Read`] for a missing, non-regular, oversize or unreadable file,
/// [`Error::Invalid`] naming what is wrong with it.
pub fn read_state(dir: &Path) -> Result<VmState, Error> {
    let path = dir.join(STATE_FILE);
    let src = |m: String| Error::Invalid { path: path.clone(), msg: m };
    let text = crate::host_files::read_bounded(&path, MAX_STATE_BYTES)
        .map_err(|source| Error::Read { path: path.clone(), source })?;
    let nl = text.iter().position(|&b| b == b'\n').unwrap_or(text.len());
    let (head, rest) = text.split_at(nl);
    let header: Header = serde_json::from_slice(head).map_err(|e| src(format!("not a snapshot header: {e}")))?;
    if header.format != FORMAT {
        return Err(src(format!("format '{}' (accepted: {FORMAT})", header.format)));
    }
    if header.version != VERSION {
        return Err(src(format!("version {} (accepted: {VERSION})", header.version)));
    }
    let body = rest.strip_prefix(b"\n").unwrap_or(rest);
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    if hex_sha(body) != header.sha256 {
        return Err(src("checksum mismatch (the snapshot is corrupt)".into()));
    }
    // The path of the offending field (e.g. `vm.emu/1.irqchip`) goes into the message.
    let st: VmState = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(body))
        .map_err(|e| src(format!("state: {}: {}", e.path(), e.inner())))?;
    st.validate().map_err(src)?;
    Ok(st)
}

impl VmState {
    /// Checks what serde cannot: fields that would make the restored guest freeze or reach
    /// outside the snapshot folder. Returns a message starting with the field's name.
    fn validate(&self) -> Result<(), String> {
        let file = &self.memory.file;
        let plain_name = !file.is_empty() && file != "." && file != ".." && !file.contains(['/', '\0']);
        if !plain_name {
            return Err(format!("memory.file {file:?} (accepted: a file name inside the snapshot folder)"));
        }
        let timers = self.vm.earliest_clock_ns();
        if self.clock_ns > MAX_CLOCK_NS || self.clock_ns < timers {
            return Err(format!(
                "clock_ns {} (accepted: {timers} (the timers' latest reading) to {MAX_CLOCK_NS})",
                self.clock_ns
            ));
        }
        if self.memory.runs.len() as u64 > self.memory.size / 4096 {
            return Err(format!("memory.runs: {} runs for {} bytes of RAM", self.memory.runs.len(), self.memory.size));
        }
        if let Some(b) = &self.balloon {
            let pages = self.config.memory_bytes() / virtio::balloon::PAGE_SIZE;
            if u64::from(b.target_pages) > pages {
                return Err(format!(
                    "balloon.target_pages {} (accepted: 0 to {pages}, the guest's RAM in 4 KiB pages)",
                    b.target_pages
                ));
            }
        }
        if self.balloon.is_some() != self.config.balloon.is_some() {
            return Err(format!(
                "balloon: {} in the state, but the configuration {} one",
                if self.balloon.is_some() { "present" } else { "absent" },
                if self.config.balloon.is_some() { "has" } else { "has no" }
            ));
        }
        Ok(())
    }
}

/// Builds a paused VM from the snapshot in `dir`; returns it with its configuration.
///
/// Errors: [`Error::Read`] / [`Error::Invalid`] for a missing or bad snapshot file,
/// [`Error::Accelerator`] when this host cannot run the snapshot's accelerator,
/// [`Error::Corrupt`] when a device or vCPU refuses its state, [`Error::Vm`] when the VM
/// cannot be built (a disk that cannot be opened, ...).
pub fn restore(dir: &Path) -> Result<(Vm, VmConfig), Error> {
    let st = read_state(dir)?;
    let mut cfg = st.config.clone();
    // The accelerator that saved the VM state runs it again.
    cfg.accel = crate::config::accel_of(st.vm.engine());
    crate::config::validate(&cfg)?;
    // The same accelerator checks as a boot (a kvm snapshot needs a usable /dev/kvm).
    let selection = crate::vm::choose_accel(cfg.accel)
        .map_err(|source| Error::Accelerator { accelerator: st.accelerator.clone(), source })?;
    let hv = selection.hypervisor.as_ref();
    let mem = crate::memory::create(cfg.memory_bytes(), &cfg.memory_options)?;
    // `validate` made `memory.file` a plain name: the file is inside `dir`.
    memory::load(&mem, &dir.join(&st.memory.file), &st.memory)?;
    let note = format!("{}: restored from {}", hv.name(), dir.display());
    let mut vm = Vm::build(&cfg, mem, hv, note)?;
    fn corrupt(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Corrupt { what: what.to_string(), source: Box::new(e) }
    }
    vm.accel().restore_state(&st.vm).map_err(|e| corrupt("accelerator VM state", e))?;
    {
        let l = &vm.devices;
        l.serial.lock().unwrap_or_else(|e| e.into_inner()).restore(&st.serial).map_err(|e| corrupt("serial", e))?;
        l.i8042.lock().unwrap_or_else(|e| e.into_inner()).restore(&st.i8042).map_err(|e| corrupt("i8042", e))?;
        l.cmos.lock().unwrap_or_else(|e| e.into_inner()).restore(&st.cmos).map_err(|e| corrupt("cmos", e))?;
        l.pm.lock().unwrap_or_else(|e| e.into_inner()).restore(&st.pm).map_err(|e| corrupt("acpi pm", e))?;
        l.pci.lock().unwrap_or_else(|e| e.into_inner()).set_config_address(st.pci_config_address);
    }
    if st.virtio.len() != vm.virtio.len() {
        return Err(Error::Mismatch { what: "virtio devices", snapshot: st.virtio.len(), vm: vm.virtio.len() });
    }
    // The balloon's target and the guest's account, before its device resumes.
    if let (Some(h), Some(s)) = (&vm.balloon, &st.balloon) {
        h.restore_state(s);
    }
    for (d, s) in vm.virtio.iter().zip(&st.virtio) {
        let mut t = d.dev.lock().unwrap_or_else(|e| e.into_inner());
        t.restore_state(s).map_err(|e| corrupt(&d.name, e))?;
        t.resume_device();
    }
    if st.vcpus.len() != vm.vcpu_count() {
        return Err(Error::Mismatch { what: "vcpus", snapshot: st.vcpus.len(), vm: vm.vcpu_count() });
    }
    for (v, s) in vm.vcpus_mut().zip(&st.vcpus) {
        v.restore_snapshot(s).map_err(|e| corrupt("vcpu", e))?;
    }
    vm.clock.set(st.clock_ns);
    vm.start_paused()?;
    Ok((vm, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration with every field set, as a snapshot stores it.
    const FULL_CONFIG: &str = r#"{"kernel":"/k","initrd":"/i","cmdline":"console=ttyS0","memory_mib":512,"cpus":1,"accel":"emu","serial":"file=/s.log","console":"null","disks":[{"path":"/d","format":"qcow2","readonly":true,"serial":"s1","allow_backing_outside":true,"allow_data_file":false}],"nets":[{"tap":"t0","mac":"52:54:00:12:34:56"}],"vsock":{"cid":3,"socket":"/v.sock"},"rng":true,"balloon":{"deflate_on_oom":false,"stats_interval_s":10,"free_page_reporting":true},"memory_options":{"mergeable":true,"hugepages":false,"thp":true}}"#;

    /// Snapshots embed the shared typed `VmConfig`, so its serialised shape is part of the
    /// on-disk format: this pins it to [`VERSION`]. If it fails, the shape changed: bump
    /// `VERSION` (old snapshots are then refused by version, not misread) and update both.
    #[test]
    fn config_shape_is_pinned_to_the_format_version() {
        let cfg: VmConfig = serde_json::from_str(FULL_CONFIG).unwrap();
        let again = serde_json::to_string(&cfg).unwrap();
        assert_eq!((VERSION, again.as_str()), (3, FULL_CONFIG));
    }
}
