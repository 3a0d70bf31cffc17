//! One cgroup per VM, holding its whole VMM process: CPU weight, CPU time limit, CPU set
//! and memory limit, and the OOM kills the kernel made in it.
//!
//! Both kernel interfaces are supported, because hosts still ship both: cgroup v2 (the
//! unified hierarchy, `Documentation/admin-guide/cgroup-v2.rst`) when its `cpu` and
//! `memory` controllers are available, else cgroup v1 with one hierarchy per controller
//! (`cpu`, `cpuset`, `memory`; `Documentation/admin-guide/cgroup-v1/`). A VM's group is
//! `<hierarchy>/<parent>/<vm>` (the parent is `rustvisor.slice` unless the daemon's
//! `--cgroup-parent` says otherwise), like libvirt's `machine.slice`.
//!
//! The interface is a handful of files per controller, written here directly: the
//! libraries that wrap it (`cgroups-rs`) bring a D-Bus stack (`zbus`) and a second `nix`
//! for what is a few `write`s.

use std::io;
use std::path::{Path, PathBuf};

use super::CpuList;

/// The CFS period the CPU limit is expressed in, microseconds (systemd uses the same).
pub const CPU_PERIOD_US: u64 = 100_000;

/// What a VM's cgroup enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// CPU weight, 1 to 10000 (100 = the default share).
    pub cpu_weight: u32,
    /// CPU time per [`CPU_PERIOD_US`], microseconds; `None` = no limit.
    pub cpu_quota_us: Option<u64>,
    /// The CPUs it may use; `None` = its parent's.
    pub cpuset: Option<CpuList>,
    /// The most memory it may use, bytes; `None` = no limit.
    pub memory_max: Option<u64>,
}

/// Where the controllers are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2: one mount point holding every controller.
    V2 {
        /// The mount point (e.g. `/sys/fs/cgroup`).
        root: PathBuf,
        /// Whether its `cpuset` controller is available.
        cpuset: bool,
    },
    /// cgroup v1: one mount point per controller.
    V1 {
        /// The `cpu` controller's mount (often shared with `cpuacct`).
        cpu: PathBuf,
        /// The `cpuset` controller's mount, when mounted.
        cpuset: Option<PathBuf>,
        /// The `memory` controller's mount.
        memory: PathBuf,
    },
}

/// The VMs' cgroups on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    hierarchy: Hierarchy,
    /// The VMs' parent group, relative to each hierarchy's root (no leading `/`).
    parent: PathBuf,
}

/// A cgroup operation that failed, with the file.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {source}")]
pub struct CgroupError {
    /// The file or folder.
    pub path: String,
    /// What the kernel said.
    #[source]
    pub source: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError { path: path.display().to_string(), source }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(at(path))
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The value of `key` in a flat-keyed file (`memory.events`, `cpu.stat`,
/// `memory.oom_control`: "key value" lines).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next() == Some(key)).then(|| f.next()?.parse().ok()).flatten()
    })
}

/// The cgroup mounts of `/proc/self/mountinfo` text: (mount point, fstype, super options).
fn cgroup_mounts(mountinfo: &str) -> Vec<(PathBuf, String, String)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split_whitespace().nth(4)?;
            let mut post = post.split_whitespace();
            let fstype = post.next()?;
            let _source = post.next()?;
            let opts = post.next().unwrap_or("");
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| (PathBuf::from(mount_point), fstype.into(), opts.into()))
        })
        .collect()
}

