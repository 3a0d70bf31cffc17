//! Backup archives: a round trip gives back the same disks and definition; a flipped byte
//! anywhere is refused naming the file, and a refused restore leaves the pool as it was.

mod common;

use std::path::{Path, PathBuf};

use block::Format;
use common::*;
use storage::{
    backup_create, backup_create_from, backup_delete, backup_list, backup_restore, backup_verify, BackupSource, Error,
    ErrorKind, Pool, RawReader, RestoreTarget,
};

const MIB: u64 = 1 << 20;
const DEFINITION: &[u8] = br#"{"name":"web1","memory_mib":512,"disks":[{"vol":"default/web1"}]}"#;

/// A pool with a raw volume `web1` (data at a few places) and a qcow2 linked clone `web1-data`
/// of a template `tmpl`, each with its own writes.
fn setup(dir: &TempDir) -> (Pool, Vec<BackupSource>) {
    let p = Pool::create(dir.join("pool")).unwrap();
    let r = p.create_volume("web1", 64 * MIB, Format::Raw, false).unwrap();
    write_disk(&r.path, Format::Raw, 0, &pattern(65536, 1));
    write_disk(&r.path, Format::Raw, 10 * MIB + 4096, &pattern(300_000, 2));
    write_disk(&r.path, Format::Raw, 64 * MIB - 512, &[0xab; 512]);
    let t = p.create_volume("tmpl", 32 * MIB, Format::Qcow2, false).unwrap();
    write_disk(&t.path, Format::Qcow2, MIB, &pattern(2 << 20, 3));
    p.set_read_only("tmpl", true).unwrap();
    let c = p.clone_volume("tmpl", &p, "web1-data", true).unwrap();
    write_disk(&c.path, Format::Qcow2, 2 * MIB, &[0x11; 100_000]);
    let disks = vec![BackupSource::new("vda", &r.path, Format::Raw), BackupSource::new("vdb", &c.path, Format::Qcow2)];
    (p, disks)
}

