//! In-memory construction of OCI / Docker images: layers, configs, manifests and indexes.

use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Digest of the empty byte string.
pub const EMPTY_SHA256: &str =
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// A content-addressed blob together with the media type it is referenced with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// Media type used in descriptors (may be empty until an [`ImageBuilder`] sets it).
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// The blob's content.
    pub bytes: Vec<u8>,
}

impl Blob {
    /// A blob with the given media type; the digest is computed from `bytes`.
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.to_string(),
            digest: sha256_digest(&bytes),
            bytes,
        }
    }

    /// Length of the content in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// Gzips `data` deterministically (no file name, mtime 0).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(data).expect("gzip into memory");
    enc.finish().expect("finish gzip stream")
}

/// Tar header with deterministic metadata.
fn tar_header(path: &str, entry_type: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)
        .unwrap_or_else(|e| panic!("invalid tar path {path:?}: {e}"));
    h.set_entry_type(entry_type);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    h
}

/// Uncompressed tar: one directory `layer-<seed>/` holding `files` regular files of
/// `bytes_per_file` seeded random bytes each.
pub fn random_tar(seed: u64, files: usize, bytes_per_file: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = format!("layer-{seed}");
    let mut builder = tar::Builder::new(Vec::new());
    let h = tar_header(&format!("{dir}/"), tar::EntryType::Directory, 0o755, 0);
    builder
        .append(&h, std::io::empty())
        .expect("append directory entry to tar");
    let mut content = vec![0u8; bytes_per_file];
    for i in 0..files {
        rng.fill_bytes(&mut content);
        let h = tar_header(
            &format!("{dir}/file-{i}.bin"),
            tar::EntryType::Regular,
            0o644,
            bytes_per_file as u64,
        );
        builder
            .append(&h, content.as_slice())
            .expect("append file entry to tar");
    }
    builder.into_inner().expect("finish tar archive")
}

/// A gzip-compressed tar layer (see [`random_tar`]) and its diff_id (sha256 of the
/// uncompressed tar). Deterministic for a given `seed`. The media type is left empty for
/// [`ImageBuilder::layer`] to set.
pub fn random_layer(seed: u64, files: usize, bytes_per_file: usize) -> (Blob, String) {
    let tar = random_tar(seed, files, bytes_per_file);
    let diff_id = sha256_digest(&tar);
    (Blob::new("", gzip(&tar)), diff_id)
}

/// A gzip-compressed tar with no entries (only the two end-of-archive blocks) and its diff_id.
pub fn empty_layer() -> (Blob, String) {
    let tar = tar::Builder::new(Vec::new())
        .into_inner()
        .expect("finish empty tar archive");
    let diff_id = sha256_digest(&tar);
    (Blob::new("", gzip(&tar)), diff_id)
}

/// A 0-byte blob (digest [`EMPTY_SHA256`]), media type empty.
pub fn zero_byte_blob() -> Blob {
    Blob::new("", Vec::new())
}

/// Which family of media types an image uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// OCI image spec media types.
    Oci,
    /// Docker image manifest v2 schema 2 media types.
    Docker,
}

impl Flavor {
    /// Media type of an image manifest.
    pub fn manifest_media_type(self) -> &'static str {
        match self {
            Flavor::Oci => "application/vnd.oci.image.manifest.v1+json",
            Flavor::Docker => "application/vnd.docker.distribution.manifest.v2+json",
        }
    }

    /// Media type of an image config.
    pub fn config_media_type(self) -> &'static str {
        match self {
            Flavor::Oci => "application/vnd.oci.image.config.v1+json",
            Flavor::Docker => "application/vnd.docker.container.image.v1+json",
        }
    }

    /// Media type of a gzip-compressed tar layer.
    pub fn layer_media_type(self) -> &'static str {
        match self {
            Flavor::Oci => "application/vnd.oci.image.layer.v1.tar+gzip",
            Flavor::Docker => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        }
    }

    /// Media type of an OCI image index / Docker manifest list.
    pub fn index_media_type(self) -> &'static str {
        match self {
            Flavor::Oci => "application/vnd.oci.image.index.v1+json",
            Flavor::Docker => "application/vnd.docker.distribution.manifest.list.v2+json",
        }
    }
}

/// A complete single-platform image: config, layers and the manifest referencing them.
#[derive(Clone, Debug)]
pub struct Image {
    /// Media type family.
    pub flavor: Flavor,
    /// Config blob (media type set).
    pub config: Blob,
    /// Layer blobs in manifest order (media types set).
    pub layers: Vec<Blob>,
    /// Serialized manifest.
    pub manifest: Vec<u8>,
    /// `sha256:` digest of `manifest`.
    pub manifest_digest: String,
    /// Platform OS (`linux`).
    pub os: String,
    /// Platform architecture (`amd64`).
    pub arch: String,
    /// Platform variant (`v8`), if any.
    pub variant: Option<String>,
}

impl Image {
    /// Media type of this image's manifest.
    pub fn manifest_media_type(&self) -> &'static str {
        self.flavor.manifest_media_type()
    }

    /// Config followed by every layer: all blobs the manifest references.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }
}

