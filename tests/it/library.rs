//! The library's calls besides `pull`, against the real registry: resolve, manifest, config,
//! tags (paginated), a blob as a verified stream that fails instead of ending when the
//! bytes are wrong, and pull requests: per-pull options and reporters, pull ids in events,
//! cancellation that leaves a resumable destination.

use std::sync::{Arc, Mutex};

use fastpull::{CancellationToken, Client, Event, EventKind, Format, PullId, Reference, Reporter};
use tokio::io::AsyncReadExt;

use crate::support::proxy::{Fault, FaultProxy, Rule};
use crate::support::*;

fn client() -> Client {
    Client::builder()
        .plain_http(true)
        .retries(1, std::time::Duration::from_millis(10))
        .build()
        .expect("client")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn resolve_manifest_config_and_tags() {
    let reg = Registry::start();
    let image = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(70, 1, 2000))
        .build();
    for tag in ["v1", "v2", "latest"] {
        push_image(&reg, "lib/img", tag, &image);
    }
    let r: Reference = format!("{}/lib/img:v2", reg.addr()).parse().expect("ref");
    let rt = rt();
    let c = client();
    let res = rt.block_on(c.resolve(&r)).expect("resolve");
    assert_eq!(res.digest.to_string(), image.manifest_digest);
    assert_eq!(res.media_type, image.manifest_media_type());
    assert_eq!(res.size, image.manifest.len() as u64);
    let m = rt.block_on(c.manifest(&r)).expect("manifest");
    assert_eq!(
        m.bytes, image.manifest,
        "the manifest as the registry sent it"
    );
    let config = rt.block_on(c.config(&r)).expect("config");
    assert_eq!(config, image.config.bytes);
    let mut tags = rt.block_on(c.tags(&r)).expect("tags");
    tags.sort();
    assert_eq!(tags, ["latest", "v1", "v2"]);
    // A missing tag is the registry's error, not a panic or an empty answer.
    let missing: Reference = format!("{}/lib/img:nope", reg.addr()).parse().expect("ref");
    let err = rt.block_on(c.resolve(&missing)).expect_err("missing tag");
    assert_eq!(err.category().exit_code(), 3, "{err}");
}

#[test]
fn a_blob_streams_verified_and_a_wrong_one_fails_at_the_end() {
    let reg = Registry::start();
    let image = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(71, 3, 300_000))
        .build();
    push_image(&reg, "lib/blob", "v1", &image);
    let layer = &image.layers[0];
    let digest: fastpull::Digest = layer.digest.parse().expect("digest");
    let rt = rt();
    let c = client();
    let r: Reference = format!("{}/lib/blob:v1", reg.addr()).parse().expect("ref");
    let mut reader = rt
        .block_on(c.blob(&r, &digest, Some(layer.bytes.len() as u64)))
        .expect("blob");
    let mut got = Vec::new();
    rt.block_on(reader.read_to_end(&mut got)).expect("read");
    assert!(got == layer.bytes, "the streamed bytes are the blob");

    // Through a proxy that flips a byte: the stream ends in an error, not EOF.
    let proxy = FaultProxy::start(&reg.addr());
    proxy.add(Rule::new(
        &format!("/blobs/{}", layer.digest),
        Fault::Corrupt { at: 1000 },
    ));
    let r: Reference = format!("{}/lib/blob:v1", proxy.addr())
        .parse()
        .expect("ref");
    let mut reader = rt.block_on(c.blob(&r, &digest, None)).expect("blob");
    let mut got = Vec::new();
    let err = rt
        .block_on(reader.read_to_end(&mut got))
        .expect_err("a corrupted blob must not read to EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains(&layer.digest), "{err}");
    // A reader that tries again gets the error again, never the EOF that says the bytes
    // were verified (red when the second read returned EOF).
    let mut more = Vec::new();
    let again = rt
        .block_on(reader.read_to_end(&mut more))
        .expect_err("a read after the error must not reach EOF");
    assert_eq!(again.kind(), std::io::ErrorKind::InvalidData, "{again}");
}

/// Keeps every event; optionally cancels `cancel` once a blob has `after` bytes.
#[derive(Default)]
struct Collect {
    events: Mutex<Vec<Event>>,
    cancel: Option<(CancellationToken, u64)>,
}

