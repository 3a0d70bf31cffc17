//! Virtio device options, parsed from the `key=value,...` syntax of the command line
//! (`--disk`, `--net`, `--vsock`) in the style of Cloud Hypervisor and QEMU.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Disk image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A flat image: guest sector N is at byte N*512 of the file.
    Raw,
    /// QEMU copy-on-write v2/v3 (through the `imago` crate).
    Qcow2,
}

/// One virtio-blk disk
/// (`--disk path=IMG[,format=raw|qcow2][,readonly=on][,serial=ID][,backing=allow][,data_file=allow]`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Image file.
    pub path: PathBuf,
    /// Format; `None` = detect from the file's magic (qcow2 or raw).
    pub format: Option<DiskFormat>,
    /// Refuse guest writes (they fail with an I/O error in the guest).
    pub readonly: bool,
    /// Serial number returned to GET_ID (at most 20 bytes).
    pub serial: Option<String>,
    /// Trust the qcow2 header's backing file names: backing files may lie outside the image's
    /// directory (`backing=allow`). Off by default (see `block::ImagePolicy`).
    pub allow_backing_outside: bool,
    /// Accept an external data file named in the qcow2 header (`data_file=allow`). Off by
    /// default.
    pub allow_data_file: bool,
}

/// One virtio-net NIC on a TAP device (`--net tap=NAME[,mac=MAC]`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// TAP interface name (created if absent), 1 to 15 bytes.
    pub tap: String,
    /// MAC address; `None` = a stable locally administered address derived from `tap`.
    pub mac: Option<[u8; 6]>,
}

/// The virtio-vsock device (`--vsock cid=N,socket=PATH`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest context ID, 3 to 2^32-2.
    pub cid: u64,
    /// Host Unix socket: connect and write `CONNECT <port>\n` to reach a guest port; guest
    /// connections to host port P go to `<socket>_P`.
    pub socket: PathBuf,
}

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

impl std::str::FromStr for DiskConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let m = parse_kv("--disk", s, &["path", "format", "readonly", "serial", "backing", "data_file"])?;
        let path = m.get("path").filter(|p| !p.is_empty()).ok_or("--disk: path=IMG is required")?;
        let format = match m.get("format").map(String::as_str) {
            None => None,
            Some("raw") => Some(DiskFormat::Raw),
            Some("qcow2") => Some(DiskFormat::Qcow2),
            Some(f) => return Err(format!("--disk: unknown format '{f}' (accepted: raw, qcow2)")),
        };
        let readonly = m.get("readonly").map(|v| parse_bool("--disk", "readonly", v)).transpose()?.unwrap_or(false);
        let serial = m.get("serial").cloned();
        if let Some(id) = &serial {
            if id.len() > SERIAL_MAX || !id.is_ascii() {
                return Err(format!("--disk: serial '{id}' (accepted: up to {SERIAL_MAX} ASCII characters)"));
            }
        }
        let allow = |key: &str| match m.get(key).map(String::as_str) {
            None | Some("deny") => Ok(false),
            Some("allow") => Ok(true),
            Some(v) => Err(format!("--disk: {key}='{v}' (accepted: allow, deny)")),
        };
        let allow_backing_outside = allow("backing")?;
        let allow_data_file = allow("data_file")?;
        Ok(DiskConfig { path: PathBuf::from(path), format, readonly, serial, allow_backing_outside, allow_data_file })
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`; a multicast address is refused.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("--net: mac '{s}' (accepted: six hex bytes like 52:54:00:12:34:56, unicast)");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

impl std::str::FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let m = parse_kv("--net", s, &["tap", "mac"])?;
        let tap = m.get("tap").ok_or("--net: tap=NAME is required")?.clone();
        if tap.is_empty()
            || tap.len() > IFNAME_MAX
            || tap.contains(['/', ':']) // ':' marks aliases
            || tap.chars().any(|c| c.is_whitespace() || c.is_control())
            || tap == "."
            || tap == ".."
        {
            return Err(format!(
                "--net: tap name '{tap}' (accepted: 1 to {IFNAME_MAX} bytes without '/', ':' or whitespace)"
            ));
        }
        let mac = m.get("mac").map(|v| parse_mac(v)).transpose()?;
        Ok(NetConfig { tap, mac })
    }
}

impl std::str::FromStr for VsockConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let m = parse_kv("--vsock", s, &["cid", "socket"])?;
        let cid_s = m.get("cid").ok_or("--vsock: cid=N is required")?;
        let cid: u64 = cid_s.parse().map_err(|_| format!("--vsock: cid '{cid_s}' (accepted: 3 to 4294967294)"))?;
        if !(3..=0xffff_fffe).contains(&cid) {
            return Err(format!("--vsock: cid {cid} (accepted: 3 to 4294967294)"));
        }
        let socket = m.get("socket").filter(|p| !p.is_empty()).ok_or("--vsock: socket=PATH is required")?;
        Ok(VsockConfig { cid, socket: PathBuf::from(socket) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            }
        );
        let d: DiskConfig = "path=a.img,backing=allow,data_file=allow".parse().unwrap();
        assert!(d.allow_backing_outside && d.allow_data_file);
        let e = "path=a.img,backing=yes".parse::<DiskConfig>().unwrap_err();
        assert_eq!(e, "--disk: backing='yes' (accepted: allow, deny)");
        let d: DiskConfig = "path=a.img".parse().unwrap();
        assert_eq!((d.format, d.readonly, d.serial), (None, false, None));
        for bad in ["", "format=raw", "path=a,format=vmdk", "path=a,readonly=maybe", "path=a,size=1", "path=a,path=b"] {
            let e = bad.parse::<DiskConfig>().unwrap_err();
            assert!(e.starts_with("--disk: "), "{bad}: {e}");
        }
        assert!("path=a,serial=123456789012345678901".parse::<DiskConfig>().unwrap_err().contains("20"));
    }

    #[test]
    fn net_options() {
        let n: NetConfig = "tap=rv0,mac=52:54:00:aa:bb:cc".parse().unwrap();
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
        let e = "tap=abcdefghijklmnop".parse::<NetConfig>().unwrap_err();
        assert!(e.contains("1 to 15 bytes"), "{e}");
        assert!("tap=a/b".parse::<NetConfig>().is_err());
        assert!("tap=rv0,mac=01:00:00:00:00:00".parse::<NetConfig>().unwrap_err().contains("unicast"));
        assert!("tap=rv0,mac=zz".parse::<NetConfig>().is_err());
        assert!("mac=52:54:00:aa:bb:cc".parse::<NetConfig>().is_err());
    }

    #[test]
    fn vsock_options() {
        let v: VsockConfig = "cid=3,socket=/tmp/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.socket.to_str().unwrap()), (3, "/tmp/v.sock"));
        assert!("cid=2,socket=/x".parse::<VsockConfig>().unwrap_err().contains("3 to"));
        assert!("cid=x,socket=/x".parse::<VsockConfig>().is_err());
        assert!("cid=3".parse::<VsockConfig>().is_err());
    }
}
