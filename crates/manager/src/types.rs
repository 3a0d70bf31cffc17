//! The daemon API's request and response bodies (JSON), described by `openapi.yaml` beside
//! this crate. Request bodies refuse unknown fields, so a typo is a 400 naming the field.

use serde::{Deserialize, Serialize};

pub use api::types::VmConfig;
pub use hostnet::{FirewallSpec, Ipv4Cidr, MacAddr, NetworkSpec};

/// A VM's NIC on one of the daemon's networks: `net=lan0[,vlan=20][,mac=..][,firewall=web]`
/// on the command line. The daemon makes a TAP for it on the network's bridge when the VM
/// starts and removes it when the VM stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// The network.
    pub net: String,
    /// The VLAN (1 to 4094) the NIC is on; needs a network with VLAN filtering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// The guest's MAC address; absent at create: the daemon picks one unique on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// The firewall group on the NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<String>,
}

impl std::str::FromStr for NicSpec {
    type Err = String;
    /// Parses `net=NAME[,vlan=N][,mac=MAC][,firewall=NAME]`.
    fn from_str(s: &str) -> Result<NicSpec, String> {
        let mut nic = NicSpec { net: String::new(), vlan: None, mac: None, firewall: None };
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                format!("--nic: '{part}' is not key=value (accepted: net=NAME[,vlan=N][,mac=MAC][,firewall=NAME])")
            })?;
            match k {
                "net" => nic.net = v.to_string(),
                "vlan" => nic.vlan = Some(v.parse().map_err(|_| format!("--nic: vlan '{v}' (accepted: 1 to 4094)"))?),
                "mac" => nic.mac = Some(v.parse().map_err(|e| format!("--nic: {e}"))?),
                "firewall" => nic.firewall = Some(v.to_string()),
                _ => return Err(format!("--nic: unknown key '{k}' (accepted: net, vlan, mac, firewall)")),
            }
        }
        if nic.net.is_empty() {
            return Err("--nic: net=NAME is required".into());
        }
        Ok(nic)
    }
}

pub use crate::store::BackupRow as BackupInfo;
pub use storage::{PoolInfo, VolumeInfo};

/// A disk from a storage pool for `POST /api/v1/vms` (`--disk vol=POOL/NAME[,readonly=on]`):
/// the daemon adds it to the configuration's disks as the volume's file with its format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeAttach {
    /// `POOL/NAME`.
    pub volume: String,
    /// Attach it read-only.
    #[serde(default)]
    pub readonly: bool,
}

/// `POST /api/v1/pools`: a directory pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolCreate {
    /// The pool's name ([`NAME_RULE`]).
    pub name: String,
    /// Its directory (absolute; created if absent, or an existing pool directory).
    pub path: String,
}

/// One pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolDetails {
    /// Its name.
    pub name: String,
    /// Its space: capacity, free, allocated and virtual bytes.
    pub info: PoolInfo,
}

/// `GET /api/v1/pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolList {
    /// Every pool, by name.
    pub pools: Vec<PoolDetails>,
}

/// `POST /api/v1/pools/{name}/volumes`: a new volume (`size_bytes`) or an imported one
/// (`import_from`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    /// The volume's name ([`NAME_RULE`]).
    pub name: String,
    /// Its size in bytes (a multiple of 512); for a new volume.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// `raw` or `qcow2` (default: qcow2 for a new volume, the source's for an import).
    #[serde(default)]
    pub format: Option<String>,
    /// Reserve the space now (refused when it exceeds the pool's free space).
    #[serde(default)]
    pub preallocate: bool,
    /// Copy this host file in (absolute path); its content is checked as untrusted.
    #[serde(default)]
    pub import_from: Option<String>,
    /// The imported file's format (give it for a raw image a guest wrote); default: detected.
    #[serde(default)]
    pub source_format: Option<String>,
}

