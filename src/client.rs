//! [`Client`]: the library's entry point. Holds the options and the HTTP transport, and
//! runs a pull through the stages: reference → registry/manifest → plan → fetch → layout.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::auth::TokenCache;
use crate::convert::{self, Conversion};
use crate::credentials::CredentialStore;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fetch::{FanOut, FetchOptions, Fetcher};
use crate::http::{TlsOptions, Transport, DEFAULT_CERT_DIRS};
use crate::layout::{Destination, Format, ImageName, Layout, ManifestRecord};
use crate::manifest::{self, BlobDescriptor, BlobKind, Document, Platform};
use crate::plan::Plan;
use crate::progress::{EventKind, NoReporter, PullId, PullReporter, Reporter};
use crate::reference::Reference;
use crate::registry::{Access, Endpoint, FetchedManifest, Registry};
use crate::request::{PullOptions, PullRequest};
use crate::retry::RetryPolicy;
use crate::stream::BlobReader;
use crate::unpack::{self, Staging, UnpackSummary};
use crate::verify::{self, HashPool};

/// Default HTTP requests in flight (overall and per blob); see perf/RESULTS.md.
pub const DEFAULT_CONNECTIONS: usize = 64;
/// Default smallest piece a blob is cut into ([`ClientBuilder::chunk_size`]).
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// Default times a blob with the wrong digest is fetched again.
pub const DEFAULT_REPAIR_ATTEMPTS: u32 = 2;
/// Default bound on a layer's tar bytes per compressed byte ([`ClientBuilder::max_unpack_ratio`]).
pub const DEFAULT_MAX_UNPACK_RATIO: u64 = crate::unpack::DEFAULT_MAX_RATIO;

/// Pulls images. Cheap to clone; reuse one for many pulls to share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Transport,
    /// What a [`PullRequest`] starts from.
    defaults: PullOptions,
    plain_http: bool,
    fetch: FetchOptions,
    /// Kept partial downloads are indexed for pulls into other destinations, and theirs
    /// taken (the layout's business, not the fetcher's; only when they are kept at all).
    share_partials: bool,
    retry: RetryPolicy,
    hash_pool: Arc<HashPool>,
    reporter: Arc<dyn Reporter>,
    credentials: CredentialStore,
    tokens: Arc<TokenCache>,
    /// Registry (`docker.io`, `host[:port]`) → its mirrors, in order.
    mirrors: Vec<(String, Endpoint)>,
    /// Root filesystems: most tar bytes per compressed byte of a layer (0: no bound).
    max_unpack_ratio: u64,
}

/// Options for a [`Client`].
#[derive(Clone)]
pub struct ClientBuilder {
    defaults: PullOptions,
    plain_http: bool,
    connections: usize,
    connections_per_blob: usize,
    chunk_size: u64,
    hash_threads: usize,
    fan_out: FanOut,
    retries: u32,
    retry_delay: Duration,
    connect_timeout: Duration,
    stall_timeout: Duration,
    user_agent: String,
    reporter: Arc<dyn Reporter>,
    credentials: CredentialStore,
    tls: TlsOptions,
    default_cert_dirs: bool,
    proxy_from_env: bool,
    mirrors: Vec<(String, String)>,
    resume: bool,
    share_partials: bool,
    repair_attempts: u32,
    max_unpack_ratio: u64,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            defaults: PullOptions::default(),
            plain_http: false,
            connections: DEFAULT_CONNECTIONS,
            connections_per_blob: DEFAULT_CONNECTIONS,
            chunk_size: DEFAULT_CHUNK_SIZE,
            hash_threads: 0,
            fan_out: FanOut::Auto,
            retries: 5,
            retry_delay: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(20),
            user_agent: concat!("fastpull/", env!("CARGO_PKG_VERSION")).to_string(),
            reporter: Arc::new(NoReporter),
            credentials: CredentialStore::from_env(),
            tls: TlsOptions::default(),
            default_cert_dirs: true,
            proxy_from_env: true,
            mirrors: Vec::new(),
            resume: true,
            share_partials: false,
            repair_attempts: DEFAULT_REPAIR_ATTEMPTS,
            max_unpack_ratio: DEFAULT_MAX_UNPACK_RATIO,
        }
    }
}

impl ClientBuilder {
    /// The platform to pick from multi-platform images (default: this machine's). Call it
    /// again to add platforms: the index and each platform's manifest are kept, blobs
    /// shared. A single-platform image is checked against it (its config's os and
    /// architecture): a mismatch is [`Error::NoMatchingPlatform`].
    pub fn platform(mut self, platform: Platform) -> Self {
        self.defaults.add_platform(platform);
        self
    }

    /// Every platform of a multi-platform image (the index and all its image manifests).
    pub fn all_platforms(mut self, yes: bool) -> Self {
        self.defaults.all_platforms = yes;
        self
    }

    /// The on-disk layout (default: OCI image layout). With an archive format
    /// ([`Format::DockerArchive`], [`Format::OciArchive`]) the destination is a file.
    pub fn format(mut self, format: Format) -> Self {
        self.defaults.format = format;
        self
    }

    /// Rewrite Docker schema 2 manifests with OCI media types before they are stored
    /// ([`Conversion::Oci`]; default [`Conversion::Keep`]: as received). The manifest gets
    /// a new digest ([`PullReport::manifest_digest`]); the registry's is kept in
    /// [`PullReport::source_manifest_digest`] and in an annotation. See [`crate::convert`].
    pub fn convert(mut self, conversion: Conversion) -> Self {
        self.defaults.conversion = conversion;
        self
    }

    /// Let a pull into an OCI layout replace an `index.json` entry of the same name that
    /// holds another repository's image (default: refused with [`Error::NameInUse`]; that
    /// image's blobs are left in the layout, unreferenced).
    pub fn replace(mut self, yes: bool) -> Self {
        self.defaults.replace = yes;
        self
    }

