//! Disk image backends for rustvisor's block devices.
//!
//! A [`DiskImage`] is a guest disk stored in a host file (or host block device) in one of the
//! [`Format`]s rustvisor understands:
//!
//! - [`Format::Raw`]: the file's bytes are the disk's bytes. Flushing is `fdatasync(2)`;
//!   discarding punches holes (`fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`) and
//!   zeroing uses `FALLOC_FL_ZERO_RANGE`, both falling back to writing zeros where the host
//!   file system does not support them.
//! - [`Format::Qcow2`]: a thin-provisioned QEMU copy-on-write image, through the `imago`
//!   crate (synchronous API). Writes allocate clusters on demand; a backing file named in the
//!   image header is opened read-only and must exist. Metadata reaches the file in dependency
//!   order (refcounts before the L1/L2 entries that reference new clusters, with an `fsync(2)`
//!   in between where needed), so after a crash of the VMM or of the host the image is
//!   consistent: writes not covered by a completed [`DiskImage::flush`] may be lost and
//!   clusters may be leaked (`qemu-img check -r leaks` reclaims them), but no cluster is ever in
//!   use with a refcount too low, so later allocations never hand out a cluster in use.
//!
//! Opening never modifies the image, and never guesses the format: the caller names it, and a
//! raw file that carries the qcow2 magic (or a "qcow2" file that does not) is rejected (a guest
//! that owns a raw disk could otherwise write a qcow2 header pointing at any host file).
//!
//! All offsets and lengths are in bytes. Requests must lie within [`DiskImage::size`].
//!
//! [`backup`] exports a disk in use as of one instant (copy-before-write), for backups of
//! running VMs.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::cast_possible_truncation)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::indexing_slicing))]

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatCreateBuilder, Storage, StorageCreateOptions};

pub mod backup;
mod chain;
pub use backup::{BackupJob, Copier, JobState, JobStatus};
pub use chain::{chain_files, ImagePolicy, MAX_CHAIN_DEPTH};

/// The first four bytes of every qcow2 image: `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Largest zero buffer written at once when a format cannot zero or discard natively.
const ZERO_CHUNK: usize = 1 << 20;

/// The on-disk format of a disk image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// The file's bytes are the disk's bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl Format {
    /// The format's name as used on the command line: `"raw"` or `"qcow2"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = Error;

    /// Parses `"raw"` or `"qcow2"` (ASCII case-insensitive).
    ///
    /// Errors: [`Error::UnknownFormat`] for anything else.
    fn from_str(s: &str) -> Result<Format, Error> {
        if s.eq_ignore_ascii_case("raw") {
            Ok(Format::Raw)
        } else if s.eq_ignore_ascii_case("qcow2") {
            Ok(Format::Qcow2)
        } else {
            Err(Error::UnknownFormat { format: s.to_string() })
        }
    }
}

/// Why a disk image could not be opened. Every variant that concerns a file names it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image file does not exist.
    #[error("disk image {}: no such file", path.display())]
    NotFound {
        /// The image path as given.
        path: PathBuf,
    },
    /// The image file exists but may not be opened with the requested access.
    #[error("disk image {}: permission denied opening it {mode}", path.display())]
    PermissionDenied {
        /// The image path as given.
        path: PathBuf,
        /// `"read-only"` or `"read-write"`.
        mode: &'static str,
    },
    /// The path names something that is neither a regular file nor a block device.
    #[error("disk image {}: not a regular file or block device", path.display())]
    NotAFile {
        /// The image path as given.
        path: PathBuf,
    },
    /// A format name other than `raw` or `qcow2`.
    #[error("unknown disk image format {format:?} (expected \"raw\" or \"qcow2\")")]
    UnknownFormat {
        /// The name given.
        format: String,
    },
    /// The file's contents do not match the format it was given as.
    #[error("disk image {}: given as {expected} but the file is {found}", path.display())]
    FormatMismatch {
        /// The image path as given.
        path: PathBuf,
        /// The format the caller named.
        expected: Format,
        /// What the file looks like (by the qcow2 magic `QFI\xfb`, or its absence).
        found: Format,
    },
    /// The qcow2 header names a backing file that does not exist.
    #[error("disk image {}: backing file {} does not exist", path.display(), backing.display())]
    BackingFileMissing {
        /// The image path as given.
        path: PathBuf,
        /// The backing file, resolved relative to the image's directory.
        backing: PathBuf,
    },
    /// The qcow2 header names a backing file without recording its format; probing it would
    /// let whoever wrote the backing file choose how it is interpreted.
    #[error(
        "disk image {}: backing file {} has {} (accepted: raw, qcow2, recorded in the header, e.g. `qemu-img rebase -F raw`)",
        path.display(),
        backing.display(),
        match format { Some(f) => format!("unsupported format {f:?}"), None => "no format recorded".to_string() }
    )]
    BackingFormatUnknown {
        /// The image path as given.
        path: PathBuf,
        /// The backing file named in the header, resolved against its image's directory.
        backing: PathBuf,
        /// The format recorded in the header, if any.
        format: Option<String>,
    },
    /// A backing (or external data) file lies outside the image's own directory.
    #[error(
        "disk image {}: refusing backing file {} outside the image's directory {} (add backing=allow to trust the image's header)",
        path.display(),
        backing.display(),
        directory.display()
    )]
    BackingOutsideDirectory {
        /// The image path as given.
        path: PathBuf,
        /// The file named in a header, canonicalised.
        backing: PathBuf,
        /// The top image's directory, canonicalised.
        directory: PathBuf,
    },
    /// The backing chain names one image twice.
    #[error("disk image {}: backing chain loops back to {}", path.display(), backing.display())]
    BackingLoop {
        /// The image path as given.
        path: PathBuf,
        /// The image that appears a second time.
        backing: PathBuf,
    },
    /// The backing chain is longer than [`MAX_CHAIN_DEPTH`].
    #[error("disk image {}: backing chain deeper than {max} images", path.display())]
    BackingChainTooDeep {
        /// The image path as given.
        path: PathBuf,
        /// The deepest chain accepted.
        max: usize,
    },
    /// The qcow2 header asks for an external data file and the policy refuses those.
    #[error(
        "disk image {}: refusing external data file {} (add data_file=allow to trust the image's header)",
        path.display(),
        data_file.display()
    )]
    ExternalDataFile {
        /// The image path as given.
        path: PathBuf,
        /// The data file named in the header, resolved against the image's directory.
        data_file: PathBuf,
    },
    /// The qcow2 image (or one of its backing images) is invalid or could not be opened.
    #[error("disk image {}: cannot open as qcow2: {source}", path.display())]
    Qcow2 {
        /// The image path as given.
        path: PathBuf,
        /// imago's error.
        source: io::Error,
    },
    /// Any other host I/O error while opening or probing the file.
    #[error("disk image {}: {source}", path.display())]
    Io {
        /// The image path as given.
        path: PathBuf,
        /// The host error.
        source: io::Error,
    },
}