/// One volume, with the VMs that use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDetails {
    /// Its pool.
    pub pool: String,
    /// Its file, format, sizes, backing volume.
    pub info: VolumeInfo,
    /// The VMs with it as a disk.
    pub used_by: Vec<String>,
}

/// `GET /api/v1/pools/{name}/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeList {
    /// The pool's volumes, by name.
    pub volumes: Vec<VolumeDetails>,
}

/// `PUT /api/v1/pools/{name}/volumes/{volume}/resize`: grow only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeResize {
    /// The new size in bytes (a multiple of 512, larger than the present one).
    pub size_bytes: u64,
}

/// `POST /api/v1/pools/{name}/volumes/{volume}/clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeClone {
    /// The new volume's name.
    pub name: String,
    /// Its pool (default: the source's).
    #[serde(default)]
    pub pool: Option<String>,
    /// A qcow2 overlay on the source (the source must then never change) instead of a copy.
    #[serde(default)]
    pub linked: bool,
}

/// `POST /api/v1/vms/{name}/clone`: a new VM from a VM or template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmClone {
    /// The new VM's name.
    pub name: String,
    /// Linked clones of the disks (the source must be a template).
    #[serde(default)]
    pub linked: bool,
}

/// `POST /api/v1/vms/{name}/backups`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupCreate {
    /// Where to put it (absolute directory; default `<state-dir>/backups`).
    #[serde(default)]
    pub to: Option<String>,
}

/// `GET /api/v1/backups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupList {
    /// Oldest first.
    pub backups: Vec<BackupInfo>,
}

/// `POST /api/v1/backups/{name}/restore`: a new VM from a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRestore {
    /// The new VM's name (default: the backed-up VM's, if free).
    #[serde(default)]
    pub name: Option<String>,
    /// The pool for its disks.
    pub pool: String,
}

/// `POST /api/v1/networks`: a virtual network (a Linux bridge on the host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    /// The network's name ([`NAME_RULE`]); its bridge is `rv-<name>`.
    pub name: String,
    /// The host's address on the bridge and the prefix, e.g. `10.77.0.1/24`.
    #[serde(default)]
    pub subnet: Option<Ipv4Cidr>,
    /// Serve DHCP (dnsmasq) on it; needs `subnet`.
    #[serde(default)]
    pub dhcp: bool,
    /// Masquerade the subnet through the host's routes; needs `subnet`.
    #[serde(default)]
    pub nat: bool,
    /// No host routing at all: guests reach only each other.
    #[serde(default)]
    pub isolated: bool,
    /// Bridge VLAN filtering, for NICs with a `vlan`.
    #[serde(default)]
    pub vlan_filtering: bool,
}

impl NetworkCreate {
    /// The network's spec, with its bridge name.
    pub fn spec(&self) -> NetworkSpec {
        NetworkSpec {
            subnet: self.subnet,
            dhcp: self.dhcp,
            nat: self.nat,
            isolated: self.isolated,
            vlan_filtering: self.vlan_filtering,
            ..NetworkSpec::new(&self.name)
        }
    }
}

/// A guest's DHCP lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// The guest's MAC address.
    pub mac: String,
    /// The address leased.
    pub ip: String,
    /// The name the guest gave, if any.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// One network in `GET /api/v1/networks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkInfo {
    /// Its definition.
    pub spec: NetworkSpec,
    /// The VMs with a NIC on it.
    pub used_by: Vec<String>,
    /// What is wrong with it on the host now (empty: all is well).
    pub problems: Vec<String>,
    /// The DHCP leases given out.
    pub leases: Vec<LeaseInfo>,
}

/// `GET /api/v1/networks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkList {
    /// Every network, by name.
    pub networks: Vec<NetworkInfo>,
}

/// One firewall group in `GET /api/v1/firewalls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallInfo {
    /// Its definition.
    pub spec: FirewallSpec,
    /// The VMs with a NIC in it.
    pub used_by: Vec<String>,
}

/// `GET /api/v1/firewalls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallList {
    /// Every group, by name.
    pub firewalls: Vec<FirewallInfo>,
}

