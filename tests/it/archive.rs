//! Archives (`--format docker-archive`, `--format oci-archive`), image names in an OCI
//! layout (`DEST:NAME`, `--tag`, `--replace`) and `--convert oci`, each proven with the
//! tools that read them: skopeo, umoci and podman, against the real registry.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::interop::{
    assert_bytes, assert_same_tree, expected_rootfs, fastpull, hex_of, image_ref, read_json,
    require_tools, run, run_ok, skopeo, tree, umoci_unpack,
};
use crate::support::*;

const BIN: &str = crate::support::runner::FASTPULL_BIN;

/// `fastpull --plain-http ARGS…`, whatever its outcome.
fn fastpull_any(args: &[&OsStr]) -> Output {
    let mut full: Vec<&OsStr> = vec![OsStr::new("--plain-http")];
    full.extend_from_slice(args);
    run(BIN, &full)
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// The entries of a tar file in order: name → content (directories: empty).
fn tar_entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut out = Vec::new();
    let mut archive = tar::Archive::new(&bytes[..]);
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        let name = entry.path().expect("path").to_string_lossy().into_owned();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).expect("read tar entry");
        out.push((name, content));
    }
    out
}

/// Every `blobs/sha256/<hex>` entry of an archive hashes to its name.
fn assert_archive_blobs_verify(entries: &[(String, Vec<u8>)]) {
    let mut n = 0;
    for (name, content) in entries {
        if let Some(hex) = name.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
            assert_eq!(
                sha256_digest(content),
                format!("sha256:{hex}"),
                "archive entry {name} does not hash to its name"
            );
            n += 1;
        }
    }
    assert!(n > 0, "no blobs in the archive");
}

/// Every blob of an OCI layout hashes to its name; returns how many there are.
fn assert_layout_blobs_verify(layout: &Path) -> usize {
    let dir = layout.join("blobs/sha256");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let entry = entry.expect("dir entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(entry.path()).expect("read blob");
        assert_eq!(
            sha256_digest(&bytes),
            format!("sha256:{name}"),
            "{}: blob does not hash to its name",
            layout.display()
        );
        n += 1;
    }
    n
}

/// The uncompressed bytes of a layer blob (gzip or plain tar).
fn gunzip(bytes: &[u8]) -> Vec<u8> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .expect("gunzip layer");
        out
    } else {
        bytes.to_vec()
    }
}

/// The image manifest an OCI layout's single (or `tag`) entry points to.
fn layout_manifest(layout: &Path, tag: &str) -> serde_json::Value {
    let index = read_json(&layout.join("index.json"));
    let entry = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|e| e["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no entry {tag} in {index}"))
        .clone();
    read_json(
        &layout
            .join("blobs/sha256")
            .join(hex_of(entry["digest"].as_str().expect("digest"))),
    )
}