/// A raw image: a plain file or host block device.
struct RawFile {
    file: File,
    size: u64,
    /// `FALLOC_FL_PUNCH_HOLE` failed as unsupported once: write zeros from then on.
    no_punch_hole: bool,
    /// `FALLOC_FL_ZERO_RANGE` failed as unsupported once: punch holes or write zeros instead.
    no_zero_range: bool,
}

enum Backend {
    Raw(RawFile),
    Qcow2(Box<FormatAccess<imago::file::File>>),
}

/// An open disk image (see the crate documentation for the formats).
///
/// Reads and writes are synchronous and take byte offsets; every request must lie entirely
/// within `0..size()`, otherwise it fails with [`io::ErrorKind::InvalidInput`]. Writes,
/// discards and zeroing on an image opened read-only fail with
/// [`io::ErrorKind::PermissionDenied`]. Dropping the image writes back qcow2 metadata caches
/// (syncing only where metadata write ordering needs it; call [`DiskImage::flush`] to make
/// writes durable).
///
/// A [`BackupJob`] may be attached ([`DiskImage::attach_backup`]): writes, discards and
/// zeroing then copy the old content of the blocks they touch to the backup first (see
/// [`backup`]).
pub struct DiskImage {
    path: PathBuf,
    format: Format,
    readonly: bool,
    /// qcow2 only: the header names a backing file (growing must then hide its tail).
    has_backing: bool,
    backend: Backend,
    /// The backup whose copy-before-write runs before every change.
    backup: Option<Arc<BackupJob>>,
}

/// A run of a disk's guest-visible bytes, as the image's allocation metadata describes it
/// (see [`DiskImage::extent`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// `false`: the run reads as zeros without being stored (a hole in a raw file; an
    /// unallocated or zero qcow2 cluster with no backing data behind it). `true`: the run may
    /// hold data (it may still read as zeros: the formats do not know).
    pub data: bool,
    /// Length of the run in bytes, at least 1 unless the offset is the end of the disk.
    pub len: u64,
}

impl fmt::Debug for DiskImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskImage")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("readonly", &self.readonly)
            .field("size", &self.size())
            .finish()
    }
}

fn open_error(path: &Path, readonly: bool, e: io::Error) -> Error {
    let path = path.to_path_buf();
    match e.kind() {
        io::ErrorKind::NotFound => Error::NotFound { path },
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            Error::PermissionDenied { path, mode: if readonly { "read-only" } else { "read-write" } }
        }
        _ => Error::Io { path, source: e },
    }
}

fn out_of_range(offset: u64, len: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("request of {len} bytes at offset {offset} exceeds the disk size ({size} bytes)"),
    )
}

fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "disk image is read-only")
}

/// `fallocate(2)` on `file`, retried on `EINTR`.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: fallocate only takes integers; `file` is an open descriptor we own for the
        // duration of the call. No memory is shared with the kernel.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether a `fallocate` error means "this file (system) cannot do that mode" rather than a
/// real I/O error.
fn fallocate_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV | libc::ENOTTY))
}

/// Writes `len` zero bytes at `offset` through `write`, in chunks of at most [`ZERO_CHUNK`].
fn write_zero_buffers(offset: u64, len: u64, mut write: impl FnMut(&[u8], u64) -> io::Result<()>) -> io::Result<()> {
    let zeros = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(ZERO_CHUNK)];
    let mut done = 0u64;
    while done < len {
        // The last chunk is the remainder; every other one is the whole buffer.
        let remaining = usize::try_from(len - done).unwrap_or(usize::MAX);
        let chunk = zeros.get(..remaining).unwrap_or(&zeros);
        write(chunk, offset + done)?;
        done += chunk.len() as u64;
    }
    Ok(())
}

impl RawFile {
    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zero_buffers(offset, len, |buf, off| self.file.write_all_at(buf, off))
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if !self.no_punch_hole {
            match fallocate(&self.file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if fallocate_unsupported(&e) => {
                    tracing::debug!("raw image: punching holes unsupported ({e}); writing zeros instead");
                    self.no_punch_hole = true;
                }
                Err(e) => return Err(e),
            }
        }
        self.write_zero_buffers(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if !self.no_zero_range {
            match fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if fallocate_unsupported(&e) => {
                    tracing::debug!("raw image: zero ranges unsupported ({e}); writing zeros instead");
                    self.no_zero_range = true;
                }
                Err(e) => return Err(e),
            }
        }
        self.write_zero_buffers(offset, len)
    }
}

impl DiskImage {
    /// Opens the image at `path` as `format`, read-only if `readonly`, else read-write.
    ///
    /// Opening reads the image (header, qcow2 metadata) but never writes it. For qcow2, the
    /// backing file named in the header (relative names resolve against the image's
    /// directory) is opened read-only, recursively, under the strict [`ImagePolicy`]: its
    /// format must be recorded in the header, it must lie in the image's directory, the chain
    /// may not loop or exceed [`MAX_CHAIN_DEPTH`], and external data files are refused.
    ///
    /// Errors: [`Error::NotFound`], [`Error::PermissionDenied`] (including a read-write open on
    /// a read-only file system), [`Error::NotAFile`] (directories, character devices...),
    /// [`Error::FormatMismatch`] (a raw file with the qcow2 magic or a qcow2 file without it),
    /// [`Error::BackingFileMissing`], [`Error::Qcow2`] (corrupt or unsupported qcow2: external
    /// data files without a name, unknown incompatible features, ...), [`Error::Io`].
    pub fn open(path: impl AsRef<Path>, format: Format, readonly: bool) -> Result<DiskImage, Error> {
        DiskImage::open_with(path, format, readonly, ImagePolicy::default())
    }