/// `GET /api/v1/netcheck`: what `rustvisor net check` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCheck {
    /// Each misconfiguration found on the host, for a person (empty: all is well).
    pub problems: Vec<String>,
}

/// A VM's NIC in `GET /api/v1/vms/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicInfo {
    /// As defined.
    pub spec: NicSpec,
    /// Its TAP on the host.
    pub tap: String,
    /// The address the guest leased (networks with DHCP).
    #[serde(default)]
    pub ip: Option<String>,
}

/// Allowed VM names, for messages: a lower-case letter or digit, then up to 62 of lower-case
/// letters, digits, `-`, `_` and `.` (so a name is a safe file name and never an option).
pub const NAME_RULE: &str = "1 to 63 characters: a-z or 0-9, then a-z, 0-9, '-', '_' or '.'";

/// Checks a VM name against [`NAME_RULE`].
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.'))
}

/// What the daemon does when a VM ends without being asked to through the API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart: a crashed VM stays `crashed` with the reason.
    #[default]
    No,
    /// Restart after a crash (VMM killed or failed, API dead); a guest power-off stays
    /// `stopped`.
    OnFailure,
    /// Restart after a crash and after a guest power-off.
    Always,
}

impl RestartPolicy {
    /// The policy's name on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "no" => Ok(RestartPolicy::No),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "always" => Ok(RestartPolicy::Always),
            _ => Err(format!("'{s}' (accepted: no, on-failure, always)")),
        }
    }
}

/// Limits of the start-up policy's numbers.
pub const MAX_START_ORDER: u32 = 1000;
/// The longest `start_delay_s`.
pub const MAX_START_DELAY_S: u32 = 600;

/// What the daemon does on its own with a VM: restart it when it ends, start it at boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The restart policy; default `no`.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Start the VM when the daemon first starts after the host booted (default false).
    #[serde(default)]
    pub autostart: bool,
    /// Autostart order: lower first, then by name (0 to [`MAX_START_ORDER`], default 0).
    #[serde(default)]
    pub start_order: u32,
    /// Seconds to wait after autostarting this VM before the next one (0 to
    /// [`MAX_START_DELAY_S`], default 0).
    #[serde(default)]
    pub start_delay_s: u32,
}

/// The highest `cpu_weight`.
pub const MAX_CPU_WEIGHT: u32 = 10_000;

/// How the host's OOM killer ranks a VM's VMM against the others (`oom_score_adj`). The
/// kernel kills the process with the highest memory use + `oom_score_adj` × (the memory it
/// may use) / 1000: `low` VMs always go first; between the others the priority is a bias of
/// half (normal) or none (high) of that memory. `critical` VMs are still killable, but
/// after every other VM and most host processes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// `oom_score_adj` 1000: always the first to go.
    Low,
    /// `oom_score_adj` 500 (the default): VMs go before host processes.
    #[default]
    Normal,
    /// `oom_score_adj` 0: like a host process.
    High,
    /// `oom_score_adj` -500: after every other VM and most host processes.
    Critical,
}

impl Priority {
    /// The name on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    /// The VMM's `oom_score_adj` (-1000 to 1000; Linux `proc(5)`).
    pub fn oom_score_adj(self) -> i32 {
        match self {
            Priority::Low => 1000,
            Priority::Normal => 500,
            Priority::High => 0,
            Priority::Critical => -500,
        }
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "low" => Priority::Low,
            "normal" => Priority::Normal,
            "high" => Priority::High,
            "critical" => Priority::Critical,
            _ => return Err(format!("'{s}' (accepted: low, normal, high, critical)")),
        })
    }
}

