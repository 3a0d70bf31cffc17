//! The command-line syntax of the device options (`--disk`, `--net`, `--vsock`, `--balloon`,
//! `--memory-options`): comma
//! separated `key=value` pairs, in the style of Cloud Hypervisor and QEMU. Parsing checks the
//! syntax and the enumerations only; values (sizes, names, ranges, files) are checked by the
//! VMM's one validation of the whole [`VmConfig`](crate::VmConfig). Errors start with the
//! flag and name the accepted keys or values.

use std::collections::BTreeMap;
use std::str::FromStr;

use crate::{BalloonConfig, DiskConfig, MemoryOptions, NetConfig, VsockConfig};

/// Largest GET_ID serial, in bytes (virtio 1.2 §5.2.6).
pub const SERIAL_MAX: usize = 20;

fn parse_kv(flag: &str, s: &str, keys: &[&str]) -> Result<BTreeMap<String, String>, String> {
    let mut m = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{flag}: '{part}' is not key=value (accepted keys: {})", keys.join(", ")))?;
        if !keys.contains(&k) {
            return Err(format!("{flag}: unknown key '{k}' (accepted keys: {})", keys.join(", ")));
        }
        if m.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("{flag}: key '{k}' given twice"));
        }
    }
    Ok(m)
}

fn parse_bool(flag: &str, key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{flag}: {key}='{v}' (accepted: on, off)")),
    }
}

fn parse_allow(flag: &str, key: &str, v: Option<&String>) -> Result<bool, String> {
    match v.map(String::as_str) {
        None | Some("deny") => Ok(false),
        Some("allow") => Ok(true),
        Some(v) => Err(format!("{flag}: {key}='{v}' (accepted: allow, deny)")),
    }
}

