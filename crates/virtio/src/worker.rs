//! A device's worker thread: an epoll loop over the queues' kick eventfds and whatever host
//! file descriptors the device adds (TAP, Unix sockets), serving a [`Handler`].
//!
//! Each device has one [`Worker`], whose thread starts when the device is made (on the thread
//! that builds the VM, not on the vCPU thread whose `DRIVER_OK` first activates it: a thread
//! inherits its starter's seccomp filter, and a vCPU's allows no thread creation; see the
//! `seccomp` crate) and is kept until the device is dropped: a driver reset, a `DRIVER_OK` or
//! a snapshot quiesce hands the thread a command (through a channel, with an eventfd to wake
//! it) instead of creating or joining a thread, so a guest looping reset → `DRIVER_OK` costs
//! no thread creation. The commands are
//!
//! - *activate*: drop the handler in service (if any), then serve a new one with new kick
//!   eventfds (on a fresh epoll set, so nothing the old handler registered lingers);
//! - *reset*: drop the handler in service once the call it is in returns; reset and quiesce
//!   (virtio 1.2 §2.4, a snapshot) are both this, and resuming is an activation (see
//!   [`crate::pci::VirtioPci::quiesce`]);
//! - *exit*: end the thread (dropping the [`Worker`]).
//!
//! [`Worker::reset`] never waits: it returns a [`Completion`] that the transport polls, so a
//! worker stuck in a slow host operation (a multi-second `fsync` for a virtio-blk FLUSH) never
//! stalls the vCPU that reset the device. When the worker is idle the handler is dropped at
//! once and the completion is already done.
//!
//! Tokens: queue `i`'s kick is token `i`; the device picks its own tokens from
//! [`FIRST_DEVICE_TOKEN`] up.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// First epoll token a device may use for its own file descriptors.
pub const FIRST_DEVICE_TOKEN: u64 = 1 << 32;
/// The command eventfd's token.
const WAKE_TOKEN: u64 = u64::MAX;
/// Longest a dropped [`Worker`] waits for its thread to end before leaving it behind.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

thread_local! {
    static SPAWNED: Cell<u64> = const { Cell::new(0) };
    /// [`inline::enable`] was called on this thread.
    static INLINE: Cell<bool> = const { Cell::new(false) };
    /// The activations served inline on this thread (see [`inline`]).
    static INLINE_SLOTS: std::cell::RefCell<Vec<std::sync::Weak<dyn inline::Poll>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Worker threads started by calls made on the calling thread (a vCPU, a test): a count that
/// other threads cannot disturb, for checking that reset/activate cycles start none.
pub fn spawned_on_this_thread() -> u64 {
    SPAWNED.with(Cell::get)
}

/// Adds and removes a device's own file descriptors on the worker's epoll set.
pub struct EpollCtl<'a> {
    epoll: &'a Epoll,
}

impl EpollCtl<'_> {
    /// Watches `fd` for `events`, reporting them with `token` (≥ [`FIRST_DEVICE_TOKEN`]).
    ///
    /// Errors: `epoll_ctl(2)`'s (e.g. `EEXIST` when `fd` is already watched).
    pub fn add(&self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }
    /// Changes the events watched on `fd`.
    ///
    /// Errors: `epoll_ctl(2)`'s (e.g. `ENOENT` when `fd` is not watched).
    pub fn modify(&self, fd: RawFd, events: EventSet, token: u64) -> io::Result<()> {
        self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }
    /// Stops watching `fd`.
    ///
    /// Errors: `epoll_ctl(2)`'s (e.g. `ENOENT` when `fd` is not watched).
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// The device side of a worker: the state of one activation (queues, host connections).
/// Dropping it ends the activation; it is dropped on the worker thread, or on the thread that
/// resets the device when the worker is idle.
pub trait Handler: Send + 'static {
    /// Called on the worker thread when the activation starts, before any event: register
    /// host fds here (on an epoll set of this activation's own, so nothing needs removing at
    /// the end). An error ends the activation (it is logged).
    fn init(&mut self, _ctl: &EpollCtl) -> io::Result<()> {
        Ok(())
    }
    /// The driver kicked queue `queue` (its eventfd is already drained).
    fn queue_event(&mut self, queue: usize, ctl: &EpollCtl);
    /// A device fd registered with `token` is ready with `events`.
    fn fd_event(&mut self, _token: u64, _events: EventSet, _ctl: &EpollCtl) {}
}

