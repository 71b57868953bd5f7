//! The image on disk: an OCI image layout (default), skopeo's `dir:` layout, or one archive
//! file (`docker-archive`, `oci-archive`: see [`crate::archive`]).
//!
//! Blobs are placed by [`crate::write`]; this module says where they go, guards the
//! destination (one pull at a time, never over a directory of another kind, never over
//! another repository's name in an OCI layout without being told) and writes the manifest
//! and the layout's index last, atomically.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::archive::{self, Archive};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{BlobDescriptor, Platform};
use crate::partials::Index;
use crate::reference::Reference;
use crate::write::{write_atomic, BlobFile};

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
#[non_exhaustive]
pub enum Format {
    /// OCI image layout: `oci-layout`, `index.json`, `blobs/sha256/<hex>`.
    #[default]
    Oci,
    /// skopeo's `dir:` transport: `version`, `manifest.json`, one file per blob named by hex.
    Dir,
    /// One tar file that `docker load` and `podman load` take: what `docker save` writes
    /// since v25 (the OCI layout, plus docker's `manifest.json` and `repositories`).
    DockerArchive,
    /// One tar file holding an OCI image layout (skopeo's `oci-archive:`).
    OciArchive,
    /// The image's root filesystem, unpacked as `umoci unpack` does (blobs are not kept):
    /// every layer verified (compressed digest and diff_id) before the directory appears,
    /// and no entry reaches outside it. One platform only.
    Rootfs,
}

impl Format {
    /// Whether the destination is one archive file rather than a directory.
    pub fn is_archive(self) -> bool {
        matches!(self, Format::DockerArchive | Format::OciArchive)
    }
}

impl FromStr for Format {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "oci" => Ok(Format::Oci),
            "dir" => Ok(Format::Dir),
            "docker-archive" => Ok(Format::DockerArchive),
            "oci-archive" => Ok(Format::OciArchive),
            "rootfs" => Ok(Format::Rootfs),
            other => Err(Error::InvalidOption(format!(
                "unknown format {other:?} (expected oci, dir, docker-archive, oci-archive or rootfs)"
            ))),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Oci => "OCI image layout",
            Format::Dir => "dir layout",
            Format::DockerArchive => "docker-archive",
            Format::OciArchive => "oci-archive",
            Format::Rootfs => "root filesystem",
        })
    }
}

/// Where a pull goes, and under which name the image is recorded there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The directory (or, for an archive format, the file).
    pub path: PathBuf,
    /// The name to record instead of the reference's tag: the OCI layout's
    /// `org.opencontainers.image.ref.name` (verbatim, as skopeo's `oci:DIR:NAME`), docker's
    /// `RepoTags`. A bare tag (`v2`) keeps the pulled repository; anything with `/`, `:` or
    /// `@` is an image reference (`myimg:v2`, `registry.lan/team/app:1`).
    pub name: Option<String>,
}

impl Destination {
    /// `path`, with the image named by its reference's tag.
    pub fn new(path: impl Into<PathBuf>) -> Destination {
        Destination {
            path: path.into(),
            name: None,
        }
    }

    /// The same destination, with the image recorded as `name` (see [`Destination::name`]).
    pub fn named(mut self, name: impl Into<String>) -> Destination {
        self.name = Some(name.into());
        self
    }

    /// Reads `DIR:NAME` as skopeo's `oci:DIR:NAME` does, with one rule for paths that hold
    /// a `:` themselves: when the *last component* of `arg` holds a `:`, the part from its
    /// first `:` on is the name (`out:v2` → `out` named `v2`; `out:myimg:v2` → `out` named
    /// `myimg:v2`; `/mnt/a:b/out` has none). A directory whose own name holds a `:` is
    /// written with a trailing `/` (`./backup:2024/`). A name with a `/` in it cannot be
    /// given this way: use [`Destination::named`] (`--tag`).
    pub fn split_name(arg: &Path) -> Destination {
        let Some(text) = arg.to_str() else {
            return Destination::new(arg);
        };
        let last = text.rfind('/').map_or(0, |i| i + 1);
        match text[last..].find(':') {
            Some(i) if i > 0 && last + i + 1 < text.len() => Destination {
                path: PathBuf::from(&text[..last + i]),
                name: Some(text[last + i + 1..].to_string()),
            },
            _ => Destination::new(arg),
        }
    }
}

impl<P: AsRef<Path>> From<P> for Destination {
    fn from(p: P) -> Destination {
        Destination::new(p.as_ref())
    }
}

/// What the image is called in the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageName {
    /// `org.opencontainers.image.ref.name` (none: a pull by digest, unnamed).
    pub ref_name: Option<String>,
    /// `io.containerd.image.name`: the full reference.
    pub full: String,
    /// `registry/repository` of the image as named: whose entry it is.
    pub repository: String,
    /// docker's `RepoTags` entry (`name:tag`, familiar form).
    pub repo_tag: Option<String>,
}

