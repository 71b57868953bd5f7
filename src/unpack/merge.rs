//! Layers staged alone, merged in order (DESIGN.md §4).
//!
//! Every layer above the bottom one is unpacked, while it downloads and beside the others,
//! into its own empty tree by the same per-entry engine ([`Engine::staging`]), which records
//! what the merge needs ([`Stage`]): which directories the layer made explicitly (a `dir/`
//! header) and which only as parents (implicit), its whiteouts per directory (recorded,
//! not applied), opaque markers, whether it changed the root (`./`). Once its blob is
//! verified, its diff_id matched and the layers below are merged, [`Engine::merge`] moves
//! it onto the merged tree by renames of whole subtrees, never copying file data:
//!
//! 1. in an opaque directory, every child the layer does not have is removed;
//! 2. the layer's whiteouts in that directory remove their targets (never followed);
//! 3. each child of the staged directory: a directory over a directory merges (an explicit
//!    one gives its owner, mode, xattrs and times, as a `dir/` header over an existing
//!    directory does; an implicit one leaves the lower one's), anything else replaces what
//!    was there by one `renameat`; the merged directories' times are put back after.
//!
//! Why this is umoci's sequential result: a rename keeps inode, metadata and hard links;
//! the layer's own paths are exactly what its staging tree holds (umoci's "upper paths"),
//! so an opaque marker or a whiteout removes the same lower entries; a replaced subtree
//! took the lower one's place as umoci's `RemoveAll` + create does.
//!
//! A layer is *tainted* (applied directly instead, entry by entry onto the merged tree from
//! its verified blob file) when its result could depend on the lower layers in a way the
//! staging tree cannot see. Conservative: when in doubt, taint. While staging
//! ([`Stage::entry`], [`Stage::whiteout`]):
//! - an entry's parent crosses a file or symlink this layer wrote (T1: the path would be
//!   resolved through it), or an entry replaces one of this layer's own entries (other than
//!   a directory over a directory): the order of the layer's entries against the lower
//!   tree would matter;
//! - a `dir/` header comes after entries beneath it (they may have gone through a lower
//!   symlink at that path);
//! - a hard link to anything this layer did not write before it (a lower layer's file: a
//!   cross-layer hard link);
//! - a whiteout in a directory this layer did not make before it, or of a directory it made
//!   before it, or an opaque marker after a subdirectory of its directory (umoci prunes
//!   the lower entries beneath those, which gives them the current mtime);
//!
//! and before merging, against the merged tree ([`Engine::precheck`]):
//! - an implicit directory where the lower tree has a symlink or a non-directory (umoci
//!   would follow the symlink, or fail);
//! - a whiteout of a directory the layer made only implicitly (T3: umoci keeps the lower
//!   directory's metadata);
//! - an opaque directory with an implicit directory beneath it (T4).

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;

use rustix::fs::{AtFlags, FileType, Mode, Timestamps};
use rustix::io::Errno;

use super::apply::{dir_flags, ino_of, list, stat_times, Engine, Ino, XattrTarget, IGNORED_XATTRS};
use super::resolve::{self, cname};
use super::targuard::{show, Kind, Meta};
use super::Fail;

/// A path beneath a tree's root, as cleaned components (the root is empty).
type Path = Vec<Vec<u8>>;

/// One directory of a staging tree.
#[derive(Debug, Default, Clone)]
pub(crate) struct DirRec {
    /// Made by a `dir/` header of the layer (else only as a parent of its entries).
    explicit: bool,
    /// Holds `.wh..wh..opq`.
    opaque: bool,
    /// Names whited out in it (`.wh.NAME`), in archive order.
    whiteouts: Vec<Vec<u8>>,
    /// A directory of the layer is beneath it.
    has_subdir: bool,
}

/// Most components an entry's path may have in a layer that is staged: a deeper one taints
/// the layer (it is applied directly, which keeps no paths). What staging records costs
/// the square of the depth (each directory is kept by its whole path), and a hostile layer
/// of a few KB could name a path of 2,000 components (PATH_MAX).
const MAX_STAGED_DEPTH: usize = 256;
/// Most path components a staged layer's records may hold (about 50 bytes each): past it
/// the layer is applied directly. A layer of a few hundred thousand files stays under it;
/// up to [`super::MAX_STAGING`] layers stage at once.
const MAX_STAGED_COMPONENTS: usize = 2 << 20;

