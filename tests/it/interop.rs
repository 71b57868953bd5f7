//! Interop: what fastpull writes must be read, unchanged, by the standard tools.
//!
//! Every test runs the real `fastpull` binary against a throw-away local registry and then
//! hands the result to skopeo or umoci, comparing bytes with what was pushed (or with what
//! skopeo itself writes from the same registry).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Running tools
// ---------------------------------------------------------------------------------------------

/// External tools these tests drive.
const TOOLS: [&str; 2] = ["skopeo", "umoci"];

/// Fails (never skips) when a tool is missing.
pub(crate) fn require_tools() {
    for tool in TOOLS {
        match Command::new(tool).arg("--version").output() {
            Ok(out) => assert!(
                out.status.success(),
                "`{tool} --version` failed ({}): {}\nRun scripts/test, which installs the test \
                 dependencies.",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => panic!(
                "`{tool}` is required by the interop tests but cannot be run ({e}). \
                 Run scripts/test, which installs skopeo, umoci and docker-registry."
            ),
        }
    }
}

/// A command line as text, for failure messages.
pub(crate) fn show(program: &str, args: &[&OsStr]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `program args…`, returning its output; a missing program fails with a hint.
pub(crate) fn run(program: &str, args: &[&OsStr]) -> Output {
    command_for(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            if e.kind() == ErrorKind::NotFound {
                panic!("`{program}` not found: run scripts/test, which installs it")
            }
            panic!("cannot run `{}`: {e}", show(program, args))
        })
}

/// Runs `program args…` and fails with its output unless it exits 0.
pub(crate) fn run_ok(program: &str, args: &[&OsStr], reg: &Registry) -> Output {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "`{}` failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- registry log ---\n{}",
        show(program, args),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        reg.log()
    );
    out
}

/// `fastpull --plain-http ARGS…`, which must succeed.
pub(crate) fn fastpull(reg: &Registry, args: &[&OsStr]) -> Output {
    let bin = crate::support::runner::FASTPULL_BIN;
    let mut full: Vec<&OsStr> = vec![OsStr::new("--plain-http")];
    full.extend_from_slice(args);
    run_ok(bin, &full, reg)
}

/// `skopeo ARGS…` with an insecure policy (nothing is signed here), which must succeed.
pub(crate) fn skopeo(reg: &Registry, args: &[&OsStr]) -> Output {
    let mut full: Vec<&OsStr> = vec![OsStr::new("--insecure-policy")];
    full.extend_from_slice(args);
    run_ok("skopeo", &full, reg)
}

/// `skopeo copy docker://IMAGE dir:DEST` from the loopback registry, plus `extra` flags.
fn skopeo_copy_from_registry(reg: &Registry, image: &str, dest: &Path, extra: &[&str]) {
    let src = format!("docker://{image}");
    let dst = format!("dir:{}", dest.display());
    let mut args: Vec<&OsStr> = vec![OsStr::new("copy"), OsStr::new("--src-tls-verify=false")];
    args.extend(extra.iter().map(OsStr::new));
    args.push(OsStr::new(&src));
    args.push(OsStr::new(&dst));
    skopeo(reg, &args);
}

/// `skopeo inspect --raw oci:LAYOUT:TAG`: the manifest bytes skopeo finds for the tag.
fn skopeo_inspect_raw(reg: &Registry, layout: &Path, tag: &str) -> Vec<u8> {
    let src = format!("oci:{}:{tag}", layout.display());
    skopeo(
        reg,
        &[OsStr::new("inspect"), OsStr::new("--raw"), OsStr::new(&src)],
    )
    .stdout
}

/// `umoci unpack --image LAYOUT:TAG BUNDLE`; returns `BUNDLE/rootfs`.
pub(crate) fn umoci_unpack(reg: &Registry, layout: &Path, tag: &str, bundle: &Path) -> PathBuf {
    let image = format!("{}:{tag}", layout.display());
    run_ok(
        "umoci",
        &[
            OsStr::new("unpack"),
            OsStr::new("--image"),
            OsStr::new(&image),
            bundle.as_os_str(),
        ],
        reg,
    );
    let rootfs = bundle.join("rootfs");
    assert!(
        rootfs.is_dir(),
        "umoci unpack succeeded but left no {}",
        rootfs.display()
    );
    rootfs
}

