//! The VMM side of the REST API: one VM's life (create, boot, pause, resume, shutdown,
//! reboot, delete, snapshot, restore, backup) behind [`api::Controller`].
//!
//! Besides API requests, the controller takes the live VM's device messages
//! ([`DeviceEvent`]) on a thread of its own ("vm-events", one per VM, ending with the VM's
//! devices): a disk with `on_error: pause` that stalled on a host I/O error makes it pause
//! the VM as `vm.pause` does, and record why (`vm.info`'s `pause_reason`); `vm.resume` tells
//! the stalled disks to retry before the vCPUs go on.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use api::types;
use api::ApiError;

use crate::backup::Backup;
use crate::config::VmConfig;
use crate::virtio_devices::DeviceEvent;
use crate::vm::{RunControl, RunOutcome, Vm};

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
        /// Why the VMM paused the VM by itself (a disk's host I/O error); cleared on resume.
        pause_reason: Option<String>,
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

/// The VMM's one VM, driven by API requests (and its devices' messages).
pub struct VmmController {
    /// Shared (weakly) with the device-event thread of the live VM.
    slot: Arc<Mutex<Slot>>,
    exit: Arc<ExitFlag>,
}

/// Set once by `vmm.shutdown`; [`VmmController::wait_exit`] waits for it.
#[derive(Default)]
struct ExitFlag {
    state: Mutex<ExitState>,
    /// Notified when `state` changes.
    cv: Condvar,
}

#[derive(Default)]
struct ExitState {
    /// `vmm.shutdown` (or [`VmmController::request_exit`]) was asked for.
    done: bool,
    /// How many runs of VMs that were live in this VMM have ended (each one's
    /// [`RunControl::on_end`] counts it), so that [`VmmController::wait_exit_or_vm_end`]
    /// sleeps until one does instead of polling.
    vm_ends: u64,
}