/// How many commands the worker thread has carried out; `u64::MAX` once it has ended.
#[derive(Default)]
struct Progress {
    done: AtomicU64,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Progress {
    fn set(&self, update: impl FnOnce(&AtomicU64)) {
        update(&self.done);
        // Taking the lock orders this store before any waiter's check-then-wait.
        drop(lock(&self.lock));
        self.cv.notify_all();
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tells when a command given to a [`Worker`] (a reset) has been carried out. Cheap to poll.
#[must_use = "a reset is complete only once its Completion is"]
pub struct Completion {
    /// `None`: complete from the start.
    progress: Option<Arc<Progress>>,
    seq: u64,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion").field("seq", &self.seq).field("done", &self.is_done()).finish()
    }
}

impl Completion {
    /// A completion that is already done (a device with no worker, or an idle one).
    pub fn done() -> Completion {
        Completion { progress: None, seq: 0 }
    }

    /// Whether the command has been carried out (or the worker thread has ended). Never
    /// blocks: an atomic load.
    pub fn is_done(&self) -> bool {
        self.progress.as_ref().is_none_or(|p| p.done.load(Ordering::Acquire) >= self.seq)
    }

    /// Waits up to `timeout` for the command to be carried out; returns whether it was. A
    /// timeout too large to represent waits as long as it takes.
    pub fn wait(&self, timeout: Duration) -> bool {
        let Some(p) = &self.progress else { return true };
        let deadline = Instant::now().checked_add(timeout);
        let mut g = lock(&p.lock);
        loop {
            if self.is_done() {
                return true;
            }
            g = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    p.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0
                }
                None => p.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// A command for the worker thread.
enum Command<H> {
    /// Serve `handler` with `queue_evts[i]` as queue `i`'s kick.
    Activate { queue_evts: Vec<EventFd>, handler: H },
    /// Drop the handler in service.
    Reset,
    /// End the thread.
    Exit,
}

/// One activation on the worker thread.
struct Active<H> {
    handler: H,
    queue_evts: Vec<EventFd>,
    /// Shared so that the thread can wait on it without holding the slot's lock.
    epoll: Arc<Epoll>,
}

impl<H: Handler> Active<H> {
    /// Hands one epoll event (a queue kick or a device fd's readiness) to the handler.
    fn dispatch(&mut self, token: u64, events: EventSet) {
        if token < FIRST_DEVICE_TOKEN {
            let Ok(q) = usize::try_from(token) else { return };
            if let Some(e) = self.queue_evts.get(q) {
                let _ = e.read();
                self.handler.queue_event(q, &EpollCtl { epoll: &self.epoll });
            }
        } else {
            self.handler.fd_event(token, events, &EpollCtl { epoll: &self.epoll });
        }
    }
}

/// What the thread serves, shared with the [`Worker`] so that an idle thread's handler can be
/// dropped without waiting for it. The thread holds the lock while it runs the handler.
struct Slot<H> {
    active: Option<Active<H>>,
    /// Bumped when `active` changes: events taken from an older epoll set are stale.
    generation: u64,
}

/// The thread and its command channel.
struct Thread<H> {
    commands: Sender<Command<H>>,
    wake: EventFd,
    slot: Arc<Mutex<Slot<H>>>,
    progress: Arc<Progress>,
    /// Commands sent so far.
    issued: u64,
    handle: Option<JoinHandle<()>>,
}

impl<H> Thread<H> {
    fn send(&mut self, c: Command<H>) -> io::Result<()> {
        self.commands.send(c).map_err(|_| io::Error::other("the worker thread has ended"))?;
        self.issued += 1;
        self.wake.write(1)
    }
}

/// A device's persistent worker thread (see the module documentation). The thread starts on
/// the first [`Worker::activate`]; dropping the `Worker` ends it.
pub struct Worker<H: Handler> {
    name: String,
    thread: Option<Thread<H>>,
    /// Inline mode ([`inline`]): the activation, served on the thread that calls
    /// [`inline::run`] instead of a worker thread.
    inline: Option<Arc<Mutex<Slot<H>>>>,
    /// A handler was handed over and not reset since.
    active: bool,
    /// How long [`Worker::shutdown`] waits for the thread ([`EXIT_TIMEOUT`]).
    exit_timeout: Duration,
}

impl<H: Handler> Worker<H> {
    /// A worker whose thread, named `name`, starts now; if it cannot (out of threads), the
    /// first activation tries again and reports the error.
    pub fn new(name: &str) -> Worker<H> {
        let mut w =
            Worker { name: name.to_string(), thread: None, inline: None, active: false, exit_timeout: EXIT_TIMEOUT };
        // In inline mode (fuzzing) the device is served on the calling thread: no thread.
        if !INLINE.with(Cell::get) {
            if let Err(e) = w.start() {
                tracing::warn!("{name}: cannot start the worker thread yet: {e}");
            }
        }
        w
    }

    /// Whether a handler was handed over and not reset since.
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn start(&mut self) -> io::Result<&mut Thread<H>> {
        if self.thread.is_none() {
            let wake = EventFd::new(EFD_NONBLOCK)?;
            let idle = Epoll::new()?;
            idle.ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, WAKE_TOKEN))?;
            let (commands, rx) = mpsc::channel();
            let slot = Arc::new(Mutex::new(Slot { active: None, generation: 0 }));
            let progress = Arc::new(Progress::default());
            let run = Run {
                name: self.name.clone(),
                commands: rx,
                wake: wake.try_clone()?,
                idle: Arc::new(idle),
                slot: slot.clone(),
                progress: progress.clone(),
            };
            let handle = std::thread::Builder::new().name(self.name.clone()).spawn(move || {
                seccomp::apply(seccomp::Role::VirtioWorker);
                run.run()
            })?;
            SPAWNED.with(|c| c.set(c.get() + 1));
            self.thread = Some(Thread { commands, wake, slot, progress, issued: 0, handle: Some(handle) });
        }
        self.thread.as_mut().ok_or_else(|| io::Error::other("no worker thread"))
    }

    /// Has the thread (started now if [`Worker::new`] could not) serve `handler`, with
    /// `queue_evts[i]` as queue `i`'s kick, once it has dropped the handler in service.
    /// Returns without waiting; [`Handler::init`] runs on the thread.
    ///
    /// Errors: the thread, its epoll set or its eventfd could not be created, or the thread
    /// has ended (its epoll set failed).
    pub fn activate(&mut self, queue_evts: Vec<EventFd>, handler: H) -> io::Result<()> {
        if self.inline.is_some() || INLINE.with(Cell::get) {
            return self.activate_inline(queue_evts, handler);
        }
        let t = self.start()?;
        t.send(Command::Activate { queue_evts, handler })?;
        self.active = true;
        Ok(())
    }

    /// [`Worker::activate`] in inline mode: the handler is initialised here, on the calling
    /// thread, and served by [`inline::run`] on this thread.
    fn activate_inline(&mut self, queue_evts: Vec<EventFd>, mut handler: H) -> io::Result<()> {
        let slot = match &self.inline {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(Mutex::new(Slot { active: None, generation: 0 }));
                let weak: std::sync::Weak<dyn inline::Poll> = Arc::downgrade(&s) as std::sync::Weak<Mutex<Slot<H>>>;
                INLINE_SLOTS.with(|v| {
                    let mut v = v.borrow_mut();
                    v.retain(|w| w.strong_count() > 0);
                    v.push(weak);
                });
                self.inline = Some(s.clone());
                s
            }
        };
        let old = lock(&slot).active.take();
        drop(old);
        let epoll = Epoll::new()?;
        for (i, e) in queue_evts.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, e.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64))?;
        }
        handler.init(&EpollCtl { epoll: &epoll })?;
        let mut s = lock(&slot);
        s.generation = s.generation.wrapping_add(1);
        s.active = Some(Active { handler, queue_evts, epoll: Arc::new(epoll) });
        self.active = true;
        Ok(())
    }

    /// Stops serving the handler and drops it; never blocks. When the thread is idle this is
    /// done at once, on the calling thread, and the [`Completion`] is already done; otherwise
    /// the thread is told to, and does so when the handler call it is in returns (the request
    /// in flight completes first).
    pub fn reset(&mut self) -> Completion {
        if let Some(slot) = &self.inline {
            self.active = false;
            let active = lock(slot).active.take();
            drop(active);
            return Completion::done();
        }
        let Some(t) = &mut self.thread else { return Completion::done() };
        if !std::mem::take(&mut self.active) {
            // Nothing to drop; complete once earlier commands are.
            return Completion { progress: Some(t.progress.clone()), seq: t.issued };
        }
        // Idle thread, no command pending: drop the handler here. The thread runs the handler
        // only with the slot locked, and bumps `done` with it locked.
        let taken = match t.slot.try_lock() {
            Ok(mut s) if t.progress.done.load(Ordering::Acquire) >= t.issued => {
                s.generation = s.generation.wrapping_add(1);
                Some(s.active.take())
            }
            _ => None,
        };
        if let Some(active) = taken {
            // Wake the thread so that it leaves the old epoll set.
            let _ = t.wake.write(1);
            drop(active);
            return Completion::done();
        }
        if let Err(e) = t.send(Command::Reset) {
            // The thread has ended (so `done` is u64::MAX): nothing serves the handler.
            tracing::debug!("{}: reset: {e}", self.name);
        }
        Completion { progress: Some(t.progress.clone()), seq: t.issued }
    }

    /// Ends the thread (dropping the handler in service), waiting for it at most
    /// [`EXIT_TIMEOUT`]; a thread that does not end in time (stuck in a host call) is left
    /// to end on its own, with a warning. Done when the `Worker` is dropped.
    pub fn shutdown(&mut self) {
        if let Some(slot) = self.inline.take() {
            self.active = false;
            let active = lock(&slot).active.take();
            drop(active);
        }
        let Some(mut t) = self.thread.take() else { return };
        self.active = false;
        let _ = t.send(Command::Exit);
        let ended = Completion { progress: Some(t.progress.clone()), seq: u64::MAX };
        if ended.wait(self.exit_timeout) {
            if let Some(h) = t.handle.take() {
                let _ = h.join();
            }
        } else {
            tracing::warn!(
                "{}: worker thread still busy after {:?}; leaving it to end on its own",
                self.name,
                self.exit_timeout
            );
        }
    }
}

