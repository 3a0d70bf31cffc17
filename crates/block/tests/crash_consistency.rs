//! Crash consistency of qcow2 images: a VMM killed with SIGKILL while the guest writes must
//! leave an image that is consistent (at worst leaked clusters, never a cluster referenced more
//! often than its refcount says), that keeps every write completed before a finished
//! `DiskImage::flush`, and on which later allocations never reuse a cluster still in use.
//!
//! Each trial re-executes this test binary as a child ([`crash_child`], selected by the
//! `RUSTVISOR_CRASH_CHILD_IMAGE` environment variable) that writes 64 KiB units at scattered
//! guest offsets (including 0 and 1 GiB) without flushing (or flushing every few writes) and
//! reports its progress on stdout; the parent SIGKILLs it at a random point, then checks the
//! image with `qemu-img check` and with the block layer itself. ([`crash_child`] is a no-op
//! when run as an ordinary test.)
//!
//! [`crash_consistency_exact_crash_points`] complements the kill loop: it runs the same
//! workload in process through imago with a file that stops performing writes after the `n`-th
//! one, which leaves exactly the file a SIGKILL before that write would, for chosen `n`.
//!
//! `RUSTVISOR_CRASH_SEED=<n>` replays a run (the seed is printed).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use block::{create_qcow2, DiskImage, Format};

/// Guest request size, bytes.
const UNIT: u64 = 64 << 10;
/// Virtual disk size, bytes: eight 512 MiB L2 ranges with 64 KiB clusters.
const DISK_SIZE: u64 = 4 << 30;
/// Guest offset whose write must not alias offset 0 after a crash.
const ONE_GIB: u64 = 1 << 30;
/// Units the child writes never lie in the last eighth of the disk: that range is kept for
/// allocations after the crash (fresh L2 tables, fresh data clusters).
const CHILD_UNITS_SPAN: u64 = DISK_SIZE / UNIT / 8 * 7;

const ENV_IMAGE: &str = "RUSTVISOR_CRASH_CHILD_IMAGE";
const ENV_TAG: &str = "RUSTVISOR_CRASH_CHILD_TAG";
const ENV_WRITES: &str = "RUSTVISOR_CRASH_CHILD_WRITES";
const ENV_FLUSH_EVERY: &str = "RUSTVISOR_CRASH_CHILD_FLUSH_EVERY";
/// Prefix of the child's progress lines on stdout (the test harness prints other lines).
const PROGRESS: &str = "CRASHCHILD";

/// splitmix64: a small deterministic generator, so that a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Guest offsets of the child's first `n` writes: 0, then 1 GiB, then a scattered permutation
/// of the other units in `0..CHILD_UNITS_SPAN` (an odd multiplier modulo a power of two is a
/// bijection), so every write goes to a distinct unit. A pure function of `n`: the child and the
/// parent compute it independently.
fn child_offsets(n: u64) -> Vec<u64> {
    let one_gib_unit = ONE_GIB / UNIT;
    let span = CHILD_UNITS_SPAN.next_power_of_two();
    let mut v = vec![0, ONE_GIB];
    let mut j = 1u64;
    while (v.len() as u64) < n {
        let u = j.wrapping_mul(0x9e37_79b1) % span;
        j += 1;
        if u != 0 && u != one_gib_unit && u < CHILD_UNITS_SPAN {
            v.push(u * UNIT);
        }
    }
    v.truncate(n as usize);
    v
}

/// The 64 KiB of data for guest offset `off` in a trial tagged `tag`: every 8-byte word encodes
/// the tag and its own guest offset, so misplaced data is recognised.
fn pattern(tag: u64, off: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(UNIT as usize);
    for w in 0..UNIT / 8 {
        v.extend_from_slice(&(((tag & 0xffff) << 48) | (off + w * 8) | 1).to_le_bytes());
    }
    v
}