/// A VM's share of the host: its cgroup's CPU weight, limit and CPU set, the pinning of its
/// vCPU threads, its memory limit, its OOM priority and its automatic balloon floor. All of
/// it may change while the VM runs (`PATCH /api/v1/vms/{name}` with `resources`), and is
/// applied at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU weight against the other VMs when the host's CPUs are contended (cgroup v2
    /// `cpu.weight`, 1 to [`MAX_CPU_WEIGHT`]; default 100; on cgroup v1 `cpu.shares` =
    /// weight × 1024 / 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// The most CPU time the whole VMM may use, in percent of one host CPU (150 = 1.5 CPUs;
    /// cgroup `cpu.max` with a 100 ms period, like systemd's `CPUQuota=`). 1 to 100 × host
    /// CPUs; absent = no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit_percent: Option<u32>,
    /// The host CPUs the VMM may run on, as a Linux CPU list ("0-3,6"; cgroup
    /// `cpuset.cpus`); absent = all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuset: Option<String>,
    /// vCPU index → the host CPU its thread is pinned to (`sched_setaffinity`); the VMM's
    /// other threads (devices, API) then run on the remaining CPUs of the set when any
    /// remain.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub pin: std::collections::BTreeMap<u8, u32>,
    /// The most memory the VMM may use, in MiB (cgroup `memory.max`): the kernel reclaims
    /// and then OOM-kills inside the VM's group above it. Absent = guest RAM +
    /// [`default_memory_overhead_mib`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mib: Option<u64>,
    /// Which VM the host's OOM killer takes first.
    #[serde(default)]
    pub priority: Priority,
    /// The least guest RAM, in MiB, the automatic balloon policy leaves the guest when the
    /// host runs short of memory; absent = the VM is never ballooned automatically. Needs a
    /// balloon device (`config.balloon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_min_mib: Option<u64>,
}

/// What a VMM needs beyond its guest's RAM, in MiB, for `guest_mib` of guest RAM: 64 MiB
/// plus 1/8 of the RAM (device buffers, the emulator's decoded-code caches, the
/// thread stacks; the VMM of a 512 MiB emu guest that booted Debian keeps about 20 MiB).
pub fn default_memory_overhead_mib(guest_mib: u64) -> u64 {
    64 + guest_mib / 8
}

/// A VM's state as the daemon sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Defined, no VMM process (never started, stopped, or the guest powered off).
    Stopped,
    /// A VMM process is being started for it (only seen in the store after a daemon crash).
    Starting,
    /// The guest runs.
    Running,
    /// The guest is paused.
    Paused,
    /// The VMM ended without being asked to; `reason` says why.
    Crashed,
}

impl VmState {
    /// The state's name on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Crashed => "crashed",
        }
    }

    /// Whether a VMM process should exist.
    pub fn is_active(self) -> bool {
        matches!(self, VmState::Starting | VmState::Running | VmState::Paused)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VmState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "stopped" => VmState::Stopped,
            "starting" => VmState::Starting,
            "running" => VmState::Running,
            "paused" => VmState::Paused,
            "crashed" => VmState::Crashed,
            _ => return Err(format!("unknown VM state '{s}'")),
        })
    }
}

/// `POST /api/v1/vms`: define a VM (it is not started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The VM's name ([`NAME_RULE`]).
    pub name: String,
    /// The restart policy; default `no`.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// See [`Policy::autostart`].
    #[serde(default)]
    pub autostart: bool,
    /// See [`Policy::start_order`].
    #[serde(default)]
    pub start_order: u32,
    /// See [`Policy::start_delay_s`].
    #[serde(default)]
    pub start_delay_s: u32,
    /// NICs on the daemon's networks.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// Disks from storage pools, after the configuration's own disks.
    #[serde(default)]
    pub volumes: Vec<VolumeAttach>,
    /// Its share of the host's CPUs and memory.
    #[serde(default)]
    pub resources: Resources,
    /// The VM's configuration, as the VMM's `vm.create` takes it. `serial` must be left
    /// `null` (the default): the daemon writes the serial console to
    /// `<state-dir>/vms/<name>/console.log`.
    pub config: VmConfig,
}

