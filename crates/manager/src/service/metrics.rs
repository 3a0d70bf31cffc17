//! `GET /metrics` (also `/api/v1/metrics`): the VMs and the host in OpenMetrics text, built
//! fresh at each scrape from the store and `/proc` ([`crate::metrics`]).
//!
//! - Per VM (label `vm`): `rustvisor_vm_info{state,accel}` (1), `rustvisor_vm_up` (1 while
//!   running or paused), `rustvisor_vm_restarts_total`, `rustvisor_vm_uptime_seconds`,
//!   `rustvisor_vm_memory_configured_bytes`, `rustvisor_vm_vcpus`; with a live VMM process
//!   also `rustvisor_vm_cpu_seconds_total`, `rustvisor_vm_resident_bytes` and, per vCPU
//!   thread (label `vcpu`), `rustvisor_vcpu_ready_seconds_total` (runnable but waiting for
//!   a host CPU).
//! - Per host: `rustvisor_host_cpus`, `rustvisor_host_memory_bytes`, `rustvisor_vms`
//!   (defined), `rustvisor_vms_running`, and the overcommit ratios of the VMs that are up
//!   (running or paused): `rustvisor_host_vcpu_overcommit_ratio` (their vCPUs / host CPUs)
//!   and `rustvisor_host_memory_overcommit_ratio` (their configured memory / host memory).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{Service, ServiceError};
use crate::metrics;
use crate::types::VmState;

/// The `Content-Type` of the answer.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;
type Gauges = Family<Labels, Gauge<f64, AtomicU64>>;
type Counters = Family<Labels, Counter<f64, AtomicU64>>;

/// A metric family registered in `reg`.
fn gauges(reg: &mut Registry, name: &str, help: &str) -> Gauges {
    let f = Gauges::default();
    reg.register(name, help, f.clone());
    f
}

/// A counter family registered in `reg` (`name` without `_total`: the encoder adds it).
fn counters(reg: &mut Registry, name: &str, help: &str) -> Counters {
    let f = Counters::default();
    reg.register(name, help, f.clone());
    f
}

/// A gauge without labels registered in `reg`.
fn gauge(reg: &mut Registry, name: &str, help: &str, value: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(value);
    reg.register(name, help, g);
}

fn vm(name: &str) -> Labels {
    vec![("vm".into(), name.into())]
}

impl Service {
    /// `GET /metrics`: every VM's and the host's metrics, in OpenMetrics text
    /// ([`METRICS_CONTENT_TYPE`]).
    pub fn metrics(&self) -> Result<String, ServiceError> {
        let vms = self.list()?;
        let mut reg = Registry::default();
        let info = gauges(&mut reg, "rustvisor_vm_info", "A VM: its state and accelerator (always 1)");
        let up = gauges(&mut reg, "rustvisor_vm_up", "Whether the VM is running or paused");
        let restarts = counters(&mut reg, "rustvisor_vm_restarts", "Restarts by the VM's restart policy");
        let uptime = gauges(&mut reg, "rustvisor_vm_uptime_seconds", "Seconds since the VM's VMM started");
        let mem = gauges(&mut reg, "rustvisor_vm_memory_configured_bytes", "The VM's configured memory");
        let vcpus = gauges(&mut reg, "rustvisor_vm_vcpus", "The VM's vCPUs");
        let cpu = counters(&mut reg, "rustvisor_vm_cpu_seconds", "CPU time (user + system) of the VM's VMM process");
        let rss = gauges(&mut reg, "rustvisor_vm_resident_bytes", "Resident memory of the VM's VMM process");
        let ready = counters(
            &mut reg,
            "rustvisor_vcpu_ready_seconds",
            "Time the vCPU thread was runnable but waiting for a host CPU",
        );
        let (mut running, mut up_vcpus, mut up_memory) = (0u64, 0u64, 0u64);
        for v in &vms {
            let l = vm(&v.name);
            let mut il = l.clone();
            il.push(("state".into(), v.state.to_string()));
            il.push(("accel".into(), v.accel.clone()));
            info.get_or_create(&il).set(1.0);
            let is_up = matches!(v.state, VmState::Running | VmState::Paused);
            up.get_or_create(&l).set(if is_up { 1.0 } else { 0.0 });
            restarts.get_or_create(&l).inc_by(f64::from(v.restarts));
            uptime.get_or_create(&l).set(v.uptime_s.unwrap_or(0.0));
            let bytes = v.memory_mib.saturating_mul(1 << 20);
            mem.get_or_create(&l).set(bytes as f64);
            vcpus.get_or_create(&l).set(f64::from(v.cpus));
            if v.state == VmState::Running {
                running += 1;
            }
            if is_up {
                up_vcpus += u64::from(v.cpus);
                up_memory = up_memory.saturating_add(bytes);
            }
            let Some(p) = v.pid.and_then(metrics::process) else { continue };
            cpu.get_or_create(&l).inc_by(p.cpu_seconds);
            rss.get_or_create(&l).set(p.resident_bytes as f64);
            for (i, secs) in p.vcpu_ready_seconds {
                let mut vl = l.clone();
                vl.push(("vcpu".into(), i.to_string()));
                ready.get_or_create(&vl).inc_by(secs);
            }
        }
        let host_cpus = metrics::host_cpus();
        let host_mem = metrics::host_memory_bytes().unwrap_or(0);
        gauge(&mut reg, "rustvisor_host_cpus", "The host's online CPUs", host_cpus as f64);
        gauge(&mut reg, "rustvisor_host_memory_bytes", "The host's memory (MemTotal)", host_mem as f64);
        gauge(&mut reg, "rustvisor_vms", "VMs defined", vms.len() as f64);
        gauge(&mut reg, "rustvisor_vms_running", "VMs running", running as f64);
        gauge(
            &mut reg,
            "rustvisor_host_vcpu_overcommit_ratio",
            "vCPUs of the VMs running or paused per host CPU",
            up_vcpus as f64 / host_cpus.max(1) as f64,
        );
        let mem_ratio = if host_mem == 0 { 0.0 } else { up_memory as f64 / host_mem as f64 };
        gauge(
            &mut reg,
            "rustvisor_host_memory_overcommit_ratio",
            "Configured memory of the VMs running or paused per byte of host memory",
            mem_ratio,
        );
        let mut out = String::new();
        encode(&mut out, &reg)
            .map_err(|e| ServiceError::Io { what: "encoding the metrics".into(), source: std::io::Error::other(e) })?;
        Ok(out)
    }
}
