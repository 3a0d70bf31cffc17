//! The vCPU threads and the VM's run state: an explicit state machine driven by messages.
//!
//! ```text
//!            pause()                 finish(outcome): the guest powered off or reset,
//!  Running ----------> Paused        a vCPU failed, the user quit, the VM is stopped
//!     ^                  |      Running | Paused ----------> Stopping(outcome)
//!     +------------------+                                        | last vCPU thread exits
//!            resume()                                             v
//!                                                           Finished(outcome)
//! ```
//!
//! Each vCPU thread owns its vCPU and a command channel (pause, resume, save, stop): while
//! running it looks at the channel between two [`accel::Vcpu::run`] calls, while paused it
//! blocks on it. The controller sends a command and then stops the vCPU through its
//! [`VcpuStopper`], so a vCPU in guest mode (or waiting in the kernel) returns from `run`
//! and reads the command at once: a pause is answered when every vCPU has parked, with no
//! polling. Devices that end the run (i8042 reset, ACPI power-off) and the console's quit
//! call [`RunControl::finish`] directly; the first outcome wins.

use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use accel::{Vcpu, VcpuExit, VcpuSnapshot, VcpuStopper};

use crate::device_bus::DeviceBus;

/// How a VM run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest powered itself off.
    PowerOff,
    /// The guest asked for a reset (i8042 pulse, reboot) or triple-faulted; the string says which.
    Reset(String),
    /// The user quit from the console escape sequence.
    UserQuit,
}

/// Why the vCPUs stopped the run, or could not be saved.
#[derive(Clone, Debug, thiserror::Error)]
pub enum VcpuError {
    /// The accelerator failed running or saving vCPU `id`.
    #[error("vCPU {id}: {source}")]
    Accel {
        /// The vCPU's index (0 = boot vCPU).
        id: usize,
        /// The accelerator's error (shared: an outcome is handed to every waiter).
        #[source]
        source: Arc<accel::Error>,
    },
    /// A snapshot was asked for while not every vCPU was paused.
    #[error("the vCPUs are not all paused")]
    NotPaused,
    /// vCPU `id`'s thread has exited.
    #[error("vCPU {id}: its thread has exited")]
    ThreadGone {
        /// The vCPU's index.
        id: usize,
    },
    /// vCPU `id` gave no state within `timeout`.
    #[error("vCPU {id}: no state within {timeout:?}")]
    Timeout {
        /// The vCPU's index.
        id: usize,
        /// How long it was given.
        timeout: Duration,
    },
    /// The VMM stopped the run for a reason of its own (`what` says which).
    #[error("{what}")]
    Stopped {
        /// Why.
        what: String,
    },
}

impl PartialEq for VcpuError {
    /// Errors are equal when they are the same kind about the same vCPU; an accelerator
    /// error compares by its message (`accel::Error` is not `PartialEq`).
    fn eq(&self, other: &Self) -> bool {
        use VcpuError::*;
        match (self, other) {
            (Accel { id: a, source: x }, Accel { id: b, source: y }) => a == b && x.to_string() == y.to_string(),
            (NotPaused, NotPaused) => true,
            (ThreadGone { id: a }, ThreadGone { id: b }) => a == b,
            (Timeout { id: a, timeout: x }, Timeout { id: b, timeout: y }) => a == b && x == y,
            (Stopped { what: a }, Stopped { what: b }) => a == b,
            _ => false,
        }
    }
}

impl Eq for VcpuError {}

/// The VM's run state (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    /// The vCPUs run guest code (also the state of a VM whose threads have not started).
    Running,
    /// Every vCPU is parked outside guest mode, its state stable.
    Paused,
    /// The run ended with this outcome (`Err`: a vCPU failed, with why); the vCPU threads
    /// are leaving.
    Stopping(Result<RunOutcome, VcpuError>),
    /// The run ended and every vCPU thread has exited.
    Finished(Result<RunOutcome, VcpuError>),
}

impl RunState {
    /// The outcome, once the run has ended.
    pub fn outcome(&self) -> Option<&Result<RunOutcome, VcpuError>> {
        match self {
            RunState::Stopping(o) | RunState::Finished(o) => Some(o),
            RunState::Running | RunState::Paused => None,
        }
    }
}