/// The `diff_ids` of an image's config.
fn diff_ids(img: &Image) -> Vec<String> {
    let config: serde_json::Value = serde_json::from_slice(&img.config.bytes).expect("config");
    config["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .iter()
        .map(|d| d.as_str().expect("diff_id").to_string())
        .collect()
}

const SHAPE: [(u64, usize, usize); 3] = [(601, 3, 2000), (602, 3, 1024 * 1024), (603, 1, 10)];

fn shaped_image(flavor: Flavor, shape: &[(u64, usize, usize)]) -> Image {
    let mut b = ImageBuilder::new(flavor);
    for &(seed, files, bytes) in shape {
        b = b.layer(random_layer(seed, files, bytes));
    }
    b.build()
}

/// `--format docker-archive` writes what `docker save` (v25+) writes: the OCI layout plus
/// docker's manifest.json and repositories, small files first, every blob verified. skopeo's
/// docker-archive reader takes it (by path, and by its RepoTag), finds the image's layers
/// (by diff_id), its config byte for byte, and copies it into an OCI layout whose blobs
/// verify and whose layers unpack to the pushed files.
#[test]
fn docker_archive_is_read_by_skopeo_and_round_trips() {
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let (repo, tag) = ("archive/docker", "v1");
    let img = shaped_image(Flavor::Oci, &SHAPE);
    push_image(&reg, repo, tag, &img);
    let image = image_ref(&reg, repo, tag);

    let file = work.path().join("saved/img.tar");
    let out = fastpull(
        &reg,
        &[
            os("--format"),
            os("docker-archive"),
            os(&image),
            file.as_os_str(),
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(docker-archive)"),
        "{}",
        text(&out)
    );
    assert!(
        !work.path().join("saved/img.tar.fastpull-partial").exists(),
        "the partial archive is renamed, not left"
    );

    // The layout docker save writes, small files first.
    let entries = tar_entries(&file);
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[..6],
        [
            "oci-layout",
            "index.json",
            "manifest.json",
            "repositories",
            "blobs/",
            "blobs/sha256/"
        ],
        "{names:?}"
    );
    assert_eq!(entries.len(), 6 + 2 + img.layers.len(), "{names:?}");
    assert_archive_blobs_verify(&entries);
    let get = |n: &str| {
        &entries
            .iter()
            .find(|(name, _)| name == n)
            .unwrap_or_else(|| panic!("no {n} in {names:?}"))
            .1
    };
    let blob = |d: &str| format!("blobs/sha256/{}", hex_of(d));
    let docker: serde_json::Value = serde_json::from_slice(get("manifest.json")).expect("json");
    assert_eq!(docker[0]["Config"], blob(&img.config.digest));
    assert_eq!(docker[0]["RepoTags"], serde_json::json!([image]));
    let layers: Vec<String> = img.layers.iter().map(|l| blob(&l.digest)).collect();
    assert_eq!(docker[0]["Layers"], serde_json::json!(layers));
    let repos: serde_json::Value = serde_json::from_slice(get("repositories")).expect("json");
    assert_eq!(
        repos[format!("{}/{repo}", reg.addr())][tag],
        hex_of(&img.layers[2].digest)
    );
    let index: serde_json::Value = serde_json::from_slice(get("index.json")).expect("json");
    assert_eq!(
        index["manifests"][0]["digest"],
        img.manifest_digest.as_str()
    );
    assert_eq!(
        index["manifests"][0]["annotations"]["io.containerd.image.name"],
        image.as_str()
    );
    assert_bytes(
        "the manifest blob",
        get(&blob(&img.manifest_digest)),
        &img.manifest,
    );

    // skopeo's docker-archive reader: layers by diff_id, the config as stored.
    let src = format!("docker-archive:{}", file.display());
    let inspect: serde_json::Value =
        serde_json::from_slice(&skopeo(&reg, &[os("inspect"), os(&src)]).stdout)
            .expect("skopeo inspect JSON");
    assert_eq!(
        inspect["Layers"],
        serde_json::json!(diff_ids(&img)),
        "{inspect}"
    );
    assert_bytes(
        "skopeo inspect --raw --config docker-archive:FILE",
        &skopeo(
            &reg,
            &[os("inspect"), os("--raw"), os("--config"), os(&src)],
        )
        .stdout,
        &img.config.bytes,
    );
    // By its RepoTag, as docker load names it.
    let by_tag = format!("docker-archive:{}:{image}", file.display());
    skopeo(&reg, &[os("inspect"), os(&by_tag)]);

    // Round trip into an OCI layout: every blob verifies, the layers are the pushed ones.
    let layout = work.path().join("roundtrip");
    let dst = format!("oci:{}:rt", layout.display());
    skopeo(&reg, &[os("copy"), os(&src), os(&dst)]);
    assert!(assert_layout_blobs_verify(&layout) >= 2 + img.layers.len());
    let m = layout_manifest(&layout, "rt");
    let got_diffs: Vec<String> = m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            let bytes = std::fs::read(
                layout
                    .join("blobs/sha256")
                    .join(hex_of(l["digest"].as_str().expect("digest"))),
            )
            .expect("layer blob");
            sha256_digest(&gunzip(&bytes))
        })
        .collect();
    assert_eq!(got_diffs, diff_ids(&img), "round-tripped layers");
    let rootfs = umoci_unpack(&reg, &layout, "rt", &work.path().join("bundle"));
    assert_same_tree(
        "rootfs unpacked from the round-tripped docker-archive",
        "rootfs",
        &tree(&rootfs),
        "layer tars",
        &expected_rootfs(&SHAPE),
    );
}

