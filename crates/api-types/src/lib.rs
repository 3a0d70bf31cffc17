//! The wire types of the VMM's REST API: request and response bodies (JSON), and the OpenAPI
//! 3.0 document that describes them ([`OPENAPI_YAML`]). This crate has no HTTP, runtime or CLI
//! code, so a client, a server or the host manager can share the types without pulling those
//! in. Unknown fields are refused (`deny_unknown_fields`), so a typo is a 400 naming the
//! field, not a silently ignored value. A test checks every schema of the document against
//! these types, field by field, both ways.

/// The OpenAPI 3.0 document of the VMM API (`openapi.yaml` beside this crate).
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod cli_syntax;
pub use cli_syntax::SERIAL_MAX;

/// The VM configuration: one typed description of a VM shared by `rustvisor run`'s flags,
/// the VMM API (`PUT vm.create`), snapshots and the host manager. Enumerations are enums here
/// (their JSON form is the same lowercase string as on the command line), so a bad value is
/// refused while parsing, naming the field and the accepted values; range and host checks
/// (memory size, files, TAP names, ...) are the VMM's one `validate` function.
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
    /// Guest RAM in MiB (at least what the kernel needs, up to the host's memory).
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// vCPUs (1 on emu, 1-64 on kvm).
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// The accelerator.
    #[serde(default)]
    pub accel: Accel,
    /// The 8250 console.
    #[serde(default)]
    pub serial: ConsoleOut,
    /// The virtio-console (`/dev/hvc0`); absent = none.
    #[serde(default)]
    pub console: Option<ConsoleOut>,
    /// virtio-blk disks, in PCI slot order (`/dev/vda`, `/dev/vdb`, ...).
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
    /// virtio-balloon; absent = none (`PUT vm.balloon` then answers 409).
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    /// How guest RAM is backed on the host (page sharing, huge pages).
    #[serde(default)]
    pub memory_options: MemoryOptions,
}

impl VmConfig {
    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib.saturating_mul(1 << 20)
    }
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

/// Which vCPU engine runs the guest: JSON and command line `"auto"`, `"kvm"` or `"emu"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Accel {
    /// KVM where it can run the guest, the emulator otherwise.
    #[default]
    Auto,
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// rustvisor's x86-64 emulator.
    Emu,
}

impl Accel {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Emu => "emu",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for Accel {
    type Error = String;
    fn try_from(s: String) -> Result<Accel, String> {
        s.parse()
    }
}

impl From<Accel> for String {
    fn from(a: Accel) -> String {
        a.as_str().to_string()
    }
}

impl FromStr for Accel {
    type Err = String;
    /// Parses `auto`, `kvm` or `emu`; the error names the accepted values.
    fn from_str(s: &str) -> Result<Accel, String> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "emu" => Ok(Accel::Emu),
            _ => Err(format!("unknown accelerator '{s}' (accepted: auto, kvm, emu)")),
        }
    }
}

/// Where a console's output goes (and where its input comes from): JSON and command line
/// `"null"`, `"stdio"`, `"file=PATH"` or `"socket=PATH[,log=FILE]"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ConsoleOut {
    /// Discarded.
    #[default]
    Null,
    /// The VMM's standard output and input.
    Stdio,
    /// Appended to a host file (no input).
    File(PathBuf),
    /// Served on a Unix socket (mode 0600, created when the VM is built and removed when it
    /// ends): several clients may attach and watch; the oldest one types. Also appended to
    /// `log`, rotated to `FILE.1` as it grows. The 8250 only (`--serial`).
    Socket {
        /// The Unix socket (at most 107 bytes, without ',').
        path: PathBuf,
        /// The log file, if any.
        log: Option<PathBuf>,
    },
}

/// The accepted forms of [`ConsoleOut`], for error messages.
pub const CONSOLE_FORMS: &str = "stdio, file=PATH, socket=PATH[,log=FILE], null";

