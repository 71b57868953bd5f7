//! Manifests and indexes: media types, parsing into typed descriptors, platform choice.
//!
//! Parsing uses the `oci-spec` types; Docker schema 2 manifests and manifest lists share
//! their JSON shape. What the rest of fastpull needs is turned into [`BlobDescriptor`]s with
//! a 32-byte [`Digest`].

use std::fmt;
use std::str::FromStr;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: &[&str] = &[
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// The `Accept` header for manifest requests, most preferred first.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Manifests larger than this are refused (the limit containerd and distribution use).
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// Which role a blob plays in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// The image configuration JSON.
    Config,
    /// A filesystem layer.
    Layer,
}

/// A blob to fetch: what the manifest promises about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobDescriptor {
    /// Its sha256.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type as the manifest names it.
    pub media_type: String,
    /// Config or layer.
    pub kind: BlobKind,
}

/// A single-platform image manifest, parsed.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The config blob.
    pub config: BlobDescriptor,
    /// Layers, base first.
    pub layers: Vec<BlobDescriptor>,
}

/// One entry of an index.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    /// The child manifest's digest.
    pub digest: Digest,
    /// The child manifest's size.
    pub size: u64,
    /// The child manifest's media type.
    pub media_type: String,
    /// The platform it is for, when the index says.
    pub platform: Option<Platform>,
}

/// What a manifest document turned out to be.
#[derive(Debug, Clone)]
pub enum Document {
    /// A single image.
    Image(Manifest),
    /// An index / manifest list.
    Index(Vec<IndexEntry>),
}

