//! Backups of a running VM's disks (`vm.backup`): a point-in-time, crash-consistent export
//! of every writable disk, with copy-before-write ([`block::backup`]) so that the guest is
//! paused only while the jobs are attached, not for the copy.
//!
//! [`Backup::start`]:
//! 1. checks the destination folder (created if absent, must be empty) and creates
//!    `disk<i>.raw` (mode 0600) and a [`BackupJob`] for each writable disk, before pausing;
//! 2. pauses the vCPUs (unless the VM is paused already), attaches every job to its disk's
//!    image under the image's lock, and resumes: every disk's export is its content at that
//!    one instant. Requests the guest queued before the pause may still complete after it;
//!    the guest saw none of them complete, so the export is what a crash at the pause would
//!    have left (the usual crash-consistency);
//! 3. starts one [`Copier`] thread per disk.
//!
//! Dropping the [`Backup`] (the VM stops, is rebooted or deleted, the VMM shuts down)
//! cancels the jobs still running and waits for their threads (at most one copy run each),
//! so no thread outlives the VM's disks. A snapshot (`vm.snapshot`) while a backup runs is
//! allowed: the backup goes on and is not part of the snapshot.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::types::{BackupDiskStatus, BackupState, BackupStatus};
use block::{BackupJob, Copier, DiskImage, JobState};

use crate::vm::Vm;

/// Why a backup could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The destination folder cannot take the backup (exists and is not empty, cannot be
    /// created, a file cannot be created in it).
    #[error("{}: {msg}", path.display())]
    Destination {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong, and what is accepted.
        msg: String,
    },
    /// A disk cannot be backed up.
    #[error("disk{index}: {msg}")]
    Disk {
        /// The disk's index in the configuration.
        index: usize,
        /// Why.
        msg: String,
    },
}

/// One disk's job.
struct DiskJob {
    index: usize,
    path: String,
    job: Arc<BackupJob>,
    /// `None` only if the thread could not start (the job is then failed).
    copier: Option<Copier>,
}

/// The backup of a VM's writable disks: one job and copier thread per disk.
pub struct Backup {
    destination: PathBuf,
    pause: Duration,
    disks: Vec<DiskJob>,
}

impl std::fmt::Debug for Backup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backup").field("destination", &self.destination).field("pause", &self.pause).finish()
    }
}

/// A disk to back up: its index, image and size.
type Source = (usize, Arc<Mutex<DiskImage>>, String, u64);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes `dir` an empty folder; returns whether it was created.
fn prepare_destination(dir: &Path) -> Result<bool, Error> {
    let dest = |m: String| Error::Destination { path: dir.to_path_buf(), msg: m };
    if dir.exists() {
        let empty = std::fs::read_dir(dir).map_err(|e| dest(e.to_string()))?.next().is_none();
        if !empty {
            return Err(dest("not empty (accepted: an empty or new folder)".into()));
        }
        Ok(false)
    } else {
        std::fs::create_dir_all(dir).map_err(|e| dest(e.to_string()))?;
        Ok(true)
    }
}

/// Creates the export file `path` (new, mode 0600: it holds the guest's data).
fn create_target(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Destination { path: path.to_path_buf(), msg: e.to_string() })
}

