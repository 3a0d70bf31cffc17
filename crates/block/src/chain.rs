//! Opening a qcow2 image and the files its header names (backing images, an external data
//! file) under a policy that treats the header as untrusted input.
//!
//! A qcow2 header can name any host path as its backing file or external data file. An image
//! from an untrusted source (a downloaded template, a guest that once owned a raw disk that was
//! later snapshotted) could otherwise make the VMM read `/etc/shadow` through the guest's disk,
//! or write to any host file through an external data file. So, like libvirt and OpenStack:
//!
//! - a backing file's format must be recorded in the header (the backing-format header
//!   extension, qcow2 spec "Header extensions", type `0xe2792aca`); it is never probed;
//! - backing files must lie inside the top image's directory (after resolving symbolic links
//!   and `..`), unless [`ImagePolicy::allow_backing_outside`];
//! - an external data file (incompatible feature bit 2) is refused unless
//!   [`ImagePolicy::allow_data_file`];
//! - a chain that names an image twice (a loop) or is deeper than [`MAX_CHAIN_DEPTH`] is
//!   refused before anything recursive runs.
//!
//! Every file is opened exactly once, by this module, and handed to imago explicitly, so the
//! file checked is the file used.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, StorageOpenOptions};

use crate::{open_error, Error, Format};

/// Longest backing chain accepted: the top image plus this many backing images.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// What an image's header may make the VMM open besides the image itself.
///
/// The default is the strict policy: backing files only from the image's own directory, no
/// external data file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImagePolicy {
    /// Accept backing files anywhere on the host (`--disk ...,backing=allow`), for images whose
    /// headers the user trusts.
    pub allow_backing_outside: bool,
    /// Accept an external data file named in the header (`--disk ...,data_file=allow`); it is
    /// opened with the image's access mode and must obey the same directory rule as backing
    /// files.
    pub allow_data_file: bool,
}

/// The state of one chain walk: the directory files must lie in, and the images seen.
struct Walk<'a> {
    /// The image the user named (for error messages).
    top: &'a Path,
    /// The canonical directory of `top`: backing and data files must be inside it.
    root: PathBuf,
    policy: ImagePolicy,
    /// `(st_dev, st_ino)` of every image opened so far.
    seen: HashSet<(u64, u64)>,
    /// The files the header chain named, as named (relative names resolved against the
    /// naming image's path), with whether each is opened writable.
    named: Vec<(PathBuf, bool)>,
}

type Qcow2Access = FormatAccess<imago::file::File>;

