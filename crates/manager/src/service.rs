//! The operations on VMs (create, start, stop, kill, pause, resume, delete) and the
//! supervision loop: the one place that changes state.
//!
//! - One operation at a time per VM: each claims the VM ([`Service::claim`]); a second
//!   mutating request meanwhile is [`ServiceError::Busy`] (409) naming the one in progress.
//!   The supervisor claims a VM too while it handles its death or restarts it.
//! - Each change of state is one store transaction with its event. Side effects (spawning a
//!   VMM) happen before the transaction that records them, and the state `starting` is
//!   recorded with the VMM's pid before the VMM is driven, so a daemon killed at any point is
//!   healed by [`Service::reconcile`] at its next start.

mod jailing;
mod metrics;
mod networks;
mod resources;
mod snapshots;
mod volumes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use api::client::{Client, ClientError};
pub use metrics::METRICS_CONTENT_TYPE;
pub use resources::{ResourceOptions, BALLOON_PERIOD};

use crate::store::{now_ms, NewEvent, Peer, Runtime, Store, StoreError, VmRecord};
use crate::supervisor::{self, Child};
use crate::types::{
    valid_name, CreateRequest, Event, Policy, RestartPolicy, StopRequest, UpdateRequest, VmDetails, VmState, VmSummary,
    MAX_START_DELAY_S, MAX_START_ORDER, NAME_RULE,
};

/// Restarts by the policy before the daemon gives up (the VM stays `crashed`).
pub const MAX_RESTARTS: u32 = 5;
/// The graceful stop's default deadline.
pub const DEFAULT_STOP_TIMEOUT_S: u64 = 30;
/// How often the supervisor asks a running VMM for its VM's state.
const INFO_POLL: Duration = Duration::from_millis(500);
/// Consecutive failed `vm.info` calls after which a live VMM is declared hung and killed.
const MAX_API_FAILURES: u32 = 10;
/// The supervisor's claim while it looks at (or handles the end of) a VM.
pub const SUPERVISE: &str = "supervise";
/// How long a request waits for the supervisor's look at a VM to end.
pub const SUPERVISE_WAIT: Duration = Duration::from_secs(5);
/// A VM that has run this long since its last (re)start gets its restart count back to 0,
/// so an occasional crash weeks apart never reaches [`MAX_RESTARTS`] (the daemon's
/// `--restart-reset-after`).
pub const DEFAULT_RESTART_RESET_AFTER: Duration = Duration::from_secs(600);

/// The delay before restart number `restarts + 1`: 1 s, 2 s, 4 s, ... at most 60 s.
pub fn backoff(restarts: u32) -> Duration {
    Duration::from_secs(1u64 << restarts.min(6)).min(Duration::from_secs(60))
}

/// Why an operation failed; the server maps each to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// 400: an input field is malformed or out of range.
    #[error("{field}: {msg}")]
    BadRequest {
        /// The field ("name", "config.memory_mib", "timeout_s", ...).
        field: String,
        /// What is wrong and what is accepted.
        msg: String,
    },
    /// 404: no such VM.
    #[error("no VM named '{0}'")]
    NotFound(String),
    /// 409: the name is taken.
    #[error("name: a VM named '{0}' already exists")]
    Duplicate(String),
    /// 404: the VM has no such snapshot.
    #[error("VM '{vm}' has no snapshot named '{name}'")]
    NoSnapshot {
        /// The VM.
        vm: String,
        /// The snapshot asked for.
        name: String,
    },
    /// 409: the VM already has a snapshot of that name.
    #[error("name: VM '{vm}' already has a snapshot named '{name}'")]
    SnapshotExists {
        /// The VM.
        vm: String,
        /// The name in use.
        name: String,
    },
    /// 409: another operation on the VM is in progress.
    #[error("VM '{vm}': {operation} is in progress; try again when it ends")]
    Busy {
        /// The VM.
        vm: String,
        /// The operation in progress.
        operation: String,
    },
    /// 409: the VM's state forbids the operation.
    #[error("VM '{vm}' is {state}: {msg}")]
    Conflict {
        /// The VM.
        vm: String,
        /// Its state.
        state: VmState,
        /// What cannot be done.
        msg: String,
    },
    /// 500: starting the VM failed (nothing is left behind).
    #[error("VM '{vm}': start failed: {msg}")]
    StartFailed {
        /// The VM.
        vm: String,
        /// Why.
        msg: String,
    },
    /// 500: the VMM refused or failed a request.
    #[error("VM '{vm}': {what}: {source}")]
    Vmm {
        /// The VM.
        vm: String,
        /// What was asked.
        what: &'static str,
        /// The VMM's answer.
        source: Box<ClientError>,
    },
    /// 409: refused because of who uses it (the message names them).
    #[error("{0}")]
    Refused(String),
    /// A storage pool, volume or backup operation failed (the status follows its kind).
    #[error(transparent)]
    Storage(storage::Error),
    /// 500: the store failed.
    #[error(transparent)]
    Store(StoreError),
    /// 500: a host file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(n) => ServiceError::NotFound(n),
            StoreError::Duplicate(n) => ServiceError::Duplicate(n),
            other => ServiceError::Store(other),
        }
    }
}

fn bad(field: impl Into<String>, msg: impl Into<String>) -> ServiceError {
    ServiceError::BadRequest { field: field.into(), msg: msg.into() }
}

/// Where the daemon keeps things.
#[derive(Debug, Clone)]
pub struct DaemonPaths {
    /// Persistent: the store and each VM's console log (`vms/<name>/`).
    pub state_dir: PathBuf,
    /// Runtime: each VMM's API socket (`vms/<name>/api.sock`).
    pub run_dir: PathBuf,
    /// The program spawned as `<vmm_exe> vmm --api-socket PATH` (the daemon's own binary).
    pub vmm_exe: PathBuf,
}

/// Supervision state of one running VM (not persisted).
#[derive(Debug, Default)]
struct Watch {
    last_poll: Option<Instant>,
    api_failures: u32,
}

