//! The command lines: `rustvisor daemon` ([`DaemonArgs`]) and its thin clients
//! `rustvisor vm ...` ([`VmArgs`]) and `rustvisor events` ([`EventsArgs`]).
//!
//! Exit status of the clients: 0 done; 1 the operation failed (the daemon is unreachable, a
//! VMM failed, another operation is in progress, the VM's state forbids it); 2 bad input
//! (a malformed flag, an unknown VM, a field the daemon refused: one line naming it and what
//! is accepted).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use api::client::{Client, ClientError};
use serde::de::DeserializeOwned;

use crate::types::{
    ErrorBody, Event, EventList, FirewallInfo, FirewallList, NetCheck, NetworkInfo, NetworkList, RestartPolicy,
    SnapshotInfo, SnapshotList, StopRequest, UpdateRequest, VmDetails, VmList, VmSummary, NAME_RULE,
};

mod drill;
mod resources;
mod top;

pub use drill::{drill, Drill, DrillArgs};
pub use resources::{capacity, CapacityArgs, ResourceFlags};
pub use top::{top, TopArgs};

/// The daemon's socket when neither `--connect` nor `RUSTVISOR_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/rustvisor/rustvisor.sock";

/// `rustvisor daemon`.
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// Persistent state: the store (rustvisor.db) and each VM's console log.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/rustvisor")]
    pub state_dir: PathBuf,
    /// Runtime files: each VMM's API socket.
    #[arg(long, value_name = "DIR", default_value = "/run/rustvisor")]
    pub run_dir: PathBuf,
    /// The daemon's API socket (mode 0660; group `rustvisor` when that group exists).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Also serve the API on TCP, e.g. 127.0.0.1:8006, to clients sending
    /// `Authorization: Bearer <token>` (needs --token-file).
    #[arg(long, value_name = "ADDR:PORT", requires = "token_file")]
    pub listen: Option<std::net::SocketAddr>,
    /// The bearer token for --listen: the file's first line, 16+ characters; the file must be
    /// mode 0600 or 0400.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Seconds a VM must run for its restart count to go back to 0.
    #[arg(long, value_name = "S", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub restart_reset_after: u64,
    /// The VMs' parent cgroup, relative to the cgroup hierarchy's root (each VM's VMM runs
    /// in `<parent>/<vm>`); `none` runs VMs without cgroups.
    #[arg(long, value_name = "PATH", default_value = "rustvisor.slice")]
    pub cgroup_parent: String,
    /// Admission: the most vCPUs of running VMs per host CPU.
    #[arg(long, value_name = "RATIO", default_value_t = 4.0)]
    pub cpu_overcommit: f64,
    /// Admission: the most guest memory of running VMs per byte of host memory.
    #[arg(long, value_name = "RATIO", default_value_t = 1.0)]
    pub mem_overcommit: f64,
    /// The most memory all VMs together may use (e.g. 16G; the parent cgroup's memory
    /// limit: beyond it the OOM killer picks among the VMs by priority). Default: the host's.
    #[arg(long, value_name = "SIZE")]
    pub vm_memory_limit: Option<String>,
    /// Do not balloon guests automatically when memory runs low.
    #[arg(long)]
    pub no_auto_balloon: bool,
    /// Start each VMM in a jail of its own: new mount, PID, IPC, UTS (and, without NICs,
    /// network) namespaces, a root holding only the VM's files, an unprivileged uid per VM, no
    /// capabilities (see the README's threat model). `off` runs VMMs as the daemon's user.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    pub jail: String,
}

/// Where the clients find the daemon.
#[derive(clap::Args, Debug, Clone)]
pub struct Connect {
    /// The daemon's API socket.
    #[arg(long, value_name = "PATH", env = "RUSTVISOR_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
    pub connect: PathBuf,
}

/// `rustvisor vm`: manage the daemon's VMs.
#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: Connect,
    /// What to do.
    #[command(subcommand)]
    pub command: VmCommand,
}

/// The `rustvisor vm` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum VmCommand {
    /// Define a VM (it is not started). Names: 1-63 characters, a-z or 0-9 first, then
    /// a-z, 0-9, '-', '_' or '.'.
    Create(Box<CreateArgs>),
    /// List the VMs: NAME STATE CPUS MEMORY UPTIME ACCEL PID.
    List {
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a VM (spawns its VMM and boots it).
    Start {
        /// The VM.
        name: String,
    },
    /// Stop a VM: the guest's power button, then the VMM; killed if it takes too long.
    Stop {
        /// The VM.
        name: String,
        /// Kill the VMM at once.
        #[arg(long)]
        force: bool,
        /// Seconds before the VMM is killed (1-3600, default 30).
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
    },
    /// Kill a VM's VMM at once.
    Kill {
        /// The VM.
        name: String,
    },
    /// Pause a running VM.
    Pause {
        /// The VM.
        name: String,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM.
        name: String,
    },
    /// Forget a stopped VM and its console log.
    Delete {
        /// The VM.
        name: String,
        /// Kill it first if it runs.
        #[arg(long)]
        force: bool,
    },
    /// Attach to a running VM's serial console (Ctrl-] detaches; the VM keeps running).
    /// Several consoles may watch one VM; the first attached types, the others are read-only
    /// until it leaves. Ends when the VM stops.
    Console {
        /// The VM.
        name: String,
    },
    /// A VM's state, configuration and files.
    Info {
        /// The VM.
        name: String,
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a VM: its policy at any time, its configuration while it is stopped.
    Set(Box<SetArgs>),
    /// Make a stopped VM a template: its pool volumes become read-only; it is cloned, never
    /// started.
    Template {
        /// The VM.
        name: String,
    },
    /// A new VM from a VM or template: copies of its pool volumes (`NEW-disk<i>`), new MACs.
    Clone {
        /// The VM or template.
        name: String,
        /// The new VM's name.
        new: String,
        /// Linked clones of the disks (qcow2 overlays; the source must be a template).
        #[arg(long)]
        linked: bool,
    },
    /// A VM's snapshots: create, list, revert, delete.
    Snapshot {
        /// The VM.
        vm: String,
        /// What to do.
        #[command(subcommand)]
        action: SnapshotAction,
    },
}

/// `rustvisor vm snapshot VM ...`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum SnapshotAction {
    /// Take a snapshot: the disks, and the guest's RAM and devices if it runs (it is paused
    /// meanwhile).
    Create {
        /// The snapshot's name (the VM name rules).
        name: String,
    },
    /// List the VM's snapshots: NAME CREATED SIZE KIND.
    List {
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bring the VM back to a snapshot: its disks and configuration, and its running guest
    /// for a snapshot taken while it ran. The VM's present state is lost.
    Revert {
        /// The snapshot.
        name: String,
    },
    /// Delete a snapshot.
    Delete {
        /// The snapshot.
        name: String,
    },
}

/// `rustvisor vm set`: the fields to change (at least one).
#[derive(clap::Args, Debug, Clone)]
pub struct SetArgs {
    /// The VM.
    pub name: String,
    /// Guest RAM, e.g. 1G (stopped VMs only).
    #[arg(long)]
    pub memory: Option<String>,
    /// vCPUs (stopped VMs only).
    #[arg(long)]
    pub cpus: Option<u8>,
    /// Kernel command line (stopped VMs only).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// A whole new configuration as JSON (stopped VMs only).
    #[arg(long, value_name = "SPEC.json")]
    pub from_file: Option<PathBuf>,
    /// Restart policy: no, on-failure or always.
    #[arg(long)]
    pub restart: Option<String>,
    /// Start with the host: true or false.
    #[arg(long)]
    pub autostart: Option<bool>,
    /// Autostart order, lower first (0-1000).
    #[arg(long, value_name = "N")]
    pub start_order: Option<u32>,
    /// Seconds to wait after autostarting it before the next VM (0-600).
    #[arg(long, value_name = "S")]
    pub start_delay: Option<u32>,
    /// The balloon's size, e.g. 256M: memory taken from the running guest (a VM created
    /// with `--balloon`); 0 gives it all back.
    #[arg(long, value_name = "SIZE")]
    pub balloon: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub resources: ResourceFlags,
}

/// `rustvisor vm create`: the device flags of `rustvisor run`, or a JSON file.
#[derive(clap::Args, Debug, Clone)]
pub struct CreateArgs {
    /// The VM's name.
    pub name: String,
    /// The configuration as JSON (the VMM API's VmConfig: crates/api/openapi.yaml) instead
    /// of the flags below.
    #[arg(long, value_name = "SPEC.json", conflicts_with_all = ["kernel", "initrd", "cmdline", "memory", "cpus", "accel", "disk", "net", "vsock", "rng", "console", "balloon"])]
    pub from_file: Option<PathBuf>,
    /// What to do when the VM ends by itself: no, on-failure (after a crash) or always
    /// (also after a guest power-off).
    #[arg(long, default_value = "no")]
    pub restart: String,
    /// Start the VM when the host boots (the daemon's first start after a boot).
    #[arg(long)]
    pub autostart: bool,
    /// Autostart order, lower first (0-1000).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub start_order: u32,
    /// Seconds to wait after autostarting this VM before the next one (0-600).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub start_delay: u32,
    /// Kernel: bzImage or ELF vmlinux.
    #[arg(long, required_unless_present = "from_file")]
    pub kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
    /// Guest RAM, e.g. 512M or 1G (whole MiB).
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Accelerator: auto, kvm or emu.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// A virtio-blk disk, as for `rustvisor run`, or a pool volume: vol=POOL/NAME[,readonly=on]
    /// (repeatable).
    #[arg(long, value_name = "OPTIONS")]
    pub disk: Vec<String>,
    /// A virtio-net NIC, as for `rustvisor run` (repeatable).
    #[arg(long, value_name = "OPTIONS")]
    pub net: Vec<String>,
    /// A virtio-vsock device: cid=N,socket=PATH.
    #[arg(long, value_name = "OPTIONS")]
    pub vsock: Option<String>,
    /// A virtio-rng device.
    #[arg(long)]
    pub rng: bool,
    /// A virtio-console: file=PATH or null.
    #[arg(long)]
    pub console: Option<String>,
    /// A virtio-balloon device (then `vm set --balloon SIZE` takes memory back from the
    /// running guest).
    #[arg(long)]
    pub balloon: bool,
    /// A NIC on one of the daemon's networks: `net=NAME[,vlan=N][,mac=MAC][,firewall=GROUP]`
    /// (repeatable; the daemon makes its TAP when the VM starts).
    #[arg(long, value_name = "OPTIONS")]
    pub nic: Vec<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub resources: ResourceFlags,
}

/// `--disk vol=POOL/NAME[,readonly=on]`.
fn volume_attach(d: &str) -> Result<crate::types::VolumeAttach, Failure> {
    let mut out = crate::types::VolumeAttach { volume: String::new(), readonly: false };
    for part in d.split(',') {
        match part.split_once('=') {
            Some(("vol", v)) => out.volume = v.to_string(),
            Some(("readonly", "on" | "true")) => out.readonly = true,
            Some(("readonly", "off" | "false")) => out.readonly = false,
            _ => {
                return Err(failure(
                    2,
                    format!("--disk: '{part}' (accepted with vol=: vol=POOL/NAME[,readonly=on|off])"),
                ))
            }
        }
    }
    Ok(out)
}

/// `rustvisor pool`: storage pools (directories of volumes).
#[derive(clap::Args, Debug, Clone)]
pub struct PoolArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: Connect,
    /// What to do.
    #[command(subcommand)]
    pub command: PoolCommand,
}

