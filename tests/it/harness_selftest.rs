//! Self-tests for the integration-test harness in `support/`.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use crate::support::*;

/// Fetches `reference` with `accept` and checks bytes, digest header and content type.
fn assert_manifest_roundtrip(
    reg: &Registry,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
    digest: &str,
) {
    let got = fetch_manifest(reg, repo, reference, media_type);
    assert_eq!(
        got.status,
        200,
        "GET manifest {repo}:{reference}: {}\n{}",
        String::from_utf8_lossy(&got.body),
        reg.log()
    );
    assert_eq!(got.body, bytes, "manifest bytes of {repo}:{reference}");
    assert_eq!(
        got.digest.as_deref(),
        Some(digest),
        "digest of {repo}:{reference}"
    );
    assert_eq!(
        got.content_type.as_deref(),
        Some(media_type),
        "content type of {repo}:{reference}"
    );
}

fn assert_blob_served(reg: &Registry, repo: &str, blob: &Blob) {
    let got = fetch_blob(reg, repo, &blob.digest);
    assert_eq!(got.status, 200, "GET blob {}: {}", blob.digest, reg.log());
    assert_eq!(
        got.body.len(),
        blob.bytes.len(),
        "length of blob {}",
        blob.digest
    );
    assert!(
        got.body == blob.bytes,
        "bytes of blob {} differ",
        blob.digest
    );
    assert_eq!(got.digest.as_deref(), Some(blob.digest.as_str()));
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("gunzip layer");
    out
}

#[test]
fn registry_starts_and_serves_v2() {
    let reg = Registry::start();
    assert!(reg.addr().starts_with("127.0.0.1:"));
    assert_eq!(reg.url(), format!("http://{}", reg.addr()));
    assert_eq!(reg.addr(), format!("127.0.0.1:{}", reg.port()));
    let mut resp = http_agent()
        .get(format!("{}/v2/", reg.url()))
        .call()
        .expect("GET /v2/");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.body_mut().read_to_string().expect("read /v2/ body"),
        "{}"
    );
    assert!(reg.storage_root().is_dir());
    assert!(
        reg.blob_data_path(EMPTY_SHA256)
            .ends_with("docker/registry/v2/blobs/sha256/e3/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/data")
    );
}

#[test]
fn registry_process_is_killed_on_drop() {
    let reg = Registry::start();
    let url = format!("{}/v2/", reg.url());
    let dir = reg.dir().to_path_buf();
    drop(reg);
    assert!(
        http_agent().get(&url).call().is_err(),
        "registry still answering after drop"
    );
    assert!(!dir.exists(), "temp dir not removed");
}

#[test]
fn extra_config_auth_is_applied() {
    let reg = Registry::start_with_extra_config(
        "auth:\n  silly:\n    realm: http://127.0.0.1/token\n    service: fastpull-test\n",
    );
    let resp = http_agent()
        .get(format!("{}/v2/", reg.url()))
        .call()
        .expect("GET /v2/");
    assert_eq!(resp.status().as_u16(), 401);
    let challenge = resp
        .headers()
        .get("Www-Authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        challenge.contains("service=\"fastpull-test\""),
        "challenge: {challenge}"
    );
}

#[test]
fn layers_are_deterministic_and_valid() {
    let (a, a_diff) = random_layer(7, 3, 1000);
    let (b, b_diff) = random_layer(7, 3, 1000);
    let (c, _) = random_layer(8, 3, 1000);
    assert_eq!(a, b);
    assert_eq!(a_diff, b_diff);
    assert_ne!(a.digest, c.digest);
    assert_eq!(a.digest, sha256_digest(&a.bytes));
    assert_eq!(a.size(), a.bytes.len() as u64);

    let tar_bytes = gunzip(&a.bytes);
    assert_eq!(a_diff, sha256_digest(&tar_bytes));
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut dirs = 0;
    let mut files = 0;
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        match entry.header().entry_type() {
            tar::EntryType::Directory => dirs += 1,
            tar::EntryType::Regular => {
                let mut content = Vec::new();
                entry.read_to_end(&mut content).expect("read tar entry");
                assert_eq!(content.len(), 1000);
                files += 1;
            }
            other => panic!("unexpected entry type {other:?}"),
        }
    }
    assert_eq!((dirs, files), (1, 3));

    let (empty, empty_diff) = empty_layer();
    let empty_tar = gunzip(&empty.bytes);
    assert_eq!(empty_tar, vec![0u8; 1024]);
    assert_eq!(empty_diff, sha256_digest(&empty_tar));
    let mut archive = tar::Archive::new(empty_tar.as_slice());
    assert_eq!(archive.entries().expect("tar entries").count(), 0);

    let zero = zero_byte_blob();
    assert_eq!(zero.size(), 0);
    assert_eq!(zero.digest, EMPTY_SHA256);
}