/// The daemon's operations over its store and its VMM processes.
#[derive(Debug)]
pub struct Service {
    paths: DaemonPaths,
    store: Mutex<Store>,
    /// VM name → operation in progress.
    busy: Mutex<HashMap<String, &'static str>>,
    /// VMMs this daemon spawned (to reap them and learn their exit status).
    children: Mutex<HashMap<String, Child>>,
    /// VM name → when the supervisor restarts it.
    restart_at: Mutex<HashMap<String, Instant>>,
    watch: Mutex<HashMap<String, Watch>>,
    restart_reset_after: Duration,
    events_tx: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// When the supervisor last looked at the networks.
    net_checked: Mutex<Option<Instant>>,
    /// cgroups, the overcommit policy, the balloon policy's memory.
    res: resources::ResourceState,
    /// Whether VMMs start in a jail ([`Service::with_jail`]).
    jail: bool,
}

/// A claim on a VM; dropping it ends the operation.
#[derive(Debug)]
pub struct Claim<'a> {
    svc: &'a Service,
    name: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(&self.svc.busy).remove(&self.name);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a VMM is being launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Launch {
    /// Asked through the API: the restart count starts over.
    User,
    /// By the restart policy: attempt number.
    Restart(u32),
}

impl Service {
    /// A service over `store`.
    pub fn new(paths: DaemonPaths, mut store: Store) -> Service {
        let events_tx = std::sync::Arc::new(tokio::sync::watch::channel(0u64).0);
        let tx = events_tx.clone();
        store.set_event_hook(Box::new(move || tx.send_modify(|n| *n = n.wrapping_add(1))));
        Service {
            events_tx,
            paths,
            store: Mutex::new(store),
            busy: Mutex::default(),
            children: Mutex::default(),
            restart_at: Mutex::default(),
            watch: Mutex::default(),
            restart_reset_after: DEFAULT_RESTART_RESET_AFTER,
            net_checked: Mutex::default(),
            res: resources::ResourceState::default(),
            jail: false,
        }
    }

    /// Sets the daemon's resource options: the VMs' cgroups (made now; when they cannot be,
    /// the daemon runs without and `GET /api/v1/host` says why), the overcommit policy and
    /// the automatic balloon policy.
    pub fn with_resources(mut self, options: ResourceOptions) -> Service {
        self.res = resources::ResourceState::new(options);
        self
    }

    /// Starts every VMM in a jail of its own (the `jail` crate: namespaces, a private root
    /// with only the VM's files, an unprivileged uid per VM, no capabilities); see
    /// `service/jailing.rs` for what goes in.
    pub fn with_jail(mut self, on: bool) -> Service {
        self.jail = on;
        self
    }

    /// Sets how long a VM must run before its restart count goes back to 0 (default
    /// [`DEFAULT_RESTART_RESET_AFTER`]).
    pub fn with_restart_reset_after(mut self, d: Duration) -> Service {
        self.restart_reset_after = d;
        self
    }

    /// A receiver that sees a change after each store change that appended events (the
    /// server's `GET /events?follow=1` streams wait on it).
    pub fn subscribe_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events_tx.subscribe()
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Appends an event of the daemon's own.
    pub fn log(&self, event: &NewEvent) -> Result<(), StoreError> {
        self.store().log(event)
    }