impl Backup {
    /// Starts backing up `vm`'s writable disks into `dir` (see the module documentation);
    /// `paused` says whether the VM is paused already (then it is not resumed). With
    /// `rate_limit_mib_s`, each copier reads at most that many MiB/s (0: unlimited).
    ///
    /// Errors: [`Error::Destination`] for a folder that exists and is not empty, cannot be
    /// created, or where a file cannot be created; [`Error::Disk`] for a disk too large for
    /// a job. Nothing is left in the folder then (a folder this call created is removed).
    pub fn start(vm: &Vm, paused: bool, dir: &Path, rate_limit_mib_s: Option<u64>) -> Result<Backup, Error> {
        let sources: Vec<Source> = vm
            .virtio
            .iter()
            .filter_map(|d| d.disk.clone())
            .filter_map(|(index, disk)| {
                let img = lock(&disk);
                let (ro, path, size) = (img.is_readonly(), img.path().display().to_string(), img.size());
                drop(img);
                (!ro).then_some((index, disk, path, size))
            })
            .collect();
        let created_dir = prepare_destination(dir)?;
        let mut made: Vec<PathBuf> = Vec::new();
        let prepared = (|| {
            let mut jobs = Vec::new();
            for (index, disk, path, size) in &sources {
                let target = dir.join(format!("disk{index}.raw"));
                let file = create_target(&target)?;
                made.push(target.clone());
                let job = BackupJob::new(*size, file, &target)
                    .map_err(|e| Error::Disk { index: *index, msg: format!("{path}: {e}") })?;
                jobs.push((*index, disk.clone(), path.clone(), job));
            }
            Ok(jobs)
        })();
        let undo = |made: &[PathBuf]| {
            for p in made {
                let _ = std::fs::remove_file(p);
            }
            if created_dir {
                let _ = std::fs::remove_dir(dir);
            }
        };
        let jobs = match prepared {
            Ok(jobs) => jobs,
            Err(e) => {
                undo(&made);
                return Err(e);
            }
        };

        // The instant: every disk's job attached while no vCPU runs.
        let t0 = Instant::now();
        if !paused {
            vm.pause();
        }
        let mut attached = Ok(());
        for (index, disk, path, job) in &jobs {
            if let Err(e) = lock(disk).attach_backup(job.clone()) {
                attached = Err(Error::Disk { index: *index, msg: format!("{path}: {e}") });
                break;
            }
        }
        if attached.is_err() {
            for (_, disk, _, job) in &jobs {
                job.cancel();
                lock(disk).detach_backup(job);
            }
        }
        if !paused {
            vm.resume();
        }
        let pause = t0.elapsed();
        if let Err(e) = attached {
            drop(jobs);
            undo(&made);
            return Err(e);
        }

        let rate = rate_limit_mib_s.filter(|r| *r > 0).map(|r| r.saturating_mul(1 << 20));
        let disks = jobs
            .into_iter()
            .map(|(index, disk, path, job)| {
                let copier = Copier::spawn(job.clone(), disk, rate)
                    .inspect_err(|e| tracing::error!("backup of disk{index}: cannot start its copier: {e}"))
                    .ok();
                DiskJob { index, path, job, copier }
            })
            .collect();
        tracing::info!(
            "backup to {} started: {} disk(s), guest paused {:.3} ms",
            dir.display(),
            sources.len(),
            pause.as_secs_f64() * 1e3
        );
        Ok(Backup { destination: dir.to_path_buf(), pause, disks })
    }

    /// Whether any disk's job still runs.
    pub fn is_running(&self) -> bool {
        self.disks.iter().any(|d| d.job.is_running())
    }

    /// Cancels the jobs still running (their exports are incomplete).
    pub fn cancel(&self) {
        for d in &self.disks {
            d.job.cancel();
        }
    }

    /// How long the guest was paused to start the backup.
    pub fn pause(&self) -> Duration {
        self.pause
    }

    /// Waits up to `timeout` for every job to end; returns whether they all did.
    pub fn wait(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        self.disks.iter().all(|d| d.job.wait(end.saturating_duration_since(Instant::now())) != JobState::Running)
    }

    /// The wire status: overall state, pause and per-disk progress.
    pub fn status(&self) -> BackupStatus {
        let disks: Vec<BackupDiskStatus> = self
            .disks
            .iter()
            .map(|d| {
                let s = d.job.status();
                let (state, error) = match s.state {
                    JobState::Running => (BackupState::Running, None),
                    JobState::Done => (BackupState::Done, None),
                    JobState::Failed(reason) => (BackupState::Failed, Some(reason)),
                    JobState::Cancelled => (BackupState::Cancelled, None),
                };
                BackupDiskStatus {
                    index: u32::try_from(d.index).unwrap_or(u32::MAX),
                    path: d.path.clone(),
                    target: d.job.target_path().display().to_string(),
                    bytes_total: s.bytes_total,
                    bytes_copied: s.bytes_copied,
                    bytes_before_write: s.bytes_before_write,
                    state,
                    error,
                }
            })
            .collect();
        let any = |st: BackupState| disks.iter().any(|d| d.state == st);
        let state = if any(BackupState::Running) {
            BackupState::Running
        } else if any(BackupState::Failed) {
            BackupState::Failed
        } else if any(BackupState::Cancelled) {
            BackupState::Cancelled
        } else {
            BackupState::Done
        };
        BackupStatus {
            destination: self.destination.display().to_string(),
            pause_ms: self.pause.as_secs_f64() * 1e3,
            state,
            disks,
        }
    }
}

