//! `--convert oci`: a Docker schema 2 manifest rewritten with OCI media types, so that tools
//! that read only OCI layouts (skopeo's `oci:` transport, umoci) take the image.
//!
//! Only the manifest changes: its `mediaType`, its config's and its layers' (gzip and plain
//! tar layers to their OCI twins, foreign layers to OCI's non-distributable types, their
//! `urls` kept), plus an annotation naming the digest the registry gave it. Every other
//! field stays as received. The config blob is kept byte for byte, so its digest stays: a
//! Docker image config is already an OCI image config (the fields OCI does not name are
//! ignored by its readers), and nothing in it names a media type. Layers are untouched.
//! The new manifest has a new digest; the pull's report carries both
//! ([`crate::PullReport::source_manifest_digest`]), and the layout's `index.json` entry
//! carries the original in [`ANNOTATION_SOURCE_DIGEST`] as well.
//!
//! The media-type pairs are those of the OCI image spec's Docker compatibility table, and
//! what skopeo's own conversion uses. Manifests already of OCI type are left as they are.

use std::str::FromStr;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{DOCKER_MANIFEST, OCI_MANIFEST};

/// Annotation (on the manifest and on its `index.json` entry) holding the digest of the
/// manifest as the registry served it, before `--convert` rewrote it.
pub const ANNOTATION_SOURCE_DIGEST: &str = "io.fastpull.source.digest";

/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Docker layer media types and their OCI equivalents.
const LAYER_TYPES: &[(&str, &str)] = &[
    (
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.oci.image.layer.v1.tar+gzip",
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.oci.image.layer.v1.tar",
    ),
    (
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    ),
    (
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
    ),
];

/// What happens to a manifest of Docker media types before it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Conversion {
    /// Stored exactly as received (default), as `docker save` and containerd do.
    #[default]
    Keep,
    /// Docker schema 2 manifests are rewritten with OCI media types (see [`crate::convert`]).
    Oci,
}

impl FromStr for Conversion {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "oci" => Ok(Conversion::Oci),
            "none" => Ok(Conversion::Keep),
            other => Err(Error::InvalidOption(format!(
                "unknown conversion {other:?} (expected oci or none)"
            ))),
        }
    }
}

/// A manifest as rewritten by a conversion.
#[derive(Debug, Clone)]
pub(crate) struct Converted {
    /// The new manifest's bytes.
    pub bytes: Vec<u8>,
    /// Their sha256.
    pub digest: Digest,
    /// Its media type.
    pub media_type: &'static str,
}

/// Rewrites a Docker schema 2 image manifest (`bytes`, whose digest is `digest`) with OCI
/// media types. `None` when there is nothing to do (the manifest is not of Docker type).
/// A config or layer type with no OCI equivalent is an error.
pub(crate) fn to_oci(bytes: &[u8], media_type: &str, digest: &Digest) -> Result<Option<Converted>> {
    if media_type != DOCKER_MANIFEST {
        return Ok(None);
    }
    let what = format!("{digest} (--convert oci)");
    let invalid = |reason: String| Error::InvalidManifest {
        what: what.clone(),
        reason,
    };
    let mut doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let obj = doc
        .as_object_mut()
        .ok_or_else(|| invalid("not a JSON object".into()))?;
    obj.insert("mediaType".into(), OCI_MANIFEST.into());

    let config = obj
        .get_mut("config")
        .and_then(|c| c.as_object_mut())
        .ok_or_else(|| invalid("no config descriptor".into()))?;
    match config.get("mediaType").and_then(|m| m.as_str()) {
        Some(DOCKER_CONFIG) => {
            config.insert("mediaType".into(), OCI_CONFIG.into());
        }
        Some(OCI_CONFIG) => {}
        other => {
            return Err(invalid(format!(
                "config media type {} has no OCI equivalent",
                other.unwrap_or("(none)")
            )))
        }
    }

    let layers = obj
        .get_mut("layers")
        .and_then(|l| l.as_array_mut())
        .ok_or_else(|| invalid("no layers array".into()))?;
    for layer in layers.iter_mut() {
        let layer = layer
            .as_object_mut()
            .ok_or_else(|| invalid("a layer descriptor is not an object".into()))?;
        let from = layer
            .get("mediaType")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_string();
        if from.starts_with("application/vnd.oci.image.layer.") {
            continue;
        }
        let to = LAYER_TYPES
            .iter()
            .find(|(docker, _)| *docker == from)
            .map(|(_, oci)| *oci)
            .ok_or_else(|| invalid(format!("layer media type {from:?} has no OCI equivalent")))?;
        layer.insert("mediaType".into(), to.into());
    }

    let annotations = obj
        .entry("annotations")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    let annotations = annotations
        .as_object_mut()
        .ok_or_else(|| invalid("annotations is not an object".into()))?;
    annotations.insert(ANNOTATION_SOURCE_DIGEST.into(), digest.to_string().into());

    let bytes = serde_json::to_vec(&doc).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Some(Converted {
        digest: Digest::of(&bytes),
        bytes,
        media_type: OCI_MANIFEST,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{parse, Document};

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    fn docker_manifest() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
              "config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{D1}","size":5}},
              "layers":[
                {{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{D2}","size":7}},
                {{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{D3}","size":9,
                  "urls":["https://example.com/layer"]}}],
              "x-other":true}}"#
        )
    }

    #[test]
    fn docker_types_become_oci_and_the_rest_stays() {
        let src = docker_manifest();
        let digest = Digest::of(src.as_bytes());
        let c = to_oci(src.as_bytes(), DOCKER_MANIFEST, &digest)
            .unwrap()
            .unwrap();
        assert_eq!(c.digest, Digest::of(&c.bytes));
        assert_ne!(c.digest, digest);
        let v: serde_json::Value = serde_json::from_slice(&c.bytes).unwrap();
        assert_eq!(v["mediaType"], OCI_MANIFEST);
        assert_eq!(v["config"]["mediaType"], OCI_CONFIG);
        assert_eq!(v["config"]["digest"], D1, "the config blob is kept");
        assert_eq!(
            v["layers"][0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert_eq!(
            v["layers"][1]["mediaType"],
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        );
        assert_eq!(v["layers"][1]["urls"][0], "https://example.com/layer");
        assert_eq!(v["x-other"], true);
        assert_eq!(
            v["annotations"][ANNOTATION_SOURCE_DIGEST],
            digest.to_string()
        );
        // It parses as an OCI image with the same blobs.
        let (mt, Document::Image(m)) = parse(&c.bytes, None, "t").unwrap() else {
            panic!("not an image")
        };
        assert_eq!(mt, OCI_MANIFEST);
        assert_eq!(m.layers.len(), 2);
        assert_eq!(m.config.digest.to_string(), D1);
    }

    #[test]
    fn oci_manifests_are_left_alone_and_unknown_types_refused() {
        let d = Digest::of(b"x");
        assert!(to_oci(b"{}", OCI_MANIFEST, &d).unwrap().is_none());
        let odd = docker_manifest().replace(
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/x-custom",
        );
        let err = to_oci(odd.as_bytes(), DOCKER_MANIFEST, &d).unwrap_err();
        assert!(err.to_string().contains("application/x-custom"), "{err}");
        let plugin =
            docker_manifest().replace(DOCKER_CONFIG, "application/vnd.docker.plugin.v1+json");
        assert!(to_oci(plugin.as_bytes(), DOCKER_MANIFEST, &d).is_err());
        assert_eq!("oci".parse::<Conversion>().unwrap(), Conversion::Oci);
        assert!("docker".parse::<Conversion>().is_err());
    }
}