    /// Speak plain HTTP to every registry. Without it, HTTPS is used, falling back to HTTP
    /// only for loopback registries that do not speak TLS.
    pub fn plain_http(mut self, yes: bool) -> Self {
        self.plain_http = yes;
        self
    }

    /// HTTP requests in flight for the whole pull: how many connections blobs and their
    /// range pieces are spread over (default 64); how many of these a server gets is measured
    /// as the pull goes (see [`FanOut`]).
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }

    /// HTTP requests in flight for one blob (default 64).
    pub fn connections_per_blob(mut self, n: usize) -> Self {
        self.connections_per_blob = n;
        self
    }

    /// The smallest piece a blob's range is cut into when a connection takes over part of
    /// it; blobs under twice this size are fetched in one request (default 1 MiB).
    pub fn chunk_size(mut self, bytes: u64) -> Self {
        self.chunk_size = bytes;
        self
    }

    /// How eagerly blobs are spread over connections: [`FanOut::Auto`] (default) adds
    /// connections to an origin while its aggregate goodput keeps rising; [`FanOut::Max`]
    /// uses every allowed connection at once.
    pub fn fan_out(mut self, fan_out: FanOut) -> Self {
        self.fan_out = fan_out;
        self
    }

    /// Resume partial downloads (default on): a pull keeps what it wrote when it stops
    /// (error, Ctrl-C, `kill -9`, power cut: README "Resume") in the destination's
    /// scratch directory, and the next pull into that destination fetches only what is
    /// missing. Off: leftovers of earlier pulls are removed first and nothing is kept.
    pub fn resume(mut self, yes: bool) -> Self {
        self.resume = yes;
        self
    }

    /// Lets a pull take over the partial download of a blob that a stopped pull into
    /// *another* destination kept (with resume on), through a per-user index of them in
    /// `$XDG_STATE_HOME/fastpull/partials` (else `~/.local/state/fastpull/partials`). Off
    /// by default in the library (an embedder may not want files in the user's state
    /// directory); the CLI turns it on. A destination still being pulled into keeps its
    /// files; only pairs on the same filesystem are moved.
    pub fn share_partials(mut self, yes: bool) -> Self {
        self.share_partials = yes;
        self
    }

    /// Root filesystems ([`Format::Rootfs`], [`PullRequest::unpack`]): a layer may give at
    /// most this many bytes of tar per compressed byte read, plus 1 MiB (decompression
    /// bombs). Default 1100, above deflate's own 1032:1, so no well-formed gzip layer is
    /// refused; zstd can exceed it (long runs of one byte). 0: no bound.
    pub fn max_unpack_ratio(mut self, ratio: u64) -> Self {
        self.max_unpack_ratio = ratio;
        self
    }

    /// Times a blob whose digest does not match is fetched again before the pull fails
    /// with [`Error::DigestMismatch`] (default 2). With mirrors, the next mirror (or the
    /// registry) gets the blob first.
    pub fn repair_attempts(mut self, n: u32) -> Self {
        self.repair_attempts = n;
        self
    }

    /// Threads hashing blobs beside the network (default 0: one per CPU).
    pub fn hash_threads(mut self, n: usize) -> Self {
        self.hash_threads = n;
        self
    }

    /// Retries of each request after a transient failure (connection reset, truncated body,
    /// stall, 5xx, 429), and the first back-off (doubling, capped at 10 s; a longer
    /// `Retry-After` wins). A retried range resumes from the byte it reached. Defaults: 5 and 250 ms.
    pub fn retries(mut self, retries: u32, first_delay: Duration) -> Self {
        self.retries = retries;
        self.retry_delay = first_delay;
        self
    }

    /// A request that sends nothing for this long is re-issued (default 20 s).
    pub fn stall_timeout(mut self, t: Duration) -> Self {
        self.stall_timeout = t;
        self
    }

    /// Connection set-up timeout (default 30 s).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// The `User-Agent` header.
    pub fn user_agent(mut self, ua: impl Into<String>) -> Self {
        self.user_agent = ua.into();
        self
    }

    /// Where progress events go (default: nowhere).
    pub fn reporter(mut self, reporter: Arc<dyn Reporter>) -> Self {
        self.reporter = reporter;
        self
    }

    /// Where registry credentials come from (default: [`CredentialStore::from_env`], the
    /// files and helpers docker, podman and skopeo use).
    pub fn credentials(mut self, store: CredentialStore) -> Self {
        self.credentials = store;
        self
    }

    /// Trusts the certificates of a PEM file for every host, beside the system's roots
    /// (which honour `SSL_CERT_FILE`).
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca_files.push(path.into());
        self
    }

    /// Looks for per-registry certificates in `dir/<host[:port]>/` (docker's `certs.d`:
    /// `*.crt` CA roots, `*.cert` + `*.key` client certificate) instead of the defaults,
    /// [`DEFAULT_CERT_DIRS`]. Repeatable.
    pub fn cert_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        if self.default_cert_dirs {
            self.default_cert_dirs = false;
            self.tls.cert_dirs.clear();
        }
        self.tls.cert_dirs.push(dir.into());
        self
    }

    /// Does not verify TLS certificates of this registry (`host` for any port, or
    /// `host:port`), and lets it fall back to plain HTTP, as docker's insecure registries.
    /// Other hosts are verified as usual.
    pub fn insecure_registry(mut self, host: impl Into<String>) -> Self {
        let host = host.into();
        // `https://reg:5000/` names the same registry as `reg:5000`.
        let bare = host
            .split_once("://")
            .map_or(host.as_str(), |(_, rest)| rest)
            .trim_end_matches('/')
            .to_string();
        self.tls.insecure.push(bare);
        self
    }

    /// Whether to use the proxies named by `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and
    /// `NO_PROXY` (curl's rules; default yes).
    pub fn proxy_from_env(mut self, yes: bool) -> Self {
        self.proxy_from_env = yes;
        self
    }

    /// Tries `mirror` (`host[:port]`, or `http://host[:port]` for plain HTTP) before
    /// `registry` (`docker.io`, `host[:port]`) itself; a mirror that fails or lacks the
    /// image is left for the next one, and finally the registry. Repeatable, in order.
    pub fn mirror(mut self, registry: impl Into<String>, mirror: impl Into<String>) -> Self {
        self.mirrors.push((registry.into(), mirror.into()));
        self
    }

    /// Checks the options and builds the client.
    pub fn build(self) -> Result<Client> {
        if self.connections == 0 || self.connections > 1024 {
            return Err(Error::InvalidOption(format!(
                "connections must be 1 to 1024, not {}",
                self.connections
            )));
        }
        if self.connections_per_blob == 0 {
            return Err(Error::InvalidOption(
                "connections per blob must be at least 1".into(),
            ));
        }
        if self.chunk_size < 64 * 1024 {
            return Err(Error::InvalidOption(format!(
                "chunk size must be at least 64 KiB, not {}",
                self.chunk_size
            )));
        }
        if self.stall_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(Error::InvalidOption("timeouts must be positive".into()));
        }
        let mut mirrors = Vec::new();
        for (registry, mirror) in &self.mirrors {
            mirrors.push((normalize_registry(registry)?, parse_mirror(mirror)?));
        }
        let mut tls = self.tls.clone();
        if self.default_cert_dirs {
            tls.cert_dirs = DEFAULT_CERT_DIRS.iter().map(PathBuf::from).collect();
        }
        let transport = Transport::new(
            &self.user_agent,
            self.connect_timeout,
            self.stall_timeout,
            self.connections,
            tls,
            self.proxy_from_env,
        )?;
        let hash_pool = HashPool::new(self.hash_threads)
            .map_err(|e| Error::InvalidOption(format!("cannot start hashing threads: {e}")))?;
        let retry = RetryPolicy {
            retries: self.retries,
            base_delay: self.retry_delay,
        };
        Ok(Client {
            inner: Arc::new(Inner {
                transport,
                defaults: self.defaults,
                plain_http: self.plain_http,
                fetch: FetchOptions {
                    connections: self.connections,
                    connections_per_blob: self.connections_per_blob,
                    min_piece: self.chunk_size,
                    fan_out: self.fan_out,
                    retry,
                    stall_timeout: self.stall_timeout,
                    resume: self.resume,
                    repair_attempts: self.repair_attempts,
                    scratch: false,
                },
                share_partials: self.resume && self.share_partials,
                retry,
                hash_pool: Arc::new(hash_pool),
                reporter: self.reporter,
                credentials: self.credentials,
                tokens: Arc::new(TokenCache::default()),
                mirrors,
                max_unpack_ratio: self.max_unpack_ratio,
            }),
        })
    }
}

