//! The VMM side of the REST API: one VM's life (create, boot, pause, resume, shutdown,
//! reboot, delete, snapshot, restore, backup) behind [`api::Controller`].

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use api::types;
use api::ApiError;

use crate::backup::Backup;
use crate::config::VmConfig;
use crate::vm::{RunOutcome, Vm};

/// How long `vm.shutdown` waits for the guest to power off after the power button.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How long `vmm.shutdown` tries to stop the VM cleanly (flushing disk images) before the
/// process ends anyway.
pub const VMM_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

enum Slot {
    Empty,
    Created {
        cfg: VmConfig,
    },
    Live {
        /// The latest backup (declared first: it ends before the VM's devices go).
        backup: Option<Backup>,
        vm: Box<Vm>,
        cfg: VmConfig,
        booted: Instant,
        paused: bool,
    },
    Shutdown {
        cfg: VmConfig,
        accel: String,
        ended: types::VmEnd,
    },
    /// A long operation (`vm.boot`, `vm.restore`) runs without the lock held; `prev` comes
    /// back if it fails. Every other request answers at once (409 for actions).
    Busy {
        action: &'static str,
        prev: Box<Slot>,
    },
}

impl Slot {
    fn state(&self) -> &'static str {
        match self {
            Slot::Empty => "NotCreated",
            Slot::Created { .. } => "Created",
            Slot::Live { paused: false, .. } => "Running",
            Slot::Live { paused: true, .. } => "Paused",
            Slot::Shutdown { .. } => "Shutdown",
            Slot::Busy { action: "vm.boot", .. } => "Booting",
            Slot::Busy { .. } => "Restoring",
        }
    }
}

/// The VMM's one VM, driven by API requests.
pub struct VmmController {
    slot: Mutex<Slot>,
    exit: Arc<ExitFlag>,
}

/// Set once by `vmm.shutdown`; [`VmmController::wait_exit`] waits for it.
#[derive(Default)]
struct ExitFlag {
    done: Mutex<bool>,
    cv: Condvar,
}

/// A handle that can end the VMM from another thread.
struct ExitHandle(Arc<ExitFlag>);

impl ExitHandle {
    fn request(&self) {
        *self.0.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.0.cv.notify_all();
    }
}

fn bad(field: impl Into<String>, msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest { field: field.into(), msg: msg.into() }
}

fn conflict(action: &str, state: &str) -> ApiError {
    ApiError::Conflict { action: action.into(), state: state.into() }
}

/// The JSON field of [`crate::config::VmConfig`] for a command-line flag named in an
/// [`crate::Error::Config`].
fn json_field(flag: &str) -> &str {
    match flag {
        "--memory" => "memory_mib",
        "--disk" | "--disk/--net" => "disks",
        "--net" => "nets",
        "--memory-options" => "memory_options",
        f => f.trim_start_matches("--"),
    }
}

/// 4 KiB balloon pages per MiB.
const MIB_PAGES: u64 = 256;

/// The running or paused VM and its configuration, for `vm.balloon` (409 otherwise; a VM
/// without a balloon is the caller's [`no_balloon`]).
fn live_balloon(slot: &Slot) -> Result<(&Vm, &VmConfig), ApiError> {
    match slot {
        Slot::Live { vm, cfg, .. } => Ok((vm, cfg)),
        Slot::Empty => Err(ApiError::NotFound("no VM: create one with vm.create".into())),
        // A VM created with a balloon but not booted has no device yet; one without says so.
        Slot::Created { cfg } | Slot::Shutdown { cfg, .. } if cfg.balloon.is_none() => Err(no_balloon(slot)),
        s => Err(conflict("vm.balloon", s.state())),
    }
}

fn no_balloon(slot: &Slot) -> ApiError {
    ApiError::NoDevice {
        action: "vm.balloon".into(),
        device: "balloon".into(),
        field: "balloon".into(),
        state: slot.state().into(),
    }
}

/// The API's account of how a VM ended.
fn vm_end(outcome: Result<RunOutcome, crate::vstate::VcpuError>) -> types::VmEnd {
    match outcome {
        Ok(RunOutcome::PowerOff) => types::VmEnd::PowerOff,
        Ok(RunOutcome::UserQuit) => types::VmEnd::UserQuit,
        Ok(RunOutcome::Reset(reason)) => types::VmEnd::Reset { reason },
        Err(e) => types::VmEnd::Error { reason: e.to_string() },
    }
}