impl CreateRequest {
    /// The policy part of the request.
    pub fn policy(&self) -> Policy {
        Policy {
            restart: self.restart,
            autostart: self.autostart,
            start_order: self.start_order,
            start_delay_s: self.start_delay_s,
        }
    }
}

/// `PATCH /api/v1/vms/{name}`: change a VM. The policy fields may change at any time; the
/// configuration only while the VM is not running (stopped or crashed). Absent fields keep
/// their value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    /// See [`Policy::restart`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    /// See [`Policy::autostart`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// See [`Policy::start_order`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_order: Option<u32>,
    /// See [`Policy::start_delay_s`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_delay_s: Option<u32>,
    /// Guest RAM in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u8>,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// A whole new configuration (applied before the single fields above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<VmConfig>,
    /// New NICs on the daemon's networks (replacing all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nics: Option<Vec<NicSpec>>,
    /// The balloon's size in MiB (memory taken from the guest), set at once on a running or
    /// paused VM that has a balloon device (`config.balloon`); not stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_mib: Option<u64>,
    /// New resources (replacing all of them), applied at once to a running VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

impl UpdateRequest {
    /// Whether the request changes the VM's configuration (not only its policy).
    pub fn changes_config(&self) -> bool {
        self.memory_mib.is_some()
            || self.cpus.is_some()
            || self.cmdline.is_some()
            || self.config.is_some()
            || self.nics.is_some()
    }
}

/// `POST /api/v1/vms/{name}/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// The snapshot's name ([`NAME_RULE`]; unique per VM).
    pub name: String,
}

/// One snapshot of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// When it was taken (Unix time, milliseconds).
    pub created_ms: i64,
    /// Host disk space it takes (allocated bytes of its files).
    pub size_bytes: u64,
    /// Whether it holds the running VM's state and RAM (taken from a running or paused VM;
    /// a revert resumes the guest where it was); else disks only (taken from a stopped VM).
    pub memory: bool,
    /// The VM's state when it was taken.
    pub vm_state: VmState,
}

/// `GET /api/v1/vms/{name}/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    /// Oldest first.
    pub snapshots: Vec<SnapshotInfo>,
}

/// `PUT /api/v1/vms/{name}/stop` (the body is optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Kill the VMM at once instead of pressing the guest's power button first.
    #[serde(default)]
    pub force: bool,
    /// Seconds the graceful stop may take before the VMM is killed (default 30, 1 to 3600).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// One VM in `GET /api/v1/vms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSummary {
    /// The VM's name.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// The operation in progress on it, if any ("start", "stop", "restart", ...).
    #[serde(default)]
    pub operation: Option<String>,
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The accelerator in use while it runs ("kvm" or "emu"), else the configured one.
    pub accel: String,
    /// The VMM's process ID while it runs.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Seconds since the VMM was started, while it runs.
    #[serde(default)]
    pub uptime_s: Option<f64>,
    /// The restart policy.
    pub restart: RestartPolicy,
    /// Whether the VM starts with the host.
    pub autostart: bool,
    /// Whether it is a template (cloned, never started).
    #[serde(default)]
    pub template: bool,
    /// Restarts by the policy since the last start asked through the API (back to 0 once
    /// the VM has run for the daemon's `--restart-reset-after`).
    pub restarts: u32,
    /// Why the VM is `crashed` or `stopped` (absent when it was never started).
    #[serde(default)]
    pub reason: Option<String>,
}

/// `GET /api/v1/vms/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmDetails {
    /// What `GET /api/v1/vms` says of it.
    pub summary: VmSummary,
    /// Its configuration (with the serial console the daemon set).
    pub config: VmConfig,
    /// Its restart and start-up policy.
    pub policy: Policy,
    /// Its share of the host's CPUs and memory.
    #[serde(default)]
    pub resources: Resources,
    /// While its VMM runs: where the resources are in force (its cgroup, its vCPU
    /// threads); absent when stopped.
    #[serde(default)]
    pub placement: Option<Placement>,
    /// Its NICs on the daemon's networks, with their leased addresses.
    pub nics: Vec<NicInfo>,
    /// The balloon's target and actual size and the guest's statistics, while a VMM with a
    /// balloon device runs.
    #[serde(default)]
    pub balloon: Option<api::types::BalloonInfo>,
    /// The serial console's file on the host.
    pub console_log: String,
    /// The VMM's API socket while it runs.
    #[serde(default)]
    pub api_socket: Option<String>,
    /// When it was defined (Unix time, milliseconds).
    pub created_ms: i64,
}