    /// Claims `name` for `operation`, or says which operation holds it.
    ///
    /// The supervisor's routine look at a VM ([`SUPERVISE`]) is short: a request waits up to
    /// [`SUPERVISE_WAIT`] for it to end rather than being refused. The supervisor itself never
    /// waits.
    pub fn claim(&self, name: &str, operation: &'static str) -> Result<Claim<'_>, ServiceError> {
        let end = Instant::now() + SUPERVISE_WAIT;
        loop {
            {
                let mut busy = lock(&self.busy);
                match busy.get(name) {
                    None => {
                        busy.insert(name.into(), operation);
                        return Ok(Claim { svc: self, name: name.into() });
                    }
                    Some(&op) if op != SUPERVISE || operation == SUPERVISE || Instant::now() > end => {
                        return Err(ServiceError::Busy { vm: name.into(), operation: op.into() });
                    }
                    Some(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn record(&self, name: &str) -> Result<VmRecord, ServiceError> {
        self.store().get(name)?.ok_or_else(|| ServiceError::NotFound(name.into()))
    }

    fn vm_state_dir(&self, name: &str) -> PathBuf {
        self.paths.state_dir.join("vms").join(name)
    }

    fn vm_run_dir(&self, name: &str) -> PathBuf {
        self.paths.run_dir.join("vms").join(name)
    }

    /// The serial console's file of VM `name`.
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.vm_state_dir(name).join("console.log")
    }

    /// The serial console's Unix socket of VM `name`, served by its VMM while it runs (so it
    /// outlives a daemon restart): `<run-dir>/vms/<name>/console.sock`.
    pub fn console_socket(&self, name: &str) -> PathBuf {
        self.vm_run_dir(name).join("console.sock")
    }

    /// The 8250 configuration the daemon gives VM `name`'s VMM: its console socket, logged
    /// to [`Service::console_log`].
    fn serial_for(&self, name: &str) -> vmm::ConsoleOut {
        vmm::ConsoleOut::Socket { path: self.console_socket(name), log: Some(self.console_log(name)) }
    }

    /// `GET /vms/{name}/console`: the console socket to connect to, for a running or paused
    /// VM.
    ///
    /// Errors: [`ServiceError::NotFound`]; [`ServiceError::Conflict`] naming the state when
    /// the VM is not running or paused.
    pub fn console_target(&self, name: &str) -> Result<PathBuf, ServiceError> {
        let rec = self.record(name)?;
        match rec.runtime.state {
            VmState::Running | VmState::Paused => Ok(self.console_socket(name)),
            state => Err(ServiceError::Conflict {
                vm: name.into(),
                state,
                msg: "no console: the VM is not running (start it first)".into(),
            }),
        }
    }

    /// Checks a name given in a request path.
    pub fn check_name(name: &str) -> Result<(), ServiceError> {
        if valid_name(name) {
            Ok(())
        } else {
            Err(bad("name", format!("'{}' is not a valid VM name ({NAME_RULE})", name.escape_debug())))
        }
    }

    /// `POST /vms`: checks the definition as the VMM would and stores it.
    pub fn create(&self, mut req: CreateRequest, peer: Peer) -> Result<VmSummary, ServiceError> {
        Self::check_name(&req.name)?;
        let volumes = self.resolve_volumes(&req.volumes)?;
        req.config.disks.extend(volumes);
        req.volumes.clear();
        if req.config.serial != vmm::ConsoleOut::Null {
            return Err(bad(
                "config.serial",
                "leave it out: the daemon writes the serial console to <state-dir>/vms/<name>/console.log",
            ));
        }
        check_absolute(&req.config)?;
        vmm::config::validate(&req.config).map_err(|e| config_error(vmm::controller::api_error(e)))?;
        let policy = req.policy();
        check_policy(&policy)?;
        self.check_resources(&req.resources, req.config.cpus, req.config.memory_mib, req.config.balloon.is_some())?;
        let _claim = self.claim(&req.name, "create")?;
        let mut nics = req.nics.clone();
        self.check_nics(&req.name, &mut nics)?;
        let dir = self.vm_state_dir(&req.name);
        let detail =
            format!("{} MiB, {} vCPU, restart {}", req.config.memory_mib, req.config.cpus, req.restart.as_str());
        self.store().create_vm(
            &req.name,
            &req.config,
            &policy,
            &nics,
            &req.resources,
            &NewEvent::vm(&req.name, "defined", detail, peer),
        )?;
        std::fs::create_dir_all(&dir)
            .map_err(|source| ServiceError::Io { what: format!("creating {}", dir.display()), source })?;
        self.summary(&self.record(&req.name)?)
    }

    /// `GET /vms`.
    pub fn list(&self) -> Result<Vec<VmSummary>, ServiceError> {
        let recs = self.store().list()?;
        recs.iter().map(|r| self.summary(r)).collect()
    }

    /// `GET /vms/{name}`.
    pub fn info(&self, name: &str) -> Result<VmDetails, ServiceError> {
        let rec = self.record(name)?;
        let mut config = rec.config.clone();
        config.serial = self.serial_for(name);
        Ok(VmDetails {
            summary: self.summary(&rec)?,
            config,
            policy: rec.policy,
            resources: rec.resources.clone(),
            placement: self.placement(&rec),
            nics: self.nic_infos(&rec),
            balloon: self.balloon_info(&rec),
            console_log: self.console_log(name).display().to_string(),
            api_socket: rec.runtime.socket.clone(),
            created_ms: rec.created_ms,
        })
    }

    fn summary(&self, rec: &VmRecord) -> Result<VmSummary, ServiceError> {
        let rt = &rec.runtime;
        let active = rt.state.is_active();
        Ok(VmSummary {
            name: rec.name.clone(),
            state: rt.state,
            operation: lock(&self.busy).get(&rec.name).map(|s| s.to_string()),
            cpus: rec.config.cpus,
            memory_mib: rec.config.memory_mib,
            accel: rt.accel.clone().filter(|_| active).unwrap_or_else(|| rec.config.accel.to_string()),
            pid: rt.pid.filter(|_| active),
            uptime_s: rt.started_ms.filter(|_| active).map(|t| (now_ms() - t).max(0) as f64 / 1000.0),
            restart: rec.policy.restart,
            autostart: rec.policy.autostart,
            template: rec.template,
            restarts: rt.restarts,
            reason: rt.reason.clone(),
        })
    }

    /// `GET /events`.
    pub fn events(&self, vm: Option<&str>, after: i64, limit: u32) -> Result<Vec<Event>, ServiceError> {
        Ok(self.store().events(vm, after, limit)?)
    }

    /// `PUT /vms/{name}/start`: spawns the VMM, creates and boots the VM through its API.
    pub fn start(&self, name: &str, peer: Peer) -> Result<VmSummary, ServiceError> {
        let _claim = self.claim(name, "start")?;
        let rec = self.record(name)?;
        if rec.runtime.state.is_active() {
            return Err(ServiceError::Conflict {
                vm: name.into(),
                state: rec.runtime.state,
                msg: "already started".into(),
            });
        }
        if rec.template {
            return Err(ServiceError::Refused(format!(
                "VM '{name}' is a template: clone it (rustvisor vm clone {name} NEW [--linked])"
            )));
        }
        lock(&self.restart_at).remove(name);
        self.launch(&rec, peer, Launch::User, None)?;
        self.summary(&self.record(name)?)
    }

    /// `PATCH /vms/{name}`: changes a VM's policy (any time) and configuration (not while
    /// a VMM runs for it).
    pub fn update(&self, name: &str, req: UpdateRequest, peer: Peer) -> Result<VmDetails, ServiceError> {
        let _claim = self.claim(name, "update")?;
        let rec = self.record(name)?;
        if req.changes_config() && rec.runtime.state.is_active() {
            return Err(ServiceError::Conflict {
                vm: name.into(),
                state: rec.runtime.state,
                msg: "its configuration changes only while it is stopped (the policy may change now)".into(),
            });
        }
        let mut changed = Vec::new();
        let mut config = rec.config.clone();
        if let Some(c) = req.config {
            if c.serial != vmm::ConsoleOut::Null {
                return Err(bad("config.serial", "leave it out: the daemon sets the serial console"));
            }
            check_absolute(&c)?;
            config = c;
            changed.push("config".to_string());
        }
        if let Some(m) = req.memory_mib {
            config.memory_mib = m;
            changed.push(format!("memory {m} MiB"));
        }
        if let Some(c) = req.cpus {
            config.cpus = c;
            changed.push(format!("{c} vCPU"));
        }
        if let Some(c) = req.cmdline {
            config.cmdline = c;
            changed.push("cmdline".into());
        }
        let mut nics = rec.nics.clone();
        if let Some(mut n) = req.nics {
            self.check_nics(name, &mut n)?;
            changed.push(format!("{} NIC(s)", n.len()));
            nics = n;
        }
        vmm::config::validate(&config).map_err(|e| config_error(vmm::controller::api_error(e)))?;
        let mut policy = rec.policy;
        if let Some(r) = req.restart {
            policy.restart = r;
            changed.push(format!("restart {}", r.as_str()));
        }
        if let Some(a) = req.autostart {
            policy.autostart = a;
            changed.push(format!("autostart {a}"));
        }
        if let Some(o) = req.start_order {
            policy.start_order = o;
            changed.push(format!("start order {o}"));
        }
        if let Some(d) = req.start_delay_s {
            policy.start_delay_s = d;
            changed.push(format!("start delay {d}s"));
        }
        check_policy(&policy)?;
        let mut resources = rec.resources.clone();
        if let Some(r) = req.resources {
            resources = r;
            changed.push("resources".into());
        }
        self.check_resources(&resources, config.cpus, config.memory_mib, config.balloon.is_some())?;
        if resources != rec.resources && rec.runtime.state.is_active() {
            let live = VmRecord { resources: resources.clone(), ..rec.clone() };
            self.apply_live(&live)?;
        }
        if let Some(target) = req.balloon_mib {
            self.set_balloon(&rec, target)?;
            changed.push(format!("balloon {target} MiB"));
        }
        if changed.is_empty() {
            return Err(bad("body", "nothing to change (give at least one field)"));
        }
        let event = NewEvent::vm(name, "updated", changed.join(", "), peer);
        self.store().update_vm(name, &config, &policy, &nics, &resources, &event)?;
        self.info(name)
    }

    /// Sets the balloon of `rec`'s running VMM to `target` MiB.
    ///
    /// Errors: 409 when no VMM runs or the VM has no balloon device; 400 when `target`
    /// exceeds the guest's memory.
    fn set_balloon(&self, rec: &VmRecord, target: u64) -> Result<(), ServiceError> {
        if rec.config.balloon.is_none() {
            return Err(ServiceError::Refused(format!(
                "VM '{}' has no balloon device (config.balloon; `--balloon` at create)",
                rec.name
            )));
        }
        if target > rec.config.memory_mib {
            return Err(bad("balloon_mib", format!("{target} (accepted: 0 to {})", rec.config.memory_mib)));
        }
        if !matches!(rec.runtime.state, VmState::Running | VmState::Paused) {
            return Err(ServiceError::Conflict {
                vm: rec.name.clone(),
                state: rec.runtime.state,
                msg: "the balloon is set on a running or paused VM".into(),
            });
        }
        self.vmm_client(&rec.name, &rec.runtime)?.balloon_set(target).map_err(|e| ServiceError::Vmm {
            vm: rec.name.clone(),
            what: "vm.balloon",
            source: Box::new(e),
        })
    }

    /// The balloon's state from `rec`'s VMM, when one runs with a balloon device.
    fn balloon_info(&self, rec: &VmRecord) -> Option<api::types::BalloonInfo> {
        if rec.config.balloon.is_none() || !matches!(rec.runtime.state, VmState::Running | VmState::Paused) {
            return None;
        }
        let socket = rec.runtime.socket.clone()?;
        Client::new(&socket).ok()?.with_timeout(Duration::from_secs(2)).balloon_info().ok()
    }

    /// At the daemon's first start after the host booted (no `autostart.done` in the run
    /// folder, which lives on a tmpfs such as /run): starts the VMs marked `autostart` that
    /// are not running, by `start_order` then name, waiting each one's `start_delay_s`
    /// before the next. A VM that fails to start is logged and skipped.
    pub fn autostart(&self) {
        let marker = self.paths.run_dir.join("autostart.done");
        if std::fs::exists(&marker).unwrap_or(false) {
            return;
        }
        if let Err(e) = std::fs::create_dir_all(&self.paths.run_dir).and_then(|()| std::fs::write(&marker, b"")) {
            tracing::error!("autostart: cannot write {}: {e}; not autostarting", marker.display());
            return;
        }
        let mut recs = match self.store().list() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("autostart: {e}");
                return;
            }
        };
        recs.retain(|r| r.policy.autostart && !r.runtime.state.is_active());
        recs.sort_by(|a, b| (a.policy.start_order, &a.name).cmp(&(b.policy.start_order, &b.name)));
        for rec in recs {
            let name = rec.name.as_str();
            let Ok(_claim) = self.claim(name, "autostart") else { continue };
            let Ok(Some(rec)) = self.store().get(name) else { continue };
            if rec.runtime.state.is_active() {
                continue;
            }
            let _ = self.store().log(&NewEvent::vm(
                name,
                "autostarted",
                format!("order {}, then {}s delay", rec.policy.start_order, rec.policy.start_delay_s),
                Peer::default(),
            ));
            lock(&self.restart_at).remove(name);
            if let Err(e) = self.launch(&rec, Peer::default(), Launch::User, None) {
                tracing::warn!("autostart: {e}");
                continue;
            }
            std::thread::sleep(Duration::from_secs(u64::from(rec.policy.start_delay_s)));
        }
    }

    /// Starts a VMM for `rec` and boots its VM, or restores it from the VMM snapshot in
    /// `restore.0` (resuming it if `restore.1`, else leaving it paused); on failure nothing
    /// is left (no process, no socket) and the failure is recorded.
    fn launch(
        &self,
        rec: &VmRecord,
        peer: Peer,
        how: Launch,
        restore: Option<(&Path, bool)>,
    ) -> Result<(), ServiceError> {
        let name = rec.name.as_str();
        self.admit(rec)?;
        let io = |what: String| move |source| ServiceError::Io { what, source };
        let state_dir = self.vm_state_dir(name);
        let run_dir = self.vm_run_dir(name);
        std::fs::create_dir_all(&state_dir).map_err(io(format!("creating {}", state_dir.display())))?;
        std::fs::create_dir_all(&run_dir).map_err(io(format!("creating {}", run_dir.display())))?;
        let socket = run_dir.join("api.sock");
        let _ = std::fs::remove_file(&socket);
        let console = self.console_log(name);
        let vmm_log = state_dir.join("vmm.log");
        // Keep the previous boot's console and VMM log (one generation).
        for f in [&console, &vmm_log] {
            let _ = std::fs::rename(f, f.with_extension("log.1"));
        }
        let taps = self.attach_nics(rec)?;
        let mut cfg = rec.config.clone();
        cfg.serial = self.serial_for(name);
        cfg.nets.extend(taps.iter().cloned());
        let jail = match self.jail_for(rec, &cfg) {
            Ok(j) => j,
            Err(e) => {
                self.detach_nics(rec);
                return Err(e);
            }
        };
        let mut child = match supervisor::spawn(&self.paths.vmm_exe, &socket, &vmm_log, jail.as_ref()) {
            Ok(c) => c,
            Err(e) => {
                self.detach_nics(rec);
                return Err(io(format!("spawning {} vmm", self.paths.vmm_exe.display()))(e));
            }
        };
        let pid = child.id();
        let restarts = match how {
            Launch::User => 0,
            Launch::Restart(n) => n,
        };
        let started_ms = now_ms();
        let mut rt = Runtime {
            state: VmState::Starting,
            pid: Some(pid),
            socket: Some(socket.display().to_string()),
            started_ms: Some(started_ms),
            accel: None,
            reason: None,
            restarts,
        };
        if let Err(e) = self.store().set_runtime(name, &rt, Some(true), &[]) {
            supervisor::kill_and_reap(pid, Some(&mut child));
            let _ = std::fs::remove_file(&socket);
            self.detach_nics(rec);
            return Err(e.into());
        }
        let booted = (|| {
            self.place(rec, pid)?;
            let client = supervisor::wait_api(&mut child, &socket).map_err(|e| e.to_string())?;
            if let Some((dir, resume)) = restore {
                client.restore(dir).map_err(|e| format!("vm.restore: {e}"))?;
                if resume {
                    client.resume().map_err(|e| format!("vm.resume: {e}"))?;
                }
                return Ok::<_, String>(client.info().ok().and_then(|i| i.accelerator));
            }
            client.create(&cfg).map_err(|e| format!("vm.create: {e}"))?;
            client.boot().map_err(|e| format!("vm.boot: {e}"))?;
            Ok::<_, String>(client.info().ok().and_then(|i| i.accelerator))
        })();
        match booted {
            Ok(accel) => {
                self.pin(rec, pid, false);
                rt.state = match restore {
                    Some((_, false)) => VmState::Paused,
                    _ => VmState::Running,
                };
                rt.accel = accel;
                let event = match how {
                    Launch::User => NewEvent::vm(name, "started", format!("pid {pid}"), peer),
                    Launch::Restart(n) => NewEvent::vm(
                        name,
                        "restarted",
                        format!(
                            "restart {n} of at most {MAX_RESTARTS}, pid {pid}, after: {}",
                            rec.runtime.reason.as_deref().unwrap_or("?")
                        ),
                        peer,
                    ),
                };
                let stored = self.store().set_runtime(name, &rt, Some(true), &[event]);
                if let Err(e) = stored {
                    supervisor::kill_and_reap(pid, Some(&mut child));
                    let _ = std::fs::remove_file(&socket);
                    self.detach_nics(rec);
                    return Err(e.into());
                }
                lock(&self.children).insert(name.into(), child);
                lock(&self.watch).insert(name.into(), Watch::default());
                Ok(())
            }
            Err(msg) => {
                supervisor::kill_and_reap(pid, Some(&mut child));
                self.unplace(name);
                self.detach_nics(rec);
                let _ = std::fs::remove_file(&socket);
                let _ = std::fs::remove_file(self.console_socket(name));
                let _ = std::fs::remove_dir(&run_dir);
                let msg = match supervisor::last_log_line(&vmm_log) {
                    Some(last) if !msg.contains(&last) => format!("{msg} (VMM log: {last})"),
                    _ => msg,
                };
                let (state, desired) = match how {
                    Launch::User => (VmState::Stopped, false),
                    Launch::Restart(_) => (VmState::Crashed, true),
                };
                let down = Runtime::down(state, Some(format!("start failed: {msg}")), restarts);
                self.store().set_runtime(
                    name,
                    &down,
                    Some(desired),
                    &[NewEvent::vm(name, "start-failed", msg.clone(), peer)],
                )?;
                Err(ServiceError::StartFailed { vm: name.into(), msg })
            }
        }
    }

    /// `PUT /vms/{name}/stop` (and `kill`, which is a forced stop): the guest's power button,
    /// then the VMM is asked to exit; it is killed if it has not within the timeout.
    pub fn stop(&self, name: &str, req: &StopRequest, kill: bool, peer: Peer) -> Result<VmSummary, ServiceError> {
        let timeout_s = req.timeout_s.unwrap_or(DEFAULT_STOP_TIMEOUT_S);
        if !(1..=3600).contains(&timeout_s) {
            return Err(bad("timeout_s", format!("{timeout_s} (accepted: 1 to 3600)")));
        }
        let force = kill || req.force;
        let _claim = self.claim(name, if kill { "kill" } else { "stop" })?;
        let rec = self.record(name)?;
        if !rec.runtime.state.is_active() {
            return Err(ServiceError::Conflict {
                vm: name.into(),
                state: rec.runtime.state,
                msg: "not running".into(),
            });
        }
        let how = self.end_vmm(&rec, force, Duration::from_secs(timeout_s));
        let (kind, detail) = if kill { ("killed", how) } else { ("stopped", how) };
        let down =
            Runtime::down(VmState::Stopped, Some(format!("{kind} through the API ({detail})")), rec.runtime.restarts);
        self.store().set_runtime(name, &down, Some(false), &[NewEvent::vm(name, kind, detail, peer)])?;
        lock(&self.restart_at).remove(name);
        self.summary(&self.record(name)?)
    }

    /// Ends the VMM of `rec`: gracefully within `timeout` unless `force`; says how it ended.
    fn end_vmm(&self, rec: &VmRecord, force: bool, timeout: Duration) -> String {
        let name = rec.name.as_str();
        let mut child = lock(&self.children).remove(name);
        lock(&self.watch).remove(name);
        let Some(pid) = rec.runtime.pid else { return "no VMM process".into() };
        let socket = rec.runtime.socket.clone().map(PathBuf::from);
        let mut how = String::from("forced");
        if !force {
            let end = Instant::now() + timeout;
            let graceful = socket.as_deref().and_then(|s| Client::new(s).ok()).map(|c| c.with_timeout(timeout));
            if let Some(c) = graceful {
                // vm.shutdown presses the power button and stops the VM after a grace period;
                // vmm.shutdown then ends the process.
                let _ = c.shutdown();
                let _ = c.vmm_shutdown();
            }
            let left = end.saturating_duration_since(Instant::now());
            if supervisor::wait_gone(pid, child.as_mut(), left).is_some() || !supervisor::pid_alive(pid) {
                how = "graceful".into();
            } else {
                how = format!("killed after the {}s timeout", timeout.as_secs());
            }
        }
        if supervisor::pid_alive(pid) || child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))) {
            supervisor::kill_and_reap(pid, child.as_mut());
        }
        if let Some(s) = socket {
            let _ = std::fs::remove_file(s);
        }
        let _ = std::fs::remove_file(self.console_socket(name));
        let _ = std::fs::remove_dir(self.vm_run_dir(name));
        self.detach_nics(rec);
        self.unplace(name);
        how
    }

