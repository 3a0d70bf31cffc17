//! Storage speed (issue 10): linked clone time of an 8 GiB and a 64 GiB template (it should not
//! depend on the size), and backup throughput next to `cp` of the same file.
//!
//! `cargo bench -p storage` (release build; not part of the test suite). Works in
//! `$RUSTVISOR_BENCH_DIR` or the system temp directory, which needs about 2 GiB free. The page
//! cache is warm for every measurement (the source was just written), for `cp` too.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use storage::{backup_create, backup_restore, backup_verify, BackupSource, Format, Pool, RestoreTarget};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Fills `len` bytes at `offset` of the image with non-zero pseudo-random data, 1 MiB at a time.
fn fill(path: &Path, format: Format, offset: u64, len: u64, seed: u64) {
    let d = block::DiskImage::open(path, format, false).unwrap();
    let mut x = seed | 1;
    let mut buf = vec![0u8; MIB as usize];
    let mut done = 0;
    while done < len {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&(x | 1).to_le_bytes());
        }
        d.write_at(offset + done, &buf).unwrap();
        done += MIB;
    }
    d.flush().unwrap();
}

fn linked_clones(pool: &Pool) {
    println!("## linked clone of a template (64 MiB of data written in it), 15 clones each");
    println!("| template | virtual size | allocated | clone median | min | max |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for format in [Format::Qcow2, Format::Raw] {
        for size in [8 * GIB, 64 * GIB] {
            let name = format!("tmpl-{}-{}g", format, size / GIB);
            let info = pool.create_volume(&name, size, format, false).unwrap();
            // Data at the start, the middle and the end of the disk.
            for (i, at) in [0, size / 2, size - 32 * MIB].into_iter().enumerate() {
                fill(&info.path, format, at, if i == 1 { 16 * MIB } else { 24 * MIB }, i as u64 + 7);
            }
            pool.set_read_only(&name, true).unwrap();
            let allocated = pool.volume_info(&name).unwrap().allocated_bytes;
            let mut times = Vec::new();
            for i in 0..15 {
                let clone = format!("{name}-c{i}");
                let t = Instant::now();
                pool.clone_volume(&name, pool, &clone, true).unwrap();
                times.push(t.elapsed());
            }
            for i in 0..15 {
                pool.delete_volume(&format!("{name}-c{i}")).unwrap();
            }
            let (min, max) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
            println!(
                "| {format} | {} GiB | {} MiB | {:.2} ms | {:.2} ms | {:.2} ms |",
                size / GIB,
                allocated / MIB,
                ms(median(times)),
                ms(min),
                ms(max)
            );
            // For scale: a full clone of the same template (a sparse copy, 64 MiB of data).
            if size == 64 * GIB {
                let t = Instant::now();
                pool.clone_volume(&name, pool, &format!("{name}-full"), false).unwrap();
                println!("|   (full clone of it, for scale) | | | {:.1} ms | | |", ms(t.elapsed()));
                pool.delete_volume(&format!("{name}-full")).unwrap();
            }
            pool.set_read_only(&name, false).unwrap();
            pool.delete_volume(&name).unwrap();
        }
    }
}

fn run(cmd: &mut Command) {
    let st = cmd.status().unwrap();
    assert!(st.success(), "{cmd:?}");
}

fn backups(dir: &Path, pool: &Pool) {
    let size = 512 * MIB;
    let v = pool.create_volume("data", size, Format::Raw, false).unwrap();
    fill(&v.path, Format::Raw, 0, size, 42);
    let q = pool.create_volume("dataq", size, Format::Qcow2, false).unwrap();
    fill(&q.path, Format::Qcow2, 0, size, 43);
    let mib = (size / MIB) as f64;
    println!();
    println!("## backup of a 512 MiB disk full of data (warm page cache), 3 rounds alternated");
    println!("| round | cp | cp + fsync | backup raw | backup qcow2 | verify | restore raw |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let dest = dir.join("backups");
    for round in 0..3 {
        let copy = dir.join("copy.raw");
        let t = Instant::now();
        run(Command::new("cp").arg(&v.path).arg(&copy));
        let cp = t.elapsed();
        std::fs::remove_file(&copy).unwrap();
        let t = Instant::now();
        run(Command::new("cp").arg(&v.path).arg(&copy));
        run(Command::new("sync").arg(&copy));
        let cp_sync = t.elapsed();
        std::fs::remove_file(&copy).unwrap();

        let t = Instant::now();
        let id = format!("r{round}");
        let info = backup_create(&dest, &id, b"{}", &[BackupSource::new("vda", &v.path, Format::Raw)]).unwrap();
        let backup = t.elapsed();
        let t = Instant::now();
        let idq = format!("q{round}");
        backup_create(&dest, &idq, b"{}", &[BackupSource::new("vda", &q.path, Format::Qcow2)]).unwrap();
        let backup_q = t.elapsed();
        let t = Instant::now();
        backup_verify(&info.path, Some(&info.sha256)).unwrap();
        let verify = t.elapsed();
        let t = Instant::now();
        let target = RestoreTarget { name: "restored".to_string(), format: None };
        backup_restore(&info.path, Some(&info.sha256), pool, &[target]).unwrap();
        let restore = t.elapsed();
        pool.delete_volume("restored").unwrap();
        storage::backup_delete(&info.path).unwrap();
        storage::backup_delete(&dest.join(&idq)).unwrap();
        let rate = |d: Duration| format!("{:.0} MiB/s", mib / d.as_secs_f64());
        println!(
            "| {round} | {} | {} | {} | {} | {} | {} |",
            rate(cp),
            rate(cp_sync),
            rate(backup),
            rate(backup_q),
            rate(verify),
            rate(restore)
        );
    }
    pool.delete_volume("data").unwrap();
    pool.delete_volume("dataq").unwrap();
}

fn main() {
    let base = std::env::var_os("RUSTVISOR_BENCH_DIR").map(Into::into).unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("rustvisor-bench-storage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pool = Pool::create(dir.join("pool")).unwrap();
    // `RUSTVISOR_BENCH_ONLY=clone|backup` runs one half.
    let only = std::env::var("RUSTVISOR_BENCH_ONLY").unwrap_or_default();
    if only != "backup" {
        linked_clones(&pool);
    }
    if only != "clone" {
        backups(&dir, &pool);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