impl ImageName {
    /// The image pulled as `reference`, recorded as `name` if given.
    pub(crate) fn new(reference: &Reference, name: Option<&str>) -> Result<ImageName> {
        let Some(name) = name else {
            return Ok(ImageName {
                ref_name: reference.tag().map(str::to_string),
                full: reference.to_string(),
                repository: reference.name(),
                repo_tag: reference
                    .tag()
                    .map(|t| format!("{}:{t}", reference.familiar_name())),
            });
        };
        let bad = |why: String| Error::InvalidOption(format!("image name {name:?}: {why}"));
        let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        if name.len() > 255
            || !alnum(name.chars().next())
            || !alnum(name.chars().last())
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-:@+/".contains(c))
        {
            return Err(bad(
                "expected a tag (v2) or an image reference (name:tag, host/repo:tag)".into(),
            ));
        }
        if !name.contains(['/', ':', '@']) {
            let tagged = reference
                .with_tag(name)
                .ok_or_else(|| bad("not a valid tag ([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})".into()))?;
            return Ok(ImageName {
                ref_name: Some(name.to_string()),
                full: tagged.to_string(),
                repository: tagged.name(),
                repo_tag: Some(format!("{}:{name}", tagged.familiar_name())),
            });
        }
        let named: Reference = name.parse().map_err(|e| bad(format!("{e}")))?;
        Ok(ImageName {
            ref_name: Some(name.to_string()),
            full: named.to_string(),
            repository: named.name(),
            repo_tag: named
                .tag()
                .map(|t| format!("{}:{t}", named.familiar_name())),
        })
    }
}

/// The manifest that completes an image, recorded last.
pub(crate) struct ManifestRecord<'a> {
    pub bytes: &'a [u8],
    pub digest: Digest,
    pub media_type: &'a str,
    pub name: &'a ImageName,
    pub platform: Option<&'a Platform>,
    /// The config blob.
    pub config: &'a BlobDescriptor,
    /// The layers, in manifest order (with several platforms: every other blob of the
    /// image manifests in `children`, so that all are kept).
    pub layers: &'a [BlobDescriptor],
    /// The manifest's digest as the registry served it, when `--convert` rewrote it.
    pub source_digest: Option<Digest>,
    /// When `bytes` is an index: the image manifests pulled with it (digest, bytes), kept
    /// as blobs (OCI) or as `<hex>.manifest.json` (dir, as skopeo's `--all` writes them).
    pub children: &'a [(Digest, &'a [u8])],
}

impl ManifestRecord<'_> {
    /// Every blob the manifest references (config and layers).
    fn blobs(&self) -> impl Iterator<Item = &Digest> {
        std::iter::once(&self.config.digest).chain(self.layers.iter().map(|l| &l.digest))
    }

    /// Its `index.json` entry.
    fn index_entry(&self) -> serde_json::Value {
        let mut annotations = serde_json::Map::new();
        if let Some(t) = &self.name.ref_name {
            annotations.insert(ANNOTATION_REF_NAME.into(), t.as_str().into());
        }
        annotations.insert(ANNOTATION_IMAGE_NAME.into(), self.name.full.as_str().into());
        if let Some(src) = self.source_digest {
            annotations.insert(
                crate::convert::ANNOTATION_SOURCE_DIGEST.into(),
                src.to_string().into(),
            );
        }
        let mut entry = serde_json::json!({
            "mediaType": self.media_type,
            "digest": self.digest.to_string(),
            "size": self.bytes.len(),
            "annotations": annotations,
        });
        if let Some(p) = self.platform {
            let mut platform = serde_json::json!({ "architecture": p.architecture, "os": p.os });
            if let Some(v) = &p.variant {
                platform["variant"] = v.as_str().into();
            }
            entry["platform"] = platform;
        }
        entry
    }
}

/// An opened destination, locked against other fastpull processes: a directory layout or
/// an archive file.
pub(crate) struct Layout {
    path: PathBuf,
    format: Format,
    place: Place,
}

enum Place {
    Dir(Directory),
    Archive(Archive),
}

impl Layout {
    /// Opens `dest` for `format` and locks it (see [`Directory::open`], [`Archive::open`]).
    pub(crate) fn open(
        dest: &Path,
        format: Format,
        resume: bool,
        name: &ImageName,
        replace: bool,
    ) -> Result<Layout> {
        let place = if format.is_archive() {
            Place::Archive(Archive::open(dest)?)
        } else {
            Place::Dir(Directory::open(dest, format, resume, name, replace)?)
        };
        Ok(Layout {
            path: dest.to_path_buf(),
            format,
            place,
        })
    }

