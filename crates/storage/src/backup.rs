//! Backup archives: a VM's definition and its disks' data in one self-describing,
//! checksummed directory.
//!
//! # Format (version 1)
//!
//! A backup is a directory `<dest>/<id>/` holding:
//!
//! - `definition.json`: the VM definition, the caller's bytes as given (opaque here);
//! - `disk-<n>.rvd` for the n-th disk (from 0): the disk's guest-visible content as a stream
//!   of data extents (below), whatever the source format was: only non-zero data is stored,
//!   so an 8 GiB disk holding 300 MiB costs about 300 MiB;
//! - `manifest.json`: format name and version, id, creation time, and for every other file its
//!   name, size and SHA-256, plus each disk's label, source format, virtual size and data
//!   bytes ([`BackupManifest`]);
//! - `manifest.sha256`: the SHA-256 of `manifest.json` in `sha256sum` format (`sha256sum -c
//!   manifest.sha256` checks it by hand). That digest is the backup's checksum
//!   ([`BackupInfo::sha256`]): it covers every file through the manifest. The manager keeps it
//!   in its store and passes it back to [`backup_verify`] / [`backup_restore`], so an archive
//!   edited consistently (manifest and checksum file together) is refused too.
//!
//! A disk stream (`.rvd`), all integers little-endian:
//!
//! ```text
//! magic      8 bytes  "RVDISK\0\x01"
//! size       u64      the disk's virtual size in bytes
//! records:   u64 offset, u64 length (1 ..= 4 MiB), then `length` data bytes;
//!            offsets strictly increasing, records not overlapping, inside `size`
//! end:       u64 0xFFFF_FFFF_FFFF_FFFF, u64 total data bytes of all records
//! ```
//!
//! The archive is built in a hidden directory beside the target (`.<id>.partial-<pid>`),
//! every file fsynced, then renamed into place: a crash never leaves a half backup under its
//! name. Every file is read as untrusted input when verifying or restoring: names must be the
//! ones above, sizes are bounded, records are checked, and a restore writes nothing under a
//! volume's name until every digest has matched.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::reader::{for_each_data_run, open_reader, DiskReader};
use crate::{format_serde, sync_dir, validate_name, Error, Format, ImagePolicy, Pool, VolumeInfo};

/// The manifest's `format` field.
pub const BACKUP_FORMAT: &str = "rustvisor-backup";
/// The manifest's `version` field this code writes and reads.
pub const BACKUP_VERSION: u32 = 1;

const MANIFEST: &str = "manifest.json";
const MANIFEST_SUM: &str = "manifest.sha256";
const DEFINITION: &str = "definition.json";
const DISK_MAGIC: [u8; 8] = *b"RVDISK\0\x01";
const END_MARK: u64 = u64::MAX;
/// Longest record accepted when reading a disk stream (the writer makes at most 1 MiB).
const MAX_RECORD: u64 = 4 << 20;
/// Largest manifest read.
const MAX_MANIFEST: u64 = 1 << 20;
/// Largest definition accepted (written or read).
pub const MAX_DEFINITION: usize = 64 << 20;

fn disk_file(n: usize) -> String {
    format!("disk-{n}.rvd")
}

/// One file of the archive, as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupFileEntry {
    /// File name inside the backup directory.
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
}

/// One disk of a backup, as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupDiskEntry {
    /// The caller's label for the disk (`vda`, `disk0`, ...; see [`validate_name`]).
    pub label: String,
    /// The format of the disk that was backed up (the default format to restore as).
    #[serde(with = "format_serde")]
    pub format: Format,
    /// The disk's virtual size in bytes.
    pub virtual_bytes: u64,
    /// Data bytes stored (the non-zero part of the disk).
    pub data_bytes: u64,
    /// The disk stream file.
    pub stream: BackupFileEntry,
}

/// The `manifest.json` of a backup (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupManifest {
    /// Always [`BACKUP_FORMAT`].
    pub format: String,
    /// Always [`BACKUP_VERSION`].
    pub version: u32,
    /// The backup's id (see [`validate_name`]).
    pub id: String,
    /// When the backup was made, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The VM definition file.
    pub definition: BackupFileEntry,
    /// The disks, in the order given to [`backup_create`].
    pub disks: Vec<BackupDiskEntry>,
}

