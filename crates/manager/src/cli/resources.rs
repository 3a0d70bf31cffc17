//! The resource flags of `rustvisor vm create` and `vm set`, their lines in `vm info`, and
//! `rustvisor capacity`.

use std::process::ExitCode;
use std::time::Duration;

use super::{decode, failure, finish, to_json, Connect, DaemonClient, Failure};
use crate::resources::CpuList;
use crate::types::{Capacity, HostInfo, Priority, Resources, VmDetails};

/// A VM's share of the host (`vm create`, and `vm set` while it runs; `none` clears a
/// setting in `vm set`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ResourceFlags {
    /// CPU weight against the other VMs under contention, 1-10000 (default 100).
    #[arg(long, value_name = "N")]
    pub cpu_weight: Option<String>,
    /// The most host CPU the VM may use, in CPUs: 0.5, 1.5, ... (cgroup cpu.max).
    #[arg(long, value_name = "CPUS")]
    pub cpu_limit: Option<String>,
    /// The host CPUs the VM may run on, e.g. 0-3,6 (cgroup cpuset).
    #[arg(long, value_name = "LIST")]
    pub cpuset: Option<String>,
    /// Pin vCPU threads to host CPUs: vcpu0=2,vcpu1=3 (the VMM's other threads keep off
    /// those CPUs).
    #[arg(long, value_name = "VCPU=CPU,...")]
    pub pin: Option<String>,
    /// The most memory the VMM may use, e.g. 768M (default: guest RAM + 64M + 1/8).
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<String>,
    /// Who the host's OOM killer takes first: low, normal, high or critical.
    #[arg(long, value_name = "LEVEL")]
    pub priority: Option<String>,
    /// Let the daemon balloon the guest down to this much RAM when the host runs low on
    /// memory, e.g. 256M (needs --balloon).
    #[arg(long, value_name = "SIZE")]
    pub balloon_min: Option<String>,
}

fn bad(flag: &str, msg: impl std::fmt::Display) -> Failure {
    failure(2, format!("{flag}: {msg}"))
}

fn size_mib(flag: &str, v: &str) -> Result<u64, Failure> {
    let b = vmm::config::parse_size(v).map_err(|e| bad(flag, e))?;
    if b % (1 << 20) != 0 {
        return Err(bad(flag, format!("'{v}' is not a whole number of MiB (e.g. 256M, 1G)")));
    }
    Ok(b >> 20)
}

/// `--pin vcpu0=2,vcpu1=3`.
pub fn parse_pins(v: &str) -> Result<std::collections::BTreeMap<u8, u32>, Failure> {
    let mut out = std::collections::BTreeMap::new();
    for part in v.split(',').filter(|p| !p.is_empty()) {
        let parsed = part.split_once('=').and_then(|(k, c)| {
            let vcpu: u8 = k.trim().strip_prefix("vcpu")?.parse().ok()?;
            let cpu: u32 = c.trim().parse().ok()?;
            Some((vcpu, cpu))
        });
        let Some((vcpu, cpu)) = parsed else {
            return Err(bad("--pin", format!("'{part}' (accepted: vcpuN=CPU pairs, e.g. vcpu0=2,vcpu1=3)")));
        };
        if out.insert(vcpu, cpu).is_some() {
            return Err(bad("--pin", format!("vcpu{vcpu} is pinned twice")));
        }
    }
    Ok(out)
}

/// `--cpu-limit 1.5` → 150 (percent of one CPU).
pub fn parse_cpu_limit(v: &str) -> Result<u32, Failure> {
    let cpus: f64 =
        v.trim().parse().map_err(|_| bad("--cpu-limit", format!("'{v}' (accepted: CPUs, e.g. 0.5 or 2)")))?;
    let pct = (cpus * 100.0).round();
    if !(1.0..=102_400.0).contains(&pct) {
        return Err(bad("--cpu-limit", format!("'{v}' (accepted: 0.01 CPUs or more)")));
    }
    Ok(pct as u32)
}

impl ResourceFlags {
    /// Whether any flag is given.
    pub fn any(&self) -> bool {
        [
            &self.cpu_weight,
            &self.cpu_limit,
            &self.cpuset,
            &self.pin,
            &self.memory_limit,
            &self.priority,
            &self.balloon_min,
        ]
        .iter()
        .any(|f| f.is_some())
    }