/// Opens the qcow2 image `path` (already open as `file`) and, under `policy`, its backing
/// chain and external data file.
///
/// Errors: [`Error::BackingFileMissing`], [`Error::BackingFormatUnknown`],
/// [`Error::BackingOutsideDirectory`], [`Error::BackingLoop`], [`Error::BackingChainTooDeep`],
/// [`Error::ExternalDataFile`], [`Error::FormatMismatch`] (a backing file whose contents do
/// not match the format recorded for it), [`Error::Qcow2`] (corrupt or unsupported image) and
/// [`Error::Io`].
pub(crate) fn open_qcow2(path: &Path, file: File, readonly: bool, policy: ImagePolicy) -> Result<Qcow2Access, Error> {
    let canonical = std::fs::canonicalize(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let root = canonical.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    let mut walk = Walk { top: path, root, policy, seen: HashSet::new(), named: Vec::new() };
    walk.qcow2(path, file, !readonly, 0)
}

/// The files besides `path` that opening the qcow2 image `path` under `policy` would open
/// (backing images, an external data file), each as the header names it (relative names
/// resolved against the naming image's path) with whether it is opened writable (a data file
/// of a writable image). For a jail that must hold exactly them. The chain is checked as
/// [`crate::DiskImage::open_with`] checks it, without writing anything.
///
/// Errors: as [`crate::DiskImage::open_with`] for a qcow2 image: [`Error::BackingFileMissing`],
/// [`Error::BackingOutsideDirectory`], [`Error::BackingLoop`], [`Error::Qcow2`], ...
pub fn chain_files(path: &Path, writable: bool, policy: ImagePolicy) -> Result<Vec<(PathBuf, bool)>, Error> {
    let file = File::open(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let canonical = std::fs::canonicalize(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let root = canonical.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    let mut walk = Walk { top: path, root, policy, seen: HashSet::new(), named: Vec::new() };
    walk.qcow2(path, file, false, 0)?;
    Ok(walk.named.into_iter().map(|(p, data)| (p, data && writable)).collect())
}

impl Walk<'_> {
    /// Remembers `file` as part of the chain; [`Error::BackingLoop`] if it already is.
    fn enter(&mut self, file: &File, name: &Path) -> Result<(), Error> {
        let meta = file.metadata().map_err(|e| Error::Io { path: name.to_path_buf(), source: e })?;
        if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
            return Err(Error::NotAFile { path: name.to_path_buf() });
        }
        if !self.seen.insert((meta.dev(), meta.ino())) {
            return Err(Error::BackingLoop { path: self.top.to_path_buf(), backing: name.to_path_buf() });
        }
        Ok(())
    }

    /// Resolves `name` (from the header of `image`) and checks it against the directory rule.
    /// Returns the canonical path.
    fn resolve(&self, image: &Path, name: &str, allowed_anywhere: bool) -> Result<PathBuf, Error> {
        let named = crate::resolve_relative(image, Path::new(name));
        let canonical = match std::fs::canonicalize(&named) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::BackingFileMissing { path: self.top.to_path_buf(), backing: named })
            }
            Err(e) => return Err(Error::Io { path: named, source: e }),
        };
        if !allowed_anywhere && !canonical.starts_with(&self.root) {
            return Err(Error::BackingOutsideDirectory {
                path: self.top.to_path_buf(),
                backing: canonical,
                directory: self.root.clone(),
            });
        }
        Ok(canonical)
    }

    fn qcow2(&mut self, path: &Path, file: File, writable: bool, depth: usize) -> Result<Qcow2Access, Error> {
        let qerr = |source: io::Error| Error::Qcow2 { path: path.to_path_buf(), source };
        self.enter(&file, path)?;
        let opts = StorageOpenOptions::new().filename(path).write(writable);
        let storage = imago::file::File::from_open_file(file, opts).map_err(qerr)?;
        let mut qcow2 = Qcow2::<imago::file::File>::open_image(storage, writable).map_err(qerr)?;

        let data_file = if qcow2.requires_external_data_file() {
            let Some(name) = qcow2.implicit_external_data_file().cloned() else {
                return Err(qerr(io::Error::other("the image needs an external data file but names none")));
            };
            if !self.policy.allow_data_file {
                return Err(Error::ExternalDataFile {
                    path: self.top.to_path_buf(),
                    data_file: crate::resolve_relative(path, Path::new(&name)),
                });
            }
            let resolved = self.resolve(path, &name, self.policy.allow_backing_outside)?;
            self.named.push((crate::resolve_relative(path, Path::new(&name)), true));
            let f = OpenOptions::new()
                .read(true)
                .write(writable)
                .open(&resolved)
                .map_err(|e| open_error(&resolved, !writable, e))?;
            self.enter(&f, &resolved)?;
            let opts = StorageOpenOptions::new().filename(&resolved).write(writable);
            Some(imago::file::File::from_open_file(f, opts).map_err(qerr)?)
        } else {
            None
        };
        qcow2.set_data_file(data_file);

        let backing = match qcow2.implicit_backing_file().cloned() {
            None => None,
            Some(name) => {
                if depth + 1 > MAX_CHAIN_DEPTH {
                    return Err(Error::BackingChainTooDeep { path: self.top.to_path_buf(), max: MAX_CHAIN_DEPTH });
                }
                let format = match qcow2.implicit_backing_format().map(String::as_str) {
                    Some("qcow2") => Format::Qcow2,
                    Some("raw" | "file") => Format::Raw,
                    other => {
                        return Err(Error::BackingFormatUnknown {
                            path: self.top.to_path_buf(),
                            backing: crate::resolve_relative(path, Path::new(&name)),
                            format: other.map(str::to_string),
                        })
                    }
                };
                let resolved = self.resolve(path, &name, self.policy.allow_backing_outside)?;
                self.named.push((crate::resolve_relative(path, Path::new(&name)), false));
                let f = File::open(&resolved).map_err(|e| open_error(&resolved, true, e))?;
                Some(self.backing(&resolved, f, format, depth + 1)?)
            }
        };
        qcow2.set_backing(backing);
        Ok(FormatAccess::new(qcow2))
    }

    /// Opens a backing image read-only as `format`, after checking the file's magic agrees.
    fn backing(&mut self, path: &Path, file: File, format: Format, depth: usize) -> Result<Qcow2Access, Error> {
        let found = crate::sniff_format(&file, path)?;
        // A raw backing file that happens to start with the qcow2 magic is read as raw, which
        // is harmless (it is read-only and its header is never interpreted); the reverse means
        // the header lies about the file.
        if format == Format::Qcow2 && found != Format::Qcow2 {
            return Err(Error::FormatMismatch { path: path.to_path_buf(), expected: format, found });
        }
        match format {
            Format::Qcow2 => self.qcow2(path, file, false, depth),
            Format::Raw => {
                self.enter(&file, path)?;
                let opts = StorageOpenOptions::new().filename(path).write(false);
                let storage = imago::file::File::from_open_file(file, opts)
                    .map_err(|source| Error::Qcow2 { path: path.to_path_buf(), source })?;
                let raw = Raw::open_image(storage, false)
                    .map_err(|source| Error::Qcow2 { path: path.to_path_buf(), source })?;
                Ok(FormatAccess::new(raw))
            }
        }
    }
}