#[test]
fn image_json_has_expected_shape() {
    let img = ImageBuilder::new(Flavor::Oci)
        .platform("linux", "arm64", Some("v8"))
        .layer(random_layer(1, 1, 10))
        .layer(empty_layer())
        .build();
    let manifest: serde_json::Value = serde_json::from_slice(&img.manifest).expect("manifest json");
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], Flavor::Oci.manifest_media_type());
    assert_eq!(
        manifest["config"]["mediaType"],
        Flavor::Oci.config_media_type()
    );
    assert_eq!(manifest["config"]["digest"], img.config.digest.as_str());
    assert_eq!(manifest["config"]["size"], img.config.size());
    let layers = manifest["layers"].as_array().expect("layers array");
    assert_eq!(layers.len(), 2);
    for (l, blob) in layers.iter().zip(&img.layers) {
        assert_eq!(l["mediaType"], Flavor::Oci.layer_media_type());
        assert_eq!(l["digest"], blob.digest.as_str());
        assert_eq!(l["size"], blob.size());
    }
    assert_eq!(img.manifest_digest, sha256_digest(&img.manifest));

    let config: serde_json::Value = serde_json::from_slice(&img.config.bytes).expect("config json");
    assert_eq!(config["architecture"], "arm64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["variant"], "v8");
    assert_eq!(config["rootfs"]["type"], "layers");
    assert_eq!(
        config["rootfs"]["diff_ids"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(config["history"].as_array().map(Vec::len), Some(2));
    assert_eq!(config["config"]["Cmd"][0], "/bin/sh");

    let docker = ImageBuilder::new(Flavor::Docker)
        .layer(random_layer(1, 1, 10))
        .build();
    let config: serde_json::Value =
        serde_json::from_slice(&docker.config.bytes).expect("config json");
    assert!(config.get("variant").is_none());
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(
        docker.layers[0].media_type,
        Flavor::Docker.layer_media_type()
    );

    let (idx, idx_digest) = build_index(Flavor::Docker, &[&img, &docker]);
    assert_eq!(idx_digest, sha256_digest(&idx));
    let idx: serde_json::Value = serde_json::from_slice(&idx).expect("index json");
    assert_eq!(idx["mediaType"], Flavor::Docker.index_media_type());
    assert_eq!(idx["manifests"][0]["platform"]["variant"], "v8");
    assert!(idx["manifests"][1]["platform"].get("variant").is_none());
    assert_eq!(idx["manifests"][1]["size"], docker.manifest.len() as u64);
    assert_eq!(
        idx["manifests"][1]["mediaType"],
        Flavor::Docker.manifest_media_type()
    );
}

#[test]
fn both_blob_upload_paths_work() {
    let reg = Registry::start();
    let repo = "selftest/uploads";
    let small = Blob::new("application/octet-stream", b"hello, registry".to_vec());
    push_blob_monolithic(&reg, repo, &small);
    assert_blob_served(&reg, repo, &small);

    // A chunked upload of a small blob with a deliberately uneven chunk size.
    let (odd, _) = random_layer(11, 2, 3000);
    push_blob_chunked(&reg, repo, &odd, 1000);
    assert_blob_served(&reg, repo, &odd);

    // push_blob picks the chunked path above the threshold.
    let (big, _) = random_layer(12, 3, 700 * 1024);
    assert!(big.bytes.len() > CHUNKED_THRESHOLD);
    push_blob(&reg, repo, &big);
    assert_blob_served(&reg, repo, &big);

    // Pushing an already-present blob again is fine.
    push_blob(&reg, repo, &small);

    // A 0-byte blob can be uploaded monolithically.
    let zero = zero_byte_blob();
    push_blob(&reg, repo, &zero);
    assert_blob_served(&reg, repo, &zero);
}

#[test]
fn oci_image_roundtrip() {
    let reg = Registry::start();
    let repo = "selftest/oci";
    let img = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(1, 4, 4096))
        .layer(random_layer(2, 3, 512 * 1024))
        .layer(empty_layer())
        .build();
    assert!(
        img.layers[1].bytes.len() > CHUNKED_THRESHOLD,
        "layer 1 must take the chunked path"
    );
    push_image(&reg, repo, "v1", &img);

    let mt = Flavor::Oci.manifest_media_type();
    assert_manifest_roundtrip(&reg, repo, "v1", mt, &img.manifest, &img.manifest_digest);
    assert_manifest_roundtrip(
        &reg,
        repo,
        &img.manifest_digest,
        mt,
        &img.manifest,
        &img.manifest_digest,
    );
    for blob in img.blobs() {
        assert_blob_served(&reg, repo, blob);
        let on_disk = std::fs::read(reg.blob_data_path(&blob.digest)).expect("read blob data file");
        assert!(on_disk == blob.bytes, "stored bytes of {}", blob.digest);
    }
}

#[test]
fn docker_image_roundtrip() {
    let reg = Registry::start();
    let repo = "selftest/docker";
    let img = ImageBuilder::new(Flavor::Docker)
        .layer(random_layer(3, 2, 2048))
        .layer(random_layer(4, 1, 100))
        .build();
    push_image(&reg, repo, "latest", &img);
    let mt = Flavor::Docker.manifest_media_type();
    assert_manifest_roundtrip(
        &reg,
        repo,
        "latest",
        mt,
        &img.manifest,
        &img.manifest_digest,
    );
    for blob in img.blobs() {
        assert_blob_served(&reg, repo, blob);
    }
}

#[test]
fn push_by_digest_creates_no_tag() {
    let reg = Registry::start();
    let repo = "selftest/bydigest";
    let img = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(5, 1, 10))
        .build();
    push_image_by_digest(&reg, repo, &img);
    let mt = img.manifest_media_type();
    assert_manifest_roundtrip(
        &reg,
        repo,
        &img.manifest_digest,
        mt,
        &img.manifest,
        &img.manifest_digest,
    );
    let tags = fetch_manifest(&reg, repo, "latest", mt);
    assert_eq!(tags.status, 404);
}