#[test]
fn round_trip_gives_the_same_data_and_definition() {
    let dir = TempDir::new("bk-roundtrip");
    let (p, disks) = setup(&dir);
    let dest = dir.join("backups");
    let info = backup_create(&dest, "web1-1", DEFINITION, &disks).unwrap();
    assert_eq!(info.id, "web1-1");
    assert_eq!(info.path, dest.join("web1-1"));
    assert_eq!(info.virtual_bytes, 96 * MIB);
    assert_eq!(info.sha256.len(), 64);
    // Only data is stored: ~0.4 MiB + 2 MiB + 0.1 MiB, not 96 MiB.
    assert!(info.bytes > 2 * MIB && info.bytes < 4 * MIB, "{}", info.bytes);
    let m = backup_verify(&info.path, Some(&info.sha256)).unwrap();
    assert_eq!((m.disks[0].label.as_str(), m.disks[0].format), ("vda", Format::Raw));
    assert_eq!((m.disks[1].label.as_str(), m.disks[1].format), ("vdb", Format::Qcow2));
    assert_eq!(m.disks[1].virtual_bytes, 32 * MIB);
    assert_eq!(backup_list(&dest).unwrap(), std::slice::from_ref(&info));
    // The checksum file is sha256sum's format.
    let ok = std::process::Command::new("sha256sum")
        .args(["-c", "--quiet", "manifest.sha256"])
        .current_dir(&info.path)
        .status()
        .unwrap();
    assert!(ok.success());

    // Restore into another pool, in the recorded formats and converted.
    let other = Pool::create(dir.join("restored")).unwrap();
    let targets = |a: &str, fa, b: &str, fb| {
        vec![RestoreTarget { name: a.to_string(), format: fa }, RestoreTarget { name: b.to_string(), format: fb }]
    };
    let r = backup_restore(&info.path, Some(&info.sha256), &other, &targets("a", None, "b", None)).unwrap();
    assert_eq!(r.definition, DEFINITION);
    assert_eq!(r.manifest, m);
    assert_eq!(r.volumes[0].format, Format::Raw);
    assert_eq!(r.volumes[1].format, Format::Qcow2);
    assert_eq!(r.volumes[1].backing, None, "restored standalone");
    assert_eq!(disk_digest(&r.volumes[0].path, Format::Raw), disk_digest(&disks[0].path, Format::Raw));
    assert_eq!(disk_digest(&r.volumes[1].path, Format::Qcow2), disk_digest(&disks[1].path, Format::Qcow2));
    assert!(r.volumes[0].allocated_bytes < 2 * MIB, "sparse: {}", r.volumes[0].allocated_bytes);
    qemu_img_check(&r.volumes[1].path);

    let swapped = Some(Format::Qcow2);
    let r2 = backup_restore(&info.path, None, &other, &targets("c", swapped, "d", Some(Format::Raw))).unwrap();
    assert_eq!(disk_digest(&r2.volumes[0].path, Format::Qcow2), disk_digest(&disks[0].path, Format::Raw));
    assert_eq!(disk_digest(&r2.volumes[1].path, Format::Raw), disk_digest(&disks[1].path, Format::Qcow2));
    qemu_img_check(&r2.volumes[0].path);
    // Into the source pool too (new names; existing ones are refused).
    let e = backup_restore(&info.path, None, &p, &targets("web1", None, "x", None)).unwrap_err();
    assert!(matches!(e, Error::VolumeExists { .. }), "{e}");
    let e = backup_restore(&info.path, None, &p, &targets("x", None, "x", None)).unwrap_err();
    assert!(matches!(e, Error::VolumeExists { .. }), "{e}");
    let e = backup_restore(&info.path, None, &p, &targets("x", None, "y", None)[..1]).unwrap_err();
    assert!(matches!(e, Error::RestoreTargets { disks: 2, targets: 1 }), "{e}");

    // The backup name is taken; bad ids are refused; deleting works.
    let e = backup_create(&dest, "web1-1", DEFINITION, &disks).unwrap_err();
    assert!(matches!(e, Error::BackupExists { .. }), "{e}");
    assert!(matches!(backup_create(&dest, "../x", DEFINITION, &disks), Err(Error::InvalidName { .. })));
    let second = backup_create(&dest, "web1-2", b"{}", &disks[..1]).unwrap();
    assert_eq!(backup_list(&dest).unwrap().len(), 2);
    backup_delete(&second.path).unwrap();
    assert_eq!(backup_list(&dest).unwrap(), [info]);
    assert!(backup_delete(&dir.join("pool")).is_err(), "not a backup: refused");
    assert!(dir.join("pool").join("web1.raw").exists());
    assert_eq!(dir_names(&dest), ["web1-1"], "no partial directories left");
}

/// Flips one bit of `file` at `offset` (from the end when negative).
fn flip(file: &Path, offset: i64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(file).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let at = if offset < 0 { len + offset } else { offset } as u64;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, at).unwrap();
}

