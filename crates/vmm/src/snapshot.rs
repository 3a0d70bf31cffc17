//! VM snapshots: a folder with `snapshot.json` (a versioned header, a SHA-256 of the state
//! and the state itself: VM configuration, vCPUs, interrupt controllers and timers, legacy
//! devices, virtio transports, guest clock) and `memory.bin` (guest RAM, sparse: see
//! [`crate::snapshot_memory`]).
//!
//! A snapshot is taken from a paused VM. Virtio devices are quiesced first (every request in
//! flight completes), so each queue's next available and next used index equal its used
//! ring's index, which the restored device reads back from guest memory. Disk images are not
//! copied: they must be the same files (as with Firecracker). vsock connections are closed.

use std::path::Path;

use api::types;
use api::ApiError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::VmConfig;
use crate::snapshot_memory::{self, MemoryImage};
use crate::vm::Vm;

/// `format` of `snapshot.json`.
pub const FORMAT: &str = "rustvisor-snapshot";
/// Current snapshot version (2: the accelerator's VM state is one opaque, versioned
/// `accel::VmState` instead of per-engine fields).
pub const VERSION: u32 = 2;
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
    /// The VM configuration (API form).
    pub config: types::VmConfig,
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

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

fn hex_sha(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// Saves paused `vm` into `dir` (created if absent; must be empty).
///
/// Errors: `BadRequest` (field `destination_url`) for a folder that exists and is not empty,
/// `Internal` for I/O or state errors.
pub fn save(vm: &Vm, _cfg: &VmConfig, json: &types::VmConfig, dir: &Path) -> Result<(), ApiError> {
    let dest = |m: String| ApiError::BadRequest { field: "destination_url".into(), msg: m };
    if dir.exists() {
        let empty = std::fs::read_dir(dir).map_err(|e| dest(format!("{}: {e}", dir.display())))?.next().is_none();
        if !empty {
            return Err(dest(format!("{} is not empty (accepted: an empty or new folder)", dir.display())));
        }
    } else {
        std::fs::create_dir_all(dir).map_err(|e| dest(format!("{}: {e}", dir.display())))?;
    }
    let vcpus = vm.control().save_vcpus().map_err(internal)?;
    let mut transports = Vec::new();
    for d in &vm.virtio {
        let mut t = d.dev.lock().unwrap_or_else(|e| e.into_inner());
        t.quiesce();
        transports.push(t.save_state());
    }
    let result = (|| {
        let l = &vm.devices;
        let state = VmState {
            config: json.clone(),
            accelerator: vm.accelerator().into(),
            clock_ns: vm.clock.now(),
            vcpus,
            vm: vm.accel().save_state().map_err(internal)?,
            serial: l.serial.lock().unwrap_or_else(|e| e.into_inner()).state(),
            i8042: l.i8042.lock().unwrap_or_else(|e| e.into_inner()).state(),
            cmos: l.cmos.lock().unwrap_or_else(|e| e.into_inner()).state(),
            pm: l.pm.lock().unwrap_or_else(|e| e.into_inner()).state(),
            pci_config_address: l.pci.lock().unwrap_or_else(|e| e.into_inner()).config_address(),
            virtio: transports,
            memory: snapshot_memory::save(vm.memory(), &dir.join(MEMORY_FILE), MEMORY_FILE).map_err(internal)?,
        };
        let bytes = serde_json::to_vec(&state).map_err(internal)?;
        let header = Header { format: FORMAT.into(), version: VERSION, sha256: hex_sha(&bytes) };
        let mut out = serde_json::to_vec(&header).map_err(internal)?;
        out.push(b'\n');
        out.extend_from_slice(&bytes);
        out.push(b'\n');
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(internal)?;
        std::io::Write::write_all(&mut f, &out).map_err(internal)?;
        f.sync_all().map_err(internal)?;
        std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(internal)?;
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
/// Errors: `BadRequest` (field `source_url`) naming the missing or corrupt file.
pub fn read_state(dir: &Path) -> Result<VmState, ApiError> {
    let src = |m: String| ApiError::BadRequest { field: "source_url".into(), msg: m };
    let path = dir.join(STATE_FILE);
    let text =
        crate::host_files::read_bounded(&path, MAX_STATE_BYTES).map_err(|e| src(format!("{}: {e}", path.display())))?;
    let nl = text.iter().position(|&b| b == b'\n').unwrap_or(text.len());
    let (head, rest) = text.split_at(nl);
    let header: Header =
        serde_json::from_slice(head).map_err(|e| src(format!("{}: not a snapshot header: {e}", path.display())))?;
    if header.format != FORMAT {
        return Err(src(format!("{}: format '{}' (accepted: {FORMAT})", path.display(), header.format)));
    }
    if header.version != VERSION {
        return Err(src(format!("{}: version {} (accepted: {VERSION})", path.display(), header.version)));
    }
    let body = rest.strip_prefix(b"\n").unwrap_or(rest);
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    if hex_sha(body) != header.sha256 {
        return Err(src(format!("{}: checksum mismatch (the snapshot is corrupt)", path.display())));
    }
    // The path of the offending field (e.g. `vm.emu/1.irqchip`) goes into the message.
    let st: VmState = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(body))
        .map_err(|e| src(format!("{}: state: {}: {}", path.display(), e.path(), e.inner())))?;
    st.validate().map_err(|m| src(format!("{}: {m}", path.display())))?;
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
        Ok(())
    }
}

/// Builds a paused VM from the snapshot in `dir`.
///
/// Errors: `BadRequest` for a missing or corrupt snapshot or one this host cannot run
/// (field `source_url`), or for devices that cannot be opened (their field); `Internal`
/// otherwise.
pub fn restore(dir: &Path) -> Result<(Vm, VmConfig, types::VmConfig), ApiError> {
    let src = |m: String| ApiError::BadRequest { field: "source_url".into(), msg: m };
    let st = read_state(dir)?;
    let mut cfg = crate::controller::config_from_api(&st.config)?;
    // The accelerator that saved the VM state runs it again.
    cfg.accel = st.vm.engine();
    cfg.validate().map_err(crate::controller::api_error)?;
    // The same accelerator checks as a boot (a kvm snapshot needs a usable /dev/kvm).
    let selection = crate::vm::choose_accel(cfg.accel).map_err(|e| src(format!("{} snapshot: {e}", st.accelerator)))?;
    let hv = selection.hypervisor.as_ref();
    let mem = crate::memory::create(cfg.mem_size).map_err(internal)?;
    // `validate` made `memory.file` a plain name: the file is inside `dir`.
    snapshot_memory::load(&mem, &dir.join(&st.memory.file), &st.memory).map_err(src)?;
    let note = format!("{}: restored from {}", hv.name(), dir.display());
    let mut vm = Vm::build(&cfg, mem, hv, note).map_err(crate::controller::api_error)?;
    let corrupt = |what: &str, e: String| src(format!("snapshot corrupt: {what}: {e}"));
    vm.accel().restore_state(&st.vm).map_err(|e| corrupt("accelerator VM state", e.to_string()))?;
    {
        let l = &vm.devices;
        l.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&st.serial)
            .map_err(|e| corrupt("serial", e.to_string()))?;
        l.i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&st.i8042)
            .map_err(|e| corrupt("i8042", e.to_string()))?;
        l.cmos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&st.cmos)
            .map_err(|e| corrupt("cmos", e.to_string()))?;
        l.pm.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&st.pm)
            .map_err(|e| corrupt("acpi pm", e.to_string()))?;
        l.pci.lock().unwrap_or_else(|e| e.into_inner()).set_config_address(st.pci_config_address);
    }
    if st.virtio.len() != vm.virtio.len() {
        return Err(corrupt(
            "virtio",
            format!("{} devices, the configuration has {}", st.virtio.len(), vm.virtio.len()),
        ));
    }
    for (d, s) in vm.virtio.iter().zip(&st.virtio) {
        let mut t = d.dev.lock().unwrap_or_else(|e| e.into_inner());
        t.restore_state(s).map_err(|e| corrupt(&d.name, e))?;
        t.resume_device();
    }
    if st.vcpus.len() != vm.vcpu_count() {
        return Err(corrupt("vcpus", format!("{} in the snapshot, {} configured", st.vcpus.len(), vm.vcpu_count())));
    }
    for (v, s) in vm.vcpus_mut().zip(&st.vcpus) {
        v.restore_snapshot(s).map_err(|e| corrupt("vcpu", e.to_string()))?;
    }
    vm.clock.set(st.clock_ns);
    vm.start_paused().map_err(crate::controller::api_error)?;
    Ok((vm, cfg, st.config))
}
