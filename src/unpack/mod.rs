//! `--format rootfs`: the image's root filesystem, unpacked as `umoci unpack` would, from
//! verified blobs, into a private tree that becomes `ROOTFS` only once every layer is in.
//!
//! # Pipeline
//!
//! The blobs are fetched and verified by the ordinary pull into a scratch OCI layout inside
//! a staging directory beside the destination, `ROOTFS/../.NAME.fastpull-XXXX/` (mode 0700,
//! same filesystem), and the layers are unpacked *while they download*, all at once: a
//! blocking task ([`unpack_streaming`]) waits for the config's fetch to verify it (its
//! `rootfs.diff_ids` are trusted only then), then unpacks the bottom layer into
//! `STAGING/rootfs` (the merged tree) and starts a thread for every other layer (at most 16
//! at a time, in layer order) that unpacks it alone into its own tree, `STAGING/staged-N`,
//! each as soon as its first bytes are written:
//!
//! ```text
//! blob's contiguous written prefix (PrefixReader, blocks for more)
//!   → BufReader → gzip (flate2 MultiGzDecoder, zlib-rs) | zstd | plain
//!   → Ratio (at most 1100 bytes out per compressed byte in: decompression bombs)
//!                                                       [all this on a thread of its own]
//!   → Hashed (sha256 of the tar: the diff_id)           [on another]
//!   → Budget (bounds tar extension headers)
//!   → tar::Archive (a parser only) → Engine::apply, entry by entry, into its tree
//! ```
//!
//! Reading and decompressing run on one thread per layer, hashing on a second, ahead of the
//! parser and the writes on a third by up to 7 pieces of 256 KiB of the layer's own and
//! what a 32 MiB reserve shared by the layers lends ([`decompress::Hashed`]): on one thread
//! the unpack of a 1 GiB layer lagged a loopback download by up to a second, and with the
//! stages a few pieces apart, each stalled whenever another was off a core.
//!
//! The reader ([`crate::prefix::PrefixReader`]) is an in-order consumer of the blob beside
//! its hasher: it reads the bytes the fetch has written without a gap, through the blob's
//! map, and never holds the download back (a slow unpack leaves the bytes in the file).
//! Each layer's diff_id is compared once its stream is read to the end (trailing bytes
//! included, as umoci hashes them). Then, in layer order, once a layer's blob is verified
//! (its compressed digest: the fetch's check), its diff_id matched and the layers below
//! are in, its tree is merged onto `STAGING/rootfs` by renames of whole subtrees, never
//! copies ([`merge`](self::merge), DESIGN.md §4). A layer whose result would depend on the
//! layers below in a way its own tree cannot show (a hard link to a lower layer's file, a
//! directory made only as a parent where a lower layer has a symlink, …: the taint rules
//! in [`merge`](self::merge)) is instead applied directly onto the merged tree, entry by
//! entry, from its verified blob file. So a small layer never waits for a large one below
//! it, and little is left to do after the last byte.
//!
//! What a stream read is trusted for: a layer that fails (bad tar, diff_id mismatch) while
//! its blob is still unverified fails the pull only once that same fetch verifies. If the
//! fetch does not verify (it is fetched again: a repair), or a blob is fetched again after
//! the reader consumed part of it, the streamed trees are thrown away and, once every blob
//! is verified, built again (staged and merged the same way) from the verified blob files
//! into a fresh tree (the simplest correct choice; repairs are rare). The last step (directory modes, rootless) waits until
//! every layer's blob is verified.
//!
//! Nothing becomes visible before every blob's digest and every layer's diff_id are
//! verified. A mismatch, a malformed or hostile layer, a network error, Ctrl-C, or any
//! other failure removes the staging directory: `ROOTFS` is left as it was (a new one never
//! appears). Once all layers are in, `STAGING/rootfs` is renamed to `ROOTFS`
//! (`RENAME_NOREPLACE`; or `RENAME_EXCHANGE` with an existing *empty* directory, which is
//! then removed; a non-empty one is refused before anything is fetched). The blobs are
//! deleted with the staging directory (they are not kept).
//!
//! # Safety against hostile layers
//!
//! No entry can create, follow or modify anything outside the tree
//! ([`resolve`](self::resolve)):
//! - every directory an entry touches is opened from the root's fd with
//!   `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`, or a component
//!   walk with `O_NOFOLLOW` that resolves symlinks itself, clamped at the root, where openat2
//!   is missing. Absolute symlinks and `..` resolve as if the root were `/`, as in umoci;
//! - every change is one `*at()` call on that directory fd and a plain name: `openat(O_EXCL |
//!   O_NOFOLLOW)`, `mkdirat`, `symlinkat`, `linkat` (targets resolved the same way), `mknodat`,
//!   `unlinkat`; metadata through the new file's fd or with `AT_SYMLINK_NOFOLLOW`;
//! - removal (replacing, whiteouts) walks directories by fd and never follows a symlink.
//!
//! So `../x` and `/x` land inside the root (as umoci's `CleanPath` makes them), a symlink to
//! `/` or `..` followed by `link/x` writes beneath the root, a symlink replaced by a
//! same-name directory is removed rather than followed, and hard links to `/etc/passwd` or
//! `../../x` link to what those names mean inside the root (or fail if there is nothing).
//! Whiteouts of `.wh.`, `.wh..` and `.wh...` (which would name the parent) are refused. The
//! tar crate is used only as a parser; where it and Go's archive/tar would read an archive
//! differently the layer is refused ([`targuard`](self::targuard)). Bounds: extension headers
//! (GNU long names, PAX) 1 MiB each, 10 M entries a layer, paths of 4096 bytes and names of
//! 255, 40 symlinks per path, and declared file sizes against the filesystem's free space.
//!
//! # Semantics (umoci's `UnpackEntry`)
//!
//! Entry by entry, in archive order:
//! - the path is cleaned as umoci's `CleanPath` does; `./` changes the root's metadata and
//!   must be a directory;
//! - `.wh.NAME` removes NAME, `.wh..wh..opq` empties its directory, except what this layer
//!   itself wrote (and the directories above it): umoci's "upper paths". A missing target is
//!   fine; the whiteout itself is never created;
//! - missing parent directories are made with mode 0777 less the umask, owned by us, with
//!   the current time (as umoci's `MkdirAll`);
//! - whatever is at the path is removed, unless a directory meets a directory (they merge);
//! - then the file, directory, symlink (target verbatim), hard link (to an entry of this
//!   layer or one below), fifo or device node is made;
//! - metadata in umoci's order: owner (`chown`, which clears setuid/setgid and
//!   security.capability), then mode, then xattrs (`SCHILY.xattr.*`; `security.selinux` and
//!   `system.nfs4_acl` are never set; a directory merged over another gets exactly the new
//!   entry's), then atime/mtime to the nanosecond. Hard links get none;
//! - the parent directory's times are put back: adding or removing a child does not change
//!   a directory that came from the image.
//!
//! The root is made 0755, root:root, with mtime at the epoch unless a `./` entry says
//! otherwise, as umoci does.
//!
//! # Root and rootless
//!
//! As root (and not in a user namespace) ownership is set from the tar headers and device
//! nodes are made. Otherwise this is umoci's rootless mode (`umoci unpack --rootless`):
//! - no chown; an owner other than root:root is recorded in the xattr
//!   `user.rootlesscontainers` (protobuf `Resource{uid, gid}`, 0 written as `NoopID`), and a
//!   `user.rootlesscontainers` a layer brings is dropped;
//! - device nodes become empty regular files with the node's permissions (umoci's
//!   behaviour, kept so that both give the same tree; the count is logged in one line);
//! - xattrs the kernel refuses (`trusted.*`, `security.capability`) are skipped;
//! - directories keep u+rwx until every layer is in, then get their mode.
//!
//! In a user namespace as root, ownership is still set, but devices are emulated and
//! refused xattrs skipped, as umoci does there.
//!
//! # Differences from umoci 0.4.7
//!
//! - A PAX global header (`g`) is skipped (containerd's behaviour); umoci refuses the layer.
//! - Layers that Go's and tar-rs' readers would see differently are refused (see
//!   [`targuard`](self::targuard)); so are whiteouts naming `.`, `..` or nothing (umoci would
//!   remove the parent directory of `.wh..`).
//! - A missing parent whose path crosses a non-directory is an error (newer umoci replaces
//!   the non-directory).
//! - A symlink entry counts as an upper path itself (umoci counts where it points).
//! - umoci checks diff_ids only after unpacking; here they are checked before the tree
//!   becomes visible.

