//! sha256 verification: an incremental hasher for streamed blobs, and a check for blobs
//! already on disk.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use sha2::Digest as _;

use crate::digest::Digest;

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

#[cfg(test)]
mod tests {
    use super::*;

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
