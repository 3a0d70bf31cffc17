//! Point-in-time export of a disk image that stays in use: a backup job with
//! copy-before-write, the design of QEMU's backup job and its `copy-before-write` filter.
//!
//! A [`BackupJob`] covers one [`DiskImage`] and writes its guest-visible content (what
//! [`DiskImage::read_at`] returns, whatever the image's format) into a target file as a raw,
//! sparse image of the virtual disk, as it was at the instant the job was attached
//! ([`DiskImage::attach_backup`]):
//!
//! - At attach time every block (a fixed [granularity](BackupJob::granularity), 64 KiB for
//!   disks up to 4 TiB) is "not yet copied", one bit per block.
//! - A [`Copier`] thread copies the blocks in order, each run of blocks under the disk's lock,
//!   and marks them copied. Blocks that read as zeros are not written, so they stay holes in
//!   the target.
//! - Every write, discard and write-zeroes through the image ([`DiskImage::write_at`],
//!   [`DiskImage::discard`], [`DiskImage::write_zeroes`]) first copies the blocks it touches
//!   that are not yet copied (their old content), then proceeds. Both run under whatever
//!   serialises access to the image (the virtio-blk device's `Mutex<DiskImage>`), so the
//!   copier and the guest never race on a block.
//! - The guest never sees an error because of a backup: when the target (or the read of old
//!   content) fails, the job is [`JobState::Failed`] with the reason and stops copying; the
//!   write goes on as if no job were attached.
//! - When every block is copied, the copier detaches the job from the image (no more
//!   overhead on writes), extends the target to the disk size, `fsync`s it and only then
//!   reports [`JobState::Done`]. [`BackupJob::cancel`] (or dropping the [`Copier`]) stops it
//!   within one run of blocks.
//!
//! Memory is bounded whatever the disk size claims: the bitmap is at most
//! [`MAX_BITMAP_BYTES`] (the granularity doubles for disks over 4 TiB, up to
//! [`MAX_GRANULARITY`]) and the copy buffer is one run ([`COPY_RUN`], or one block when
//! blocks are larger).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::DiskImage;

/// The copy granularity for disks up to 4 TiB: one bitmap bit per 64 KiB.
pub const GRANULARITY: u64 = 64 << 10;
/// The largest bitmap a job allocates (bytes): 2^26 blocks.
pub const MAX_BITMAP_BYTES: u64 = 8 << 20;
/// The largest block: disks whose bitmap would exceed [`MAX_BITMAP_BYTES`] even with
/// 64 MiB blocks (over 4 PiB) cannot be backed up.
pub const MAX_GRANULARITY: u64 = 64 << 20;
/// The most bytes the copier reads under the disk's lock at once (and the copy buffer's size
/// where blocks are smaller): a guest request waits for at most one such run.
pub const COPY_RUN: u64 = 1 << 20;

/// A job's state. Only a `Running` job changes state, once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Copying.
    Running,
    /// Every block is in the target, which is `fsync`ed.
    Done,
    /// The target could not be written (or old content could not be read); the reason.
    Failed(String),
    /// Cancelled before it was done.
    Cancelled,
}

/// A job's progress ([`BackupJob::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    /// The virtual disk's size.
    pub bytes_total: u64,
    /// Bytes of the disk handled so far: written to the target, or found to be zeros (left
    /// as holes). Equals `bytes_total` once done.
    pub bytes_copied: u64,
    /// Of `bytes_copied`, those copied by guest writes ahead of the copier
    /// (copy-before-write).
    pub bytes_before_write: u64,
    /// The state.
    pub state: JobState,
}

/// What one step of the copier did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Copied a run of blocks: this many bytes of the disk read.
    Copied(u64),
    /// Every block is copied.
    Complete,
    /// The job is no longer running (cancelled or failed).
    Stopped,
}