impl<H: Handler> Drop for Worker<H> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The worker thread's side.
struct Run<H> {
    name: String,
    commands: Receiver<Command<H>>,
    wake: EventFd,
    /// The epoll set waited on while no handler is served (the wake eventfd only).
    idle: Arc<Epoll>,
    slot: Arc<Mutex<Slot<H>>>,
    progress: Arc<Progress>,
}

impl<H: Handler> Run<H> {
    fn run(self) {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let (epoll, generation) = {
                let s = lock(&self.slot);
                (s.active.as_ref().map_or_else(|| self.idle.clone(), |a| a.epoll.clone()), s.generation)
            };
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("{}: epoll_wait: {e}", self.name);
                    break;
                }
            };
            let mut s = lock(&self.slot);
            if s.generation != generation {
                // The handler was dropped while the thread waited: these events are stale.
                continue;
            }
            for ev in events.iter().take(n) {
                match ev.data() {
                    WAKE_TOKEN => {
                        let _ = self.wake.read();
                        if !self.commands(&mut s) {
                            drop(s);
                            self.end();
                            return;
                        }
                        // The handler may have changed: the rest of the events are stale.
                        break;
                    }
                    token => {
                        if let Some(a) = s.active.as_mut() {
                            a.dispatch(token, ev.event_set());
                        }
                    }
                }
            }
        }
        self.end();
    }

    /// Carries out the pending commands; returns false on [`Command::Exit`].
    fn commands(&self, s: &mut Slot<H>) -> bool {
        while let Ok(c) = self.commands.try_recv() {
            s.generation = s.generation.wrapping_add(1);
            // The handler in service goes first, whatever the command.
            s.active = None;
            let go_on = match c {
                Command::Activate { queue_evts, handler } => {
                    match self.serve(queue_evts, handler) {
                        Ok(a) => s.active = Some(a),
                        Err(e) => tracing::error!("{}: starting the device failed: {e}", self.name),
                    }
                    true
                }
                Command::Reset => true,
                Command::Exit => false,
            };
            if !go_on {
                return false;
            }
            self.progress.set(|d| {
                d.fetch_add(1, Ordering::AcqRel);
            });
        }
        true
    }

    /// A new activation: a fresh epoll set with the wake eventfd and the kicks, then the
    /// handler's own fds.
    fn serve(&self, queue_evts: Vec<EventFd>, mut handler: H) -> io::Result<Active<H>> {
        let epoll = Epoll::new()?;
        epoll.ctl(ControlOperation::Add, self.wake.as_raw_fd(), EpollEvent::new(EventSet::IN, WAKE_TOKEN))?;
        for (i, e) in queue_evts.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, e.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64))?;
        }
        handler.init(&EpollCtl { epoll: &epoll })?;
        Ok(Active { handler, queue_evts, epoll: Arc::new(epoll) })
    }

    /// The thread ends: drop the handler and mark every command, past and future, done.
    fn end(&self) {
        let active = lock(&self.slot).active.take();
        drop(active);
        self.progress.set(|d| d.store(u64::MAX, Ordering::Release));
    }
}

