//! Writing a blob: a preallocated partial file, mapped into memory, that range chunks write
//! into at their own offsets; the verified file is flushed and only then renamed to its final
//! name.
//!
//! A blob under its final name is therefore always whole and correct, even after a crash:
//! the data is flushed (msync + fsync) before the rename, and the directory after it.
//!
//! Each chunk's bytes can only be written through the one [`ChunkWriter`] handed out for
//! that chunk, so concurrent writers never touch the same bytes. Readers (the hasher) use
//! `pread` on the file, which sees what the map wrote (one page cache) without making any
//! Rust reference into the map.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use memmap2::MmapRaw;

use crate::error::{Error, Result};

/// A blob's partial file, mapped for writing.
pub struct BlobFile {
    file: File,
    /// The mapping; writers hold the read lock while they copy, `persist` takes it away
    /// (unmapping before fsync: writing back pages that are still mapped costs a TLB
    /// shootdown per page, a quarter of the CPU of a pull).
    map: RwLock<Option<MmapRaw>>,
    size: u64,
    chunks: Vec<Slot>,
    partial: PathBuf,
    final_path: PathBuf,
    persisted: AtomicBool,
}

struct Slot {
    range: Range<u64>,
    claimed: AtomicBool,
    written: AtomicU64,
}

/// The right to write one chunk's bytes (and, after [`ChunkWriter::absorb_next`], the chunks
/// after it). There is never more than one for a given byte.
pub struct ChunkWriter {
    blob: Arc<BlobFile>,
    first: usize,
    last: usize,
    /// Chunks up to this one have been prefaulted.
    faulted: usize,
}