mod apply;
mod decompress;
#[cfg(feature = "bench-internals")]
pub use decompress::layer_stream;
mod merge;
mod resolve;
mod session;
mod targuard;

pub(crate) use decompress::DEFAULT_MAX_RATIO;
pub(crate) use session::Session;

use std::io::{self, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{Mode, OFlags, RenameFlags, Timestamps};
use rustix::io::Errno;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::prefix::{PrefixReader, PrefixWatch, Source, Watchers};
use crate::write::parent_dir;

/// How ownership and device nodes are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Options {
    /// No chown; ownership goes into `user.rootlesscontainers` (not root).
    pub(crate) rootless: bool,
    /// Device nodes become empty files, refused xattrs are skipped (not root, or in a user
    /// namespace).
    pub(crate) partial_rootless: bool,
    /// Most tar bytes per compressed byte (decompression bombs; 0: no bound).
    pub(crate) max_ratio: u64,
}

impl Options {
    /// Root outside a user namespace: everything as in the image. Otherwise rootless
    /// (not root) or partly so (root in a user namespace).
    pub(crate) fn detect() -> Options {
        let root = rustix::process::geteuid().is_root();
        let userns = in_user_namespace();
        Options {
            rootless: !root,
            partial_rootless: !root || userns,
            max_ratio: decompress::DEFAULT_MAX_RATIO,
        }
    }
}

/// Whether this process runs in a user namespace (its uid map is not the identity over
/// all ids), as runc's `RunningInUserNS`.
fn in_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let f: Vec<&str> = map.split_whitespace().collect();
            !(f.len() == 3 && f[0] == "0" && f[1] == "0" && f[2] == "4294967295")
        }
        Err(_) => false,
    }
}

/// Why unpacking failed, before the layer's digest and the entry are added.
#[derive(Debug)]
pub(crate) enum Fail {
    /// The layer is malformed or hostile.
    Bad(String),
    /// A filesystem operation failed.
    Io(&'static str, io::Error),
    /// The layer's bytes could not be read (decompression, truncation).
    Read(io::Error),
    /// Staging: the entry's result would depend on the layers below; the layer is to be
    /// applied directly instead (why). Never an error of its own.
    Taint(String),
}

impl Fail {
    fn io(op: &'static str) -> impl Fn(io::Error) -> Fail {
        move |e| Fail::Io(op, e)
    }

    fn io_e(op: &'static str) -> impl Fn(Errno) -> Fail {
        move |e| Fail::Io(op, e.into())
    }

    fn into_error(self, layer: &Digest, entry: Option<&[u8]>) -> Error {
        let entry = entry.map(targuard::show);
        match self {
            Fail::Bad(reason) => Error::Layer {
                layer: *layer,
                entry,
                reason,
            },
            Fail::Read(e) => Error::Layer {
                layer: *layer,
                entry,
                reason: format!("cannot read the layer: {e}"),
            },
            Fail::Taint(why) => Error::Internal(format!(
                "layer {layer}: staging's taint reached the direct apply ({why})"
            )),
            Fail::Io(op, source) => Error::Unpack {
                layer: *layer,
                entry: entry.unwrap_or_default(),
                op,
                source,
            },
        }
    }
}

/// One layer to apply: a verified blob file.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    /// The blob's digest (verified by the fetch).
    pub(crate) digest: Digest,
    /// Its media type, as the manifest gives it.
    pub(crate) media_type: String,
    /// The verified blob on disk.
    pub(crate) path: PathBuf,
    /// Its diff_id from the config (sha256 of the uncompressed tar).
    pub(crate) diff_id: Digest,
}