/// Where a running VM's resources are in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Its cgroup(s), e.g. "/sys/fs/cgroup/rustvisor.slice/web" (v2) or the v1
    /// controllers' folders joined by ", "; absent when the daemon runs without cgroups
    /// (`cgroups` of `GET /api/v1/host` says why).
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The VMM's `oom_score_adj`.
    pub oom_score_adj: i32,
    /// Its vCPU threads.
    pub vcpu_threads: Vec<VcpuThread>,
}

/// One vCPU thread of a running VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuThread {
    /// The vCPU's index.
    pub vcpu: u32,
    /// The host thread ID.
    pub tid: u32,
    /// The host CPUs it may run on (its affinity, a Linux CPU list).
    pub affinity: String,
}

/// The daemon's admission policy: how far the VMs that are up (running or paused) may
/// overcommit the host. A start beyond it is refused with the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OvercommitPolicy {
    /// vCPUs per host CPU (`--cpu-overcommit`, default 4.0).
    pub cpu: f64,
    /// Guest memory per byte of host memory (`--mem-overcommit`, default 1.0: no
    /// overcommit).
    pub memory: f64,
}

impl Default for OvercommitPolicy {
    fn default() -> Self {
        OvercommitPolicy { cpu: 4.0, memory: 1.0 }
    }
}

/// `GET /api/v1/host`: the host's resources, the policy and what the VMs commit of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Online CPUs.
    pub cpus: u64,
    /// Memory the VMs may use, in MiB: `MemTotal`, or the daemon's own cgroup memory limit
    /// when lower.
    pub memory_mib: u64,
    /// Memory available now (`MemAvailable`), in MiB.
    pub memory_available_mib: u64,
    /// The admission policy.
    pub overcommit: OvercommitPolicy,
    /// vCPUs of the VMs that are up.
    pub committed_vcpus: u64,
    /// Guest memory of the VMs that are up, in MiB.
    pub committed_memory_mib: u64,
    /// VMs up.
    pub vms_up: u64,
    /// How VMs are confined: "cgroup v2 at PATH", "cgroup v1 (cpu, cpuset, memory) under
    /// NAME", or "none: WHY".
    pub cgroups: String,
}

/// `GET /api/v1/capacity?cpus=N&memory_mib=M[&disk_bytes=B&pool=P]`: how many more VMs of
/// that shape fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// The host and what is committed of it.
    pub host: HostInfo,
    /// How many more fit by vCPUs alone.
    pub by_cpu: u64,
    /// How many more fit by memory alone.
    pub by_memory: u64,
    /// How many more fit by the pool's free space alone (when a disk size was given).
    #[serde(default)]
    pub by_disk: Option<u64>,
    /// The least of the above.
    pub fit: u64,
    /// Which resource runs out first ("cpu", "memory" or "disk").
    pub limited_by: String,
    /// One line per resource: what is there, what is committed, what the policy allows.
    pub explanation: Vec<String>,
}

/// `GET /api/v1/stats`: one sample of every VM's counters, for `rustvisor top` (which
/// turns two samples into rates) and the Prometheus metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// When the sample was taken (Unix time, milliseconds).
    pub time_ms: i64,
    /// The host.
    pub host: HostInfo,
    /// The host's KSM figures (`/sys/kernel/mm/ksm`), when readable.
    #[serde(default)]
    pub ksm: Option<vmm::ksm::HostKsm>,
    /// Every VM, by name.
    pub vms: Vec<VmStats>,
}