/// The `rustvisor pool` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum PoolCommand {
    /// Create a directory pool (the folder is made if absent).
    Create {
        /// The pool's name.
        name: String,
        /// Its folder.
        #[arg(long)]
        path: PathBuf,
    },
    /// List the pools: NAME PATH CAPACITY FREE ALLOCATED VIRTUAL VOLUMES.
    List {
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// One pool's space.
    Info {
        /// The pool.
        name: String,
    },
    /// Forget an empty pool (its folder stays).
    Delete {
        /// The pool.
        name: String,
    },
}

/// `rustvisor volume`: a pool's disk images.
#[derive(clap::Args, Debug, Clone)]
pub struct VolumeArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: Connect,
    /// What to do.
    #[command(subcommand)]
    pub command: VolumeCommand,
}

/// The `rustvisor volume` subcommands; volumes are named `POOL/NAME`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum VolumeCommand {
    /// Create a thin volume.
    Create {
        /// POOL/NAME.
        volume: String,
        /// Its size, e.g. 8G.
        #[arg(long)]
        size: String,
        /// qcow2 (default) or raw (sparse).
        #[arg(long, default_value = "qcow2")]
        format: String,
        /// Reserve the space now.
        #[arg(long)]
        preallocate: bool,
    },
    /// Copy an image file in (checked as untrusted; a qcow2 is flattened).
    Import {
        /// POOL/NAME.
        volume: String,
        /// The file.
        #[arg(long)]
        from: PathBuf,
        /// The file's format (give it for a raw image a guest wrote); default: detected.
        #[arg(long)]
        source_format: Option<String>,
    },
    /// Grow a volume (never shrink).
    Resize {
        /// POOL/NAME.
        volume: String,
        /// The new size, e.g. 16G.
        #[arg(long)]
        size: String,
    },
    /// Copy a volume, or make a linked clone (a qcow2 overlay on it).
    Clone {
        /// POOL/NAME of the source.
        source: String,
        /// POOL/NAME of the new volume.
        target: String,
        /// A linked clone.
        #[arg(long)]
        linked: bool,
    },
    /// List a pool's volumes: NAME FORMAT VIRTUAL ALLOCATED BACKING USED-BY.
    List {
        /// The pool.
        pool: String,
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// One volume.
    Info {
        /// POOL/NAME.
        volume: String,
    },
    /// Delete a volume no VM uses and nothing is built on.
    Delete {
        /// POOL/NAME.
        volume: String,
    },
}

/// `rustvisor backup`: VM backups.
#[derive(clap::Args, Debug, Clone)]
pub struct BackupArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: Connect,
    /// What to do.
    #[command(subcommand)]
    pub command: BackupCommand,
}

