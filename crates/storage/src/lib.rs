//! Storage for rustvisor's host manager: directory pools of disk volumes, thin provisioning,
//! grow-only resizing, full and linked clones, imports of untrusted images, and
//! self-describing, checksummed backup archives.
//!
//! This crate is the filesystem and image layer only, and synchronous: the manager
//! (`crates/manager`) owns names, the store, who uses which volume and the API. Every size is
//! in bytes.
//!
//! # Layout of a pool
//!
//! A [`Pool`] is a directory holding a marker file ([`POOL_MARKER`]) and one file per volume,
//! named `<volume>.raw` or `<volume>.qcow2`. The volume's [`Format`] is taken from that file
//! name, which only the host writes, and never sniffed from the file's contents, which a guest
//! may have written (see the README's "Threat model"). Volume names follow the VM name rule
//! (see [`validate_name`]), so they never start with a dot; work in progress lives in hidden
//! temporary files (`.<volume>.<format>.tmp<pid>-<n>`) that are renamed into place only once
//! complete and fsynced, so a crash never leaves half a volume under a volume's name.
//!
//! # How the disk work is done
//!
//! Everything runs in-process through `crates/block` (the VMM's own image code, on the
//! [imago](https://crates.io/crates/imago) crate) and plain file system calls; `qemu-img` is
//! not needed at run time (the tests use it, when installed, for `qemu-img check`):
//!
//! | operation | raw | qcow2 |
//! | --- | --- | --- |
//! | create, thin | sparse file (`ftruncate`) | [`block::create_qcow2`] (imago) |
//! | create, preallocated | `posix_fallocate` | [`block::create_qcow2_preallocated`] (imago, `fallocate`) |
//! | resize (grow only) | `ftruncate` | [`block::DiskImage::grow`] (imago `resize_grow`) |
//! | linked clone | — | new qcow2 overlay naming the source as backing file, format recorded |
//! | full clone | [`copy::copy_sparse`] (reflink, else `SEEK_DATA` + `copy_file_range`) | the same when the image has no backing file; else flattened through [`block::DiskImage`] |
//! | import | [`copy::copy_sparse`] | flattened through [`block::DiskImage`] under the strict header policy |
//! | backup | read with `SEEK_DATA`, never interpreted | read through [`block::DiskImage`] |
//!
//! # Concurrency
//!
//! The caller serialises operations on one volume (the manager does), and makes sure a volume
//! being cloned, imported or backed up is not being written (a stopped VM, a template, or a
//! consistent point-in-time source handed to [`backup`] as a [`DiskReader`]).
#![deny(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use block::{Extent, Format, ImagePolicy};

pub mod backup;
pub mod copy;
mod image;
pub mod reader;

pub use backup::{
    backup_create, backup_create_from, backup_delete, backup_info, backup_list, backup_restore, backup_verify,
    BackupDisk, BackupDiskEntry, BackupFileEntry, BackupInfo, BackupManifest, BackupSource, RestoreTarget, Restored,
};
pub use reader::{for_each_data_run, open_reader, DiskReader, RawReader};

/// The file that marks a directory as a pool (its content: one line naming the layout
/// version).
pub const POOL_MARKER: &str = ".rustvisor-pool";

/// Content of [`POOL_MARKER`].
const POOL_MARKER_TEXT: &str = "rustvisor storage pool, layout 1\n";

/// Largest volume accepted, in bytes (64 TiB). The host file system may refuse less (ext4
/// files stop at 16 TiB with 4 KiB blocks).
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;

/// Volume sizes must be multiples of this many bytes (the virtio-blk sector).
pub const SECTOR: u64 = 512;