impl FromStr for DiskConfig {
    type Err = String;
    /// `path=IMG[,format=raw|qcow2][,readonly=on][,serial=ID][,backing=allow][,data_file=allow]
    /// [,on-error=report|pause]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let m = parse_kv("--disk", s, &["path", "format", "readonly", "serial", "backing", "data_file", "on-error"])?;
        let path = m.get("path").filter(|p| !p.is_empty()).ok_or("--disk: path=IMG is required")?;
        let format = m.get("format").map(|f| f.parse().map_err(|e| format!("--disk: {e}"))).transpose()?;
        let readonly = m.get("readonly").map(|v| parse_bool("--disk", "readonly", v)).transpose()?.unwrap_or(false);
        Ok(DiskConfig {
            path: path.clone(),
            format,
            readonly,
            serial: m.get("serial").cloned(),
            allow_backing_outside: parse_allow("--disk", "backing", m.get("backing"))?,
            allow_data_file: parse_allow("--disk", "data_file", m.get("data_file"))?,
            on_error: m
                .get("on-error")
                .map(|v| v.parse().map_err(|e| format!("--disk: on-error: {e}")))
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

impl FromStr for NetConfig {
    type Err = String;
    /// `tap=NAME[,mac=MAC]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let m = parse_kv("--net", s, &["tap", "mac"])?;
        let tap = m.get("tap").ok_or("--net: tap=NAME is required")?.clone();
        let mac = m.get("mac").map(|v| v.parse().map_err(|e| format!("--net: {e}"))).transpose()?;
        Ok(NetConfig { tap, mac })
    }
}

impl FromStr for VsockConfig {
    type Err = String;
    /// `cid=N,socket=PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let m = parse_kv("--vsock", s, &["cid", "socket"])?;
        let cid_s = m.get("cid").ok_or("--vsock: cid=N is required")?;
        let cid: u64 = cid_s.parse().map_err(|_| format!("--vsock: cid '{cid_s}' (accepted: 3 to 4294967294)"))?;
        let socket = m.get("socket").filter(|p| !p.is_empty()).ok_or("--vsock: socket=PATH is required")?;
        Ok(VsockConfig { cid, socket: socket.clone() })
    }
}

impl FromStr for BalloonConfig {
    type Err = String;
    /// `[deflate_on_oom=on|off][,stats_interval_s=N][,free_page_reporting=on|off]` (empty:
    /// the defaults).
    fn from_str(s: &str) -> Result<Self, String> {
        let m = parse_kv("--balloon", s, &["deflate_on_oom", "stats_interval_s", "free_page_reporting"])?;
        let d = BalloonConfig::default();
        let flag =
            |k: &str, def: bool| m.get(k).map(|v| parse_bool("--balloon", k, v)).transpose().map(|v| v.unwrap_or(def));
        let stats_interval_s = match m.get("stats_interval_s") {
            None => d.stats_interval_s,
            Some(v) => v.parse().map_err(|_| {
                format!("--balloon: stats_interval_s='{v}' (accepted: 0 to {} seconds)", crate::MAX_STATS_INTERVAL_S)
            })?,
        };
        Ok(BalloonConfig {
            deflate_on_oom: flag("deflate_on_oom", d.deflate_on_oom)?,
            stats_interval_s,
            free_page_reporting: flag("free_page_reporting", d.free_page_reporting)?,
        })
    }
}

impl FromStr for MemoryOptions {
    type Err = String;
    /// `[mergeable=on|off][,hugepages=on|off][,thp=on|off]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let m = parse_kv("--memory-options", s, &["mergeable", "hugepages", "thp"])?;
        let flag =
            |k: &str| m.get(k).map(|v| parse_bool("--memory-options", k, v)).transpose().map(Option::unwrap_or_default);
        Ok(MemoryOptions { mergeable: flag("mergeable")?, hugepages: flag("hugepages")?, thp: flag("thp")? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskFormat, MacAddr};

    #[test]
    fn disk_options() {
        let d: DiskConfig = "path=/x.img,format=qcow2,readonly=on,serial=abc".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/x.img".into(),
                format: Some(DiskFormat::Qcow2),
                readonly: true,
                serial: Some("abc".into()),
                allow_backing_outside: false,
                allow_data_file: false,
                on_error: crate::DiskErrorPolicy::Report,
            }
        );
        let d: DiskConfig = "path=a.img,on-error=pause".parse().unwrap();
        assert_eq!(d.on_error, crate::DiskErrorPolicy::Pause);
        assert_eq!(
            "path=a.img,on-error=report".parse::<DiskConfig>().unwrap().on_error,
            crate::DiskErrorPolicy::Report
        );
        assert_eq!(
            "path=a.img,on-error=stop".parse::<DiskConfig>().unwrap_err(),
            "--disk: on-error: unknown error policy 'stop' (accepted: report, pause)"
        );
        let j: DiskConfig = serde_json::from_str(r#"{"path": "a.img", "on_error": "pause"}"#).unwrap();
        assert_eq!(j.on_error, crate::DiskErrorPolicy::Pause);
        assert_eq!(serde_json::from_str::<DiskConfig>(r#"{"path": "a.img"}"#).unwrap().on_error, Default::default());
        let e = serde_json::from_str::<DiskConfig>(r#"{"path": "a.img", "on_error": "stop"}"#).unwrap_err();
        assert!(e.to_string().contains("accepted: report, pause"), "{e}");
        let d: DiskConfig = "path=a.img,backing=allow,data_file=allow".parse().unwrap();
        assert!(d.allow_backing_outside && d.allow_data_file);
        assert_eq!(
            "path=a.img,backing=yes".parse::<DiskConfig>().unwrap_err(),
            "--disk: backing='yes' (accepted: allow, deny)"
        );
        let d: DiskConfig = "path=a.img".parse().unwrap();
        assert_eq!((d.format, d.readonly, d.serial), (None, false, None));
        for bad in ["", "format=raw", "path=a,format=vmdk", "path=a,readonly=maybe", "path=a,size=1", "path=a,path=b"] {
            let e = bad.parse::<DiskConfig>().unwrap_err();
            assert!(e.starts_with("--disk: "), "{bad}: {e}");
        }
        assert!("path=a,format=vmdk".parse::<DiskConfig>().unwrap_err().contains("raw, qcow2"));
    }

    #[test]
    fn net_options() {
        let n: NetConfig = "tap=rv0,mac=52:54:00:aa:bb:cc".parse().unwrap();
        assert_eq!(n.mac, Some(MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc])));
        assert!("tap=rv0,mac=01:00:00:00:00:00".parse::<NetConfig>().unwrap_err().contains("unicast"));
        assert!("tap=rv0,mac=zz".parse::<NetConfig>().is_err());
        assert!("tap=rv0,mac=52:54:00:aa:bb:cc:dd".parse::<NetConfig>().is_err());
        assert!("mac=52:54:00:aa:bb:cc".parse::<NetConfig>().is_err());
    }

    #[test]
    fn vsock_options() {
        let v: VsockConfig = "cid=3,socket=/tmp/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.socket.as_str()), (3, "/tmp/v.sock"));
        assert!("cid=x,socket=/x".parse::<VsockConfig>().unwrap_err().contains("3 to"));
        assert!("cid=3".parse::<VsockConfig>().is_err());
    }

    #[test]
    fn balloon_and_memory_options() {
        assert_eq!("".parse::<BalloonConfig>().unwrap(), BalloonConfig::default());
        let b: BalloonConfig = "deflate_on_oom=off,stats_interval_s=0,free_page_reporting=on".parse().unwrap();
        assert_eq!(b, BalloonConfig { deflate_on_oom: false, stats_interval_s: 0, free_page_reporting: true });
        for bad in
            ["stats_interval_s=x", "stats_interval_s=-1", "size=1", "deflate_on_oom=maybe", "free_page_reporting"]
        {
            let e = bad.parse::<BalloonConfig>().unwrap_err();
            assert!(e.starts_with("--balloon: "), "{bad}: {e}");
        }
        let d: BalloonConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(d, BalloonConfig::default());
        assert!((d.deflate_on_oom, d.stats_interval_s, d.free_page_reporting) == (true, 5, false));
        let m: MemoryOptions = "mergeable=on,thp=on".parse().unwrap();
        assert_eq!(m, MemoryOptions { mergeable: true, hugepages: false, thp: true });
        assert_eq!("".parse::<MemoryOptions>().unwrap(), MemoryOptions::default());
        assert!("hugepages=2M".parse::<MemoryOptions>().unwrap_err().contains("--memory-options: hugepages"));
        assert!(serde_json::from_str::<MemoryOptions>(r#"{"ksm": true}"#).is_err());
    }

    #[test]
    fn json_forms_match_the_command_line() {
        let c: crate::ConsoleOut = serde_json::from_str("\"file=/tmp/c.log\"").unwrap();
        assert_eq!(c, crate::ConsoleOut::File("/tmp/c.log".into()));
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"file=/tmp/c.log\"");
        let e = serde_json::from_str::<crate::ConsoleOut>("\"tcp:1\"").unwrap_err().to_string();
        assert!(e.contains("accepted: stdio, file=PATH, socket=PATH[,log=FILE], null"), "{e}");
        for form in ["null", "stdio", "file=/c.log", "socket=/run/c.sock", "socket=/run/c.sock,log=/var/c,1.log"] {
            let c: crate::ConsoleOut = form.parse().unwrap();
            assert_eq!(c.to_string(), form, "Display gives back the command line's form");
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{form}\""));
            assert_eq!(serde_json::from_str::<crate::ConsoleOut>(&format!("\"{form}\"")).unwrap(), c);
        }
        let s: crate::ConsoleOut = "socket=/r/c.sock,log=/l/c.log".parse().unwrap();
        assert_eq!(s, crate::ConsoleOut::Socket { path: "/r/c.sock".into(), log: Some("/l/c.log".into()) });
        for bad in ["socket=", "socket=/a,b", "socket=/a,log=", "socket=,log=/l", "file=", "tcp:1"] {
            assert!(bad.parse::<crate::ConsoleOut>().is_err(), "{bad} accepted");
        }
        let m: MacAddr = serde_json::from_str("\"52:54:00:12:34:56\"").unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"52:54:00:12:34:56\"");
        let e = serde_json::from_str::<crate::Accel>("\"xen\"").unwrap_err().to_string();
        assert!(e.contains("auto") && e.contains("emu"), "{e}");
    }
}
