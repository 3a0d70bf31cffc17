//! Guest memory in a snapshot: a sparse file with one page-aligned run per stretch of
//! non-zero pages. RAM regions are laid end to end in the file (region 0 at offset 0, region
//! 1 after it, ...); all-zero pages are not written, so the file takes disk space only for
//! the memory the guest touched. A SHA-256 over every run (its GPA, length and bytes) guards
//! against corruption.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::Error;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const PAGE: usize = 4096;
/// Bytes copied at a time from the memory file into guest RAM on restore.
const LOAD_CHUNK: usize = 1 << 20;

/// What the snapshot header records about the memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryImage {
    /// File name inside the snapshot folder.
    pub file: String,
    /// Guest RAM size in bytes (the sum of the regions).
    pub size: u64,
    /// Runs written: (GPA, length in bytes), in file order.
    pub runs: Vec<(u64, u64)>,
    /// Hex SHA-256 over the runs.
    pub sha256: String,
}

/// Where GPA `gpa` lives in the memory file.
fn file_offset(mem: &GuestMemoryMmap, gpa: u64) -> Option<u64> {
    let mut off = 0u64;
    for r in mem.iter() {
        let start = r.start_addr().0;
        if gpa >= start && gpa - start < r.len() {
            return Some(off + (gpa - start));
        }
        off += r.len();
    }
    None
}

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Write { path: path.to_path_buf(), source }
}

fn read_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Read { path: path.to_path_buf(), source }
}

fn invalid(path: &Path, msg: String) -> Error {
    Error::Invalid { path: path.to_path_buf(), msg }
}

fn hash_run(h: &mut Sha256, gpa: u64, data: &[u8]) {
    h.update(gpa.to_le_bytes());
    h.update((data.len() as u64).to_le_bytes());
    h.update(data);
}

/// Writes the non-zero pages of `mem` to `path` (created; must not exist).
///
/// The guest must not run, and no device may write guest memory, while this runs.
/// Errors: [`Error::Write`] naming the file, [`Error::Save`] if guest memory cannot be read.
pub fn save(mem: &GuestMemoryMmap, path: &Path, file: &str) -> Result<MemoryImage, Error> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(write_err(path))?;
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    f.set_len(size).map_err(write_err(path))?;
    let mut h = Sha256::new();
    let mut runs = Vec::new();
    for r in mem.iter() {
        let start = r.start_addr().0;
        let len = r.len() as usize;
        let host = mem
            .get_host_address(r.start_addr())
            .map_err(|e| Error::Save { what: "guest memory", msg: e.to_string() })?;
        // SAFETY: `host` maps the whole region (`len` bytes) for the lifetime of `mem`; the VM
        // is paused and its devices quiesced, so nothing writes it while we read.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let mut p = 0;
        while p < len {
            let zero = |q: usize| bytes[q..(q + PAGE).min(len)].iter().all(|b| *b == 0);
            if zero(p) {
                p += PAGE;
                continue;
            }
            let s = p;
            while p < len && !zero(p) {
                p += PAGE;
            }
            let e = p.min(len);
            let gpa = start + s as u64;
            let off = file_offset(mem, gpa).unwrap_or(0);
            f.seek(SeekFrom::Start(off)).map_err(write_err(path))?;
            f.write_all(&bytes[s..e]).map_err(write_err(path))?;
            hash_run(&mut h, gpa, &bytes[s..e]);
            runs.push((gpa, (e - s) as u64));
        }
    }
    f.sync_all().map_err(write_err(path))?;
    let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(MemoryImage { file: file.to_string(), size, runs, sha256 })
}

/// Reads the runs of `img` from `path` into `mem` (fresh, zeroed RAM of the same size),
/// checking the digest; nothing is written to the snapshot.
///
/// Errors: [`Error::Read`] (missing, not a regular file, unreadable) and [`Error::Invalid`]
/// (wrong size, a run outside guest memory, checksum mismatch), naming the file.
pub fn load(mem: &GuestMemoryMmap, path: &Path, img: &MemoryImage) -> Result<(), Error> {
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    if size != img.size {
        return Err(invalid(path, format!("memory.size {} in the snapshot, {} in the VM", img.size, size)));
    }
    let (mut f, flen) = crate::host_files::open_regular(path).map_err(read_err(path))?;
    if flen != img.size {
        return Err(invalid(path, format!("{flen} bytes, expected {} (truncated or wrong file)", img.size)));
    }
    let mut h = Sha256::new();
    // Runs are copied through one bounded buffer, so a restore needs no more host memory
    // than the guest's RAM.
    let mut buf = vec![0u8; LOAD_CHUNK];
    for &(gpa, len) in &img.runs {
        let end_ok = gpa.checked_add(len).and_then(|e| file_offset(mem, e - 1)).is_some();
        let off = file_offset(mem, gpa).filter(|_| end_ok && len > 0 && len <= 1 << 40);
        let Some(off) = off else {
            return Err(invalid(path, format!("memory.runs: {gpa:#x}+{len:#x} is outside guest memory")));
        };
        f.seek(SeekFrom::Start(off)).map_err(read_err(path))?;
        h.update(gpa.to_le_bytes());
        h.update(len.to_le_bytes());
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(LOAD_CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            f.read_exact(chunk).map_err(read_err(path))?;
            h.update(&*chunk);
            let at = GuestAddress(gpa + done);
            mem.write_slice(chunk, at)
                .map_err(|e| invalid(path, format!("memory.runs: guest memory at {:#x}: {e}", at.0)))?;
            done += n as u64;
        }
    }
    let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if got != img.sha256 {
        return Err(invalid(path, "checksum mismatch (the memory file is corrupt)".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("rv-snapmem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem = crate::memory::create(64 << 20, &Default::default()).unwrap();
        mem.write_slice(&[1, 2, 3], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&vec![7u8; 3 * PAGE], GuestAddress(0x20_0000)).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress((64 << 20) - 4)).unwrap();
        let path = dir.join("memory.bin");
        let img = save(&mem, &path, "memory.bin").unwrap();
        assert_eq!(img.runs, vec![(0x1000, 4096), (0x20_0000, 3 * 4096), ((64 << 20) - 4096, 4096)]);
        // Sparse on disk: far less than 64 MiB allocated.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 1 << 20);
        let fresh = crate::memory::create(64 << 20, &Default::default()).unwrap();
        load(&fresh, &path, &img).unwrap();
        let mut b = [0u8; 3];
        fresh.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert_eq!(fresh.read_obj::<u32>(GuestAddress((64 << 20) - 4)).unwrap(), 0xdead_beef);
        // A flipped byte is caught; a missing file is named.
        let mut data = std::fs::read(&path).unwrap();
        data[0x20_0000 + 5] ^= 1;
        std::fs::write(&path, &data).unwrap();
        assert!(load(&crate::memory::create(64 << 20, &Default::default()).unwrap(), &path, &img)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        std::fs::remove_file(&path).unwrap();
        assert!(load(&fresh, &path, &img).unwrap_err().to_string().contains("memory.bin"));
        // The wrong size is refused.
        assert!(load(&crate::memory::create(32 << 20, &Default::default()).unwrap(), &path, &img)
            .unwrap_err()
            .to_string()
            .contains("size"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