/// Under the job's own lock (always taken after the disk's).
struct Inner {
    /// One bit per block, set once the block's content at attach time is in the target.
    copied: Vec<u64>,
    /// The export; `None` once the job has ended.
    target: Option<File>,
    /// Copy buffer: [`COPY_RUN`] or one block, whichever is larger.
    buf: Vec<u8>,
    /// The copier's next block: every block before it is copied.
    cursor: u64,
}

impl Inner {
    fn is_copied(&self, block: u64) -> bool {
        let word = usize::try_from(block / 64).ok().and_then(|w| self.copied.get(w));
        word.is_none_or(|w| w & (1 << (block % 64)) != 0)
    }

    fn set_copied(&mut self, block: u64) {
        if let Some(w) = usize::try_from(block / 64).ok().and_then(|w| self.copied.get_mut(w)) {
            *w |= 1 << (block % 64);
        }
    }

    /// The first block at or after `from` and before `blocks` not yet copied.
    fn next_uncopied(&self, from: u64, blocks: u64) -> Option<u64> {
        let mut b = from;
        while b < blocks {
            let word = usize::try_from(b / 64).ok().and_then(|w| self.copied.get(w)).copied()?;
            let free = !word & (u64::MAX << (b % 64));
            if free != 0 {
                let found = b - b % 64 + u64::from(free.trailing_zeros());
                return (found < blocks).then_some(found);
            }
            b = b - b % 64 + 64;
        }
        None
    }
}

/// One disk's backup: the target, the copied-block bitmap and the state (see the module
/// documentation). Attach it to the image with [`DiskImage::attach_backup`], then run a
/// [`Copier`].
pub struct BackupJob {
    size: u64,
    granularity: u64,
    blocks: u64,
    target_path: PathBuf,
    inner: Mutex<Inner>,
    state: Mutex<JobState>,
    changed: Condvar,
    /// Mirrors `state == Running`, read on every guest write without a lock.
    active: AtomicBool,
    bytes_copied: AtomicU64,
    bytes_before_write: AtomicU64,
}

impl std::fmt::Debug for BackupJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupJob")
            .field("target", &self.target_path)
            .field("size", &self.size)
            .field("granularity", &self.granularity)
            .field("status", &self.status())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `b` is all zero bytes.
