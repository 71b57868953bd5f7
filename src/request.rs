//! [`PullRequest`]: one pull and its own options — where the image goes and in which
//! [`Format`], which platforms, who hears its [`Event`](crate::Event)s, and what cancels it.
//! A [`Client`] holds what pulls share (connections, credentials, TLS, the hashing pool,
//! tuning); its builder's platform, format and reporter are only the defaults a request
//! starts from, so one client serves pulls that differ in all of them, at the same time.

use std::future::{Future, IntoFuture};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::client::{Client, PullReport};
use crate::convert::Conversion;
use crate::error::{Error, Result};
use crate::layout::{Destination, Format};
use crate::manifest::Platform;
use crate::progress::{PullId, PullReporter, Reporter};
use crate::reference::Reference;

/// What may differ from one pull to the next (the client's builder sets the defaults).
#[derive(Debug, Clone, Default)]
pub(crate) struct PullOptions {
    /// The platforms named; empty: this machine's.
    pub platforms: Vec<Platform>,
    /// Every platform of an index.
    pub all_platforms: bool,
    pub format: Format,
    pub conversion: Conversion,
    pub replace: bool,
    /// Also unpack the image's root filesystem here ([`PullRequest::unpack`]).
    pub unpack: Option<PathBuf>,
}

impl PullOptions {
    /// The platforms wanted: those named, or this machine's.
    pub fn wanted(&self) -> Vec<Platform> {
        if self.platforms.is_empty() {
            vec![Platform::host()]
        } else {
            self.platforms.clone()
        }
    }

    /// The first platform wanted (what `config` picks from an index).
    pub fn first_wanted(&self) -> Platform {
        self.platforms
            .first()
            .cloned()
            .unwrap_or_else(Platform::host)
    }

    /// Adds a platform, once.
    pub fn add_platform(&mut self, platform: Platform) {
        if !self.platforms.contains(&platform) {
            self.platforms.push(platform);
        }
    }

    /// Whether the caller named platforms (a single-platform image is then checked).
    pub fn platform_named(&self) -> bool {
        !self.platforms.is_empty()
    }
}

/// One pull, from [`Client::request`]: set what differs from the client's defaults, then
/// `.await` it (or call [`PullRequest::send`]).
///
/// ```no_run
/// # async fn run() -> fastpull::Result<()> {
/// use std::sync::Arc;
/// use fastpull::{CancellationToken, Client, Event, Format, Reference, Reporter};
///
/// struct Log;
/// impl Reporter for Log {
///     fn report(&self, event: &Event) {
///         eprintln!("{}: {:?}", event.pull, event.kind);
///     }
/// }
///
/// let client = Client::new()?;
/// let image: Reference = "alpine:3.20".parse()?;
/// let cancel = CancellationToken::new();
/// let arm = client
///     .request(&image, "./alpine-arm64.tar")
///     .platform("linux/arm64".parse()?)
///     .format(Format::DockerArchive)
///     .reporter(Arc::new(Log))
///     .cancel_on(cancel.clone());
/// let amd = client
///     .request(&image, "./alpine-amd64")
///     .platform("linux/amd64".parse()?);
/// // Both at once, over the client's shared connections.
/// let (arm, amd) = tokio::join!(arm.send(), amd.send());
/// println!("{} and {}", arm?.manifest_digest, amd?.manifest_digest);
/// # Ok(())
/// # }
/// ```
#[must_use = "a pull request does nothing until it is awaited"]
pub struct PullRequest<'c> {
    client: &'c Client,
    reference: Reference,
    dest: Destination,
    options: PullOptions,
    /// A platform was set on this request (the first replaces the client's).
    platform_set: bool,
    reporter: Option<Arc<dyn Reporter>>,
    cancel: Option<CancellationToken>,
    id: PullId,
}

impl<'c> PullRequest<'c> {
    pub(crate) fn new(
        client: &'c Client,
        reference: &Reference,
        dest: &Path,
        defaults: PullOptions,
    ) -> Self {
        PullRequest {
            client,
            reference: reference.clone(),
            dest: Destination::new(dest),
            options: defaults,
            platform_set: false,
            reporter: None,
            cancel: None,
            id: PullId::next(),
        }
    }

    /// This pull's id: every [`Event`](crate::Event) it sends and its
    /// [`PullReport`] carry it.
    pub fn id(&self) -> PullId {
        self.id
    }