/// Why a storage operation failed. Variants about a file name it; nothing was changed on the
/// host unless the variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A volume, backup or disk label name that breaks the naming rule.
    #[error("invalid name {name:?}: {reason} (names are 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit)")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A size that is zero, not a multiple of [`SECTOR`], or above [`MAX_VOLUME_BYTES`].
    #[error("invalid size {size} bytes: {reason}")]
    InvalidSize {
        /// The size given, in bytes.
        size: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The directory is not a pool (no [`POOL_MARKER`]), or does not exist.
    #[error("{} is not a storage pool (no {POOL_MARKER} in it)", path.display())]
    NotAPool {
        /// The directory given.
        path: PathBuf,
    },
    /// [`Pool::create`] on a directory that already is a pool.
    #[error("{} is already a storage pool", path.display())]
    PoolExists {
        /// The directory given.
        path: PathBuf,
    },
    /// [`Pool::delete`] on a pool that still holds volumes.
    #[error("pool {} still holds volumes: {}", path.display(), volumes.join(", "))]
    PoolNotEmpty {
        /// The pool's directory.
        path: PathBuf,
        /// The volumes in it.
        volumes: Vec<String>,
    },
    /// A volume of that name already exists (in either format).
    #[error("volume {name} already exists in pool {}", pool.display())]
    VolumeExists {
        /// The pool's directory.
        pool: PathBuf,
        /// The volume name.
        name: String,
    },
    /// No volume of that name.
    #[error("no volume {name} in pool {}", pool.display())]
    VolumeNotFound {
        /// The pool's directory.
        pool: PathBuf,
        /// The volume name.
        name: String,
    },
    /// Both `<name>.raw` and `<name>.qcow2` exist: someone wrote into the pool by hand.
    #[error("volume {name} exists as both {name}.raw and {name}.qcow2 in pool {}; remove one", pool.display())]
    AmbiguousVolume {
        /// The pool's directory.
        pool: PathBuf,
        /// The volume name.
        name: String,
    },
    /// Not enough free space in the pool for a preallocated volume (or a restore).
    #[error("volume {name} needs {needed} bytes but pool {} has {available} bytes free", pool.display())]
    NoSpace {
        /// The pool's directory.
        pool: PathBuf,
        /// The volume name.
        name: String,
        /// Bytes the operation needs.
        needed: u64,
        /// Bytes available to unprivileged users (`statvfs` `f_bavail`).
        available: u64,
    },
    /// A resize to a smaller size.
    #[error("volume {name} is {current} bytes: refusing to shrink it to {requested} bytes (volumes only grow)")]
    Shrink {
        /// The volume name.
        name: String,
        /// Its current virtual size in bytes.
        current: u64,
        /// The size asked for, in bytes.
        requested: u64,
    },
    /// The volume is the backing file of other volumes, which it would break.
    #[error("volume {name} is the backing file of {}: refusing to {action} it", users.join(", "))]
    InUse {
        /// The volume name.
        name: String,
        /// What was refused (`"delete"`, `"resize"`).
        action: &'static str,
        /// The volumes whose backing chain includes it.
        users: Vec<String>,
    },
    /// The volume is read-only (a template's), see [`Pool::set_read_only`].
    #[error("volume {name} is read-only (a template's volume): refusing to {action} it")]
    ReadOnly {
        /// The volume name.
        name: String,
        /// What was refused.
        action: &'static str,
    },
    /// A linked clone into another pool: the backing file must lie in the clone's directory.
    #[error("a linked clone must be in the same pool as its source ({} is not {})", to.display(), from.display())]
    LinkedAcrossPools {
        /// The source's pool.
        from: PathBuf,
        /// The target pool.
        to: PathBuf,
    },
    /// A source that is not a regular file (a FIFO, device, directory).
    #[error("{} is not a regular file", path.display())]
    NotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// The image could not be opened or was refused by `crates/block` (corrupt, mismatched
    /// format, a backing file outside its directory, an external data file, ...).
    #[error(transparent)]
    Image(#[from] block::Error),
    /// A backup whose name is taken.
    #[error("backup {} already exists", path.display())]
    BackupExists {
        /// The backup's directory.
        path: PathBuf,
    },
    /// A backup file whose checksum does not match the manifest (or the manifest's own
    /// checksum file, or the checksum the caller expected).
    #[error("backup file {} is corrupt: SHA-256 {actual}, expected {expected}", file.display())]
    BackupChecksum {
        /// The file that does not match.
        file: PathBuf,
        /// The digest recorded (hex).
        expected: String,
        /// The digest of the file as read (hex).
        actual: String,
    },
    /// A backup file that is malformed (bad manifest, bad disk stream, wrong size).
    #[error("backup file {} is invalid: {reason}", file.display())]
    BackupInvalid {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A restore given a different number of target volumes than the backup has disks.
    #[error("the backup has {disks} disks but {targets} target volumes were given")]
    RestoreTargets {
        /// Disks in the backup.
        disks: usize,
        /// Targets given.
        targets: usize,
    },
    /// A host I/O error.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (`"creating"`, `"reading"`, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The host error.
        #[source]
        source: io::Error,
    },
}

/// Broad classes of [`Error`], for mapping to exit statuses and HTTP codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong (bad name or size, shrink, no space, a refused image): exit 2 / 400.
    BadInput,
    /// Something named does not exist: 404.
    NotFound,
    /// The request conflicts with the state (exists, in use, read-only): 409.
    Conflict,
    /// A backup failed its checks: 400/422.
    Corrupt,
    /// The host failed (I/O): 500.
    Host,
}