impl FromStr for ConsoleOut {
    type Err = String;
    /// Parses `null`, `stdio`, `file=PATH` or `socket=PATH[,log=FILE]` (the socket path
    /// without ','); the error names the accepted values.
    fn from_str(s: &str) -> Result<ConsoleOut, String> {
        let refused = || format!("'{s}' is not accepted (accepted: {CONSOLE_FORMS})");
        match s {
            "null" => Ok(ConsoleOut::Null),
            "stdio" => Ok(ConsoleOut::Stdio),
            _ => {
                if let Some(p) = s.strip_prefix("file=") {
                    return if p.is_empty() { Err(refused()) } else { Ok(ConsoleOut::File(PathBuf::from(p))) };
                }
                let rest = s.strip_prefix("socket=").ok_or_else(refused)?;
                let (path, log) = match rest.split_once(",log=") {
                    Some((p, l)) => (p, Some(l)),
                    None => (rest, None),
                };
                if path.is_empty() || path.contains(',') || log.is_some_and(str::is_empty) {
                    return Err(refused());
                }
                Ok(ConsoleOut::Socket { path: PathBuf::from(path), log: log.map(PathBuf::from) })
            }
        }
    }
}

impl TryFrom<String> for ConsoleOut {
    type Error = String;
    fn try_from(s: String) -> Result<ConsoleOut, String> {
        s.parse()
    }
}

impl From<ConsoleOut> for String {
    fn from(c: ConsoleOut) -> String {
        c.to_string()
    }
}

impl fmt::Display for ConsoleOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleOut::Null => f.write_str("null"),
            ConsoleOut::Stdio => f.write_str("stdio"),
            ConsoleOut::File(p) => write!(f, "file={}", p.display()),
            ConsoleOut::Socket { path, log: None } => write!(f, "socket={}", path.display()),
            ConsoleOut::Socket { path, log: Some(l) } => write!(f, "socket={},log={}", path.display(), l.display()),
        }
    }
}

/// A disk image's format: JSON and command line `"raw"` or `"qcow2"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DiskFormat {
    /// Guest sector N is at byte N*512 of the file.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl DiskFormat {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for DiskFormat {
    type Error = String;
    fn try_from(s: String) -> Result<DiskFormat, String> {
        s.parse()
    }
}

impl From<DiskFormat> for String {
    fn from(f: DiskFormat) -> String {
        f.as_str().to_string()
    }
}

impl FromStr for DiskFormat {
    type Err = String;
    /// Parses `raw` or `qcow2`; the error names the accepted values.
    fn from_str(s: &str) -> Result<DiskFormat, String> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            _ => Err(format!("unknown format '{s}' (accepted: raw, qcow2)")),
        }
    }
}

/// What a disk does when the host fails an I/O on its image (`EIO`, `ENOSPC`, ...): JSON and
/// command line `"report"` or `"pause"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DiskErrorPolicy {
    /// The request fails: the guest gets an I/O error (`VIRTIO_BLK_S_IOERR`) and decides.
    #[default]
    Report,
    /// The request is kept (not completed; the disk's later requests wait behind it) and the
    /// VMM pauses the VM (`vm.info`: state `Paused` with a `pause_reason`), like QEMU's
    /// `werror=stop`/`rerror=stop`; `vm.resume` retries the kept request first, and pauses
    /// again if it fails again. Needs the VMM API (`rustvisor run --api-socket`, or
    /// `rustvisor vmm`) to resume.
    Pause,
}

impl DiskErrorPolicy {
    /// Whether this is the default, [`DiskErrorPolicy::Report`].
    pub fn is_report(&self) -> bool {
        *self == DiskErrorPolicy::Report
    }

    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskErrorPolicy::Report => "report",
            DiskErrorPolicy::Pause => "pause",
        }
    }
}

impl fmt::Display for DiskErrorPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for DiskErrorPolicy {
    type Error = String;
    fn try_from(s: String) -> Result<DiskErrorPolicy, String> {
        s.parse()
    }
}

impl From<DiskErrorPolicy> for String {
    fn from(p: DiskErrorPolicy) -> String {
        p.as_str().to_string()
    }
}

impl FromStr for DiskErrorPolicy {
    type Err = String;
    /// Parses `report` or `pause`; the error names the accepted values.
    fn from_str(s: &str) -> Result<DiskErrorPolicy, String> {
        match s {
            "report" => Ok(DiskErrorPolicy::Report),
            "pause" => Ok(DiskErrorPolicy::Pause),
            _ => Err(format!("unknown error policy '{s}' (accepted: report, pause)")),
        }
    }
}