/// What unpacking did (`--format rootfs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnpackSummary {
    /// Layers applied.
    pub layers: usize,
    /// Of those, layers unpacked into a tree of their own (in parallel, as they
    /// downloaded) and merged in order by renames; the bottom layer's tree is the merged
    /// tree itself, and counts here.
    pub layers_merged: usize,
    /// Of those, layers applied entry by entry onto the merged tree from their verified
    /// blob, because their result depends on the layers below in a way a tree of their
    /// own cannot show (a hard link to a lower layer's file, a whiteout of a directory
    /// they only made as a parent, …).
    pub layers_direct: usize,
    /// Tar entries applied (whiteouts included).
    pub entries: u64,
    /// Device nodes written as empty regular files (rootless, or in a user namespace).
    pub devices_emulated: u64,
    /// xattrs the filesystem or our privileges refused, skipped.
    pub xattrs_skipped: u64,
}

/// The diff_ids of an image config (`rootfs.diff_ids`).
pub(crate) fn diff_ids(config: &[u8], what: &str) -> Result<Vec<Digest>> {
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<Digest>,
    }
    let c: Config = serde_json::from_slice(config).map_err(|e| Error::InvalidManifest {
        what: what.to_string(),
        reason: format!("image config without usable rootfs.diff_ids: {e}"),
    })?;
    Ok(c.rootfs.diff_ids)
}

/// What applying one layer did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Applied {
    /// Tar entries applied (whiteouts included).
    pub(crate) entries: u64,
    /// Bytes of the uncompressed tar (what its diff_id covers).
    pub(crate) bytes: u64,
}

/// Why a streaming unpack ([`unpack_streaming`]) did not finish.
#[derive(Debug)]
pub(crate) enum StreamEnd {
    /// The image cannot be unpacked (its verified bytes say so), or the disk failed.
    Failed(Error),
    /// The stream cannot be trusted or was stopped (a blob it read was fetched again, or
    /// the pull stopped following): unpack again from the verified blobs, if the pull goes
    /// on.
    Fallback(String),
}

impl From<Error> for StreamEnd {
    fn from(e: Error) -> StreamEnd {
        StreamEnd::Failed(e)
    }
}

/// Makes `root` (which must not exist) the root of a new tree and applies `layers` in
/// order from their verified blob files (each above the bottom one staged alone in
/// parallel, then merged). Blocking. Stops early once `cancel` is set. `on_layer` hears of
/// each layer once it is in (index, layer, what it did), `on_staged` of each staged tree.
pub(crate) fn unpack(
    root: &Path,
    layers: &[Layer],
    opts: Options,
    cancel: &Arc<AtomicBool>,
    on_layer: &mut dyn FnMut(usize, &Layer, Applied),
    on_staged: &(dyn Fn(usize, &Layer, Applied) + Sync),
) -> Result<UnpackSummary> {
    match unpack_layers(root, layers, opts, cancel, Feed::Files, on_layer, on_staged) {
        Ok(summary) => Ok(summary),
        Err(StreamEnd::Failed(e)) => Err(e),
        Err(StreamEnd::Fallback(why)) => Err(Error::Internal(why)),
    }
}

/// As [`unpack`], but each layer is read while it downloads: from a [`PrefixReader`] that
/// follows its fetch (or its file, if it was verified before the pull). The config is
/// read once its fetch has verified it. A layer that fails while its blob is not yet
/// verified is a failure only if that fetch then verifies; if the blob is fetched again
/// (its bytes did not match), or was fetched again after part of it was read, the stream
/// ends with [`StreamEnd::Fallback`]: the caller unpacks from the verified files instead.
#[allow(clippy::too_many_arguments)]
pub(crate) fn unpack_streaming(
    root: &Path,
    manifest_layers: &[(Digest, String)],
    config: &Arc<PrefixWatch>,
    watchers: &Watchers,
    opts: Options,
    cancel: &Arc<AtomicBool>,
    on_layer: &mut dyn FnMut(usize, &Layer, Applied),
    on_staged: &(dyn Fn(usize, &Layer, Applied) + Sync),
) -> std::result::Result<UnpackSummary, StreamEnd> {
    if let Err(e) = config.wait_verified(cancel) {
        return Err(StreamEnd::Fallback(e.to_string()));
    }
    let path = config.path();
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let what = format!("config {}", config.digest());
    let ids = diff_ids(&bytes, &what)?;
    if ids.len() != manifest_layers.len() {
        return Err(StreamEnd::Failed(Error::InvalidManifest {
            what,
            reason: format!(
                "the manifest lists {} layers, the config {} diff_ids",
                manifest_layers.len(),
                ids.len()
            ),
        }));
    }
    let mut layers = Vec::with_capacity(ids.len());
    for ((digest, media_type), diff_id) in manifest_layers.iter().zip(ids) {
        let watch = watchers
            .get(digest)
            .ok_or_else(|| Error::Internal(format!("layer {digest} is not followed")))?;
        layers.push(Layer {
            digest: *digest,
            media_type: media_type.clone(),
            path: watch.path().to_path_buf(),
            diff_id,
        });
    }
    unpack_layers(
        root,
        &layers,
        opts,
        cancel,
        Feed::Following(watchers),
        on_layer,
        on_staged,
    )
}

/// Where the layers' bytes come from.
#[derive(Clone, Copy)]
enum Feed<'a> {
    /// Each layer's fetch, followed as it is written (or its file, verified before).
    Following(&'a Watchers),
    /// The verified blob files.
    Files,
}

/// The fetch a layer's bytes were read from (which one), when they were not verified yet.
type Followed = Option<(Arc<PrefixWatch>, u32)>;

