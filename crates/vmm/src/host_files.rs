//! Opening the host files a user or a snapshot names (kernels, initrds, snapshot files):
//! regular files only, and never blocking.
//!
//! `open(2)` of a FIFO for reading blocks until a writer appears, and reading a character
//! device may never end, so a path that names either would hang the VMM (and, through the
//! API, every request after it). Files are opened with `O_NONBLOCK` (which has no effect on
//! regular files) and checked with `fstat(2)` on the open descriptor, so the file checked is
//! the file read.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens `path` read-only if it is a regular file, returning it with its size in bytes.
///
/// Errors: the `open(2)` error (`NotFound`, `PermissionDenied`, ...), or
/// [`io::ErrorKind::InvalidInput`] "not a regular file" for FIFOs, sockets, devices and
/// directories.
pub fn open_regular(path: &Path) -> io::Result<(File, u64)> {
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok((f, meta.len()))
}

/// Reads the whole regular file at `path`, refusing files larger than `max` bytes before
/// reading anything.
///
/// Errors: those of [`open_regular`], [`io::ErrorKind::InvalidData`] "N bytes (at most M)"
/// for a file over `max`, and read errors.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let (f, len) = open_regular(path)?;
    if len > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{len} bytes (accepted: at most {max})")));
    }
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // `take` bounds the read even if the file grows after the fstat.
    io::Read::read_to_end(&mut io::Read::take(f, max + 1), &mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("more than {max} bytes")));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_and_directories_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("rv-hostfiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(open_regular(&dir).is_err());
        assert!(read_bounded(Path::new("/dev/zero"), 10).is_err());
        let f = dir.join("f");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read_bounded(&f, 10).unwrap(), b"0123456789");
        let e = read_bounded(&f, 9).unwrap_err();
        assert!(e.to_string().contains("10 bytes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