/// What a reference names, from [`Client::resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Resolution {
    /// The manifest's digest (the image's true name).
    pub digest: Digest,
    /// Its media type (an index or an image manifest).
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A manifest as the registry sent it, from [`Client::manifest`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ManifestBytes {
    /// The bytes, verified against `digest`.
    pub bytes: Vec<u8>,
    /// Their sha256.
    pub digest: Digest,
    /// The media type.
    pub media_type: String,
}

/// One image manifest a pull wrote.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ManifestReport {
    /// Its digest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its platform, when it came from an index.
    pub platform: Option<Platform>,
}

/// What a pull did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PullReport {
    /// The pull's id (its events carried it).
    pub pull_id: PullId,
    /// The reference pulled.
    pub reference: Reference,
    /// Digest of what the reference names (the index for multi-platform images): the
    /// image's `repo@digest` name.
    pub digest: Digest,
    /// Digest of the platform's image manifest written to disk.
    pub manifest_digest: Digest,
    /// Media type of that manifest.
    pub manifest_media_type: String,
    /// When a [`Conversion`] rewrote the manifest: its digest as the registry served it
    /// (`manifest_digest` is then the rewritten one's).
    pub source_manifest_digest: Option<Digest>,
    /// The name the image is recorded under (`org.opencontainers.image.ref.name`); none
    /// for a pull by digest that was given no name.
    pub name: Option<String>,
    /// The platform chosen, when the reference named an index.
    pub platform: Option<Platform>,
    /// Every image manifest written (one per platform pulled; the first is
    /// `manifest_digest`).
    pub manifests: Vec<ManifestReport>,
    /// Config first, then layers in manifest order (duplicates removed).
    pub blobs: Vec<BlobReport>,
    /// Bytes downloaded (blobs skipped as present do not count).
    pub bytes_downloaded: u64,
    /// Total size of the image's blobs.
    pub bytes_total: u64,
    /// Time to resolve the reference to a manifest.
    pub resolve_time: Duration,
    /// Time to fetch and verify the blobs.
    pub fetch_time: Duration,
    /// Wall time of the whole pull.
    pub elapsed: Duration,
    /// Where the image is: a directory, or an archive file.
    pub dest: PathBuf,
    /// In which layout.
    pub format: Format,
    /// With [`Format::Rootfs`] or [`PullRequest::unpack`]: what unpacking the layers did.
    pub unpacked: Option<UnpackSummary>,
    /// Where the root filesystem was written: `dest` with [`Format::Rootfs`], the path
    /// given to [`PullRequest::unpack`] beside a layout; none without either.
    pub rootfs: Option<PathBuf>,
}

/// One blob of a [`PullReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlobReport {
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
    /// Config or layer.
    pub kind: BlobKind,
    /// Already verified on disk, not downloaded.
    pub skipped: bool,
}