/// Maps a VMM error to the API: configuration problems are the client's (400 naming the
/// field), the rest are ours (500).
pub fn api_error(e: crate::Error) -> ApiError {
    match e {
        crate::Error::Config { field, msg } => bad(json_field(field), msg),
        crate::Error::Kernel { path, format, source } => {
            bad("kernel", format!("{}: not a loadable {format}: {source}", path.display()))
        }
        crate::Error::KernelImage { path, problem } => bad("kernel", format!("{}: {problem}", path.display())),
        crate::Error::Io { path, err } => bad("kernel", format!("{path}: {err}")),
        other => ApiError::Internal(other.to_string()),
    }
}

/// Maps a snapshot error to the API: a bad source or destination is the client's (400 naming
/// `source_url` / `destination_url`, or the configuration's field), the rest are ours (500).
fn persist_error(e: crate::persist::Error) -> ApiError {
    use crate::persist::Error as P;
    match e {
        P::Read { .. } | P::Invalid { .. } | P::Corrupt { .. } | P::Mismatch { .. } | P::Accelerator { .. } => {
            bad("source_url", e.to_string())
        }
        P::Destination { .. } => bad("destination_url", e.to_string()),
        P::Vm(e) => api_error(e),
        P::Write { .. } | P::Save { .. } => ApiError::Internal(e.to_string()),
    }
}

/// Maps a backup error to the API: a bad destination is the client's (400 naming
/// `destination_url`), the rest are ours (500).
fn backup_error(e: crate::backup::Error) -> ApiError {
    match e {
        crate::backup::Error::Destination { .. } => bad("destination_url", e.to_string()),
        crate::backup::Error::Disk { .. } => ApiError::Internal(e.to_string()),
    }
}

const NO_VM: &str = "no VM: create one with vm.create";
const NO_BACKUP: &str = "no backup was started on this VM: start one with PUT vm.backup";

impl Default for VmmController {
    fn default() -> Self {
        Self::new()
    }
}

impl VmmController {
    /// A VMM with no VM.
    pub fn new() -> VmmController {
        VmmController { slot: Mutex::new(Slot::Empty), exit: Arc::default() }
    }

