//! The `snapshot` target: a VMM snapshot folder (`crates/vmm/src/persist`) read and checked
//! as `vm.restore` reads it, then its parts restored the way a restore hands them out: the
//! accelerator's VM state and the vCPUs into an `emu` VM, the legacy devices' states into
//! fresh devices, the virtio transports' states into virtio-pci functions (whose devices
//! then resume from guest memory, inline), the balloon's state, and the memory runs into
//! 1 MiB of guest memory from a zero `memory.bin`.
//!
//! Input: byte 0 bit 0 set: the rest is the whole `snapshot.json`; clear: the rest is the
//! state line, and a header with the right format, version and SHA-256 goes before it (so
//! the fuzzer gets past the checksum).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::MsiSink;
use virtio::device::{DmaLog, GuestMem, VirtioDevice};
use virtio::worker::inline;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 1 << 20;

struct Sink;
impl MsiSink for Sink {
    fn send_msi(&self, _addr: u64, _data: u32) {}
}

fn hex_sha256(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// A device model of `device_type` to restore a transport state into.
fn device_of(device_type: u32) -> Option<Box<dyn VirtioDevice>> {
    Some(match device_type {
        virtio::TYPE_RNG => Box::new(virtio::rng::Rng::new()),
        virtio::TYPE_CONSOLE => Box::new(virtio::console::Console::new(Box::new(std::io::sink()), None).ok()?),
        virtio::TYPE_BALLOON => Box::new(virtio::balloon::Balloon::new(virtio::balloon::BalloonOptions::default())),
        virtio::TYPE_BLOCK => {
            let path = crate::scratch_dir().join(format!("snapshot-disk-{:?}.img", std::thread::current().id()));
            std::fs::write(&path, vec![0u8; 64 << 10]).ok()?;
            let img = block::DiskImage::open(&path, block::Format::Raw, false).ok()?;
            Box::new(virtio::block::Block::new(img, false, None))
        }
        _ => return None,
    })
}

/// Runs one input (see the module documentation).
pub fn run(data: &[u8]) {
    let _ = restored(data);
}

/// [`run`], returning how far the input got: `Err` with the snapshot's refusal, or the
/// virtio transports that accepted their state.
pub fn restored(data: &[u8]) -> Result<usize, String> {
    let Some((&flags, rest)) = data.split_first() else { return Err("empty".into()) };
    let dir = crate::scratch_dir().join(format!("snapshot-{:?}", std::thread::current().id()));
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return Err("scratch folder".into());
    }
    let file = if flags & 1 != 0 {
        rest.to_vec()
    } else {
        let header = format!(
            "{{\"format\":\"{}\",\"version\":{},\"sha256\":\"{}\"}}\n",
            vmm::persist::FORMAT,
            vmm::persist::VERSION,
            hex_sha256(rest)
        );
        let mut f = header.into_bytes();
        f.extend_from_slice(rest);
        f.push(b'\n');
        f
    };
    let memory_file = dir.join("memory.bin");
    let written = std::fs::write(dir.join("snapshot.json"), &file)
        .and_then(|()| std::fs::File::create(&memory_file))
        .and_then(|f| f.set_len(MEM_SIZE as u64));
    if written.is_err() {
        return Err("scratch files".into());
    }
    let st = vmm::persist::read_state(&dir).map_err(|e| e.to_string())?;
    Ok(restore_parts(&st, &memory_file))
}

fn restore_parts(st: &vmm::persist::VmState, memory_file: &std::path::Path) -> usize {
    inline::enable();
    let _ = vmm::config::validate(&st.config);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else { return 0 };
    let mem: GuestMem = mem;
    let _ = vmm::persist::memory::load(&mem, memory_file, &st.memory);

    // The emu accelerator: irqchip state, then the vCPUs.
    let mut ram = vec![0u8; MEM_SIZE];
    let region = accel::RamRegion { gpa: 0, size: MEM_SIZE as u64, host_addr: ram.as_mut_ptr() };
    let now = Arc::new(AtomicU64::new(st.clock_ns));
    let t = now.clone();
    let clock: accel::Clock = Arc::new(move || t.load(Ordering::Relaxed));
    let cpus = u8::try_from(st.vcpus.len().clamp(1, 4)).unwrap_or(1);
    let spec = accel::VmSpec { ram: std::slice::from_ref(&region), clock, cpus };
    if let Ok(vm) = accel::emu::EmuVm::new(&spec) {
        use accel::Vm as _;
        let _ = vm.restore_state(&st.vm);
        for (id, s) in (0..cpus).zip(&st.vcpus) {
            if let Ok(mut vcpu) = vm.create_vcpu(id) {
                let _ = vcpu.restore_snapshot(s);
            }
        }
    }

    // Legacy devices.
    let _ = devices::Serial::new(Arc::new(devices::NoIrq), Box::new(std::io::sink())).restore(&st.serial);
    let _ = devices::I8042::new(Box::new(|| {})).restore(&st.i8042);
    let _ = devices::Cmos::new(0xc000_0000, 0).restore(&st.cmos);
    let _ = devices::AcpiPm::new(Box::new(|| {})).restore(&st.pm);
    devices::PciBus::new().set_config_address(st.pci_config_address);

    // Virtio transports: restored, then resumed (the device reads its rings' indices).
    let mut accepted = 0;
    for s in st.virtio.iter().take(8) {
        let Some(dev) = device_of(s.device_type) else { continue };
        let mut pci = virtio::pci::VirtioPci::new(
            dev,
            0xe000_0000,
            mem.clone(),
            Arc::new(Sink),
            Arc::new(DmaLog::default()),
            None,
        );
        if pci.restore_state(s).is_ok() {
            accepted += 1;
            pci.resume_device();
            inline::run(16);
        }
    }
    if let Some(b) = &st.balloon {
        virtio::balloon::Balloon::new(virtio::balloon::BalloonOptions::default()).handle().restore_state(b);
    }
    drop(ram);
    accepted
}

#[cfg(test)]
mod tests {
    /// The seed snapshot is read, checked and restored.
    #[test]
    fn seed_restores() {
        for (target, name, data) in crate::seeds::all() {
            if target == "snapshot" {
                assert_eq!(super::restored(&data), Ok(1), "{name}");
            }
        }
    }
}
