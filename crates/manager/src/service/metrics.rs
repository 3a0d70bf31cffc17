//! `GET /api/v1/stats` (one JSON sample of every VM's counters, for `rustvisor top`) and
//! `GET /metrics` (also `/api/v1/metrics`: the same sample in OpenMetrics text), built
//! fresh at each request from the store, `/proc`, the VMs' cgroups and their VMMs' APIs.
//!
//! Metrics, per VM (label `vm`):
//! - `rustvisor_vm_info{state,accel}` (1), `rustvisor_vm_up` (1 while running or paused),
//!   `rustvisor_vm_restarts_total`, `rustvisor_vm_uptime_seconds`,
//!   `rustvisor_vm_memory_configured_bytes`, `rustvisor_vm_vcpus`;
//! - with a live VMM: `rustvisor_vm_cpu_seconds_total`, `rustvisor_vm_resident_bytes`,
//!   `rustvisor_vm_ksm_merging_bytes`, `rustvisor_vm_cgroup_memory_bytes`,
//!   `rustvisor_vm_cpu_throttled_seconds_total`; per vCPU (label `vcpu`)
//!   `rustvisor_vcpu_cpu_seconds_total` and `rustvisor_vcpu_ready_seconds_total` (runnable
//!   but waiting for a host CPU);
//! - its balloon: `rustvisor_vm_balloon_target_bytes`, `rustvisor_vm_balloon_actual_bytes`,
//!   and from the guest's statistics `rustvisor_vm_guest_memory_total_bytes`,
//!   `rustvisor_vm_guest_memory_free_bytes`, `rustvisor_vm_guest_memory_available_bytes`;
//! - per disk (label `disk`): `rustvisor_disk_ops_total{op=read|write|flush}`,
//!   `rustvisor_disk_bytes_total{op=read|write}`, `rustvisor_disk_errors_total`,
//!   `rustvisor_disk_latency_seconds{op}` (a histogram: request taken off the virtqueue →
//!   completion);
//! - per NIC (label `nic`): `rustvisor_nic_bytes_total{dir=rx|tx}`,
//!   `rustvisor_nic_packets_total{dir}`, `rustvisor_nic_dropped_total{dir}`,
//!   `rustvisor_nic_errors_total{dir}`.
//!
//! Per host: `rustvisor_host_cpus`, `rustvisor_host_memory_bytes`,
//! `rustvisor_host_memory_available_bytes`, `rustvisor_vms`, `rustvisor_vms_running`, the
//! overcommit ratios of the VMs that are up (`rustvisor_host_vcpu_overcommit_ratio`,
//! `rustvisor_host_memory_overcommit_ratio`) and KSM's `rustvisor_host_ksm_saved_bytes`.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use api::client::Client;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use super::{Service, ServiceError};
use crate::metrics;
use crate::store::now_ms;
use crate::types::{Stats, VcpuStats, VmState, VmStats};

/// The `Content-Type` of the answer.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;
type Gauges = Family<Labels, Gauge<f64, AtomicU64>>;
type Counters = Family<Labels, Counter<f64, AtomicU64>>;
type Histograms = Family<Labels, FixedHistogram>;

/// A histogram whose buckets the VMM already counted.
#[derive(Debug, Default)]
struct FixedHistogram(Mutex<Buckets>);

/// Sum, count and (upper bound, count in that bucket, not cumulative; the last bound +Inf).
#[derive(Debug, Default)]
struct Buckets(f64, u64, Vec<(f64, u64)>);

impl FixedHistogram {
    /// Sets it from the VMM's cumulative shape (`bounds_s[i]` → `cumulative[i]`, `count`
    /// requests in all, `sum_s` seconds).
    fn set(&self, h: &api::types::LatencyHistogram) {
        let mut buckets = Vec::with_capacity(h.bounds_s.len() + 1);
        let mut below = 0;
        for (&le, &c) in h.bounds_s.iter().zip(&h.cumulative) {
            buckets.push((le, c.saturating_sub(below)));
            below = c;
        }
        buckets.push((f64::INFINITY, h.count.saturating_sub(below)));
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Buckets(h.sum_s, h.count, buckets);
    }
}