/// What a vCPU thread is told.
enum Command {
    /// Park outside guest mode, then answer on the sender (dropping it unanswered means the
    /// thread has exited).
    Pause(Sender<()>),
    /// Run guest code again.
    Resume,
    /// Answer with the vCPU's snapshot (only while parked).
    Save(Sender<Result<VcpuSnapshot, VcpuError>>),
    /// Leave the thread.
    Stop,
}

/// The controller's side of one vCPU thread.
struct VcpuLink {
    commands: Sender<Command>,
    stopper: VcpuStopper,
    /// The vCPU thread's host thread ID (0 until the thread has started).
    tid: Arc<std::sync::atomic::AtomicU32>,
}

/// The run state, and the number of vCPU threads that have not exited.
struct Shared {
    state: RunState,
    threads: usize,
}

/// How the VM's vCPU threads are told to pause, resume and stop, and what state the run is
/// in (see the [module docs](self)).
pub struct RunControl {
    shared: Mutex<Shared>,
    /// Notified on every state change ([`RunControl::wait`]).
    changed: Condvar,
    vcpus: Mutex<Vec<VcpuLink>>,
    /// Run once, by the first [`RunControl::finish`] (see [`RunControl::on_end`]).
    on_end: Mutex<Vec<EndHook>>,
}

/// What [`RunControl::on_end`] runs when the run ends.
pub type EndHook = Box<dyn FnOnce() + Send>;