impl Client {
    /// A client with default options.
    pub fn new() -> Result<Client> {
        ClientBuilder::default().build()
    }

    /// Options for a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The registry of `reference` itself (mirrors are for pulls), ready for API calls.
    fn registry_for(&self, reference: &Reference) -> Registry {
        let inner = &*self.inner;
        let endpoint = self.endpoints(reference).pop().unwrap_or_else(|| Endpoint {
            host: reference.api_host().to_string(),
            plain_http: inner.plain_http,
            mirror: false,
        });
        Registry::connect(
            Access {
                transport: inner.transport.clone(),
                retry: inner.retry,
                credentials: &inner.credentials,
                tokens: inner.tokens.clone(),
            },
            &endpoint,
            reference,
        )
    }

    /// What `reference` names: its digest, media type and size (an index for a
    /// multi-platform image), as `docker buildx imagetools inspect` or `crane digest` say
    /// it. The manifest's bytes are checked against the digest (when pinned) and the
    /// registry's `Docker-Content-Digest`.
    pub async fn resolve(&self, reference: &Reference) -> Result<Resolution> {
        let m = self.manifest(reference).await?;
        Ok(Resolution {
            digest: m.digest,
            media_type: m.media_type,
            size: m.bytes.len() as u64,
        })
    }

    /// The manifest `reference` names, exactly as the registry sent it (an index for a
    /// multi-platform image), with its digest and media type.
    pub async fn manifest(&self, reference: &Reference) -> Result<ManifestBytes> {
        let registry = self.registry_for(reference);
        let m = registry
            .manifest(&reference.manifest_reference(), reference.digest(), None)
            .await?;
        Ok(ManifestBytes {
            bytes: m.bytes.to_vec(),
            digest: m.digest,
            media_type: m.media_type,
        })
    }

    /// The image config (JSON bytes, verified) of `reference`, for this client's platform
    /// when it names an index.
    pub async fn config(&self, reference: &Reference) -> Result<Vec<u8>> {
        let registry = self.registry_for(reference);
        let top = registry
            .manifest(&reference.manifest_reference(), reference.digest(), None)
            .await?;
        let image = match &top.document {
            Document::Image(_) => top,
            Document::Index(entries) => {
                let want = self.inner.defaults.first_wanted();
                let e = manifest::select(entries, &want, &reference.to_string())?;
                registry
                    .manifest(&e.digest.to_string(), Some(&e.digest), Some(e.size))
                    .await?
            }
        };
        let Document::Image(m) = &image.document else {
            return Err(Error::InvalidManifest {
                what: image.digest.to_string(),
                reason: "an index entry points to another index".into(),
            });
        };
        const MAX_CONFIG: usize = 64 << 20;
        Ok(registry
            .small_blob(&m.config.digest, MAX_CONFIG)
            .await?
            .to_vec())
    }

    /// The tags of `reference`'s repository (its tag or digest is ignored), every page.
    pub async fn tags(&self, reference: &Reference) -> Result<Vec<String>> {
        self.registry_for(reference).tags().await
    }

    /// Blob `digest` of `reference`'s repository as a verified stream: read it to EOF
    /// (`tokio::io::copy` into a file, a hasher, a decompressor); its sha256 and, when
    /// given, its size are checked at the end, and a mismatch is an error in place of EOF.
    pub async fn blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<BlobReader> {
        let body = self.registry_for(reference).blob_body(digest).await?;
        Ok(BlobReader::new(body, *digest, size))
    }