/// What staging one layer recorded for its merge. Nothing in a staging tree is ever
/// replaced, renamed or crossed through a symlink (that taints the layer), so paths name
/// the same directory from first to last entry.
#[derive(Debug)]
pub(crate) struct Stage {
    /// Every directory of the staging tree, the root included.
    dirs: HashMap<Path, DirRec>,
    /// Every other entry the layer wrote.
    nondirs: HashSet<Path>,
    /// The layer had a `./` entry (the root's metadata).
    pub(super) root_meta: bool,
    /// Directories made as parents (their inodes: a mode a lower layer recorded for a
    /// recycled inode number must not apply to them).
    pub(super) implicit_inos: Vec<Ino>,
    /// Path components the records above hold (see [`MAX_STAGED_COMPONENTS`]).
    components: usize,
}

impl Default for Stage {
    fn default() -> Stage {
        Stage {
            dirs: HashMap::from([(Vec::new(), DirRec::default())]),
            nondirs: HashSet::new(),
            root_meta: false,
            implicit_inos: Vec::new(),
            components: 0,
        }
    }
}

fn taint(why: String) -> Fail {
    Fail::Taint(why)
}

impl Stage {
    /// Checks and records one entry (not a whiteout, not the root) before it is applied to
    /// the staging tree.
    pub(super) fn entry(&mut self, comps: &[Vec<u8>], m: &Meta) -> Result<(), Fail> {
        if comps.len() > MAX_STAGED_DEPTH {
            return Err(taint(format!(
                "{:?} has more than {MAX_STAGED_DEPTH} components",
                show(&m.path)
            )));
        }
        let dir = &comps[..comps.len() - 1];
        for k in 1..=dir.len() {
            let p = &dir[..k];
            if self.nondirs.contains(p) {
                return Err(taint(format!(
                    "{:?}: its parent {:?} is a file or symlink of the same layer",
                    show(&m.path),
                    show(&resolve::join(p))
                )));
            }
            if !self.dirs.contains_key(p) {
                self.record(k)?;
                self.dirs.insert(p.to_vec(), DirRec::default());
                self.note_subdir(p);
            }
        }
        if self.nondirs.contains(comps) {
            return Err(taint(format!(
                "{:?} replaces an entry of the same layer",
                show(&m.path)
            )));
        }
        match self.dirs.get(comps) {
            Some(rec) if m.kind == Kind::Dir && rec.explicit => return Ok(()),
            Some(_) if m.kind == Kind::Dir => {
                return Err(taint(format!(
                    "directory {:?} comes after entries beneath it",
                    show(&m.path)
                )))
            }
            Some(_) => {
                return Err(taint(format!(
                    "{:?} replaces a directory of the same layer",
                    show(&m.path)
                )))
            }
            None => {}
        }
        if m.kind == Kind::Hardlink {
            let within = resolve::clean(&m.link).is_ok_and(|t| self.nondirs.contains(&t));
            if !within {
                return Err(taint(format!(
                    "hard link {:?} to {:?}, not an earlier entry of the same layer",
                    show(&m.path),
                    show(&m.link)
                )));
            }
        }
        self.record(comps.len())?;
        if m.kind == Kind::Dir {
            self.dirs.insert(
                comps.to_vec(),
                DirRec {
                    explicit: true,
                    ..DirRec::default()
                },
            );
            self.note_subdir(comps);
        } else {
            self.nondirs.insert(comps.to_vec());
        }
        Ok(())
    }

    /// Counts `n` more components recorded; past [`MAX_STAGED_COMPONENTS`] the layer is
    /// applied directly.
    fn record(&mut self, n: usize) -> Result<(), Fail> {
        self.components += n;
        if self.components > MAX_STAGED_COMPONENTS {
            return Err(taint(format!(
                "its paths hold more than {MAX_STAGED_COMPONENTS} components in all"
            )));
        }
        Ok(())
    }

    /// The parent of the directory `p` (recorded) has a subdirectory.
    fn note_subdir(&mut self, p: &[Vec<u8>]) {
        if let Some(parent) = self.dirs.get_mut(&p[..p.len() - 1]) {
            parent.has_subdir = true;
        }
    }