impl Error {
    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> Error {
        Error::Io { action, path: path.to_path_buf(), source }
    }

    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidName { .. }
            | Error::InvalidSize { .. }
            | Error::NoSpace { .. }
            | Error::Shrink { .. }
            | Error::LinkedAcrossPools { .. }
            | Error::NotAFile { .. }
            | Error::RestoreTargets { .. } => ErrorKind::BadInput,
            Error::Image(block::Error::Io { .. }) => ErrorKind::Host,
            Error::Image(block::Error::NotFound { .. }) => ErrorKind::NotFound,
            Error::Image(_) => ErrorKind::BadInput,
            Error::NotAPool { .. } | Error::VolumeNotFound { .. } => ErrorKind::NotFound,
            Error::PoolExists { .. }
            | Error::PoolNotEmpty { .. }
            | Error::VolumeExists { .. }
            | Error::AmbiguousVolume { .. }
            | Error::InUse { .. }
            | Error::ReadOnly { .. }
            | Error::BackupExists { .. } => ErrorKind::Conflict,
            Error::BackupChecksum { .. } | Error::BackupInvalid { .. } => ErrorKind::Corrupt,
            Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => ErrorKind::NotFound,
            Error::Io { .. } => ErrorKind::Host,
        }
    }
}

/// Checks `name` against the naming rule shared with VM names: `[a-z0-9][a-z0-9._-]{0,62}`.
/// Volume, backup and disk label names all follow it, so they are safe as file names and never
/// hidden files.
///
/// Errors: [`Error::InvalidName`] saying what is wrong.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let bad = |reason| Err(Error::InvalidName { name: name.to_string(), reason });
    let Some(first) = name.bytes().next() else { return bad("empty") };
    if name.len() > 63 {
        return bad("longer than 63 characters");
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return bad("must start with a-z or 0-9");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')) {
        return bad("only a-z, 0-9, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Checks a volume size: non-zero, a multiple of [`SECTOR`], at most [`MAX_VOLUME_BYTES`].
///
/// Errors: [`Error::InvalidSize`].
pub fn validate_size(size: u64) -> Result<(), Error> {
    let reason = if size == 0 {
        "a volume cannot be empty".to_string()
    } else if !size.is_multiple_of(SECTOR) {
        format!("not a multiple of {SECTOR} bytes (try {})", size.div_ceil(SECTOR) * SECTOR)
    } else if size > MAX_VOLUME_BYTES {
        format!("above the largest volume, {MAX_VOLUME_BYTES} bytes (64 TiB)")
    } else {
        return Ok(());
    };
    Err(Error::InvalidSize { size, reason })
}

/// The volume file name extension of `format`.
fn ext(format: Format) -> &'static str {
    format.as_str()
}

/// Splits a pool file name into the volume name and format, if it names a volume.
pub(crate) fn parse_volume_file(file: &str) -> Option<(&str, Format)> {
    let (name, ext) = file.rsplit_once('.')?;
    let format = match ext {
        "raw" => Format::Raw,
        "qcow2" => Format::Qcow2,
        _ => return None,
    };
    validate_name(name).ok()?;
    Some((name, format))
}

/// A directory pool (see the crate documentation for its layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    /// The pool's directory, canonical.
    path: PathBuf,
}

/// A pool's space, in bytes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolInfo {
    /// The pool's directory, canonical.
    pub path: PathBuf,
    /// Size of the file system holding the pool (`statvfs` `f_blocks` × `f_frsize`).
    pub capacity_bytes: u64,
    /// Free space usable by the daemon (`f_bavail` × `f_frsize`).
    pub available_bytes: u64,
    /// Host space the volumes really take (allocated blocks), summed.
    pub allocated_bytes: u64,
    /// The volumes' virtual sizes, summed: what guests see (may exceed the capacity: thin
    /// provisioning).
    pub virtual_bytes: u64,
    /// How many volumes the pool holds.
    pub volumes: usize,
}

/// One volume.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeInfo {
    /// The volume name (see [`validate_name`]).
    pub name: String,
    /// Its file: `<pool>/<name>.<format>`.
    pub path: PathBuf,
    /// Its format, from the file name.
    #[serde(with = "format_serde")]
    pub format: Format,
    /// The disk size the guest sees, in bytes (raw: the file length; qcow2: the header's).
    pub virtual_bytes: u64,
    /// Host space the file takes, in bytes (allocated blocks, `st_blocks` × 512).
    pub allocated_bytes: u64,
    /// For a qcow2 overlay on another volume of this pool (a linked clone): that volume.
    pub backing: Option<String>,
    /// For a qcow2 whose header names a backing file that is not a volume of this pool (put
    /// there by hand): the name as written in the header. `crates/block` refuses it unless it
    /// lies in the pool's directory.
    pub foreign_backing: Option<String>,
    /// Whether the file is read-only (no write permission bits: a template's volume).
    pub read_only: bool,
}

