//! Port-I/O and MMIO buses: map address ranges to devices.
//!
//! A bus dispatches an access to the device whose range contains the *first*
//! address of the access; the device receives the absolute address (port
//! number or guest-physical address), not an offset.  Unclaimed accesses make
//! `read`/`write` return `false`: the caller must then complete a read with
//! all-ones bytes (`0xff`), which is what an x86 PC returns for a floating
//! bus, and drop a write.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::Error;

/// A device on the x86 I/O-port bus (`IN`/`OUT` instructions).
///
/// `port` is the absolute port number of the first byte; `data` holds 1, 2 or
/// 4 bytes in little-endian order (the width of the access).
pub trait PioDevice: Send {
    /// Guest `IN` from `port`: fill all of `data`.
    fn read(&mut self, port: u16, data: &mut [u8]);
    /// Guest `OUT` of `data` to `port`.
    fn write(&mut self, port: u16, data: &[u8]);
}

/// A device in guest-physical memory-mapped I/O space.
///
/// `gpa` is the absolute guest-physical address of the first byte; `data`
/// holds 1 to 8 bytes in little-endian order.
pub trait MmioDevice: Send {
    /// Guest load from `gpa`: fill all of `data`.
    fn read(&mut self, gpa: u64, data: &mut [u8]);
    /// Guest store of `data` to `gpa`.
    fn write(&mut self, gpa: u64, data: &[u8]);
}

/// Locks a device mutex, recovering the data if a previous holder panicked
/// (device state stays usable; a poisoned lock must not kill the VM).
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Splits a wide port read into byte reads at consecutive ports, the way the
/// ISA bus splits a 16/32-bit access to an 8-bit device.
pub(crate) fn read_bytes(port: u16, data: &mut [u8], mut f: impl FnMut(u16) -> u8) {
    let mut p = port;
    for b in data.iter_mut() {
        *b = f(p);
        p = p.wrapping_add(1);
    }
}

/// Splits a wide port write into byte writes at consecutive ports.
pub(crate) fn write_bytes(port: u16, data: &[u8], mut f: impl FnMut(u16, u8)) {
    let mut p = port;
    for &b in data {
        f(p, b);
        p = p.wrapping_add(1);
    }
}

/// Range map shared by both buses: `base -> (len, device)`, non-overlapping.
struct Ranges<D: ?Sized> {
    map: BTreeMap<u64, (u64, Arc<Mutex<D>>)>,
    /// One past the highest valid address (`0x1_0000` for ports).
    limit: u128,
}

impl<D: ?Sized> Clone for Ranges<D> {
    fn clone(&self) -> Self {
        Self { map: self.map.clone(), limit: self.limit }
    }
}

impl<D: ?Sized> Ranges<D> {
    fn new(limit: u128) -> Self {
        Self { map: BTreeMap::new(), limit }
    }

    fn insert(&mut self, base: u64, len: u64, dev: Arc<Mutex<D>>) -> Result<(), Error> {
        let end = u128::from(base) + u128::from(len);
        if len == 0 || end > self.limit {
            return Err(Error::InvalidRange { base, len });
        }
        // The closest range starting at or below `base` must end at or before it.
        if let Some((&b, &(l, _))) = self.map.range(..=base).next_back() {
            if u128::from(b) + u128::from(l) > u128::from(base) {
                return Err(Error::Overlap { base, len });
            }
        }
        // No range may start inside [base, end).
        if let Some((&b, _)) = self.map.range(base..).next() {
            if u128::from(b) < end {
                return Err(Error::Overlap { base, len });
            }
        }
        self.map.insert(base, (len, dev));
        Ok(())
    }

    fn remove(&mut self, base: u64) -> Option<Arc<Mutex<D>>> {
        self.map.remove(&base).map(|(_, d)| d)
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<D>>)> {
        let (&b, (l, d)) = self.map.range(..=addr).next_back()?;
        (addr - b < *l).then_some((b, d))
    }
}

/// The x86 I/O-port bus (ports `0x0000..=0xffff`).
///
/// Cheap to clone (devices are shared through `Arc`); typically built once and
/// shared read-only by all vCPU threads.
#[derive(Clone)]
pub struct PioBus {
    ranges: Ranges<dyn PioDevice>,
}

impl Default for PioBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PioBus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self { ranges: Ranges::new(0x1_0000) }
    }

    /// Claims ports `[base, base + len)` for `dev`.
    ///
    /// Errors: [`Error::Overlap`] if any port is already claimed,
    /// [`Error::InvalidRange`] if `len == 0` or the range passes port 0xffff.
    /// One device may be inserted at several ranges.
    pub fn insert(&mut self, base: u16, len: u16, dev: Arc<Mutex<dyn PioDevice>>) -> Result<(), Error> {
        self.ranges.insert(u64::from(base), u64::from(len), dev)
    }

    /// Removes the range starting exactly at `base`, returning its device.
    pub fn remove(&mut self, base: u16) -> Option<Arc<Mutex<dyn PioDevice>>> {
        self.ranges.remove(u64::from(base))
    }

    /// Returns the device claiming `port` and the base of its range.
    pub fn get(&self, port: u16) -> Option<(u16, Arc<Mutex<dyn PioDevice>>)> {
        // Every PIO range was inserted with a `u16` base, so the conversion cannot fail.
        self.ranges.find(u64::from(port)).and_then(|(b, d)| Some((u16::try_from(b).ok()?, Arc::clone(d))))
    }

    /// Dispatches a guest `IN` of `data.len()` bytes from `port`.
    ///
    /// Returns `false` (leaving `data` untouched) if no device claims `port`;
    /// the caller must then fill `data` with `0xff`.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.ranges.find(u64::from(port)) {
            Some((_, dev)) => {
                lock(dev).read(port, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest `OUT` of `data` to `port`.
    ///
    /// Returns `false` if no device claims `port` (the write is dropped).
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.ranges.find(u64::from(port)) {
            Some((_, dev)) => {
                lock(dev).write(port, data);
                true
            }
            None => false,
        }
    }
}

