//! Write throughput of a fresh qcow2 image (64 KiB clusters): 64 MiB written in 64 KiB
//! requests (every request allocates a cluster), without a flush, then one final
//! `DiskImage::flush`. Two patterns:
//!
//! - `sequential`: guest offsets 0, 64 KiB, 128 KiB, ... (one L2 table);
//! - `scattered`: one request every 64 MiB of a 64 GiB disk, so every 8th request needs a new
//!   L2 table (128 in all): the worst case for metadata ordering costs.
//!
//! Then `flushed`: 256 sequential 64 KiB requests, each followed by a flush (every flush has a
//! new cluster's refcount and L2 entry to write back), in flushes per second.
//!
//! Usage: `cargo run --release -p block --example qcow2_write_bench [DIR] [RUNS]`
//! (DIR defaults to the system temp dir, RUNS to 7). Prints MiB/s per run and the medians.

use std::time::Instant;

use block::{create_qcow2, DiskImage, Format};

const REQ: usize = 64 << 10;
const TOTAL: u64 = 64 << 20;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let runs: usize = args.next().map(|s| s.parse().expect("RUNS must be a number")).unwrap_or(7);
    bench(&dir, runs, "sequential", 1 << 30, |i| i * REQ as u64);
    bench(&dir, runs, "scattered", 64 << 30, |i| (i % 1024) * (64 << 20) + (i / 1024) * REQ as u64);
    bench_flushed(&dir, runs);
}

/// 256 allocating writes, each followed by a flush, `runs` times; prints flushes per second.
fn bench_flushed(dir: &std::path::Path, runs: usize) {
    const N: u64 = 256;
    let buf = vec![0x5au8; REQ];
    let mut rates = Vec::new();
    for run in 0..runs {
        let path = dir.join(format!("qcow2-write-bench-{}-{run}.qcow2", std::process::id()));
        create_qcow2(&path, 1 << 30, None).expect("create");
        let disk = DiskImage::open(&path, Format::Qcow2, false).expect("open");
        let t0 = Instant::now();
        for i in 0..N {
            disk.write_at(i * REQ as u64, &buf).expect("write");
            disk.flush().expect("flush");
        }
        let rate = N as f64 / t0.elapsed().as_secs_f64();
        drop(disk);
        std::fs::remove_file(&path).expect("remove");
        println!("flushed run {run}: {rate:8.1} write+flush/s");
        rates.push(rate);
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    println!("flushed: median of {runs}: {:.1} write+flush/s", rates[rates.len() / 2]);
}

/// Writes `TOTAL` bytes in `REQ`-byte requests, the `i`-th at guest offset `offset(i)`, to fresh
/// images of `disk_size` bytes, `runs` times; prints the throughput of each run and the medians.
fn bench(dir: &std::path::Path, runs: usize, name: &str, disk_size: u64, offset: impl Fn(u64) -> u64) {
    let buf = vec![0xa5u8; REQ];
    let mut writes = Vec::new();
    let mut with_flush = Vec::new();
    for run in 0..runs {
        let path = dir.join(format!("qcow2-write-bench-{}-{run}.qcow2", std::process::id()));
        create_qcow2(&path, disk_size, None).expect("create");
        let disk = DiskImage::open(&path, Format::Qcow2, false).expect("open");
        let t0 = Instant::now();
        for i in 0..TOTAL / REQ as u64 {
            disk.write_at(offset(i), &buf).expect("write");
        }
        let t_write = t0.elapsed();
        disk.flush().expect("flush");
        let t_all = t0.elapsed();
        drop(disk);
        std::fs::remove_file(&path).expect("remove");
        let mib = (TOTAL >> 20) as f64;
        let w = mib / t_write.as_secs_f64();
        let f = mib / t_all.as_secs_f64();
        println!("{name} run {run}: writes {w:8.1} MiB/s   writes+flush {f:8.1} MiB/s");
        writes.push(w);
        with_flush.push(f);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "{name}: median of {runs}: writes {:.1} MiB/s, writes+flush {:.1} MiB/s",
        median(&mut writes),
        median(&mut with_flush)
    );
}
