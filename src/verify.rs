//! sha256 verification: an incremental hasher, the in-order hasher that follows a blob's
//! written prefix on a pool of CPU threads, and a check for blobs already on disk.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use sha2::Digest as _;
use tokio::sync::oneshot;

use crate::digest::Digest;
use crate::prefix::PrefixConsumer;
use crate::write::BlobFile;

/// Incremental sha256 over a blob's bytes, in order. Backed by `sha2`, which picks SHA-NI on
/// x86_64 (and the ARMv8 SHA2 instructions on aarch64 with its `asm` feature) at run time.
#[derive(Clone, Default)]
pub struct Hasher {
    inner: sha2::Sha256,
    len: u64,
}

impl Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was fed yet.
    #[cfg(feature = "bench-internals")]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        Digest::from_bytes(self.inner.finalize().into())
    }
}

/// Hashes a whole file; returns its digest and length.
pub fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    let len = hasher.len();
    Ok((hasher.finish(), len))
}

/// Whether `path` holds exactly the blob `digest` of `size` bytes. A missing file is `false`;
/// other I/O errors are reported.
pub fn file_matches(path: &Path, digest: &Digest, size: u64) -> io::Result<bool> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() == size => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    let (actual, len) = hash_file(path)?;
    Ok(len == size && actual == *digest)
}

/// Which sha256 implementation runs on this CPU: `hardware (SHA-NI)` on x86_64 with the SHA
/// extensions, `hardware (ARMv8 SHA2)` on aarch64 with them (sha2's `asm` feature, enabled
/// for aarch64 in Cargo.toml), else `software`. sha2 makes the same run-time check.
pub fn sha256_backend() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::arch::is_x86_feature_detected!("sha")
            && std::arch::is_x86_feature_detected!("sse2")
            && std::arch::is_x86_feature_detected!("ssse3")
            && std::arch::is_x86_feature_detected!("sse4.1")
        {
            return "hardware (SHA-NI)";
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("sha2") {
            return "hardware (ARMv8 SHA2)";
        }
    }
    "software"
}

/// CPU threads that hash blobs while the network runs (never the async runtime's threads).
///
/// A plain queue that idle threads sleep on. Not rayon: its idle workers spin through
/// `sched_yield` (some 40 calls a job) before they sleep, and a job here is small and
/// frequent (a blob's next written MiB), so on a capped CDN the spinning was most of what
/// the pool did: 26,000 `sched_yield`s and 36,000 context switches in a 500 MiB pull that
/// took 20,000 without them (perf/README "The hashing pool sleeps when idle").
pub struct HashPool {
    shared: Arc<PoolShared>,
}

type Job = Box<dyn FnOnce() + Send>;

struct PoolShared {
    queue: Mutex<PoolQueue>,
    ready: std::sync::Condvar,
}

struct PoolQueue {
    jobs: std::collections::VecDeque<Job>,
    /// Set when the pool is dropped: its threads end once the queue is empty.
    closed: bool,
}

impl HashPool {
    /// A pool of `threads` hashing threads (0: one per CPU).
    pub fn new(threads: usize) -> std::io::Result<HashPool> {
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        } else {
            threads
        };
        let shared = Arc::new(PoolShared {
            queue: Mutex::new(PoolQueue {
                jobs: Default::default(),
                closed: false,
            }),
            ready: std::sync::Condvar::new(),
        });
        let pool = HashPool { shared };
        for i in 0..threads {
            let shared = pool.shared.clone();
            // On failure `pool` is dropped, which ends the threads started so far.
            std::thread::Builder::new()
                .name(format!("fastpull-hash-{i}"))
                .spawn(move || shared.work())?;
        }
        Ok(pool)
    }

    /// Runs `job` on one of the pool's threads.
    fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let mut q = self.shared.lock();
        q.jobs.push_back(Box::new(job));
        drop(q);
        self.shared.ready.notify_one();
    }
}

impl Drop for HashPool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

impl PoolShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A thread's life: the next job, or sleep until there is one.
    fn work(&self) {
        loop {
            let job = {
                let mut q = self.lock();
                loop {
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    if q.closed {
                        return;
                    }
                    q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            // A job that panicked (a bug) would leave its blob waiting for a digest that
            // never comes: end the process instead, as rayon, the pool before this, did.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                std::process::abort();
            }
        }
    }
}

