//! Writing a blob: a preallocated partial file, mapped into memory, that range writers fill
//! at their own offsets; the verified file is flushed and only then renamed to its final
//! name.
//!
//! A blob under its final name is therefore always whole and correct, even after a crash:
//! the data is flushed (msync + fsync) before the rename, and the directory after it.
//!
//! The file knows nothing of how a pull cuts it: it holds *spans* that tile `0..size`, each
//! written from its start by the one [`SpanWriter`] that owns it. The fetch scheduler decides
//! where to cut; [`BlobFile::split`] carries a cut out safely while the span's writer is
//! still copying: a span's end is only ever lowered to a point its writer has not reserved
//! past, so two writers never touch the same byte and every byte is written once. The hasher
//! reads only the contiguous written prefix, in place through the map. Durability follows the
//! writers rather than waiting for the end: each whole 4 MiB step is written back to disk as
//! soon as its bytes are all there, hashed or not ([`BlobFile::write_back`]), and what was
//! written back is flushed to stable storage in the background every 128 MiB
//! ([`BlobFile::flush_behind`]), so the fsync before the rename finds little left to do.
//!
//! A blob may also be a *region* of a bigger file ([`BlobFile::region`]): an archive
//! (`--format docker-archive`, `oci-archive`) is laid out up front, preallocated once, and
//! each blob's bytes land directly at their offset inside it, through a map of just that
//! region. The same spans, hasher and write-back apply; only [`BlobFile::persist`] differs:
//! a verified region is unmapped and left where it is, for the archive to flush and rename
//! once every blob in it is verified (see `crate::archive`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use memmap2::MmapRaw;

use crate::error::{Error, Result};
use crate::resume::RangeSet;

/// A blob's partial file, mapped for writing.
pub struct BlobFile {
    /// The file the bytes live in: the blob's own partial file, or a whole archive.
    file: Arc<File>,
    /// Where the blob's byte 0 is in `file` (0 unless it is a region of an archive).
    base: u64,
    /// A region of a bigger file: never renamed, removed or flushed on its own.
    region: bool,
    /// Scratch: a blob that lives only as long as the pull (`--format rootfs`'s, removed
    /// with its staging directory), so nothing of it is written back, flushed or fsynced.
    /// The page cache is all it needs; on a slow disk the write-back of a 1 GiB layer
    /// competed with the root filesystem's own files for the disk (perf/README "Scratch
    /// blobs stay in the page cache").
    scratch: bool,
    /// The mapping; writers hold the read lock while they copy, `persist` takes it away
    /// (unmapping before fsync: writing back pages that are still mapped costs a TLB
    /// shootdown per page, a quarter of the CPU of a pull).
    map: RwLock<Option<MmapRaw>>,
    size: u64,
    spans: Mutex<Spans>,
    partial: PathBuf,
    final_path: PathBuf,
    persisted: AtomicBool,
    /// A [`BlobFile::flush_behind`] is running.
    flushing: Arc<AtomicBool>,
    /// The first flush of the file's data that failed (see [`WriteBackFailure`]).
    failed: Arc<WriteBackFailure>,
}

/// The first failed write-back of a file's data, as a flush that waited for it saw it. Linux
/// reports a write-back error (EIO, a thin volume or NFS out of space) once for each open
/// file: to whichever `fdatasync`, `fsync` or `sync_file_range(…WAIT_AFTER)` comes first.
/// When that was one of the flushes along the way (a durable checkpoint's, a flush behind the
/// hash), the final fsync before the rename returns success while the disk may hold zeros or
/// stale bytes where the verified ones should be. So the failure is kept here, and
/// [`BlobFile::persist`] refuses to give the blob its final name.
#[derive(Default)]
struct WriteBackFailure(Mutex<Option<String>>);

impl WriteBackFailure {
    fn note(&self, what: &str, e: &std::io::Error) {
        if let Ok(mut first) = self.0.lock() {
            first.get_or_insert_with(|| format!("{what}: {e}"));
        }
    }

    fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|f| f.clone())
    }
}

/// The spans handed out so far, by start: they tile `0..free_from`, and whole spans at the
/// front are folded into `prefix`. Bytes from `free_from` on belong to nobody yet, except
/// `present`: ranges a resumed file already holds, which become whole spans as `free_from`
/// reaches them (it never stops at the start of one).
struct Spans {
    prefix: u64,
    list: Vec<Arc<Span>>,
    free_from: u64,
    present: std::collections::VecDeque<Range<u64>>,
    /// A 0-byte blob's one (empty) span has been handed out.
    empty_taken: bool,
}

/// Bytes `start..end` of the blob, written in order from `start`.
struct Span {
    start: u64,
    /// Bytes written from `start` (published with Release after the copy).
    written: AtomicU64,
    /// The current end (a split lowers it); mirrors `bounds.end` for lock-free readers.
    end: AtomicU64,
    bounds: Mutex<Bounds>,
}

struct Bounds {
    end: u64,
    /// The writer may be copying up to here: a split never cuts below it.
    reserved: u64,
}

impl Span {
    fn new(start: u64, end: u64) -> Arc<Span> {
        Arc::new(Span {
            start,
            written: AtomicU64::new(0),
            end: AtomicU64::new(end),
            bounds: Mutex::new(Bounds {
                end,
                reserved: start,
            }),
        })
    }

    /// A span whose bytes are all there already (resumed).
    fn whole(start: u64, end: u64) -> Arc<Span> {
        let s = Span::new(start, end);
        s.written.store(end - start, Ordering::Release);
        if let Ok(mut b) = s.bounds.lock() {
            b.reserved = end;
        }
        s
    }

    fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    fn position(&self) -> u64 {
        self.start + self.written.load(Ordering::Acquire)
    }
}

/// A look at a span another task is writing: where it is and where it ends now. The
/// scheduler keeps these to choose what to split.
#[derive(Clone)]
pub struct SpanRef(Arc<Span>);

impl SpanRef {
    /// Its first byte.
    pub fn start(&self) -> u64 {
        self.0.start
    }

    /// The next byte its writer will write.
    pub fn position(&self) -> u64 {
        self.0.position()
    }

    /// Its current end (exclusive).
    pub fn end(&self) -> u64 {
        self.0.end()
    }
}

/// The right to write one span's bytes, in order. There is never more than one for a
/// given byte.
pub struct SpanWriter {
    blob: Arc<BlobFile>,
    span: Arc<Span>,
    /// Bytes up to here have their page-cache pages in place ([`SpanWriter::prepare`]).
    prepared: u64,
}

impl BlobFile {
    /// Creates `partial`, preallocates `size` bytes (so a full disk is an error now, not a
    /// SIGBUS later), and maps it. The blob starts as one span, `0..size`.
    pub fn create(partial: &Path, final_path: &Path, size: u64) -> Result<Arc<BlobFile>> {
        Self::open(partial, final_path, size, &RangeSet::new(), false)
    }

