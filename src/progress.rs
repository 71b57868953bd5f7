//! Progress events. The library never prints: it tells a [`Reporter`], and the CLI (or an
//! embedding tool) decides what to show.

use crate::digest::Digest;
use crate::manifest::{BlobKind, Platform};

/// Something that happened during a pull.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
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
    /// A blob is part of the image (sent once per distinct blob, in manifest order).
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