    /// The destination: a directory, or an archive's final path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Gets the destination ready for the blobs of `m`: an archive is laid out and
    /// preallocated (its headers and small files written); a directory needs nothing.
    pub(crate) fn prepare(&self, m: &ManifestRecord<'_>) -> Result<()> {
        let Place::Archive(a) = &self.place else {
            return Ok(());
        };
        let kind = match self.format {
            Format::DockerArchive => archive::Kind::Docker,
            _ => archive::Kind::Oci,
        };
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": crate::manifest::OCI_INDEX,
            "manifests": [m.index_entry()],
        });
        let index_json = serde_json::to_vec(&index)
            .map_err(|e| Error::Internal(format!("serialize index.json: {e}")))?;
        let plan = archive::Plan::new(
            kind,
            &archive::Contents {
                oci_layout: OCI_LAYOUT.as_bytes(),
                index_json,
                manifest: m.bytes,
                manifest_digest: m.digest,
                config: m.config,
                layers: m.layers,
                repo_tag: m.name.repo_tag.clone(),
            },
        )?;
        tracing::debug!(archive = %a.dest().display(), bytes = plan.size(), "archive laid out");
        a.prepare(plan)
    }

    /// Whether the blobs go into an archive (one file; no file per blob).
    pub(crate) fn is_archive(&self) -> bool {
        matches!(self.place, Place::Archive(_))
    }

    /// Blobs of `blobs` already verified in place, for an archive (`None` for a directory:
    /// look at [`Layout::blob_path`]).
    pub(crate) fn verified_in_archive(&self) -> Option<std::collections::HashSet<Digest>> {
        match &self.place {
            Place::Archive(a) => Some(a.verified()),
            Place::Dir(_) => None,
        }
    }

    /// Where a blob's bytes go in an archive (a region of its file), or `None` for a
    /// directory (a partial file at [`Layout::partial_path`], renamed to
    /// [`Layout::blob_path`]).
    pub(crate) fn region(&self, digest: &Digest) -> Result<Option<Arc<BlobFile>>> {
        match &self.place {
            Place::Archive(a) => a.region(digest).map(Some),
            Place::Dir(_) => Ok(None),
        }
    }

    /// Where the verified blob lives in a directory layout (an archive's own path for an
    /// archive, which has no such file).
    pub(crate) fn blob_path(&self, digest: &Digest) -> PathBuf {
        match &self.place {
            Place::Dir(d) => d.blob_path(digest),
            Place::Archive(a) => a.dest().to_path_buf(),
        }
    }

    /// Where a directory layout's blob is written while unverified (see
    /// [`Directory::partial_path`]).
    pub(crate) fn partial_path(&self, digest: &Digest) -> PathBuf {
        match &self.place {
            Place::Dir(d) => d.partial_path(digest),
            Place::Archive(a) => a.dest().to_path_buf(),
        }
    }

    /// With `yes` (and a directory layout, and a user index: see [`Index::for_user`]),
    /// partial downloads are shared with other destinations (see [`crate::partials`]).
    pub(crate) fn with_shared_partials(mut self, yes: bool) -> Layout {
        if let (true, Place::Dir(d)) = (yes, &mut self.place) {
            d.shared = Index::for_user()
                .and_then(|index| Some((index, std::fs::canonicalize(&d.tmp).ok()?)));
        }
        self
    }

    /// The user's index of partial downloads and this destination's scratch directory,
    /// when partials are shared and a blob of `size` is worth it (see [`crate::partials`]).
    fn shared(&self, size: u64) -> Option<(&Directory, &Index, &Path)> {
        match &self.place {
            Place::Dir(d) if size >= crate::partials::MIN_SIZE => {
                let (index, scratch) = d.shared.as_ref()?;
                Some((d, index, scratch))
            }
            _ => None,
        }
    }

    /// Before a blob's partial download is looked for: if this destination has none, takes
    /// the one another destination kept (see [`crate::partials`]); its journal is then read
    /// as any other.
    pub(crate) fn adopt_partial(&self, digest: &Digest, size: u64) {
        let Some((d, index, scratch)) = self.shared(size) else {
            return;
        };
        let partial = d.partial_path(digest);
        let journal = crate::resume::Journal::path_for(&partial);
        if journal.exists() {
            return;
        }
        if let Some(from) = index.take(digest, scratch, &partial, &journal) {
            let from = from.parent().unwrap_or(&from);
            tracing::info!(blob = %digest, from = %from.display(), "taking over a partial download another destination kept");
        }
    }

    /// A blob's journal exists here: other destinations may take its pair should this pull
    /// stop (see [`crate::partials`]).
    pub(crate) fn note_partial(&self, digest: &Digest, size: u64) {
        if let Some((_, index, scratch)) = self.shared(size) {
            index.note(digest, scratch);
        }
    }

    /// A blob is verified and in place: its pair is gone from the index.
    pub(crate) fn forget_partial(&self, digest: &Digest, size: u64) {
        if let Some((_, index, scratch)) = self.shared(size) {
            index.forget(digest, scratch);
        }
    }

    /// Records the manifest (a directory) or renames the verified archive into place: the
    /// last step, after every blob is in place.
    pub(crate) fn commit(&self, m: &ManifestRecord<'_>) -> Result<()> {
        match &self.place {
            Place::Dir(d) => d.commit(m),
            Place::Archive(a) => a.commit(),
        }
    }

    /// After a successful pull (see [`Directory::finish`]).
    pub(crate) fn finish(self) -> Result<()> {
        match self.place {
            Place::Dir(d) => d.finish(),
            Place::Archive(_) => Ok(()),
        }
    }
}