/// serde for [`Format`] as its name (`"raw"`, `"qcow2"`).
pub(crate) mod format_serde {
    use super::Format;

    pub(crate) fn serialize<S: serde::Serializer>(f: &Format, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(f.as_str())
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Format, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Options of [`Pool::import_volume`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// The source's format. `None` detects it from the first four bytes (the qcow2 magic):
    /// give it for a raw image a guest has written, which could carry a qcow2 header.
    pub source_format: Option<Format>,
    /// The new volume's format; `None` keeps the source's.
    pub format: Option<Format>,
}

/// A counter making temporary file names unique within the process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A hidden file in the pool that becomes a volume by [`Temp::commit`], and is removed if
/// dropped before.
struct Temp {
    path: PathBuf,
    committed: bool,
}

impl Temp {
    fn new(dir: &Path, name: &str, format: Format) -> Temp {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{name}.{}.tmp{}-{n}", ext(format), std::process::id()));
        Temp { path, committed: false }
    }

    /// Makes the file mode 0600 (volumes hold guest data), fsyncs it, links it to `target` (failing if that exists: never replaces), removes
    /// the temporary name and fsyncs the directory.
    fn commit(mut self, target: &Path) -> Result<(), Error> {
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io("chmod", &self.path, e))?;
        File::open(&self.path).and_then(|f| f.sync_all()).map_err(|e| Error::io("syncing", &self.path, e))?;
        std::fs::hard_link(&self.path, target).map_err(|e| Error::io("creating", target, e))?;
        self.committed = true;
        let _ = std::fs::remove_file(&self.path);
        sync_dir(target.parent().unwrap_or(Path::new(".")))
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Fsyncs a directory, so a rename or link in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("syncing", dir, e))
}

/// `statvfs(path)`: (capacity, available) in bytes.
fn fs_space(path: &Path) -> Result<(u64, u64), Error> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::io("examining", path, io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid statvfs the call fills in.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io("examining", path, io::Error::last_os_error()));
    }
    let frsize = st.f_frsize;
    Ok((st.f_blocks.saturating_mul(frsize), st.f_bavail.saturating_mul(frsize)))
}

