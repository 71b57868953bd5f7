//! Command-line flags, turned into checked options in one place.

use std::error::Error as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use fastpull::credentials::{Credential, CredentialStore, Secret};
use fastpull::{Client, Conversion, Destination, Error, Format, Platform, Reference};

use crate::console::Console;

const AFTER_HELP: &str = "\
Examples:
  fastpull alpine ./alpine
  fastpull --fan-out max -j 32 --chunk-size 16M ghcr.io/org/model:7b ./model
  fastpull --platform linux/arm64 ghcr.io/org/app:1.2 ./app
  fastpull --all-platforms alpine:3.20 ./alpine-all
  fastpull --format dir 127.0.0.1:5000/ns/repo@sha256:<64 hex> ./repo-dir
  fastpull --format docker-archive alpine:3.20 alpine.tar && docker load -i alpine.tar
  fastpull --format rootfs alpine:3.20 ./alpine-rootfs
  fastpull alpine:3.20 ./alpine --unpack ./alpine-rootfs
  fastpull --convert oci docker.io/library/debian:12 ./images:debian12
  fastpull --plain-http registry.lan:5000/tools/build:latest ./build
  echo \"$TOKEN\" | fastpull --username me --password-stdin ghcr.io/org/private:1 ./p
  fastpull --ca-file corp-ca.pem --mirror mirror.corp:5000 ubuntu:24.04 ./ubuntu

