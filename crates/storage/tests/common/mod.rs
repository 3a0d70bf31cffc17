//! Helpers shared by the storage tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use block::{DiskImage, Format};
use sha2::{Digest, Sha256};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "rustvisor-storage-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Template volumes are made read-only; make everything removable again.
        let _ = Command::new("chmod").arg("-R").arg("u+w").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `data` at `offset` of the image through crates/block (the VMM's code).
pub fn write_disk(path: &Path, format: Format, offset: u64, data: &[u8]) {
    let d = DiskImage::open(path, format, false).unwrap();
    d.write_at(offset, data).unwrap();
    d.flush().unwrap();
}

/// Reads `len` bytes at `offset` through crates/block.
pub fn read_disk(path: &Path, format: Format, offset: u64, len: usize) -> Vec<u8> {
    let d = DiskImage::open(path, format, true).unwrap();
    let mut b = vec![0u8; len];
    d.read_at(offset, &mut b).unwrap();
    b
}

/// SHA-256 of the whole guest-visible disk, read through crates/block, and its size.
pub fn disk_digest(path: &Path, format: Format) -> (u64, String) {
    let d = DiskImage::open(path, format, true).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < d.size() {
        let n = (d.size() - off).min(buf.len() as u64) as usize;
        d.read_at(off, &mut buf[..n]).unwrap();
        h.update(&buf[..n]);
        off += n as u64;
    }
    (d.size(), format!("{:x}", h.finalize()))
}

/// A file's size, allocation, modification time and the SHA-256 of its data runs (holes
/// skipped, so an 8 GiB sparse file is cheap): changes when any byte does.
pub fn file_state(path: &Path) -> (u64, u64, i64, i64, String) {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).unwrap();
    let r = storage::RawReader::open(path).unwrap();
    let mut h = Sha256::new();
    storage::for_each_data_run(&r, |off, data| {
        h.update(off.to_le_bytes());
        h.update(data);
        Ok(())
    })
    .unwrap();
    (md.len(), md.blocks(), md.mtime(), md.mtime_nsec(), format!("{:x}", h.finalize()))
}

/// SHA-256 of a file's bytes.
pub fn file_digest(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()))
}

/// Pseudo-random bytes (xorshift), never all zero.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

/// Whether qemu-img is installed (prints the skip note once per call site otherwise).
pub fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: qemu-img not installed");
    }
    ok
}

/// `qemu-img check` of a qcow2 image must report no errors (skipped without qemu-img).
pub fn qemu_img_check(path: &Path) {
    if !have_qemu_img() {
        return;
    }
    let out = Command::new("qemu-img").args(["check", "-f", "qcow2", "-U"]).arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img info --output=json` of an image (None without qemu-img).
pub fn qemu_img_info(path: &Path, format: Format) -> Option<String> {
    if !have_qemu_img() {
        return None;
    }
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "-f", format.as_str()])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The names in a directory (hidden ones included), sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Asserts two byte strings are equal, reporting the first difference (not the bytes).
#[track_caller]
pub fn assert_same(a: &[u8], b: &[u8]) {
    if a != b {
        let at = a.iter().zip(b).position(|(x, y)| x != y);
        panic!("byte strings differ: lengths {} and {}, first difference at {at:?}", a.len(), b.len());
    }
}