    /// Records `.wh.TARGET` in `dir` (applied by the merge).
    pub(super) fn whiteout(&mut self, dir: &[Vec<u8>], target: &[u8]) -> Result<(), Fail> {
        let Some(rec) = self.dirs.get_mut(dir) else {
            return Err(taint(format!(
                "whiteout \".wh.{}\" in {:?}, a directory the layer did not make before it",
                show(target),
                show(&resolve::join(dir))
            )));
        };
        if target == b".wh..opq" {
            rec.opaque = true;
            if rec.has_subdir {
                // umoci prunes the lower entries beneath it, which gives it the current
                // mtime, if there were any. (Known from a flag: a scan of every directory
                // for each marker made a layer of many markers quadratic.)
                return Err(taint(format!(
                    "opaque marker in {:?} after a subdirectory of it",
                    show(&resolve::join(dir)),
                )));
            }
            return Ok(());
        }
        rec.whiteouts.push(target.to_vec());
        self.record(1)?;
        let mut t = dir.to_vec();
        t.push(target.to_vec());
        if self.dirs.contains_key(&t) {
            // umoci prunes the lower entries beneath it, which changes its mtime (and
            // that of its subdirectories) to now, if there were any.
            return Err(taint(format!(
                "whiteout of {:?}, a directory the layer wrote before it",
                show(&resolve::join(&t))
            )));
        }
        Ok(())
    }
}

/// A staged layer, once its tree is complete: what its engine recorded.
pub(crate) struct Staged {
    pub(crate) stage: Stage,
    /// Rootless: the modes its directories get at the end (by inode).
    pub(crate) dir_modes: HashMap<Ino, u32>,
    pub(crate) devices_emulated: u64,
    pub(crate) xattrs_skipped: u64,
}

