//! One tar entry applied to the tree, as umoci's `UnpackEntry` (oci/layer/tar_extract.go)
//! does it. See the module docs of [`super`] for the rules.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::Timespec;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timestamps, XattrFlags};
use rustix::io::Errno;

use super::merge::Stage;
use super::resolve::{self, cname, Tree};
use super::targuard::{show, Kind, Meta, Time};
use super::{Fail, Options};

/// xattrs never set from a layer nor cleared from disk (umoci's `ignoreXattrs`).
pub(super) const IGNORED_XATTRS: [&[u8]; 2] = [b"security.selinux", b"system.nfs4_acl"];
/// The xattr rootless unpacking records ownership in (github.com/rootless-containers/proto).
const ROOTLESS_XATTR: &[u8] = b"user.rootlesscontainers";
/// `rootlesscontainers.NoopID`: "the real owner" (an id of 0 in the image).
const NOOP_ID: u32 = u32::MAX;

/// A file identity: (st_dev, st_ino).
pub(super) type Ino = (u64, u64);

// Stat's field types differ between architectures (u64 here, narrower elsewhere).
#[allow(clippy::unnecessary_cast)]
pub(super) fn ino_of(st: &rustix::fs::Stat) -> Ino {
    (st.st_dev as u64, st.st_ino as u64)
}

/// The engine: the tree, and what one layer (and the whole image) has done so far.
pub(crate) struct Engine<'t> {
    pub(super) tree: &'t Tree,
    pub(super) opts: Options,
    /// This layer's "upper" paths (umoci's `upperPaths`): (directory, name) of every entry
    /// it created, and every directory that is one of those entries or an ancestor of one.
    /// Whiteouts never remove them. Keyed by inode: a directory's path beneath the root
    /// names one inode, and nothing renames within a layer.
    upper_names: HashSet<(Ino, Vec<u8>)>,
    upper_dirs: HashSet<Ino>,
    /// Rootless: each directory's mode from the image, set at the end (until then it has
    /// u+rwx, so that later entries can go into it, as umoci's `unpriv.Wrap` allows).
    pub(super) dir_modes: HashMap<Ino, u32>,
    root_ino: Ino,
    /// Device nodes written as empty files (rootless or in a user namespace).
    pub(crate) devices_emulated: u64,
    /// xattrs the filesystem or our privileges refused (rootless / ENOTSUP).
    pub(crate) xattrs_skipped: u64,
    enotsup_warned: bool,
    buf: Vec<u8>,
    /// Set when the pull is dropped (Ctrl-C): stop between two writes.
    pub(super) cancel: &'t AtomicBool,
    /// Staging (a layer unpacked alone into its own tree, to be merged later): what the
    /// merge needs, recorded as the entries go in; whiteouts are recorded, not applied.
    /// `None`: entries are applied to the tree as they are (the direct apply).
    pub(super) stage: Option<Stage>,
}