    /// Records the image under `name` (`org.opencontainers.image.ref.name` in an OCI
    /// layout, `RepoTags` in a docker-archive) instead of the reference's tag, as skopeo's
    /// `DIR:NAME` does.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.dest = self.dest.named(name);
        self
    }

    /// The platform to pick from a multi-platform image. The first call replaces the
    /// client's platforms; call it again to add more (the index and each chosen manifest
    /// are kept, blobs shared; directory formats only). A single-platform image whose
    /// config names another platform fails with [`Error::NoMatchingPlatform`].
    pub fn platform(mut self, platform: Platform) -> Self {
        if !self.platform_set {
            self.options.platforms.clear();
            self.platform_set = true;
        }
        self.options.add_platform(platform);
        self
    }

    /// Every platform of a multi-platform image, with its index (directory formats only).
    pub fn all_platforms(mut self, yes: bool) -> Self {
        self.options.all_platforms = yes;
        self
    }

    /// How the image is laid out: a directory ([`Format::Oci`], [`Format::Dir`]) or one
    /// archive file ([`Format::DockerArchive`], [`Format::OciArchive`]) at the destination.
    pub fn format(mut self, format: Format) -> Self {
        self.options.format = format;
        self
    }

    /// Rewrite a Docker manifest with OCI media types ([`Conversion::Oci`]).
    pub fn convert(mut self, conversion: Conversion) -> Self {
        self.options.conversion = conversion;
        self
    }

    /// Replace a layout entry of the same name that holds another repository's image
    /// (otherwise [`Error::NameInUse`]).
    pub fn replace(mut self, yes: bool) -> Self {
        self.options.replace = yes;
        self
    }

    /// Also write the image's root filesystem to `rootfs`, beside the layout at the
    /// destination ([`Format::Oci`] or [`Format::Dir`]; one platform): the layers are
    /// unpacked as they download, as [`Format::Rootfs`] does, and `rootfs` appears only
    /// once every blob's digest and every layer's diff_id matched (then
    /// [`PullReport::unpacked`] says what was unpacked). The destination is written exactly
    /// as without it (resume, blobs already there, the manifest recorded last).
    ///
    /// `rootfs` must not exist or be an empty directory ([`Error::Destination`]), and must
    /// not be the destination, inside it or around it ([`Error::InvalidOption`], as an
    /// archive format, [`Format::Rootfs`] or several platforms are). If unpacking fails (a
    /// layer does not match its diff_id, or cannot be unpacked safely), the pull fails:
    /// `rootfs` is left as it was, and the destination keeps the verified blobs, as after
    /// any failed pull, but the image is not recorded in it (no `index.json` entry or
    /// `manifest.json`), since it is not whole. A cancelled pull leaves `rootfs` as it was too.
    ///
    /// ```no_run
    /// # async fn run() -> fastpull::Result<()> {
    /// use fastpull::{Client, Reference};
    ///
    /// let client = Client::new()?;
    /// let image: Reference = "alpine:3.20".parse()?;
    /// let report = client
    ///     .request(&image, "./alpine")
    ///     .unpack("./alpine-rootfs")
    ///     .await?;
    /// if let Some(u) = &report.unpacked {
    ///     println!("{} layers, {} entries in ./alpine-rootfs", u.layers, u.entries);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn unpack(mut self, rootfs: impl Into<PathBuf>) -> Self {
        self.options.unpack = Some(rootfs.into());
        self
    }

    /// Who hears this pull's events (instead of the client's reporter).
    pub fn reporter(mut self, reporter: Arc<dyn Reporter>) -> Self {
        self.reporter = Some(reporter);
        self
    }

    /// Stop the pull when `token` is cancelled: requests in flight are dropped, what each
    /// unfinished blob wrote is flushed and journaled for the next pull into the same
    /// destination (unless resuming is off), verified blobs stay, nothing is recorded in
    /// the layout, and the pull fails with [`Error::Cancelled`]. (Dropping the future does
    /// the same, without the error.)
    pub fn cancel_on(mut self, token: CancellationToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// Runs the pull (what `.await` on the request does).
    pub async fn send(self) -> Result<PullReport> {
        let reporter = PullReporter::new(
            self.id,
            self.reporter
                .unwrap_or_else(|| self.client.default_reporter()),
        );
        let run = self
            .client
            .run_pull(&self.reference, &self.dest, &self.options, &reporter);
        match self.cancel {
            None => run.await,
            Some(token) => {
                tokio::select! {
                    biased;
                    _ = token.cancelled() => Err(Error::Cancelled {
                        reference: self.reference.to_string(),
                        path: self.dest.path.clone(),
                    }),
                    r = run => r,
                }
            }
        }
    }
}

impl<'c> IntoFuture for PullRequest<'c> {
    type Output = Result<PullReport>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<PullReport>> + Send + 'c>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}
