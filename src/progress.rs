//! Progress events. The library never prints: it tells a [`Reporter`], and the CLI (or an
//! embedding tool) decides what to show. Every [`Event`] names the pull it belongs to
//! ([`PullId`]), so one reporter can follow several pulls at once.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::digest::Digest;
use crate::manifest::{BlobKind, Platform};

/// Which pull an [`Event`] belongs to: unique within the process, in the order the pulls
/// were asked for ([`crate::PullRequest::id`], [`crate::PullReport::pull_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PullId(u64);

impl PullId {
    /// A new id, never handed out before in this process.
    pub(crate) fn next() -> PullId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        PullId(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The id as a number (1, 2, …).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for PullId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pull-{}", self.0)
    }
}

/// Something that happened during a pull, and which pull.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Event {
    /// The pull it happened in.
    pub pull: PullId,
    /// What happened.
    pub kind: EventKind,
}

/// What happened (see [`Event`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum EventKind {
    /// The reference resolved: `digest` is what the tag names (an index or a manifest),
    /// `manifest_digest` the platform's image manifest.
    Resolved {
        /// Digest of the document the reference names.
        digest: Digest,
        /// Digest of the image manifest that is pulled.
        manifest_digest: Digest,
        /// The platform chosen from an index, if there was one.
        platform: Option<Platform>,
    },
    /// A blob is part of the image (sent once per distinct blob, in manifest order, for
    /// each source tried: after an [`EventKind::EndpointFailed`] the next mirror, or the
    /// registry itself, sends `Resolved` and these again, possibly for other digests).
    BlobPlanned {
        /// Blob digest.
        digest: Digest,
        /// Blob size.
        size: u64,
        /// Config or layer.
        kind: BlobKind,
        /// Already verified on disk: it will not be downloaded.
        present: bool,
    },
    /// Bytes of a blob received so far in the current attempt.
    BlobProgress {
        /// Blob digest.
        digest: Digest,
        /// Bytes received.
        downloaded: u64,
    },
    /// An earlier pull left part of this blob on disk (with a journal that checks): only
    /// the rest is fetched, and the whole is hashed again.
    BlobResumed {
        /// Blob digest.
        digest: Digest,
        /// Bytes already there.
        present: u64,
    },
    /// The blob's digest did not match; it is fetched again from scratch.
    BlobRepairing {
        /// Blob digest (expected).
        digest: Digest,
        /// What the bytes hashed to.
        actual: Digest,
        /// Which repair this is (1-based).
        attempt: u32,
    },
    /// A blob resumed from an earlier pull's bytes did not match its digest (the journal or
    /// the partial file was wrong): it is fetched again from scratch, not counted as a
    /// repair.
    BlobRestarting {
        /// Blob digest (expected).
        digest: Digest,
        /// What the bytes hashed to.
        actual: Digest,
    },
    /// Two fetches of a blob that failed its digest, compared in 1 MiB pieces: the byte
    /// ranges that differed (empty: the same bytes both times, so the source sends them
    /// every time). Fetch `earlier` did not verify; `later` is the next fetch, verified or
    /// not. A hop that corrupts bytes shows where.
    BlobDiffered {
        /// Blob digest.
        digest: Digest,
        /// The earlier fetch (1-based).
        earlier: u32,
        /// The later fetch.
        later: u32,
        /// Byte ranges (end exclusive) of the pieces that differed.
        ranges: Vec<std::ops::Range<u64>>,
    },
    /// An attempt failed and the blob will be fetched again.
    BlobRetrying {
        /// Blob digest.
        digest: Digest,
        /// Which retry this is (1-based).
        attempt: u32,
        /// Why.
        error: String,
    },
    /// A mirror failed; the pull goes on with the next mirror or the registry itself
    /// (blobs already verified are kept).
    EndpointFailed {
        /// The mirror's `host[:port]`.
        host: String,
        /// Why.
        error: String,
    },
    /// The blob is verified and in place.
    BlobDone {
        /// Blob digest.
        digest: Digest,
    },
    /// `--format rootfs`: a layer has been unpacked into a tree of its own and its
    /// uncompressed bytes match its diff_id. Layers are staged at once, each as its bytes
    /// arrive, so these come in any order, and may come before the layer's `BlobDone`
    /// (its compressed digest is checked before it is merged). The bottom layer's tree is
    /// the merged tree itself. A layer whose result depends on the layers below is applied
    /// directly instead, from its verified blob: found while staging, it sends no such
    /// event; found before its merge, it has sent one. The pull's
    /// [`crate::UnpackSummary`] counts the layers merged and applied directly.
    LayerStaged {
        /// Position of the layer in the manifest (0 is the bottom layer).
        index: usize,
        /// The layer's blob digest.
        digest: Digest,
        /// Tar entries in it (whiteouts included).
        entries: u64,
    },
    /// `--format rootfs`: a layer is in the private tree (merged from its staging tree, or
    /// applied directly), its blob verified and its uncompressed bytes matching its
    /// diff_id (sent in layer order; nothing is visible until every layer is in). Should a
    /// layer's blob have to be fetched again after part of it was unpacked, the layers are
    /// unpacked again from the verified blobs, and reported again.
    LayerApplied {
        /// Position of the layer in the manifest (0 is the bottom layer).
        index: usize,
        /// The layer's blob digest.
        digest: Digest,
        /// Bytes of its uncompressed tar.
        uncompressed: u64,
        /// Tar entries applied (whiteouts included).
        entries: u64,
    },
}

/// Receives [`Event`]s; called from the pull's tasks, so keep it quick.
pub trait Reporter: Send + Sync {
    /// One event.
    fn report(&self, event: &Event);
}

/// Ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoReporter;

impl Reporter for NoReporter {
    fn report(&self, _event: &Event) {}
}

/// One pull's reporter: stamps each event with the pull's id.
#[derive(Clone)]
pub(crate) struct PullReporter {
    pub(crate) id: PullId,
    inner: Arc<dyn Reporter>,
}

impl PullReporter {
    pub(crate) fn new(id: PullId, inner: Arc<dyn Reporter>) -> PullReporter {
        PullReporter { id, inner }
    }

    pub(crate) fn report(&self, kind: EventKind) {
        self.inner.report(&Event {
            pull: self.id,
            kind,
        });
    }
}
