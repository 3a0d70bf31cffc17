//! The wire types of the VMM's REST API: request and response bodies (JSON), and the OpenAPI
//! 3.0 document that describes them ([`OPENAPI_YAML`]). This crate has no HTTP, runtime or CLI
//! code, so a client, a server or the host manager can share the types without pulling those
//! in. Unknown fields are refused (`deny_unknown_fields`), so a typo is a 400 naming the
//! field, not a silently ignored value. A test checks every schema of the document against
//! these types, field by field, both ways.

/// The OpenAPI 3.0 document of the VMM API (`openapi.yaml` beside this crate).
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");

use serde::{Deserialize, Serialize};

/// The full VM configuration (`PUT vm.create`), mirroring `rustvisor run`'s flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// bzImage or ELF vmlinux path on the host.
    pub kernel: String,
    /// Initramfs path.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Guest RAM in MiB (16 up to the host's memory).
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// vCPUs (1 on emu, 1-64 on kvm).
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// "auto", "kvm" or "emu".
    #[serde(default = "default_accel")]
    pub accel: String,
    /// 8250 console: "null", "file=PATH" ("stdio" is refused: a VMM has no terminal).
    #[serde(default = "default_serial")]
    pub serial: String,
    /// virtio-console: "null" or "file=PATH"; absent = none.
    #[serde(default)]
    pub console: Option<String>,
    /// virtio-blk disks.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// virtio-vsock.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-rng.
    #[serde(default)]
    pub rng: bool,
}

fn default_cmdline() -> String {
    "console=ttyS0".into()
}
fn default_memory_mib() -> u64 {
    512
}
fn default_cpus() -> u8 {
    1
}
fn default_accel() -> String {
    "auto".into()
}
fn default_serial() -> String {
    "null".into()
}

/// One disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Image path.
    pub path: String,
    /// "raw" or "qcow2"; absent = detect.
    #[serde(default)]
    pub format: Option<String>,
    /// Refuse guest writes.
    #[serde(default)]
    pub readonly: bool,
    /// GET_ID serial (≤ 20 ASCII bytes).
    #[serde(default)]
    pub serial: Option<String>,
    /// Trust the qcow2 header's backing file names outside the image's directory.
    #[serde(default)]
    pub allow_backing_outside: bool,
    /// Accept an external data file named in the qcow2 header.
    #[serde(default)]
    pub allow_data_file: bool,
}

/// One NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// TAP name (1-15 bytes).
    pub tap: String,
    /// "52:54:00:12:34:56"; absent = derived from the TAP name.
    #[serde(default)]
    pub mac: Option<String>,
}

/// The vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest CID, 3 to 4294967294.
    pub cid: u64,
    /// Host Unix socket path.
    pub socket: String,
}

/// `GET vmm.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingInfo {
    /// rustvisor version.
    pub version: String,
    /// Accelerators this host can run: e.g. ["emu"] or ["kvm", "emu"].
    pub accelerators: Vec<String>,
    /// VMM process ID.
    pub pid: u32,
}

/// `GET vm.info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// "Created", "Running", "Paused" or "Shutdown".
    pub state: String,
    /// The configuration.
    pub config: VmConfig,
    /// Seconds since boot (0 before boot), excluding nothing: wall time.
    pub uptime_s: f64,
    /// The accelerator in use ("kvm" or "emu") once booted.
    pub accelerator: Option<String>,
}

/// `GET vm.counters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Counters {
    /// Per vCPU, exits by kind ("pio", "mmio", "hlt", ...) → count.
    pub vcpus: Vec<std::collections::BTreeMap<String, u64>>,
    /// Per device name ("disk0", "net0", "vsock", "rng", "console") → counters.
    pub devices: std::collections::BTreeMap<String, DeviceCounters>,
    /// Guest-triggered warnings (corrupt virtqueues, malformed requests, bad feature
    /// negotiation) since the VMM started.
    #[serde(default)]
    pub guest_warnings: u64,
    /// Of those, the ones not logged (the log takes at most 5 per kind per minute).
    #[serde(default)]
    pub guest_warnings_suppressed: u64,
}

/// One device's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeviceCounters {
    /// Requests completed.
    pub requests: u64,
    /// Bytes the device read from guest memory.
    pub bytes_read: u64,
    /// Bytes the device wrote to guest memory.
    pub bytes_written: u64,
    /// Failed requests.
    pub errors: u64,
}

/// `PUT vm.snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Where to write the snapshot: `file:///absolute/dir` (created if absent; must be empty).
    pub destination_url: String,
}

/// `PUT vm.restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The snapshot to restore: `file:///absolute/dir`.
    pub source_url: String,
}

/// The body of every error response (4xx and 5xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// 400: the offending field ("memory_mib", "disks\[1\].format", "destination_url"), or "body"
    /// when the body as a whole is wrong (not JSON, missing, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// 409: the VM's current state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}