/// `podman load` takes the docker-archive and names the image as `--tag` says (a bare tag:
/// the pulled repository with that tag), with the pushed layers and the pushed config (the
/// image ID is its digest). podman reads such an archive through its OCI part as well, so
/// the docker part (manifest.json, RepoTags) is proven on its own by `podman pull
/// docker-archive:FILE`, podman's docker-archive reader. podman runs here as root with its
/// own vfs store in a temp dir; without podman the test fails, not skips (scripts/deps
/// installs Debian's).
#[test]
fn podman_loads_docker_archive() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let img = shaped_image(Flavor::Docker, &SHAPE[..2]);
    push_image(&reg, "archive/podman", "v1", &img);
    let file = work.path().join("img.tar");
    fastpull(
        &reg,
        &[
            os("--format"),
            os("docker-archive"),
            os("--tag"),
            os("v7"),
            os(&image_ref(&reg, "archive/podman", "v1")),
            file.as_os_str(),
        ],
    );
    let name = image_ref(&reg, "archive/podman", "v7");
    let store = work.path().join("podman");
    let podman = |args: &[&str]| {
        let dir = |d: &str| store.join(d).to_string_lossy().into_owned();
        let mut full: Vec<String> = vec![
            "--root".into(),
            dir("root"),
            "--runroot".into(),
            dir("runroot"),
            "--tmpdir".into(),
            dir("tmp"),
            "--storage-driver".into(),
            "vfs".into(),
            "--cgroup-manager".into(),
            "cgroupfs".into(),
            "--events-backend".into(),
            "none".into(),
        ];
        full.extend(args.iter().map(|a| a.to_string()));
        let argv: Vec<&OsStr> = full.iter().map(OsStr::new).collect();
        run_ok("podman", &argv, &reg)
    };
    let check = |how: &str| {
        let inspect: serde_json::Value =
            serde_json::from_slice(&podman(&["image", "inspect", &name]).stdout)
                .expect("podman image inspect JSON");
        assert_eq!(
            inspect[0]["RootFS"]["Layers"],
            serde_json::json!(diff_ids(&img)),
            "{how}: {inspect}"
        );
        assert_eq!(
            inspect[0]["Id"].as_str().map(|id| format!("sha256:{id}")),
            Some(img.config.digest.clone()),
            "{how}: the image ID is the config's digest: the config is stored as pushed"
        );
        podman(&["rmi", &name]);
    };
    let loaded = podman(&["load", "-i", file.to_str().expect("utf-8 path")]);
    let said = String::from_utf8_lossy(&loaded.stdout).into_owned();
    assert!(said.contains(&name), "podman load said: {said}");
    check("podman load");
    let src = format!("docker-archive:{}", file.display());
    podman(&["pull", &src]);
    check("podman pull docker-archive:");
}

