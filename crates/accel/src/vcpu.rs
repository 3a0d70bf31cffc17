//! The vCPU side of the seam: [`Vcpu`], what it hands the VMM ([`ExitHandler`],
//! [`VcpuExit`]), its snapshot ([`VcpuSnapshot`]) and how another thread stops it
//! ([`VcpuStopper`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{emu, kvm, CpuState, Result};

/// What the VMM does with guest port I/O and MMIO accesses that leave the accelerator.
///
/// `data.len()` is the access size in bytes (1, 2, 4 or 8). Reads must fill all of `data`;
/// unclaimed addresses read as all ones, like an empty bus.
pub trait ExitHandler {
    /// `in` from I/O port `port`.
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    /// `out` to I/O port `port`.
    fn pio_write(&mut self, port: u16, data: &[u8]);
    /// Load from a GPA that is not RAM.
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]);
    /// Store to a GPA that is not RAM.
    fn mmio_write(&mut self, gpa: u64, data: &[u8]);
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// The vCPU executed `hlt` (only reported by engines without an in-kernel irqchip, or
    /// with interrupts disabled so that nothing can wake it).
    Hlt,
    /// The guest requested a system reset (triple fault, i8042 pulse reported by the VMM).
    Reset(String),
    /// The guest turned itself off.
    Shutdown,
    /// The run was interrupted from outside (e.g. [`Vcpu::run`] budget used up, a signal,
    /// a [`VcpuStopper`]); call `run` again.
    Interrupted,
}

/// One virtual CPU of either accelerator.
pub trait Vcpu {
    /// Loads the architectural register state (used at boot and restore).
    fn set_state(&mut self, state: &CpuState) -> Result<()>;
    /// Reads back the architectural register state.
    fn state(&mut self) -> Result<CpuState>;
    /// Runs guest code until something the VMM must act on happens. Port I/O and MMIO are
    /// completed through `handler` inside the call.
    fn run(&mut self, handler: &mut dyn ExitHandler) -> Result<VcpuExit>;
    /// A handle that makes [`Vcpu::run`] return [`VcpuExit::Interrupted`] soon, from any
    /// thread (or from inside `handler`).
    fn stopper(&self) -> VcpuStopper;
    /// Everything needed to continue this vCPU elsewhere (a snapshot); call it only while
    /// the vCPU is not running.
    fn save_snapshot(&mut self) -> Result<VcpuSnapshot>;
    /// Loads a state saved by [`Vcpu::save_snapshot`] on the same accelerator.
    ///
    /// Errors: [`crate::Error::Unsupported`] for another accelerator's state, or the state's
    /// own validation error naming the bad field.
    fn restore_snapshot(&mut self, state: &VcpuSnapshot) -> Result<()>;
}

/// A vCPU's snapshot state, per accelerator.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum VcpuSnapshot {
    /// The emulator's CPU.
    Emu(Box<emu::EmuVcpuState>),
    /// A KVM vCPU.
    Kvm(Box<kvm::KvmVcpuState>),
}

/// Stops a vCPU from another thread: sets the flag its [`Vcpu::run`] checks and, for engines
/// that sleep in the kernel (KVM), signals the thread that is inside `run` at that moment so
/// that the `KVM_RUN` ioctl returns; for the emulator, rings the vCPU's [`emu::Wakeup`] so
/// that a vCPU halted in `hlt` stops at once. Cheap to clone; outlives the vCPU harmlessly.
///
/// A stop requested while the thread is between its last flag check and entering the
/// kernel takes effect at the next exit; callers that must know the vCPU stopped wait for
/// `run` to return (and ask again if it does not).
#[derive(Clone)]
pub struct VcpuStopper {
    inner: Arc<StopperInner>,
}

struct StopperInner {
    flag: Arc<AtomicBool>,
    kick: Option<Kick>,
    /// The doorbell a halted emulated vCPU sleeps on.
    wakeup: Option<Arc<emu::Wakeup>>,
}

/// The thread inside `run`, and the signal that interrupts it.
struct Kick {
    signal: libc::c_int,
    running: Mutex<Option<libc::pthread_t>>,
}

impl std::fmt::Debug for VcpuStopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuStopper")
            .field("requested", &self.inner.flag.load(Ordering::Relaxed))
            .field("signal", &self.inner.kick.as_ref().map(|k| k.signal))
            .finish()
    }
}