/// `skopeo copy SRC dir:OUT` (SRC: `oci:LAYOUT:TAG`, `dir:DIR`, …) must give `img`: its
/// manifest and every blob byte for byte, and nothing else but skopeo's `version` file.
pub(crate) fn assert_skopeo_copies(reg: &Registry, src: &str, img: &Image, out: &Path) {
    let dst = format!("dir:{}", out.display());
    skopeo(
        reg,
        &[OsStr::new("copy"), OsStr::new(src), OsStr::new(&dst)],
    );
    let got = tree(out);
    assert_bytes(
        &format!("manifest.json of skopeo copy {src} {dst}"),
        &std::fs::read(out.join("manifest.json")).expect("read OUT/manifest.json"),
        &img.manifest,
    );
    for blob in img.blobs() {
        let name = hex_of(&blob.digest);
        match got.get(Path::new(name)) {
            Some(Node::File(bytes)) => assert_bytes(
                &format!("OUT/{name} ({})", blob.media_type),
                bytes,
                &blob.bytes,
            ),
            other => panic!(
                "OUT has no file for blob {} ({}): {other:?}; OUT holds {:?}",
                blob.digest,
                blob.media_type,
                got.keys().collect::<Vec<_>>()
            ),
        }
    }
    // Nothing but the version file, the manifest and the blobs.
    let mut want_names: BTreeSet<PathBuf> = img
        .blobs()
        .map(|b| PathBuf::from(hex_of(&b.digest)))
        .collect();
    want_names.insert("manifest.json".into());
    want_names.insert("version".into());
    let got_names: BTreeSet<PathBuf> = got.keys().cloned().collect();
    assert_eq!(got_names, want_names, "files skopeo wrote to OUT");
}

// ---------------------------------------------------------------------------------------------
// Comparing trees and bytes
// ---------------------------------------------------------------------------------------------

/// One entry of a directory tree or a tar archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
    Other(String),
}

impl Node {
    fn kind(&self) -> String {
        match self {
            Node::Dir => "directory".to_string(),
            Node::File(b) => format!("file of {} bytes ({})", b.len(), sha256_digest(b)),
            Node::Symlink(t) => format!("symlink to {}", t.display()),
            Node::Other(k) => k.clone(),
        }
    }
}

/// Every entry under `root` (not `root` itself), keyed by path relative to `root`.
pub(crate) fn tree(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        let entries = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read directory {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("entry of {}: {e}", dir.display()));
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .expect("walked path is under the root")
                .to_path_buf();
            let meta = std::fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
            let ft = meta.file_type();
            let node = if ft.is_dir() {
                walk(root, &path, out);
                Node::Dir
            } else if ft.is_file() {
                Node::File(
                    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
                )
            } else if ft.is_symlink() {
                Node::Symlink(
                    std::fs::read_link(&path)
                        .unwrap_or_else(|e| panic!("readlink {}: {e}", path.display())),
                )
            } else {
                Node::Other(format!("{ft:?}"))
            };
            out.insert(rel, node);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Asserts two trees hold the same names and identical content, with a readable diff (no
/// megabytes of bytes in the message).
pub(crate) fn assert_same_tree(
    what: &str,
    left_name: &str,
    left: &BTreeMap<PathBuf, Node>,
    right_name: &str,
    right: &BTreeMap<PathBuf, Node>,
) {
    let lk: BTreeSet<&PathBuf> = left.keys().collect();
    let rk: BTreeSet<&PathBuf> = right.keys().collect();
    let only_left: Vec<_> = lk.difference(&rk).collect();
    let only_right: Vec<_> = rk.difference(&lk).collect();
    assert!(
        only_left.is_empty() && only_right.is_empty(),
        "{what}: file names differ\n  only in {left_name}: {only_left:?}\n  only in \
         {right_name}: {only_right:?}\n  {left_name}: {lk:?}\n  {right_name}: {rk:?}"
    );
    let differing: Vec<String> = left
        .iter()
        .filter(|(p, n)| right[*p] != **n)
        .map(|(p, n)| {
            format!(
                "{}: {left_name} has {}, {right_name} has {}",
                p.display(),
                n.kind(),
                right[p].kind()
            )
        })
        .collect();
    assert!(
        differing.is_empty(),
        "{what}: content differs\n  {}",
        differing.join("\n  ")
    );
}

/// The entries of an uncompressed tar, keyed by path (trailing `/` of directories dropped).
pub(crate) fn tar_tree(tar_bytes: &[u8]) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        let path: PathBuf = entry.path().expect("tar entry path").components().collect();
        let node = match entry.header().entry_type() {
            tar::EntryType::Directory => Node::Dir,
            tar::EntryType::Regular => {
                let mut content = Vec::new();
                entry.read_to_end(&mut content).expect("read tar entry");
                Node::File(content)
            }
            other => panic!("unexpected tar entry type {other:?} for {}", path.display()),
        };
        out.insert(path, node);
    }
    out
}

