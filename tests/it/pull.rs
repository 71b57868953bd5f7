//! Pulls against the real distribution registry: the library API and the CLI, happy paths
//! and the ways a registry, a reference or a destination can be wrong.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use fastpull::{Client, Format, Reference};

use crate::support::*;

/// A library client for the loopback registries of these tests: no credentials or proxies
/// from the caller's environment (what a spawned fastpull gets from `fastpull_command`).
fn client(format: Format, platform: Option<&str>) -> Client {
    let mut b = Client::builder()
        .credentials(fastpull::credentials::CredentialStore::none())
        .proxy_from_env(false)
        .format(format)
        .retries(1, Duration::from_millis(10));
    if let Some(p) = platform {
        b = b.platform(p.parse().expect("platform"));
    }
    b.build().expect("client")
}

fn pull(c: &Client, image: &str, dest: &Path) -> fastpull::Result<fastpull::PullReport> {
    let reference: Reference = image.parse()?;
    tokio::runtime::Runtime::new()
        .expect("tokio runtime")
        .block_on(c.pull(&reference, dest))
}

fn fastpull(args: &[&str]) -> Output {
    fastpull_command()
        .args(["--retries", "1"])
        .args(args)
        .output()
        .expect("run fastpull")
}

/// Every file below `root`, as relative paths (none if `root` does not exist: a failed
/// pull into a new directory removes it).
fn tree(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).expect("prefix").display().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// Checks an OCI layout holds exactly `image` (manifest bytes as pushed, every blob
/// byte-identical) and that index.json names it under `tag`.
fn assert_oci_holds(out: &Path, image: &Image, tag: Option<&str>) {
    let blobs = out.join("blobs/sha256");
    let manifest = std::fs::read(blobs.join(hex(&image.manifest_digest))).expect("manifest blob");
    assert_eq!(
        manifest, image.manifest,
        "manifest stored exactly as received"
    );
    for b in image.blobs() {
        let got = std::fs::read(blobs.join(hex(&b.digest))).expect("blob file");
        assert!(got == b.bytes, "blob {} differs", b.digest);
    }
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("oci-layout")).expect("oci-layout"))
            .expect("json");
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).expect("index.json"))
            .expect("json");
    let entry = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["digest"] == image.manifest_digest.as_str())
        .expect("index.json names the manifest");
    assert_eq!(entry["size"], image.manifest.len());
    assert_eq!(entry["mediaType"], image.manifest_media_type());
    if let Some(t) = tag {
        assert_eq!(entry["annotations"]["org.opencontainers.image.ref.name"], t);
    }
    assert!(!out.join(".fastpull-tmp").exists(), "scratch dir removed");
}

fn layers(seed: u64, n: usize, flavor: Flavor) -> Image {
    let mut b = ImageBuilder::new(flavor);
    for i in 0..n {
        b = b.layer(random_layer(seed * 100 + i as u64, 3, 4096 * (i + 1)));
    }
    b.build()
}

#[test]
fn pulls_single_layer_oci_image_by_tag() {
    let reg = Registry::start();
    let image = layers(1, 1, Flavor::Oci);
    push_image(&reg, "single/oci", "v1", &image);
    let (_d, out) = dest();

    let report = pull(
        &client(Format::Oci, None),
        &format!("{}/single/oci:v1", reg.addr()),
        &out,
    )
    .expect("pull");
    assert_eq!(report.digest.to_string(), image.manifest_digest);
    assert_eq!(report.manifest_digest.to_string(), image.manifest_digest);
    assert_eq!(report.manifest_media_type, image.manifest_media_type());
    assert_eq!(report.platform, None);
    assert_eq!(report.blobs.len(), 2);
    assert_eq!(report.blobs[0].digest.to_string(), image.config.digest);
    assert_eq!(report.blobs[1].digest.to_string(), image.layers[0].digest);
    let total: u64 = image.blobs().map(|b| b.size()).sum();
    assert_eq!(report.bytes_total, total);
    assert_eq!(report.bytes_downloaded, total);
    assert!(report.blobs.iter().all(|b| !b.skipped));
    assert_oci_holds(&out, &image, Some("v1"));
}

