//! qcow2 headers are untrusted input (issue 15, items 2, 3 and 5): backing files outside the
//! image's directory, unrecorded backing formats, external data files, loops and deep chains
//! are refused with an error naming the image and the file, and nothing is opened or changed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use block::{create_qcow2, DiskImage, Error, Format, ImagePolicy, MAX_CHAIN_DEPTH, QCOW2_MAGIC};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "rustvisor-untrusted-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SIZE: u64 = 1 << 20;

fn secret(dir: &TempDir) -> PathBuf {
    let p = dir.join("secret.raw");
    std::fs::write(&p, vec![0x5au8; SIZE as usize]).unwrap();
    p
}

const ALLOW_BACKING: ImagePolicy = ImagePolicy { allow_backing_outside: true, allow_data_file: false };

#[test]
fn backing_file_outside_the_directory_is_refused() {
    let images = TempDir::new();
    let host = TempDir::new();
    let target = secret(&host);
    let top = images.join("top.qcow2");
    create_qcow2(&top, SIZE, Some((target.to_str().unwrap(), Format::Raw))).unwrap();
    let before = std::fs::read(&top).unwrap();
    for ro in [false, true] {
        let e = DiskImage::open(&top, Format::Qcow2, ro).unwrap_err();
        match &e {
            Error::BackingOutsideDirectory { path, backing, .. } => {
                assert_eq!(path, &top);
                assert_eq!(backing, &std::fs::canonicalize(&target).unwrap());
            }
            other => panic!("expected BackingOutsideDirectory, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("top.qcow2") && msg.contains("secret.raw") && msg.contains("backing=allow"), "{msg}");
    }
    assert_eq!(std::fs::read(&top).unwrap(), before, "the refused image is unchanged");

    // The user may trust the header explicitly; then the guest sees the backing file.
    let disk = DiskImage::open_with(&top, Format::Qcow2, true, ALLOW_BACKING).unwrap();
    let mut buf = [0u8; 8];
    disk.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [0x5a; 8]);
}

#[test]
fn dot_dot_and_symlinks_do_not_escape() {
    let root = TempDir::new();
    std::fs::create_dir(root.join("images")).unwrap();
    let target = secret(&root);
    // `../secret.raw` from images/.
    let top = root.join("images/dotdot.qcow2");
    create_qcow2(&top, SIZE, Some(("../secret.raw", Format::Raw))).unwrap();
    let e = DiskImage::open(&top, Format::Qcow2, true).unwrap_err();
    assert!(matches!(e, Error::BackingOutsideDirectory { .. }), "{e:?}");
    // A symbolic link inside the directory that points outside it.
    std::os::unix::fs::symlink(&target, root.join("images/link.raw")).unwrap();
    let top = root.join("images/link.qcow2");
    create_qcow2(&top, SIZE, Some(("link.raw", Format::Raw))).unwrap();
    let e = DiskImage::open(&top, Format::Qcow2, true).unwrap_err();
    assert!(matches!(e, Error::BackingOutsideDirectory { .. }), "{e:?}");
    // A subdirectory of the image's directory is inside it.
    std::fs::create_dir(root.join("images/base")).unwrap();
    std::fs::write(root.join("images/base/b.raw"), vec![1u8; SIZE as usize]).unwrap();
    let top = root.join("images/sub.qcow2");
    create_qcow2(&top, SIZE, Some(("base/b.raw", Format::Raw))).unwrap();
    DiskImage::open(&top, Format::Qcow2, true).unwrap();
}

/// Renames the header extension `ext` of the qcow2 image at `p` to an unknown type, which the
/// qcow2 spec says readers ignore (as an image made without it would look).
fn drop_header_extension(p: &Path, ext: u32) {
    let mut img = std::fs::read(p).unwrap();
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
    let mut off = be32(&img, 100) as usize; // header_length (v3)
    loop {
        let t = be32(&img, off);
        assert_ne!(t, 0, "extension {ext:#x} not found");
        let len = be32(&img, off + 4) as usize;
        if t == ext {
            img[off..off + 4].copy_from_slice(&0x5253_5654u32.to_be_bytes());
            break;
        }
        off += 8 + len.div_ceil(8) * 8;
    }
    std::fs::write(p, img).unwrap();
}

#[test]
fn backing_format_must_be_recorded() {
    let dir = TempDir::new();
    // A raw base that carries a qcow2 header: probing would read it as qcow2 and follow
    // whatever that header names.
    let evil = dir.join("base.raw");
    create_qcow2(&evil, SIZE, Some(("/etc/passwd", Format::Raw))).unwrap();
    let top = dir.join("top.qcow2");
    create_qcow2(&top, SIZE, Some(("base.raw", Format::Raw))).unwrap();
    drop_header_extension(&top, 0xe279_2aca);
    let e = DiskImage::open_with(&top, Format::Qcow2, true, ALLOW_BACKING).unwrap_err();
    match &e {
        Error::BackingFormatUnknown { path, format: None, .. } => assert_eq!(path, &top),
        other => panic!("expected BackingFormatUnknown, got {other:?}"),
    }
    assert!(e.to_string().contains("no format recorded"), "{e}");

    // With the format recorded as raw, the qcow2 header inside base.raw is never interpreted.
    let top2 = dir.join("top2.qcow2");
    create_qcow2(&top2, SIZE, Some(("base.raw", Format::Raw))).unwrap();
    let disk = DiskImage::open(&top2, Format::Qcow2, true).unwrap();
    let mut magic = [0u8; 4];
    disk.read_at(0, &mut magic).unwrap();
    assert_eq!(magic, QCOW2_MAGIC, "the base's bytes, read as raw data");

    // Recorded as qcow2 but the file is raw: the header lies.
    std::fs::write(dir.join("plain.raw"), vec![0u8; SIZE as usize]).unwrap();
    let top3 = dir.join("top3.qcow2");
    create_qcow2(&top3, SIZE, Some(("plain.raw", Format::Qcow2))).unwrap();
    let e = DiskImage::open(&top3, Format::Qcow2, true).unwrap_err();
    assert!(matches!(e, Error::FormatMismatch { .. }), "{e:?}");
}

#[test]
fn backing_loops_are_refused() {
    let dir = TempDir::new();
    let selfish = dir.join("self.qcow2");
    create_qcow2(&selfish, SIZE, Some(("self.qcow2", Format::Qcow2))).unwrap();
    let e = DiskImage::open(&selfish, Format::Qcow2, false).unwrap_err();
    assert!(matches!(e, Error::BackingLoop { .. }), "{e:?}");
    assert!(e.to_string().contains("loops back to"), "{e}");

    let a = dir.join("a.qcow2");
    let b = dir.join("b.qcow2");
    create_qcow2(&a, SIZE, Some(("b.qcow2", Format::Qcow2))).unwrap();
    create_qcow2(&b, SIZE, Some(("a.qcow2", Format::Qcow2))).unwrap();
    let e = DiskImage::open(&a, Format::Qcow2, true).unwrap_err();
    match &e {
        Error::BackingLoop { path, backing } => {
            assert_eq!(path, &a);
            assert_eq!(backing, &std::fs::canonicalize(&a).unwrap());
        }
        other => panic!("expected BackingLoop, got {other:?}"),
    }
    // A hard link is the same image under another name.
    let c = dir.join("c.qcow2");
    create_qcow2(&c, SIZE, Some(("c-link.qcow2", Format::Qcow2))).unwrap();
    std::fs::hard_link(&c, dir.join("c-link.qcow2")).unwrap();
    let e = DiskImage::open(&c, Format::Qcow2, true).unwrap_err();
    assert!(matches!(e, Error::BackingLoop { .. }), "{e:?}");
}

#[test]
fn chain_depth_is_bounded() {
    let dir = TempDir::new();
    std::fs::write(dir.join("l0.raw"), vec![9u8; SIZE as usize]).unwrap();
    create_qcow2(dir.join("l1.qcow2"), SIZE, Some(("l0.raw", Format::Raw))).unwrap();
    for i in 2..=MAX_CHAIN_DEPTH + 1 {
        let lower = format!("l{}.qcow2", i - 1);
        create_qcow2(dir.join(format!("l{i}.qcow2")), SIZE, Some((lower.as_str(), Format::Qcow2))).unwrap();
    }
    // MAX_CHAIN_DEPTH backing images below the top: accepted, and reads reach the bottom.
    let top = dir.join(format!("l{MAX_CHAIN_DEPTH}.qcow2"));
    let disk = DiskImage::open(&top, Format::Qcow2, true).unwrap();
    let mut b = [0u8; 4];
    disk.read_at(0, &mut b).unwrap();
    assert_eq!(b, [9; 4]);
    // One more is refused.
    let top = dir.join(format!("l{}.qcow2", MAX_CHAIN_DEPTH + 1));
    let e = DiskImage::open(&top, Format::Qcow2, true).unwrap_err();
    assert!(matches!(e, Error::BackingChainTooDeep { max: MAX_CHAIN_DEPTH, .. }), "{e:?}");
}

fn have_qemu_img() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn external_data_files_are_refused_by_default() {
    if !have_qemu_img() {
        eprintln!("skipped: qemu-img not installed (scripts/setup-guest.sh installs qemu-utils)");
        return;
    }
    let images = TempDir::new();
    let host = TempDir::new();
    let target = secret(&host);
    let top = images.join("data.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!("data_file={}", target.display()))
        .arg(&top)
        .arg(SIZE.to_string())
        .status()
        .unwrap();
    assert!(st.success());
    // qemu-img create with data_file does not change the data file's contents.
    let secret_before = std::fs::read(&target).unwrap();
    let e = DiskImage::open(&top, Format::Qcow2, false).unwrap_err();
    match &e {
        Error::ExternalDataFile { path, data_file } => {
            assert_eq!(path, &top);
            assert_eq!(data_file, &target);
        }
        other => panic!("expected ExternalDataFile, got {other:?}"),
    }
    assert!(e.to_string().contains("data_file=allow"), "{e}");
    // Allowing data files still keeps them inside the directory...
    let only_data = ImagePolicy { allow_backing_outside: false, allow_data_file: true };
    let e = DiskImage::open_with(&top, Format::Qcow2, false, only_data).unwrap_err();
    assert!(matches!(e, Error::BackingOutsideDirectory { .. }), "{e:?}");
    assert_eq!(std::fs::read(&target).unwrap(), secret_before, "the host file is untouched");

    // ... and one inside it works: guest writes land in the data file.
    let inside = images.join("inside.qcow2");
    let data = images.join("inside.data");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!("data_file={}", data.display()))
        .arg(&inside)
        .arg(SIZE.to_string())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(matches!(DiskImage::open(&inside, Format::Qcow2, false), Err(Error::ExternalDataFile { .. })));
    let disk = DiskImage::open_with(&inside, Format::Qcow2, false, only_data).unwrap();
    disk.write_at(0, &[0xabu8; 4096]).unwrap();
    disk.flush().unwrap();
    drop(disk);
    assert!(std::fs::read(&data).unwrap().starts_with(&[0xab; 4096]));
}