/// What a rootfs unpacked from layers made of `random_tar(seed, files, bytes)` must hold.
pub(crate) fn expected_rootfs(layers: &[(u64, usize, usize)]) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    for &(seed, files, bytes) in layers {
        out.extend(tar_tree(&random_tar(seed, files, bytes)));
    }
    out
}

pub(crate) fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

pub(crate) fn hex_of(digest: &str) -> &str {
    digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"))
}

/// Asserts `got` equals `want` byte for byte, printing both as text when they are short.
pub(crate) fn assert_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let show = |b: &[u8]| {
            if b.len() <= 4096 {
                String::from_utf8_lossy(b).into_owned()
            } else {
                format!("<{} bytes>", b.len())
            }
        };
        panic!(
            "{what}: bytes differ\n  got  {} ({} bytes): {}\n  want {} ({} bytes): {}",
            sha256_digest(got),
            got.len(),
            show(got),
            sha256_digest(want),
            want.len(),
            show(want)
        );
    }
}

pub(crate) fn image_ref(reg: &Registry, repo: &str, tag: &str) -> String {
    format!("{}/{repo}:{tag}", reg.addr())
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn skopeo_reads_fastpull_oci_layout() {
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let (repo, tag) = ("interop/skopeo-oci", "v1");
    let img = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(101, 3, 2000))
        .layer(random_layer(102, 2, 600 * 1024))
        .layer(random_layer(103, 1, 10))
        .build();
    push_image(&reg, repo, tag, &img);

    let dest = work.path().join("layout");
    fastpull(
        &reg,
        &[OsStr::new(&image_ref(&reg, repo, tag)), dest.as_os_str()],
    );

    // skopeo finds the tag and returns the manifest exactly as pushed.
    let raw = skopeo_inspect_raw(&reg, &dest, tag);
    assert_bytes("skopeo inspect --raw oci:DEST:TAG", &raw, &img.manifest);

    // skopeo can copy the whole image out of the layout, blobs and all.
    let src = format!("oci:{}:{tag}", dest.display());
    assert_skopeo_copies(&reg, &src, &img, &work.path().join("out"));
}

#[test]
fn umoci_unpacks_fastpull_oci_layout() {
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let (repo, tag) = ("interop/umoci", "latest");
    let shape = [(201, 3, 1500), (202, 2, 300 * 1024), (203, 4, 1)];
    let mut builder = ImageBuilder::new(Flavor::Oci);
    for &(seed, files, bytes) in &shape {
        builder = builder.layer(random_layer(seed, files, bytes));
    }
    let img = builder.build();
    push_image(&reg, repo, tag, &img);

    let dest = work.path().join("layout");
    fastpull(
        &reg,
        &[OsStr::new(&image_ref(&reg, repo, tag)), dest.as_os_str()],
    );
    let rootfs = umoci_unpack(&reg, &dest, tag, &work.path().join("bundle"));
    assert_same_tree(
        "rootfs unpacked by umoci",
        "rootfs",
        &tree(&rootfs),
        "layer tars",
        &expected_rootfs(&shape),
    );
}

