//! The `kernel_loader` target: a kernel image and an initrd loaded into 128 MiB of guest
//! memory by the VMM's boot loader (`vmm::arch::load`): bzImage (64-bit boot protocol, its
//! setup header checked against the file) or ELF vmlinux with a PVH note, through
//! `linux-loader`, then the initrd placement, boot parameters or PVH start info, ACPI tables
//! and page tables.
//!
//! Input: byte 0 is the initrd's size in 256 KiB units (0: no initrd; its content is zeros,
//! only its size matters to the loader), the rest is the kernel file.

use std::path::PathBuf;

const MEM_SIZE: u64 = 128 << 20;

fn file(name: &str) -> PathBuf {
    crate::scratch_dir().join(format!("{name}-{:?}", std::thread::current().id()))
}

/// Runs one input (see the module documentation).
pub fn run(data: &[u8]) {
    let _ = loaded(data);
}

/// [`run`], returning the loader's answer.
pub fn loaded(data: &[u8]) -> Result<(), String> {
    let Some((&initrd_units, kernel)) = data.split_first() else { return Err("empty".into()) };
    let kernel_path = file("kernel");
    if std::fs::write(&kernel_path, kernel).is_err() {
        return Err("scratch file".into());
    }
    let initrd_path = file("initrd");
    let initrd = if initrd_units == 0 {
        None
    } else {
        let made = std::fs::File::create(&initrd_path).and_then(|f| f.set_len(u64::from(initrd_units) << 18));
        if made.is_err() {
            return Err("scratch file".into());
        }
        Some(initrd_path.as_path())
    };
    let mem = vmm::memory::create(MEM_SIZE, &Default::default()).map_err(|e| e.to_string())?;
    let info = vmm::arch::load(&mem, MEM_SIZE, &kernel_path, initrd, "console=ttyS0 reboot=k panic=1")
        .map_err(|e| e.to_string())?;
    let _ = vmm::arch::boot_cpu_state(&info);
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The seeds made to load do.
    #[test]
    fn seeds_load() {
        for (target, name, data) in crate::seeds::all() {
            if target == "kernel_loader" {
                let r = super::loaded(&data);
                eprintln!("{name}: {r:?}");
                if name.contains("tiny") || name.contains("cut") {
                    assert_eq!(r, Ok(()), "{name}");
                }
            }
        }
    }
}
