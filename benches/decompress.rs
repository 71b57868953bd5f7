//! Decompression backends for `--format rootfs` layers, on the same generated layer tars:
//! gzip (level 6) through fastpull's own path (`bench_internals::layer_stream`: flate2's
//! `bufread::MultiGzDecoder` on zlib-rs, fed reads of at most 1 MiB as a `PrefixReader`
//! hands them out) and through the same flate2 call over the whole buffer, against
//! miniz_oxide's streaming API, the system's zlib (libz-sys) and libdeflate
//! (whole-buffer: a ceiling, fastpull streams); zstd (level 3, with checksum) through
//! fastpull's path (libzstd, the `zstd` crate) and over the whole buffer, against ruzstd
//! (pure Rust). Every backend checks the format's checksum; the decoded stream is read as
//! the unpacker reads it, 64 KiB at a time, unless the name says otherwise. Throughput is
//! of decompressed bytes. The layers are generated here, the same on every machine: text
//! (source and config), binary (ELF-like code) and random (already compressed) members,
//! mixed, and each kind alone. perf/DECOMPRESS.md has the method and the numbers.

use std::hint::black_box;
use std::io::{self, BufReader, Read, Write};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use fastpull::bench_internals::layer_stream;

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// One read of the decoded stream: the unpacker's copy buffer (src/unpack/apply.rs).
const OUT: usize = 64 << 10;
/// The most one read of the blob returns (a `PrefixReader` read, the decoder's buffer).
const FEED: usize = 1 << 20;

/// The mixed layer's uncompressed size: 96 MiB under `cargo bench`, 1 MiB under
/// `cargo test --benches` (criterion then runs each bench once, unoptimised).
fn layer_size() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        96 << 20
    } else {
        1 << 20
    }
}

/// splitmix64: the same bytes everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Small values far more often than large ones, as with words and opcodes.
    fn skewed(&mut self, n: usize) -> usize {
        self.below(n) * self.below(n) / n
    }
}

const WORDS: &[&str] = &[
    "fn", "let", "mut", "self", "return", "if", "else", "for", "in", "while", "match", "struct",
    "impl", "pub", "use", "const", "static", "true", "false", "None", "Some", "Ok", "Err", "def",
    "class", "import", "from", "int", "char", "void", "unsigned", "size_t", "buffer", "length",
    "count", "index", "value", "result", "error", "config", "name", "path", "file", "data", "node",
    "list", "map", "key", "type", "string", "server", "client", "request", "response", "header",
    "version", "status", "default", "enable", "options", "the", "a", "is", "of", "to", "and",
    "this", "that", "when", "not", "be", "with", "on", "as", "are", "it", "by", "new", "get",
    "set", "init", "free", "alloc", "len", "size", "ptr", "args", "env", "user", "group", "mode",
    "time", "log", "debug", "info", "warn", "test", "main", "module", "package", "lib",
];
const SEPARATORS: &[&str] = &[
    " ", " ", " ", ", ", "(", ")", " = ", ".", "::", "->", ": ", "; ", " {", "}", "[", "]", " == ",
    " + ", "\"", "_",
];

/// Source-code- or config-like text: keywords, a file's own identifiers, comments,
/// indentation.
fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let idents: Vec<String> = (0..40)
        .map(|_| {
            let n = 3 + rng.below(8);
            (0..n)
                .map(|_| (b'a' + rng.below(26) as u8) as char)
                .collect()
        })
        .collect();
    let mut v = Vec::with_capacity(len + 256);
    let mut depth = 0usize;
    // Where recent lines start: code repeats itself.
    let mut lines: Vec<usize> = Vec::new();
    while v.len() < len {
        if lines.len() > 16 && rng.below(10) < 3 {
            let i = lines.len() - 2 - rng.below(15);
            let (a, b) = (lines[i], lines[i + 1]);
            lines.push(v.len());
            v.extend_from_within(a..b);
            continue;
        }
        lines.push(v.len());
        v.resize(v.len() + depth * 4, b' ');
        match rng.below(10) {
            0 => {
                v.extend_from_slice(b"// ");
                for _ in 0..4 + rng.below(9) {
                    v.extend_from_slice(WORDS[rng.below(WORDS.len())].as_bytes());
                    v.push(b' ');
                }
            }
            1 => {}
            _ => {
                for _ in 0..2 + rng.below(8) {
                    match rng.below(16) {
                        0..=6 => v.extend_from_slice(WORDS[rng.skewed(WORDS.len())].as_bytes()),
                        7..=14 => v.extend_from_slice(idents[rng.skewed(idents.len())].as_bytes()),
                        _ => v.extend_from_slice(rng.below(1000).to_string().as_bytes()),
                    }
                    v.extend_from_slice(SEPARATORS[rng.below(SEPARATORS.len())].as_bytes());
                }
            }
        }
        v.push(b'\n');
        depth = match rng.below(6) {
            0 => depth.saturating_sub(1),
            1 => (depth + 1).min(5),
            _ => depth,
        };
    }
    v.truncate(len);
    v
}

