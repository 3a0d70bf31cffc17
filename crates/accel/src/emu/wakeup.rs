//! How an emulated vCPU halted in `hlt` sleeps and is woken: [`Wakeup`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// The doorbell of one emulated vCPU. The vCPU blocks on it while its CPU is halted, with
/// the time to its next timer deadline as the timeout; other threads ring it when they give
/// it something to do: an interrupt raised by a device thread (the VM's IRQ lines and MSI
/// sink ring the vCPU whose LAPIC took the interrupt), or a stop request
/// ([`crate::VcpuStopper::stop`]).
///
/// A ring is never lost: one that comes while the vCPU is not waiting makes its next wait
/// return at once. Ringing a vCPU that is not waiting costs two atomic operations (no lock,
/// no system call), so devices may ring on every interrupt.
#[derive(Debug, Default)]
pub struct Wakeup {
    /// Rung since the last [`Wakeup::clear`] or wait.
    rung: AtomicBool,
    /// The vCPU is inside [`Wakeup::wait`] (or about to block there).
    waiting: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Wakeup {
    /// A doorbell nobody has rung.
    pub fn new() -> Wakeup {
        Wakeup::default()
    }

    /// Rings: ends the vCPU's current or next wait.
    pub fn wake(&self) {
        self.rung.store(true, Ordering::SeqCst);
        // Either the waiter announced itself before our store (we see `waiting` and
        // notify it under the lock, which it holds until it blocks), or it reads `rung`
        // after our store and does not block (both sides are SeqCst).
        if self.waiting.load(Ordering::SeqCst) {
            drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
            self.cv.notify_one();
        }
    }

    /// Forgets rings that came before now (the caller is about to look at what they were
    /// about: pending interrupts, the stop flag).
    pub(crate) fn clear(&self) {
        self.rung.store(false, Ordering::SeqCst);
    }

    /// Blocks until rung or until `timeout` has passed (`None`: no limit); returns whether
    /// it was rung. A ring since the last [`Wakeup::clear`] returns at once.
    pub(crate) fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.waiting.store(true, Ordering::SeqCst);
        while !self.rung.load(Ordering::SeqCst) {
            g = match deadline {
                None => self.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    self.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
        self.waiting.store(false, Ordering::SeqCst);
        drop(g);
        self.rung.swap(false, Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_ring_before_the_wait_is_kept_and_clear_forgets_it() {
        let w = Wakeup::new();
        w.wake();
        let t = Instant::now();
        assert!(w.wait(Some(Duration::from_secs(10))));
        assert!(t.elapsed() < Duration::from_secs(5));
        // Consumed: the next wait times out.
        assert!(!w.wait(Some(Duration::from_millis(5))));
        w.wake();
        w.clear();
        let t = Instant::now();
        assert!(!w.wait(Some(Duration::from_millis(20))));
        assert!(t.elapsed() >= Duration::from_millis(20));
        assert!(!w.wait(Some(Duration::ZERO)));
    }

    #[test]
    fn a_ring_from_another_thread_ends_an_unlimited_wait() {
        let w = Arc::new(Wakeup::new());
        for _ in 0..200 {
            let r = w.clone();
            let t = std::thread::spawn(move || r.wake());
            assert!(w.wait(None));
            t.join().unwrap();
        }
        // And one that rings while the waiter is blocked for a while.
        let r = w.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            r.wake();
        });
        let start = Instant::now();
        assert!(w.wait(Some(Duration::from_secs(30))));
        assert!(start.elapsed() < Duration::from_secs(20));
        t.join().unwrap();
    }
}
