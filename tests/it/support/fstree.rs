//! A filesystem tree as comparable text: one line per path with everything an unpacked
//! root filesystem is judged by (type, mode with setuid/setgid/sticky, owner, size, sha256
//! of regular files, symlink target, link count of non-directories, mtime to the
//! nanosecond, device numbers, sorted xattrs but `security.selinux`). Walks without
//! following symlinks. Used to compare fastpull's `--format rootfs` with `umoci unpack`.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// `root`'s tree: path (relative, `/` for the root) → description. Directories named in
/// `skip_mtime` (implicit directories, whose mtime is "now") are listed without mtime.
pub fn snapshot(root: &Path, skip_mtime: &[&str]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let rel = match p.strip_prefix(root) {
            Ok(r) if r.as_os_str().is_empty() => "/".to_string(),
            Ok(r) => r.to_string_lossy().into_owned(),
            Err(_) => unreachable!("walked outside the root"),
        };
        let md =
            std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_file() {
            "file"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "other"
        };
        let mut line = format!(
            "{kind} mode={:04o} uid={} gid={}",
            md.mode() & 0o7777,
            md.uid(),
            md.gid()
        );
        if ft.is_file() {
            let (size, sha256) = sha256_of(&p);
            line += &format!(" size={size} sha256={sha256}");
        }
        if ft.is_symlink() {
            let t =
                std::fs::read_link(&p).unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()));
            line += &format!(" -> {}", t.display());
        }
        if !ft.is_dir() {
            line += &format!(" nlink={}", md.nlink());
        }
        if ft.is_char_device() || ft.is_block_device() {
            line += &format!(" rdev={:x}", md.rdev());
        }
        if ft.is_dir() && skip_mtime.contains(&rel.as_str()) {
            line += " mtime=(implicit)";
        } else {
            line += &format!(" mtime={}.{:09}", md.mtime(), md.mtime_nsec());
        }
        for (k, v) in xattrs(&p) {
            line += &format!(" xattr:{k}={}", hex::encode(v));
        }
        out.insert(rel, line);
        if ft.is_dir() {
            let rd = std::fs::read_dir(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            for e in rd {
                stack.push(
                    e.unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
                        .path(),
                );
            }
        }
    }
    out
}

/// A file's size and sha256 (hex), read in pieces: files may be large (a 1 GiB one). ring's
/// sha256 is assembly, fast in a debug build too.
fn sha256_of(p: &Path) -> (u64, String) {
    use std::io::Read;
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        if n == 0 {
            return (size, hex::encode(ctx.finish()));
        }
        ctx.update(&buf[..n]);
        size += n as u64;
    }
}

/// The xattrs of `p` (not following a symlink), sorted, without `security.selinux`.
pub fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut names = vec![0u8; 64 << 10];
    let n = match rustix::fs::llistxattr(p, &mut names[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return BTreeMap::new(),
        Err(e) => panic!("llistxattr {}: {e}", p.display()),
    };
    let mut out = BTreeMap::new();
    for k in names[..n].split(|&b| b == 0).filter(|k| !k.is_empty()) {
        let name = String::from_utf8_lossy(k).into_owned();
        if name == "security.selinux" {
            continue;
        }
        let mut v = vec![0u8; 64 << 10];
        let len = rustix::fs::lgetxattr(p, k, &mut v[..])
            .unwrap_or_else(|e| panic!("lgetxattr {} {name}: {e}", p.display()));
        v.truncate(len);
        out.insert(name, v);
    }
    out
}

/// Fails with the lines that differ between two snapshots.
pub fn assert_same(
    what_a: &str,
    a: &BTreeMap<String, String>,
    what_b: &str,
    b: &BTreeMap<String, String>,
) {
    let mut diff = Vec::new();
    for (k, va) in a {
        match b.get(k) {
            Some(vb) if vb == va => {}
            Some(vb) => diff.push(format!("  {k}\n    {what_a}: {va}\n    {what_b}: {vb}")),
            None => diff.push(format!("  {k}: only in {what_a}: {va}")),
        }
    }
    for (k, vb) in b {
        if !a.contains_key(k) {
            diff.push(format!("  {k}: only in {what_b}: {vb}"));
        }
    }
    assert!(
        diff.is_empty(),
        "{what_a} and {what_b} differ in {} of {} paths:\n{}",
        diff.len(),
        a.len().max(b.len()),
        diff.join("\n")
    );
}