impl BlobFile {
    /// Creates `partial`, preallocates `size` bytes (so a full disk is an error now, not a
    /// SIGBUS later), and maps it. `chunks` are the byte ranges writers will claim.
    pub fn create(
        partial: &Path,
        final_path: &Path,
        size: u64,
        chunks: &[Range<u64>],
    ) -> Result<Arc<BlobFile>> {
        debug_assert!(
            chunks.first().map(|r| r.start) == Some(0)
                && chunks.last().map(|r| r.end) == Some(size)
        );
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(partial)
            .map_err(|e| Error::io("create", partial, e))?;
        let map = if size > 0 {
            let mapped = preallocate(&file, size)
                .map_err(|e| Error::io("preallocate", partial, e))
                .and_then(|()| MmapRaw::map_raw(&file).map_err(|e| Error::io("mmap", partial, e)));
            match mapped {
                Ok(m) => Some(m),
                Err(e) => {
                    // A full disk must not keep what fallocate took.
                    let _ = std::fs::remove_file(partial);
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(Arc::new(BlobFile {
            file,
            map: RwLock::new(map),
            size,
            chunks: chunks
                .iter()
                .map(|r| Slot {
                    range: r.clone(),
                    claimed: AtomicBool::new(false),
                    written: AtomicU64::new(0),
                })
                .collect(),
            partial: partial.to_path_buf(),
            final_path: final_path.to_path_buf(),
            persisted: AtomicBool::new(false),
        }))
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many chunks the blob has.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The byte range of chunk `i`.
    pub fn chunk_range(&self, i: usize) -> Range<u64> {
        self.chunks[i].range.clone()
    }

    /// Bytes written into chunk `i` so far (a retry resumes from here).
    pub fn chunk_written(&self, i: usize) -> u64 {
        self.chunks[i].written.load(Ordering::Acquire)
    }

    /// The writer for chunk `i`, once: `None` if it was already handed out.
    pub fn claim(self: &Arc<Self>, i: usize) -> Option<ChunkWriter> {
        if !self.claim_slot(i) {
            return None;
        }
        self.prefault(&self.chunks[i].range);
        Some(ChunkWriter {
            blob: self.clone(),
            first: i,
            last: i,
            faulted: i,
        })
    }

    fn claim_slot(&self, i: usize) -> bool {
        self.chunks
            .get(i)
            .is_some_and(|slot| !slot.claimed.swap(true, Ordering::AcqRel))
    }

    /// Faults a range's pages in, writable, in one call (MADV_POPULATE_WRITE), instead of one
    /// page fault per 4 KiB as the bytes arrive. Best effort: older kernels say no.
    fn prefault(&self, range: &Range<u64>) {
        if let Ok(guard) = self.map.read() {
            if let Some(map) = guard.as_ref() {
                let len = (range.end - range.start) as usize;
                if len > 0 {
                    let _ =
                        map.advise_range(memmap2::Advice::PopulateWrite, range.start as usize, len);
                }
            }
        }
    }

    /// How many bytes from the start are written without a gap: what can be hashed.
    pub fn contiguous_prefix(&self) -> u64 {
        let mut prefix = 0;
        for slot in &self.chunks {
            let w = slot.written.load(Ordering::Acquire);
            prefix = slot.range.start + w;
            if w < slot.range.end - slot.range.start {
                break;
            }
        }
        prefix
    }

    /// Reads written bytes back (for hashing) without touching the map from Rust.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Flushes the data (msync, fsync), renames the file to its final name and makes the
    /// rename durable. Call only for verified content.
    pub fn persist(&self) -> Result<()> {
        // Unmap first: the dirty pages stay in the page cache, and fsync writes them without
        // write-protecting live mappings page by page.
        let map = self
            .map
            .write()
            .map_err(|_| Error::Internal("blob map lock poisoned".into()))?
            .take();
        drop(map);
        self.file
            .sync_all()
            .map_err(|e| Error::io("fsync", &self.partial, e))?;
        persist(&self.partial, &self.final_path)?;
        self.persisted.store(true, Ordering::Release);
        Ok(())
    }

    /// Where the verified blob will live.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }
}

impl BlobFile {
    /// Removes the partial file now (a failed pull), unless it was persisted. Readers that
    /// still hold the file keep reading the unlinked inode.
    pub fn discard(&self) {
        if !self.persisted.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

impl Drop for BlobFile {
    fn drop(&mut self) {
        self.discard();
    }
}

impl ChunkWriter {
    /// The byte range this writer owns.
    pub fn range(&self) -> Range<u64> {
        self.blob.chunks[self.first].range.start..self.blob.chunks[self.last].range.end
    }

    /// Bytes written so far, counted from the start of [`ChunkWriter::range`].
    pub fn written(&self) -> u64 {
        let base = self.range().start;
        let mut n = 0;
        for slot in &self.blob.chunks[self.first..=self.last] {
            let w = slot.written.load(Ordering::Acquire);
            n = slot.range.start - base + w;
            if w < slot.range.end - slot.range.start {
                break;
            }
        }
        n
    }

    /// Whether every byte of the range is written.
    pub fn is_complete(&self) -> bool {
        let r = self.range();
        self.written() == r.end - r.start
    }

    /// Takes over the chunk right after this writer's range (to stream the rest of a blob
    /// from a server that ignored `Range`). Fails if that chunk is already claimed.
    pub fn absorb_next(&mut self) -> bool {
        let next = self.last + 1;
        if !self.blob.claim_slot(next) {
            return false;
        }
        // The claim is ours now; this writer covers it. Its pages are faulted in when the
        // writer gets near it (see `append`), not all at once here.
        self.last = next;
        true
    }

    /// Appends `bytes` at the current write position.
    pub fn append(&mut self, bytes: &[u8]) -> Result<()> {
        let r = self.range();
        let offset = r.start + self.written();
        let end = offset + bytes.len() as u64;
        if end > r.end {
            return Err(Error::SizeMismatch {
                what: format!(
                    "range {}-{} of {}",
                    r.start,
                    r.end.saturating_sub(1),
                    self.blob.partial.display()
                ),
                expected: r.end - r.start,
                actual: end - r.start,
            });
        }
        if bytes.is_empty() {
            return Ok(());
        }
        // A writer that absorbed many chunks faults each in as it reaches the one before:
        // the page zeroing is spread over the stream instead of stalling its start.
        while self.faulted < self.last
            && end + MIN_PREFAULT_LEAD > self.blob.chunks[self.faulted].range.end
        {
            self.faulted += 1;
            self.blob.prefault(&self.blob.chunks[self.faulted].range);
        }
        let guard = self
            .blob
            .map
            .read()
            .map_err(|_| Error::Internal("blob map lock poisoned".into()))?;
        let Some(map) = guard.as_ref() else {
            return Err(Error::Internal(format!(
                "write to {} after it was persisted, or to an empty blob",
                self.blob.partial.display()
            )));
        };
        // SAFETY: `map` is a live shared mapping of `self.blob.file` (the read guard keeps
        // `persist` from unmapping it during the copy), created with the file's
        // full preallocated length (`size`) and kept alive by the `Arc<BlobFile>` we hold; the
        // file is only ever truncated by `File::create` before the mapping exists, and it
        // stays under a private partial name that no other fastpull writer uses (the layout
        // is locked), so the pages are there (no SIGBUS). `offset..end` lies within this
        // writer's range (checked above), ranges of distinct writers are disjoint, and a
        // range's writer is unique (`claim` hands it out once; `absorb_next` claims before
        // extending), so no other thread writes these bytes concurrently. Nothing creates a
        // Rust reference into the map; readers use pread.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                map.as_mut_ptr().add(offset as usize),
                bytes.len(),
            );
        }
        // Publish the new length per chunk, in order (Release pairs with the hasher's Acquire).
        let mut pos = offset;
        for slot in &self.blob.chunks[self.first..=self.last] {
            if pos >= end {
                break;
            }
            if end <= slot.range.start || pos >= slot.range.end {
                continue;
            }
            let upto = end.min(slot.range.end);
            slot.written
                .store(upto - slot.range.start, Ordering::Release);
            pos = upto;
        }
        Ok(())
    }
}

/// How close (bytes) a streaming writer gets to the end of its faulted pages before it
/// faults in the next chunk.
const MIN_PREFAULT_LEAD: u64 = 1 << 20;

fn preallocate(file: &File, size: u64) -> std::io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        // Filesystems without fallocate: a sparse file of the right length (a full disk then
        // shows up as SIGBUS on write, as with any mmap writer).
        Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => file.set_len(size),
        Err(e) => Err(e.into()),
    }
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
    use crate::plan::Chunking;

    fn blob(dir: &Path, size: u64, chunk: u64) -> Arc<BlobFile> {
        let ranges = Chunking::fixed(chunk).ranges(size);
        BlobFile::create(&dir.join("b.partial"), &dir.join("b"), size, &ranges).unwrap()
    }

    #[test]
    fn out_of_order_chunks_land_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let b = blob(dir.path(), 1000, 300);
        assert_eq!(b.chunk_count(), 4);
        let mut writers: Vec<ChunkWriter> = (0..4).map(|i| b.claim(i).unwrap()).collect();
        assert!(b.claim(2).is_none(), "a chunk is handed out once");
        for i in [3usize, 1, 2] {
            let r = writers[i].range();
            writers[i]
                .append(&data[r.start as usize..r.start as usize + 50])
                .unwrap();
            writers[i]
                .append(&data[r.start as usize + 50..r.end as usize])
                .unwrap();
            assert!(writers[i].is_complete());
        }
        assert_eq!(b.contiguous_prefix(), 0);
        writers[0].append(&data[..100]).unwrap();
        assert_eq!(b.contiguous_prefix(), 100);
        writers[0].append(&data[100..300]).unwrap();
        assert_eq!(b.contiguous_prefix(), 1000);
        let err = writers[0].append(b"x").unwrap_err();
        assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
        let mut back = vec![0u8; 1000];
        b.read_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
        b.persist().unwrap();
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), data);
        assert!(!dir.path().join("b.partial").exists());
    }

    #[test]
    fn absorbing_writer_streams_the_whole_blob() {
        let dir = tempfile::tempdir().unwrap();
        let b = blob(dir.path(), 25, 10);
        let mut w = b.claim(0).unwrap();
        while w.absorb_next() {}
        assert_eq!(w.range(), 0..25);
        w.append(&[7u8; 12]).unwrap();
        assert_eq!(b.chunk_written(0), 10);
        assert_eq!(b.chunk_written(1), 2);
        w.append(&[7u8; 13]).unwrap();
        assert!(w.is_complete());
        assert_eq!(b.contiguous_prefix(), 25);
        assert!(b.claim(1).is_none());
    }

    #[test]
    fn unpersisted_partial_is_removed_and_empty_blobs_work() {
        let dir = tempfile::tempdir().unwrap();
        let b = blob(dir.path(), 100, 10);
        assert!(dir.path().join("b.partial").exists());
        assert_eq!(
            std::fs::metadata(dir.path().join("b.partial"))
                .unwrap()
                .len(),
            100
        );
        drop(b);
        assert!(!dir.path().join("b.partial").exists());

        let e = blob(dir.path(), 0, 10);
        assert_eq!(e.chunk_count(), 1);
        assert_eq!(e.contiguous_prefix(), 0);
        e.persist().unwrap();
        assert_eq!(std::fs::metadata(dir.path().join("b")).unwrap().len(), 0);
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