    /// A pull of `reference` into `dest` (a directory, or a file for an archive format),
    /// with this client's defaults: change what this pull needs (platform, format, name,
    /// reporter, cancellation) on the [`PullRequest`], then `.await` it. Any number may run
    /// at once on one client.
    pub fn request(&self, reference: &Reference, dest: impl AsRef<Path>) -> PullRequest<'_> {
        PullRequest::new(self, reference, dest.as_ref(), self.inner.defaults.clone())
    }

    /// Pulls `reference` into the directory `dest` (created if needed), or the file `dest`
    /// for an archive format, with this client's defaults. Blobs already verified there are
    /// kept; everything new is verified before it gets its final name, and the manifest is
    /// recorded last. (`self.request(reference, dest).await`.)
    pub async fn pull(&self, reference: &Reference, dest: impl AsRef<Path>) -> Result<PullReport> {
        self.request(reference, dest).await
    }

    /// As [`Client::pull`], recording the image under `dest.name` if it has one (see
    /// [`Destination`]).
    pub async fn pull_to(&self, reference: &Reference, dest: &Destination) -> Result<PullReport> {
        let mut request = self.request(reference, &dest.path);
        if let Some(name) = &dest.name {
            request = request.name(name.clone());
        }
        request.await
    }

    /// The client's reporter (the default for its pulls).
    pub(crate) fn default_reporter(&self) -> Arc<dyn Reporter> {
        self.inner.reporter.clone()
    }

    /// One pull, as a [`PullRequest`] describes it.
    pub(crate) async fn run_pull(
        &self,
        reference: &Reference,
        dest: &Destination,
        opts: &PullOptions,
        reporter: &PullReporter,
    ) -> Result<PullReport> {
        let inner = &*self.inner;
        let started = Instant::now();
        let name = ImageName::new(reference, dest.name.as_deref())?;
        if opts.format == Format::DockerArchive && name.repo_tag.is_none() && dest.name.is_some() {
            return Err(Error::InvalidOption(format!(
                "image name {:?}: a docker-archive names its image name:tag (RepoTags), not by digest",
                dest.name.as_deref().unwrap_or_default()
            )));
        }
        let job = Job {
            reference,
            name: &name,
            opts,
            reporter,
            started,
        };
        if opts.format == Format::Rootfs {
            if opts.unpack.is_some() {
                return Err(Error::InvalidOption(
                    "--unpack goes beside a layout (--format oci or dir); --format rootfs \
                     writes only the root filesystem"
                        .into(),
                ));
            }
            return self.pull_rootfs(dest, &job).await;
        }
        if let Some(rootfs) = &opts.unpack {
            return self.pull_unpacking(dest, rootfs, &job).await;
        }
        let layout = Layout::open(
            &dest.path,
            opts.format,
            inner.fetch.resume,
            &name,
            opts.replace,
        )?
        .with_shared_partials(inner.share_partials);
        let report = self.pull_endpoints(&job, &layout, None).await?;
        layout.finish()?;
        Ok(report)
    }

    /// `--format rootfs`: the blobs go to a scratch OCI layout in a staging directory
    /// beside `dest` (fetched and verified as for any pull), the layers are unpacked there
    /// (see [`crate::unpack`]), and the tree is renamed to `dest` once all are in. The
    /// staging directory, blobs included, is removed whatever happens.
    async fn pull_rootfs(&self, dest: &Destination, job: &Job<'_>) -> Result<PullReport> {
        if job.opts.all_platforms || job.opts.platforms.len() > 1 {
            return Err(Error::InvalidOption(
                "--format rootfs unpacks one platform: give at most one --platform (and no \
                 --all-platforms)"
                    .into(),
            ));
        }
        let staging = Staging::create(&dest.path)?.with_max_ratio(self.inner.max_unpack_ratio);
        let layout = Layout::open(&staging.blobs(), Format::Oci, false, job.name, true)?;
        let mut report = self.pull_endpoints(job, &layout, Some(&staging)).await?;
        drop(layout);
        staging.publish()?;
        report.dest = dest.path.clone();
        report.rootfs = Some(dest.path.clone());
        report.elapsed = job.started.elapsed();
        Ok(report)
    }

    /// `--unpack ROOTFS` beside a directory layout: the blobs go to `dest` as in any pull
    /// (resumed, reused when already verified there, the destination locked), and the
    /// layers are unpacked from them as they download into a staging directory beside
    /// `rootfs` (see [`crate::unpack`]); blobs verified in `dest` before the pull are
    /// unpacked from their files. Once every blob's digest and every layer's diff_id
    /// matched, the manifest is recorded in `dest`, then the tree is renamed to `rootfs`.
    /// A failure before that records nothing in `dest` (its verified blobs stay, as after
    /// any failed pull) and removes the staging directory (`rootfs` left as it was).
    async fn pull_unpacking(
        &self,
        dest: &Destination,
        rootfs: &Path,
        job: &Job<'_>,
    ) -> Result<PullReport> {
        let opts = job.opts;
        if !matches!(opts.format, Format::Oci | Format::Dir) {
            return Err(Error::InvalidOption(format!(
                "--unpack goes beside a directory layout (--format oci or dir), not {}",
                opts.format
            )));
        }
        if opts.all_platforms || opts.platforms.len() > 1 {
            return Err(Error::InvalidOption(
                "--unpack unpacks one platform: give at most one --platform (and no \
                 --all-platforms)"
                    .into(),
            ));
        }
        check_apart(&dest.path, rootfs)?;
        // ROOTFS first: refused (not empty, not a directory) before DEST is touched.
        let staging = Staging::create(rootfs)?.with_max_ratio(self.inner.max_unpack_ratio);
        let layout = Layout::open(
            &dest.path,
            opts.format,
            self.inner.fetch.resume,
            job.name,
            opts.replace,
        )?
        .with_shared_partials(self.inner.share_partials);
        let mut report = self.pull_endpoints(job, &layout, Some(&staging)).await?;
        layout.finish()?;
        // DEST is whole and recorded; the tree appears last. Should the rename fail (ROOTFS
        // appeared meanwhile), DEST stays as written and ROOTFS as it was.
        staging.publish()?;
        report.rootfs = Some(rootfs.to_path_buf());
        report.elapsed = job.started.elapsed();
        Ok(report)
    }

    /// The pull from the mirrors of the reference's registry in turn, then the registry.
    async fn pull_endpoints(
        &self,
        job: &Job<'_>,
        layout: &Layout,
        rootfs: Option<&Staging>,
    ) -> Result<PullReport> {
        let endpoints = self.endpoints(job.reference);
        let mut last = None;
        for (i, endpoint) in endpoints.iter().enumerate() {
            match self.pull_from(endpoint, job, layout, rootfs).await {
                Ok(report) => {
                    return Ok(report);
                }
                Err(e) if endpoint.mirror && e.may_try_elsewhere() => {
                    // Blobs it verified stay; the next endpoint fetches only the rest.
                    tracing::warn!(mirror = %endpoint.host, error = %e, "mirror failed; trying {}", endpoints.get(i + 1).map_or("nothing", |n| n.host.as_str()));
                    job.reporter.report(EventKind::EndpointFailed {
                        host: endpoint.host.clone(),
                        error: e.to_string(),
                    });
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Internal("no endpoint to pull from".into())))
    }

    /// The mirrors of the reference's registry, then the registry itself.
    fn endpoints(&self, reference: &Reference) -> Vec<Endpoint> {
        let inner = &*self.inner;
        let mut out: Vec<Endpoint> = inner
            .mirrors
            .iter()
            .filter(|(registry, _)| registry.eq_ignore_ascii_case(reference.registry()))
            .map(|(_, m)| Endpoint {
                plain_http: m.plain_http || inner.plain_http,
                ..m.clone()
            })
            .collect();
        out.push(Endpoint {
            host: reference.api_host().to_string(),
            plain_http: inner.plain_http,
            mirror: false,
        });
        out
    }

    async fn pull_from(
        &self,
        endpoint: &Endpoint,
        job: &Job<'_>,
        layout: &Layout,
        rootfs: Option<&Staging>,
    ) -> Result<PullReport> {
        let Job {
            reference,
            name,
            opts,
            reporter,
            started,
        } = *job;
        let inner = &*self.inner;
        let dest = layout.path();
        let registry = Registry::connect(
            Access {
                transport: inner.transport.clone(),
                retry: inner.retry,
                credentials: &inner.credentials,
                tokens: inner.tokens.clone(),
            },
            endpoint,
            reference,
        );
        let Resolved { top, images } = self
            .resolve_images(&registry, reference, layout, opts)
            .await?;
        // One platform of an index (or a plain image): its manifest is the entry. Several, or
        // all of an index: the index itself is, with every chosen manifest stored beside it.
        // (All platforms of a plain image is that image, as skopeo's --all takes it.)
        let several =
            images.len() > 1 || (opts.all_platforms && matches!(top.document, Document::Index(_)));
        if several && (opts.format.is_archive() || opts.conversion != Conversion::Keep) {
            return Err(Error::InvalidOption(
                "several platforms (--all-platforms, a repeated --platform) are pulled into a \
                 directory layout (oci, dir) without --convert; archives and conversion take one"
                    .into(),
            ));
        }
        let (image, platform) = images
            .first()
            .map(|(m, p)| (m, p.clone()))
            .ok_or_else(|| Error::Internal("no image manifest resolved".into()))?;
        let mut parsed = Vec::with_capacity(images.len());
        for (m, _) in &images {
            let Document::Image(doc) = &m.document else {
                return Err(Error::InvalidManifest {
                    what: m.digest.to_string(),
                    reason: "an index entry points to another index".into(),
                });
            };
            parsed.push(doc);
        }
        let received = parsed[0];
        // What is stored: the manifest as received, or as a conversion rewrote it.
        let converted = match opts.conversion {
            Conversion::Keep => None,
            Conversion::Oci => convert::to_oci(&image.bytes, &image.media_type, &image.digest)?,
        };
        let (stored_bytes, stored_digest, stored_type, reparsed) = match &converted {
            Some(c) => {
                let (_, doc) = manifest::parse(&c.bytes, Some(c.media_type), "converted manifest")?;
                let Document::Image(m) = doc else {
                    return Err(Error::Internal(
                        "a converted manifest is not an image".into(),
                    ));
                };
                tracing::info!(from = %image.digest, to = %c.digest, "manifest converted to OCI media types");
                (&c.bytes[..], c.digest, c.media_type, Some(m))
            }
            None => (
                &image.bytes[..],
                image.digest,
                image.media_type.as_str(),
                None,
            ),
        };
        let m = reparsed.as_ref().unwrap_or(received);
        // Every blob of every image manifest pulled; with several, the other manifests'
        // blobs ride along as "layers" of the record, so the layout keeps them all.
        let mut all: Vec<BlobDescriptor> = std::iter::once(m.config.clone())
            .chain(m.layers.iter().cloned())
            .collect();
        for other in &parsed[1..] {
            all.push(other.config.clone());
            all.extend(other.layers.iter().cloned());
        }
        let children: Vec<(Digest, &[u8])> = if several {
            images
                .iter()
                .map(|(m, _)| (m.digest, m.bytes.as_ref()))
                .collect()
        } else {
            Vec::new()
        };
        let record = ManifestRecord {
            bytes: if several {
                &top.bytes[..]
            } else {
                stored_bytes
            },
            digest: if several { top.digest } else { stored_digest },
            media_type: if several {
                top.media_type.as_str()
            } else {
                stored_type
            },
            name,
            platform: if several { None } else { platform.as_ref() },
            config: &m.config,
            layers: &all[1..],
            source_digest: converted.as_ref().map(|_| image.digest),
            children: &children,
        };
        layout.prepare(&record)?;
        tracing::info!(
            reference = %reference,
            digest = %top.digest,
            manifest = %image.digest,
            media_type = %image.media_type,
            platform = ?platform.as_ref().map(|p| p.to_string()),
            platforms = images.len(),
            base = %registry.base(),
            round_trips = %registry.round_trips(),
            "resolved"
        );
        reporter.report(EventKind::Resolved {
            digest: top.digest,
            manifest_digest: image.digest,
            platform: platform.clone(),
        });
        let resolve_time = started.elapsed();

        let present = match layout.verified_in_archive() {
            Some(in_place) => in_place,
            None => verified_on_disk(layout, &all).await?,
        };
        let plan = Plan::new(&all, &present);
        let mut seen = HashSet::new();
        let blobs: Vec<BlobReport> = all
            .iter()
            .filter(|b| seen.insert(b.digest))
            .map(|b| BlobReport {
                digest: b.digest,
                size: b.size,
                media_type: b.media_type.clone(),
                kind: b.kind,
                skipped: present.contains(&b.digest),
            })
            .collect();
        for b in &blobs {
            reporter.report(EventKind::BlobPlanned {
                digest: b.digest,
                size: b.size,
                kind: b.kind,
                present: b.skipped,
            });
        }

        tracing::info!(
            blobs = blobs.len(),
            to_fetch = plan.fetch.len(),
            bytes_to_fetch = plan.fetch_bytes(),
            present = plan.present.len(),
            "planned"
        );
        let fetch_started = Instant::now();
        // --format rootfs: the layers are unpacked while they download (see
        // `crate::unpack`), by a blocking task that follows each blob's written prefix.
        let mut session = match rootfs {
            Some(staging) => Some(unpack::Session::start(
                layout, m, staging, &all, &present, reporter,
            )?),
            None => None,
        };
        let watchers = session.as_ref().map(|s| s.watchers());
        let scratch = opts.format == Format::Rootfs;
        let fetcher = Fetcher {
            registry: &registry,
            layout,
            reporter,
            hash_pool: &inner.hash_pool,
            // On a mirror, a blob that does not verify goes to the next endpoint at once.
            options: FetchOptions {
                repair_attempts: if endpoint.mirror {
                    0
                } else {
                    inner.fetch.repair_attempts
                },
                // --format rootfs: the blobs go with the staging directory, whatever
                // happens (nothing to resume, nothing to make durable).
                resume: inner.fetch.resume && !scratch,
                scratch,
                ..inner.fetch
            },
            watch: watchers.as_deref(),
        };
        let fetch = fetcher.fetch_all(&plan.fetch);
        let bytes_downloaded = match session.as_mut() {
            Some(s) => s.follow(fetch).await?,
            None => fetch.await?,
        };
        let fetch_time = fetch_started.elapsed();
        tracing::info!(
            bytes = bytes_downloaded,
            secs = fetch_time.as_secs_f64(),
            mb_per_s = bytes_downloaded as f64 / 1e6 / fetch_time.as_secs_f64().max(1e-9),
            "blobs fetched and verified"
        );

        let unpacked = match (rootfs, session) {
            (Some(staging), Some(session)) => {
                Some(session.finish(layout, m, staging, reporter).await?)
            }
            (None, None) => None,
            _ => return Err(Error::Internal("a rootfs pull without its unpack".into())),
        };
        // A real destination (not --format rootfs's scratch layout) records the manifest
        // last: with --unpack, only once every layer matched its diff_id too.
        if opts.format != Format::Rootfs {
            layout.commit(&record)?;
        }
        let manifests = images
            .iter()
            .map(|(m, p)| ManifestReport {
                digest: m.digest,
                media_type: m.media_type.clone(),
                platform: p.clone(),
            })
            .collect();

        Ok(PullReport {
            pull_id: reporter.id,
            reference: reference.clone(),
            digest: top.digest,
            manifest_digest: stored_digest,
            manifest_media_type: stored_type.to_string(),
            source_manifest_digest: record.source_digest,
            name: name.ref_name.clone(),
            platform: platform.clone(),
            manifests,
            bytes_total: blobs.iter().map(|b| b.size).sum(),
            blobs,
            bytes_downloaded,
            resolve_time,
            fetch_time,
            elapsed: started.elapsed(),
            dest: dest.to_path_buf(),
            format: opts.format,
            unpacked,
            rootfs: None,
        })
    }

    /// Reference → what it names and the image manifests of the platforms wanted.
    async fn resolve_images(
        &self,
        registry: &Registry,
        reference: &Reference,
        layout: &Layout,
        opts: &PullOptions,
    ) -> Result<Resolved> {
        let top = registry
            .manifest(&reference.manifest_reference(), reference.digest(), None)
            .await?;
        match &top.document {
            Document::Image(m) => {
                if opts.platform_named() && !opts.all_platforms {
                    self.check_platform(registry, reference, layout, &m.config, opts)
                        .await?;
                }
                Ok(Resolved {
                    images: vec![(top.clone(), None)],
                    top,
                })
            }
            Document::Index(entries) => {
                let chosen: Vec<&manifest::IndexEntry> = if opts.all_platforms {
                    manifest::all_images(entries)
                } else {
                    let mut chosen: Vec<&manifest::IndexEntry> = Vec::new();
                    for want in &opts.wanted() {
                        let e = manifest::select(entries, want, &reference.to_string())?;
                        if !chosen.iter().any(|c| c.digest == e.digest) {
                            chosen.push(e);
                        }
                    }
                    chosen
                };
                let fetches = chosen.iter().map(|e| async move {
                    let m = registry
                        .manifest(&e.digest.to_string(), Some(&e.digest), Some(e.size))
                        .await?;
                    Ok::<_, Error>((m, e.platform.clone()))
                });
                let images = futures::future::try_join_all(fetches).await?;
                if images.is_empty() {
                    return Err(Error::InvalidManifest {
                        what: top.digest.to_string(),
                        reason: "the index lists no image manifest".into(),
                    });
                }
                Ok(Resolved { top, images })
            }
        }
    }

    /// A single-platform image pulled for named platforms: its config must say one of
    /// them (docker pulls it anyway with a warning; a wrong-architecture image is rarely
    /// what a pull by platform wants). The config, verified, goes straight into a directory
    /// layout; an archive gets it in its place with the other blobs (its blob path is the
    /// archive itself, which this must never write: were the pull to fail, the archive that
    /// was there would be gone).
    async fn check_platform(
        &self,
        registry: &Registry,
        reference: &Reference,
        layout: &Layout,
        config: &BlobDescriptor,
        opts: &PullOptions,
    ) -> Result<()> {
        const MAX_CONFIG: usize = 8 << 20;
        let bytes = registry.small_blob(&config.digest, MAX_CONFIG).await?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let field = |k: &str| v.get(k).and_then(|x| x.as_str());
        let (Some(os), Some(arch)) = (field("os"), field("architecture")) else {
            // A config that does not say (not an image config): nothing to check.
            return Ok(());
        };
        let have = Platform::new(os, arch, field("variant"));
        let wanted = opts.wanted();
        let fits = wanted
            .iter()
            .any(|want| want.compatible().contains(&have.normalized()));
        if !fits {
            return Err(Error::NoMatchingPlatform {
                wanted: wanted
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                reference: reference.to_string(),
                available: vec![have.to_string()],
            });
        }
        if layout.is_archive() {
            return Ok(());
        }
        let path = layout.blob_path(&config.digest);
        crate::write::write_atomic(&path, &bytes)
    }
}

