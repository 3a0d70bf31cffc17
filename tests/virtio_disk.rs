//! virtio-blk with the stock Debian guest on `emu`: ext4 images made on the host (raw, and
//! a qcow2 overlay made by `qemu-img create -f qcow2`), a read-only disk, GET_ID serials,
//! virtio-rng, and crash consistency (kill -9 right after the guest's `sync`).

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// An ext4 image of `size` holding `known.bin` = `data`.
fn ext4_image(dir: &TempDir, name: &str, size: &str, data: &[u8]) -> String {
    let src = dir.path(&format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("known.bin"), data).unwrap();
    let img = dir.path(name);
    host("mkfs.ext4", &["-q", "-F", "-d", src.to_str().unwrap(), img.to_str().unwrap(), size]);
    img.display().to_string()
}

/// `path` of the ext4 file system in raw image `img`, read on the host with debugfs.
fn debugfs_cat(img: &str, path: &str) -> Vec<u8> {
    host("debugfs", &["-R", &format!("cat {path}"), img])
}

/// A qcow2 overlay (made by qemu-img) over raw image `base`.
fn qcow2_overlay(dir: &TempDir, name: &str, base: &str) -> String {
    let q = dir.path(name).display().to_string();
    host("qemu-img", &["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", &q]);
    q
}

/// qcow2 `q` flattened to a raw image, for debugfs.
fn qcow2_to_raw(dir: &TempDir, q: &str, name: &str) -> String {
    let raw = dir.path(name).display().to_string();
    host("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", q, &raw]);
    raw
}

fn file_sha(p: &str) -> String {
    sha256_hex(&std::fs::read(p).unwrap())
}

#[test]
fn ext4_on_raw_and_qcow2_readonly_disk_serial_and_rng() {
    let dir = TempDir::new("disks");
    let known = pattern(1 << 20, 7);
    let known_sha = sha256_hex(&known);
    let raw = ext4_image(&dir, "a.raw", "64M", &known);
    let base = ext4_image(&dir, "base.raw", "64M", &known);
    let base_sha = file_sha(&base);
    let qcow = qcow2_overlay(&dir, "b.qcow2", &base);
    let ro = ext4_image(&dir, "c.raw", "16M", &known);
    let ro_sha = file_sha(&ro);
    let script = r#"
mkdir -p /mnt/a /mnt/b /mnt/c
mount -t ext4 /dev/vda /mnt/a && echo RV-A-MOUNTED
mount -t ext4 /dev/vdb /mnt/b && echo RV-B-MOUNTED
echo "RV-A-OLD $(sha256sum /mnt/a/known.bin)"
echo "RV-B-OLD $(sha256sum /mnt/b/known.bin)"
dd if=/dev/urandom of=/mnt/a/new.bin bs=1M count=4 2>/dev/null
dd if=/dev/urandom of=/mnt/b/new.bin bs=1M count=4 2>/dev/null
echo "RV-A-NEW $(sha256sum /mnt/a/new.bin)"
echo "RV-B-NEW $(sha256sum /mnt/b/new.bin)"
sync
umount /mnt/a
umount /mnt/b
mount -t ext4 -o ro /dev/vdc /mnt/c && echo "RV-C-OLD $(sha256sum /mnt/c/known.bin)"
umount /mnt/c
if dd if=/dev/zero of=/dev/vdc bs=4096 count=1 conv=fsync 2>/dev/null; then echo RV-RO-WRITE-OK; else echo RV-RO-WRITE-FAILED; fi
echo "RV-SERIAL $(cat /sys/block/vdc/serial)"
echo "RV-RNG $(cat /sys/class/misc/hw_random/rng_current)"
echo "RV-RNG-BYTES $(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c)"
echo RV-END
"#;
    let extra: Vec<String> = vec![
        "--disk".into(),
        format!("path={raw}"),
        "--disk".into(),
        format!("path={qcow},format=qcow2"),
        "--disk".into(),
        format!("path={ro},readonly=on,serial=rv-ro-disk"),
        "--rng".into(),
    ];
    // The VM runs in a jail (`run --jail`) where the host allows it: its disks, backing file
    // and console file are all it sees; the jail's user writes the console file in `dir`.
    // SAFETY: geteuid(2) has no preconditions.
    let jailed = unsafe { libc::geteuid() } == 0;
    let mut extra = extra;
    if jailed {
        std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
        extra.push("--jail".into());
    } else {
        eprintln!("skipped: --jail (needs root); the VM runs unjailed");
    }
    let (code, console, stderr) = run_guest(script, &dir.path("console.log"), &extra);
    let t = tail(&console);
    assert!(console.contains("RV-END"), "workload did not finish; stderr: {stderr}\n{t}");
    assert_eq!(code, 0, "power-off must exit 0; stderr: {stderr}\n{t}");
    assert!(console.contains("RV-A-MOUNTED") && console.contains("RV-B-MOUNTED"), "{t}");
    assert_eq!(console_value(&console, "RV-A-OLD"), Some(known_sha.as_str()), "{t}");
    assert_eq!(console_value(&console, "RV-B-OLD"), Some(known_sha.as_str()), "{t}");
    assert_eq!(console_value(&console, "RV-C-OLD"), Some(known_sha.as_str()), "{t}");

    // What the guest wrote is in the images, as the host reads them.
    let a_new = console_value(&console, "RV-A-NEW").expect("RV-A-NEW").to_string();
    assert_eq!(sha256_hex(&debugfs_cat(&raw, "/new.bin")), a_new, "raw image");
    let b_new = console_value(&console, "RV-B-NEW").expect("RV-B-NEW").to_string();
    let flat = qcow2_to_raw(&dir, &qcow, "b-flat.raw");
    assert_eq!(sha256_hex(&debugfs_cat(&flat, "/new.bin")), b_new, "qcow2 image");
    assert_eq!(sha256_hex(&debugfs_cat(&flat, "/known.bin")), known_sha, "qcow2 reads through to its backing file");
    host("qemu-img", &["check", "-q", &qcow]);
    assert_eq!(file_sha(&base), base_sha, "the qcow2 backing file must not change");

    // The read-only disk refused the write, the VM went on, and the image is untouched.
    assert!(console.contains("RV-RO-WRITE-FAILED"), "{t}");
    assert_eq!(file_sha(&ro), ro_sha, "read-only image changed");
    assert_eq!(console_value(&console, "RV-SERIAL"), Some("rv-ro-disk"), "{t}");

    assert_eq!(console_value(&console, "RV-RNG"), Some("virtio_rng.0"), "{t}");
    assert_eq!(console_value(&console, "RV-RNG-BYTES"), Some("64"), "{t}");
    if jailed {
        // The writable images were the jail user's for the run, and are root's again.
        use std::os::unix::fs::MetadataExt as _;
        for img in [&raw, &qcow] {
            assert_eq!(std::fs::metadata(img).unwrap().uid(), 0, "{img} given back");
        }
        let log_owner = std::fs::metadata(dir.path("console.log")).unwrap().uid();
        assert_eq!(log_owner, 2_099_999_999, "the console file was written by the jail's user");
    }
}

