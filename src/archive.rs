//! Archives: `--format oci-archive` (a tar of an OCI image layout) and `--format
//! docker-archive` (what `docker save` writes since v25: the same OCI layout plus docker's
//! `manifest.json` and `repositories`), which `docker load`, `podman load` and skopeo's
//! `docker-archive:` / `oci-archive:` transports read.
//!
//! Nothing is staged twice. Once the manifest is known, every entry of the tar is known
//! too, sizes included: the archive is laid out up front ([`Plan`]), its file is
//! preallocated whole (a full disk is an error before the first byte is fetched), the tar
//! headers and small files are written, and each blob's bytes then land directly at their
//! offset inside it: a region of the one file, mapped on its own
//! ([`crate::write::BlobFile::region`]), filled by the same scheduler, hashed by the same
//! in-order hasher as a blob file of a directory layout. A region whose digest does not
//! match is fetched again into the same place. Only when every blob in it has verified is
//! the file flushed and renamed from `DEST.fastpull-partial` to `DEST` (and the directory
//! flushed): `DEST` is either absent or a complete, verified archive.
//!
//! The small files come first (`oci-layout`, `index.json`, docker's `manifest.json` and
//! `repositories`), then the directories and the blobs (manifest, config, layers), then the
//! end-of-archive blocks: docker, podman and skopeo read an archive in any order (they look
//! entries up by name, or unpack it first), and a reader that streams it sees what the
//! archive holds before the bytes. Headers are ustar, with mtime 0 and no owner names, so
//! the same image always makes the same archive, byte for byte; a blob over 8 GiB gets its
//! size in GNU base-256, which Go's `archive/tar` (docker, podman, skopeo) reads.
//!
//! Trade-off: an archive is not resumed. A stopped pull removes its partial file (the
//! regions' progress is not journaled), and a destination archive is replaced whole.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::BlobDescriptor;
use crate::write::{persist, preallocate, BlobFile};

/// Which archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A tar of an OCI image layout.
    Oci,
    /// The OCI layout plus docker's `manifest.json` and `repositories`.
    Docker,
}

/// The suffix of the file an archive is written to before it is complete.
pub(crate) const PARTIAL_SUFFIX: &str = ".fastpull-partial";

const BLOCK: u64 = 512;

/// What goes into an archive.
pub(crate) struct Contents<'a> {
    /// `oci-layout`.
    pub oci_layout: &'a [u8],
    /// `index.json`.
    pub index_json: Vec<u8>,
    /// The image manifest, stored as a blob.
    pub manifest: &'a [u8],
    /// Its digest.
    pub manifest_digest: Digest,
    /// The config blob.
    pub config: &'a BlobDescriptor,
    /// The layers, in manifest order.
    pub layers: &'a [BlobDescriptor],
    /// docker's `RepoTags` entry (`name:tag`, familiar form), if the image has a tag.
    pub repo_tag: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Body {
    Dir,
    Bytes(Vec<u8>),
    /// A fetched blob: its bytes land in the file's region.
    Blob(Digest),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    /// Where its header block starts; its data follows.
    at: u64,
    size: u64,
    body: Body,
}

/// The archive laid out: every entry's offset and size, the file's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    entries: Vec<Entry>,
    size: u64,
}

impl Plan {
    /// Lays out the archive of `c`.
    pub(crate) fn new(kind: Kind, c: &Contents<'_>) -> Result<Plan> {
        let mut plan = Plan {
            entries: Vec::new(),
            size: 0,
        };
        plan.bytes("oci-layout", c.oci_layout.to_vec());
        plan.bytes("index.json", c.index_json.clone());
        if kind == Kind::Docker {
            let path = |d: &Digest| format!("blobs/sha256/{}", d.hex());
            let manifest = serde_json::json!([{
                "Config": path(&c.config.digest),
                "RepoTags": c.repo_tag.iter().collect::<Vec<_>>(),
                "Layers": c.layers.iter().map(|l| path(&l.digest)).collect::<Vec<_>>(),
            }]);
            plan.bytes("manifest.json", to_json(&manifest)?);
            // The legacy map of name → tag → top layer, as docker save (v25+) writes it.
            if let (Some(repo_tag), Some(top)) = (&c.repo_tag, c.layers.last()) {
                if let Some((name, tag)) = repo_tag.rsplit_once(':') {
                    let mut tags = BTreeMap::new();
                    tags.insert(tag.to_string(), top.digest.hex());
                    let mut repos = BTreeMap::new();
                    repos.insert(name.to_string(), tags);
                    plan.bytes("repositories", to_json(&repos)?);
                }
            }
        }
        plan.push("blobs/".into(), 0, Body::Dir);
        plan.push("blobs/sha256/".into(), 0, Body::Dir);
        let mut seen = HashSet::new();
        seen.insert(c.manifest_digest);
        plan.bytes(
            &format!("blobs/sha256/{}", c.manifest_digest.hex()),
            c.manifest.to_vec(),
        );
        for b in std::iter::once(c.config).chain(c.layers) {
            if seen.insert(b.digest) {
                plan.push(
                    format!("blobs/sha256/{}", b.digest.hex()),
                    b.size,
                    Body::Blob(b.digest),
                );
            }
        }
        // The end of the archive: two zero blocks (the file is zeroed when preallocated).
        plan.size += 2 * BLOCK;
        Ok(plan)
    }