    /// As [`BlobFile::create`], for a scratch blob: one the pull deletes when it ends, which
    /// is never written back, flushed or fsynced ([`BlobFile::write_back`],
    /// [`BlobFile::flush_behind`] and [`BlobFile::flush_data`] do nothing, and
    /// [`BlobFile::persist`] only renames it).
    pub fn create_scratch(partial: &Path, final_path: &Path, size: u64) -> Result<Arc<BlobFile>> {
        Self::open(partial, final_path, size, &RangeSet::new(), true)
    }

    /// Reopens a partial file that already holds `present` (what its resume journal
    /// believes) and maps it; only the other bytes are handed out to writers. A file of the
    /// wrong length, or nothing present, starts over as [`BlobFile::create`] does.
    pub fn resume(
        partial: &Path,
        final_path: &Path,
        size: u64,
        present: &RangeSet,
    ) -> Result<Arc<BlobFile>> {
        let fits = std::fs::metadata(partial).is_ok_and(|m| m.is_file() && m.len() == size);
        if !fits || present.is_empty() || size == 0 {
            return Self::create(partial, final_path, size);
        }
        Self::open(partial, final_path, size, present, false)
    }

    fn open(
        partial: &Path,
        final_path: &Path,
        size: u64,
        present: &RangeSet,
        scratch: bool,
    ) -> Result<Arc<BlobFile>> {
        let resuming = !present.is_empty();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!resuming)
            .open(partial)
            .map_err(|e| Error::io("create", partial, e))?;
        let map = if size > 0 {
            // A resumed file is allocated too: an earlier pull may have left it sparse (a
            // filesystem without fallocate, a copy), and a full disk is better found here
            // than partway through the copy. Only the holes take space.
            let missing = size.saturating_sub(present.len());
            let allocated =
                preallocate(&file, size).map_err(|e| no_space(e, partial, missing.max(1)));
            let mapped = allocated
                .and_then(|()| MmapRaw::map_raw(&file).map_err(|e| Error::io("mmap", partial, e)));
            match mapped {
                Ok(m) => Some(m),
                Err(e) => {
                    // A full disk must not keep what fallocate took; a resumed file keeps
                    // its bytes (and its journal) for a pull with more room.
                    if !resuming {
                        let _ = std::fs::remove_file(partial);
                    }
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(Arc::new(BlobFile {
            file: Arc::new(file),
            base: 0,
            region: false,
            scratch,
            map: RwLock::new(map),
            size,
            spans: Mutex::new({
                let mut spans = Spans {
                    prefix: 0,
                    list: Vec::new(),
                    free_from: 0,
                    present: present.iter().cloned().collect(),
                    empty_taken: false,
                };
                spans.reach_present();
                spans
            }),
            partial: partial.to_path_buf(),
            final_path: final_path.to_path_buf(),
            persisted: AtomicBool::new(false),
            flushing: Arc::new(AtomicBool::new(false)),
            failed: Arc::default(),
        }))
    }

    /// The blob as bytes `base..base + size` of `file`, a bigger file the caller has already
    /// given its full length (preallocated: no SIGBUS) and never shortens while this region
    /// is mapped. Only the region is mapped; a page it shares with a neighbour (offsets
    /// need not be page-aligned) is written by each through its own map, at bytes the
    /// other does not touch. `path` names the file in errors and logs.
    pub fn region(file: Arc<File>, path: &Path, base: u64, size: u64) -> Result<Arc<BlobFile>> {
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .len();
        if base.checked_add(size).is_none_or(|end| end > len) {
            return Err(Error::Internal(format!(
                "region {base}+{size} lies past the end of {} ({len} bytes)",
                path.display()
            )));
        }
        let map = if size > 0 {
            let len = usize::try_from(size).map_err(|_| {
                Error::Internal(format!("region of {size} bytes is too big to map"))
            })?;
            // memmap2 maps from the page holding `base` and hands out a pointer to `base`.
            let m = memmap2::MmapOptions::new()
                .offset(base)
                .len(len)
                .map_raw(&*file)
                .map_err(|e| Error::io("mmap", path, e))?;
            Some(m)
        } else {
            None
        };
        Ok(Arc::new(BlobFile {
            file,
            base,
            region: true,
            scratch: false,
            map: RwLock::new(map),
            size,
            spans: Mutex::new(Spans {
                prefix: 0,
                list: Vec::new(),
                free_from: 0,
                present: std::collections::VecDeque::new(),
                empty_taken: false,
            }),
            partial: path.to_path_buf(),
            final_path: path.to_path_buf(),
            persisted: AtomicBool::new(false),
            flushing: Arc::new(AtomicBool::new(false)),
            failed: Arc::default(),
        }))
    }

    /// Whether this blob is a region of a bigger file ([`BlobFile::region`]).
    pub fn is_region(&self) -> bool {
        self.region
    }

    /// Whether [`BlobFile::persist`] has completed: the blob is verified and in place.
    pub fn is_persisted(&self) -> bool {
        self.persisted.load(Ordering::Acquire)
    }

    /// Drops the map, waiting for writers and readers that are using it; afterwards reads
    /// go through the file and writes fail. For a region that a new writer is about to
    /// take over, or before the file under it changes length.
    pub fn unmap(&self) {
        let _ = self.drop_map();
    }

    /// Unmaps the file once every user of the map has let go (the write lock waits for
    /// them); the dirty pages stay in the page cache.
    fn drop_map(&self) -> Result<()> {
        let map = self
            .map
            .write()
            .map_err(|_| Error::Internal("blob map lock poisoned".into()))?
            .take();
        drop(map);
        Ok(())
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the blob's byte 0 is in its file (0 unless it is a region of an archive).
    pub fn offset(&self) -> u64 {
        self.base
    }

    /// The writer of everything not handed out yet: the whole blob, the first time (the
    /// fetch hands out spans through the scheduler; tests and benches take the whole).
    #[cfg(any(test, feature = "bench-internals"))]
    pub fn writer(self: &Arc<Self>) -> Option<SpanWriter> {
        self.take(u64::MAX)
    }

    /// The writer of the next `len` bytes nobody has yet (fewer at the end of the blob);
    /// `None` when every byte is handed out. A 0-byte blob hands out one empty span.
    pub fn take(self: &Arc<Self>, len: u64) -> Option<SpanWriter> {
        let mut spans = self.spans.lock().ok()?;
        let start = spans.free_from;
        if start >= self.size {
            if self.size > 0 || spans.empty_taken {
                return None;
            }
            spans.empty_taken = true;
        }
        let limit = spans.present.front().map_or(self.size, |p| p.start);
        let end = start.saturating_add(len.max(1)).min(limit);
        let span = Span::new(start, end);
        spans.list.push(span.clone());
        spans.free_from = end;
        spans.reach_present();
        Some(SpanWriter {
            blob: self.clone(),
            prepared: start,
            span,
        })
    }

    /// Bytes nobody has been handed yet (and the file does not hold already).
    pub fn unassigned(&self) -> u64 {
        self.spans.lock().map_or(0, |s| {
            let present: u64 = s.present.iter().map(|p| p.end - p.start).sum();
            self.size
                .saturating_sub(s.free_from)
                .saturating_sub(present)
        })
    }

    /// Every byte written so far (or already there when resumed): what a resume journal
    /// may claim.
    pub fn written(&self) -> RangeSet {
        let Ok(spans) = self.spans.lock() else {
            return RangeSet::new();
        };
        let mut out = RangeSet::new();
        out.insert(0..spans.prefix);
        for s in &spans.list {
            out.insert(s.start..s.position().min(s.end()));
        }
        for p in &spans.present {
            out.insert(p.clone());
        }
        out
    }

    /// Flushes the file's written data and the metadata needed to read it back
    /// (fdatasync), while writers may still be copying: what was written before the call is
    /// on disk when it returns. With `unmap`, the map goes first (no writer may come after:
    /// a stopped pull), so the flush does not write-protect mapped pages one by one.
    pub fn flush_data(&self, unmap: bool) -> Result<()> {
        if unmap {
            self.drop_map()?;
        }
        if self.scratch {
            return Ok(());
        }
        self.synced("fdatasync", self.file.sync_data())
    }

    /// The outcome `r` of a flush (`what`) of the file's data, kept if it failed (see
    /// [`WriteBackFailure`]).
    fn synced(&self, what: &'static str, r: std::io::Result<()>) -> Result<()> {
        if let Err(e) = &r {
            self.failed.note(what, e);
        }
        r.map_err(|e| Error::io(what, &self.partial, e))
    }

    /// An error if a flush of the file's data failed since it was opened, even one whose
    /// error was reported (or ignored) then: the bytes on disk cannot be trusted, whatever a
    /// later fsync says ([`WriteBackFailure`]). [`BlobFile::persist`] asks; so does the owner
    /// of a bigger file before its own rename, for each region of it.
    pub fn check_write_back(&self) -> Result<()> {
        match self.failed.get() {
            None => Ok(()),
            Some(first) => Err(Error::io(
                "write back",
                &self.partial,
                std::io::Error::other(format!(
                    "an earlier flush of this file failed ({first}); what is on disk cannot \
                     be trusted"
                )),
            )),
        }
    }

    /// The partial file's path.
    pub fn partial_path(&self) -> &Path {
        &self.partial
    }

    /// Cuts `span` at `at`: its writer stops there, and the returned writer owns
    /// `at..end`. `None` when the cut is not possible any more: `at` is not inside the
    /// span, or its writer has already reserved bytes past `at`. A cut right where the
    /// writer is leaves it complete (a stalled transfer giving all it has left away).
    pub fn split(self: &Arc<Self>, span: &SpanRef, at: u64) -> Option<SpanWriter> {
        let mut spans = self.spans.lock().ok()?;
        let new = {
            let mut b = span.0.bounds.lock().ok()?;
            if at < b.reserved || at >= b.end {
                return None;
            }
            let new = Span::new(at, b.end);
            b.end = at;
            span.0.end.store(at, Ordering::Release);
            new
        };
        let i = spans
            .list
            .iter()
            .position(|s| s.start > span.0.start)
            .unwrap_or(spans.list.len());
        spans.list.insert(i, new.clone());
        Some(SpanWriter {
            blob: self.clone(),
            prepared: at,
            span: new,
        })
    }

    /// Writes zeros over bytes `range` (at most [`ZERO_PIECE`]) through the file (`pwrite`),
    /// which puts their page-cache pages in place, so the copy through the map finds them
    /// there: see [`SpanWriter::prepare`] for why. The caller owns the bytes and nobody
    /// reads them.
    fn zero_fill(&self, range: Range<u64>) -> Result<()> {
        static ZEROS: [u8; ZERO_PIECE as usize] = [0; ZERO_PIECE as usize];
        let n = range.end.saturating_sub(range.start).min(ZERO_PIECE);
        debug_assert_eq!(n, range.end - range.start, "a piece is at most ZERO_PIECE");
        self.file
            .write_all_at(&ZEROS[..n as usize], self.base + range.start)
            // On a full disk, what this blob still needs from here is at least its rest.
            .map_err(|e| or_no_space("write", &self.partial, self.size - range.start, e))
    }

    /// How many bytes from the start are written without a gap: what can be hashed.
    pub fn contiguous_prefix(&self) -> u64 {
        let Ok(mut spans) = self.spans.lock() else {
            return 0;
        };
        let mut whole = 0;
        let mut prefix = spans.prefix;
        if spans.list.first().is_some_and(|s| s.start > prefix) {
            return prefix;
        }
        for s in &spans.list {
            let end = s.end();
            prefix = s.position();
            if prefix < end {
                break;
            }
            whole += 1;
        }
        // Whole spans at the front are done with: fold them in (keep the last, so the list
        // is never empty while the blob is being written).
        let fold = whole.min(spans.list.len().saturating_sub(1));
        if fold > 0 {
            spans.prefix = spans.list[fold - 1].end();
            spans.list.drain(..fold);
        }
        prefix
    }

    /// Reads written bytes back through the file.
    #[cfg(test)]
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, self.base + offset)
    }

    /// Calls `f` with bytes `range` of the blob, read in place through the map (no copy).
    /// `range` must lie within [`BlobFile::contiguous_prefix`]: those bytes are written and
    /// no writer touches them again. Falls back to `pread` into `buf` when there is no map
    /// any more (or never was: a 0-byte blob).
    pub fn with_written<R>(
        &self,
        range: Range<u64>,
        buf: &mut Vec<u8>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> std::io::Result<R> {
        let len = range.end.saturating_sub(range.start) as usize;
        if len == 0 {
            return Ok(f(&[]));
        }
        let guard = self
            .map
            .read()
            .map_err(|_| std::io::Error::other("blob map lock poisoned"))?;
        match guard.as_ref() {
            Some(map) if range.end <= self.size && range.end <= self.contiguous_prefix() => {
                // SAFETY: the read guard keeps the mapping alive (persist takes the write
                // lock to unmap), and the file keeps its full preallocated length (see
                // `append`), so `range` (within `size`) is mapped and backed. The bytes lie
                // within the contiguous written prefix (checked just above against the
                // spans' published positions, Acquire): every one was copied by its span's
                // only writer before it published its position, and no writer ever writes
                // below its published position again, so nothing mutates them while this
                // shared slice lives. (A region taken over by a new writer is unmapped first:
                // see `unmap`; readers of the old one then read through the file.)
                let bytes = unsafe {
                    std::slice::from_raw_parts(map.as_ptr().add(range.start as usize), len)
                };
                Ok(f(bytes))
            }
            _ => {
                drop(guard);
                buf.resize(len, 0);
                self.file
                    .read_exact_at(&mut buf[..len], self.base + range.start)?;
                Ok(f(&buf[..len]))
            }
        }
    }

    /// Starts writing bytes `range` (written, never written again; hashed or not yet) back
    /// to disk now, in the background, so the fsync before the rename finds little left to
    /// do. The range's pages are first unmapped (their dirty state moves to the page cache),
    /// so the writeback does not write-protect live mappings page by page; a reader that
    /// comes later (the hasher) faults the same bytes back in from the page cache. Best
    /// effort: the fsync in [`BlobFile::persist`] is what makes the data durable and
    /// reports errors.
    pub fn write_back(&self, range: Range<u64>) {
        if self.scratch {
            return;
        }
        let base = self.base;
        let Some(Range { start, end }) = self.in_file(&range) else {
            return;
        };
        if let Ok(guard) = self.map.read() {
            if let Some(map) = guard.as_ref() {
                // SAFETY: a MAP_SHARED file mapping (MmapRaw::map_raw): MADV_DONTNEED drops
                // only the page table entries, the data stays in the page cache (dirty pages
                // stay dirty) and a later access faults the same bytes back in. Nothing
                // writes this range through the map any more (every byte of it is written,
                // and a span is written once). Readers (the hasher, a rootfs unpacker's
                // prefix reader) may hold a shared slice of it on another thread: no byte
                // under that slice changes (a fault brings back the same bytes). The range
                // is 2 MiB-aligned in the file and within the blob (`in_file`), so it holds
                // only this blob's pages, whole.
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        (start - base) as usize,
                        (end - start) as usize,
                    )
                };
            }
        }
        start_writeback(&self.file, start, end - start);
    }