    /// `PUT /vms/{name}/pause` (`pause`) and `resume` (`!pause`).
    pub fn pause_resume(&self, name: &str, pause: bool, peer: Peer) -> Result<VmSummary, ServiceError> {
        let op = if pause { "pause" } else { "resume" };
        let _claim = self.claim(name, op)?;
        let rec = self.record(name)?;
        let (from, to) = if pause { (VmState::Running, VmState::Paused) } else { (VmState::Paused, VmState::Running) };
        if rec.runtime.state != from {
            return Err(ServiceError::Conflict {
                vm: name.into(),
                state: rec.runtime.state,
                msg: format!("{op} needs a {} VM", from.as_str()),
            });
        }
        let socket = rec.runtime.socket.clone().unwrap_or_default();
        let client = Client::new(&socket)
            .map_err(|source| ServiceError::Io { what: "starting an API client".into(), source })?
            .with_timeout(Duration::from_secs(30));
        let r = if pause { client.pause() } else { client.resume() };
        r.map_err(|e| ServiceError::Vmm {
            vm: name.into(),
            what: if pause { "vm.pause" } else { "vm.resume" },
            source: Box::new(e),
        })?;
        let mut rt = rec.runtime.clone();
        rt.state = to;
        if !pause {
            rt.reason = None;
        }
        let kind = if pause { "paused" } else { "resumed" };
        self.store().set_runtime(name, &rt, None, &[NewEvent::vm(name, kind, "", peer)])?;
        self.summary(&self.record(name)?)
    }