    /// A VMM that already runs `vm` (started by `rustvisor run --api-socket`).
    pub fn with_running(vm: Vm, cfg: VmConfig) -> VmmController {
        let c = Self::new();
        *c.lock() = Slot::Live { backup: None, vm: Box::new(vm), cfg, booted: Instant::now(), paused: false };
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves a VM whose guest ended by itself (power-off, reset, crash) to `Shutdown`.
    fn reap(slot: &mut Slot) {
        if let Slot::Live { vm, .. } = slot {
            if let Some(outcome) = vm.control().outcome() {
                tracing::info!("VM ended: {outcome:?}");
                let old = std::mem::replace(slot, Slot::Empty);
                if let Slot::Live { mut vm, cfg, .. } = old {
                    vm.stop();
                    let accel = vm.accelerator().to_string();
                    *slot = Slot::Shutdown { cfg, accel, ended: vm_end(outcome) };
                }
            }
        }
    }

    /// Blocks until `vmm.shutdown` (or [`VmmController::request_exit`]).
    pub fn wait_exit(&self) {
        let mut e = self.exit.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*e {
            e = self.exit.cv.wait(e).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until `vmm.shutdown` or until the VM (if any) ends by itself; returns the VM's
    /// outcome in the latter case.
    pub fn wait_exit_or_vm_end(&self) -> Option<Result<RunOutcome, crate::vstate::VcpuError>> {
        loop {
            {
                let e = self.exit.done.lock().unwrap_or_else(|e| e.into_inner());
                if *e {
                    return None;
                }
                let _ = self.exit.cv.wait_timeout(e, Duration::from_millis(100));
            }
            if let Slot::Live { vm, .. } = &*self.lock() {
                if let Some(o) = vm.control().outcome() {
                    return Some(o);
                }
            }
        }
    }

    /// Makes [`VmmController::wait_exit`] return.
    pub fn request_exit(&self) {
        self.exit_handle().request();
    }

    /// Marks `slot` busy with `action` (the caller checked that the action may start).
    fn begin(slot: &mut Slot, action: &'static str) {
        let prev = std::mem::replace(slot, Slot::Empty);
        *slot = Slot::Busy { action, prev: Box::new(prev) };
    }

    /// Ends the operation [`VmmController::begin`] started: installs its result, or puts the
    /// previous state back on error. After `vmm.shutdown` a finished VM is dropped instead.
    fn finish(&self, result: Result<Slot, ApiError>) -> Result<(), ApiError> {
        let mut slot = self.lock();
        let prev = match std::mem::replace(&mut *slot, Slot::Empty) {
            Slot::Busy { prev, .. } => *prev,
            // vmm.shutdown emptied the slot meanwhile: drop what was built.
            other => {
                *slot = other;
                return result.map(drop);
            }
        };
        match result {
            Ok(new) => {
                *slot = new;
                Ok(())
            }
            Err(e) => {
                *slot = prev;
                Err(e)
            }
        }
    }

    fn exit_handle(&self) -> ExitHandle {
        ExitHandle(Arc::clone(&self.exit))
    }

    fn boot_vm(cfg: &VmConfig) -> Result<Box<Vm>, ApiError> {
        let mut vm = Vm::new(cfg).map_err(api_error)?;
        vm.start().map_err(api_error)?;
        Ok(Box::new(vm))
    }
}

impl api::Controller for VmmController {
    fn ping(&self) -> types::PingInfo {
        let accelerators = accel::usable_engines().into_iter().map(String::from).collect();
        types::PingInfo { version: env!("CARGO_PKG_VERSION").to_string(), accelerators, pid: std::process::id() }
    }

    fn create(&self, cfg: types::VmConfig) -> Result<(), ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        match &*slot {
            Slot::Empty | Slot::Created { .. } | Slot::Shutdown { .. } => {}
            s => return Err(conflict("vm.create", s.state())),
        }
        crate::config::validate(&cfg).map_err(api_error)?;
        *slot = Slot::Created { cfg };
        Ok(())
    }

    fn boot(&self) -> Result<(), ApiError> {
        let cfg = {
            let mut slot = self.lock();
            Self::reap(&mut slot);
            let cfg = match &*slot {
                Slot::Created { cfg } | Slot::Shutdown { cfg, .. } => cfg.clone(),
                s => return Err(conflict("vm.boot", s.state())),
            };
            Self::begin(&mut slot, "vm.boot");
            cfg
        };
        // Opening the kernel, initrd and disks may be slow: other requests answer meanwhile.
        let vm = Self::boot_vm(&cfg);
        self.finish(vm.map(|vm| Slot::Live { backup: None, vm, cfg, booted: Instant::now(), paused: false }))
    }

    fn pause(&self) -> Result<(), ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        match &mut *slot {
            Slot::Live { vm, paused: p @ false, .. } => {
                vm.pause();
                *p = true;
                Ok(())
            }
            s => Err(conflict("vm.pause", s.state())),
        }
    }

    fn resume(&self) -> Result<(), ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        match &mut *slot {
            Slot::Live { vm, paused: p @ true, .. } => {
                vm.resume();
                *p = false;
                Ok(())
            }
            s => Err(conflict("vm.resume", s.state())),
        }
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        let Slot::Live { vm, paused, .. } = &mut *slot else {
            return Err(conflict("vm.shutdown", slot.state()));
        };
        if *paused {
            vm.resume();
            *paused = false;
        }
        // The guest-visible power button; a guest that does not act on it is stopped anyway.
        vm.press_power_button();
        let end = Instant::now() + SHUTDOWN_GRACE;
        while vm.control().outcome().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let old = std::mem::replace(&mut *slot, Slot::Empty);
        if let Slot::Live { mut vm, cfg, .. } = old {
            // A guest that acted on the button powered off; else it was stopped by force.
            let ended = vm.control().outcome().map_or(types::VmEnd::Shutdown, vm_end);
            vm.stop();
            let accel = vm.accelerator().to_string();
            *slot = Slot::Shutdown { cfg, accel, ended };
        }
        Ok(())
    }