    /// Blob bytes `range` as the part of the file that write-back covers: aligned in the
    /// file (a region's base is anywhere) and kept within `range` (whose neighbours may
    /// still be written: steps are written back out of order); None if that is empty.
    fn in_file(&self, range: &Range<u64>) -> Option<Range<u64>> {
        let base = self.base;
        let start = (base + range.start).div_ceil(WRITEBACK_ALIGN) * WRITEBACK_ALIGN;
        let end = ((base + range.end) / WRITEBACK_ALIGN * WRITEBACK_ALIGN).min(base + self.size);
        (end > start).then_some(start..end)
    }

    /// Makes bytes already handed to [`BlobFile::write_back`] reach stable storage now, on
    /// a thread of its own, while the pull goes on: waits for their write-back, then has
    /// the device flush its write cache. Returns false (and does nothing) while an earlier
    /// call is still running; the caller keeps the ranges for the next one.
    ///
    /// Why: a disk with a volatile cache (a VM's virtual disk is the host's page cache)
    /// takes the writes at once and persists them only on a flush, at its own pace. Left to
    /// the fsync before the rename, that is seconds of waiting after the last byte of a
    /// large blob came (about 1.2 s per GiB on the perf machine); flushed as the pull goes,
    /// it overlaps the network. The flush is the one the filesystem issues for an fsync of
    /// the blob's directory, which has nothing of its own to write (ext4 then flushes the
    /// device's cache, for every file on it; XFS does so only when the directory has a
    /// change of its own to commit, and otherwise flushes nothing, leaving it all to the
    /// final fsync as before), and none of the mapped pages that writers are still filling is written
    /// or write-protected. Best effort and only for speed: the
    /// fsync in [`BlobFile::persist`] is what makes the blob durable, and reports errors.
    pub fn flush_behind(self: &Arc<Self>, ranges: &[Range<u64>]) -> bool {
        if self.scratch {
            return true;
        }
        if self.flushing.swap(true, Ordering::AcqRel) {
            return false;
        }
        let file = self.file.clone();
        let flushing = self.flushing.clone();
        let failed = self.failed.clone();
        let dir = parent_dir(&self.partial).to_path_buf();
        let ranges: Vec<Range<u64>> = ranges.iter().filter_map(|r| self.in_file(r)).collect();
        let spawned = std::thread::Builder::new()
            .name("fastpull-flush".into())
            .spawn(move || {
                for r in ranges {
                    if let Err(e) = wait_for_writeback(&file, r.start, r.end - r.start) {
                        failed.note("sync_file_range", &e);
                    }
                }
                let _ = File::open(&dir).and_then(|d| d.sync_all());
                flushing.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            // Nothing started: the caller keeps the ranges, and the next call tries again.
            self.flushing.store(false, Ordering::Release);
            return false;
        }
        true
    }

    /// Flushes the data (msync, fsync), renames the file to its final name and makes the
    /// rename durable. Call only for verified content.
    /// A region ([`BlobFile::region`]) is only unmapped and marked verified: its file is
    /// flushed and renamed whole, by its owner, once every region in it is. A scratch blob
    /// ([`BlobFile::create_scratch`]) is unmapped and renamed, nothing more.
    pub fn persist(&self) -> Result<()> {
        // Unmap first: the dirty pages stay in the page cache, and fsync writes them without
        // write-protecting live mappings page by page.
        self.drop_map()?;
        if self.region {
            self.persisted.store(true, Ordering::Release);
            return Ok(());
        }
        if self.scratch {
            std::fs::rename(&self.partial, &self.final_path)
                .map_err(|e| Error::io("rename", &self.final_path, e))?;
            self.persisted.store(true, Ordering::Release);
            return Ok(());
        }
        crate::stop_hook::reached("fsync", &self.final_path);
        self.synced("fsync", self.file.sync_all())?;
        self.check_write_back()?;
        crate::stop_hook::reached("rename", &self.final_path);
        persist(&self.partial, &self.final_path)?;
        self.persisted.store(true, Ordering::Release);
        Ok(())
    }

    /// Where the verified blob will live.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Removes the partial file now (a failed pull that keeps nothing for resume), unless
    /// it was persisted. Readers that still hold the file keep reading the unlinked inode.
    /// Dropping a `BlobFile` removes nothing: whether a partial file is kept is decided by
    /// the pull (see [`crate::fetch`]), never by whichever thread lets go of it last.
    /// A region is never removed (its file is its owner's).
    pub fn discard(&self) {
        if !self.region && !self.persisted.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

impl Spans {
    /// Turns the resumed ranges that start where the handed-out bytes end into whole
    /// spans, so `free_from` never rests at the start of bytes the file already holds.
    fn reach_present(&mut self) {
        while let Some(p) = self.present.front() {
            if p.start > self.free_from {
                break;
            }
            let p = p.clone();
            self.present.pop_front();
            if p.end > self.free_from {
                let start = p.start.max(self.free_from);
                self.list.push(Span::whole(start, p.end));
                self.free_from = p.end;
            }
        }
    }
}

/// The error for a failed preallocation: a full disk says how much was needed.
fn no_space(e: std::io::Error, partial: &Path, size: u64) -> Error {
    or_no_space("preallocate", partial, size, e)
}

/// `Error::NoSpace` for a full disk (or quota) met while writing `size` bytes to `path`,
/// naming the destination the user gave (not its scratch or blob directory) and what is
/// free there; any other error as `Error::Io` with `op`.
pub(crate) fn or_no_space(op: &'static str, path: &Path, size: u64, e: std::io::Error) -> Error {
    let full = [rustix::io::Errno::NOSPC, rustix::io::Errno::DQUOT]
        .iter()
        .any(|n| e.raw_os_error() == Some(n.raw_os_error()));
    if !full {
        return Error::io(op, path, e);
    }
    let dir = parent_dir(path);
    let dest = if dir.ends_with(".fastpull-tmp") {
        dir.parent()
    } else if dir.ends_with("blobs/sha256") {
        dir.parent().and_then(Path::parent)
    } else {
        None
    }
    .filter(|p| !p.as_os_str().is_empty())
    .unwrap_or(dir);
    let available = rustix::fs::statvfs(dir)
        .ok()
        .map(|v| v.f_bavail.saturating_mul(v.f_frsize));
    Error::NoSpace {
        path: dest.to_path_buf(),
        needed: size,
        available,
    }
}

impl SpanWriter {
    /// The byte range this writer owns now (a split may shorten it).
    pub fn range(&self) -> Range<u64> {
        self.span.start..self.span.end()
    }

    /// The next byte to write.
    pub fn position(&self) -> u64 {
        self.span.position()
    }

    /// Whether every byte of the (current) range is written.
    pub fn is_complete(&self) -> bool {
        self.position() >= self.span.end()
    }

    /// Extends the span over every byte nobody has been handed yet, if they start where it
    /// ends (for a server that sends the whole blob whatever range was asked: this writer
    /// then takes all it can from the one body). Returns whether it did.
    pub fn absorb_rest(&mut self) -> bool {
        let Ok(mut spans) = self.blob.spans.lock() else {
            return false;
        };
        let Ok(mut b) = self.span.bounds.lock() else {
            return false;
        };
        if b.end != spans.free_from || b.end >= self.blob.size {
            return false;
        }
        // Up to what a resumed file holds already: the body's bytes there are skipped.
        let to = spans.present.front().map_or(self.blob.size, |p| p.start);
        b.end = to;
        self.span.end.store(to, Ordering::Release);
        spans.free_from = to;
        spans.reach_present();
        true
    }

    /// A handle the scheduler can look at and split.
    pub fn span(&self) -> SpanRef {
        SpanRef(self.span.clone())
    }

    /// Appends the start of `bytes` at the current position: as much as the span still has
    /// room for. Returns how many bytes were taken; fewer than offered means the span is
    /// now complete (it ended, or a split took the rest).
    pub fn append(&mut self, bytes: &[u8]) -> Result<usize> {
        if bytes.is_empty() {
            return Ok(0);
        }
        let (offset, n) = {
            let mut b = self
                .span
                .bounds
                .lock()
                .map_err(|_| Error::Internal("span lock poisoned".into()))?;
            let offset = self.span.position();
            let n = (b.end.saturating_sub(offset)).min(bytes.len() as u64);
            b.reserved = offset + n;
            (offset, n)
        };
        if n == 0 {
            return Ok(0);
        }
        let end = offset + n;
        self.prepare(offset, end)?;
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
        // `persist` from unmapping it during the copy), created with the file's full
        // preallocated length (`size`) and kept alive by the `Arc<BlobFile>` we hold; the
        // file is only ever truncated by `File::create` before the mapping exists, and it
        // stays under a private partial name that no other fastpull writer uses (the layout
        // is locked), so the pages are there (no SIGBUS). A region's file (an archive) is
        // preallocated whole before any region is mapped and only changes length after
        // every region over it is unmapped (`crate::archive`), and a region's old writer is
        // unmapped before a new one takes its bytes (repair). `offset..end` lies within this
        // span (`end` ≤ the span's end, read under its lock), spans tile the blob without
        // overlap, a span has one writer, and `split` never moves a span's end below what
        // its writer reserved (`reserved`, set under the same lock before this copy), so no
        // other thread writes these bytes concurrently, and readers (`with_written`) only
        // look below the contiguous written prefix, which these bytes are not part of yet.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                map.as_mut_ptr().add(offset as usize),
                n as usize,
            );
        }
        // Publish (Release pairs with the hasher's Acquire).
        self.span
            .written
            .store(end - self.span.start, Ordering::Release);
        Ok(n as usize)
    }

    /// Before the copy of `offset..end` (reserved, about to be written), makes sure the
    /// span's pages from here to [`PREPARE_STEP`] past `end` are in the page cache, by
    /// writing zeros over them through the file ([`BlobFile::zero_fill`]), a step at a time
    /// once the copy comes within [`PREPARE_LEAD`] of the last step's end.
    ///
    /// Why: a write through a shared map to a page the page cache does not hold yet is a
    /// page fault that must first *read* the page (ext4 zeroes it: the file is
    /// preallocated, nothing is on disk), through read-ahead, which makes folios of 16 KiB
    /// or less here, each allocated, inserted, zeroed, made writable (`page_mkwrite`) and
    /// later written back on its own; on a VM that hands free memory back to the host, the
    /// zeroing also runs into the host's page faults. `write(2)` of whole pages reads
    /// nothing and makes folios as large as the write (up to [`ZERO_PIECE`]); the copy
    /// through the map then only maps pages that are already there, uptodate and dirty.
    /// Measured on the perf machine (perf/README.md), the CPU of a capped 500 MiB pull fell
    /// from 0.82 to 0.56 s and that of the CDN without Range (12 s, cold memory) from 1.40
    /// to 0.74 s, where `MADV_POPULATE_WRITE` of the same steps (what this replaces) paid
    /// for read-ahead. The data itself is still copied through the map.
    ///
    /// Each piece is zeroed under the span's lock, up to the span's end read under it: a
    /// split (which takes the same lock) waits for the piece, and a writer never zeroes
    /// bytes a split has handed to another writer, which may already have written them.
    fn prepare(&mut self, offset: u64, end: u64) -> Result<()> {
        if end + PREPARE_LEAD <= self.prepared {
            return Ok(());
        }
        let goal = end + PREPARE_STEP;
        let mut at = self.prepared.max(offset);
        while at < goal {
            let b = self
                .span
                .bounds
                .lock()
                .map_err(|_| Error::Internal("span lock poisoned".into()))?;
            let stop = goal.min(b.end).min(at + ZERO_PIECE);
            if stop <= at {
                break;
            }
            #[cfg(test)]
            tests::before_zero();
            self.blob.zero_fill(at..stop)?;
            drop(b);
            at = stop;
        }
        self.prepared = at;
        Ok(())
    }
}

/// Write-back ranges start and end on this boundary (a multiple of every page size).
const WRITEBACK_ALIGN: u64 = 2 << 20;

/// Asks the kernel to start writing `len` bytes at `offset` of `file` to disk, without
/// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). Errors are ignored: the fsync that
/// follows reports them.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range takes an fd and plain integers and touches no memory of ours;
    // `file` is open for the whole call. (rustix has no wrapper for it.)
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

/// Writes `len` bytes at `offset` of `file` back to disk and waits until they are there
/// (`sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`; no metadata, no device flush).
/// Errors are ignored, as in [`start_writeback`].
#[cfg(any(target_os = "linux", target_os = "android"))]
fn wait_for_writeback(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Ok(());
    };
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: as in start_writeback: an fd and plain integers, `file` open for the call.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    // Not done here (a filesystem or file without it): nothing was written, nothing failed.
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ESPIPE | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(()),
        _ => Err(e),
    }
}