    /// [`DiskImage::open`] with an explicit policy for the files a qcow2 header names (see
    /// [`ImagePolicy`]; `open` uses the strict default).
    ///
    /// Errors: those of [`DiskImage::open`], and for qcow2 [`Error::BackingFormatUnknown`],
    /// [`Error::BackingOutsideDirectory`], [`Error::BackingLoop`],
    /// [`Error::BackingChainTooDeep`] and [`Error::ExternalDataFile`].
    pub fn open_with(
        path: impl AsRef<Path>,
        format: Format,
        readonly: bool,
        policy: ImagePolicy,
    ) -> Result<DiskImage, Error> {
        let path = path.as_ref();
        let file =
            OpenOptions::new().read(true).write(!readonly).open(path).map_err(|e| open_error(path, readonly, e))?;
        let meta = file.metadata().map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        let ft = meta.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(Error::NotAFile { path: path.to_path_buf() });
        }

        let found = sniff_format(&file, path)?;
        if found != format {
            return Err(Error::FormatMismatch { path: path.to_path_buf(), expected: format, found });
        }

        let has_backing = format == Format::Qcow2 && qcow2_names_backing(&file, path)?;
        let backend = match format {
            Format::Raw => {
                let size =
                    (&file).seek(SeekFrom::End(0)).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
                Backend::Raw(RawFile { file, size, no_punch_hole: false, no_zero_range: false })
            }
            Format::Qcow2 => Backend::Qcow2(Box::new(chain::open_qcow2(path, file, readonly, policy)?)),
        };
        Ok(DiskImage { path: path.to_path_buf(), format, readonly, has_backing, backend, backup: None })
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Whether the image was opened read-only.
    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    /// The virtual disk size in bytes (for raw: the file or block device size; for qcow2: the
    /// size in the header, independent of how much is allocated).
    pub fn size(&self) -> u64 {
        match &self.backend {
            Backend::Raw(r) => r.size,
            Backend::Qcow2(q) => q.size(),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(out_of_range(offset, len, size)),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.readonly {
            return Err(read_only_error());
        }
        self.check_range(offset, len)
    }

    /// Reads `buf.len()` bytes at byte `offset` (never short: errors instead). For qcow2,
    /// unallocated clusters read from the backing file, or as zeros without one.
    ///
    /// Errors: [`io::ErrorKind::InvalidInput`] if the range exceeds [`DiskImage::size`]; host
    /// I/O errors.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        match &self.backend {
            Backend::Raw(r) => r.file.read_exact_at(buf, offset),
            Backend::Qcow2(q) => q.read(buf, offset),
        }
    }

    /// Writes all of `buf` at byte `offset`. For qcow2, allocates clusters as needed (copying
    /// from the backing file for partial clusters). Not durable until [`DiskImage::flush`].
    ///
    /// Errors: [`io::ErrorKind::PermissionDenied`] on a read-only image;
    /// [`io::ErrorKind::InvalidInput`] if the range exceeds [`DiskImage::size`]; host I/O
    /// errors (`ENOSPC`, ...).
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        self.copy_before_write(offset, buf.len() as u64);
        match &self.backend {
            Backend::Raw(r) => r.file.write_all_at(buf, offset),
            Backend::Qcow2(q) => q.write(buf, offset),
        }
    }

    /// Makes every completed write durable: `fdatasync(2)` for raw; for qcow2, writes back
    /// imago's metadata caches, then `fsync(2)`s the image (and external data file).
    ///
    /// Errors: host I/O errors (a failed flush means earlier writes may be lost).
    pub fn flush(&self) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(r) => r.file.sync_data(),
            Backend::Qcow2(q) => {
                q.flush()?;
                q.sync()
            }
        }
    }

    /// Whether [`DiskImage::discard`] and [`DiskImage::write_zeroes`] may be used: true for
    /// every writable image (raw and qcow2 implement them natively where possible and fall back
    /// to writing zeros otherwise), false for read-only ones.
    pub fn supports_discard(&self) -> bool {
        !self.readonly
    }

    /// Deallocates `len` bytes at `offset` where the format allows; the range reads back as
    /// zeros afterwards. Raw: `fallocate(PUNCH_HOLE | KEEP_SIZE)`, else zeros are written.
    /// Qcow2: whole clusters are freed (zero clusters where a backing file would show
    /// through), partial clusters are zeroed.
    ///
    /// Errors: as for [`DiskImage::write_at`].
    pub fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.copy_before_write(offset, len);
        match &mut self.backend {
            Backend::Raw(r) => r.discard(offset, len),
            Backend::Qcow2(q) => match q.discard_to_zero(offset, len) {
                Err(e) if e.kind() == io::ErrorKind::Unsupported => qcow2_zeroes(q, offset, len),
                r => r,
            },
        }
    }

    /// Makes `len` bytes at `offset` read as zeros, keeping them allocated where the format
    /// allows. Raw: `fallocate(ZERO_RANGE | KEEP_SIZE)`, else zeros are written. Qcow2: zero
    /// clusters (v3) for whole clusters, zeros written for the rest.
    ///
    /// Errors: as for [`DiskImage::write_at`].
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.copy_before_write(offset, len);
        match &mut self.backend {
            Backend::Raw(r) => r.write_zeroes(offset, len),
            Backend::Qcow2(q) => qcow2_zeroes(q, offset, len),
        }
    }
}

impl DiskImage {
    /// Describes the guest-visible bytes from `offset` on, up to `max_len` bytes (and the end of
    /// the disk): whether they are a run that reads as zeros without being stored, or a run
    /// that may hold data, and how long that run is. Copying only the data runs copies the
    /// disk. Raw: `lseek(SEEK_DATA / SEEK_HOLE)` (a file system or block device without them
    /// reports everything as data). Qcow2: the L1/L2 mapping through the whole backing chain
    /// (a raw backing file counts as data throughout).
    ///
    /// Returns a zero-length extent at or past the end of the disk.
    ///
    /// Errors: host I/O errors, or a corrupt qcow2 mapping.
    pub fn extent(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
        let len = max_len.min(self.size().saturating_sub(offset));
        if len == 0 {
            return Ok(Extent { data: false, len: 0 });
        }
        match &self.backend {
            Backend::Raw(r) => raw_extent(&r.file, offset, len),
            Backend::Qcow2(q) => {
                let (mapping, n) = q.get_mapping(offset, len)?;
                let data = match mapping {
                    imago::Mapping::Zero { .. } | imago::Mapping::Eof { .. } => false,
                    // Raw, compressed and anything imago adds later: read it.
                    _ => true,
                };
                Ok(Extent { data, len: n.clamp(1, len) })
            }
        }
    }