    fn reboot(&self) -> Result<(), ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        let cfg = match &*slot {
            Slot::Live { cfg, .. } => cfg.clone(),
            s => return Err(conflict("vm.reboot", s.state())),
        };
        // A reset is a fresh boot of the same configuration (devices, memory and vCPUs anew).
        *slot = Slot::Created { cfg: cfg.clone() };
        let vm = Self::boot_vm(&cfg)?;
        *slot = Slot::Live { backup: None, vm, cfg, booted: Instant::now(), paused: false };
        Ok(())
    }

    fn delete(&self) -> Result<(), ApiError> {
        let mut slot = self.lock();
        match &*slot {
            Slot::Empty => return Err(ApiError::NotFound("no VM: create one with vm.create".into())),
            s @ Slot::Busy { .. } => return Err(conflict("vm.delete", s.state())),
            _ => {}
        }
        *slot = Slot::Empty;
        Ok(())
    }

    fn info(&self) -> Result<types::VmInfo, ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        let state = slot.state().to_string();
        match &*slot {
            Slot::Empty => Err(ApiError::NotFound("no VM: create one with vm.create".into())),
            Slot::Created { cfg } => {
                Ok(types::VmInfo { state, config: cfg.clone(), uptime_s: 0.0, accelerator: None, ended: None })
            }
            Slot::Live { vm, cfg, booted, .. } => Ok(types::VmInfo {
                state,
                config: cfg.clone(),
                uptime_s: booted.elapsed().as_secs_f64(),
                accelerator: Some(vm.accelerator().into()),
                ended: None,
            }),
            Slot::Shutdown { cfg, accel, ended } => Ok(types::VmInfo {
                state,
                config: cfg.clone(),
                uptime_s: 0.0,
                accelerator: Some(accel.clone()),
                ended: Some(ended.clone()),
            }),
            Slot::Busy { prev, .. } => match &**prev {
                Slot::Created { cfg } | Slot::Shutdown { cfg, .. } => {
                    Ok(types::VmInfo { state, config: cfg.clone(), uptime_s: 0.0, accelerator: None, ended: None })
                }
                _ => Err(conflict("vm.info", &state)),
            },
        }
    }

    fn counters(&self) -> Result<types::Counters, ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        let Slot::Live { vm, .. } = &*slot else {
            return Err(conflict("vm.counters", slot.state()));
        };
        let vcpus = vm
            .exit_counts
            .iter()
            .map(|e| e.snapshot().into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            .collect();
        let mut devices = std::collections::BTreeMap::new();
        for d in &vm.virtio {
            let c = d.dev.lock().unwrap_or_else(|e| e.into_inner()).counters();
            let l = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            devices.insert(
                d.name.clone(),
                types::DeviceCounters {
                    requests: l(&c.requests),
                    bytes_read: l(&c.bytes_read),
                    bytes_written: l(&c.bytes_written),
                    errors: l(&c.errors),
                },
            );
        }
        let (guest_warnings, guest_warnings_suppressed) = devices::guest_log::counts();
        Ok(types::Counters { vcpus, devices, guest_warnings, guest_warnings_suppressed })
    }

    fn balloon_set(&self, target_mib: u64) -> Result<(), ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        let (vm, cfg) = live_balloon(&slot)?;
        let handle = vm.balloon.as_ref().ok_or_else(|| no_balloon(&slot))?;
        let pages = target_mib.checked_mul(MIB_PAGES).and_then(|p| u32::try_from(p).ok());
        match pages {
            Some(p) if target_mib <= cfg.memory_mib => {
                handle.set_target_pages(p);
                Ok(())
            }
            _ => {
                Err(bad("target_mib", format!("{target_mib} MiB (accepted: 0 to {}, the guest's RAM)", cfg.memory_mib)))
            }
        }
    }

    fn balloon_info(&self) -> Result<types::BalloonInfo, ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        let (vm, _) = live_balloon(&slot)?;
        let h = vm.balloon.as_ref().ok_or_else(|| no_balloon(&slot))?;
        let stats = h.stats();
        Ok(types::BalloonInfo {
            target_mib: u64::from(h.target_pages()) / MIB_PAGES,
            actual_mib: u64::from(h.actual_pages()) / MIB_PAGES,
            stats: stats.map(|(s, _)| types::BalloonStats {
                swap_in_bytes: s.swap_in,
                swap_out_bytes: s.swap_out,
                major_faults: s.major_faults,
                minor_faults: s.minor_faults,
                free_bytes: s.free_memory,
                total_bytes: s.total_memory,
                available_bytes: s.available_memory,
                disk_caches_bytes: s.disk_caches,
                hugetlb_allocations: s.hugetlb_allocations,
                hugetlb_failures: s.hugetlb_failures,
            }),
            stats_age_s: stats.map(|(_, age)| age.as_secs_f64()),
            reported_mib: h.reported_bytes() >> 20,
        })
    }

    fn snapshot(&self, destination_dir: &str) -> Result<(), ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        match &*slot {
            Slot::Live { vm, cfg, paused: true, .. } => {
                crate::persist::save(vm, cfg, std::path::Path::new(destination_dir)).map_err(persist_error)
            }
            s => Err(conflict("vm.snapshot", s.state())),
        }
    }

    fn restore(&self, source_dir: &str) -> Result<(), ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        match &*slot {
            Slot::Empty | Slot::Created { .. } | Slot::Shutdown { .. } => {}
            s => return Err(conflict("vm.restore", s.state())),
        }
        Self::begin(&mut slot, "vm.restore");
        drop(slot);
        // Reading the snapshot may be slow: other requests answer meanwhile.
        let r = crate::persist::restore(std::path::Path::new(source_dir)).map_err(persist_error);
        self.finish(r.map(|(vm, cfg)| Slot::Live {
            backup: None,
            vm: Box::new(vm),
            cfg,
            booted: Instant::now(),
            paused: true,
        }))
    }

    fn backup(&self, destination_dir: &str, rate_limit_mib_s: Option<u64>) -> Result<types::BackupStatus, ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        let state = slot.state();
        let Slot::Live { vm, paused, backup, .. } = &mut *slot else {
            return Err(match &*slot {
                Slot::Empty => ApiError::NotFound(NO_VM.into()),
                s => conflict("vm.backup", s.state()),
            });
        };
        if backup.as_ref().is_some_and(Backup::is_running) {
            return Err(conflict("vm.backup (a backup runs already; DELETE vm.backup cancels it)", state));
        }
        let started = Backup::start(vm, *paused, std::path::Path::new(destination_dir), rate_limit_mib_s)
            .map_err(backup_error)?;
        let status = started.status();
        *backup = Some(started);
        Ok(status)
    }

    fn backup_status(&self) -> Result<types::BackupStatus, ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        match &*slot {
            Slot::Live { backup: Some(b), .. } => Ok(b.status()),
            Slot::Live { backup: None, .. } => Err(ApiError::NotFound(NO_BACKUP.into())),
            Slot::Empty => Err(ApiError::NotFound(NO_VM.into())),
            s => Err(conflict("vm.backup", s.state())),
        }
    }

    fn backup_cancel(&self) -> Result<(), ApiError> {
        let mut slot = self.lock();
        Self::reap(&mut slot);
        match &*slot {
            Slot::Live { backup: Some(b), .. } => {
                b.cancel();
                Ok(())
            }
            Slot::Live { backup: None, .. } => Err(ApiError::NotFound(NO_BACKUP.into())),
            Slot::Empty => Err(ApiError::NotFound(NO_VM.into())),
            s => Err(conflict("vm.backup", s.state())),
        }
    }

    fn vmm_shutdown(&self) {
        // Whatever happens below (a VM that will not stop, an operation stuck on a file), the
        // process ends by the deadline.
        let spawned = std::thread::Builder::new().name("vmm-shutdown-deadline".into()).spawn({
            let exit = self.exit_handle();
            move || {
                std::thread::sleep(VMM_SHUTDOWN_DEADLINE);
                tracing::error!("vmm.shutdown: the VM did not stop within {VMM_SHUTDOWN_DEADLINE:?}; exiting anyway");
                exit.request();
            }
        });
        if spawned.is_err() {
            tracing::error!("vmm.shutdown: cannot start the deadline thread; exiting at once");
            self.request_exit();
            return;
        }
        // Stopping the VM drops its devices, which writes back qcow2 metadata caches.
        let old = std::mem::replace(&mut *self.lock(), Slot::Empty);
        drop(old);
        self.request_exit();
    }
}