/// The `rustvisor backup` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum BackupCommand {
    /// Back a stopped VM up: its definition and its disks' data, with a checksum.
    Create {
        /// The VM.
        vm: String,
        /// Where (default `<state-dir>/backups`).
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// List the backups: ID VM CREATED SIZE.
    List {
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup as a new VM (its disks as new volumes in --pool, new MACs); a
    /// corrupt backup is refused.
    Restore {
        /// The backup's id.
        id: String,
        /// The new VM's name (default: the backed-up VM's).
        #[arg(long = "as")]
        name: Option<String>,
        /// The pool for its disks.
        #[arg(long)]
        pool: String,
    },
    /// Delete a backup.
    Delete {
        /// The backup's id.
        id: String,
    },
}

/// `POOL/NAME` → (pool, name); exit 2 otherwise.
fn split_volume(v: &str) -> Result<(&str, &str), Failure> {
    match v.split_once('/') {
        Some((p, n)) if crate::types::valid_name(p) && crate::types::valid_name(n) => Ok((p, n)),
        _ => Err(failure(2, format!("volume: '{v}' (accepted: POOL/NAME, each {NAME_RULE})"))),
    }
}

fn size_flag(flag: &str, s: &str) -> Result<u64, Failure> {
    vmm::config::parse_size(s).map_err(|e| failure(2, format!("{flag}: {e}")))
}

/// Runs `rustvisor pool ...`.
pub fn pool(a: PoolArgs) -> ExitCode {
    finish(pool_text(&a))
}

fn pool_text(a: &PoolArgs) -> Result<String, Failure> {
    let c = DaemonClient::new(&a.connect.connect, Duration::from_secs(600))?;
    Ok(match &a.command {
        PoolCommand::Create { name, path } => {
            check_name(name)?;
            let path = std::path::absolute(path).map_err(|e| failure(2, format!("--path: {e}")))?;
            let body = serde_json::to_vec(&serde_json::json!({ "name": name, "path": path }))
                .map_err(|e| failure(1, e.to_string()))?;
            let p: crate::types::PoolDetails = decode(&c.call("POST", "pools", Some(body))?)?;
            format!("pool '{name}' created at {}\n", p.info.path.display())
        }
        PoolCommand::List { json } => {
            let list: crate::types::PoolList = c.get("pools")?;
            if *json {
                return to_json(&list);
            }
            format_pools(&list.pools)
        }
        PoolCommand::Info { name } => {
            check_name(name)?;
            let p: crate::types::PoolDetails = c.get(&format!("pools/{name}"))?;
            format_pools(std::slice::from_ref(&p))
        }
        PoolCommand::Delete { name } => {
            check_name(name)?;
            c.call("DELETE", &format!("pools/{name}"), None)?;
            format!("pool '{name}' deleted\n")
        }
    })
}

/// The `pool list` table.
pub fn format_pools(pools: &[crate::types::PoolDetails]) -> String {
    let mut rows =
        vec![["NAME", "PATH", "CAPACITY", "FREE", "ALLOCATED", "VIRTUAL", "VOLUMES"].map(String::from).to_vec()];
    for p in pools {
        let i = &p.info;
        rows.push(vec![
            p.name.clone(),
            i.path.display().to_string(),
            format_bytes(i.capacity_bytes),
            format_bytes(i.available_bytes),
            format_bytes(i.allocated_bytes),
            format_bytes(i.virtual_bytes),
            i.volumes.to_string(),
        ]);
    }
    table(&rows)
}

/// Runs `rustvisor volume ...`.
pub fn volume(a: VolumeArgs) -> ExitCode {
    finish(volume_text(&a))
}

fn volume_text(a: &VolumeArgs) -> Result<String, Failure> {
    use crate::types::{VolumeDetails, VolumeList};
    let c = DaemonClient::new(&a.connect.connect, Duration::from_secs(3600))?;
    let post = |route: String, body: serde_json::Value| -> Result<VolumeDetails, Failure> {
        let body = serde_json::to_vec(&body).map_err(|e| failure(1, e.to_string()))?;
        decode(&c.call("POST", &route, Some(body))?)
    };
    Ok(match &a.command {
        VolumeCommand::Create { volume, size, format, preallocate } => {
            let (pool, name) = split_volume(volume)?;
            let size = size_flag("--size", size)?;
            let v = post(
                format!("pools/{pool}/volumes"),
                serde_json::json!({ "name": name, "size_bytes": size, "format": format, "preallocate": preallocate }),
            )?;
            format!(
                "volume {pool}/{name} created ({}, {})\n",
                v.info.format.as_str(),
                format_bytes(v.info.virtual_bytes)
            )
        }
        VolumeCommand::Import { volume, from, source_format } => {
            let (pool, name) = split_volume(volume)?;
            let from = std::path::absolute(from).map_err(|e| failure(2, format!("--from: {e}")))?;
            let v = post(
                format!("pools/{pool}/volumes"),
                serde_json::json!({ "name": name, "import_from": from, "source_format": source_format }),
            )?;
            format!(
                "volume {pool}/{name} imported ({}, {})\n",
                v.info.format.as_str(),
                format_bytes(v.info.virtual_bytes)
            )
        }
        VolumeCommand::Resize { volume, size } => {
            let (pool, name) = split_volume(volume)?;
            let size = size_flag("--size", size)?;
            let body = serde_json::to_vec(&serde_json::json!({ "size_bytes": size }))
                .map_err(|e| failure(1, e.to_string()))?;
            let v: VolumeDetails =
                decode(&c.call("PUT", &format!("pools/{pool}/volumes/{name}/resize"), Some(body))?)?;
            format!("volume {pool}/{name} resized to {}\n", format_bytes(v.info.virtual_bytes))
        }
        VolumeCommand::Clone { source, target, linked } => {
            let (pool, name) = split_volume(source)?;
            let (tpool, tname) = split_volume(target)?;
            post(
                format!("pools/{pool}/volumes/{name}/clone"),
                serde_json::json!({ "name": tname, "pool": tpool, "linked": linked }),
            )?;
            format!("volume {tpool}/{tname} cloned from {pool}/{name} ({})\n", if *linked { "linked" } else { "full" })
        }
        VolumeCommand::List { pool, json } => {
            check_name(pool)?;
            let list: VolumeList = c.get(&format!("pools/{pool}/volumes"))?;
            if *json {
                return to_json(&list);
            }
            format_volumes(&list.volumes)
        }
        VolumeCommand::Info { volume } => {
            let (pool, name) = split_volume(volume)?;
            let v: VolumeDetails = c.get(&format!("pools/{pool}/volumes/{name}"))?;
            to_json(&v)?
        }
        VolumeCommand::Delete { volume } => {
            let (pool, name) = split_volume(volume)?;
            c.call("DELETE", &format!("pools/{pool}/volumes/{name}"), None)?;
            format!("volume {pool}/{name} deleted\n")
        }
    })
}

/// The `volume list` table.
pub fn format_volumes(vols: &[crate::types::VolumeDetails]) -> String {
    let mut rows = vec![["NAME", "FORMAT", "VIRTUAL", "ALLOCATED", "BACKING", "USED-BY"].map(String::from).to_vec()];
    for v in vols {
        let i = &v.info;
        rows.push(vec![
            format!("{}{}", i.name, if i.read_only { " (ro)" } else { "" }),
            i.format.as_str().to_string(),
            format_bytes(i.virtual_bytes),
            format_bytes(i.allocated_bytes),
            i.backing.clone().unwrap_or_else(|| "-".into()),
            if v.used_by.is_empty() { "-".into() } else { v.used_by.join(",") },
        ]);
    }
    table(&rows)
}

/// Runs `rustvisor backup ...`.
pub fn backup(a: BackupArgs) -> ExitCode {
    finish(backup_text(&a))
}

fn backup_text(a: &BackupArgs) -> Result<String, Failure> {
    use crate::types::{BackupInfo, BackupList};
    let c = DaemonClient::new(&a.connect.connect, Duration::from_secs(3600))?;
    Ok(match &a.command {
        BackupCommand::Create { vm, to } => {
            check_name(vm)?;
            let to = to.as_ref().map(std::path::absolute).transpose().map_err(|e| failure(2, format!("--to: {e}")))?;
            let body = serde_json::to_vec(&serde_json::json!({ "to": to })).map_err(|e| failure(1, e.to_string()))?;
            let b: BackupInfo = decode(&c.call("POST", &format!("vms/{vm}/backups"), Some(body))?)?;
            format!(
                "backup {} of VM '{vm}' ({}, sha256 {})\n",
                b.id,
                format_bytes(u64::try_from(b.bytes).unwrap_or(0)),
                b.sha256
            )
        }
        BackupCommand::List { json } => {
            let list: BackupList = c.get("backups")?;
            if *json {
                return to_json(&list);
            }
            let mut rows = vec![["ID", "VM", "CREATED", "SIZE"].map(String::from).to_vec()];
            for b in &list.backups {
                rows.push(vec![
                    b.id.clone(),
                    b.vm.clone(),
                    format_time(b.created_ms),
                    format_bytes(u64::try_from(b.bytes).unwrap_or(0)),
                ]);
            }
            table(&rows)
        }
        BackupCommand::Restore { id, name, pool } => {
            check_name(id)?;
            let body = serde_json::to_vec(&serde_json::json!({ "name": name, "pool": pool }))
                .map_err(|e| failure(1, e.to_string()))?;
            let v: VmSummary = decode(&c.call("POST", &format!("backups/{id}/restore"), Some(body))?)?;
            format!("backup {id} restored as VM '{}'\n", v.name)
        }
        BackupCommand::Delete { id } => {
            check_name(id)?;
            c.call("DELETE", &format!("backups/{id}"), None)?;
            format!("backup {id} deleted\n")
        }
    })
}

/// `rustvisor net`: the daemon's virtual networks.
#[derive(clap::Args, Debug, Clone)]
pub struct NetArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: Connect,
    /// What to do.
    #[command(subcommand)]
    pub command: NetCommand,
}

