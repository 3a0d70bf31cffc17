//! Overcommit accounting: what the VMs that are up (running or paused) commit of the
//! host's CPUs and memory, whether one more VM may start under the policy, and how many
//! more of a given shape fit (`rustvisor capacity`). Pure arithmetic over numbers the
//! service gathers, so every refusal and answer is tested here.
//!
//! Committed memory counts each VM's configured guest RAM (its most), not what it uses
//! now: a guest may touch all of it at any time, ballooned or not, as in Proxmox's and
//! oVirt's accounting.

use crate::types::OvercommitPolicy;

/// vCPUs and guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// vCPUs.
    pub vcpus: u64,
    /// Guest memory, MiB.
    pub memory_mib: u64,
}

impl Usage {
    /// The sum of `self` and `other`.
    pub fn plus(self, other: Usage) -> Usage {
        Usage { vcpus: self.vcpus + other.vcpus, memory_mib: self.memory_mib.saturating_add(other.memory_mib) }
    }
}

/// The host: CPUs and the memory VMs may use (MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// Online CPUs.
    pub cpus: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
}

/// The most of each resource the policy lets VMs commit on `host`.
pub fn allowed(host: Host, policy: OvercommitPolicy) -> Usage {
    // A hair of slack so 2 CPUs × 1.5 is 3 even where the float is 2.9999999.
    let scale = |n: u64, r: f64| (n as f64 * r + 1e-6).floor() as u64;
    Usage { vcpus: scale(host.cpus, policy.cpu), memory_mib: scale(host.memory_mib, policy.memory) }
}

/// Whether VM `name` of `vm`'s shape may start while `up` is committed: `Err` says which
/// resource would be exceeded, with the numbers and the policy flag to change.
pub fn admit(host: Host, policy: OvercommitPolicy, up: Usage, name: &str, vm: Usage) -> Result<(), String> {
    let max = allowed(host, policy);
    let after = up.plus(vm);
    if after.vcpus > max.vcpus {
        return Err(format!(
            "starting '{name}' would commit {} vCPUs on {} host CPUs ({:.2} per CPU; {} committed now + {}), \
             above the policy's {} (--cpu-overcommit {})",
            after.vcpus,
            host.cpus,
            after.vcpus as f64 / host.cpus.max(1) as f64,
            up.vcpus,
            vm.vcpus,
            max.vcpus,
            policy.cpu
        ));
    }
    if after.memory_mib > max.memory_mib {
        return Err(format!(
            "starting '{name}' would commit {} MiB of guest memory on {} MiB of host memory ({:.2}×; {} MiB \
             committed now + {} MiB), above the policy's {} MiB (--mem-overcommit {})",
            after.memory_mib,
            host.memory_mib,
            after.memory_mib as f64 / host.memory_mib.max(1) as f64,
            up.memory_mib,
            vm.memory_mib,
            max.memory_mib,
            policy.memory
        ));
    }
    Ok(())
}

/// How many more VMs of `shape` fit: by CPU, by memory, by disk (when `disk` gives the
/// pool's free bytes and the disk's size), the least of them and which runs out first, and
/// one line per resource saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fit {
    /// By vCPUs.
    pub by_cpu: u64,
    /// By memory.
    pub by_memory: u64,
    /// By disk space.
    pub by_disk: Option<u64>,
    /// The least.
    pub fit: u64,
    /// "cpu", "memory" or "disk".
    pub limited_by: &'static str,
    /// One line per resource.
    pub explanation: Vec<String>,
}

