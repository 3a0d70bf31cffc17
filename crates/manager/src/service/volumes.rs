//! Storage pools and volumes (`/pools`), templates and clones (`/vms/{name}/template`,
//! `/vms/{name}/clone`), and backups (`/vms/{name}/backups`, `/backups`): the store keeps
//! names and who uses what; `crates/storage` does the image work.
//!
//! - A volume is used by a VM when one of the VM's disks is the volume's file; a volume in
//!   use cannot be deleted, nor resized while the VM runs; a volume other volumes are built on
//!   (a template's disk under linked clones) cannot be deleted or resized. Each refusal names
//!   the users.
//! - A template is a stopped VM whose pool volumes are made read-only (file mode and the
//!   disks' `readonly`); it is never started, only cloned. A linked clone's disks are qcow2
//!   overlays on the template's, so it takes milliseconds whatever the size.
//! - A backup holds the VM's definition (JSON) and each disk's data, with a checksum the store
//!   records; a restore checks it and makes a new VM with new volumes and new MACs.

use std::path::{Path, PathBuf};

use super::{bad, Service, ServiceError};
use crate::store::{now_ms, BackupRow, NewEvent, Peer};
use crate::types::{
    BackupCreate, BackupInfo, BackupRestore, CreateRequest, PoolCreate, PoolDetails, VmClone, VmState, VolumeAttach,
    VolumeClone, VolumeCreate, VolumeDetails,
};

fn format_of(field: &str, s: &str) -> Result<storage::Format, ServiceError> {
    match s {
        "raw" => Ok(storage::Format::Raw),
        "qcow2" => Ok(storage::Format::Qcow2),
        _ => Err(bad(field, format!("'{s}' (accepted: raw, qcow2)"))),
    }
}

fn disk_format(f: storage::Format) -> vmm::DiskFormat {
    match f {
        storage::Format::Raw => vmm::DiskFormat::Raw,
        storage::Format::Qcow2 => vmm::DiskFormat::Qcow2,
    }
}

