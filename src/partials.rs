//! Partial downloads found from any destination: a per-user index of the resumable pairs
//! (`<hex>.partial` + `<hex>.journal`, see [`crate::resume`]) that destinations hold, so a
//! pull into another directory that needs the same blob continues it instead of starting
//! over (a pull stopped in `./a`, then the same image, or another one sharing the layer,
//! pulled into `./b`).
//!
//! The index is a directory, `$XDG_STATE_HOME/fastpull/partials` (else
//! `~/.local/state/fastpull/partials`), of symbolic links: `<hex>.<key>` → the scratch
//! directory of the destination that holds the pair, `<key>` naming that directory. A link
//! is made when a blob's journal is created and removed once the blob is verified or taken
//! over; one whose pair went otherwise (discarded, or never kept) is removed when a later
//! pull finds it gone. The index directory is the user's own (mode 0700; one owned by
//! someone else, or a symlink, is not used). A link is only a hint, and everything it points
//! at is checked again:
//!
//! - the other destination is locked (without waiting) while its pair is taken: a pull still
//!   running there keeps its files;
//! - its scratch directory must be a real directory (not a symlink) of this user that no one
//!   else may write to, and the pair regular files of this user; the moves are made from that
//!   opened directory (`renameat`), so nothing can be swapped in between the check and the
//!   move;
//! - the pair moves by two renames on one filesystem (partial first, then journal: a stop
//!   between them leaves an unpaired file on each side, which each destination's sweep
//!   removes, never a journal beside another file). Across filesystems nothing is moved;
//! - the moved journal is then read like any other ([`crate::resume::Journal::load`]): its
//!   header must name this blob and size, each record must check, and the blob is hashed
//!   whole before it gets its final name.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::digest::Digest;

/// The index directory (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct Index {
    dir: PathBuf,
}

/// Blobs smaller than this are not indexed: refetching them costs less than the bookkeeping.
pub(crate) const MIN_SIZE: u64 = 1 << 20;