fn index_roundtrip(flavor: Flavor) {
    let reg = Registry::start();
    let repo = "selftest/multi";
    let amd64 = ImageBuilder::new(flavor)
        .layer(random_layer(20, 2, 1000))
        .build();
    let arm64 = ImageBuilder::new(flavor)
        .platform("linux", "arm64", Some("v8"))
        .layer(random_layer(21, 2, 1000))
        .build();
    let (bytes, digest) = push_index(&reg, repo, "multi", flavor, &[&amd64, &arm64]);
    assert_eq!(digest, sha256_digest(&bytes));
    let mt = flavor.index_media_type();
    assert_manifest_roundtrip(&reg, repo, "multi", mt, &bytes, &digest);
    assert_manifest_roundtrip(&reg, repo, &digest, mt, &bytes, &digest);
    for img in [&amd64, &arm64] {
        assert_manifest_roundtrip(
            &reg,
            repo,
            &img.manifest_digest,
            img.manifest_media_type(),
            &img.manifest,
            &img.manifest_digest,
        );
    }
}

#[test]
fn oci_index_roundtrip() {
    index_roundtrip(Flavor::Oci);
}

#[test]
fn docker_manifest_list_roundtrip() {
    index_roundtrip(Flavor::Docker);
}

#[test]
fn corrupted_and_truncated_blobs_are_served_wrong() {
    let reg = Registry::start();
    let repo = "selftest/corrupt";
    let img = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(30, 2, 5000))
        .layer(random_layer(31, 2, 5000))
        .build();
    push_image(&reg, repo, "v1", &img);

    let victim = &img.layers[0];
    corrupt_blob_in_storage(&reg, &victim.digest);
    let got = fetch_blob(&reg, repo, &victim.digest);
    assert_eq!(got.status, 200);
    assert_eq!(
        got.body.len(),
        victim.bytes.len(),
        "corruption must keep the size"
    );
    assert!(got.body != victim.bytes, "corrupted blob served unchanged");
    assert_ne!(sha256_digest(&got.body), victim.digest);
    let differing = got
        .body
        .iter()
        .zip(&victim.bytes)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 1);

    let victim = &img.layers[1];
    truncate_blob_in_storage(&reg, &victim.digest);
    let got = fetch_blob(&reg, repo, &victim.digest);
    assert_eq!(got.status, 200);
    assert_eq!(got.body, victim.bytes[..victim.bytes.len() - 1]);
}