/// A directory destination (OCI or dir layout), locked against other fastpull processes.
struct Directory {
    root: PathBuf,
    format: Format,
    /// Replace an `index.json` entry of the same name that holds another repository.
    replace: bool,
    blobs: PathBuf,
    tmp: PathBuf,
    /// The destination did not exist before this pull.
    created: bool,
    committed: AtomicBool,
    /// The user's index of partial downloads and this destination's scratch directory as
    /// an absolute path (with resume; see [`crate::partials`]).
    shared: Option<(Index, PathBuf)>,
    /// An flock on the destination directory itself.
    _lock: File,
}

impl Directory {
    /// Creates or reopens the destination and locks it. Refuses a non-empty directory that
    /// is not a layout of `format`, and an OCI layout whose `index.json` gives `name` to
    /// another repository (unless `replace`). Without `resume`, partial downloads left by
    /// an earlier pull are removed first.
    fn open(
        root: &Path,
        format: Format,
        resume: bool,
        name: &ImageName,
        replace: bool,
    ) -> Result<Directory> {
        let dest_err = |reason: &str| Error::Destination {
            path: root.to_path_buf(),
            reason: reason.to_string(),
        };
        let mut tries = 0;
        let (created, lock) = loop {
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
            // The directory locked may be gone by now: a pull that made it and failed
            // removes it on its way out, and the lock it held was this one's wait. Then the
            // path names another directory, or none, and this lock guards nothing.
            if locked_is_current(&lock, root) {
                break (created, lock);
            }
            tries += 1;
            if tries >= 3 {
                return Err(dest_err(
                    "was removed or replaced while waiting for its lock",
                ));
            }
        };
        check_existing(root, format)?;
        sweep_atomic_leftovers(root);
        if format == Format::Oci {
            sweep_atomic_leftovers(&root.join("blobs").join("sha256"));
        }
        if format == Format::Oci && !replace {
            check_name(&read_index(&root.join("index.json"))?, root, name)?;
        }
        let blobs = match format {
            Format::Dir => root.to_path_buf(),
            _ => root.join("blobs").join("sha256"),
        };
        let tmp = root.join(TMP_DIR);
        if !resume {
            match std::fs::remove_dir_all(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io("remove", &tmp, e))
                }
                _ => {}
            }
        }
        for dir in [&blobs, &tmp] {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        }
        match format {
            Format::Dir => write_atomic(&root.join("version"), DIR_VERSION.as_bytes())?,
            _ => {
                let p = root.join("oci-layout");
                if !p.exists() {
                    write_atomic(&p, OCI_LAYOUT.as_bytes())?;
                }
            }
        }
        Ok(Directory {
            root: root.to_path_buf(),
            format,
            replace,
            blobs,
            tmp,
            created,
            committed: AtomicBool::new(false),
            shared: None,
            _lock: lock,
        })
    }

    /// Where the verified blob lives.
    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// Where the blob is written while unverified: `<hex>.partial` in the scratch
    /// directory, with its resume journal `<hex>.journal` beside it. One name per blob, so
    /// the next pull finds it; the destination's lock keeps other processes away.
    fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.tmp.join(format!("{}.partial", digest.hex()))
    }

    /// Records the manifest: the last step, after every blob is in place.
    fn commit(&self, m: &ManifestRecord<'_>) -> Result<()> {
        self.committed.store(true, Ordering::Release);
        match self.format {
            Format::Dir => {
                for (digest, bytes) in m.children {
                    let p = self.root.join(format!("{}.manifest.json", digest.hex()));
                    write_atomic(&p, bytes)?;
                }
                write_atomic(&self.root.join("manifest.json"), m.bytes)?;
                let keep: Vec<Digest> = m.blobs().copied().collect();
                self.remove_stale_dir_blobs(&keep, m.children)
            }
            _ => {
                for (digest, bytes) in m.children {
                    let path = self.blob_path(digest);
                    if !crate::verify::file_matches(&path, digest, bytes.len() as u64)
                        .map_err(|e| Error::io("read", &path, e))?
                    {
                        write_atomic(&path, bytes)?;
                    }
                }
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
    /// entries, annotations, fields we do not know). An entry of the same name replaces
    /// the old one, but not one that holds another repository's image unless `replace`
    /// was asked for (checked when the destination was opened, and again here).
    fn update_index(&self, m: &ManifestRecord<'_>) -> Result<()> {
        let path = self.root.join("index.json");
        let bad = |reason: String| Error::Destination {
            path: path.clone(),
            reason,
        };
        let mut index = read_index(&path)?;
        if !self.replace {
            check_name(&index, &self.root, m.name)?;
        }
        let Some(obj) = index.as_object_mut() else {
            return Err(bad("is not a JSON object".into()));
        };
        let entries = obj
            .entry("manifests")
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        let Some(entries) = entries.as_array_mut() else {
            return Err(bad("has a \"manifests\" that is not an array".into()));
        };
        let name = m.name.ref_name.as_deref();
        let digest = m.digest.to_string();
        // One entry per name; an unnamed pull replaces only an unnamed entry of the same digest.
        entries.retain(|d| {
            let theirs = d["annotations"][ANNOTATION_REF_NAME].as_str();
            match (name, theirs) {
                (Some(t), Some(n)) => n != t,
                (None, None) => d["digest"].as_str() != Some(digest.as_str()),
                _ => true,
            }
        });
        entries.push(m.index_entry());
        let json = serde_json::to_vec(&index)
            .map_err(|e| Error::io("serialize", &path, std::io::Error::other(e)))?;
        crate::stop_hook::reached("index", &path);
        write_atomic(&path, &json)
    }

    /// A dir layout holds one image, as skopeo leaves it: blobs of an image pulled here
    /// before, and not part of this one, are removed (only 64-hex-digit file names).
    fn remove_stale_dir_blobs(&self, keep: &[Digest], children: &[(Digest, &[u8])]) -> Result<()> {
        let keep: std::collections::HashSet<String> = keep.iter().map(Digest::hex).collect();
        let manifests: std::collections::HashSet<String> = children
            .iter()
            .map(|(d, _)| format!("{}.manifest.json", d.hex()))
            .collect();
        let entries = std::fs::read_dir(&self.root)
            .map_err(|e| Error::io("read directory", &self.root, e))?;
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale_blob = is_blob_name(&name) && !keep.contains(&name);
            let stale_manifest = name
                .strip_suffix(".manifest.json")
                .is_some_and(is_blob_name)
                && !manifests.contains(&name);
            if stale_blob || stale_manifest {
                let p = entry.path();
                std::fs::remove_file(&p).map_err(|e| Error::io("remove stale blob", &p, e))?;
            }
        }
        Ok(())
    }

    /// After a successful pull, while the destination is still locked: removes what is
    /// left in the scratch directory but partial downloads other images may resume (a
    /// partial file with its journal), and the directory itself once it is empty.
    fn finish(self) -> Result<()> {
        self.sweep_scratch();
        drop(self);
        Ok(())
    }
}

impl Drop for Directory {
    /// After a failed pull: a destination this pull created and put no verified blob in is
    /// removed whole; otherwise the scratch directory goes if nothing is left in it
    /// (verified blobs stay, for the next pull to reuse).
    fn drop(&mut self) {
        self.sweep_scratch();
        if self.created
            && !self.committed.load(Ordering::Acquire)
            && !self.has_blobs()
            && !self.tmp.exists()
        {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

impl Directory {
    /// Removes from the scratch directory everything but resumable partial downloads
    /// (`<hex>.partial` with its `<hex>.journal`): partial files without a journal, journals
    /// without a partial file, temporary files; then the directory, if that empties it.
    fn sweep_scratch(&self) {
        let Ok(rd) = std::fs::read_dir(&self.tmp) else {
            return;
        };
        let names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let has = |n: &str| names.iter().any(|x| x == n);
        for name in &names {
            let keep = match name.split_once('.') {
                Some((hex, "partial")) => is_blob_name(hex) && has(&format!("{hex}.journal")),
                Some((hex, "journal")) => is_blob_name(hex) && has(&format!("{hex}.partial")),
                _ => false,
            };
            if !keep {
                let p = self.tmp.join(name);
                let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
            }
        }
        let _ = std::fs::remove_dir(&self.tmp);
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

/// Removes from `dir` the temporary files an atomic write ([`write_atomic`]) leaves when its
/// process is killed between create and rename: `.NAME.PID.tmp` for a NAME fastpull writes
/// (a blob's hex, `index.json`, `oci-layout`, `version`, `manifest.json`,
/// `<hex>.manifest.json`). Called with the destination locked, so no live pull owns them.
/// Other files are left alone.
fn sweep_atomic_leftovers(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(inner) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.rsplit_once('.'))
            .filter(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
            .map(|(inner, _)| inner)
        else {
            continue;
        };
        let ours = is_blob_name(inner)
            || matches!(
                inner,
                "index.json" | "oci-layout" | "version" | "manifest.json"
            )
            || inner
                .strip_suffix(".manifest.json")
                .is_some_and(is_blob_name);
        if ours && e.file_type().is_ok_and(|t| t.is_file()) {
            let p = e.path();
            match std::fs::remove_file(&p) {
                Ok(()) => {
                    tracing::debug!(path = %p.display(), "removed a stopped pull's temporary file")
                }
                Err(err) => {
                    tracing::debug!(path = %p.display(), error = %err, "cannot remove a temporary file")
                }
            }
        }
    }
}

/// 64 lowercase hex digits: the file name of a blob.
fn is_blob_name(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Takes the destination's flock, retrying for [`LOCK_GRACE`]; `false` if it stays held.
/// Whether `lock` (a file or directory opened and locked) is still the one at `path`.
pub(crate) fn locked_is_current(lock: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (lock.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

pub(crate) fn lock_with_grace(lock: &File) -> std::io::Result<bool> {
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

/// `index.json` as JSON (an empty OCI index when there is none yet).
fn read_index(path: &Path) -> Result<serde_json::Value> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Destination {
            path: path.to_path_buf(),
            reason: format!("is not valid JSON: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(serde_json::json!({ "schemaVersion": 2, "mediaType": crate::manifest::OCI_INDEX }))
        }
        Err(e) => Err(Error::io("read", path, e)),
    }
}

/// Refuses to give `name` to the image when an entry of `index` has that name and says
/// (`io.containerd.image.name`) it holds another repository's image: replacing it would
/// orphan that image's blobs. Entries that do not say whose they are may be replaced.
fn check_name(index: &serde_json::Value, root: &Path, name: &ImageName) -> Result<()> {
    let Some(ref_name) = name.ref_name.as_deref() else {
        return Ok(());
    };
    let entries = index["manifests"].as_array().map_or(&[][..], Vec::as_slice);
    for e in entries {
        let a = &e["annotations"];
        if a[ANNOTATION_REF_NAME].as_str() != Some(ref_name) {
            continue;
        }
        let Some(holder) = a[ANNOTATION_IMAGE_NAME].as_str() else {
            continue;
        };
        let same = holder
            .parse::<Reference>()
            .is_ok_and(|r| r.name() == name.repository);
        if !same {
            return Err(Error::NameInUse {
                path: root.to_path_buf(),
                name: ref_name.to_string(),
                held_by: holder.to_string(),
                wanted: name.full.clone(),
            });
        }
    }
    Ok(())
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
        Format::Oci | Format::DockerArchive | Format::OciArchive | Format::Rootfs => {
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

    fn name(r: &str) -> ImageName {
        ImageName::new(&r.parse().unwrap(), None).unwrap()
    }

    fn open(root: &Path, format: Format, resume: bool) -> Result<Layout> {
        Layout::open(
            root,
            format,
            resume,
            &name("127.0.0.1:5000/x:latest"),
            false,
        )
    }

    /// A lock taken on a directory that was removed (and perhaps made again) meanwhile is
    /// told apart from one on the directory at the path: the check `Directory::open` makes
    /// after its lock, so that a pull which waited for one that then removed the
    /// directory does not hold a lock that guards nothing.
    #[test]
    fn a_lock_on_a_removed_directory_is_not_current() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("d");
        std::fs::create_dir(&root).unwrap();
        let lock = File::open(&root).unwrap();
        assert!(locked_is_current(&lock, &root));
        std::fs::remove_dir(&root).unwrap();
        assert!(!locked_is_current(&lock, &root));
        std::fs::create_dir(&root).unwrap();
        assert!(!locked_is_current(&lock, &root));
        // Opening through the loop takes the directory now at the path.
        drop(open(&root, Format::Oci, true).unwrap());
    }

    #[test]
    fn a_killed_atomic_write_leaves_nothing_for_the_next_pull() {
        let hex = "ab".repeat(32);
        for format in [Format::Oci, Format::Dir] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("d");
            // An existing directory: one this pull created would go with its drop.
            std::fs::create_dir(&root).unwrap();
            drop(open(&root, format, true).unwrap());
            let blobs = match format {
                Format::Dir => root.clone(),
                _ => root.join("blobs/sha256"),
            };
            let stale = [
                root.join(".index.json.4242.tmp"),
                root.join(format!(".{hex}.manifest.json.17.tmp")),
                blobs.join(format!(".{hex}.99.tmp")),
            ];
            let theirs = [
                root.join(".notes.12.tmp"),
                root.join(".index.json.tmp"),
                blobs.join(format!(".{hex}.x.tmp")),
            ];
            for p in stale.iter().chain(&theirs) {
                std::fs::write(p, b"x").unwrap();
            }
            drop(open(&root, format, true).unwrap());
            for p in &stale {
                assert!(!p.exists(), "{format:?}: {} left", p.display());
            }
            for p in &theirs {
                assert!(p.exists(), "{format:?}: {} removed", p.display());
            }
        }
    }

    fn record<'a>(name: &'a ImageName, bytes: &'a [u8]) -> ManifestRecord<'a> {
        let config: &'static BlobDescriptor = Box::leak(Box::new(BlobDescriptor {
            digest: Digest::of(b"{}"),
            size: 2,
            media_type: "c".into(),
            kind: crate::manifest::BlobKind::Config,
        }));
        ManifestRecord {
            bytes,
            digest: Digest::of(bytes),
            media_type: crate::manifest::OCI_MANIFEST,
            name,
            platform: None,
            config,
            layers: &[],
            source_digest: None,
            children: &[],
        }
    }

    #[test]
    fn oci_index_keeps_one_entry_per_tag() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("img");
        let a = name("127.0.0.1:5000/x:a");
        let b = name("127.0.0.1:5000/x:b");
        let l = open(&root, Format::Oci, true).unwrap();
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
        let r = name("h:1/x:mine");
        let l = open(root, Format::Oci, true).unwrap();
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
    fn dest_names_split_at_the_last_components_first_colon() {
        let split = |s: &str| {
            let d = Destination::split_name(Path::new(s));
            (d.path.to_string_lossy().into_owned(), d.name)
        };
        let named = |p: &str, n: &str| (p.to_string(), Some(n.to_string()));
        let plain = |p: &str| (p.to_string(), None);
        assert_eq!(split("out:v2"), named("out", "v2"));
        assert_eq!(split("./out:myimg:v2"), named("./out", "myimg:v2"));
        assert_eq!(split("/mnt/a:b/out"), plain("/mnt/a:b/out"));
        assert_eq!(split("/mnt/a:b/out:v1"), named("/mnt/a:b/out", "v1"));
        assert_eq!(split("./backup:2024/"), plain("./backup:2024/"));
        assert_eq!(split("out:"), plain("out:"));
        assert_eq!(split(":v1"), plain(":v1"));
        assert_eq!(split("out"), plain("out"));
    }

    #[test]
    fn image_names_are_tags_or_references() {
        let r: Reference = "127.0.0.1:5000/test/multi:latest".parse().unwrap();
        let n = ImageName::new(&r, Some("v2")).unwrap();
        assert_eq!(n.ref_name.as_deref(), Some("v2"));
        assert_eq!(n.full, "127.0.0.1:5000/test/multi:v2");
        assert_eq!(n.repo_tag.as_deref(), Some("127.0.0.1:5000/test/multi:v2"));
        let n = ImageName::new(&r, Some("myimg:v2")).unwrap();
        assert_eq!(
            n.ref_name.as_deref(),
            Some("myimg:v2"),
            "verbatim, as skopeo"
        );
        assert_eq!(n.full, "docker.io/library/myimg:v2");
        assert_eq!(n.repo_tag.as_deref(), Some("myimg:v2"));
        assert_eq!(n.repository, "docker.io/library/myimg");
        let by_digest: Reference = format!("h:1/x@{}", Digest::of(b"m")).parse().unwrap();
        let n = ImageName::new(&by_digest, None).unwrap();
        assert_eq!((n.ref_name, n.repo_tag), (None, None));
        for bad in ["", "-x", "a b", "x:", "UPPER/Case:1", "v2!"] {
            assert!(ImageName::new(&r, Some(bad)).is_err(), "{bad:?}");
        }
    }

    /// An entry of the same name that holds another repository's image is not replaced
    /// without `replace` (checked when the layout is opened, before any blob is fetched);
    /// the same repository's entry is.
    #[test]
    fn a_name_held_by_another_repository_needs_replace() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let bench = name("127.0.0.1:5000/bench/many:latest");
        let l = Layout::open(root, Format::Oci, true, &bench, false).unwrap();
        l.commit(&record(&bench, b"{\"bench\":1}")).unwrap();
        l.finish().unwrap();
        let before = std::fs::read(root.join("index.json")).unwrap();

        let multi = name("127.0.0.1:5000/test/multi:latest");
        let err = Layout::open(root, Format::Oci, true, &multi, false)
            .err()
            .unwrap();
        assert!(matches!(err, Error::NameInUse { .. }), "{err}");
        assert_eq!(err.category().exit_code(), 5);
        let msg = err.to_string();
        for part in [
            "\"latest\"",
            "bench/many",
            "test/multi",
            "--tag",
            "--replace",
        ] {
            assert!(msg.contains(part), "{part} not in {msg}");
        }
        assert_eq!(std::fs::read(root.join("index.json")).unwrap(), before);

        // The same repository (another tag's content) replaces its own entry.
        let newer = name("127.0.0.1:5000/bench/many:latest");
        let l = Layout::open(root, Format::Oci, true, &newer, false).unwrap();
        l.commit(&record(&newer, b"{\"bench\":2}")).unwrap();
        l.finish().unwrap();

        // With replace, the other repository takes the name.
        let l = Layout::open(root, Format::Oci, true, &multi, true).unwrap();
        l.commit(&record(&multi, b"{\"multi\":1}")).unwrap();
        l.finish().unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("index.json")).unwrap()).unwrap();
        let m = v["manifests"].as_array().unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(
            m[0]["annotations"][ANNOTATION_IMAGE_NAME],
            "127.0.0.1:5000/test/multi:latest"
        );
    }

    #[test]
    fn failed_pull_into_a_new_directory_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("new");
        drop(open(&root, Format::Oci, true).unwrap());
        assert!(!root.exists());
        // With a verified blob in it, the directory stays (for the next pull to reuse).
        let l = open(&root, Format::Oci, true).unwrap();
        std::fs::write(l.blob_path(&Digest::of(b"x")), b"x").unwrap();
        drop(l);
        assert!(root.join("oci-layout").exists());
        assert!(!root.join(TMP_DIR).exists());
    }

    /// A stopped pull keeps partial downloads that have a resume journal, and nothing else
    /// in the scratch directory; a pull without resume starts with it empty.
    #[test]
    fn scratch_keeps_resumable_partials_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("img");
        let l = open(&root, Format::Oci, true).unwrap();
        std::fs::write(l.blob_path(&Digest::of(b"x")), b"x").unwrap();
        let resumable = l.partial_path(&Digest::of(b"y"));
        let journal = resumable.with_extension("journal");
        std::fs::write(&resumable, b"y").unwrap();
        std::fs::write(&journal, b"j").unwrap();
        let bare = l.partial_path(&Digest::of(b"z"));
        let held = std::fs::File::create(&bare).unwrap();
        let orphan = l.partial_path(&Digest::of(b"w")).with_extension("journal");
        std::fs::write(&orphan, b"j").unwrap();
        let old_style = root
            .join(TMP_DIR)
            .join(format!("{}.999999999-1.partial", Digest::of(b"v").hex()));
        std::fs::write(&old_style, b"v").unwrap();
        drop(l);
        assert!(
            resumable.exists() && journal.exists(),
            "resumable partial removed"
        );
        for gone in [&bare, &orphan, &old_style] {
            assert!(!gone.exists(), "{} left", gone.display());
        }
        drop(held);
        // A successful pull keeps them too (another image may need that blob).
        let l = open(&root, Format::Oci, true).unwrap();
        l.finish().unwrap();
        assert!(resumable.exists() && journal.exists());
        // Without resume, the scratch directory starts empty.
        let l = open(&root, Format::Oci, false).unwrap();
        assert!(!resumable.exists() && !journal.exists());
        drop(l);
        assert!(!root.join(TMP_DIR).exists());
    }

    #[test]
    fn refuses_foreign_directories_and_concurrent_use() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("precious.txt"), b"x").unwrap();
        let err = open(dir.path(), Format::Oci, true).err().unwrap();
        assert!(err.to_string().contains("not an OCI image layout"), "{err}");
        let err = open(dir.path(), Format::Dir, true).err().unwrap();
        assert!(matches!(err, Error::Destination { .. }));

        let other = tempfile::tempdir().unwrap();
        let held = open(other.path(), Format::Dir, true).unwrap();
        let err = open(other.path(), Format::Dir, true).err().unwrap();
        assert!(err.to_string().contains("another fastpull"), "{err}");
        drop(held);
        open(other.path(), Format::Dir, true).unwrap();
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
        let l = open(dir.path(), Format::Oci, true).unwrap();
        let mut child = std::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .stdout(match &l.place {
                Place::Dir(d) => d._lock.try_clone().unwrap(),
                Place::Archive(_) => unreachable!(),
            })
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
        open(dir.path(), Format::Oci, true).expect("the lock is free once the child lets go");
        assert!(child.wait().unwrap().success());
    }
}
