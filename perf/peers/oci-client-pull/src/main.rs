//! Benchmark peer for fastpull: pull IMAGE into DEST with the `oci-client` crate, the way a
//! typical user of that crate would.
//!
//!     oci-client-pull [--plain-http] [--fsync] [--ca-file PEM] IMAGE DEST
//!
//! Anonymous auth; plain HTTP for every registry with `--plain-http`, HTTPS for every registry
//! with `--ca-file`, otherwise HTTPS except for loopback registries. The manifest is fetched with `pull_image_manifest`; the config and
//! every layer are streamed to `DEST/<hex digest>` with `pull_blob` (which verifies the digest
//! while writing), `max_concurrent_download` blobs at once (the crate's default, 16).
//! `DEST/manifest.json` holds the manifest as the crate parsed it. `--fsync` syncs each blob
//! file once it is complete (a typical user would not; it is there to measure what durability
//! costs, since fastpull fsyncs every blob). `--ca-file PEM` adds the CA certificate(s) in PEM
//! to the roots the client trusts (`ClientConfig::extra_root_certificates`, the crate's way to
//! trust a private CA).

use anyhow::{bail, Context, Result};
use futures_util::{stream, StreamExt, TryStreamExt};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use std::path::{Path, PathBuf};
use tokio::io::BufWriter;

#[tokio::main]
async fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let plain_http = args.iter().any(|a| a == "--plain-http");
    let fsync = args.iter().any(|a| a == "--fsync");
    args.retain(|a| a != "--plain-http" && a != "--fsync");
    let mut ca_files = Vec::new();
    while let Some(i) = args.iter().position(|a| a == "--ca-file") {
        let Some(path) = args.get(i + 1).cloned() else {
            bail!("--ca-file needs a PEM file");
        };
        ca_files.push(path);
        args.drain(i..i + 2);
    }
    let [image, dest] = args.as_slice() else {
        bail!("usage: oci-client-pull [--plain-http] [--fsync] [--ca-file PEM] IMAGE DEST");
    };
    let reference: Reference = image.parse().context("parsing IMAGE")?;
    let dest = PathBuf::from(dest);
    tokio::fs::create_dir_all(&dest).await?;

    let registry = reference.resolve_registry().to_string();
    let protocol = if plain_http {
        ClientProtocol::Http
    } else if !ca_files.is_empty() {
        // A private CA is given: the registry speaks HTTPS, loopback or not.
        ClientProtocol::Https
    } else {
        let loopback = ["127.", "localhost", "[::1]"];
        let except = loopback.iter().any(|p| registry.starts_with(p));
        ClientProtocol::HttpsExcept(if except { vec![registry] } else { vec![] })
    };
    let mut extra_root_certificates = Vec::new();
    for path in &ca_files {
        let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        extra_root_certificates.push(Certificate {
            encoding: CertificateEncoding::Pem,
            data,
        });
    }
    let config = ClientConfig {
        protocol,
        extra_root_certificates,
        ..Default::default()
    };
    let concurrency = config.max_concurrent_download;
    let client = Client::new(config);
    let auth = RegistryAuth::Anonymous;

    let (manifest, digest) = client.pull_image_manifest(&reference, &auth).await?;
    tokio::fs::write(dest.join("manifest.json"), serde_json::to_vec(&manifest)?).await?;

    let blobs: Vec<&OciDescriptor> = std::iter::once(&manifest.config)
        .chain(manifest.layers.iter())
        .collect();
    stream::iter(blobs)
        .map(|desc| pull_to_file(&client, &reference, desc, &dest, fsync))
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await?;

    println!(
        "{image}: {} blobs, manifest {digest}",
        manifest.layers.len() + 1
    );
    Ok(())
}

async fn pull_to_file(
    client: &Client,
    reference: &Reference,
    desc: &OciDescriptor,
    dest: &Path,
    fsync: bool,
) -> Result<()> {
    let name = desc
        .digest
        .split_once(':')
        .map_or(&*desc.digest, |(_, hex)| hex);
    let file = tokio::fs::File::create(dest.join(name)).await?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    client
        .pull_blob(reference, desc, &mut out)
        .await
        .with_context(|| format!("pulling {}", desc.digest))?;
    if fsync {
        out.into_inner().sync_all().await?;
    }
    Ok(())
}