/// Hashes one blob in order while its chunks are still arriving: each [`InOrderHasher::poke`]
/// schedules work on the pool, which hashes whatever contiguous prefix has been written
/// since, so the digest is ready moments after the last byte lands. It is one
/// [`PrefixConsumer`] of the blob; another (the rootfs unpacker's watch) can ride along and
/// is told whenever the hasher is.
pub struct InOrderHasher {
    blob: Arc<BlobFile>,
    pool: Arc<HashPool>,
    scheduled: AtomicBool,
    /// Another consumer of the same prefix, poked with the hasher.
    follower: Option<Arc<dyn PrefixConsumer>>,
    /// Itself, for [`PrefixConsumer::advanced`] (which has only `&self`).
    me: Weak<InOrderHasher>,
    state: Mutex<HashState>,
}

struct HashState {
    hasher: Hasher,
    /// Which [`WRITEBACK_STEP`]s of the blob were handed to [`BlobFile::write_back`].
    written_back: Vec<bool>,
    /// Written back and not yet flushed by [`BlobFile::flush_behind`].
    unflushed: Vec<std::ops::Range<u64>>,
    unflushed_bytes: u64,
    /// Written back and handed to [`BlobFile::flush_behind`] (for the tests).
    #[cfg(test)]
    flushed_bytes: u64,
    /// Every run written back, in order (for the tests).
    #[cfg(test)]
    log: Vec<std::ops::Range<u64>>,
    /// When the written bytes were last looked at for whole steps.
    looked: Option<std::time::Instant>,
    done: Option<oneshot::Sender<io::Result<Digest>>>,
}

/// Bytes hashed per step (read in place through the blob's map).
const HASH_STEP: u64 = 4 << 20;

/// Written bytes are handed to the kernel for writeback in steps of this size (aligned in
/// the file, so that neighbouring steps of a region of an archive share no page), each as
/// soon as all its bytes are written, whether hashed yet or not: pieces arrive out of order,
/// and a disk that waited for the hasher's in-order prefix would sit idle while the bytes
/// beyond a slow piece pile up in memory. Small, because pieces are cut so that the
/// connections end together: a step that spans several pieces is whole only when the last of
/// them ends, so 16 MiB steps on a capped CDN (pieces of a few MiB) went to disk only at the
/// end of the download, while 4 MiB steps start the disk within a fraction of a second
/// (perf/README.md, "The matrix on a slow disk, and smaller write-back steps").
const WRITEBACK_STEP: u64 = 4 << 20;

/// After this many bytes written back, they are flushed to stable storage in the background
/// ([`BlobFile::flush_behind`]).
#[cfg(not(test))]
const FLUSH_STEP: u64 = 128 << 20;
#[cfg(test)]
const FLUSH_STEP: u64 = 2 * WRITEBACK_STEP;

/// How often the written bytes are looked at for steps to write back.
const WRITEBACK_LOOK: std::time::Duration = std::time::Duration::from_millis(20);

impl InOrderHasher {
    /// A hasher for `blob`; the receiver yields the digest once every byte is hashed.
    /// (The fetch uses [`InOrderHasher::with_follower`].)
    #[cfg(any(test, feature = "bench-internals"))]
    pub fn new(
        blob: Arc<BlobFile>,
        pool: Arc<HashPool>,
    ) -> (Arc<InOrderHasher>, oneshot::Receiver<io::Result<Digest>>) {
        Self::with_follower(blob, pool, None)
    }

    /// As [`InOrderHasher::new`], with `follower` told of every [`InOrderHasher::poke`]
    /// too: two consumers of one prefix, and the writers' hook point stays one call.
    pub(crate) fn with_follower(
        blob: Arc<BlobFile>,
        pool: Arc<HashPool>,
        follower: Option<Arc<dyn PrefixConsumer>>,
    ) -> (Arc<InOrderHasher>, oneshot::Receiver<io::Result<Digest>>) {
        let (tx, rx) = oneshot::channel();
        let h = Arc::new_cyclic(|me| InOrderHasher {
            blob,
            pool,
            scheduled: AtomicBool::new(false),
            follower,
            me: me.clone(),
            state: Mutex::new(HashState {
                hasher: Hasher::new(),
                written_back: Vec::new(),
                unflushed: Vec::new(),
                unflushed_bytes: 0,
                #[cfg(test)]
                flushed_bytes: 0,
                #[cfg(test)]
                log: Vec::new(),
                looked: None,
                done: Some(tx),
            }),
        });
        (h, rx)
    }

    /// Says more bytes may be written; cheap when hashing is already scheduled. The
    /// follower, if any, is told too.
    pub fn poke(self: &Arc<Self>) {
        self.advanced();
    }

