//! `file://` URLs for `vm.snapshot` and `vm.restore`: the only form the API accepts is
//! `file:///absolute/path` (or `file://localhost/absolute/path`), with `%XX` escapes for bytes
//! that are not plain (the client escapes everything but `A-Z a-z 0-9 - . _ ~ /`).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What the server says a snapshot/restore URL must look like.
pub const ACCEPTED_FORM: &str = "expected a file:// URL with an absolute path, e.g. file:///var/lib/rustvisor/snap";

/// Why a `file://` URL is refused: a message for a 400 that names the accepted form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidFileUrl(String);

/// The absolute path a `file://` URL names.
///
/// Errors: [`InvalidFileUrl`] for another scheme, a host, a relative path, `?`/`#`, a bad
/// `%`-escape, a NUL byte or a path that is not UTF-8.
pub fn file_url_to_path(url: &str) -> Result<String, InvalidFileUrl> {
    file_url_to_path_inner(url).map_err(InvalidFileUrl)
}

fn file_url_to_path_inner(url: &str) -> Result<String, String> {
    let rest = match url.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("file://") => &url[7..],
        _ => return Err(format!("{ACCEPTED_FORM} (got {})", quote(url))),
    };
    let rest = match rest.get(..9) {
        Some(host) if host.eq_ignore_ascii_case("localhost") => &rest[9..],
        _ => rest,
    };
    if !rest.starts_with('/') {
        return Err(format!("{ACCEPTED_FORM}; {} has a host or a relative path", quote(url)));
    }
    if rest.contains(['?', '#']) {
        return Err(format!("{ACCEPTED_FORM}; escape '?' and '#' as %3F and %23 (got {})", quote(url)));
    }
    let bytes = rest.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => out.push(b),
                None => return Err(format!("{ACCEPTED_FORM}; bad %-escape in {}", quote(url))),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    if out.contains(&0) {
        return Err("the path must not contain a NUL byte (%00)".into());
    }
    String::from_utf8(out).map_err(|_| "the path must be UTF-8 once %-escapes are decoded".to_string())
}

/// The `file://` URL of an absolute path (bytes other than `A-Z a-z 0-9 - . _ ~ /` escaped).
pub fn path_to_file_url(path: &Path) -> String {
    let mut url = String::from("file://");
    for &b in OsStr::as_bytes(path.as_os_str()) {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// A value quoted for an error message, cut to a readable length.
fn quote(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut:?}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_absolute_file_urls() {
        assert_eq!(file_url_to_path("file:///a/b").unwrap(), "/a/b");
        assert_eq!(file_url_to_path("FILE://localhost/a").unwrap(), "/a");
        assert_eq!(file_url_to_path("file:///a%20b/%25").unwrap(), "/a b/%");
    }

    #[test]
    fn refuses_other_forms() {
        for bad in ["", "/abs", "http:///a", "file://a/b", "file://rel", "file:///a%2", "file:///a%zz", "file:///a?b"] {
            assert!(file_url_to_path(bad).is_err(), "{bad}");
        }
        assert!(file_url_to_path("file:///a%00").is_err());
        assert!(file_url_to_path("file:///a%ff").is_err());
    }

    #[test]
    fn round_trip() {
        let p = Path::new("/tmp/snap dir/ü?#%x");
        let url = path_to_file_url(p);
        assert!(url.starts_with("file:///tmp/snap%20dir/"));
        assert_eq!(file_url_to_path(&url).unwrap(), p.to_str().unwrap());
    }
}
