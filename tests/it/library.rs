//! The library's calls besides `pull`, against the real registry: resolve, manifest, config,
//! tags (paginated), and a blob as a verified stream that fails instead of ending when the
//! bytes are wrong.

use fastpull::{Client, Reference};
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
}