impl Collect {
    fn ids(&self) -> Vec<PullId> {
        let mut ids: Vec<PullId> = self
            .events
            .lock()
            .expect("events")
            .iter()
            .map(|e| e.pull)
            .collect();
        ids.dedup();
        ids
    }

    fn kinds(&self) -> Vec<EventKind> {
        let events = self.events.lock().expect("events");
        events.iter().map(|e| e.kind.clone()).collect()
    }
}

impl Reporter for Collect {
    fn report(&self, event: &Event) {
        if let (Some((token, after)), EventKind::BlobProgress { downloaded, .. }) =
            (&self.cancel, &event.kind)
        {
            if downloaded >= after {
                token.cancel();
            }
        }
        self.events.lock().expect("events").push(event.clone());
    }
}

fn done_count(kinds: &[EventKind]) -> usize {
    kinds
        .iter()
        .filter(|k| matches!(k, EventKind::BlobDone { .. }))
        .count()
}

/// Two pulls at once on one client, each with its own format, name, platform and reporter;
/// every event names its pull, and the client's own reporter (the default) hears only the
/// pull that did not set one.
#[test]
fn requests_carry_their_own_options_reporter_and_pull_id() {
    let reg = Registry::start();
    let amd64 = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(72, 2, 200_000))
        .build();
    let arm64 = ImageBuilder::new(Flavor::Oci)
        .platform("linux", "arm64", None)
        .layer(random_layer(73, 2, 200_000))
        .build();
    push_index(&reg, "lib/multi", "v1", Flavor::Oci, &[&amd64, &arm64]);
    let r: Reference = format!("{}/lib/multi:v1", reg.addr()).parse().expect("ref");
    let default_reporter = Arc::new(Collect::default());
    let client = Client::builder()
        .plain_http(true)
        .platform("linux/amd64".parse().expect("platform"))
        .reporter(default_reporter.clone())
        .build()
        .expect("client");
    let (a_reporter, b_reporter) = (Arc::new(Collect::default()), Arc::new(Collect::default()));
    let (_d, root) = dest();
    std::fs::create_dir_all(&root).expect("root");
    let (dir_dest, tar_dest) = (root.join("arm64-dir"), root.join("img.tar"));
    let rt = rt();
    let a = client
        .request(&r, &dir_dest)
        .format(Format::Dir)
        .platform("linux/arm64".parse().expect("platform"))
        .reporter(a_reporter.clone());
    let b = client
        .request(&r, &tar_dest)
        .format(Format::OciArchive)
        .name("saved/multi:copy")
        .reporter(b_reporter.clone());
    let (a_id, b_id) = (a.id(), b.id());
    assert_ne!(a_id, b_id);
    let (ra, rb) = rt.block_on(async { tokio::join!(a.send(), b.send()) });
    let (ra, rb) = (ra.expect("pull a"), rb.expect("pull b"));
    assert_eq!((ra.pull_id, rb.pull_id), (a_id, b_id));
    // a: the request's platform (not the client's), in skopeo's dir: layout.
    assert_eq!(ra.manifest_digest.to_string(), arm64.manifest_digest);
    assert_eq!(ra.format, Format::Dir);
    assert!(dir_dest.join("version").is_file() && dir_dest.join("manifest.json").is_file());
    assert_eq!(
        std::fs::read(dir_dest.join("manifest.json")).expect("manifest.json"),
        arm64.manifest
    );
    // b: the client's platform, as one oci-archive file, under the request's name.
    assert_eq!(rb.manifest_digest.to_string(), amd64.manifest_digest);
    assert_eq!(rb.format, Format::OciArchive);
    assert_eq!(rb.name.as_deref(), Some("saved/multi:copy"));
    assert!(tar_dest.is_file(), "the archive is a file");
    // Each reporter heard its own pull only, all of it.
    assert_eq!(a_reporter.ids(), vec![a_id]);
    assert_eq!(b_reporter.ids(), vec![b_id]);
    assert_eq!(done_count(&a_reporter.kinds()), 1 + arm64.layers.len());
    assert_eq!(done_count(&b_reporter.kinds()), 1 + amd64.layers.len());
    assert!(
        default_reporter.ids().is_empty(),
        "the client's reporter heard a pull that had its own"
    );
    // A pull without options: the client's defaults (OCI layout, amd64, its reporter).
    let (_d2, oci_dest) = dest();
    let rc = rt.block_on(client.pull(&r, &oci_dest)).expect("pull c");
    assert!(oci_dest.join("index.json").is_file());
    assert_eq!(rc.manifest_digest.to_string(), amd64.manifest_digest);
    assert_eq!(default_reporter.ids(), vec![rc.pull_id]);
    assert!(rc.pull_id != a_id && rc.pull_id != b_id);
    // A request's platform is checked like the CLI's: a single-platform image of another
    // platform is refused (exit 3), while the client's default pulls it.
    push_image(&reg, "lib/single", "v1", &amd64);
    let single: Reference = format!("{}/lib/single:v1", reg.addr())
        .parse()
        .expect("ref");
    let (_d3, other) = dest();
    let err = rt
        .block_on(
            client
                .request(&single, &other)
                .platform("linux/s390x".parse().expect("platform"))
                .send(),
        )
        .expect_err("wrong platform");
    assert!(
        matches!(err, fastpull::Error::NoMatchingPlatform { .. }),
        "{err}"
    );
    assert_eq!(err.category().exit_code(), 3);
}