/// Machine-code-like bytes: common instruction patterns, addresses and immediates,
/// alignment padding, string tables.
fn binary(rng: &mut Rng, ops: &[Vec<u8>], len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    while v.len() < len {
        match rng.below(100) {
            0..=59 => v.extend_from_slice(&ops[rng.skewed(ops.len())]),
            // Code repeats itself: a recent run again.
            60..=77 if v.len() > 4096 => {
                let n = 8 + rng.below(25);
                let at = v.len() - 4096 + rng.below(4096 - n);
                v.extend_from_within(at..at + n);
            }
            60..=77 => {}
            78..=85 => v.extend_from_slice(&rng.next().to_le_bytes()[..4]),
            86..=91 => v.resize(v.len() + 1 + rng.below(16), 0),
            _ => {
                v.extend_from_slice(WORDS[rng.below(WORDS.len())].as_bytes());
                v.push(0);
            }
        }
    }
    v.truncate(len);
    v
}

fn random(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len.div_ceil(8))
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    v.truncate(len);
    v
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Binary,
    Random,
}

/// A layer tar of about `size` bytes of members of `kinds`, each kind taking its share of
/// the bytes (text 40 %, binary 40 %, random 20 %), interleaved.
fn layer(seed: u64, size: usize, kinds: &[Kind]) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut ops_rng = Rng(7);
    let ops: Vec<Vec<u8>> = (0..512)
        .map(|_| {
            let n = 1 + ops_rng.below(7);
            random(&mut ops_rng, n)
        })
        .collect();
    let share = |k: Kind| match k {
        Kind::Text | Kind::Binary => 0.4,
        Kind::Random => 0.2,
    };
    let mut done = [0usize; 3];
    let mut b = tar::Builder::new(Vec::with_capacity(size + (size >> 4)));
    let mut total = 0;
    let mut i = 0;
    while total < size {
        let kind = *kinds
            .iter()
            .min_by(|a, b| {
                let fa = done[**a as usize] as f64 / share(**a);
                let fb = done[**b as usize] as f64 / share(**b);
                fa.total_cmp(&fb)
            })
            .expect("a kind");
        let (path, data) = match kind {
            Kind::Text => {
                let n = 1024 + rng.below(63 << 10);
                (
                    format!("usr/share/pkg{}/src/file{i}.c", i % 97),
                    text(&mut rng, n),
                )
            }
            Kind::Binary => {
                let n = (16 << 10) + rng.below(2 << 20);
                (format!("usr/lib/lib{i}.so"), binary(&mut rng, &ops, n))
            }
            Kind::Random => {
                let n = (64 << 10) + rng.below(1 << 20);
                (format!("usr/share/assets/a{i}.png"), random(&mut rng, n))
            }
        };
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, &data[..]).expect("tar member");
        done[kind as usize] += data.len();
        total += data.len() + 512;
        i += 1;
    }
    b.into_inner().expect("tar")
}

/// Reads of at most [`FEED`] bytes, copied out of the blob, as a `PrefixReader` gives them.
struct Feed<'a>(&'a [u8]);

impl Read for Feed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(FEED).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// Reads `r` to its end, `chunk` bytes at a time, handing each read to `sink`.
fn drain(mut r: impl Read, chunk: usize, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; chunk];
    loop {
        match r.read(&mut buf)? {
            0 => return Ok(()),
            n => sink(&buf[..n]),
        }
    }
}

/// A backend: decodes `input` (whole-buffer ones into `whole`, sized to the output),
/// handing the decoded bytes to the sink.
type Backend = fn(&[u8], &mut [u8], &mut dyn FnMut(&[u8])) -> io::Result<()>;

const GZIP_BACKENDS: &[(&str, Backend)] = &[
    ("fastpull-flate2-zlib-rs", |gz, _, sink| {
        drain(layer_stream(GZIP, Feed(gz))?, OUT, sink)
    }),
    ("flate2-zlib-rs-whole-input", |gz, _, sink| {
        drain(flate2::bufread::MultiGzDecoder::new(gz), OUT, sink)
    }),
    ("flate2-zlib-rs-whole-input-1MiB-out", |gz, _, sink| {
        drain(flate2::bufread::MultiGzDecoder::new(gz), 1 << 20, sink)
    }),
    ("miniz_oxide", |gz, _, sink| miniz(gz, sink)),
    ("zlib-system", |gz, _, sink| zlib::inflate(gz, sink)),
    ("libdeflate-whole-buffer", |gz, whole, sink| {
        let n = libdeflater::Decompressor::new()
            .gzip_decompress(gz, whole)
            .map_err(|e| io::Error::other(format!("libdeflate: {e:?}")))?;
        sink(&whole[..n]);
        Ok(())
    }),
];