/// Elsewhere nothing was started early ([`start_writeback`] is a no-op), and an fsync there
/// may write and write-protect the pages writers are still filling: the final fsync does it.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn wait_for_writeback(_file: &File, _offset: u64, _len: u64) -> std::io::Result<()> {
    Ok(())
}

/// How close (bytes) a writer gets to the end of its prepared pages before it prepares more
/// ([`SpanWriter::prepare`]).
const PREPARE_LEAD: u64 = 1 << 20;
/// How far past the bytes being written it prepares (never past its span's end): the zeros
/// go in a step ahead of the copy, spread over the stream rather than stalling its start,
/// and bytes a split takes away soon after were mostly not zeroed for nothing.
const PREPARE_STEP: u64 = 8 << 20;
/// The largest `pwrite` of zeros, and so the largest page-cache folio one makes; also how
/// long a split may wait for a writer's zeroing (a fraction of a millisecond).
const ZERO_PIECE: u64 = 1 << 20;

pub(crate) fn preallocate(file: &File, size: u64) -> std::io::Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        // Filesystems without fallocate: a sparse file of the right length (a full disk then
        // shows up as an error from the writers' zeroing `pwrite`, `SpanWriter::prepare`,
        // before any byte is copied through the map).
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
    let dir = parent_dir(path);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync", dir, e))
}

