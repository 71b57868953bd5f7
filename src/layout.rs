//! The image on disk: OCI image layout (default) or skopeo's `dir:` layout.
//!
//! Blobs are placed by [`crate::write`]; this module says where they go, guards the
//! destination (one pull at a time, never over a directory of another kind) and writes the
//! manifest and the layout's index last, atomically.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
/// How long a destination lock that looks held is retried before the destination counts as
/// in use. A child that any thread of this process forks shares the lock's open file
/// description until it execs (close-on-exec closes it only then), so a lock released a moment
/// ago can look held for a few milliseconds (seen: 3 ms natively, 7 ms under qemu).
const LOCK_GRACE: Duration = Duration::from_secs(1);

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
    /// The destination did not exist before this pull.
    created: bool,
    committed: AtomicBool,
    /// An flock on the destination directory itself.
    _lock: File,
}

/// Tells partial files of one process (and of several pulls in it) apart.
static PARTIAL_SEQ: AtomicU64 = AtomicU64::new(0);

impl Layout {
    /// Creates or reopens the destination and locks it. Refuses a non-empty directory that
    /// is not a layout of `format`.
    pub(crate) fn open(root: &Path, format: Format) -> Result<Layout> {
        let dest_err = |reason: &str| Error::Destination {
            path: root.to_path_buf(),
            reason: reason.to_string(),
        };
        let created = match std::fs::metadata(root) {
            Ok(m) if !m.is_dir() => return Err(dest_err("exists and is not a directory")),
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(root)
                    .map_err(|e| Error::io("create directory", root, e))?;
                true
            }
            Err(e) => return Err(Error::io("stat", root, e)),
        };
        // Lock first, then look: two pulls into one new directory must not race.
        let lock = File::open(root).map_err(|e| Error::io("open", root, e))?;
        if !lock_with_grace(&lock).map_err(|e| Error::io("lock", root, e))? {
            return Err(dest_err("is in use by another fastpull process"));
        }
        check_existing(root, format)?;
        let blobs = match format {
            Format::Oci => root.join("blobs").join("sha256"),
            Format::Dir => root.to_path_buf(),
        };
        let tmp = root.join(TMP_DIR);
        for dir in [&blobs, &tmp] {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
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
            created,
            committed: AtomicBool::new(false),
            _lock: lock,
        })
    }

    /// The destination directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.root
    }

    /// Where the verified blob lives.
    pub(crate) fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// Where the blob is written while unverified.
    pub(crate) fn partial_path(&self, digest: &Digest) -> PathBuf {
        let seq = PARTIAL_SEQ.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!(
            "{}{}{seq}.partial",
            digest.hex(),
            own_partial_tag()
        ))
    }

    /// Records the manifest: the last step, after every blob is in place.
    pub(crate) fn commit(&self, m: &ManifestRecord<'_>) -> Result<()> {
        self.committed.store(true, Ordering::Release);
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

    /// Adds the manifest to `index.json`, keeping everything else the file holds (other
    /// entries, annotations, fields we do not know).
    fn update_index(&self, m: &ManifestRecord<'_>) -> Result<()> {
        let path = self.root.join("index.json");
        let bad = |reason: String| Error::Destination {
            path: path.clone(),
            reason,
        };
        let mut index: serde_json::Value = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("is not valid JSON: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                serde_json::json!({ "schemaVersion": 2, "mediaType": crate::manifest::OCI_INDEX })
            }
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        let Some(obj) = index.as_object_mut() else {
            return Err(bad("is not a JSON object".into()));
        };
        let entries = obj
            .entry("manifests")
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        let Some(entries) = entries.as_array_mut() else {
            return Err(bad("has a \"manifests\" that is not an array".into()));
        };
        let tag = m.reference.tag();
        let digest = m.digest.to_string();
        // One entry per tag; an untagged pull replaces only an untagged entry of the same digest.
        entries.retain(|d| {
            let name = d["annotations"][ANNOTATION_REF_NAME].as_str();
            match (tag, name) {
                (Some(t), Some(n)) => n != t,
                (None, None) => d["digest"].as_str() != Some(digest.as_str()),
                _ => true,
            }
        });
        let mut annotations = serde_json::Map::new();
        if let Some(t) = tag {
            annotations.insert(ANNOTATION_REF_NAME.into(), t.into());
        }
        annotations.insert(ANNOTATION_IMAGE_NAME.into(), m.reference.to_string().into());
        let mut entry = serde_json::json!({
            "mediaType": m.media_type,
            "digest": digest,
            "size": m.bytes.len(),
            "annotations": annotations,
        });
        if let Some(p) = m.platform {
            let mut platform = serde_json::json!({ "architecture": p.architecture, "os": p.os });
            if let Some(v) = &p.variant {
                platform["variant"] = v.as_str().into();
            }
            entry["platform"] = platform;
        }
        entries.push(entry);
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
            if is_blob_name(&name) && !keep.contains(&name) {
                let p = entry.path();
                std::fs::remove_file(&p).map_err(|e| Error::io("remove stale blob", &p, e))?;
            }
        }
        Ok(())
    }

    /// Removes the scratch directory after a successful pull, while the destination is
    /// still locked (once the lock goes, the next pull may be using a new one).
    pub(crate) fn finish(self) -> Result<()> {
        let result = match std::fs::remove_dir_all(&self.tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io("remove", &self.tmp, e))
            }
            _ => Ok(()),
        };
        drop(self);
        result
    }
}

