//! In-order consumers of a blob that is still being written.
//!
//! A blob's bytes land out of order (many ranges at once), but what has been written from
//! byte 0 without a gap, [`BlobFile::contiguous_prefix`], only grows. Two things follow that
//! prefix: the in-order hasher ([`crate::verify::InOrderHasher`]), and with `--format
//! rootfs` the unpacker, through a [`PrefixReader`]. Both are [`PrefixConsumer`]s: the
//! writers tell them, cheaply, when the prefix may have grown, and never wait for them.
//!
//! The unpacker's side is a [`PrefixWatch`] per blob: the fetch tells it when a fetch of
//! the blob opens its file, when one is abandoned (a digest mismatch: it will be fetched
//! again from scratch) and when the blob is verified; a [`PrefixReader`] blocks on it until
//! more bytes are there. A reader whose fetch is abandoned or restarted fails (it never
//! reads a new fetch's bytes as if they continued the old one), and so does one whose pull
//! stops; a timed wait backs the wake-ups up, so a reader never hangs on a lost one.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::digest::Digest;
use crate::write::BlobFile;

/// Something that follows a blob's contiguous written prefix, in order.
pub(crate) trait PrefixConsumer: Send + Sync {
    /// The contiguous written prefix may have grown. Writers call this about every MiB and
    /// once every byte is in; it must be cheap and must not block on the consumer's work.
    fn advanced(&self);
}

/// How long a waiting reader sleeps before it looks again without being woken: the
/// backstop for a stop flag set without a wake-up (a dropped pull).
const BACKSTOP: Duration = Duration::from_millis(100);

/// Most bytes one [`PrefixReader::read`] copies.
const READ_MAX: usize = 1 << 20;

/// Where a watched blob's fetch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetch {
    /// Not opened yet (or being fetched again after a mismatch, not reopened yet).
    Waiting,
    /// A fetch is writing the file.
    Writing,
    /// The current fetch's bytes did not verify; the blob may be fetched again.
    Abandoned,
    /// Verified and in place.
    Verified,
}

struct WatchState {
    /// The file the current fetch writes (`None` before it opens, or for a blob that was
    /// verified before this pull started: then it is read from its final path).
    file: Option<Arc<BlobFile>>,
    /// Fetches of the blob opened so far.
    generation: u32,
    fetch: Fetch,
    /// The generation a reader has consumed bytes of.
    read: Option<u32>,
    /// A fetch was opened again after a reader had consumed bytes of an earlier one.
    restarted_under_reader: bool,
}

/// One blob's fetch, as a [`PrefixReader`] follows it.
pub(crate) struct PrefixWatch {
    digest: Digest,
    /// Where the verified blob lives.
    path: PathBuf,
    state: Mutex<WatchState>,
    cond: Condvar,
    /// Set when the pull this watch belongs to stops following (it failed, or the
    /// streaming unpack was given up).
    stop: Arc<AtomicBool>,
}

impl PrefixConsumer for PrefixWatch {
    fn advanced(&self) {
        // Taken so that a reader between its look and its wait cannot miss this.
        let _st = self.lock();
        self.cond.notify_all();
    }
}

impl PrefixWatch {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn change(&self, f: impl FnOnce(&mut WatchState)) {
        let mut st = self.lock();
        f(&mut st);
        self.cond.notify_all();
    }

    /// A fetch of the blob has opened `file` (the first, or again after a mismatch).
    pub(crate) fn opened(&self, file: Arc<BlobFile>) {
        self.change(|st| {
            st.generation += 1;
            st.file = Some(file);
            st.fetch = Fetch::Writing;
            if st.read.is_some() {
                st.restarted_under_reader = true;
            }
        });
    }

    /// The current fetch's bytes did not verify (the blob may be fetched again).
    pub(crate) fn abandoned(&self) {
        self.change(|st| {
            if st.fetch != Fetch::Verified {
                st.fetch = Fetch::Abandoned;
            }
        });
    }

    /// The blob is verified and under its final name.
    pub(crate) fn verified(&self) {
        self.change(|st| st.fetch = Fetch::Verified);
    }