impl ExitFlag {
    fn lock(&self) -> std::sync::MutexGuard<'_, ExitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle that can end the VMM from another thread.
struct ExitHandle(Arc<ExitFlag>);

impl ExitHandle {
    fn request(&self) {
        self.0.lock().done = true;
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

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}

fn histogram(h: &virtio::stats::LatencyHistogram) -> types::LatencyHistogram {
    let s = h.snapshot();
    types::LatencyHistogram { bounds_s: s.bounds_s, cumulative: s.cumulative, count: s.count, sum_s: s.sum_s }
}

/// A disk's statistics for `vm.counters`.
fn block_counters(b: &virtio::stats::BlockStats) -> types::BlockCounters {
    types::BlockCounters {
        read_ops: load(&b.read_ops),
        write_ops: load(&b.write_ops),
        flush_ops: load(&b.flush_ops),
        read_bytes: load(&b.read_bytes),
        write_bytes: load(&b.write_bytes),
        error_pauses: load(&b.error_pauses),
        read_latency: histogram(&b.read_latency),
        write_latency: histogram(&b.write_latency),
        flush_latency: histogram(&b.flush_latency),
    }
}

/// A NIC's statistics for `vm.counters`.
fn net_counters(n: &virtio::stats::NetStats) -> types::NetCounters {
    types::NetCounters {
        rx_packets: load(&n.rx_packets),
        rx_bytes: load(&n.rx_bytes),
        rx_dropped: load(&n.rx_dropped),
        rx_errors: load(&n.rx_errors),
        rx_no_buffers: load(&n.rx_no_buffers),
        tx_packets: load(&n.tx_packets),
        tx_bytes: load(&n.tx_bytes),
        tx_dropped: load(&n.tx_dropped),
        tx_errors: load(&n.tx_errors),
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
        VmmController { slot: Arc::new(Mutex::new(Slot::Empty)), exit: Arc::default() }
    }

    /// A VMM that already runs `vm` (started by `rustvisor run --api-socket`).
    pub fn with_running(mut vm: Vm, cfg: VmConfig) -> VmmController {
        let c = Self::new();
        let (events, ctl) = (vm.take_device_events(), vm.control());
        *c.lock() = Self::live(Box::new(vm), cfg, false);
        c.watch(events, &ctl);
        c
    }

    /// A live VM's slot.
    fn live(vm: Box<Vm>, cfg: VmConfig, paused: bool) -> Slot {
        Slot::Live { backup: None, vm, cfg, booted: Instant::now(), paused, pause_reason: None }
    }

    /// Serves the device messages of the VM whose run control is `ctl` (call once it is in
    /// the slot) on a thread that ends with the VM's devices. A message from a VM that is no
    /// longer the live one is ignored.
    /// Also makes the end of that run wake [`VmmController::wait_exit_or_vm_end`].
    fn watch(&self, events: Option<Receiver<DeviceEvent>>, ctl: &Arc<RunControl>) {
        let exit = Arc::downgrade(&self.exit);
        ctl.on_end(Box::new(move || {
            if let Some(exit) = exit.upgrade() {
                exit.lock().vm_ends += 1;
                exit.cv.notify_all();
            }
        }));
        let Some(events) = events else { return };
        let (slot, ctl) = (Arc::downgrade(&self.slot), Arc::downgrade(ctl));
        let spawned = std::thread::Builder::new().name("vm-events".into()).spawn(move || {
            seccomp::apply(seccomp::Role::VmEvents);
            for event in events {
                let Some(slot) = slot.upgrade() else { return };
                let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                Self::device_event(&mut slot, &ctl, event);
            }
        });
        if let Err(e) = spawned {
            // The disks that stall then wait, with the VM running, until vm.pause/vm.resume.
            tracing::error!(
                "cannot start the device event thread: {e}; disks with on_error=pause will not pause the VM"
            );
        }
    }

    /// Acts on one device message for the VM whose run control is `ctl`.
    fn device_event(slot: &mut Slot, ctl: &Weak<RunControl>, event: DeviceEvent) {
        let Slot::Live { vm, paused, pause_reason, .. } = slot else {
            tracing::debug!("{event} (the VM is not live; ignored)");
            return;
        };
        if !ctl.upgrade().is_some_and(|c| Arc::ptr_eq(&c, &vm.control())) || vm.control().outcome().is_some() {
            tracing::debug!("{event} (from a VM that is gone; ignored)");
            return;
        }
        match event {
            DeviceEvent::DiskStalled { .. } => {
                tracing::warn!("{event}: pausing the VM (vm.resume retries the request)");
                if !*paused {
                    vm.pause();
                    *paused = true;
                }
                // The first reason stays until vm.resume.
                pause_reason.get_or_insert_with(|| event.to_string());
            }
        }
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
        let mut e = self.exit.lock();
        while !e.done {
            e = self.exit.cv.wait(e).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until `vmm.shutdown` or until the live VM (if any) ends by itself; returns the
    /// VM's outcome in the latter case. Sleeps in between: the end of the run of every VM
    /// made live in this VMM wakes it (a [`RunControl::on_end`] hook), and so does
    /// `vmm.shutdown`.
    pub fn wait_exit_or_vm_end(&self) -> Option<Result<RunOutcome, crate::vstate::VcpuError>> {
        loop {
            let seen = {
                let e = self.exit.lock();
                if e.done {
                    return None;
                }
                e.vm_ends
            };
            if let Slot::Live { vm, .. } = &*self.lock() {
                if let Some(o) = vm.control().outcome() {
                    return Some(o);
                }
            }
            // A run that ended after `seen` was read has counted itself: no lost wake-up.
            let mut e = self.exit.lock();
            while !e.done && e.vm_ends == seen {
                e = self.exit.cv.wait(e).unwrap_or_else(|e| e.into_inner());
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
        let mut vm = match Self::boot_vm(&cfg) {
            Ok(vm) => vm,
            Err(e) => return self.finish(Err(e)),
        };
        let (events, ctl) = (vm.take_device_events(), vm.control());
        self.finish(Ok(Self::live(vm, cfg, false)))?;
        self.watch(events, &ctl);
        Ok(())
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
            Slot::Live { vm, paused: p @ true, pause_reason, .. } => {
                if let Some(why) = pause_reason.take() {
                    tracing::info!("vm.resume after {why}: retrying");
                }
                // A disk that stalled serves the request it kept first; if that fails again,
                // its message pauses the VM again.
                vm.retry_stalled_disks();
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
            // Disks that stalled retry, so that the guest may finish its own shutdown.
            vm.retry_stalled_disks();
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
        let mut vm = Self::boot_vm(&cfg)?;
        let (events, ctl) = (vm.take_device_events(), vm.control());
        *slot = Self::live(vm, cfg, false);
        drop(slot);
        self.watch(events, &ctl);
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
            Slot::Created { cfg } => Ok(types::VmInfo {
                state,
                config: cfg.clone(),
                uptime_s: 0.0,
                accelerator: None,
                ended: None,
                pause_reason: None,
                vcpu_threads: Vec::new(),
            }),
            Slot::Live { vm, cfg, booted, pause_reason, .. } => Ok(types::VmInfo {
                state,
                config: cfg.clone(),
                uptime_s: booted.elapsed().as_secs_f64(),
                accelerator: Some(vm.accelerator().into()),
                ended: None,
                pause_reason: pause_reason.clone(),
                vcpu_threads: vm
                    .vcpu_tids()
                    .into_iter()
                    .enumerate()
                    .filter(|(_, tid)| *tid != 0)
                    .map(|(i, tid)| types::VcpuThread { vcpu: u32::try_from(i).unwrap_or(u32::MAX), tid })
                    .collect(),
            }),
            Slot::Shutdown { cfg, accel, ended } => Ok(types::VmInfo {
                state,
                config: cfg.clone(),
                uptime_s: 0.0,
                accelerator: Some(accel.clone()),
                ended: Some(ended.clone()),
                pause_reason: None,
                vcpu_threads: Vec::new(),
            }),
            Slot::Busy { prev, .. } => match &**prev {
                Slot::Created { cfg } | Slot::Shutdown { cfg, .. } => Ok(types::VmInfo {
                    state,
                    config: cfg.clone(),
                    uptime_s: 0.0,
                    accelerator: None,
                    ended: None,
                    pause_reason: None,
                    vcpu_threads: Vec::new(),
                }),
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
            let (c, stats) = {
                let dev = d.dev.lock().unwrap_or_else(|e| e.into_inner());
                (dev.counters(), dev.stats())
            };
            let l = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            let (block, net) = match stats {
                virtio::DeviceStats::None => (None, None),
                virtio::DeviceStats::Block(b) => (Some(block_counters(&b)), None),
                virtio::DeviceStats::Net(n) => (None, Some(net_counters(&n))),
            };
            devices.insert(
                d.name.clone(),
                types::DeviceCounters {
                    requests: l(&c.requests),
                    bytes_read: l(&c.bytes_read),
                    bytes_written: l(&c.bytes_written),
                    errors: l(&c.errors),
                    block,
                    net,
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
        let (mut vm, cfg) = match r {
            Ok(v) => v,
            Err(e) => return self.finish(Err(e)),
        };
        let (events, ctl) = (vm.take_device_events(), vm.control());
        self.finish(Ok(Self::live(Box::new(vm), cfg, true)))?;
        self.watch(events, &ctl);
        Ok(())
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
                seccomp::apply(seccomp::Role::Shutdown);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::RunState;

    /// A built (not started) emu VM with no devices, and its configuration.
    fn vm() -> (Box<Vm>, VmConfig) {
        let cfg: VmConfig =
            serde_json::from_str(r#"{"kernel": "/nonexistent", "memory_mib": 16, "accel": "emu"}"#).unwrap();
        let sel = accel::select(accel::Choice::Emu, accel::SelectOptions { allow_kvm_on_pvm: true }).unwrap();
        let mem = crate::memory::create(cfg.memory_bytes(), &cfg.memory_options).unwrap();
        (Box::new(Vm::build(&cfg, mem, sel.hypervisor.as_ref(), "test".into()).unwrap()), cfg)
    }

    fn stalled(name: &str) -> DeviceEvent {
        DeviceEvent::DiskStalled {
            name: name.into(),
            stall: virtio::block::Stall {
                what: "write at 4096".into(),
                error: std::io::Error::from_raw_os_error(libc::ENOSPC),
            },
        }
    }

    #[test]
    fn a_disk_stall_pauses_the_live_vm_with_its_reason_and_resume_clears_it() {
        let c = VmmController::new();
        let (vm, cfg) = vm();
        let ctl = vm.control();
        *c.lock() = VmmController::live(vm, cfg, false);
        VmmController::device_event(&mut c.lock(), &Arc::downgrade(&ctl), stalled("disk0"));
        let info = api::Controller::info(&c).unwrap();
        assert_eq!(info.state, "Paused");
        assert_eq!(
            info.pause_reason.as_deref(),
            Some("disk disk0: write at 4096: No space left on device (os error 28)")
        );
        assert_eq!(ctl.state(), RunState::Paused, "the vCPUs are paused as by vm.pause");
        // A second stall keeps the first reason.
        VmmController::device_event(&mut c.lock(), &Arc::downgrade(&ctl), stalled("disk1"));
        assert!(api::Controller::info(&c).unwrap().pause_reason.unwrap().starts_with("disk disk0: "));
        api::Controller::resume(&c).unwrap();
        let info = api::Controller::info(&c).unwrap();
        assert_eq!((info.state.as_str(), info.pause_reason), ("Running", None));
        assert_eq!(ctl.state(), RunState::Running);
    }

    #[test]
    fn a_stall_from_another_vm_is_ignored() {
        let c = VmmController::new();
        let (vm, cfg) = vm();
        let (old, _) = self::vm();
        *c.lock() = VmmController::live(vm, cfg, false);
        VmmController::device_event(&mut c.lock(), &Arc::downgrade(&old.control()), stalled("disk0"));
        drop(old);
        let info = api::Controller::info(&c).unwrap();
        assert_eq!((info.state.as_str(), info.pause_reason), ("Running", None));
        // And one for a VM that is gone altogether.
        VmmController::device_event(&mut c.lock(), &Weak::new(), stalled("disk0"));
        assert_eq!(api::Controller::info(&c).unwrap().state, "Running");
    }

    /// `rustvisor run --api-socket` waits here: the end of the live VM's run wakes it at
    /// once (no polling), with the outcome; a VM that is no longer live does not; and
    /// `vmm.shutdown` wakes it with none.
    #[test]
    fn wait_exit_or_vm_end_wakes_on_the_live_vms_end_and_on_shutdown() {
        let c = Arc::new(VmmController::new());
        let (first, cfg) = vm();
        let ctl = first.control();
        *c.lock() = VmmController::live(first, cfg, false);
        c.watch(None, &ctl);
        let waiter = std::thread::spawn({
            let c = c.clone();
            move || c.wait_exit_or_vm_end()
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "returned before the VM ended");
        ctl.finish(Ok(RunOutcome::PowerOff));
        let t = Instant::now();
        while !waiter.is_finished() {
            assert!(t.elapsed() < Duration::from_secs(10), "the end of the run did not wake the waiter");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(matches!(waiter.join().unwrap(), Some(Ok(RunOutcome::PowerOff))));

        // A VM that was live, then replaced: its end wakes the waiter, which goes back to
        // sleep; vmm.shutdown then ends the wait with no outcome.
        let c = Arc::new(VmmController::new());
        let (old, cfg) = vm();
        let old_ctl = old.control();
        *c.lock() = VmmController::live(old, cfg, false);
        c.watch(None, &old_ctl);
        let waiter = std::thread::spawn({
            let c = c.clone();
            move || c.wait_exit_or_vm_end()
        });
        let (new, cfg) = vm();
        let new_ctl = new.control();
        let gone = std::mem::replace(&mut *c.lock(), VmmController::live(new, cfg, false));
        c.watch(None, &new_ctl);
        old_ctl.finish(Ok(RunOutcome::UserQuit));
        drop(gone);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "the end of a VM that is no longer live ended the wait");
        c.request_exit();
        let t = Instant::now();
        while !waiter.is_finished() {
            assert!(t.elapsed() < Duration::from_secs(10), "vmm.shutdown did not wake the waiter");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(waiter.join().unwrap().is_none());
    }
}