/// The `rustvisor net` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum NetCommand {
    /// Create a network: a Linux bridge `rv-NAME`, with the host's address, DHCP, NAT or
    /// isolation as asked.
    Create {
        /// The network's name (the VM name rules).
        name: String,
        /// The host's address on it and the prefix, e.g. 10.77.0.1/24.
        #[arg(long, value_name = "CIDR")]
        subnet: Option<String>,
        /// Serve DHCP to the guests (dnsmasq); needs --subnet.
        #[arg(long)]
        dhcp: bool,
        /// Masquerade the subnet through the host's routes; needs --subnet.
        #[arg(long)]
        nat: bool,
        /// No host routing: guests reach only each other.
        #[arg(long)]
        isolated: bool,
        /// Bridge VLAN filtering, for NICs with vlan=N.
        #[arg(long)]
        vlan_filtering: bool,
    },
    /// List the networks: NAME BRIDGE SUBNET OPTIONS VMS PROBLEMS.
    List {
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// A network's definition, users, leases and problems.
    Info {
        /// The network.
        name: String,
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a network no VM uses.
    Delete {
        /// The network.
        name: String,
    },
    /// Compare the host with the networks and running NICs; exit 1 when something is wrong.
    Check {
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `rustvisor firewall`: the daemon's firewall groups.
#[derive(clap::Args, Debug, Clone)]
pub struct FirewallArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: Connect,
    /// What to do.
    #[command(subcommand)]
    pub command: FirewallCommand,
}

/// The rules of `firewall create` and `firewall set`.
#[derive(clap::Args, Debug, Clone)]
pub struct FirewallRules {
    /// The group's name.
    pub name: String,
    /// Accept matching traffic: `in|out tcp|udp|icmp|any[/PORT[-PORT]]` (repeatable). The
    /// --deny rules match first, then the --allow rules, then the defaults.
    #[arg(long, value_name = "RULE")]
    pub allow: Vec<String>,
    /// Drop matching traffic, as --allow.
    #[arg(long, value_name = "RULE")]
    pub deny: Vec<String>,
    /// What happens to traffic to the VM no rule matches: accept or drop.
    #[arg(long, default_value = "accept")]
    pub default_in: String,
    /// What happens to traffic from the VM no rule matches: accept or drop.
    #[arg(long, default_value = "accept")]
    pub default_out: String,
}

/// The `rustvisor firewall` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum FirewallCommand {
    /// Create a group.
    Create(FirewallRules),
    /// Replace a group's rules; applied at once to the running VMs in it.
    Set(FirewallRules),
    /// List the groups with their rules and users.
    List {
        /// Print the daemon's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a group no VM uses.
    Delete {
        /// The group.
        name: String,
    },
}

/// `rustvisor events`: the event and audit log.
#[derive(clap::Args, Debug, Clone)]
pub struct EventsArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: Connect,
    /// Only this VM's events.
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
    /// Print the daemon's JSON (one object a line with --follow).
    #[arg(long)]
    pub json: bool,
    /// Keep printing new events as they happen (until interrupted).
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// Runs `rustvisor daemon`.
pub fn daemon(a: DaemonArgs) -> ExitCode {
    let vmm_exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(1, &format!("cannot find the rustvisor executable: {e}")),
    };
    for (flag, r) in [("--cpu-overcommit", a.cpu_overcommit), ("--mem-overcommit", a.mem_overcommit)] {
        if !(r.is_finite() && (0.1..=100.0).contains(&r)) {
            return fail(2, &format!("{flag}: {r} (accepted: 0.1 to 100)"));
        }
    }
    let vm_memory_limit_mib = match a.vm_memory_limit.as_deref().map(vmm::config::parse_size).transpose() {
        Ok(Some(b)) if b >= 64 << 20 => Some(b >> 20),
        Ok(None) => None,
        Ok(Some(_)) => return fail(2, "--vm-memory-limit: below 64M (accepted: a size such as 16G)"),
        Err(e) => return fail(2, &format!("--vm-memory-limit: {e}")),
    };
    let resources = crate::service::ResourceOptions {
        cgroup_parent: (a.cgroup_parent != "none").then_some(a.cgroup_parent),
        overcommit: crate::types::OvercommitPolicy { cpu: a.cpu_overcommit, memory: a.mem_overcommit },
        vm_memory_limit_mib,
        auto_balloon: !a.no_auto_balloon,
    };
    let cfg = crate::daemon::DaemonConfig {
        state_dir: a.state_dir,
        run_dir: a.run_dir,
        socket: a.socket,
        vmm_exe,
        listen: a.listen,
        token_file: a.token_file,
        restart_reset_after: Duration::from_secs(a.restart_reset_after),
        jail: a.jail == "on",
        resources,
    };
    match crate::daemon::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ crate::daemon::DaemonError::Config(_)) => fail(2, &e.to_string()),
        Err(e) => fail(1, &e.to_string()),
    }
}

/// A failure of a client command: exit status and one line.
#[derive(Debug)]
pub struct Failure {
    /// 1 (operation failed) or 2 (bad input).
    pub code: u8,
    /// What went wrong.
    pub message: String,
}

fn failure(code: u8, message: impl Into<String>) -> Failure {
    Failure { code, message: message.into() }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("rustvisor: {}", msg.replace(['\n', '\r'], " "));
    ExitCode::from(code)
}

fn finish(r: Result<String, Failure>) -> ExitCode {
    match r {
        Ok(text) => {
            let mut out = io::stdout().lock();
            match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(1, &format!("cannot write the output: {e}")),
            }
        }
        Err(f) => fail(f.code, &f.message),
    }
}

/// Runs `rustvisor vm ...`.
pub fn vm(a: VmArgs) -> ExitCode {
    finish(vm_text(&a))
}

/// Runs `rustvisor net ...`.
pub fn net(a: NetArgs) -> ExitCode {
    match net_text(&a) {
        Ok((text, healthy)) => {
            let code = finish(Ok(text));
            if healthy {
                code
            } else {
                ExitCode::from(1)
            }
        }
        Err(f) => fail(f.code, &f.message),
    }
}

/// Runs `rustvisor firewall ...`.
pub fn firewall(a: FirewallArgs) -> ExitCode {
    finish(firewall_text(&a))
}

/// The output of `net ...`, and whether `net check` found nothing wrong.
fn net_text(a: &NetArgs) -> Result<(String, bool), Failure> {
    let c = DaemonClient::new(&a.connect.connect, Duration::from_secs(60))?;
    let bad = |m: String| failure(2, m);
    Ok(match &a.command {
        NetCommand::Create { name, subnet, dhcp, nat, isolated, vlan_filtering } => {
            check_name(name)?;
            let subnet: Option<crate::types::Ipv4Cidr> =
                subnet.as_deref().map(str::parse).transpose().map_err(|e| bad(format!("--subnet: {e}")))?;
            let req = crate::types::NetworkCreate {
                name: name.clone(),
                subnet,
                dhcp: *dhcp,
                nat: *nat,
                isolated: *isolated,
                vlan_filtering: *vlan_filtering,
            };
            let body = serde_json::to_vec(&req).map_err(|e| failure(1, e.to_string()))?;
            let n: NetworkInfo = decode(&c.call("POST", "networks", Some(body))?)?;
            (format!("network '{}' created (bridge {})\n", n.spec.name, n.spec.bridge), true)
        }
        NetCommand::List { json } => {
            let list: NetworkList = c.get("networks")?;
            if *json {
                (to_json(&list)?, true)
            } else {
                (format_networks(&list.networks), true)
            }
        }
        NetCommand::Info { name, json } => {
            check_name(name)?;
            let n: NetworkInfo = c.get(&format!("networks/{name}"))?;
            if *json {
                (to_json(&n)?, true)
            } else {
                let mut s = format_networks(std::slice::from_ref(&n));
                for l in &n.leases {
                    s += &format!("lease: {} {} {}\n", l.mac, l.ip, l.hostname.as_deref().unwrap_or("-"));
                }
                for p in &n.problems {
                    s += &format!("problem: {p}\n");
                }
                (s, true)
            }
        }
        NetCommand::Delete { name } => {
            check_name(name)?;
            c.call("DELETE", &format!("networks/{name}"), None)?;
            (format!("network '{name}' deleted\n"), true)
        }
        NetCommand::Check { json } => {
            let r: NetCheck = c.get("netcheck")?;
            let healthy = r.problems.is_empty();
            if *json {
                (to_json(&r)?, healthy)
            } else if healthy {
                ("no problems found\n".into(), true)
            } else {
                (r.problems.iter().map(|p| format!("{p}\n")).collect(), false)
            }
        }
    })
}