    fn run(&self) {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        loop {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            if st.done.is_none() {
                return;
            }
            let prefix = self.blob.contiguous_prefix();
            let result = BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                while st.hasher.len() < prefix {
                    let at = st.hasher.len();
                    let to = prefix.min(at + HASH_STEP);
                    let st = &mut *st;
                    self.blob
                        .with_written(at..to, &mut buf, |bytes| st.hasher.update(bytes))?;
                    self.write_back(st);
                }
                Ok::<_, io::Error>(())
            });
            self.write_back(&mut st);
            if let Err(e) = result {
                if let Some(tx) = st.done.take() {
                    let _ = tx.send(Err(e));
                }
                return;
            }
            if st.hasher.len() == self.blob.size() {
                let hasher = std::mem::take(&mut st.hasher);
                if let Some(tx) = st.done.take() {
                    let _ = tx.send(Ok(hasher.finish()));
                }
                return;
            }
            let hashed = st.hasher.len();
            drop(st);
            tracing::trace!(hashed, of = self.blob.size(), partial = %self.blob.partial_path().display(), "hashed up to the written prefix");
            // A read-modify-write (not a plain store) so that it and a writer's swap in
            // poke() are ordered: one of the two always sees the other.
            self.scheduled.swap(false, Ordering::AcqRel);
            // A write that landed after our last look, whose poke saw `scheduled` still set.
            if self.blob.contiguous_prefix() > hashed
                && !self.scheduled.swap(true, Ordering::AcqRel)
            {
                continue;
            }
            return;
        }
    }
}

impl InOrderHasher {
    /// Hands every [`WRITEBACK_STEP`] whose bytes are all written (hashed or not) to the
    /// kernel for writeback, once, and has what was written back flushed every
    /// [`FLUSH_STEP`], so the fsync before the rename finds little left to do. Looks at
    /// most every [`WRITEBACK_LOOK`].
    fn write_back(&self, st: &mut HashState) {
        let now = std::time::Instant::now();
        if st
            .looked
            .is_some_and(|t| now.duration_since(t) < WRITEBACK_LOOK)
        {
            return;
        }
        st.looked = Some(now);
        let size = self.blob.size();
        // Steps are aligned in the file: where the blob starts in it (a region of an archive
        // starts anywhere), the first step is short.
        let shift = self.blob.offset() % WRITEBACK_STEP;
        if st.written_back.is_empty() {
            st.written_back = vec![false; (size + shift).div_ceil(WRITEBACK_STEP) as usize];
        }
        let bounds = |step: u64| {
            let start = (step * WRITEBACK_STEP).saturating_sub(shift);
            let end = ((step + 1) * WRITEBACK_STEP - shift).min(size);
            (start, end)
        };
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        for r in self.blob.written().iter() {
            // The first step that starts at or after r.start.
            let mut step = if r.start == 0 {
                0
            } else {
                (r.start + shift).div_ceil(WRITEBACK_STEP)
            };
            loop {
                let (start, end) = bounds(step);
                if start >= end || end > r.end {
                    break;
                }
                if let Some(done) = st.written_back.get_mut(step as usize) {
                    if !*done {
                        *done = true;
                        match runs.last_mut() {
                            Some(last) if last.end == start => last.end = end,
                            _ => runs.push(start..end),
                        }
                    }
                }
                step += 1;
            }
        }
        for run in runs {
            #[cfg(test)]
            st.log.push(run.clone());
            self.blob.write_back(run.clone());
            st.unflushed_bytes += run.end - run.start;
            st.unflushed.push(run);
        }
        if st.unflushed_bytes >= FLUSH_STEP && self.blob.flush_behind(&st.unflushed) {
            #[cfg(test)]
            {
                st.flushed_bytes += st.unflushed_bytes;
            }
            st.unflushed.clear();
            st.unflushed_bytes = 0;
        }
    }
}