impl Feed<'_> {
    /// The bytes of `layer`, from the start.
    fn open(
        self,
        layer: &Layer,
        cancel: &Arc<AtomicBool>,
    ) -> std::result::Result<(Box<dyn Read + Send>, Followed), StreamEnd> {
        let file =
            |path: &Path| -> std::result::Result<(Box<dyn Read + Send>, Followed), StreamEnd> {
                let f = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
                Ok((Box::new(f), None))
            };
        let Feed::Following(watchers) = self else {
            return file(&layer.path);
        };
        let watch = watchers
            .get(&layer.digest)
            .ok_or_else(|| Error::Internal(format!("layer {} is not followed", layer.digest)))?;
        match PrefixReader::open(watch, cancel.clone()) {
            Err(e) => Err(StreamEnd::Fallback(e.to_string())),
            Ok(Source::Verified(path)) => file(&path),
            Ok(Source::Following(reader)) => {
                let followed = Some((reader.watch().clone(), reader.generation()));
                Ok((Box::new(reader), followed))
            }
        }
    }

    /// Blocks until `layer`'s blob is verified and what was read of it is trusted (no
    /// fetch of it was opened again after its reader had read part of one).
    fn trusted(self, layer: &Layer, cancel: &AtomicBool) -> std::result::Result<(), StreamEnd> {
        let Feed::Following(watchers) = self else {
            return Ok(());
        };
        if let Some(w) = watchers.get(&layer.digest) {
            w.wait_verified(cancel)
                .map_err(|e| StreamEnd::Fallback(e.to_string()))?;
        }
        if watchers.restarted_under_reader() {
            return Err(StreamEnd::Fallback(
                "a layer was fetched again after part of it had been unpacked".into(),
            ));
        }
        Ok(())
    }
}

/// A layer's failure `e` judged: its own if its bytes were the blob's (verified), else
/// the stream is not to be trusted.
fn judged(e: Error, followed: &Followed, layer: &Layer, cancel: &AtomicBool) -> StreamEnd {
    match followed {
        Some((watch, generation)) if !watch.settled(*generation, cancel) => {
            StreamEnd::Fallback(format!(
                "layer {}: read from a fetch that did not verify, or stopped ({e})",
                layer.digest
            ))
        }
        _ => StreamEnd::Failed(e),
    }
}

/// Layers staged at once, at most (each is a blocking thread, most of them waiting for
/// bytes).
const MAX_STAGING: usize = 16;

/// How staging a layer ended.
enum StageEnd {
    /// Its tree is complete and its diff_id matched (free space its files took).
    Staged(Box<merge::Staged>, Applied, u64),
    /// It must be applied directly (why; free space its staging took).
    Tainted(String, u64),
    /// It failed, or the stream cannot be trusted.
    End(StreamEnd),
}

/// Admits at most `cap` staging threads at once, in layer order.
struct Slots {
    state: Mutex<(usize, usize)>,
    cond: std::sync::Condvar,
    cap: usize,
}

impl Slots {
    /// Waits for the turn of `ticket` (0, 1, … in order) and a free slot; `None` once
    /// `stop` says so.
    fn acquire(&self, ticket: usize, stop: impl Fn() -> bool) -> Option<SlotGuard<'_>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if stop() {
                return None;
            }
            let (next, active) = *st;
            if next == ticket && active < self.cap {
                *st = (next + 1, active + 1);
                self.cond.notify_all();
                return Some(SlotGuard(self));
            }
            st = match self
                .cond
                .wait_timeout(st, std::time::Duration::from_millis(100))
            {
                Ok((st, _)) => st,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1 -= 1;
        self.0.cond.notify_all();
    }
}

/// Where layer `i` (≥ 1) is staged: beside the merged tree.
fn staged_dir(root: &Path, i: usize) -> PathBuf {
    parent_dir(root).join(format!("staged-{i}"))
}

/// Opens a directory (never following a final symlink).
fn open_dir(path: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("open", path, e.into()))
}

/// Removes a staging tree (its directories may lack the write bit: rootless, they all
/// have u+rwx until the end, and as root permissions do not apply).
fn remove_staged(dir: &Path) -> Result<()> {
    let (Some(name), parent) = (dir.file_name(), parent_dir(dir)) else {
        return Ok(());
    };
    let pfd = open_dir(parent)?;
    let cname = std::ffi::CString::new(name.as_encoded_bytes())
        .map_err(|_| Error::Internal("NUL in a staging name".into()))?;
    resolve::remove_all(pfd.as_fd(), &cname).map_err(|e| Error::io("remove", dir, e))
}

/// Unpacks layer `i` (≥ 1) alone into its own staging tree `dir`.
#[allow(clippy::too_many_arguments)]
fn stage_layer(
    i: usize,
    layer: &Layer,
    dir: &Path,
    opts: Options,
    feed: Feed<'_>,
    cancel: &Arc<AtomicBool>,
    abort: &AtomicBool,
    room: &AtomicU64,
    on_staged: &(dyn Fn(usize, &Layer, Applied) + Sync),
) -> StageEnd {
    // What an earlier attempt (another endpoint) may have left.
    if dir.exists() {
        if let Err(e) = remove_staged(dir) {
            return StageEnd::End(e.into());
        }
    }
    let made = rustix::fs::mkdir(dir, Mode::from_raw_mode(0o700))
        .map_err(|e| Error::io("create directory", dir, e.into()))
        .and_then(|()| open_dir(dir));
    let fd = match made {
        Ok(fd) => fd,
        Err(e) => return StageEnd::End(e.into()),
    };
    let tree = resolve::Tree::new(fd);
    let mut engine = match apply::Engine::staging(&tree, opts, cancel) {
        Ok(e) => e,
        Err(e) => return StageEnd::End(Error::io("stat", dir, e).into()),
    };
    let (blob, followed) = match feed.open(layer, cancel) {
        Ok(x) => x,
        Err(e) => return StageEnd::End(e),
    };
    let mut used = 0;
    match apply_layer(&mut engine, blob, layer, room, &mut used, abort) {
        Ok(applied) => {
            on_staged(i, layer, applied);
            StageEnd::Staged(Box::new(engine.into_staged()), applied, used)
        }
        Err(Stop::Taint(why)) => StageEnd::Tainted(why, used),
        // A filesystem failure in a tree of its own: the direct apply says what it is.
        Err(Stop::Error(e @ Error::Unpack { .. })) => {
            StageEnd::Tainted(format!("staging it alone failed: {e}"), used)
        }
        Err(Stop::Error(e)) => StageEnd::End(judged(e, &followed, layer, cancel)),
    }
}

