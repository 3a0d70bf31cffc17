//! Conventional PCI (PCI Local Bus 3.0): configuration mechanism #1 (I/O ports 0xCF8 and
//! 0xCFC-0xCFF), a host bridge at 00:00.0, type-0 configuration headers with 32-bit memory
//! BARs and a capability list, and dispatch of guest accesses to memory BARs wherever the
//! guest has placed them.
//!
//! One bus (bus 0), one function per slot. Extended configuration space (ECAM) is not
//! offered: the firmware tables describe a PNP0A03 host bridge reached through conf1.

use std::sync::{Arc, Mutex};

use crate::bus::{lock, MmioDevice, PioDevice};

/// First I/O port of configuration mechanism #1 (CONFIG_ADDRESS); CONFIG_DATA is at +4.
pub const CONF1_PORT: u16 = 0xcf8;
/// Number of ports of configuration mechanism #1.
pub const CONF1_LEN: u16 = 8;
/// Slots on the bus (device numbers 0-31).
pub const SLOTS: usize = 32;
/// Size of the configuration space of a function, in bytes.
pub const CONFIG_SIZE: usize = 256;

/// Configuration header offsets (PCI 3.0 §6.1).
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const BAR0: usize = 0x10;
const CAP_PTR: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
/// Command register: memory space enable.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable.
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// Status register: capabilities list present.
const STATUS_CAP_LIST: u16 = 1 << 4;

/// A type-0 configuration header with up to six 32-bit memory BARs and a capability list.
///
/// Writable bits are tracked per byte (`wmask`); BAR writes keep the low bits that encode
/// the BAR's size, so writing all ones reads back the size mask (BAR sizing).
pub struct PciConfig {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    /// BAR sizes in bytes (0 = not implemented); powers of two ≥ 16.
    bar_size: [u32; 6],
    next_cap: usize,
}