impl Engine<'_> {
    /// What a staging engine recorded (see [`Engine::staging`]).
    pub(crate) fn into_staged(self) -> Staged {
        Staged {
            stage: self.stage.unwrap_or_default(),
            dir_modes: self.dir_modes,
            devices_emulated: self.devices_emulated,
            xattrs_skipped: self.xattrs_skipped,
        }
    }

    /// Whether `s` can be merged onto this (the merged) tree with umoci's result: `None`,
    /// or why not (the layer is then applied directly). Reads only.
    pub(crate) fn precheck(&self, s: &Stage) -> Result<Option<String>, Fail> {
        let explicit = |p: &[Vec<u8>]| s.dirs.get(p).is_some_and(|r| r.explicit);
        // An implicit directory beneath an opaque one: each implicit directory looks up its
        // ancestors among the opaque ones (few, usually none), not each opaque directory
        // through every directory (quadratic in a layer of many markers).
        let opaque: HashSet<&[Vec<u8>]> = s
            .dirs
            .iter()
            .filter(|(_, r)| r.opaque)
            .map(|(p, _)| p.as_slice())
            .collect();
        if !opaque.is_empty() {
            for (q, _) in s.dirs.iter().filter(|(_, r)| !r.explicit) {
                if let Some(p) = (0..q.len()).map(|k| &q[..k]).find(|p| opaque.contains(p)) {
                    return Ok(Some(format!(
                        "opaque directory {:?} holds {:?}, made only as a parent",
                        show(&resolve::join(p)),
                        show(&resolve::join(q))
                    )));
                }
            }
        }
        for (p, rec) in &s.dirs {
            for w in &rec.whiteouts {
                let mut t = p.clone();
                t.push(w.clone());
                if s.dirs.get(&t).is_some_and(|r| !r.explicit) {
                    return Ok(Some(format!(
                        "whiteout of {:?}, a directory the layer makes only as a parent",
                        show(&resolve::join(&t))
                    )));
                }
            }
            if rec.explicit || p.is_empty() {
                continue;
            }
            // Down the merged tree along p, never following: where the layer's directory
            // is implicit, the lower one must be a directory or nothing.
            let mut cur = self.tree.open_root().map_err(Fail::io("open root"))?;
            for (k, comp) in p.iter().enumerate() {
                let c = cname(comp).map_err(Fail::io("name"))?;
                match rustix::fs::statat(&cur, &c, AtFlags::SYMLINK_NOFOLLOW) {
                    Err(Errno::NOENT) => break,
                    Err(e) => return Err(Fail::Io("stat", e.into())),
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                        cur = rustix::fs::openat(&cur, &c, dir_flags(), Mode::empty())
                            .map_err(Fail::io_e("open"))?;
                    }
                    // Replaced by the layer's own directory, and all beneath with it.
                    Ok(_) if explicit(&p[..=k]) => break,
                    Ok(_) => {
                        return Ok(Some(format!(
                            "{:?} is made only as a parent, and the layers below have a \
                             symlink or a file there",
                            show(&resolve::join(&p[..=k]))
                        )))
                    }
                }
            }
        }
        Ok(None)
    }

    /// Merges the staged tree `s_root` (recorded in `staged`; [`Engine::precheck`] found
    /// nothing against it) onto this tree, by renames. Iterative, one pair of fds a level.
    /// What is left in the staging tree (emptied directories) is the caller's to remove.
    pub(crate) fn merge(&mut self, s_root: OwnedFd, staged: &Staged) -> Result<(), Fail> {
        let s = &staged.stage;
        let m_root = self.tree.open_root().map_err(Fail::io("open root"))?;
        // Staged directories merged over lower ones: their inodes stay behind.
        let mut merged_over: HashSet<Ino> = HashSet::new();
        let root_meta = if s.root_meta {
            let st = rustix::fs::fstat(&s_root).map_err(Fail::io_e("stat"))?;
            merged_over.insert(ino_of(&st));
            Some(st)
        } else {
            None
        };
        let first = self.open_frame(s_root, m_root, Vec::new(), false, root_meta, staged)?;
        let mut stack = vec![first];
        while let Some(f) = stack.last_mut() {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(Fail::Io("merge", std::io::ErrorKind::Interrupted.into()));
            }
            let Some(c) = f.todo.pop() else {
                let f = stack.pop().expect("the loop holds a frame");
                rustix::fs::futimens(&f.m, &f.times).map_err(Fail::io_e("set times of"))?;
                continue;
            };
            let sst = rustix::fs::statat(&f.s, &c, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(Fail::io_e("stat staged"))?;
            let mst = match rustix::fs::statat(&f.m, &c, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Some(st),
                Err(Errno::NOENT) => None,
                Err(e) => return Err(Fail::Io("stat", e.into())),
            };
            let is_dir =
                |st: &rustix::fs::Stat| FileType::from_raw_mode(st.st_mode) == FileType::Directory;
            match mst {
                Some(mst) if is_dir(&sst) && is_dir(&mst) => {
                    let mut path = f.path.clone();
                    path.push(c.as_bytes().to_vec());
                    let explicit = s.dirs.get(&path).is_some_and(|r| r.explicit);
                    let sfd = rustix::fs::openat(&f.s, &c, dir_flags(), Mode::empty())
                        .map_err(Fail::io_e("open staged"))?;
                    let mfd = rustix::fs::openat(&f.m, &c, dir_flags(), Mode::empty())
                        .map_err(Fail::io_e("open"))?;
                    let opaque = f.opaque;
                    if explicit {
                        merged_over.insert(ino_of(&sst));
                    }
                    let frame =
                        self.open_frame(sfd, mfd, path, opaque, explicit.then_some(sst), staged)?;
                    stack.push(frame);
                }
                mst => {
                    if mst.is_some_and(|m| is_dir(&m) || is_dir(&sst)) {
                        resolve::remove_all(f.m.as_fd(), &c).map_err(Fail::io("remove old"))?;
                    }
                    rustix::fs::renameat(&f.s, &c, &f.m, &c).map_err(Fail::io_e("rename"))?;
                }
            }
        }
        // Rootless modes, by inode: the renamed directories keep theirs.
        for ino in &s.implicit_inos {
            self.dir_modes.remove(ino);
        }
        for (ino, mode) in &staged.dir_modes {
            if !merged_over.contains(ino) {
                self.dir_modes.insert(*ino, *mode);
            }
        }
        self.devices_emulated += staged.devices_emulated;
        self.xattrs_skipped += staged.xattrs_skipped;
        Ok(())
    }

    /// Starts merging the staged directory `s` into the merged one `m` (steps 1 and 2 of
    /// the module docs); `meta`: `s`'s stat, when its metadata replaces `m`'s (a `dir/`
    /// header, or `./` for the root).
    fn open_frame(
        &mut self,
        s: OwnedFd,
        m: OwnedFd,
        path: Path,
        inherited_opaque: bool,
        meta: Option<rustix::fs::Stat>,
        staged: &Staged,
    ) -> Result<Frame, Fail> {
        let mst = rustix::fs::fstat(&m).map_err(Fail::io_e("stat"))?;
        let times = match meta {
            Some(sst) => {
                self.copy_meta(&s, &sst, &m, &mst, staged)?;
                stat_times(&sst)
            }
            None => stat_times(&mst),
        };
        let rec = staged.stage.dirs.get(&path);
        let opaque = inherited_opaque || rec.is_some_and(|r| r.opaque);
        let todo = list(&s)?;
        if opaque {
            let keep: HashSet<&CString> = todo.iter().collect();
            for n in list(&m)? {
                if !keep.contains(&n) {
                    resolve::remove_all(m.as_fd(), &n).map_err(Fail::io("remove (opaque)"))?;
                }
            }
        }
        for w in rec.map(|r| &r.whiteouts[..]).unwrap_or_default() {
            let n = cname(w).map_err(Fail::io("name"))?;
            resolve::remove_all(m.as_fd(), &n).map_err(Fail::io("remove (whiteout)"))?;
        }
        Ok(Frame {
            s,
            m,
            path,
            opaque,
            todo,
            times,
        })
    }

    /// A `dir/` header over an existing directory, replayed: owner, mode, xattrs (exactly
    /// the staged directory's) in the engine's order. Times are set once its children are
    /// in.
    fn copy_meta(
        &mut self,
        s: &OwnedFd,
        sst: &rustix::fs::Stat,
        m: &OwnedFd,
        mst: &rustix::fs::Stat,
        staged: &Staged,
    ) -> Result<(), Fail> {
        if !self.opts.rootless {
            rustix::fs::fchown(
                m,
                Some(rustix::fs::Uid::from_raw(sst.st_uid)),
                Some(rustix::fs::Gid::from_raw(sst.st_gid)),
            )
            .map_err(Fail::io_e("chown"))?;
        }
        rustix::fs::fchmod(m, Mode::from_raw_mode(sst.st_mode & 0o7777))
            .map_err(Fail::io_e("chmod"))?;
        if let Some(&mode) = staged.dir_modes.get(&ino_of(sst)) {
            self.dir_modes.insert(ino_of(mst), mode);
        }
        self.clear_xattrs(m.as_fd())?;
        for (k, v) in xattrs(s)? {
            if !IGNORED_XATTRS.contains(&&k[..]) {
                self.set_xattr(XattrTarget::Fd(m.as_fd()), &k, &v)?;
            }
        }
        Ok(())
    }
}

