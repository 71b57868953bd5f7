//! Paths beneath the root of the tree being unpacked, resolved as if that root were `/`.
//!
//! Every directory an entry touches is reached from the root's file descriptor:
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` when the kernel has it
//! (Linux 5.6+; not under seccomp filters that refuse it), else a component walk of
//! `openat(O_NOFOLLOW)` that reads each symlink and splices its target in, an absolute target
//! starting again at the root and `..` stopping there. Either way a symlink can only ever lead
//! to somewhere beneath the root, which is what umoci's `SecureJoinVFS` and containerd's
//! `RootPath` do with strings; here the kernel (or the walk, one `*at()` call per component)
//! holds the guarantee, and no string check is relied on. Every mutation is then an `*at()`
//! call on a trusted directory fd and one plain name.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Symlinks followed while resolving one path (Linux's own limit is 40).
pub(crate) const MAX_SYMLINKS: usize = 40;
/// Longest entry path accepted (Linux's PATH_MAX).
pub(crate) const MAX_PATH: usize = 4096;
/// Longest path component (NAME_MAX).
pub(crate) const MAX_NAME: usize = 255;

/// Set once openat2 turned out to be missing (ENOSYS) or forbidden (EPERM from seccomp).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// The flags every directory is opened with: readable (fchown, fchmod, futimens, fsetxattr
/// and readdir need a real fd, not O_PATH), never following a final symlink.
fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// An entry path made safe to join as umoci's `CleanPath` does: `.` and empty components
/// dropped, `..` applied lexically and clamped at the root (`../../x` is `x`, `/etc` is
/// `etc`). This decides *where* an entry lands; safety never rests on it. An empty result
/// is the root itself.
pub(crate) fn clean(path: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    if path.len() > MAX_PATH {
        return Err(format!("path of {} bytes (at most {MAX_PATH})", path.len()));
    }
    if path.contains(&0) {
        return Err("path holds a NUL byte".into());
    }
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c if c.len() > MAX_NAME => {
                return Err(format!(
                    "path component of {} bytes (at most {MAX_NAME})",
                    c.len()
                ))
            }
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

/// `comps` joined with `/`, for messages and openat2.
pub(crate) fn join(comps: &[Vec<u8>]) -> Vec<u8> {
    let mut p = Vec::new();
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            p.push(b'/');
        }
        p.extend_from_slice(c);
    }
    p
}

/// A name as a C string (names come from [`clean`]: no NUL, so this cannot fail there).
pub(crate) fn cname(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

/// The root of a tree being unpacked.
pub(crate) struct Tree {
    root: OwnedFd,
}

impl Tree {
    /// A tree rooted at the directory `root` (opened without following a final symlink).
    pub(crate) fn new(root: OwnedFd) -> Tree {
        Tree { root }
    }

    /// The root directory's fd.
    pub(crate) fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// A new fd for the root directory.
    pub(crate) fn open_root(&self) -> io::Result<OwnedFd> {
        Ok(rustix::fs::openat(
            &self.root,
            c".",
            dir_flags(),
            Mode::empty(),
        )?)
    }

    /// The directory at `comps` beneath the root, every symlink on the way resolved inside
    /// the root. With `create`, missing directories are made (mode 0777 less the umask, as
    /// umoci's `MkdirAll`); `made` is called with each new one's fd.
    pub(crate) fn open_dir(
        &self,
        comps: &[Vec<u8>],
        create: bool,
        made: &mut dyn FnMut(&OwnedFd),
    ) -> io::Result<OwnedFd> {
        if comps.is_empty() {
            return self.open_root();
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let path = cname(&join(comps))?;
            match self.openat2(&path) {
                Ok(fd) => return Ok(fd),
                Err(Errno::NOSYS) | Err(Errno::PERM) => {
                    tracing::debug!("openat2 unavailable: resolving paths component by component");
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                // Something is missing (the walk creates it), or the kernel kept retrying.
                Err(Errno::NOENT) if create => {}
                Err(Errno::AGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.walk(comps, create, made)
    }

    /// `openat2(root, path, IN_ROOT | NO_MAGICLINKS | NO_XDEV)`, retried a few times on
    /// EAGAIN (a concurrent rename elsewhere on the system).
    fn openat2(&self, path: &CStr) -> Result<OwnedFd, Errno> {
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(
                &self.root,
                path,
                // The last component is followed too (it is a directory we want); IN_ROOT
                // keeps every symlink inside.
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
            ) {
                Err(Errno::AGAIN) if tries < 4 => tries += 1,
                r => return r,
            }
        }
    }

    /// The component walk: `openat(O_NOFOLLOW)` per component; a symlink is read and its
    /// target spliced in front of what is left (absolute: from the root again); `..` pops,
    /// stopping at the root.
    fn walk(
        &self,
        comps: &[Vec<u8>],
        create: bool,
        made: &mut dyn FnMut(&OwnedFd),
    ) -> io::Result<OwnedFd> {
        let mut stack: Vec<OwnedFd> = Vec::new();
        // Components still to resolve, the next one last.
        let mut todo: Vec<Vec<u8>> = comps.iter().rev().cloned().collect();
        let mut hops = 0;
        while let Some(c) = todo.pop() {
            match &c[..] {
                b"" | b"." => continue,
                b".." => {
                    stack.pop();
                    continue;
                }
                _ => {}
            }
            let name = cname(&c)?;
            let cur = stack.last().map_or(self.root.as_fd(), |f| f.as_fd());
            match rustix::fs::openat(cur, &name, dir_flags(), Mode::empty()) {
                Ok(fd) => stack.push(fd),
                // O_DIRECTORY|O_NOFOLLOW on a symlink gives ENOTDIR (or ELOOP): is it one?
                Err(e @ (Errno::NOTDIR | Errno::LOOP)) => {
                    let target = match rustix::fs::readlinkat(cur, &name, Vec::new()) {
                        Ok(t) => t.into_bytes(),
                        Err(Errno::INVAL) => return Err(e.into()),
                        Err(e) => return Err(e.into()),
                    };
                    hops += 1;
                    if hops > MAX_SYMLINKS {
                        return Err(Errno::LOOP.into());
                    }
                    if target.first() == Some(&b'/') {
                        stack.clear();
                    }
                    for t in target.split(|&b| b == b'/').rev() {
                        todo.push(t.to_vec());
                    }
                }
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(cur, &name, Mode::from_raw_mode(0o777)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    let fd = rustix::fs::openat(cur, &name, dir_flags(), Mode::empty())?;
                    made(&fd);
                    stack.push(fd);
                }
                Err(e) => return Err(e.into()),
            }
        }
        match stack.pop() {
            Some(fd) => Ok(fd),
            None => self.open_root(),
        }
    }
}

/// Removes `name` in `parent` and, if it is a directory, everything beneath it, never
/// following a symlink (each directory is opened `O_NOFOLLOW` from its parent's fd). A
/// missing `name` is not an error. Iterative: depth costs no stack.
pub(crate) fn remove_all(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    match rustix::fs::unlinkat(parent, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    // Open directories from `name` down, with each one's name in its parent.
    let top = rustix::fs::openat(parent, name, dir_flags(), Mode::empty())?;
    let mut stack: Vec<(OwnedFd, CString)> = vec![(top, name.to_owned())];
    while let Some((dir, _)) = stack.last() {
        let mut subdir = None;
        let mut entries = rustix::fs::Dir::read_from(dir)?;
        while let Some(ent) = entries.read() {
            let ent = ent?;
            let n = ent.file_name();
            if n == c"." || n == c".." {
                continue;
            }
            match rustix::fs::unlinkat(dir, n, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::ISDIR) => {
                    subdir = Some(n.to_owned());
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        match subdir {
            Some(n) => {
                let fd = rustix::fs::openat(dir, &n, dir_flags(), Mode::empty())?;
                stack.push((fd, n));
            }
            None => {
                let (done, n) = stack.pop().expect("the loop holds an entry");
                drop(done);
                let up = stack.last().map_or(parent, |(f, _)| f.as_fd());
                match rustix::fs::unlinkat(up, &n, AtFlags::REMOVEDIR) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p: &str) -> Vec<String> {
        clean(p.as_bytes())
            .unwrap()
            .into_iter()
            .map(|c| String::from_utf8(c).unwrap())
            .collect()
    }

    #[test]
    fn clean_is_umocis_cleanpath() {
        assert_eq!(c("a/b/c"), ["a", "b", "c"]);
        assert_eq!(c("./a//b/"), ["a", "b"]);
        assert_eq!(c("../../x"), ["x"]);
        assert_eq!(c("/etc/passwd"), ["etc", "passwd"]);
        assert_eq!(c("a/../../b"), ["b"]);
        assert!(c("./").is_empty());
        assert!(c("/..").is_empty());
        assert!(clean(&vec![b'a'; 256]).is_err());
        assert!(clean(b"a\0b").is_err());
    }

    fn tree() -> (tempfile::TempDir, Tree, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let fd = rustix::fs::open(&root, dir_flags(), Mode::empty()).unwrap();
        (dir, Tree::new(fd), root)
    }

    fn comps(p: &str) -> Vec<Vec<u8>> {
        clean(p.as_bytes()).unwrap()
    }

    fn ino(fd: &OwnedFd) -> u64 {
        rustix::fs::fstat(fd).unwrap().st_ino
    }

    fn both_ways(t: &Tree, p: &str, create: bool) -> io::Result<OwnedFd> {
        let a = t.open_dir(&comps(p), create, &mut |_| {});
        let b = t.walk(&comps(p), create, &mut |_| {});
        match (&a, &b) {
            (Ok(x), Ok(y)) => assert_eq!(ino(x), ino(y), "{p}: openat2 and walk disagree"),
            (Err(x), Err(y)) => assert_eq!(x.raw_os_error(), y.raw_os_error(), "{p}"),
            _ => panic!("{p}: openat2 {a:?} walk {b:?}"),
        }
        a
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let (dir, t, root) = tree();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::os::unix::fs::symlink("/", root.join("toroot")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("a/up")).unwrap();
        std::os::unix::fs::symlink("/a/b", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("loop2", root.join("loop1")).unwrap();
        std::os::unix::fs::symlink("loop1", root.join("loop2")).unwrap();
        std::fs::write(root.join("file"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        let r = ino(&t.open_root().unwrap());
        assert_eq!(ino(&both_ways(&t, "toroot", false).unwrap()), r);
        assert_eq!(ino(&both_ways(&t, "a/up", false).unwrap()), r);
        assert_eq!(ino(&both_ways(&t, "a/up/outside", true).unwrap()), {
            ino(&rustix::fs::open(root.join("outside"), dir_flags(), Mode::empty()).unwrap())
        });
        assert!(
            dir.path()
                .join("outside")
                .read_dir()
                .unwrap()
                .next()
                .is_none(),
            "nothing was made outside the root"
        );
        let b = ino(&rustix::fs::open(root.join("a/b"), dir_flags(), Mode::empty()).unwrap());
        assert_eq!(ino(&both_ways(&t, "abs", false).unwrap()), b);
        assert_eq!(ino(&both_ways(&t, "toroot/abs", false).unwrap()), b);
        assert!(both_ways(&t, "loop1", false).is_err());
        assert!(both_ways(&t, "file", false).is_err());
        assert!(both_ways(&t, "missing", false).is_err());
    }

    #[test]
    fn remove_all_never_follows_symlinks() {
        let (dir, t, root) = tree();
        let outside = dir.path().join("keep");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("f"), b"x").unwrap();
        std::fs::create_dir_all(root.join("d/e/f")).unwrap();
        std::fs::write(root.join("d/e/f/g"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d/e/link")).unwrap();
        remove_all(t.root(), c"d").unwrap();
        assert!(!root.join("d").exists());
        assert!(outside.join("f").exists());
        remove_all(t.root(), c"missing").unwrap();
    }
}
