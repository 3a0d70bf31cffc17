//! The OpenAPI document's schemas against the serde types, field by field, both ways: every
//! property the document lists is a field the type (de)serialises and the reverse, and an
//! object with only the document's `required` properties deserialises.

use std::collections::{BTreeMap, BTreeSet};

use api_types::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

fn schemas() -> serde_yaml::Mapping {
    let doc: serde_yaml::Value = serde_yaml::from_str(OPENAPI_YAML).expect("openapi.yaml parses");
    doc["components"]["schemas"].as_mapping().expect("components.schemas").clone()
}

fn schema_props(name: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let s = schemas();
    let schema = s.get(name).unwrap_or_else(|| panic!("schema {name} missing"));
    let props = schema["properties"].as_mapping().unwrap_or_else(|| panic!("{name}: no properties"));
    let props = props.keys().map(|k| k.as_str().unwrap().to_string()).collect();
    let required = schema
        .get("required")
        .and_then(|r| r.as_sequence())
        .map(|r| r.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    (props, required)
}

/// Checks `example` (every optional field set) against schema `name`.
fn check<T: Serialize + DeserializeOwned>(name: &str, example: &T) {
    let (props, required) = schema_props(name);
    let Value::Object(full) = serde_json::to_value(example).unwrap() else { panic!("{name}: not an object") };
    let keys: BTreeSet<String> = full.keys().cloned().collect();
    assert_eq!(props, keys, "{name}: schema properties (left) against the type's fields (right)");
    assert!(required.is_subset(&props), "{name}: required names unknown properties");
    let minimal: serde_json::Map<String, Value> =
        full.iter().filter(|(k, _)| required.contains(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    if let Err(e) = serde_json::from_value::<T>(Value::Object(minimal)) {
        panic!("{name}: an object with only the required properties {required:?} is refused: {e}");
    }
}

fn vm_config() -> VmConfig {
    VmConfig {
        kernel: "/k".into(),
        initrd: Some("/i".into()),
        cmdline: "console=ttyS0".into(),
        memory_mib: 512,
        cpus: 1,
        accel: Accel::Emu,
        serial: ConsoleOut::Null,
        console: Some(ConsoleOut::File("/c.log".into())),
        disks: vec![disk()],
        nets: vec![NetConfig { tap: "tap0".into(), mac: Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])) }],
        vsock: Some(VsockConfig { cid: 3, socket: "/v".into() }),
        rng: true,
        balloon: Some(balloon()),
        memory_options: MemoryOptions { mergeable: true, hugepages: false, thp: true },
    }
}

fn balloon() -> BalloonConfig {
    BalloonConfig { deflate_on_oom: false, stats_interval_s: 10, free_page_reporting: true }
}

fn balloon_stats() -> BalloonStats {
    BalloonStats {
        swap_in_bytes: Some(1),
        swap_out_bytes: Some(2),
        major_faults: Some(3),
        minor_faults: Some(4),
        free_bytes: Some(5),
        total_bytes: Some(6),
        available_bytes: Some(7),
        disk_caches_bytes: Some(8),
        hugetlb_allocations: Some(9),
        hugetlb_failures: Some(10),
    }
}

fn disk() -> DiskConfig {
    DiskConfig {
        path: "/d".into(),
        format: Some(DiskFormat::Raw),
        readonly: true,
        serial: Some("s".into()),
        allow_backing_outside: true,
        allow_data_file: true,
        on_error: DiskErrorPolicy::Pause,
    }
}

fn histogram() -> LatencyHistogram {
    LatencyHistogram { bounds_s: vec![0.001, 1.0], cumulative: vec![1, 2], count: 3, sum_s: 2.5 }
}

fn block_counters() -> BlockCounters {
    BlockCounters {
        read_ops: 1,
        write_ops: 2,
        flush_ops: 3,
        read_bytes: 4,
        write_bytes: 5,
        error_pauses: 6,
        read_latency: histogram(),
        write_latency: histogram(),
        flush_latency: histogram(),
    }
}

fn net_counters() -> NetCounters {
    NetCounters {
        rx_packets: 1,
        rx_bytes: 2,
        rx_dropped: 3,
        rx_errors: 4,
        rx_no_buffers: 5,
        tx_packets: 6,
        tx_bytes: 7,
        tx_dropped: 8,
        tx_errors: 9,
    }
}

/// A device's counters with every optional part set.
fn device_counters() -> DeviceCounters {
    DeviceCounters {
        requests: 1,
        bytes_read: 2,
        bytes_written: 3,
        errors: 4,
        block: Some(block_counters()),
        net: Some(net_counters()),
    }
}