/// How long [`RunControl::save_vcpus`] waits for each parked vCPU's answer.
const SAVE_TIMEOUT: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RunControl {
    pub(crate) fn new() -> Arc<RunControl> {
        Arc::new(RunControl {
            shared: Mutex::new(Shared { state: RunState::Running, threads: 0 }),
            changed: Condvar::new(),
            vcpus: Mutex::new(Vec::new()),
            on_end: Mutex::new(Vec::new()),
        })
    }

    /// The run state now.
    pub fn state(&self) -> RunState {
        lock(&self.shared).state.clone()
    }

    /// Whether the run has ended (and how).
    pub fn outcome(&self) -> Option<Result<RunOutcome, VcpuError>> {
        lock(&self.shared).state.outcome().cloned()
    }

    /// Waits until the run ends; returns its outcome.
    pub fn wait(&self) -> Result<RunOutcome, VcpuError> {
        let mut s = lock(&self.shared);
        loop {
            if let Some(o) = s.state.outcome() {
                return o.clone();
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Sends `command()` to every vCPU thread, then stops each vCPU so that it reads it.
    fn broadcast(&self, mut command: impl FnMut() -> Command) {
        for link in lock(&self.vcpus).iter() {
            if link.commands.send(command()).is_ok() {
                link.stopper.stop();
            }
        }
    }

    /// Ends the run with `outcome` (the first outcome wins; later calls do nothing) and tells
    /// every vCPU thread to leave. Safe to call from a device inside a vCPU's exit.
    pub fn finish(&self, outcome: Result<RunOutcome, VcpuError>) {
        {
            let mut s = lock(&self.shared);
            if s.state.outcome().is_some() {
                return;
            }
            s.state = if s.threads == 0 { RunState::Finished(outcome) } else { RunState::Stopping(outcome) };
        }
        self.changed.notify_all();
        self.broadcast(|| Command::Stop);
        let hooks = std::mem::take(&mut *lock(&self.on_end));
        for hook in hooks {
            hook();
        }
    }

    /// Runs `hook` once when the run ends ([`RunControl::finish`], on the thread that ends
    /// it, with no lock of this `RunControl` held), or now if it has ended already: how a
    /// thread that waits for other things too learns of the end without polling. The hook
    /// must not block; each call adds one (they are dropped once run).
    pub fn on_end(&self, hook: EndHook) {
        // `finish` sets the outcome before it takes the hooks' lock: a hook pushed while
        // the outcome was not set (under that lock) is taken by its drain, and one that
        // sees the outcome set runs here.
        let mut hooks = lock(&self.on_end);
        if lock(&self.shared).state.outcome().is_none() {
            hooks.push(hook);
            return;
        }
        drop(hooks);
        hook();
    }

    /// Ends the run as the user's quit (console escape).
    pub fn quit(&self) {
        self.finish(Ok(RunOutcome::UserQuit));
    }

    /// Running → Paused: parks every vCPU outside guest mode; returns once all are parked
    /// (a vCPU thread that exits meanwhile counts as parked). Does nothing in another state.
    pub fn pause(&self) {
        {
            let mut s = lock(&self.shared);
            if s.state != RunState::Running {
                return;
            }
            s.state = RunState::Paused;
        }
        self.changed.notify_all();
        let (ack, acks) = mpsc::channel();
        self.broadcast(|| Command::Pause(ack.clone()));
        drop(ack);
        // Ends when every vCPU has answered and dropped its sender, or exited.
        for () in acks.iter() {}
    }

    /// Paused → Running. Does nothing in another state.
    pub fn resume(&self) {
        {
            let mut s = lock(&self.shared);
            if s.state != RunState::Paused {
                return;
            }
            s.state = RunState::Running;
        }
        self.changed.notify_all();
        for link in lock(&self.vcpus).iter() {
            let _ = link.commands.send(Command::Resume);
        }
    }

    /// Makes vCPU threads started from now on begin parked (a restored VM waits for
    /// `vm.resume`): Running → Paused before any thread exists.
    pub(crate) fn pause_before_start(&self) {
        let mut s = lock(&self.shared);
        if s.state == RunState::Running {
            s.state = RunState::Paused;
        }
    }

    /// Asks every parked vCPU for its snapshot, boot vCPU first.
    ///
    /// Errors: the VM is not paused, a vCPU failed to save (naming it), or a vCPU gave no
    /// answer within 10 s.
    pub fn save_vcpus(&self) -> Result<Vec<VcpuSnapshot>, VcpuError> {
        if lock(&self.shared).state != RunState::Paused {
            return Err(VcpuError::NotPaused);
        }
        let mut answers = Vec::new();
        for (id, link) in lock(&self.vcpus).iter().enumerate() {
            let (reply, answer) = mpsc::channel();
            link.commands.send(Command::Save(reply)).map_err(|_| VcpuError::ThreadGone { id })?;
            answers.push(answer);
        }
        answers
            .into_iter()
            .enumerate()
            .map(|(id, answer)| match answer.recv_timeout(SAVE_TIMEOUT) {
                Ok(r) => r,
                Err(_) => Err(VcpuError::Timeout { id, timeout: SAVE_TIMEOUT }),
            })
            .collect()
    }

    /// Starts a thread running `vcpu` (index `id`) with its exits going to `bus`; it begins
    /// parked when the VM is paused. The thread installs `role`'s seccomp filter first.
    ///
    /// Errors: the thread cannot be created.
    pub(crate) fn spawn_vcpu(
        self: &Arc<Self>,
        id: usize,
        vcpu: Box<dyn Vcpu + Send>,
        bus: DeviceBus,
        role: seccomp::Role,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let (commands, inbox) = mpsc::channel();
        let tid = Arc::new(std::sync::atomic::AtomicU32::new(0));
        // The link exists before the thread: commands sent meanwhile wait in the channel.
        lock(&self.vcpus).push(VcpuLink { commands, stopper: vcpu.stopper(), tid: tid.clone() });
        let paused = {
            let mut s = lock(&self.shared);
            s.threads += 1;
            s.state == RunState::Paused
        };
        let ctl = self.clone();
        let spawned = std::thread::Builder::new().name(format!("vcpu{id}")).spawn(move || {
            seccomp::apply(role);
            // SAFETY: gettid(2) has no preconditions.
            let own = unsafe { libc::gettid() };
            tid.store(u32::try_from(own).unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
            ctl.vcpu_thread(id, vcpu, bus, inbox, paused)
        });
        if spawned.is_err() {
            lock(&self.vcpus).pop();
            self.thread_exited();
        }
        spawned
    }

    /// Each vCPU's host thread ID, by vCPU index (0 for a thread not started yet), so a
    /// manager can pin them (`sched_setaffinity`).
    pub(crate) fn vcpu_tids(&self) -> Vec<u32> {
        lock(&self.vcpus).iter().map(|l| l.tid.load(std::sync::atomic::Ordering::Relaxed)).collect()
    }

    /// Counts one vCPU thread out; the last one moves Stopping to Finished.
    fn thread_exited(&self) {
        {
            let mut s = lock(&self.shared);
            s.threads = s.threads.saturating_sub(1);
            if s.threads == 0 {
                if let RunState::Stopping(o) = &s.state {
                    s.state = RunState::Finished(o.clone());
                }
            }
        }
        self.changed.notify_all();
    }

    /// One vCPU thread: runs the vCPU while running, blocks on its commands while parked,
    /// leaves on `Stop` (or when the controller is gone).
    fn vcpu_thread(
        &self,
        id: usize,
        mut vcpu: Box<dyn Vcpu + Send>,
        mut bus: DeviceBus,
        inbox: Receiver<Command>,
        mut paused: bool,
    ) {
        loop {
            let command = if paused {
                match inbox.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                }
            } else {
                match inbox.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            };
            match command {
                Some(Command::Pause(ack)) => {
                    paused = true;
                    let _ = ack.send(());
                }
                Some(Command::Resume) => paused = false,
                Some(Command::Save(reply)) => {
                    let r = if paused {
                        vcpu.save_snapshot().map_err(|e| VcpuError::Accel { id, source: Arc::new(e) })
                    } else {
                        Err(VcpuError::NotPaused)
                    };
                    let _ = reply.send(r);
                }
                Some(Command::Stop) => break,
                None => match vcpu.run(&mut bus) {
                    Ok(VcpuExit::Interrupted) => bus.count_interrupted(),
                    Ok(VcpuExit::Hlt) => {
                        // Only engines without an in-kernel irqchip report it (KVM without
                        // irqchip): wait a little instead of spinning.
                        bus.count_hlt();
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Ok(VcpuExit::Shutdown) => self.finish(Ok(RunOutcome::PowerOff)),
                    Ok(VcpuExit::Reset(why)) => self.finish(Ok(RunOutcome::Reset(why))),
                    Err(e) => self.finish(Err(VcpuError::Accel { id, source: Arc::new(e) })),
                },
            }
        }
        // Answers to commands still queued (a pause's acknowledgement) are dropped with it.
        drop(inbox);
        self.thread_exited();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use accel::{CpuState, ExitHandler};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// A vCPU that "runs" in slices of at most 1 ms until stopped, like the emulator, and
    /// can be told to power off.
    struct FakeVcpu {
        stop: Arc<AtomicBool>,
        runs: Arc<AtomicU64>,
        power_off: Arc<AtomicBool>,
    }

    impl Vcpu for FakeVcpu {
        fn set_state(&mut self, _: &CpuState) -> accel::Result<()> {
            Ok(())
        }
        fn state(&mut self) -> accel::Result<CpuState> {
            Ok(CpuState::default())
        }
        fn run(&mut self, _: &mut dyn ExitHandler) -> accel::Result<VcpuExit> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            for _ in 0..1000 {
                if self.stop.swap(false, Ordering::SeqCst) {
                    return Ok(VcpuExit::Interrupted);
                }
                if self.power_off.load(Ordering::SeqCst) {
                    return Ok(VcpuExit::Shutdown);
                }
                std::thread::sleep(Duration::from_micros(1));
            }
            Ok(VcpuExit::Interrupted)
        }
        fn stopper(&self) -> VcpuStopper {
            VcpuStopper::new(self.stop.clone())
        }
        fn save_snapshot(&mut self) -> accel::Result<VcpuSnapshot> {
            Err(accel::Error::Unsupported("fake".into()))
        }
        fn restore_snapshot(&mut self, _: &VcpuSnapshot) -> accel::Result<()> {
            Ok(())
        }
    }

    fn fake() -> (Box<dyn Vcpu + Send>, Arc<AtomicU64>, Arc<AtomicBool>) {
        let (runs, power_off) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let v = FakeVcpu { stop: Arc::default(), runs: runs.clone(), power_off: power_off.clone() };
        (Box::new(v), runs, power_off)
    }

    #[test]
    fn pause_resume_save_and_the_first_outcome_wins() {
        let ctl = RunControl::new();
        let mut threads = Vec::new();
        let mut runs = Vec::new();
        let mut power = Vec::new();
        for id in 0..3 {
            let (v, r, p) = fake();
            threads.push(ctl.spawn_vcpu(id, v, DeviceBus::detached(), seccomp::Role::VcpuEmu).unwrap());
            runs.push(r);
            power.push(p);
        }
        assert_eq!(ctl.state(), RunState::Running);
        assert_eq!(ctl.save_vcpus().unwrap_err(), VcpuError::NotPaused);
        std::thread::sleep(Duration::from_millis(5));
        ctl.pause();
        assert_eq!(ctl.state(), RunState::Paused);
        // Parked: no vCPU runs any more.
        let before: Vec<u64> = runs.iter().map(|r| r.load(Ordering::SeqCst)).collect();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(before, runs.iter().map(|r| r.load(Ordering::SeqCst)).collect::<Vec<_>>());
        // Every parked vCPU answers a save (here with its error, naming it).
        assert!(ctl.save_vcpus().unwrap_err().to_string().starts_with("vCPU 0: "));
        ctl.pause();
        ctl.resume();
        assert_eq!(ctl.state(), RunState::Running);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !runs.iter().zip(&before).all(|(r, b)| r.load(Ordering::SeqCst) > *b) {
            assert!(std::time::Instant::now() < deadline, "all run again");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The guest powers off on vCPU 1; a later quit changes nothing.
        power[1].store(true, Ordering::SeqCst);
        assert_eq!(ctl.wait(), Ok(RunOutcome::PowerOff));
        ctl.quit();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ctl.state(), RunState::Finished(Ok(RunOutcome::PowerOff)));
        // Nothing left to pause or resume.
        ctl.pause();
        ctl.resume();
        assert_eq!(ctl.outcome(), Some(Ok(RunOutcome::PowerOff)));
    }

    #[test]
    fn threads_started_paused_never_run_until_resumed_and_stop_while_paused() {
        let ctl = RunControl::new();
        ctl.pause_before_start();
        let (v, runs, _) = fake();
        let t = ctl.spawn_vcpu(0, v, DeviceBus::detached(), seccomp::Role::VcpuEmu).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        assert_eq!(ctl.state(), RunState::Paused);
        ctl.finish(Err(VcpuError::Stopped { what: "stopped by test".into() }));
        t.join().unwrap();
        assert_eq!(ctl.state(), RunState::Finished(Err(VcpuError::Stopped { what: "stopped by test".into() })));
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn end_hooks_run_once_at_the_end_or_at_once_after_it() {
        let ctl = RunControl::new();
        let ran = Arc::new(AtomicU64::new(0));
        for _ in 0..2 {
            let r = ran.clone();
            ctl.on_end(Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }));
        }
        assert_eq!(ran.load(Ordering::SeqCst), 0, "not before the end");
        ctl.finish(Ok(RunOutcome::PowerOff));
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        // A later outcome runs nothing again; a hook added after the end runs at once.
        ctl.quit();
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        let r = ran.clone();
        ctl.on_end(Box::new(move || {
            r.fetch_add(10, Ordering::SeqCst);
        }));
        assert_eq!(ran.load(Ordering::SeqCst), 12);
        // A hook racing with the end runs exactly once either way.
        for _ in 0..200 {
            let ctl = RunControl::new();
            let ran = Arc::new(AtomicU64::new(0));
            let t = std::thread::spawn({
                let ctl = ctl.clone();
                move || ctl.finish(Ok(RunOutcome::PowerOff))
            });
            let r = ran.clone();
            ctl.on_end(Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }));
            t.join().unwrap();
            assert_eq!(ran.load(Ordering::SeqCst), 1);
        }
    }
}
