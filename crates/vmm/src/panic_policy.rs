//! What the VMM does when one of its threads panics: it stops, visibly.
//!
//! A panic is a bug in the VMM (the guest may not cause one: its input is checked). Letting
//! the panicking thread unwind and die would leave the others waiting on it for ever: a vCPU
//! thread that never answers `pause`, a device worker whose queues are never served, an API
//! whose every request then hangs. Like Firecracker, the VMM aborts instead, after reporting
//! which thread panicked, where and why, on stderr (through the log) and as the process's
//! exit (SIGABRT, status 134 in a shell). Whoever supervises the VMM sees it die at once and
//! may restart it; disk images stay consistent because every write the guest saw flushed is
//! on disk (FLUSH is an fsync) and qcow2 metadata is ordered for crashes.

/// Installs the policy for the whole process: a panic hook that logs the panic with the
/// thread's name at error level, then aborts.
pub fn install() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!("VMM bug: thread '{name}' panicked at {at}: {msg}; stopping the VMM");
        // Also straight to stderr, in case logging is off or is what panicked.
        eprintln!("rustvisor: VMM bug: thread '{name}' panicked at {at}: {msg}; stopping the VMM");
        std::process::abort();
    }));
}