impl Drop for Backup {
    fn drop(&mut self) {
        // Cancel every job first, then wait for the threads (each stops within one run).
        self.cancel();
        for d in &mut self.disks {
            drop(d.copier.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Accel, ConsoleOut, DiskConfig, DiskFormat, VmConfig};

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("rv-vmm-backup-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn disk(path: &Path, readonly: bool) -> DiskConfig {
        DiskConfig { path: path.display().to_string(), format: Some(DiskFormat::Raw), readonly, ..Default::default() }
    }

    /// A VM (built, vCPUs not started) with disks: a writable one with data, a read-only
    /// one, and a writable one that is all zeros.
    fn vm(dir: &TempDir) -> (Vm, Vec<Vec<u8>>) {
        let data: Vec<Vec<u8>> = (0..3u32)
            .map(|i| match i {
                2 => vec![0u8; 1 << 20],
                _ => (0..(2u32 << 20)).map(|b| (b.wrapping_mul(2_654_435_761) >> (8 + i)) as u8).collect(),
            })
            .collect();
        let mut disks = Vec::new();
        for (i, d) in data.iter().enumerate() {
            let p = dir.0.join(format!("img{i}.raw"));
            std::fs::write(&p, d).unwrap();
            disks.push(disk(&p, i == 1));
        }
        let cfg = VmConfig {
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
            memory_mib: 16,
            cpus: 1,
            accel: Accel::Emu,
            serial: ConsoleOut::Null,
            disks,
            nets: Vec::new(),
            vsock: None,
            rng: false,
            console: None,
            balloon: None,
            memory_options: Default::default(),
        };
        let hv = accel::select(crate::config::engine(Accel::Emu), accel::SelectOptions::default()).unwrap();
        let vm = Vm::build(
            &cfg,
            crate::memory::create(cfg.memory_bytes(), &Default::default()).unwrap(),
            hv.hypervisor.as_ref(),
            "test".into(),
        )
        .unwrap();
        (vm, data)
    }

    #[test]
    fn exports_writable_disks_and_refuses_a_used_destination() {
        let dir = TempDir::new("export");
        let (vm, data) = vm(&dir);
        let dest = dir.0.join("backup");
        let b = Backup::start(&vm, false, &dest, None).unwrap();
        assert!(b.wait(Duration::from_secs(30)));
        let s = b.status();
        assert_eq!(s.state, BackupState::Done, "{s:?}");
        assert!(s.pause_ms > 0.0 && s.pause_ms < 1000.0, "{s:?}");
        assert_eq!(s.disks.iter().map(|d| d.index).collect::<Vec<_>>(), [0, 2], "read-only disk1 is not exported");
        let mut names: Vec<String> =
            std::fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["disk0.raw", "disk2.raw"]);
        assert!(std::fs::read(dest.join("disk0.raw")).unwrap() == data[0]);
        let zero = std::fs::metadata(dest.join("disk2.raw")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((zero.len(), zero.blocks()), (1 << 20, 0), "an all-zero disk exports as one hole");
        assert_eq!(zero.mode() & 0o777, 0o600);
        let d0 = &s.disks[0];
        assert_eq!((d0.bytes_total, d0.bytes_copied, d0.state), (2 << 20, 2 << 20, BackupState::Done));
        assert!(d0.path.ends_with("img0.raw") && d0.target.ends_with("backup/disk0.raw"), "{d0:?}");

        // The folder is not empty now: refused, nothing touched.
        match Backup::start(&vm, false, &dest, None) {
            Err(e @ Error::Destination { .. }) => assert!(e.to_string().contains("not empty"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(std::fs::read(dest.join("disk0.raw")).unwrap() == data[0]);
    }

    #[test]
    fn dropping_a_running_backup_cancels_it_and_detaches() {
        let dir = TempDir::new("drop");
        let (vm, _) = vm(&dir);
        let b = Backup::start(&vm, true, &dir.0.join("b"), Some(1)).unwrap();
        assert!(b.is_running());
        assert_eq!(b.status().state, BackupState::Running);
        let images: Vec<_> = vm.virtio.iter().filter_map(|d| d.disk.clone()).collect();
        assert!(lock(&images[0].1).backup().is_some());
        let t = Instant::now();
        drop(b);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        for (_, img) in &images {
            assert!(lock(img).backup().is_none(), "detached");
        }
        // A cancelled backup's status.
        let b = Backup::start(&vm, true, &dir.0.join("c"), Some(1)).unwrap();
        b.cancel();
        assert!(b.wait(Duration::from_secs(5)));
        assert_eq!(b.status().state, BackupState::Cancelled);
    }
}