impl Service {
    fn pool(&self, name: &str) -> Result<(storage::Pool, String), ServiceError> {
        let (_, path) = self
            .store()
            .pools()?
            .into_iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| ServiceError::NotFound(format!("pool {name}")))?;
        let pool = storage::Pool::open(&path).map_err(ServiceError::Storage)?;
        Ok((pool, path))
    }

    /// The pool and volume name of `path`, if it is a volume of one of the pools.
    fn volume_of(&self, path: &str) -> Result<Option<(String, storage::Pool, String)>, ServiceError> {
        let p = Path::new(path);
        let (Some(dir), Some(file)) = (p.parent(), p.file_name().and_then(|f| f.to_str())) else { return Ok(None) };
        let Some((stem, _)) = file.rsplit_once('.') else { return Ok(None) };
        let pools = self.store().pools()?;
        for (name, pool_path) in pools {
            if Path::new(&pool_path) == dir {
                let pool = storage::Pool::open(&pool_path).map_err(ServiceError::Storage)?;
                return Ok(Some((name, pool, stem.to_string())));
            }
        }
        Ok(None)
    }

    /// The VMs with a disk at `path` (and whether each is running).
    fn disk_users(&self, path: &Path) -> Result<Vec<(String, bool)>, ServiceError> {
        Ok(self
            .store()
            .list()?
            .into_iter()
            .filter(|r| r.config.disks.iter().any(|d| Path::new(&d.path) == path))
            .map(|r| (r.name, r.runtime.state.is_active()))
            .collect())
    }

    /// `POST /pools`.
    pub fn pool_create(&self, req: &PoolCreate, peer: Peer) -> Result<PoolDetails, ServiceError> {
        Self::check_name(&req.name).map_err(|_| bad("name", format!("'{}' is not a valid pool name", req.name)))?;
        if !req.path.starts_with('/') {
            return Err(bad("path", format!("'{}' is relative (accepted: an absolute path)", req.path)));
        }
        let _claim = self.claim(&format!("pool {}", req.name), "pool-create")?;
        let pool = if Path::new(&req.path).join(storage::POOL_MARKER).exists() {
            storage::Pool::open(&req.path)
        } else {
            storage::Pool::create(&req.path)
        }
        .map_err(ServiceError::Storage)?;
        let path = pool.path().display().to_string();
        let ev = NewEvent { vm: None, kind: "pool-created", detail: format!("{}: {path}", req.name), peer };
        self.store().add_pool(&req.name, &path, &ev).map_err(|e| match e {
            crate::store::StoreError::Duplicate(_) => {
                bad("name", format!("a pool named '{}' or at {path} already exists", req.name))
            }
            other => other.into(),
        })?;
        Ok(PoolDetails { name: req.name.clone(), info: pool.info().map_err(ServiceError::Storage)? })
    }

    /// `DELETE /pools/{name}`: only an empty pool (its directory stays).
    pub fn pool_delete(&self, name: &str, peer: Peer) -> Result<(), ServiceError> {
        let _claim = self.claim(&format!("pool {name}"), "pool-delete")?;
        let (pool, _) = self.pool(name)?;
        pool.delete().map_err(ServiceError::Storage)?;
        self.store().delete_pool(name, &NewEvent { vm: None, kind: "pool-deleted", detail: name.into(), peer })?;
        Ok(())
    }

    /// `GET /pools`.
    pub fn pool_list(&self) -> Result<Vec<PoolDetails>, ServiceError> {
        let pools = self.store().pools()?;
        pools
            .into_iter()
            .map(|(name, path)| {
                let info = storage::Pool::open(&path).and_then(|p| p.info()).map_err(ServiceError::Storage)?;
                Ok(PoolDetails { name, info })
            })
            .collect()
    }

    /// `GET /pools/{name}`.
    pub fn pool_info(&self, name: &str) -> Result<PoolDetails, ServiceError> {
        let (pool, _) = self.pool(name)?;
        Ok(PoolDetails { name: name.into(), info: pool.info().map_err(ServiceError::Storage)? })
    }

    fn volume_details(&self, pool_name: &str, info: storage::VolumeInfo) -> Result<VolumeDetails, ServiceError> {
        let used_by = self.disk_users(&info.path)?.into_iter().map(|(n, _)| n).collect();
        Ok(VolumeDetails { pool: pool_name.into(), info, used_by })
    }

    /// `POST /pools/{name}/volumes`: a new volume, or an import.
    pub fn volume_create(
        &self,
        pool_name: &str,
        req: &VolumeCreate,
        peer: Peer,
    ) -> Result<VolumeDetails, ServiceError> {
        let (pool, _) = self.pool(pool_name)?;
        let _claim = self.claim(&format!("volume {pool_name}/{}", req.name), "volume-create")?;
        let format = req.format.as_deref().map(|f| format_of("format", f)).transpose()?;
        let info = match (&req.import_from, req.size_bytes) {
            (Some(_), Some(_)) => return Err(bad("size_bytes", "give size_bytes or import_from, not both")),
            (None, None) => return Err(bad("size_bytes", "required for a new volume (or import_from)")),
            (None, Some(size)) => pool
                .create_volume(&req.name, size, format.unwrap_or(storage::Format::Qcow2), req.preallocate)
                .map_err(ServiceError::Storage)?,
            (Some(from), None) => {
                if !from.starts_with('/') {
                    return Err(bad("import_from", format!("'{from}' is relative (accepted: an absolute path)")));
                }
                let source_format = req.source_format.as_deref().map(|f| format_of("source_format", f)).transpose()?;
                let opts = storage::ImportOptions { source_format, format };
                pool.import_volume(&req.name, Path::new(from), opts).map_err(ServiceError::Storage)?
            }
        };
        let detail = format!(
            "{pool_name}/{}: {} {} bytes{}",
            info.name,
            info.format.as_str(),
            info.virtual_bytes,
            req.import_from.as_ref().map(|f| format!(", imported from {f}")).unwrap_or_default()
        );
        self.store().log(&NewEvent { vm: None, kind: "volume-created", detail, peer })?;
        self.volume_details(pool_name, info)
    }

    /// `GET /pools/{name}/volumes`.
    pub fn volume_list(&self, pool_name: &str) -> Result<Vec<VolumeDetails>, ServiceError> {
        let (pool, _) = self.pool(pool_name)?;
        let vols = pool.list_volumes().map_err(ServiceError::Storage)?;
        vols.into_iter().map(|v| self.volume_details(pool_name, v)).collect()
    }

    /// `GET /pools/{name}/volumes/{volume}`.
    pub fn volume_info(&self, pool_name: &str, vol: &str) -> Result<VolumeDetails, ServiceError> {
        let (pool, _) = self.pool(pool_name)?;
        let info = pool.volume_info(vol).map_err(ServiceError::Storage)?;
        self.volume_details(pool_name, info)
    }

    /// `DELETE /pools/{name}/volumes/{volume}`: refused while a VM has it as a disk, or
    /// another volume is built on it.
    pub fn volume_delete(&self, pool_name: &str, vol: &str, peer: Peer) -> Result<(), ServiceError> {
        let (pool, _) = self.pool(pool_name)?;
        let _claim = self.claim(&format!("volume {pool_name}/{vol}"), "volume-delete")?;
        let info = pool.volume_info(vol).map_err(ServiceError::Storage)?;
        let users: Vec<String> = self.disk_users(&info.path)?.into_iter().map(|(n, _)| n).collect();
        if !users.is_empty() {
            return Err(ServiceError::Refused(format!(
                "volume {pool_name}/{vol} is a disk of VM(s) {}",
                users.join(", ")
            )));
        }
        if info.read_only {
            pool.set_read_only(vol, false).map_err(ServiceError::Storage)?;
        }
        pool.delete_volume(vol).map_err(ServiceError::Storage)?;
        let ev = NewEvent { vm: None, kind: "volume-deleted", detail: format!("{pool_name}/{vol}"), peer };
        self.store().log(&ev)?;
        Ok(())
    }

    /// `PUT /pools/{name}/volumes/{volume}/resize`: grow only, not under a running VM.
    pub fn volume_resize(
        &self,
        pool_name: &str,
        vol: &str,
        size: u64,
        peer: Peer,
    ) -> Result<VolumeDetails, ServiceError> {
        let (pool, _) = self.pool(pool_name)?;
        let _claim = self.claim(&format!("volume {pool_name}/{vol}"), "volume-resize")?;
        let info = pool.volume_info(vol).map_err(ServiceError::Storage)?;
        let running: Vec<String> =
            self.disk_users(&info.path)?.into_iter().filter(|(_, active)| *active).map(|(n, _)| n).collect();
        if !running.is_empty() {
            return Err(ServiceError::Refused(format!(
                "volume {pool_name}/{vol} is a disk of running VM(s) {}; stop them first",
                running.join(", ")
            )));
        }
        let info = pool.resize_volume(vol, size).map_err(ServiceError::Storage)?;
        let ev = NewEvent {
            vm: None,
            kind: "volume-resized",
            detail: format!("{pool_name}/{vol}: {} bytes", info.virtual_bytes),
            peer,
        };
        self.store().log(&ev)?;
        self.volume_details(pool_name, info)
    }

    /// `POST /pools/{name}/volumes/{volume}/clone`.
    pub fn volume_clone(
        &self,
        pool_name: &str,
        vol: &str,
        req: &VolumeClone,
        peer: Peer,
    ) -> Result<VolumeDetails, ServiceError> {
        let (src, _) = self.pool(pool_name)?;
        let dst_name = req.pool.clone().unwrap_or_else(|| pool_name.to_string());
        let (dst, _) = self.pool(&dst_name)?;
        let _claim = self.claim(&format!("volume {pool_name}/{vol}"), "volume-clone")?;
        let info = src.clone_volume(vol, &dst, &req.name, req.linked).map_err(ServiceError::Storage)?;
        let ev = NewEvent {
            vm: None,
            kind: "volume-cloned",
            detail: format!(
                "{pool_name}/{vol} -> {dst_name}/{} ({})",
                req.name,
                if req.linked { "linked" } else { "full" }
            ),
            peer,
        };
        self.store().log(&ev)?;
        self.volume_details(&dst_name, info)
    }

    /// The disks of `--disk vol=POOL/NAME`: each volume's file with its format.
    ///
    /// Errors: 400 naming `volumes[i].volume` (bad syntax, no such pool or volume, a
    /// template's read-only volume attached writable).
    pub(super) fn resolve_volumes(&self, attach: &[VolumeAttach]) -> Result<Vec<vmm::DiskConfig>, ServiceError> {
        attach
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let field = format!("volumes[{i}].volume");
                let (pool_name, vol) = a
                    .volume
                    .split_once('/')
                    .ok_or_else(|| bad(&field, format!("'{}' (accepted: POOL/NAME)", a.volume)))?;
                let (pool, _) =
                    self.pool(pool_name).map_err(|_| bad(&field, format!("no pool named '{pool_name}'")))?;
                let info = pool.volume_info(vol).map_err(|e| bad(&field, e.to_string()))?;
                if info.read_only && !a.readonly {
                    return Err(bad(
                        &field,
                        format!("{} is read-only (a template's); attach it readonly=on", a.volume),
                    ));
                }
                Ok(vmm::DiskConfig {
                    path: info.path.display().to_string(),
                    format: Some(disk_format(info.format)),
                    readonly: a.readonly,
                    serial: None,
                    allow_backing_outside: false,
                    allow_data_file: false,
                    on_error: Default::default(),
                })
            })
            .collect()
    }

    /// `PUT /vms/{name}/template`: a stopped VM becomes a template: its pool volumes and
    /// disks read-only; it is never started again, only cloned.
    pub fn vm_template(&self, name: &str, peer: Peer) -> Result<(), ServiceError> {
        let _claim = self.claim(name, "template")?;
        let rec = self.record(name)?;
        if rec.runtime.state.is_active() {
            return Err(ServiceError::Conflict {
                vm: name.into(),
                state: rec.runtime.state,
                msg: "stop it first: only a stopped VM becomes a template".into(),
            });
        }
        let mut config = rec.config.clone();
        for d in &mut config.disks {
            if let Some((_, pool, vol)) = self.volume_of(&d.path)? {
                pool.set_read_only(&vol, true).map_err(ServiceError::Storage)?;
            }
            d.readonly = true;
        }
        let ev = NewEvent::vm(name, "updated", "disks read-only (template)", peer);
        self.store().update_vm(name, &config, &rec.policy, &rec.nics, &rec.resources, &ev)?;
        self.store().set_template(name, true, &NewEvent::vm(name, "templated", "", peer))?;
        Ok(())
    }

    /// The VMs whose disks are built on `rec`'s volumes (linked clones of a template).
    pub(super) fn clones_of(&self, disks: &[vmm::DiskConfig]) -> Result<Vec<String>, ServiceError> {
        let mut users = Vec::new();
        for d in disks {
            if let Some((_, pool, vol)) = self.volume_of(&d.path)? {
                for u in pool.backing_users(&vol).map_err(ServiceError::Storage)? {
                    let path = pool.volume_info(&u).map_err(ServiceError::Storage)?.path;
                    users.extend(self.disk_users(&path)?.into_iter().map(|(n, _)| n));
                    users.push(format!("volume {u}"));
                }
            }
        }
        users.sort();
        users.dedup();
        Ok(users)
    }

    /// `POST /vms/{name}/clone`: a new VM (new name, new MACs) with copies of the source's
    /// pool volumes (`<new>-disk<i>` in the same pool), linked (qcow2 overlays) when asked,
    /// which needs a template.
    pub fn vm_clone(&self, name: &str, req: &VmClone, peer: Peer) -> Result<crate::types::VmSummary, ServiceError> {
        Self::check_name(&req.name)?;
        let rec = self.record(name)?;
        if rec.runtime.state.is_active() {
            return Err(ServiceError::Conflict {
                vm: name.into(),
                state: rec.runtime.state,
                msg: "stop it first (or clone a template)".into(),
            });
        }
        if req.linked && !rec.template {
            return Err(bad("linked", format!("VM '{name}' is not a template (rustvisor vm template {name})")));
        }
        if self.store().get(&req.name)?.is_some() {
            return Err(ServiceError::Duplicate(req.name.clone()));
        }
        let mut config = rec.config.clone();
        let mut made: Vec<(storage::Pool, String)> = Vec::new();
        let result = (|| {
            for (i, d) in config.disks.iter_mut().enumerate() {
                match self.volume_of(&d.path)? {
                    Some((_, pool, vol)) => {
                        let new = format!("{}-disk{i}", req.name);
                        let info = pool.clone_volume(&vol, &pool, &new, req.linked).map_err(ServiceError::Storage)?;
                        made.push((pool, new));
                        d.path = info.path.display().to_string();
                        d.format = Some(disk_format(info.format));
                        d.readonly = d.readonly && !rec.template;
                    }
                    None if d.readonly => {}
                    None => {
                        return Err(bad(
                            format!("config.disks[{i}]"),
                            format!("{} is not a pool volume: only pool volumes and read-only disks clone", d.path),
                        ))
                    }
                }
            }
            let nics = rec.nics.iter().cloned().map(|mut n| {
                n.mac = None;
                n
            });
            let create = CreateRequest {
                name: req.name.clone(),
                restart: rec.policy.restart,
                autostart: false,
                start_order: rec.policy.start_order,
                start_delay_s: rec.policy.start_delay_s,
                nics: nics.collect(),
                volumes: Vec::new(),
                resources: rec.resources.clone(),
                config: config.clone(),
            };
            self.create(create, peer)
        })();
        match result {
            Ok(s) => {
                let how = if req.linked { "linked clone" } else { "full clone" };
                self.store().log(&NewEvent::vm(&req.name, "cloned", format!("{how} of {name}"), peer))?;
                Ok(s)
            }
            Err(e) => {
                for (pool, vol) in made {
                    let _ = pool.delete_volume(&vol);
                }
                Err(e)
            }
        }
    }

    fn backups_dir(&self) -> PathBuf {
        self.paths.state_dir.join("backups")
    }

    /// `POST /vms/{name}/backups`: the VM's definition and its disks' data, with a checksum.
    /// A stopped VM's disks are read as they are; a running or paused VM's writable disks are
    /// first exported by its VMM at one instant (`vm.backup`: the guest pauses for about a
    /// millisecond, then copy-before-write keeps the export at that instant while the guest
    /// runs on), and the exports are packed into the backup and removed.
    pub fn backup_create(&self, name: &str, req: &BackupCreate, peer: Peer) -> Result<BackupInfo, ServiceError> {
        let _claim = self.claim(name, "backup")?;
        let rec = self.record(name)?;
        if rec.runtime.state == VmState::Starting {
            return Err(ServiceError::Conflict {
                vm: name.into(),
                state: rec.runtime.state,
                msg: "wait until it has started".into(),
            });
        }
        let dir = match &req.to {
            Some(d) if !d.starts_with('/') => {
                return Err(bad("to", format!("'{d}' is relative (accepted: an absolute path)")))
            }
            Some(d) => PathBuf::from(d),
            None => self.backups_dir(),
        };
        // At most 48 + 1 + 13 characters: a valid name, whatever the VM's.
        let id = format!("{}-{}", name.get(..48).unwrap_or(name), now_ms());
        // The VMM writes the export: into the VM's own folder, which its jail can see.
        let export_dir = self.vm_state_dir(name).join(format!(".{id}.export"));
        let exports = if rec.runtime.state.is_active() {
            Some(self.export_disks(name, &rec.runtime, &export_dir)?)
        } else {
            None
        };
        let result = self.pack_backup(name, &rec, &dir, &id, exports.as_deref(), peer);
        let _ = std::fs::remove_dir_all(&export_dir);
        result
    }

    /// Has the VMM export the writable disks into `dir` at one instant and waits until the
    /// exports are complete; returns (disk index, export file).
    fn export_disks(
        &self,
        name: &str,
        rt: &crate::store::Runtime,
        dir: &Path,
    ) -> Result<Vec<(u32, String)>, ServiceError> {
        let client = self.vmm_client(name, rt)?;
        let vmm_err = |what| move |e| ServiceError::Vmm { vm: name.into(), what, source: Box::new(e) };
        let started = client.backup(dir, None).map_err(vmm_err("vm.backup"))?;
        let _ = self.store().log(&NewEvent::vm(
            name,
            "backup-started",
            format!("disks exported at one instant; guest paused {:.2} ms", started.pause_ms),
            Peer::default(),
        ));
        loop {
            let st = client.backup_status().map_err(vmm_err("vm.backup status"))?;
            match st.state {
                api::types::BackupState::Running => std::thread::sleep(std::time::Duration::from_millis(200)),
                api::types::BackupState::Done => {
                    return Ok(st.disks.into_iter().map(|d| (d.index, d.target)).collect());
                }
                other => {
                    let why: Vec<String> = st.disks.iter().filter_map(|d| d.error.clone()).collect();
                    return Err(ServiceError::Io {
                        what: format!("VM '{name}': exporting its disks ({other:?})"),
                        source: std::io::Error::other(why.join("; ")),
                    });
                }
            }
        }
    }

    /// Writes backup `id` of `rec` into `dir`: its definition, and each disk from `exports`
    /// (raw point-in-time images by disk index) or, for the others, from its own file.
    fn pack_backup(
        &self,
        name: &str,
        rec: &crate::store::VmRecord,
        dir: &Path,
        id: &str,
        exports: Option<&[(u32, String)]>,
        peer: Peer,
    ) -> Result<BackupInfo, ServiceError> {
        let mut sources = Vec::new();
        for (i, d) in rec.config.disks.iter().enumerate() {
            let exported = exports.and_then(|e| e.iter().find(|(idx, _)| usize::try_from(*idx).ok() == Some(i)));
            let source = match exported {
                Some((_, file)) => storage::BackupSource::new(format!("disk{i}"), file, storage::Format::Raw),
                None => {
                    if exports.is_some() && !d.readonly {
                        return Err(ServiceError::Io {
                            what: format!("VM '{name}': disk {i}"),
                            source: std::io::Error::other("the VMM exported no image of it"),
                        });
                    }
                    let format = match d.format {
                        Some(vmm::DiskFormat::Raw) => storage::Format::Raw,
                        Some(vmm::DiskFormat::Qcow2) => storage::Format::Qcow2,
                        None => block::detect_format(&d.path)
                            .map_err(|e| bad(format!("config.disks[{i}]"), e.to_string()))?,
                    };
                    storage::BackupSource::new(format!("disk{i}"), &d.path, format)
                }
            };
            sources.push(source);
        }
        let definition = serde_json::to_vec_pretty(&crate::types::CreateRequest {
            name: rec.name.clone(),
            restart: rec.policy.restart,
            autostart: rec.policy.autostart,
            start_order: rec.policy.start_order,
            start_delay_s: rec.policy.start_delay_s,
            nics: rec.nics.clone(),
            volumes: Vec::new(),
            resources: rec.resources.clone(),
            config: rec.config.clone(),
        })
        .map_err(|e| ServiceError::Io { what: "encoding the definition".into(), source: e.into() })?;
        let info = storage::backup_create(dir, id, &definition, &sources).map_err(ServiceError::Storage)?;
        let row = BackupRow {
            id: info.id.clone(),
            vm: name.into(),
            path: info.path.display().to_string(),
            created_ms: i64::try_from(info.created_ms).unwrap_or(i64::MAX),
            bytes: i64::try_from(info.bytes).unwrap_or(i64::MAX),
            sha256: info.sha256.clone(),
        };
        let ev = NewEvent::vm(
            name,
            "backup-created",
            format!("{} ({} bytes, sha256 {})", row.id, row.bytes, row.sha256),
            peer,
        );
        self.store().add_backup(&row, &ev)?;
        Ok(row)
    }

    /// `GET /backups`.
    pub fn backup_list(&self) -> Result<Vec<BackupInfo>, ServiceError> {
        Ok(self.store().backups()?)
    }

    fn backup_row(&self, id: &str) -> Result<BackupRow, ServiceError> {
        self.store()
            .backups()?
            .into_iter()
            .find(|b| b.id == id)
            .ok_or_else(|| ServiceError::NotFound(format!("backup {id}")))
    }

    /// `POST /backups/{id}/restore`: checks the backup against its recorded checksum, puts
    /// its disks as new volumes `<name>-disk<i>` in `pool`, and defines the VM `name` (new
    /// MACs).
    pub fn backup_restore(
        &self,
        id: &str,
        req: &BackupRestore,
        peer: Peer,
    ) -> Result<crate::types::VmSummary, ServiceError> {
        let row = self.backup_row(id)?;
        let name = req.name.clone().unwrap_or_else(|| row.vm.clone());
        Self::check_name(&name)?;
        if self.store().get(&name)?.is_some() {
            return Err(ServiceError::Duplicate(name));
        }
        let (pool, _) = self.pool(&req.pool).map_err(|_| bad("pool", format!("no pool named '{}'", req.pool)))?;
        let manifest =
            storage::backup_verify(Path::new(&row.path), Some(&row.sha256)).map_err(ServiceError::Storage)?;
        let targets: Vec<storage::RestoreTarget> = (0..manifest.disks.len())
            .map(|i| storage::RestoreTarget { name: format!("{name}-disk{i}"), format: None })
            .collect();
        let restored = storage::backup_restore(Path::new(&row.path), Some(&row.sha256), &pool, &targets)
            .map_err(ServiceError::Storage)?;
        let result = (|| {
            let mut def: CreateRequest = serde_json::from_slice(&restored.definition)
                .map_err(|e| ServiceError::Io { what: format!("backup {id}: its definition"), source: e.into() })?;
            def.name = name.clone();
            def.autostart = false;
            for n in &mut def.nics {
                n.mac = None;
            }
            for (d, v) in def.config.disks.iter_mut().zip(&restored.volumes) {
                d.path = v.path.display().to_string();
                d.format = Some(disk_format(v.format));
            }
            self.create(def, peer)
        })();
        match result {
            Ok(s) => {
                self.store().log(&NewEvent::vm(&name, "backup-restored", format!("from {id}"), peer))?;
                Ok(s)
            }
            Err(e) => {
                for v in &restored.volumes {
                    let _ = pool.delete_volume(&v.name);
                }
                Err(e)
            }
        }
    }

    /// `DELETE /backups/{id}`.
    pub fn backup_delete(&self, id: &str, peer: Peer) -> Result<(), ServiceError> {
        let row = self.backup_row(id)?;
        storage::backup_delete(Path::new(&row.path)).map_err(ServiceError::Storage)?;
        self.store()
            .delete_backup(id, &NewEvent { vm: Some(row.vm), kind: "backup-deleted", detail: id.into(), peer })?;
        Ok(())
    }
}
