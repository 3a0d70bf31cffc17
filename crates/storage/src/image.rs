//! The little of an image file this crate reads itself (a qcow2 header's size and backing
//! file name), and flattening a disk's content into a new image.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use block::{DiskImage, Format};

use crate::reader::{for_each_data_run, DiskReader};
use crate::Error;

/// What [`read_qcow2_header`] reads.
pub(crate) struct Qcow2Header {
    /// Virtual size in bytes (header bytes 24..32).
    pub(crate) size: u64,
    /// The backing file name as written in the header, if any.
    pub(crate) backing: Option<String>,
}

/// Longest backing file name QEMU writes (and reads).
const MAX_BACKING_NAME: u32 = 1023;

/// Reads a qcow2 header's fields (big-endian, qcow2 spec "Header"): magic (0..4),
/// `backing_file_offset` (8..16), `backing_file_size` (16..20) and `size` (24..32).
///
/// Errors: [`Error::Image`] with [`block::Error::FormatMismatch`] when the magic is missing,
/// [`Error::Io`] (including a short file or a backing name that does not fit).
pub(crate) fn read_qcow2_header(path: &Path) -> Result<Qcow2Header, Error> {
    let f = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut h = [0u8; 32];
    f.read_exact_at(&mut h, 0).map_err(|e| Error::io("reading the qcow2 header of", path, e))?;
    let be64 = |at: usize| h.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
    let be32 = |at: usize| h.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes).unwrap_or(0);
    if h.get(..4) != Some(&block::QCOW2_MAGIC[..]) {
        return Err(Error::Image(block::Error::FormatMismatch {
            path: path.to_path_buf(),
            expected: Format::Qcow2,
            found: Format::Raw,
        }));
    }
    let (offset, len) = (be64(8), be32(16));
    let backing = if offset == 0 {
        None
    } else {
        if len > MAX_BACKING_NAME {
            let e = io::Error::new(io::ErrorKind::InvalidData, format!("backing file name of {len} bytes"));
            return Err(Error::io("reading the qcow2 header of", path, e));
        }
        let mut name = vec![0u8; len as usize];
        f.read_exact_at(&mut name, offset).map_err(|e| Error::io("reading the qcow2 header of", path, e))?;
        Some(String::from_utf8_lossy(&name).into_owned())
    };
    Ok(Qcow2Header { size: be64(24), backing })
}

/// Writes `src`'s content (read from `src_path`, named in errors) into the new file `dst`
/// (which must not exist) as a standalone `format` image of `size` bytes (at least
/// `src.size()`; the rest reads as zeros). Only non-zero data is written, so the result is as
/// sparse as the content allows. The file is flushed; the caller removes it on failure.
/// Returns the data bytes written.
///
/// Errors: [`Error::Image`] (creating or opening the new image), [`Error::Io`] naming the
/// source for read errors and `dst` for write errors.
pub(crate) fn flatten(
    src: &dyn DiskReader,
    src_path: &Path,
    dst: &Path,
    format: Format,
    size: u64,
) -> Result<u64, Error> {
    let werr = |e| Error::io("writing", dst, e);
    // Tells write errors (from the closure) from read errors (from the walk).
    let mut write_failed = false;
    let walked = match format {
        Format::Raw => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dst)
                .map_err(|e| Error::io("creating", dst, e))?;
            f.set_len(size).map_err(werr)?;
            let n = for_each_data_run(src, |off, data| f.write_all_at(data, off).inspect_err(|_| write_failed = true));
            n.and_then(|n| f.sync_all().inspect_err(|_| write_failed = true).map(|()| n))
        }
        Format::Qcow2 => {
            block::create_qcow2(dst, size, None)?;
            let img = DiskImage::open(dst, Format::Qcow2, false)?;
            let n = for_each_data_run(src, |off, data| img.write_at(off, data).inspect_err(|_| write_failed = true));
            n.and_then(|n| img.flush().inspect_err(|_| write_failed = true).map(|()| n))
        }
    };
    walked.map_err(|e| if write_failed { werr(e) } else { Error::io("reading", src_path, e) })
}