    fn bytes(&mut self, name: &str, bytes: Vec<u8>) {
        self.push(name.to_string(), bytes.len() as u64, Body::Bytes(bytes));
    }

    fn push(&mut self, name: String, size: u64, body: Body) {
        let at = self.size;
        self.size = at + BLOCK + size.div_ceil(BLOCK) * BLOCK;
        self.entries.push(Entry {
            name,
            at,
            size,
            body,
        });
    }

    /// The archive's length in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Where blob `digest`'s bytes go: `(offset, size)`.
    fn region_of(&self, digest: &Digest) -> Option<(u64, u64)> {
        self.entries.iter().find_map(|e| match &e.body {
            Body::Blob(d) if d == digest => Some((e.at + BLOCK, e.size)),
            _ => None,
        })
    }

    fn blobs(&self) -> impl Iterator<Item = &Digest> {
        self.entries.iter().filter_map(|e| match &e.body {
            Body::Blob(d) => Some(d),
            _ => None,
        })
    }

    /// Writes every header and every small file into `file` (which is `size` zero bytes).
    fn write_headers(&self, file: &File, path: &Path) -> Result<()> {
        for e in &self.entries {
            let header = header(&e.name, e.size, matches!(e.body, Body::Dir))
                .map_err(|err| Error::io("write tar header to", path, err))?;
            file.write_all_at(header.as_bytes(), e.at)
                .map_err(|err| Error::io("write", path, err))?;
            if let Body::Bytes(b) = &e.body {
                file.write_all_at(b, e.at + BLOCK)
                    .map_err(|err| Error::io("write", path, err))?;
            }
        }
        Ok(())
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Internal(format!("serialize: {e}")))
}

/// A ustar header: mode 0644 (0755 for directories), owner 0:0, mtime 0.
fn header(name: &str, size: u64, dir: bool) -> std::io::Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)?;
    h.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    h.set_mode(if dir { 0o755 } else { 0o644 });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h.set_cksum();
    Ok(h)
}

