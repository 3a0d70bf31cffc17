//! Each VM's share of the host, applied by the service: admission against the overcommit
//! policy at every start, the VMM placed in its cgroup with its OOM priority before its
//! guest boots, vCPU threads pinned after boot (and again by the supervisor, since the VMM
//! may start threads later), live changes through `PATCH`, OOM kills named in the crash
//! event, `GET /api/v1/host` and `/capacity`, and the automatic balloon policy.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{bad, lock, Service, ServiceError};
use crate::metrics;
use crate::resources::admission::{self, Host, Usage};
use crate::resources::balloon::{self, Candidate, Watermarks};
use crate::resources::cgroup::{Cgroups, Limits, CPU_PERIOD_US};
use crate::resources::{affinity, CpuList};
use crate::store::{NewEvent, Peer, VmRecord};
use crate::types::{
    default_memory_overhead_mib, Capacity, HostInfo, OvercommitPolicy, Placement, Resources, VcpuThread, VmState,
    MAX_CPU_WEIGHT,
};

/// How often the automatic balloon policy looks at the host.
pub const BALLOON_PERIOD: Duration = Duration::from_secs(5);

/// The daemon's resource settings (`rustvisor daemon` flags).
#[derive(Debug, Clone)]
pub struct ResourceOptions {
    /// The VMs' parent cgroup ("rustvisor.slice"), or `None` for no cgroups.
    pub cgroup_parent: Option<String>,
    /// The admission policy.
    pub overcommit: OvercommitPolicy,
    /// The most memory all VMs together may use, MiB (the parent cgroup's limit); `None` =
    /// the host's.
    pub vm_memory_limit_mib: Option<u64>,
    /// Whether the automatic balloon policy runs.
    pub auto_balloon: bool,
}

impl Default for ResourceOptions {
    fn default() -> Self {
        ResourceOptions {
            cgroup_parent: None,
            overcommit: OvercommitPolicy::default(),
            vm_memory_limit_mib: None,
            auto_balloon: true,
        }
    }
}

/// The resource side of the service's state.
#[derive(Debug)]
pub(super) struct ResourceState {
    /// The VMs' cgroups, or why there are none.
    pub cgroups: Result<Cgroups, String>,
    pub options: ResourceOptions,
    /// When the balloon policy last ran, and each VMM's CPU seconds then.
    pub balloon_round: std::sync::Mutex<(Option<Instant>, HashMap<String, f64>)>,
}

impl ResourceState {
    /// Sets up the cgroups `options` ask for (the parent group and its memory limit).
    pub fn new(options: ResourceOptions) -> ResourceState {
        let cgroups = match &options.cgroup_parent {
            None => Err("disabled (rustvisor daemon --cgroup-parent none)".to_string()),
            Some(p) => Cgroups::detect(p).and_then(|cg| {
                cg.set_parent_memory_max(options.vm_memory_limit_mib.map(|m| m << 20))
                    .map_err(|e| format!("setting --vm-memory-limit: {e}"))?;
                Ok(cg)
            }),
        };
        if let Err(why) = &cgroups {
            tracing::warn!("VMs get no cgroups: {why}");
        }
        ResourceState { cgroups, options, balloon_round: Default::default() }
    }
}

impl Default for ResourceState {
    fn default() -> Self {
        ResourceState {
            cgroups: Err("disabled".into()),
            options: ResourceOptions::default(),
            balloon_round: Default::default(),
        }
    }
}

fn usage(rec: &VmRecord) -> Usage {
    Usage { vcpus: u64::from(rec.config.cpus), memory_mib: rec.config.memory_mib }
}

impl Service {
    /// The host as the admission policy sees it: online CPUs, and memory (`MemTotal`, or
    /// `--vm-memory-limit` when lower), MiB.
    fn host(&self) -> Host {
        let total = metrics::host_memory_bytes().unwrap_or(0) >> 20;
        let memory_mib = match self.res.options.vm_memory_limit_mib {
            Some(l) => l.min(total),
            None => total,
        };
        Host { cpus: metrics::host_cpus(), memory_mib }
    }

    /// What the VMs that are up commit, `except` one.
    fn committed(&self, except: Option<&str>) -> Result<(Usage, u64), ServiceError> {
        let mut up = Usage::default();
        let mut n = 0;
        for rec in self.store().list()? {
            if rec.runtime.state.is_active() && Some(rec.name.as_str()) != except {
                up = up.plus(usage(&rec));
                n += 1;
            }
        }
        Ok((up, n))
    }

    /// Refuses to start `rec` beyond the overcommit policy (409 with the numbers).
    pub(super) fn admit(&self, rec: &VmRecord) -> Result<(), ServiceError> {
        let (up, _) = self.committed(Some(&rec.name))?;
        admission::admit(self.host(), self.res.options.overcommit, up, &rec.name, usage(rec))
            .map_err(ServiceError::Refused)
    }