    /// Grows the disk to `new_size` bytes; the new range reads as zeros. A `new_size` at or
    /// below the current size changes nothing (shrinking is never done here). Raw: the file is
    /// extended sparse (`ftruncate`). Qcow2: imago grows the L1 table and the header's size;
    /// with a backing file, the new range is marked as zero clusters so a longer backing file
    /// cannot show through. Call [`DiskImage::flush`] to make it durable.
    ///
    /// Errors: [`io::ErrorKind::PermissionDenied`] on a read-only image;
    /// [`io::ErrorKind::Unsupported`] for a raw host block device; host I/O errors.
    pub fn grow(&mut self, new_size: u64) -> io::Result<()> {
        if self.readonly {
            return Err(read_only_error());
        }
        if new_size <= self.size() {
            return Ok(());
        }
        match &mut self.backend {
            Backend::Raw(r) => {
                if r.file.metadata()?.file_type().is_block_device() {
                    return Err(io::Error::new(io::ErrorKind::Unsupported, "cannot grow a host block device"));
                }
                r.file.set_len(new_size)?;
                r.size = new_size;
                Ok(())
            }
            Backend::Qcow2(q) => {
                let mode = if self.has_backing {
                    imago::format::PreallocateMode::Zero
                } else {
                    imago::format::PreallocateMode::None
                };
                q.resize_grow(new_size, mode)
            }
        }
    }

    /// Attaches `job`: from now on every write, discard and write-zeroes first copies the old
    /// content of the blocks it touches that the job has not copied yet (see [`backup`]).
    /// The instant of the export is now. A job that ended and is still attached is replaced.
    ///
    /// Errors: [`io::ErrorKind::InvalidInput`] when the job was made for another size;
    /// [`io::ErrorKind::ResourceBusy`] when a running job is attached already.
    pub fn attach_backup(&mut self, job: Arc<BackupJob>) -> io::Result<()> {
        if job.size() != self.size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("backup job for {} bytes, disk of {} bytes", job.size(), self.size()),
            ));
        }
        if self.backup.as_ref().is_some_and(|j| j.is_running()) {
            return Err(io::Error::new(io::ErrorKind::ResourceBusy, "a backup of this disk is running"));
        }
        self.backup = Some(job);
        Ok(())
    }

    /// Detaches `job` if it is the one attached (writes no longer check it).
    pub fn detach_backup(&mut self, job: &BackupJob) {
        if self.backup.as_ref().is_some_and(|j| std::ptr::eq(Arc::as_ptr(j), job)) {
            self.backup = None;
        }
    }

    /// The attached backup job, if any.
    pub fn backup(&self) -> Option<&Arc<BackupJob>> {
        self.backup.as_ref()
    }

    /// Copy-before-write of the attached job for a change of `len` bytes at `offset`
    /// (already range-checked). Never fails: a failing backup fails itself.
    fn copy_before_write(&self, offset: u64, len: u64) {
        if let Some(job) = &self.backup {
            job.before_write(self, offset, len);
        }
    }
}

/// [`DiskImage::extent`] for a raw file: `len` (> 0) bytes from `offset` are inside the file.
fn raw_extent(file: &File, offset: u64, len: u64) -> io::Result<Extent> {
    let data_at = match lseek(file, offset, libc::SEEK_DATA) {
        Ok(Some(d)) => d,
        // No data after `offset`: all hole.
        Ok(None) => return Ok(Extent { data: false, len }),
        // No SEEK_DATA here (a block device, an old file system): all data.
        Err(e) if fallocate_unsupported(&e) => return Ok(Extent { data: true, len }),
        Err(e) => return Err(e),
    };
    if data_at > offset {
        return Ok(Extent { data: false, len: (data_at - offset).min(len) });
    }
    let hole_at = lseek(file, offset, libc::SEEK_HOLE)?.unwrap_or(offset + len);
    Ok(Extent { data: true, len: hole_at.saturating_sub(offset).clamp(1, len) })
}

/// `lseek(2)` on `file`; `None` for `ENXIO` (no data / hole at or after `pos`).
fn lseek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek only moves the offset of a descriptor we hold open; no memory is shared.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    Ok(u64::try_from(r).ok())
}

/// Whether the qcow2 header in `file` names a backing file (`backing_file_offset`, bytes
/// 8..16, is non-zero). Only that field is read.
fn qcow2_names_backing(file: &File, path: &Path) -> Result<bool, Error> {
    let mut field = [0u8; 8];
    file.read_exact_at(&mut field, 8).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    Ok(u64::from_be_bytes(field) != 0)
}

/// What `file`'s first bytes say it is: [`Format::Qcow2`] if it starts with [`QCOW2_MAGIC`],
/// [`Format::Raw`] otherwise (also when it is shorter than 4 bytes). Only the magic is read;
/// no header is interpreted.
///
/// Errors: [`Error::Io`] naming `path`.
pub fn sniff_format(file: &File, path: &Path) -> Result<Format, Error> {
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) if magic == QCOW2_MAGIC => Ok(Format::Qcow2),
        Ok(()) => Ok(Format::Raw),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Format::Raw),
        Err(e) => Err(Error::Io { path: path.to_path_buf(), source: e }),
    }
}

/// [`sniff_format`] of the file at `path`, for images given without a format (the top image
/// only: a backing file's format must be recorded in its image's header).
///
/// Errors: those of opening (see [`DiskImage::open`]) and [`Error::Io`].
pub fn detect_format(path: impl AsRef<Path>) -> Result<Format, Error> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| open_error(path, true, e))?;
    sniff_format(&file, path)
}