/// Removes temporary files left by crashed processes (`.<vol>.<fmt>.tmp<pid>-<n>` whose
/// process is gone).
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp")).map(|(_, r)| r) else {
            continue;
        };
        let Some(pid) = rest.split_once('-').and_then(|(p, _)| p.parse::<libc::pid_t>().ok()) else { continue };
        let alive = pid <= 0 || {
            // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
            let r = unsafe { libc::kill(pid, 0) };
            r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
        };
        if !alive {
            tracing::info!("removing {} left by a crashed process", e.path().display());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Pool {
    /// Makes `path` a pool: creates the directory (mode 0700) if needed and writes the
    /// [`POOL_MARKER`]. Image files already there named `<name>.raw` / `<name>.qcow2` become
    /// its volumes.
    ///
    /// Errors: [`Error::PoolExists`], [`Error::Io`] (not a directory, permissions).
    pub fn create(path: impl AsRef<Path>) -> Result<Pool, Error> {
        let path = path.as_ref();
        if !path.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|e| Error::io("creating", path, e))?;
        }
        let dir = std::fs::canonicalize(path).map_err(|e| Error::io("resolving", path, e))?;
        if !dir.is_dir() {
            return Err(Error::io("creating a pool in", path, io::Error::from(io::ErrorKind::NotADirectory)));
        }
        let marker = dir.join(POOL_MARKER);
        let tmp = dir.join(format!("{POOL_MARKER}.tmp{}", std::process::id()));
        std::fs::write(&tmp, POOL_MARKER_TEXT).map_err(|e| Error::io("writing", &tmp, e))?;
        let linked = std::fs::hard_link(&tmp, &marker);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(Error::PoolExists { path: dir }),
            Err(e) => return Err(Error::io("writing", &marker, e)),
        }
        sync_dir(&dir)?;
        Ok(Pool { path: dir })
    }

    /// Opens the pool at `path`, and removes temporary files that crashed processes left in it.
    ///
    /// Errors: [`Error::NotAPool`] (missing directory or marker), [`Error::Io`].
    pub fn open(path: impl AsRef<Path>) -> Result<Pool, Error> {
        let path = path.as_ref();
        let dir = std::fs::canonicalize(path).map_err(|_| Error::NotAPool { path: path.to_path_buf() })?;
        if !dir.join(POOL_MARKER).is_file() {
            return Err(Error::NotAPool { path: path.to_path_buf() });
        }
        remove_stale_temporaries(&dir);
        Ok(Pool { path: dir })
    }

    /// The pool's directory (canonical).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops being a pool: removes the marker, and the directory if nothing else is in it.
    ///
    /// Errors: [`Error::PoolNotEmpty`] naming the volumes left (nothing is removed),
    /// [`Error::Io`].
    pub fn delete(self) -> Result<(), Error> {
        let volumes: Vec<String> = self.list_volumes()?.into_iter().map(|v| v.name).collect();
        if !volumes.is_empty() {
            return Err(Error::PoolNotEmpty { path: self.path, volumes });
        }
        let marker = self.path.join(POOL_MARKER);
        std::fs::remove_file(&marker).map_err(|e| Error::io("removing", &marker, e))?;
        // Only an empty directory goes; other files there are not ours.
        let _ = std::fs::remove_dir(&self.path);
        Ok(())
    }

    /// Space on the pool's file system and what its volumes take (see [`PoolInfo`]).
    ///
    /// Errors: [`Error::Io`].
    pub fn info(&self) -> Result<PoolInfo, Error> {
        let (capacity_bytes, available_bytes) = fs_space(&self.path)?;
        let vols = self.list_volumes()?;
        Ok(PoolInfo {
            path: self.path.clone(),
            capacity_bytes,
            available_bytes,
            allocated_bytes: vols.iter().map(|v| v.allocated_bytes).sum(),
            virtual_bytes: vols.iter().map(|v| v.virtual_bytes).sum(),
            volumes: vols.len(),
        })
    }

    /// The file a volume `name` of `format` has (whether or not it exists).
    pub fn volume_path(&self, name: &str, format: Format) -> PathBuf {
        self.path.join(format!("{name}.{}", ext(format)))
    }

    /// The format and file of volume `name`, if it exists.
    fn find(&self, name: &str) -> Result<Option<(Format, PathBuf)>, Error> {
        validate_name(name)?;
        let mut found = None;
        for format in [Format::Raw, Format::Qcow2] {
            let p = self.volume_path(name, format);
            match std::fs::symlink_metadata(&p) {
                Ok(_) if found.is_some() => {
                    return Err(Error::AmbiguousVolume { pool: self.path.clone(), name: name.to_string() })
                }
                Ok(_) => found = Some((format, p)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("examining", &p, e)),
            }
        }
        Ok(found)
    }

    /// [`Pool::find`], with a missing volume an error.
    fn get(&self, name: &str) -> Result<(Format, PathBuf), Error> {
        self.find(name)?.ok_or_else(|| Error::VolumeNotFound { pool: self.path.clone(), name: name.to_string() })
    }

    fn refuse_existing(&self, name: &str) -> Result<(), Error> {
        match self.find(name)? {
            Some(_) => Err(Error::VolumeExists { pool: self.path.clone(), name: name.to_string() }),
            None => Ok(()),
        }
    }

    /// Describes volume `name`. Reads the file's metadata and, for qcow2, its header's size and
    /// backing file name (no other part of the image is interpreted).
    ///
    /// Errors: [`Error::InvalidName`], [`Error::VolumeNotFound`], [`Error::AmbiguousVolume`],
    /// [`Error::Image`] (a qcow2 volume without the qcow2 magic), [`Error::Io`].
    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo, Error> {
        let (format, path) = self.get(name)?;
        self.describe(name, format, path)
    }

    fn describe(&self, name: &str, format: Format, path: PathBuf) -> Result<VolumeInfo, Error> {
        let md = std::fs::metadata(&path).map_err(|e| Error::io("examining", &path, e))?;
        if !md.is_file() {
            return Err(Error::NotAFile { path });
        }
        let (virtual_bytes, backing, foreign_backing) = match format {
            Format::Raw => (md.len(), None, None),
            Format::Qcow2 => {
                let h = image::read_qcow2_header(&path)?;
                match h.backing {
                    None => (h.size, None, None),
                    Some(b) => match parse_volume_file(&b).filter(|_| !b.contains('/')) {
                        Some((vol, _)) => (h.size, Some(vol.to_string()), None),
                        None => (h.size, None, Some(b)),
                    },
                }
            }
        };
        Ok(VolumeInfo {
            name: name.to_string(),
            path,
            format,
            virtual_bytes,
            allocated_bytes: md.blocks() * 512,
            backing,
            foreign_backing,
            read_only: md.permissions().mode() & 0o222 == 0,
        })
    }

    /// Every volume in the pool, sorted by name. Files that do not follow the volume naming
    /// (hidden temporaries, other files) are ignored.
    ///
    /// Errors: [`Error::Io`], and those of [`Pool::volume_info`] for a volume that cannot be
    /// described.
    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>, Error> {
        let entries = std::fs::read_dir(&self.path).map_err(|e| Error::io("listing", &self.path, e))?;
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(|e| Error::io("listing", &self.path, e))?;
            let file = e.file_name();
            let Some((name, format)) = file.to_str().and_then(parse_volume_file) else { continue };
            out.push(self.describe(name, format, e.path())?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The volumes of this pool whose backing chain includes `name` (directly or through other
    /// overlays), sorted. Empty for a volume nothing is built on.
    ///
    /// Errors: those of [`Pool::list_volumes`]; [`Error::VolumeNotFound`].
    pub fn backing_users(&self, name: &str) -> Result<Vec<String>, Error> {
        self.get(name)?;
        let vols = self.list_volumes()?;
        let backing_of = |n: &str| vols.iter().find(|v| v.name == n).and_then(|v| v.backing.clone());
        let mut users = Vec::new();
        for v in &vols {
            let mut cur = v.backing.clone();
            // A chain longer than the pool has volumes loops: stop there.
            for _ in 0..vols.len() {
                match cur {
                    Some(ref b) if b == name => {
                        users.push(v.name.clone());
                        break;
                    }
                    Some(ref b) => cur = backing_of(b),
                    None => break,
                }
            }
        }
        Ok(users)
    }

    /// Creates volume `name` of `size` bytes (see [`validate_size`]) in `format`.
    ///
    /// Thin by default: a sparse raw file or an empty qcow2 image, taking (almost) no space
    /// until the guest writes. With `preallocate`, the space is reserved now (raw:
    /// `posix_fallocate`; qcow2: every cluster allocated and `fallocate`d), and the volume is
    /// refused first if the pool's free space is smaller than the size (plus 1/4096 of it and
    /// 1 MiB for qcow2 metadata).
    ///
    /// Errors: [`Error::InvalidName`], [`Error::InvalidSize`], [`Error::VolumeExists`],
    /// [`Error::NoSpace`], [`Error::Image`], [`Error::Io`]; nothing is left behind on failure.
    pub fn create_volume(&self, name: &str, size: u64, format: Format, preallocate: bool) -> Result<VolumeInfo, Error> {
        validate_name(name)?;
        validate_size(size)?;
        self.refuse_existing(name)?;
        if preallocate {
            let needed = match format {
                Format::Raw => size,
                Format::Qcow2 => size + size / 4096 + (1 << 20),
            };
            let (_, available) = fs_space(&self.path)?;
            if needed > available {
                return Err(Error::NoSpace { pool: self.path.clone(), name: name.to_string(), needed, available });
            }
        }
        let tmp = Temp::new(&self.path, name, format);
        match (format, preallocate) {
            (Format::Raw, _) => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp.path)
                    .map_err(|e| Error::io("creating", &tmp.path, e))?;
                f.set_len(size).map_err(|e| Error::io("sizing", &tmp.path, e))?;
                if preallocate {
                    posix_fallocate(&f, size).map_err(|e| Error::io("preallocating", &tmp.path, e))?;
                }
            }
            (Format::Qcow2, false) => block::create_qcow2(&tmp.path, size, None)?,
            (Format::Qcow2, true) => block::create_qcow2_preallocated(&tmp.path, size)?,
        }
        let target = self.volume_path(name, format);
        tmp.commit(&target)?;
        self.describe(name, format, target)
    }

    /// Copies the image file `from` into the pool as volume `name`. The source is untrusted:
    ///
    /// - it must be a regular file (a FIFO or device is refused without blocking on it);
    /// - raw → raw is a sparse byte copy ([`copy::copy_sparse`]; a reflink where the file
    ///   system has them): the bytes are never interpreted;
    /// - a qcow2 source is opened through [`block::DiskImage`] under the strict
    ///   [`ImagePolicy`]: backing files only from the source's own directory and with their
    ///   format recorded, no external data file, no loops. Its guest-visible content is then
    ///   **flattened** into a new, standalone image (only non-zero data is written), so the
    ///   volume never refers to a file outside the pool and none of the source's metadata
    ///   (compressed clusters, odd refcounts, header extensions) is carried over;
    /// - raw → qcow2 is flattened the same way.
    ///
    /// A source whose size is not a multiple of [`SECTOR`] is padded with zeros up to one.
    ///
    /// Errors: [`Error::InvalidName`], [`Error::VolumeExists`], [`Error::NotAFile`],
    /// [`Error::InvalidSize`] (empty or too big), [`Error::Image`] (a refused or corrupt
    /// source), [`Error::Io`]; nothing is left behind on failure.
    pub fn import_volume(&self, name: &str, from: &Path, opts: ImportOptions) -> Result<VolumeInfo, Error> {
        validate_name(name)?;
        self.refuse_existing(name)?;
        drop(reader::open_regular(from)?);
        let source_format = match opts.source_format {
            Some(f) => f,
            None => block::detect_format(from)?,
        };
        let format = opts.format.unwrap_or(source_format);
        let tmp = Temp::new(&self.path, name, format);
        if source_format == Format::Raw && format == Format::Raw {
            let len = std::fs::metadata(from).map_err(|e| Error::io("examining", from, e))?.len();
            validate_size(len.div_ceil(SECTOR) * SECTOR)?;
            copy::copy_sparse(from, &tmp.path).map_err(|e| Error::io("copying", from, e))?;
            if !len.is_multiple_of(SECTOR) {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&tmp.path)
                    .map_err(|e| Error::io("opening", &tmp.path, e))?;
                f.set_len(len.div_ceil(SECTOR) * SECTOR).map_err(|e| Error::io("sizing", &tmp.path, e))?;
            }
        } else {
            let src = open_reader(from, source_format, ImagePolicy::default())?;
            let size = src.size().div_ceil(SECTOR) * SECTOR;
            validate_size(size)?;
            image::flatten(src.as_ref(), from, &tmp.path, format, size)?;
        }
        let target = self.volume_path(name, format);
        tmp.commit(&target)?;
        self.describe(name, format, target)
    }

    /// Grows volume `name` to `new_size` bytes (see [`validate_size`]); the new range reads as
    /// zeros. The same size changes nothing. Raw: the file is extended sparse; qcow2: through
    /// [`block::DiskImage::grow`] (imago), which keeps a longer backing file from showing
    /// through. A preallocated volume's new range is not preallocated.
    ///
    /// The caller must make sure no VM has the volume open.
    ///
    /// Errors (all before anything changes): [`Error::InvalidSize`], [`Error::VolumeNotFound`],
    /// [`Error::Shrink`] naming both sizes, [`Error::ReadOnly`], [`Error::InUse`] (another
    /// volume is built on it), [`Error::Image`], [`Error::Io`].
    pub fn resize_volume(&self, name: &str, new_size: u64) -> Result<VolumeInfo, Error> {
        validate_size(new_size)?;
        let info = self.volume_info(name)?;
        if new_size < info.virtual_bytes {
            return Err(Error::Shrink { name: name.to_string(), current: info.virtual_bytes, requested: new_size });
        }
        if new_size == info.virtual_bytes {
            return Ok(info);
        }
        if info.read_only {
            return Err(Error::ReadOnly { name: name.to_string(), action: "resize" });
        }
        let users = self.backing_users(name)?;
        if !users.is_empty() {
            return Err(Error::InUse { name: name.to_string(), action: "resize", users });
        }
        match info.format {
            Format::Raw => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&info.path)
                    .map_err(|e| Error::io("opening", &info.path, e))?;
                f.set_len(new_size).and_then(|()| f.sync_all()).map_err(|e| Error::io("resizing", &info.path, e))?;
            }
            Format::Qcow2 => {
                let mut disk = block::DiskImage::open(&info.path, Format::Qcow2, false)?;
                disk.grow(new_size).and_then(|()| disk.flush()).map_err(|e| Error::io("resizing", &info.path, e))?;
            }
        }
        self.volume_info(name)
    }

    /// Makes volume `dst` in `dst_pool` a copy of volume `src` of this pool.
    ///
    /// - `linked`: a new qcow2 overlay whose backing file is `src` (its plain file name, so it
    ///   resolves in the pool's directory, with the format recorded in the header, as
    ///   `crates/block`'s untrusted-header policy requires). Nothing is copied: the time does
    ///   not depend on `src`'s size. Reads fall through to `src` until the guest writes;
    ///   writes go to `dst` only. `src` must then never change: it can no longer be deleted or
    ///   resized ([`Pool::backing_users`]); mark it read-only with [`Pool::set_read_only`].
    ///   Both volumes must be in the same pool.
    /// - full: an independent copy in `src`'s format: a sparse copy (a reflink where the file
    ///   system has them) of a raw or standalone qcow2 file, or, for a qcow2 overlay, its
    ///   content flattened into a standalone qcow2 image.
    ///
    /// The caller makes sure nothing writes `src` meanwhile.
    ///
    /// Errors: [`Error::InvalidName`], [`Error::VolumeNotFound`], [`Error::VolumeExists`],
    /// [`Error::LinkedAcrossPools`], [`Error::Image`], [`Error::Io`]; nothing is left behind on
    /// failure.
    pub fn clone_volume(&self, src: &str, dst_pool: &Pool, dst: &str, linked: bool) -> Result<VolumeInfo, Error> {
        let info = self.volume_info(src)?;
        validate_name(dst)?;
        dst_pool.refuse_existing(dst)?;
        if linked {
            if dst_pool.path != self.path {
                return Err(Error::LinkedAcrossPools { from: self.path.clone(), to: dst_pool.path.clone() });
            }
            let tmp = Temp::new(&self.path, dst, Format::Qcow2);
            let backing = format!("{src}.{}", ext(info.format));
            block::create_qcow2(&tmp.path, info.virtual_bytes, Some((&backing, info.format)))?;
            // Check the chain the way the VMM will open it before the clone exists.
            drop(block::DiskImage::open(&tmp.path, Format::Qcow2, true)?);
            let target = self.volume_path(dst, Format::Qcow2);
            tmp.commit(&target)?;
            return self.describe(dst, Format::Qcow2, target);
        }
        let tmp = Temp::new(&dst_pool.path, dst, info.format);
        if info.format == Format::Raw || (info.backing.is_none() && info.foreign_backing.is_none()) {
            copy::copy_sparse(&info.path, &tmp.path).map_err(|e| Error::io("copying", &info.path, e))?;
        } else {
            let src_img = open_reader(&info.path, Format::Qcow2, ImagePolicy::default())?;
            image::flatten(src_img.as_ref(), &info.path, &tmp.path, Format::Qcow2, info.virtual_bytes)?;
        }
        let target = dst_pool.volume_path(dst, info.format);
        tmp.commit(&target)?;
        dst_pool.describe(dst, info.format, target)
    }

    /// Deletes volume `name`.
    ///
    /// The caller must make sure no VM uses it.
    ///
    /// Errors: [`Error::VolumeNotFound`], [`Error::InUse`] naming the volumes built on it
    /// (nothing is removed), [`Error::Io`].
    pub fn delete_volume(&self, name: &str) -> Result<(), Error> {
        let (_, path) = self.get(name)?;
        let users = self.backing_users(name)?;
        if !users.is_empty() {
            return Err(Error::InUse { name: name.to_string(), action: "delete", users });
        }
        std::fs::remove_file(&path).map_err(|e| Error::io("removing", &path, e))?;
        sync_dir(&self.path)
    }

    /// Makes volume `name` read-only (mode 0444: a template's volume, which linked clones may
    /// be built on) or writable again (0600). [`Pool::resize_volume`] refuses read-only
    /// volumes; a VMM should open them with `readonly=on`. (Root ignores file modes: this
    /// guards against mistakes, the manager's bookkeeping is the rule.)
    ///
    /// Errors: [`Error::VolumeNotFound`], [`Error::Io`].
    pub fn set_read_only(&self, name: &str, read_only: bool) -> Result<(), Error> {
        let (_, path) = self.get(name)?;
        let mode = if read_only { 0o444 } else { 0o600 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(|e| Error::io("chmod", &path, e))
    }
}

