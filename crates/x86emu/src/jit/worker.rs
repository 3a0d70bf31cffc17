//! Background compilation for tier [`super::Tier::Auto`]: a compiler thread per vCPU
//! with its own Cranelift module, so that a vCPU never waits for Cranelift. The vCPU
//! keeps interpreting a hot block until its code arrives ([`Worker::poll`]) and is
//! installed in the decode cache (if the block is still there, unchanged).
//!
//! Code memory belongs to the thread's module; the vCPU frees it by moving its epoch on
//! and sending [`Worker::flush`] (code of an older epoch is never entered again, and
//! results of an older epoch are dropped unseen). At most [`QUEUE`] compilations are in
//! flight, so a guest cannot grow the queues.

use super::translate;
use super::BlockAt;
use crate::decode::{JitFn, Op};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender, TrySendError};
use std::thread::JoinHandle;

/// Compilations a vCPU may have in flight.
pub(crate) const QUEUE: usize = 64;

/// A block to compile.
pub(crate) struct Job {
    /// Its instructions (copies: the decode cache may drop them meanwhile).
    pub(crate) ops: Box<[Op]>,
    pub(crate) env: translate::Env,
    /// The vCPU's epoch when it asked.
    pub(crate) epoch: u32,
    pub(crate) at: BlockAt,
    /// RIP of its first instruction.
    pub(crate) rip: u64,
    /// How long the block took to become hot, in thousands of instructions the vCPU
    /// retired: the queue compiles the lowest first.
    pub(crate) age: u32,
}

/// A compiled block (or a refusal) for the vCPU to install.
pub(crate) struct Done {
    /// The entry and code size in bytes; None if Cranelift refused the block.
    pub(crate) code: Option<(JitFn, usize)>,
    pub(crate) epoch: u32,
    pub(crate) at: BlockAt,
    pub(crate) rip: u64,
    /// Instructions in the block.
    pub(crate) len: u32,
    /// The privilege its accesses check.
    pub(crate) user: bool,
    /// Host time the compilation took, nanoseconds.
    pub(crate) ns: u64,
}

enum Msg {
    Compile(Box<Job>),
    /// Free every code byte compiled so far (the vCPU moved its epoch on).
    Flush,
}

/// The vCPU's side of its compiler thread.
pub(crate) struct Worker {
    tx: Option<SyncSender<Msg>>,
    rx: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    /// Jobs sent and not yet polled back.
    pub(crate) in_flight: usize,
}

impl Worker {
    /// Starts the compiler thread; None if the host refuses a thread.
    pub(crate) fn start() -> Option<Worker> {
        // One more slot than QUEUE for a Flush message.
        let (tx, jobs) = sync_channel(QUEUE + 1);
        let (done, rx) = channel();
        let thread = std::thread::Builder::new().name("emu-jit".into()).spawn(move || compiler(jobs, done)).ok()?;
        Some(Worker { tx: Some(tx), rx, thread: Some(thread), in_flight: 0 })
    }