/// Qcow2 write-zeroes, falling back to writing zero buffers where imago cannot.
fn qcow2_zeroes(q: &FormatAccess<imago::file::File>, offset: u64, len: u64) -> io::Result<()> {
    match q.write_zeroes(offset, len) {
        Err(e) if e.kind() == io::ErrorKind::Unsupported => write_zero_buffers(offset, len, |b, o| q.write(b, o)),
        r => r,
    }
}

/// Creates a new, empty qcow2 v3 image of `size` bytes (virtual) at `path`, with 64 KiB
/// clusters and 16-bit refcounts; the file must not exist yet. With `backing = Some((name,
/// format))` the header names that backing file (stored as given; a relative name is resolved
/// against the new image's directory when it is opened) and its format; it is not checked.
///
/// Errors: [`Error::Io`] (the file exists, the directory is not writable, ...) or
/// [`Error::Qcow2`] (imago refused the parameters).
pub fn create_qcow2(path: impl AsRef<Path>, size: u64, backing: Option<(&str, Format)>) -> Result<(), Error> {
    let path = path.as_ref();
    let storage = imago::file::File::create_open(StorageCreateOptions::new().filename(path))
        .map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let mut builder = Qcow2::<imago::file::File>::create_builder(storage).size(size);
    if let Some((name, format)) = backing {
        builder = builder.backing(name.to_string(), format.as_str().to_string());
    }
    builder.create().map_err(|e| Error::Qcow2 { path: path.to_path_buf(), source: e })
}

/// Creates a new qcow2 v3 image of `size` bytes at `path` (which must not exist yet) with
/// every cluster allocated up front: metadata for the whole disk, and the data area reserved
/// with `fallocate(2)` (reading as zeros). The file then takes about `size` bytes of host space,
/// so later guest writes cannot fail for lack of it.
///
/// Errors: as for [`create_qcow2`]; `ENOSPC` comes as [`Error::Qcow2`], and the partly
/// written file is left for the caller to remove.
pub fn create_qcow2_preallocated(path: impl AsRef<Path>, size: u64) -> Result<(), Error> {
    let path = path.as_ref();
    let storage = imago::file::File::create_open(StorageCreateOptions::new().filename(path))
        .map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    Qcow2::<imago::file::File>::create_builder(storage)
        .size(size)
        .preallocate(imago::format::PreallocateMode::FullAllocate)
        .create()
        .map_err(|e| Error::Qcow2 { path: path.to_path_buf(), source: e })
}

/// `name` as imago resolves it: absolute as is, else relative to `image`'s directory.
fn resolve_relative(image: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() {
        name.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("")).join(name)
    }
}