/// The `net list` table.
pub fn format_networks(nets: &[NetworkInfo]) -> String {
    let mut rows = vec![["NAME", "BRIDGE", "SUBNET", "OPTIONS", "VMS", "PROBLEMS"].map(String::from).to_vec()];
    for n in nets {
        let s = &n.spec;
        let opts: Vec<&str> = [(s.dhcp, "dhcp"), (s.nat, "nat"), (s.isolated, "isolated"), (s.vlan_filtering, "vlans")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        rows.push(vec![
            s.name.clone(),
            s.bridge.clone(),
            s.subnet.map_or("-".into(), |c| c.to_string()),
            if opts.is_empty() { "-".into() } else { opts.join(",") },
            if n.used_by.is_empty() { "-".into() } else { n.used_by.join(",") },
            n.problems.len().to_string(),
        ]);
    }
    table(&rows)
}

/// Left-aligned columns two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut s = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        s += line.join("  ").trim_end();
        s += "\n";
    }
    s
}

fn firewall_text(a: &FirewallArgs) -> Result<String, Failure> {
    let c = DaemonClient::new(&a.connect.connect, Duration::from_secs(60))?;
    Ok(match &a.command {
        FirewallCommand::Create(r) | FirewallCommand::Set(r) => {
            check_name(&r.name)?;
            let spec = firewall_spec(r)?;
            let body = serde_json::to_vec(&spec).map_err(|e| failure(1, e.to_string()))?;
            let create = matches!(a.command, FirewallCommand::Create(_));
            let f: FirewallInfo = if create {
                decode(&c.call("POST", "firewalls", Some(body))?)?
            } else {
                decode(&c.call("PUT", &format!("firewalls/{}", r.name), Some(body))?)?
            };
            format!(
                "firewall group '{}' {} ({} rules)\n",
                f.spec.name,
                if create { "created" } else { "updated" },
                f.spec.rules.len()
            )
        }
        FirewallCommand::List { json } => {
            let list: FirewallList = c.get("firewalls")?;
            if *json {
                return to_json(&list);
            }
            let mut s = String::new();
            for f in &list.firewalls {
                let rules: Vec<String> = f.spec.rules.iter().map(ToString::to_string).collect();
                s += &format!(
                    "{}: {} | default in {}, out {} | VMs: {}\n",
                    f.spec.name,
                    if rules.is_empty() { "-".into() } else { rules.join("; ") },
                    f.spec.default_in,
                    f.spec.default_out,
                    if f.used_by.is_empty() { "-".into() } else { f.used_by.join(",") }
                );
            }
            s
        }
        FirewallCommand::Delete { name } => {
            check_name(name)?;
            c.call("DELETE", &format!("firewalls/{name}"), None)?;
            format!("firewall group '{name}' deleted\n")
        }
    })
}