impl Drop for Layout {
    /// After a failed pull: a destination this pull created and put no verified blob in is
    /// removed whole; otherwise the scratch directory goes if nothing is left in it
    /// (verified blobs stay, for the next pull to reuse).
    fn drop(&mut self) {
        if self.created && !self.committed.load(Ordering::Acquire) && !self.has_blobs() {
            let _ = std::fs::remove_dir_all(&self.root);
            return;
        }
        self.remove_own_partials();
        let _ = std::fs::remove_dir(&self.tmp);
    }
}

impl Layout {
    /// Removes the partial files this process made. A pull dropped midway (Ctrl-C) may leave
    /// a hashing thread holding one, which would otherwise remove it only when it lets go,
    /// possibly after the process has exited; the thread keeps reading the unlinked file.
    fn remove_own_partials(&self) {
        let tag = own_partial_tag();
        let Ok(rd) = std::fs::read_dir(&self.tmp) else {
            return;
        };
        for entry in rd.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".partial") && name.contains(&tag) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn has_blobs(&self) -> bool {
        std::fs::read_dir(&self.blobs)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .any(|e| is_blob_name(&e.file_name().to_string_lossy()))
            })
            .unwrap_or(true)
    }
}

/// 64 lowercase hex digits: the file name of a blob.
fn is_blob_name(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What marks this process's partial files (`<hex>.<pid>-<seq>.partial`): `.<pid>-`.
fn own_partial_tag() -> String {
    format!(".{}-", std::process::id())
}

/// Takes the destination's flock, retrying for [`LOCK_GRACE`]; `false` if it stays held.
fn lock_with_grace(lock: &File) -> std::io::Result<bool> {
    let deadline = Instant::now() + LOCK_GRACE;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(true),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(TryLockError::WouldBlock) => return Ok(false),
            Err(TryLockError::Error(e)) => return Err(e),
        }
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
    fn index_keeps_what_others_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("oci-layout"), OCI_LAYOUT).unwrap();
        std::fs::write(
            root.join("index.json"),
            r#"{"schemaVersion":2,"annotations":{"made.by":"skopeo"},"x-extra":[1],
                "manifests":[{"mediaType":"m","digest":"sha256:00","size":1,"x-keep":true,
                "annotations":{"org.opencontainers.image.ref.name":"other"}}]}"#,
        )
        .unwrap();
        let r: Reference = "h:1/x:mine".parse().unwrap();
        let l = Layout::open(root, Format::Oci).unwrap();
        l.commit(&record(&r, b"{}")).unwrap();
        l.finish().unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("index.json")).unwrap()).unwrap();
        assert_eq!(v["annotations"]["made.by"], "skopeo");
        assert_eq!(v["x-extra"][0], 1);
        assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
        assert_eq!(v["manifests"][0]["x-keep"], true);
        assert_eq!(
            v["manifests"][1]["annotations"][ANNOTATION_REF_NAME],
            "mine"
        );
    }

    #[test]
    fn failed_pull_into_a_new_directory_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("new");
        drop(Layout::open(&root, Format::Oci).unwrap());
        assert!(!root.exists());
        // With a verified blob in it, the directory stays (for the next pull to reuse).
        let l = Layout::open(&root, Format::Oci).unwrap();
        std::fs::write(l.blob_path(&Digest::of(b"x")), b"x").unwrap();
        drop(l);
        assert!(root.join("oci-layout").exists());
        assert!(!root.join(TMP_DIR).exists());
    }

    /// A pull dropped midway (Ctrl-C) while a hashing thread still holds a partial file:
    /// the layout removes this process's partial files itself, and no one else's.
    #[test]
    fn dropped_pull_removes_its_partial_files_even_if_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("img");
        let l = Layout::open(&root, Format::Oci).unwrap();
        std::fs::write(l.blob_path(&Digest::of(b"x")), b"x").unwrap();
        let ours = l.partial_path(&Digest::of(b"y"));
        let held = std::fs::File::create(&ours).unwrap();
        let foreign = root
            .join(TMP_DIR)
            .join(format!("{}.999999999-1.partial", Digest::of(b"z").hex()));
        std::fs::write(&foreign, b"z").unwrap();
        drop(l);
        assert!(!ours.exists(), "{} left", ours.display());
        assert!(
            foreign.exists(),
            "another process's partial file was removed"
        );
        drop(held);
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

    #[test]
    fn a_lock_a_child_shares_for_a_moment_is_not_another_fastpull() {
        // A child forked by any thread holds the lock's open file description until it execs;
        // this one keeps it (as its stdout) after the layout is gone, until its stdin closes.
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::open(dir.path(), Format::Oci).unwrap();
        let mut child = std::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .stdout(l._lock.try_clone().unwrap())
            .spawn()
            .unwrap();
        drop(l);
        let probe = File::open(dir.path()).unwrap();
        assert!(
            matches!(probe.try_lock(), Err(TryLockError::WouldBlock)),
            "the child holds the lock"
        );
        drop(probe);
        // It lets go now, as open() starts waiting: all that must fit in LOCK_GRACE is the
        // exit of a process whose stdin closed (red with LOCK_GRACE zero).
        drop(child.stdin.take());
        Layout::open(dir.path(), Format::Oci).expect("the lock is free once the child lets go");
        assert!(child.wait().unwrap().success());
    }
}
