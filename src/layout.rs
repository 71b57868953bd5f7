//! The image on disk: OCI image layout (default) or skopeo's `dir:` layout.
//!
//! Blobs are placed by [`crate::write`]; this module says where they go, guards the
//! destination (one pull at a time, never over a directory of another kind) and writes the
//! manifest and the layout's index last, atomically.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use oci_spec::image::{
    Descriptor, ImageIndex, ImageIndexBuilder, MediaType, Platform as OciPlatform,
};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::Platform;
use crate::reference::Reference;
use crate::write::write_atomic;

/// `index.json` annotation naming the tag.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// `index.json` annotation with the full image name, as containerd writes it.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// The `version` file of skopeo's `dir:` transport.
pub const DIR_VERSION: &str = "Directory Transport Version: 1.1\n";
const OCI_LAYOUT: &str = "{\"imageLayoutVersion\":\"1.0.0\"}";
const TMP_DIR: &str = ".fastpull-tmp";

/// How the image is laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// OCI image layout: `oci-layout`, `index.json`, `blobs/sha256/<hex>`.
    #[default]
    Oci,
    /// skopeo's `dir:` transport: `version`, `manifest.json`, one file per blob named by hex.
    Dir,
}

impl FromStr for Format {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "oci" => Ok(Format::Oci),
            "dir" => Ok(Format::Dir),
            other => Err(Error::InvalidOption(format!(
                "unknown format {other:?} (expected oci or dir)"
            ))),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Oci => "OCI image layout",
            Format::Dir => "dir layout",
        })
    }
}

/// The manifest that completes an image, recorded last.
pub(crate) struct ManifestRecord<'a> {
    pub bytes: &'a [u8],
    pub digest: Digest,
    pub media_type: &'a str,
    pub reference: &'a Reference,
    pub platform: Option<&'a Platform>,
    /// Every blob the manifest references (config and layers).
    pub blobs: &'a [Digest],
}

/// An opened destination, locked against other fastpull processes.
pub(crate) struct Layout {
    root: PathBuf,
    format: Format,
    blobs: PathBuf,
    tmp: PathBuf,
    _lock: File,
}

impl Layout {
    /// Creates or reopens the destination. Refuses a non-empty directory that is not a
    /// layout of `format`.
    pub(crate) fn open(root: &Path, format: Format) -> Result<Layout> {
        let dest_err = |reason: &str| Error::Destination {
            path: root.to_path_buf(),
            reason: reason.to_string(),
        };
        match std::fs::metadata(root) {
            Ok(m) if !m.is_dir() => return Err(dest_err("exists and is not a directory")),
            Ok(_) => check_existing(root, format)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("stat", root, e)),
        }
        let blobs = match format {
            Format::Oci => root.join("blobs").join("sha256"),
            Format::Dir => root.to_path_buf(),
        };
        let tmp = root.join(TMP_DIR);
        for dir in [&blobs, &tmp] {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        }
        let lock_path = tmp.join("lock");
        let lock = File::create(&lock_path).map_err(|e| Error::io("create", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(dest_err("is in use by another fastpull process"))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("lock", &lock_path, e)),
        }
        match format {
            Format::Oci => {
                let p = root.join("oci-layout");
                if !p.exists() {
                    write_atomic(&p, OCI_LAYOUT.as_bytes())?;
                }
            }
            Format::Dir => write_atomic(&root.join("version"), DIR_VERSION.as_bytes())?,
        }
        Ok(Layout {
            root: root.to_path_buf(),
            format,
            blobs,
            tmp,
            _lock: lock,
        })
    }

    /// Where the verified blob lives.
    pub(crate) fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// Where the blob is written while unverified.
    pub(crate) fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.tmp.join(format!("{}.partial", digest.hex()))
    }

    /// Records the manifest: the last step, after every blob is in place.
    pub(crate) fn commit(&self, m: &ManifestRecord<'_>) -> Result<()> {
        match self.format {
            Format::Dir => {
                write_atomic(&self.root.join("manifest.json"), m.bytes)?;
                self.remove_stale_dir_blobs(m.blobs)
            }
            Format::Oci => {
                let path = self.blob_path(&m.digest);
                if !crate::verify::file_matches(&path, &m.digest, m.bytes.len() as u64)
                    .map_err(|e| Error::io("read", &path, e))?
                {
                    write_atomic(&path, m.bytes)?;
                }
                self.update_index(m)
            }
        }
    }

    fn update_index(&self, m: &ManifestRecord<'_>) -> Result<()> {
        let path = self.root.join("index.json");
        let mut entries: Vec<Descriptor> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<ImageIndex>(&bytes)
                .map_err(|e| Error::Destination {
                    path: path.clone(),
                    reason: format!("is not a valid OCI index: {e}"),
                })?
                .manifests()
                .clone(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        let tag = m.reference.tag().map(str::to_string);
        let digest_str = m.digest.to_string();
        // One entry per tag; an untagged pull replaces only an untagged entry of the same digest.
        entries.retain(|d| {
            let name = d
                .annotations()
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_REF_NAME));
            match (&tag, name) {
                (Some(t), Some(n)) => n != t,
                (None, None) => d.digest().to_string() != digest_str,
                _ => true,
            }
        });
        let mut annotations = HashMap::new();
        if let Some(t) = &tag {
            annotations.insert(ANNOTATION_REF_NAME.to_string(), t.clone());
        }
        annotations.insert(ANNOTATION_IMAGE_NAME.to_string(), m.reference.to_string());
        let oci_digest = oci_spec::image::Digest::from_str(&digest_str).map_err(|e| {
            Error::io(
                "write index for",
                &path,
                std::io::Error::other(e.to_string()),
            )
        })?;
        let mut desc = Descriptor::new(
            MediaType::from(m.media_type),
            m.bytes.len() as u64,
            oci_digest,
        );
        desc.set_annotations(Some(annotations));
        if let Some(p) = m.platform {
            let mut op = OciPlatform::default();
            op.set_os(p.os.as_str().into());
            op.set_architecture(p.architecture.as_str().into());
            op.set_variant(p.variant.clone());
            desc.set_platform(Some(op));
        }
        entries.push(desc);
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(entries)
            .build()
            .map_err(|e| {
                Error::io(
                    "build index for",
                    &path,
                    std::io::Error::other(e.to_string()),
                )
            })?;
        let json = serde_json::to_vec(&index)
            .map_err(|e| Error::io("serialize", &path, std::io::Error::other(e)))?;
        write_atomic(&path, &json)
    }

    /// A dir layout holds one image, as skopeo leaves it: blobs of an image pulled here
    /// before, and not part of this one, are removed (only 64-hex-digit file names).
    fn remove_stale_dir_blobs(&self, keep: &[Digest]) -> Result<()> {
        let keep: std::collections::HashSet<String> = keep.iter().map(Digest::hex).collect();
        let entries = std::fs::read_dir(&self.root)
            .map_err(|e| Error::io("read directory", &self.root, e))?;
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_blob_name = name.len() == 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if is_blob_name && !keep.contains(&name) {
                let p = entry.path();
                std::fs::remove_file(&p).map_err(|e| Error::io("remove stale blob", &p, e))?;
            }
        }
        Ok(())
    }

    /// Removes the scratch directory after a successful pull.
    pub(crate) fn finish(self) -> Result<()> {
        let tmp = self.tmp.clone();
        drop(self);
        match std::fs::remove_dir_all(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", &tmp, e)),
            _ => Ok(()),
        }
    }
}