/// The group of `firewall create|set`'s flags: the --deny rules first, then the --allow
/// rules, each in the order given; bad rules are exit 2.
fn firewall_spec(r: &FirewallRules) -> Result<crate::types::FirewallSpec, Failure> {
    let bad = |m: String| failure(2, m);
    let ordered = r.deny.iter().map(|v| format!("deny {v}")).chain(r.allow.iter().map(|v| format!("allow {v}")));
    let rules = ordered
        .into_iter()
        .map(|text| text.parse::<hostnet::Rule>().map_err(|e| bad(format!("rule '{text}': {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let action = |flag: &str, v: &str| v.parse::<hostnet::Action>().map_err(|e| bad(format!("{flag}: {e}")));
    Ok(crate::types::FirewallSpec {
        name: r.name.clone(),
        rules,
        default_in: action("--default-in", &r.default_in)?,
        default_out: action("--default-out", &r.default_out)?,
    })
}

/// Runs `rustvisor events`.
pub fn events(a: EventsArgs) -> ExitCode {
    if a.follow {
        return match follow_events(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(f) => fail(f.code, &f.message),
        };
    }
    finish(events_text(&a))
}

/// The daemon's client for the CLI: each call on a fresh connection.
struct DaemonClient {
    client: Client,
}

impl DaemonClient {
    fn new(socket: &Path, timeout: Duration) -> Result<DaemonClient, Failure> {
        let client = Client::new(socket).map_err(|e| failure(1, format!("cannot start the client: {e}")))?;
        Ok(DaemonClient { client: client.with_timeout(timeout) })
    }

    /// Sends a request to `route` (under /api/v1/); returns the body of a 2xx answer.
    fn call(&self, method: &str, route: &str, body: Option<Vec<u8>>) -> Result<Vec<u8>, Failure> {
        let resp = self.client.request(method, route, body).map_err(|e| match e {
            ClientError::Connect { socket, source } => failure(
                1,
                format!("cannot connect to the daemon at {}: {source} (is `rustvisor daemon` running? see --connect, RUSTVISOR_SOCKET)", socket.display()),
            ),
            other => failure(1, other.to_string()),
        })?;
        if (200..300).contains(&resp.status) {
            return Ok(resp.body);
        }
        let body = serde_json::from_slice::<ErrorBody>(&resp.body).ok();
        let message = match &body {
            Some(b) => b.error.clone(),
            None => String::from_utf8_lossy(&resp.body).chars().take(200).collect(),
        };
        // Bad input: a malformed request (400), an unknown VM (404), or a field the daemon
        // refused (a name in use).
        let bad_input = matches!(resp.status, 400 | 404) || body.as_ref().is_some_and(|b| b.field.is_some());
        Err(failure(if bad_input { 2 } else { 1 }, message))
    }

    fn get<T: DeserializeOwned>(&self, route: &str) -> Result<T, Failure> {
        decode(&self.call("GET", route, None)?)
    }
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| failure(1, format!("unexpected answer from the daemon: {e}")))
}

fn check_name(name: &str) -> Result<(), Failure> {
    if crate::types::valid_name(name) {
        Ok(())
    } else {
        Err(failure(2, format!("name: '{}' is not a valid VM name ({NAME_RULE})", name.escape_debug())))
    }
}

fn vm_text(a: &VmArgs) -> Result<String, Failure> {
    let socket = &a.connect.connect;
    let c = DaemonClient::new(socket, Duration::from_secs(120))?;
    let lifecycle = |verb: &str, name: &str, body: Option<Vec<u8>>, c: &DaemonClient| -> Result<VmSummary, Failure> {
        check_name(name)?;
        decode(&c.call("PUT", &format!("vms/{name}/{verb}"), body)?)
    };
    Ok(match &a.command {
        VmCommand::Create(args) => {
            let body = create_body(args)?;
            let vm: VmSummary = decode(&c.call("POST", "vms", Some(body))?)?;
            format!("VM '{}' defined (restart {})\n", vm.name, vm.restart.as_str())
        }
        VmCommand::List { json } => {
            let list: VmList = c.get("vms")?;
            if *json {
                to_json(&list)?
            } else {
                format_list(&list.vms)
            }
        }
        VmCommand::Start { name } => {
            let vm = lifecycle("start", name, None, &c)?;
            format!("VM '{name}' started (pid {})\n", vm.pid.map_or("-".into(), |p| p.to_string()))
        }
        VmCommand::Stop { name, force, timeout } => {
            let req = StopRequest { force: *force, timeout_s: *timeout };
            let c = DaemonClient::new(socket, Duration::from_secs(timeout.unwrap_or(30).saturating_add(60)))?;
            let body = serde_json::to_vec(&req).map_err(|e| failure(1, e.to_string()))?;
            let vm = lifecycle("stop", name, Some(body), &c)?;
            format!("VM '{name}' stopped ({})\n", vm.reason.unwrap_or_default())
        }
        VmCommand::Kill { name } => {
            lifecycle("kill", name, None, &c)?;
            format!("VM '{name}' killed\n")
        }
        VmCommand::Pause { name } => {
            lifecycle("pause", name, None, &c)?;
            format!("VM '{name}' paused\n")
        }
        VmCommand::Resume { name } => {
            lifecycle("resume", name, None, &c)?;
            format!("VM '{name}' resumed\n")
        }
        VmCommand::Delete { name, force } => {
            check_name(name)?;
            let q = if *force { "?force=true" } else { "" };
            c.call("DELETE", &format!("vms/{name}{q}"), None)?;
            format!("VM '{name}' deleted\n")
        }
        VmCommand::Console { name } => {
            console(socket, name)?;
            String::new()
        }
        VmCommand::Info { name, json } => {
            check_name(name)?;
            let d: VmDetails = c.get(&format!("vms/{name}"))?;
            if *json {
                to_json(&d)?
            } else {
                format_info(&d)
            }
        }
        VmCommand::Template { name } => {
            check_name(name)?;
            c.call("PUT", &format!("vms/{name}/template"), None)?;
            format!("VM '{name}' is a template\n")
        }
        VmCommand::Clone { name, new, linked } => {
            check_name(name)?;
            check_name(new)?;
            let body = serde_json::to_vec(&serde_json::json!({ "name": new, "linked": linked }))
                .map_err(|e| failure(1, e.to_string()))?;
            let _: VmSummary = decode(&c.call("POST", &format!("vms/{name}/clone"), Some(body))?)?;
            format!("VM '{new}' cloned from '{name}' ({})\n", if *linked { "linked" } else { "full" })
        }
        VmCommand::Set(args) => {
            check_name(&args.name)?;
            // The resources are sent whole: the daemon's, with the flags applied.
            let resources = if args.resources.any() {
                let d: VmDetails = c.get(&format!("vms/{}", args.name))?;
                let mut r = d.resources;
                args.resources.apply(&mut r)?;
                Some(r)
            } else {
                None
            };
            let body = set_body(args, resources)?;
            let _: VmDetails = decode(&c.call("PATCH", &format!("vms/{}", args.name), Some(body))?)?;
            format!("VM '{}' updated\n", args.name)
        }
        VmCommand::Snapshot { vm, action } => {
            check_name(vm)?;
            let c = DaemonClient::new(socket, Duration::from_secs(600))?;
            match action {
                SnapshotAction::Create { name } => {
                    let body = serde_json::to_vec(&serde_json::json!({ "name": name }))
                        .map_err(|e| failure(1, e.to_string()))?;
                    let s: SnapshotInfo = decode(&c.call("POST", &format!("vms/{vm}/snapshots"), Some(body))?)?;
                    format!(
                        "snapshot '{}' of VM '{vm}' created ({}, {})\n",
                        s.name,
                        if s.memory { "disks and RAM" } else { "disks only" },
                        format_bytes(s.size_bytes)
                    )
                }
                SnapshotAction::List { json } => {
                    let list: SnapshotList = c.get(&format!("vms/{vm}/snapshots"))?;
                    if *json {
                        to_json(&list)?
                    } else {
                        format_snapshots(&list.snapshots)
                    }
                }
                SnapshotAction::Revert { name } => {
                    check_name(name)?;
                    c.call("PUT", &format!("vms/{vm}/snapshots/{name}/revert"), None)?;
                    format!("VM '{vm}' reverted to snapshot '{name}'\n")
                }
                SnapshotAction::Delete { name } => {
                    check_name(name)?;
                    c.call("DELETE", &format!("vms/{vm}/snapshots/{name}"), None)?;
                    format!("snapshot '{name}' of VM '{vm}' deleted\n")
                }
            }
        }
    })
}

/// The `PATCH /vms/{name}` body from `vm set`'s flags; bad flags are exit 2.
fn set_body(a: &SetArgs, resources: Option<crate::types::Resources>) -> Result<Vec<u8>, Failure> {
    let bad = |m: String| failure(2, m);
    let memory_mib = match &a.memory {
        Some(m) => {
            let bytes = vmm::config::parse_size(m).map_err(|e| bad(format!("--memory: {e}")))?;
            if bytes % (1 << 20) != 0 {
                return Err(bad(format!("--memory: '{m}' is not a whole number of MiB (e.g. 512M, 1G)")));
            }
            Some(bytes >> 20)
        }
        None => None,
    };
    let restart = a
        .restart
        .as_deref()
        .map(str::parse::<RestartPolicy>)
        .transpose()
        .map_err(|e| bad(format!("--restart: {e}")))?;
    let config = match &a.from_file {
        Some(file) => {
            let text = std::fs::read(file).map_err(|e| bad(format!("--from-file: {}: {e}", file.display())))?;
            Some(
                serde_json::from_slice::<serde_json::Value>(&text)
                    .map_err(|e| bad(format!("--from-file: {}: not JSON: {e}", file.display())))?,
            )
        }
        None => None,
    };
    let req = UpdateRequest {
        restart,
        autostart: a.autostart,
        start_order: a.start_order,
        start_delay_s: a.start_delay,
        memory_mib,
        cpus: a.cpus,
        cmdline: a.cmdline.clone(),
        config: None,
        nics: None,
        balloon_mib: match &a.balloon {
            Some(b) => {
                let bytes = vmm::config::parse_size(b).map_err(|e| bad(format!("--balloon: {e}")))?;
                Some(bytes >> 20)
            }
            None => None,
        },
        resources,
    };
    let mut body = serde_json::to_value(&req).map_err(|e| failure(1, e.to_string()))?;
    if body.as_object().is_some_and(|o| o.is_empty()) && config.is_none() {
        return Err(bad("vm set: nothing to change (give at least one of --memory, --cpus, --cmdline, --from-file, --restart, --autostart, --start-order, --start-delay, --balloon, or a resource flag such as --cpu-limit)".into()));
    }
    // Sent as a JSON value so that the daemon names an unknown field of the spec file.
    if let (Some(c), Some(o)) = (config, body.as_object_mut()) {
        o.insert("config".into(), c);
    }
    serde_json::to_vec(&body).map_err(|e| failure(1, e.to_string()))
}

/// The `vm snapshot VM list` table.
pub fn format_snapshots(snaps: &[SnapshotInfo]) -> String {
    let mut s = format!("{:<20}  {:<24}  {:>9}  KIND\n", "NAME", "CREATED", "SIZE");
    for x in snaps {
        let kind = if x.memory { format!("disks+RAM ({})", x.vm_state.as_str()) } else { "disks".into() };
        s += &format!("{:<20}  {:<24}  {:>9}  {kind}\n", x.name, format_time(x.created_ms), format_bytes(x.size_bytes));
    }
    s
}

/// "512B", "3.0K", "95.2M", "1.5G".
pub fn format_bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    for (size, unit) in UNITS {
        if n >= size {
            return format!("{:.1}{unit}", n as f64 / size as f64);
        }
    }
    format!("{n}B")
}

/// The byte that detaches `vm console` (Ctrl-]).
pub const DETACH: u8 = 0x1d;

/// The failure for a daemon's error answer: its JSON message, exit 2 for bad input (400, 404
/// or a refused field), 1 otherwise.
fn answer_failure(status: u16, body: &[u8]) -> Failure {
    let parsed = serde_json::from_slice::<ErrorBody>(body).ok();
    let message = match &parsed {
        Some(b) => b.error.clone(),
        None if body.is_empty() => format!("the daemon answered HTTP {status}"),
        None => String::from_utf8_lossy(body).chars().take(200).collect(),
    };
    let bad_input = matches!(status, 400 | 404) || parsed.as_ref().is_some_and(|b| b.field.is_some());
    failure(if bad_input { 2 } else { 1 }, message)
}

/// Sends the console upgrade request for `name` on a new connection to the daemon; returns
/// the upgraded connection and the console bytes that came with the `101` answer.
///
/// Errors: the daemon is unreachable or answers garbage (1); its error answer
/// ([`answer_failure`]).
fn console_connect(socket: &Path, name: &str) -> Result<(std::os::unix::net::UnixStream, Vec<u8>), Failure> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        failure(
            1,
            format!(
                "cannot connect to the daemon at {}: {e} (is `rustvisor daemon` running? see --connect, RUSTVISOR_SOCKET)",
                socket.display()
            ),
        )
    })?;
    let io = |e: io::Error| failure(1, format!("the daemon at {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).map_err(io)?;
    let protocol = crate::server::CONSOLE_PROTOCOL;
    write!(
        s,
        "GET /api/v1/vms/{name}/console HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
    )
    .map_err(io)?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if got.len() > 64 * 1024 {
            return Err(failure(1, "the daemon's answer has no end of headers"));
        }
        match s.read(&mut buf).map_err(io)? {
            0 => return Err(failure(1, "the daemon closed the connection without answering")),
            n => got.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| {
        failure(1, format!("unexpected answer from the daemon: {}", head.lines().next().unwrap_or("")))
    })?;
    let mut rest = got.split_off(head_end);
    if status == 101 {
        s.set_read_timeout(None).map_err(io)?;
        return Ok((s, rest));
    }
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok()).flatten()
    });
    let want = length.unwrap_or(64 * 1024).min(64 * 1024);
    while rest.len() < want {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => rest.extend_from_slice(&buf[..n]),
        }
    }
    rest.truncate(want);
    Err(answer_failure(status, &rest))
}