/// Child side: runs only when re-executed by a trial (the environment names the image).
#[test]
fn crash_child() {
    let Ok(image) = std::env::var(ENV_IMAGE) else {
        return; // not a child: nothing to do
    };
    let env_u64 = |name: &str| -> u64 { std::env::var(name).unwrap().parse().unwrap() };
    let tag = env_u64(ENV_TAG);
    let writes = env_u64(ENV_WRITES);
    let flush_every = env_u64(ENV_FLUSH_EVERY);
    let disk = DiskImage::open(&image, Format::Qcow2, false).unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{PROGRESS} ready").unwrap();
    for (k, off) in child_offsets(writes).into_iter().enumerate() {
        disk.write_at(off, &pattern(tag, off)).unwrap();
        let done = k as u64 + 1;
        if flush_every != 0 && done.is_multiple_of(flush_every) {
            disk.flush().unwrap();
            writeln!(out, "{PROGRESS} flushed {done}").unwrap();
        }
        writeln!(out, "{PROGRESS} wrote {done}").unwrap();
    }
    writeln!(out, "{PROGRESS} done").unwrap();
    drop(out);
    // Wait to be killed: exiting would drop the image (writing its caches back).
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "rustvisor-crash-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have_qemu_img() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// How an image is made.
#[derive(Clone, Copy, Debug)]
enum Maker {
    /// `block::create_qcow2` (64 KiB clusters, 16-bit refcounts).
    Block,
    /// `qemu-img create -f qcow2` with the given cluster size: 512-byte clusters need a new
    /// refcount block every 128 KiB of file and a larger refcount table after 8 MiB, and an
    /// L2 table covers only 32 KiB, so a 64 KiB write spans two.
    QemuImg { cluster_size: u32 },
}

fn make_image(maker: Maker, path: &Path) {
    match maker {
        Maker::Block => create_qcow2(path, DISK_SIZE, None).unwrap(),
        Maker::QemuImg { cluster_size } => {
            let o = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-o"])
                .arg(format!("cluster_size={cluster_size}"))
                .arg(path)
                .arg(DISK_SIZE.to_string())
                .output()
                .unwrap();
            assert!(o.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
}

/// Checks an image after a crash of the process writing `pattern(tag, _)` at `offsets` (in that
/// order; the first `flushed` were followed by a completed flush): `qemu-img check` (if
/// `qemu_img`) finds nothing worse than leaks; every unit reads as its data or zeros, word by
/// word; flushed units are complete; writes after the crash (1 GiB, fresh L2 ranges) leave all
/// other units as they were. Returns the leaked clusters `qemu-img check` reported.
fn verify_after_crash(image: &Path, tag: u64, offsets: &[u64], flushed: u64, what: &str, qemu_img: bool) -> u64 {
    let leaked = if qemu_img { qemu_img_check(image, &format!("{what}, after the crash")) } else { 0 };

    // Reopen with our block layer: every unit the child may have written is either its data
    // or (not flushed, lost) zeros, word by word; flushed units are complete.
    let disk = DiskImage::open(image, Format::Qcow2, false).unwrap();
    let mut before: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut buf = vec![0u8; UNIT as usize];
    for (k, &off) in offsets.iter().enumerate() {
        disk.read_at(off, &mut buf).unwrap_or_else(|e| panic!("{what}: reading {off:#x}: {e}"));
        let want = pattern(tag, off);
        for (w, (got, exp)) in buf.chunks_exact(8).zip(want.chunks_exact(8)).enumerate() {
            assert!(
                got == exp || got == [0; 8],
                "{what}: guest offset {off:#x} word {w} holds {:#x}, neither its data nor zero",
                u64::from_le_bytes(got.try_into().unwrap())
            );
        }
        if (k as u64) < flushed {
            assert!(buf == want, "{what}: write {k} at {off:#x} completed before a flush but was lost");
        }
        before.insert(off, buf.clone());
    }

    // After the crash: a flushed write at 1 GiB and at never-written units (fresh L2 tables and
    // data clusters) must not change anything else.
    let new_tag = tag ^ 0x5a5a;
    let fresh = [ONE_GIB, CHILD_UNITS_SPAN * UNIT, DISK_SIZE - UNIT, CHILD_UNITS_SPAN * UNIT + 513 * UNIT];
    for off in fresh {
        disk.write_at(off, &pattern(new_tag, off)).unwrap();
    }
    disk.flush().unwrap();
    let check_all = |disk: &DiskImage, when: &str| {
        let mut buf = vec![0u8; UNIT as usize];
        for off in fresh {
            disk.read_at(off, &mut buf).unwrap();
            assert!(buf == pattern(new_tag, off), "{what}: {when}: write at {off:#x} after the crash reads back wrong");
        }
        for (&off, old) in &before {
            if fresh.contains(&off) {
                continue;
            }
            disk.read_at(off, &mut buf).unwrap();
            assert!(
                &buf == old,
                "{what}: {when}: guest offset {off:#x} changed after writes elsewhere (clusters aliased)"
            );
        }
    };
    check_all(&disk, "after writing post-crash");
    drop(disk);
    if qemu_img {
        qemu_img_check(image, &format!("{what}, after writing post-crash"));
    }
    let disk = DiskImage::open(image, Format::Qcow2, true).unwrap();
    check_all(&disk, "reopened");
    leaked
}

/// Runs `qemu-img check` and fails on anything worse than leaked clusters. Returns the number
/// of leaked clusters it reports.
fn qemu_img_check(path: &Path, what: &str) -> u64 {
    let o = Command::new("qemu-img").args(["check", "-f", "qcow2", "--output=human"]).arg(path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    // 0: clean; 3: leaked clusters only. 2: corruption; 1: the check could not complete.
    let code = o.status.code();
    assert!(
        matches!(code, Some(0) | Some(3)) && !text.contains("ERROR"),
        "{what}: qemu-img check found corruption (exit {code:?}):\n{text}"
    );
    text.lines()
        .find_map(|l| l.strip_suffix(" leaked clusters were found on the image.").and_then(|n| n.trim().parse().ok()))
        .unwrap_or(0)
}

/// What the parent learned from the child's progress lines.
#[derive(Default)]
struct Progress {
    ready: bool,
    wrote: u64,
    flushed: u64,
    done: bool,
}

fn spawn_child(image: &Path, tag: u64, writes: u64, flush_every: u64) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads", "1"])
        .env(ENV_IMAGE, image)
        .env(ENV_TAG, tag.to_string())
        .env(ENV_WRITES, writes.to_string())
        .env(ENV_FLUSH_EVERY, flush_every.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The harness prints "test crash_child ... " on the same line as the first one.
            if let Some(at) = line.find(PROGRESS) {
                if tx.send(line[at + PROGRESS.len()..].trim().to_string()).is_err() {
                    break;
                }
            }
        }
    });
    (child, rx)
}

fn apply(p: &mut Progress, msg: &str) {
    let mut it = msg.split_whitespace();
    match (it.next(), it.next().and_then(|n| n.parse::<u64>().ok())) {
        (Some("ready"), _) => p.ready = true,
        (Some("wrote"), Some(n)) => p.wrote = n,
        (Some("flushed"), Some(n)) => p.flushed = n,
        (Some("done"), _) => p.done = true,
        _ => panic!("unexpected child line {msg:?}"),
    }
}

/// One trial: create, let a child write, kill it once it has completed `kill_after` writes (or
/// when it is done), then check the image. Returns (writes completed, flushed, leaked).
fn trial(maker: Maker, rng: &mut Rng, flush_every: u64, qemu_img: bool) -> (u64, u64, u64) {
    let dir = TempDir::new();
    let image = dir.0.join("disk.qcow2");
    make_image(maker, &image);
    let writes = match maker {
        Maker::QemuImg { cluster_size } if cluster_size < 4096 => 200,
        _ => 500,
    };
    let tag = rng.next() & 0xffff;
    // Some trials kill only after the child finished all its writes (none flushed at the end).
    let kill_after = rng.range(0, writes + writes / 8);
    let what = format!("{maker:?} flush_every={flush_every} kill_after={kill_after}");

    let (mut child, rx) = spawn_child(&image, tag, writes, flush_every);
    let mut p = Progress::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(p.ready && (p.wrote >= kill_after || p.done)) {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(msg) => apply(&mut p, &msg),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("{what}: child exited early ({st}):\n{err}");
        }
        assert!(Instant::now() < deadline, "{what}: child made no progress");
    }
    // A few microseconds more, so the kill lands at varying points inside a write.
    std::thread::sleep(Duration::from_micros(rng.range(0, 300)));
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{what}: child was not killed: {status}");
    // Drain what the child said before it died: the flushed count only grows.
    while let Ok(msg) = rx.recv_timeout(Duration::from_millis(200)) {
        apply(&mut p, &msg);
    }

    let leaked = verify_after_crash(&image, tag, &child_offsets(writes), p.flushed, &what, qemu_img);
    (p.wrote, p.flushed, leaked)
}

fn seed() -> u64 {
    match std::env::var("RUSTVISOR_CRASH_SEED") {
        Ok(s) => s.parse().expect("RUSTVISOR_CRASH_SEED must be an integer"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    }
}

fn run_trials(name: &str, maker: Maker, trials: u32, qemu_img: bool) {
    let seed = seed();
    eprintln!("{name}: seed {seed} (RUSTVISOR_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    for i in 0..trials {
        // Half the trials never flush; the others flush every 4..=64 writes.
        let flush_every = if i % 2 == 0 { 0 } else { rng.range(4, 64) };
        let (wrote, flushed, leaked) = trial(maker, &mut rng, flush_every, qemu_img);
        eprintln!("{name}: trial {i}: flush_every={flush_every} killed after {wrote} writes ({flushed} flushed), {leaked} leaked clusters");
    }
}

#[test]
fn crash_consistency_block_created_image() {
    let qemu_img = have_qemu_img();
    if !qemu_img {
        eprintln!(
            "skipped: qemu-img not installed (qemu-img check of the crashed images; the block layer checks still run)"
        );
    }
    run_trials("block::create_qcow2", Maker::Block, 6, qemu_img);
}

#[test]
fn crash_consistency_qemu_img_created_image() {
    if !have_qemu_img() {
        eprintln!("skipped: qemu-img not installed");
        return;
    }
    run_trials("qemu-img 64k", Maker::QemuImg { cluster_size: 65536 }, 4, true);
    run_trials("qemu-img 512", Maker::QemuImg { cluster_size: 512 }, 5, true);
}

/// Exact crash points, in process: the image file is reached through [`exact::CrashAfter`],
/// which performs the first `n` modifying requests and fails all later ones, so the file ends up
/// exactly as if the process had been killed right before its `n + 1`-th write (all earlier
/// writes completed, which is what the file keeps across a SIGKILL). Unlike the kill loop, this
/// hits narrow windows (e.g. between the L1 entry of a new L2 table and the write-back of the
/// refcount block that counts it) as often as wide ones.
mod exact {
    use std::fmt;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use imago::io_buffers::{IoVector, IoVectorMut};
    use imago::qcow2::Qcow2;
    use imago::storage::drivers::CommonStorageHelper;
    use imago::storage::PreallocateMode;
    use imago::{FormatAccess, Storage, StorageOpenOptions};

    /// An image file that "crashes" after `budget` modifying requests: later ones fail without
    /// reaching the file. Syncs do nothing (a process crash keeps every completed write anyway,
    /// and this keeps the test fast).
    #[derive(Debug)]
    pub struct CrashAfter {
        inner: imago::file::File,
        /// Modifying requests still allowed to reach the file.
        budget: AtomicU64,
        /// Modifying requests issued (reached the file or not).
        issued: Arc<AtomicU64>,
    }

    impl fmt::Display for CrashAfter {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "crash-after({})", self.inner)
        }
    }

    impl CrashAfter {
        /// Takes one request from the budget, or fails as the crashed process would.
        fn admit(&self) -> io::Result<()> {
            self.issued.fetch_add(1, Ordering::Relaxed);
            self.budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                .map(|_| ())
                .map_err(|_| io::Error::other("simulated crash: write not performed"))
        }
    }

    impl Storage for CrashAfter {
        fn mem_align(&self) -> usize {
            self.inner.mem_align()
        }
        fn req_align(&self) -> usize {
            self.inner.req_align()
        }
        fn zero_align(&self) -> usize {
            self.inner.zero_align()
        }
        fn discard_align(&self) -> usize {
            self.inner.discard_align()
        }
        fn size(&self) -> io::Result<u64> {
            self.inner.size()
        }
        fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
            self.inner.resolve_relative_path(relative)
        }
        fn get_filename(&self) -> Option<PathBuf> {
            self.inner.get_filename()
        }
        unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
            // SAFETY: forwarded unchanged; our caller upholds `pure_readv`'s contract.
            unsafe { self.inner.pure_readv(bufv, offset) }
        }
        unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
            self.admit()?;
            // SAFETY: forwarded unchanged; our caller upholds `pure_writev`'s contract.
            unsafe { self.inner.pure_writev(bufv, offset) }
        }
        unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
            self.admit()?;
            // SAFETY: forwarded unchanged; our caller upholds `pure_write_zeroes`'s contract.
            unsafe { self.inner.pure_write_zeroes(offset, length) }
        }
        unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
            self.admit()?;
            // SAFETY: forwarded unchanged; our caller upholds the method's contract.
            unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }
        }
        unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
            self.admit()?;
            // SAFETY: forwarded unchanged; our caller upholds `pure_discard`'s contract.
            unsafe { self.inner.pure_discard(offset, length) }
        }
        fn flush(&self) -> io::Result<()> {
            self.inner.flush()
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
        fn settle_writes(&self) -> io::Result<()> {
            self.inner.settle_writes()
        }
        unsafe fn invalidate_cache(&self) -> io::Result<()> {
            // SAFETY: forwarded unchanged; our caller upholds `invalidate_cache`'s contract.
            unsafe { self.inner.invalidate_cache() }
        }
        fn get_storage_helper(&self) -> &CommonStorageHelper {
            self.inner.get_storage_helper()
        }
        fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
            self.admit()?;
            self.inner.resize(new_size, prealloc_mode)
        }
    }

    /// Writes `pattern(tag, off)` at each of `offsets` through imago (as `block` does), flushing
    /// after every `flush_every` writes (0: never), on a file that crashes after `budget`
    /// modifying requests. Stops at the first error (the crash). Returns the number of writes
    /// covered by a completed flush and the modifying requests issued.
    pub fn run(image: &Path, tag: u64, offsets: &[u64], flush_every: u64, budget: u64) -> (u64, u64) {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(image).unwrap();
        let opts = StorageOpenOptions::new().filename(image).write(true);
        let inner = imago::file::File::from_open_file(file, opts).unwrap();
        let issued = Arc::new(AtomicU64::new(0));
        let storage = CrashAfter { inner, budget: AtomicU64::new(budget), issued: Arc::clone(&issued) };
        let qcow2 = Qcow2::<CrashAfter>::open_image(storage, true).unwrap();
        let disk = FormatAccess::new(qcow2);
        let mut flushed = 0;
        let result = (|| -> io::Result<()> {
            for (k, &off) in offsets.iter().enumerate() {
                disk.write(&super::pattern(tag, off)[..], off)?;
                let done = k as u64 + 1;
                if flush_every != 0 && done.is_multiple_of(flush_every) {
                    disk.flush()?;
                    flushed = done;
                }
            }
            Ok(())
        })();
        let issued = issued.load(Ordering::Relaxed);
        if budget == u64::MAX {
            result.unwrap();
        } else {
            assert!(result.is_err(), "the workload ended before its simulated crash ({issued} requests)");
        }
        // Dropping may try to write the caches back: the crashed file refuses.
        drop(disk);
        (flushed, issued)
    }
}

