//! The tar crate as a parser only, with guards where it and Go's `archive/tar` (which umoci
//! and containerd use) would read one archive differently, and bounds against tar bombs.
//!
//! - A header-only type (link, symlink, char, block, dir, fifo) with a nonzero size is
//!   rejected: Go reads no data for it, tar-rs skips `size` bytes, so the two would see
//!   different entries after it.
//! - tar-rs stops at the first zero block; Go needs two, and a zero block followed by a
//!   header is an error there. After the last entry the next block must be zeros or EOF.
//! - Types that are not files, dirs, links or nodes (`7`, `S` sparse, `V`, `M`, `N`, an `L`,
//!   `K` or `x` tar-rs did not merge because the header is V7, unknown bytes) and PAX
//!   `GNU.sparse.*` reject the layer. A PAX global header (`g`) is skipped, as containerd
//!   does (umoci fails on it).
//! - tar-rs reads a GNU long name, long link or PAX header into memory whatever its size: a
//!   [`Budget`] under the parser lets each step between two entries read at most
//!   [`META_BUDGET`] bytes beyond the entry's own data.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

/// Go's `maxSpecialFileSize` (archive/tar: "matches libarchive"): the largest long name,
/// long link or PAX header we accept.
pub(crate) const MAX_SPECIAL: u64 = 1 << 20;
/// What the parser may read between two entries: up to three extension headers of
/// [`MAX_SPECIAL`] (L, K, x) with their headers, the entry's header, and padding.
pub(crate) const META_BUDGET: u64 = 3 * (512 + MAX_SPECIAL) + 2 * 512;
/// Entries in one layer at most.
pub(crate) const MAX_ENTRIES: u64 = 10_000_000;

/// A reader that fails once it has read more than its budget, which the caller resets.
pub(crate) struct Budget<R> {
    inner: R,
    left: Rc<Cell<u64>>,
}

impl<R: Read> Budget<R> {
    /// `inner` with a budget of `META_BUDGET`; the handle sets it.
    pub(crate) fn new(inner: R) -> (Budget<R>, Rc<Cell<u64>>) {
        let left = Rc::new(Cell::new(META_BUDGET));
        (
            Budget {
                inner,
                left: left.clone(),
            },
            left,
        )
    }

    /// The reader underneath.
    pub(crate) fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left.get();
        if left == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "tar extension headers (GNU long name/link, PAX) larger than {MAX_SPECIAL} bytes"
                ),
            ));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left.set(left - n as u64);
        Ok(n)
    }
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A hard link to `link`.
    Hardlink,
    /// A symlink to `link`.
    Symlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A FIFO.
    Fifo,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::File => "regular file",
            Kind::Dir => "directory",
            Kind::Hardlink => "hard link",
            Kind::Symlink => "symlink",
            Kind::Char => "character device",
            Kind::Block => "block device",
            Kind::Fifo => "fifo",
        }
    }
}

/// A point in time, seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Time {
    pub(crate) sec: i64,
    pub(crate) nsec: u32,
}

/// One entry's header, as Go's `archive/tar` would present it.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub(crate) kind: Kind,
    /// The raw path (GNU long name, else PAX `path`, else the header's).
    pub(crate) path: Vec<u8>,
    /// The raw link target (hard links and symlinks).
    pub(crate) link: Vec<u8>,
    /// Bytes of data (regular files; zero for everything else).
    pub(crate) size: u64,
    /// Permission bits with setuid, setgid and sticky.
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: Time,
    /// PAX `atime`, if given.
    pub(crate) atime: Option<Time>,
    pub(crate) dev_major: u32,
    pub(crate) dev_minor: u32,
    /// `SCHILY.xattr.*` records, in archive order.
    pub(crate) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The path of an entry for messages (lossy).