/// `rustvisor vm console NAME`: the VM's serial console on this terminal (raw mode) until
/// Ctrl-] (detach: the VM keeps running) or the VM's console closes. Standard input need not
/// be a terminal: its end stops typing, and the output goes on.
fn console(socket: &Path, name: &str) -> Result<(), Failure> {
    use std::io::Read;
    check_name(name)?;
    let (stream, early) = console_connect(socket, name)?;
    let to_vm = stream.try_clone().map_err(|e| failure(1, format!("console: {e}")))?;
    let raw = vmm::terminal::RawTerminal::enable();
    eprint!("Connected to {name} (Ctrl-] detaches)\r\n");
    let detached = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = detached.clone();
    std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || {
            let mut to_vm = to_vm;
            let mut stdin = io::stdin();
            let mut buf = [0u8; 1024];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let typed = &buf[..n];
                let (send, detach) = match typed.iter().position(|&b| b == DETACH) {
                    Some(i) => (&typed[..i], true),
                    None => (typed, false),
                };
                if to_vm.write_all(send).is_err() {
                    return;
                }
                if detach {
                    d.store(true, std::sync::atomic::Ordering::SeqCst);
                    let _ = to_vm.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        })
        .map_err(|e| failure(1, format!("console: cannot start the input thread: {e}")))?;
    let mut out = io::stdout().lock();
    let mut pending = early;
    let mut buf = [0u8; 16 * 1024];
    loop {
        if !pending.is_empty() && out.write_all(&pending).and_then(|()| out.flush()).is_err() {
            break;
        }
        pending.clear();
        match (&stream).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    drop(raw);
    if detached.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!("\r\nDetached from {name}; the VM keeps running");
    } else {
        eprintln!("\r\nThe console of {name} closed (the VM stopped, or the daemon went away)");
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, Failure> {
    serde_json::to_string_pretty(v).map(|s| s + "\n").map_err(|e| failure(1, e.to_string()))
}

/// The `POST /vms` body from `vm create`'s flags or file; bad flags are exit 2.
fn create_body(a: &CreateArgs) -> Result<Vec<u8>, Failure> {
    check_name(&a.name)?;
    let bad = |m: String| failure(2, m);
    let restart: RestartPolicy = a.restart.parse().map_err(|e| bad(format!("--restart: {e}")))?;
    let config: serde_json::Value = match &a.from_file {
        Some(file) => {
            let text = std::fs::read(file).map_err(|e| bad(format!("--from-file: {}: {e}", file.display())))?;
            // The daemon checks the fields (naming an unknown one); here only that it is JSON.
            serde_json::from_slice(&text).map_err(|e| bad(format!("--from-file: {}: not JSON: {e}", file.display())))?
        }
        None => {
            let abs = |flag: &str, p: &str| {
                std::path::absolute(p).map(|a| a.display().to_string()).map_err(|e| bad(format!("{flag}: {p}: {e}")))
            };
            let kernel = a.kernel.as_deref().ok_or_else(|| bad("--kernel: required (or --from-file)".into()))?;
            let mem = vmm::config::parse_size(&a.memory).map_err(|e| bad(format!("--memory: {e}")))?;
            if mem % (1 << 20) != 0 {
                return Err(bad(format!("--memory: '{}' is not a whole number of MiB (e.g. 512M, 1G)", a.memory)));
            }
            let accel: vmm::Accel = a.accel.parse().map_err(|e: String| bad(format!("--accel: {e}")))?;
            let mut disks = Vec::new();
            for d in a.disk.iter().filter(|d| !d.starts_with("vol=")) {
                let mut disk: vmm::DiskConfig = d.parse().map_err(bad)?;
                disk.path = abs("--disk", &disk.path)?;
                disks.push(disk);
            }
            let nets = a.net.iter().map(|n| n.parse()).collect::<Result<Vec<vmm::NetConfig>, _>>().map_err(bad)?;
            let vsock = a.vsock.as_deref().map(str::parse::<vmm::VsockConfig>).transpose().map_err(bad)?;
            let vsock = match vsock {
                Some(mut v) => {
                    v.socket = abs("--vsock", &v.socket)?;
                    Some(v)
                }
                None => None,
            };
            let console = match a.console.as_deref().map(str::parse::<vmm::ConsoleOut>).transpose() {
                Ok(Some(vmm::ConsoleOut::Stdio)) | Err(_) => {
                    let c = a.console.as_deref().unwrap_or_default();
                    return Err(bad(format!("--console: '{c}' is not accepted (accepted: file=PATH, null)")));
                }
                Ok(Some(vmm::ConsoleOut::File(p))) => {
                    Some(vmm::ConsoleOut::File(abs("--console", &p.display().to_string())?.into()))
                }
                Ok(other) => other,
            };
            let cfg = vmm::VmConfig {
                kernel: abs("--kernel", &kernel.display().to_string())?,
                initrd: a.initrd.as_deref().map(|p| abs("--initrd", &p.display().to_string())).transpose()?,
                cmdline: a.cmdline.clone(),
                memory_mib: mem >> 20,
                cpus: a.cpus,
                accel,
                serial: vmm::ConsoleOut::Null,
                disks,
                nets,
                vsock,
                rng: a.rng,
                console,
                balloon: a.balloon.then(Default::default),
                memory_options: Default::default(),
            };
            serde_json::to_value(&cfg).map_err(|e| failure(1, e.to_string()))?
        }
    };
    if a.start_order > crate::types::MAX_START_ORDER {
        return Err(bad(format!(
            "--start-order: {} (accepted: 0 to {})",
            a.start_order,
            crate::types::MAX_START_ORDER
        )));
    }
    if a.start_delay > crate::types::MAX_START_DELAY_S {
        return Err(bad(format!(
            "--start-delay: {} (accepted: 0 to {})",
            a.start_delay,
            crate::types::MAX_START_DELAY_S
        )));
    }
    let nics = a.nic.iter().map(|n| n.parse()).collect::<Result<Vec<crate::types::NicSpec>, _>>().map_err(bad)?;
    let volumes =
        a.disk.iter().filter(|d| d.starts_with("vol=")).map(|d| volume_attach(d)).collect::<Result<Vec<_>, _>>()?;
    let mut resources = crate::types::Resources::default();
    a.resources.apply(&mut resources)?;
    let body = serde_json::json!({
        "name": a.name,
        "nics": nics,
        "volumes": volumes,
        "resources": resources,
        "restart": restart,
        "autostart": a.autostart,
        "start_order": a.start_order,
        "start_delay_s": a.start_delay,
        "config": config,
    });
    // The shape of CreateRequest (a unit test checks it), sent as a JSON value so that the
    // daemon, not this client, names an unknown field of a spec file.
    serde_json::to_vec(&body).map_err(|e| failure(1, e.to_string()))
}

fn events_text(a: &EventsArgs) -> Result<String, Failure> {
    let c = DaemonClient::new(&a.connect.connect, Duration::from_secs(30))?;
    let route = match &a.vm {
        Some(vm) => {
            check_name(vm)?;
            format!("events?vm={vm}")
        }
        None => "events".into(),
    };
    let list: EventList = c.get(&route)?;
    if a.json {
        return to_json(&list);
    }
    Ok(list.events.iter().map(format_event).collect())
}

/// One line of `rustvisor events`.
pub fn format_event(e: &Event) -> String {
    let who = match (e.peer_uid, e.peer_pid, &e.peer_addr) {
        (Some(u), Some(p), _) => format!(" [uid {u} pid {p}]"),
        (Some(u), None, _) => format!(" [uid {u}]"),
        (None, _, Some(addr)) => format!(" [tcp {addr}]"),
        _ => String::new(),
    };
    format!("{}  {:<12} {:<18} {}{who}\n", format_time(e.time_ms), e.vm.as_deref().unwrap_or("-"), e.kind, e.detail)
}

/// `rustvisor events --follow`: the log so far, then each new event as the daemon commits
/// it (`GET /api/v1/events?follow=1`, a stream of JSON lines), until interrupted.
fn follow_events(a: &EventsArgs) -> Result<(), Failure> {
    use http_body_util::BodyExt;
    let mut route = String::from("/api/v1/events?follow=1");
    if let Some(vm) = &a.vm {
        check_name(vm)?;
        route += &format!("&vm={vm}");
    }
    let socket = a.connect.connect.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failure(1, format!("cannot start tokio: {e}")))?;
    rt.block_on(async move {
        let io1 = |m: String| failure(1, m);
        let stream = tokio::net::UnixStream::connect(&socket).await.map_err(|e| {
            io1(format!(
                "cannot connect to the daemon at {}: {e} (is `rustvisor daemon` running? see --connect, RUSTVISOR_SOCKET)",
                socket.display()
            ))
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| io1(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::get(route)
            .header(hyper::header::HOST, "localhost")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| io1(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| io1(e.to_string()))?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let msg = serde_json::from_slice::<ErrorBody>(&bytes).map(|b| b.error).unwrap_or_else(|_| status.to_string());
            return Err(failure(if status.is_client_error() { 2 } else { 1 }, msg));
        }
        let mut buf = Vec::new();
        let mut out = io::stdout();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| io1(format!("the event stream broke: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            buf.extend_from_slice(&data);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let text = if a.json {
                    String::from_utf8_lossy(&line).into_owned()
                } else {
                    let e: Event = serde_json::from_slice(&line)
                        .map_err(|e| io1(format!("unexpected event from the daemon: {e}")))?;
                    format_event(&e)
                };
                out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| io1(e.to_string()))?;
            }
        }
        Err(io1("the daemon closed the event stream".into()))
    })
}

/// The `vm list` table.
pub fn format_list(vms: &[VmSummary]) -> String {
    let mut rows = vec![["NAME", "STATE", "CPUS", "MEMORY", "UPTIME", "ACCEL", "PID"].map(String::from).to_vec()];
    for v in vms {
        let state = match &v.operation {
            Some(op) => format!("{} ({op})", v.state.as_str()),
            None => v.state.as_str().to_string(),
        };
        rows.push(vec![
            v.name.clone(),
            state,
            v.cpus.to_string(),
            format!("{}M", v.memory_mib),
            v.uptime_s.map_or("-".into(), format_duration),
            v.accel.clone(),
            v.pid.map_or("-".into(), |p| p.to_string()),
        ]);
    }
    let widths: Vec<usize> = (0..7).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut s = String::new();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        s += line.join("  ").trim_end();
        s += "\n";
    }
    s
}

