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
        // Its own folders, which the VMM writes.
        let mut rw: Vec<PathBuf> = vec![self.vm_state_dir(name), self.vm_run_dir(name)];
        for d in &rw {
            self.give_to_jail(name, d)?;
        }
        let files = vmm::config::host_files(cfg).map_err(io("resolving the VM's files".into()))?;
        for p in &files.read {
            let md = std::fs::metadata(p).map_err(io(p.display().to_string()))?;
            if !md.is_dir() && !readable_by(&md, uid, gid) {
                return Err(bad(
                    "config",
                    format!(
                        "{} is not readable by the VM's jail user (uid {uid}): make it world-readable \
                         (chmod o+r), or run the daemon with --jail off",
                        p.display()
                    ),
                ));
            }
        }
        for p in &files.write {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))
                .map_err(io(format!("giving {} to uid {uid}", p.display())))?;
        }
        rw.extend(files.create_in.iter().cloned());
        j.bind_all(&rw, &files.write, &files.read);
        j.devices.extend(files.devices);
        j.new_net = !files.host_network;
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