/// Builder for [`Image`]; defaults to platform linux/amd64 and no layers.
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    flavor: Flavor,
    os: String,
    arch: String,
    variant: Option<String>,
    layers: Vec<(Blob, String)>,
}

#[derive(Serialize)]
struct Descriptor<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    digest: &'a str,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<Platform<'a>>,
}

#[derive(Serialize)]
struct Platform<'a> {
    architecture: &'a str,
    os: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
}

#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    config: Descriptor<'a>,
    layers: Vec<Descriptor<'a>>,
}

#[derive(Serialize)]
struct Index<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    manifests: Vec<Descriptor<'a>>,
}

#[derive(Serialize)]
struct ConfigJson<'a> {
    architecture: &'a str,
    os: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    config: RunConfig,
    rootfs: RootFs<'a>,
    history: Vec<History>,
}

#[derive(Serialize)]
struct RunConfig {
    #[serde(rename = "Env")]
    env: Vec<&'static str>,
    #[serde(rename = "Cmd")]
    cmd: Vec<&'static str>,
}

#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<&'a str>,
}

#[derive(Serialize)]
struct History {
    created: &'static str,
    created_by: String,
}

impl ImageBuilder {
    /// New builder for `flavor`, platform linux/amd64.
    pub fn new(flavor: Flavor) -> ImageBuilder {
        ImageBuilder {
            flavor,
            os: "linux".to_string(),
            arch: "amd64".to_string(),
            variant: None,
            layers: Vec::new(),
        }
    }

    /// Sets the platform recorded in the config (and later in an index).
    pub fn platform(mut self, os: &str, arch: &str, variant: Option<&str>) -> ImageBuilder {
        self.os = os.to_string();
        self.arch = arch.to_string();
        self.variant = variant.map(str::to_string);
        self
    }

    /// Appends a layer, setting its media type to the flavor's tar+gzip layer type.
    pub fn layer(mut self, (mut blob, diff_id): (Blob, String)) -> ImageBuilder {
        blob.media_type = self.flavor.layer_media_type().to_string();
        self.layers.push((blob, diff_id));
        self
    }

    /// Appends a blob as a layer without touching it (bytes, digest and media type are kept;
    /// an empty media type falls back to the flavor's layer type). `diff_id` goes into the
    /// config verbatim. Use for odd layers such as [`zero_byte_blob`].
    pub fn raw_layer(mut self, mut blob: Blob, diff_id: String) -> ImageBuilder {
        if blob.media_type.is_empty() {
            blob.media_type = self.flavor.layer_media_type().to_string();
        }
        self.layers.push((blob, diff_id));
        self
    }

    /// Serializes config and manifest.
    pub fn build(self) -> Image {
        let flavor = self.flavor;
        let config = ConfigJson {
            architecture: &self.arch,
            os: &self.os,
            variant: self.variant.as_deref(),
            config: RunConfig {
                env: vec!["PATH=/usr/bin"],
                cmd: vec!["/bin/sh"],
            },
            rootfs: RootFs {
                kind: "layers",
                diff_ids: self.layers.iter().map(|(_, d)| d.as_str()).collect(),
            },
            history: (0..self.layers.len())
                .map(|i| History {
                    created: "1970-01-01T00:00:00Z",
                    created_by: format!("fastpull test layer {i}"),
                })
                .collect(),
        };
        let config_bytes = serde_json::to_vec(&config).expect("serialize image config");
        let config = Blob::new(flavor.config_media_type(), config_bytes);

        let layers: Vec<Blob> = self.layers.into_iter().map(|(b, _)| b).collect();
        let manifest = Manifest {
            schema_version: 2,
            media_type: flavor.manifest_media_type(),
            config: descriptor(&config, None),
            layers: layers.iter().map(|b| descriptor(b, None)).collect(),
        };
        let manifest = serde_json::to_vec(&manifest).expect("serialize image manifest");
        let manifest_digest = sha256_digest(&manifest);
        Image {
            flavor,
            config,
            layers,
            manifest,
            manifest_digest,
            os: self.os,
            arch: self.arch,
            variant: self.variant,
        }
    }
}

fn descriptor<'a>(blob: &'a Blob, platform: Option<Platform<'a>>) -> Descriptor<'a> {
    Descriptor {
        media_type: &blob.media_type,
        digest: &blob.digest,
        size: blob.size(),
        platform,
    }
}

/// An OCI image index / Docker manifest list over `images`; returns `(bytes, digest)`.
///
/// Each entry carries the child's manifest media type, digest, size and platform.
pub fn build_index(flavor: Flavor, images: &[&Image]) -> (Vec<u8>, String) {
    let manifests = images
        .iter()
        .map(|img| Descriptor {
            media_type: img.manifest_media_type(),
            digest: &img.manifest_digest,
            size: img.manifest.len() as u64,
            platform: Some(Platform {
                architecture: &img.arch,
                os: &img.os,
                variant: img.variant.as_deref(),
            }),
        })
        .collect();
    let index = Index {
        schema_version: 2,
        media_type: flavor.index_media_type(),
        manifests,
    };
    let bytes = serde_json::to_vec(&index).expect("serialize image index");
    let digest = sha256_digest(&bytes);
    (bytes, digest)
}
