//! What `GET /metrics` reads from the host: a VMM process's CPU time, resident memory and
//! its vCPU threads' time waiting for a host CPU (`/proc/PID/...`), and the host's CPUs and
//! memory. The parsers take the files' text, so they are tested on fixtures; the readers
//! return `None` for a process that is gone or a file that does not parse.
//!
//! The encoding into OpenMetrics text is [`crate::service::Service::metrics`].

use std::path::Path;

/// What one VMM process uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU time of all its threads, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory (`VmRSS`), in bytes.
    pub resident_bytes: u64,
    /// Per vCPU thread (`vcpu0`, `vcpu1`, ...: the VMM names them so), by index.
    pub vcpus: Vec<VcpuSample>,
}

/// One vCPU thread's times.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VcpuSample {
    /// The vCPU's index.
    pub index: u32,
    /// User + system CPU time of the thread, seconds.
    pub cpu_seconds: f64,
    /// Seconds it was runnable but waiting for a host CPU (`schedstat`'s run delay).
    pub ready_seconds: f64,
}

/// The clock ticks a second of `/proc/PID/stat`'s times.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in clock ticks. The command
/// name (field 2, in parentheses) may hold spaces and parentheses: fields count from the
/// last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A `Key:   N kB` line of `/proc/PID/status` or `/proc/meminfo`, in bytes.
pub fn parse_kb_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(key))?;
    let mut f = line.split(':').nth(1)?.split_whitespace();
    let n: u64 = f.next()?.parse().ok()?;
    match f.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// The run delay (the second field: nanoseconds runnable but not running) of a
/// `/proc/PID/task/TID/schedstat` line.
pub fn parse_schedstat_run_delay_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().nth(1)?.parse().ok()
}

/// The vCPU index of a thread named `vcpuN`.
pub fn vcpu_index(comm: &str) -> Option<u32> {
    let n = comm.trim_end().strip_prefix("vcpu")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// What process `pid` uses now; `None` when it is gone or its files do not parse.
pub fn process(pid: u32) -> Option<ProcessStats> {
    process_at(&Path::new("/proc").join(pid.to_string()))
}

fn process_at(dir: &Path) -> Option<ProcessStats> {
    let ticks = parse_stat_cpu_ticks(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
    let resident_bytes = parse_kb_field(&std::fs::read_to_string(dir.join("status")).ok()?, "VmRSS")?;
    let hz = clock_ticks() as f64;
    let mut vcpus = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(dir.join("task")) {
        for task in tasks.flatten() {
            let t = task.path();
            let Some(index) = std::fs::read_to_string(t.join("comm")).ok().as_deref().and_then(vcpu_index) else {
                continue;
            };
            // A thread that ended meanwhile, or a kernel without schedstats: no sample.
            let ready =
                std::fs::read_to_string(t.join("schedstat")).ok().as_deref().and_then(parse_schedstat_run_delay_ns);
            let cpu = std::fs::read_to_string(t.join("stat")).ok().as_deref().and_then(parse_stat_cpu_ticks);
            if let (Some(ns), Some(ticks)) = (ready, cpu) {
                vcpus.push(VcpuSample { index, cpu_seconds: ticks as f64 / hz, ready_seconds: ns as f64 / 1e9 });
            }
        }
    }
    vcpus.sort_by_key(|v| v.index);
    Some(ProcessStats { cpu_seconds: ticks as f64 / hz, resident_bytes, vcpus })
}

/// The host's online CPUs.
pub fn host_cpus() -> u64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as u64
    } else {
        1
    }
}

/// The host's memory (`MemTotal` of `/proc/meminfo`), in bytes.
pub fn host_memory_bytes() -> Option<u64> {
    parse_kb_field(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal")
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (rustvisor (vmm) x) S 1 4242 4242 0 -1 4194560 2516 0 0 0 \
                        250 75 0 0 20 0 3 0 123456 1234567 890 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0";

    #[test]
    fn stat_cpu_ticks_count_fields_after_the_last_parenthesis() {
        assert_eq!(parse_stat_cpu_ticks(STAT), Some(325));
        assert_eq!(parse_stat_cpu_ticks("1 (x) S 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn kb_fields_of_status_and_meminfo() {
        let status = "Name:\tvmm\nVmPeak:\t  900 kB\nVmRSS:\t  123456 kB\nThreads:\t3\n";
        assert_eq!(parse_kb_field(status, "VmRSS"), Some(123456 * 1024));
        assert_eq!(parse_kb_field(status, "Threads"), Some(3));
        assert_eq!(parse_kb_field(status, "VmSwap"), None);
        assert_eq!(parse_kb_field("MemTotal:       16318480 kB\nMemFree: 1 kB\n", "MemTotal"), Some(16318480 * 1024));
        assert_eq!(parse_kb_field("VmRSS: 12 MB\n", "VmRSS"), None);
    }

    #[test]
    fn schedstat_run_delay_and_vcpu_names() {
        assert_eq!(parse_schedstat_run_delay_ns("1234567 89000 42\n"), Some(89000));
        assert_eq!(parse_schedstat_run_delay_ns("1234567\n"), None);
        assert_eq!(vcpu_index("vcpu0\n"), Some(0));
        assert_eq!(vcpu_index("vcpu12\n"), Some(12));
        assert_eq!(vcpu_index("vcpu\n"), None);
        assert_eq!(vcpu_index("vcpu-io\n"), None);
        assert_eq!(vcpu_index("daemon-op\n"), None);
    }

    #[test]
    fn this_process_and_host_are_readable() {
        // Burn a little CPU so the tick count is above 0.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        // A thread named like a vCPU gets a ready-time sample.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("vcpu7".into())
            .spawn(move || {
                // The name is set as the thread starts: say when it has.
                let _ = started_tx.send(());
                rx.recv()
            })
            .unwrap();
        started.recv().unwrap();
        let p = process(std::process::id()).expect("this process's stats");
        drop(tx);
        let _ = t.join();
        assert!(p.cpu_seconds > 0.0, "{p:?}");
        assert!(p.resident_bytes > 0, "{p:?}");
        let own = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat readable");
        assert!(parse_schedstat_run_delay_ns(&own).is_some(), "{own}");
        assert!(p.vcpus.iter().any(|v| v.index == 7 && v.ready_seconds >= 0.0 && v.cpu_seconds >= 0.0), "{p:?}");
        assert!(host_cpus() >= 1);
        assert!(host_memory_bytes().unwrap() > 0);
        assert!(process(u32::MAX).is_none());
    }
}