/// Makes the root of a new tree at `root`, then: the bottom layer is unpacked into it
/// (this thread), every other layer at once into its own staging tree ([`MAX_STAGING`]
/// threads, each taking the next layer in order); in layer order, once a layer's blob is verified and
/// the layers below are in, its staging tree is merged by renames, or, tainted, the layer
/// is applied directly from its verified blob file.
fn unpack_layers(
    root: &Path,
    layers: &[Layer],
    opts: Options,
    cancel: &Arc<AtomicBool>,
    feed: Feed<'_>,
    on_layer: &mut dyn FnMut(usize, &Layer, Applied),
    on_staged: &(dyn Fn(usize, &Layer, Applied) + Sync),
) -> std::result::Result<UnpackSummary, StreamEnd> {
    let stopped = || Error::io("unpack into", root, io::ErrorKind::Interrupted.into());
    if cancel.load(Ordering::Relaxed) {
        return Err(stopped().into());
    }
    let fd = make_root(root, opts)?;
    let tree = resolve::Tree::new(fd);
    let mut engine =
        apply::Engine::new(&tree, opts, cancel).map_err(|e| Error::io("stat", root, e))?;
    // Declared file sizes may not add up to more than the filesystem has free.
    let room = AtomicU64::new(
        rustix::fs::fstatvfs(tree.root())
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(u64::MAX),
    );
    let abort = AtomicBool::new(false);
    let slots = Slots {
        state: Mutex::new((1, 0)),
        cond: std::sync::Condvar::new(),
        cap: MAX_STAGING,
    };
    let mut staged = Vec::new();
    let mut senders = Vec::new();
    for _ in 1..layers.len() {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        staged.push(rx);
        senders.push(Mutex::new(Some(tx)));
    }
    // At most MAX_STAGING threads, each taking the next layer (in order) when it is done
    // with one: however many layers the manifest lists.
    let next = AtomicUsize::new(1);
    let result = std::thread::scope(|s| {
        for _ in 0..MAX_STAGING.min(layers.len().saturating_sub(1)) {
            let (room, abort, slots, next, senders) = (&room, &abort, &slots, &next, &senders);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(layer) = layers.get(i) else {
                    break;
                };
                // Taken out first: should this layer's work panic, its sender goes with
                // the unwinding and the merge hears of it instead of waiting.
                let tx = senders[i - 1]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                let dir = staged_dir(root, i);
                let stop = || abort.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed);
                let out = match slots.acquire(i, stop) {
                    None => StageEnd::End(StreamEnd::Failed(stopped())),
                    Some(_slot) => {
                        stage_layer(i, layer, &dir, opts, feed, cancel, abort, room, on_staged)
                    }
                };
                // The receiver is gone only when the merge has already failed.
                if let Some(tx) = tx {
                    let _ = tx.send(out);
                }
            });
        }
        let r = merge_in_order(
            root,
            &mut engine,
            layers,
            staged,
            feed,
            cancel,
            &abort,
            &room,
            on_layer,
            on_staged,
        );
        if r.is_err() {
            // Stop the staging threads: at their next entry, and readers waiting for bytes.
            abort.store(true, Ordering::Relaxed);
            if let Feed::Following(w) = feed {
                w.stop();
            }
        }
        r
    });
    for i in 1..layers.len() {
        let dir = staged_dir(root, i);
        if dir.exists() {
            if let Err(e) = remove_staged(&dir) {
                tracing::warn!(error = %e, "cannot remove a layer's staging tree");
            }
        }
    }
    let mut summary = result?;
    engine.finish().map_err(|f| {
        f.into_error(
            &layers.last().map_or_else(|| Digest::of(b""), |l| l.digest),
            None,
        )
    })?;
    summary.devices_emulated = engine.devices_emulated;
    summary.xattrs_skipped = engine.xattrs_skipped;
    if summary.devices_emulated > 0 {
        tracing::warn!(
            count = summary.devices_emulated,
            "device nodes written as empty files (not root, or in a user namespace; as umoci does)"
        );
    }
    Ok(summary)
}

/// Makes `root` as umoci does: 0755, root:root (unless rootless), mtime at the epoch.
fn make_root(root: &Path, opts: Options) -> Result<OwnedFd> {
    rustix::fs::mkdir(root, Mode::from_raw_mode(0o700))
        .map_err(|e| Error::io("create directory", root, e.into()))?;
    let fd = open_dir(root)?;
    // umoci: 0755, root:root, mtime at the epoch.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
        .map_err(|e| Error::io("chmod", root, e.into()))?;
    if !opts.rootless {
        rustix::fs::fchown(
            &fd,
            Some(rustix::fs::Uid::ROOT),
            Some(rustix::fs::Gid::ROOT),
        )
        .map_err(|e| Error::io("chown", root, e.into()))?;
    }
    let epoch = rustix::fs::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::fs::futimens(
        &fd,
        &Timestamps {
            last_access: epoch,
            last_modification: epoch,
        },
    )
    .map_err(|e| Error::io("set times of", root, e.into()))?;
    Ok(fd)
}

/// The reference the merge is checked against in tests: every layer applied directly, in
/// order, from its file, onto one tree.
#[cfg(test)]
pub(crate) fn unpack_direct(root: &Path, layers: &[Layer], opts: Options) -> Result<()> {
    let fd = make_root(root, opts)?;
    let tree = resolve::Tree::new(fd);
    let cancel = AtomicBool::new(false);
    let mut engine =
        apply::Engine::new(&tree, opts, &cancel).map_err(|e| Error::io("stat", root, e))?;
    let room = AtomicU64::new(u64::MAX);
    for layer in layers {
        let file =
            std::fs::File::open(&layer.path).map_err(|e| Error::io("open", &layer.path, e))?;
        apply_layer(&mut engine, file, layer, &room, &mut 0, &cancel).map_err(|s| match s {
            Stop::Error(e) => e,
            Stop::Taint(why) => Error::Internal(why),
        })?;
    }
    engine
        .finish()
        .map_err(|f| f.into_error(&Digest::of(b""), None))
}