/// One VM's counters in [`Stats`]; the process, cgroup, device and balloon parts only
/// while its VMM runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStats {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// The accelerator in use while it runs, else the configured one.
    pub accel: String,
    /// Restarts by its policy.
    pub restarts: u32,
    /// Seconds its VMM has run.
    #[serde(default)]
    pub uptime_s: Option<f64>,
    /// CPU time (user + system) of the whole VMM process, seconds.
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    /// Resident memory of the VMM process, bytes.
    #[serde(default)]
    pub resident_bytes: Option<u64>,
    /// Guest RAM KSM merged with other pages (`/proc/PID/ksm_merging_pages`), bytes.
    #[serde(default)]
    pub ksm_merging_bytes: Option<u64>,
    /// Per vCPU thread.
    #[serde(default)]
    pub vcpus: Vec<VcpuStats>,
    /// Memory charged to its cgroup, bytes.
    #[serde(default)]
    pub cgroup_memory_bytes: Option<u64>,
    /// Time its cgroup's CPU limit held it back, seconds.
    #[serde(default)]
    pub cpu_throttled_seconds: Option<f64>,
    /// Its devices' counters (the VMM's `vm.counters`: disks `disk0`.., NICs `net0`..).
    #[serde(default)]
    pub devices: std::collections::BTreeMap<String, api::types::DeviceCounters>,
    /// Its balloon (target, actual, the guest's memory statistics).
    #[serde(default)]
    pub balloon: Option<api::types::BalloonInfo>,
}

/// One vCPU thread's times, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VcpuStats {
    /// The vCPU's index.
    pub vcpu: u32,
    /// CPU time (user + system) of its thread.
    pub cpu_seconds: f64,
    /// Time its thread was runnable but waiting for a host CPU (CPU ready time).
    pub ready_seconds: f64,
}

/// `GET /api/v1/vms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmList {
    /// Every defined VM, by name.
    pub vms: Vec<VmSummary>,
}

/// One entry of the event and audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing sequence number.
    pub id: i64,
    /// When (Unix time, milliseconds).
    pub time_ms: i64,
    /// The VM concerned, if any.
    #[serde(default)]
    pub vm: Option<String>,
    /// What happened: "defined", "started", "start-failed", "stopped", "killed", "paused",
    /// "resumed", "deleted", "crashed", "restarted", "restart-limit", "restarts-reset",
    /// "adopted", "autostarted", "updated", "snapshot-created", "snapshot-reverted",
    /// "snapshot-deleted", "daemon-started", "orphan-stopped".
    pub kind: String,
    /// Details for a person (the reason of a crash, the pid of a VMM, ...).
    pub detail: String,
    /// The user ID of the API client that asked for it (absent: the daemon itself).
    #[serde(default)]
    pub peer_uid: Option<u32>,
    /// The process ID of that client, when the kernel told it.
    #[serde(default)]
    pub peer_pid: Option<i32>,
    /// The TCP client's address (`--listen`), for a request that came over TCP.
    #[serde(default)]
    pub peer_addr: Option<String>,
}

/// `GET /api/v1/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventList {
    /// Events in order, oldest first.
    pub events: Vec<Event>,
}

/// The body of every error response (4xx and 5xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// 400 (and a 409 for a name in use): the offending input field ("name",
    /// "config.memory_mib", "body", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// 409: the operation in progress on the VM ("start", "stop", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// 409: the VM's state that forbids the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "0", "web-1", "db_2.prod", &"x".repeat(63)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", ".a", "_a", "A", "a/b", "a b", "é", &"x".repeat(64), "a\0"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn policy_round_trip() {
        for p in [RestartPolicy::No, RestartPolicy::OnFailure, RestartPolicy::Always] {
            assert_eq!(p.as_str().parse::<RestartPolicy>().unwrap(), p);
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{}\"", p.as_str()));
        }
        assert!("sometimes".parse::<RestartPolicy>().is_err());
    }
}