/// What this crate's unit tests share.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new() -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "rustvisor-block-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        pub(crate) fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::TempDir;
    use super::*;

    fn raw_file(dir: &TempDir, name: &str, size: u64) -> PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    fn qcow2_file(path: &Path, size: u64, backing: Option<(&str, Format)>) {
        create_qcow2(path, size, backing).unwrap();
    }

    /// A qcow2 image whose refcount table lacks the refblock for clusters in use (here: cut
    /// after its header, so the table reads as zeros) fails a write that needs a new cluster
    /// with an error; it used to recurse in imago's allocator until the stack overflowed
    /// (found by the `qcow2` fuzz target).
    #[test]
    fn qcow2_without_its_first_refblock_fails_writes() {
        let dir = TempDir::new();
        let p = dir.join("cut.qcow2");
        qcow2_file(&p, 16 << 20, None);
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(512).unwrap();
        let img = DiskImage::open(&p, Format::Qcow2, false).unwrap();
        assert!(img.write_at(0, &[0x5a; 4096]).is_err());
        let mut buf = [1u8; 512];
        img.read_at(1 << 20, &mut buf).unwrap();
        assert_eq!(buf, [0; 512], "unallocated clusters still read as zeros");
    }

    /// Allocated bytes of the file at `p` (st_blocks × 512).
    fn allocated(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    }

    #[test]
    fn format_parse() {
        assert_eq!("raw".parse::<Format>().unwrap(), Format::Raw);
        assert_eq!("QCOW2".parse::<Format>().unwrap(), Format::Qcow2);
        let e = "vmdk".parse::<Format>().unwrap_err();
        assert!(e.to_string().contains("vmdk"), "{e}");
    }

    #[test]
    fn raw_read_write_flush() {
        let dir = TempDir::new();
        let p = raw_file(&dir, "disk.img", 1 << 20);
        let disk = DiskImage::open(&p, Format::Raw, false).unwrap();
        assert_eq!(disk.size(), 1 << 20);
        assert_eq!(disk.format(), Format::Raw);
        assert!(!disk.is_readonly());
        assert!(disk.supports_discard());
        let data: Vec<u8> = (0..4096u32).map(|i| (i & 0xff) as u8).collect();
        disk.write_at(8192, &data).unwrap();
        disk.flush().unwrap();
        let mut back = vec![0u8; 4096];
        disk.read_at(8192, &mut back).unwrap();
        assert_eq!(back, data);
        drop(disk);
        // Reopen read-only: the data is on disk.
        let disk = DiskImage::open(&p, Format::Raw, true).unwrap();
        let mut back = vec![0u8; 4096];
        disk.read_at(8192, &mut back).unwrap();
        assert_eq!(back, data);
        let raw = std::fs::read(&p).unwrap();
        assert_eq!(&raw[8192..8192 + 4096], &data[..]);
    }

    #[test]
    fn raw_out_of_range() {
        let dir = TempDir::new();
        let p = raw_file(&dir, "disk.img", 4096);
        let mut disk = DiskImage::open(&p, Format::Raw, false).unwrap();
        let mut buf = [0u8; 512];
        assert_eq!(disk.read_at(4096 - 511, &mut buf).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(disk.read_at(u64::MAX, &mut buf).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(disk.write_at(4096, &buf).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(disk.discard(0, u64::MAX).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(disk.write_zeroes(u64::MAX, 2).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        disk.read_at(4096 - 512, &mut buf).unwrap();
        disk.read_at(4096, &mut []).unwrap();
    }

    #[test]
    fn raw_discard_and_write_zeroes() {
        let dir = TempDir::new();
        let p = raw_file(&dir, "disk.img", 1 << 20);
        let mut disk = DiskImage::open(&p, Format::Raw, false).unwrap();
        disk.write_at(0, &vec![0xaa; 1 << 20]).unwrap();
        disk.flush().unwrap();
        let before = allocated(&p);
        disk.discard(64 << 10, 256 << 10).unwrap();
        disk.write_zeroes(512 << 10, 4096 + 512).unwrap();
        disk.flush().unwrap();
        let mut back = vec![0u8; 1 << 20];
        disk.read_at(0, &mut back).unwrap();
        for (i, b) in back.iter().enumerate() {
            let zero = (64 << 10..320 << 10).contains(&i) || (512 << 10..(512 << 10) + 4608).contains(&i);
            assert_eq!(*b, if zero { 0 } else { 0xaa }, "byte {i}");
        }
        // Where the file system punches holes, the discard freed space.
        if !matches!(&disk.backend, Backend::Raw(r) if r.no_punch_hole) {
            assert!(allocated(&p) < before, "{} !< {before}", allocated(&p));
        }
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20, "size kept");
    }

    #[test]
    fn chain_files_lists_the_backing_chain_as_named() {
        let dir = TempDir::new();
        let base = raw_file(&dir, "base.raw", 1 << 20);
        let mid = dir.join("mid.qcow2");
        create_qcow2(&mid, 1 << 20, Some(("base.raw", Format::Raw))).unwrap();
        let top = dir.join("top.qcow2");
        create_qcow2(&top, 1 << 20, Some((mid.to_str().unwrap(), Format::Qcow2))).unwrap();
        let files = chain_files(&top, true, ImagePolicy::default()).unwrap();
        assert_eq!(files, vec![(mid.clone(), false), (base, false)]);
        assert_eq!(chain_files(&mid, false, ImagePolicy::default()).unwrap().len(), 1);
        // The chain rule holds: a backing file outside the folder is refused.
        let outside = dir.join("out.qcow2");
        create_qcow2(&outside, 1 << 20, Some(("/etc/hostname", Format::Raw))).unwrap();
        assert!(matches!(
            chain_files(&outside, false, ImagePolicy::default()),
            Err(Error::BackingOutsideDirectory { .. })
        ));
    }

    #[test]
    fn raw_zero_fallback() {
        let dir = TempDir::new();
        let p = raw_file(&dir, "disk.img", 64 << 10);
        let mut disk = DiskImage::open(&p, Format::Raw, false).unwrap();
        disk.write_at(0, &[0x55; 64 << 10]).unwrap();
        if let Backend::Raw(r) = &mut disk.backend {
            r.no_punch_hole = true;
            r.no_zero_range = true;
        }
        disk.discard(0, 4096).unwrap();
        disk.write_zeroes(8192, 4096).unwrap();
        let mut back = vec![0u8; 64 << 10];
        disk.read_at(0, &mut back).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..8192].iter().all(|&b| b == 0x55));
        assert!(back[8192..12288].iter().all(|&b| b == 0));
        assert!(back[12288..].iter().all(|&b| b == 0x55));
    }

    #[test]
    fn raw_readonly_rejects_writes() {
        let dir = TempDir::new();
        let p = raw_file(&dir, "disk.img", 8192);
        let mut disk = DiskImage::open(&p, Format::Raw, true).unwrap();
        assert!(disk.is_readonly());
        assert!(!disk.supports_discard());
        assert_eq!(disk.write_at(0, &[1; 512]).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(disk.discard(0, 512).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(disk.write_zeroes(0, 512).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        disk.flush().unwrap();
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = TempDir::new();
        let missing = dir.join("missing.img");
        let e = DiskImage::open(&missing, Format::Raw, false).unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
        assert!(e.to_string().contains("missing.img"), "{e}");

        let e = DiskImage::open(&dir.0, Format::Raw, true).unwrap_err();
        assert!(matches!(e, Error::NotAFile { .. }), "{e:?}");

        // A raw file given as qcow2.
        let raw = raw_file(&dir, "plain.img", 65536);
        let e = DiskImage::open(&raw, Format::Qcow2, false).unwrap_err();
        assert!(matches!(e, Error::FormatMismatch { expected: Format::Qcow2, found: Format::Raw, .. }), "{e:?}");
        assert!(e.to_string().contains("plain.img"), "{e}");

        // An empty file is raw (no magic), never qcow2.
        let empty = raw_file(&dir, "empty.img", 0);
        assert!(matches!(DiskImage::open(&empty, Format::Qcow2, true), Err(Error::FormatMismatch { .. })));
        assert_eq!(DiskImage::open(&empty, Format::Raw, true).unwrap().size(), 0);

        // A qcow2 file given as raw.
        let q = dir.join("disk.qcow2");
        qcow2_file(&q, 1 << 20, None);
        let e = DiskImage::open(&q, Format::Raw, false).unwrap_err();
        assert!(matches!(e, Error::FormatMismatch { expected: Format::Raw, found: Format::Qcow2, .. }), "{e:?}");
        assert!(e.to_string().contains("disk.qcow2"), "{e}");
    }

    #[test]
    fn permission_denied() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new();
        let p = raw_file(&dir, "ro.img", 4096);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
        // Root ignores file modes: only check where the kernel enforces them.
        if OpenOptions::new().write(true).open(&p).is_ok() {
            return;
        }
        let e = DiskImage::open(&p, Format::Raw, false).unwrap_err();
        assert!(matches!(e, Error::PermissionDenied { mode: "read-write", .. }), "{e:?}");
        assert!(e.to_string().contains("ro.img"), "{e}");
        DiskImage::open(&p, Format::Raw, true).unwrap();
    }

    #[test]
    fn qcow2_write_read_reopen() {
        let dir = TempDir::new();
        let p = dir.join("disk.qcow2");
        qcow2_file(&p, 64 << 20, None);
        let empty_len = std::fs::metadata(&p).unwrap().len();
        {
            let disk = DiskImage::open(&p, Format::Qcow2, false).unwrap();
            assert_eq!(disk.size(), 64 << 20);
            let mut buf = vec![0xffu8; 4096];
            disk.read_at(10 << 20, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "unallocated reads as zeros");
            let data: Vec<u8> = (0..8192u32).map(|i| ((i * 7) & 0xff) as u8).collect();
            disk.write_at((32 << 20) - 4096, &data).unwrap(); // spans two clusters
            disk.write_at(512, &data[..512]).unwrap();
            disk.flush().unwrap();
            let mut back = vec![0u8; 8192];
            disk.read_at((32 << 20) - 4096, &mut back).unwrap();
            assert_eq!(back, data);
        }
        // Thin provisioning: only the touched clusters (plus metadata) were allocated.
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len > empty_len && len < empty_len + (1 << 20), "{empty_len} -> {len}");
        let disk = DiskImage::open(&p, Format::Qcow2, true).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| ((i * 7) & 0xff) as u8).collect();
        let mut back = vec![0u8; 8192];
        disk.read_at((32 << 20) - 4096, &mut back).unwrap();
        assert_eq!(back, data);
        let mut sec = vec![0u8; 1024];
        disk.read_at(0, &mut sec).unwrap();
        assert!(sec[..512].iter().all(|&b| b == 0));
        assert_eq!(&sec[512..], &data[..512]);
        assert_eq!(disk.write_at(0, &[1]).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(disk.read_at(64 << 20, &mut [0]).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn qcow2_discard_and_write_zeroes() {
        let dir = TempDir::new();
        let p = dir.join("disk.qcow2");
        qcow2_file(&p, 4 << 20, None);
        let mut disk = DiskImage::open(&p, Format::Qcow2, false).unwrap();
        assert!(disk.supports_discard());
        disk.write_at(0, &vec![0x11; 1 << 20]).unwrap();
        disk.discard(128 << 10, 128 << 10).unwrap(); // two whole clusters
        disk.discard(1000, 24).unwrap(); // partial cluster
        disk.write_zeroes(512 << 10, 70000).unwrap();
        disk.flush().unwrap();
        drop(disk);
        let disk = DiskImage::open(&p, Format::Qcow2, true).unwrap();
        let mut back = vec![0u8; 1 << 20];
        disk.read_at(0, &mut back).unwrap();
        for (i, b) in back.iter().enumerate() {
            let zero = (1000..1024).contains(&i)
                || (128 << 10..256 << 10).contains(&i)
                || (512 << 10..(512 << 10) + 70000).contains(&i);
            assert_eq!(*b, if zero { 0 } else { 0x11 }, "byte {i}");
        }
    }

    #[test]
    fn qcow2_with_backing_file() {
        let dir = TempDir::new();
        let base = raw_file(&dir, "base.raw", 1 << 20);
        std::fs::write(&base, vec![0x42u8; 1 << 20]).unwrap();
        let top = dir.join("top.qcow2");
        qcow2_file(&top, 1 << 20, Some(("base.raw", Format::Raw)));
        let disk = DiskImage::open(&top, Format::Qcow2, false).unwrap();
        let mut buf = [0u8; 16];
        disk.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [0x42; 16], "reads fall through to the backing file");
        disk.write_at(4096, &[7; 16]).unwrap();
        disk.read_at(4090, &mut buf).unwrap();
        assert_eq!(&buf[..6], &[0x42; 6]);
        assert_eq!(&buf[6..], &[7; 10]);
        disk.flush().unwrap();
        drop(disk);
        assert_eq!(std::fs::read(&base).unwrap(), vec![0x42u8; 1 << 20], "backing file untouched");
    }

    #[test]
    fn qcow2_missing_backing_file() {
        let dir = TempDir::new();
        let top = dir.join("top.qcow2");
        qcow2_file(&top, 1 << 20, Some(("gone.raw", Format::Raw)));
        for ro in [false, true] {
            let e = DiskImage::open(&top, Format::Qcow2, ro).unwrap_err();
            match &e {
                Error::BackingFileMissing { path, backing } => {
                    assert_eq!(path, &top);
                    assert_eq!(backing, &dir.join("gone.raw"));
                }
                other => panic!("expected BackingFileMissing, got {other:?}"),
            }
            let msg = e.to_string();
            assert!(msg.contains("gone.raw") && msg.contains("top.qcow2"), "{msg}");
        }
    }

    #[test]
    fn extents_follow_allocation() {
        let dir = TempDir::new();
        // Raw: holes and data as the file system reports them.
        let p = raw_file(&dir, "disk.img", 4 << 20);
        let disk = DiskImage::open(&p, Format::Raw, false).unwrap();
        disk.write_at(1 << 20, &[1; 65536]).unwrap();
        disk.flush().unwrap();
        let e = disk.extent(0, u64::MAX).unwrap();
        if e.data {
            // A file system without SEEK_DATA: everything is data.
            assert_eq!(e.len, 4 << 20);
        } else {
            assert_eq!(e, Extent { data: false, len: 1 << 20 });
            assert_eq!(disk.extent(1 << 20, u64::MAX).unwrap(), Extent { data: true, len: 65536 });
            assert!(!disk.extent((1 << 20) + 65536, u64::MAX).unwrap().data);
            assert_eq!(disk.extent(0, 4096).unwrap(), Extent { data: false, len: 4096 });
        }
        assert_eq!(disk.extent(4 << 20, 1).unwrap().len, 0);

        // Qcow2: unallocated clusters are zero runs, written ones data, through a backing file.
        let q = dir.join("disk.qcow2");
        qcow2_file(&q, 4 << 20, None);
        let disk = DiskImage::open(&q, Format::Qcow2, false).unwrap();
        assert_eq!(disk.extent(0, u64::MAX).unwrap(), Extent { data: false, len: 4 << 20 });
        disk.write_at(1 << 20, &[1; 4096]).unwrap();
        assert_eq!(disk.extent(0, u64::MAX).unwrap(), Extent { data: false, len: 1 << 20 });
        assert_eq!(disk.extent(1 << 20, u64::MAX).unwrap(), Extent { data: true, len: 65536 });
        assert_eq!(disk.extent((1 << 20) + 65536, 10).unwrap(), Extent { data: false, len: 10 });
        drop(disk);
        let top = dir.join("top.qcow2");
        qcow2_file(&top, 4 << 20, Some(("disk.qcow2", Format::Qcow2)));
        let disk = DiskImage::open(&top, Format::Qcow2, true).unwrap();
        assert_eq!(disk.extent(0, u64::MAX).unwrap(), Extent { data: false, len: 1 << 20 });
        assert!(disk.extent(1 << 20, u64::MAX).unwrap().data);
    }

    #[test]
    fn grow_raw_and_qcow2_hides_the_backing_tail() {
        let dir = TempDir::new();
        let p = raw_file(&dir, "disk.img", 1 << 20);
        let mut disk = DiskImage::open(&p, Format::Raw, false).unwrap();
        disk.grow(2 << 20).unwrap();
        disk.grow(1 << 20).unwrap(); // never shrinks
        assert_eq!(disk.size(), 2 << 20);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 20);
        let mut ro = DiskImage::open(&p, Format::Raw, true).unwrap();
        assert_eq!(ro.grow(4 << 20).unwrap_err().kind(), io::ErrorKind::PermissionDenied);

        // A 1 MiB overlay over a 2 MiB backing file of 0x42, grown to 2 MiB: the new MiB is
        // zeros, not the backing file's tail.
        std::fs::write(dir.join("base.raw"), vec![0x42u8; 2 << 20]).unwrap();
        let top = dir.join("top.qcow2");
        qcow2_file(&top, 1 << 20, Some(("base.raw", Format::Raw)));
        {
            let mut disk = DiskImage::open(&top, Format::Qcow2, false).unwrap();
            disk.grow(2 << 20).unwrap();
            disk.flush().unwrap();
        }
        let disk = DiskImage::open(&top, Format::Qcow2, true).unwrap();
        assert_eq!(disk.size(), 2 << 20);
        let mut b = vec![0u8; 2 << 20];
        disk.read_at(0, &mut b).unwrap();
        assert!(b[..1 << 20].iter().all(|&x| x == 0x42));
        assert!(b[1 << 20..].iter().all(|&x| x == 0));

        // Without a backing file, growing allocates nothing.
        let q = dir.join("plain.qcow2");
        qcow2_file(&q, 1 << 20, None);
        let before = std::fs::metadata(&q).unwrap().len();
        let mut disk = DiskImage::open(&q, Format::Qcow2, false).unwrap();
        disk.grow(1 << 30).unwrap();
        disk.flush().unwrap();
        assert_eq!(disk.size(), 1 << 30);
        assert!(std::fs::metadata(&q).unwrap().len() <= before + 65536);
    }

    #[test]
    fn preallocated_qcow2_reserves_its_size() {
        let dir = TempDir::new();
        let q = dir.join("full.qcow2");
        create_qcow2_preallocated(&q, 8 << 20).unwrap();
        assert!(allocated(&q) >= 8 << 20, "{}", allocated(&q));
        let disk = DiskImage::open(&q, Format::Qcow2, false).unwrap();
        assert_eq!(disk.size(), 8 << 20);
        let mut b = vec![1u8; 8 << 20];
        disk.read_at(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert!(create_qcow2_preallocated(&q, 8 << 20).is_err(), "refuses an existing file");
    }

    #[test]
    fn create_qcow2_refuses_existing_file() {
        let dir = TempDir::new();
        let p = raw_file(&dir, "exists.img", 512);
        let e = create_qcow2(&p, 1 << 20, None).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(e.to_string().contains("exists.img"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), vec![0u8; 512]);
    }

    #[test]
    fn qcow2_backing_chain() {
        // qcow2 on qcow2 on raw, relative names.
        let dir = TempDir::new();
        let base = dir.join("base.raw");
        std::fs::write(&base, vec![0x10u8; 1 << 20]).unwrap();
        qcow2_file(&dir.join("mid.qcow2"), 1 << 20, Some(("base.raw", Format::Raw)));
        {
            let mid = DiskImage::open(dir.join("mid.qcow2"), Format::Qcow2, false).unwrap();
            mid.write_at(0, &[0x20; 512]).unwrap();
            mid.flush().unwrap();
        }
        qcow2_file(&dir.join("top.qcow2"), 1 << 20, Some(("mid.qcow2", Format::Qcow2)));
        let top = DiskImage::open(dir.join("top.qcow2"), Format::Qcow2, false).unwrap();
        let mut b = [0u8; 1024];
        top.read_at(0, &mut b).unwrap();
        assert_eq!(&b[..512], &[0x20; 512]);
        assert_eq!(&b[512..], &[0x10; 512]);
        // A missing file deeper in the chain is an error too (reported by imago).
        drop(top);
        std::fs::remove_file(&base).unwrap();
        let e = DiskImage::open(dir.join("top.qcow2"), Format::Qcow2, true).unwrap_err();
        assert!(e.to_string().contains("base.raw"), "{e}");
    }

    #[test]
    fn qcow2_corrupt_header() {
        let dir = TempDir::new();
        let p = dir.join("bad.qcow2");
        let mut hdr = vec![0u8; 4096];
        hdr[..4].copy_from_slice(&QCOW2_MAGIC);
        hdr[7] = 99; // version 99
        std::fs::write(&p, &hdr).unwrap();
        let e = DiskImage::open(&p, Format::Qcow2, true).unwrap_err();
        assert!(matches!(e, Error::Qcow2 { .. }), "{e:?}");
        assert!(e.to_string().contains("bad.qcow2"), "{e}");
    }

    #[test]
    fn opening_does_not_modify() {
        let dir = TempDir::new();
        let raw = raw_file(&dir, "disk.img", 1 << 20);
        let q = dir.join("disk.qcow2");
        qcow2_file(&q, 8 << 20, None);
        {
            // Give the qcow2 some allocated data first.
            let d = DiskImage::open(&q, Format::Qcow2, false).unwrap();
            d.write_at(0, &[9; 4096]).unwrap();
            d.flush().unwrap();
        }
        for (p, fmt) in [(&raw, Format::Raw), (&q, Format::Qcow2)] {
            let before = std::fs::read(p).unwrap();
            for ro in [true, false] {
                let d = DiskImage::open(p, fmt, ro).unwrap();
                let mut b = [0u8; 512];
                d.read_at(0, &mut b).unwrap();
                drop(d);
                assert!(std::fs::read(p).unwrap() == before, "{fmt} image modified by open (ro={ro})");
            }
        }
    }
}
