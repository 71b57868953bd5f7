//! A layer's bytes to its uncompressed tar stream, hashed on the way for the diff_id.
//!
//! gzip: flate2's `bufread::MultiGzDecoder` on the zlib-rs backend (multi-member streams,
//! as Go's gzip reads them; garbage after the last member is an error, as in Go). zstd: the
//! `zstd` crate (libzstd), which reads several frames and skips skippable ones. The media
//! type says which, and the first bytes must agree. benches/decompress.rs measures both
//! against the alternatives (perf/DECOMPRESS.md).
//!
//! Decompression bombs: [`Ratio`] ends a layer whose uncompressed stream grows past
//! [`DEFAULT_MAX_RATIO`] (or the pull's own bound) times the compressed bytes read so far,
//! plus [`RATIO_SLACK`]. deflate cannot expand more than 1032:1, so no well-formed gzip layer
//! is refused by default; zstd can (about 32 768:1 for long runs of one byte), and such a
//! layer is refused with a message that says how to raise the bound.

use std::io::{self, BufRead, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use crate::digest::Digest;
use crate::verify::Hasher;

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    /// A plain tar.
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// A zstd skippable frame starts with 0x184D2A50..=0x184D2A5F (little endian).
fn zstd_skippable(head: &[u8]) -> bool {
    head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18]
}

/// What the first bytes of a blob look like.
fn sniff(head: &[u8]) -> Compression {
    if head.starts_with(&GZIP_MAGIC) {
        Compression::Gzip
    } else if head.starts_with(&ZSTD_MAGIC) || zstd_skippable(head) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// The compression `media_type` names and `head` (the blob's first bytes) shows; they must
/// agree. Media types that name none (`…layer.v1.tar`, `…rootfs.diff.tar`, unknown ones) go
/// by the bytes.
pub(crate) fn detect(media_type: &str, head: &[u8]) -> Result<Compression, String> {
    let seen = sniff(head);
    let named = if media_type.ends_with("gzip") {
        Some(Compression::Gzip)
    } else if media_type.ends_with("zstd") {
        Some(Compression::Zstd)
    } else if media_type.ends_with("tar") {
        Some(Compression::None)
    } else {
        None
    };
    match named {
        Some(c) if c != seen => Err(format!(
            "media type {media_type} says {c:?} but the blob starts like {seen:?} data"
        )),
        Some(c) => Ok(c),
        None => Ok(seen),
    }
}

/// How much one read of a layer blob asks for: the capacity of the `BufReader` the
/// decoders read from, and what one [`crate::prefix::PrefixReader`] read copies at most.
pub(crate) const BLOB_BUF: usize = 1 << 20;

/// The uncompressed stream of `blob` (a buffered reader over the verified blob).
pub(crate) fn decoder<'a, R: BufRead + Send + 'a>(
    c: Compression,
    blob: R,
) -> io::Result<Box<dyn Read + Send + 'a>> {
    Ok(match c {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(blob)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(blob)?),
    })
}

/// The most uncompressed bytes a layer may give per compressed byte read, unless the pull
/// says otherwise: above deflate's own bound (1032:1), so that only zstd can reach it.
pub(crate) const DEFAULT_MAX_RATIO: u64 = 1100;

/// Uncompressed bytes allowed before any ratio applies (a tiny layer's tar end blocks, say).
pub(crate) const RATIO_SLACK: u64 = 1 << 20;