/// Identity of a function (PCI 3.0 §6.2.1).
#[derive(Clone, Copy, Debug)]
pub struct PciId {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (base class << 16 | subclass << 8 | programming interface).
    pub class: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

impl PciConfig {
    /// A header for `id` with no BARs and no capabilities; command bits IO/MEM/bus master
    /// and INTx disable and the interrupt line are writable.
    pub fn new(id: PciId) -> PciConfig {
        let mut c = PciConfig { bytes: [0; CONFIG_SIZE], wmask: [0; CONFIG_SIZE], bar_size: [0; 6], next_cap: 0x40 };
        c.put16(0x00, id.vendor);
        c.put16(0x02, id.device);
        let [prog_if, subclass, base_class, _] = id.class.to_le_bytes();
        c.bytes[0x08] = id.revision;
        c.bytes[0x09] = prog_if;
        c.bytes[0x0a] = subclass;
        c.bytes[0x0b] = base_class;
        c.put16(0x2c, id.subsystem_vendor);
        c.put16(0x2e, id.subsystem);
        // Command: I/O, memory, bus master, INTx disable.
        c.wmask[COMMAND] = 0x07;
        c.wmask[COMMAND + 1] = 0x04;
        c.wmask[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Writes `v` at byte offset `off`; ignored if it does not fit in config space.
    fn put16(&mut self, off: usize, v: u16) {
        if let Some(dst) = span_mut(&mut self.bytes, off, 2) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Reads a little-endian u16 at byte offset `off` (< 255).
    pub fn get16(&self, off: usize) -> u16 {
        // Offsets are masked to 0-255, the size of config space.
        let byte = |o: usize| self.bytes.get(o & 0xff).copied().unwrap_or(0xff);
        u16::from_le_bytes([byte(off), byte(off.wrapping_add(1))])
    }

    /// Reads a little-endian u32 at byte offset `off` (< 253).
    pub fn get32(&self, off: usize) -> u32 {
        let o = off & 0xfc;
        let dword = self.bytes.get(o..).and_then(|s| s.get(..4)).and_then(|s| s.try_into().ok());
        u32::from_le_bytes(dword.unwrap_or([0; 4]))
    }

    /// Declares BAR `idx` (0-5) as a 32-bit, non-prefetchable memory BAR of `size` bytes (a
    /// power of two ≥ 16) placed at GPA `base` (aligned to `size`).
    pub fn add_mem_bar32(&mut self, idx: usize, size: u32, base: u32) {
        debug_assert!(size.is_power_of_two() && size >= 16 && base.is_multiple_of(size));
        let Some(bar_size) = self.bar_size.get_mut(idx) else {
            return;
        };
        *bar_size = size;
        let off = BAR0 + idx * 4;
        if let Some(dst) = span_mut(&mut self.bytes, off, 4) {
            dst.copy_from_slice(&base.to_le_bytes());
        }
        if let Some(dst) = span_mut(&mut self.wmask, off, 4) {
            dst.copy_from_slice(&(!(size - 1)).to_le_bytes());
        }
    }

    /// Appends capability `body` (its first byte is the capability ID; the second, the next
    /// pointer, is filled in here) to the capability list; returns its config offset, or
    /// `None` when config space is full. `writable` gives per-byte write masks for the body
    /// (shorter than `body`: the rest is read-only).
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Option<usize> {
        let off = self.next_cap;
        let len = body.len().max(2).next_multiple_of(4);
        // Capability pointers are bytes: config space is 256 bytes long.
        let off_u8 = u8::try_from(off).ok()?;
        let end = off.checked_add(len).filter(|&end| end <= CONFIG_SIZE)?;
        // Link: the header's pointer or the last capability's next field.
        let link = if self.bytes[CAP_PTR] == 0 {
            CAP_PTR
        } else {
            // A well-formed list has at most CONFIG_SIZE / 4 entries; a longer walk is a cycle.
            let mut p = usize::from(self.bytes[CAP_PTR]);
            let mut link = None;
            for _ in 0..CONFIG_SIZE / 4 {
                let next = *self.bytes.get(p + 1)?;
                if next == 0 {
                    link = Some(p + 1);
                    break;
                }
                p = usize::from(next);
            }
            link?
        };
        let (Some(bytes), Some(wmask)) = (self.bytes.get_mut(off..end), self.wmask.get_mut(off..end)) else {
            return None;
        };
        // `len` >= `body.len()` and >= 4: the body and its ID and next bytes fit.
        if let Some(dst) = bytes.get_mut(..body.len()) {
            dst.copy_from_slice(body);
        }
        for (w, &m) in wmask.iter_mut().zip(writable).take(body.len()) {
            *w = m;
        }
        if let ([_, next, ..], [id_mask, next_mask, ..]) = (bytes, wmask) {
            *next = 0;
            *id_mask = 0;
            *next_mask = 0;
        }
        if let Some(l) = self.bytes.get_mut(link) {
            *l = off_u8;
        }
        if link == CAP_PTR {
            let st = self.get16(STATUS) | STATUS_CAP_LIST;
            self.put16(STATUS, st);
        }
        self.next_cap = end;
        Some(off)
    }

    /// The dword at config offset `reg * 4`.
    pub fn read_reg(&self, reg: usize) -> u32 {
        if reg >= CONFIG_SIZE / 4 {
            return 0xffff_ffff;
        }
        self.get32(reg * 4)
    }

    /// Applies a guest write of `data` (1, 2 or 4 bytes) at byte offset `offset`, honouring
    /// the write masks. Accesses past config space are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let (Some(bytes), Some(wmask)) = (self.bytes.get_mut(offset..), self.wmask.get(offset..)) else {
            return;
        };
        for ((byte, &m), &b) in bytes.iter_mut().zip(wmask).zip(data) {
            *byte = (*byte & !m) | (b & m);
        }
    }

    /// Raw bytes of config space (for devices updating their own capability registers).
    pub fn bytes_mut(&mut self) -> &mut [u8; CONFIG_SIZE] {
        &mut self.bytes
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.get16(COMMAND)
    }

    /// Memory BAR `idx` as `(GPA, size)` when memory decoding is on and the BAR is
    /// implemented; `None` otherwise.
    pub fn mem_bar(&self, idx: usize) -> Option<(u64, u64)> {
        let size = *self.bar_size.get(idx)?;
        if size == 0 || self.command() & CMD_MEMORY == 0 {
            return None;
        }
        let base = u64::from(self.get32(BAR0 + idx * 4) & !(size - 1));
        Some((base, u64::from(size)))
    }
}

/// The `len` bytes of `buf` at `off`, if they lie within it.
fn span_mut(buf: &mut [u8], off: usize, len: usize) -> Option<&mut [u8]> {
    buf.get_mut(off..)?.get_mut(..len)
}

/// A PCI function on the bus.
pub trait PciDevice: Send {
    /// The configuration header.
    fn config(&self) -> &PciConfig;
    /// Reads the config dword at byte offset `reg * 4` (`reg` < 64).
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }
    /// Guest write of `data` (1, 2 or 4 bytes) at config byte offset `offset`.
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// Guest read of memory BAR `bar` at `offset` bytes into it (1 to 8 bytes).
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Guest write to memory BAR `bar` at `offset` bytes into it.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge at 00:00.0 (class 06/00), so that Linux's conf1 sanity check passes.
pub struct HostBridge {
    config: PciConfig,
}

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge {
            config: PciConfig::new(PciId {
                vendor: 0x8086,
                device: 0x0d57,
                class: 0x06_00_00,
                revision: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Bus 0: configuration mechanism #1 on ports 0xCF8-0xCFF and memory-BAR dispatch for the
/// MMIO window the firmware tables give the host bridge.
///
/// Register it as a [`PioDevice`] at [`CONF1_PORT`] and as an [`MmioDevice`] over the BAR
/// window. Lock order: bus → device.
pub struct PciBus {
    config_address: u32,
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with the host bridge in slot 0.
    pub fn new() -> PciBus {
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = Vec::with_capacity(SLOTS);
        slots.push(Some(Arc::new(Mutex::new(HostBridge::default()))));
        slots.resize(SLOTS, None);
        PciBus { config_address: 0, slots }
    }

    /// Puts `dev` in the first free slot; returns its device number, or `None` when all 32
    /// slots are taken.
    pub fn add(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Option<u8> {
        let (slot, n) = self.slots.iter_mut().zip(0u8..).find(|(s, _)| s.is_none())?;
        *slot = Some(dev);
        Some(n)
    }

    /// The CONFIG_ADDRESS latch (for snapshots).
    pub fn config_address(&self) -> u32 {
        self.config_address
    }

    /// Restores the CONFIG_ADDRESS latch.
    pub fn set_config_address(&mut self, v: u32) {
        self.config_address = v & 0x80ff_fffc;
    }

    /// The function addressed by CONFIG_ADDRESS, if enabled and present, and the register.
    fn selected(&self) -> Option<(Arc<Mutex<dyn PciDevice>>, usize)> {
        let a = self.config_address;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let (bus, dev, func, reg) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 7, ((a >> 2) & 0x3f) as usize);
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(dev as usize)?.clone().map(|d| (d, reg))
    }
}

impl PioDevice for PciBus {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        let off = usize::from(port.wrapping_sub(CONF1_PORT));
        if off < 4 {
            let v = self.config_address.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = v.get(off + i).copied().unwrap_or(0xff);
            }
            return;
        }
        let val = match self.selected() {
            Some((d, reg)) => lock(&d).config_read(reg),
            None => 0xffff_ffff,
        };
        let v = val.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(off - 4 + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, port: u16, data: &[u8]) {
        let off = usize::from(port.wrapping_sub(CONF1_PORT));
        if off < 4 {
            // Only a full dword write at 0xCF8 sets CONFIG_ADDRESS (byte writes to 0xCFB are
            // the legacy mechanism #2 probe and must not disturb it).
            if let (0, &[b0, b1, b2, b3]) = (off, data) {
                self.config_address = u32::from_le_bytes([b0, b1, b2, b3]) & 0x80ff_fffc;
            }
            return;
        }
        if let Some((d, reg)) = self.selected() {
            let within = off - 4;
            // CONFIG_DATA is 4 bytes wide: accesses beyond it are ignored or clipped.
            let Some(room) = 4usize.checked_sub(within) else {
                return;
            };
            lock(&d).config_write(reg * 4 + within, data.get(..room).unwrap_or(data));
        }
    }
}

impl MmioDevice for PciBus {
    fn read(&mut self, gpa: u64, data: &mut [u8]) {
        for dev in self.slots.iter().flatten() {
            let mut d = lock(dev);
            for bar in 0..6 {
                if let Some((base, size)) = d.config().mem_bar(bar) {
                    if gpa >= base && gpa - base < size {
                        d.bar_read(bar, gpa - base, data);
                        return;
                    }
                }
            }
        }
        data.fill(0xff);
    }

    fn write(&mut self, gpa: u64, data: &[u8]) {
        for dev in self.slots.iter().flatten() {
            let mut d = lock(dev);
            for bar in 0..6 {
                if let Some((base, size)) = d.config().mem_bar(bar) {
                    if gpa >= base && gpa - base < size {
                        d.bar_write(bar, gpa - base, data);
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dummy {
        config: PciConfig,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }
    impl PciDevice for Dummy {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(bar).unwrap() + (offset & 0xff) as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((bar, offset, data.to_vec()));
        }
    }

    fn cfg_read(bus: &mut PciBus, dev: u32, reg: u32) -> u32 {
        PioDevice::write(bus, 0xcf8, &(0x8000_0000 | dev << 11 | reg).to_le_bytes());
        let mut b = [0u8; 4];
        PioDevice::read(bus, 0xcfc, &mut b);
        u32::from_le_bytes(b)
    }

    fn cfg_write(bus: &mut PciBus, dev: u32, reg: u32, v: u32) {
        PioDevice::write(bus, 0xcf8, &(0x8000_0000 | dev << 11 | reg).to_le_bytes());
        PioDevice::write(bus, 0xcfc, &v.to_le_bytes());
    }

    fn bus_with_dummy() -> (PciBus, Arc<Mutex<Dummy>>) {
        let mut config = PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x01_80_00,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 2,
        });
        config.add_mem_bar32(0, 0x8000, 0xc000_0000);
        config.add_capability(&[0x09, 0, 4, 1], &[]).unwrap();
        config.add_capability(&[0x11, 0, 0, 0], &[0, 0, 0, 0xc0]).unwrap();
        let d = Arc::new(Mutex::new(Dummy { config, last_write: None }));
        let mut bus = PciBus::new();
        assert_eq!(bus.add(d.clone()), Some(1));
        (bus, d)
    }

    #[test]
    fn conf1_enumerates_host_bridge_and_device() {
        let (mut bus, _) = bus_with_dummy();
        assert_eq!(cfg_read(&mut bus, 0, 0), 0x0d57_8086);
        assert_eq!(cfg_read(&mut bus, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(cfg_read(&mut bus, 1, 0), 0x1042_1af4);
        assert_eq!(cfg_read(&mut bus, 2, 0), 0xffff_ffff, "empty slot");
        // Function 1 and bus 1 are absent.
        PioDevice::write(&mut bus, 0xcf8, &0x8000_0900u32.to_le_bytes());
        let mut b = [0u8; 4];
        PioDevice::read(&mut bus, 0xcfc, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xffff_ffff);
        // CONFIG_ADDRESS reads back; a byte write to 0xCFB leaves it alone.
        PioDevice::write(&mut bus, 0xcfb, &[1]);
        PioDevice::read(&mut bus, 0xcf8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0900);
    }

    #[test]
    fn capability_list_is_linked() {
        let (mut bus, _) = bus_with_dummy();
        assert_ne!(cfg_read(&mut bus, 1, 4) & (1 << 20), 0, "status: capability list");
        let first = cfg_read(&mut bus, 1, 0x34) & 0xff;
        assert_eq!(first, 0x40);
        let c0 = cfg_read(&mut bus, 1, first);
        assert_eq!(c0 & 0xff, 0x09);
        let second = (c0 >> 8) & 0xff;
        assert_eq!(cfg_read(&mut bus, 1, second) & 0xffff, 0x11);
    }

    #[test]
    fn bar_sizing_relocation_and_dispatch() {
        let (mut bus, d) = bus_with_dummy();
        let mut b = [0u8; 4];
        // Memory decoding off: nothing answers at the BAR.
        MmioDevice::read(&mut bus, 0xc000_0010, &mut b);
        assert_eq!(b, [0xff; 4]);
        cfg_write(&mut bus, 1, 0x10, 0xffff_ffff);
        assert_eq!(cfg_read(&mut bus, 1, 0x10), 0xffff_8000, "size mask");
        cfg_write(&mut bus, 1, 0x10, 0xd000_0000);
        cfg_write(&mut bus, 1, 4, u32::from(CMD_MEMORY | CMD_BUS_MASTER));
        MmioDevice::read(&mut bus, 0xd000_0010, &mut b);
        assert_eq!(b, [0x10; 4]);
        MmioDevice::write(&mut bus, 0xd000_7ffc, &[1, 2]);
        assert_eq!(d.lock().unwrap().last_write, Some((0, 0x7ffc, vec![1, 2])));
        MmioDevice::read(&mut bus, 0xc000_0010, &mut b);
        assert_eq!(b, [0xff; 4], "old address no longer decodes");
    }

    #[test]
    fn hostile_config_accesses_do_not_panic() {
        let (mut bus, _) = bus_with_dummy();
        for i in 0..5000u32 {
            let x = i.wrapping_mul(2_654_435_761);
            PioDevice::write(&mut bus, 0xcf8, &(x | 0x8000_0000).to_le_bytes());
            let port = 0xcf8 + (x % 8) as u16;
            let len = [1, 2, 4][(x >> 3) as usize % 3];
            let mut b = vec![0u8; len];
            PioDevice::read(&mut bus, port, &mut b);
            PioDevice::write(&mut bus, port, &x.to_le_bytes()[..len]);
            MmioDevice::write(&mut bus, u64::from(x), &b);
        }
        // Post-condition: the read-only identity registers survived; enumeration still works.
        assert_eq!(cfg_read(&mut bus, 0, 0), 0x0d57_8086);
        assert_eq!(cfg_read(&mut bus, 1, 0), 0x1042_1af4);
        assert_eq!(cfg_read(&mut bus, 2, 0), 0xffff_ffff, "empty slot");
    }
}