#[test]
fn manifest_rejection_is_reported() {
    let reg = Registry::start();
    let repo = "selftest/reject";
    // Manifest whose layer blob was never pushed.
    let img = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(40, 1, 10))
        .build();
    push_blob(&reg, repo, &img.config);
    let err = try_push_manifest(&reg, repo, "v1", img.manifest_media_type(), &img.manifest)
        .expect_err("registry accepted a manifest with a missing layer");
    assert_eq!(err.status, 400, "{err}");
    assert!(err.body.contains("MANIFEST_BLOB_UNKNOWN"), "{err}");
    assert!(err.body.contains(&img.layers[0].digest), "{err}");

    // Index whose child manifest was never pushed.
    let (bytes, _) = build_index(Flavor::Oci, &[&img]);
    let err = try_push_manifest(&reg, repo, "idx", Flavor::Oci.index_media_type(), &bytes)
        .expect_err("registry accepted an index with a missing child");
    assert_eq!(err.status, 400, "{err}");
    assert!(err.body.contains("MANIFEST_BLOB_UNKNOWN"), "{err}");
    assert!(err.body.contains(&img.manifest_digest), "{err}");
}

/// Pull with skopeo into an OCI layout and unpack with umoci: proves the layers are real.
fn skopeo_umoci_unpack(reg: &Registry, repo: &str, tag: &str, work: &Path) -> std::path::PathBuf {
    let layout = work.join("layout");
    let bundle = work.join("bundle");
    std::fs::create_dir_all(work).expect("create work dir");
    let out = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", "--insecure-policy"])
        .arg(format!("docker://{}/{repo}:{tag}", reg.addr()))
        .arg(format!("oci:{}:{tag}", layout.display()))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        reg.log()
    );
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&bundle)
        .output()
        .expect("run umoci");
    assert!(
        out.status.success(),
        "umoci unpack failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bundle.join("rootfs")
}

fn have_tool(name: &str) -> bool {
    Command::new(name).arg("--version").output().is_ok()
}

#[test]
fn layers_unpack_with_skopeo_and_umoci() {
    assert!(
        have_tool("skopeo") && have_tool("umoci"),
        "skopeo and umoci are required: run scripts/test, which installs them"
    );
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    for (flavor, tag) in [(Flavor::Oci, "oci"), (Flavor::Docker, "docker")] {
        let img = ImageBuilder::new(flavor)
            .layer(random_layer(50, 2, 100))
            .layer(empty_layer())
            .layer(random_layer(51, 1, 200))
            .build();
        push_image(&reg, "selftest/unpack", tag, &img);
        let rootfs = skopeo_umoci_unpack(&reg, "selftest/unpack", tag, &work.path().join(tag));
        let expected = random_tar(50, 2, 100);
        let mut archive = tar::Archive::new(expected.as_slice());
        for entry in archive.entries().expect("tar entries") {
            let mut entry = entry.expect("tar entry");
            let path = entry.path().expect("entry path").into_owned();
            if entry.header().entry_type().is_file() {
                let mut want = Vec::new();
                entry.read_to_end(&mut want).expect("read entry");
                let got = std::fs::read(rootfs.join(&path))
                    .unwrap_or_else(|e| panic!("{} missing from rootfs: {e}", path.display()));
                assert!(got == want, "{} content differs", path.display());
            } else {
                assert!(rootfs.join(&path).is_dir());
            }
        }
        assert_eq!(
            std::fs::read(rootfs.join("layer-51/file-0.bin"))
                .expect("file from 3rd layer")
                .len(),
            200
        );
    }
}

