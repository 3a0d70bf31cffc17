//! Reading a disk's guest-visible content, data runs only.
//!
//! A [`DiskReader`] is anything that can say which parts of a disk hold data and read them:
//! a raw file ([`RawReader`], holes found with `SEEK_DATA`/`SEEK_HOLE`, the bytes never
//! interpreted), an image opened through `crates/block` ([`block::DiskImage`], the same code
//! the VMM uses, so a qcow2 chain is read under the same untrusted-header policy), or a
//! future streaming source (a copy-before-write export from a running VMM). Flattening copies,
//! imports and backups all walk a disk with [`for_each_data_run`], which skips the runs the
//! format reports as zeros and the all-zero blocks inside data runs.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use block::{DiskImage, Extent, Format, ImagePolicy};

use crate::Error;

/// Granularity of zero detection inside data runs, in bytes: a block of this size that reads
/// as zeros is not copied (it stays a hole in a raw target, unallocated in a qcow2 target).
/// 64 KiB is qcow2's default cluster size.
pub const ZERO_BLOCK: usize = 64 << 10;

/// Bytes read from the source at once.
const READ_CHUNK: usize = 1 << 20;

/// A disk's guest-visible content, readable by byte offset.
pub trait DiskReader {
    /// The disk's virtual size in bytes.
    fn size(&self) -> u64;

    /// The run of bytes starting at `offset` (at most `max_len` bytes, never past
    /// [`DiskReader::size`]): whether it may hold data or is known to read as zeros. A
    /// zero-length extent means `offset` is at or past the end.
    ///
    /// Errors: host I/O errors.
    fn extent(&self, offset: u64, max_len: u64) -> io::Result<Extent>;

    /// Fills `buf` with the disk's bytes at `offset` (never short).
    ///
    /// Errors: host I/O errors; a range past the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl DiskReader for DiskImage {
    fn size(&self) -> u64 {
        DiskImage::size(self)
    }

    fn extent(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
        DiskImage::extent(self, offset, max_len)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        DiskImage::read_at(self, offset, buf)
    }
}

/// A raw image read as plain bytes: no magic check, no header interpreted (a raw disk a guest
/// has written a qcow2 header into is still just data here).
#[derive(Debug)]
pub struct RawReader {
    file: File,
    size: u64,
}

impl RawReader {
    /// Opens the regular file at `path` read-only. A FIFO, device or directory is refused
    /// without blocking on it (the file is opened `O_NONBLOCK` and checked with `fstat`).
    ///
    /// Errors: [`Error::NotAFile`], [`Error::Io`] naming `path`.
    pub fn open(path: &Path) -> Result<RawReader, Error> {
        let file = open_regular(path)?;
        let size = file.metadata().map_err(|e| Error::io("reading the size of", path, e))?.len();
        Ok(RawReader { file, size })
    }
}

impl DiskReader for RawReader {
    fn size(&self) -> u64 {
        self.size
    }

    fn extent(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
        let len = max_len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return Ok(Extent { data: false, len: 0 });
        }
        let data_at = match crate::copy::seek(&self.file, offset, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(Extent { data: false, len }),
            // No SEEK_DATA on this file system: everything is data.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                return Ok(Extent { data: true, len })
            }
            Err(e) => return Err(e),
        };
        if data_at > offset {
            return Ok(Extent { data: false, len: (data_at - offset).min(len) });
        }
        let hole_at = crate::copy::seek(&self.file, offset, libc::SEEK_HOLE)?.unwrap_or(offset + len);
        Ok(Extent { data: true, len: hole_at.saturating_sub(offset).clamp(1, len) })
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.size => self.file.read_exact_at(buf, offset),
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "read past the end of the disk")),
        }
    }
}

/// Opens `path` read-only for its content as `format`: raw files as plain bytes
/// ([`RawReader`]), qcow2 through [`block::DiskImage`] under `policy` (read-only; the header's
/// backing chain and data file are checked before anything is opened).
///
/// Errors: [`Error::NotAFile`], [`Error::Image`] (missing, mismatched or refused image),
/// [`Error::Io`].
pub fn open_reader(path: &Path, format: Format, policy: ImagePolicy) -> Result<Box<dyn DiskReader>, Error> {
    match format {
        Format::Raw => Ok(Box::new(RawReader::open(path)?)),
        Format::Qcow2 => {
            // Refuse FIFOs and devices before block opens (and could block on) the file.
            drop(open_regular(path)?);
            Ok(Box::new(DiskImage::open_with(path, Format::Qcow2, true, policy)?))
        }
    }
}

/// Opens `path` read-only and non-blocking, and checks with `fstat` that it is a regular file.
pub(crate) fn open_regular(path: &Path) -> Result<File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io("opening", path, e))?;
    let md = file.metadata().map_err(|e| Error::io("examining", path, e))?;
    if !md.is_file() {
        return Err(Error::NotAFile { path: path.to_path_buf() });
    }
    Ok(file)
}

/// Whether `buf` is all zeros (branch-free over 4 KiB pieces, so it vectorises).
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Calls `f(offset, data)` for every run of `src` that may hold non-zero bytes, in increasing
/// offset order, runs at most 1 MiB long. Extents the format reports as zeros are not read;
/// inside data extents, [`ZERO_BLOCK`]-sized blocks (aligned to disk offsets) that read as
/// zeros are left out. Returns the bytes passed to `f`.
///
/// Errors: the reader's, or `f`'s.
pub fn for_each_data_run(src: &dyn DiskReader, mut f: impl FnMut(u64, &[u8]) -> io::Result<()>) -> io::Result<u64> {
    let size = src.size();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut offset = 0u64;
    let mut total = 0u64;
    while offset < size {
        let ext = src.extent(offset, size - offset)?;
        if ext.len == 0 {
            break;
        }
        if !ext.data {
            offset += ext.len;
            continue;
        }
        let end = offset + ext.len;
        while offset < end {
            // Read up to the next READ_CHUNK boundary, so blocks stay aligned to disk offsets.
            let chunk_end = ((offset / READ_CHUNK as u64) + 1) * READ_CHUNK as u64;
            let n = usize::try_from(chunk_end.min(end) - offset).unwrap_or(READ_CHUNK);
            let piece = buf.get_mut(..n).ok_or_else(|| io::Error::other("read chunk"))?;
            src.read_at(offset, piece)?;
            // Pass on maximal runs of non-zero blocks.
            let mut run: Option<usize> = None;
            let mut pos = 0usize;
            while pos < n {
                let block_end = (((offset + pos as u64) / ZERO_BLOCK as u64 + 1) * ZERO_BLOCK as u64 - offset)
                    .min(n as u64) as usize;
                let zero = piece.get(pos..block_end).is_none_or(is_zero);
                match (zero, run) {
                    (false, None) => run = Some(pos),
                    (true, Some(start)) => {
                        let data = piece.get(start..pos).unwrap_or_default();
                        f(offset + start as u64, data)?;
                        total += data.len() as u64;
                        run = None;
                    }
                    _ => {}
                }
                pos = block_end;
            }
            if let Some(start) = run {
                let data = piece.get(start..n).unwrap_or_default();
                f(offset + start as u64, data)?;
                total += data.len() as u64;
            }
            offset += n as u64;
        }
    }
    Ok(total)
}