/// The merging side of [`unpack_layers`]: the bottom layer into the tree, then each
/// staged one, in order.
#[allow(clippy::too_many_arguments)]
fn merge_in_order(
    root: &Path,
    engine: &mut apply::Engine<'_>,
    layers: &[Layer],
    staged: Vec<std::sync::mpsc::Receiver<StageEnd>>,
    feed: Feed<'_>,
    cancel: &Arc<AtomicBool>,
    abort: &AtomicBool,
    room: &AtomicU64,
    on_layer: &mut dyn FnMut(usize, &Layer, Applied),
    on_staged: &(dyn Fn(usize, &Layer, Applied) + Sync),
) -> std::result::Result<UnpackSummary, StreamEnd> {
    let stopped = || Error::io("unpack into", root, io::ErrorKind::Interrupted.into());
    let mut summary = UnpackSummary::default();
    let mut done = |i: usize, applied: Applied, summary: &mut UnpackSummary| {
        summary.layers += 1;
        summary.entries += applied.entries;
        on_layer(i, &layers[i], applied);
    };
    // Applied directly, from the verified blob file (its bytes are trusted).
    let direct = |engine: &mut apply::Engine<'_>, layer: &Layer| {
        let file =
            std::fs::File::open(&layer.path).map_err(|e| Error::io("open", &layer.path, e))?;
        let mut used = 0;
        apply_layer(engine, file, layer, room, &mut used, abort).map_err(|s| match s {
            Stop::Error(e) => StreamEnd::Failed(e),
            Stop::Taint(why) => StreamEnd::Failed(Error::Internal(format!(
                "layer {}: the direct apply cannot be tainted ({why})",
                layer.digest
            ))),
        })
    };
    let Some(bottom) = layers.first() else {
        return Ok(summary);
    };
    // The bottom layer: its staging tree is the merged tree itself.
    let started = std::time::Instant::now();
    let (blob, followed) = feed.open(bottom, cancel)?;
    let mut used = 0;
    let applied = match apply_layer(engine, blob, bottom, room, &mut used, abort) {
        Ok(a) => a,
        Err(Stop::Error(e)) => return Err(judged(e, &followed, bottom, cancel)),
        Err(Stop::Taint(why)) => {
            return Err(StreamEnd::Failed(Error::Internal(format!(
                "layer {}: the bottom layer cannot be tainted ({why})",
                bottom.digest
            ))))
        }
    };
    on_staged(0, bottom, applied);
    feed.trusted(bottom, cancel)?;
    tracing::info!(layer = %bottom.digest, entries = applied.entries, bytes = applied.bytes, secs = started.elapsed().as_secs_f64(), "layer applied (the bottom one)");
    summary.layers_merged += 1;
    done(0, applied, &mut summary);
    for (k, rx) in staged.into_iter().enumerate() {
        let i = k + 1;
        let layer = &layers[i];
        let out = rx.recv().map_err(|_| {
            StreamEnd::Failed(Error::Internal(format!(
                "the staging thread of layer {} ended without a result",
                layer.digest
            )))
        })?;
        let started = std::time::Instant::now();
        let dir = staged_dir(root, i);
        // Merged from its tree, or why it is applied directly (and the room its tree took).
        let merged = match out {
            StageEnd::End(e) => return Err(e),
            StageEnd::Staged(st, applied, used) => {
                feed.trusted(layer, cancel)?;
                let as_error = |f: Fail| f.into_error(&layer.digest, None);
                match engine.precheck(&st.stage).map_err(as_error)? {
                    None => {
                        let sfd = open_dir(&dir)?;
                        engine.merge(sfd, &st).map_err(as_error)?;
                        Ok(applied)
                    }
                    Some(why) => Err((why, used)),
                }
            }
            StageEnd::Tainted(why, used) => {
                feed.trusted(layer, cancel)?;
                Err((why, used))
            }
        };
        remove_staged(&dir)?;
        let (applied, how) = match merged {
            Ok(applied) => {
                summary.layers_merged += 1;
                (applied, "merged")
            }
            Err((why, used)) => {
                tracing::info!(layer = %layer.digest, reason = %why, "layer applied directly, not merged");
                room.fetch_add(used, Ordering::Relaxed);
                summary.layers_direct += 1;
                (direct(engine, layer)?, "applied directly")
            }
        };
        if cancel.load(Ordering::Relaxed) {
            return Err(stopped().into());
        }
        tracing::info!(layer = %layer.digest, entries = applied.entries, bytes = applied.bytes, secs = started.elapsed().as_secs_f64(), how, "layer in");
        done(i, applied, &mut summary);
    }
    if let Feed::Following(w) = feed {
        if w.restarted_under_reader() {
            return Err(StreamEnd::Fallback(
                "a layer was fetched again after part of it had been unpacked".into(),
            ));
        }
    }
    Ok(summary)
}

/// Why [`apply_layer`] stopped.
pub(crate) enum Stop {
    /// Staging: the layer must be applied directly instead (why).
    Taint(String),
    /// It failed.
    Error(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Error(e)
    }
}

