//! Pools and volumes: thin provisioning, preallocation, grow-only resize, linked and full
//! clones read and written through crates/block (the VMM's image code), backing users,
//! imports of hostile images. Every refusal is checked to leave the pool as it was.

mod common;

use std::path::Path;
use std::time::Instant;

use block::{create_qcow2, DiskImage, Format};
use common::*;
use storage::{Error, ErrorKind, ImportOptions, Pool, MAX_VOLUME_BYTES, POOL_MARKER};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn pool(dir: &TempDir) -> Pool {
    Pool::create(dir.join("pool")).unwrap()
}

#[test]
fn pool_create_open_info_delete() {
    let dir = TempDir::new("pool");
    let p = pool(&dir);
    assert_eq!(p.path(), std::fs::canonicalize(dir.join("pool")).unwrap());
    assert!(matches!(Pool::create(dir.join("pool")), Err(Error::PoolExists { .. })));
    assert_eq!(Pool::open(dir.join("pool")).unwrap(), p);
    let e = Pool::open(&dir.0).unwrap_err();
    assert!(matches!(e, Error::NotAPool { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(matches!(Pool::open(dir.join("missing")), Err(Error::NotAPool { .. })));

    let info = p.info().unwrap();
    assert_eq!((info.volumes, info.allocated_bytes, info.virtual_bytes), (0, 0, 0));
    assert!(info.capacity_bytes > 0 && info.available_bytes > 0 && info.available_bytes <= info.capacity_bytes);

    p.create_volume("v1", MIB, Format::Raw, false).unwrap();
    let e = p.clone().delete().unwrap_err();
    assert!(matches!(&e, Error::PoolNotEmpty { volumes, .. } if volumes == &["v1"]), "{e}");
    assert!(e.to_string().contains("v1"), "{e}");
    p.delete_volume("v1").unwrap();
    p.clone().delete().unwrap();
    assert!(!dir.join("pool").exists());

    // An existing directory of images becomes a pool holding them; other files are ignored.
    let imgs = dir.join("images");
    std::fs::create_dir(&imgs).unwrap();
    std::fs::write(imgs.join("old.raw"), vec![0u8; 4096]).unwrap();
    std::fs::write(imgs.join("notes.txt"), b"hi").unwrap();
    let p = Pool::create(&imgs).unwrap();
    let names: Vec<_> = p.list_volumes().unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["old"]);
    assert!(imgs.join(POOL_MARKER).is_file());
}

#[test]
fn thin_provisioning_numbers() {
    let dir = TempDir::new("thin");
    let p = pool(&dir);
    let raw = p.create_volume("thin-raw", GIB, Format::Raw, false).unwrap();
    let q = p.create_volume("thin-q", GIB, Format::Qcow2, false).unwrap();
    println!("1 GiB raw allocates {} bytes, 1 GiB qcow2 {} bytes", raw.allocated_bytes, q.allocated_bytes);
    assert_eq!((raw.virtual_bytes, q.virtual_bytes), (GIB, GIB));
    assert_eq!(raw.allocated_bytes, 0);
    assert!(q.allocated_bytes < MIB, "{}", q.allocated_bytes);
    assert_eq!(raw.path, p.path().join("thin-raw.raw"));
    assert_eq!(q.path, p.path().join("thin-q.qcow2"));
    assert_eq!((raw.backing.clone(), raw.read_only), (None, false));
    let info = p.info().unwrap();
    assert_eq!(info.virtual_bytes, 2 * GIB);
    assert_eq!(info.allocated_bytes, raw.allocated_bytes + q.allocated_bytes);
    assert_eq!(info.volumes, 2);
    // The guest writes 4 MiB: that is what the qcow2 then takes (plus metadata).
    write_disk(&q.path, Format::Qcow2, 100 * MIB, &pattern(4 << 20, 1));
    let q2 = p.volume_info("thin-q").unwrap();
    assert!(q2.allocated_bytes >= 4 * MIB && q2.allocated_bytes < 5 * MIB, "{}", q2.allocated_bytes);
    qemu_img_check(&q.path);
    if let Some(info) = qemu_img_info(&q.path, Format::Qcow2) {
        assert!(info.contains(&format!("\"virtual-size\": {GIB}")), "{info}");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&q.path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // No temporaries left.
    assert_eq!(dir_names(p.path()), [POOL_MARKER, "thin-q.qcow2", "thin-raw.raw"]);
}

#[test]
fn preallocation_and_its_refusal() {
    let dir = TempDir::new("prealloc");
    let p = pool(&dir);
    let raw = p.create_volume("full-raw", 64 * MIB, Format::Raw, true).unwrap();
    let q = p.create_volume("full-q", 64 * MIB, Format::Qcow2, true).unwrap();
    assert!(raw.allocated_bytes >= 64 * MIB, "{}", raw.allocated_bytes);
    assert!(q.allocated_bytes >= 64 * MIB, "{}", q.allocated_bytes);
    assert_same(&read_disk(&q.path, Format::Qcow2, 0, 4096), &vec![0; 4096]);
    qemu_img_check(&q.path);

    // Bigger than the free space: refused with the numbers, nothing created.
    let before = dir_names(p.path());
    let avail = p.info().unwrap().available_bytes;
    let size = (avail + GIB).div_ceil(512) * 512;
    for format in [Format::Raw, Format::Qcow2] {
        let e = p.create_volume("huge", size, format, true).unwrap_err();
        match &e {
            Error::NoSpace { name, needed, available, .. } => {
                assert_eq!(name, "huge");
                assert!(*needed >= size && *available < size, "{e}");
            }
            other => panic!("expected NoSpace, got {other:?}"),
        }
        assert_eq!(e.kind(), ErrorKind::BadInput);
        let msg = e.to_string();
        let Error::NoSpace { needed, available, .. } = e else { unreachable!() };
        assert!(msg.contains("huge") && msg.contains(&needed.to_string()), "{msg}");
        assert!(msg.contains(&available.to_string()), "{msg}");
    }
    assert_eq!(dir_names(p.path()), before);
    // Thin, the same size is fine (that is what thin provisioning is for).
    let t = p.create_volume("huge", size, Format::Raw, false).unwrap();
    assert_eq!(t.virtual_bytes, size);
}

#[test]
fn bad_names_and_sizes_change_nothing() {
    let dir = TempDir::new("bad");
    let p = pool(&dir);
    p.create_volume("web1", MIB, Format::Raw, false).unwrap();
    let before = dir_names(p.path());
    for name in ["", ".web", "Web1", "a/b", "../x", &"x".repeat(64)] {
        let e = p.create_volume(name, MIB, Format::Raw, false).unwrap_err();
        assert!(matches!(e, Error::InvalidName { .. }), "{name:?}: {e}");
        assert_eq!(e.kind(), ErrorKind::BadInput);
    }
    for size in [0, 1000, MAX_VOLUME_BYTES + 512] {
        let e = p.create_volume("v", size, Format::Qcow2, false).unwrap_err();
        assert!(matches!(e, Error::InvalidSize { .. }), "{size}: {e}");
    }
    for format in [Format::Raw, Format::Qcow2] {
        let e = p.create_volume("web1", MIB, format, false).unwrap_err();
        assert!(matches!(e, Error::VolumeExists { .. }), "{e}");
        assert_eq!(e.kind(), ErrorKind::Conflict);
    }
    assert!(matches!(p.volume_info("nope"), Err(Error::VolumeNotFound { .. })));
    assert!(matches!(p.delete_volume("nope"), Err(Error::VolumeNotFound { .. })));
    assert_eq!(dir_names(p.path()), before);
    // A file put there by hand under both formats is reported, not guessed.
    std::fs::write(p.path().join("web1.qcow2"), b"x").unwrap();
    assert!(matches!(p.volume_info("web1"), Err(Error::AmbiguousVolume { .. })));
}

#[test]
fn resize_grows_only() {
    let dir = TempDir::new("resize");
    let p = pool(&dir);
    let r = p.create_volume("r", MIB, Format::Raw, false).unwrap();
    write_disk(&r.path, Format::Raw, 0, &[7; 512]);
    let q = p.create_volume("q", 64 * MIB, Format::Qcow2, false).unwrap();
    let data = pattern(1 << 20, 2);
    write_disk(&q.path, Format::Qcow2, 63 * MIB, &data);

    assert_eq!(p.resize_volume("r", 3 * MIB).unwrap().virtual_bytes, 3 * MIB);
    assert_same(&read_disk(&r.path, Format::Raw, 0, 512), &vec![7; 512]);
    assert_same(&read_disk(&r.path, Format::Raw, 2 * MIB, 4096), &vec![0; 4096]);
    let grown = p.resize_volume("q", 16 * GIB).unwrap();
    assert_eq!(grown.virtual_bytes, 16 * GIB);
    assert!(grown.allocated_bytes < 2 * MIB, "growing allocates nothing: {}", grown.allocated_bytes);
    assert_same(&read_disk(&q.path, Format::Qcow2, 63 * MIB, 1 << 20), &data);
    assert_same(&read_disk(&q.path, Format::Qcow2, 16 * GIB - 4096, 4096), &vec![0; 4096]);
    write_disk(&q.path, Format::Qcow2, 16 * GIB - 4096, &[9; 4096]);
    qemu_img_check(&q.path);
    if let Some(info) = qemu_img_info(&q.path, Format::Qcow2) {
        assert!(info.contains(&format!("\"virtual-size\": {}", 16 * GIB)), "{info}");
    }
    // The same size is no change.
    assert_eq!(p.resize_volume("q", 16 * GIB).unwrap().virtual_bytes, 16 * GIB);

    // Shrinking is refused, naming both sizes, and changes no byte.
    for (name, cur, path, fmt) in [("r", 3 * MIB, &r.path, Format::Raw), ("q", 16 * GIB, &q.path, Format::Qcow2)] {
        let before = file_digest(path);
        let e = p.resize_volume(name, MIB / 2).unwrap_err();
        match &e {
            Error::Shrink { current, requested, .. } => assert_eq!((*current, *requested), (cur, MIB / 2)),
            other => panic!("expected Shrink, got {other:?}"),
        }
        assert_eq!(e.kind(), ErrorKind::BadInput);
        let msg = e.to_string();
        assert!(msg.contains(&cur.to_string()) && msg.contains(&(MIB / 2).to_string()), "{msg}");
        assert_eq!(file_digest(path), before, "{fmt} changed");
    }
    assert!(matches!(p.resize_volume("q", 16 * GIB + 1), Err(Error::InvalidSize { .. })));
    // A template's volume is read-only.
    p.set_read_only("r", true).unwrap();
    assert!(p.volume_info("r").unwrap().read_only);
    assert!(matches!(p.resize_volume("r", 8 * MIB), Err(Error::ReadOnly { .. })));
    p.set_read_only("r", false).unwrap();
    p.resize_volume("r", 8 * MIB).unwrap();
}

#[test]
fn linked_clone_reads_the_template_and_writes_to_itself() {
    let dir = TempDir::new("linked");
    let p = pool(&dir);
    for (base_fmt, base) in [(Format::Qcow2, "base-q"), (Format::Raw, "base-r")] {
        let b = p.create_volume(base, 8 * GIB, base_fmt, false).unwrap();
        let data = pattern(2 << 20, 3);
        write_disk(&b.path, base_fmt, 4 * GIB, &data);
        p.set_read_only(base, true).unwrap();
        let base_before = file_state(&b.path);

        let clone = format!("{base}-clone");
        let t = Instant::now();
        let c = p.clone_volume(base, &p, &clone, true).unwrap();
        println!("linked clone of an 8 GiB {base_fmt} template: {:?}", t.elapsed());
        assert_eq!(c.format, Format::Qcow2);
        assert_eq!(c.backing.as_deref(), Some(base));
        assert_eq!(c.virtual_bytes, 8 * GIB);
        assert!(c.allocated_bytes < MIB, "{}", c.allocated_bytes);
        assert!(!c.read_only);

        // Through the VMM's code: the template's data shows through, writes stay in the clone.
        let d = DiskImage::open(&c.path, Format::Qcow2, false).unwrap();
        let mut buf = vec![0u8; 2 << 20];
        d.read_at(4 * GIB, &mut buf).unwrap();
        assert_same(&buf, &data);
        d.write_at(4 * GIB + 4096, &[0xee; 8192]).unwrap();
        d.flush().unwrap();
        drop(d);
        let back = read_disk(&c.path, Format::Qcow2, 4 * GIB, 3 * 4096);
        assert_same(&back[..4096], &data[..4096]);
        assert_same(&back[4096..], &[0xee; 8192]);
        assert_eq!(file_state(&b.path), base_before, "the template is untouched");
        assert_same(&read_disk(&b.path, base_fmt, 4 * GIB + 4096, 8192), &data[4096..4096 + 8192]);
        qemu_img_check(&c.path);
        if let Some(info) = qemu_img_info(&c.path, Format::Qcow2) {
            assert!(info.contains(&format!("\"backing-filename-format\": \"{base_fmt}\"")), "{info}");
            assert!(info.contains(&format!("\"backing-filename\": \"{base}.{base_fmt}\"")), "{info}");
        }
    }
    // Linked clones stay in their template's pool.
    let other = Pool::create(dir.join("other")).unwrap();
    let e = p.clone_volume("base-q", &other, "x", true).unwrap_err();
    assert!(matches!(e, Error::LinkedAcrossPools { .. }), "{e}");
    assert!(other.list_volumes().unwrap().is_empty());
}

#[test]
fn full_clones_are_independent() {
    let dir = TempDir::new("full");
    let p = pool(&dir);
    let other = Pool::create(dir.join("other")).unwrap();
    let base = p.create_volume("base", 256 * MIB, Format::Qcow2, false).unwrap();
    let data = pattern(1 << 20, 4);
    write_disk(&base.path, Format::Qcow2, 10 * MIB, &data);
    let raw = p.create_volume("rawbase", 256 * MIB, Format::Raw, false).unwrap();
    write_disk(&raw.path, Format::Raw, 100 * MIB, &data);

    let c = p.clone_volume("base", &other, "copy", false).unwrap();
    let rc = p.clone_volume("rawbase", &p, "rawcopy", false).unwrap();
    assert_eq!((c.format, c.backing.clone(), c.virtual_bytes), (Format::Qcow2, None, 256 * MIB));
    assert_eq!(rc.format, Format::Raw);
    assert!(rc.allocated_bytes < 2 * MIB, "sparse: {}", rc.allocated_bytes);
    assert_eq!(disk_digest(&c.path, Format::Qcow2), disk_digest(&base.path, Format::Qcow2));
    assert_eq!(disk_digest(&rc.path, Format::Raw), disk_digest(&raw.path, Format::Raw));
    // Writes to either side do not reach the other.
    write_disk(&c.path, Format::Qcow2, 10 * MIB, &[1; 4096]);
    write_disk(&base.path, Format::Qcow2, 20 * MIB, &[2; 4096]);
    assert_same(&read_disk(&base.path, Format::Qcow2, 10 * MIB, 4096), &data[..4096]);
    assert_same(&read_disk(&c.path, Format::Qcow2, 20 * MIB, 4096), &vec![0; 4096]);
    qemu_img_check(&c.path);

    // A full clone of a linked clone is flattened: standalone, same content.
    p.clone_volume("base", &p, "overlay", true).unwrap();
    let ov = p.volume_info("overlay").unwrap();
    write_disk(&ov.path, Format::Qcow2, 30 * MIB, &[3; 65536]);
    let flat = p.clone_volume("overlay", &p, "flat", false).unwrap();
    assert_eq!((flat.backing.clone(), flat.foreign_backing.clone()), (None, None));
    assert_eq!(disk_digest(&flat.path, Format::Qcow2), disk_digest(&ov.path, Format::Qcow2));
    assert!(flat.allocated_bytes < 4 * MIB, "{}", flat.allocated_bytes);
    assert!(p.backing_users("flat").unwrap().is_empty());
    qemu_img_check(&flat.path);
    // Clones of a read-only template are writable.
    p.set_read_only("rawbase", true).unwrap();
    assert!(!p.clone_volume("rawbase", &p, "rawcopy2", false).unwrap().read_only);
}

#[test]
fn backing_users_block_delete_and_resize() {
    let dir = TempDir::new("users");
    let p = pool(&dir);
    p.create_volume("base", 64 * MIB, Format::Raw, false).unwrap();
    p.clone_volume("base", &p, "mid", true).unwrap();
    p.clone_volume("mid", &p, "top", true).unwrap();
    p.clone_volume("base", &p, "web2", true).unwrap();
    assert_eq!(p.backing_users("base").unwrap(), ["mid", "top", "web2"]);
    assert_eq!(p.backing_users("mid").unwrap(), ["top"]);
    assert!(p.backing_users("top").unwrap().is_empty());
    // The chain top -> mid -> base opens in the VMM.
    DiskImage::open(p.volume_path("top", Format::Qcow2), Format::Qcow2, false).unwrap();

    let before = dir_names(p.path());
    let e = p.delete_volume("base").unwrap_err();
    assert!(matches!(&e, Error::InUse { users, action: "delete", .. } if users == &["mid", "top", "web2"]), "{e}");
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(e.to_string().contains("mid, top, web2"), "{e}");
    let e = p.resize_volume("mid", 128 * MIB).unwrap_err();
    assert!(matches!(&e, Error::InUse { users, action: "resize", .. } if users == &["top"]), "{e}");
    assert_eq!(dir_names(p.path()), before);
    assert_eq!(p.volume_info("mid").unwrap().virtual_bytes, 64 * MIB);

    for v in ["top", "mid", "web2", "base"] {
        p.delete_volume(v).unwrap();
    }
    assert_eq!(dir_names(p.path()), [POOL_MARKER]);
}

#[test]
fn import_copies_and_flattens_safe_images() {
    let dir = TempDir::new("import");
    let src = TempDir::new("import-src");
    let p = pool(&dir);
    // A raw image holding data, with an odd size: padded to 512 bytes.
    let raw = src.join("disk.img");
    let mut bytes = vec![0u8; (4 << 20) + 100];
    bytes[1 << 20..(1 << 20) + 4096].copy_from_slice(&pattern(4096, 5));
    std::fs::write(&raw, &bytes).unwrap();
    let v = p.import_volume("imported", &raw, ImportOptions::default()).unwrap();
    assert_eq!((v.format, v.virtual_bytes), (Format::Raw, (4 << 20) + 512));
    assert_same(&read_disk(&v.path, Format::Raw, 0, bytes.len()), &bytes);

    // A raw image a guest wrote a qcow2 header into, given as raw: copied as bytes, never
    // interpreted.
    let evil = src.join("evil.img");
    let mut hdr = vec![0u8; 1 << 20];
    hdr[..4].copy_from_slice(&block::QCOW2_MAGIC);
    std::fs::write(&evil, &hdr).unwrap();
    let opts = ImportOptions { source_format: Some(Format::Raw), format: None };
    let v = p.import_volume("evil", &evil, opts).unwrap();
    assert_same(&std::fs::read(&v.path).unwrap(), &hdr);

    // A qcow2 overlay with its base in its own folder: flattened into one standalone image.
    let base = src.join("base.raw");
    std::fs::write(&base, pattern(8 << 20, 6)).unwrap();
    let top = src.join("top.qcow2");
    create_qcow2(&top, 8 << 20, Some(("base.raw", Format::Raw))).unwrap();
    write_disk(&top, Format::Qcow2, 0, &[0x55; 65536]);
    let v = p.import_volume("flat", &top, ImportOptions::default()).unwrap();
    assert_eq!((v.format, v.backing.clone(), v.foreign_backing.clone()), (Format::Qcow2, None, None));
    assert_eq!(disk_digest(&v.path, Format::Qcow2), disk_digest(&top, Format::Qcow2));
    qemu_img_check(&v.path);
    // Converted to raw on the way in.
    let opts = ImportOptions { source_format: None, format: Some(Format::Raw) };
    let v = p.import_volume("flat-raw", &top, opts).unwrap();
    assert_eq!(disk_digest(&v.path, Format::Raw), disk_digest(&top, Format::Qcow2));
    // And raw to qcow2.
    let opts = ImportOptions { source_format: None, format: Some(Format::Qcow2) };
    let v = p.import_volume("q-from-raw", &raw, opts).unwrap();
    assert_same(&read_disk(&v.path, Format::Qcow2, 0, bytes.len()), &bytes);
    assert!(v.allocated_bytes < 2 * MIB, "only the data was written: {}", v.allocated_bytes);
}

#[test]
fn import_refuses_hostile_images_and_changes_nothing() {
    let dir = TempDir::new("hostile");
    let src = TempDir::new("hostile-src");
    let host = TempDir::new("hostile-host");
    let p = pool(&dir);
    let before = dir_names(p.path());
    let secret = host.join("shadow");
    std::fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();

    // A backing file outside the image's folder (an absolute path, and a `..` escape).
    let abs = src.join("abs.qcow2");
    create_qcow2(&abs, 1 << 20, Some((secret.to_str().unwrap(), Format::Raw))).unwrap();
    let rel = src.join("rel.qcow2");
    let up = format!("../{}/shadow", host.0.file_name().unwrap().to_str().unwrap());
    create_qcow2(&rel, 1 << 20, Some((&up, Format::Raw))).unwrap();
    for img in [&abs, &rel] {
        let e = p.import_volume("x", img, ImportOptions::default()).unwrap_err();
        assert!(matches!(e, Error::Image(block::Error::BackingOutsideDirectory { .. })), "{e}");
        assert_eq!(e.kind(), ErrorKind::BadInput);
        assert!(e.to_string().contains("shadow"), "{e}");
    }
    // An external data file (qemu-img initialises it, so it is not the secret).
    if have_qemu_img() {
        let data = host.join("data.raw");
        let ext = src.join("ext.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("data_file={}", data.display()))
            .arg(&ext)
            .arg("1M")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(&data, vec![0x77; 1 << 20]).unwrap();
        let e = p.import_volume("x", &ext, ImportOptions::default()).unwrap_err();
        assert!(matches!(e, Error::Image(block::Error::ExternalDataFile { .. })), "{e}");
        assert!(std::fs::read(&data).unwrap() == vec![0x77; 1 << 20], "data file untouched");
    }
    // A FIFO is refused at once (never waited on), and so is a directory.
    let fifo = src.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for bad in [fifo.as_path(), src.0.as_path()] {
        let e = p.import_volume("x", bad, ImportOptions::default()).unwrap_err();
        assert!(matches!(e, Error::NotAFile { .. }), "{e}");
    }
    // A corrupt qcow2 header, and a missing file.
    let corrupt = src.join("corrupt.qcow2");
    let mut h = vec![0u8; 4096];
    h[..4].copy_from_slice(&block::QCOW2_MAGIC);
    h[7] = 99;
    std::fs::write(&corrupt, &h).unwrap();
    assert!(matches!(p.import_volume("x", &corrupt, ImportOptions::default()), Err(Error::Image(_))));
    let e = p.import_volume("x", Path::new("/nonexistent/disk.img"), ImportOptions::default()).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
    assert_eq!(dir_names(p.path()), before, "nothing left behind");
    assert!(std::fs::read(&secret).unwrap() == vec![0x5a; 1 << 20], "secret untouched");
}

#[test]
fn stale_temporaries_of_dead_processes_are_removed() {
    let dir = TempDir::new("stale");
    let p = pool(&dir);
    // pid 0x7fff_fff0 does not exist; our own pid does.
    std::fs::write(p.path().join(".web1.raw.tmp2147483632-0"), b"x").unwrap();
    let mine = format!(".web2.raw.tmp{}-0", std::process::id());
    std::fs::write(p.path().join(&mine), b"x").unwrap();
    Pool::open(p.path()).unwrap();
    assert_eq!(dir_names(p.path()), [POOL_MARKER, mine.as_str()]);
}