    /// Queues `job`; false when [`QUEUE`] jobs are in flight or the thread is gone.
    pub(crate) fn submit(&mut self, job: Job) -> bool {
        if self.in_flight >= QUEUE {
            return false;
        }
        let Some(tx) = &self.tx else { return false };
        match tx.try_send(Msg::Compile(Box::new(job))) {
            Ok(()) => {
                self.in_flight += 1;
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Asks the thread to free its code memory (after the vCPU moved its epoch on).
    pub(crate) fn flush(&mut self) {
        if let Some(tx) = &self.tx {
            // Blocks only while the queue is full, which the thread is draining.
            let _ = tx.send(Msg::Flush);
        }
    }

    /// A finished compilation, if one is waiting.
    #[inline]
    pub(crate) fn poll(&mut self) -> Option<Done> {
        if self.in_flight == 0 {
            return None;
        }
        let d = self.rx.try_recv().ok()?;
        self.in_flight -= 1;
        Some(d)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it finished the job at hand; it frees
        // its module, whose code no one can run any more (the vCPU is going away).
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Jobs compiled before their code is handed over. One: finalizing costs nothing (the code
/// memory is mapped executable already, see `super::codemem`), so the hottest job waiting
/// is sent back as soon as it is compiled. (With Cranelift's own code memory, each
/// finalization was an `mprotect` and a TLB shootdown, and batches of 16 paid for it.)
const BATCH: usize = 1;

/// The compiler thread: takes every job waiting, compiles up to [`BATCH`] of them, the
/// hottest first (lowest [`Job::age`]: a loop that became hot in a few thousand
/// instructions runs interpreted until its code arrives, while a block that took a billion
/// instructions to get there barely runs), finalizes them together and sends them back;
/// until the queue closes. The others wait for the next round, so a job waits at most
/// until no hotter one is queued; the vCPU keeps at most [`QUEUE`] in flight.
fn compiler(jobs: Receiver<Msg>, done: Sender<Done>) {
    let mut module: Option<super::CodeModule> = None;
    let mut cl_ctx: Option<cranelift_codegen::Context> = None;
    let mut fctx = cranelift_frontend::FunctionBuilderContext::new();
    let mut queued: Vec<Box<Job>> = Vec::new();
    'jobs: loop {
        // Wait while nothing is queued, then take everything waiting.
        let mut msg = if queued.is_empty() { jobs.recv().ok() } else { jobs.try_recv().ok() };
        if msg.is_none() && queued.is_empty() {
            // The queue closed: the vCPU is going away.
            break;
        }
        while let Some(m) = msg.take() {
            match m {
                Msg::Compile(j) => queued.push(j),
                Msg::Flush => {
                    // Every job queued so far belongs to the epoch that ended: answered
                    // without code (the vCPU drops answers of an older epoch unseen).
                    for j in queued.drain(..) {
                        if done.send(refusal(&j)).is_err() {
                            break 'jobs;
                        }
                    }
                    cl_ctx = None;
                    if let Some(m) = module.take() {
                        // SAFETY: the vCPU moved its epoch on before sending Flush, so it
                        // never enters code of this module again (every stored entry, link
                        // and jump-cache entry of it is stale), and it does not run compiled
                        // code while it sends (it sends from its compile path, outside
                        // `enter`).
                        unsafe { m.m.free_memory() };
                    }
                }
            }
            msg = jobs.try_recv().ok();
        }
        if queued.is_empty() {
            continue;
        }
        let batch = hottest(&mut queued, |j| j.age, BATCH);
        if module.is_none() {
            module = super::new_module(super::CODE_LIMIT + super::CODE_HEADROOM);
        }
        let mut defined = Vec::with_capacity(batch.len());
        for j in &batch {
            let t0 = std::time::Instant::now();
            let r = module.as_mut().and_then(|m| {
                let c = cl_ctx.get_or_insert_with(|| cranelift_module::Module::make_context(&m.m));
                translate::compile(&mut m.m, c, &mut fctx, &j.ops, &j.env)
            });
            defined.push((r, t0.elapsed()));
        }
        let t0 = std::time::Instant::now();
        let finalized = module.as_mut().is_some_and(|m| m.m.finalize_definitions().is_ok());
        let fin = t0.elapsed() / u32::try_from(batch.len()).unwrap_or(1);
        for (j, (r, took)) in batch.into_iter().zip(defined) {
            let code = match (finalized, r, module.as_ref()) {
                (true, Some((id, bytes)), Some(m)) => translate::entry(m, id).map(|f| {
                    super::perf_map_note(f.0.as_ptr(), bytes, format_args!("rv-emu block {:#x}", j.rip));
                    (f, bytes)
                }),
                _ => None,
            };
            let d = Done { code, ns: u64::try_from((took + fin).as_nanos()).unwrap_or(u64::MAX), ..refusal(&j) };
            if done.send(d).is_err() {
                break 'jobs;
            }
        }
    }
    if let Some(m) = module.take() {
        // SAFETY: the queue closed: the vCPU (and its Jit) is being dropped and runs no
        // compiled code any more.
        unsafe { m.m.free_memory() };
    }
}

/// Takes the `n` items of lowest `age` out of `queued`, lowest first (of equal ages, the
/// one queued first).
fn hottest<T>(queued: &mut Vec<T>, age: impl Fn(&T) -> u32, n: usize) -> Vec<T> {
    // Stable: arrival order kept among equal ages.
    queued.sort_by_key(|j| age(j));
    queued.drain(..n.min(queued.len())).collect()
}

/// The answer to `j` without code.
fn refusal(j: &Job) -> Done {
    Done {
        code: None,
        epoch: j.epoch,
        at: j.at,
        rip: j.rip,
        len: u32::try_from(j.ops.len()).unwrap_or(u32::MAX),
        user: j.env.user,
        ns: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::hottest;

    #[test]
    fn the_blocks_that_became_hot_fastest_are_compiled_first() {
        // (age, arrival)
        let mut q: Vec<(u32, u32)> = vec![(900, 0), (3, 1), (50, 2), (3, 3), (0, 4), (7000, 5)];
        let b = hottest(&mut q, |j| j.0, 3);
        assert_eq!(b, vec![(0, 4), (3, 1), (3, 3)]);
        let b = hottest(&mut q, |j| j.0, 3);
        assert_eq!(b, vec![(50, 2), (900, 0), (7000, 5)]);
        assert!(q.is_empty());
        assert!(hottest(&mut q, |j| j.0, 3).is_empty());
    }
}