/// Inline mode, for fuzzing and deterministic tests: after [`inline::enable`], devices
/// activated on this thread get no worker thread; their handlers are served, on this
/// thread, by [`inline::run`], which hands them every ready event (queue kicks, device fds)
/// without blocking. Not for a running VM.
#[doc(hidden)]
pub mod inline {
    use super::*;

    /// An activation served inline.
    pub trait Poll {
        /// Serves the events ready now (without blocking) once; returns how many there were.
        fn poll_once(&self) -> usize;
    }

    impl<H: Handler> Poll for Mutex<Slot<H>> {
        fn poll_once(&self) -> usize {
            let mut s = lock(self);
            let Some(a) = s.active.as_mut() else { return 0 };
            let mut events = [EpollEvent::default(); 32];
            let n = match a.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(_) => return 0,
            };
            for ev in events.iter().take(n) {
                a.dispatch(ev.data(), ev.event_set());
            }
            n
        }
    }

    /// Devices activated on this thread from now on are served inline (by [`run`]).
    pub fn enable() {
        INLINE.with(|c| c.set(true));
    }

    /// Serves the ready events of every activation made inline on this thread, repeatedly,
    /// until none is ready or `max_rounds` rounds were made; returns the events served.
    pub fn run(max_rounds: usize) -> usize {
        let slots: Vec<_> = INLINE_SLOTS.with(|v| v.borrow().iter().filter_map(std::sync::Weak::upgrade).collect());
        let mut total = 0;
        for _ in 0..max_rounds {
            let n: usize = slots.iter().map(|s| s.poll_once()).sum();
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::SyncSender;

    /// Reports each kick, optionally waiting for a go-ahead first.
    struct Probe {
        kicked: SyncSender<usize>,
        gate: Option<Arc<Mutex<Receiver<()>>>>,
        dropped: Arc<AtomicU64>,
    }
    impl Handler for Probe {
        fn queue_event(&mut self, queue: usize, _ctl: &EpollCtl) {
            let _ = self.kicked.send(queue);
            if let Some(g) = &self.gate {
                let _ = lock(g).recv_timeout(Duration::from_secs(30));
            }
        }
    }
    impl Drop for Probe {
        fn drop(&mut self) {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn one_thread_serves_every_activation() {
        let before = spawned_on_this_thread();
        let mut w: Worker<Probe> = Worker::new("worker-test");
        assert!(w.reset().is_done(), "reset before any activation");
        let dropped = Arc::new(AtomicU64::new(0));
        for i in 0..200u64 {
            let (tx, rx) = mpsc::sync_channel(4);
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            w.activate(vec![kick.try_clone().unwrap()], Probe { kicked: tx, gate: None, dropped: dropped.clone() })
                .unwrap();
            assert!(w.is_active());
            kick.write(1).unwrap();
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 0, "activation {i}");
            let c = w.reset();
            assert!(c.wait(Duration::from_secs(10)));
            assert_eq!(dropped.load(Ordering::SeqCst), i + 1, "the handler is dropped by the reset");
            // A kick after the reset reaches nobody.
            kick.write(1).unwrap();
        }
        assert_eq!(spawned_on_this_thread(), before + 1);
        drop(w);
    }

    #[test]
    fn reset_of_a_busy_worker_completes_when_the_handler_returns() {
        let mut w: Worker<Probe> = Worker::new("worker-test-busy");
        let (go_tx, go_rx) = mpsc::channel();
        let (tx, rx) = mpsc::sync_channel(4);
        let dropped = Arc::new(AtomicU64::new(0));
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let probe = Probe { kicked: tx, gate: Some(Arc::new(Mutex::new(go_rx))), dropped: dropped.clone() };
        w.activate(vec![kick.try_clone().unwrap()], probe).unwrap();
        kick.write(1).unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let t = Instant::now();
        let c = w.reset();
        assert!(t.elapsed() < Duration::from_millis(50), "reset waited for the handler");
        assert!(!c.is_done());
        assert!(!c.wait(Duration::from_millis(50)), "the handler is still running");
        assert_eq!(dropped.load(Ordering::SeqCst), 0);
        go_tx.send(()).unwrap();
        assert!(c.wait(Duration::from_secs(10)));
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        // The worker serves a new activation.
        let (tx, rx) = mpsc::sync_channel(4);
        w.activate(vec![kick.try_clone().unwrap()], Probe { kicked: tx, gate: None, dropped: dropped.clone() })
            .unwrap();
        kick.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 0);
        drop(w);
        assert_eq!(dropped.load(Ordering::SeqCst), 2, "dropping the worker drops its handler");
    }

    #[test]
    fn dropping_a_stuck_worker_is_bounded() {
        let mut w: Worker<Probe> = Worker::new("worker-test-stuck");
        w.exit_timeout = Duration::from_millis(300);
        let (go_tx, go_rx) = mpsc::channel();
        let (tx, rx) = mpsc::sync_channel(4);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let probe = Probe { kicked: tx, gate: Some(Arc::new(Mutex::new(go_rx))), dropped: Arc::default() };
        w.activate(vec![kick.try_clone().unwrap()], probe).unwrap();
        kick.write(1).unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let t = Instant::now();
        drop(w);
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5), "drop took {took:?}");
        go_tx.send(()).unwrap();
    }
}