/// Distribution 2.8 accepts these odd cases; later tests rely on being able to push them.
#[test]
fn registry_accepts_odd_manifests() {
    let reg = Registry::start();
    let repo = "selftest/odd";
    let zero = zero_byte_blob();
    let mut cases = Vec::new();
    for flavor in [Flavor::Oci, Flavor::Docker] {
        // A 0-byte blob as the only layer.
        let img = ImageBuilder::new(flavor)
            .raw_layer(zero.clone(), zero.digest.clone())
            .build();
        assert_eq!(img.layers[0].media_type, flavor.layer_media_type());
        cases.push((format!("{flavor:?}-zero-layer"), img));
        // No layers at all.
        cases.push((
            format!("{flavor:?}-no-layers"),
            ImageBuilder::new(flavor).build(),
        ));
    }
    for (tag, img) in &cases {
        push_image_blobs(&reg, repo, img);
        let digest = try_push_manifest(&reg, repo, tag, img.manifest_media_type(), &img.manifest)
            .unwrap_or_else(|e| panic!("{tag} rejected: {e}"));
        assert_eq!(digest, img.manifest_digest, "{tag}");
        let mt = img.manifest_media_type();
        assert_manifest_roundtrip(&reg, repo, tag, mt, &img.manifest, &img.manifest_digest);
    }
    assert_blob_served(&reg, repo, &zero);

    // Empty index / manifest list.
    for flavor in [Flavor::Oci, Flavor::Docker] {
        let (bytes, digest) = build_index(flavor, &[]);
        let tag = format!("{flavor:?}-empty-index");
        let got = try_push_manifest(&reg, repo, &tag, flavor.index_media_type(), &bytes)
            .unwrap_or_else(|e| panic!("{tag} rejected: {e}"));
        assert_eq!(got, digest);
        assert_manifest_roundtrip(&reg, repo, &tag, flavor.index_media_type(), &bytes, &digest);
    }
}

#[test]
#[should_panic(expected = "docker-registry did not start")]
fn broken_config_fails_loudly() {
    // Invalid YAML: the registry refuses the config and exits at once on every attempt.
    let _reg = Registry::start_with_extra_config("auth: [\n");
}

#[test]
#[should_panic(expected = "must not contain the top-level key `http:`")]
fn extra_config_may_not_override_http() {
    let _reg = Registry::start_with_extra_config("http:\n  addr: 127.0.0.1:1\n");
}

/// What `cmd` sets (`Some`) or removes (`None`) in the child's environment.
fn env_changes(cmd: &Command) -> HashMap<String, Option<String>> {
    cmd.get_envs()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.map(|v| v.to_string_lossy().into_owned()),
            )
        })
        .collect()
}

/// Every way a test starts fastpull scrubs its environment: an empty `HOME` (or the test's
/// own) and none of the caller's credential, proxy, TLS or logging variables. Checked red by
/// dropping the `env_remove` loop of `runner::fastpull_command`.
#[test]
fn every_fastpull_command_gets_a_scrubbed_environment() {
    use crate::support::cli::{Sandbox, SCRUBBED_ENV};
    use crate::support::runner::{empty_home, FASTPULL_BIN};
    let home = empty_home();
    let sb = Sandbox::new();
    let cases = [
        ("fastpull_command", env_changes(&fastpull_command()), home),
        ("command_for", env_changes(&command_for(FASTPULL_BIN)), home),
        ("Sandbox::cmd", env_changes(&sb.cmd()), sb.home()),
    ];
    for (how, env, want_home) in &cases {
        for var in SCRUBBED_ENV {
            assert_eq!(env.get(*var), Some(&None), "{how}: {var} reaches fastpull");
        }
        assert_eq!(
            env.get("HOME"),
            Some(&Some(want_home.display().to_string())),
            "{how}: HOME"
        );
    }
    assert!(
        std::fs::read_dir(home)
            .expect("empty HOME")
            .next()
            .is_none(),
        "{} is not empty",
        home.display()
    );
    let path = cases[2].1["PATH"].clone().expect("Sandbox sets PATH");
    assert!(
        path.starts_with(&sb.bin_dir().display().to_string()),
        "{path}"
    );
    // Other programs keep the caller's environment.
    assert_eq!(env_changes(&command_for("skopeo")), HashMap::new());
}