/// See [`Fit`]. `shape` with 0 vCPUs or 0 MiB does not limit by that resource.
pub fn fit(host: Host, policy: OvercommitPolicy, up: Usage, shape: Usage, disk: Option<(u64, u64)>) -> Fit {
    let max = allowed(host, policy);
    let left =
        Usage { vcpus: max.vcpus.saturating_sub(up.vcpus), memory_mib: max.memory_mib.saturating_sub(up.memory_mib) };
    let per = |left: u64, each: u64| left.checked_div(each).unwrap_or(u64::MAX);
    let by_cpu = per(left.vcpus, shape.vcpus);
    let by_memory = per(left.memory_mib, shape.memory_mib);
    let mut explanation = vec![
        format!(
            "cpu: {} host CPUs × {} overcommit = {} vCPUs; {} committed; {} left; {} each → {}",
            host.cpus,
            policy.cpu,
            max.vcpus,
            up.vcpus,
            left.vcpus,
            shape.vcpus,
            show(by_cpu)
        ),
        format!(
            "memory: {} MiB × {} overcommit = {} MiB; {} MiB committed; {} MiB left; {} MiB each → {}",
            host.memory_mib,
            policy.memory,
            max.memory_mib,
            up.memory_mib,
            left.memory_mib,
            shape.memory_mib,
            show(by_memory)
        ),
    ];
    let by_disk = disk.map(|(free, each)| {
        let n = per(free, each);
        explanation.push(format!("disk: {} MiB free in the pool; {} MiB each → {}", free >> 20, each >> 20, show(n)));
        n
    });
    let mut limited_by = "cpu";
    let mut least = by_cpu;
    if by_memory < least {
        (least, limited_by) = (by_memory, "memory");
    }
    if let Some(d) = by_disk {
        if d < least {
            (least, limited_by) = (d, "disk");
        }
    }
    Fit { by_cpu, by_memory, by_disk, fit: least, limited_by, explanation }
}

fn show(n: u64) -> String {
    if n == u64::MAX {
        "no limit".into()
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Host = Host { cpus: 2, memory_mib: 24_000 };

    #[test]
    fn admission_refuses_with_the_numbers() {
        let p = OvercommitPolicy { cpu: 1.5, memory: 1.0 };
        let up = Usage { vcpus: 2, memory_mib: 20_000 };
        assert!(admit(HOST, p, up, "a", Usage { vcpus: 1, memory_mib: 4000 }).is_ok());
        let e = admit(HOST, p, up, "b", Usage { vcpus: 2, memory_mib: 512 }).unwrap_err();
        assert!(e.contains("4 vCPUs on 2 host CPUs (2.00 per CPU"), "{e}");
        assert!(e.contains("policy's 3 (--cpu-overcommit 1.5)"), "{e}");
        let e = admit(HOST, p, up, "c", Usage { vcpus: 1, memory_mib: 4001 }).unwrap_err();
        assert!(e.contains("24001 MiB of guest memory on 24000 MiB"), "{e}");
        assert!(e.contains("--mem-overcommit 1"), "{e}");
    }

    #[test]
    fn fit_names_what_runs_out_first() {
        let p = OvercommitPolicy { cpu: 4.0, memory: 1.5 };
        let up = Usage { vcpus: 3, memory_mib: 1024 };
        let f = fit(HOST, p, up, Usage { vcpus: 1, memory_mib: 512 }, None);
        assert_eq!((f.by_cpu, f.by_memory, f.fit, f.limited_by), (5, 68, 5, "cpu"));
        let f = fit(HOST, p, up, Usage { vcpus: 1, memory_mib: 8192 }, Some((100 << 30, 8 << 30)));
        assert_eq!((f.by_cpu, f.by_memory, f.by_disk, f.fit, f.limited_by), (5, 4, Some(12), 4, "memory"));
        let f = fit(HOST, p, up, Usage { vcpus: 1, memory_mib: 512 }, Some((20 << 30, 8 << 30)));
        assert_eq!((f.fit, f.limited_by), (2, "disk"));
        assert_eq!(f.explanation.len(), 3);
        assert!(f.explanation[0].starts_with("cpu: 2 host CPUs × 4 overcommit = 8 vCPUs; 3 committed; 5 left"));
        // Over-committed already: nothing fits, no underflow.
        let f = fit(HOST, p, Usage { vcpus: 20, memory_mib: 0 }, Usage { vcpus: 1, memory_mib: 1 }, None);
        assert_eq!(f.fit, 0);
    }
}