/// The directory `path` is in: its parent, or `.` for a bare name (whose `parent()` is
/// `Some("")`, which opens nothing).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes a small file atomically (temp file, fsync, rename, fsync dir). A full disk is
/// `Error::NoSpace`, naming the destination and the file's size.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let size = bytes.len() as u64;
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| or_no_space("create", &tmp, size, e))?;
        f.write_all(bytes)
            .map_err(|e| or_no_space("write", &tmp, size, e))?;
        f.sync_all()
            .map_err(|e| or_no_space("fsync", &tmp, size, e))?;
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

    #[test]
    fn the_parent_of_a_bare_name_is_the_current_directory() {
        assert_eq!(parent_dir(Path::new("app.tar")), Path::new("."));
        assert_eq!(parent_dir(Path::new("out/app.tar")), Path::new("out"));
        assert_eq!(parent_dir(Path::new("/app.tar")), Path::new("/"));
        sync_parent(Path::new("Cargo.toml")).expect("a bare name's directory is synced");
    }

    fn blob(dir: &Path, size: u64) -> Arc<BlobFile> {
        BlobFile::create(&dir.join("b.partial"), &dir.join("b"), size).unwrap()
    }

    /// Writes `data[w.range()]` through `w` in pieces of `step`.
    fn fill(w: &mut SpanWriter, data: &[u8], step: usize) {
        while !w.is_complete() {
            let at = w.position() as usize;
            let end = (at + step).min(w.range().end as usize);
            assert_eq!(w.append(&data[at..end]).unwrap(), end - at);
        }
    }

    /// A flush along the way that was told of a failed write-back (EIO, out of space on a
    /// thin volume or NFS) keeps the blob from its final name, though the final fsync then
    /// succeeds (Linux reports such an error once per open file) and every byte matches.
    /// (Red when the error was only logged: the blob was renamed into place.)
    #[test]
    fn a_failed_flush_along_the_way_keeps_the_blob_from_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let b = blob(dir.path(), 1000);
        let mut w = b.writer().unwrap();
        fill(&mut w, &data, 100);
        b.flush_data(false).unwrap();
        // What a durable checkpoint's fdatasync gets when the disk failed a write-back.
        let eio = std::io::Error::from_raw_os_error(libc::EIO);
        assert!(b.synced("fdatasync", Err(eio)).is_err());
        let err = b.persist().unwrap_err().to_string();
        assert!(err.contains("cannot be trusted"), "{err}");
        assert!(!dir.path().join("b").exists(), "renamed into place");
        assert!(dir.path().join("b.partial").exists());
    }

    #[test]
    fn splits_land_at_their_offsets_and_every_byte_once() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let b = blob(dir.path(), 1000);
        let mut first = b.writer().unwrap();
        assert!(b.writer().is_none(), "the whole blob is handed out once");
        assert_eq!(first.append(&data[..100]).unwrap(), 100);
        // Not below what the writer has written, not at or past the end.
        assert!(b.split(&first.span(), 99).is_none());
        assert!(b.split(&first.span(), 50).is_none());
        assert!(b.split(&first.span(), 1000).is_none());
        let mut upper = b.split(&first.span(), 600).unwrap();
        let mut middle = b.split(&first.span(), 300).unwrap();
        assert_eq!(first.range(), 0..300);
        assert_eq!(middle.range(), 300..600);
        assert_eq!(upper.range(), 600..1000);
        fill(&mut upper, &data, 64);
        assert_eq!(b.contiguous_prefix(), 100);
        // A writer offered more than its span holds takes only its part.
        assert_eq!(first.append(&data[100..400]).unwrap(), 200);
        assert!(first.is_complete());
        assert_eq!(first.append(&data[300..301]).unwrap(), 0);
        assert_eq!(b.contiguous_prefix(), 300);
        fill(&mut middle, &data, 7);
        assert_eq!(b.contiguous_prefix(), 1000);
        let mut back = vec![0u8; 1000];
        b.read_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
        b.persist().unwrap();
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), data);
        assert!(!dir.path().join("b.partial").exists());
    }

    /// A stalled writer gives all it has left away: cut where it is, it is complete, and
    /// the new writer owns the rest.
    #[test]
    fn a_cut_where_the_writer_is_leaves_it_complete() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let b = blob(dir.path(), 1000);
        let mut first = b.writer().unwrap();
        assert_eq!(first.append(&data[..100]).unwrap(), 100);
        assert!(!first.is_complete());
        let mut rest = b.split(&first.span(), 100).unwrap();
        assert!(first.is_complete());
        assert_eq!(first.range(), 0..100);
        assert_eq!(rest.range(), 100..1000);
        assert_eq!(first.append(&data[100..200]).unwrap(), 0);
        fill(&mut rest, &data, 64);
        assert_eq!(b.contiguous_prefix(), 1000);
        let mut back = vec![0u8; 1000];
        b.read_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn written_bytes_read_in_place_and_survive_early_writeback() {
        let dir = tempfile::tempdir().unwrap();
        let size = 9 * WRITEBACK_ALIGN + 12345;
        let data: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
        let b = blob(dir.path(), size);
        let mut w = b.writer().unwrap();
        let half = (size / 2) as usize;
        assert_eq!(w.append(&data[..half]).unwrap(), half);
        let mut buf = Vec::new();
        // Only the written prefix is read through the map; past it, the file is read.
        let got = b
            .with_written(0..half as u64, &mut buf, |bytes| bytes.to_vec())
            .unwrap();
        assert_eq!(got, data[..half]);
        assert!(
            buf.is_empty(),
            "the written prefix is read in place, not copied"
        );
        let past = b
            .with_written(0..size, &mut buf, |bytes| bytes.len())
            .unwrap();
        assert_eq!(past, size as usize, "past the prefix: read from the file");
        // Write back (and unmap) the first half; the bytes stay, and the rest still goes
        // through the map.
        b.write_back(0..half as u64);
        assert_eq!(w.append(&data[half..]).unwrap(), size as usize - half);
        buf.clear();
        let again = b
            .with_written(0..size, &mut buf, |bytes| bytes == &data[..])
            .unwrap();
        assert!(
            again,
            "bytes read back after writeback are the bytes written"
        );
        assert!(buf.is_empty());
        b.persist().unwrap();
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), data);
    }

    /// A flush behind the writers runs one at a time per blob, lets the next one go once it
    /// is done, and leaves the bytes as they were.
    #[test]
    fn flushes_behind_the_writers_run_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * WRITEBACK_ALIGN + 5;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
        let b = blob(dir.path(), size);
        let mut w = b.writer().unwrap();
        assert_eq!(w.append(&data).unwrap(), size as usize);
        b.write_back(0..size);
        let ranges = [0..2 * WRITEBACK_ALIGN, 2 * WRITEBACK_ALIGN..size];
        // One is running: another is refused, and the caller keeps its ranges.
        b.flushing.store(true, Ordering::Release);
        assert!(!b.flush_behind(&ranges));
        b.flushing.store(false, Ordering::Release);
        assert!(b.flush_behind(&ranges));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while b.flushing.load(Ordering::Acquire) {
            assert!(
                std::time::Instant::now() < deadline,
                "the flush never ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(b.flush_behind(&ranges), "the next flush may go");
        b.persist().unwrap();
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), data);
    }

    #[test]
    fn a_resumed_file_hands_out_only_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1000u64;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let (partial, fin) = (dir.path().join("b.partial"), dir.path().join("b"));
        // An earlier pull wrote 0..100, 300..400 and 900..1000 (and garbage elsewhere).
        let mut old = vec![0xAAu8; size as usize];
        for r in [0..100usize, 300..400, 900..1000] {
            old[r.clone()].copy_from_slice(&data[r]);
        }
        std::fs::write(&partial, &old).unwrap();
        let present: RangeSet = [0..100u64, 300..400, 900..1000].into_iter().collect();
        let b = BlobFile::resume(&partial, &fin, size, &present).unwrap();
        assert_eq!(b.unassigned(), 700);
        assert_eq!(
            b.contiguous_prefix(),
            100,
            "the present start counts as written"
        );
        let mut got = vec![];
        while let Some(mut w) = b.take(150) {
            got.push(w.range());
            let r = w.range();
            fill(&mut w, &data, 64);
            assert_eq!(w.position(), r.end);
        }
        assert_eq!(
            got,
            vec![100..250, 250..300, 400..550, 550..700, 700..850, 850..900]
        );
        assert_eq!(b.unassigned(), 0);
        assert_eq!(b.contiguous_prefix(), size);
        assert_eq!(b.written(), std::iter::once(0..size).collect());
        let mut buf = Vec::new();
        assert!(b
            .with_written(0..size, &mut buf, |x| x == &data[..])
            .unwrap());
        b.persist().unwrap();
        assert_eq!(std::fs::read(&fin).unwrap(), data);

        // Everything present: nothing to hand out, the prefix is whole.
        std::fs::write(&partial, &data).unwrap();
        let all: RangeSet = std::iter::once(0..size).collect();
        let b = BlobFile::resume(&partial, &fin, size, &all).unwrap();
        assert!(b.take(10).is_none());
        assert_eq!(b.contiguous_prefix(), size);

        // A server that ignores Range: the body's writer stops where present bytes start.
        std::fs::write(&partial, &old).unwrap();
        let some: RangeSet = std::iter::once(300..400u64).collect();
        let b = BlobFile::resume(&partial, &fin, size, &some).unwrap();
        let mut w = b.take(50).unwrap();
        assert!(w.absorb_rest());
        assert_eq!(w.range(), 0..300);
        let rest = b.take(u64::MAX).unwrap();
        assert_eq!(rest.range(), 400..1000);

        // A sparse file (an earlier pull on a filesystem without fallocate, a copy) gets
        // its holes allocated: a hole written through the map on a full disk is a SIGBUS.
        let sparse = std::fs::File::create(&partial).unwrap();
        sparse.set_len(4 << 20).unwrap();
        sparse.write_all_at(&data[..100], 0).unwrap();
        drop(sparse);
        use std::os::unix::fs::MetadataExt;
        let some: RangeSet = std::iter::once(0..100u64).collect();
        assert!(std::fs::metadata(&partial).unwrap().blocks() * 512 < 1 << 20);
        let b = BlobFile::resume(&partial, &fin, 4 << 20, &some).unwrap();
        assert!(
            std::fs::metadata(&partial).unwrap().blocks() * 512 >= 4 << 20,
            "a resumed sparse partial is preallocated"
        );
        assert_eq!(b.unassigned(), (4 << 20) - 100);
        let some: RangeSet = std::iter::once(300..400u64).collect();

        // A file of the wrong length starts over.
        std::fs::write(&partial, b"short").unwrap();
        let b = BlobFile::resume(&partial, &fin, size, &some).unwrap();
        assert_eq!(b.unassigned(), size);
    }

    #[test]
    fn pieces_are_handed_out_in_order_and_the_prefix_follows() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100u32).map(|i| i as u8).collect();
        let b = blob(dir.path(), 100);
        let mut p1 = b.take(30).unwrap();
        let mut p2 = b.take(30).unwrap();
        assert_eq!((p1.range(), p2.range()), (0..30, 30..60));
        assert_eq!(b.unassigned(), 40);
        fill(&mut p2, &data, 9);
        assert_eq!(b.contiguous_prefix(), 0);
        fill(&mut p1, &data, 9);
        assert_eq!(b.contiguous_prefix(), 60, "not past what is handed out");
        let mut rest = b.take(20).unwrap();
        assert_eq!(rest.range(), 60..80);
        assert!(rest.absorb_rest(), "the last piece takes what nobody has");
        assert_eq!(rest.range(), 60..100);
        assert!(!p1.absorb_rest());
        assert!(b.take(1).is_none());
        fill(&mut rest, &data, 100);
        assert_eq!(b.contiguous_prefix(), 100);
    }

    #[test]
    fn a_split_racing_the_writer_never_overlaps_it() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8u64 << 20;
        let data: Vec<u8> = (0..size).map(|i| (i * 13 % 253) as u8).collect();
        let b = blob(dir.path(), size);
        let mut w = b.writer().unwrap();
        let span = w.span();
        let data2 = data.clone();
        let writer = std::thread::spawn(move || {
            let mut taken = 0usize;
            while !w.is_complete() {
                let at = w.position() as usize;
                taken += w.append(&data2[at..(at + 4096).min(data2.len())]).unwrap();
            }
            taken
        });
        // Cut repeatedly while the writer runs; every cut gets its own writer.
        let mut others = Vec::new();
        let mut at = size - 4096;
        while at > 4096 {
            if let Some(o) = b.split(&span, at) {
                others.push(o);
            }
            at = at.saturating_sub(512 * 1024 + 4096);
        }
        let first_took = writer.join().unwrap();
        let mut total = first_took as u64;
        for o in &mut others {
            let r = o.range();
            total += r.end - r.start;
            fill(o, &data, 1000);
        }
        assert_eq!(total, size, "the spans tile the blob");
        assert_eq!(b.contiguous_prefix(), size);
        let mut back = vec![0u8; size as usize];
        b.read_at(&mut back, 0).unwrap();
        assert!(back == data);
    }

    thread_local! {
        /// Called on this thread just before each piece `prepare` zeroes (a test's hook).
        static BEFORE_ZERO: std::cell::RefCell<Option<Box<dyn FnMut()>>> =
            const { std::cell::RefCell::new(None) };
    }

    pub(super) fn before_zero() {
        BEFORE_ZERO.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f()
            }
        })
    }

    #[test]
    fn bytes_a_split_hands_over_are_never_zeroed_by_the_old_writer() {
        // The old writer zeroes its span's pages ahead of its copy (`prepare`). A split
        // made while it is about to zero a piece hands bytes to a new writer, which writes
        // them at once; the old writer must not zero them afterwards. Here the old writer's
        // first append stops before its first piece until the split and the new writer are
        // done (or 300 ms pass: the split waits for the piece, as it must).
        let dir = tempfile::tempdir().unwrap();
        let size = 16u64 << 20;
        let data: Arc<Vec<u8>> = Arc::new((0..size).map(|i| (i * 7 % 251) as u8).collect());
        let b = blob(dir.path(), size);
        let mut w = b.writer().unwrap();
        let span = w.span();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let d = data.clone();
        let old = std::thread::spawn(move || {
            let mut first = true;
            BEFORE_ZERO.with(|h| {
                *h.borrow_mut() = Some(Box::new(move || {
                    if std::mem::take(&mut first) {
                        ready_tx.send(()).unwrap();
                        let _ = done_rx.recv_timeout(std::time::Duration::from_millis(300));
                    }
                }))
            });
            assert_eq!(w.append(&d[..4096]).unwrap(), 4096);
            w
        });
        ready_rx.recv().unwrap();
        let at = 512 << 10;
        let mut new = b.split(&span, at).expect("nothing is written yet");
        fill(&mut new, &data, 65536);
        let _ = done_tx.send(());
        let mut old = old.join().unwrap();
        fill(&mut old, &data, 4096);
        assert_eq!(old.range(), 0..at);
        assert_eq!(b.contiguous_prefix(), size);
        let mut back = vec![0u8; size as usize];
        b.read_at(&mut back, 0).unwrap();
        assert!(back == *data, "the new writer's bytes survive");
    }

    #[test]
    fn unpersisted_partial_is_removed_and_empty_blobs_work() {
        let dir = tempfile::tempdir().unwrap();
        let b = blob(dir.path(), 100);
        assert!(dir.path().join("b.partial").exists());
        assert_eq!(
            std::fs::metadata(dir.path().join("b.partial"))
                .unwrap()
                .len(),
            100
        );
        drop(b);
        assert!(
            dir.path().join("b.partial").exists(),
            "dropping a blob file decides nothing"
        );
        let b = blob(dir.path(), 100);
        b.discard();
        assert!(!dir.path().join("b.partial").exists());

        let e = blob(dir.path(), 0);
        let w = e.writer().unwrap();
        assert!(w.is_complete());
        assert_eq!(e.contiguous_prefix(), 0);
        e.persist().unwrap();
        assert_eq!(std::fs::metadata(dir.path().join("b")).unwrap().len(), 0);
    }

    /// Regions of one file, at offsets that are not page-aligned and share pages, each get
    /// their own bytes; persisting one neither renames nor removes the file.
    #[test]
    fn regions_land_at_their_offsets_in_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive.tar");
        let total = (3 << 20) + 4096;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        preallocate(&file, total).unwrap();
        let file = Arc::new(file);
        let a_data: Vec<u8> = (0..(2u64 << 20) + 700)
            .map(|i| (i % 241) as u8 | 1)
            .collect();
        let b_data: Vec<u8> = (0..5000u32).map(|i| (i % 13) as u8 + 100).collect();
        let (a_base, b_base) = (512u64, 512 + a_data.len() as u64 + 512);
        let a = BlobFile::region(file.clone(), &path, a_base, a_data.len() as u64).unwrap();
        let b = BlobFile::region(file.clone(), &path, b_base, b_data.len() as u64).unwrap();
        assert!(a.is_region());
        let mut wa = a.writer().unwrap();
        let mut wb = b.writer().unwrap();
        fill(&mut wb, &b_data, 333);
        fill(&mut wa, &a_data, 4096);
        let mut buf = Vec::new();
        assert!(a
            .with_written(0..a_data.len() as u64, &mut buf, |x| x == &a_data[..])
            .unwrap());
        a.write_back(0..a_data.len() as u64);
        a.persist().unwrap();
        b.discard();
        assert!(a.is_persisted() && !b.is_persisted());
        assert!(path.exists(), "a region never renames or removes its file");
        let mut back = vec![0u8; b_data.len()];
        b.read_at(&mut back, 0).unwrap();
        assert_eq!(back, b_data);
        let whole = std::fs::read(&path).unwrap();
        assert_eq!(whole.len() as u64, total);
        assert!(
            whole[..512].iter().all(|&x| x == 0),
            "bytes before a region untouched"
        );
        assert_eq!(&whole[a_base as usize..][..a_data.len()], &a_data[..]);
        assert!(whole[a_base as usize + a_data.len()..b_base as usize]
            .iter()
            .all(|&x| x == 0));
        assert_eq!(&whole[b_base as usize..][..b_data.len()], &b_data[..]);
        // Past the end of the file: refused.
        assert!(BlobFile::region(file.clone(), &path, total - 10, 11).is_err());
        // An unmapped region reads through the file, and refuses writes.
        let c = BlobFile::region(file, &path, b_base, 10).unwrap();
        let mut wc = c.writer().unwrap();
        c.unmap();
        assert!(wc.append(b"x").is_err());
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