/// Pushes a 3-layer image of `flavor` (one layer of a few MiB), then pulls it with
/// `fastpull --format dir` and with `skopeo copy … dir:`; the trees must be identical.
fn dir_matches_skopeo(reg: &Registry, work: &Path, flavor: Flavor) {
    let repo = format!("interop/dir-{flavor:?}").to_lowercase();
    let tag = "v1";
    let img = ImageBuilder::new(flavor)
        .layer(random_layer(301, 3, 4000))
        .layer(random_layer(302, 3, 1024 * 1024))
        .layer(random_layer(303, 1, 64))
        .build();
    assert!(
        img.layers[1].bytes.len() > 3 * 1024 * 1024,
        "the big layer should be a few MiB"
    );
    push_image(reg, &repo, tag, &img);
    let image = image_ref(reg, &repo, tag);

    let d1 = work.join(format!("{flavor:?}-fastpull"));
    let d2 = work.join(format!("{flavor:?}-skopeo"));
    fastpull(
        reg,
        &[
            OsStr::new("--format"),
            OsStr::new("dir"),
            OsStr::new(&image),
            d1.as_os_str(),
        ],
    );
    skopeo_copy_from_registry(reg, &image, &d2, &[]);

    let fast = tree(&d1);
    let skop = tree(&d2);
    assert_same_tree(
        &format!("{flavor:?} image: fastpull --format dir vs skopeo copy dir:"),
        "fastpull",
        &fast,
        "skopeo",
        &skop,
    );
    // Both are the pushed image, not merely equal to each other.
    assert_eq!(
        fast.get(Path::new("manifest.json")),
        Some(&Node::File(img.manifest.clone())),
        "{flavor:?}: manifest.json is not the pushed manifest"
    );
    for blob in img.blobs() {
        assert!(
            fast.get(Path::new(hex_of(&blob.digest))) == Some(&Node::File(blob.bytes.clone())),
            "{flavor:?}: blob {} missing or different in the dir layout",
            blob.digest
        );
    }
}

#[test]
fn dir_format_is_byte_identical_to_skopeo_dir() {
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    dir_matches_skopeo(&reg, work.path(), Flavor::Oci);
    dir_matches_skopeo(&reg, work.path(), Flavor::Docker);

    // A 2-platform index: the arm64 pick of both tools must agree.
    let repo = "interop/dir-multi";
    let tag = "multi";
    let amd64 = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(311, 2, 1000))
        .layer(random_layer(312, 1, 200 * 1024))
        .build();
    let arm64 = ImageBuilder::new(Flavor::Oci)
        .platform("linux", "arm64", Some("v8"))
        .layer(random_layer(321, 2, 1000))
        .layer(random_layer(322, 1, 200 * 1024))
        .build();
    push_index(&reg, repo, tag, Flavor::Oci, &[&amd64, &arm64]);
    let image = image_ref(&reg, repo, tag);
    let d1 = work.path().join("multi-fastpull");
    let d2 = work.path().join("multi-skopeo");
    fastpull(
        &reg,
        &[
            OsStr::new("--format"),
            OsStr::new("dir"),
            OsStr::new("--platform"),
            OsStr::new("linux/arm64"),
            OsStr::new(&image),
            d1.as_os_str(),
        ],
    );
    skopeo_copy_from_registry(
        &reg,
        &image,
        &d2,
        &["--override-arch", "arm64", "--override-os", "linux"],
    );
    let fast = tree(&d1);
    assert_same_tree(
        "index, linux/arm64: fastpull --format dir vs skopeo copy --override-arch arm64",
        "fastpull",
        &fast,
        "skopeo",
        &tree(&d2),
    );
    assert_bytes(
        "manifest.json of the linux/arm64 pick",
        &std::fs::read(d1.join("manifest.json")).expect("read manifest.json"),
        &arm64.manifest,
    );
    let want_names: BTreeSet<PathBuf> = arm64
        .blobs()
        .map(|b| PathBuf::from(hex_of(&b.digest)))
        .chain(["manifest.json".into(), "version".into()])
        .collect();
    assert_eq!(
        fast.keys().cloned().collect::<BTreeSet<_>>(),
        want_names,
        "the arm64 dir layout must hold exactly the arm64 image"
    );
}