/// Applies one layer read from `blob` (a verified file, or the prefix of a fetch in
/// progress), checking its diff_id at the end. Declared file sizes are taken from `room`
/// (and added to `used`); stops once `abort` (or the engine's cancel) is set.
pub(crate) fn apply_layer<R: Read + Send>(
    engine: &mut apply::Engine<'_>,
    blob: R,
    layer: &Layer,
    room: &AtomicU64,
    used: &mut u64,
    abort: &AtomicBool,
) -> std::result::Result<Applied, Stop> {
    let bad = |reason: String| Error::Layer {
        layer: layer.digest,
        entry: None,
        reason,
    };
    let (blob, compressed) = decompress::Counted::new(blob);
    let mut blob = BufReader::with_capacity(decompress::BLOB_BUF, blob);
    let head = io::BufRead::fill_buf(&mut blob)
        .map_err(|e| Error::io("read", &layer.path, e))?
        .to_vec();
    let compression = decompress::detect(&layer.media_type, &head).map_err(bad)?;
    let stream = decompress::decoder(compression, blob)
        .map_err(|e| bad(format!("cannot start decompressing ({compression:?}): {e}")))?;
    let stream = decompress::Ratio::new(stream, compressed, engine.max_ratio());
    // The stream is read and hashed on a thread of this scope (decompress::Hashed); it is
    // joined before this returns.
    std::thread::scope(|scope| -> std::result::Result<Applied, Stop> {
        let hashed = decompress::Hashed::spawn(scope, stream)
            .map_err(|e| Error::io("start a thread to read", &layer.path, e))?;
        let (budget, left) = targuard::Budget::new(hashed);
        let mut archive = tar::Archive::new(budget);
        engine.start_layer();
        let cancel = engine.cancel();
        let mut count = 0u64;
        // Bytes of the entry before that may not have been read (a whiteout's, say): the
        // tar reader skips them on its way to the next header, through the same budget.
        let mut unread = 0u64;
        {
            let mut entries = archive
                .entries()
                .map_err(|e| bad(format!("cannot read the tar stream: {e}")))?;
            loop {
                if cancel.load(Ordering::Relaxed) || abort.load(Ordering::Relaxed) {
                    return Err(Error::io(
                        "unpack",
                        &layer.path,
                        io::ErrorKind::Interrupted.into(),
                    )
                    .into());
                }
                left.set(targuard::META_BUDGET.saturating_add(unread));
                let mut entry = match entries.next() {
                    None => break,
                    Some(Ok(e)) => e,
                    Some(Err(e)) => {
                        return Err(bad(format!("tar stream, after {count} entries: {e}")).into())
                    }
                };
                count += 1;
                if count > targuard::MAX_ENTRIES {
                    return Err(bad(format!("more than {} entries", targuard::MAX_ENTRIES)).into());
                }
                unread = entry.size();
                left.set(targuard::META_BUDGET.saturating_add(unread));
                let meta = match targuard::meta(&mut entry) {
                    Ok(Some(m)) => m,
                    Ok(None) => continue,
                    // The reason names the entry.
                    Err(reason) => {
                        return Err(Fail::Bad(reason).into_error(&layer.digest, None).into())
                    }
                };
                if let Err(available) =
                    room.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                        r.checked_sub(meta.size)
                    })
                {
                    return Err(Error::NoSpace {
                        path: layer.path.clone(),
                        needed: meta.size,
                        available: Some(available),
                    }
                    .into());
                }
                *used += meta.size;
                engine.apply(&meta, &mut entry).map_err(|f| match f {
                    Fail::Taint(why) => Stop::Taint(why),
                    f => Stop::Error(f.into_error(&layer.digest, Some(&meta.path))),
                })?;
            }
        }
        left.set(u64::MAX);
        let mut rest = archive.into_inner().into_inner();
        targuard::check_end(&mut rest).map_err(|e| bad(e.to_string()))?;
        let (actual, bytes) = rest
            .finish()
            .map_err(|e| bad(format!("cannot read the layer to its end: {e}")))?;
        if actual != layer.diff_id {
            return Err(Error::DigestMismatch {
                what: format!(
                    "layer {} uncompressed ({bytes} bytes) against the config's rootfs.diff_ids",
                    layer.digest
                ),
                expected: layer.diff_id,
                actual,
            }
            .into());
        }
        Ok(Applied {
            entries: count,
            bytes,
        })
    })
}

/// The private directory a rootfs is built in, beside the destination; removed on drop
/// unless published.
pub(crate) struct Staging {
    /// `.NAME.fastpull-XXXX` beside the destination.
    dir: PathBuf,
    /// The destination.
    target: PathBuf,
    /// The destination is an existing empty directory (published by exchange).
    exchange: bool,
    /// The pull's bound on tar bytes per compressed byte (see [`Staging::with_max_ratio`]).
    max_ratio: u64,
    /// Set on drop: the unpacking thread (which holds `running`) stops at its next entry,
    /// and the directory is removed once it has.
    cancel: Arc<AtomicBool>,
    running: Arc<Mutex<()>>,
    /// The directory itself, open and `flock`ed for the life of the pull: a later pull
    /// sweeps only staging directories nobody holds (what a `kill -9` or a power cut left).
    _lock: OwnedFd,
}

/// A staging directory younger than this is never swept, held or not (it may be one that
/// another pull has just made and not locked yet).
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Removes the staging directories of `name` in `parent` that no running pull holds and
/// that are older than [`STALE_AFTER`]: what a killed pull left. Each is removed through
/// its parent's fd without following a symlink. Failures are logged, not fatal.
fn sweep_stale(parent: &Path, name: &str) {
    let prefix = format!(".{name}.fastpull-");
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    let Ok(pfd) = rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    for e in rd.flatten() {
        let file_name = e.file_name();
        if !file_name.to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let Ok(md) = e.path().symlink_metadata() else {
            continue;
        };
        let old = md
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_AFTER);
        if !md.is_dir() || !old {
            continue;
        }
        let Ok(cname) = std::ffi::CString::new(file_name.as_encoded_bytes()) else {
            continue;
        };
        let Ok(fd) = rustix::fs::openat(
            pfd.as_fd(),
            cname.as_c_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        if rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            continue; // a running pull holds it
        }
        match resolve::remove_all(pfd.as_fd(), &cname) {
            Ok(()) => {
                tracing::info!(dir = %e.path().display(), "removed a staging directory a stopped pull left")
            }
            Err(err) => {
                tracing::warn!(dir = %e.path().display(), error = %err, "cannot remove a staging directory a stopped pull left")
            }
        }
    }
}

impl Staging {
    /// Layers may give at most `max` tar bytes per compressed byte (0: no bound; default
    /// [`decompress::DEFAULT_MAX_RATIO`]).
    pub(crate) fn with_max_ratio(mut self, max: u64) -> Staging {
        self.max_ratio = max;
        self
    }

    /// The options this pull unpacks with: the process's privileges, the pull's bounds.
    pub(crate) fn options(&self) -> Options {
        Options {
            max_ratio: self.max_ratio,
            ..Options::detect()
        }
    }