/// `posix_fallocate(file, 0, len)`: reserves the blocks (emulated by glibc where the file
/// system has no `fallocate`).
fn posix_fallocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: posix_fallocate takes integers only; the fd is open for the call.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "web1", "0", "a.b_c-d", &"x".repeat(63)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "-x", "_x", "Web", "a/b", "a b", "é", &"x".repeat(64), "..", "a\0"] {
            assert!(matches!(validate_name(bad), Err(Error::InvalidName { .. })), "{bad:?}");
        }
        assert_eq!(parse_volume_file("web1.qcow2"), Some(("web1", Format::Qcow2)));
        assert_eq!(parse_volume_file("a.raw.qcow2"), Some(("a.raw", Format::Qcow2)));
        assert_eq!(parse_volume_file("web1.img"), None);
        assert_eq!(parse_volume_file(".web1.raw.tmp1-0"), None);
        assert_eq!(parse_volume_file(".raw"), None);
    }

    #[test]
    fn sizes() {
        validate_size(512).unwrap();
        validate_size(MAX_VOLUME_BYTES).unwrap();
        for bad in [0, 511, 1000, MAX_VOLUME_BYTES + 512] {
            assert!(matches!(validate_size(bad), Err(Error::InvalidSize { .. })), "{bad}");
        }
        assert!(validate_size(1000).unwrap_err().to_string().contains("1024"));
    }
}