/// Parses manifest bytes. `content_type` is the response's `Content-Type`; when it is
/// missing or generic the document's own `mediaType` (or its shape) decides.
pub fn parse(bytes: &[u8], content_type: Option<&str>, what: &str) -> Result<(String, Document)> {
    let invalid = |reason: String| Error::InvalidManifest {
        what: what.to_string(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    match value.get("schemaVersion").and_then(|v| v.as_u64()) {
        Some(2) => {}
        Some(1) => {
            return Err(invalid(
                "Docker schema 1 manifests are deprecated and not supported".into(),
            ))
        }
        Some(v) => {
            return Err(invalid(format!(
                "schemaVersion {v} is not supported (only 2)"
            )))
        }
        None => return Err(invalid("no schemaVersion".into())),
    }
    let declared = value.get("mediaType").and_then(|v| v.as_str());
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim())
        .filter(|c| is_manifest_type(c) || DOCKER_SCHEMA1.contains(c));
    let media_type = match (header, declared) {
        (Some(h), _) => h.to_string(),
        (None, Some(d)) => d.to_string(),
        (None, None) if value.get("manifests").is_some() => OCI_INDEX.to_string(),
        (None, None) if value.get("layers").is_some() => OCI_MANIFEST.to_string(),
        (None, None) => return Err(invalid("no mediaType and no layers or manifests".into())),
    };
    if DOCKER_SCHEMA1.contains(&media_type.as_str()) {
        return Err(invalid(
            "Docker schema 1 manifests are deprecated and not supported".into(),
        ));
    }
    if let (Some(d), true) = (declared, header.is_some()) {
        if d != media_type {
            return Err(invalid(format!(
                "Content-Type {media_type} disagrees with mediaType {d} in the document"
            )));
        }
    }
    match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let m: ImageManifest = serde_json::from_value(value)
                .map_err(|e| invalid(format!("bad image manifest: {e}")))?;
            let config = blob(m.config(), BlobKind::Config, what)?;
            let layers = m
                .layers()
                .iter()
                .map(|d| blob(d, BlobKind::Layer, what))
                .collect::<Result<Vec<_>>>()?;
            Ok((media_type, Document::Image(Manifest { config, layers })))
        }
        OCI_INDEX | DOCKER_MANIFEST_LIST => {
            let idx: ImageIndex = serde_json::from_value(value)
                .map_err(|e| invalid(format!("bad image index: {e}")))?;
            let entries = idx
                .manifests()
                .iter()
                .map(|d| {
                    Ok(IndexEntry {
                        digest: digest_of(d, what)?,
                        size: d.size(),
                        media_type: d.media_type().to_string(),
                        platform: d.platform().as_ref().map(|p| {
                            Platform::new(
                                &p.os().to_string(),
                                &p.architecture().to_string(),
                                p.variant().as_deref(),
                            )
                        }),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((media_type, Document::Index(entries)))
        }
        other => Err(invalid(format!(
            "media type {other} is not an image manifest or index"
        ))),
    }
}

/// Whether `media_type` is one of the four manifest types we pull.
pub fn is_manifest_type(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_MANIFEST_LIST
    )
}

fn digest_of(d: &Descriptor, what: &str) -> Result<Digest> {
    d.digest()
        .to_string()
        .parse()
        .map_err(|e: crate::digest::DigestError| Error::InvalidManifest {
            what: what.to_string(),
            reason: e.to_string(),
        })
}

fn blob(d: &Descriptor, kind: BlobKind, what: &str) -> Result<BlobDescriptor> {
    Ok(BlobDescriptor {
        digest: digest_of(d, what)?,
        size: d.size(),
        media_type: d.media_type().to_string(),
        kind,
    })
}

/// An `os/arch[/variant]` platform, normalised the way containerd does
/// (`x86_64` → `amd64`, `aarch64` → `arm64`, `arm64/v8` ≡ `arm64`, `arm` ≡ `arm/v7`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    /// Operating system (`linux`, `windows`).
    pub os: String,
    /// CPU architecture in GOARCH terms (`amd64`, `arm64`).
    pub architecture: String,
    /// CPU variant (`v7`, `v8`), when it matters.
    pub variant: Option<String>,
}

impl Platform {
    /// A platform as written (lower-cased; an empty variant is none).
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.to_ascii_lowercase(),
            architecture: architecture.to_ascii_lowercase(),
            variant: variant
                .filter(|v| !v.is_empty())
                .map(|v| v.to_ascii_lowercase()),
        }
    }

    /// The canonical form used for matching: GOARCH names, `arm64/v8` ≡ `arm64`,
    /// `arm` ≡ `arm/v7`.
    pub fn normalized(&self) -> Platform {
        let (arch, default_variant): (&str, Option<&str>) = match self.architecture.as_str() {
            "x86_64" | "x86-64" | "amd64" => ("amd64", None),
            "aarch64" | "arm64" => ("arm64", None),
            "armhf" => ("arm", Some("v7")),
            "armel" => ("arm", Some("v6")),
            "arm" => ("arm", Some("v7")),
            "i386" | "i686" | "386" => ("386", None),
            _ => return self.clone(),
        };
        let variant = match (arch, self.variant.as_deref()) {
            ("arm64", Some("v8" | "8")) => None,
            ("arm", Some(v)) if !v.starts_with('v') => Some(format!("v{v}")),
            (_, Some(v)) => Some(v.to_string()),
            (_, None) => default_variant.map(str::to_string),
        };
        Platform {
            os: self.os.clone(),
            architecture: arch.to_string(),
            variant,
        }
    }

    /// The platform of this machine.
    pub fn host() -> Platform {
        let variant = if std::env::consts::ARCH == "arm" {
            Some("v7")
        } else {
            None
        };
        let arch = go_arch(std::env::consts::ARCH, cfg!(target_endian = "little"));
        Platform::new(std::env::consts::OS, arch, variant).normalized()
    }

    /// Normalised platforms that run where `self` is wanted, best first: itself, then older
    /// variants (`arm/v7` → `v6`, `v5`; `amd64/v3` → `v2`, plain `amd64`; `arm64/v9` →
    /// `arm64`), then what the architecture also runs, as containerd's `platforms.Only`
    /// (which docker pulls by) orders it: `amd64` → `386`, `arm64` → `arm/v8` … `arm/v5`.
    pub fn compatible(&self) -> Vec<Platform> {
        let me = self.normalized();
        let mut out = vec![me.clone()];
        let with = |v: Option<&str>| Platform {
            os: me.os.clone(),
            architecture: me.architecture.clone(),
            variant: v.map(str::to_string),
        };
        let level = |v: &str| {
            v.strip_prefix('v')
                .and_then(|n| n.split('.').next()?.parse::<u32>().ok())
        };
        match (
            me.architecture.as_str(),
            me.variant.as_deref().and_then(level),
        ) {
            ("arm", Some(n)) => {
                for k in (5..n).rev() {
                    out.push(with(Some(&format!("v{k}"))));
                }
            }
            ("amd64", Some(n)) => {
                for k in (2..n).rev() {
                    out.push(with(Some(&format!("v{k}"))));
                }
                out.push(with(None));
            }
            ("arm64", Some(_)) => out.push(with(None)),
            _ => {}
        }
        let other = |arch: &str, variant: Option<String>| Platform {
            os: me.os.clone(),
            architecture: arch.to_string(),
            variant,
        };
        match me.architecture.as_str() {
            "amd64" => out.push(other("386", None)),
            "arm64" => {
                for k in (5..=8).rev() {
                    out.push(other("arm", Some(format!("v{k}"))));
                }
            }
            _ => {}
        }
        out
    }

    /// Whether an index entry for `candidate` can run where `self` is wanted.
    pub fn matches(&self, candidate: &Platform) -> bool {
        self.normalized() == candidate.normalized()
    }
}