/// One pull, as it goes from endpoint to endpoint.
#[derive(Clone, Copy)]
struct Job<'a> {
    reference: &'a Reference,
    name: &'a ImageName,
    opts: &'a PullOptions,
    reporter: &'a PullReporter,
    started: Instant,
}

/// What a reference resolved to.
struct Resolved {
    /// What the reference names (an index or an image manifest).
    top: FetchedManifest,
    /// The image manifests pulled, with their platform (from the index).
    images: Vec<(FetchedManifest, Option<Platform>)>,
}

/// Which of `blobs` are already in place and verified (re-hashed, off the async threads).
async fn verified_on_disk(layout: &Layout, blobs: &[BlobDescriptor]) -> Result<HashSet<Digest>> {
    // Owned inputs: a closure over borrowed descriptors would make the pull's future
    // not provably `Send` (rustc's higher-ranked closure inference), and pulls are spawned.
    let wanted: Vec<(PathBuf, Digest, u64)> = blobs
        .iter()
        .map(|b| (layout.blob_path(&b.digest), b.digest, b.size))
        .collect();
    let checks = wanted.into_iter().map(|(path, digest, size)| async move {
        let p = path.clone();
        let ok = tokio::task::spawn_blocking(move || verify::file_matches(&p, &digest, size))
            .await
            .map_err(|e| Error::io("verify", &path, std::io::Error::other(e.to_string())))?
            .map_err(|e| Error::io("verify", &path, e))?;
        Ok::<_, Error>(ok.then_some(digest))
    });
    let found: Vec<Option<Digest>> = futures::stream::iter(checks)
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    Ok(found.into_iter().flatten().collect())
}

