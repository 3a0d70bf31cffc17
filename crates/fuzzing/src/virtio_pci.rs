//! The `virtio_pci` target: a virtio-pci function (the modern transport, virtio 1.2 §4.1)
//! on PCI bus 0 behind the host bridge, reached the way a guest reaches it: configuration
//! space through the conf1 ports (0xCF8/0xCFC), BAR 0 (common configuration, notification,
//! ISR, device configuration, MSI-X table and PBA) through MMIO. The device model behind it
//! runs inline ([`virtio::worker::inline`]), so a driver that sets `DRIVER_OK` and notifies
//! a queue makes it serve descriptor chains from guest memory.
//!
//! Input layout: byte 0 picks the device (rng, console, balloon, net), byte 1 is the number
//! of operations `N`, then `N` operations of 12 bytes (kind, size, `u16` offset, `u64`
//! value), then guest memory from GPA 0 (at most 192 KiB of the 256 KiB).
//!
//! Operation kinds (`kind % 8`): 0 write CONFIG_ADDRESS (the value's low 32 bits), 1 read
//! and 2 write CONFIG_DATA at byte `offset & 3`, 3 read and 4 write BAR 0 at `offset` (BAR
//! 0 at its initial base; the guest may move it), 5 serve the device's ready events, 6 a
//! snapshot: quiesce, save the transport's state, resume, and restore the state into a fresh
//! transport of the same device (which must accept it) and resume that one, 7 quiesce and
//! resume the device. Sizes are `1 << (size % 4)` bytes.

use std::sync::{Arc, Mutex};

use devices::{MmioDevice, MsiSink, PciBus, PioDevice};
use virtio::device::{DmaLog, GuestMem, VirtioDevice};
use virtio::pci::VirtioPci;
use virtio::worker::inline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Input;

/// BAR 0's initial guest-physical base.
pub const BAR_BASE: u32 = 0xe000_0000;
const MEM_SIZE: usize = 0x40000;

struct Sink;
impl MsiSink for Sink {
    fn send_msi(&self, _addr: u64, _data: u32) {}
}

fn device(kind: u8) -> Option<Box<dyn VirtioDevice>> {
    Some(match kind % 4 {
        0 => Box::new(virtio::rng::Rng::new()),
        1 => Box::new(virtio::console::Console::new(Box::new(std::io::sink()), None).ok()?),
        2 => Box::new(virtio::balloon::Balloon::new(virtio::balloon::BalloonOptions::default())),
        _ => {
            struct NoFrames(EventFd);
            impl virtio::net::FrameIo for NoFrames {
                fn raw_fd(&self) -> std::os::fd::RawFd {
                    std::os::fd::AsRawFd::as_raw_fd(&self.0)
                }
                fn read_frame(&self, _buf: &mut [u8]) -> std::io::Result<usize> {
                    Err(std::io::ErrorKind::WouldBlock.into())
                }
                fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
                    Ok(frame.len())
                }
            }
            let io = Arc::new(NoFrames(EventFd::new(EFD_NONBLOCK).ok()?));
            Box::new(virtio::net::Net::with_io(io, [0x52, 0x54, 0, 1, 2, 3]))
        }
    })
}

/// Runs one input (see the module documentation).
pub fn run(data: &[u8]) {
    let _ = served(data);
}

/// [`run`], returning the requests the device completed.
pub fn served(data: &[u8]) -> u64 {
    inline::enable();
    let mut i = Input::new(data);
    let kind_byte = i.u8();
    let Some(dev) = device(kind_byte) else { return 0 };
    let n = usize::from(i.u8());
    let ops = i.bytes(n * 12);
    let image = i.rest();
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else { return 0 };
    let mem: GuestMem = mem;
    let _ = mem.write_slice(image.get(..image.len().min(0x30000)).unwrap_or_default(), GuestAddress(0));
    let pci_dev = Arc::new(Mutex::new(VirtioPci::new(
        dev,
        BAR_BASE,
        mem.clone(),
        Arc::new(Sink),
        Arc::new(DmaLog::default()),
        None,
    )));
    let mut bus = PciBus::new();
    if bus.add(pci_dev.clone()).is_none() {
        return 0;
    }
    let mut ops = Input::new(ops);
    while !ops.is_empty() {
        let kind = ops.u8() % 8;
        let size = 1usize << (ops.u8() % 4);
        let offset = ops.u16();
        let value = ops.u64().to_le_bytes();
        let value = value.get(..size).unwrap_or_default();
        let mut buf = [0u8; 8];
        let buf = buf.get_mut(..size).unwrap_or_default();
        match kind {
            0 => PioDevice::write(&mut bus, devices::pci::CONF1_PORT, value.get(..4).unwrap_or(value)),
            1 => PioDevice::read(
                &mut bus,
                devices::pci::CONF1_PORT + 4 + (offset & 3),
                buf.get_mut(..size.min(4)).unwrap_or_default(),
            ),
            2 => PioDevice::write(
                &mut bus,
                devices::pci::CONF1_PORT + 4 + (offset & 3),
                value.get(..size.min(4)).unwrap_or(value),
            ),
            3 => MmioDevice::read(&mut bus, u64::from(BAR_BASE) + u64::from(offset), buf),
            4 => MmioDevice::write(&mut bus, u64::from(BAR_BASE) + u64::from(offset), value),
            5 => {
                inline::run(16);
            }
            6 => {
                // A snapshot: the state saved from the quiesced transport goes into a fresh
                // one, as `vm.restore` does, which must accept it and resume from it.
                let saved = {
                    let mut d = pci_dev.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = d.quiesce(std::time::Duration::ZERO);
                    let saved = d.save_state();
                    d.resume_device();
                    saved
                };
                let Some(dev) = device(kind_byte) else { continue };
                let mut fresh =
                    VirtioPci::new(dev, BAR_BASE, mem.clone(), Arc::new(Sink), Arc::new(DmaLog::default()), None);
                if let Err(e) = fresh.restore_state(&saved) {
                    panic!("virtio-pci refused a state it saved itself: {e}");
                }
                fresh.resume_device();
                inline::run(16);
            }
            _ => {
                let mut d = pci_dev.lock().unwrap_or_else(|e| e.into_inner());
                let _ = d.quiesce(std::time::Duration::ZERO);
                d.resume_device();
            }
        }
        inline::run(16);
    }
    let counters = pci_dev.lock().unwrap_or_else(|e| e.into_inner()).counters();
    counters.requests.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    /// The seeds initialise the device through the transport and have it serve a request
    /// (the console and balloon serve nothing from a single receive or inflate buffer
    /// without host input, so only the rng and net seeds are counted).
    #[test]
    fn seeds_drive_the_device() {
        for (target, name, data) in crate::seeds::all() {
            if target == "virtio_pci" {
                let n = super::served(&data);
                eprintln!("{name}: {n}");
                if name.ends_with("rng") {
                    assert!(n > 0, "{name}");
                }
            }
        }
    }
}