/// Counts the compressed bytes read from `inner` into a shared cell.
pub(crate) struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Counted<R> {
    /// `inner`, and the cell that tells how much has been read from it.
    pub(crate) fn new(inner: R) -> (Counted<R>, Arc<AtomicU64>) {
        let read = Arc::new(AtomicU64::new(0));
        (
            Counted {
                inner,
                read: read.clone(),
            },
            read,
        )
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The uncompressed stream, failing once it has given more than `max` bytes per compressed
/// byte read (see the module doc); 0 is no bound.
pub(crate) struct Ratio<R> {
    inner: R,
    compressed: Arc<AtomicU64>,
    out: u64,
    max: u64,
}

impl<R: Read> Ratio<R> {
    pub(crate) fn new(inner: R, compressed: Arc<AtomicU64>, max: u64) -> Ratio<R> {
        Ratio {
            inner,
            compressed,
            out: 0,
            max,
        }
    }
}

impl<R: Read> Read for Ratio<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out += n as u64;
        let allowed = self
            .compressed
            .load(Ordering::Relaxed)
            .saturating_mul(self.max)
            .saturating_add(RATIO_SLACK);
        if self.max > 0 && self.out > allowed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "decompression bomb: {} uncompressed bytes from {} compressed (more than \
                     {}:1; if the layer is legitimate, raise --max-unpack-ratio or \
                     ClientBuilder::max_unpack_ratio, 0 for no bound)",
                    self.out,
                    self.compressed.load(Ordering::Relaxed),
                    self.max
                ),
            ));
        }
        Ok(n)
    }
}

/// A layer blob's uncompressed stream, opened as `apply_layer` opens it (a `BLOB_BUF`
/// buffer, the first bytes checked against `media_type`, `decoder`), for
/// benches/decompress.rs.
#[cfg(feature = "bench-internals")]
pub fn layer_stream<'a, R: Read + Send + 'a>(
    media_type: &str,
    blob: R,
) -> io::Result<Box<dyn Read + 'a>> {
    let mut blob = io::BufReader::with_capacity(BLOB_BUF, blob);
    let c = detect(media_type, blob.fill_buf()?).map_err(io::Error::other)?;
    Ok(decoder(c, blob)?)
}

/// Bytes the threads of [`Hashed`] hand over at a time.
const PIECE: usize = 256 << 10;

/// Pieces a layer's pipeline may always have (reading thread → hashing thread → parser:
/// the one the parser takes from, the one the hasher holds, the one the reading thread
/// fills, and a few waiting between them): 1.75 MiB a layer.
const OWN_PIECES: usize = 7;

/// Pieces more, shared by every layer being unpacked in this process (32 MiB): lent to a
/// layer's reading thread when none of its own is free, back to the reserve when the piece
/// is dropped (wherever it is). A layer keeps the lent pieces its parser hands back for its
/// next ones, and lets them go when another layer waits for the reserve ([`WANTED`]) and
/// its reading thread asks for its next piece. First come, first served: a layer whose
/// parser is the slowest stage may keep the reserve for as long as it unpacks.
///
/// Why: the three stages run at the pace of the slowest one only if each can run ahead of
/// the next for longer than the scheduler keeps it off a core. With 1.75 MiB between them
/// (under a millisecond of work), every stage preempted on a machine busy with the download
/// stalled the other two, and a 1 GiB layer's unpack, behind the download by 0.2 s of its
/// 1.6 s at the last byte, finished a median 10–13% of the pull after it; with 32 MiB more,
/// 0–2% (perf/README "The unpack's stages run ahead of each other"). Pieces alive are at
/// most [`OWN_PIECES`] a layer being unpacked plus these, whatever the layers' count.
const SPARE_PIECES: usize = 128;

/// The pieces of [`SPARE_PIECES`] not lent.
static SPARE: AtomicUsize = AtomicUsize::new(SPARE_PIECES);

/// Set by a reading thread that found the reserve empty and waits; cleared whenever a
/// piece is lent (to any layer). Layers keep lent pieces their parser handed back only
/// while it is clear.
static WANTED: AtomicBool = AtomicBool::new(false);

/// A piece's bytes; one lent by the reserve goes back to it when dropped, wherever that is
/// (a channel, the parser, a thread that ended).
#[derive(Default)]
struct Buf {
    bytes: Vec<u8>,
    lent: bool,
}

impl Buf {
    /// A new piece of the layer's own.
    fn own() -> Buf {
        Buf::default()
    }