fn is_zero(b: &[u8]) -> bool {
    // OR-folding fixed-size chunks vectorises; stopping at the first non-zero chunk keeps
    // data blocks cheap.
    b.chunks(512).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// The block size for a disk of `size` bytes: [`GRANULARITY`], doubled until the bitmap fits
/// [`MAX_BITMAP_BYTES`]; `None` past [`MAX_GRANULARITY`].
pub fn granularity_for(size: u64) -> Option<u64> {
    let mut g = GRANULARITY;
    while size.div_ceil(g) > MAX_BITMAP_BYTES * 8 {
        g *= 2;
        if g > MAX_GRANULARITY {
            return None;
        }
    }
    Some(g)
}

impl BackupJob {
    /// A job exporting a disk of `size` bytes into `target` (an empty, writable file: only
    /// blocks with data are written, and the file is extended to `size` at the end), named
    /// `target_path` in messages. Nothing is copied until it is attached to the image.
    ///
    /// Errors: [`io::ErrorKind::InvalidInput`] for a disk over 4 PiB (see
    /// [`MAX_GRANULARITY`]); [`io::ErrorKind::OutOfMemory`] when the bitmap or buffer cannot
    /// be allocated.
    pub fn new(size: u64, target: File, target_path: impl Into<PathBuf>) -> io::Result<Arc<BackupJob>> {
        let granularity = granularity_for(size).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("a disk of {size} bytes is too large to back up"))
        })?;
        let blocks = size.div_ceil(granularity);
        let words = usize::try_from(blocks.div_ceil(64)).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let buf_len = usize::try_from(COPY_RUN.max(granularity).min(size.max(1)))
            .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let mut copied = Vec::new();
        copied.try_reserve_exact(words).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        copied.resize(words, 0u64);
        let mut buf = Vec::new();
        buf.try_reserve_exact(buf_len).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        buf.resize(buf_len, 0u8);
        Ok(Arc::new(BackupJob {
            size,
            granularity,
            blocks,
            target_path: target_path.into(),
            inner: Mutex::new(Inner { copied, target: Some(target), buf, cursor: 0 }),
            state: Mutex::new(JobState::Running),
            changed: Condvar::new(),
            active: AtomicBool::new(true),
            bytes_copied: AtomicU64::new(0),
            bytes_before_write: AtomicU64::new(0),
        }))
    }

    /// The disk size the job was made for.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The block size of the bitmap (and of copy-before-write).
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The target's path as given.
    pub fn target_path(&self) -> &Path {
        &self.target_path
    }

    /// Whether the job is still running.
    pub fn is_running(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Progress and state.
    pub fn status(&self) -> JobStatus {
        let state = lock(&self.state).clone();
        JobStatus {
            bytes_total: self.size,
            bytes_copied: self.bytes_copied.load(Ordering::Relaxed),
            bytes_before_write: self.bytes_before_write.load(Ordering::Relaxed),
            state,
        }
    }

    /// Waits up to `timeout` for the job to end; returns its state then.
    pub fn wait(&self, timeout: Duration) -> JobState {
        let end = Instant::now() + timeout;
        let mut s = lock(&self.state);
        while *s == JobState::Running {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self.changed.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        s.clone()
    }

    /// Moves a running job to `to` (and closes the target unless `to` is `Done`, which the
    /// caller closes itself); false if it was no longer running.
    fn end(&self, to: JobState) -> bool {
        {
            let mut s = lock(&self.state);
            if *s != JobState::Running {
                return false;
            }
            *s = to;
            self.active.store(false, Ordering::Release);
        }
        self.changed.notify_all();
        true
    }

    /// Cancels the job (a running one only): copy-before-write stops at once and the copier
    /// at its next step. The target keeps what was copied; it is not a usable export.
    /// Returns whether the job was running.
    pub fn cancel(&self) -> bool {
        let ended = self.end(JobState::Cancelled);
        if ended {
            tracing::info!("backup to {}: cancelled", self.target_path.display());
        }
        ended
    }

    /// Fails the job with `reason` (logged once).
    fn fail(&self, reason: String) {
        if self.end(JobState::Failed(reason.clone())) {
            tracing::warn!("backup to {} failed: {reason}", self.target_path.display());
        }
    }

    /// Copies the run of not-yet-copied blocks starting at `first` (not copied), up to block
    /// `limit` (exclusive) and the buffer's size; returns the block after the run and the
    /// bytes read. Called under the disk's lock, with the job's.
    fn copy_run(&self, inner: &mut Inner, disk: &DiskImage, first: u64, limit: u64) -> Result<(u64, u64), String> {
        let g = self.granularity;
        let max_blocks = (inner.buf.len() as u64 / g).max(1);
        let mut end = first + 1;
        while end < limit.min(self.blocks) && end - first < max_blocks && !inner.is_copied(end) {
            end += 1;
        }
        let start_off = first * g;
        let end_off = (end * g).min(self.size);
        let len = end_off - start_off;
        let Inner { buf, target, .. } = inner;
        let Some(target) = target.as_ref() else { return Err("the job has ended".into()) };
        let buf = usize::try_from(len).ok().and_then(|n| buf.get_mut(..n)).ok_or("copy buffer too small")?;
        disk.read_at(start_off, buf).map_err(|e| format!("reading the disk at offset {start_off}: {e}"))?;
        // Write runs of blocks with data; leave zero blocks as holes.
        let mut data: Option<(usize, usize)> = None;
        let mut pos = 0usize;
        let g_len = usize::try_from(g).map_err(|_| "block size")?;
        let flush = |from: usize, to: usize| -> Result<(), String> {
            let off = start_off + from as u64;
            let bytes = buf.get(from..to).ok_or("copy buffer")?;
            target
                .write_all_at(bytes, off)
                .map_err(|e| format!("writing {} at offset {off}: {e}", self.target_path.display()))
        };
        for chunk in buf.chunks(g_len) {
            let next = pos + chunk.len();
            if is_zero(chunk) {
                if let Some((a, b)) = data.take() {
                    flush(a, b)?;
                }
            } else {
                data = Some(data.map_or((pos, next), |(a, _)| (a, next)));
            }
            pos = next;
        }
        if let Some((a, b)) = data {
            flush(a, b)?;
        }
        for b in first..end {
            inner.set_copied(b);
        }
        self.bytes_copied.fetch_add(len, Ordering::Relaxed);
        Ok((end, len))
    }

    /// Copy-before-write for a guest write of `len` bytes at `offset` (already checked
    /// against the disk size): copies the blocks it touches that are not yet copied. Never
    /// fails: an error fails the job instead. Called by [`DiskImage`] with the image borrowed,
    /// under whatever lock serialises the image's users.
    pub(crate) fn before_write(&self, disk: &DiskImage, offset: u64, len: u64) {
        if len == 0 || !self.is_running() {
            return;
        }
        let g = self.granularity;
        let first = offset / g;
        let last = (offset.saturating_add(len - 1) / g).min(self.blocks.saturating_sub(1));
        let mut inner = lock(&self.inner);
        let mut b = first;
        while b <= last {
            if inner.is_copied(b) {
                b += 1;
                continue;
            }
            match self.copy_run(&mut inner, disk, b, last + 1) {
                Ok((next, bytes)) => {
                    self.bytes_before_write.fetch_add(bytes, Ordering::Relaxed);
                    b = next;
                }
                Err(e) => {
                    drop(inner);
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// One step of the copier: copies the next run of blocks not yet copied. Called with the
    /// image's lock held (the image the job is attached to).
    fn copy_next(&self, disk: &DiskImage) -> Step {
        if !self.is_running() {
            return Step::Stopped;
        }
        let mut inner = lock(&self.inner);
        let Some(first) = inner.next_uncopied(inner.cursor, self.blocks) else {
            inner.cursor = self.blocks;
            return Step::Complete;
        };
        match self.copy_run(&mut inner, disk, first, self.blocks) {
            Ok((next, bytes)) => {
                inner.cursor = next;
                Step::Copied(bytes)
            }
            Err(e) => {
                drop(inner);
                self.fail(e);
                Step::Stopped
            }
        }
    }

    /// Ends a job whose copier found every block copied (and that is detached from its
    /// image): extends the target to the disk size, `fsync`s it and closes it, then reports
    /// `Done` (or `Failed`). A job that ended meanwhile (cancelled) keeps its state.
    fn finish(&self) {
        let target = {
            let mut inner = lock(&self.inner);
            if inner.cursor < self.blocks {
                return;
            }
            inner.target.take()
        };
        let Some(target) = target else { return };
        let synced = target.set_len(self.size).and_then(|()| target.sync_all());
        drop(target);
        match synced {
            Ok(()) => {
                if self.end(JobState::Done) {
                    tracing::info!("backup to {}: done ({} bytes)", self.target_path.display(), self.size);
                }
            }
            Err(e) => self.fail(format!("syncing {}: {e}", self.target_path.display())),
        }
    }

    /// Closes the target of a job that ended without finishing.
    fn close(&self) {
        drop(lock(&self.inner).target.take());
    }
}

/// The thread that copies a job's blocks ([`Copier::spawn`]). Dropping it cancels the job
/// (unless it ended) and waits for the thread, which never takes longer than one run of
/// blocks.
#[derive(Debug)]
pub struct Copier {
    job: Arc<BackupJob>,
    thread: Option<JoinHandle<()>>,
}

impl Copier {
    /// Starts copying `job`, attached to the image in `disk`, on a thread of its own. With
    /// `rate` (bytes per second), the copier reads at most that fast (copy-before-write is
    /// never limited).
    ///
    /// Errors: the thread cannot be created; the job is then failed and detached.
    pub fn spawn(job: Arc<BackupJob>, disk: Arc<Mutex<DiskImage>>, rate: Option<u64>) -> io::Result<Copier> {
        let (j, d) = (job.clone(), disk.clone());
        let spawned = std::thread::Builder::new().name("backup-copier".into()).spawn(move || {
            seccomp::apply(seccomp::Role::BackupCopier);
            run(&j, &d, rate)
        });
        match spawned {
            Ok(thread) => Ok(Copier { job, thread: Some(thread) }),
            Err(e) => {
                job.fail(format!("cannot start the copier thread: {e}"));
                lock(&disk).detach_backup(&job);
                job.close();
                Err(e)
            }
        }
    }

    /// The job.
    pub fn job(&self) -> &Arc<BackupJob> {
        &self.job
    }

    /// Waits for the thread to end (without cancelling).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.job.cancel();
            let _ = t.join();
        }
    }
}

/// The copier's loop.
fn run(job: &BackupJob, disk: &Mutex<DiskImage>, rate: Option<u64>) {
    let started = Instant::now();
    let mut read = 0u64;
    let complete = loop {
        let step = job.copy_next(&lock(disk));
        match step {
            Step::Copied(n) => {
                read += n;
                if let Some(rate) = rate.filter(|r| *r > 0) {
                    let due = Duration::from_secs_f64(read as f64 / rate as f64);
                    let wait = due.saturating_sub(started.elapsed());
                    if !wait.is_zero() && job.wait(wait) != JobState::Running {
                        break false;
                    }
                }
            }
            Step::Complete => break true,
            Step::Stopped => break false,
        }
    };
    // No guest write copies anything from here on.
    lock(disk).detach_backup(job);
    if complete {
        job.finish();
    } else {
        job.close();
    }
}

#[cfg(test)]
// Test fixtures: offsets and lengths are small; byte patterns wrap on purpose.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;
    use crate::{create_qcow2, Format};
    use std::os::unix::fs::MetadataExt;

    /// xorshift64*, for reproducible "guest" workloads.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut r = Rng(seed | 1);
        (0..len).map(|_| r.next() as u8).collect()
    }

    /// A disk's whole content.
    fn content(disk: &DiskImage) -> Vec<u8> {
        let mut v = vec![0u8; disk.size() as usize];
        disk.read_at(0, &mut v).unwrap();
        v
    }

    fn target(dir: &TempDir, name: &str) -> (PathBuf, File) {
        let p = dir.join(name);
        let f = File::options().read(true).write(true).create_new(true).open(&p).unwrap();
        (p, f)
    }

    /// A raw disk of `size` bytes: random data, with zeros in `[size/4, size/4 + 1 MiB)` and
    /// in the last MiB (holes on the host too).
    fn raw_disk(dir: &TempDir, size: usize, seed: u64) -> DiskImage {
        let p = dir.join("disk.raw");
        let mut data = pattern(size, seed);
        data[size / 4..size / 4 + (1 << 20)].fill(0);
        let n = data.len();
        data[n - (1 << 20)..].fill(0);
        std::fs::write(&p, &data).unwrap();
        let mut d = DiskImage::open(&p, Format::Raw, false).unwrap();
        d.discard((size / 4) as u64, 1 << 20).unwrap();
        d.discard((size - (1 << 20)) as u64, 1 << 20).unwrap();
        d
    }

    /// Attaches a job to `disk` and runs a copier at `rate` bytes/s while another thread makes
    /// random writes, discards and write-zeroes until the job ends; checks the export is the
    /// disk as it was at attach time and the disk has every write. Returns the final status.
    fn race(dir: &TempDir, disk: DiskImage, rate: u64, seed: u64) -> JobStatus {
        let size = disk.size();
        let at_attach = content(&disk);
        let (tp, tf) = target(dir, "export.raw");
        let job = BackupJob::new(size, tf, &tp).unwrap();
        let disk = Arc::new(Mutex::new(disk));
        lock(&disk).attach_backup(job.clone()).unwrap();
        let copier = Copier::spawn(job.clone(), disk.clone(), Some(rate)).unwrap();
        let writer = {
            let (disk, job, mut model) = (disk.clone(), job.clone(), at_attach.clone());
            std::thread::spawn(move || {
                let mut r = Rng(seed);
                let mut ops = 0u64;
                while job.is_running() || ops < 50 {
                    let off = r.below(size / 512) * 512;
                    let len = ((1 + r.below(400)) * 512).min(size - off);
                    let mut d = lock(&disk);
                    match r.below(8) {
                        0 => {
                            d.discard(off, len).unwrap();
                            model[off as usize..(off + len) as usize].fill(0);
                        }
                        1 => {
                            d.write_zeroes(off, len).unwrap();
                            model[off as usize..(off + len) as usize].fill(0);
                        }
                        _ => {
                            let data = pattern(len as usize, r.next());
                            d.write_at(off, &data).unwrap();
                            model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        }
                    }
                    drop(d);
                    ops += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                (model, ops)
            })
        };
        assert_eq!(job.wait(Duration::from_secs(60)), JobState::Done);
        copier.join();
        let (model, ops) = writer.join().unwrap();
        let status = job.status();
        assert!(lock(&disk).backup().is_none(), "a finished job is detached");
        let export = std::fs::read(&tp).unwrap();
        assert_eq!(export.len() as u64, size, "the export has the disk's size");
        assert!(export == at_attach, "the export differs from the disk at attach time");
        assert!(content(&lock(&disk)) == model, "the disk lost a write ({ops} operations)");
        assert_eq!(status.bytes_copied, size);
        eprintln!("{ops} guest operations during the copy; {} bytes copied before writes", status.bytes_before_write);
        status
    }

    #[test]
    fn raw_export_is_the_disk_at_attach_time_while_the_guest_writes() {
        let dir = TempDir::new();
        // 8 MiB plus a partial last block.
        let disk = raw_disk(&dir, (8 << 20) + 4096 + 512, 7);
        let status = race(&dir, disk, 16 << 20, 11);
        assert!(status.bytes_before_write > 0, "guest writes ran ahead of the copier");
        // The zero ranges (2 MiB of the disk) stayed holes in the export.
        let md = std::fs::metadata(dir.join("export.raw")).unwrap();
        assert!(
            md.blocks() * 512 <= md.len() - (2 << 20) + (128 << 10),
            "export allocates {} bytes",
            md.blocks() * 512
        );
    }

    #[test]
    fn qcow2_with_backing_exports_to_raw() {
        let dir = TempDir::new();
        let base = dir.join("base.raw");
        let mut data = pattern(4 << 20, 3);
        data[1 << 20..2 << 20].fill(0);
        std::fs::write(&base, &data).unwrap();
        let top = dir.join("top.qcow2");
        create_qcow2(&top, 4 << 20, Some(("base.raw", Format::Raw))).unwrap();
        let disk = DiskImage::open(&top, Format::Qcow2, false).unwrap();
        disk.write_at(100_000, &pattern(300_000, 5)).unwrap();
        disk.write_at((3 << 20) + 512, &[0u8; 8192]).unwrap();
        let status = race(&dir, disk, 8 << 20, 13);
        assert_eq!(status.bytes_total, 4 << 20);
    }

    #[test]
    fn unlimited_copier_and_empty_disk() {
        let dir = TempDir::new();
        let disk = raw_disk(&dir, 4 << 20, 9);
        let expected = content(&disk);
        let (tp, tf) = target(&dir, "export.raw");
        let job = BackupJob::new(disk.size(), tf, &tp).unwrap();
        let disk = Arc::new(Mutex::new(disk));
        lock(&disk).attach_backup(job.clone()).unwrap();
        Copier::spawn(job.clone(), disk, None).unwrap().join();
        assert_eq!(job.status().state, JobState::Done);
        assert!(std::fs::read(&tp).unwrap() == expected);

        // A zero-sized disk is done at once.
        let p = dir.join("empty.raw");
        File::create(&p).unwrap();
        let mut d = DiskImage::open(&p, Format::Raw, false).unwrap();
        let (tp, tf) = target(&dir, "empty-export.raw");
        let job = BackupJob::new(0, tf, &tp).unwrap();
        d.attach_backup(job.clone()).unwrap();
        Copier::spawn(job.clone(), Arc::new(Mutex::new(d)), None).unwrap().join();
        assert_eq!(
            job.status(),
            JobStatus { bytes_total: 0, bytes_copied: 0, bytes_before_write: 0, state: JobState::Done }
        );
        assert_eq!(std::fs::metadata(&tp).unwrap().len(), 0);
    }

    #[test]
    fn a_failing_target_fails_the_job_not_the_writes() {
        let dir = TempDir::new();
        let mut disk = raw_disk(&dir, 2 << 20, 21);
        let full = || File::options().write(true).open("/dev/full").unwrap();
        // Copy-before-write hits ENOSPC: the write still happens.
        let job = BackupJob::new(disk.size(), full(), "/dev/full").unwrap();
        disk.attach_backup(job.clone()).unwrap();
        disk.write_at(4096, &[0x5a; 4096]).unwrap();
        match job.status().state {
            JobState::Failed(reason) => assert!(reason.contains("/dev/full") && reason.contains("space"), "{reason}"),
            s => panic!("{s:?}"),
        }
        disk.discard(0, 65536).unwrap();
        disk.write_zeroes(65536, 65536).unwrap();
        disk.write_at(200_000, &[1; 512]).unwrap();
        let mut back = [0u8; 512];
        disk.read_at(200_000, &mut back).unwrap();
        assert_eq!(back, [1; 512]);
        // The copier of a failed job stops at once and detaches it.
        let disk = Arc::new(Mutex::new(disk));
        Copier::spawn(job.clone(), disk.clone(), None).unwrap().join();
        assert!(lock(&disk).backup().is_none());

        // The copier hits ENOSPC: failed, detached, and the guest goes on.
        let job = BackupJob::new(2 << 20, full(), "/dev/full").unwrap();
        lock(&disk).attach_backup(job.clone()).unwrap();
        Copier::spawn(job.clone(), disk.clone(), None).unwrap().join();
        assert!(matches!(job.status().state, JobState::Failed(_)), "{:?}", job.status());
        assert!(lock(&disk).backup().is_none());
        lock(&disk).write_at(0, &[2; 512]).unwrap();
    }

    #[test]
    fn cancel_stops_the_copier_promptly() {
        let dir = TempDir::new();
        let disk = raw_disk(&dir, 8 << 20, 31);
        let (tp, tf) = target(&dir, "export.raw");
        let job = BackupJob::new(disk.size(), tf, &tp).unwrap();
        let disk = Arc::new(Mutex::new(disk));
        lock(&disk).attach_backup(job.clone()).unwrap();
        // 1 MiB/s: eight seconds of copying.
        let copier = Copier::spawn(job.clone(), disk.clone(), Some(1 << 20)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(job.is_running());
        assert!(job.cancel());
        assert!(!job.cancel(), "only once");
        let t = Instant::now();
        copier.join();
        assert!(t.elapsed() < Duration::from_secs(1), "copier took {:?} to stop", t.elapsed());
        let s = job.status();
        assert_eq!(s.state, JobState::Cancelled);
        assert!(s.bytes_copied < s.bytes_total, "{s:?}");
        assert!(lock(&disk).backup().is_none());
        // Writes after the cancel copy nothing.
        lock(&disk).write_at(7 << 20, &[3; 512]).unwrap();
        assert_eq!(job.status().bytes_copied, s.bytes_copied);

        // Dropping the copier cancels too.
        let (tp, tf) = target(&dir, "export2.raw");
        let job = BackupJob::new(8 << 20, tf, &tp).unwrap();
        lock(&disk).attach_backup(job.clone()).unwrap();
        drop(Copier::spawn(job.clone(), disk.clone(), Some(1 << 20)).unwrap());
        assert_eq!(job.status().state, JobState::Cancelled);
        assert!(lock(&disk).backup().is_none());
    }

    #[test]
    fn attach_checks_size_and_busy() {
        let dir = TempDir::new();
        let mut disk = raw_disk(&dir, 2 << 20, 41);
        let (tp, tf) = target(&dir, "a.raw");
        let e = disk.attach_backup(BackupJob::new(1 << 20, tf, &tp).unwrap()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let (tp, tf) = target(&dir, "b.raw");
        let first = BackupJob::new(2 << 20, tf, &tp).unwrap();
        disk.attach_backup(first.clone()).unwrap();
        let (tp, tf) = target(&dir, "c.raw");
        let second = BackupJob::new(2 << 20, tf, &tp).unwrap();
        assert_eq!(disk.attach_backup(second.clone()).unwrap_err().kind(), io::ErrorKind::ResourceBusy);
        // An ended job still attached is replaced.
        first.cancel();
        disk.attach_backup(second.clone()).unwrap();
        assert!(Arc::ptr_eq(disk.backup().unwrap(), &second));
        disk.detach_backup(&first);
        assert!(disk.backup().is_some(), "detaching another job does nothing");
        disk.detach_backup(&second);
        assert!(disk.backup().is_none());
    }

    #[test]
    fn granularity_bounds_the_bitmap() {
        assert_eq!(granularity_for(0), Some(GRANULARITY));
        assert_eq!(granularity_for(512 << 20), Some(GRANULARITY));
        assert_eq!(granularity_for(4 << 40), Some(GRANULARITY));
        assert_eq!(granularity_for((4 << 40) + 1), Some(2 * GRANULARITY));
        assert_eq!(granularity_for(4 << 50), Some(MAX_GRANULARITY));
        assert_eq!(granularity_for((4 << 50) + 1), None);
        assert_eq!(granularity_for(u64::MAX), None);
        let e = BackupJob::new(u64::MAX, File::open("/dev/null").unwrap(), "/dev/null").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // A 1 PiB disk (as a hostile qcow2 header may claim): an 8 MiB bitmap, a 16 MiB buffer.
        let job = BackupJob::new(1 << 50, File::open("/dev/null").unwrap(), "/dev/null").unwrap();
        assert_eq!(job.granularity(), 16 << 20);
    }

    #[test]
    fn bitmap_search() {
        let mut inner = Inner { copied: vec![0; 3], target: None, buf: Vec::new(), cursor: 0 };
        assert_eq!(inner.next_uncopied(0, 150), Some(0));
        for b in 0..70 {
            inner.set_copied(b);
        }
        inner.set_copied(71);
        assert_eq!(inner.next_uncopied(0, 150), Some(70));
        assert_eq!(inner.next_uncopied(71, 150), Some(72));
        for b in 72..150 {
            inner.set_copied(b);
        }
        inner.set_copied(70);
        assert_eq!(inner.next_uncopied(0, 150), None);
        assert!(inner.is_copied(149) && inner.is_copied(10_000), "beyond the bitmap counts as copied");
        assert!(is_zero(&[0; 4097]) && !is_zero(&[0, 0, 1]) && is_zero(&[]));
    }
}