/// An archive being written: `DEST.fastpull-partial`, locked against other fastpull
/// processes, renamed to `DEST` by [`Archive::commit`] once every blob in it is verified,
/// removed if the pull ends otherwise.
pub(crate) struct Archive {
    dest: PathBuf,
    partial: PathBuf,
    file: Arc<File>,
    state: Mutex<State>,
    committed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct State {
    plan: Option<Plan>,
    /// The current region of each blob.
    regions: HashMap<Digest, Arc<BlobFile>>,
    /// Every region ever handed out over the file (unmapped before the file changes).
    all: Vec<Arc<BlobFile>>,
}

impl Archive {
    /// Opens and locks `DEST.fastpull-partial` beside `dest`. Refuses a `dest` that is a
    /// directory (or not a regular file) and one another fastpull is writing.
    pub(crate) fn open(dest: &Path) -> Result<Archive> {
        let bad = |reason: &str| Error::Destination {
            path: dest.to_path_buf(),
            reason: reason.to_string(),
        };
        match std::fs::metadata(dest) {
            Ok(m) if m.is_dir() => {
                return Err(bad(
                    "is a directory; an archive format writes one file (name a file, or use --format oci)",
                ))
            }
            Ok(m) if !m.is_file() => return Err(bad("exists and is not a regular file")),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("stat", dest, e)),
        }
        let Some(name) = dest.file_name() else {
            return Err(bad("has no file name"));
        };
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io("create directory", parent, e))?;
        }
        let mut partial_name = name.to_os_string();
        partial_name.push(PARTIAL_SUFFIX);
        let partial = dest.with_file_name(partial_name);
        // The lock is on the partial file itself; a pull that just finished may have renamed
        // the file we locked to DEST, so the path must still name it.
        for _ in 0..3 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&partial)
                .map_err(|e| Error::io("create", &partial, e))?;
            if !crate::layout::lock_with_grace(&file).map_err(|e| Error::io("lock", &partial, e))? {
                return Err(bad("is being written by another fastpull process"));
            }
            if crate::layout::locked_is_current(&file, &partial) {
                return Ok(Archive {
                    dest: dest.to_path_buf(),
                    partial,
                    file: Arc::new(file),
                    state: Mutex::new(State::default()),
                    committed: std::sync::atomic::AtomicBool::new(false),
                });
            }
        }
        Err(bad("is being written by another fastpull process"))
    }

    /// The archive's final path.
    pub(crate) fn dest(&self) -> &Path {
        &self.dest
    }

    /// Lays the archive out as `plan` says: the file gets its full length (zeroed) and its
    /// headers and small files. Called again with the same plan (another endpoint, same
    /// image) it keeps what is there, verified regions included; with another plan it
    /// starts over.
    pub(crate) fn prepare(&self, plan: Plan) -> Result<()> {
        let mut st = self.lock()?;
        if st.plan.as_ref() == Some(&plan) {
            return Ok(());
        }
        // Nothing may be mapped while the file changes length (SIGBUS).
        for r in st.all.drain(..) {
            r.unmap();
        }
        st.regions.clear();
        st.plan = None;
        let path = &self.partial;
        self.file
            .set_len(0)
            .map_err(|e| Error::io("truncate", path, e))?;
        preallocate(&self.file, plan.size).map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
                Error::Destination {
                    path: self.dest.clone(),
                    reason: format!(
                        "cannot be written: the archive needs {} bytes, preallocated whole, and \
                         the filesystem is full",
                        plan.size
                    ),
                }
            } else {
                Error::io("preallocate", path, e)
            }
        })?;
        plan.write_headers(&self.file, path)?;
        st.plan = Some(plan);
        Ok(())
    }

    /// The region of blob `digest` for a new fetch of it (a fetch before it, if any, is
    /// unmapped first: its readers fall back to the file and its writers stop).
    pub(crate) fn region(&self, digest: &Digest) -> Result<Arc<BlobFile>> {
        let mut st = self.lock()?;
        let (base, size) = st
            .plan
            .as_ref()
            .and_then(|p| p.region_of(digest))
            .ok_or_else(|| Error::Internal(format!("blob {digest} has no place in the archive")))?;
        if let Some(old) = st.regions.remove(digest) {
            old.unmap();
        }
        let region = BlobFile::region(self.file.clone(), &self.partial, base, size)?;
        st.regions.insert(*digest, region.clone());
        st.all.push(region.clone());
        Ok(region)
    }

    /// The blobs already verified in place.
    pub(crate) fn verified(&self) -> HashSet<Digest> {
        self.lock()
            .map(|st| {
                st.regions
                    .iter()
                    .filter(|(_, r)| r.is_persisted())
                    .map(|(d, _)| *d)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Checks that every blob verified, flushes the file, renames it to `DEST` and flushes
    /// the directory.
    pub(crate) fn commit(&self) -> Result<()> {
        let st = self.lock()?;
        let plan = st
            .plan
            .as_ref()
            .ok_or_else(|| Error::Internal("archive committed before it was laid out".into()))?;
        if let Some(missing) = plan
            .blobs()
            .find(|d| !st.regions.get(*d).is_some_and(|r| r.is_persisted()))
        {
            return Err(Error::Internal(format!(
                "blob {missing} is not verified in the archive; not renaming {}",
                self.partial.display()
            )));
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io("fsync", &self.partial, e))?;
        // A flush of a region's bytes along the way may have been the one told of a failed
        // write-back, which this fsync then is not (see `write::BlobFile::check_write_back`).
        for region in &st.all {
            region.check_write_back()?;
        }
        persist(&self.partial, &self.dest)?;
        self.committed
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::Internal("archive state lock poisoned".into()))
    }
}

impl Drop for Archive {
    /// A pull that did not commit leaves nothing: the partial file goes (the lock, held
    /// until the file is closed, keeps another pull from having opened it meanwhile).
    fn drop(&mut self) {
        if !self.committed.load(std::sync::atomic::Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::BlobKind;
    use std::io::Read;

    fn desc(bytes: &[u8], kind: BlobKind) -> BlobDescriptor {
        BlobDescriptor {
            digest: Digest::of(bytes),
            size: bytes.len() as u64,
            media_type: "x".into(),
            kind,
        }
    }

    /// The planned archive, its blobs written into their regions, reads back as a tar with
    /// every entry in place, small files first.
    #[test]
    fn a_planned_archive_is_a_tar_with_blobs_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("sub/img.tar");
        let config = b"{\"config\":1}".to_vec();
        let layer: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let empty: Vec<u8> = Vec::new();
        let (c, l, e) = (
            desc(&config, BlobKind::Config),
            desc(&layer, BlobKind::Layer),
            desc(&empty, BlobKind::Layer),
        );
        let layers = [l.clone(), e.clone(), l.clone()];
        let manifest = b"{\"manifest\":true}";
        let contents = Contents {
            oci_layout: b"{\"imageLayoutVersion\":\"1.0.0\"}",
            index_json: b"{\"index\":1}".to_vec(),
            manifest,
            manifest_digest: Digest::of(manifest),
            config: &c,
            layers: &layers,
            repo_tag: Some("127.0.0.1:5000/a/b:v1".into()),
        };
        let plan = Plan::new(Kind::Docker, &contents).unwrap();
        assert_eq!(plan.size() % BLOCK, 0);
        let archive = Archive::open(&dest).unwrap();
        archive.prepare(plan.clone()).unwrap();
        // A second pull of the same destination waits for this one, then gives up.
        assert!(Archive::open(&dest).is_err());
        for (d, bytes) in [(&c, &config), (&l, &layer), (&e, &empty)] {
            let r = archive.region(&d.digest).unwrap();
            let mut w = r.writer().unwrap();
            let mut at = 0;
            while !w.is_complete() {
                at += w.append(&bytes[at..(at + 4000).min(bytes.len())]).unwrap();
            }
            if d.digest != l.digest {
                r.persist().unwrap();
            }
        }
        let err = archive.commit().unwrap_err();
        assert!(err.to_string().contains(&l.digest.to_string()), "{err}");
        assert!(
            !dest.exists(),
            "nothing under the final name before every blob verified"
        );
        let r = archive.region(&l.digest).unwrap();
        let mut w = r.writer().unwrap();
        w.append(&layer).unwrap();
        r.persist().unwrap();
        archive.commit().unwrap();
        drop(archive);
        assert!(!dir.path().join("sub/img.tar.fastpull-partial").exists());

        let bytes = std::fs::read(&dest).unwrap();
        assert_eq!(bytes.len() as u64, plan.size());
        let mut names = Vec::new();
        let mut files = HashMap::new();
        for entry in tar::Archive::new(&bytes[..]).entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut content = Vec::new();
            entry.read_to_end(&mut content).unwrap();
            names.push(name.clone());
            files.insert(name, content);
        }
        let blob = |d: &Digest| format!("blobs/sha256/{}", d.hex());
        assert_eq!(
            names,
            vec![
                "oci-layout".to_string(),
                "index.json".into(),
                "manifest.json".into(),
                "repositories".into(),
                "blobs/".into(),
                "blobs/sha256/".into(),
                blob(&Digest::of(manifest)),
                blob(&c.digest),
                blob(&l.digest),
                blob(&e.digest),
            ]
        );
        assert_eq!(files[&blob(&l.digest)], layer);
        assert_eq!(files[&blob(&c.digest)], config);
        assert!(files[&blob(&e.digest)].is_empty());
        let m: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        assert_eq!(m[0]["Config"], blob(&c.digest));
        assert_eq!(m[0]["RepoTags"][0], "127.0.0.1:5000/a/b:v1");
        assert_eq!(m[0]["Layers"].as_array().unwrap().len(), 3);
        let r: serde_json::Value = serde_json::from_slice(&files["repositories"]).unwrap();
        assert_eq!(r["127.0.0.1:5000/a/b"]["v1"], l.digest.hex());
    }

    #[test]
    fn refuses_directories_and_cleans_up_when_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let err = Archive::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("is a directory"), "{err}");
        let dest = dir.path().join("x.tar");
        std::fs::write(&dest, b"old").unwrap();
        let a = Archive::open(&dest).unwrap();
        assert!(dir.path().join("x.tar.fastpull-partial").exists());
        drop(a);
        assert!(!dir.path().join("x.tar.fastpull-partial").exists());
        assert_eq!(std::fs::read(&dest).unwrap(), b"old", "DEST untouched");
    }
}