/// One virtio-blk disk (command line:
/// `path=IMG[,format=raw|qcow2][,readonly=on][,serial=ID][,backing=allow][,data_file=allow][,on-error=report|pause]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Image path.
    pub path: String,
    /// The image's format; absent = detected from the file's first bytes.
    #[serde(default)]
    pub format: Option<DiskFormat>,
    /// Refuse guest writes.
    #[serde(default)]
    pub readonly: bool,
    /// GET_ID serial (≤ 20 ASCII bytes, virtio 1.2 §5.2.6).
    #[serde(default)]
    pub serial: Option<String>,
    /// Trust the qcow2 header's backing file names outside the image's directory.
    #[serde(default)]
    pub allow_backing_outside: bool,
    /// Accept an external data file named in the qcow2 header.
    #[serde(default)]
    pub allow_data_file: bool,
    /// What a host I/O error on the image does (command line `on-error=`); absent =
    /// `report`, and `report` is not written out (so the serialised shape of existing
    /// configurations, which snapshots embed, is unchanged).
    #[serde(default, skip_serializing_if = "DiskErrorPolicy::is_report")]
    pub on_error: DiskErrorPolicy,
}

/// A unicast Ethernet address: JSON and command line `"52:54:00:12:34:56"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;
    /// Parses six hex bytes separated by ':'; a multicast address is refused.
    fn from_str(s: &str) -> Result<MacAddr, String> {
        let bad = || format!("mac '{s}' (accepted: six hex bytes like 52:54:00:12:34:56, unicast)");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() || mac[0] & 1 != 0 {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = String;
    fn try_from(s: String) -> Result<MacAddr, String> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// One virtio-net NIC on a TAP device (command line `tap=NAME[,mac=MAC]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// TAP name (1-15 bytes); created if absent.
    pub tap: String,
    /// The NIC's address; absent = a stable locally administered address derived from `tap`.
    #[serde(default)]
    pub mac: Option<MacAddr>,
}

/// The virtio-vsock device (command line `cid=N,socket=PATH`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest CID, 3 to 4294967294.
    pub cid: u64,
    /// Host Unix socket: connect and write `CONNECT <port>\n` to reach a guest port; guest
    /// connections to host port P go to `<socket>_P`.
    pub socket: String,
}

/// The virtio-balloon device (command line
/// `--balloon [deflate_on_oom=on|off][,stats_interval_s=N][,free_page_reporting=on|off]`).
/// Its size is set at run time with `PUT vm.balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: the guest takes pages back from the balloon
    /// rather than run out of memory.
    #[serde(default = "default_true")]
    pub deflate_on_oom: bool,
    /// How often the VMM asks the guest for memory statistics, in seconds (1 to
    /// [`MAX_STATS_INTERVAL_S`]); 0 = no statistics queue.
    #[serde(default = "default_stats_interval_s")]
    pub stats_interval_s: u32,
    /// Offer free page reporting: the guest reports free memory (2 MiB blocks on Linux),
    /// which the VMM gives back to the host.
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig { deflate_on_oom: true, stats_interval_s: default_stats_interval_s(), free_page_reporting: false }
    }
}

/// Largest [`BalloonConfig::stats_interval_s`].
pub const MAX_STATS_INTERVAL_S: u32 = 3600;

fn default_true() -> bool {
    true
}
fn default_stats_interval_s() -> u32 {
    5
}

/// How guest RAM is backed on the host (command line
/// `--memory-options [mergeable=on][,hugepages=on][,thp=on]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryOptions {
    /// Mark guest RAM mergeable (`MADV_MERGEABLE`), so the host's KSM may share identical
    /// pages between VMs (when `/sys/kernel/mm/ksm/run` is 1).
    #[serde(default)]
    pub mergeable: bool,
    /// Back guest RAM with 2 MiB hugetlbfs pages (`MAP_HUGETLB`), reserved at boot: the host
    /// must have enough free (`/proc/sys/vm/nr_hugepages`). Not with `mergeable` or `thp`;
    /// `memory_mib` must be even. A balloon then gives back only whole huge pages (free
    /// page reporting's 2 MiB blocks).
    #[serde(default)]
    pub hugepages: bool,
    /// Ask for transparent huge pages (`MADV_HUGEPAGE`): best effort, no reservation.
    #[serde(default)]
    pub thp: bool,
}