const ZSTD_BACKENDS: &[(&str, Backend)] = &[
    ("fastpull-zstd-libzstd", |zs, _, sink| {
        drain(layer_stream(ZSTD, Feed(zs))?, OUT, sink)
    }),
    ("zstd-libzstd-whole-input", |zs, _, sink| {
        drain(zstd::stream::read::Decoder::with_buffer(zs)?, OUT, sink)
    }),
    ("zstd-libzstd-whole-input-1MiB-out", |zs, _, sink| {
        drain(zstd::stream::read::Decoder::with_buffer(zs)?, 1 << 20, sink)
    }),
    ("ruzstd", |zs, _, sink| {
        let d = ruzstd::decoding::StreamingDecoder::new(BufReader::with_capacity(FEED, Feed(zs)))
            .map_err(|e| io::Error::other(format!("ruzstd: {e}")))?;
        drain(d, OUT, sink)
    }),
];

/// gzip with miniz_oxide's streaming inflate (what flate2's default backend calls), fed
/// [`FEED`] bytes at a time, with the trailer's CRC-32 and size checked as flate2 does.
fn miniz(gz: &[u8], sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
    use miniz_oxide::inflate::stream::{inflate, InflateState};
    use miniz_oxide::{DataFormat, MZFlush, MZStatus};
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    // The encoder here writes a plain 10-byte header (no name, extra field or comment).
    if gz.len() < 18 || gz[..3] != [0x1f, 0x8b, 8] || gz[3] != 0 {
        return Err(bad("not a plain gzip member"));
    }
    let body = &gz[10..];
    let mut state = InflateState::new_boxed(DataFormat::Raw);
    let mut out = vec![0u8; OUT];
    let mut crc = crc32fast::Hasher::new();
    let (mut pos, mut size) = (0usize, 0u32);
    loop {
        let end = (pos + FEED).min(body.len());
        let r = inflate(&mut state, &body[pos..end], &mut out, MZFlush::None);
        pos += r.bytes_consumed;
        let written = &out[..r.bytes_written];
        crc.update(written);
        size = size.wrapping_add(written.len() as u32);
        sink(written);
        match r.status {
            Ok(MZStatus::StreamEnd) => break,
            Ok(_) if r.bytes_consumed > 0 || r.bytes_written > 0 => {}
            _ => return Err(bad("corrupt or truncated deflate stream")),
        }
    }
    let trailer = body
        .get(pos..pos + 8)
        .ok_or_else(|| bad("no gzip trailer"))?;
    if trailer[..4] != crc.finalize().to_le_bytes() || trailer[4..] != size.to_le_bytes() {
        return Err(bad("gzip CRC-32 or size mismatch"));
    }
    Ok(())
}

/// zlib's inflate (libz-sys: the system's libz, or zlib built from source when cross
/// compiling), gzip mode (it checks the header and trailer), fed [`FEED`] bytes at a time.
mod zlib {
    use std::ffi::c_int;
    use std::io;
    use std::ptr;

    use libz_sys::{uInt, voidpf, z_stream, Z_BUF_ERROR, Z_NO_FLUSH, Z_OK, Z_STREAM_END};

    use super::{FEED, OUT};

    extern "C" fn zalloc(_: voidpf, items: uInt, size: uInt) -> voidpf {
        // SAFETY: calloc has no preconditions; zlib checks for NULL.
        unsafe { libc::calloc(items as usize, size as usize) }
    }

    extern "C" fn zfree(_: voidpf, p: voidpf) {
        // SAFETY: zlib frees only what zalloc returned, once.
        unsafe { libc::free(p) }
    }

    /// An initialised stream, boxed: zlib keeps a pointer to it, so it never moves.
    struct Stream(Box<z_stream>);

    impl Drop for Stream {
        fn drop(&mut self) {
            // SAFETY: the stream was initialised by inflateInit2_ and is ended once.
            unsafe { libz_sys::inflateEnd(&mut *self.0) };
        }
    }