    /// Checks `target` (missing, or an empty directory) and makes the staging directory
    /// (0700) beside it.
    pub(crate) fn create(target: &Path) -> Result<Staging> {
        let dest_err = |reason: &str| Error::Destination {
            path: target.to_path_buf(),
            reason: reason.to_string(),
        };
        let name = target
            .file_name()
            .ok_or_else(|| dest_err("names no directory (it ends in '..' or is '/')"))?
            .to_string_lossy()
            .into_owned();
        let parent = parent_dir(target).to_path_buf();
        let exchange = match std::fs::symlink_metadata(target) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io("stat", target, e)),
            Ok(m) if !m.is_dir() => return Err(dest_err("exists and is not a directory")),
            Ok(_) => {
                let mut rd = std::fs::read_dir(target).map_err(|e| Error::io("read", target, e))?;
                if rd.next().is_some() {
                    return Err(dest_err(
                        "exists and is not empty: --format rootfs writes a new root filesystem \
                         and does not unpack over an existing tree (remove it, or pick a new \
                         directory)",
                    ));
                }
                true
            }
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io("create directory", &parent, e))?;
        sweep_stale(&parent, &name);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for i in 0..100u32 {
            let dir = parent.join(format!(
                ".{name}.fastpull-{:x}{:08x}",
                std::process::id(),
                nanos.wrapping_add(i)
            ));
            match rustix::fs::mkdir(&dir, Mode::from_raw_mode(0o700)) {
                Ok(()) => {
                    let lock = rustix::fs::open(
                        &dir,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .and_then(|fd| {
                        rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                            .map(|()| fd)
                    })
                    .map_err(|e| Error::io("lock", &dir, e.into()))?;
                    return Ok(Staging {
                        dir,
                        target: target.to_path_buf(),
                        exchange,
                        max_ratio: decompress::DEFAULT_MAX_RATIO,
                        cancel: Arc::new(AtomicBool::new(false)),
                        running: Arc::new(Mutex::new(())),
                        _lock: lock,
                    });
                }
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(Error::io("create directory", &dir, e.into())),
            }
        }
        Err(Error::io(
            "create directory",
            &parent,
            io::Error::other("no free staging name"),
        ))
    }

    /// Where the blobs go (a scratch OCI layout).
    pub(crate) fn blobs(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    /// What the unpacking thread shares with this staging directory: the flag it stops on
    /// and the lock it holds while it writes.
    pub(crate) fn worker(&self) -> (Arc<AtomicBool>, Arc<Mutex<()>>) {
        (self.cancel.clone(), self.running.clone())
    }

    /// Where the tree is built.
    pub(crate) fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Starts over: removes a tree a failed attempt left (before another endpoint is tried).
    pub(crate) fn reset_rootfs(&self) -> Result<()> {
        let dir = rustix::fs::open(
            &self.dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open", &self.dir, e.into()))?;
        resolve::remove_all(dir.as_fd(), c"rootfs")
            .map_err(|e| Error::io("remove", self.rootfs(), e))
    }

    /// Renames the finished tree to the destination; the staging directory (blobs, and
    /// the empty directory an exchange swapped out) is removed.
    pub(crate) fn publish(self) -> Result<()> {
        let parent_of = |p: &Path| parent_dir(p).to_path_buf();
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let tparent = parent_of(&self.target);
        let tdir = rustix::fs::open(&tparent, flags, Mode::empty())
            .map_err(|e| Error::io("open", &tparent, e.into()))?;
        let sdir = rustix::fs::open(&self.dir, flags | OFlags::NOFOLLOW, Mode::empty())
            .map_err(|e| Error::io("open", &self.dir, e.into()))?;
        let tname = self.target.file_name().unwrap_or_default();
        let how = if self.exchange {
            RenameFlags::EXCHANGE
        } else {
            RenameFlags::NOREPLACE
        };
        rustix::fs::renameat_with(&sdir, c"rootfs", &tdir, tname, how).map_err(|e| {
            let e: io::Error = e.into();
            if e.raw_os_error() == Some(libc::EEXIST) || e.raw_os_error() == Some(libc::ENOTEMPTY) {
                Error::Destination {
                    path: self.target.clone(),
                    reason: "appeared while the image was unpacked; nothing was written to it"
                        .into(),
                }
            } else if e.raw_os_error() == Some(libc::ENOENT) && self.exchange {
                Error::Destination {
                    path: self.target.clone(),
                    reason: "was removed while the image was unpacked".into(),
                }
            } else {
                Error::io("rename", &self.target, e)
            }
        })?;
        if self.exchange {
            // What was swapped out must still be the empty directory we checked; if
            // something was put in it meanwhile, swap back and refuse.
            let old_is_empty = std::fs::read_dir(self.rootfs())
                .map(|mut rd| rd.next().is_none())
                .unwrap_or(false);
            if !old_is_empty {
                let _ = rustix::fs::renameat_with(
                    &sdir,
                    c"rootfs",
                    &tdir,
                    tname,
                    RenameFlags::EXCHANGE,
                );
                return Err(Error::Destination {
                    path: self.target.clone(),
                    reason: "was written to while the image was unpacked; left as it was".into(),
                });
            }
        }
        crate::write::sync_parent(&self.target)?;
        Ok(())
        // Drop removes the staging directory (blobs, the swapped-out empty directory).
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // A pull dropped mid-unpack (Ctrl-C) leaves its thread running: stop it, and wait
        // (briefly) until it no longer writes, so that nothing appears after the removal.
        self.cancel.store(true, Ordering::Relaxed);
        for _ in 0..200 {
            match self.running.try_lock() {
                Ok(_) | Err(std::sync::TryLockError::Poisoned(_)) => break,
                Err(std::sync::TryLockError::WouldBlock) => {
                    std::thread::sleep(std::time::Duration::from_millis(25))
                }
            }
        }
        let Some(name) = self.dir.file_name() else {
            return;
        };
        let parent = parent_dir(&self.dir).to_path_buf();
        let Ok(pfd) = rustix::fs::open(
            &parent,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            return;
        };
        let Ok(cname) = std::ffi::CString::new(name.as_encoded_bytes()) else {
            return;
        };
        if let Err(e) = resolve::remove_all(pfd.as_fd(), &cname) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove the staging directory");
        }
    }
}
