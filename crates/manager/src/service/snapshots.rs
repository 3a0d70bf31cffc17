//! VM snapshots (`/vms/{name}/snapshots`): create, list, revert, delete.
//!
//! A snapshot lives in `<state-dir>/vms/<vm>/snapshots/<name>/`:
//! - `vmm/`: the VMM's own snapshot (`vm.snapshot`: device and vCPU state, guest RAM), when
//!   the VM ran (running or paused) at the time;
//! - `disk<i>.img`: a sparse copy (or reflink) of each writable disk image, taken while the
//!   guest was paused and after the VMM flushed its disk caches, so disks and RAM agree.
//!
//! Read-only disks are not copied (nothing can change them). A snapshot is built in a hidden
//! `.<name>.partial` folder and renamed into place before the store records it, so a crash
//! never leaves a half-made snapshot that looks whole; leftovers are removed when a snapshot
//! of the same name is made again, or with the VM.
//!
//! A revert stops the VM's VMM (if any), puts each disk copy back in place (atomically, see
//! [`diskcopy::replace_with_copy`]), restores the configuration the VM had, and, for a
//! snapshot with RAM, starts a VMM that restores it and resumes the guest where it was.
//! The VM is paused for the snapshot's whole duration (RAM plus disk copies); with reflinks
//! (btrfs, XFS) the copies take milliseconds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use api::client::Client;

use super::{bad, lock, Launch, Service, ServiceError};
use crate::store::{now_ms, NewEvent, Peer, Runtime, SnapshotRecord};
use crate::types::{valid_name, SnapshotInfo, VmState, NAME_RULE};
use storage::copy as diskcopy;

/// The VMM's snapshot inside a snapshot folder.
const VMM_DIR: &str = "vmm";

impl Service {
    fn snapshot_dir(&self, vm: &str, snap: &str) -> PathBuf {
        self.vm_state_dir(vm).join("snapshots").join(snap)
    }

    fn check_snapshot_name(name: &str) -> Result<(), ServiceError> {
        if valid_name(name) {
            Ok(())
        } else {
            Err(bad("name", format!("'{}' is not a valid snapshot name ({NAME_RULE})", name.escape_debug())))
        }
    }

    fn snapshot_record(&self, vm: &str, snap: &str) -> Result<SnapshotRecord, ServiceError> {
        self.store()
            .snapshots(vm)?
            .into_iter()
            .find(|s| s.info.name == snap)
            .ok_or_else(|| ServiceError::NoSnapshot { vm: vm.into(), name: snap.into() })
    }

    /// `GET /vms/{name}/snapshots`.
    pub fn snapshots(&self, vm: &str) -> Result<Vec<SnapshotInfo>, ServiceError> {
        self.record(vm)?;
        Ok(self.store().snapshots(vm)?.into_iter().map(|s| s.info).collect())
    }