impl Drop for Layout {
    /// After a failed pull: remove the lock and the scratch directory if nothing else is in
    /// it (partial files of blobs still being released keep it).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.tmp.join("lock"));
        let _ = std::fs::remove_dir(&self.tmp);
    }
}

fn check_existing(root: &Path, format: Format) -> Result<()> {
    let entries: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| Error::io("read directory", root, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != TMP_DIR)
        .collect();
    if entries.is_empty() {
        return Ok(());
    }
    let bad = |reason: String| Error::Destination {
        path: root.to_path_buf(),
        reason,
    };
    match format {
        Format::Oci => {
            let p = root.join("oci-layout");
            let text = std::fs::read_to_string(&p).map_err(|_| {
                bad("is not empty and is not an OCI image layout (no oci-layout file)".into())
            })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| bad(format!("has an unreadable oci-layout file: {e}")))?;
            if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
                return Err(bad("has an oci-layout file of an unknown version".into()));
            }
        }
        Format::Dir => {
            let text = std::fs::read_to_string(root.join("version")).unwrap_or_default();
            if text != DIR_VERSION {
                return Err(bad(
                    "is not empty and is not a dir-layout image (no matching version file)".into(),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(r: &'a Reference, bytes: &'a [u8]) -> ManifestRecord<'a> {
        ManifestRecord {
            bytes,
            digest: Digest::of(bytes),
            media_type: crate::manifest::OCI_MANIFEST,
            reference: r,
            platform: None,
            blobs: &[],
        }
    }

    #[test]
    fn oci_index_keeps_one_entry_per_tag() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("img");
        let a: Reference = "127.0.0.1:5000/x:a".parse().unwrap();
        let b: Reference = "127.0.0.1:5000/x:b".parse().unwrap();
        let l = Layout::open(&root, Format::Oci).unwrap();
        l.commit(&record(&a, b"{\"one\":1}")).unwrap();
        l.commit(&record(&b, b"{\"two\":2}")).unwrap();
        l.commit(&record(&a, b"{\"three\":3}")).unwrap();
        l.finish().unwrap();
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("index.json")).unwrap()).unwrap();
        let m = index["manifests"].as_array().unwrap();
        assert_eq!(m.len(), 2);
        let a_entry = m
            .iter()
            .find(|d| d["annotations"][ANNOTATION_REF_NAME] == "a")
            .unwrap();
        assert_eq!(a_entry["digest"], Digest::of(b"{\"three\":3}").to_string());
        assert!(root.join("oci-layout").exists());
        assert!(!root.join(TMP_DIR).exists());
        let blob = root
            .join("blobs/sha256")
            .join(Digest::of(b"{\"two\":2}").hex());
        assert_eq!(std::fs::read(blob).unwrap(), b"{\"two\":2}");
    }

    #[test]
    fn refuses_foreign_directories_and_concurrent_use() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("precious.txt"), b"x").unwrap();
        let err = Layout::open(dir.path(), Format::Oci).err().unwrap();
        assert!(err.to_string().contains("not an OCI image layout"), "{err}");
        let err = Layout::open(dir.path(), Format::Dir).err().unwrap();
        assert!(matches!(err, Error::Destination { .. }));

        let other = tempfile::tempdir().unwrap();
        let held = Layout::open(other.path(), Format::Dir).unwrap();
        let err = Layout::open(other.path(), Format::Dir).err().unwrap();
        assert!(err.to_string().contains("another fastpull"), "{err}");
        drop(held);
        Layout::open(other.path(), Format::Dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(other.path().join("version")).unwrap(),
            DIR_VERSION
        );
    }
}