    /// `DELETE /vms/{name}`: forgets a stopped VM (a running one only with `force`, which
    /// kills it) and removes its console log. Its events stay.
    pub fn delete(&self, name: &str, force: bool, peer: Peer) -> Result<(), ServiceError> {
        let _claim = self.claim(name, "delete")?;
        let rec = self.record(name)?;
        if rec.template {
            let clones = self.clones_of(&rec.config.disks)?;
            if !clones.is_empty() {
                return Err(ServiceError::Refused(format!(
                    "template '{name}' has linked clones built on its disks: {}",
                    clones.join(", ")
                )));
            }
        }
        let mut detail = String::new();
        if rec.runtime.state.is_active() {
            if !force {
                return Err(ServiceError::Conflict {
                    vm: name.into(),
                    state: rec.runtime.state,
                    msg: "stop it first, or delete with force".into(),
                });
            }
            detail = format!("VMM {}", self.end_vmm(&rec, true, Duration::ZERO));
        }
        self.store().delete_vm(name, &NewEvent::vm(name, "deleted", detail, peer))?;
        lock(&self.restart_at).remove(name);
        let _ = std::fs::remove_dir_all(self.vm_state_dir(name));
        let _ = std::fs::remove_dir_all(self.vm_run_dir(name));
        Ok(())
    }

