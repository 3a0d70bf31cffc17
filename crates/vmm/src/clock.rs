//! The guest's clock on `emu`: nanoseconds of virtual time that stand still while the VM is
//! paused and continue from a saved value after a restore, so timers (PIT, LAPIC, TSC) see
//! neither the pause nor the time between snapshot and restore.

use std::sync::Mutex;
use std::time::Instant;

/// A pausable monotonic clock, in nanoseconds.
#[derive(Debug)]
pub struct VirtualClock {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Host instant that corresponds to virtual time `base_ns`.
    start: Instant,
    base_ns: u64,
    /// While paused: the frozen virtual time.
    frozen: Option<u64>,
}

impl VirtualClock {
    /// A running clock starting at `now_ns`.
    pub fn new(now_ns: u64) -> VirtualClock {
        VirtualClock { inner: Mutex::new(Inner { start: Instant::now(), base_ns: now_ns, frozen: None }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Current virtual time in ns (never goes backwards).
    pub fn now(&self) -> u64 {
        let i = self.lock();
        i.frozen.unwrap_or_else(|| i.base_ns.saturating_add(i.start.elapsed().as_nanos() as u64))
    }

    /// Stops time (idempotent).
    pub fn pause(&self) {
        let mut i = self.lock();
        if i.frozen.is_none() {
            let now = i.base_ns.saturating_add(i.start.elapsed().as_nanos() as u64);
            i.frozen = Some(now);
        }
    }

    /// Lets time run again from where it stopped (idempotent).
    pub fn resume(&self) {
        let mut i = self.lock();
        if let Some(t) = i.frozen.take() {
            i.base_ns = t;
            i.start = Instant::now();
        }
    }

    /// Sets the current virtual time (a restore), keeping the paused/running state.
    pub fn set(&self, now_ns: u64) {
        let mut i = self.lock();
        if i.frozen.is_some() {
            i.frozen = Some(now_ns);
        } else {
            i.base_ns = now_ns;
            i.start = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pauses_and_continues() {
        let c = VirtualClock::new(1000);
        std::thread::sleep(Duration::from_millis(5));
        c.pause();
        let t = c.now();
        assert!(t >= 1000 + 5_000_000);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(c.now(), t, "frozen while paused");
        c.resume();
        let u = c.now();
        assert!(u >= t && u < t + 15_000_000, "continues from the frozen value");
        c.set(42);
        assert!(c.now() >= 42 && c.now() < 42 + 15_000_000);
    }
}