/// Exact crash points on `maker`'s image: counts the modifying requests of a workload, then
/// replays it crashing before the first few (around the first L2 table allocation) and before
/// one random request in each of `samples` equal parts of the workload, checking the image after
/// each.
fn run_exact(name: &str, maker: Maker, writes: u64, flush_every: u64, samples: u32, qemu_img: bool) {
    let seed = seed();
    eprintln!("{name}: seed {seed} (RUSTVISOR_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let tag = rng.next() & 0xffff;
    let offsets = child_offsets(writes);
    let dir = TempDir::new();
    let fresh = dir.0.join("fresh.qcow2");
    make_image(maker, &fresh);
    let image = dir.0.join("disk.qcow2");
    std::fs::copy(&fresh, &image).unwrap();
    let (_, total) = exact::run(&image, tag, &offsets, flush_every, u64::MAX);
    std::fs::remove_file(&image).unwrap();
    let mut points: Vec<u64> = (0..total.min(8)).collect();
    // One random point in each of `samples` equal strata, so the whole workload is covered.
    let samples_u64 = u64::from(samples);
    points.extend((0..samples_u64).map(|i| {
        let (lo, hi) = (i * total / samples_u64, ((i + 1) * total / samples_u64).max(i * total / samples_u64 + 1));
        rng.range(lo, hi - 1)
    }));
    for crash_at in points {
        std::fs::copy(&fresh, &image).unwrap();
        let (flushed, _) = exact::run(&image, tag, &offsets, flush_every, crash_at);
        let what = format!("{name}: crash before write request {crash_at} of {total}");
        verify_after_crash(&image, tag, &offsets, flushed, &what, qemu_img);
        std::fs::remove_file(&image).unwrap();
    }
    eprintln!("{name}: {total} write requests, crashed before {} of them", samples + total.min(8) as u32);
}

#[test]
fn crash_consistency_exact_crash_points() {
    let qemu_img = have_qemu_img();
    if !qemu_img {
        eprintln!("skipped: qemu-img not installed (qemu-img check of the crashed images, and the 512-byte cluster images; the block layer checks still run)");
    } else {
        run_exact("exact, qemu-img 512", Maker::QemuImg { cluster_size: 512 }, 24, 0, 16, true);
        run_exact("exact, qemu-img 512, flush/5", Maker::QemuImg { cluster_size: 512 }, 24, 5, 16, true);
    }
    run_exact("exact, block::create_qcow2", Maker::Block, 40, 0, 8, qemu_img);
    run_exact("exact, block::create_qcow2, flush/7", Maker::Block, 40, 7, 8, qemu_img);
}