    /// Applies the flags to `r` (`none` clears a setting; the daemon checks the ranges
    /// that depend on the host and the VM).
    pub fn apply(&self, r: &mut Resources) -> Result<(), Failure> {
        let none = |v: &str| v.trim() == "none";
        if let Some(v) = &self.cpu_weight {
            r.cpu_weight = if none(v) {
                None
            } else {
                Some(v.trim().parse().map_err(|_| bad("--cpu-weight", format!("'{v}' (accepted: 1 to 10000, none)")))?)
            };
        }
        if let Some(v) = &self.cpu_limit {
            r.cpu_limit_percent = if none(v) { None } else { Some(parse_cpu_limit(v)?) };
        }
        if let Some(v) = &self.cpuset {
            r.cpuset = if none(v) {
                None
            } else {
                let l: CpuList = v.parse().map_err(|e| bad("--cpuset", e))?;
                Some(l.to_string())
            };
        }
        if let Some(v) = &self.pin {
            r.pin = if none(v) { Default::default() } else { parse_pins(v)? };
        }
        if let Some(v) = &self.memory_limit {
            r.memory_limit_mib = if none(v) { None } else { Some(size_mib("--memory-limit", v)?) };
        }
        if let Some(v) = &self.priority {
            r.priority = v.parse::<Priority>().map_err(|e| bad("--priority", e))?;
        }
        if let Some(v) = &self.balloon_min {
            r.balloon_min_mib = if none(v) { None } else { Some(size_mib("--balloon-min", v)?) };
        }
        Ok(())
    }
}

/// The `vm info` lines of a VM's resources and, while it runs, where they are in force.
pub fn format_resources(d: &VmDetails) -> String {
    let r = &d.resources;
    let mut parts = vec![format!("priority {}", r.priority.as_str())];
    if let Some(w) = r.cpu_weight {
        parts.push(format!("cpu weight {w}"));
    }
    if let Some(p) = r.cpu_limit_percent {
        parts.push(format!("cpu limit {:.2} CPUs", f64::from(p) / 100.0));
    }
    if let Some(c) = &r.cpuset {
        parts.push(format!("cpuset {c}"));
    }
    if !r.pin.is_empty() {
        let pins: Vec<String> = r.pin.iter().map(|(v, c)| format!("vcpu{v}={c}")).collect();
        parts.push(format!("pinned {}", pins.join(",")));
    }
    if let Some(m) = r.memory_limit_mib {
        parts.push(format!("memory limit {m} MiB"));
    }
    if let Some(m) = r.balloon_min_mib {
        parts.push(format!("auto-balloon down to {m} MiB"));
    }
    let mut s = format!("resources: {}\n", parts.join(", "));
    if let Some(p) = &d.placement {
        if let Some(cg) = &p.cgroup {
            s += &format!("cgroup: {cg}\n");
        }
        s += &format!("oom_score_adj: {}\n", p.oom_score_adj);
        for t in &p.vcpu_threads {
            s += &format!("vcpu{}: thread {} on CPUs {}\n", t.vcpu, t.tid, t.affinity);
        }
    }
    s
}

/// `rustvisor capacity`.
#[derive(clap::Args, Debug, Clone)]
pub struct CapacityArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: Connect,
    /// vCPUs of one more VM.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest RAM of one more VM, e.g. 512M.
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Its disk, e.g. 8G (with --pool).
    #[arg(long, value_name = "SIZE", requires = "pool")]
    pub disk: Option<String>,
    /// The pool its disk would be in.
    #[arg(long, value_name = "NAME")]
    pub pool: Option<String>,
    /// Print the daemon's JSON.
    #[arg(long)]
    pub json: bool,
}

/// `rustvisor capacity`: how many more VMs of a shape fit, and why.
pub fn capacity(a: CapacityArgs) -> ExitCode {
    finish(capacity_text(&a))
}