/// The guest-physical MMIO bus (64-bit addresses).
///
/// Cheap to clone (devices are shared through `Arc`).
#[derive(Clone)]
pub struct MmioBus {
    ranges: Ranges<dyn MmioDevice>,
}

impl Default for MmioBus {
    fn default() -> Self {
        Self::new()
    }
}

impl MmioBus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self { ranges: Ranges::new(1u128 << 64) }
    }

    /// Claims guest-physical bytes `[base, base + len)` for `dev`.
    ///
    /// Errors: [`Error::Overlap`] if any byte is already claimed,
    /// [`Error::InvalidRange`] if `len == 0` or the range wraps past 2^64.
    pub fn insert(&mut self, base: u64, len: u64, dev: Arc<Mutex<dyn MmioDevice>>) -> Result<(), Error> {
        self.ranges.insert(base, len, dev)
    }

    /// Removes the range starting exactly at `base`, returning its device.
    pub fn remove(&mut self, base: u64) -> Option<Arc<Mutex<dyn MmioDevice>>> {
        self.ranges.remove(base)
    }

    /// Returns the device claiming `gpa` and the base of its range.
    pub fn get(&self, gpa: u64) -> Option<(u64, Arc<Mutex<dyn MmioDevice>>)> {
        self.ranges.find(gpa).map(|(b, d)| (b, Arc::clone(d)))
    }

    /// Dispatches a guest load of `data.len()` bytes from `gpa`.
    ///
    /// Returns `false` (leaving `data` untouched) if no device claims `gpa`;
    /// the caller must then fill `data` with `0xff`.
    pub fn read(&self, gpa: u64, data: &mut [u8]) -> bool {
        match self.ranges.find(gpa) {
            Some((_, dev)) => {
                lock(dev).read(gpa, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest store of `data` to `gpa`.
    ///
    /// Returns `false` if no device claims `gpa` (the write is dropped).
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        match self.ranges.find(gpa) {
            Some((_, dev)) => {
                lock(dev).write(gpa, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg {
        last: Option<(u64, Vec<u8>)>,
    }

    impl PioDevice for Reg {
        fn read(&mut self, port: u16, data: &mut [u8]) {
            data.fill((port & 0xff) as u8);
        }
        fn write(&mut self, port: u16, data: &[u8]) {
            self.last = Some((u64::from(port), data.to_vec()));
        }
    }

    impl MmioDevice for Reg {
        fn read(&mut self, gpa: u64, data: &mut [u8]) {
            data.fill((gpa & 0xff) as u8);
        }
        fn write(&mut self, gpa: u64, data: &[u8]) {
            self.last = Some((gpa, data.to_vec()));
        }
    }

    #[test]
    fn pio_dispatch_and_overlap() {
        let mut bus = PioBus::new();
        let dev = Arc::new(Mutex::new(Reg::default()));
        bus.insert(0x40, 4, dev.clone()).unwrap();
        bus.insert(0x61, 1, dev.clone()).unwrap();
        assert_eq!(bus.insert(0x43, 2, dev.clone()), Err(Error::Overlap { base: 0x43, len: 2 }));
        assert_eq!(bus.insert(0x3e, 3, dev.clone()), Err(Error::Overlap { base: 0x3e, len: 3 }));
        assert!(bus.insert(0x3c, 4, dev.clone()).is_ok());
        assert!(bus.insert(0x44, 1, dev.clone()).is_ok());
        assert!(matches!(bus.insert(0xffff, 2, dev.clone()), Err(Error::InvalidRange { .. })));
        assert!(bus.insert(0xffff, 1, dev.clone()).is_ok());
        assert!(matches!(bus.insert(0x100, 0, dev.clone()), Err(Error::InvalidRange { .. })));

        let mut b = [0u8; 2];
        assert!(bus.read(0x42, &mut b));
        assert_eq!(b, [0x42, 0x42]);
        assert!(!bus.read(0x45, &mut b));
        assert!(bus.write(0x61, &[7]));
        assert_eq!(dev.lock().unwrap().last, Some((0x61, vec![7])));
        assert!(!bus.write(0x62, &[7]));
        assert_eq!(bus.get(0x43).map(|(b, _)| b), Some(0x40));
        assert!(bus.remove(0x40).is_some());
        assert!(!bus.read(0x42, &mut b));
    }

    #[test]
    fn mmio_dispatch_and_overlap() {
        let mut bus = MmioBus::new();
        let dev = Arc::new(Mutex::new(Reg::default()));
        bus.insert(0xfee0_0000, 0x1000, dev.clone()).unwrap();
        assert!(bus.insert(0xfee0_0fff, 1, dev.clone()).is_err());
        assert!(bus.insert(0xfedf_f001, 0x1000, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 1, dev.clone()).is_ok());
        let mut b = [0u8; 4];
        assert!(bus.read(0xfee0_0020, &mut b));
        assert_eq!(b, [0x20; 4]);
        assert!(!bus.read(0xfee0_1000, &mut b));
        assert!(bus.write(0xfee0_00b0, &[0, 0, 0, 0]));
        assert_eq!(dev.lock().unwrap().last, Some((0xfee0_00b0, vec![0; 4])));
        assert!(bus.read(u64::MAX, &mut b));
    }
}
