//! Host I/O errors under a disk, with the Debian guest on `emu`: the disk image sits on a
//! small tmpfs that a filler file and the guest's writes fill up, so the host's writes fail
//! with ENOSPC. With `on-error=report` the guest sees an I/O error and the VM keeps running;
//! with `on-error=pause` the VM pauses with the reason in `vm.info`, and once space is freed
//! `vm.resume` completes the guest's write, whose data is then on disk, in order.
//!
//! Mounting needs root (CAP_SYS_ADMIN); where the host refuses, the tests print
//! "skipped: <why>" and pass.

mod common;

use api::types::{DiskConfig, DiskErrorPolicy, DiskFormat};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmpfs of `size` mounted on a fresh folder, unmounted (and the folder removed) when
/// dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    /// Mounts it on `dir`; `Err` says why it could not.
    fn mount(dir: PathBuf, size: &str) -> Result<SmallFs, String> {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "rv-disk-errors"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!("mount -t tmpfs: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(SmallFs(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazy, so that a VMM still holding the image (a failed test) cannot keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A 16 MiB tmpfs holding a 32 MiB image `disk.<format>` (sparse raw, or a fresh qcow2) and
/// a 12 MiB `filler`: about 4 MiB of the guest's writes fit.
fn full_fs(dir: &TempDir, format: DiskFormat) -> Option<(SmallFs, PathBuf, PathBuf)> {
    let fs = match SmallFs::mount(dir.path("fs"), "16M") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: cannot make a small file system: {why}");
            return None;
        }
    };
    let img = fs.path(&format!("disk.{format}"));
    match format {
        DiskFormat::Raw => std::fs::File::create(&img).unwrap().set_len(32 << 20).unwrap(),
        DiskFormat::Qcow2 => {
            host("qemu-img", &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"]);
        }
    }
    let filler = fs.path("filler");
    std::fs::write(&filler, vec![0x55u8; 12 << 20]).unwrap();
    Some((fs, img, filler))
}

/// The guest's workload: 8 MiB of random data written to /dev/vda through the page cache
/// and fsynced (so the host's write errors reach the guest at the fsync), then read back
/// from the disk.
const WRITE_8M: &str = r#"
dd if=/dev/urandom of=/tmp/data bs=1M count=8 2>/dev/null
echo "RV-DATA $(sha256sum /tmp/data)"
echo RV-WRITING
dd if=/tmp/data of=/dev/vda bs=1M conv=fsync 2>/dev/null
echo "RV-DD-STATUS $?"
echo 3 > /proc/sys/vm/drop_caches
echo "RV-READBACK $(dd if=/dev/vda bs=1M count=8 2>/dev/null | sha256sum)"
echo "RV-IOERRORS $(dmesg | grep -c 'I/O error')"
echo RV-END
"#;

#[test]
fn report_policy_gives_the_guest_an_io_error_and_the_vm_runs_on() {
    let dir = TempDir::new("disk-errors-report");
    let Some((_fs, img, _filler)) = full_fs(&dir, DiskFormat::Raw) else { return };
    let extra: Vec<String> = vec!["--disk".into(), format!("path={},format=raw,on-error=report", img.display())];
    let (code, console, stderr) = run_guest(WRITE_8M, &dir.path("console.log"), &extra);
    let t = tail(&console);
    assert!(console.contains("RV-END"), "the workload did not finish; stderr: {stderr}\n{t}");
    assert_eq!(code, 0, "the guest powers off normally after the error; stderr: {stderr}\n{t}");
    let status = console_value(&console, "RV-DD-STATUS").expect("RV-DD-STATUS");
    assert_ne!(status, "0", "the write cannot have succeeded on a full file system\n{t}");
    let errors: u64 = console_value(&console, "RV-IOERRORS").unwrap().parse().unwrap();
    assert!(errors > 0, "the guest's kernel logged the I/O errors\n{t}");
}

/// Polls `vm.info` until `done` holds for it (or `timeout` passes: the test fails, showing
/// the console).
fn wait_info(
    c: &api::client::Client,
    log: &Path,
    what: &str,
    timeout: Duration,
    done: impl Fn(&api::types::VmInfo) -> bool,
) -> api::types::VmInfo {
    let end = Instant::now() + timeout;
    loop {
        let info = c.info().unwrap();
        if done(&info) {
            return info;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}; vm.info: {} {:?}\n{}",
            info.state,
            info.pause_reason,
            tail(&std::fs::read_to_string(log).unwrap_or_default())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pause_policy_pauses_the_vm_and_resume_completes_the_write() {
    pause_then_resume(DiskFormat::Raw);
}

#[test]
fn pause_policy_on_qcow2_keeps_the_image_consistent() {
    pause_then_resume(DiskFormat::Qcow2);
}

/// A disk of `format` with `on-error=pause` fills its file system: the VM pauses, space is
/// freed, `vm.resume` completes the guest's write, and its data is in the image.
fn pause_then_resume(format: DiskFormat) {
    let dir = TempDir::new(&format!("disk-errors-pause-{format}"));
    let Some((_fs, img, filler)) = full_fs(&dir, format) else { return };
    let log = dir.path("console.log");
    // The script waits at the end so that the counters can be read before the VM goes.
    let script = format!("{WRITE_8M}sleep 600\n");
    let disk = DiskConfig {
        path: img.display().to_string(),
        format: Some(format),
        on_error: DiskErrorPolicy::Pause,
        ..Default::default()
    };
    let vmm = Vmm::start(&dir.path("api.sock"));
    let c = &vmm.client;
    c.create(&guest_config(&script, &log, vec![disk])).unwrap();
    c.boot().unwrap();

    // The write fills the file system: the VM pauses, saying why.
    let info = wait_info(c, &log, "the VM to pause on ENOSPC", Duration::from_secs(300), |i| i.state == "Paused");
    let reason = info.pause_reason.clone().expect("a pause reason");
    assert!(reason.starts_with("disk disk0: write at "), "{reason}");
    assert!(reason.contains("No space left on device"), "{reason}");
    let console = std::fs::read_to_string(&log).unwrap();
    assert!(console.contains("RV-WRITING") && !console.contains("RV-DD-STATUS"), "{}", tail(&console));
    let b = c.counters().unwrap().devices["disk0"].block.clone().unwrap();
    assert!(b.error_pauses >= 1, "{b:?}");
    // Paused, nothing retries on its own (no busy loop), and the guest saw no error.
    std::thread::sleep(Duration::from_secs(2));
    let info = c.info().unwrap();
    assert_eq!((info.state.as_str(), info.pause_reason.as_deref()), ("Paused", Some(reason.as_str())));
    let counters = c.counters().unwrap();
    let again = counters.devices["disk0"].block.clone().unwrap();
    assert_eq!((again.error_pauses, again.write_ops), (b.error_pauses, b.write_ops), "the disk waits for vm.resume");
    assert_eq!(counters.devices["disk0"].errors, 0, "no error reached the guest");

    // Space comes back: vm.resume retries the kept write first and the guest's write completes.
    std::fs::remove_file(&filler).unwrap();
    c.resume().unwrap();
    let info = c.info().unwrap();
    assert!(info.pause_reason.is_none(), "resume clears the reason: {info:?}");
    wait_for_console_text(&log, "RV-END", Duration::from_secs(300), || {
        let i = c.info().unwrap();
        assert_ne!(i.state, "Paused", "paused again: {:?}", i.pause_reason);
    });
    let console = std::fs::read_to_string(&log).unwrap();
    let t = tail(&console);
    assert_eq!(console_value(&console, "RV-DD-STATUS"), Some("0"), "the guest's write succeeded\n{t}");
    assert_eq!(console_value(&console, "RV-IOERRORS"), Some("0"), "the guest saw no I/O error\n{t}");
    let data = console_value(&console, "RV-DATA").expect("RV-DATA").to_string();
    assert_eq!(console_value(&console, "RV-READBACK"), Some(data.as_str()), "the guest reads its data back\n{t}");
    let raw = match format {
        DiskFormat::Raw => img.clone(),
        DiskFormat::Qcow2 => {
            host("qemu-img", &["check", "-q", img.to_str().unwrap()]);
            let raw = dir.path("flat.raw");
            host("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
            raw
        }
    };
    let on_disk = std::fs::read(&raw).unwrap();
    assert_eq!(sha256_hex(&on_disk[..8 << 20]), data, "the data is in the image, in order");

    let counters = c.counters().unwrap();
    let d = &counters.devices["disk0"];
    let b = d.block.clone().unwrap();
    assert_eq!(d.errors, 0, "no request failed: {d:?}");
    assert!(b.write_bytes >= 8 << 20 && b.read_bytes >= 8 << 20, "{b:?}");
    assert!(b.error_pauses >= 1 && b.flush_ops >= 1, "{b:?}");
    assert_eq!(b.write_latency.count, b.write_ops, "{b:?}");
    c.vmm_shutdown().unwrap();
}

/// Waits until the console log `log` contains `needle`, calling `check` between looks.
fn wait_for_console_text(log: &Path, needle: &str, timeout: Duration, check: impl Fn()) {
    let end = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        check();
        assert!(Instant::now() < end, "timed out waiting for {needle:?}:\n{}", tail(&text));
        std::thread::sleep(Duration::from_millis(200));
    }
}
