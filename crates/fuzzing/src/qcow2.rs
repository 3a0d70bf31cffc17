//! The `qcow2` target: a disk image file opened by the block layer (`crates/block`) the way
//! `--disk` opens it (format detected from the file; the strict policy: backing and data
//! files only beside the image), then read across its virtual size, its allocation queried,
//! and (a writable open of a copy) written, zeroed, discarded and flushed, which walks and
//! updates the qcow2 metadata (L1/L2 tables, refcounts).
//!
//! Input: the image file, as is. The virtual size and every table offset and size come from
//! it, so this is where a header that asks for unbounded memory shows.

use std::path::PathBuf;

fn file(name: &str) -> PathBuf {
    crate::scratch_dir().join(format!("{name}-{:?}.img", std::thread::current().id()))
}

/// Reads and writes at most this many bytes per run.
const IO_BYTES: usize = 4096;

/// Runs one input (see the module documentation).
pub fn run(data: &[u8]) {
    let _ = opened(data);
}

/// [`run`], returning the image's format and virtual size, or why the block layer refused it.
pub fn opened(data: &[u8]) -> Result<(block::Format, u64), String> {
    let path = file("qcow2");
    std::fs::write(&path, data).map_err(|e| e.to_string())?;
    let format = block::detect_format(&path).map_err(|e| e.to_string())?;
    // Read-only: reads spread over the virtual size, and the allocation map.
    let answer = block::DiskImage::open(&path, format, true).map(|i| (format, i.size())).map_err(|e| e.to_string());
    if let Ok(img) = block::DiskImage::open(&path, format, true) {
        let size = img.size();
        let mut buf = vec![0u8; IO_BYTES];
        for k in 0..8u64 {
            let off = (size / 8).saturating_mul(k) & !511;
            let len = usize::try_from(size.saturating_sub(off)).unwrap_or(IO_BYTES).min(IO_BYTES);
            if let Some(b) = buf.get_mut(..len) {
                let _ = img.read_at(off, b);
            }
            let _ = img.extent(off, 1 << 20);
        }
    }
    // Writable: a write at the start and at the end, zeroes, a discard, a flush.
    if let Ok(mut img) = block::DiskImage::open(&path, format, false) {
        let size = img.size();
        let data = [0x5au8; IO_BYTES];
        let len = usize::try_from(size).unwrap_or(IO_BYTES).min(IO_BYTES);
        let chunk = data.get(..len).unwrap_or_default();
        let _ = img.write_at(0, chunk);
        let _ = img.write_at(size.saturating_sub(len as u64) & !511, chunk);
        let _ = img.write_zeroes(0, (len as u64) & !511);
        let _ = img.discard(0, 1 << 16);
        let _ = img.flush();
    }
    answer
}

#[cfg(test)]
mod tests {
    /// The seed images open (the cut-off header too: its tables read as zeros), except those
    /// naming a backing file outside their folder or a missing one.
    #[test]
    fn seeds_open() {
        for (target, name, data) in crate::seeds::all() {
            if target == "qcow2" {
                let r = super::opened(&data);
                eprintln!("{name}: {r:?}");
                match name.as_str() {
                    "seed-backing-outside" | "seed-backing-beside" => assert!(r.is_err(), "{name}: {r:?}"),
                    _ => assert!(r.is_ok(), "{name}: {r:?}"),
                }
            }
        }
    }
}
