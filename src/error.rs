//! One error type for the whole pull, with the context a user needs (which blob, which URL —
//! never a secret) and a [`Category`] the CLI maps to an exit code.

use std::path::PathBuf;

use crate::digest::Digest;
use crate::reference::ReferenceError;

/// Result alias for fastpull.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Boxed source error for transport failures.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can stop a pull.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image reference does not parse.
    #[error(transparent)]
    InvalidReference(#[from] ReferenceError),

    /// A `--platform` value that is not `os/arch[/variant]`.
    #[error("invalid platform {0:?}: expected os/arch[/variant], e.g. linux/arm64/v8")]
    InvalidPlatform(String),

    /// Options that do not fit together or are out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// The connection or the HTTP exchange failed (after retries where retrying made sense).
    #[error("{what} {url}: {source}{}", retries_suffix(*.retries))]
    Network {
        /// What we were doing ("GET", "connect to").
        what: &'static str,
        /// The URL, redacted.
        url: String,
        /// How many times it was retried.
        retries: u32,
        /// The underlying failure.
        #[source]
        source: BoxError,
    },

    /// The server cannot be reached in a way retrying does not fix: its name does not
    /// resolve, or it refuses connections. Reported at once, not retried.
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// The URL, redacted.
        url: String,
        /// The cause (resolver or connect error).
        reason: String,
    },

    /// TLS failed: the server does not speak TLS, or its certificate is not trusted.
    #[error("TLS error talking to {url}: {message}")]
    Tls {
        /// The URL, redacted.
        url: String,
        /// What went wrong.
        message: String,
        /// The server answered with something that is not TLS.
        not_tls: bool,
    },

    /// An HTTP exchange that cannot succeed as it stands (bad redirect, redirect loop, a
    /// server that breaks the protocol).
    #[error("{message} ({url})")]
    Protocol {
        /// The URL, redacted.
        url: String,
        /// What is wrong.
        message: String,
    },

    /// A bug or an impossible state in fastpull itself.
    #[error("internal error: {0}")]
    Internal(String),

    /// The registry answered with an error status (JSON `errors` decoded when present).
    #[error("registry error from {url}: HTTP {status}{}{}{}", fmt_code(.code), fmt_message(.message), retries_suffix(*.retries))]
    Registry {
        /// The URL, redacted.
        url: String,
        /// HTTP status.
        status: u16,
        /// The registry's error code (`MANIFEST_UNKNOWN`, `DENIED`, …).
        code: Option<String>,
        /// The registry's message.
        message: String,
        /// The `Retry-After` the registry asked for (429/503), in seconds.
        retry_after: Option<u64>,
        /// How many times it was retried.
        retries: u32,
    },

    /// The tag, digest or repository does not exist.
    #[error("{}: {reference} not found in {registry}", if .code.as_deref() == Some("NAME_UNKNOWN") { "repository unknown" } else { "manifest unknown" })]
    ManifestNotFound {
        /// The reference asked for (`repo:tag` or `repo@digest`).
        reference: String,
        /// Registry host.
        registry: String,
        /// The registry's error code (`MANIFEST_UNKNOWN`, `NAME_UNKNOWN`), if it sent one.
        code: Option<String>,
    },

    /// The registry refused our credentials (or the lack of them).
    #[error("unauthorized: {registry} denied access to repository {repository}{}{}", fmt_code(.code), fmt_message(.message))]
    Unauthorized {
        /// Registry host.
        registry: String,
        /// Repository path.
        repository: String,
        /// The registry's error code (`UNAUTHORIZED`, `DENIED`), if it sent one.
        code: Option<String>,
        /// The registry's message, if any.
        message: String,
    },

    /// A manifest larger than we accept.
    #[error("manifest at {url} is larger than the {limit}-byte limit")]
    ManifestTooLarge {
        /// The URL, redacted.
        url: String,
        /// The limit in bytes.
        limit: u64,
    },

    /// A manifest we cannot read (bad JSON, unknown media type, schema 1, …).
    #[error("unsupported or invalid manifest {what}: {reason}")]
    InvalidManifest {
        /// Which manifest (URL or digest).
        what: String,
        /// What is wrong with it.
        reason: String,
    },

    /// An image index with no manifest for the wanted platform.
    #[error("no manifest for platform {wanted} in {reference}; available: {}", if .available.is_empty() { "none".to_string() } else { .available.join(", ") })]
    NoMatchingPlatform {
        /// The platform asked for.
        wanted: String,
        /// The image reference.
        reference: String,
        /// Platforms the index offers.
        available: Vec<String>,
    },

    /// Content whose sha256 is not the one it is named by.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was checked (blob or manifest, with its URL).
        what: String,
        /// The digest it should have.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },

    /// Content whose length is not the one its descriptor says.
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// What was checked.
        what: String,
        /// The size it should have.
        expected: u64,
        /// The size received.
        actual: u64,
    },

    /// A layer that cannot be unpacked as it stands (`--format rootfs`): malformed, or built
    /// to reach outside the root filesystem, or read differently by different tar readers.
    /// Nothing of it becomes visible.
    #[error("layer {layer}{}: {reason}", .entry.as_ref().map(|e| format!(", entry {e:?}")).unwrap_or_default())]
    Layer {
        /// The layer's (compressed) digest.
        layer: Digest,
        /// The entry's path, if one entry is at fault.
        entry: Option<String>,
        /// What is wrong.
        reason: String,
    },

    /// Unpacking a layer (`--format rootfs`) failed on the local filesystem.
    #[error("unpacking layer {layer}, entry {entry:?}: {op}: {source}")]
    Unpack {
        /// The layer's (compressed) digest.
        layer: Digest,
        /// The entry's path.
        entry: String,
        /// What we were doing ("create", "chown", …).
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A local filesystem operation failed.
    #[error("{op} {}: {source}", .path.display())]
    Io {
        /// What we were doing ("create", "rename", …).
        op: &'static str,
        /// Which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// Stored registry credentials could not be read: a malformed auth file, or a credential
    /// helper that is missing or failed. Never carries a secret.
    #[error("credentials from {origin}: {message}")]
    Credentials {
        /// The auth file's path, or `credential helper docker-credential-NAME`.
        origin: String,
        /// What went wrong.
        message: String,
    },

    /// The destination's filesystem is full: blobs could not be given their space. The
    /// others were still fetched; verified blobs and partial downloads (with their resume
    /// journals) are kept; free space and run the pull again.
    #[error("no space left in {}: {} ({needed} bytes) more needed{}; verified blobs and partial downloads are kept: free space and pull again to continue", .path.display(), human_bytes(*.needed), .available.map(|a| format!(", {} available", human_bytes(a))).unwrap_or_default())]
    NoSpace {
        /// The directory being written.
        path: PathBuf,
        /// Bytes the blobs that did not fit needed.
        needed: u64,
        /// Bytes the filesystem had free for us, if it said.
        available: Option<u64>,
    },

    /// An OCI layout's `index.json` already gives this name to another repository's image:
    /// taking the name would replace that entry and orphan the other image's blobs. Name
    /// this image otherwise ([`crate::Destination::named`], `--tag`), or allow the
    /// replacement ([`crate::ClientBuilder::replace`], `--replace`).
    #[error("destination {}: its index.json entry {name:?} holds {held_by}, not {wanted}; pulling would replace it and orphan that image's blobs. Give this image another name (--tag NAME, or DEST:NAME) or pass --replace to replace the entry", .path.display())]
    NameInUse {
        /// The layout.
        path: PathBuf,
        /// The `org.opencontainers.image.ref.name` both want.
        name: String,
        /// The image the entry holds now (`io.containerd.image.name`).
        held_by: String,
        /// The image being pulled.
        wanted: String,
    },

    /// The destination exists and is not an image layout of the requested format.
    #[error("destination {} {reason}", .path.display())]
    Destination {
        /// The destination directory.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },

    /// The pull was cancelled ([`crate::PullRequest::cancel_on`]; the CLI's Ctrl-C, SIGTERM,
    /// SIGHUP). Verified blobs stay; what each unfinished blob had written is journaled in
    /// the destination's scratch directory for the next pull, unless resuming is off.
    #[error("pull of {reference} into {} cancelled", .path.display())]
    Cancelled {
        /// The image.
        reference: String,
        /// The destination.
        path: PathBuf,
    },
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn retries_suffix(n: u32) -> String {
    match n {
        0 => String::new(),
        1 => " (after 1 retry)".to_string(),
        n => format!(" (after {n} retries)"),
    }
}

fn fmt_code(code: &Option<String>) -> String {
    code.as_deref().map(|c| format!(" {c}")).unwrap_or_default()
}

fn fmt_message(msg: &str) -> String {
    if msg.is_empty() {
        String::new()
    } else {
        format!(": {msg}")
    }
}

/// Broad classes of failure; each has a documented exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Category {
    /// Bad arguments or configuration: reference, platform, options, stored credentials (exit 2).
    Usage,
    /// Network or registry: unreachable, refused, not found, unauthorized, no such platform,
    /// unsupported manifest (exit 3).
    Registry,
    /// Content failed verification: digest or size mismatch, or a layer that cannot be
    /// unpacked safely (`--format rootfs`) (exit 4).
    Verification,
    /// Local filesystem: permissions, full disk, unusable destination (exit 5).
    Io,
    /// A bug in fastpull (exit 1).
    Internal,
    /// The pull was cancelled, or the CLI interrupted (exit 130, as a shell reports SIGINT).
    Cancelled,
}

impl Category {
    /// The process exit code the CLI uses for this category.
    pub fn exit_code(self) -> i32 {
        match self {
            Category::Usage => 2,
            Category::Registry => 3,
            Category::Verification => 4,
            Category::Io => 5,
            Category::Internal => 1,
            Category::Cancelled => 130,
        }
    }
}

impl Error {
    /// Which class of failure this is.
    pub fn category(&self) -> Category {
        match self {
            Error::InvalidReference(_)
            | Error::InvalidPlatform(_)
            | Error::InvalidOption(_)
            | Error::Credentials { .. } => Category::Usage,
            Error::Network { .. }
            | Error::Unreachable { .. }
            | Error::Tls { .. }
            | Error::Protocol { .. }
            | Error::Registry { .. }
            | Error::ManifestNotFound { .. }
            | Error::Unauthorized { .. }
            | Error::ManifestTooLarge { .. }
            | Error::InvalidManifest { .. }
            | Error::NoMatchingPlatform { .. } => Category::Registry,
            Error::DigestMismatch { .. } | Error::SizeMismatch { .. } | Error::Layer { .. } => {
                Category::Verification
            }
            Error::Io { .. }
            | Error::Unpack { .. }
            | Error::Destination { .. }
            | Error::NoSpace { .. }
            | Error::NameInUse { .. } => Category::Io,
            Error::Internal(_) => Category::Internal,
            Error::Cancelled { .. } => Category::Cancelled,
        }
    }

    /// Whether trying the same request again may succeed (connection trouble, 5xx, 429).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Network { .. } => true,
            Error::Registry { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// Whether another endpoint (the origin after a mirror) may do better: the registry or
    /// network failed, or what it sent did not verify. Local and usage errors would fail
    /// there too.
    pub fn may_try_elsewhere(&self) -> bool {
        matches!(self.category(), Category::Registry | Category::Verification)
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn network(what: &'static str, url: &str, source: impl Into<BoxError>) -> Self {
        Error::Network {
            what,
            url: redact_url(url),
            retries: 0,
            source: source.into(),
        }
    }

    /// A copy of this error, for handing one failure to several waiting requests. Wrapped
    /// sources keep their text (and an I/O error its kind), not their type.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::InvalidReference(e) => Error::InvalidReference(e.clone()),
            Error::InvalidPlatform(p) => Error::InvalidPlatform(p.clone()),
            Error::InvalidOption(o) => Error::InvalidOption(o.clone()),
            Error::Network {
                what,
                url,
                retries,
                source,
            } => {
                let mut text = source.to_string();
                let mut cause = source.source();
                while let Some(c) = cause {
                    text.push_str(": ");
                    text.push_str(&c.to_string());
                    cause = c.source();
                }
                Error::Network {
                    what,
                    url: url.clone(),
                    retries: *retries,
                    source: text.into(),
                }
            }
            Error::Tls {
                url,
                message,
                not_tls,
            } => Error::Tls {
                url: url.clone(),
                message: message.clone(),
                not_tls: *not_tls,
            },
            Error::Protocol { url, message } => Error::Protocol {
                url: url.clone(),
                message: message.clone(),
            },
            Error::Internal(m) => Error::Internal(m.clone()),
            Error::Cancelled { reference, path } => Error::Cancelled {
                reference: reference.clone(),
                path: path.clone(),
            },
            Error::Unreachable { url, reason } => Error::Unreachable {
                url: url.clone(),
                reason: reason.clone(),
            },
            Error::NameInUse {
                path,
                name,
                held_by,
                wanted,
            } => Error::NameInUse {
                path: path.clone(),
                name: name.clone(),
                held_by: held_by.clone(),
                wanted: wanted.clone(),
            },
            Error::NoSpace {
                path,
                needed,
                available,
            } => Error::NoSpace {
                path: path.clone(),
                needed: *needed,
                available: *available,
            },
            Error::Registry {
                url,
                status,
                code,
                message,
                retry_after,
                retries,
            } => Error::Registry {
                url: url.clone(),
                status: *status,
                code: code.clone(),
                message: message.clone(),
                retry_after: *retry_after,
                retries: *retries,
            },
            Error::ManifestNotFound {
                reference,
                registry,
                code,
            } => Error::ManifestNotFound {
                reference: reference.clone(),
                registry: registry.clone(),
                code: code.clone(),
            },
            Error::Unauthorized {
                registry,
                repository,
                code,
                message,
            } => Error::Unauthorized {
                registry: registry.clone(),
                repository: repository.clone(),
                code: code.clone(),
                message: message.clone(),
            },
            Error::ManifestTooLarge { url, limit } => Error::ManifestTooLarge {
                url: url.clone(),
                limit: *limit,
            },
            Error::InvalidManifest { what, reason } => Error::InvalidManifest {
                what: what.clone(),
                reason: reason.clone(),
            },
            Error::NoMatchingPlatform {
                wanted,
                reference,
                available,
            } => Error::NoMatchingPlatform {
                wanted: wanted.clone(),
                reference: reference.clone(),
                available: available.clone(),
            },
            Error::DigestMismatch {
                what,
                expected,
                actual,
            } => Error::DigestMismatch {
                what: what.clone(),
                expected: *expected,
                actual: *actual,
            },
            Error::SizeMismatch {
                what,
                expected,
                actual,
            } => Error::SizeMismatch {
                what: what.clone(),
                expected: *expected,
                actual: *actual,
            },
            Error::Io { op, path, source } => Error::Io {
                op,
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::Credentials { origin, message } => Error::Credentials {
                origin: origin.clone(),
                message: message.clone(),
            },
            Error::Destination { path, reason } => Error::Destination {
                path: path.clone(),
                reason: reason.clone(),
            },
            Error::Layer {
                layer,
                entry,
                reason,
            } => Error::Layer {
                layer: *layer,
                entry: entry.clone(),
                reason: reason.clone(),
            },
            Error::Unpack {
                layer,
                entry,
                op,
                source,
            } => Error::Unpack {
                layer: *layer,
                entry: entry.clone(),
                op,
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
        }
    }

    /// Records how many retries were spent before giving up.
    pub(crate) fn with_retries(mut self, n: u32) -> Self {
        match &mut self {
            Error::Network { retries, .. } | Error::Registry { retries, .. } => *retries = n,
            _ => {}
        }
        self
    }
}

/// A URL fit for logs and errors: the query string (presigned signatures, tokens), any
/// fragment and any user-info are dropped.
pub fn redact_url(url: &str) -> String {
    // A fragment never goes over the wire, and may hold what a query would.
    let url = url.split_once('#').map_or(url, |(u, _)| u);
    let (base, had_query) = match url.split_once('?') {
        Some((b, _)) => (b, true),
        None => (url, false),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('/') {
            Some((authority, path)) => {
                let host = authority.rsplit('@').next().unwrap_or(authority);
                format!("{scheme}://{host}/{path}")
            }
            None => format!("{scheme}://{}", rest.rsplit('@').next().unwrap_or(rest)),
        },
        None => base.to_string(),
    };
    if had_query {
        format!("{base}?<redacted>")
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_drops_queries_and_userinfo() {
        assert_eq!(
            redact_url("https://cdn.example/blobs/x?X-Amz-Signature=secret&t=1"),
            "https://cdn.example/blobs/x?<redacted>"
        );
        assert_eq!(
            redact_url("https://user:pw@host:5000/v2/"),
            "https://host:5000/v2/"
        );
        assert_eq!(redact_url("http://h/v2/a"), "http://h/v2/a");
        assert_eq!(redact_url("https://h/cb#access_token=s3"), "https://h/cb");
        assert_eq!(
            redact_url("https://h/cb?x=1#t=s3"),
            "https://h/cb?<redacted>"
        );
    }

    #[test]
    fn categories_map_to_documented_exit_codes() {
        let e = Error::InvalidPlatform("x".into());
        assert_eq!(e.category().exit_code(), 2);
        let e = Error::ManifestNotFound {
            reference: "r".into(),
            registry: "h".into(),
            code: None,
        };
        assert_eq!(e.category().exit_code(), 3);
        let e = Error::SizeMismatch {
            what: "b".into(),
            expected: 1,
            actual: 2,
        };
        assert_eq!(e.category().exit_code(), 4);
        let e = Error::io("open", "/x", std::io::Error::other("boom"));
        assert_eq!(e.category().exit_code(), 5);
    }

    #[test]
    fn duplicates_keep_kind_and_text() {
        let source: BoxError = Box::new(std::io::Error::other(Error::Internal("deep".into())));
        let e = Error::Network {
            what: "connect to",
            url: "http://h/".into(),
            retries: 2,
            source,
        };
        let d = e.duplicate();
        assert_eq!(d.to_string(), e.to_string());
        assert!(d.is_transient());
        assert!(matches!(
            d,
            Error::Network {
                what: "connect to",
                ..
            }
        ));
        let e = Error::Unauthorized {
            registry: "r".into(),
            repository: "a/b".into(),
            code: Some("DENIED".into()),
            message: "no".into(),
        };
        assert_eq!(e.duplicate().to_string(), e.to_string());
        assert_eq!(e.duplicate().category(), Category::Registry);
    }

    #[test]
    fn network_errors_say_how_hard_we_tried() {
        let e = Error::network(
            "GET",
            "http://h/v2/?token=abc",
            std::io::Error::other("reset"),
        )
        .with_retries(3);
        let msg = e.to_string();
        assert!(msg.contains("after 3 retries"), "{msg}");
        assert!(!msg.contains("abc"), "{msg}");
        assert!(e.is_transient());
    }
}