Output (--format):
  oci (default)  OCI image layout: oci-layout, index.json (tag in the
                 org.opencontainers.image.ref.name annotation), blobs/sha256/<hex>.
                 Read it with `skopeo copy oci:DEST:TAG ...` or `umoci unpack --image DEST:TAG`.
                 Several images share one layout, one index.json entry per name: DEST:NAME
                 (or --tag NAME) records the image as NAME instead of its tag. When the last
                 component of DEST holds a ':', the part from its first ':' on is NAME
                 (out:v2, out:myimg:v2); write a directory whose name holds ':' with a
                 trailing '/'. An entry of that name holding another repository's image is
                 not replaced without --replace (exit 5).
  dir            skopeo's dir: layout: version, manifest.json, one file per blob named by hex.
  docker-archive DEST is one tar file, as `docker save` (v25+) writes it: the OCI layout plus
                 docker's manifest.json (RepoTags: the image's name:tag, or --tag) and
                 repositories. `docker load -i DEST`, `podman load -i DEST`,
                 `skopeo copy docker-archive:DEST ...`.
  oci-archive    DEST is one tar file of an OCI image layout: `skopeo copy oci-archive:DEST ...`.
  rootfs         DEST is the image's root filesystem, as `umoci unpack` leaves it (blobs are
                 not kept). Every layer is verified (digest, and the config's diff_id) before
                 DEST appears; a failure leaves DEST as it was (exit 4 for a bad layer). No
                 entry can reach outside DEST. DEST must not exist or be an empty directory.
                 As root, owners and device nodes are as in the image; otherwise umoci's
                 rootless mode (owners in the user.rootlesscontainers xattr, device nodes
                 as empty files). One platform.
  --unpack ROOTFS (beside oci or dir): DEST is written as without it, and ROOTFS gets the
  root filesystem as with --format rootfs (unpacked as the layers download; blobs already in
  DEST are unpacked from there). ROOTFS appears only once every digest and diff_id matched,
  after DEST records the image; a layer that fails (exit 4) leaves ROOTFS as it was, and DEST
  with its verified blobs but without the image recorded. ROOTFS must not exist or be empty,
  and must lie apart from DEST (not DEST, inside it or around it: exit 2). One platform.
  An archive is written as DEST.fastpull-partial, each blob straight to its place in it, and
  renamed to DEST only once every blob in it is verified. Archives are not resumed.

Docker manifests: stored as received (their Docker media types), which skopeo's oci: and
  umoci do not read; --convert oci rewrites them with OCI media types (config and layers
  unchanged; the manifest gets a new digest, printed, with the registry's kept in the
  io.fastpull.source.digest annotation).

Exit codes:
  0  success
  1  internal error (a bug: please report it)
  130 interrupted (Ctrl-C, SIGTERM, SIGHUP): verified blobs are kept, and partial downloads
     too (in DEST/.fastpull-tmp, with their journals): the same command resumes them; a
     root filesystem (rootfs, --unpack) is not written
  2  usage: bad arguments, image reference, platform or option
  3  network or registry: unreachable, refused, not found, unauthorized,
     no manifest for the platform, unsupported manifest
  4  verification: a blob or manifest did not match its digest or size, or (rootfs,
     --unpack) a layer did not match its diff_id or cannot be unpacked safely
     (nothing is left under a final name)
  5  local I/O: destination unusable, in use, or its index.json gives the name to another
     repository's image (see --tag, --replace); permissions, disk full

Credentials (first match wins): --username/--password-stdin; else --authfile; else
  $REGISTRY_AUTH_FILE, $DOCKER_CONFIG/config.json (~/.docker/config.json),
  $XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json, with their
  credsStore / credHelpers (docker-credential-<name> on PATH).

Environment:
  FASTPULL_LOG   tracing filter (e.g. fastpull=debug), overrides -v
  HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY (and lower case): proxies, with curl's
                 rules (loopback too is proxied unless NO_PROXY names it): http://HOST:PORT,
                 or socks5:// / socks5h:// (names resolved by the proxy), with USER:PASS@
  SSL_CERT_FILE, SSL_CERT_DIR: the system's trusted roots";

/// Pull a container image to a directory, verifying every byte.
#[derive(Debug, Parser)]
#[command(name = "fastpull", version, about, after_help = AFTER_HELP)]
pub struct Args {
    /// Image to pull: NAME[:TAG][@DIGEST], e.g. alpine, ns/repo:tag, host:port/a/b@sha256:…
    #[arg(value_name = "IMAGE", required_unless_present_any = ["completions", "man"])]
    pub image: Option<String>,

    /// Directory to write the image to (created if needed); a file for an archive format.
    /// For the OCI layout, DEST:NAME names the image (see below).
    #[arg(value_name = "DEST", required_unless_present_any = ["completions", "man"])]
    pub dest: Option<PathBuf>,

    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell) and exit,
    /// e.g. `fastpull --completions bash > /etc/bash_completion.d/fastpull`.
    #[arg(long, value_name = "SHELL", conflicts_with_all = ["image", "dest", "man"])]
    pub completions: Option<clap_complete::Shell>,

    /// Print the man page (roff) and exit, e.g. `fastpull --man > /usr/local/share/man/man1/fastpull.1`.
    #[arg(long, conflicts_with_all = ["image", "dest"])]
    pub man: bool,

    /// Output: oci (OCI image layout), dir (skopeo's dir:), docker-archive (a tar for
    /// `docker load`), oci-archive (a tar of an OCI layout), rootfs (the unpacked root
    /// filesystem).
    #[arg(long, default_value = "oci", value_name = "FORMAT")]
    pub format: String,

    /// Also write the image's root filesystem to ROOTFS (new or empty), beside the layout
    /// at DEST (--format oci or dir; one platform); it appears once every layer is verified.
    #[arg(long, value_name = "ROOTFS")]
    pub unpack: Option<PathBuf>,

    /// Record the image as NAME: a tag (v2) or an image reference (myimg:v2,
    /// host/team/app:1): the OCI layout's ref.name annotation, docker-archive's RepoTags.
    #[arg(long, value_name = "NAME")]
    pub tag: Option<String>,

    /// Replace an OCI layout's index.json entry of the same name even if it holds another
    /// repository's image (whose blobs then stay in the layout, unreferenced).
    #[arg(long)]
    pub replace: bool,

    /// Rewrite Docker schema 2 manifests with OCI media types (oci), so that skopeo's oci:
    /// and umoci read them; none (default) stores manifests as received.
    #[arg(long, default_value = "none", value_name = "TO")]
    pub convert: String,

    /// Platform to pick from multi-platform images: os[/arch[/variant]] (default: this
    /// machine; `linux` alone means this machine's architecture). Repeatable: the index and
    /// each platform's manifest are kept. A single-platform image must match it (exit 3).
    #[arg(
        long,
        value_name = "OS[/ARCH[/VARIANT]]",
        conflicts_with = "all_platforms"
    )]
    pub platform: Vec<String>,

    /// Every platform of a multi-platform image: the index and all its image manifests.
    #[arg(long)]
    pub all_platforms: bool,

    /// Use plain HTTP for the registry (without it: HTTPS, falling back to HTTP only for
    /// loopback registries that do not speak TLS).
    #[arg(long)]
    pub plain_http: bool,

    /// Most HTTP requests in flight for the whole pull; how many each server gets is measured
    /// as the pull goes (see --fan-out).
    #[arg(short = 'j', long, default_value_t = fastpull::DEFAULT_CONNECTIONS, value_name = "N")]
    pub connections: usize,

    /// HTTP requests in flight for one blob [default: same as --connections].
    #[arg(long, value_name = "N")]
    pub connections_per_blob: Option<usize>,

    /// The smallest piece a blob's range is cut into when another connection takes over
    /// part of it (suffixes K, M, G = KiB, MiB, GiB); blobs under twice this size are
    /// fetched in one request.
    #[arg(long, default_value = "1M", value_name = "SIZE", value_parser = parse_size)]
    pub chunk_size: u64,

    /// How blobs are spread over connections: `auto` adds connections to a server while
    /// the total rate keeps rising; `max` uses every allowed connection at once, in pieces
    /// of exactly --chunk-size (for servers known to cap each connection).
    #[arg(long, default_value = "auto", value_name = "MODE", value_parser = parse_fan_out)]
    pub fan_out: fastpull::FanOut,

    /// Retries of each request after a transient failure (reset, truncation, stall, 5xx,
    /// 429); a retried range resumes where it stopped.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub retries: u32,

    /// Do not resume: remove partial downloads an earlier pull left in DEST, and keep none
    /// when this one stops.
    #[arg(long)]
    pub no_resume: bool,

    /// Times a blob whose digest does not match is fetched again before the pull fails
    /// (exit 4).
    #[arg(long, default_value_t = fastpull::DEFAULT_REPAIR_ATTEMPTS, value_name = "N")]
    pub repair_attempts: u32,

    /// Root filesystems (--format rootfs, --unpack): a layer may give at most N bytes of tar
    /// per compressed byte (decompression bombs; above gzip's own 1032:1; 0: no bound).
    #[arg(long, default_value_t = fastpull::DEFAULT_MAX_UNPACK_RATIO, value_name = "N")]
    pub max_unpack_ratio: u64,

    /// Seconds without data before a request is re-issued.
    #[arg(long, default_value_t = 20, value_name = "SECS")]
    pub stall_timeout: u64,

    /// Username for the image's registry; the password (or token) is read from stdin with
    /// --password-stdin.
    #[arg(long, value_name = "USER", requires = "password_stdin")]
    pub username: Option<String>,

    /// Read the password or token for --username from stdin (one line).
    #[arg(long, requires = "username")]
    pub password_stdin: bool,

    /// Read credentials only from this docker config.json / containers auth.json file.
    #[arg(long, value_name = "PATH")]
    pub authfile: Option<PathBuf>,

    /// Also trust the CA certificates in this PEM file (repeatable).
    #[arg(long, value_name = "PEM")]
    pub ca_file: Vec<PathBuf>,

    /// Per-registry certificates: DIR/<host[:port]>/ with *.crt CA roots and a *.cert +
    /// *.key client certificate (docker's certs.d; repeatable) [default:
    /// /etc/containers/certs.d, /etc/docker/certs.d].
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Vec<PathBuf>,

    /// Do not verify TLS certificates of this registry (HOST or HOST:PORT), and allow plain
    /// HTTP to it (repeatable). Other hosts stay verified.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub insecure: Vec<String>,

    /// Try MIRROR (host[:port], or http://host[:port]) before REGISTRY (default docker.io);
    /// a mirror that fails or lacks the image is left for the next source (repeatable).
    #[arg(long, value_name = "[REGISTRY=]MIRROR")]
    pub mirror: Vec<String>,

    /// Print only the image name when done (like `docker pull -q`).
    #[arg(short, long, conflicts_with = "json")]
    pub quiet: bool,

    /// Machine-readable output: one JSON object per line on stdout (events, then `done` or
    /// `error`); the schema is in README.md.
    #[arg(long)]
    pub json: bool,

    /// After a successful pull, write the digest of the manifest stored in DEST (the
    /// index's with several platforms) to FILE, as skopeo's --digestfile does.
    #[arg(long, value_name = "FILE")]
    pub digestfile: Option<PathBuf>,

    /// Log what happens (-v info, -vv debug, -vvv trace) to stderr.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Runs a pull as the flags say.
