//! What each VMM's jail holds and who it runs as (the `jail` crate does the confining).
//!
//! Every VM gets its own uid and gid, [`JAIL_ID_BASE`] + its number in the store, so two
//! VMMs never share a user. Its jail holds, at their host paths: the VMM program and the
//! system libraries (read-only), its kernel and initrd (read-only), its disks (writable
//! unless `readonly`; a qcow2 image's folder read-only too, where its backing files are),
//! its state folder (`<state-dir>/vms/<name>`: console log, snapshots, backup exports) and
//! run folder (`<run-dir>/vms/<name>`: API and console sockets), the folders of a vsock or
//! virtio-console socket or file; and its own `/dev/kvm` (unless `accel=emu`),
//! `/dev/net/tun` (with NICs), `/dev/null`, `/dev/zero`, `/dev/urandom`, `/dev/random`. A VM
//! without NICs also gets an empty network namespace; one with NICs stays in the host's,
//! where its TAPs are (given to its uid, so it needs no `CAP_NET_ADMIN`).
//!
//! The files the VMM writes are given to its uid when it starts (libvirt's DAC
//! "dynamic ownership"): its writable disks, its state and run folders. Files it only reads
//! must be readable by it (world-readable, as a template's 0444 volume is): a start is
//! refused with the file's name otherwise.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::{bad, Service, ServiceError};
use crate::store::VmRecord;

/// The first jail uid/gid: VM number N runs as `JAIL_ID_BASE + N` (far above the ranges
/// distributions give users and `/etc/subuid` gives containers).
pub const JAIL_ID_BASE: u32 = 2_100_000_000;

/// Whether `uid:gid` may read `md`'s file by its mode bits.
fn readable_by(md: &std::fs::Metadata, uid: u32, gid: u32) -> bool {
    let m = md.mode();
    m & 0o004 != 0 || (md.uid() == uid && m & 0o400 != 0) || (md.gid() == gid && m & 0o040 != 0)
}

impl Service {
    /// The uid and gid of VM `name`'s jail, or `None` when the daemon runs without jails.
    ///
    /// Errors: [`ServiceError::NotFound`]; store errors.
    pub(super) fn jail_ids(&self, name: &str) -> Result<Option<(u32, u32)>, ServiceError> {
        if !self.jail {
            return Ok(None);
        }
        let n = self.store().vm_number(name)?.ok_or_else(|| ServiceError::NotFound(name.into()))?;
        let id = u32::try_from(n)
            .ok()
            .and_then(|n| JAIL_ID_BASE.checked_add(n))
            .ok_or_else(|| bad("name", format!("VM number {n} is out of the jail uid range")))?;
        Ok(Some((id, id)))
    }

