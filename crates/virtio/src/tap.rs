//! A host TAP interface (Linux `/dev/net/tun`), the backend of [`crate::net`].
//!
//! The interface is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte vnet
//! header (`TUNSETVNETHDRSZ`), so every frame read or written carries a
//! `struct virtio_net_hdr_v1` (virtio 1.2 §5.1.6) in front of the Ethernet frame, exactly as
//! the guest's virtqueue buffers do. No offloads are enabled (`TUNSETOFFLOAD` 0): the kernel
//! hands over only fully checksummed, unsegmented frames. The file descriptor is non-blocking.

use std::ffi::c_char;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Bytes of the `struct virtio_net_hdr_v1` in front of every frame (virtio 1.2 §5.1.6).
pub const VNET_HDR_LEN: usize = 12;
/// Longest interface name in bytes (`IFNAMSIZ - 1`; the kernel keeps a NUL terminator).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

const TUN_PATH: &str = "/dev/net/tun";

/// Error opening or configuring a TAP interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is not acceptable to Linux.
    #[error(
        "invalid TAP interface name {0:?}: must be 1 to {MAX_NAME_LEN} bytes, not \".\" or \"..\", \
         without '/', ':', NUL or whitespace"
    )]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened (missing `tun` module, no permission).
    #[error("opening {TUN_PATH}: {0}")]
    OpenTun(io::Error),
    /// A configuration ioctl failed (`op` names it, e.g. `TUNSETIFF`).
    #[error("{op} on TAP interface {name}: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The interface name as requested.
        name: String,
        /// The OS error.
        source: io::Error,
    },
}