    /// At daemon start: adopts the VMMs that still run (the pid lives and its API answers
    /// `vmm.ping` with that pid), records the others as crashed (restarting them by their
    /// policy), kills a VMM whose start the previous daemon did not finish, and stops VMMs in
    /// the run folder that belong to no VM.
    pub fn reconcile(&self) -> Result<(), ServiceError> {
        self.restore_networks()?;
        let recs = self.store().list()?;
        let mut owned = Vec::new();
        for rec in &recs {
            let name = rec.name.as_str();
            let rt = &rec.runtime;
            if rt.state.is_active() {
                let pid = rt.pid.unwrap_or(0);
                let socket = rt.socket.clone().unwrap_or_default();
                let ours = pid != 0 && supervisor::pid_alive(pid) && supervisor::answers_as(Path::new(&socket), pid);
                if ours && rt.state != VmState::Starting {
                    // Its TAPs (kept open by the VMM) get their bridge, VLAN and rules back.
                    if let Err(e) = self.attach_nics(rec) {
                        tracing::warn!("VM {name}: restoring its NICs: {e}");
                    }
                    if let Err(e) = self.apply_live(rec) {
                        tracing::warn!("VM {name}: restoring its resources: {e}");
                    }
                    self.store().log(&NewEvent::vm(name, "adopted", format!("pid {pid}"), Peer::default()))?;
                    lock(&self.watch).insert(name.into(), Watch::default());
                    owned.push(name.to_string());
                    continue;
                }
                let reason = if ours {
                    supervisor::kill_and_reap(pid, None);
                    format!("the daemon exited while starting it (VMM pid {pid} killed)")
                } else {
                    format!("the VMM (pid {pid}) ended while the daemon was not running")
                };
                let _ = std::fs::remove_file(&socket);
                let _ = std::fs::remove_file(self.console_socket(name));
                let _ = std::fs::remove_dir(self.vm_run_dir(name));
                self.record_end(rec, VmState::Crashed, reason)?;
            } else if rt.state == VmState::Crashed && rec.desired_running && rt.restarts < MAX_RESTARTS {
                lock(&self.restart_at).insert(name.into(), Instant::now() + backoff(rt.restarts));
            }
        }
        self.stop_orphans(&owned);
        Ok(())
    }