impl<'t> Engine<'t> {
    pub(crate) fn new(
        tree: &'t Tree,
        opts: Options,
        cancel: &'t AtomicBool,
    ) -> io::Result<Engine<'t>> {
        let root_ino = ino_of(&rustix::fs::fstat(tree.root())?);
        Ok(Engine {
            tree,
            opts,
            upper_names: HashSet::new(),
            upper_dirs: HashSet::new(),
            dir_modes: HashMap::new(),
            root_ino,
            devices_emulated: 0,
            xattrs_skipped: 0,
            enotsup_warned: false,
            buf: vec![0; 1 << 20],
            cancel,
            stage: None,
        })
    }

    /// An engine that stages one layer alone into `tree` (empty), to be merged onto the
    /// layers below it by [`Engine::merge`]. An entry whose result would depend on what the
    /// layers below hold fails with [`Fail::Taint`].
    pub(crate) fn staging(
        tree: &'t Tree,
        opts: Options,
        cancel: &'t AtomicBool,
    ) -> io::Result<Engine<'t>> {
        let mut e = Engine::new(tree, opts, cancel)?;
        e.stage = Some(Stage::default());
        Ok(e)
    }

    /// The flag that stops unpacking.
    pub(crate) fn cancel(&self) -> &'t AtomicBool {
        self.cancel
    }

    /// The most tar bytes a layer may give per compressed byte (0: no bound).
    pub(crate) fn max_ratio(&self) -> u64 {
        self.opts.max_ratio
    }

    /// A new layer starts: nothing of it is "upper" yet.
    pub(crate) fn start_layer(&mut self) {
        self.upper_names.clear();
        self.upper_dirs.clear();
    }

    /// Applies one entry; `data` is its content (regular files).
    pub(crate) fn apply(&mut self, m: &Meta, data: &mut dyn Read) -> Result<(), Fail> {
        let comps = resolve::clean(&m.path).map_err(Fail::Bad)?;
        let Some((name, dir)) = comps.split_last() else {
            if let Some(stage) = self.stage.as_mut() {
                stage.root_meta = true;
            }
            return self.root_entry(m);
        };
        if let Some(target) = name.strip_prefix(b".wh.") {
            whiteout_names_something(target)?;
            if let Some(stage) = self.stage.as_mut() {
                return stage.whiteout(dir, target);
            }
            return self.whiteout(dir, target);
        }
        if let Some(stage) = self.stage.as_mut() {
            stage.entry(&comps, m)?;
        }
        let mut made = Vec::new();
        let parent = self
            .tree
            .open_dir(dir, true, &mut |fd| made.push(fd_ino(fd)))
            .map_err(|e| parent_err(e, dir))?;
        for ino in made {
            // A new implicit directory: whatever mode an earlier inode of this number had
            // recorded does not apply.
            self.dir_modes.remove(&ino);
            if let Some(stage) = self.stage.as_mut() {
                stage.implicit_inos.push(ino);
            }
        }
        let pst = rustix::fs::fstat(&parent).map_err(Fail::io_e("stat parent of"))?;
        let cn = cname(name).map_err(Fail::io("name"))?;
        let existing = match rustix::fs::statat(&parent, &cn, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Some(st),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(Fail::io("stat")(e.into())),
        };
        let existing_dir =
            existing.is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
        if existing.is_some() && !(existing_dir && m.kind == Kind::Dir) {
            // Everything replaces what was there, except a directory over a directory,
            // which merges.
            resolve::remove_all(parent.as_fd(), &cn).map_err(Fail::io("remove old"))?;
        }
        let new_dir = match m.kind {
            Kind::File => {
                self.write_file(&parent, &cn, m, data)?;
                None
            }
            Kind::Dir => Some(self.make_dir(&parent, &cn, m, existing_dir)?),
            Kind::Symlink => {
                rustix::fs::symlinkat(&m.link[..], &parent, &cn).map_err(Fail::io_e("symlink"))?;
                self.meta_at(&parent, &cn, m, false)?;
                None
            }
            Kind::Hardlink => {
                self.hardlink(&parent, &cn, m)?;
                None
            }
            Kind::Char | Kind::Block if self.opts.partial_rootless => {
                // umoci's rootless and user-namespace behaviour: mknod is not allowed, so
                // an empty regular file with the node's permissions stands in for it.
                self.devices_emulated += 1;
                self.write_file(&parent, &cn, m, &mut io::empty())?;
                None
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                let ft = match m.kind {
                    Kind::Char => FileType::CharacterDevice,
                    Kind::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let dev = rustix::fs::makedev(m.dev_major, m.dev_minor);
                rustix::fs::mknodat(&parent, &cn, ft, Mode::from_raw_mode(m.mode), dev)
                    .map_err(Fail::io_e("mknod"))?;
                self.meta_at(&parent, &cn, m, true)?;
                None
            }
        };
        // Adding or replacing a child leaves the parent's times as they were.
        restore_times(&parent, &pst)?;
        self.mark_upper(&parent, &pst, name, new_dir)?;
        Ok(())
    }

    /// `./` (or `/`): the root's own metadata. It must be a directory.
    fn root_entry(&mut self, m: &Meta) -> Result<(), Fail> {
        if m.kind != Kind::Dir {
            return Err(Fail::Bad(format!(
                "entry {:?} would change the root directory into a {}",
                show(&m.path),
                m.kind.name()
            )));
        }
        let fd = self.tree.open_root().map_err(Fail::io("open root"))?;
        self.meta_fd(&fd, m, true, Some(self.root_ino))?;
        self.upper_dirs.insert(self.root_ino);
        Ok(())
    }

    /// `.wh.NAME` removes NAME; `.wh..wh..opq` empties its directory. What this layer
    /// itself wrote (its upper paths) stays. A missing target is nothing to do.
    fn whiteout(&mut self, dir: &[Vec<u8>], target: &[u8]) -> Result<(), Fail> {
        let opaque = target == b".wh..opq";
        let parent = match self.tree.open_dir(dir, false, &mut |_| {}) {
            Ok(fd) => fd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                return Ok(())
            }
            Err(e) => return Err(parent_err(e, dir)),
        };
        let pst = rustix::fs::fstat(&parent).map_err(Fail::io_e("stat"))?;
        if opaque {
            self.prune(parent.as_fd(), &pst)?;
        } else {
            let cn = cname(target).map_err(Fail::io("name"))?;
            let st = match rustix::fs::statat(&parent, &cn, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::NOENT) => return Ok(()),
                Err(e) => return Err(Fail::io("stat")(e.into())),
            };
            self.prune_child(parent.as_fd(), &pst, &cn, &st)?;
        }
        restore_times(&parent, &pst)
    }

    /// Whether `name` in the directory `pst`, which is `st`, is an upper path.
    fn is_upper(&self, pst: &rustix::fs::Stat, name: &[u8], st: &rustix::fs::Stat) -> bool {
        (FileType::from_raw_mode(st.st_mode) == FileType::Directory
            && self.upper_dirs.contains(&ino_of(st)))
            || self.upper_names.contains(&(ino_of(pst), name.to_vec()))
    }

    /// Removes `name` from `dir` unless it is upper; an upper directory is pruned instead.
    fn prune_child(
        &mut self,
        dir: BorrowedFd<'_>,
        pst: &rustix::fs::Stat,
        name: &CString,
        st: &rustix::fs::Stat,
    ) -> Result<(), Fail> {
        if !self.is_upper(pst, name.as_bytes(), st) {
            return resolve::remove_all(dir, name).map_err(Fail::io("remove"));
        }
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            let fd = rustix::fs::openat(dir, name, dir_flags(), Mode::empty())
                .map_err(Fail::io_e("open"))?;
            let sub = rustix::fs::fstat(&fd).map_err(Fail::io_e("stat"))?;
            self.prune(fd.as_fd(), &sub)?;
        }
        Ok(())
    }

    /// Removes every child of `dir` that is not upper, descending into upper directories.
    /// Iterative, one open fd per level.
    fn prune(&mut self, dir: BorrowedFd<'_>, st: &rustix::fs::Stat) -> Result<(), Fail> {
        let first = rustix::fs::openat(dir, c".", dir_flags(), Mode::empty())
            .map_err(Fail::io_e("open"))?;
        let names = list(&first)?;
        let mut stack: Vec<(OwnedFd, rustix::fs::Stat, Vec<CString>)> = vec![(first, *st, names)];
        while let Some((fd, fst, names)) = stack.last_mut() {
            let Some(n) = names.pop() else {
                stack.pop();
                continue;
            };
            let cst = match rustix::fs::statat(&*fd, &n, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(s) => s,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(Fail::io("stat")(e.into())),
            };
            if !self.is_upper(fst, n.as_bytes(), &cst) {
                resolve::remove_all(fd.as_fd(), &n).map_err(Fail::io("remove"))?;
            } else if FileType::from_raw_mode(cst.st_mode) == FileType::Directory {
                let sub = rustix::fs::openat(&*fd, &n, dir_flags(), Mode::empty())
                    .map_err(Fail::io_e("open"))?;
                let names = list(&sub)?;
                stack.push((sub, cst, names));
            }
        }
        Ok(())
    }

    /// Marks `name` in `parent` and every directory from `parent` up to the root as upper
    /// (stopping at the first one already marked: its ancestors are).
    fn mark_upper(
        &mut self,
        parent: &OwnedFd,
        pst: &rustix::fs::Stat,
        name: &[u8],
        new_dir: Option<Ino>,
    ) -> Result<(), Fail> {
        self.upper_names.insert((ino_of(pst), name.to_vec()));
        if let Some(d) = new_dir {
            self.upper_dirs.insert(d);
        }
        let mut ino = ino_of(pst);
        let mut cur: Option<OwnedFd> = None;
        // A path is at most 4096 bytes: at most 2048 directories deep.
        for _ in 0..=resolve::MAX_PATH {
            if !self.upper_dirs.insert(ino) || ino == self.root_ino {
                return Ok(());
            }
            let from = cur.as_ref().map_or(parent.as_fd(), |f| f.as_fd());
            let up = rustix::fs::openat(from, c"..", dir_flags(), Mode::empty())
                .map_err(Fail::io_e("open .. of"))?;
            ino = ino_of(&rustix::fs::fstat(&up).map_err(Fail::io_e("stat"))?);
            cur = Some(up);
        }
        Err(Fail::Bad(
            "directory chain deeper than a path can be".into(),
        ))
    }

    /// A regular file (or an emulated device node) with `m`'s data and metadata.
    fn write_file(
        &mut self,
        parent: &OwnedFd,
        name: &CString,
        m: &Meta,
        data: &mut dyn Read,
    ) -> Result<(), Fail> {
        let fd = rustix::fs::openat(
            parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(Fail::io_e("create"))?;
        let mut file = std::fs::File::from(fd);
        let want = if m.kind == Kind::File { m.size } else { 0 };
        let mut written = 0u64;
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(Fail::Io("write", io::ErrorKind::Interrupted.into()));
            }
            let n = match data.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fail::Read(e)),
            };
            io::Write::write_all(&mut file, &self.buf[..n]).map_err(Fail::io("write"))?;
            written += n as u64;
        }
        if written != want {
            return Err(Fail::Bad(format!(
                "file {:?} has {written} bytes of data, its header says {want}",
                show(&m.path)
            )));
        }
        let fd = OwnedFd::from(file);
        self.meta_fd(&fd, m, false, None)
    }

    /// A directory (or, over an existing one, its new metadata). Returns its identity.
    fn make_dir(
        &mut self,
        parent: &OwnedFd,
        name: &CString,
        m: &Meta,
        existing: bool,
    ) -> Result<Ino, Fail> {
        if !existing {
            rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))
                .map_err(Fail::io_e("mkdir"))?;
        }
        let fd = rustix::fs::openat(parent, name, dir_flags(), Mode::empty())
            .map_err(Fail::io_e("open"))?;
        let ino = fd_ino(&fd);
        self.meta_fd(&fd, m, existing, Some(ino))?;
        Ok(ino)
    }

    /// A hard link to an earlier entry (of this layer or one below). The target's
    /// directory is resolved inside the root like any path; its last component is not
    /// followed (a link to a symlink links the symlink).
    fn hardlink(&mut self, parent: &OwnedFd, name: &CString, m: &Meta) -> Result<(), Fail> {
        let comps =
            resolve::clean(&m.link).map_err(|e| Fail::Bad(format!("hard link target: {e}")))?;
        let Some((tname, tdir)) = comps.split_last() else {
            return Err(Fail::Bad(format!(
                "hard link {:?} points to the root directory",
                show(&m.path)
            )));
        };
        let missing = || {
            Fail::Bad(format!(
                "hard link {:?} points to {:?}, which does not exist (yet)",
                show(&m.path),
                show(&m.link)
            ))
        };
        let tparent = match self.tree.open_dir(tdir, false, &mut |_| {}) {
            Ok(fd) => fd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                return Err(missing())
            }
            Err(e) => return Err(Fail::Io("resolve hard link target", e)),
        };
        let tn = cname(tname).map_err(Fail::io("name"))?;
        match rustix::fs::linkat(&tparent, &tn, parent, name, AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) => Err(missing()),
            Err(Errno::PERM) => {
                let is_dir = rustix::fs::statat(&tparent, &tn, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
                if is_dir {
                    Err(Fail::Bad(format!(
                        "hard link {:?} points to the directory {:?}",
                        show(&m.path),
                        show(&m.link)
                    )))
                } else {
                    Err(Fail::Io("link", Errno::PERM.into()))
                }
            }
            Err(e) => Err(Fail::Io("link", e.into())),
        }
    }

    /// Owner, mode, xattrs and times on an open file or directory, in umoci's order
    /// (chown clears setuid/setgid, so chmod comes after; chown clears
    /// security.capability, so xattrs come after that). `dir`: the directory's identity,
    /// when it is one.
    fn meta_fd(
        &mut self,
        fd: &OwnedFd,
        m: &Meta,
        clear: bool,
        dir: Option<Ino>,
    ) -> Result<(), Fail> {
        if !self.opts.rootless {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(m.uid)),
                Some(rustix::fs::Gid::from_raw(m.gid)),
            )
            .map_err(Fail::io_e("chown"))?;
        }
        let mut mode = m.mode;
        if let (Some(ino), true) = (dir, self.opts.rootless) {
            self.dir_modes.insert(ino, mode);
            mode |= 0o700;
        }
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(Fail::io_e("chmod"))?;
        if clear {
            self.clear_xattrs(fd.as_fd())?;
        }
        for (k, v) in self.xattrs_of(m) {
            self.set_xattr(XattrTarget::Fd(fd.as_fd()), &k, &v)?;
        }
        rustix::fs::futimens(fd, &times(m)).map_err(Fail::io_e("set times of"))?;
        Ok(())
    }

    /// Owner, mode (not for symlinks), xattrs and times of `name` in `parent`, never
    /// following it: symlinks and device nodes, which cannot be opened for this.
    fn meta_at(
        &mut self,
        parent: &OwnedFd,
        name: &CString,
        m: &Meta,
        chmod: bool,
    ) -> Result<(), Fail> {
        if !self.opts.rootless {
            rustix::fs::chownat(
                parent,
                name,
                Some(rustix::fs::Uid::from_raw(m.uid)),
                Some(rustix::fs::Gid::from_raw(m.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(Fail::io_e("chown"))?;
        }
        if chmod {
            // `name` is the node just made in our private tree (chmodat has no NOFOLLOW).
            rustix::fs::chmodat(parent, name, Mode::from_raw_mode(m.mode), AtFlags::empty())
                .map_err(Fail::io_e("chmod"))?;
        }
        let xattrs = self.xattrs_of(m);
        if !xattrs.is_empty() {
            // l*xattr through the parent's /proc/self/fd link: the parent is a trusted fd,
            // the last component is not followed.
            let path = proc_path(parent, name);
            for (k, v) in xattrs {
                self.set_xattr(XattrTarget::Path(&path), &k, &v)?;
            }
        }
        rustix::fs::utimensat(parent, name, &times(m), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(Fail::io_e("set times of"))?;
        Ok(())
    }

    /// The xattrs to set for `m`: its `SCHILY.xattr.*` less the ones never set; rootless,
    /// a `user.rootlesscontainers` it brings is dropped and ownership other than root:root
    /// goes there instead (umoci's `unmapHeader`; as root umoci keeps the layer's).
    fn xattrs_of(&self, m: &Meta) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = m
            .xattrs
            .iter()
            .filter(|(k, _)| {
                !(IGNORED_XATTRS.contains(&&k[..]) || self.opts.rootless && k == ROOTLESS_XATTR)
            })
            .cloned()
            .collect();
        if self.opts.rootless && (m.uid != 0 || m.gid != 0) {
            out.push((ROOTLESS_XATTR.to_vec(), rootless_payload(m.uid, m.gid)));
        }
        out
    }

    pub(super) fn set_xattr(&mut self, t: XattrTarget<'_>, k: &[u8], v: &[u8]) -> Result<(), Fail> {
        let name = cname(k).map_err(Fail::io("xattr name"))?;
        let r = match t {
            XattrTarget::Fd(fd) => rustix::fs::fsetxattr(fd, &name, v, XattrFlags::empty()),
            XattrTarget::Path(p) => rustix::fs::lsetxattr(p, &name, v, XattrFlags::empty()),
        };
        match r {
            Ok(()) => Ok(()),
            // Rootless, some xattrs cannot be set (trusted.*, security.capability, user.* on
            // symlinks): umoci ignores EPERM there.
            Err(Errno::PERM) | Err(Errno::ACCESS) if self.opts.partial_rootless => {
                self.xattrs_skipped += 1;
                tracing::debug!(xattr = %show(k), "xattr not permitted here; skipped");
                Ok(())
            }
            Err(Errno::NOTSUP) => {
                self.xattrs_skipped += 1;
                if !self.enotsup_warned {
                    tracing::warn!(xattr = %show(k), "this filesystem does not support xattrs; skipping them");
                    self.enotsup_warned = true;
                }
                Ok(())
            }
            Err(e) => Err(Fail::Io("set xattr on", e.into())),
        }
    }

    /// Removes every xattr but the ones never touched (a directory merged over an existing
    /// one gets exactly the new entry's xattrs).
    pub(super) fn clear_xattrs(&mut self, fd: BorrowedFd<'_>) -> Result<(), Fail> {
        let mut list = vec![0u8; 64 << 10];
        let n = match rustix::fs::flistxattr(fd, &mut list[..]) {
            Ok(n) => n,
            Err(Errno::NOTSUP) => return Ok(()),
            Err(e) => return Err(Fail::Io("list xattrs of", e.into())),
        };
        for k in list[..n].split(|&b| b == 0).filter(|k| !k.is_empty()) {
            if IGNORED_XATTRS.contains(&k) {
                continue;
            }
            let name = cname(k).map_err(Fail::io("xattr name"))?;
            match rustix::fs::fremovexattr(fd, &name) {
                Ok(()) | Err(Errno::NODATA) => {}
                Err(Errno::PERM) | Err(Errno::ACCESS) if self.opts.partial_rootless => {}
                Err(e) => return Err(Fail::Io("remove xattr of", e.into())),
            }
        }
        Ok(())
    }

    /// Rootless: gives every directory the mode the image asked for (they had u+rwx
    /// while the layers went in). Walks the whole tree, without following symlinks.
    pub(crate) fn finish(&mut self) -> Result<(), Fail> {
        if self.dir_modes.is_empty() {
            return Ok(());
        }
        let root = self.tree.open_root().map_err(Fail::io("open root"))?;
        // Depth first, children before their directory (a 0500 or 0000 directory must not
        // be closed before its subdirectories are done); one open fd per level. Chmod does
        // not touch mtimes.
        let mut stack: Vec<(OwnedFd, Vec<CString>)> = Vec::new();
        let children = |fd: &OwnedFd| -> Result<Vec<CString>, Fail> {
            let mut names = Vec::new();
            let mut rd = rustix::fs::Dir::read_from(fd).map_err(Fail::io_e("read directory"))?;
            while let Some(ent) = rd.read() {
                let ent = ent.map_err(Fail::io_e("read directory"))?;
                let n = ent.file_name();
                if n != c"." && n != c".." && ent.file_type() != FileType::RegularFile {
                    names.push(n.to_owned());
                }
            }
            Ok(names)
        };
        let names = children(&root)?;
        stack.push((root, names));
        while let Some((fd, names)) = stack.last_mut() {
            if let Some(n) = names.pop() {
                // Not a directory (or gone): nothing to do.
                if let Ok(sub) = rustix::fs::openat(&*fd, &n, dir_flags(), Mode::empty()) {
                    let names = children(&sub)?;
                    stack.push((sub, names));
                }
                continue;
            }
            let (fd, _) = stack.pop().expect("the loop holds a frame");
            let st = rustix::fs::fstat(&fd).map_err(Fail::io_e("stat"))?;
            if let Some(&mode) = self.dir_modes.get(&ino_of(&st)) {
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(Fail::io_e("chmod"))?;
            }
        }
        Ok(())
    }
}

/// `.wh.NAME` must name a file: not `""`, `.` or `..` (which would name the directory or
/// its parent).
fn whiteout_names_something(target: &[u8]) -> Result<(), Fail> {
    if target != b".wh..opq" && matches!(target, b"" | b"." | b"..") {
        return Err(Fail::Bad(format!(
            "whiteout \".wh.{}\" names no file",
            show(target)
        )));
    }
    Ok(())
}

#[derive(Clone, Copy)]
pub(super) enum XattrTarget<'a> {
    Fd(BorrowedFd<'a>),
    Path(&'a CString),
}

/// The names in a directory (but `.` and `..`).
pub(super) fn list(fd: &OwnedFd) -> Result<Vec<CString>, Fail> {
    let mut names = Vec::new();
    let mut rd = rustix::fs::Dir::read_from(fd).map_err(Fail::io_e("read directory"))?;
    while let Some(ent) = rd.read() {
        let ent = ent.map_err(Fail::io_e("read directory"))?;
        let n = ent.file_name();
        if n != c"." && n != c".." {
            names.push(n.to_owned());
        }
    }
    Ok(names)
}

pub(super) fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn fd_ino(fd: &OwnedFd) -> Ino {
    rustix::fs::fstat(fd)
        .map(|st| ino_of(&st))
        .unwrap_or((0, 0))
}

fn ts(t: Time) -> Timespec {
    Timespec {
        tv_sec: t.sec,
        tv_nsec: t.nsec as _,
    }
}

/// atime (the PAX atime, else the mtime) and mtime of `m`.
fn times(m: &Meta) -> Timestamps {
    Timestamps {
        last_access: ts(m.atime.unwrap_or(m.mtime)),
        last_modification: ts(m.mtime),
    }
}

/// Puts back a directory's times after one of its children changed.
pub(super) fn restore_times(dir: &OwnedFd, st: &rustix::fs::Stat) -> Result<(), Fail> {
    rustix::fs::futimens(dir, &stat_times(st)).map_err(Fail::io_e("restore times of parent of"))
}

/// The atime and mtime of `st`.
#[allow(clippy::unnecessary_cast)] // Stat's field types differ between architectures.
pub(super) fn stat_times(st: &rustix::fs::Stat) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime as i64,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime as i64,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

/// `/proc/self/fd/<parent>/<name>`.
fn proc_path(parent: &OwnedFd, name: &CString) -> CString {
    use std::os::fd::AsRawFd;
    let mut p = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.as_bytes());
    CString::new(p).unwrap_or_default()
}

/// What a failure to open an entry's parent directory means.
fn parent_err(e: io::Error, dir: &[Vec<u8>]) -> Fail {
    match e.raw_os_error() {
        Some(libc::ENOTDIR) => Fail::Bad(format!(
            "parent {:?} is not a directory",
            show(&resolve::join(dir))
        )),
        Some(libc::ELOOP) => Fail::Bad(format!(
            "parent {:?}: too many symlinks",
            show(&resolve::join(dir))
        )),
        Some(libc::EXDEV) => Fail::Bad(format!(
            "parent {:?} crosses a mount point",
            show(&resolve::join(dir))
        )),
        _ => Fail::Io("open parent directory of", e),
    }
}

/// The `user.rootlesscontainers` value for `uid:gid` (protobuf `Resource{uint32 uid = 1;
/// uint32 gid = 2}`, 0 written as `NoopID`), byte for byte what umoci writes.
pub(crate) fn rootless_payload(uid: u32, gid: u32) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u32) {
        while v >= 0x80 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let id = |v: u32| if v == 0 { NOOP_ID } else { v };
    let mut out = vec![0x08];
    varint(&mut out, id(uid));
    out.push(0x10);
    varint(&mut out, id(gid));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootless_payload_is_umocis() {
        assert_eq!(
            rootless_payload(1000, 0),
            [0x08, 0xe8, 0x07, 0x10, 0xff, 0xff, 0xff, 0xff, 0x0f]
        );
        assert_eq!(
            rootless_payload(0, 5),
            [0x08, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x10, 0x05]
        );
    }
}