impl TypedMetric for FixedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for FixedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        encoder.encode_histogram::<NoLabelSet>(g.0, g.1, &g.2, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

fn register<M: Default + EncodeMetric + std::fmt::Debug + Send + Sync + 'static>(
    reg: &mut Registry,
    name: &str,
    help: &str,
) -> Family<Labels, M>
where
    Family<Labels, M>: EncodeMetric,
{
    let f = Family::<Labels, M>::default();
    reg.register(name, help, f.clone());
    f
}

/// A gauge without labels registered in `reg`.
fn gauge(reg: &mut Registry, name: &str, help: &str, value: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(value);
    reg.register(name, help, g);
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl Service {
    /// `GET /api/v1/stats`: a sample of every VM's counters (see [`Stats`]).
    pub fn stats(&self) -> Result<Stats, ServiceError> {
        let host = self.host_info()?;
        let cgroups = self.res.cgroups.as_ref().ok();
        let mut vms = Vec::new();
        for rec in self.store().list()? {
            let v = self.summary(&rec)?;
            let mut s = VmStats {
                name: v.name.clone(),
                state: v.state,
                cpus: v.cpus,
                memory_mib: v.memory_mib,
                accel: v.accel.clone(),
                restarts: v.restarts,
                uptime_s: v.uptime_s,
                cpu_seconds: None,
                resident_bytes: None,
                ksm_merging_bytes: None,
                vcpus: Vec::new(),
                cgroup_memory_bytes: None,
                cpu_throttled_seconds: None,
                devices: Default::default(),
                balloon: None,
            };
            let live = matches!(v.state, VmState::Running | VmState::Paused);
            if let (true, Some(pid)) = (live, v.pid) {
                if let Some(p) = metrics::process(pid) {
                    s.cpu_seconds = Some(p.cpu_seconds);
                    s.resident_bytes = Some(p.resident_bytes);
                    s.vcpus = p
                        .vcpus
                        .iter()
                        .map(|c| VcpuStats {
                            vcpu: c.index,
                            cpu_seconds: c.cpu_seconds,
                            ready_seconds: c.ready_seconds,
                        })
                        .collect();
                }
                s.ksm_merging_bytes = vmm::ksm::process(&vmm::ksm::proc_dir(pid)).ok().map(|k| k.merging_bytes());
                if let Some(cg) = cgroups {
                    s.cgroup_memory_bytes = cg.memory_current(&rec.name);
                    s.cpu_throttled_seconds = cg.cpu_throttled_seconds(&rec.name);
                }
                let client = rec
                    .runtime
                    .socket
                    .as_deref()
                    .and_then(|sock| Client::new(sock).ok())
                    .map(|c| c.with_timeout(Duration::from_secs(2)));
                if let Some(c) = client {
                    if let Ok(counters) = c.counters() {
                        s.devices = counters.devices;
                    }
                    if rec.config.balloon.is_some() {
                        s.balloon = c.balloon_info().ok();
                    }
                }
            }
            vms.push(s);
        }
        let ksm = vmm::ksm::host(std::path::Path::new(vmm::ksm::SYS_KSM)).ok();
        Ok(Stats { time_ms: now_ms(), host, ksm, vms })
    }

    /// `GET /metrics`: every VM's and the host's metrics, in OpenMetrics text
    /// ([`METRICS_CONTENT_TYPE`]).
    pub fn metrics(&self) -> Result<String, ServiceError> {
        let stats = self.stats()?;
        let mut reg = Registry::default();
        let info: Gauges = register(&mut reg, "rustvisor_vm_info", "A VM: its state and accelerator (always 1)");
        let up: Gauges = register(&mut reg, "rustvisor_vm_up", "Whether the VM is running or paused");
        let restarts: Counters = register(&mut reg, "rustvisor_vm_restarts", "Restarts by the VM's restart policy");
        let uptime: Gauges = register(&mut reg, "rustvisor_vm_uptime_seconds", "Seconds since the VM's VMM started");
        let mem: Gauges = register(&mut reg, "rustvisor_vm_memory_configured_bytes", "The VM's configured memory");
        let vcpus: Gauges = register(&mut reg, "rustvisor_vm_vcpus", "The VM's vCPUs");
        let cpu: Counters =
            register(&mut reg, "rustvisor_vm_cpu_seconds", "CPU time (user + system) of the VM's VMM process");
        let rss: Gauges = register(&mut reg, "rustvisor_vm_resident_bytes", "Resident memory of the VM's VMM process");
        let ksm: Gauges = register(
            &mut reg,
            "rustvisor_vm_ksm_merging_bytes",
            "Guest RAM of the VM that KSM merged with other pages",
        );
        let cg_mem: Gauges =
            register(&mut reg, "rustvisor_vm_cgroup_memory_bytes", "Memory charged to the VM's cgroup");
        let throttled: Counters =
            register(&mut reg, "rustvisor_vm_cpu_throttled_seconds", "Time the VM's CPU limit held it back");
        let vcpu_cpu: Counters =
            register(&mut reg, "rustvisor_vcpu_cpu_seconds", "CPU time (user + system) of the vCPU's thread");
        let ready: Counters = register(
            &mut reg,
            "rustvisor_vcpu_ready_seconds",
            "Time the vCPU thread was runnable but waiting for a host CPU",
        );
        let bal_target: Gauges =
            register(&mut reg, "rustvisor_vm_balloon_target_bytes", "The balloon size asked of the guest");
        let bal_actual: Gauges =
            register(&mut reg, "rustvisor_vm_balloon_actual_bytes", "The balloon size the guest reports");
        let g_total: Gauges =
            register(&mut reg, "rustvisor_vm_guest_memory_total_bytes", "The guest's MemTotal (balloon statistics)");
        let g_free: Gauges =
            register(&mut reg, "rustvisor_vm_guest_memory_free_bytes", "The guest's MemFree (balloon statistics)");
        let g_avail: Gauges = register(
            &mut reg,
            "rustvisor_vm_guest_memory_available_bytes",
            "The guest's MemAvailable (balloon statistics)",
        );
        let disk_ops: Counters = register(&mut reg, "rustvisor_disk_ops", "Disk requests completed, by operation");
        let disk_bytes: Counters =
            register(&mut reg, "rustvisor_disk_bytes", "Bytes moved by successful disk requests, by operation");
        let disk_errors: Counters = register(&mut reg, "rustvisor_disk_errors", "Disk requests that failed");
        let disk_lat: Histograms = register(
            &mut reg,
            "rustvisor_disk_latency_seconds",
            "Disk request latency (taken off the virtqueue to completed), by operation",
        );
        let nic_bytes: Counters = register(&mut reg, "rustvisor_nic_bytes", "Ethernet bytes, by direction");
        let nic_packets: Counters = register(&mut reg, "rustvisor_nic_packets", "Frames, by direction");
        let nic_dropped: Counters = register(&mut reg, "rustvisor_nic_dropped", "Frames dropped, by direction");
        let nic_errors: Counters = register(&mut reg, "rustvisor_nic_errors", "Frame errors, by direction");
        let mut running = 0u64;
        for v in &stats.vms {
            let name = v.name.as_str();
            let l = labels(&[("vm", name)]);
            let state = v.state.to_string();
            info.get_or_create(&labels(&[("vm", name), ("state", &state), ("accel", &v.accel)])).set(1.0);
            let is_up = matches!(v.state, VmState::Running | VmState::Paused);
            up.get_or_create(&l).set(if is_up { 1.0 } else { 0.0 });
            restarts.get_or_create(&l).inc_by(f64::from(v.restarts));
            uptime.get_or_create(&l).set(v.uptime_s.unwrap_or(0.0));
            mem.get_or_create(&l).set(v.memory_mib.saturating_mul(1 << 20) as f64);
            vcpus.get_or_create(&l).set(f64::from(v.cpus));
            if v.state == VmState::Running {
                running += 1;
            }
            if let Some(c) = v.cpu_seconds {
                cpu.get_or_create(&l).inc_by(c);
            }
            if let Some(r) = v.resident_bytes {
                rss.get_or_create(&l).set(r as f64);
            }
            if let Some(k) = v.ksm_merging_bytes {
                ksm.get_or_create(&l).set(k as f64);
            }
            if let Some(m) = v.cgroup_memory_bytes {
                cg_mem.get_or_create(&l).set(m as f64);
            }
            if let Some(t) = v.cpu_throttled_seconds {
                throttled.get_or_create(&l).inc_by(t);
            }
            for c in &v.vcpus {
                let vl = labels(&[("vm", name), ("vcpu", &c.vcpu.to_string())]);
                vcpu_cpu.get_or_create(&vl).inc_by(c.cpu_seconds);
                ready.get_or_create(&vl).inc_by(c.ready_seconds);
            }
            if let Some(b) = &v.balloon {
                bal_target.get_or_create(&l).set((b.target_mib << 20) as f64);
                bal_actual.get_or_create(&l).set((b.actual_mib << 20) as f64);
                if let Some(st) = &b.stats {
                    for (family, value) in
                        [(&g_total, st.total_bytes), (&g_free, st.free_bytes), (&g_avail, st.available_bytes)]
                    {
                        if let Some(x) = value {
                            family.get_or_create(&l).set(x as f64);
                        }
                    }
                }
            }
            for (dev, d) in &v.devices {
                if let Some(b) = &d.block {
                    let dl = |op: &str| labels(&[("vm", name), ("disk", dev), ("op", op)]);
                    disk_ops.get_or_create(&dl("read")).inc_by(b.read_ops as f64);
                    disk_ops.get_or_create(&dl("write")).inc_by(b.write_ops as f64);
                    disk_ops.get_or_create(&dl("flush")).inc_by(b.flush_ops as f64);
                    disk_bytes.get_or_create(&dl("read")).inc_by(b.read_bytes as f64);
                    disk_bytes.get_or_create(&dl("write")).inc_by(b.write_bytes as f64);
                    disk_errors.get_or_create(&labels(&[("vm", name), ("disk", dev)])).inc_by(d.errors as f64);
                    disk_lat.get_or_create(&dl("read")).set(&b.read_latency);
                    disk_lat.get_or_create(&dl("write")).set(&b.write_latency);
                    disk_lat.get_or_create(&dl("flush")).set(&b.flush_latency);
                }
                if let Some(n) = &d.net {
                    let nl = |dir: &str| labels(&[("vm", name), ("nic", dev), ("dir", dir)]);
                    nic_bytes.get_or_create(&nl("rx")).inc_by(n.rx_bytes as f64);
                    nic_bytes.get_or_create(&nl("tx")).inc_by(n.tx_bytes as f64);
                    nic_packets.get_or_create(&nl("rx")).inc_by(n.rx_packets as f64);
                    nic_packets.get_or_create(&nl("tx")).inc_by(n.tx_packets as f64);
                    nic_dropped.get_or_create(&nl("rx")).inc_by(n.rx_dropped as f64);
                    nic_dropped.get_or_create(&nl("tx")).inc_by(n.tx_dropped as f64);
                    nic_errors.get_or_create(&nl("rx")).inc_by(n.rx_errors as f64);
                    nic_errors.get_or_create(&nl("tx")).inc_by(n.tx_errors as f64);
                }
            }
        }
        let h = &stats.host;
        gauge(&mut reg, "rustvisor_host_cpus", "The host's online CPUs", h.cpus as f64);
        gauge(
            &mut reg,
            "rustvisor_host_memory_bytes",
            "Memory for VMs: MemTotal, or --vm-memory-limit when lower",
            (h.memory_mib << 20) as f64,
        );
        gauge(
            &mut reg,
            "rustvisor_host_memory_available_bytes",
            "Memory available for VMs now",
            (h.memory_available_mib << 20) as f64,
        );
        gauge(&mut reg, "rustvisor_vms", "VMs defined", stats.vms.len() as f64);
        gauge(&mut reg, "rustvisor_vms_running", "VMs running", running as f64);
        gauge(
            &mut reg,
            "rustvisor_host_vcpu_overcommit_ratio",
            "vCPUs of the VMs running or paused per host CPU",
            h.committed_vcpus as f64 / h.cpus.max(1) as f64,
        );
        gauge(
            &mut reg,
            "rustvisor_host_memory_overcommit_ratio",
            "Configured memory of the VMs running or paused per byte of host memory",
            h.committed_memory_mib as f64 / h.memory_mib.max(1) as f64,
        );
        if let Some(k) = &stats.ksm {
            gauge(
                &mut reg,
                "rustvisor_host_ksm_saved_bytes",
                "Memory KSM saves (pages_sharing)",
                k.saved_bytes() as f64,
            );
        }
        let mut out = String::new();
        encode(&mut out, &reg)
            .map_err(|e| ServiceError::Io { what: "encoding the metrics".into(), source: std::io::Error::other(e) })?;
        Ok(out)
    }
}