    /// A new piece lent by the reserve, if it has one left.
    fn lent() -> Option<Buf> {
        SPARE
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()
            .map(|_| Buf {
                bytes: Vec::new(),
                lent: true,
            })
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.lent {
            SPARE.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// How long a reading thread waits for a piece back before it looks again at the reserve
/// and whether the parser is gone.
const WAIT_BACK: Duration = Duration::from_millis(50);

/// The pieces of one layer's reading thread.
struct Buffers {
    /// Pieces the parser is done with.
    returned: mpsc::Receiver<Buf>,
    /// Pieces of the layer's own made so far.
    made: usize,
    /// Pieces of its own back from the parser and not in use.
    free: Vec<Buf>,
    /// Pieces lent by the reserve back from the parser and not in use.
    lent: Vec<Buf>,
}

impl Buffers {
    /// The next piece to fill: one of the layer's own that is free or new, else one lent
    /// by the reserve (one the parser handed back, or a new one), else the next one back
    /// from the parser. Lent pieces the parser handed back are kept for the next pieces
    /// unless a layer is waiting for the reserve: then they go back to it (a layer holds
    /// the reserve only for pieces on their way to its parser, or while nobody else wants
    /// them; letting them go and being lent new ones on every round would allocate and
    /// zero a piece each time). `None` once the parser is gone.
    fn next(&mut self, gone: &AtomicBool) -> Option<Buf> {
        let wanted = WANTED.load(Ordering::Relaxed);
        for buf in self.returned.try_iter() {
            if !buf.lent {
                self.free.push(buf);
            } else if !wanted {
                self.lent.push(buf);
            } // else dropped: back to the reserve
        }
        if wanted {
            self.lent.clear();
        }
        loop {
            if gone.load(Ordering::Relaxed) {
                return None;
            }
            if let Some(buf) = self.free.pop().or_else(|| self.lent.pop()) {
                return Some(buf);
            }
            if self.made < OWN_PIECES {
                self.made += 1;
                return Some(Buf::own());
            }
            if let Some(buf) = Buf::lent() {
                WANTED.store(false, Ordering::Relaxed);
                return Some(buf);
            }
            WANTED.store(true, Ordering::Relaxed);
            match self.returned.recv_timeout(WAIT_BACK) {
                Ok(buf) => return Some(buf),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }
}

/// What the reading thread hands the hashing thread.
enum Raw {
    /// The next bytes.
    Data(Buf),
    /// The end of the stream.
    End,
    /// Reading failed.
    Failed(io::Error),
}

/// What the hashing thread hands the parser.
enum Piece {
    /// The next bytes.
    Data(Buf),
    /// The end of the stream: its sha256 and length.
    End(Digest, u64),
    /// Reading failed.
    Failed(io::Error),
}

/// An uncompressed layer stream read to its end on a thread of its own and hashed (sha256:
/// the diff_id) on another, ahead of the tar parser that reads from this by up to
/// [`OWN_PIECES`] pieces of its own (the parser's current one among them), and as many more
/// as the shared reserve ([`SPARE_PIECES`]) lends.
///
/// Why: a layer's bytes each cost a read of the blob, the decompression, the diff_id's
/// sha256 and, on the parser's side, a write into the tree; on one thread those took longer
/// than a loopback download of the same bytes on 2 cores, so the unpack fell behind and
/// finished a median 0.49 s after the last byte of a 1 GiB layer, 0.20 s with the reading
/// and hashing on a thread beside the parser's (perf/README "The unpack's hashing on a
/// thread of its own"). That thread was then the slowest of the three stages (0.8 s of CPU
/// per GiB, sha256 most of it): reading and hashing on threads of their own, the
/// unpack trailed the download by a median 0.21 s instead of 0.31 (perf/README "The
/// diff_id's sha256 on a thread of its own"), and by nothing once the stages could run ahead
/// of each other by more than a scheduler's time slice ([`SPARE_PIECES`]). The reading
/// thread reads everything to the end, trailing bytes after the tar's end included (umoci
/// hashes them too). It stops when the stream ends or fails, or after its current read once
/// this is dropped (a layer that failed or must be applied another way); the hashing thread
/// ends with it.
pub(crate) struct Hashed {
    pieces: mpsc::Receiver<Piece>,
    /// Set when this is dropped: the reading thread stops after its current read.
    gone: Arc<AtomicBool>,
    /// Emptied buffers, back to the thread.
    back: mpsc::Sender<Buf>,
    /// The piece being read from, and how far.
    buf: Buf,
    pos: usize,
    /// The end, once reached: the digest and length, or what failed (kind and message).
    end: Option<Result<(Digest, u64), (io::ErrorKind, String)>>,
}

impl Hashed {
    /// Starts reading `inner` on one thread of `scope` and hashing it on another.
    pub(crate) fn spawn<'scope, R: Read + Send + 'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        mut inner: R,
    ) -> io::Result<Hashed> {
        // Room for every piece a layer can have (what bounds them is OWN_PIECES and SPARE),
        // so that no piece is ever sent into a full channel.
        let (tx, pieces) = mpsc::sync_channel(OWN_PIECES + SPARE_PIECES);
        let (raw_tx, raw) = mpsc::sync_channel::<Raw>(OWN_PIECES + SPARE_PIECES);
        let (back, returned) = mpsc::channel::<Buf>();
        let gone = Arc::new(AtomicBool::new(false));
        let reader_gone = gone.clone();
        // The hashing thread: the pieces as read, hashed, on to the parser. It ends when
        // the reading thread does, or when the parser is gone. Started first: should the
        // reading thread not start, its end of the channel is dropped and this one ends.
        std::thread::Builder::new()
            .name("fastpull-diffid".into())
            .spawn_scoped(scope, move || {
                let mut hasher = Hasher::new();
                for piece in raw {
                    let next = match piece {
                        Raw::Data(buf) => {
                            hasher.update(&buf.bytes);
                            Piece::Data(buf)
                        }
                        Raw::End => {
                            let bytes = hasher.len();
                            Piece::End(std::mem::take(&mut hasher).finish(), bytes)
                        }
                        Raw::Failed(e) => Piece::Failed(e),
                    };
                    let last = !matches!(next, Piece::Data(_));
                    if tx.send(next).is_err() || last {
                        return; // the reader is gone, or the stream ended
                    }
                }
            })?;
        // The reading thread: the blob, decompressed, in pieces.
        std::thread::Builder::new()
            .name("fastpull-inflate".into())
            .spawn_scoped(scope, move || {
                let mut buffers = Buffers {
                    returned,
                    made: 0,
                    free: Vec::new(),
                    lent: Vec::new(),
                };
                loop {
                    let Some(mut buf) = buffers.next(&reader_gone) else {
                        return; // the reader is gone
                    };
                    buf.bytes.resize(PIECE, 0);
                    let (mut len, mut failed) = (0, None);
                    while len < PIECE {
                        // A read of a download in progress waits for its next bytes: the reader
                        // gone, nothing more is read (the layer's thread joins this).
                        if reader_gone.load(Ordering::Relaxed) {
                            return;
                        }
                        match inner.read(&mut buf.bytes[len..]) {
                            Ok(0) => break,
                            Ok(n) => len += n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    // The bytes before a failure go first, so that the parser meets it where it
                    // happened.
                    if len > 0 {
                        buf.bytes.truncate(len);
                        if raw_tx.send(Raw::Data(buf)).is_err() {
                            return; // the reader is gone
                        }
                    }
                    if let Some(e) = failed {
                        let _ = raw_tx.send(Raw::Failed(e));
                        return;
                    }
                    if len < PIECE {
                        let _ = raw_tx.send(Raw::End);
                        return;
                    }
                }
            })?;
        Ok(Hashed {
            pieces,
            gone,
            back,
            buf: Buf::default(),
            pos: 0,
            end: None,
        })
    }

    /// Reads what is left to the end, then gives the digest and byte count.
    pub(crate) fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        match self.end.take() {
            Some(Ok(end)) => Ok(end),
            Some(Err((kind, msg))) => Err(io::Error::new(kind, msg)),
            None => Err(io::Error::other("the stream did not end")),
        }
    }
}

impl Drop for Hashed {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::Relaxed);
    }
}

impl Read for Hashed {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.buf.bytes.len() {
                let n = out.len().min(self.buf.bytes.len() - self.pos);
                out[..n].copy_from_slice(&self.buf.bytes[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            match &self.end {
                Some(Ok(_)) => return Ok(0),
                Some(Err((kind, msg))) => return Err(io::Error::new(*kind, msg.clone())),
                None => {}
            }
            if !self.buf.bytes.is_empty() {
                // The thread may have ended: then the buffer is simply dropped.
                let _ = self.back.send(std::mem::take(&mut self.buf));
            }
            match self.pieces.recv() {
                Ok(Piece::Data(buf)) => (self.buf, self.pos) = (buf, 0),
                Ok(Piece::End(digest, bytes)) => self.end = Some(Ok((digest, bytes))),
                Ok(Piece::Failed(e)) => {
                    self.end = Some(Err((e.kind(), e.to_string())));
                    return Err(e);
                }
                Err(_) => {
                    self.end = Some(Err((
                        io::ErrorKind::Other,
                        "the thread reading the layer stopped".into(),
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_and_magic_must_agree() {
        let gz = [0x1f, 0x8b, 8, 0];
        let zs = [0x28, 0xb5, 0x2f, 0xfd];
        let tar = *b"etc/";
        let oci = "application/vnd.oci.image.layer.v1.tar";
        let docker = "application/vnd.docker.image.rootfs.diff.tar.gzip";
        assert_eq!(detect(&format!("{oci}+gzip"), &gz), Ok(Compression::Gzip));
        assert_eq!(detect(docker, &gz), Ok(Compression::Gzip));
        assert_eq!(detect(&format!("{oci}+zstd"), &zs), Ok(Compression::Zstd));
        assert_eq!(
            detect(&format!("{oci}+zstd"), &[0x5e, 0x2a, 0x4d, 0x18]),
            Ok(Compression::Zstd)
        );
        assert_eq!(detect(oci, &tar), Ok(Compression::None));
        assert!(detect(&format!("{oci}+gzip"), &tar).is_err());
        assert!(detect(&format!("{oci}+zstd"), &gz).is_err());
        assert!(detect(oci, &gz).is_err());
        assert_eq!(
            detect("application/octet-stream", &zs),
            Ok(Compression::Zstd)
        );
    }

    /// The bytes and the digest through the hashing thread are the stream's, trailing bytes
    /// the reader never asked for included; a failure of the stream reaches the reader
    /// where it happened, and `finish` again.
    #[test]
    fn hashed_gives_the_stream_and_its_digest() {
        let data: Vec<u8> = (0..3 * PIECE + 12_345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let (head, digest, len) = std::thread::scope(|s| {
            let mut h = Hashed::spawn(s, &data[..]).unwrap();
            let mut head = vec![0; PIECE + 10];
            h.read_exact(&mut head).unwrap();
            let (digest, len) = h.finish().unwrap();
            (head, digest, len)
        });
        assert_eq!(head, data[..PIECE + 10]);
        assert_eq!((digest, len), (Digest::of(&data), data.len() as u64));

        /// `ok` bytes, then an error.
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "bad block"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(1);
                self.0 -= n;
                Ok(n)
            }
        }
        std::thread::scope(|s| {
            let mut h = Hashed::spawn(s, Failing(PIECE + 5)).unwrap();
            let mut got = Vec::new();
            let e = h.read_to_end(&mut got).unwrap_err();
            assert_eq!(
                (e.kind(), got.len()),
                (io::ErrorKind::InvalidData, PIECE + 5)
            );
            let e = h.finish().unwrap_err();
            assert!(e.to_string().contains("bad block"), "{e}");
        });
    }

    /// A reader dropped before the end (a layer that failed, or is to be applied another
    /// way) stops the thread, even on an endless stream: the scope ends.
    #[test]
    fn a_dropped_hashed_stops_its_thread() {
        let _alone = reserve_alone();
        assert!(
            scope_ends(io::repeat(7), |mut h| {
                let mut b = [0; 100];
                h.read_exact(&mut b).unwrap();
            }),
            "the hashing thread went on after its reader was dropped"
        );
    }

    /// Whether a scope in which `use_it` is given a [`Hashed`] of `stream` (and drops it)
    /// ends within 20 s: the scope joins the hashing thread.
    fn scope_ends(stream: impl Read + Send + 'static, use_it: fn(Hashed)) -> bool {
        let (done, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            std::thread::scope(|s| use_it(Hashed::spawn(s, stream).unwrap()));
            let _ = done.send(());
        });
        ended
            .recv_timeout(std::time::Duration::from_secs(20))
            .is_ok()
    }

    /// Tests that hold much of the shared reserve run one at a time (other tests' layers
    /// borrow little of it, and briefly).
    static RESERVE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn reserve_alone() -> std::sync::MutexGuard<'static, ()> {
        RESERVE.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (up to 20 s) until `read` holds at least `at_least` bytes; what it holds then.
    fn read_at_least(read: &AtomicU64, at_least: u64) -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while read.load(Ordering::Relaxed) < at_least && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        read.load(Ordering::Relaxed)
    }

    /// A parser that stops reading for a while (its thread off the core) does not stop the
    /// reading and hashing threads at once: they run ahead into the shared reserve, past the
    /// layer's own pieces and no further than both; a layer whose pieces are dropped gives
    /// the reserve back, so the next one runs ahead as far. (Red with no reserve, or with
    /// one never given back: the second layer stops at its own pieces.)
    #[test]
    fn the_stages_run_ahead_into_the_shared_reserve_and_give_it_back() {
        let _alone = reserve_alone();
        let own = (OWN_PIECES * PIECE) as u64;
        let most = ((OWN_PIECES + SPARE_PIECES) * PIECE) as u64;
        let mut first = 0;
        for layer in ["first", "second"] {
            let (stream, read) = Counted::new(io::repeat(7));
            std::thread::scope(|s| {
                let h = Hashed::spawn(s, stream).unwrap();
                // As far as the first went (other tests' layers may hold a little of the
                // reserve for a moment).
                read_at_least(&read, (own + 1).max(first));
                std::thread::sleep(std::time::Duration::from_millis(200));
                let ahead = read.load(Ordering::Relaxed);
                assert!(
                    ahead > own && ahead >= first,
                    "the {layer} layer read {ahead} bytes ahead of its parser: no more than \
                     its own pieces ({own}), or less than the first layer ({first})"
                );
                assert!(
                    ahead <= most,
                    "the {layer} layer read {ahead} bytes ahead of its parser, past its own \
                     pieces and the reserve ({most})"
                );
                first = first.max(ahead - PIECE as u64);
                drop(h);
            });
        }
    }

    /// A layer whose reading thread has read to its end while its pieces still wait for its
    /// parser keeps the reserve's pieces it was lent until they are read: a layer started
    /// beside it runs ahead by no more than what is left (red when the reserve is given back
    /// as the reading thread ends: the second layer would take all of it again, and pieces
    /// alive would no longer be bounded by the reserve).
    #[test]
    fn pieces_lent_stay_lent_until_read_after_the_reading_thread_ends() {
        let _alone = reserve_alone();
        let pieces = OWN_PIECES + SPARE_PIECES / 2;
        // Not a whole number of pieces: the last read that finds the end needs no new piece.
        let data = vec![5u8; pieces * PIECE - 1];
        let (first, first_read) = Counted::new(&data[..]);
        std::thread::scope(|s| {
            let done = Hashed::spawn(s, first).unwrap();
            assert_eq!(
                read_at_least(&first_read, data.len() as u64),
                data.len() as u64
            );
            // Its reading thread ends once that last read has found the end.
            std::thread::sleep(std::time::Duration::from_millis(100));
            let (second, second_read) = Counted::new(io::repeat(7));
            std::thread::scope(|s2| {
                let h = Hashed::spawn(s2, second).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(300));
                let ahead = second_read.load(Ordering::Relaxed);
                let most = ((OWN_PIECES + SPARE_PIECES - (pieces - OWN_PIECES)) * PIECE) as u64;
                assert!(
                    ahead <= most,
                    "a second layer read {ahead} bytes ahead while the first's {pieces} \
                     pieces waited for its parser (at most {most})"
                );
                drop(h);
            });
            let (digest, len) = done.finish().unwrap();
            assert_eq!((digest, len), (Digest::of(&data), data.len() as u64));
        });
    }

    /// A reader dropped while the stream trickles (a download in progress, a byte at a time)
    /// stops the thread after its current read, not once a whole piece has come: the
    /// layer's thread, which joins it, is not held for the download. (Red without the flag
    /// `Drop` sets: the piece would take 20 minutes to fill.)
    #[test]
    fn a_dropped_hashed_stops_its_thread_on_a_trickle() {
        struct Trickle;
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                std::thread::sleep(std::time::Duration::from_millis(5));
                buf[0] = 1;
                Ok(1)
            }
        }
        assert!(
            scope_ends(Trickle, |h| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                drop(h);
            }),
            "the hashing thread waited for a whole piece after its reader was dropped"
        );
    }

    #[test]
    fn gzip_members_are_all_read() {
        use std::io::Write;
        let mut out = Vec::new();
        for part in [&b"hello "[..], b"world"] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).unwrap();
            out.extend(e.finish().unwrap());
        }
        let mut s = String::new();
        decoder(Compression::Gzip, &out[..])
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello world");
    }

    /// Reads `c`-compressed `data` to the end through the bound, as `apply_layer` does.
    fn bounded(c: Compression, data: &[u8], max: u64) -> io::Result<u64> {
        let (counted, read) = Counted::new(data);
        let stream = decoder(c, io::BufReader::with_capacity(64 << 10, counted))?;
        io::copy(&mut Ratio::new(stream, read, max), &mut io::sink())
    }

    #[test]
    fn a_decompression_bomb_is_stopped_and_the_densest_gzip_is_not() {
        // 64 MiB of one byte: zstd packs it into a few KiB (far past the bound); gzip into
        // ~64 KiB, at deflate's own limit, which stays under it.
        let big = vec![7u8; 64 << 20];
        let zs = zstd::encode_all(&big[..], 3).unwrap();
        let e = bounded(Compression::Zstd, &zs, DEFAULT_MAX_RATIO).unwrap_err();
        assert!(e.to_string().contains("decompression bomb"), "{e}");
        // The pull's own bound: lifted (0), the same bytes go through.
        assert_eq!(
            bounded(Compression::Zstd, &zs, 0).unwrap(),
            big.len() as u64
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, &big).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(
            bounded(Compression::Gzip, &gz, DEFAULT_MAX_RATIO).unwrap(),
            big.len() as u64
        );
        // A plain tar has ratio 1.
        assert_eq!(
            bounded(Compression::None, &big[..4 << 20], DEFAULT_MAX_RATIO).unwrap(),
            4 << 20
        );
    }

    #[test]
    fn zstd_frames_and_skippable_frames_are_read() {
        let mut out = vec![0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3];
        out.extend(zstd::encode_all(&b"hello "[..], 3).unwrap());
        out.extend(zstd::encode_all(&b"world"[..], 3).unwrap());
        let mut s = String::new();
        decoder(Compression::Zstd, &out[..])
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello world");
    }
}