/// `--format oci-archive` is a tar of an OCI layout that skopeo's oci-archive reader takes,
/// with the manifest byte for byte, by its tag too; a copy out of it verifies; pulling
/// again over it replaces it with the same bytes (the archive is deterministic).
#[test]
fn oci_archive_is_read_by_skopeo() {
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let (repo, tag) = ("archive/oci", "v2");
    let img = shaped_image(Flavor::Oci, &SHAPE);
    push_image(&reg, repo, tag, &img);
    let image = image_ref(&reg, repo, tag);
    let file = work.path().join("img.oci.tar");
    let pull = || {
        fastpull(
            &reg,
            &[
                os("--format"),
                os("oci-archive"),
                os(&image),
                file.as_os_str(),
            ],
        )
    };
    pull();
    let entries = tar_entries(&file);
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[..4],
        ["oci-layout", "index.json", "blobs/", "blobs/sha256/"],
        "{names:?}"
    );
    assert!(!names.contains(&"manifest.json"), "{names:?}");
    assert_archive_blobs_verify(&entries);

    for src in [
        format!("oci-archive:{}", file.display()),
        format!("oci-archive:{}:{tag}", file.display()),
    ] {
        assert_bytes(
            &format!("skopeo inspect --raw {src}"),
            &skopeo(&reg, &[os("inspect"), os("--raw"), os(&src)]).stdout,
            &img.manifest,
        );
    }
    let layout = work.path().join("copied");
    let src = format!("oci-archive:{}", file.display());
    let dst = format!("oci:{}:x", layout.display());
    skopeo(&reg, &[os("copy"), os(&src), os(&dst)]);
    assert_layout_blobs_verify(&layout);
    for b in img.blobs() {
        assert_bytes(
            &format!("blob {} copied out of the oci-archive", b.digest),
            &std::fs::read(layout.join("blobs/sha256").join(hex_of(&b.digest)))
                .unwrap_or_else(|e| panic!("{}: {e}", b.digest)),
            &b.bytes,
        );
    }

    let first = std::fs::read(&file).expect("archive");
    pull();
    assert!(
        std::fs::read(&file).expect("archive") == first,
        "the same image makes the same archive"
    );
}

