//! The host's CPUs and memory shared among the VMs: each VMM in a cgroup of its own
//! ([`cgroup`]), its vCPU threads pinned and its OOM priority set ([`affinity`]), starts
//! admitted against an overcommit policy and capacity answered from the same accounting
//! ([`admission`]), and guests ballooned when the host runs short of memory
//! ([`balloon`]). The service applies them ([`crate::service`]); everything here is a
//! file under `/sys/fs/cgroup` or `/proc`, or pure arithmetic, and is tested on its own.

pub mod admission;
pub mod affinity;
pub mod balloon;
pub mod cgroup;
pub mod cpulist;

pub use cpulist::CpuList;
