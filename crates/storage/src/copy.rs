//! Copying disk images the way a hypervisor must: keeping them sparse, and durable before
//! anyone relies on the copy.
//!
//! [`copy_sparse`] first asks the filesystem for a reflink (`FICLONE`: btrfs, XFS, bcachefs;
//! no data is copied), and otherwise copies only the data extents that `lseek(SEEK_DATA /
//! SEEK_HOLE)` reports, with `copy_file_range(2)`, leaving holes as holes. A 1 GiB raw image
//! holding 10 MiB of data costs about 10 MiB to copy and to store.
//!
//! [`replace_with_copy`] puts a copy in place of a file atomically (a temporary file beside
//! it, fsynced, then `rename(2)` and an fsync of the folder), so a crash leaves either the
//! old or the new image, never a half-written one.
//!
//! (Moved here from `crates/manager/src/diskcopy.rs`, which the manager's snapshots used.)

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Copies `src` to the new file `dst` (which must not exist), sparse, and fsyncs it.
/// Returns the bytes of data copied (0 for a reflink).
///
/// Errors: opening either file, or the copy's I/O; `dst` is removed on failure.
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<u64> {
    let from = File::open(src)?;
    let to = std::fs::OpenOptions::new().write(true).create_new(true).open(dst)?;
    let r = copy_into(&from, &to).and_then(|n| to.sync_all().map(|()| n));
    if r.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    r
}

fn copy_into(from: &File, to: &File) -> io::Result<u64> {
    let len = from.metadata()?.len();
    // SAFETY: FICLONE takes the source fd as its argument and touches no memory of ours;
    // both fds are open for the call's duration.
    if unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) } == 0 {
        return Ok(0);
    }
    to.set_len(len)?;
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let Some(start) = seek(from, pos, libc::SEEK_DATA)? else { break };
        let end = seek(from, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        copy_range(from, to, start, end)?;
        copied += end - start;
        pos = end;
    }
    Ok(copied)
}

/// `lseek(fd, pos, whence)`; `None` when there is no more data (ENXIO).
pub(crate) fn seek(f: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek only moves the file offset of an fd we hold open.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    Ok(u64::try_from(r).ok())
}

/// Copies bytes `start..end` of `from` to the same offsets of `to`.
fn copy_range(from: &File, to: &File, start: u64, end: u64) -> io::Result<()> {
    let mut pos = start;
    while pos < end {
        let mut off_in = libc::loff_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut off_out = off_in;
        let want = usize::try_from(end - pos).unwrap_or(usize::MAX).min(1 << 30);
        // SAFETY: both fds are open; the offsets are locals the kernel updates; no buffer of
        // ours is involved.
        let n = unsafe { libc::copy_file_range(from.as_raw_fd(), &mut off_in, to.as_raw_fd(), &mut off_out, want, 0) };
        match n {
            n if n > 0 => pos += u64::try_from(n).unwrap_or(0),
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the source shrank during the copy")),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Replaces `target` with a sparse copy of `src`, atomically: a crash leaves the old or the
/// new content. The new file keeps `target`'s permission bits.
///
/// Errors: the copy's I/O, or the rename; `target` is unchanged on failure.
pub fn replace_with_copy(src: &Path, target: &Path) -> io::Result<()> {
    let dir = target.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = target.file_name().ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let tmp: PathBuf = dir.join(format!(".{}.rustvisor-revert", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    copy_sparse(src, &tmp)?;
    if let Ok(md) = std::fs::metadata(target) {
        let _ = std::fs::set_permissions(&tmp, md.permissions());
    }
    if let Err(e) = std::fs::rename(&tmp, target) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

/// Host disk space taken by the files under `path` (allocated blocks, not apparent size).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::symlink_metadata(path) else { return 0 };
    if md.is_dir() {
        std::fs::read_dir(path).map(|d| d.flatten().map(|e| allocated_bytes(&e.path())).sum()).unwrap_or(0)
    } else {
        md.blocks() * 512
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn sparse_copy_keeps_data_and_holes_and_replace_is_whole() {
        let dir = std::env::temp_dir().join(format!("rv-diskcopy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src.raw");
        let mut f = File::create(&src).unwrap();
        f.set_len(256 << 20).unwrap();
        for (off, byte) in [(0u64, 1u8), (100 << 20, 2), ((256 << 20) - 4096, 3)] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&vec![byte; 4096]).unwrap();
        }
        drop(f);
        let dst = dir.join("dst.raw");
        let copied = copy_sparse(&src, &dst).unwrap();
        assert!(copied <= 3 << 20, "only the data extents are copied: {copied}");
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(allocated_bytes(&dst) < 8 << 20, "the copy is sparse: {}", allocated_bytes(&dst));
        assert_eq!(copy_sparse(&src, &dst).unwrap_err().kind(), io::ErrorKind::AlreadyExists);

        // Replacing: the target gets the source's content, no temporary file stays.
        let target = dir.join("target.raw");
        std::fs::write(&target, b"old").unwrap();
        replace_with_copy(&src, &target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), std::fs::read(&src).unwrap());
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        // A missing source leaves the target as it was.
        std::fs::write(&target, b"kept").unwrap();
        assert!(replace_with_copy(&dir.join("missing"), &target).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"kept");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