fn e2fsck_replay(img: &str) {
    // Exit 0 (clean) or 1 (journal replayed / fixed) are both fine; 4+ is corruption.
    let st =
        Command::new("e2fsck").args(["-f", "-y", img]).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
    assert!(matches!(st.code(), Some(0 | 1)), "e2fsck on {img}: {st}");
}

#[test]
fn synced_data_survives_kill_9() {
    let dir = TempDir::new("crash");
    let known = pattern(64 << 10, 3);
    let raw = ext4_image(&dir, "a.raw", "64M", &known);
    let base = ext4_image(&dir, "base.raw", "64M", &known);
    let qcow = qcow2_overlay(&dir, "b.qcow2", &base);
    let script = r#"
mkdir -p /mnt/a /mnt/b
mount -t ext4 /dev/vda /mnt/a && mount -t ext4 /dev/vdb /mnt/b && echo RV-MOUNTED
dd if=/dev/urandom of=/mnt/a/crash.bin bs=1M count=4 2>/dev/null
dd if=/dev/urandom of=/mnt/b/crash.bin bs=1M count=4 2>/dev/null
echo "RV-A $(sha256sum /mnt/a/crash.bin)"
echo "RV-B $(sha256sum /mnt/b/crash.bin)"
sync
echo RV-SYNCED
sleep 600
"#;
    let log = dir.path("console.log");
    let extra: Vec<String> = vec!["--disk".into(), format!("path={raw}"), "--disk".into(), format!("path={qcow}")];
    let mut child = guest_command(script, &log, &extra).stdin(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let console = wait_for_console(&mut child, &log, "RV-SYNCED", Duration::from_secs(300));
    // SIGKILL: no chance for the VMM to flush anything after the guest's sync returned.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(console.contains("RV-MOUNTED"), "{}", tail(&console));
    let a = console_value(&console, "RV-A").expect("RV-A").to_string();
    let b = console_value(&console, "RV-B").expect("RV-B").to_string();
    e2fsck_replay(&raw);
    assert_eq!(sha256_hex(&debugfs_cat(&raw, "/crash.bin")), a, "raw image after kill -9");
    host("qemu-img", &["check", "-q", &qcow]);
    let flat = qcow2_to_raw(&dir, &qcow, "b-flat.raw");
    e2fsck_replay(&flat);
    assert_eq!(sha256_hex(&debugfs_cat(&flat, "/crash.bin")), b, "qcow2 image after kill -9");
    assert!(Path::new(&raw).exists());
}