#[test]
fn pulls_multi_layer_docker_image_with_the_cli() {
    let reg = Registry::start();
    let image = layers(2, 5, Flavor::Docker);
    push_image(&reg, "multi/docker", "latest", &image);
    let (_d, out) = dest();
    let o = fastpull(&[
        &format!("{}/multi/docker", reg.addr()),
        out.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.starts_with("latest: Pulling from multi/docker\n"),
        "{stdout}"
    );
    for l in &image.layers {
        let short = &hex(&l.digest)[..12];
        assert!(
            stdout.contains(&format!("{short}: Pulling fs layer")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("{short}: Pull complete")),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains(&format!("Digest: {}", image.manifest_digest)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("Saved to {}", out.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("Note: the manifest keeps its Docker media type"),
        "Docker-typed manifests in an OCI layout come with a note: {stdout}"
    );
    assert_oci_holds(&out, &image, Some("latest"));
}

#[test]
fn pulls_empty_layer_and_zero_byte_blob() {
    let reg = Registry::start();
    let (empty, empty_diff) = empty_layer();
    let zero = zero_byte_blob();
    let image = ImageBuilder::new(Flavor::Oci)
        .layer((empty, empty_diff))
        .raw_layer(zero, EMPTY_SHA256.to_string())
        .layer(random_layer(33, 2, 100))
        .build();
    push_image(&reg, "odd/layers", "t", &image);
    let (_d, out) = dest();
    let report = pull(
        &client(Format::Oci, None),
        &format!("{}/odd/layers:t", reg.addr()),
        &out,
    )
    .expect("pull");
    assert_eq!(report.blobs.len(), 4);
    let zero_path = out.join("blobs/sha256").join(hex(EMPTY_SHA256));
    assert_eq!(std::fs::metadata(zero_path).expect("0-byte blob").len(), 0);
    assert_oci_holds(&out, &image, Some("t"));
}

#[test]
fn picks_platform_from_index_and_lists_them_when_none_matches() {
    let reg = Registry::start();
    let amd = ImageBuilder::new(Flavor::Oci)
        .platform("linux", "amd64", None)
        .layer(random_layer(41, 2, 1000))
        .build();
    let arm = ImageBuilder::new(Flavor::Oci)
        .platform("linux", "arm64", Some("v8"))
        .layer(random_layer(42, 2, 1000))
        .build();
    let (_bytes, index_digest) =
        push_index(&reg, "multi/arch", "latest", Flavor::Oci, &[&amd, &arm]);
    let image = format!("{}/multi/arch:latest", reg.addr());

    let (_d, out) = dest();
    let r = pull(&client(Format::Oci, Some("linux/arm64")), &image, &out).expect("pull arm64");
    assert_eq!(r.digest.to_string(), index_digest, "Digest is the index's");
    assert_eq!(r.manifest_digest.to_string(), arm.manifest_digest);
    assert_eq!(
        r.platform.as_ref().map(|p| p.to_string()).as_deref(),
        Some("linux/arm64/v8"),
        "the platform as the index names it"
    );
    assert_oci_holds(&out, &arm, Some("latest"));
    assert!(!out
        .join("blobs/sha256")
        .join(hex(&amd.layers[0].digest))
        .exists());

    let (_d2, out2) = dest();
    let r = pull(&client(Format::Oci, Some("linux/amd64")), &image, &out2).expect("pull amd64");
    assert_eq!(r.manifest_digest.to_string(), amd.manifest_digest);

    let (_d3, out3) = dest();
    let o = fastpull(&[
        "--platform",
        "linux/s390x",
        &image,
        out3.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no manifest for platform linux/s390x"),
        "{err}"
    );
    assert!(
        err.contains("linux/amd64") && err.contains("linux/arm64"),
        "{err}"
    );

    // `linux` alone is this machine's architecture, as docker reads it.
    let o = fastpull(&["--platform", "linux", &image, out3.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out3.join("index.json")).expect("index.json"))
            .expect("json");
    assert_eq!(index["manifests"][0]["platform"]["os"], "linux", "{index}");
}

/// `--all-platforms` and a repeated `--platform` keep the index and each chosen image
/// manifest (blobs shared), and index.json names the index.
#[test]
fn all_platforms_and_repeated_platform_keep_the_index() {
    let reg = Registry::start();
    let shared = random_layer(60, 2, 1000);
    let amd = ImageBuilder::new(Flavor::Oci)
        .platform("linux", "amd64", None)
        .layer(shared.clone())
        .layer(random_layer(61, 1, 1000))
        .build();
    let arm = ImageBuilder::new(Flavor::Oci)
        .platform("linux", "arm64", Some("v8"))
        .layer(shared)
        .layer(random_layer(62, 1, 1000))
        .build();
    let s390 = ImageBuilder::new(Flavor::Oci)
        .platform("linux", "s390x", None)
        .layer(random_layer(63, 1, 1000))
        .build();
    let (index_bytes, index_digest) = push_index(
        &reg,
        "multi/all",
        "latest",
        Flavor::Oci,
        &[&amd, &arm, &s390],
    );
    let image = format!("{}/multi/all:latest", reg.addr());
    let blob = |out: &Path, d: &str| out.join("blobs/sha256").join(hex(d));
    let entry_of = |out: &Path| -> serde_json::Value {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("index.json")).expect("index.json"))
                .expect("json");
        assert_eq!(
            index["manifests"].as_array().map(Vec::len),
            Some(1),
            "{index}"
        );
        index["manifests"][0].clone()
    };

    let (_d, out) = dest();
    let o = fastpull(&["--all-platforms", &image, out.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o));
    let e = entry_of(&out);
    assert_eq!(
        e["digest"],
        index_digest.as_str(),
        "index.json names the index: {e}"
    );
    assert_eq!(e["mediaType"], fastpull::manifest::OCI_INDEX);
    assert_eq!(
        std::fs::read(blob(&out, &index_digest)).expect("index blob"),
        index_bytes,
        "the index is stored byte for byte"
    );
    for img in [&amd, &arm, &s390] {
        assert_oci_blobs(&out, img);
    }

    // Two named platforms: those two, not the third.
    let (_d2, out2) = dest();
    let o = fastpull(&[
        "--platform",
        "linux/amd64",
        "--platform",
        "linux/arm64",
        &image,
        out2.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(entry_of(&out2)["digest"], index_digest.as_str());
    assert_oci_blobs(&out2, &amd);
    assert_oci_blobs(&out2, &arm);
    assert!(!blob(&out2, &s390.manifest_digest).exists());
    assert!(!blob(&out2, &s390.layers[0].digest).exists());

    // skopeo reads the multi-platform layout, per platform.
    let dir = tempfile::tempdir().expect("tmp");
    let o = std::process::Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--override-arch",
            "arm64",
            "--override-variant",
            "v8",
        ])
        .arg(format!("oci:{}:latest", out2.display()))
        .arg(format!("dir:{}", dir.path().join("arm").display()))
        .output()
        .expect("run skopeo");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(dir.path().join("arm/manifest.json")).expect("manifest"),
        arm.manifest,
        "skopeo found the arm64 manifest through the stored index"
    );

    // The dir layout keeps the index as manifest.json and each image manifest beside it.
    let (_d3, out3) = dest();
    let o = fastpull(&[
        "--all-platforms",
        "--format",
        "dir",
        &image,
        out3.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(out3.join("manifest.json")).expect("manifest.json"),
        index_bytes
    );
    for img in [&amd, &arm, &s390] {
        let p = out3.join(format!("{}.manifest.json", hex(&img.manifest_digest)));
        assert_eq!(std::fs::read(&p).expect("instance manifest"), img.manifest);
    }
}

/// Every blob and the manifest of `image` are in the OCI layout `out`, each verified.
fn assert_oci_blobs(out: &Path, image: &Image) {
    let m = out.join("blobs/sha256").join(hex(&image.manifest_digest));
    assert_eq!(std::fs::read(&m).expect("manifest blob"), image.manifest);
    for b in image.blobs() {
        let p = out.join("blobs/sha256").join(hex(&b.digest));
        assert_eq!(std::fs::read(&p).expect("blob"), b.bytes, "{}", b.digest);
    }
}

/// `--all-platforms` of a single-platform image is that image: an archive (one image) takes
/// it, as skopeo's `--all` does (red when every --all-platforms counted as several
/// platforms: exit 2, "archives and conversion take one"), and a dir layout holds its
/// manifest as manifest.json with no instance manifest beside it.
#[test]
fn all_platforms_of_a_plain_image_is_that_image() {
    let reg = Registry::start();
    let img = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(65, 1, 1000))
        .build();
    push_image(&reg, "single/all", "v", &img);
    let image = format!("{}/single/all:v", reg.addr());
    let (_d, out) = dest();
    let archive = out.with_extension("tar");
    let o = fastpull(&[
        "--all-platforms",
        "--format",
        "docker-archive",
        &image,
        archive.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::metadata(&archive).expect("archive").len() > 1000);
    let o = fastpull(&[
        "--all-platforms",
        "--format",
        "dir",
        &image,
        out.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(out.join("manifest.json")).expect("manifest.json"),
        img.manifest
    );
    let instance = out.join(format!("{}.manifest.json", hex(&img.manifest_digest)));
    assert!(
        !instance.exists(),
        "an instance manifest beside a plain image"
    );
}

/// A single-platform image pulled with `--platform` must be that platform: its config is
/// checked before any layer is fetched (exit 3, naming both platforms).
#[test]
fn single_platform_image_is_checked_against_the_platform_asked() {
    let reg = Registry::start();
    let arm = ImageBuilder::new(Flavor::Oci)
        .platform("linux", "arm64", None)
        .layer(random_layer(64, 1, 1000))
        .build();
    push_image(&reg, "single/arm", "v", &arm);
    let image = format!("{}/single/arm:v", reg.addr());
    let (_d, out) = dest();
    let o = fastpull(&[
        "--platform",
        "linux/amd64",
        &image,
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("linux/amd64") && err.contains("linux/arm64"),
        "{err}"
    );
    assert!(
        !out.join("blobs/sha256")
            .join(hex(&arm.layers[0].digest))
            .exists(),
        "a layer was fetched for the wrong platform"
    );
    // The right platform (and no platform at all) pull it.
    let o = fastpull(&[
        "--platform",
        "linux/arm64",
        &image,
        out.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_oci_holds(&out, &arm, Some("v"));
    let (_d2, out2) = dest();
    let o = fastpull(&[&image, out2.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn docker_manifest_list_uses_host_platform_by_default() {
    let reg = Registry::start();
    let host = fastpull::Platform::host();
    let mine = ImageBuilder::new(Flavor::Docker)
        .platform(&host.os, &host.architecture, host.variant.as_deref())
        .layer(random_layer(51, 1, 500))
        .build();
    let other = ImageBuilder::new(Flavor::Docker)
        .platform("linux", "ppc64le", None)
        .layer(random_layer(52, 1, 500))
        .build();
    push_index(&reg, "list/docker", "v2", Flavor::Docker, &[&other, &mine]);
    let (_d, out) = dest();
    let r = pull(
        &client(Format::Oci, None),
        &format!("{}/list/docker:v2", reg.addr()),
        &out,
    )
    .expect("pull");
    assert_eq!(r.manifest_digest.to_string(), mine.manifest_digest);
    assert_oci_holds(&out, &mine, Some("v2"));
}

#[test]
fn pulls_by_digest_and_by_tag_plus_digest() {
    let reg = Registry::start();
    let image = layers(6, 2, Flavor::Oci);
    push_image_by_digest(&reg, "by/digest", &image);
    let (_d, out) = dest();
    let by_digest = format!("{}/by/digest@{}", reg.addr(), image.manifest_digest);
    let r = pull(&client(Format::Oci, None), &by_digest, &out).expect("pull by digest");
    assert_eq!(r.manifest_digest.to_string(), image.manifest_digest);
    assert_oci_holds(&out, &image, None);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).expect("index"))
            .expect("json");
    assert!(index["manifests"][0]["annotations"]
        .get("org.opencontainers.image.ref.name")
        .is_none());

    // The tag names nothing in the registry: the digest wins.
    let (_d2, out2) = dest();
    let both = format!("{}/by/digest:mytag@{}", reg.addr(), image.manifest_digest);
    pull(&client(Format::Oci, None), &both, &out2).expect("pull by tag@digest");
    assert_oci_holds(&out2, &image, Some("mytag"));

    // A digest the registry does not have.
    let missing = format!("{}/by/digest@{}", reg.addr(), sha256_digest(b"nothing"));
    let err = pull(&client(Format::Oci, None), &missing, &dest().1).expect_err("missing digest");
    assert!(
        matches!(err, fastpull::Error::ManifestNotFound { .. }),
        "{err}"
    );
}

#[test]
fn repull_skips_verified_blobs_and_repairs_damaged_ones() {
    let reg = Registry::start();
    let image = layers(7, 3, Flavor::Oci);
    push_image(&reg, "re/pull", "v", &image);
    let name = format!("{}/re/pull:v", reg.addr());
    let (_d, out) = dest();
    let c = client(Format::Oci, None);
    pull(&c, &name, &out).expect("first pull");

    let r = pull(&c, &name, &out).expect("second pull");
    assert!(r.blobs.iter().all(|b| b.skipped), "{:?}", r.blobs);
    assert_eq!(r.bytes_downloaded, 0);

    // Damage one layer on disk: it must not count as present.
    let victim = out.join("blobs/sha256").join(hex(&image.layers[1].digest));
    let mut bytes = std::fs::read(&victim).expect("read");
    bytes[10] ^= 0xff;
    std::fs::write(&victim, &bytes).expect("write");
    let r = pull(&c, &name, &out).expect("third pull");
    let skipped: Vec<bool> = r.blobs.iter().map(|b| b.skipped).collect();
    assert_eq!(skipped, vec![true, true, false, true]);
    assert_eq!(r.bytes_downloaded, image.layers[1].size());
    assert_oci_holds(&out, &image, Some("v"));

    let o = fastpull(&[&name, out.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("Already exists"), "{stdout}");
    assert!(stdout.contains("Status: Image is up to date"), "{stdout}");
}

#[test]
fn missing_tag_and_repository_are_clear_errors() {
    let reg = Registry::start();
    push_image(&reg, "has/tag", "v1", &layers(8, 1, Flavor::Oci));
    let (_d, out) = dest();
    let o = fastpull(&[
        &format!("{}/has/tag:v2", reg.addr()),
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("manifest unknown") && err.contains("has/tag:v2"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");

    let o = fastpull(&[
        &format!("{}/no/such:v1", reg.addr()),
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(!out.join("index.json").exists());
}

#[test]
fn lying_registry_fails_verification_and_leaves_nothing_under_a_final_name() {
    let reg = Registry::start();
    let image = layers(9, 3, Flavor::Oci);
    push_image(&reg, "liar/blob", "v", &image);
    let bad = &image.layers[2];
    corrupt_blob_in_storage(&reg, &bad.digest);
    let (_d, out) = dest();
    let o = fastpull(&[
        &format!("{}/liar/blob:v", reg.addr()),
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("digest mismatch"), "{err}");
    assert!(
        err.contains(&bad.digest),
        "names the expected digest: {err}"
    );
    let served = fetch_blob(&reg, "liar/blob", &bad.digest).body;
    assert!(
        err.contains(&sha256_digest(&served)),
        "names the actual digest: {err}"
    );
    assert!(!out.join("blobs/sha256").join(hex(&bad.digest)).exists());
    assert!(!out.join("index.json").exists(), "no manifest recorded");
    // Blobs still under way when the bad one failed the pull may be kept for a resume
    // (each with its journal; on a busy machine the other layers may not have finished);
    // the bad blob's bytes may not.
    let kept = assert_only_resumable(&out);
    assert!(
        !kept.iter().any(|h| h == hex(&bad.digest)),
        "the blob that failed verification was kept for a resume: {kept:?}"
    );
    for f in tree(&out) {
        if f.starts_with(".fastpull-tmp/") {
            continue;
        }
        assert!(!f.ends_with(".partial"), "partial file left: {f}");
        if let Some(h) = f.strip_prefix("blobs/sha256/") {
            let bytes = std::fs::read(out.join(&f)).expect("read");
            assert_eq!(
                sha256_digest(&bytes),
                format!("sha256:{h}"),
                "unverified {f}"
            );
        }
    }
}

#[test]
fn truncated_blob_is_a_size_mismatch() {
    let reg = Registry::start();
    let image = layers(10, 1, Flavor::Docker);
    push_image(&reg, "liar/short", "v", &image);
    truncate_blob_in_storage(&reg, &image.layers[0].digest);
    let (_d, out) = dest();
    let err = pull(
        &client(Format::Oci, None),
        &format!("{}/liar/short:v", reg.addr()),
        &out,
    )
    .expect_err("must fail");
    assert!(matches!(err, fastpull::Error::SizeMismatch { .. }), "{err}");
    assert_eq!(err.category().exit_code(), 4);
    assert!(!out
        .join("blobs/sha256")
        .join(hex(&image.layers[0].digest))
        .exists());
}

#[test]
fn manifest_bytes_must_match_pinned_digest_and_header() {
    let reg = Registry::start();
    let image = layers(11, 1, Flavor::Oci);
    push_image(&reg, "liar/manifest", "v", &image);
    corrupt_blob_in_storage(&reg, &image.manifest_digest);

    let by_tag = format!("{}/liar/manifest:v", reg.addr());
    let err = pull(&client(Format::Oci, None), &by_tag, &dest().1).expect_err("by tag");
    let msg = err.to_string();
    assert!(
        matches!(err, fastpull::Error::DigestMismatch { .. }),
        "{msg}"
    );
    assert!(msg.contains("Docker-Content-Digest"), "{msg}");

    let by_digest = format!("{}/liar/manifest@{}", reg.addr(), image.manifest_digest);
    let err = pull(&client(Format::Oci, None), &by_digest, &dest().1).expect_err("by digest");
    assert!(
        matches!(err, fastpull::Error::DigestMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&image.manifest_digest), "{err}");
}

#[test]
fn missing_blob_surfaces_the_registry_error_code() {
    let reg = Registry::start();
    let image = layers(12, 1, Flavor::Oci);
    push_image(&reg, "gone/blob", "v", &image);
    let data = reg.blob_data_path(&image.layers[0].digest);
    std::fs::remove_dir_all(data.parent().expect("blob dir")).expect("remove blob");
    let err = pull(
        &client(Format::Oci, None),
        &format!("{}/gone/blob:v", reg.addr()),
        &dest().1,
    )
    .expect_err("must fail");
    match &err {
        fastpull::Error::Registry { status, code, .. } => {
            assert_eq!(*status, 404);
            assert_eq!(code.as_deref(), Some("BLOB_UNKNOWN"));
        }
        other => panic!("expected a registry error, got {other}"),
    }
    assert!(err.to_string().contains("BLOB_UNKNOWN"), "{err}");
}

#[test]
fn dir_format_writes_skopeo_dir_layout() {
    let reg = Registry::start();
    let image = layers(13, 2, Flavor::Docker);
    push_image(&reg, "dir/fmt", "v", &image);
    let (_d, out) = dest();
    let o = fastpull(&[
        "--format",
        "dir",
        "--plain-http",
        &format!("{}/dir/fmt:v", reg.addr()),
        out.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(out.join("version")).expect("version"),
        "Directory Transport Version: 1.1\n"
    );
    assert_eq!(
        std::fs::read(out.join("manifest.json")).expect("manifest"),
        image.manifest
    );
    let mut want: BTreeSet<String> = image.blobs().map(|b| hex(&b.digest).to_string()).collect();
    want.insert("manifest.json".into());
    want.insert("version".into());
    assert_eq!(tree(&out), want);
    for b in image.blobs() {
        assert!(std::fs::read(out.join(hex(&b.digest))).expect("blob") == b.bytes);
    }
    // An OCI pull into a dir layout is refused, not mixed in.
    let o = fastpull(&[
        &format!("{}/dir/fmt:v", reg.addr()),
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
}

#[test]
fn refuses_a_foreign_destination_and_bad_arguments() {
    let reg = Registry::start();
    let (_d, out) = dest();
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("notes.txt"), b"mine").expect("write");
    let o = fastpull(&[
        &format!("{}/x/y:z", reg.addr()),
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an OCI image layout"));
    assert_eq!(std::fs::read(out.join("notes.txt")).expect("kept"), b"mine");

    for bad in ["Upper/Case", "repo:bad tag", "repo@sha256:1234", ""] {
        let o = fastpull(&[bad, "/nonexistent/never-created"]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o));
    }
    let o = fastpull(&["--format", "tar", "alpine", "/nonexistent/x"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(!Path::new("/nonexistent").exists());
}

#[test]
fn many_layers_with_low_concurrency_and_quiet_output() {
    let reg = Registry::start();
    let image = layers(14, 12, Flavor::Oci);
    push_image(&reg, "many/layers", "v", &image);
    let (_d, out) = dest();
    let name = format!("{}/many/layers:v", reg.addr());
    let o = fastpull(&[
        "-q",
        "-j",
        "3",
        "--chunk-size",
        "64K",
        &name,
        out.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), format!("{name}"));
    assert_oci_holds(&out, &image, Some("v"));
}

#[test]
fn unreachable_registry_is_a_network_error() {
    let closed = ClosedPort::new();
    let port = closed.port();
    let (_d, out) = dest();
    let o = fastpull(&[
        &format!("127.0.0.1:{port}/a/b:c"),
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    // A refused connection is not retried (retrying cannot fix it): said at once, with the
    // cause.
    assert!(
        err.contains("cannot reach") && err.contains("refused"),
        "{err}"
    );
    assert!(
        !err.contains("retr"),
        "a refused connection was retried: {err}"
    );
}

#[test]
fn help_documents_exit_codes_and_examples() {
    let o = fastpull_command().arg("--help").output().expect("run");
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "Exit codes:",
        "2  usage",
        "3  network or registry",
        "4  verification",
        "5  local I/O",
        "Examples:",
        "--platform",
        "--plain-http",
        "--format",
    ] {
        assert!(
            help.contains(needle),
            "missing {needle:?} in --help:\n{help}"
        );
    }
}

/// The distribution registry neither stores nor serves a manifest over 4 MiB, so a canned
/// in-process server plays the registry that would.
#[test]
fn refuses_manifests_over_4_mib() {
    let image = layers(15, 1, Flavor::Oci);
    let mut m: serde_json::Value = serde_json::from_slice(&image.manifest).expect("json");
    m["annotations"] = serde_json::json!({ "pad": "x".repeat(4 * 1024 * 1024) });
    let big = serde_json::to_vec(&m).expect("json");
    assert!(big.len() > 4 * 1024 * 1024);
    let route = |path: &str, body: &[u8], content_length: bool| Canned {
        path: path.to_string(),
        status: 200,
        headers: vec![("Content-Type".into(), image.manifest_media_type().into())],
        body: body.to_vec(),
        content_length,
    };
    let server = CannedServer::start(vec![
        route("/v2/", b"{}", true),
        route("/v2/big/manifest/manifests/with-length", &big, true),
        route("/v2/big/manifest/manifests/without-length", &big, false),
    ]);
    for tag in ["with-length", "without-length"] {
        let image_ref = format!("{}/big/manifest:{tag}", server.addr());
        let err = pull(&client(Format::Oci, None), &image_ref, &dest().1).expect_err("must refuse");
        assert!(
            matches!(err, fastpull::Error::ManifestTooLarge { .. }),
            "{tag}: {err}"
        );
        assert!(err.to_string().contains("4194304"), "{err}");
    }
}

#[test]
fn dir_layout_reused_for_another_image_keeps_only_that_image() {
    let reg = Registry::start();
    let first = layers(16, 2, Flavor::Oci);
    let second = layers(17, 2, Flavor::Oci);
    push_image(&reg, "dir/reuse", "one", &first);
    push_image(&reg, "dir/reuse", "two", &second);
    let (_d, out) = dest();
    let c = client(Format::Dir, None);
    pull(&c, &format!("{}/dir/reuse:one", reg.addr()), &out).expect("first");
    std::fs::write(out.join("signature-1"), b"kept").expect("write");
    pull(&c, &format!("{}/dir/reuse:two", reg.addr()), &out).expect("second");
    let mut want: BTreeSet<String> = second.blobs().map(|b| hex(&b.digest).to_string()).collect();
    for f in ["manifest.json", "version", "signature-1"] {
        want.insert(f.into());
    }
    assert_eq!(tree(&out), want);
    assert_eq!(
        std::fs::read(out.join("manifest.json")).expect("manifest"),
        second.manifest
    );
}

/// Needs the internet (Docker Hub): run with `cargo test -- --ignored`.
#[test]
#[ignore = "needs the internet: pulls library/alpine from Docker Hub"]
fn pulls_alpine_from_docker_hub() {
    let (_d, out) = dest();
    // The caller's environment on purpose: a proxy may be how this machine reaches Docker Hub.
    let hub = Client::builder()
        .format(Format::Oci)
        .platform("linux/amd64".parse().expect("platform"))
        .build()
        .expect("client");
    let r = pull(&hub, "alpine:latest", &out).expect("pull");
    assert_ne!(r.digest, r.manifest_digest, "alpine is multi-platform");
    assert!(r.blobs.len() >= 2);
    assert!(out.join("index.json").exists());
}

#[test]
fn version_names_the_sha256_implementation() {
    let o = fastpull_command().arg("--version").output().expect("run");
    assert!(o.status.success());
    let v = String::from_utf8_lossy(&o.stdout);
    #[cfg(target_arch = "x86_64")]
    let want = if std::arch::is_x86_feature_detected!("sha") {
        "sha256: hardware (SHA-NI)"
    } else {
        "sha256: software"
    };
    #[cfg(target_arch = "aarch64")]
    let want = if std::arch::is_aarch64_feature_detected!("sha2") {
        "sha256: hardware (ARMv8 SHA2)"
    } else {
        "sha256: software"
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let want = "sha256: software";
    assert!(v.contains(want), "{v}");
    assert_eq!(
        fastpull::sha256_backend(),
        want.trim_start_matches("sha256: ")
    );
}

/// `--completions SHELL` and `--man` come from the same clap definition as the flags, so
/// they know every option; they need no IMAGE or DEST and take no other argument.
#[test]
fn completions_and_man_page_are_generated_from_the_flags() {
    let dir = tempfile::tempdir().expect("tmp");
    for shell in ["bash", "zsh", "fish"] {
        let o = fastpull(&["--completions", shell]);
        assert!(o.status.success(), "{shell}: {}", text(&o));
        let script = String::from_utf8_lossy(&o.stdout);
        for flag in ["all-platforms", "no-resume", "fan-out", "platform"] {
            assert!(script.contains(flag), "{shell} completions lack --{flag}");
        }
        if shell == "bash" {
            // The script parses.
            let path = dir.path().join("fastpull.bash");
            std::fs::write(&path, script.as_bytes()).expect("write");
            let o = std::process::Command::new("bash")
                .arg("-n")
                .arg(&path)
                .output()
                .expect("bash -n");
            assert!(o.status.success(), "{}", text(&o));
        }
    }
    let o = fastpull(&["--man"]);
    assert!(o.status.success(), "{}", text(&o));
    let man = String::from_utf8_lossy(&o.stdout);
    assert!(man.contains(".TH fastpull 1"), "{man}");
    assert!(
        man.contains("all\\-platforms") && man.contains("repair\\-attempts"),
        "{man}"
    );
    // They stand alone.
    let o = fastpull(&["--completions", "bash", "alpine", "./x"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = fastpull(&["--completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}
