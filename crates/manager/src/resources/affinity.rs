//! A running VMM's threads on the host's CPUs: which thread is which vCPU (the VMM names
//! them `vcpu0`, `vcpu1`, ...), pinning them (`sched_setaffinity(2)`), and the process's
//! place in the OOM killer's order (`/proc/PID/oom_score_adj`, `proc(5)`).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use super::CpuList;
use crate::metrics::vcpu_index;

/// The threads of process `pid`: (thread ID, vCPU index for a thread named `vcpuN`).
pub fn threads(pid: u32) -> io::Result<Vec<(u32, Option<u32>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("task"))?.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        // A thread that ended meanwhile has no comm: skip it.
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else { continue };
        out.push((tid, vcpu_index(&comm)));
    }
    out.sort_unstable();
    Ok(out)
}

/// The CPUs thread `tid` may run on.
pub fn affinity(tid: u32) -> io::Result<CpuList> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let tid = libc::pid_t::try_from(tid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `set` is a live cpu_set_t of the size passed; the kernel writes within it.
    let r = unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let is_set = |i: u32| {
        // SAFETY: `set` is an initialised cpu_set_t and i < MAX_CPUS = CPU_SETSIZE.
        unsafe { libc::CPU_ISSET(i as usize, &set) }
    };
    Ok(CpuList::of((0..super::cpulist::MAX_CPUS).filter(|&i| is_set(i))))
}

/// Lets thread `tid` run only on `cpus` (which must not be empty).
pub fn set_affinity(tid: u32, cpus: &CpuList) -> io::Result<()> {
    if cpus.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty CPU set"));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cpus.iter() {
        // SAFETY: CpuList holds CPUs below MAX_CPUS = CPU_SETSIZE, within `set`.
        unsafe { libc::CPU_SET(c as usize, &mut set) };
    }
    let tid = libc::pid_t::try_from(tid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `set` is a live cpu_set_t of the size passed; the kernel only reads it.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What each thread's affinity should be: a pinned vCPU gets its one CPU; the other vCPUs
/// get `allowed`; the VMM's other threads (devices, API, console) get `allowed` without the
/// pinned CPUs, so they do not steal a pinned vCPU's CPU, unless that leaves none.
pub fn plan(threads: &[(u32, Option<u32>)], pins: &BTreeMap<u8, u32>, allowed: &CpuList) -> Vec<(u32, CpuList)> {
    let pinned = CpuList::of(pins.values().copied());
    let rest = allowed.without(&pinned);
    let others = if rest.is_empty() { allowed.clone() } else { rest };
    threads
        .iter()
        .map(|&(tid, vcpu)| {
            let pin = vcpu.and_then(|v| u8::try_from(v).ok()).and_then(|v| pins.get(&v));
            let cpus = match (vcpu, pin) {
                (Some(_), Some(&cpu)) => CpuList::of([cpu]),
                (Some(_), None) => allowed.clone(),
                (None, _) => others.clone(),
            };
            (tid, cpus)
        })
        .collect()
}

/// Sets the affinity of process `pid`'s threads by [`plan`], touching only threads whose
/// affinity differs; returns how many changed. Threads that end meanwhile are skipped.
pub fn apply(pid: u32, pins: &BTreeMap<u8, u32>, allowed: &CpuList) -> io::Result<usize> {
    let mut changed = 0;
    for (tid, cpus) in plan(&threads(pid)?, pins, allowed) {
        match affinity(tid) {
            Ok(now) if now == cpus => continue,
            Ok(_) => {}
            Err(_) => continue,
        }
        match set_affinity(tid, &cpus) {
            Ok(()) => changed += 1,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(changed)
}

/// Sets process `pid`'s `oom_score_adj` (-1000 to 1000).
pub fn set_oom_score_adj(pid: u32, adj: i32) -> io::Result<()> {
    std::fs::write(Path::new("/proc").join(pid.to_string()).join("oom_score_adj"), adj.to_string())
}

/// Process `pid`'s `oom_score_adj`.
pub fn oom_score_adj(pid: u32) -> io::Result<i32> {
    let s = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("oom_score_adj"))?;
    s.trim().parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_pins_vcpus_and_keeps_other_threads_apart() {
        let threads = [(10, None), (11, Some(0)), (12, Some(1)), (13, Some(2)), (14, None)];
        let pins = BTreeMap::from([(0u8, 2u32), (1, 3)]);
        let allowed = CpuList::first(4);
        let p = plan(&threads, &pins, &allowed);
        let s: Vec<(u32, String)> = p.iter().map(|(t, c)| (*t, c.to_string())).collect();
        assert_eq!(s, [(10, "0-1".into()), (11, "2".into()), (12, "3".into()), (13, "0-3".into()), (14, "0-1".into())]);
        // Every CPU pinned: the other threads share them rather than having none.
        let p = plan(&threads, &BTreeMap::from([(0u8, 0u32), (1, 1)]), &CpuList::first(2));
        assert_eq!(p[0].1.to_string(), "0-1");
    }

    #[test]
    fn this_process_threads_are_pinned() {
        let online = CpuList::online().unwrap();
        let cpu = online.iter().last().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<u32>();
        let t = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() } as u32;
                ready_tx.send(tid).unwrap();
                let _ = rx.recv();
                // SAFETY: sched_getcpu has no preconditions.
                unsafe { libc::sched_getcpu() }
            })
            .unwrap();
        let tid = ready_rx.recv().unwrap();
        let pid = std::process::id();
        assert!(threads(pid).unwrap().contains(&(tid, Some(0))));
        set_affinity(tid, &CpuList::of([cpu])).unwrap();
        assert_eq!(affinity(tid).unwrap(), CpuList::of([cpu]));
        drop(tx);
        let ran_on = t.join().unwrap();
        assert_eq!(ran_on, cpu as i32, "the pinned thread ran on its CPU");
        assert!(set_affinity(tid, &CpuList::default()).is_err());
        let adj = oom_score_adj(pid).unwrap();
        assert!((-1000..=1000).contains(&adj));
    }
}