#[test]
fn oci_layout_holds_two_tags() {
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let repo = "interop/two-tags";
    let shared = random_layer(401, 2, 3000);
    let a = ImageBuilder::new(Flavor::Oci)
        .layer(shared.clone())
        .layer(random_layer(402, 1, 500))
        .build();
    let b = ImageBuilder::new(Flavor::Oci)
        .layer(shared)
        .layer(random_layer(403, 3, 700))
        .build();
    assert_eq!(a.layers[0].digest, b.layers[0].digest);
    assert_ne!(a.manifest_digest, b.manifest_digest);
    push_image(&reg, repo, "a", &a);
    push_image(&reg, repo, "b", &b);

    let dest = work.path().join("layout");
    for tag in ["a", "b"] {
        fastpull(
            &reg,
            &[OsStr::new(&image_ref(&reg, repo, tag)), dest.as_os_str()],
        );
    }

    assert_bytes(
        "skopeo inspect --raw oci:DEST:a",
        &skopeo_inspect_raw(&reg, &dest, "a"),
        &a.manifest,
    );
    assert_bytes(
        "skopeo inspect --raw oci:DEST:b",
        &skopeo_inspect_raw(&reg, &dest, "b"),
        &b.manifest,
    );

    let index = read_json(&dest.join("index.json"));
    let entries = index["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("index.json has no manifests array: {index}"));
    assert_eq!(entries.len(), 2, "index.json entries: {index}");
    let mut by_tag = BTreeMap::new();
    for e in entries {
        let name = e["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .unwrap_or_else(|| panic!("index entry without ref.name: {e}"));
        by_tag.insert(
            name.to_string(),
            e["digest"].as_str().unwrap_or("").to_string(),
        );
    }
    assert_eq!(
        by_tag,
        BTreeMap::from([
            ("a".to_string(), a.manifest_digest.clone()),
            ("b".to_string(), b.manifest_digest.clone()),
        ]),
        "index.json: {index}"
    );

    // The blob store holds both images (the shared layer once) and nothing else.
    let want: BTreeSet<PathBuf> = a
        .blobs()
        .chain(b.blobs())
        .map(|bl| bl.digest.as_str())
        .chain([a.manifest_digest.as_str(), b.manifest_digest.as_str()])
        .map(|d| PathBuf::from(hex_of(d)))
        .collect();
    let blobs_dir = dest.join("blobs/sha256");
    let got: BTreeSet<PathBuf> = tree(&blobs_dir).keys().cloned().collect();
    assert_eq!(got, want, "files in {}", blobs_dir.display());

    // Both tags are complete images to skopeo, not just resolvable manifests.
    for (tag, img) in [("a", &a), ("b", &b)] {
        let out = work.path().join(format!("out-{tag}"));
        let src = format!("oci:{}:{tag}", dest.display());
        let dst = format!("dir:{}", out.display());
        skopeo(
            &reg,
            &[OsStr::new("copy"), OsStr::new(&src), OsStr::new(&dst)],
        );
        for blob in img.blobs() {
            assert_bytes(
                &format!("tag {tag}: blob {} copied out by skopeo", blob.digest),
                &std::fs::read(out.join(hex_of(&blob.digest))).unwrap_or_else(|e| {
                    panic!("tag {tag}: skopeo did not copy {}: {e}", blob.digest)
                }),
                &blob.bytes,
            );
        }
    }
}

#[test]
fn umoci_unpacks_multi_platform_pick() {
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let (repo, tag) = ("interop/umoci-multi", "multi");
    let amd_shape = [(501, 2, 1000), (502, 1, 4000)];
    let arm_shape = [(511, 3, 800), (512, 2, 100 * 1024)];
    let build = |arch: &str, variant: Option<&str>, shape: &[(u64, usize, usize)]| {
        let mut b = ImageBuilder::new(Flavor::Oci).platform("linux", arch, variant);
        for &(seed, files, bytes) in shape {
            b = b.layer(random_layer(seed, files, bytes));
        }
        b.build()
    };
    let amd64 = build("amd64", None, &amd_shape);
    let arm64 = build("arm64", Some("v8"), &arm_shape);
    push_index(&reg, repo, tag, Flavor::Oci, &[&amd64, &arm64]);

    let dest = work.path().join("layout");
    fastpull(
        &reg,
        &[
            OsStr::new("--platform"),
            OsStr::new("linux/arm64"),
            OsStr::new(&image_ref(&reg, repo, tag)),
            dest.as_os_str(),
        ],
    );

    // The tag names the arm64 image in the layout.
    let index = read_json(&dest.join("index.json"));
    let entries = index["manifests"].as_array().expect("manifests array");
    assert_eq!(entries.len(), 1, "index.json: {index}");
    assert_eq!(
        entries[0]["digest"].as_str(),
        Some(arm64.manifest_digest.as_str()),
        "index.json must point at the arm64 manifest: {index}"
    );
    assert_bytes(
        "skopeo inspect --raw oci:DEST:TAG after --platform linux/arm64",
        &skopeo_inspect_raw(&reg, &dest, tag),
        &arm64.manifest,
    );

    let rootfs = umoci_unpack(&reg, &dest, tag, &work.path().join("bundle"));
    assert_same_tree(
        "rootfs unpacked by umoci from the linux/arm64 pick",
        "rootfs",
        &tree(&rootfs),
        "arm64 layer tars",
        &expected_rootfs(&arm_shape),
    );
}