impl PrefixConsumer for InOrderHasher {
    fn advanced(&self) {
        if let Some(f) = &self.follower {
            f.advanced();
        }
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            if let Some(me) = self.me.upgrade() {
                self.pool.spawn(move || me.run());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write::SpanWriter;

    /// Every job runs once, on the pool's named threads, whoever spawns it; once the pool
    /// is dropped its threads finish the queue and end.
    #[test]
    fn the_pool_runs_every_job_once_and_ends_when_dropped() {
        use std::sync::atomic::AtomicUsize;
        let pool = Arc::new(HashPool::new(2).unwrap());
        let ran = Arc::new(AtomicUsize::new(0));
        let names = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (pool, ran, names, tx) = (&pool, &ran, &names, tx.clone());
                s.spawn(move || {
                    for _ in 0..250 {
                        let (ran, names, tx) = (ran.clone(), names.clone(), tx.clone());
                        pool.spawn(move || {
                            let me = std::thread::current();
                            names
                                .lock()
                                .unwrap()
                                .insert(me.name().unwrap_or("").to_string());
                            ran.fetch_add(1, Ordering::SeqCst);
                            let _ = tx.send(());
                        });
                    }
                });
            }
        });
        for _ in 0..1000 {
            rx.recv_timeout(std::time::Duration::from_secs(10))
                .expect("a job never ran");
        }
        assert_eq!(ran.load(Ordering::SeqCst), 1000);
        let names = names.lock().unwrap().clone();
        assert!(
            !names.is_empty() && names.iter().all(|n| n.starts_with("fastpull-hash-")),
            "{names:?}"
        );
        let shared = Arc::downgrade(&pool.shared);
        drop(pool);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while shared.strong_count() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the threads did not end"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn incremental_equals_one_shot() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut h = Hasher::new();
        for chunk in data.chunks(333) {
            h.update(chunk);
        }
        assert_eq!(h.len(), data.len() as u64);
        assert_eq!(h.finish(), Digest::of(&data));
    }

    #[tokio::test]
    async fn in_order_hasher_follows_out_of_order_spans() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Arc::new(HashPool::new(2).unwrap());
        for (size, piece) in [
            (0u64, 10u64),
            (1, 10),
            (10, 10),
            (11, 10),
            (5000, 64),
            (3 << 20, 1 << 20),
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 253) as u8).collect();
            let blob =
                BlobFile::create(&dir.path().join("p"), &dir.path().join("f"), size).unwrap();
            let (h, rx) = InOrderHasher::new(blob.clone(), pool.clone());
            // Cut the blob into pieces (from the top down), then write the last piece first.
            let first = blob.writer().unwrap();
            let mut writers = vec![];
            let mut at = size.div_ceil(piece).saturating_sub(1) * piece;
            while at > 0 {
                writers.push(blob.split(&first.span(), at).unwrap());
                at -= piece;
            }
            writers.push(first);
            for mut w in writers {
                let r = w.range();
                for part in data[r.start as usize..r.end as usize].chunks(7) {
                    assert_eq!(w.append(part).unwrap(), part.len());
                    h.poke();
                }
            }
            h.poke();
            let digest = rx.await.unwrap().unwrap();
            assert_eq!(digest, Digest::of(&data), "size {size} piece {piece}");
        }
    }

    /// The runs a hasher wrote back, by start, checked never to overlap.
    fn written_back_once(st: &HashState) -> Vec<std::ops::Range<u64>> {
        let mut runs = st.log.clone();
        runs.sort_by_key(|r| r.start);
        assert!(runs.windows(2).all(|w| w[0].end <= w[1].start), "{runs:?}");
        runs
    }

    /// A step written whole is written back before the hashed prefix reaches it (pieces
    /// arrive out of order; the disk must not wait for the slowest), once; the hasher then
    /// reads its bytes back through the map (unmapped by the write-back) and the digest is
    /// right.
    #[tokio::test]
    async fn whole_steps_are_written_back_before_the_hasher_reaches_them() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Arc::new(HashPool::new(2).unwrap());
        let size = 3 * WRITEBACK_STEP + 12345;
        let data: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
        let blob = BlobFile::create(&dir.path().join("p"), &dir.path().join("f"), size).unwrap();
        let (h, rx) = InOrderHasher::new(blob.clone(), pool);
        let first = blob.writer().unwrap();
        let mut third = blob.split(&first.span(), 2 * WRITEBACK_STEP).unwrap();
        let mut second = blob.split(&first.span(), WRITEBACK_STEP / 2).unwrap();
        let mut first = first;
        let steps = |h: &InOrderHasher| h.state.lock().unwrap().written_back.clone();
        let write = |w: &mut SpanWriter| {
            let r = w.range();
            for part in data[r.start as usize..r.end as usize].chunks(1 << 20) {
                assert_eq!(w.append(part).unwrap(), part.len());
            }
        };
        // The last two steps (the blob's short tail is a step too) are all written; the
        // first two are not (the first piece has not started).
        write(&mut third);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while steps(&h) != [false, false, true, true] {
            assert!(std::time::Instant::now() < deadline, "{:?}", steps(&h));
            std::thread::sleep(WRITEBACK_LOOK);
            h.poke();
        }
        assert_eq!(
            h.state.lock().unwrap().hasher.len(),
            0,
            "nothing hashed yet"
        );
        // The second piece completes step 1 (it starts in step 0, which stays unwritten).
        write(&mut second);
        while steps(&h) != [false, true, true, true] {
            assert!(std::time::Instant::now() < deadline, "{:?}", steps(&h));
            std::thread::sleep(WRITEBACK_LOOK);
            h.poke();
        }
        write(&mut first);
        // Past the last look's throttle: the hasher's first look finds every step whole
        // (else a fast hash of the short first piece could end inside it).
        std::thread::sleep(WRITEBACK_LOOK);
        h.poke();
        assert_eq!(rx.await.unwrap().unwrap(), Digest::of(&data));
        // Every byte was written back once (the blob's steps, in runs that never overlap),
        // and the first FLUSH_STEP of them were flushed behind the writers.
        let st = h.state.lock().unwrap();
        let runs = written_back_once(&st);
        assert_eq!(runs.iter().map(|r| r.end - r.start).sum::<u64>(), size);
        assert!(
            st.flushed_bytes >= FLUSH_STEP,
            "flushed {}",
            st.flushed_bytes
        );
        assert_eq!(st.flushed_bytes + st.unflushed_bytes, size);
    }

    /// In a region of an archive that starts anywhere, the steps written back are aligned
    /// in the file (neighbouring steps share no page), the first one short, and together
    /// they are the whole blob.
    #[tokio::test]
    async fn steps_of_a_region_are_aligned_in_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Arc::new(HashPool::new(2).unwrap());
        let (base, size) = (3 * 512 + WRITEBACK_STEP, 2 * WRITEBACK_STEP + 777);
        let path = dir.path().join("archive");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(base + size + 4096).unwrap();
        let blob = BlobFile::region(Arc::new(file), &path, base, size).unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i * 17 % 241) as u8).collect();
        let (h, rx) = InOrderHasher::new(blob.clone(), pool);
        let mut w = blob.writer().unwrap();
        // All but the last step: the first two steps are written back.
        let cut = (size - 1000) as usize;
        for part in data[..cut].chunks(1 << 20) {
            assert_eq!(w.append(part).unwrap(), part.len());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            h.poke();
            std::thread::sleep(WRITEBACK_LOOK);
            let st = h.state.lock().unwrap();
            assert_eq!(
                st.written_back.len(),
                3,
                "a short step, a whole one, a short one"
            );
            if st.written_back[..2] == [true, true] {
                assert!(!st.written_back[2]);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                st.written_back
            );
        }
        assert_eq!(w.append(&data[cut..]).unwrap(), size as usize - cut);
        h.poke();
        assert_eq!(rx.await.unwrap().unwrap(), Digest::of(&data));
        let st = h.state.lock().unwrap();
        let runs = written_back_once(&st);
        assert_eq!(runs.first().map(|r| r.start), Some(0));
        for r in &runs {
            for at in [r.start, r.end] {
                assert!(
                    at == 0 || at == size || (base + at) % WRITEBACK_STEP == 0,
                    "{r:?} is not aligned in the file"
                );
            }
        }
        // The first step ends where the file's next step begins, not a step into the blob.
        assert!(
            runs[0].end == WRITEBACK_STEP - base % WRITEBACK_STEP
                || runs[0].end == 2 * WRITEBACK_STEP - base % WRITEBACK_STEP
        );
    }

    /// The follower of a hasher hears of every poke, and the digest is unchanged.
    #[tokio::test]
    async fn a_follower_is_poked_with_the_hasher() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl PrefixConsumer for Count {
            fn advanced(&self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let pool = Arc::new(HashPool::new(1).unwrap());
        let data = vec![7u8; 10_000];
        let blob = BlobFile::create(&dir.path().join("p"), &dir.path().join("f"), 10_000).unwrap();
        let count = Arc::new(Count(Default::default()));
        let (h, rx) = InOrderHasher::with_follower(blob.clone(), pool, Some(count.clone()));
        let mut w = blob.writer().unwrap();
        for part in data.chunks(1000) {
            w.append(part).unwrap();
            h.poke();
        }
        assert_eq!(rx.await.unwrap().unwrap(), Digest::of(&data));
        assert_eq!(count.0.load(Ordering::SeqCst), 10);
    }

    #[test]
    fn file_matches_checks_size_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        std::fs::write(&p, b"hello").unwrap();
        let d = Digest::of(b"hello");
        assert!(file_matches(&p, &d, 5).unwrap());
        assert!(!file_matches(&p, &d, 4).unwrap());
        assert!(!file_matches(&p, &Digest::of(b"hellO"), 5).unwrap());
        assert!(!file_matches(&dir.path().join("missing"), &d, 5).unwrap());
    }
}
