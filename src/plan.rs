//! Which blobs to fetch, in which order, in which pieces: pure, so it can be tested and
//! benched alone.

use std::collections::HashSet;
use std::ops::Range;

use crate::digest::Digest;
use crate::manifest::BlobDescriptor;

/// The work of one pull.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Blobs to download, largest first (the longest transfer starts earliest).
    pub fetch: Vec<BlobDescriptor>,
    /// Blobs already verified on disk.
    pub present: Vec<BlobDescriptor>,
}

impl Plan {
    /// Plans `blobs` (config and layers, duplicates allowed) given which digests are already
    /// verified on disk.
    pub fn new(blobs: &[BlobDescriptor], present: &HashSet<Digest>) -> Plan {
        let mut seen = HashSet::new();
        let mut plan = Plan::default();
        for b in blobs.iter().filter(|b| seen.insert(b.digest)) {
            if present.contains(&b.digest) {
                plan.present.push(b.clone());
            } else {
                plan.fetch.push(b.clone());
            }
        }
        plan.fetch.sort_by_key(|b| std::cmp::Reverse(b.size));
        plan
    }

    /// Bytes to download.
    pub fn fetch_bytes(&self) -> u64 {
        self.fetch.iter().map(|b| b.size).sum()
    }
}

/// How blobs are cut into HTTP range requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    /// Most bytes per range request. Blobs no larger than this are fetched in one request.
    pub chunk_size: u64,
    /// Fewest chunks a blob larger than `chunk_size` is cut into (smaller chunks, down to
    /// [`MIN_CHUNK`], so that every connection has work and the last chunks finish close
    /// together). 0 or 1: plain `chunk_size` pieces.
    pub min_chunks: u64,
}

/// The smallest chunk [`Chunking::min_chunks`] cuts down to.
pub const MIN_CHUNK: u64 = 1 << 20;

impl Chunking {
    /// Chunks of exactly `chunk_size` (the last one shorter).
    pub fn fixed(chunk_size: u64) -> Chunking {
        Chunking {
            chunk_size,
            min_chunks: 0,
        }
    }

    /// The byte ranges of a blob of `size` bytes: one (possibly empty) range for blobs up to
    /// `chunk_size`, else consecutive equal ranges (the last one shorter).
    pub fn ranges(&self, size: u64) -> Vec<Range<u64>> {
        let max = self.chunk_size.max(1);
        if size <= max {
            return std::iter::once(0..size).collect();
        }
        let step = if self.min_chunks > 1 && size.div_ceil(max) < self.min_chunks {
            size.div_ceil(self.min_chunks).max(MIN_CHUNK.min(max))
        } else {
            max
        };
        (0..size.div_ceil(step))
            .map(|i| i * step..((i + 1) * step).min(size))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::BlobKind;

    #[test]
    fn min_chunks_spreads_a_blob_over_the_connections() {
        const M: u64 = MIN_CHUNK;
        let c = Chunking {
            chunk_size: 8 * M,
            min_chunks: 64,
        };
        // 300 MiB over 64 chunks: 4.7 MiB each, not 38 of 8 MiB.
        let r = c.ranges(300 * M);
        assert_eq!(r.len(), 64);
        assert!(r.iter().all(|r| r.end - r.start <= 8 * M));
        // 1 GiB already makes 128 chunks of 8 MiB.
        assert_eq!(c.ranges(1024 * M).len(), 128);
        // Never below MIN_CHUNK: 20 MiB makes 20 chunks, not 64.
        assert_eq!(c.ranges(20 * M).len(), 20);
        // Up to chunk_size: one request.
        assert_eq!(c.ranges(8 * M).len(), 1);
        for size in [8 * M + 1, 100 * M + 7, 513 * M] {
            let r = c.ranges(size);
            assert_eq!(r.last().map(|r| r.end), Some(size));
            assert!(r.windows(2).all(|w| w[0].end == w[1].start));
        }
    }

    #[test]
    fn chunk_ranges_cover_every_byte_once() {
        let c = Chunking::fixed(10);
        assert_eq!(c.ranges(0), vec![0..0]);
        assert_eq!(c.ranges(1), vec![0..1]);
        assert_eq!(c.ranges(10), vec![0..10]);
        assert_eq!(c.ranges(11), vec![0..10, 10..11]);
        assert_eq!(c.ranges(30), vec![0..10, 10..20, 20..30]);
        for size in [0u64, 1, 9, 10, 11, 99, 100, 101, 12345] {
            for chunk_size in [1u64, 3, 10, 64, 1 << 20] {
                let r = Chunking::fixed(chunk_size).ranges(size);
                assert_eq!(r.first().map(|r| r.start), Some(0));
                assert_eq!(r.last().map(|r| r.end), Some(size));
                assert!(r.windows(2).all(|w| w[0].end == w[1].start));
                assert!(r
                    .iter()
                    .all(|r| r.end - r.start <= chunk_size.max(size.min(chunk_size))));
                assert!(size == 0 || r.iter().all(|r| r.end > r.start));
            }
        }
    }

    fn blob(tag: &[u8], size: u64) -> BlobDescriptor {
        BlobDescriptor {
            digest: Digest::of(tag),
            size,
            media_type: "x".into(),
            kind: BlobKind::Layer,
        }
    }

    #[test]
    fn largest_first_deduplicated_and_present_skipped() {
        let blobs = vec![
            blob(b"a", 10),
            blob(b"b", 300),
            blob(b"c", 20),
            blob(b"a", 10),
            blob(b"d", 0),
        ];
        let present: HashSet<Digest> = [Digest::of(b"c")].into_iter().collect();
        let p = Plan::new(&blobs, &present);
        let sizes: Vec<u64> = p.fetch.iter().map(|b| b.size).collect();
        assert_eq!(sizes, vec![300, 10, 0]);
        assert_eq!(p.present, vec![blob(b"c", 20)]);
        assert_eq!(p.fetch_bytes(), 310);
    }
}