/// A helper server whose port another server took between "free" and "bound" moves to the
/// next port: readiness is the child itself listening there, not a connection succeeding
/// (red with `listens_on` replaced by a connect: the taken port returned, answered by this test's
/// listener).
#[test]
fn a_helper_server_moves_off_a_port_another_server_took() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, port, _) = start_on_ports(
        "microsocks",
        std::net::Ipv4Addr::LOCALHOST,
        [taken_port, free_port(), free_port()],
        |port, attempt| {
            let log = dir.path().join(format!("microsocks-{attempt}.log"));
            let out = std::fs::File::create(&log).expect("log file");
            let child = Command::new("/usr/bin/microsocks")
                .args(["-i", "127.0.0.1", "-p", &port.to_string()])
                .stdin(std::process::Stdio::null())
                .stdout(out.try_clone().expect("dup"))
                .stderr(out)
                .spawn()
                .expect("spawn microsocks (scripts/deps installs it)");
            (child, log)
        },
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_ne!(port, taken_port, "started on the port this test holds");
}

/// A [`ClosedPort`] refuses connections, and no server can take it while it lives.
#[test]
fn a_closed_port_refuses_connections_and_cannot_be_taken() {
    let closed = ClosedPort::new();
    let err = std::net::TcpStream::connect(closed.addr()).expect_err("connected");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let err = std::net::TcpListener::bind(closed.addr()).expect_err("bound");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
}

/// The CDN (nginx) too: its bind error on a taken port ends that attempt and it serves from
/// the next one.
#[test]
fn the_cdn_moves_off_a_port_another_server_took() {
    let ip = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let taken = std::net::TcpListener::bind((ip, 0)).expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let cdn = crate::support::cdn::Cdn::start_on_ports(
        None,
        "",
        "",
        None,
        [taken_port, free_port_on(ip), free_port_on(ip)],
    );
    assert_ne!(cdn.addr(), format!("{ip}:{taken_port}"));
    std::fs::write(cdn.root().join("hello"), b"served").expect("write");
    let mut resp = http_agent()
        .get(format!("http://{}/hello", cdn.addr()))
        .call()
        .expect("GET");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.body_mut().read_to_string().expect("body"), "served");
}

/// Under a runner (qemu), fastpull is started as `RUNNER… FASTPULL_BIN` with the name of the
/// test that started it in `FASTPULL_TEST_NAME` (scripts/test-aarch64 reads it from a child
/// qemu left deadlocked, to run only that test again); without one it is started directly.
#[test]
fn under_a_runner_fastpull_carries_the_test_name() {
    use crate::support::runner::{fastpull_command_through, FASTPULL_BIN, TEST_NAME_ENV};
    let cmd = fastpull_command_through("/usr/bin/qemu-aarch64-static -L /x");
    assert_eq!(cmd.get_program(), "/usr/bin/qemu-aarch64-static");
    let args: Vec<_> = cmd.get_args().collect();
    assert_eq!(args, ["-L", "/x", FASTPULL_BIN]);
    assert_eq!(
        env_changes(&cmd).get(TEST_NAME_ENV),
        Some(&Some(
            "harness_selftest::under_a_runner_fastpull_carries_the_test_name".to_string()
        ))
    );
    let direct = fastpull_command_through("");
    assert_eq!(direct.get_program(), FASTPULL_BIN);
    assert_eq!(direct.get_args().count(), 0);
    assert!(!env_changes(&direct).contains_key(TEST_NAME_ENV));
}