/// Picks the hierarchy from `/proc/self/mountinfo` text; `v2_controllers` reads a v2 mount's
/// `cgroup.controllers`. v2 wins when it offers `cpu` and `memory`.
pub fn pick_hierarchy(mountinfo: &str, v2_controllers: impl Fn(&Path) -> Option<String>) -> Result<Hierarchy, String> {
    let mounts = cgroup_mounts(mountinfo);
    let mut v2_note = String::new();
    for (mp, fstype, _) in &mounts {
        if fstype != "cgroup2" {
            continue;
        }
        let ctl = v2_controllers(mp).unwrap_or_default();
        let has = |c: &str| ctl.split_whitespace().any(|x| x == c);
        if has("cpu") && has("memory") {
            return Ok(Hierarchy::V2 { root: mp.clone(), cpuset: has("cpuset") });
        }
        v2_note = format!("; cgroup v2 at {} has only [{}]", mp.display(), ctl.trim());
    }
    let v1 = |name: &str| {
        mounts
            .iter()
            .find(|(_, fstype, opts)| fstype == "cgroup" && opts.split(',').any(|o| o == name))
            .map(|(mp, _, _)| mp.clone())
    };
    match (v1("cpu"), v1("memory")) {
        (Some(cpu), Some(memory)) => Ok(Hierarchy::V1 { cpu, cpuset: v1("cpuset"), memory }),
        _ => Err(format!("no cgroup hierarchy with the cpu and memory controllers is mounted{v2_note}")),
    }
}