/// A cancelled request stops with `Error::Cancelled` (exit 130): nothing under a final name
/// for the unfinished blob, its partial and journal kept; the next pull resumes it and
/// fetches only what was missing.
#[test]
fn a_cancelled_request_stops_and_the_next_pull_resumes() {
    let reg = Registry::start();
    let image = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(74, 4, 2_000_000))
        .build();
    push_image(&reg, "lib/cancel", "v1", &image);
    let layer = &image.layers[0];
    let size = layer.bytes.len() as u64;
    let proxy = CountingProxy::start(&reg.addr());
    // Slow enough that the pull is still running when the token is cancelled.
    proxy.cap(Which::PathContains("/blobs/".into()), Cap::smooth(2 << 20));
    let r: Reference = format!("{}/lib/cancel:v1", proxy.addr())
        .parse()
        .expect("ref");
    let (_d, out) = dest();
    let token = CancellationToken::new();
    let reporter = Arc::new(Collect {
        events: Mutex::default(),
        cancel: Some((token.clone(), 1 << 20)),
    });
    let multi_thread = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    };
    {
        let client = client();
        let request = client
            .request(&r, &out)
            .reporter(reporter.clone())
            .cancel_on(token.clone());
        let id = request.id();
        let err = multi_thread()
            .block_on(request.send())
            .expect_err("cancelled");
        assert!(matches!(err, fastpull::Error::Cancelled { .. }), "{err}");
        assert_eq!(err.category().exit_code(), 130);
        assert!(token.is_cancelled());
        assert_eq!(reporter.ids(), vec![id]);
    } // the client and its pooled connections go
      // The unfinished layer: not under its final name, kept with its journal.
    let hexd = hex(&layer.digest).to_string();
    assert!(
        !out.join("blobs/sha256").join(&hexd).exists(),
        "an unfinished blob under its final name"
    );
    assert_eq!(assert_only_resumable(&out), vec![hexd.clone()]);
    assert!(!out.join("index.json").exists(), "no image recorded");
    let first = proxy.settle().relayed_for(&layer.digest);
    assert!(
        first >= 1 << 20 && first < size,
        "relayed {first} of {size}"
    );

    // The next pull (another client, as another process would be) resumes what was kept.
    let again = Arc::new(Collect::default());
    let report = {
        let client = client();
        multi_thread()
            .block_on(client.request(&r, &out).reporter(again.clone()).send())
            .expect("resumed pull")
    };
    let resumed: u64 = again
        .kinds()
        .iter()
        .filter_map(|k| match k {
            EventKind::BlobResumed { digest, present } if digest.to_string() == layer.digest => {
                Some(*present)
            }
            _ => None,
        })
        .sum();
    assert!(
        resumed > 0,
        "the layer was not resumed: {:?}",
        again.kinds()
    );
    let rerun = proxy.settle().relayed_for(&layer.digest) - first;
    assert!(
        rerun + resumed <= size + size / 20,
        "the rerun fetched {rerun} bytes though {resumed} of {size} were kept"
    );
    assert_eq!(report.manifest_digest.to_string(), image.manifest_digest);
    let got = std::fs::read(out.join("blobs/sha256").join(hex(&layer.digest))).expect("layer");
    assert!(got == layer.bytes, "the resumed layer is the layer");
}

