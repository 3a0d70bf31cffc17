//! Write throughput of a fresh qcow2 image: a sequential 64 MiB write in 64 KiB requests
//! (every request allocates a cluster), without a flush, then one final `DiskImage::flush`.
//!
//! Usage: `cargo run --release -p block --example qcow2_write_bench [DIR] [RUNS]`
//! (DIR defaults to the system temp dir, RUNS to 7). Prints MiB/s per run and the median.

use std::time::Instant;

use block::{create_qcow2, DiskImage, Format};

const REQ: usize = 64 << 10;
const TOTAL: u64 = 64 << 20;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let runs: usize = args.next().map(|s| s.parse().expect("RUNS must be a number")).unwrap_or(7);
    let buf = vec![0xa5u8; REQ];
    let mut writes = Vec::new();
    let mut with_flush = Vec::new();
    for run in 0..runs {
        let path = dir.join(format!("qcow2-write-bench-{}-{run}.qcow2", std::process::id()));
        create_qcow2(&path, 1 << 30, None).expect("create");
        let disk = DiskImage::open(&path, Format::Qcow2, false).expect("open");
        let t0 = Instant::now();
        let mut off = 0;
        while off < TOTAL {
            disk.write_at(off, &buf).expect("write");
            off += REQ as u64;
        }
        let t_write = t0.elapsed();
        disk.flush().expect("flush");
        let t_all = t0.elapsed();
        drop(disk);
        std::fs::remove_file(&path).expect("remove");
        let mib = (TOTAL >> 20) as f64;
        let w = mib / t_write.as_secs_f64();
        let f = mib / t_all.as_secs_f64();
        println!("run {run}: writes {w:8.1} MiB/s   writes+flush {f:8.1} MiB/s");
        writes.push(w);
        with_flush.push(f);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "median of {runs}: writes {:.1} MiB/s, writes+flush {:.1} MiB/s",
        median(&mut writes),
        median(&mut with_flush)
    );
}