/// `--unpack ROOTFS` and DEST must be apart: ROOTFS is not DEST nor inside it (the layout
/// would hold a foreign tree, and the tree's rename would land in the layout), and DEST is
/// not inside ROOTFS (which must be new or empty). Compared as the filesystem will resolve
/// them: symlinks of their existing part followed.
fn check_apart(dest: &Path, rootfs: &Path) -> Result<()> {
    let (d, r) = (resolved(dest)?, resolved(rootfs)?);
    let clash = if r.starts_with(&d) {
        "is DEST or inside it"
    } else if d.starts_with(&r) {
        "holds DEST"
    } else {
        return Ok(());
    };
    Err(Error::InvalidOption(format!(
        "--unpack {} {clash} ({}): the root filesystem goes beside the layout, apart from it",
        rootfs.display(),
        dest.display()
    )))
}

/// `path` made absolute, its longest existing ancestor canonicalized (symlinks and `..`
/// resolved) and the rest, which does not exist yet, normalized by its names.
fn resolved(path: &Path) -> Result<PathBuf> {
    use std::path::Component;
    let abs = std::path::absolute(path).map_err(|e| Error::io("resolve", path, e))?;
    let parts: Vec<Component<'_>> = abs.components().collect();
    for k in (1..=parts.len()).rev() {
        let head: PathBuf = parts[..k].iter().collect();
        let Ok(mut out) = std::fs::canonicalize(&head) else {
            continue;
        };
        for c in &parts[k..] {
            match c {
                Component::ParentDir => {
                    out.pop();
                }
                Component::Normal(n) => out.push(n),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
        return Ok(out);
    }
    Ok(abs)
}

/// `docker.io` for Docker Hub's other names; hosts lower-cased.
fn normalize_registry(name: &str) -> Result<String> {
    let n = name.trim().to_ascii_lowercase();
    if n.is_empty() || n.contains('/') {
        return Err(Error::InvalidOption(format!(
            "mirror: {name:?} is not a registry host (docker.io, host[:port])"
        )));
    }
    Ok(match n.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => n,
    })
}

/// `host[:port]`, `http://host[:port]` or `https://host[:port]` (a trailing `/` allowed).
fn parse_mirror(spec: &str) -> Result<Endpoint> {
    let (plain_http, rest) = if let Some(r) = spec.strip_prefix("http://") {
        (true, r)
    } else if let Some(r) = spec.strip_prefix("https://") {
        (false, r)
    } else {
        (false, spec)
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return Err(Error::InvalidOption(format!(
            "mirror {spec:?}: expected host[:port], http://host[:port] or https://host[:port]"
        )));
    }
    Ok(Endpoint {
        host: host.to_ascii_lowercase(),
        plain_http,
        mirror: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_specs() {
        assert_eq!(
            parse_mirror("Mirror.corp:5000").unwrap(),
            Endpoint {
                host: "mirror.corp:5000".into(),
                plain_http: false,
                mirror: true
            }
        );
        assert!(parse_mirror("http://m:80/").unwrap().plain_http);
        assert!(!parse_mirror("https://m").unwrap().plain_http);
        for bad in ["", "m/path", "http://", "u@m", "m?x"] {
            assert!(parse_mirror(bad).is_err(), "{bad:?}");
        }
        assert_eq!(normalize_registry("index.docker.io").unwrap(), "docker.io");
        assert_eq!(normalize_registry("GHCR.io").unwrap(), "ghcr.io");
        assert!(normalize_registry("ghcr.io/org").is_err());
    }

    #[test]
    fn mirrors_go_first_and_only_for_their_registry() {
        let client = Client::builder()
            .mirror("docker.io", "m1:5000")
            .mirror("registry-1.docker.io", "http://m2")
            .mirror("ghcr.io", "m3")
            .build()
            .unwrap();
        let hub: Reference = "alpine".parse().unwrap();
        let hosts: Vec<(String, bool, bool)> = client
            .endpoints(&hub)
            .into_iter()
            .map(|e| (e.host, e.plain_http, e.mirror))
            .collect();
        assert_eq!(
            hosts,
            vec![
                ("m1:5000".into(), false, true),
                ("m2".into(), true, true),
                ("registry-1.docker.io".into(), false, false),
            ]
        );
        let other: Reference = "quay.io/a/b".parse().unwrap();
        assert_eq!(client.endpoints(&other).len(), 1);
    }
}