/// `PUT vm.balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonTarget {
    /// The balloon's size: MiB of guest RAM the guest is asked to give back (0 to
    /// `memory_mib`; 0 deflates it completely).
    pub target_mib: u64,
}

/// `GET vm.balloon`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalloonInfo {
    /// The balloon size asked for, MiB.
    pub target_mib: u64,
    /// The balloon size the guest reports (its driver's `actual`), MiB.
    pub actual_mib: u64,
    /// The guest's last memory statistics; `null` before the first (or without a
    /// statistics queue).
    pub stats: Option<BalloonStats>,
    /// Seconds since `stats` arrived; `null` with it.
    pub stats_age_s: Option<f64>,
    /// MiB of free memory the guest reported (free page reporting) and the VMM gave back to
    /// the host since the VMM started.
    pub reported_mib: u64,
}

/// The guest's memory statistics (virtio 1.2 §5.5.6.3); a value the guest did not report
/// is absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Bytes swapped in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in_bytes: Option<u64>,
    /// Bytes swapped out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out_bytes: Option<u64>,
    /// Major page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Bytes not used at all (`MemFree`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// Bytes the guest can use, the balloon excluded (`MemTotal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Bytes available for new work without swapping (`MemAvailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_bytes: Option<u64>,
    /// Bytes of disk caches that can be dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches_bytes: Option<u64>,
    /// Successful hugetlb page allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb page allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
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
    /// How the VM ended, in state `Shutdown`: a supervisor restarts on `reset` and `error`
    /// (failures), not on `poweroff` or `shutdown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<VmEnd>,
    /// In state `Paused`, when the VMM paused the VM by itself: why, e.g. `disk disk0: write
    /// at 4096: No space left on device (os error 28)` (a disk with `on_error: pause`).
    /// Cleared by `vm.resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
    /// While the VM is live: each vCPU's host thread, so a manager can pin it
    /// (`sched_setaffinity(2)`) or read its scheduler statistics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_threads: Vec<VcpuThread>,
}

/// One vCPU's host thread (`VmInfo::vcpu_threads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuThread {
    /// The vCPU's index (its APIC ID).
    pub vcpu: u32,
    /// The host thread ID (`gettid(2)`; the thread is named `vcpuN`).
    pub tid: u32,
}

/// How a VM ended (`VmInfo::ended`); JSON `{"kind": "reset", "reason": "triple fault"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum VmEnd {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// `vm.shutdown`: the power button, then a forced stop after the grace period.
    Shutdown,
    /// The guest reset or crashed (i8042 reset, triple fault, a kernel panic with `panic=-1`).
    Reset {
        /// What happened.
        #[serde(default)]
        reason: String,
    },
    /// The VMM stopped the VM on an error (a vCPU failed).
    Error {
        /// The error.
        #[serde(default)]
        reason: String,
    },
    /// The user quit from the console escape (`rustvisor run` only).
    UserQuit,
}

impl VmEnd {
    /// Whether a supervisor should count it as a failure (`reset`, `error`).
    pub fn is_failure(&self) -> bool {
        matches!(self, VmEnd::Reset { .. } | VmEnd::Error { .. })
    }
}

/// `GET vm.counters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DeviceCounters {
    /// Requests completed.
    pub requests: u64,
    /// Bytes the device read from guest memory.
    pub bytes_read: u64,
    /// Bytes the device wrote to guest memory.
    pub bytes_written: u64,
    /// Failed requests.
    pub errors: u64,
    /// A virtio-blk disk's operations, bytes and latencies; absent for other devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockCounters>,
    /// A virtio-net NIC's packets, bytes, drops and errors; absent for other devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetCounters>,
}

/// A disk's counters (`DeviceCounters::block`), from the guest's point of view: a read moves
/// bytes from the disk to the guest. An operation counts when its request completes,
/// successfully or not (failures are also in `errors`); its bytes only when it succeeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BlockCounters {
    /// Read requests completed.
    pub read_ops: u64,
    /// Write requests completed.
    pub write_ops: u64,
    /// Flush requests completed.
    pub flush_ops: u64,
    /// Bytes read by successful reads.
    pub read_bytes: u64,
    /// Bytes written by successful writes.
    pub write_bytes: u64,
    /// Times a host I/O error made the disk pause the VM (`on_error: pause`).
    pub error_pauses: u64,
    /// Read latency (request taken off the virtqueue → completion written).
    pub read_latency: LatencyHistogram,
    /// Write latency.
    pub write_latency: LatencyHistogram,
    /// Flush latency.
    pub flush_latency: LatencyHistogram,
}

