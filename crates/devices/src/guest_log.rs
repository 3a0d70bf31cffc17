//! Rate-limited logging of what a guest makes happen.
//!
//! A guest can trigger a warning (a corrupt virtqueue, a malformed request, a driver that
//! negotiates nonsense) as often as it likes; logging each one would let it flood the host's
//! logs. [`guest_warn!`](crate::guest_warn) logs at most [`BURST`] lines per call site in each
//! [`WINDOW`], counts every event, and says how many lines it dropped when it logs again.
//! [`counts`] gives the totals for the VMM's counters (one VM per VMM process).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one call site may log per [`WINDOW`].
pub const BURST: u32 = 5;
/// The rate limit's window.
pub const WINDOW: Duration = Duration::from_secs(60);

static EVENTS: AtomicU64 = AtomicU64::new(0);
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Guest-triggered events so far in this process: `(events, log lines suppressed)`.
pub fn counts() -> (u64, u64) {
    (EVENTS.load(Ordering::Relaxed), SUPPRESSED.load(Ordering::Relaxed))
}

/// The limit of one call site (a `static` made by [`guest_warn!`](crate::guest_warn)).
#[derive(Debug)]
pub struct RateLimit {
    /// (window start, lines logged in it, lines suppressed since the last logged line).
    state: Mutex<Option<(Instant, u32, u64)>>,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    /// A limit with nothing logged yet.
    pub const fn new() -> RateLimit {
        RateLimit { state: Mutex::new(None) }
    }

    /// Counts one event; returns `Some(n)` if it may be logged (`n` lines were suppressed
    /// since the last one logged), `None` if it must not.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        EVENTS.fetch_add(1, Ordering::Relaxed);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (start, logged, dropped) = s.get_or_insert((now, 0, 0));
        if now.saturating_duration_since(*start) >= WINDOW {
            *start = now;
            *logged = 0;
        }
        if *logged < BURST {
            *logged += 1;
            Some(std::mem::take(dropped))
        } else {
            *dropped += 1;
            SUPPRESSED.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::warn!` for events a guest can trigger: rate-limited per call site (see the
/// [module](crate::guest_log) documentation) and counted.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::guest_log::RateLimit = $crate::guest_log::RateLimit::new();
        match LIMIT.admit() {
            Some(0) => ::tracing::warn!($($arg)+),
            Some(n) => ::tracing::warn!("{} ({n} similar messages suppressed)", format_args!($($arg)+)),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses_then_reports() {
        let l = RateLimit::new();
        let t0 = Instant::now();
        let (events0, suppressed0) = counts();
        let admitted: Vec<_> = (0..300).map(|_| l.admit_at(t0)).collect();
        assert_eq!(admitted.iter().filter(|a| a.is_some()).count(), BURST as usize);
        assert!(admitted[..BURST as usize].iter().all(|a| *a == Some(0)));
        let (events, suppressed) = counts();
        // Other tests may count concurrently: at least ours are there.
        assert!(events - events0 >= 300 && suppressed - suppressed0 >= 300 - u64::from(BURST));
        // A new window logs again and says how many were dropped.
        assert_eq!(l.admit_at(t0 + WINDOW), Some(300 - u64::from(BURST)));
        assert_eq!(l.admit_at(t0 + WINDOW), Some(0));
    }

    #[test]
    fn the_macro_compiles_with_arguments() {
        let (events0, _) = counts();
        for i in 0..20 {
            crate::guest_warn!("test warning {i}");
        }
        // Post-condition: every call was counted (logged or suppressed); other tests may count
        // concurrently, so at least ours are there.
        assert!(counts().0 - events0 >= 20, "the macro's calls were not counted");
    }
}