/// A backup as listed or just created.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupInfo {
    /// The backup's id.
    pub id: String,
    /// Its directory.
    pub path: PathBuf,
    /// When it was made, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Size of all its files, in bytes.
    pub bytes: u64,
    /// The disks' virtual sizes, summed, in bytes.
    pub virtual_bytes: u64,
    /// The backup's checksum: SHA-256 of `manifest.json` (lowercase hex), which records every
    /// other file's SHA-256.
    pub sha256: String,
}

/// A disk to back up from a file (see [`backup_create`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupSource {
    /// The disk's label, recorded in the manifest (see [`validate_name`]).
    pub label: String,
    /// The image file: a consistent point-in-time image (a stopped or paused VM's disk, or a
    /// copy made at one instant).
    pub path: PathBuf,
    /// Its format, as the caller knows it (never sniffed).
    pub format: Format,
    /// What a qcow2 header may name (the strict default: backing files only from the image's
    /// directory).
    pub policy: ImagePolicy,
}

impl BackupSource {
    /// A source with the strict [`ImagePolicy`].
    pub fn new(label: impl Into<String>, path: impl Into<PathBuf>, format: Format) -> BackupSource {
        BackupSource { label: label.into(), path: path.into(), format, policy: ImagePolicy::default() }
    }
}

/// A disk to back up from any [`DiskReader`] (see [`backup_create_from`]).
pub struct BackupDisk<'a> {
    /// The disk's label, recorded in the manifest (see [`validate_name`]).
    pub label: &'a str,
    /// The format recorded for it (the default format to restore it as).
    pub format: Format,
    /// Its content, consistent for the duration of the backup.
    pub reader: &'a dyn DiskReader,
}

/// Where [`backup_restore`] puts one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreTarget {
    /// The new volume's name; it must not exist.
    pub name: String,
    /// Its format; `None` restores in the format the disk had.
    pub format: Option<Format>,
}

/// What [`backup_restore`] gives back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The verified manifest.
    pub manifest: BackupManifest,
    /// The VM definition, the bytes given to [`backup_create`].
    pub definition: Vec<u8>,
    /// The new volumes, one per disk in order.
    pub volumes: Vec<VolumeInfo>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A writer that hashes and counts what goes through it.
struct HashWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let written = buf.get(..n).unwrap_or(buf);
        self.hasher.update(written);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts what comes through it.
struct HashReader<R: Read> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or_default());
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<R: Read> HashReader<R> {
    /// Reads and hashes everything left.
    fn drain(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn finish(self) -> (u64, String) {
        (self.bytes, hex(&self.hasher.finalize()))
    }
}

/// Writes one file of the archive from `fill`, fsyncs it, and returns its manifest entry.
fn write_file(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut HashWriter<BufWriter<File>>) -> io::Result<()>,
) -> Result<BackupFileEntry, Error> {
    let path = dir.join(name);
    let werr = |e| Error::io("writing", &path, e);
    let f = std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(werr)?;
    let mut w = HashWriter { inner: BufWriter::with_capacity(1 << 20, f), hasher: Sha256::new(), bytes: 0 };
    fill(&mut w).map_err(werr)?;
    let file = w.inner.into_inner().map_err(|e| werr(e.into_error()))?;
    file.sync_all().map_err(werr)?;
    Ok(BackupFileEntry { file: name.to_string(), bytes: w.bytes, sha256: hex(&w.hasher.finalize()) })
}

/// Backs up a VM: `definition` (opaque bytes, at most [`MAX_DEFINITION`]) and each disk's
/// content into the new directory `dest_dir/id` (`dest_dir` is created if needed). See the
/// module documentation for the format. Disks are opened read-only: raw files as plain bytes
/// (holes skipped with `SEEK_DATA`), qcow2 through [`block::DiskImage`] (the whole backing
/// chain's content is stored, so the backup stands alone).
///
/// The sources must not change during the backup (the caller pauses the VM or hands over a
/// point-in-time copy); for other sources use [`backup_create_from`].
///
/// Errors: [`Error::InvalidName`] (id or a label), [`Error::BackupExists`],
/// [`Error::InvalidSize`] (an oversized definition), [`Error::Image`], [`Error::NotAFile`],
/// [`Error::Io`]; nothing is left under `dest_dir/id` on failure.
pub fn backup_create(
    dest_dir: &Path,
    id: &str,
    definition: &[u8],
    disks: &[BackupSource],
) -> Result<BackupInfo, Error> {
    for d in disks {
        validate_name(&d.label)?;
    }
    let readers = disks.iter().map(|d| open_reader(&d.path, d.format, d.policy)).collect::<Result<Vec<_>, Error>>()?;
    let list: Vec<BackupDisk<'_>> = disks
        .iter()
        .zip(&readers)
        .map(|(d, r)| BackupDisk { label: &d.label, format: d.format, reader: r.as_ref() })
        .collect();
    backup_create_from(dest_dir, id, definition, &list)
}