#[test]
fn a_flipped_byte_is_refused_naming_the_file() {
    let dir = TempDir::new("bk-corrupt");
    let (_p, disks) = setup(&dir);
    let dest = dir.join("backups");
    let info = backup_create(&dest, "b", DEFINITION, &disks).unwrap();
    let target = Pool::create(dir.join("target")).unwrap();
    let targets = [
        RestoreTarget { name: "r0".to_string(), format: None },
        RestoreTarget { name: "r1".to_string(), format: None },
    ];
    let copy = dir.join("copy");
    // In the data of each disk, in a record header, in the definition, in the manifest, in the
    // end record.
    let cases: [(&str, i64); 6] = [
        ("disk-0.rvd", 40_000),
        ("disk-1.rvd", 1 << 20),
        ("disk-1.rvd", 16),
        ("definition.json", 3),
        ("manifest.json", 30),
        ("disk-0.rvd", -3),
    ];
    for (file, offset) in cases {
        let _ = std::process::Command::new("rm").arg("-rf").arg(&copy).status();
        let ok = std::process::Command::new("cp").arg("-a").arg(&info.path).arg(&copy).status().unwrap();
        assert!(ok.success());
        flip(&copy.join(file), offset);
        let before = dir_names(target.path());
        for e in [backup_verify(&copy, None).unwrap_err(), backup_restore(&copy, None, &target, &targets).unwrap_err()]
        {
            match &e {
                Error::BackupChecksum { file: f, expected, actual } => {
                    assert_eq!(f, &copy.join(file), "{e}");
                    assert_ne!(expected, actual);
                }
                other => panic!("{file}@{offset}: expected a checksum error, got {other}"),
            }
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            assert!(e.to_string().contains(file), "{e}");
        }
        assert_eq!(dir_names(target.path()), before, "{file}@{offset}: the pool is unchanged");
    }

    // The manifest and its checksum file rewritten together pass on their own, but not against
    // the checksum recorded at creation.
    let _ = std::process::Command::new("rm").arg("-rf").arg(&copy).status();
    assert!(std::process::Command::new("cp").arg("-a").arg(&info.path).arg(&copy).status().unwrap().success());
    let m = std::fs::read_to_string(copy.join("manifest.json")).unwrap();
    std::fs::write(copy.join("manifest.json"), m.replace("\"vda\"", "\"vdx\"")).unwrap();
    let sum =
        format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(std::fs::read(copy.join("manifest.json")).unwrap()));
    std::fs::write(copy.join("manifest.sha256"), format!("{sum}  manifest.json\n")).unwrap();
    backup_verify(&copy, None).unwrap();
    let e = backup_verify(&copy, Some(&info.sha256)).unwrap_err();
    assert!(matches!(&e, Error::BackupChecksum { expected, .. } if expected == &info.sha256), "{e}");

    // A missing or truncated file.
    let _ = std::process::Command::new("rm").arg("-rf").arg(&copy).status();
    assert!(std::process::Command::new("cp").arg("-a").arg(&info.path).arg(&copy).status().unwrap().success());
    let f = std::fs::OpenOptions::new().write(true).open(copy.join("disk-1.rvd")).unwrap();
    f.set_len(f.metadata().unwrap().len() - 100).unwrap();
    assert!(matches!(backup_verify(&copy, None), Err(Error::BackupChecksum { .. })));
    std::fs::remove_file(copy.join("definition.json")).unwrap();
    let e = backup_verify(&copy, None).unwrap_err();
    assert!(e.to_string().contains("definition.json"), "{e}");
    // The original is fine throughout.
    backup_verify(&info.path, Some(&info.sha256)).unwrap();
}

/// Rewrites `file` with `edit`, then fixes the manifest's digest and size for it and the
/// manifest's checksum file, as a forger would.
fn forge(dir: &Path, file: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    use sha2::Digest;
    let mut bytes = std::fs::read(dir.join(file)).unwrap();
    let old_sum = format!("{:x}", sha2::Sha256::digest(&bytes));
    let old_len = bytes.len();
    edit(&mut bytes);
    std::fs::write(dir.join(file), &bytes).unwrap();
    let new_sum = format!("{:x}", sha2::Sha256::digest(&bytes));
    let m = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let m =
        m.replace(&old_sum, &new_sum).replace(&format!("\"bytes\": {old_len}"), &format!("\"bytes\": {}", bytes.len()));
    std::fs::write(dir.join("manifest.json"), &m).unwrap();
    let sum = format!("{:x}", sha2::Sha256::digest(m.as_bytes()));
    std::fs::write(dir.join("manifest.sha256"), format!("{sum}  manifest.json\n")).unwrap();
}