#[test]
fn every_schema_matches_its_type() {
    check("VmConfig", &vm_config());
    check("DiskConfig", &disk());
    check("NetConfig", &NetConfig { tap: "t".into(), mac: Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])) });
    check("VsockConfig", &VsockConfig { cid: 3, socket: "/v".into() });
    check("SnapshotRequest", &SnapshotRequest { destination_url: "file:///s".into() });
    check("RestoreRequest", &RestoreRequest { source_url: "file:///s".into() });
    check("PingInfo", &PingInfo { version: "1".into(), accelerators: vec!["emu".into()], pid: 1 });
    check(
        "VmInfo",
        &VmInfo {
            state: "Shutdown".into(),
            config: vm_config(),
            uptime_s: 1.0,
            accelerator: Some("emu".into()),
            ended: Some(VmEnd::Reset { reason: "triple fault".into() }),
            pause_reason: Some("disk disk0: write at 0: No space left on device (os error 28)".into()),
            vcpu_threads: vec![VcpuThread { vcpu: 0, tid: 4242 }],
        },
    );
    let mut devices = BTreeMap::new();
    devices.insert("disk0".into(), device_counters());
    check(
        "Counters",
        &Counters {
            vcpus: vec![BTreeMap::from([("pio".to_string(), 1)])],
            devices,
            guest_warnings: 1,
            guest_warnings_suppressed: 0,
        },
    );
    check("BackupRequest", &BackupRequest { destination_url: "file:///b".into(), rate_limit_mib_s: Some(8) });
    let disk_status = BackupDiskStatus {
        index: 1,
        path: "/d".into(),
        target: "/b/disk1.raw".into(),
        bytes_total: 3,
        bytes_copied: 2,
        bytes_before_write: 1,
        state: BackupState::Failed,
        error: Some("ENOSPC".into()),
    };
    check("BackupDiskStatus", &disk_status);
    check(
        "BackupStatus",
        &BackupStatus { destination: "/b".into(), pause_ms: 1.5, state: BackupState::Failed, disks: vec![disk_status] },
    );
    check("VmEnd", &VmEnd::Error { reason: "vcpu 0 failed".into() });
    check("VcpuThread", &VcpuThread { vcpu: 1, tid: 4243 });
    check("DeviceCounters", &device_counters());
    check("BlockCounters", &block_counters());
    check("LatencyHistogram", &histogram());
    check("NetCounters", &net_counters());
    check("BalloonConfig", &balloon());
    check("MemoryOptions", &MemoryOptions { mergeable: true, hugepages: true, thp: true });
    check("BalloonTarget", &BalloonTarget { target_mib: 256 });
    check(
        "BalloonInfo",
        &BalloonInfo {
            target_mib: 256,
            actual_mib: 128,
            stats: Some(balloon_stats()),
            stats_age_s: Some(1.5),
            reported_mib: 3,
        },
    );
    check("BalloonStats", &balloon_stats());
    check("ErrorBody", &ErrorBody { error: "e".into(), field: Some("f".into()), state: Some("s".into()) });
}

#[test]
fn every_schema_is_checked() {
    let checked = [
        "VmConfig",
        "DiskConfig",
        "NetConfig",
        "VsockConfig",
        "SnapshotRequest",
        "RestoreRequest",
        "PingInfo",
        "VmInfo",
        "VmEnd",
        "VcpuThread",
        "Counters",
        "DeviceCounters",
        "BlockCounters",
        "LatencyHistogram",
        "NetCounters",
        "BalloonConfig",
        "MemoryOptions",
        "BalloonTarget",
        "BalloonInfo",
        "BalloonStats",
        "ErrorBody",
        "BackupRequest",
        "BackupStatus",
        "BackupDiskStatus",
    ];
    for (name, _) in schemas() {
        let name = name.as_str().unwrap();
        assert!(checked.contains(&name), "schema {name} has no check in every_schema_matches_its_type");
    }
}

#[test]
fn backup_state_enums_match_the_type() {
    let want: BTreeSet<String> = [BackupState::Running, BackupState::Done, BackupState::Failed, BackupState::Cancelled]
        .iter()
        .map(|s| serde_json::to_value(s).unwrap().as_str().unwrap().to_string())
        .collect();
    let s = schemas();
    for schema in ["BackupStatus", "BackupDiskStatus"] {
        let listed: BTreeSet<String> = s[schema]["properties"]["state"]["enum"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{schema}.state: no enum"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(listed, want, "{schema}.state");
        for v in &listed {
            serde_json::from_value::<BackupState>(Value::String(v.clone())).unwrap();
        }
    }
}

#[test]
fn older_bodies_without_the_new_fields_still_parse() {
    // A disk without `on_error`, counters without `block`/`net`, vm.info without
    // `pause_reason`: what an older VMM or client sends.
    let d: DiskConfig = serde_json::from_str(r#"{"path": "/d"}"#).unwrap();
    assert_eq!(d.on_error, DiskErrorPolicy::Report);
    let v = serde_json::to_value(&d).unwrap();
    assert!(v.get("on_error").is_none(), "the default is not written out (snapshots pin the shape): {v}");
    let c: DeviceCounters =
        serde_json::from_str(r#"{"requests": 1, "bytes_read": 2, "bytes_written": 3, "errors": 4}"#).unwrap();
    assert_eq!((c.block, c.net), (None, None));
    let v = serde_json::to_value(DeviceCounters::default()).unwrap();
    assert!(v.get("block").is_none() && v.get("net").is_none(), "absent, not null: {v}");
    let s = schemas();
    let enum_values: Vec<&str> = s["DiskConfig"]["properties"]["on_error"]["enum"]
        .as_sequence()
        .expect("DiskConfig.on_error: enum")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(enum_values, ["report", "pause"]);
}