/// A latency histogram in the shape of a Prometheus histogram: bucket `le=bounds_s[i]` is
/// `cumulative[i]`, bucket `le="+Inf"` and `_count` are `count`, `_sum` is `sum_s`. The
/// bounds are fixed: 50 µs, 100 µs, 250 µs, 500 µs, 1 ms, 2.5 ms, 5 ms, 10 ms, 25 ms, 50 ms,
/// 100 ms, 250 ms, 500 ms, 1 s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LatencyHistogram {
    /// The finite buckets' upper bounds, seconds, ascending.
    pub bounds_s: Vec<f64>,
    /// Cumulative counts: `cumulative[i]` operations took at most `bounds_s[i]` seconds.
    pub cumulative: Vec<u64>,
    /// Every operation observed (the `+Inf` bucket).
    pub count: u64,
    /// Sum of the latencies, seconds.
    pub sum_s: f64,
}

/// A NIC's counters (`DeviceCounters::net`), from the guest's point of view: rx = host →
/// guest, tx = guest → host; bytes are Ethernet frame bytes (without the virtio-net header).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames read from the TAP and dropped: too large for the receive buffers the guest
    /// posted, or whose buffers could not be written.
    pub rx_dropped: u64,
    /// Failed TAP reads and frames of a length the device does not take.
    pub rx_errors: u64,
    /// Times a frame waited because the guest had no receive buffer posted (the frames wait
    /// in the host's TAP queue; what the host drops there shows in the TAP's own statistics).
    pub rx_no_buffers: u64,
    /// Frames sent by the guest and written to the TAP.
    pub tx_packets: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Frames the guest sent that were dropped as malformed (bad descriptor chains, buffers
    /// outside guest memory, frames too short or too long).
    pub tx_dropped: u64,
    /// Frames lost to TAP write errors.
    pub tx_errors: u64,
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

/// `PUT vm.backup`: a point-in-time export of the running (or paused) VM's writable disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// Where to write the export: `file:///absolute/dir` (created if absent; must be empty).
    /// It gets one raw, sparse image of the virtual disk per writable disk, `disk<i>.raw`
    /// (`i` = the disk's index in the configuration), and nothing else.
    pub destination_url: String,
    /// The most MiB per second the background copy reads (guest writes that copy blocks
    /// ahead of it are never limited); absent or 0 = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_mib_s: Option<u64>,
}

/// A backup job's state: JSON `"running"`, `"done"`, `"failed"` or `"cancelled"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupState {
    /// Copying.
    Running,
    /// The export is complete and fsynced.
    Done,
    /// The export could not be written (see `error`); the guest was not affected.
    Failed,
    /// Cancelled (`DELETE vm.backup`, or the VM stopped) before it was done.
    Cancelled,
}

/// `PUT vm.backup` (once the jobs started) and `GET vm.backup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupStatus {
    /// The destination folder.
    pub destination: String,
    /// How long the guest was paused to start the backup, in milliseconds (with a VM that
    /// was paused already: how long starting the jobs took).
    pub pause_ms: f64,
    /// `running` while any disk's job runs; then `failed` if one failed, else `cancelled` if
    /// one was cancelled, else `done`.
    pub state: BackupState,
    /// One entry per writable disk, in configuration order.
    pub disks: Vec<BackupDiskStatus>,
}

/// One disk's backup job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupDiskStatus {
    /// The disk's index in the configuration (`disks[index]`, device `disk<index>`).
    pub index: u32,
    /// The disk's image.
    pub path: String,
    /// The export file.
    pub target: String,
    /// The virtual disk's size.
    pub bytes_total: u64,
    /// Bytes of the disk exported so far (written, or left as a hole where the disk reads as
    /// zeros); `bytes_total` once done.
    pub bytes_copied: u64,
    /// Of `bytes_copied`, those copied early because the guest was about to overwrite them
    /// (copy-before-write).
    pub bytes_before_write: u64,
    /// The job's state.
    pub state: BackupState,
    /// Why the job failed, in state `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