pub async fn run(args: Args) -> Result<(), Error> {
    if let Some(shell) = args.completions {
        let mut cmd = <Args as clap::CommandFactory>::command();
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, "fastpull", &mut out);
        return print_stdout(&out);
    }
    if args.man {
        let cmd = <Args as clap::CommandFactory>::command();
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut out)
            .map_err(|e| Error::InvalidOption(format!("--man: {e}")))?;
        return print_stdout(&out);
    }
    let console = Arc::new(Console::new(args.quiet, args.json));
    match pull(&args, &console).await {
        Ok(()) => Ok(()),
        Err(e) => {
            console.fail(&e, &describe(&e));
            Err(e)
        }
    }
}

/// The pull itself, reporting to `console`.
async fn pull(args: &Args, console: &Arc<Console>) -> Result<(), Error> {
    let (Some(image), Some(dest)) = (args.image.as_deref(), args.dest.clone()) else {
        return Err(Error::InvalidOption("IMAGE and DEST are required".into()));
    };
    let reference: Reference = image.parse()?;
    let format: Format = args.format.parse()?;
    let conversion: Conversion = args.convert.parse()?;
    let dest = if format == Format::Oci {
        Destination::split_name(&dest)
    } else {
        Destination::new(&dest)
    };
    let dest = match (dest.name.clone(), args.tag.clone()) {
        (Some(from_dest), Some(tag)) if from_dest != tag => {
            return Err(Error::InvalidOption(format!(
                "DEST names the image {from_dest:?} and --tag names it {tag:?}: give one"
            )))
        }
        (None, Some(tag)) => dest.named(tag),
        _ => dest,
    };
    let platforms: Vec<Platform> = args
        .platform
        .iter()
        .map(|p| p.parse())
        .collect::<Result<_, _>>()?;
    if args.stall_timeout == 0 {
        return Err(Error::InvalidOption(
            "--stall-timeout must be at least 1".into(),
        ));
    }
    let mut builder = Client::builder()
        .plain_http(args.plain_http)
        .connections(args.connections)
        .connections_per_blob(args.connections_per_blob.unwrap_or(args.connections))
        .chunk_size(args.chunk_size)
        .fan_out(args.fan_out)
        .retries(args.retries, Duration::from_millis(250))
        .stall_timeout(Duration::from_secs(args.stall_timeout))
        .resume(!args.no_resume)
        .share_partials(true)
        .repair_attempts(args.repair_attempts)
        .max_unpack_ratio(args.max_unpack_ratio);
    let mut store = match &args.authfile {
        Some(path) => CredentialStore::from_file(path),
        None => CredentialStore::from_env(),
    };
    if let Some(username) = &args.username {
        let password = read_password_stdin()?;
        store = store.with(
            reference.registry(),
            Credential::Basic {
                username: username.clone(),
                password,
            },
        );
    }
    builder = builder.credentials(store);
    for f in &args.ca_file {
        builder = builder.ca_file(f);
    }
    for d in &args.cert_dir {
        builder = builder.cert_dir(d);
    }
    for h in &args.insecure {
        builder = builder.insecure_registry(h);
    }
    for m in &args.mirror {
        let (registry, mirror) = m.split_once('=').unwrap_or(("docker.io", m));
        builder = builder.mirror(registry, mirror);
    }
    let client = builder.build()?;
    console.start(&reference);
    // Ctrl-C (or SIGTERM, SIGHUP) cancels the pull: in-flight requests stop, and what each blob
    // has written is flushed and journaled for the next run (unless --no-resume). The handlers
    // are in place before the pull's first step (which may create a directory that a signal's
    // default action would leave behind).
    let signals = Signals::register();
    let cancel = fastpull::CancellationToken::new();
    let on_signal = cancel.clone();
    let watcher = tokio::spawn(async move {
        signals.recv().await;
        on_signal.cancel();
    });
    let mut request = client
        .request(&reference, &dest.path)
        .format(format)
        .convert(conversion)
        .replace(args.replace)
        .all_platforms(args.all_platforms)
        .reporter(console.clone())
        .cancel_on(cancel);
    for p in platforms {
        request = request.platform(p);
    }
    if let Some(rootfs) = &args.unpack {
        request = request.unpack(rootfs);
    }
    if let Some(name) = &dest.name {
        request = request.name(name.clone());
    }
    let result = request.await;
    watcher.abort();
    if let Err(Error::Cancelled { .. }) = &result {
        console.interrupted();
        let scratch = dest.path.join(".fastpull-tmp");
        if format == Format::Rootfs {
            eprintln!(
                "fastpull: interrupted; {} was not written (a root filesystem appears whole or \
                 not at all; its staging directory beside it is removed)",
                dest.path.display()
            );
        } else if format.is_archive() {
            eprintln!(
                "fastpull: interrupted; {} was not written (an archive appears whole or not at \
                 all, and is not resumed)",
                dest.path.display()
            );
        } else if scratch.is_dir() {
            eprintln!(
                "fastpull: interrupted; verified blobs are kept, and partial downloads are kept \
                 in {} for the next run: the same command resumes them (--no-resume discards them)",
                scratch.display()
            );
        } else {
            eprintln!("fastpull: interrupted; verified blobs are kept");
        }
        if let Some(rootfs) = &args.unpack {
            eprintln!(
                "fastpull: {} was not written (a root filesystem appears whole or not at all; \
                 its staging directory beside it is removed)",
                rootfs.display()
            );
        }
        std::process::exit(fastpull::Category::Cancelled.exit_code());
    }
    let report = result?;
    if let Some(file) = &args.digestfile {
        let stored = if report.manifests.len() > 1 || args.all_platforms {
            report.digest
        } else {
            report.manifest_digest
        };
        std::fs::write(file, stored.to_string()).map_err(|e| Error::Io {
            op: "write",
            path: file.clone(),
            source: e,
        })?;
    }
    console.finish(&report);
    Ok(())
}