impl FromStr for Platform {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &&str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        };
        match parts.as_slice() {
            // `linux` alone: this machine's architecture, as docker reads it.
            [os] if ok(os) => {
                let host = Platform::host();
                Ok(Platform::new(
                    os,
                    &host.architecture,
                    host.variant.as_deref(),
                ))
            }
            [os, arch] if ok(os) && ok(arch) => Ok(Platform::new(os, arch, None)),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => {
                Ok(Platform::new(os, arch, Some(variant)))
            }
            _ => Err(Error::InvalidPlatform(s.to_string())),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Every image manifest of an index (attestations and other `unknown/unknown` entries
/// left out), each digest once.
pub fn all_images(entries: &[IndexEntry]) -> Vec<&IndexEntry> {
    let mut out: Vec<&IndexEntry> = Vec::new();
    for e in entries {
        let image = is_manifest_type(&e.media_type) || e.media_type.is_empty();
        let unknown = e.platform.as_ref().is_some_and(|p| p.os == "unknown");
        if image && !unknown && !out.iter().any(|o| o.digest == e.digest) {
            out.push(e);
        }
    }
    out
}

/// Picks the entry of an index for `wanted`; the error lists what the index offers.
pub fn select<'a>(
    entries: &'a [IndexEntry],
    wanted: &Platform,
    reference: &str,
) -> Result<&'a IndexEntry> {
    let usable = || {
        entries
            .iter()
            .filter(|e| is_manifest_type(&e.media_type) || e.media_type.is_empty())
    };
    // The exact platform first, then older variants that run there (containerd's order),
    // then an entry that names no platform (docker takes one, after any that match).
    wanted
        .compatible()
        .iter()
        .find_map(|want| {
            usable().find(|e| e.platform.as_ref().is_some_and(|p| &p.normalized() == want))
        })
        .or_else(|| usable().find(|e| e.platform.is_none()))
        .ok_or_else(|| {
            let mut available: Vec<String> = entries
                .iter()
                .filter_map(|e| e.platform.as_ref())
                .filter(|p| p.os != "unknown")
                .map(|p| p.to_string())
                .collect();
            available.dedup();
            Error::NoMatchingPlatform {
                wanted: wanted.to_string(),
                reference: reference.to_string(),
                available,
            }
        })
}