/// An open TAP interface: a non-blocking file descriptor carrying whole Ethernet frames, each
/// preceded by a [`VNET_HDR_LEN`]-byte virtio-net header. Closing it (dropping) deletes the
/// interface unless it was made persistent (e.g. with `ip tuntap add`).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `name` as a NUL-padded `ifr_name`.
/// `IFF_*` flags are `c_int` constants but `ifr_flags` is a `short`; those used here are
/// below `1 << 15` (checked at compile time).
const _: () = assert!(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_UP <= i16::MAX as libc::c_int);
/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` as `ifr_flags`.
#[allow(clippy::cast_possible_truncation)] // below 1 << 15: asserted above
const TAP_FLAGS: libc::c_short = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
/// `IFF_UP` as `ifr_flags`.
#[allow(clippy::cast_possible_truncation)] // below 1 << 15: asserted above
const IFF_UP: libc::c_short = libc::IFF_UP as libc::c_short;
/// [`VNET_HDR_LEN`] as the `int` TUNSETVNETHDRSZ takes.
#[allow(clippy::cast_possible_truncation)] // 12
const VNET_HDR_LEN_INT: libc::c_int = VNET_HDR_LEN as libc::c_int;

fn ifr_name(name: &str) -> [c_char; libc::IFNAMSIZ] {
    let mut out = [0 as c_char; libc::IFNAMSIZ];
    for (o, b) in out.iter_mut().zip(name.bytes().take(MAX_NAME_LEN)) {
        *o = b as c_char;
    }
    out
}

/// Checks `name` the way the kernel's `dev_valid_name` does.
fn validate_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(TapError::InvalidName(name.to_string()))
    }
}

impl Tap {
    /// Opens TAP interface `name`, creating it if it does not exist (which needs
    /// `CAP_NET_ADMIN`; a persistent interface owned by the caller does not). A name containing
    /// `%d` (e.g. `"rvtap%d"`) lets the kernel pick the first free number; [`Tap::name`] gives
    /// the result.
    ///
    /// The interface is configured with a [`VNET_HDR_LEN`]-byte vnet header and no offloads,
    /// and brought up (`IFF_UP`) when the caller may do so; host addresses, bridges and routes
    /// are left to the user.
    ///
    /// Errors: [`TapError::InvalidName`] unless `name` is 1 to [`MAX_NAME_LEN`] bytes without
    /// '/', ':', NUL or whitespace; [`TapError::OpenTun`]; [`TapError::Ioctl`] when the
    /// interface exists with other flags (e.g. a TUN device), or is busy.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        validate_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let err = |op: &'static str| TapError::Ioctl { op, name: name.to_string(), source: io::Error::last_os_error() };

        // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = ifr_name(name);
        ifr.ifr_ifru.ifru_flags = TAP_FLAGS;
        // SAFETY: `file` is an open /dev/net/tun descriptor; TUNSETIFF reads and writes one
        // `struct ifreq`, which `ifr` is and outlives the call; the result is checked.
        if unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut ifr) } < 0 {
            return Err(err("TUNSETIFF"));
        }
        // The kernel wrote back the actual name (it expands "%d").
        let actual: Vec<u8> = ifr.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        let actual = String::from_utf8_lossy(&actual).into_owned();

        let hdr_len = VNET_HDR_LEN_INT;
        // SAFETY: `file` is the TAP descriptor; TUNSETVNETHDRSZ reads one `int` through the
        // pointer, which points to `hdr_len` (a `c_int`); the result is checked.
        if unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(err("TUNSETVNETHDRSZ"));
        }
        // SAFETY: `file` is the TAP descriptor; TUNSETOFFLOAD takes its argument by value (an
        // unsigned long of TUN_F_* bits) and dereferences nothing; the result is checked.
        if unsafe { ioctl_with_val(&file, libc::TUNSETOFFLOAD, 0) } < 0 {
            return Err(err("TUNSETOFFLOAD"));
        }
        let tap = Tap { file, name: actual };
        if let Err(e) = tap.set_up() {
            tracing::warn!("TAP {}: could not bring the link up ({e}); configure it on the host", tap.name);
        }
        Ok(tap)
    }

    /// The interface's name (with any `%d` expanded).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets `IFF_UP` on the interface (`SIOCSIFFLAGS`; needs `CAP_NET_ADMIN`). A no-op when it
    /// is already up.
    ///
    /// Errors: [`TapError::Ioctl`] (e.g. `EPERM`).
    pub fn set_up(&self) -> Result<(), TapError> {
        let err =
            |op: &'static str| TapError::Ioctl { op, name: self.name.clone(), source: io::Error::last_os_error() };
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(err("socket(AF_INET)"));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = ifr_name(&self.name);
        // SAFETY: `sock` is an open socket; SIOCGIFFLAGS reads and writes one `struct ifreq`,
        // which `ifr` is; the result is checked.
        if unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
            return Err(err("SIOCGIFFLAGS"));
        }
        // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        if flags & IFF_UP != 0 {
            return Ok(());
        }
        ifr.ifr_ifru.ifru_flags = flags | IFF_UP;
        // SAFETY: `sock` is an open socket; SIOCSIFFLAGS reads one `struct ifreq`, which `ifr`
        // is; the result is checked.
        if unsafe { ioctl_with_ref(&sock, libc::SIOCSIFFLAGS, &ifr) } < 0 {
            return Err(err("SIOCSIFFLAGS"));
        }
        Ok(())
    }

    /// Reads one frame (vnet header + Ethernet frame) into `buf`; returns its length in bytes.
    /// A frame longer than `buf` is truncated by the kernel.
    ///
    /// Errors: `WouldBlock` when no frame is queued; other OS errors (e.g. `EIO` while the
    /// interface is detached).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the pointer and length describe the writable slice `buf`.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (vnet header + Ethernet frame, at least [`VNET_HDR_LEN`] + 14 bytes);
    /// returns the bytes accepted (the whole frame on success).
    ///
    /// Errors: OS errors (`EINVAL` for a malformed frame or header, `EIO` while the interface is
    /// down or detached).
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: the pointer and length describe the readable slice `frame`.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for bad in ["", ".", "..", "a/b", "a b", "tab\t", "a:b", "nul\0", "sixteen-bytes-xx"] {
            let e = Tap::open(bad).unwrap_err();
            assert!(matches!(e, TapError::InvalidName(_)), "{bad:?}: {e}");
            assert!(e.to_string().contains("1 to 15 bytes"), "{e}");
        }
        for good in ["t", "rvtap0", "rvtap%d", "fifteen-bytes-x"] {
            validate_name(good).unwrap();
        }
    }

    #[test]
    fn ifr_name_is_nul_terminated() {
        let n = ifr_name("fifteen-bytes-x");
        assert_eq!(n[15], 0);
        assert_eq!(n[0], b'f' as c_char);
    }
}