    pub(super) fn inflate(gz: &[u8], sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        let err = |what: &str, rc: c_int| io::Error::other(format!("zlib {what}: {rc}"));
        let mut z = Box::new(z_stream {
            next_in: ptr::null_mut(),
            avail_in: 0,
            total_in: 0,
            next_out: ptr::null_mut(),
            avail_out: 0,
            total_out: 0,
            msg: ptr::null_mut(),
            state: ptr::null_mut(),
            zalloc,
            zfree,
            opaque: ptr::null_mut(),
            data_type: 0,
            adler: 0,
            reserved: 0,
        });
        // SAFETY: `z` is a zeroed stream with our allocators; the version and the struct
        // size are what zlib checks them against. 31 = gzip with a 32 KiB window.
        let rc = unsafe {
            libz_sys::inflateInit2_(
                &mut *z,
                31,
                libz_sys::zlibVersion(),
                std::mem::size_of::<z_stream>() as c_int,
            )
        };
        if rc != Z_OK {
            return Err(err("inflateInit2", rc));
        }
        let mut s = Stream(z);
        let mut out = vec![0u8; OUT];
        let mut fed = 0;
        loop {
            if s.0.avail_in == 0 && fed < gz.len() {
                let n = FEED.min(gz.len() - fed);
                // zlib only reads through next_in.
                s.0.next_in = gz[fed..].as_ptr().cast_mut();
                s.0.avail_in = n as uInt;
                fed += n;
            }
            s.0.next_out = out.as_mut_ptr();
            s.0.avail_out = OUT as uInt;
            // SAFETY: next_in/avail_in lie within `gz` and next_out/avail_out within `out`,
            // both alive across the call; the stream is initialised.
            let rc = unsafe { libz_sys::inflate(&mut *s.0, Z_NO_FLUSH) };
            let n = OUT - s.0.avail_out as usize;
            sink(&out[..n]);
            match rc {
                Z_STREAM_END => return Ok(()),
                Z_OK => {}
                Z_BUF_ERROR if !(s.0.avail_in == 0 && fed == gz.len()) => {}
                _ => return Err(err("inflate", rc)),
            }
        }
    }
}

struct Input {
    name: &'static str,
    tar: Vec<u8>,
    gz: Vec<u8>,
    zs: Vec<u8>,
}

fn inputs() -> Vec<Input> {
    let size = layer_size();
    let all = [Kind::Text, Kind::Binary, Kind::Random];
    [
        ("mix", size, &all[..]),
        ("text", size / 3, &all[..1]),
        ("binary", size / 3, &all[1..2]),
        ("random", size / 3, &all[2..]),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (name, size, kinds))| {
        let tar = layer(i as u64 + 1, size, kinds);
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(&tar).expect("gzip");
        let gz = e.finish().expect("gzip");
        let mut e = zstd::Encoder::new(Vec::new(), 3).expect("zstd");
        e.include_checksum(true).expect("zstd checksum");
        e.write_all(&tar).expect("zstd");
        let zs = e.finish().expect("zstd");
        let mib = |n: usize| n as f64 / (1 << 20) as f64;
        eprintln!(
            "{name}: tar {:.1} MiB, gzip -6 {:.1} MiB ({:.2}x), zstd -3 {:.1} MiB ({:.2}x)",
            mib(tar.len()),
            mib(gz.len()),
            tar.len() as f64 / gz.len() as f64,
            mib(zs.len()),
            tar.len() as f64 / zs.len() as f64,
        );
        Input { name, tar, gz, zs }
    })
    .collect()
}

fn decompress(c: &mut Criterion) {
    for input in inputs() {
        let mut whole = vec![0u8; input.tar.len()];
        for (algo, data, backends) in [
            ("gzip", &input.gz, GZIP_BACKENDS),
            ("zstd", &input.zs, ZSTD_BACKENDS),
        ] {
            // Every backend gives back the tar exactly, once, before it is timed.
            for (name, run) in backends {
                let mut got = Vec::with_capacity(input.tar.len());
                run(data, &mut whole, &mut |b| got.extend_from_slice(b)).expect(name);
                assert!(got == input.tar, "{algo} {name}: wrong output");
            }
            let mut g = c.benchmark_group(format!("{algo}-{}", input.name));
            g.throughput(Throughput::BytesDecimal(input.tar.len() as u64));
            g.sampling_mode(SamplingMode::Flat);
            g.sample_size(10);
            g.warm_up_time(Duration::from_millis(500));
            g.measurement_time(Duration::from_secs(2));
            for (name, run) in backends {
                g.bench_function(*name, |b| {
                    b.iter(|| {
                        run(data, &mut whole, &mut |b| {
                            black_box(b);
                        })
                        .expect(name)
                    })
                });
            }
            g.finish();
        }
    }
}

criterion_group!(benches, decompress);
criterion_main!(benches);
