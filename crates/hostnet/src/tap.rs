//! Persistent TAP interfaces through `/dev/net/tun`, with the flags the VMM's TAP backend
//! (`virtio::tap::Tap::open`) uses, so the VMM can attach to them by name.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};

use crate::Error;

const TUN_PATH: &str = "/dev/net/tun";

const _: () = assert!(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR <= i16::MAX as libc::c_int);
/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, as `virtio::tap` opens TAPs.
#[allow(clippy::cast_possible_truncation)] // below 1 << 15: asserted above
const TAP_FLAGS: libc::c_short = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;

/// Creates TAP `name` (already validated) and makes it persistent (`TUNSETPERSIST`), so it
/// outlives this call and waits for the VMM to open it.
///
/// Errors: [`Error::Io`] for `/dev/net/tun` or an ioctl (`EBUSY`: the TAP exists and a
/// process has it open).
pub(crate) fn create_persistent(name: &str) -> Result<(), Error> {
    set_persist(name, true, None)
}

/// Gives persistent TAP `name` to `uid:gid` (`TUNSETOWNER`, `TUNSETGROUP`), so a process of
/// that user without `CAP_NET_ADMIN` (a jailed VMM) may attach to it.
///
/// Errors: [`Error::Io`] as [`create_persistent`].
pub(crate) fn set_owner(name: &str, uid: u32, gid: u32) -> Result<(), Error> {
    set_persist(name, true, Some((uid, gid)))
}

/// Clears the TAP's persistence; the kernel deletes it when no one has it open (at once when
/// nobody has).
pub(crate) fn clear_persistent(name: &str) -> Result<(), Error> {
    set_persist(name, false, None)
}

fn set_persist(name: &str, on: bool, owner: Option<(u32, u32)>) -> Result<(), Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(|source| Error::Io { what: format!("opening {TUN_PATH}"), source })?;
    let err = |op: &str| Error::Io { what: format!("{op} on TAP {name}"), source: io::Error::last_os_error() };
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (o, b) in ifr.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *o = b as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = TAP_FLAGS;
    // SAFETY: `file` is an open /dev/net/tun descriptor; TUNSETIFF reads and writes one
    // `struct ifreq`, which `ifr` is and outlives the call; the result is checked.
    if unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(err("TUNSETIFF"));
    }
    // SAFETY: `file` is attached to the TAP; TUNSETPERSIST takes its argument by value and
    // dereferences nothing; the result is checked.
    if unsafe { ioctl_with_val(&file, libc::TUNSETPERSIST, libc::c_ulong::from(on)) } < 0 {
        return Err(err("TUNSETPERSIST"));
    }
    if let Some((uid, gid)) = owner {
        // SAFETY: as above; TUNSETOWNER and TUNSETGROUP take the id by value.
        if unsafe { ioctl_with_val(&file, libc::TUNSETOWNER, libc::c_ulong::from(uid)) } < 0 {
            return Err(err("TUNSETOWNER"));
        }
        // SAFETY: as above.
        if unsafe { ioctl_with_val(&file, libc::TUNSETGROUP, libc::c_ulong::from(gid)) } < 0 {
            return Err(err("TUNSETGROUP"));
        }
    }
    Ok(())
}
