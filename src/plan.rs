//! Which blobs to fetch, and in which order: pure, so it can be tested alone. How they are
//! cut into ranges is decided while they arrive (`fetch`'s scheduler), not here.

use std::collections::HashSet;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::BlobKind;

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