fn format_info(d: &VmDetails) -> String {
    let v = &d.summary;
    let mut s = format!("name: {}\nstate: {}\n", v.name, v.state.as_str());
    if let Some(op) = &v.operation {
        s += &format!("operation: {op}\n");
    }
    if let Some(r) = &v.reason {
        s += &format!("reason: {r}\n");
    }
    s += &format!("restart: {} ({} restarts)\n", v.restart.as_str(), v.restarts);
    let p = &d.policy;
    if p.autostart {
        s += &format!("autostart: yes (order {}, then {}s delay)\n", p.start_order, p.start_delay_s);
    }
    if let Some(pid) = v.pid {
        s += &format!("pid: {pid}\n");
    }
    if let Some(u) = v.uptime_s {
        s += &format!("uptime: {}\n", format_duration(u));
    }
    s += &format!("accel: {}\nconsole log: {}\n", v.accel, d.console_log);
    if let Some(sock) = &d.api_socket {
        s += &format!("VMM API socket: {sock}\n");
    }
    s += &api::client::format_info(&api::types::VmInfo {
        state: v.state.as_str().into(),
        config: d.config.clone(),
        uptime_s: 0.0,
        accelerator: None,
        ended: None,
        pause_reason: None,
        vcpu_threads: Vec::new(),
    })
    .lines()
    .skip(3)
    .map(|l| format!("{l}\n"))
    .collect::<String>();
    s += &resources::format_resources(d);
    s
}

/// "42s", "3m07s", "2h05m", "3d04h".
pub fn format_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Unix milliseconds as "YYYY-MM-DD HH:MM:SS.mmmZ" (UTC).
pub fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms.rem_euclid(1000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::CreateRequest;

    #[test]
    fn times_and_durations() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(format_time(951_782_400_123), "2000-02-29 00:00:00.123Z");
        assert_eq!(format_time(1_700_000_000_000), "2023-11-14 22:13:20.000Z");
        assert_eq!(format_duration(5.9), "5s");
        assert_eq!(format_duration(187.0), "3m07s");
        assert_eq!(format_duration(7500.0), "2h05m");
        assert_eq!(format_duration(273_600.0), "3d04h");
    }

    #[test]
    fn create_body_is_a_create_request() {
        let a = CreateArgs {
            name: "web-1".into(),
            from_file: None,
            restart: "on-failure".into(),
            autostart: true,
            start_order: 3,
            start_delay: 0,
            kernel: Some("/k".into()),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            memory: "256M".into(),
            cpus: 1,
            accel: "emu".into(),
            disk: vec!["path=/d.raw,readonly=on".into()],
            net: vec![],
            vsock: None,
            rng: true,
            console: None,
            nic: vec!["net=lan0,vlan=20".into()],
            balloon: true,
            resources: ResourceFlags {
                cpu_limit: Some("0.5".into()),
                priority: Some("high".into()),
                ..Default::default()
            },
        };
        let req: CreateRequest = serde_json::from_slice(&create_body(&a).unwrap()).unwrap();
        assert_eq!(req.resources.cpu_limit_percent, Some(50));
        assert_eq!(req.resources.priority, crate::types::Priority::High);
        assert_eq!(req.name, "web-1");
        assert_eq!(req.restart, RestartPolicy::OnFailure);
        assert!(req.autostart && req.start_order == 3);
        assert!(req.config.balloon.is_some(), "--balloon adds the device");
        assert_eq!((req.config.memory_mib, req.config.accel.as_str(), req.config.rng), (256, "emu", true));
        assert!(req.config.disks[0].readonly);
        let mut bad = a.clone();
        bad.memory = "1500K".into();
        assert_eq!(create_body(&bad).unwrap_err().code, 2);
        bad.name = "Bad Name".into();
        let e = create_body(&bad).unwrap_err();
        assert!(e.message.starts_with("name: "), "{}", e.message);
    }

    #[test]
    fn list_table() {
        let v = VmSummary {
            name: "a".into(),
            state: crate::types::VmState::Running,
            operation: None,
            cpus: 1,
            memory_mib: 512,
            accel: "emu".into(),
            pid: Some(42),
            uptime_s: Some(61.0),
            restart: RestartPolicy::No,
            autostart: false,
            template: false,
            restarts: 0,
            reason: None,
        };
        assert_eq!(
            format_list(&[v]),
            "NAME  STATE    CPUS  MEMORY  UPTIME  ACCEL  PID\na     running  1     512M    1m01s   emu    42\n"
        );
    }
}