/// A registry that pages its tag list (distribution v3, GHCR, Harbor do; the 2.8 registry
/// these tests run does not, so a canned server answers): `tags` follows `Link: <…>;
/// rel="next"` page after page and returns every tag once.
#[test]
fn tags_follow_the_registrys_pages() {
    use crate::support::canned::{Canned, CannedServer};
    let page = |path: &str, tags: &[&str], next: Option<&str>| Canned {
        path: path.to_string(),
        status: 200,
        headers: [("Content-Type".to_string(), "application/json".to_string())]
            .into_iter()
            .chain(next.map(|n| ("Link".to_string(), format!("<{n}>; rel=\"next\""))))
            .collect(),
        body: serde_json::json!({"name": "lib/many", "tags": tags})
            .to_string()
            .into_bytes(),
        content_length: true,
    };
    let server = CannedServer::start(vec![
        page(
            "/v2/lib/many/tags/list",
            &["a", "b"],
            Some("/v2/lib/many/tags/list?last=b&n=2"),
        ),
        page(
            "/v2/lib/many/tags/list?last=b&n=2",
            &["c", "d"],
            Some("/v2/lib/many/tags/list?last=d&n=2"),
        ),
        page("/v2/lib/many/tags/list?last=d&n=2", &["e"], None),
    ]);
    let r: Reference = format!("{}/lib/many:a", server.addr())
        .parse()
        .expect("ref");
    let got = rt().block_on(client().tags(&r)).expect("tags");
    assert_eq!(got, ["a", "b", "c", "d", "e"]);
}

/// A request with `.unpack(ROOTFS)`: the layout at DEST and the root filesystem at ROOTFS,
/// the report saying what was unpacked and where, the request's reporter hearing each
/// layer applied under its pull id. With an archive format it is refused (exit 2) before
/// anything is written.
#[test]
fn a_request_unpacks_beside_its_layout() {
    let reg = Registry::start();
    let layers = [(74, 2, 150_000), (75, 1, 3000)];
    let image = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(layers[0].0, layers[0].1, layers[0].2))
        .layer(random_layer(layers[1].0, layers[1].1, layers[1].2))
        .build();
    push_image(&reg, "lib/unpack", "v1", &image);
    let r: Reference = format!("{}/lib/unpack:v1", reg.addr())
        .parse()
        .expect("ref");
    let (_d, root) = dest();
    let (layout, rootfs) = (root.join("layout"), root.join("rootfs"));
    let reporter = Arc::new(Collect::default());
    let rt = rt();
    let c = client();
    let request = c
        .request(&r, &layout)
        .unpack(&rootfs)
        .reporter(reporter.clone());
    let id = request.id();
    let report = rt.block_on(request.send()).expect("pull with unpack");
    assert_eq!(report.format, Format::Oci);
    assert_eq!(report.dest, layout);
    assert_eq!(report.rootfs.as_deref(), Some(rootfs.as_path()));
    let unpacked = report.unpacked.as_ref().expect("an unpack summary");
    assert_eq!(unpacked.layers, 2);
    assert!(layout.join("index.json").is_file());
    crate::interop::assert_same_tree(
        "ROOTFS",
        "ROOTFS",
        &crate::interop::tree(&rootfs),
        "the image",
        &crate::interop::expected_rootfs(&layers),
    );
    let applied: Vec<usize> = reporter
        .kinds()
        .iter()
        .filter_map(|k| match k {
            EventKind::LayerApplied { index, .. } => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(applied, [0, 1]);
    assert_eq!(reporter.ids(), vec![id]);

    let (_d2, root2) = dest();
    let err = rt
        .block_on(
            client()
                .request(&r, root2.join("img.tar"))
                .format(Format::DockerArchive)
                .unpack(root2.join("rootfs"))
                .send(),
        )
        .expect_err("an archive with unpack");
    assert!(matches!(err, fastpull::Error::InvalidOption(_)), "{err}");
    assert_eq!(err.category().exit_code(), 2);
    assert!(!root2.exists(), "a refused request wrote");
}
