//! Writing a blob: bytes go to a partial file on a blocking thread (hashing as they pass),
//! and only a complete, verified, fsynced file is renamed to its final name.
//!
//! A blob under its final name is therefore always whole and correct, even after a crash:
//! the data is flushed before the rename and the directory after it.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::verify::Hasher;

/// Buffered chunks between the network and the writer thread (bounds memory per blob).
const CHANNEL_DEPTH: usize = 64;
const WRITE_BUFFER: usize = 1 << 20;

enum Msg {
    Data(Bytes),
    Finish,
}

/// A blob being written. Dropping it without [`BlobWriter::finish`] removes the partial file.
pub(crate) struct BlobWriter {
    tx: Option<mpsc::Sender<Msg>>,
    handle: Option<JoinHandle<Result<()>>>,
}

/// Where a blob goes and what it must be.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The partial file written while downloading.
    pub partial: PathBuf,
    /// The final name, given only to verified content.
    pub final_path: PathBuf,
    /// Expected digest.
    pub digest: Digest,
    /// Expected size.
    pub size: u64,
    /// How to name it in errors.
    pub what: String,
}

impl BlobWriter {
    /// Creates the partial file and starts the writer thread.
    pub(crate) fn create(target: Target) -> Result<BlobWriter> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&target.partial)
            .map_err(|e| Error::io("create", &target.partial, e))?;
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let handle = tokio::task::spawn_blocking(move || run(file, rx, target));
        Ok(BlobWriter {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Queues bytes for writing; waits when the writer is behind.
    pub(crate) async fn write(&mut self, bytes: Bytes) -> Result<()> {
        let sent = match &self.tx {
            Some(tx) => tx.send(Msg::Data(bytes)).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The writer thread stopped early: its result says why.
            self.tx = None;
            Err(self.join().await.err().unwrap_or_else(|| {
                Error::io(
                    "write",
                    PathBuf::new(),
                    std::io::Error::other("writer stopped"),
                )
            }))
        }
    }

    /// Ends the blob: size and digest are checked, data flushed, and the file renamed.
    pub(crate) async fn finish(mut self) -> Result<()> {
        if let Some(tx) = self.tx.take() {
            // If the thread already stopped, join() reports why.
            let _ = tx.send(Msg::Finish).await;
        }
        self.join().await
    }

    async fn join(&mut self) -> Result<()> {
        match self.handle.take() {
            Some(h) => h.await.map_err(|e| {
                Error::io(
                    "write",
                    PathBuf::new(),
                    std::io::Error::other(e.to_string()),
                )
            })?,
            None => Ok(()),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // Closing the channel without Finish makes the thread remove the partial file.
        self.tx.take();
    }
}

fn run(file: File, mut rx: mpsc::Receiver<Msg>, t: Target) -> Result<()> {
    let result = write_all(file, &mut rx, &t);
    if result.is_err() {
        let _ = std::fs::remove_file(&t.partial);
    }
    result
}

fn write_all(file: File, rx: &mut mpsc::Receiver<Msg>, t: &Target) -> Result<()> {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
    let mut hasher = Hasher::new();
    let finished = loop {
        match rx.blocking_recv() {
            Some(Msg::Data(b)) => {
                if hasher.len() + b.len() as u64 > t.size {
                    return Err(Error::SizeMismatch {
                        what: t.what.clone(),
                        expected: t.size,
                        actual: hasher.len() + b.len() as u64,
                    });
                }
                hasher.update(&b);
                out.write_all(&b)
                    .map_err(|e| Error::io("write", &t.partial, e))?;
            }
            Some(Msg::Finish) => break true,
            None => break false,
        }
    };
    if !finished {
        return Err(Error::io(
            "write",
            &t.partial,
            std::io::Error::new(std::io::ErrorKind::Interrupted, "download abandoned"),
        ));
    }
    if hasher.len() != t.size {
        return Err(Error::SizeMismatch {
            what: t.what.clone(),
            expected: t.size,
            actual: hasher.len(),
        });
    }
    let actual = hasher.finish();
    if actual != t.digest {
        return Err(Error::DigestMismatch {
            what: t.what.clone(),
            expected: t.digest,
            actual,
        });
    }
    let file = out
        .into_inner()
        .map_err(|e| Error::io("write", &t.partial, e.into_error()))?;
    file.sync_all()
        .map_err(|e| Error::io("fsync", &t.partial, e))?;
    drop(file);
    persist(&t.partial, &t.final_path)
}

/// Renames a complete file into place and makes the rename durable.
pub(crate) fn persist(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| Error::io("rename", to, e))?;
    sync_parent(to)
}

/// fsyncs the directory holding `path`, so a rename or create in it survives a crash.
pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync", dir, e))
}

/// Writes a small file atomically (temp file, fsync, rename, fsync dir).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        persist(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(dir: &Path, content: &[u8]) -> Target {
        Target {
            partial: dir.join("x.partial"),
            final_path: dir.join("x"),
            digest: Digest::of(content),
            size: content.len() as u64,
            what: "blob x".into(),
        }
    }

    #[tokio::test]
    async fn verified_blob_lands_under_final_name() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), b"hello world");
        let mut w = BlobWriter::create(t.clone()).unwrap();
        w.write(Bytes::from_static(b"hello ")).await.unwrap();
        w.write(Bytes::from_static(b"world")).await.unwrap();
        w.finish().await.unwrap();
        assert_eq!(std::fs::read(&t.final_path).unwrap(), b"hello world");
        assert!(!t.partial.exists());
    }

    #[tokio::test]
    async fn corrupt_short_and_long_blobs_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), b"hello world");

        let mut w = BlobWriter::create(t.clone()).unwrap();
        w.write(Bytes::from_static(b"hello w0rld")).await.unwrap();
        let err = w.finish().await.unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&t.digest.to_string()), "{msg}");
        assert!(
            msg.contains(&Digest::of(b"hello w0rld").to_string()),
            "{msg}"
        );

        let mut w = BlobWriter::create(t.clone()).unwrap();
        w.write(Bytes::from_static(b"hello")).await.unwrap();
        assert!(matches!(
            w.finish().await,
            Err(Error::SizeMismatch { actual: 5, .. })
        ));

        let mut w = BlobWriter::create(t.clone()).unwrap();
        let mut err = None;
        for _ in 0..100 {
            if let Err(e) = w.write(Bytes::from_static(b"hello world!")).await {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(Error::SizeMismatch { .. })), "{err:?}");

        assert!(!t.final_path.exists());
        assert!(!t.partial.exists());
    }

    #[tokio::test]
    async fn dropped_writer_removes_partial() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path(), b"abc");
        let mut w = BlobWriter::create(t.clone()).unwrap();
        w.write(Bytes::from_static(b"ab")).await.unwrap();
        drop(w);
        for _ in 0..100 {
            if !t.partial.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!t.partial.exists());
        assert!(!t.final_path.exists());
    }

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("index.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