/// Go's name (GOARCH, what image platforms say) for Rust's `arch`
/// (`std::env::consts::ARCH`) on a machine of that byte order, where they differ.
fn go_arch(arch: &str, little_endian: bool) -> &str {
    match (arch, little_endian) {
        ("x86", _) => "386",
        ("powerpc64", true) => "ppc64le",
        ("powerpc64", false) => "ppc64",
        ("loongarch64", _) => "loong64",
        ("mips64", true) => "mips64le",
        ("mips", true) => "mipsle",
        _ => arch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's platform is named as images name it (GOARCH): a ppc64le host is not
    /// `powerpc64` (red without the mapping: `fastpull alpine` found no matching platform
    /// there).
    #[test]
    fn the_host_architecture_has_its_go_name() {
        assert_eq!(go_arch("powerpc64", true), "ppc64le");
        assert_eq!(go_arch("powerpc64", false), "ppc64");
        assert_eq!(go_arch("x86", true), "386");
        assert_eq!(go_arch("loongarch64", true), "loong64");
        assert_eq!(go_arch("mips64", true), "mips64le");
        for same in ["x86_64", "aarch64", "s390x", "riscv64"] {
            assert_eq!(go_arch(same, true), same);
        }
        let host = Platform::host();
        assert!(
            ["amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64", "loong64"]
                .contains(&host.architecture.as_str()),
            "{host}"
        );
    }

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn index_json(media: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{media}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":10,"platform":{{"architecture":"amd64","os":"linux"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":20,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":20,"platform":{{"architecture":"unknown","os":"unknown"}}}}
            ]}}"#
        )
    }

    #[test]
    fn platform_parsing_and_normalisation() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert!(p.matches(&Platform::new("linux", "arm64", None)));
        assert!(p.matches(&Platform::new("linux", "aarch64", Some("8"))));
        assert!(!p.matches(&Platform::new("linux", "arm", Some("v8"))));
        assert_eq!(p.to_string(), "linux/arm64/v8", "kept as written");
        assert_eq!(p.normalized().to_string(), "linux/arm64");
        let n = |s: &str| s.parse::<Platform>().unwrap().normalized().to_string();
        assert_eq!(n("linux/x86_64"), "linux/amd64");
        assert_eq!(n("linux/arm"), "linux/arm/v7");
        assert_eq!(n("linux/arm/6"), "linux/arm/v6");
        assert_eq!(n("Linux/AMD64"), "linux/amd64");
        // The OS alone: this machine's architecture (docker's reading).
        let os_only: Platform = "linux".parse().unwrap();
        assert_eq!(os_only.os, "linux");
        assert_eq!(os_only.architecture, Platform::host().architecture);
        for bad in ["", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(
                matches!(bad.parse::<Platform>(), Err(Error::InvalidPlatform(_))),
                "{bad}"
            );
        }
        let host = Platform::host();
        assert!(!host.os.is_empty() && !host.architecture.is_empty());
        assert_ne!(host.architecture, "x86_64");
        assert_ne!(host.architecture, "aarch64");
    }

    #[test]
    fn selects_platform_and_lists_the_rest() {
        let (mt, doc) = parse(index_json(OCI_INDEX).as_bytes(), Some(OCI_INDEX), "t").unwrap();
        assert_eq!(mt, OCI_INDEX);
        let Document::Index(entries) = doc else {
            panic!("not an index")
        };
        let arm = select(&entries, &"linux/arm64".parse().unwrap(), "r").unwrap();
        assert_eq!(arm.digest.to_string(), D2);
        let amd = select(&entries, &"linux/amd64".parse().unwrap(), "r").unwrap();
        assert_eq!(amd.digest.to_string(), D1);
        let err = select(&entries, &"linux/s390x".parse().unwrap(), "r").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("linux/amd64") && msg.contains("linux/arm64"),
            "{msg}"
        );
        assert!(!msg.contains("unknown"), "{msg}");
    }

    #[test]
    fn falls_back_to_older_variants() {
        let p = |s: &str| s.parse::<Platform>().unwrap();
        let names = |v: Vec<Platform>| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names(p("linux/arm/v7").compatible()),
            ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]
        );
        assert_eq!(
            names(p("linux/amd64/v3").compatible()),
            [
                "linux/amd64/v3",
                "linux/amd64/v2",
                "linux/amd64",
                "linux/386"
            ]
        );
        assert_eq!(
            names(p("linux/arm64").compatible()),
            [
                "linux/arm64",
                "linux/arm/v8",
                "linux/arm/v7",
                "linux/arm/v6",
                "linux/arm/v5"
            ]
        );
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":1,"platform":{{"architecture":"arm","os":"linux","variant":"v6"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let (_, Document::Index(entries)) = parse(json.as_bytes(), None, "t").unwrap() else {
            panic!("index")
        };
        assert_eq!(
            select(&entries, &p("linux/arm/v7"), "r")
                .unwrap()
                .digest
                .to_string(),
            D1
        );
        assert_eq!(
            select(&entries, &p("linux/amd64/v3"), "r")
                .unwrap()
                .digest
                .to_string(),
            D2
        );
        assert!(
            select(&entries, &p("linux/arm/v5"), "r").is_err(),
            "never a newer variant"
        );
        // What the architecture also runs, as containerd orders it (red before: none).
        assert_eq!(
            select(&entries, &p("linux/arm64"), "r")
                .unwrap()
                .digest
                .to_string(),
            D1
        );
    }

    /// An entry that names no platform is taken when none matches, as docker takes it
    /// (after any that match); one that matches goes first (red before: no match).
    #[test]
    fn an_entry_without_a_platform_is_taken_last() {
        let p = |s: &str| s.parse::<Platform>().unwrap();
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":1}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let (_, Document::Index(entries)) = parse(json.as_bytes(), None, "t").unwrap() else {
            panic!("index")
        };
        let pick = |want: &str| select(&entries, &p(want), "r").unwrap().digest.to_string();
        assert_eq!(pick("linux/amd64"), D2);
        assert_eq!(pick("linux/s390x"), D1);
    }

    #[test]
    fn docker_list_detected_from_body_without_content_type() {
        let (mt, doc) = parse(index_json(DOCKER_MANIFEST_LIST).as_bytes(), None, "t").unwrap();
        assert_eq!(mt, DOCKER_MANIFEST_LIST);
        assert!(matches!(doc, Document::Index(ref e) if e.len() == 3));
    }

    #[test]
    fn image_manifest_yields_blob_descriptors() {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
              "config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{D1}","size":5}},
              "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{D2}","size":0}}]}}"#
        );
        let (mt, doc) = parse(
            json.as_bytes(),
            Some("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"),
            "t",
        )
        .unwrap();
        assert_eq!(mt, DOCKER_MANIFEST);
        let Document::Image(m) = doc else {
            panic!("not an image")
        };
        assert_eq!(m.config.kind, BlobKind::Config);
        assert_eq!(m.config.size, 5);
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.layers[0].digest.to_string(), D2);
    }

    #[test]
    fn rejects_schema1_garbage_and_sha512() {
        let s1 = r#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        assert!(parse(s1.as_bytes(), None, "t")
            .unwrap_err()
            .to_string()
            .contains("schema 1"));
        assert!(parse(b"not json", None, "t").is_err());
        let sha512 = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"x","digest":"sha512:{}","size":1}},"layers":[]}}"#,
            "a".repeat(128)
        );
        let err = parse(sha512.as_bytes(), None, "t").unwrap_err().to_string();
        assert!(err.contains("sha512"), "{err}");
        let mismatch = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
        assert!(parse(mismatch.as_bytes(), Some(DOCKER_MANIFEST), "t").is_err());
    }
}
