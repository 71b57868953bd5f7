//! # fastpull
//!
//! Pull container images (OCI / Docker registry v2) and leave a standard image on disk —
//! an OCI image layout, skopeo's `dir:` layout, one archive file that `docker load` /
//! `podman load` take, or the image's root filesystem unpacked as `umoci unpack` would
//! ([`Format`]), or a layout and its root filesystem both ([`PullRequest::unpack`]) —
//! having verified every byte.
//!
//! A pull follows the data through one module per step:
//! [`reference`](mod@reference) (parse and normalise `IMAGE`) → `auth` (tokens, as registries require) →
//! `registry` (the HTTP API; [`manifest`] parsing and platform choice) → `plan` (which
//! blobs, largest first, skipping what is already verified on disk) → `fetch` (the only
//! concurrent stage: a scheduler that measures each server's goodput and decides how many
//! connections it gets and where ranges are cut, and transfers retried and resumed on their
//! own; see [`FanOut`]) → `write` (preallocated, mmapped partial files written
//! in spans, durable rename; `resume` journals what a stopped pull wrote) + `verify` (an
//! in-order sha256 per blob on a pool of CPU
//! threads, following the written prefix while later spans still arrive) → `layout`
//! (`index.json` or `manifest.json`, written last; an archive is laid out before the fetch
//! and its blobs land in place inside it: `archive`). [`convert`] rewrites a Docker
//! manifest with OCI media types when asked ([`Conversion`]).
//!
//! A blob under its final name is always complete and verified (an archive appears under
//! its name only once every blob in it is); the manifest is stored exactly as the registry
//! sent it, after its sha256 was checked against the pinned digest and the
//! `Docker-Content-Digest` header, unless a [`Conversion`] was asked for.
//!
//! The library never prints. Progress goes to a [`Reporter`] if you set one; every
//! [`Event`] names its pull ([`PullId`]).
//!
//! A [`Client`] holds what pulls share (connections, credentials, TLS, tuning); each pull
//! is a [`PullRequest`] with its own destination, [`Format`], platforms, reporter and
//! cancellation, starting from the client's defaults.
//!
//! ```no_run
//! # async fn run() -> fastpull::Result<()> {
//! use fastpull::{Client, Format, Reference};
//!
//! let client = Client::builder()
//!     .platform("linux/arm64".parse()?)
//!     .format(Format::Oci)
//!     .build()?;
//! let image: Reference = "alpine:3.20".parse()?;
//! let report = client.pull(&image, "./alpine").await?;
//! println!("{} {} ({} bytes downloaded)", image, report.digest, report.bytes_downloaded);
//!
//! // One pull with its own options (see PullRequest).
//! let cancel = fastpull::CancellationToken::new();
//! let report = client
//!     .request(&image, "./alpine.tar")
//!     .format(Format::DockerArchive)
//!     .platform("linux/amd64".parse()?)
//!     .cancel_on(cancel.clone())
//!     .await?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod archive;
mod auth;
mod client;
pub mod convert;
pub mod credentials;
pub mod digest;
pub mod error;
mod fetch;
mod http;
mod layout;
pub mod manifest;
mod partials;
mod plan;
mod prefix;
pub mod progress;
pub mod reference;
mod registry;
mod request;
mod resume;
mod retry;
mod stop_hook;
mod stream;
mod unpack;
mod verify;
mod write;

pub use auth::{parse_challenges, Challenge};
pub use client::{
    BlobReport, Client, ClientBuilder, ManifestBytes, ManifestReport, PullReport, Resolution,
    DEFAULT_CHUNK_SIZE, DEFAULT_CONNECTIONS, DEFAULT_MAX_UNPACK_RATIO, DEFAULT_REPAIR_ATTEMPTS,
};
pub use convert::{Conversion, ANNOTATION_SOURCE_DIGEST};
pub use credentials::{Credential, CredentialStore, Secret};
pub use digest::Digest;
pub use error::{Category, Error, Result};
pub use fetch::FanOut;
pub use http::DEFAULT_CERT_DIRS;
pub use layout::{Destination, Format, ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME, DIR_VERSION};
pub use manifest::{BlobKind, Platform};
pub use progress::{Event, EventKind, NoReporter, PullId, Reporter};
pub use request::PullRequest;
/// Cancels a [`PullRequest`] ([`PullRequest::cancel_on`]); tokio-util's, re-exported.
pub use tokio_util::sync::CancellationToken;
pub use verify::sha256_backend;

pub use reference::Reference;
pub use stream::BlobReader;
pub use unpack::UnpackSummary;

/// The hashing core, the writer and the layer decoders, for `benches/` only (`--features
/// bench-internals`): not part of the API, may change in any release.
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod bench_internals {
    pub use crate::unpack::layer_stream;
    pub use crate::verify::{HashPool, Hasher, InOrderHasher};
    pub use crate::write::{BlobFile, SpanWriter};
}