    /// `POST /vms/{name}/snapshots`: pauses a running VM, saves its VMM state and copies of
    /// its writable disks, and resumes it; a stopped VM's snapshot holds its disks only.
    pub fn snapshot_create(&self, vm: &str, snap: &str, peer: Peer) -> Result<SnapshotInfo, ServiceError> {
        Self::check_snapshot_name(snap)?;
        let _claim = self.claim(vm, "snapshot")?;
        let rec = self.record(vm)?;
        if self.store().snapshots(vm)?.iter().any(|s| s.info.name == snap) {
            return Err(ServiceError::SnapshotExists { vm: vm.into(), name: snap.into() });
        }
        let state = rec.runtime.state;
        if state == VmState::Starting {
            return Err(ServiceError::Conflict { vm: vm.into(), state, msg: "wait until it has started".into() });
        }
        let io = |what: String| move |source| ServiceError::Io { what, source };
        let dir = self.snapshot_dir(vm, snap);
        let partial = dir.with_file_name(format!(".{snap}.partial"));
        for d in [&dir, &partial] {
            let _ = std::fs::remove_dir_all(d);
        }
        std::fs::create_dir_all(&partial).map_err(io(format!("creating {}", partial.display())))?;
        // The VMM (as its jail's user) writes its state into it.
        self.give_to_jail(vm, &partial)?;
        let result = (|| {
            let client = if state.is_active() { Some(self.vmm_client(vm, &rec.runtime)?) } else { None };
            let vmm_err = |what| move |e| ServiceError::Vmm { vm: vm.into(), what, source: Box::new(e) };
            if let Some(c) = &client {
                if state == VmState::Running {
                    c.pause().map_err(vmm_err("vm.pause"))?;
                }
            }
            // From here the guest is paused: resume it whatever happens.
            let copied = (|| {
                if let Some(c) = &client {
                    c.snapshot(&partial.join(VMM_DIR)).map_err(vmm_err("vm.snapshot"))?;
                }
                let mut disks = Vec::new();
                for (i, d) in rec.config.disks.iter().enumerate().filter(|(_, d)| !d.readonly) {
                    let file = format!("disk{i}.img");
                    diskcopy::copy_sparse(Path::new(&d.path), &partial.join(&file))
                        .map_err(io(format!("copying disk {} into the snapshot", d.path)))?;
                    disks.push((d.path.clone(), file));
                }
                Ok::<_, ServiceError>(disks)
            })();
            if let (Some(c), VmState::Running) = (&client, state) {
                let resumed = c.resume().map_err(vmm_err("vm.resume"));
                if copied.is_ok() {
                    resumed?;
                }
            }
            copied
        })();
        let disks = match result {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(e);
            }
        };
        std::fs::File::open(&partial)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&partial, &dir))
            .and_then(|()| std::fs::File::open(dir.parent().unwrap_or(&dir))?.sync_all())
            .map_err(io(format!("moving the snapshot to {}", dir.display())))?;
        let info = SnapshotInfo {
            name: snap.into(),
            created_ms: now_ms(),
            size_bytes: diskcopy::allocated_bytes(&dir),
            memory: state.is_active(),
            vm_state: state,
        };
        let detail = format!(
            "{snap}: {}, {} disk(s), {} MiB",
            if info.memory { "with RAM" } else { "disks only" },
            disks.len(),
            info.size_bytes >> 20
        );
        let record = SnapshotRecord { info: info.clone(), config: rec.config.clone(), disks };
        if let Err(e) = self.store().add_snapshot(vm, &record, &NewEvent::vm(vm, "snapshot-created", detail, peer)) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        Ok(info)
    }

    /// `PUT /vms/{name}/snapshots/{snapshot}/revert`: the VM's disks, configuration and (for
    /// a snapshot with RAM) running state go back to the snapshot's.
    pub fn snapshot_revert(&self, vm: &str, snap: &str, peer: Peer) -> Result<SnapshotInfo, ServiceError> {
        Self::check_snapshot_name(snap)?;
        let _claim = self.claim(vm, "revert")?;
        let rec = self.record(vm)?;
        let s = self.snapshot_record(vm, snap)?;
        let dir = self.snapshot_dir(vm, snap);
        let io = |what: String| move |source| ServiceError::Io { what, source };
        // Check the snapshot's files before touching anything.
        for (_, file) in &s.disks {
            let f = dir.join(file);
            std::fs::metadata(&f).map_err(io(format!("snapshot file {}", f.display())))?;
        }
        if s.info.memory && !dir.join(VMM_DIR).is_dir() {
            return Err(ServiceError::Io {
                what: format!("snapshot {}", dir.display()),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "its VMM state is missing"),
            });
        }
        if rec.runtime.state.is_active() {
            self.end_vmm(&rec, true, Duration::ZERO);
        }
        let down = Runtime::down(VmState::Stopped, Some(format!("reverted to snapshot {snap}")), 0);
        self.store().set_runtime(vm, &down, Some(false), &[])?;
        lock(&self.restart_at).remove(vm);
        for (path, file) in &s.disks {
            diskcopy::replace_with_copy(&dir.join(file), Path::new(path))
                .map_err(io(format!("restoring disk {path} from snapshot {snap}")))?;
        }
        let mut rec = self.record(vm)?;
        if rec.config != s.config {
            rec.config = s.config.clone();
            let ev = NewEvent::vm(vm, "updated", format!("configuration of snapshot {snap}"), peer);
            self.store().update_vm(vm, &rec.config, &rec.policy, &rec.nics, &rec.resources, &ev)?;
        }
        let detail = format!("{snap}: {}", if s.info.memory { "disks and RAM" } else { "disks" });
        self.store().log(&NewEvent::vm(vm, "snapshot-reverted", detail, peer))?;
        if s.info.memory {
            let resume = s.info.vm_state != VmState::Paused;
            self.launch(&rec, peer, Launch::User, Some((&dir.join(VMM_DIR), resume)))?;
        }
        Ok(s.info)
    }

    /// `DELETE /vms/{name}/snapshots/{snapshot}`.
    pub fn snapshot_delete(&self, vm: &str, snap: &str, peer: Peer) -> Result<(), ServiceError> {
        Self::check_snapshot_name(snap)?;
        let _claim = self.claim(vm, "snapshot-delete")?;
        self.record(vm)?;
        self.snapshot_record(vm, snap)?;
        self.store().delete_snapshot(vm, snap, &NewEvent::vm(vm, "snapshot-deleted", snap, peer))?;
        let _ = std::fs::remove_dir_all(self.snapshot_dir(vm, snap));
        Ok(())
    }

    /// A client for the VMM of a VM that runs.
    pub(super) fn vmm_client(&self, vm: &str, rt: &Runtime) -> Result<Client, ServiceError> {
        let socket = rt.socket.clone().unwrap_or_default();
        let c = Client::new(&socket)
            .map_err(|source| ServiceError::Io { what: format!("starting an API client for VM {vm}"), source })?;
        Ok(c.with_timeout(Duration::from_secs(120)))
    }
}