impl VcpuStopper {
    /// A stopper that only sets `flag` (engines that look at it often enough by themselves,
    /// like the emulator between instruction slices).
    pub fn new(flag: Arc<AtomicBool>) -> VcpuStopper {
        VcpuStopper { inner: Arc::new(StopperInner { flag, kick: None, wakeup: None }) }
    }

    /// A stopper that sets `flag` and then rings `wakeup`, which the vCPU sleeps on while
    /// halted (the emulator).
    pub(crate) fn with_wakeup(flag: Arc<AtomicBool>, wakeup: Arc<emu::Wakeup>) -> VcpuStopper {
        VcpuStopper { inner: Arc::new(StopperInner { flag, kick: None, wakeup: Some(wakeup) }) }
    }

    /// A stopper that sets `flag` and sends `signal` to the thread inside [`Vcpu::run`]
    /// (registered with [`VcpuStopper::enter_run`]). A handler for `signal` must be
    /// installed before the first [`VcpuStopper::stop`] (the default action of a real-time
    /// signal ends the process).
    pub(crate) fn with_signal(flag: Arc<AtomicBool>, signal: libc::c_int) -> VcpuStopper {
        VcpuStopper {
            inner: Arc::new(StopperInner {
                flag,
                kick: Some(Kick { signal, running: Mutex::new(None) }),
                wakeup: None,
            }),
        }
    }

    /// Asks the vCPU to leave [`Vcpu::run`] with [`VcpuExit::Interrupted`].
    pub fn stop(&self) {
        self.inner.flag.store(true, Ordering::SeqCst);
        if let Some(w) = &self.inner.wakeup {
            w.wake();
        }
        if let Some(k) = &self.inner.kick {
            let running = lock(&k.running);
            if let Some(thread) = *running {
                // SAFETY: `thread` is registered only between `enter_run` and the drop of
                // its guard, both on that thread while it is inside `Vcpu::run`, and the
                // guard's drop takes this lock: the thread is alive while we hold it. The
                // signal has a no-op handler (see `with_signal`); it only makes a blocking
                // ioctl return EINTR.
                unsafe { libc::pthread_kill(thread, k.signal) };
            }
        }
    }

    /// Whether a stop was requested and not yet honoured (`run` clears the request when it
    /// returns because of it).
    pub fn requested(&self) -> bool {
        self.inner.flag.load(Ordering::Acquire)
    }

    /// Registers the calling thread as the one running the vCPU until the guard drops.
    pub(crate) fn enter_run(&self) -> RunGuard<'_> {
        if let Some(k) = &self.inner.kick {
            // SAFETY: pthread_self has no preconditions.
            *lock(&k.running) = Some(unsafe { libc::pthread_self() });
        }
        RunGuard(self)
    }
}

/// Keeps a thread registered in a [`VcpuStopper`] while it is inside [`Vcpu::run`].
pub(crate) struct RunGuard<'a>(&'a VcpuStopper);

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        if let Some(k) = &self.0.inner.kick {
            *lock(&k.running) = None;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn count(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        HITS.fetch_add(1, Ordering::SeqCst);
    }
    static HITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    #[test]
    fn stop_sets_the_flag_and_signals_only_a_running_thread() {
        let sig = libc::SIGRTMIN() + 3;
        vmm_sys_util::signal::register_signal_handler(sig, count).unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let s = VcpuStopper::with_signal(flag.clone(), sig);
        // Not inside `run`: the flag only.
        s.stop();
        assert!(s.requested() && flag.load(Ordering::SeqCst));
        assert_eq!(HITS.load(Ordering::SeqCst), 0);
        assert!(flag.swap(false, Ordering::SeqCst));
        assert!(!s.requested());
        // Inside `run` (this thread): the flag and the signal.
        {
            let _g = s.enter_run();
            s.clone().stop();
        }
        assert_eq!(HITS.load(Ordering::SeqCst), 1);
        assert!(flag.swap(false, Ordering::SeqCst));
        // After leaving: no signal any more.
        s.stop();
        assert_eq!(HITS.load(Ordering::SeqCst), 1);
        // A flag-only stopper never signals.
        let plain = VcpuStopper::new(Arc::new(AtomicBool::new(false)));
        let _g = plain.enter_run();
        plain.stop();
        assert!(plain.requested());
        assert_eq!(HITS.load(Ordering::SeqCst), 1);
    }
}