    /// Stops VMMs in `<run-dir>/vms/` whose VM is not in `owned`.
    fn stop_orphans(&self, owned: &[String]) {
        let Ok(dir) = std::fs::read_dir(self.paths.run_dir.join("vms")) else { return };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owned.contains(&name) {
                continue;
            }
            let socket = entry.path().join("api.sock");
            if let Ok(c) = Client::new(&socket) {
                if let Ok(p) = c.with_timeout(Duration::from_secs(2)).ping() {
                    supervisor::kill_and_reap(p.pid, None);
                    let event = NewEvent {
                        vm: Some(name.clone()),
                        kind: "orphan-stopped",
                        detail: format!("VMM pid {} on {}", p.pid, socket.display()),
                        peer: Peer::default(),
                    };
                    let _ = self.store().log(&event);
                }
            }
            let _ = std::fs::remove_file(&socket);
            let _ = std::fs::remove_file(entry.path().join("console.sock"));
            let _ = std::fs::remove_dir(entry.path());
        }
    }

    /// Records that the VMM of `rec` ended (`state` stopped or crashed, for `reason`) and
    /// schedules a restart if its policy says so.
    fn record_end(&self, rec: &VmRecord, state: VmState, reason: String) -> Result<(), ServiceError> {
        let name = rec.name.as_str();
        let restarts = rec.runtime.restarts;
        let wants = rec.desired_running
            && match rec.policy.restart {
                RestartPolicy::No => false,
                RestartPolicy::OnFailure => state == VmState::Crashed,
                RestartPolicy::Always => true,
            };
        let kind = if state == VmState::Crashed { "crashed" } else { "stopped" };
        let mut events = vec![NewEvent::vm(name, kind, reason.clone(), Peer::default())];
        let restart = wants && restarts < MAX_RESTARTS;
        if wants && !restart {
            events.push(NewEvent::vm(
                name,
                "restart-limit",
                format!("not restarted: {restarts} restarts already"),
                Peer::default(),
            ));
        }
        self.store().set_runtime(name, &Runtime::down(state, Some(reason), restarts), Some(restart), &events)?;
        if restart {
            lock(&self.restart_at).insert(name.into(), Instant::now() + backoff(restarts));
        }
        self.detach_nics(rec);
        self.unplace(name);
        lock(&self.watch).remove(name);
        Ok(())
    }

    /// One round of supervision: notices VMMs that ended or whose guest powered off, and
    /// runs the restarts that are due. The daemon calls it a few times a second.
    pub fn supervise(&self) {
        self.supervise_networks();
        self.auto_balloon();
        let recs = match self.store().list() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("supervisor: {e}");
                return;
            }
        };
        for rec in recs {
            let r = match rec.runtime.state {
                VmState::Running | VmState::Paused => self.check(&rec.name),
                VmState::Crashed | VmState::Stopped => self.restart_if_due(&rec.name),
                VmState::Starting => Ok(()),
            };
            if let Err(e) = r {
                tracing::error!("supervisor: VM {}: {e}", rec.name);
            }
        }
    }

    /// Checks one running VM.
    fn check(&self, name: &str) -> Result<(), ServiceError> {
        let Ok(_claim) = self.claim(name, SUPERVISE) else { return Ok(()) };
        let Some(rec) = self.store().get(name)? else { return Ok(()) };
        if !matches!(rec.runtime.state, VmState::Running | VmState::Paused) {
            return Ok(());
        }
        let pid = rec.runtime.pid.unwrap_or(0);
        let log = self.vm_state_dir(name).join("vmm.log");
        let ended: Option<Option<ExitStatus>> = {
            let mut children = lock(&self.children);
            match children.get_mut(name).map(|c| c.try_wait()) {
                Some(Ok(Some(st))) => {
                    children.remove(name);
                    Some(Some(st))
                }
                Some(_) => None,
                None => (!supervisor::pid_alive(pid)).then_some(None),
            }
        };
        if let Some(status) = ended {
            if let Some(s) = &rec.runtime.socket {
                let _ = std::fs::remove_file(s);
            }
            let _ = std::fs::remove_file(self.console_socket(name));
            let _ = std::fs::remove_dir(self.vm_run_dir(name));
            let last = supervisor::last_log_line(&log).map(|l| format!("; its last log line: {l}")).unwrap_or_default();
            let (state, mut reason) = match status {
                Some(st) if st.success() => (VmState::Stopped, "the VMM exited with status 0".to_string()),
                Some(st) => (VmState::Crashed, format!("the VMM (pid {pid}) {}{last}", supervisor::describe_exit(st))),
                None => (VmState::Crashed, format!("the VMM (pid {pid}) is gone (adopted: exit status unknown){last}")),
            };
            if let Some(oom) = self.oom_reason(&rec) {
                reason = format!("the VMM (pid {pid}) was {oom}");
                self.store().log(&NewEvent::vm(name, "oom-killed", oom, Peer::default()))?;
            }
            return self.record_end(&rec, state, reason);
        }
        // The guest: a power-off leaves the VMM running with its VM in state Shutdown.
        {
            let mut watch = lock(&self.watch);
            let w = watch.entry(name.into()).or_default();
            if w.last_poll.is_some_and(|t| t.elapsed() < INFO_POLL) {
                return Ok(());
            }
            w.last_poll = Some(Instant::now());
        }
        let socket = rec.runtime.socket.clone().unwrap_or_default();
        let info = Client::new(&socket)
            .map_err(|e| ClientError::Transport(e.to_string()))
            .and_then(|c| c.with_timeout(Duration::from_secs(2)).info());
        match info {
            Ok(i) if i.state == "Shutdown" => {
                self.end_vmm(&rec, false, Duration::from_secs(5));
                // A guest reset or crash (triple fault, a panic with panic=-1) is a failure for
                // the restart policy; a power-off is a stop.
                let (state, reason) = match &i.ended {
                    Some(api::types::VmEnd::Reset { reason }) => {
                        (VmState::Crashed, format!("the guest reset: {reason}"))
                    }
                    Some(api::types::VmEnd::Error { reason }) => (VmState::Crashed, format!("the VM failed: {reason}")),
                    _ => (VmState::Stopped, "the guest powered off".to_string()),
                };
                self.record_end(&rec, state, reason)
            }
            Ok(i) => {
                if let Some(w) = lock(&self.watch).get_mut(name) {
                    w.api_failures = 0;
                }
                // The VMM paused the VM by itself (a disk with on-error=pause hit a host
                // I/O error): the daemon's state follows, with the reason.
                if i.state == "Paused" && rec.runtime.state == VmState::Running {
                    let reason = i.pause_reason.clone().unwrap_or_else(|| "paused by its VMM".into());
                    let mut rt = rec.runtime.clone();
                    rt.state = VmState::Paused;
                    rt.reason = Some(reason.clone());
                    let ev = NewEvent::vm(name, "paused", format!("by its VMM: {reason}"), Peer::default());
                    self.store().set_runtime(name, &rt, None, &[ev])?;
                }
                // Threads the VMM started since (device workers) get their CPUs too.
                self.pin(&rec, pid, false);
                self.reset_restarts_if_stable(&rec)
            }
            Err(e) => {
                let failures = {
                    let mut watch = lock(&self.watch);
                    let w = watch.entry(name.into()).or_default();
                    w.api_failures += 1;
                    w.api_failures
                };
                if failures < MAX_API_FAILURES {
                    return Ok(());
                }
                self.end_vmm(&rec, true, Duration::ZERO);
                self.record_end(&rec, VmState::Crashed, format!("the VMM's API stopped answering ({e}); VMM killed"))
            }
        }
    }

    /// Puts the restart count of a VM that has run for `restart_reset_after` back to 0.
    fn reset_restarts_if_stable(&self, rec: &VmRecord) -> Result<(), ServiceError> {
        let rt = &rec.runtime;
        let up_ms = rt.started_ms.map_or(0, |t| now_ms().saturating_sub(t));
        let stable_ms = i64::try_from(self.restart_reset_after.as_millis()).unwrap_or(i64::MAX);
        if rt.restarts == 0 || up_ms < stable_ms {
            return Ok(());
        }
        let mut fresh = rt.clone();
        fresh.restarts = 0;
        let detail = format!("{} restarts forgotten after {}s of running", rt.restarts, up_ms / 1000);
        let event = NewEvent::vm(&rec.name, "restarts-reset", detail, Peer::default());
        self.store().set_runtime(&rec.name, &fresh, None, &[event])?;
        Ok(())
    }

    /// Restarts `name` if its back-off has passed.
    fn restart_if_due(&self, name: &str) -> Result<(), ServiceError> {
        let due = lock(&self.restart_at).get(name).is_some_and(|t| *t <= Instant::now());
        if !due {
            return Ok(());
        }
        let Ok(_claim) = self.claim(name, "restart") else { return Ok(()) };
        lock(&self.restart_at).remove(name);
        let Some(rec) = self.store().get(name)? else { return Ok(()) };
        if rec.runtime.state.is_active() || !rec.desired_running {
            return Ok(());
        }
        let attempt = rec.runtime.restarts + 1;
        match self.launch(&rec, Peer::default(), Launch::Restart(attempt), None) {
            Ok(()) => Ok(()),
            Err(ServiceError::StartFailed { .. }) if attempt < MAX_RESTARTS => {
                lock(&self.restart_at).insert(name.into(), Instant::now() + backoff(attempt));
                Ok(())
            }
            Err(ServiceError::StartFailed { msg, .. }) => {
                let down = Runtime::down(VmState::Crashed, Some(format!("start failed: {msg}")), attempt);
                let ev = NewEvent::vm(
                    name,
                    "restart-limit",
                    format!("not restarted: {attempt} restarts already"),
                    Peer::default(),
                );
                self.store().set_runtime(name, &down, Some(false), &[ev])?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// The daemon runs elsewhere than its clients: every host path must be absolute.
fn check_absolute(c: &crate::types::VmConfig) -> Result<(), ServiceError> {
    let console = match &c.console {
        Some(vmm::ConsoleOut::File(f)) => f.to_str(),
        _ => None,
    };
    let mut paths = vec![("config.kernel".to_string(), c.kernel.as_str())];
    if let Some(i) = &c.initrd {
        paths.push(("config.initrd".into(), i));
    }
    for (n, d) in c.disks.iter().enumerate() {
        paths.push((format!("config.disks[{n}].path"), &d.path));
    }
    if let Some(v) = &c.vsock {
        paths.push(("config.vsock.socket".into(), &v.socket));
    }
    if let Some(f) = console {
        paths.push(("config.console".into(), f));
    }
    match paths.into_iter().find(|(_, p)| !p.is_empty() && !p.starts_with('/')) {
        Some((field, p)) => Err(bad(field, format!("'{p}' is relative (accepted: an absolute path)"))),
        None => Ok(()),
    }
}

/// Checks the start-up policy's numbers.
fn check_policy(p: &Policy) -> Result<(), ServiceError> {
    if p.start_order > MAX_START_ORDER {
        return Err(bad("start_order", format!("{} (accepted: 0 to {MAX_START_ORDER})", p.start_order)));
    }
    if p.start_delay_s > MAX_START_DELAY_S {
        return Err(bad("start_delay_s", format!("{} (accepted: 0 to {MAX_START_DELAY_S})", p.start_delay_s)));
    }
    Ok(())
}

/// A VMM configuration error as a daemon one: the field is under `config.`.
fn config_error(e: api::ApiError) -> ServiceError {
    match e {
        api::ApiError::BadRequest { field, msg } => bad(format!("config.{field}"), msg),
        other => bad("config", other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_operation_at_a_time_and_requests_wait_for_the_supervisor() {
        let dir = std::env::temp_dir().join(format!("rv-claim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("rustvisor.db")).unwrap();
        let paths = DaemonPaths { state_dir: dir.clone(), run_dir: dir.clone(), vmm_exe: "/bin/false".into() };
        let svc = Service::new(paths, store);
        let start = svc.claim("a", "start").unwrap();
        match svc.claim("a", "stop") {
            Err(ServiceError::Busy { operation, .. }) => assert_eq!(operation, "start"),
            other => panic!("{other:?}"),
        }
        assert!(svc.claim("b", "stop").is_ok(), "another VM is free");
        drop(start);
        std::thread::scope(|s| {
            let sup = svc.claim("a", SUPERVISE).unwrap();
            assert!(svc.claim("a", SUPERVISE).is_err(), "the supervisor never waits");
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                drop(sup);
            });
            let t = Instant::now();
            assert!(svc.claim("a", "stop").is_ok(), "a request waits for the supervisor's look");
            assert!(t.elapsed() >= Duration::from_millis(40));
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let s: Vec<u64> = (0..9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