/// [`backup_create`] from any [`DiskReader`]s (a streaming export, an image opened with
/// another policy, ...).
///
/// Errors: as for [`backup_create`].
pub fn backup_create_from(
    dest_dir: &Path,
    id: &str,
    definition: &[u8],
    disks: &[BackupDisk<'_>],
) -> Result<BackupInfo, Error> {
    validate_name(id)?;
    for d in disks {
        validate_name(d.label)?;
    }
    if definition.len() > MAX_DEFINITION {
        return Err(Error::InvalidSize {
            size: definition.len() as u64,
            reason: format!("a VM definition is at most {MAX_DEFINITION} bytes"),
        });
    }
    std::fs::create_dir_all(dest_dir).map_err(|e| Error::io("creating", dest_dir, e))?;
    let target = dest_dir.join(id);
    if target.exists() {
        return Err(Error::BackupExists { path: target });
    }
    let partial = dest_dir.join(format!(".{id}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir(&partial).map_err(|e| Error::io("creating", &partial, e))?;
    let built = build(&partial, id, definition, disks).and_then(|manifest| {
        sync_dir(&partial)?;
        if target.exists() {
            return Err(Error::BackupExists { path: target.clone() });
        }
        std::fs::rename(&partial, &target).map_err(|e| Error::io("renaming into place", &target, e))?;
        sync_dir(dest_dir)?;
        Ok(manifest)
    });
    match built {
        Ok((manifest, sha256, bytes)) => Ok(BackupInfo {
            id: id.to_string(),
            path: target,
            created_ms: manifest.created_ms,
            bytes,
            virtual_bytes: manifest.disks.iter().map(|d| d.virtual_bytes).sum(),
            sha256,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

/// Writes the archive's files into `dir`; returns the manifest, its digest and the total bytes.
fn build(
    dir: &Path,
    id: &str,
    definition: &[u8],
    disks: &[BackupDisk<'_>],
) -> Result<(BackupManifest, String, u64), Error> {
    let created_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let def = write_file(dir, DEFINITION, |w| w.write_all(definition))?;
    let mut entries = Vec::new();
    for (n, d) in disks.iter().enumerate() {
        let size = d.reader.size();
        let mut data_bytes = 0u64;
        let mut read_error = None;
        let stream = write_file(dir, &disk_file(n), |w| {
            w.write_all(&DISK_MAGIC)?;
            w.write_all(&size.to_le_bytes())?;
            let walked = for_each_data_run(d.reader, |off, data| {
                w.write_all(&off.to_le_bytes())?;
                w.write_all(&(data.len() as u64).to_le_bytes())?;
                w.write_all(data)
            });
            data_bytes = match walked {
                Ok(n) => n,
                Err(e) => {
                    // Reported as the source's error below, not the archive file's.
                    read_error = Some(e);
                    return Err(io::Error::other("reading the source failed"));
                }
            };
            w.write_all(&END_MARK.to_le_bytes())?;
            w.write_all(&data_bytes.to_le_bytes())
        });
        if let Some(e) = read_error {
            return Err(Error::Io { action: "reading disk", path: PathBuf::from(d.label), source: e });
        }
        entries.push(BackupDiskEntry {
            label: d.label.to_string(),
            format: d.format,
            virtual_bytes: size,
            data_bytes,
            stream: stream?,
        });
    }
    let manifest = BackupManifest {
        format: BACKUP_FORMAT.to_string(),
        version: BACKUP_VERSION,
        id: id.to_string(),
        created_ms,
        definition: def,
        disks: entries,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::io("writing", &dir.join(MANIFEST), e.into()))?;
    let m = write_file(dir, MANIFEST, |w| w.write_all(&json))?;
    let sum_line = format!("{}  {MANIFEST}\n", m.sha256);
    let s = write_file(dir, MANIFEST_SUM, |w| w.write_all(sum_line.as_bytes()))?;
    let bytes =
        manifest.definition.bytes + manifest.disks.iter().map(|d| d.stream.bytes).sum::<u64>() + m.bytes + s.bytes;
    Ok((manifest, m.sha256, bytes))
}

fn invalid(file: &Path, reason: impl Into<String>) -> Error {
    Error::BackupInvalid { file: file.to_path_buf(), reason: reason.into() }
}

/// Reads a small file of at most `max` bytes.
fn read_small(path: &Path, max: u64) -> Result<Vec<u8>, Error> {
    let f = crate::reader::open_regular(path)?;
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf).map_err(|e| Error::io("reading", path, e))?;
    if buf.len() as u64 > max {
        return Err(invalid(path, format!("larger than {max} bytes")));
    }
    Ok(buf)
}

/// Reads and checks `manifest.sha256` and `manifest.json`; returns the manifest and its digest.
fn read_manifest(dir: &Path, expected: Option<&str>) -> Result<(BackupManifest, String), Error> {
    let sum_path = dir.join(MANIFEST_SUM);
    let sum = read_small(&sum_path, 256)?;
    let sum = String::from_utf8_lossy(&sum);
    let recorded = match sum.trim_end().split_once("  ") {
        Some((digest, name))
            if name == MANIFEST && digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            digest.to_ascii_lowercase()
        }
        _ => return Err(invalid(&sum_path, format!("expected \"<sha256>  {MANIFEST}\""))),
    };
    let path = dir.join(MANIFEST);
    let json = read_small(&path, MAX_MANIFEST)?;
    let actual = hex(&Sha256::digest(&json));
    if actual != recorded {
        return Err(Error::BackupChecksum { file: path, expected: recorded, actual });
    }
    if let Some(exp) = expected {
        if !exp.eq_ignore_ascii_case(&actual) {
            return Err(Error::BackupChecksum { file: path, expected: exp.to_ascii_lowercase(), actual });
        }
    }
    let m: BackupManifest = serde_json::from_slice(&json).map_err(|e| invalid(&path, e.to_string()))?;
    if m.format != BACKUP_FORMAT || m.version != BACKUP_VERSION {
        return Err(invalid(
            &path,
            format!("format {:?} version {}, expected {BACKUP_FORMAT:?} version {BACKUP_VERSION}", m.format, m.version),
        ));
    }
    validate_name(&m.id).map_err(|e| invalid(&path, e.to_string()))?;
    if m.definition.file != DEFINITION || m.definition.bytes > MAX_DEFINITION as u64 {
        return Err(invalid(&path, format!("the definition must be {DEFINITION}, at most {MAX_DEFINITION} bytes")));
    }
    for (n, d) in m.disks.iter().enumerate() {
        validate_name(&d.label).map_err(|e| invalid(&path, e.to_string()))?;
        if d.stream.file != disk_file(n) {
            return Err(invalid(&path, format!("disk {n} must be stored in {}", disk_file(n))));
        }
        crate::validate_size(d.virtual_bytes).map_err(|e| invalid(&path, e.to_string()))?;
    }
    Ok((m, actual))
}

/// Streams one archive file through `parse`, then checks its size and SHA-256 against
/// `entry`. A structural error found by `parse` is reported as a checksum error when the file
/// does not match its digest (corruption), and as [`Error::BackupInvalid`] when it does.
fn check_file(
    dir: &Path,
    entry: &BackupFileEntry,
    parse: impl FnOnce(&mut HashReader<File>, &Path) -> Result<(), Error>,
) -> Result<(), Error> {
    let path = dir.join(&entry.file);
    let f = crate::reader::open_regular(&path)?;
    // Unbuffered: record data is read by the kernel straight into the parser's buffer (one
    // copy less than through a BufReader); record headers cost one 16-byte read each.
    let mut r = HashReader { inner: f, hasher: Sha256::new(), bytes: 0 };
    let parsed = parse(&mut r, &path);
    // Hash whatever the parser left (all of it after a structural error).
    r.drain().map_err(|e| Error::io("reading", &path, e))?;
    let (bytes, actual) = r.finish();
    if actual != entry.sha256.to_ascii_lowercase() {
        return Err(Error::BackupChecksum { file: path, expected: entry.sha256.clone(), actual });
    }
    parsed?;
    if bytes != entry.bytes {
        return Err(invalid(&path, format!("{bytes} bytes, the manifest says {}", entry.bytes)));
    }
    Ok(())
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Parses a disk stream, passing each record to `sink(offset, data)`.
fn parse_disk(
    r: &mut impl Read,
    path: &Path,
    entry: &BackupDiskEntry,
    mut sink: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> Result<(), Error> {
    let rerr = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            invalid(path, "truncated")
        } else {
            Error::io("reading", path, e)
        }
    };
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(rerr)?;
    if magic != DISK_MAGIC {
        return Err(invalid(path, "not a rustvisor disk stream (bad magic)"));
    }
    let size = read_u64(r).map_err(rerr)?;
    if size != entry.virtual_bytes {
        return Err(invalid(path, format!("disk size {size}, the manifest says {}", entry.virtual_bytes)));
    }
    let mut buf = Vec::new();
    let mut next_free = 0u64;
    let mut total = 0u64;
    loop {
        let mut header = [0u8; 16];
        r.read_exact(&mut header).map_err(rerr)?;
        let (offset, len) = header.split_at(8);
        let offset = u64::from_le_bytes(offset.try_into().unwrap_or_default());
        let len = u64::from_le_bytes(len.try_into().unwrap_or_default());
        if offset == END_MARK {
            if len != total || total != entry.data_bytes {
                return Err(invalid(
                    path,
                    format!("{total} data bytes, the end record says {len}, the manifest {}", entry.data_bytes),
                ));
            }
            let mut extra = [0u8; 1];
            return match r.read(&mut extra).map_err(rerr)? {
                0 => Ok(()),
                _ => Err(invalid(path, "data after the end record")),
            };
        }
        if len == 0 || len > MAX_RECORD || offset < next_free || offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(invalid(path, format!("bad record: {len} bytes at offset {offset} (disk of {size} bytes)")));
        }
        buf.resize(len as usize, 0);
        r.read_exact(&mut buf).map_err(rerr)?;
        sink(offset, &buf).map_err(|e| Error::Io { action: "restoring", path: path.to_path_buf(), source: e })?;
        next_free = offset + len;
        total += len;
    }
}

/// Checks a backup: the manifest against `manifest.sha256` (and against `expected`, the
/// checksum the caller recorded at creation, when given), then every file against the
/// manifest's size and SHA-256, and every disk stream's structure. Reads the whole archive;
/// changes nothing.
///
/// Errors: [`Error::BackupChecksum`] naming the file and both digests,
/// [`Error::BackupInvalid`] naming the file and the problem, [`Error::NotAFile`],
/// [`Error::Io`].
pub fn backup_verify(dir: &Path, expected: Option<&str>) -> Result<BackupManifest, Error> {
    let (m, _) = read_manifest(dir, expected)?;
    check_file(dir, &m.definition, |r, _| r.drain().map_err(|e| Error::io("reading", &dir.join(DEFINITION), e)))?;
    for d in &m.disks {
        check_file(dir, &d.stream, |r, path| parse_disk(r, path, d, |_, _| Ok(())))?;
    }
    Ok(m)
}

/// The backup in `dir`, from its manifest (not verified: see [`backup_verify`]).
///
/// Errors: those of reading the manifest and its checksum file.
pub fn backup_info(dir: &Path) -> Result<BackupInfo, Error> {
    let (m, sha256) = read_manifest(dir, None)?;
    let size = |name: &str| std::fs::metadata(dir.join(name)).map(|m| m.len()).unwrap_or(0);
    Ok(BackupInfo {
        id: m.id.clone(),
        path: dir.to_path_buf(),
        created_ms: m.created_ms,
        bytes: m.definition.bytes
            + m.disks.iter().map(|d| d.stream.bytes).sum::<u64>()
            + size(MANIFEST)
            + size(MANIFEST_SUM),
        virtual_bytes: m.disks.iter().map(|d| d.virtual_bytes).sum(),
        sha256,
    })
}

/// The backups in `dir` (each subdirectory with a readable manifest), oldest first. Hidden
/// directories (backups in progress) and anything unreadable are skipped (logged). A missing
/// `dir` has no backups.
///
/// Errors: [`Error::Io`] listing `dir`.
pub fn backup_list(dir: &Path) -> Result<Vec<BackupInfo>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("listing", dir, e)),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let hidden = e.file_name().to_string_lossy().starts_with('.');
        if hidden || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match backup_info(&e.path()) {
            Ok(info) => out.push(info),
            Err(err) => tracing::warn!("skipping {}: {err}", e.path().display()),
        }
    }
    out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    Ok(out)
}

/// Deletes the backup in `dir` (which must hold a `manifest.json`).
///
/// Errors: [`Error::BackupInvalid`] when `dir` does not look like a backup (nothing is
/// removed), [`Error::Io`].
pub fn backup_delete(dir: &Path) -> Result<(), Error> {
    let md = std::fs::symlink_metadata(dir).map_err(|e| Error::io("examining", dir, e))?;
    if !md.is_dir() || !dir.join(MANIFEST).is_file() {
        return Err(invalid(dir, format!("not a backup directory (no {MANIFEST})")));
    }
    std::fs::remove_dir_all(dir).map_err(|e| Error::io("removing", dir, e))?;
    if let Some(parent) = dir.parent() {
        let _ = sync_dir(parent);
    }
    Ok(())
}

/// A volume being restored: a hidden file until every disk checks out.
struct Pending {
    tmp: crate::Temp,
    format: Format,
    name: String,
}

/// Restores the backup in `dir` into `pool`: one new volume per disk (`targets`, in the
/// backup's disk order), with the data as of the backup, and gives back the VM definition.
///
/// The manifest is checked first (against `expected` too, when given: the checksum recorded
/// at creation); then each disk stream is written into a hidden file while its digest is
/// computed. Only when every file has matched are the volumes put under their names, so a
/// corrupt backup leaves the pool as it was. Raw targets stay sparse; qcow2 targets are
/// written through [`block::DiskImage`].
///
/// Errors: [`Error::RestoreTargets`], [`Error::InvalidName`], [`Error::VolumeExists`],
/// [`Error::NoSpace`] (the backup's data exceeds the pool's free space), the errors of
/// [`backup_verify`], [`Error::Image`], [`Error::Io`].
pub fn backup_restore(
    dir: &Path,
    expected: Option<&str>,
    pool: &Pool,
    targets: &[RestoreTarget],
) -> Result<Restored, Error> {
    let (manifest, _) = read_manifest(dir, expected)?;
    if targets.len() != manifest.disks.len() {
        return Err(Error::RestoreTargets { disks: manifest.disks.len(), targets: targets.len() });
    }
    for (i, t) in targets.iter().enumerate() {
        validate_name(&t.name)?;
        pool.refuse_existing(&t.name)?;
        if targets.iter().take(i).any(|o| o.name == t.name) {
            return Err(Error::VolumeExists { pool: pool.path().to_path_buf(), name: t.name.clone() });
        }
    }
    let needed: u64 = manifest.disks.iter().map(|d| d.data_bytes).sum();
    let available = crate::fs_space(pool.path())?.1;
    if needed > available {
        let name = targets.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ");
        return Err(Error::NoSpace { pool: pool.path().to_path_buf(), name, needed, available });
    }

    let mut definition = Vec::new();
    check_file(dir, &manifest.definition, |r, path| {
        r.take(MAX_DEFINITION as u64).read_to_end(&mut definition).map(drop).map_err(|e| Error::io("reading", path, e))
    })?;

    let mut pending = Vec::new();
    for (d, t) in manifest.disks.iter().zip(targets) {
        let format = t.format.unwrap_or(d.format);
        let tmp = crate::Temp::new(pool.path(), &t.name, format);
        let werr = |e| Error::io("writing", &tmp.path, e);
        match format {
            Format::Raw => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp.path)
                    .map_err(|e| Error::io("creating", &tmp.path, e))?;
                f.set_len(d.virtual_bytes).map_err(werr)?;
                check_file(dir, &d.stream, |r, path| parse_disk(r, path, d, |off, data| f.write_all_at(data, off)))?;
                f.sync_all().map_err(werr)?;
            }
            Format::Qcow2 => {
                block::create_qcow2(&tmp.path, d.virtual_bytes, None)?;
                let img = block::DiskImage::open(&tmp.path, Format::Qcow2, false)?;
                check_file(dir, &d.stream, |r, path| parse_disk(r, path, d, |off, data| img.write_at(off, data)))?;
                img.flush().map_err(werr)?;
            }
        }
        pending.push(Pending { tmp, format, name: t.name.clone() });
    }

    // Everything matched: put the volumes under their names.
    let mut volumes = Vec::new();
    let mut done: Vec<PathBuf> = Vec::new();
    for p in pending {
        let target = pool.volume_path(&p.name, p.format);
        if let Err(e) = p.tmp.commit(&target) {
            for path in &done {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        done.push(target.clone());
        volumes.push(pool.describe(&p.name, p.format, target)?);
    }
    Ok(Restored { manifest, definition, volumes })
}