fn capacity_text(a: &CapacityArgs) -> Result<String, Failure> {
    let memory_mib = size_mib("--memory", &a.memory)?;
    let mut q = format!("capacity?cpus={}&memory_mib={memory_mib}", a.cpus);
    if let Some(d) = &a.disk {
        let bytes = vmm::config::parse_size(d).map_err(|e| bad("--disk", e))?;
        q += &format!("&disk_bytes={bytes}");
    }
    if let Some(p) = &a.pool {
        super::check_name(p)?;
        q += &format!("&pool={p}");
    }
    let c = DaemonClient::new(&a.connect.connect, Duration::from_secs(30))?;
    let cap: Capacity = decode(&c.call("GET", &q, None)?)?;
    if a.json {
        return to_json(&cap);
    }
    let mut s = format_host(&cap.host);
    let what = match &a.disk {
        Some(d) => format!("{} vCPU, {} MiB, {d} disk", a.cpus, memory_mib),
        None => format!("{} vCPU, {} MiB", a.cpus, memory_mib),
    };
    s += &format!("{} more VMs of {what} fit; {} runs out first\n", cap.fit, cap.limited_by);
    for l in &cap.explanation {
        s += &format!("  {l}\n");
    }
    Ok(s)
}

/// The host lines of `capacity`.
pub fn format_host(h: &HostInfo) -> String {
    format!(
        "host: {} CPUs, {} MiB for VMs ({} MiB available now); {} VMs up commit {} vCPUs ({:.2} per CPU) and {} MiB \
         ({:.2}×); policy: --cpu-overcommit {} --mem-overcommit {}\ncgroups: {}\n",
        h.cpus,
        h.memory_mib,
        h.memory_available_mib,
        h.vms_up,
        h.committed_vcpus,
        h.committed_vcpus as f64 / h.cpus.max(1) as f64,
        h.committed_memory_mib,
        h.committed_memory_mib as f64 / h.memory_mib.max(1) as f64,
        h.overcommit.cpu,
        h.overcommit.memory,
        h.cgroups
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_clear() {
        let mut r = Resources::default();
        let f = ResourceFlags {
            cpu_weight: Some("300".into()),
            cpu_limit: Some("1.5".into()),
            cpuset: Some("1,0".into()),
            pin: Some("vcpu0=1,vcpu1=0".into()),
            memory_limit: Some("768M".into()),
            priority: Some("low".into()),
            balloon_min: Some("256M".into()),
        };
        assert!(f.any());
        f.apply(&mut r).unwrap();
        assert_eq!(r.cpu_weight, Some(300));
        assert_eq!(r.cpu_limit_percent, Some(150));
        assert_eq!(r.cpuset.as_deref(), Some("0-1"));
        assert_eq!(r.pin, [(0u8, 1u32), (1, 0)].into());
        assert_eq!((r.memory_limit_mib, r.balloon_min_mib, r.priority), (Some(768), Some(256), Priority::Low));
        let clear = ResourceFlags {
            cpu_limit: Some("none".into()),
            pin: Some("none".into()),
            cpuset: Some("none".into()),
            ..Default::default()
        };
        clear.apply(&mut r).unwrap();
        assert_eq!((r.cpu_limit_percent, r.pin.is_empty(), r.cpuset.clone()), (None, true, None));
        assert_eq!(r.cpu_weight, Some(300), "untouched");
        assert!(!ResourceFlags::default().any());
    }

    #[test]
    fn bad_flags_name_the_flag() {
        for (f, flag) in [
            (ResourceFlags { pin: Some("0=1".into()), ..Default::default() }, "--pin"),
            (ResourceFlags { pin: Some("vcpu0=1,vcpu0=2".into()), ..Default::default() }, "--pin"),
            (ResourceFlags { cpu_limit: Some("lots".into()), ..Default::default() }, "--cpu-limit"),
            (ResourceFlags { cpu_limit: Some("0".into()), ..Default::default() }, "--cpu-limit"),
            (ResourceFlags { cpuset: Some("0-x".into()), ..Default::default() }, "--cpuset"),
            (ResourceFlags { priority: Some("urgent".into()), ..Default::default() }, "--priority"),
            (ResourceFlags { memory_limit: Some("1.5M".into()), ..Default::default() }, "--memory-limit"),
        ] {
            let e = f.apply(&mut Resources::default()).unwrap_err();
            assert!(e.message.starts_with(flag), "{}", e.message);
            assert_eq!(e.code, 2);
        }
    }
}