    /// Gives `path` (a file or folder the VMM must write) to VM `name`'s jail user; nothing
    /// without jails.
    ///
    /// Errors: store errors, [`ServiceError::Io`] from `chown(2)`.
    pub(super) fn give_to_jail(&self, name: &str, path: &Path) -> Result<(), ServiceError> {
        let Some((uid, gid)) = self.jail_ids(name)? else { return Ok(()) };
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|source| ServiceError::Io { what: format!("giving {} to uid {uid}", path.display()), source })
    }

    /// The jail for `rec`'s VMM, whose configuration is `cfg` (with the daemon's serial
    /// console and `taps`), or `None` without jails. Gives the VM's writable files and TAPs
    /// to its uid.
    ///
    /// Errors: [`ServiceError::BadRequest`] naming a relative path or a file the jail's user
    /// cannot read; [`ServiceError::Io`]; network errors for the TAPs.
    pub(super) fn jail_for(
        &self,
        rec: &VmRecord,
        cfg: &api::types::VmConfig,
    ) -> Result<Option<jail::Jail>, ServiceError> {
        let name = rec.name.as_str();
        let Some((uid, gid)) = self.jail_ids(name)? else { return Ok(None) };
        let io = |what: String| move |source| ServiceError::Io { what, source };
        let root = self.paths.run_dir.join("jails").join(name);
        std::fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
        let mut j = jail::Jail::new(&root, uid, gid);
        j.hostname = name.chars().take(64).collect();
        j.add_system_libraries();
        j.bind_ro(&self.paths.vmm_exe);
        // Folders the VMM writes.
        let mut rw: Vec<PathBuf> = vec![self.vm_state_dir(name), self.vm_run_dir(name)];
        for d in &rw {
            self.give_to_jail(name, d)?;
        }
        let absolute = |field: &str, p: &str| -> Result<PathBuf, ServiceError> {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                Ok(p)
            } else {
                Err(bad(field, format!("'{}' is relative (a jailed VMM needs absolute paths)", p.display())))
            }
        };
        let readable = |field: &str, p: &Path| -> Result<(), ServiceError> {
            let md = std::fs::metadata(p).map_err(io(format!("{field} {}", p.display())))?;
            if md.is_dir() || readable_by(&md, uid, gid) {
                return Ok(());
            }
            Err(bad(
                field,
                format!(
                    "{} is not readable by the VM's jail user (uid {uid}): make it world-readable \
                     (chmod o+r), or run the daemon with --jail off",
                    p.display()
                ),
            ))
        };
        let mut ro: Vec<PathBuf> = Vec::new();
        let mut files_rw: Vec<PathBuf> = Vec::new();
        let kernel = absolute("kernel", &cfg.kernel)?;
        readable("kernel", &kernel)?;
        ro.push(kernel);
        if let Some(i) = &cfg.initrd {
            let initrd = absolute("initrd", i)?;
            readable("initrd", &initrd)?;
            ro.push(initrd);
        }
        for (i, d) in cfg.disks.iter().enumerate() {
            let field = format!("disks[{i}].path");
            let p = absolute(&field, &d.path)?;
            let qcow2 = match d.format {
                Some(f) => f == api::types::DiskFormat::Qcow2,
                None => block::detect_format(&p).is_ok_and(|f| f == block::Format::Qcow2),
            };
            if qcow2 {
                // Its backing files lie in its folder (the block layer's rule).
                if let Some(dir) = p.parent() {
                    ro.push(dir.to_path_buf());
                }
            }
            if d.readonly {
                readable(&field, &p)?;
                ro.push(p);
            } else {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                    .map_err(io(format!("giving {} to uid {uid}", p.display())))?;
                files_rw.push(p);
            }
        }
        let socket_dirs = cfg
            .vsock
            .iter()
            .map(|v| v.socket.as_str())
            .chain(cfg.console.iter().filter_map(|c| match c {
                api::types::ConsoleOut::File(p) => p.to_str(),
                api::types::ConsoleOut::Socket { path, .. } => path.to_str(),
                _ => None,
            }))
            .collect::<Vec<_>>();
        for s in socket_dirs {
            if let Some(dir) = absolute("vsock/console", s)?.parent() {
                rw.push(dir.to_path_buf());
            }
        }
        if let Some(api::types::ConsoleOut::Socket { log: Some(l), .. }) = &cfg.console {
            if let Some(dir) = l.parent() {
                rw.push(dir.to_path_buf());
            }
        }
        // Read-only folders inside a writable one are visible already (and must stay
        // writable there).
        let inside_rw = |p: &Path| rw.iter().any(|d| p.starts_with(d));
        for p in &rw {
            j.bind_rw(p);
        }
        for p in ro.iter().filter(|p| !inside_rw(p)) {
            j.bind_ro(p);
        }
        for p in files_rw.iter().filter(|p| !inside_rw(p)) {
            j.bind_rw(p);
        }
        j.binds.dedup();
        if cfg.accel != api::types::Accel::Emu {
            j.devices.push("/dev/kvm".into());
        }
        j.new_net = cfg.nets.is_empty();
        if !cfg.nets.is_empty() {
            j.devices.push("/dev/net/tun".into());
        }
        for n in &cfg.nets {
            hostnet::set_tap_owner(&n.tap, uid, gid).map_err(super::networks::net_error)?;
        }
        Ok(Some(j))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn readable_by_mode_bits() {
        let dir = std::env::temp_dir().join(format!("jailing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, "x").unwrap();
        let md = |mode| {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            std::fs::metadata(&f).unwrap()
        };
        let (uid, gid) = (JAIL_ID_BASE + 1, JAIL_ID_BASE + 1);
        assert!(readable_by(&md(0o444), uid, gid));
        assert!(readable_by(&md(0o644), uid, gid));
        assert!(!readable_by(&md(0o600), uid, gid));
        assert!(!readable_by(&md(0o640), uid, gid));
        std::os::unix::fs::chown(&f, Some(uid), Some(gid)).unwrap();
        assert!(readable_by(&md(0o600), uid, gid));
        assert!(!readable_by(&md(0o200), uid, gid));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