impl Index {
    /// The user's index: `$XDG_STATE_HOME/fastpull/partials`, else
    /// `$HOME/.local/state/fastpull/partials`; `None` if neither is set (or not absolute).
    pub(crate) fn for_user() -> Option<Index> {
        let var = |k: &str| {
            std::env::var_os(k)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        let state =
            var("XDG_STATE_HOME").or_else(|| var("HOME").map(|h| h.join(".local/state")))?;
        Some(Index {
            dir: state.join("fastpull").join("partials"),
        })
    }

    /// Whether the index directory may be used: absent, or a directory (not a symlink) of
    /// this user.
    fn usable(&self) -> bool {
        match std::fs::symlink_metadata(&self.dir) {
            Ok(m) => m.is_dir() && m.uid() == rustix::process::geteuid().as_raw(),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }

    /// An index in `dir` (tests).
    #[cfg(test)]
    pub(crate) fn at(dir: PathBuf) -> Index {
        Index { dir }
    }

    /// The link for `digest` held in `scratch`.
    fn link(&self, digest: &Digest, scratch: &Path) -> PathBuf {
        let key = Digest::of(scratch.as_os_str().as_encoded_bytes());
        self.dir
            .join(format!("{}.{}", digest.hex(), &key.hex()[..16]))
    }

    /// Records that `scratch` (absolute) holds, or is about to hold, `digest`'s pair. Best
    /// effort: an index that cannot be written only loses the hint.
    pub(crate) fn note(&self, digest: &Digest, scratch: &Path) {
        let link = self.link(digest, scratch);
        if std::fs::read_link(&link).is_ok_and(|t| t == scratch) {
            return;
        }
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = link.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = link.with_file_name(format!(
            "{}.{}.{}.tmp",
            name.unwrap_or_default(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let made = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .and_then(|()| {
                if !self.usable() {
                    return Err(std::io::Error::other("not this user's directory"));
                }
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(scratch, &tmp)
            })
            .and_then(|()| std::fs::rename(&tmp, &link));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(index = %self.dir.display(), error = %e, "cannot index a partial download");
        }
    }

    /// Forgets that `scratch` holds `digest`'s pair (it was verified, or moved, or dropped).
    pub(crate) fn forget(&self, digest: &Digest, scratch: &Path) {
        let _ = std::fs::remove_file(self.link(digest, scratch));
    }

    /// Moves a pair for `digest` that another destination holds into `into` (this
    /// destination's scratch directory), as `partial` and `journal` there. Returns the
    /// directory it came from, `None` if no other destination could give one.
    pub(crate) fn take(
        &self,
        digest: &Digest,
        into: &Path,
        partial: &Path,
        journal: &Path,
    ) -> Option<PathBuf> {
        if !self.usable() {
            return None;
        }
        let prefix = format!("{}.", digest.hex());
        let links: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with(&prefix) && !n.ends_with(".tmp")
            })
            .map(|e| e.path())
            .collect();
        let here = std::fs::metadata(into).ok()?;
        for link in links {
            let Ok(scratch) = std::fs::read_link(&link) else {
                continue;
            };
            if scratch == into {
                continue;
            }
            match take_from(&scratch, digest, &here, partial, journal) {
                Taken::Moved => {
                    let _ = std::fs::remove_file(&link);
                    return Some(scratch);
                }
                Taken::Gone => {
                    let _ = std::fs::remove_file(&link);
                }
                Taken::Busy => {}
            }
        }
        None
    }
}

/// What became of one candidate.
enum Taken {
    Moved,
    /// No pair there (any more): the link can go.
    Gone,
    /// In use by a running pull, or on another filesystem: left alone.
    Busy,
}

fn take_from(
    scratch: &Path,
    digest: &Digest,
    here: &std::fs::Metadata,
    partial: &Path,
    journal: &Path,
) -> Taken {
    let Some(root) = scratch.parent() else {
        return Taken::Gone;
    };
    let partial_name = format!("{}.partial", digest.hex());
    let journal_name = format!("{}.journal", digest.hex());
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let Ok(lock) = File::open(root) else {
        return Taken::Gone;
    };
    // The other destination's own lock (see crate::layout): a pull running there keeps it.
    if lock.try_lock().is_err() {
        return Taken::Busy;
    }
    let Ok(from) = rustix::fs::open(scratch, dir_flags, Mode::empty()) else {
        return Taken::Gone;
    };
    let me = rustix::process::geteuid().as_raw();
    let Ok(st) = rustix::fs::fstat(&from) else {
        return Taken::Gone;
    };
    // Only a directory no one else may write to: its entries cannot change under us.
    if st.st_uid != me || st.st_mode & 0o022 != 0 || st.st_dev != here.dev() {
        return Taken::Busy;
    }
    let ours = |name: &str| {
        rustix::fs::statat(&from, name, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|m| {
            FileType::from_raw_mode(m.st_mode) == FileType::RegularFile && m.st_uid == me
        })
    };
    if !ours(&partial_name) || !ours(&journal_name) {
        return Taken::Gone;
    }
    let (Some(into), Some(partial_to), Some(journal_to)) =
        (partial.parent(), partial.file_name(), journal.file_name())
    else {
        return Taken::Busy;
    };
    let Ok(to) = rustix::fs::open(into, dir_flags, Mode::empty()) else {
        return Taken::Busy;
    };
    // Partial first: a stop before the journal follows leaves no journal beside a file it
    // does not describe.
    let _ = rustix::fs::unlinkat(&to, journal_to, AtFlags::empty());
    if rustix::fs::renameat(&from, partial_name.as_str(), &to, partial_to).is_err() {
        return Taken::Busy;
    }
    if rustix::fs::renameat(&from, journal_name.as_str(), &to, journal_to).is_err() {
        return Taken::Gone;
    }
    let _ = rustix::fs::fsync(&from);
    let _ = rustix::fs::fsync(&to);
    Taken::Moved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(scratch: &Path, d: &Digest, body: &[u8]) {
        std::fs::create_dir_all(scratch).unwrap();
        std::fs::write(scratch.join(format!("{}.partial", d.hex())), body).unwrap();
        std::fs::write(scratch.join(format!("{}.journal", d.hex())), b"j").unwrap();
    }

    #[test]
    fn a_pair_moves_to_the_destination_that_asks_unless_its_own_is_locked() {
        let t = tempfile::tempdir().unwrap();
        let index = Index::at(t.path().join("index"));
        let d = Digest::of(b"blob");
        let a = t.path().join("a/.fastpull-tmp");
        let b = t.path().join("b/.fastpull-tmp");
        pair(&a, &d, b"partial bytes");
        std::fs::create_dir_all(&b).unwrap();
        index.note(&d, &a);
        let into = |s: &Path| {
            (
                s.join(format!("{}.partial", d.hex())),
                s.join(format!("{}.journal", d.hex())),
            )
        };
        let (bp, bj) = into(&b);

        // Held: the pull running in a keeps its files.
        let held = File::open(t.path().join("a")).unwrap();
        held.lock().unwrap();
        assert_eq!(index.take(&d, &b, &bp, &bj), None);
        assert!(into(&a).0.exists() && !bp.exists());
        drop(held);

        // Another blob's link does not match.
        assert_eq!(index.take(&Digest::of(b"other"), &b, &bp, &bj), None);

        assert_eq!(index.take(&d, &b, &bp, &bj).as_deref(), Some(a.as_path()));
        assert_eq!(std::fs::read(&bp).unwrap(), b"partial bytes");
        assert_eq!(std::fs::read(&bj).unwrap(), b"j");
        assert!(!into(&a).0.exists() && !into(&a).1.exists());
        // The link went with the pair; nothing is left to take.
        assert_eq!(index.take(&d, &b, &bp, &bj), None);
        assert_eq!(
            std::fs::read_dir(t.path().join("index")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_pair_others_could_change_or_a_symlink_is_never_taken() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let index = Index::at(t.path().join("index"));
        let d = Digest::of(b"blob");
        let b = t.path().join("b/.fastpull-tmp");
        std::fs::create_dir_all(&b).unwrap();
        let (bp, bj) = (b.join("p"), b.join("j"));

        // A scratch directory anyone may write to: its entries could be swapped.
        let a = t.path().join("a/.fastpull-tmp");
        pair(&a, &d, b"x");
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o777)).unwrap();
        index.note(&d, &a);
        assert_eq!(index.take(&d, &b, &bp, &bj), None);
        assert!(a.join(format!("{}.partial", d.hex())).exists() && !bp.exists());

        // A partial that is a symlink (to a file elsewhere): not a pair.
        let c = t.path().join("c/.fastpull-tmp");
        std::fs::create_dir_all(&c).unwrap();
        let elsewhere = t.path().join("elsewhere");
        std::fs::write(&elsewhere, b"not ours to write").unwrap();
        std::os::unix::fs::symlink(&elsewhere, c.join(format!("{}.partial", d.hex()))).unwrap();
        std::fs::write(c.join(format!("{}.journal", d.hex())), b"j").unwrap();
        index.forget(&d, &a);
        index.note(&d, &c);
        assert_eq!(index.take(&d, &b, &bp, &bj), None);
        assert!(!bp.exists());
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"not ours to write");

        // An index directory that is a symlink is not used.
        let real = t.path().join("real-index");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, t.path().join("linked")).unwrap();
        let linked = Index::at(t.path().join("linked"));
        linked.note(&d, &a);
        assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);
    }

    #[test]
    fn a_link_to_nothing_is_dropped_and_a_forgotten_pair_is_not_found() {
        let t = tempfile::tempdir().unwrap();
        let index = Index::at(t.path().join("index"));
        let d = Digest::of(b"blob");
        let a = t.path().join("a/.fastpull-tmp");
        let b = t.path().join("b/.fastpull-tmp");
        std::fs::create_dir_all(&b).unwrap();
        let (bp, bj) = (b.join("p"), b.join("j"));
        // Indexed, but the pair is gone (completed there since).
        std::fs::create_dir_all(&a).unwrap();
        index.note(&d, &a);
        assert_eq!(index.take(&d, &b, &bp, &bj), None);
        assert_eq!(
            std::fs::read_dir(t.path().join("index")).unwrap().count(),
            0
        );
        // Forgotten: never taken.
        pair(&a, &d, b"x");
        index.note(&d, &a);
        index.forget(&d, &a);
        assert_eq!(index.take(&d, &b, &bp, &bj), None);
        assert!(a.join(format!("{}.partial", d.hex())).exists());
    }
}