    /// Memory available to VMs now, MiB: `MemAvailable`, or what the VMs' parent cgroup
    /// has left under `--vm-memory-limit` when that is less.
    fn memory_available_mib(&self) -> u64 {
        let host = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| metrics::parse_kb_field(&m, "MemAvailable"))
            .unwrap_or(0)
            >> 20;
        match (self.res.options.vm_memory_limit_mib, &self.res.cgroups) {
            (Some(limit), Ok(cg)) => {
                let used = cg.parent_memory_current().unwrap_or(0) >> 20;
                host.min(limit.saturating_sub(used))
            }
            _ => host,
        }
    }

    /// `GET /api/v1/host`.
    pub fn host_info(&self) -> Result<HostInfo, ServiceError> {
        let host = self.host();
        let (up, n) = self.committed(None)?;
        Ok(HostInfo {
            cpus: host.cpus,
            memory_mib: host.memory_mib,
            memory_available_mib: self.memory_available_mib(),
            overcommit: self.res.options.overcommit,
            committed_vcpus: up.vcpus,
            committed_memory_mib: up.memory_mib,
            vms_up: n,
            cgroups: match &self.res.cgroups {
                Ok(cg) => cg.describe(),
                Err(why) => format!("none: {why}"),
            },
        })
    }

    /// `GET /api/v1/capacity`: how many more VMs of `cpus` vCPUs and `memory_mib` fit, and
    /// with `disk_bytes` how many disks of that size the pool `pool` still holds.
    pub fn capacity(
        &self,
        cpus: u64,
        memory_mib: u64,
        disk_bytes: Option<u64>,
        pool: Option<&str>,
    ) -> Result<Capacity, ServiceError> {
        if cpus == 0 && memory_mib == 0 {
            return Err(bad("cpus", "give cpus and/or memory_mib above 0"));
        }
        let disk = match (disk_bytes, pool) {
            (Some(0), _) => return Err(bad("disk_bytes", "0 (accepted: a size above 0)")),
            (Some(d), Some(p)) => Some((self.pool_info(p)?.info.available_bytes, d)),
            (Some(_), None) => return Err(bad("pool", "needed with disk_bytes: the pool the disks would be in")),
            (None, _) => None,
        };
        let host = self.host_info()?;
        let up = Usage { vcpus: host.committed_vcpus, memory_mib: host.committed_memory_mib };
        let f = admission::fit(self.host(), self.res.options.overcommit, up, Usage { vcpus: cpus, memory_mib }, disk);
        Ok(Capacity {
            host,
            by_cpu: f.by_cpu,
            by_memory: f.by_memory,
            by_disk: f.by_disk,
            fit: f.fit,
            limited_by: f.limited_by.into(),
            explanation: f.explanation,
        })
    }

    /// Checks `res` for a VM of `cpus` vCPUs and `memory_mib` (with a balloon device if
    /// `has_balloon`): 400 naming the field, 409 when it needs cgroups the host lacks.
    pub(super) fn check_resources(
        &self,
        res: &Resources,
        cpus: u8,
        memory_mib: u64,
        has_balloon: bool,
    ) -> Result<(), ServiceError> {
        let host_cpus = metrics::host_cpus();
        let online = CpuList::online().unwrap_or_else(|| CpuList::first(u32::try_from(host_cpus).unwrap_or(1)));
        if let Some(w) = res.cpu_weight {
            if !(1..=MAX_CPU_WEIGHT).contains(&w) {
                return Err(bad("resources.cpu_weight", format!("{w} (accepted: 1 to {MAX_CPU_WEIGHT})")));
            }
        }
        if let Some(p) = res.cpu_limit_percent {
            let max = 100 * host_cpus;
            if p == 0 || u64::from(p) > max {
                return Err(bad("resources.cpu_limit_percent", format!("{p} (accepted: 1 to {max}, 100 = one CPU)")));
            }
        }
        let mut allowed = online.clone();
        if let Some(s) = &res.cpuset {
            let l: CpuList = s.parse().map_err(|e| bad("resources.cpuset", e))?;
            if l.is_empty() || !l.is_subset(&online) {
                return Err(bad(
                    "resources.cpuset",
                    format!("'{s}' (accepted: a non-empty list of online CPUs {online})"),
                ));
            }
            allowed = l;
        }
        for (&vcpu, &cpu) in &res.pin {
            if vcpu >= cpus {
                return Err(bad(
                    "resources.pin",
                    format!("vcpu{vcpu} (accepted: vcpu0 to vcpu{}: the VM has {cpus})", cpus.saturating_sub(1)),
                ));
            }
            if !allowed.contains(cpu) {
                return Err(bad("resources.pin", format!("vcpu{vcpu}={cpu} (accepted host CPUs: {allowed})")));
            }
        }
        if let Some(m) = res.memory_limit_mib {
            if m < 64 {
                return Err(bad("resources.memory_limit_mib", format!("{m} (accepted: 64 or more)")));
            }
        }
        if let Some(b) = res.balloon_min_mib {
            if !has_balloon {
                return Err(bad("resources.balloon_min_mib", "needs a balloon device (--balloon at create)"));
            }
            if b > memory_mib {
                return Err(bad("resources.balloon_min_mib", format!("{b} (accepted: 0 to {memory_mib})")));
            }
        }
        let wants_cgroup = res.cpu_weight.is_some()
            || res.cpu_limit_percent.is_some()
            || res.cpuset.is_some()
            || res.memory_limit_mib.is_some();
        if let (true, Err(why)) = (wants_cgroup, &self.res.cgroups) {
            return Err(ServiceError::Refused(format!(
                "cpu_weight, cpu_limit_percent, cpuset and memory_limit_mib need cgroups, and this daemon has none: {why}"
            )));
        }
        Ok(())
    }

    /// The cgroup limits of `rec`.
    fn limits(rec: &VmRecord) -> Limits {
        let r = &rec.resources;
        Limits {
            cpu_weight: r.cpu_weight.unwrap_or(100),
            cpu_quota_us: r.cpu_limit_percent.map(|p| u64::from(p) * CPU_PERIOD_US / 100),
            cpuset: r.cpuset.as_deref().and_then(|s| s.parse().ok()),
            memory_max: Some(
                r.memory_limit_mib
                    .unwrap_or(rec.config.memory_mib + default_memory_overhead_mib(rec.config.memory_mib))
                    << 20,
            ),
        }
    }

    /// Puts the VMM `pid` of `rec` in its cgroup and the OOM order, before its guest boots.
    pub(super) fn place(&self, rec: &VmRecord, pid: u32) -> Result<(), String> {
        if let Ok(cg) = &self.res.cgroups {
            cg.create(&rec.name, &Self::limits(rec)).map_err(|e| e.to_string())?;
            cg.attach(&rec.name, pid).map_err(|e| e.to_string())?;
        }
        affinity::set_oom_score_adj(pid, rec.resources.priority.oom_score_adj())
            .map_err(|e| format!("setting the OOM priority of pid {pid}: {e}"))
    }

    /// Sets the affinity of the VMM's threads by `rec`'s pinning (see
    /// [`affinity::plan`]); a VM without pins and CPU set is left alone unless `always`
    /// (its pins were just removed).
    pub(super) fn pin(&self, rec: &VmRecord, pid: u32, always: bool) {
        let r = &rec.resources;
        if r.pin.is_empty() && r.cpuset.is_none() && !always {
            return;
        }
        let allowed = match &r.cpuset {
            Some(s) => s.parse().ok(),
            None => CpuList::online(),
        };
        let Some(allowed) = allowed else { return };
        if let Err(e) = affinity::apply(pid, &r.pin, &allowed) {
            tracing::warn!("VM {}: pinning its threads: {e}", rec.name);
        }
    }

    /// Applies `rec`'s resources to its running VMM now.
    pub(super) fn apply_live(&self, rec: &VmRecord) -> Result<(), ServiceError> {
        let Some(pid) = rec.runtime.pid else { return Ok(()) };
        if let Ok(cg) = &self.res.cgroups {
            cg.create(&rec.name, &Self::limits(rec)).map_err(|e| {
                ServiceError::Refused(format!("VM '{}': the kernel refused the new limits: {e}", rec.name))
            })?;
        }
        affinity::set_oom_score_adj(pid, rec.resources.priority.oom_score_adj())
            .map_err(|source| ServiceError::Io { what: format!("setting the OOM priority of pid {pid}"), source })?;
        self.pin(rec, pid, true);
        Ok(())
    }

    /// Removes `name`'s cgroup once its VMM is gone.
    pub(super) fn unplace(&self, name: &str) {
        if let Ok(cg) = &self.res.cgroups {
            if let Err(e) = cg.remove(name) {
                tracing::warn!("VM {name}: {e}");
            }
        }
    }

    /// Why the kernel's OOM killer took `rec`'s VMM, if it did: read from its cgroup
    /// before the cgroup is removed.
    pub(super) fn oom_reason(&self, rec: &VmRecord) -> Option<String> {
        let cg = self.res.cgroups.as_ref().ok()?;
        let oom = cg.oom(&rec.name)?;
        if oom.kills == 0 {
            return None;
        }
        let limit = Self::limits(rec).memory_max.unwrap_or(0) >> 20;
        let why = match (oom.at_limit, self.res.options.vm_memory_limit_mib) {
            (true, _) => format!("its memory limit of {limit} MiB"),
            (false, Some(all)) if cg.parent_at_limit() => {
                format!("the VMs together reached --vm-memory-limit {all} MiB")
            }
            _ => "the host ran out of memory".to_string(),
        };
        Some(format!(
            "killed by the kernel's OOM killer ({why}; priority {}, oom_score_adj {})",
            rec.resources.priority.as_str(),
            rec.resources.priority.oom_score_adj()
        ))
    }

    /// Where `rec`'s resources are in force, while its VMM runs.
    pub(super) fn placement(&self, rec: &VmRecord) -> Option<Placement> {
        let pid = rec.runtime.pid.filter(|_| rec.runtime.state.is_active())?;
        let vcpu_threads = affinity::threads(pid)
            .ok()?
            .into_iter()
            .filter_map(|(tid, vcpu)| {
                let affinity = affinity::affinity(tid).ok()?.to_string();
                Some(VcpuThread { vcpu: vcpu?, tid, affinity })
            })
            .collect();
        Some(Placement {
            cgroup: self.res.cgroups.as_ref().ok().filter(|cg| cg.exists(&rec.name)).map(|cg| cg.path_of(&rec.name)),
            oom_score_adj: affinity::oom_score_adj(pid).unwrap_or(0),
            vcpu_threads,
        })
    }

    /// One round of the automatic balloon policy (every [`BALLOON_PERIOD`]): VMs with a
    /// `balloon_min_mib` that run get their balloons set by [`balloon::plan`].
    pub(super) fn auto_balloon(&self) {
        if !self.res.options.auto_balloon {
            return;
        }
        let mut round = lock(&self.res.balloon_round);
        let now = Instant::now();
        let elapsed = match round.0 {
            Some(t) if now.duration_since(t) < BALLOON_PERIOD => return,
            Some(t) => now.duration_since(t).as_secs_f64(),
            None => 0.0,
        };
        round.0 = Some(now);
        let Ok(recs) = self.store().list() else { return };
        let mut candidates = Vec::new();
        let mut cpu_now = HashMap::new();
        for rec in &recs {
            let (Some(min), Some(pid)) = (rec.resources.balloon_min_mib, rec.runtime.pid) else { continue };
            if rec.runtime.state != VmState::Running || rec.config.balloon.is_none() {
                continue;
            }
            let cpu = metrics::process(pid).map_or(0.0, |p| p.cpu_seconds);
            let busy = match round.1.get(&rec.name) {
                Some(before) if elapsed > 0.0 => (cpu - before).max(0.0) / elapsed,
                _ => 1.0,
            };
            cpu_now.insert(rec.name.clone(), cpu);
            let Some(b) = self.balloon_info(rec) else { continue };
            candidates.push((
                rec,
                Candidate {
                    name: rec.name.clone(),
                    memory_mib: rec.config.memory_mib,
                    min_mib: min,
                    balloon_mib: b.target_mib,
                    busy,
                },
            ));
        }
        round.1 = cpu_now;
        drop(round);
        if candidates.is_empty() {
            return;
        }
        let available = self.memory_available_mib();
        let marks = Watermarks::for_host(self.host().memory_mib);
        let list: Vec<Candidate> = candidates.iter().map(|(_, c)| c.clone()).collect();
        for (name, target) in balloon::plan(available, marks, &list) {
            let Some((rec, c)) = candidates.iter().find(|(r, _)| r.name == name) else { continue };
            let Ok(_claim) = self.claim(&name, super::SUPERVISE) else { continue };
            match self.vmm_client(&name, &rec.runtime).and_then(|cl| {
                cl.with_timeout(Duration::from_secs(5)).balloon_set(target).map_err(|e| ServiceError::Vmm {
                    vm: name.clone(),
                    what: "vm.balloon",
                    source: Box::new(e),
                })
            }) {
                Ok(()) => {
                    let detail = format!(
                        "balloon {} → {target} MiB (host: {available} MiB available for VMs, watermarks {}/{} MiB; \
                         guest busy {:.0}%)",
                        c.balloon_mib,
                        marks.low_mib,
                        marks.high_mib,
                        c.busy * 100.0
                    );
                    let kind = if target > c.balloon_mib { "balloon-inflated" } else { "balloon-deflated" };
                    let _ = self.store().log(&NewEvent::vm(&name, kind, detail, Peer::default()));
                }
                Err(e) => tracing::warn!("auto-balloon: {e}"),
            }
        }
    }
}