    /// The blob's digest.
    pub(crate) fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Where the verified blob lives.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn stopped(&self, cancel: &AtomicBool) -> Option<io::Error> {
        (self.stop.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed)).then(|| {
            // Not ErrorKind::Interrupted: readers retry on that.
            io::Error::other(format!("stopped following blob {}", self.digest))
        })
    }

    /// Blocks until the blob is verified (its final file can be trusted), through any
    /// repairs; fails once the pull stops.
    pub(crate) fn wait_verified(&self, cancel: &AtomicBool) -> io::Result<()> {
        let mut st = self.lock();
        loop {
            if st.fetch == Fetch::Verified {
                return Ok(());
            }
            if let Some(e) = self.stopped(cancel) {
                return Err(e);
            }
            st = self.wait(st);
        }
    }

    /// After a reader of `generation` failed: blocks until it is known whether that fetch
    /// verified (`true`: the bytes it read were the blob's, so the failure is the layer's)
    /// or not (`false`: abandoned, fetched again, or the pull stopped).
    pub(crate) fn settled(&self, generation: u32, cancel: &AtomicBool) -> bool {
        let mut st = self.lock();
        loop {
            if st.generation != generation || st.fetch == Fetch::Abandoned {
                return false;
            }
            if st.fetch == Fetch::Verified {
                return true;
            }
            if self.stopped(cancel).is_some() {
                return false;
            }
            st = self.wait(st);
        }
    }

    fn wait<'a>(&self, st: MutexGuard<'a, WatchState>) -> MutexGuard<'a, WatchState> {
        match self.cond.wait_timeout(st, BACKSTOP) {
            Ok((st, _)) => st,
            Err(p) => p.into_inner().0,
        }
    }
}

/// The watches of a pull's blobs, by digest.
pub(crate) struct Watchers {
    watches: HashMap<Digest, Arc<PrefixWatch>>,
    stop: Arc<AtomicBool>,
}

impl Watchers {
    /// A watch for each of `blobs` (digest, final path); those in `present` are verified
    /// already.
    pub(crate) fn new(
        blobs: impl IntoIterator<Item = (Digest, PathBuf)>,
        present: &std::collections::HashSet<Digest>,
    ) -> Watchers {
        let stop = Arc::new(AtomicBool::new(false));
        let watches = blobs
            .into_iter()
            .map(|(digest, path)| {
                let fetch = if present.contains(&digest) {
                    Fetch::Verified
                } else {
                    Fetch::Waiting
                };
                let w = PrefixWatch {
                    digest,
                    path,
                    state: Mutex::new(WatchState {
                        file: None,
                        generation: 0,
                        fetch,
                        read: None,
                        restarted_under_reader: false,
                    }),
                    cond: Condvar::new(),
                    stop: stop.clone(),
                };
                (digest, Arc::new(w))
            })
            .collect();
        Watchers { watches, stop }
    }

    /// The watch of `digest`, if it is one of the pull's blobs.
    pub(crate) fn get(&self, digest: &Digest) -> Option<&Arc<PrefixWatch>> {
        self.watches.get(digest)
    }

    /// Readers stop following (they fail at once) and waits end.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.watches.values() {
            w.change(|_| {});
        }
    }

    /// Whether some blob was fetched again after a reader had consumed part of an earlier
    /// fetch of it: what was unpacked from it cannot be trusted to be the verified bytes.
    pub(crate) fn restarted_under_reader(&self) -> bool {
        self.watches
            .values()
            .any(|w| w.lock().restarted_under_reader)
    }
}

/// What a layer is read from: a fetch in progress, or a blob verified before.
pub(crate) enum Source {
    /// Following the fetch's contiguous prefix.
    Following(PrefixReader),
    /// Verified before this pull followed it: its final file.
    Verified(PathBuf),
}

/// Reads a blob in order while it is being fetched: bytes `[pos, contiguous prefix)`,
/// through the blob's map (or `pread` once it is unmapped), blocking until more are
/// written; end of file at the blob's size. It holds no bytes of its own beyond what one
/// read copies, and the writers never wait for it.
pub(crate) struct PrefixReader {
    watch: Arc<PrefixWatch>,
    file: Arc<BlobFile>,
    generation: u32,
    pos: u64,
    cancel: Arc<AtomicBool>,
    /// For `pread` when the blob is no longer mapped (at most [`READ_MAX`]).
    scratch: Vec<u8>,
}

impl PrefixReader {
    /// Waits until the blob's fetch has opened its file (or the blob turns out verified
    /// already); fails once the pull stops (`cancel`, or the watchers' stop).
    pub(crate) fn open(watch: &Arc<PrefixWatch>, cancel: Arc<AtomicBool>) -> io::Result<Source> {
        let mut st = watch.lock();
        loop {
            if let Some(e) = watch.stopped(&cancel) {
                return Err(e);
            }
            match (&st.file, st.fetch) {
                (_, Fetch::Verified) if st.generation == 0 => {
                    return Ok(Source::Verified(watch.path.clone()))
                }
                (Some(file), Fetch::Writing | Fetch::Verified) => {
                    return Ok(Source::Following(PrefixReader {
                        watch: watch.clone(),
                        file: file.clone(),
                        generation: st.generation,
                        pos: 0,
                        cancel,
                        scratch: Vec::new(),
                    }))
                }
                _ => st = watch.wait(st),
            }
        }
    }

    /// Which fetch of the blob this reader follows.
    pub(crate) fn generation(&self) -> u32 {
        self.generation
    }