/// One directory pair being merged.
struct Frame {
    s: OwnedFd,
    m: OwnedFd,
    path: Path,
    opaque: bool,
    /// Children of `s` still to move.
    todo: Vec<CString>,
    /// What `m`'s times are once its children are in.
    times: Timestamps,
}

/// An xattr: name, value.
type Xattr = (Vec<u8>, Vec<u8>);

/// The xattrs of an open file.
fn xattrs(fd: &OwnedFd) -> Result<Vec<Xattr>, Fail> {
    let mut names = vec![0u8; 64 << 10];
    let n = match rustix::fs::flistxattr(fd, &mut names[..]) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(Fail::Io("list xattrs of", e.into())),
    };
    let mut out = Vec::new();
    for k in names[..n].split(|&b| b == 0).filter(|k| !k.is_empty()) {
        let name = cname(k).map_err(Fail::io("xattr name"))?;
        let mut v = vec![0u8; 64 << 10];
        match rustix::fs::fgetxattr(fd, &name, &mut v[..]) {
            Ok(len) => {
                v.truncate(len);
                out.push((k.to_vec(), v));
            }
            Err(Errno::NODATA) => {}
            Err(e) => return Err(Fail::Io("read xattr of", e.into())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! Staging and merging against the reference, the direct apply of every layer in
    //! order onto one tree (itself checked against umoci in tests/it/rootfs.rs): the same
    //! tree, path by path, and the layers that had to be applied directly are the ones
    //! the taint rules name.

    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use super::MAX_STAGED_DEPTH;
    use crate::digest::Digest;
    use crate::unpack::{unpack, unpack_direct, Layer, Options};

    /// One tar entry: (type flag, name, link target, mode, mtime, data).
    type E<'a> = (u8, &'a str, &'a str, u32, u64, &'a [u8]);

    const T: u64 = 1_600_000_000;

    fn f<'a>(name: &'a str, data: &'a [u8]) -> E<'a> {
        (b'0', name, "", 0o644, T, data)
    }
    fn d(name: &str, mode: u32, mtime: u64) -> E<'_> {
        (b'5', name, "", mode, mtime, b"")
    }
    fn sl<'a>(name: &'a str, target: &'a str) -> E<'a> {
        (b'2', name, target, 0o777, T, b"")
    }
    fn hl<'a>(name: &'a str, target: &'a str) -> E<'a> {
        (b'1', name, target, 0o644, T, b"")
    }

    fn tar(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for &(flag, name, link, mode, mtime, data) in entries {
            let mut h = tar::Header::new_ustar();
            {
                let old = h.as_old_mut();
                old.name[..name.len()].copy_from_slice(name.as_bytes());
                old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_entry_type(tar::EntryType::new(flag));
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(mtime);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).expect("tar into memory");
        }
        b.into_inner().expect("tar into memory")
    }

    /// Every path beneath `root`: type, mode, owner, size and content, link target, nlink,
    /// mtime (not for directories made with the current time: implicit ones), xattrs.
    fn snapshot(root: &Path) -> BTreeMap<String, String> {
        let recent = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            - 3600;
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(p) = stack.pop() {
            let md = std::fs::symlink_metadata(&p).expect("lstat");
            let rel = p.strip_prefix(root).expect("beneath").display().to_string();
            let mut line = format!(
                "{:?} mode={:o} {}:{}",
                md.file_type(),
                md.mode() & 0o7777,
                md.uid(),
                md.gid()
            );
            if md.is_file() {
                line += &format!(" data={:?}", std::fs::read(&p).expect("read"));
            }
            if md.file_type().is_symlink() {
                line += &format!(" -> {:?}", std::fs::read_link(&p).expect("readlink"));
            }
            if !md.is_dir() {
                line += &format!(" nlink={}", md.nlink());
            }
            if !(md.is_dir() && md.mtime() as u64 > recent) {
                line += &format!(" mtime={}.{}", md.mtime(), md.mtime_nsec());
            }
            let mut names: Vec<_> = xattr_names(&p);
            names.sort();
            line += &format!(" xattrs={names:?}");
            out.insert(rel, line);
            if md.is_dir() {
                for e in std::fs::read_dir(&p).expect("readdir") {
                    stack.push(e.expect("entry").path());
                }
            }
        }
        out
    }

    fn xattr_names(p: &Path) -> Vec<String> {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
        let mut buf = vec![0u8; 4096];
        let n = rustix::fs::llistxattr(&c, &mut buf[..]).unwrap_or(0);
        buf[..n]
            .split(|&b| b == 0)
            .filter(|k| !k.is_empty() && !k.starts_with(b"security."))
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    /// Unpacks `layers` both ways; asserts the same tree and `direct` layers applied
    /// directly.
    fn check(name: &str, layers: &[Vec<E<'_>>], direct: usize) {
        let dir = tempfile::tempdir().expect("temp dir");
        let layers = layers_of(dir.path(), name, layers.iter().map(|e| tar(e)).collect());
        // As this process is, and rootless (directory modes set at the end, by inode).
        for (k, opts) in [
            Options::detect(),
            Options {
                rootless: true,
                partial_rootless: true,
                ..Options::detect()
            },
        ]
        .into_iter()
        .enumerate()
        {
            let name = format!("{name} ({opts:?})");
            same_both_ways(&name, dir.path(), k, &layers, opts, direct);
        }
    }

    fn same_both_ways(
        name: &str,
        dir: &Path,
        k: usize,
        layers: &[Layer],
        opts: Options,
        direct: usize,
    ) {
        let top = dir.join(format!("merged-{k}"));
        std::fs::create_dir(&top).expect("mkdir");
        let merged = top.join("rootfs");
        let cancel = Arc::new(AtomicBool::new(false));
        let summary = unpack(
            &merged,
            layers,
            opts,
            &cancel,
            &mut |_, _, _| {},
            &|_, _, _| {},
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let reference = dir.join(format!("direct-{k}"));
        unpack_direct(&reference, layers, opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (a, b) = (snapshot(&merged), snapshot(&reference));
        for k in a.keys().chain(b.keys()) {
            assert_eq!(a.get(k), b.get(k), "{name}: {k:?} (merged, direct)");
        }
        assert_eq!(
            (summary.layers_merged, summary.layers_direct),
            (layers.len() - direct, direct),
            "{name}: layers merged, applied directly"
        );
        let left: Vec<_> = std::fs::read_dir(&top)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, ["rootfs"], "{name}: staging trees left");
    }

    /// Files at long paths (GNU long names), one layer.
    fn long_paths(paths: &[String]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for p in paths {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(T);
            h.set_size(4);
            b.append_data(&mut h, p, &b"deep"[..])
                .expect("tar into memory");
        }
        b.into_inner().expect("tar into memory")
    }

    /// A whiteout file with data (umoci and containerd ignore it) is a whiteout like any
    /// other, however much data it has: the tar reader skips the data on its way to the
    /// next header (red when that went through the headers' budget alone: "tar extension
    /// headers ... larger than" for 4 MiB of data).
    #[test]
    fn a_whiteout_with_data_is_a_whiteout() {
        let data = vec![7u8; 4 << 20];
        check(
            "whiteout with data",
            &[
                vec![f("x", b"x"), f("y", b"y")],
                vec![f(".wh.x", &data), f("z", b"z")],
            ],
            0,
        );
    }

    /// A layer with a path deeper than `MAX_STAGED_DEPTH` components is applied directly,
    /// not staged: staging keeps every directory by its whole path, which costs the square
    /// of the depth (red without the bound: the layer was merged, and the trees differed).
    #[test]
    fn a_layer_with_a_very_deep_path_is_applied_directly() {
        let deepest = format!("{}f", "a/".repeat(MAX_STAGED_DEPTH));
        staged_or_not("deepest", long_paths(&[deepest]), 1);
    }

    /// Staging stops (the layer is then applied directly) once its records hold more than
    /// `MAX_STAGED_COMPONENTS` path components: a few KB of tar naming deep paths under
    /// different tops would otherwise take GBs (red without the count: all 80 recorded).
    #[test]
    fn staging_records_are_bounded() {
        use crate::unpack::targuard::{Kind, Meta, Time};
        let mut stage = super::Stage::default();
        let mut tainted = None;
        for i in 0..80 {
            let path = format!("d{i}/{}f", "a/".repeat(MAX_STAGED_DEPTH - 2));
            let comps = super::resolve::clean(path.as_bytes()).expect("clean");
            let m = Meta {
                kind: Kind::File,
                path: path.into_bytes(),
                link: Vec::new(),
                size: 0,
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: Time { sec: 0, nsec: 0 },
                atime: None,
                dev_major: 0,
                dev_minor: 0,
                xattrs: Vec::new(),
            };
            if let Err(super::Fail::Taint(why)) = stage.entry(&comps, &m) {
                tainted = Some((i, why));
                break;
            }
        }
        let (i, why) = tainted.expect("80 deep paths were all recorded");
        assert!(why.contains("components in all"), "{why}");
        // 254 levels cost about 32,000 components each.
        assert!((60..=70).contains(&i), "tainted at entry {i}");
    }

    /// Unpacks a base layer and `upper` both ways (see [`same_both_ways`]).
    fn staged_or_not(name: &str, upper: Vec<u8>, direct: usize) {
        let dir = tempfile::tempdir().expect("temp dir");
        let layers = layers_of(dir.path(), name, vec![tar(&[f("base", b"b")]), upper]);
        same_both_ways(name, dir.path(), 0, &layers, Options::detect(), direct);
    }

    /// The tar streams `tars`, bottom first, as uncompressed layers in files under `dir`.
    fn layers_of(dir: &Path, name: &str, tars: Vec<Vec<u8>>) -> Vec<Layer> {
        tars.into_iter()
            .enumerate()
            .map(|(i, t)| {
                let path = dir.join(format!("blob-{i}"));
                std::fs::write(&path, &t).expect("write blob");
                Layer {
                    digest: Digest::of(format!("{name} {i}").as_bytes()),
                    media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                    path,
                    diff_id: Digest::of(&t),
                }
            })
            .collect()
    }

    #[test]
    fn merged_layers_give_the_direct_apply_tree() {
        let base = vec![
            d("d/", 0o755, T + 1),
            f("d/a", b"a"),
            f("d/b", b"b"),
            d("d/s/", 0o750, T + 2),
            f("d/s/old", b"old"),
            d("target/", 0o755, T + 3),
            f("target/f", b"f"),
            sl("link", "target"),
            sl("s", "x"),
            d("dd/", 0o755, T + 4),
            f("dd/f", b"f"),
            f("file", b"lower"),
            hl("file-link", "file"),
            d("p/", 0o711, T + 5),
            f("p/a", b"a"),
        ];
        let merged = |upper: Vec<E<'static>>| vec![base.clone(), upper];
        // Merged.
        check(
            "whiteout after its re-creation",
            &merged(vec![
                d("d/", 0o700, T + 10),
                f("d/y", b"y"),
                f(".wh.d", b""),
            ]),
            1,
        );
        check(
            "whiteout before its re-creation",
            &merged(vec![
                f(".wh.d", b""),
                d("d/", 0o700, T + 10),
                f("d/y", b"y"),
            ]),
            0,
        );
        check(
            "opaque after an explicit subdirectory",
            &merged(vec![
                d("d/", 0o755, T + 10),
                d("d/s/", 0o700, T + 11),
                f("d/s/new", b"n"),
                f("d/.wh..wh..opq", b""),
                f("d/later", b"l"),
            ]),
            1,
        );
        check(
            "opaque before an explicit subdirectory",
            &merged(vec![
                d("d/", 0o755, T + 10),
                f("d/.wh..wh..opq", b""),
                d("d/s/", 0o700, T + 11),
                f("d/s/new", b"n"),
                f("d/later", b"l"),
            ]),
            0,
        );
        check(
            "directory over a symlink, file over a symlink, symlink over a directory",
            &merged(vec![
                d("link/", 0o755, T + 10),
                f("link/g", b"g"),
                f("s", b"now a file"),
                sl("dd", "/"),
            ]),
            0,
        );
        check(
            "root entry, hard links within the layer over a lower hard-linked file",
            &merged(vec![
                d("./", 0o700, T + 20),
                f("file", b"upper"),
                hl("file2", "file"),
                d("p/", 0o555, T + 21),
                f("p/b", b"b"),
                d("ro/", 0o500, T + 22),
                f("ro/x", b"x"),
            ]),
            0,
        );
        check(
            "implicit lower directories kept, plain whiteouts of files and directories",
            &merged(vec![f("d/s/c", b"c"), f("d/.wh.a", b""), f(".wh.dd", b"")]),
            0,
        );
        // Applied directly (tainted).
        check(
            "implicit directory through a lower symlink",
            &merged(vec![f("link/g", b"g")]),
            1,
        );
        check(
            "directory header after its entries",
            &merged(vec![f("link/g", b"g"), d("link/", 0o700, T + 10)]),
            1,
        );
        check(
            "hard link to a lower layer's file",
            &merged(vec![hl("again", "file")]),
            1,
        );
        check(
            "an entry replaced within the layer",
            &merged(vec![f("n", b"1"), d("n/", 0o755, T + 10), f("n/x", b"x")]),
            1,
        );
        check(
            "whiteout of a directory made only as a parent",
            &merged(vec![f("p/b", b"b"), f(".wh.p", b"")]),
            1,
        );
        check(
            "opaque directory with an implicit directory beneath",
            &merged(vec![
                d("d/", 0o755, T + 10),
                f("d/.wh..wh..opq", b""),
                f("d/s/new", b"n"),
            ]),
            1,
        );
        check(
            "whiteout in a directory the layer did not make",
            &merged(vec![f("target/.wh.f", b"")]),
            1,
        );
        // Several layers: merged ones after direct ones.
        check(
            "merged after direct",
            &[
                base.clone(),
                vec![hl("again", "file")],
                vec![f(".wh.again", b""), d("d/", 0o700, T + 30)],
                vec![f("link/g", b"g")],
                vec![f("target/g", b"replaced"), f(".wh.s", b"")],
            ],
            2,
        );
    }
}