#[test]
fn forged_archives_are_refused_by_their_structure() {
    let dir = TempDir::new("bk-forged");
    let p = Pool::create(dir.join("pool")).unwrap();
    let v = p.create_volume("v", 4 * MIB, Format::Raw, false).unwrap();
    write_disk(&v.path, Format::Raw, MIB, &[0x42; 4096]);
    let dest = dir.join("backups");
    let info = backup_create(&dest, "b", b"{}", &[BackupSource::new("vda", &v.path, Format::Raw)]).unwrap();
    let target = Pool::create(dir.join("target")).unwrap();
    let targets = [RestoreTarget { name: "r".to_string(), format: None }];
    let copy = dir.join("copy");
    let record_at = 16usize; // after magic and size
    fn u64_at(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("offset past the disk", Box::new(move |b| u64_at(b, record_at, 4 * MIB))),
        ("huge length", Box::new(move |b| u64_at(b, record_at + 8, u64::MAX - 5))),
        ("bad magic", Box::new(|b| b[0] = b'X')),
        ("trailing data", Box::new(|b| b.extend_from_slice(b"junk"))),
        (
            "wrong end total",
            Box::new(|b| {
                let n = b.len();
                u64_at(b, n - 8, 1)
            }),
        ),
    ];
    for (what, edit) in edits {
        let _ = std::process::Command::new("rm").arg("-rf").arg(&copy).status();
        assert!(std::process::Command::new("cp").arg("-a").arg(&info.path).arg(&copy).status().unwrap().success());
        forge(&copy, "disk-0.rvd", edit);
        let e = backup_verify(&copy, None).unwrap_err();
        assert!(matches!(e, Error::BackupInvalid { .. }), "{what}: {e}");
        assert!(e.to_string().contains("disk-0.rvd"), "{what}: {e}");
        let e = backup_restore(&copy, None, &target, &targets).unwrap_err();
        assert!(matches!(e, Error::BackupInvalid { .. }), "{what}: {e}");
        assert_eq!(dir_names(target.path()), [storage::POOL_MARKER], "{what}");
    }
    // A manifest naming a file outside the archive.
    let _ = std::process::Command::new("rm").arg("-rf").arg(&copy).status();
    assert!(std::process::Command::new("cp").arg("-a").arg(&info.path).arg(&copy).status().unwrap().success());
    forge(&copy, "manifest.json", |_| {});
    let m = std::fs::read_to_string(copy.join("manifest.json")).unwrap().replace("disk-0.rvd", "../../etc/passwd");
    std::fs::write(copy.join("manifest.json"), &m).unwrap();
    let sum = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(m.as_bytes()));
    std::fs::write(copy.join("manifest.sha256"), format!("{sum}  manifest.json\n")).unwrap();
    let e = backup_verify(&copy, None).unwrap_err();
    assert!(matches!(e, Error::BackupInvalid { .. }), "{e}");
}

/// A reader that is not a file: the disk content generated on the fly (the shape of a future
/// streaming export).
struct Generated(u64);

impl storage::DiskReader for Generated {
    fn size(&self) -> u64 {
        self.0
    }
    fn extent(&self, offset: u64, max_len: u64) -> std::io::Result<storage::Extent> {
        Ok(storage::Extent { data: true, len: max_len.min(self.0.saturating_sub(offset)) })
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            let pos = offset + i as u64;
            // Data only in the second MiB.
            *b = if (MIB..2 * MIB).contains(&pos) { (pos % 251) as u8 | 1 } else { 0 };
        }
        Ok(())
    }
}

#[test]
fn any_reader_can_be_backed_up() {
    let dir = TempDir::new("bk-reader");
    let dest = dir.join("backups");
    let g = Generated(8 * MIB);
    let disks = [storage::BackupDisk { label: "gen", format: Format::Raw, reader: &g }];
    let info = backup_create_from(&dest, "g", b"{}", &disks).unwrap();
    let m = backup_verify(&info.path, Some(&info.sha256)).unwrap();
    assert_eq!(m.disks[0].data_bytes, MIB, "zero blocks inside data extents are skipped");
    let p = Pool::create(dir.join("pool")).unwrap();
    let r = backup_restore(&info.path, None, &p, &[RestoreTarget { name: "g".to_string(), format: None }]).unwrap();
    let back = read_disk(&r.volumes[0].path, Format::Raw, 0, (8 * MIB) as usize);
    let mut want = vec![0u8; (8 * MIB) as usize];
    storage::DiskReader::read_at(&g, 0, &mut want).unwrap();
    assert_same(&back, &want);
    // A raw file read as bytes: a guest-written qcow2 magic is just data.
    let evil = dir.join("evil.raw");
    let mut bytes = vec![0u8; MIB as usize];
    bytes[..4].copy_from_slice(&block::QCOW2_MAGIC);
    std::fs::write(&evil, &bytes).unwrap();
    let rr = RawReader::open(&evil).unwrap();
    let disks = [storage::BackupDisk { label: "evil", format: Format::Raw, reader: &rr }];
    let info = backup_create_from(&dest, "evil", b"{}", &disks).unwrap();
    let r = backup_restore(&info.path, None, &p, &[RestoreTarget { name: "evil".to_string(), format: None }]).unwrap();
    assert_same(&std::fs::read(&r.volumes[0].path).unwrap(), &bytes);
    let _: PathBuf = info.path;
}