/// An archive appears under its name only whole and verified: a blob that does not verify
/// leaves no archive and no partial file, and an older file of that name untouched, also
/// when a platform was named (its check reads the config first: red when it wrote the
/// config to the archive's path); a directory is not an archive destination (exit 5).
#[test]
fn archive_appears_only_complete_and_verified() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let img = shaped_image(Flavor::Oci, &SHAPE[..2]);
    push_image(&reg, "archive/bad", "v1", &img);
    corrupt_blob_in_storage(&reg, &img.layers[1].digest);
    let image = image_ref(&reg, "archive/bad", "v1");
    let platform = format!("linux/{}", img.arch);
    for format in ["docker-archive", "oci-archive"] {
        for named in [&[][..], &[os("--platform"), os(&platform)][..]] {
            let file = work.path().join(format!("{format}.tar"));
            std::fs::write(&file, b"an older archive").expect("write");
            let mut args = vec![os("--format"), os(format), os("--repair-attempts"), os("0")];
            args.extend(named.iter().cloned());
            args.extend([os(&image), file.as_os_str()]);
            let o = fastpull_any(&args);
            assert_eq!(o.status.code(), Some(4), "{format} {named:?}: {}", text(&o));
            assert_eq!(
                std::fs::read(&file).expect("read"),
                b"an older archive",
                "{format} {named:?}: the old file must stay as it was"
            );
        }
    }
    let mut left: Vec<String> = std::fs::read_dir(work.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["docker-archive.tar", "oci-archive.tar"],
        "left behind"
    );

    let o = fastpull_any(&[
        os("--format"),
        os("docker-archive"),
        os(&image),
        work.path().as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(stderr_text(&o).contains("is a directory"), "{}", text(&o));
}

fn stderr_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The blob files of an OCI layout, by name.
fn blob_names(layout: &Path) -> Vec<String> {
    let mut v: Vec<String> = tree(&layout.join("blobs/sha256"))
        .into_keys()
        .map(|p: PathBuf| p.to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// In an OCI layout, a name held by another repository's image is not taken over silently
/// (exit 5, before any blob is fetched, saying which entry and what to do); `DEST:NAME`
/// records the image under another name beside it, and `--replace` takes the name.
#[test]
fn oci_layout_names_need_tag_or_replace() {
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let bench = shaped_image(Flavor::Oci, &[(701, 2, 1000)]);
    let multi = shaped_image(Flavor::Oci, &[(711, 2, 3000), (712, 1, 100)]);
    push_image(&reg, "bench/many", "latest", &bench);
    push_image(&reg, "test/multi", "latest", &multi);
    let layout = work.path().join("layout");
    fastpull(
        &reg,
        &[
            os(&image_ref(&reg, "bench/many", "latest")),
            layout.as_os_str(),
        ],
    );
    let index_before = std::fs::read(layout.join("index.json")).expect("index");
    let blobs_before = blob_names(&layout);

    let multi_ref = image_ref(&reg, "test/multi", "latest");
    let o = fastpull_any(&[os(&multi_ref), layout.as_os_str()]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let err = stderr_text(&o);
    for part in ["\"latest\"", "bench/many", "--tag", "--replace"] {
        assert!(err.contains(part), "{part} missing: {err}");
    }
    assert_eq!(
        std::fs::read(layout.join("index.json")).expect("index"),
        index_before,
        "index.json unchanged"
    );
    assert_eq!(
        blob_names(&layout),
        blobs_before,
        "refused before any blob was fetched"
    );

    // DEST:NAME puts it beside the other, under its own name.
    let named = format!("{}:multi", layout.display());
    let o = fastpull(&reg, &[os(&multi_ref), os(&named)]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("as multi"),
        "{}",
        text(&o)
    );
    for (name, img) in [("latest", &bench), ("multi", &multi)] {
        let src = format!("oci:{}:{name}", layout.display());
        assert_bytes(
            &format!("skopeo inspect --raw {src}"),
            &skopeo(&reg, &[os("inspect"), os("--raw"), os(&src)]).stdout,
            &img.manifest,
        );
    }
    // --tag and DEST:NAME that disagree: a usage error.
    let o = fastpull_any(&[os("--tag"), os("other"), os(&multi_ref), os(&named)]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // --replace takes the name.
    fastpull(&reg, &[os("--replace"), os(&multi_ref), layout.as_os_str()]);
    let index = read_json(&layout.join("index.json"));
    let by_name: BTreeMap<String, String> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|e| {
            (
                e["annotations"]["org.opencontainers.image.ref.name"]
                    .as_str()
                    .expect("ref.name")
                    .to_string(),
                e["digest"].as_str().expect("digest").to_string(),
            )
        })
        .collect();
    assert_eq!(
        by_name,
        BTreeMap::from([
            ("latest".to_string(), multi.manifest_digest.clone()),
            ("multi".to_string(), multi.manifest_digest.clone()),
        ]),
        "{index}"
    );
}

/// `--convert oci` rewrites a Docker schema 2 manifest with OCI media types: umoci unpacks
/// it and skopeo's oci: and oci-archive: read it; the config blob and the layers are the
/// pushed bytes; the new manifest digest is printed, and the registry's is kept in the
/// annotations of the manifest and of its index.json entry. Without it, umoci refuses the
/// same image (what the conversion is for).
#[test]
fn convert_oci_makes_docker_images_readable() {
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let (repo, tag) = ("convert/docker", "v3");
    let img = shaped_image(Flavor::Docker, &SHAPE);
    push_image(&reg, repo, tag, &img);
    let image = image_ref(&reg, repo, tag);

    let layout = work.path().join("layout");
    let o = fastpull(
        &reg,
        &[os("--convert"), os("oci"), os(&image), layout.as_os_str()],
    );
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    let index = read_json(&layout.join("index.json"));
    let entry = &index["manifests"][0];
    let new_digest = entry["digest"].as_str().expect("digest").to_string();
    assert_ne!(
        new_digest, img.manifest_digest,
        "a new manifest, a new digest"
    );
    assert!(
        said.contains("Converted")
            && said.contains(&img.manifest_digest)
            && said.contains(&new_digest),
        "the console names both digests:\n{said}"
    );
    assert_eq!(
        entry["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        entry["annotations"]["io.fastpull.source.digest"],
        img.manifest_digest.as_str(),
        "{index}"
    );
    let m = layout_manifest(&layout, tag);
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    assert_eq!(
        m["config"]["digest"],
        img.config.digest.as_str(),
        "config kept"
    );
    assert_eq!(
        m["annotations"]["io.fastpull.source.digest"],
        img.manifest_digest.as_str()
    );
    for (l, pushed) in m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .zip(&img.layers)
    {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert_eq!(l["digest"], pushed.digest.as_str());
    }
    assert_layout_blobs_verify(&layout);
    assert_bytes(
        "the config blob",
        &std::fs::read(layout.join("blobs/sha256").join(hex_of(&img.config.digest)))
            .expect("config blob"),
        &img.config.bytes,
    );

    let rootfs = umoci_unpack(&reg, &layout, tag, &work.path().join("bundle"));
    assert_same_tree(
        "rootfs unpacked by umoci from the converted image",
        "rootfs",
        &tree(&rootfs),
        "layer tars",
        &expected_rootfs(&SHAPE),
    );
    let src = format!("oci:{}:{tag}", layout.display());
    let raw = skopeo(&reg, &[os("inspect"), os("--raw"), os(&src)]).stdout;
    assert_eq!(
        sha256_digest(&raw),
        new_digest,
        "skopeo reads the converted manifest"
    );

    // The same into an oci-archive.
    let file = work.path().join("converted.tar");
    fastpull(
        &reg,
        &[
            os("--convert"),
            os("oci"),
            os("--format"),
            os("oci-archive"),
            os(&image),
            file.as_os_str(),
        ],
    );
    let src = format!("oci-archive:{}", file.display());
    let raw = skopeo(&reg, &[os("inspect"), os("--raw"), os(&src)]).stdout;
    assert_eq!(
        sha256_digest(&raw),
        new_digest,
        "the same conversion in the archive"
    );
    skopeo(&reg, &[os("inspect"), os(&src)]);

    // Without the conversion, umoci does not take the Docker-typed image.
    let plain = work.path().join("plain");
    fastpull(&reg, &[os(&image), plain.as_os_str()]);
    let o = run(
        "umoci",
        &[
            os("unpack"),
            os("--image"),
            os(&format!("{}:{tag}", plain.display())),
            work.path().join("bundle2").as_os_str(),
        ],
    );
    assert!(
        !o.status.success(),
        "umoci read a Docker-typed manifest; the conversion's premise changed: {}",
        text(&o)
    );
}

/// A blob that fails its digest inside an archive is fetched again into the same place
/// (the first fetch's region unmapped, the new one writing over it), and the archive that
/// appears holds only verified bytes: the registry sends one corrupted body (through a
/// proxy), the pull succeeds, and every blob in the archive is the pushed one.
#[test]
fn archive_blob_that_fails_is_fetched_again_in_place() {
    let reg = Registry::start();
    let proxy = FaultProxy::start(&reg.addr());
    let img = shaped_image(Flavor::Oci, &SHAPE);
    push_image(&reg, "archive/repair", "v1", &img);
    let bad = &img.layers[1];
    proxy.add(
        Rule::new(
            &format!("/blobs/{}", bad.digest),
            Fault::Corrupt { at: 4321 },
        )
        .times(1),
    );
    let work = tempfile::tempdir().expect("temp dir");
    let file = work.path().join("img.tar");
    let o = fastpull(
        &reg,
        &[
            os("--format"),
            os("docker-archive"),
            os(&format!("{}/archive/repair:v1", proxy.addr())),
            file.as_os_str(),
        ],
    );
    assert!(
        proxy.blob_requests(&bad.digest).len() >= 2,
        "the corrupted blob was fetched again: {}",
        text(&o)
    );
    let entries = tar_entries(&file);
    assert_archive_blobs_verify(&entries);
    for b in img.blobs() {
        let name = format!("blobs/sha256/{}", hex_of(&b.digest));
        let got = &entries
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .1;
        assert_bytes(&name, got, &b.bytes);
    }
}