    /// The watch it follows.
    pub(crate) fn watch(&self) -> &Arc<PrefixWatch> {
        &self.watch
    }
}

impl io::Read for PrefixReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let size = self.file.size();
        if out.is_empty() || self.pos >= size {
            return Ok(0);
        }
        let prefix = {
            let mut st = self.watch.lock();
            loop {
                if let Some(e) = self.watch.stopped(&self.cancel) {
                    return Err(e);
                }
                if st.generation != self.generation || st.fetch == Fetch::Abandoned {
                    return Err(io::Error::other(format!(
                        "blob {} is being fetched again (its bytes did not verify)",
                        self.watch.digest
                    )));
                }
                let prefix = self.file.contiguous_prefix().min(size);
                if prefix > self.pos {
                    st.read = Some(self.generation);
                    break prefix;
                }
                st = self.watch.wait(st);
            }
        };
        let n = out
            .len()
            .min(READ_MAX)
            .min(usize::try_from(prefix - self.pos).unwrap_or(usize::MAX));
        let at = self.pos;
        self.file
            .with_written(at..at + n as u64, &mut self.scratch, |bytes| {
                out[..n].copy_from_slice(bytes)
            })?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn setup(size: u64) -> (tempfile::TempDir, Arc<BlobFile>, Watchers, Digest) {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::of(b"x");
        let file = BlobFile::create(&dir.path().join("p"), &dir.path().join("f"), size).unwrap();
        let w = Watchers::new([(d, dir.path().join("f"))], &Default::default());
        (dir, file, w, d)
    }

    /// A fetch of a `size`-byte blob opened, and a reader following it.
    fn following(
        size: u64,
    ) -> (
        tempfile::TempDir,
        Arc<BlobFile>,
        Watchers,
        Arc<PrefixWatch>,
        PrefixReader,
    ) {
        let (dir, file, w, d) = setup(size);
        let watch = w.get(&d).unwrap().clone();
        watch.opened(file.clone());
        let Source::Following(r) =
            PrefixReader::open(&watch, Arc::new(AtomicBool::new(false))).unwrap()
        else {
            panic!("not following")
        };
        (dir, file, w, watch, r)
    }

    #[test]
    fn reader_follows_the_prefix_and_ends_at_the_size() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (_dir, file, _w, watch, mut r) = following(data.len() as u64);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            r.read_to_end(&mut got).map(|_| got)
        });
        // The second half first: the reader must wait for the first.
        let first = file.writer().unwrap();
        let mut second = file.split(&first.span(), 1_500_000).unwrap();
        for part in data[1_500_000..].chunks(100_000) {
            second.append(part).unwrap();
            watch.advanced();
        }
        let mut first = first;
        for part in data[..1_500_000].chunks(70_000) {
            first.append(part).unwrap();
            watch.advanced();
        }
        assert_eq!(reader.join().unwrap().unwrap(), data);
    }

    /// A failure read from a fetch counts only if that fetch verifies; a blob verified
    /// before the pull is read from its file.
    #[test]
    fn settled_waits_for_the_fetch_and_a_verified_blob_is_read_from_its_file() {
        let (_dir, file, w, d) = setup(10);
        let watch = w.get(&d).unwrap().clone();
        watch.opened(file);
        let waiter = {
            let watch = watch.clone();
            std::thread::spawn(move || watch.settled(1, &AtomicBool::new(false)))
        };
        std::thread::sleep(Duration::from_millis(20));
        watch.verified();
        assert!(waiter.join().unwrap());
        assert!(!watch.settled(2, &AtomicBool::new(false)));

        let dir = tempfile::tempdir().unwrap();
        let present = [d].into_iter().collect();
        let w = Watchers::new([(d, dir.path().join("f"))], &present);
        let cancel = Arc::new(AtomicBool::new(false));
        match PrefixReader::open(w.get(&d).unwrap(), cancel).unwrap() {
            Source::Verified(p) => assert_eq!(p, dir.path().join("f")),
            Source::Following(_) => panic!("a verified blob is not followed"),
        }
    }

    #[test]
    fn an_abandoned_or_stopped_fetch_fails_the_reader() {
        for stop in [false, true] {
            let (_dir, file, w, watch, mut r) = following(1000);
            let mut wr = file.writer().unwrap();
            wr.append(&[1u8; 10]).unwrap();
            let mut buf = [0u8; 100];
            assert_eq!(r.read(&mut buf).unwrap(), 10);
            let reader = std::thread::spawn(move || r.read(&mut buf));
            std::thread::sleep(Duration::from_millis(20));
            if stop {
                w.stop();
            } else {
                watch.abandoned();
            }
            assert!(reader.join().unwrap().is_err());
            if !stop {
                watch.opened(file.clone());
                assert!(w.restarted_under_reader());
                assert!(!watch.settled(1, &AtomicBool::new(false)));
            }
        }
    }
}