impl Cgroups {
    /// The VMs' cgroups under `parent` (e.g. "rustvisor.slice"; a path relative to each
    /// hierarchy's root) on this host's hierarchy. Errors: why VMs cannot get cgroups here
    /// (no usable hierarchy, or the parent cannot be made: not root, read-only mount).
    pub fn detect(parent: &str) -> Result<Cgroups, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        let hierarchy = pick_hierarchy(&mountinfo, |mp| read(&mp.join("cgroup.controllers")))?;
        let cg = Cgroups::new(hierarchy, parent)?;
        cg.make_parent().map_err(|e| e.to_string())?;
        Ok(cg)
    }

    /// The VMs' cgroups under `parent` in `hierarchy` (nothing is made yet).
    pub fn new(hierarchy: Hierarchy, parent: &str) -> Result<Cgroups, String> {
        let parent = PathBuf::from(parent.trim_start_matches('/'));
        let ok =
            !parent.as_os_str().is_empty() && parent.components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if !ok {
            return Err(format!(
                "cgroup parent '{}' (accepted: a relative path such as rustvisor.slice)",
                parent.display()
            ));
        }
        Ok(Cgroups { hierarchy, parent })
    }

    /// "cgroup v2 at /sys/fs/cgroup/rustvisor.slice" or "cgroup v1 (cpu, cpuset, memory)
    /// under rustvisor.slice".
    pub fn describe(&self) -> String {
        match &self.hierarchy {
            Hierarchy::V2 { root, cpuset } => format!(
                "cgroup v2 at {}{}",
                root.join(&self.parent).display(),
                if *cpuset { "" } else { " (no cpuset controller)" }
            ),
            Hierarchy::V1 { cpuset, .. } => format!(
                "cgroup v1 ({}) under {}",
                if cpuset.is_some() { "cpu, cpuset, memory" } else { "cpu, memory" },
                self.parent.display()
            ),
        }
    }

    /// Whether `cpuset` limits can be enforced.
    pub fn has_cpuset(&self) -> bool {
        match &self.hierarchy {
            Hierarchy::V2 { cpuset, .. } => *cpuset,
            Hierarchy::V1 { cpuset, .. } => cpuset.is_some(),
        }
    }

    /// The parent group in each hierarchy: (controller, folder).
    fn parents(&self) -> Vec<(&'static str, PathBuf)> {
        match &self.hierarchy {
            Hierarchy::V2 { root, .. } => vec![("", root.join(&self.parent))],
            Hierarchy::V1 { cpu, cpuset, memory } => {
                let mut v = vec![("cpu", cpu.join(&self.parent)), ("memory", memory.join(&self.parent))];
                if let Some(c) = cpuset {
                    v.push(("cpuset", c.join(&self.parent)));
                }
                v
            }
        }
    }

    /// VM `vm`'s group in each hierarchy: (controller, folder).
    fn groups(&self, vm: &str) -> Vec<(&'static str, PathBuf)> {
        self.parents().into_iter().map(|(c, p)| (c, p.join(vm))).collect()
    }

    /// VM `vm`'s group folders, joined by ", " (for `vm info`).
    pub fn path_of(&self, vm: &str) -> String {
        self.groups(vm).iter().map(|(_, p)| p.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    /// The folder of `controller` ("cpu", "memory", "cpuset"; ignored on v2) for `vm`.
    fn group(&self, vm: &str, controller: &str) -> Option<PathBuf> {
        self.groups(vm).into_iter().find(|(c, _)| c.is_empty() || *c == controller).map(|(_, p)| p)
    }

    /// Makes the parent groups and hands them the controllers (v2 `cgroup.subtree_control`;
    /// v1 `cpuset` copies its parent's CPUs and memory nodes, which a new v1 cpuset lacks).
    fn make_parent(&self) -> Result<(), CgroupError> {
        for (controller, dir) in self.parents() {
            std::fs::create_dir_all(&dir).map_err(at(&dir))?;
            match (&self.hierarchy, controller) {
                (Hierarchy::V2 { root, cpuset }, _) => {
                    let ctl = if *cpuset { "+cpu +cpuset +memory" } else { "+cpu +memory" };
                    // Each level from the root down to the parent passes the controllers on.
                    let mut level = root.clone();
                    for part in self.parent.components() {
                        write(&level.join("cgroup.subtree_control"), ctl)?;
                        level.push(part);
                    }
                    write(&level.join("cgroup.subtree_control"), ctl)?;
                }
                (Hierarchy::V1 { cpuset: Some(root), .. }, "cpuset") => {
                    // Each level below the root gets its parent's CPUs and memory nodes.
                    let mut level = root.clone();
                    for part in self.parent.components() {
                        level.push(part);
                        inherit_cpuset(&level)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Limits the memory of all VMs together (the parent group's `memory.max`; `None` = no
    /// limit): above it the kernel reclaims and then OOM-kills among the VMs only, in their
    /// `oom_score_adj` order.
    pub fn set_parent_memory_max(&self, bytes: Option<u64>) -> Result<(), CgroupError> {
        let (_, dir) = self
            .parents()
            .into_iter()
            .find(|(c, _)| c.is_empty() || *c == "memory")
            .ok_or_else(|| not_made("parent"))?;
        match self.hierarchy {
            Hierarchy::V2 { .. } => write(&dir.join("memory.max"), &bytes.map_or("max".to_string(), |b| b.to_string())),
            Hierarchy::V1 { .. } => {
                write(&dir.join("memory.limit_in_bytes"), &bytes.map_or("-1".to_string(), |b| b.to_string()))
            }
        }
    }

    /// Whether all VMs together ever hit the parent group's memory limit.
    pub fn parent_at_limit(&self) -> bool {
        let Some((_, dir)) = self.parents().into_iter().find(|(c, _)| c.is_empty() || *c == "memory") else {
            return false;
        };
        match self.hierarchy {
            Hierarchy::V2 { .. } => read(&dir.join("memory.events")).and_then(|e| keyed(&e, "max")).unwrap_or(0) > 0,
            Hierarchy::V1 { .. } => {
                read(&dir.join("memory.failcnt")).and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0) > 0
            }
        }
    }

    /// Memory charged to all VMs together now, bytes.
    pub fn parent_memory_current(&self) -> Option<u64> {
        let (_, dir) = self.parents().into_iter().find(|(c, _)| c.is_empty() || *c == "memory")?;
        let file = match self.hierarchy {
            Hierarchy::V2 { .. } => "memory.current",
            Hierarchy::V1 { .. } => "memory.usage_in_bytes",
        };
        read(&dir.join(file))?.trim().parse().ok()
    }

    /// Removes the (empty) parent group, and the levels above it that are empty.
    pub fn remove_parent(&self) -> Result<(), CgroupError> {
        for (_, dir) in self.parents() {
            let mut d = dir.as_path();
            for _ in self.parent.components() {
                match std::fs::remove_dir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(at(d)(e)),
                }
                let Some(up) = d.parent() else { break };
                d = up;
            }
        }
        Ok(())
    }

    /// Makes VM `vm`'s group (kept if it exists) and sets `limits`.
    pub fn create(&self, vm: &str, limits: &Limits) -> Result<(), CgroupError> {
        self.make_parent()?;
        for (controller, dir) in self.groups(vm) {
            match std::fs::create_dir(&dir) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(at(&dir)(e)),
                _ => {}
            }
            if controller == "cpuset" {
                inherit_cpuset(&dir)?;
            }
        }
        self.apply(vm, limits)
    }

    /// Sets `limits` on VM `vm`'s existing group (at once for the processes in it).
    pub fn apply(&self, vm: &str, limits: &Limits) -> Result<(), CgroupError> {
        let cpu = self.group(vm, "cpu").ok_or_else(|| not_made(vm))?;
        let memory = self.group(vm, "memory").ok_or_else(|| not_made(vm))?;
        let cpuset = self.group(vm, "cpuset");
        let weight = limits.cpu_weight.clamp(1, 10_000);
        match &self.hierarchy {
            Hierarchy::V2 { .. } => {
                write(&cpu.join("cpu.weight"), &weight.to_string())?;
                let max = match limits.cpu_quota_us {
                    Some(q) => format!("{} {CPU_PERIOD_US}", q.max(1000)),
                    None => format!("max {CPU_PERIOD_US}"),
                };
                write(&cpu.join("cpu.max"), &max)?;
                let mem = limits.memory_max.map_or("max".to_string(), |b| b.to_string());
                write(&memory.join("memory.max"), &mem)?;
            }
            Hierarchy::V1 { .. } => {
                write(&cpu.join("cpu.shares"), &(u64::from(weight) * 1024 / 100).max(2).to_string())?;
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                let quota = limits.cpu_quota_us.map_or("-1".to_string(), |q| q.max(1000).to_string());
                write(&cpu.join("cpu.cfs_quota_us"), &quota)?;
                // v1 takes -1 for "no limit".
                let mem = limits.memory_max.map_or("-1".to_string(), |b| b.to_string());
                write(&memory.join("memory.limit_in_bytes"), &mem)?;
            }
        }
        if let Some(dir) = cpuset {
            let cpus = match (&limits.cpuset, &self.hierarchy) {
                (Some(l), _) => l.to_string(),
                // v2: an empty cpuset.cpus is the parent's; v1 needs the parent's spelled out.
                (None, Hierarchy::V2 { .. }) => String::new(),
                (None, Hierarchy::V1 { .. }) => {
                    let parent = dir.parent().map(|p| p.join("cpuset.cpus")).unwrap_or_default();
                    read(&parent).unwrap_or_default().trim().to_string()
                }
            };
            write(&dir.join("cpuset.cpus"), &cpus)?;
        }
        Ok(())
    }

    /// Moves process `pid` (all its threads) into VM `vm`'s group.
    pub fn attach(&self, vm: &str, pid: u32) -> Result<(), CgroupError> {
        for (_, dir) in self.groups(vm) {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Removes VM `vm`'s group once its processes have exited (retrying for up to a second
    /// while the kernel finishes their exit). Absent groups are fine.
    pub fn remove(&self, vm: &str) -> Result<(), CgroupError> {
        for (_, dir) in self.groups(vm) {
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if tries < 50 && e.raw_os_error() == Some(libc::EBUSY) => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => return Err(at(&dir)(e)),
                }
            }
        }
        Ok(())
    }

    /// Whether VM `vm` has a group now.
    pub fn exists(&self, vm: &str) -> bool {
        self.groups(vm).iter().all(|(_, d)| d.is_dir())
    }

    /// Processes the kernel's OOM killer killed in VM `vm`'s group (any OOM: the group's
    /// limit or the host's), and whether the group hit its own limit; `None` when unreadable.
    pub fn oom(&self, vm: &str) -> Option<OomCount> {
        let dir = self.group(vm, "memory")?;
        match &self.hierarchy {
            Hierarchy::V2 { .. } => {
                let ev = read(&dir.join("memory.events"))?;
                Some(OomCount { kills: keyed(&ev, "oom_kill")?, at_limit: keyed(&ev, "max").unwrap_or(0) > 0 })
            }
            Hierarchy::V1 { .. } => {
                let ctl = read(&dir.join("memory.oom_control"))?;
                let failcnt = read(&dir.join("memory.failcnt")).and_then(|s| s.trim().parse::<u64>().ok());
                Some(OomCount { kills: keyed(&ctl, "oom_kill")?, at_limit: failcnt.unwrap_or(0) > 0 })
            }
        }
    }

    /// Memory charged to VM `vm`'s group now, bytes.
    pub fn memory_current(&self, vm: &str) -> Option<u64> {
        let dir = self.group(vm, "memory")?;
        let file = match self.hierarchy {
            Hierarchy::V2 { .. } => "memory.current",
            Hierarchy::V1 { .. } => "memory.usage_in_bytes",
        };
        read(&dir.join(file))?.trim().parse().ok()
    }

    /// Time VM `vm`'s group was held back by its CPU limit, seconds.
    pub fn cpu_throttled_seconds(&self, vm: &str) -> Option<f64> {
        let stat = read(&self.group(vm, "cpu")?.join("cpu.stat"))?;
        match self.hierarchy {
            Hierarchy::V2 { .. } => keyed(&stat, "throttled_usec").map(|us| us as f64 / 1e6),
            Hierarchy::V1 { .. } => keyed(&stat, "throttled_time").map(|ns| ns as f64 / 1e9),
        }
    }
}

/// OOM kills in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OomCount {
    /// Processes killed.
    pub kills: u64,
    /// Whether the group ever hit its own memory limit (else the host ran out).
    pub at_limit: bool,
}

fn not_made(vm: &str) -> CgroupError {
    CgroupError { path: vm.into(), source: io::Error::new(io::ErrorKind::NotFound, "no such VM group") }
}

/// A new v1 cpuset has no CPUs and no memory nodes, so no task can join it: copy its
/// parent's where empty.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else { return Ok(()) };
    for f in ["cpuset.cpus", "cpuset.mems"] {
        let own = read(&dir.join(f)).unwrap_or_default();
        if own.trim().is_empty() {
            let theirs = read(&parent.join(f)).unwrap_or_default();
            write(&dir.join(f), theirs.trim())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
30 1 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const MOUNTINFO_V2: &str = "25 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn hierarchies_are_picked_from_mountinfo() {
        let h = pick_hierarchy(MOUNTINFO_V1, |_| Some("hugetlb\n".into())).unwrap();
        assert_eq!(
            h,
            Hierarchy::V1 {
                cpu: "/sys/fs/cgroup/cpu".into(),
                cpuset: Some("/sys/fs/cgroup/cpuset".into()),
                memory: "/sys/fs/cgroup/memory".into()
            }
        );
        let h = pick_hierarchy(MOUNTINFO_V2, |_| Some("cpuset cpu io memory pids\n".into())).unwrap();
        assert_eq!(h, Hierarchy::V2 { root: "/sys/fs/cgroup".into(), cpuset: true });
        let e = pick_hierarchy(MOUNTINFO_V2, |_| Some("pids\n".into())).unwrap_err();
        assert!(e.contains("only [pids]"), "{e}");
        // This host's own mounts give one or the other, or a reason.
        let own = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let _ = pick_hierarchy(&own, |mp| read(&mp.join("cgroup.controllers")));
    }

    #[test]
    fn keyed_files() {
        let ev = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n";
        assert_eq!(keyed(ev, "oom_kill"), Some(1));
        assert_eq!(keyed(ev, "max"), Some(3));
        assert_eq!(keyed(ev, "oom_group_kill"), None);
        assert_eq!(keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill"), Some(2));
    }

    #[test]
    fn parents_must_be_relative_paths() {
        let h = Hierarchy::V2 { root: "/x".into(), cpuset: true };
        assert!(Cgroups::new(h.clone(), "/rustvisor.slice").is_ok());
        for bad in ["", "/", "../x", "a/../../b"] {
            assert!(Cgroups::new(h.clone(), bad).is_err(), "{bad}");
        }
    }

    /// The files a v1 and a v2 group get, in a fake tree (plain folders: the kernel's own
    /// files appear only in a real cgroup mount).
    #[test]
    fn limits_become_files() {
        let tmp = std::env::temp_dir().join(format!("rv-cgroup-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let (cpu, cpuset, memory) = (tmp.join("cpu"), tmp.join("cpuset"), tmp.join("memory"));
        for d in [&cpu, &cpuset, &memory] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(cpuset.join("cpuset.cpus"), "0-3\n").unwrap();
        std::fs::write(cpuset.join("cpuset.mems"), "0\n").unwrap();
        let v1 = Cgroups::new(
            Hierarchy::V1 { cpu: cpu.clone(), cpuset: Some(cpuset.clone()), memory: memory.clone() },
            "a/rv",
        )
        .unwrap();
        let lim = Limits { cpu_weight: 200, cpu_quota_us: Some(50_000), cpuset: None, memory_max: Some(1 << 30) };
        v1.create("web", &lim).unwrap();
        let rd = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(rd(cpu.join("a/rv/web/cpu.shares")), "2048");
        assert_eq!(rd(cpu.join("a/rv/web/cpu.cfs_quota_us")), "50000");
        assert_eq!(rd(memory.join("a/rv/web/memory.limit_in_bytes")), (1u64 << 30).to_string());
        assert_eq!(rd(cpuset.join("a/rv/cpuset.cpus")), "0-3");
        assert_eq!(rd(cpuset.join("a/rv/web/cpuset.mems")), "0");
        assert_eq!(rd(cpuset.join("a/rv/web/cpuset.cpus")), "0-3");
        v1.apply(
            "web",
            &Limits { cpuset: Some(CpuList::of([1])), cpu_quota_us: None, memory_max: None, ..lim.clone() },
        )
        .unwrap();
        assert_eq!(rd(cpuset.join("a/rv/web/cpuset.cpus")), "1");
        assert_eq!(rd(cpu.join("a/rv/web/cpu.cfs_quota_us")), "-1");
        assert_eq!(rd(memory.join("a/rv/web/memory.limit_in_bytes")), "-1");
        assert!(v1.exists("web"));
        assert!(v1.path_of("web").contains("cpu/a/rv/web"));
        assert_eq!(rd(cpuset.join("a/cpuset.cpus")), "0-3");

        let root = tmp.join("v2");
        std::fs::create_dir_all(&root).unwrap();
        let v2 = Cgroups::new(Hierarchy::V2 { root: root.clone(), cpuset: true }, "a/b").unwrap();
        v2.create("db", &lim).unwrap();
        assert_eq!(rd(root.join("cgroup.subtree_control")), "+cpu +cpuset +memory");
        assert_eq!(rd(root.join("a/b/cgroup.subtree_control")), "+cpu +cpuset +memory");
        assert_eq!(rd(root.join("a/b/db/cpu.weight")), "200");
        assert_eq!(rd(root.join("a/b/db/cpu.max")), "50000 100000");
        assert_eq!(rd(root.join("a/b/db/memory.max")), (1u64 << 30).to_string());
        assert_eq!(rd(root.join("a/b/db/cpuset.cpus")), "");
        std::fs::write(root.join("a/b/db/memory.events"), "max 2\noom 1\noom_kill 1\n").unwrap();
        assert_eq!(v2.oom("db"), Some(OomCount { kills: 1, at_limit: true }));
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