pub(crate) fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// Reads what Go would see of `e`'s header. `Ok(None)`: an entry to skip (a PAX global
/// header). Errors say why the layer is refused.
pub(crate) fn meta<R: Read>(e: &mut tar::Entry<'_, R>) -> Result<Option<Meta>, String> {
    let h = e.header();
    let flag = h.as_bytes()[156];
    let path = e.path_bytes().into_owned();
    let kind = match flag {
        b'0' => Kind::File,
        // Go: an old-style regular file whose name ends in '/' is a directory.
        b'\0' if path.ends_with(b"/") => Kind::Dir,
        b'\0' => Kind::File,
        b'1' => Kind::Hardlink,
        b'2' => Kind::Symlink,
        b'3' => Kind::Char,
        b'4' => Kind::Block,
        b'5' => Kind::Dir,
        b'6' => Kind::Fifo,
        b'g' => {
            let size = e.size();
            if size > MAX_SPECIAL {
                return Err(format!(
                    "PAX global header of {size} bytes (at most {MAX_SPECIAL})"
                ));
            }
            io::copy(e, &mut io::sink()).map_err(|err| format!("PAX global header: {err}"))?;
            return Ok(None);
        }
        other => {
            return Err(format!(
                "entry {:?} has tar type {} ({}), which is not unpacked (only files, \
                 directories, links, device nodes and fifos)",
                show(&path),
                show_flag(other),
                match other {
                    b'7' => "contiguous file",
                    b'S' => "GNU sparse file",
                    b'x' | b'L' | b'K' => "an extension header in a pre-POSIX (v7) header",
                    b'V' => "GNU volume header",
                    b'M' => "GNU multi-volume continuation",
                    b'N' => "GNU old long name",
                    _ => "unknown",
                }
            ))
        }
    };
    let num = |what: &str, r: io::Result<u64>| -> Result<u64, String> {
        r.map_err(|err| format!("entry {:?}: bad {what} field: {err}", show(&path)))
    };
    let size = e.size();
    if kind != Kind::File && size != 0 {
        return Err(format!(
            "entry {:?} is a {} with {size} bytes of data: Go's archive/tar (umoci, containerd) \
             reads no data for it, so the rest of the layer would be read differently",
            show(&path),
            kind.name()
        ));
    }
    let mode = num("mode", h.mode().map(u64::from))? as u32 & 0o7777;
    let id = |what: &str, v: u64| -> Result<u32, String> {
        u32::try_from(v).map_err(|_| format!("entry {:?}: {what} {v} out of range", show(&path)))
    };
    let uid = id("uid", num("uid", h.uid())?)?;
    let gid = id("gid", num("gid", h.gid())?)?;
    let hmtime = num("mtime", h.mtime())?;
    let mut mtime = Time {
        sec: i64::try_from(hmtime).unwrap_or(i64::MAX),
        nsec: 0,
    };
    let (dev_major, dev_minor) = if matches!(kind, Kind::Char | Kind::Block) {
        (
            h.device_major()
                .map_err(|err| format!("entry {:?}: device major: {err}", show(&path)))?
                .unwrap_or(0),
            h.device_minor()
                .map_err(|err| format!("entry {:?}: device minor: {err}", show(&path)))?
                .unwrap_or(0),
        )
    } else {
        (0, 0)
    };
    let link = e
        .link_name_bytes()
        .map(|l| l.into_owned())
        .unwrap_or_default();
    if matches!(kind, Kind::Hardlink | Kind::Symlink) && link.is_empty() {
        return Err(format!("{} {:?} has no target", kind.name(), show(&path)));
    }
    let mut atime = None;
    let mut xattrs = Vec::new();
    let pax = e
        .pax_extensions()
        .map_err(|err| format!("entry {:?}: PAX header: {err}", show(&path)))?;
    if let Some(pax) = pax {
        for ext in pax {
            let ext = ext.map_err(|err| format!("entry {:?}: PAX record: {err}", show(&path)))?;
            let (k, v) = (ext.key_bytes(), ext.value_bytes());
            if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                xattrs.push((name.to_vec(), v.to_vec()));
            } else if k.starts_with(b"GNU.sparse.") {
                return Err(format!(
                    "entry {:?} is a PAX sparse file, which is not unpacked",
                    show(&path)
                ));
            } else if k == b"mtime" {
                mtime = pax_time(v).ok_or_else(|| {
                    format!("entry {:?}: bad PAX mtime {:?}", show(&path), show(v))
                })?;
            } else if k == b"atime" {
                atime = Some(pax_time(v).ok_or_else(|| {
                    format!("entry {:?}: bad PAX atime {:?}", show(&path), show(v))
                })?);
            }
        }
    }
    Ok(Some(Meta {
        kind,
        path,
        link,
        size,
        mode,
        uid,
        gid,
        mtime,
        atime,
        dev_major,
        dev_minor,
        xattrs,
    }))
}

fn show_flag(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("0x{b:02x}")
    }
}

/// A PAX time (`1700000000.123456789`, possibly negative), as Go's `parsePAXTime`.
pub(crate) fn pax_time(v: &[u8]) -> Option<Time> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let sec: i64 = secs.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: u32 = digits.parse().ok()?;
    Some(if !neg {
        Time { sec, nsec }
    } else if nsec == 0 {
        Time { sec: -sec, nsec: 0 }
    } else {
        Time {
            sec: -sec - 1,
            nsec: 1_000_000_000 - nsec,
        }
    })
}

/// After tar-rs saw the end (its first zero block): the next block must be zeros or the
/// end of the stream, as Go requires.
pub(crate) fn check_end<R: Read>(r: &mut R) -> io::Result<()> {
    let mut block = [0u8; 512];
    let mut got = 0;
    while got < block.len() {
        match r.read(&mut block[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if block[..got].iter().any(|&b| b != 0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a header after a single zero block (Go's archive/tar rejects this layer; a lenient \
             reader would unpack more entries than a strict one)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse_as_go() {
        assert_eq!(
            pax_time(b"1700000000.5"),
            Some(Time {
                sec: 1_700_000_000,
                nsec: 500_000_000
            })
        );
        assert_eq!(pax_time(b"12"), Some(Time { sec: 12, nsec: 0 }));
        assert_eq!(
            pax_time(b"1.1234567891"),
            Some(Time {
                sec: 1,
                nsec: 123_456_789
            })
        );
        assert_eq!(
            pax_time(b"-1.25"),
            Some(Time {
                sec: -2,
                nsec: 750_000_000
            })
        );
        assert_eq!(pax_time(b"x"), None);
        assert_eq!(pax_time(b"1.2.3"), None);
    }

    #[test]
    fn budget_stops_reading() {
        let data = [7u8; 100];
        let (mut b, left) = Budget::new(&data[..]);
        left.set(10);
        let mut buf = [0u8; 64];
        assert_eq!(b.read(&mut buf).unwrap(), 10);
        assert!(b.read(&mut buf).is_err());
        left.set(u64::MAX);
        assert_eq!(b.read(&mut buf).unwrap(), 64);
    }

    #[test]
    fn end_must_be_zeros_or_eof() {
        assert!(check_end(&mut &[][..]).is_ok());
        assert!(check_end(&mut &[0u8; 1024][..]).is_ok());
        let mut junk = [0u8; 512];
        junk[0] = b'a';
        assert!(check_end(&mut &junk[..]).is_err());
    }
}