/// Writes generated text to stdout; a reader that went away (`| head`) is not an error.
fn print_stdout(bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::Io {
            op: "write",
            path: PathBuf::from("<stdout>"),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Ctrl-C (SIGINT), SIGTERM and SIGHUP, caught from the moment [`Signals::register`] returns.
struct Signals {
    #[cfg(unix)]
    unix: Option<[tokio::signal::unix::Signal; 3]>,
}

impl Signals {
    fn register() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let unix = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) {
                (Ok(i), Ok(t), Ok(h)) => Some([i, t, h]),
                _ => None,
            };
            Signals { unix }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Resolves on the first of them.
    async fn recv(self) {
        #[cfg(unix)]
        if let Some([mut i, mut t, mut h]) = self.unix {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
                _ = h.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The first line of stdin, without its line ending.
fn read_password_stdin() -> Result<Secret, Error> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| Error::InvalidOption(format!("--password-stdin: cannot read stdin: {e}")))?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(Error::InvalidOption(
            "--password-stdin: stdin held no password".into(),
        ));
    }
    Ok(Secret::new(password))
}

/// `8M`, `512K`, `1G`, `1048576`.
fn parse_fan_out(s: &str) -> Result<fastpull::FanOut, String> {
    match s {
        "auto" => Ok(fastpull::FanOut::Auto),
        "max" => Ok(fastpull::FanOut::Max),
        _ => Err(format!("expected auto or max, not {s:?}")),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 8M, 512K, 1G)"))
}

/// One clear line for an error: its message plus the causes it wraps.
pub fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        src = s.source();
    }
    text
}
