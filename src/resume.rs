//! Resume: the journal kept beside each partial blob, so that a pull stopped by Ctrl-C, a
//! failure, `kill -9` or a power cut fetches only what is missing the next time.
//!
//! A partial blob lives in the destination's scratch directory as `<hex>.partial` (the
//! preallocated, mapped file [`crate::write::BlobFile`] writes) with `<hex>.journal` beside
//! it. The journal is a small append-only text file: a header naming the blob (digest, size)
//! and the boot it was written in, then one record per line, each with its own checksum:
//!
//! ```text
//! fastpull-journal 1 sha256:<64 hex> <size> <boot id> <check>
//! W <start> <end> <check>      bytes start..end were written to the file (page cache)
//! D <start> <end> <check>      bytes start..end are on disk: the file was fdatasync'd
//!                              before this record was written
//! ```
//!
//! `D` records survive anything, power cuts included: the data was flushed before the
//! record that claims it, and the journal is flushed after it. `W` records are written
//! often and never flushed; they are believed only in the boot that wrote them (the header's
//! boot id, `/proc/sys/kernel/random/boot_id`), where the kernel still holds the bytes: a
//! `kill -9` or a crash of fastpull loses neither the page cache nor the journal's appended
//! lines, so such a stop costs only the bytes that were in flight. After a reboot only `D`
//! records count.
//!
//! A journal is never trusted further than it proves itself: a header for another blob or
//! size, a line that does not check, or a torn last line ends what is read (everything
//! after it is ignored). And nothing a journal says can put a wrong byte under a final name:
//! a resumed blob is hashed whole, the old bytes read back from the file, and a blob whose
//! digest does not match is fetched again (see [`crate::fetch`]). The URL is not recorded:
//! presigned URLs expire, so a resume asks the registry again.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use crate::digest::Digest;
use crate::write::write_atomic;

const MAGIC: &str = "fastpull-journal";
const VERSION: &str = "1";

/// Sorted, disjoint, non-adjacent byte ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<Range<u64>>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// Adds `r` (merging with what it touches).
    pub fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // First range that ends at or after `start` (could touch or overlap).
        let i = self.ranges.partition_point(|x| x.end < start);
        let mut j = i;
        while j < self.ranges.len() && self.ranges[j].start <= end {
            start = start.min(self.ranges[j].start);
            end = end.max(self.ranges[j].end);
            j += 1;
        }
        self.ranges.splice(i..j, std::iter::once(start..end));
    }

    /// The ranges, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Range<u64>> {
        self.ranges.iter()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// The parts of `self` not in `other`.
    pub fn minus(&self, other: &RangeSet) -> RangeSet {
        let mut out = RangeSet::new();
        for r in &self.ranges {
            let mut at = r.start;
            let first = other.ranges.partition_point(|o| o.end <= r.start);
            for o in &other.ranges[first..] {
                if o.start >= r.end {
                    break;
                }
                if o.start > at {
                    out.ranges.push(at..o.start);
                }
                at = at.max(o.end);
            }
            if at < r.end {
                out.ranges.push(at..r.end);
            }
        }
        out
    }

    /// Every range of `other` added.
    pub fn extend(&mut self, other: &RangeSet) {
        for r in &other.ranges {
            self.insert(r.clone());
        }
    }
}

impl FromIterator<Range<u64>> for RangeSet {
    fn from_iter<I: IntoIterator<Item = Range<u64>>>(iter: I) -> Self {
        let mut s = RangeSet::new();
        for r in iter {
            s.insert(r);
        }
        s
    }
}

/// This boot's id, if the kernel tells it (Linux); `W` records are believed only in it.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        .then(|| id.to_string())
}

/// The check that ends a journal line: 8 hex digits of the sha256 of the rest.
fn check(body: &str) -> String {
    let h = sha2::Sha256::digest(body.as_bytes());
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}

fn line(body: &str) -> String {
    format!("{body} {}\n", check(body))
}

fn header(digest: &Digest, size: u64, boot: &str) -> String {
    line(&format!("{MAGIC} {VERSION} {digest} {size} {boot}"))
}

/// One blob's journal, open for appending.
pub(crate) struct Journal {
    path: PathBuf,
    file: File,
    size: u64,
    /// What `W` or `D` lines already claim (nothing is recorded twice).
    written: RangeSet,
    /// What `D` lines already claim.
    durable: RangeSet,
    /// The journal's name in its directory has been flushed.
    entry_durable: bool,
    /// An append failed (a full disk): nothing more is appended, so the journal keeps
    /// claiming only what it claimed before (a torn last line ends what is believed).
    failed: bool,
}

/// What a journal found on disk says is already in the partial file.
pub(crate) struct Loaded {
    pub journal: Journal,
    /// Bytes the partial file holds (the union of the records believed).
    pub present: RangeSet,
}

impl Journal {
    /// `<hex>.journal` beside `<hex>.partial`.
    pub(crate) fn path_for(partial: &Path) -> PathBuf {
        partial.with_extension("journal")
    }

    /// Starts a journal for a new partial file (replacing any old one). Nothing is flushed
    /// yet (opening a blob stays cheap): the first `D` record makes the journal and its
    /// directory entry durable.
    pub(crate) fn create(path: &Path, digest: &Digest, size: u64) -> std::io::Result<Journal> {
        let boot = boot_id().unwrap_or_else(|| "-".into());
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.write_all(header(digest, size, &boot).as_bytes())?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            size,
            written: RangeSet::new(),
            durable: RangeSet::new(),
            entry_durable: false,
            failed: false,
        })
    }

    /// Reads the journal at `path` for blob `digest` of `size` bytes. `None` when there is
    /// none, or it is for another blob, or its header does not check. What it believes is
    /// written back at once as a fresh journal (this boot's header; `D` for what was
    /// durable, `W` for what this boot wrote), so that records appended from now on are
    /// judged by the right boot.
    pub(crate) fn load(path: &Path, digest: &Digest, size: u64) -> Option<Loaded> {
        let text = std::fs::read(path).ok()?;
        let text = String::from_utf8_lossy(&text);
        let boot = boot_id();
        let mut lines = text.split_inclusive('\n');
        let head = lines.next()?;
        let head_boot = parse_header(head, digest, size)?;
        let same_boot = boot.as_deref().is_some_and(|b| b == head_boot);
        let mut written = RangeSet::new();
        let mut durable = RangeSet::new();
        for l in lines {
            let Some((kind, r)) = parse_record(l, size) else {
                break; // torn or foreign: nothing after it is believed
            };
            match kind {
                'D' => durable.insert(r),
                _ if same_boot => written.insert(r),
                _ => {}
            }
        }
        written.extend(&durable);
        let mut fresh = header(digest, size, boot.as_deref().unwrap_or("-"));
        for r in durable.iter() {
            fresh.push_str(&line(&format!("D {} {}", r.start, r.end)));
        }
        for r in written.minus(&durable).iter() {
            fresh.push_str(&line(&format!("W {} {}", r.start, r.end)));
        }
        // Rewritten, unless it cannot be (a disk still full): then it is kept as it is and
        // appended to, which is as safe: what this boot appends under an older boot's
        // header is never believed later (no later load runs in that boot), `D` records
        // are, and records after a torn line are dropped, as before. Without this the
        // blob would start over here and its bytes would be thrown away.
        if let Err(e) = write_atomic(path, fresh.as_bytes()) {
            tracing::debug!(journal = %path.display(), error = %e, "cannot rewrite the resume journal; appending to it as it is");
        }
        let file = OpenOptions::new().append(true).open(path).ok()?;
        Some(Loaded {
            present: written.clone(),
            journal: Journal {
                path: path.to_path_buf(),
                file,
                size,
                written,
                durable,
                entry_durable: true,
                failed: false,
            },
        })
    }

    /// Appends `W` records for what `now_written` adds to what is recorded. Not flushed:
    /// believed only in this boot. After a failed append (see [`Journal::failed`]) it
    /// appends nothing more.
    pub(crate) fn record_written(&mut self, now_written: &RangeSet) -> std::io::Result<()> {
        let new = now_written.minus(&self.written);
        if new.is_empty() || self.failed {
            return Ok(());
        }
        let mut text = String::new();
        for r in new.iter().filter(|r| r.end <= self.size) {
            text.push_str(&line(&format!("W {} {}", r.start, r.end)));
        }
        self.append(&text)?;
        self.written.extend(&new);
        Ok(())
    }

    /// Appends `D` records for `flushed` (which the caller has fdatasync'd the partial file
    /// for, after capturing it) and flushes the journal.
    pub(crate) fn record_durable(&mut self, flushed: &RangeSet) -> std::io::Result<()> {
        let new = flushed.minus(&self.durable);
        if new.is_empty() || self.failed {
            return Ok(());
        }
        let mut text = String::new();
        for r in new.iter().filter(|r| r.end <= self.size) {
            text.push_str(&line(&format!("D {} {}", r.start, r.end)));
        }
        self.append(&text)?;
        self.file.sync_data()?;
        if !self.entry_durable {
            crate::write::sync_parent(&self.path)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.entry_durable = true;
        }
        self.durable.extend(&new);
        self.written.extend(&new);
        Ok(())
    }

    /// Appends `text`; on failure, marks the journal failed (nothing is appended again).
    fn append(&mut self, text: &str) -> std::io::Result<()> {
        let r = self.file.write_all(text.as_bytes());
        self.failed = r.is_err();
        r
    }

    /// Bytes the `D` records claim.
    pub(crate) fn durable(&self) -> u64 {
        self.durable.len()
    }

    /// Where it lives.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// `MAGIC VERSION digest size boot check`, for this blob; returns the boot id.
fn parse_header<'a>(l: &'a str, digest: &Digest, size: u64) -> Option<&'a str> {
    let body = l.strip_suffix('\n')?;
    let (body, sum) = body.rsplit_once(' ')?;
    if check(body) != sum {
        return None;
    }
    let mut f = body.split(' ');
    if f.next()? != MAGIC || f.next()? != VERSION {
        return None;
    }
    if f.next()? != digest.to_string() || f.next()?.parse::<u64>().ok()? != size {
        return None;
    }
    let boot = f.next()?;
    f.next().is_none().then_some(boot)
}

/// `W|D start end check`, within `0..size`.
fn parse_record(l: &str, size: u64) -> Option<(char, Range<u64>)> {
    let body = l.strip_suffix('\n')?;
    let (body, sum) = body.rsplit_once(' ')?;
    if check(body) != sum {
        return None;
    }
    let mut f = body.split(' ');
    let kind = match f.next()? {
        "W" => 'W',
        "D" => 'D',
        _ => return None,
    };
    let start: u64 = f.next()?.parse().ok()?;
    let end: u64 = f.next()?.parse().ok()?;
    if f.next().is_some() || start >= end || end > size {
        return None;
    }
    Some((kind, start..end))
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn set(rs: &[Range<u64>]) -> RangeSet {
        rs.iter().cloned().collect()
    }

    #[test]
    fn range_set_merges_and_subtracts() {
        let mut s = set(&[10..20, 30..40]);
        s.insert(20..25);
        assert_eq!(s, set(&[10..25, 30..40]));
        s.insert(5..35);
        assert_eq!(s.iter().cloned().collect::<Vec<_>>(), vec![5..40]);
        let a = set(&[0..100]);
        let b = set(&[10..20, 50..60, 90..120]);
        assert_eq!(
            a.minus(&b).iter().cloned().collect::<Vec<_>>(),
            vec![0..10, 20..50, 60..90]
        );
        assert_eq!(a.minus(&a), RangeSet::new());
        assert_eq!(set(&[1..2, 3..4]).len(), 2);
    }

    /// A journal that cannot be rewritten when loaded (a disk still full) is kept as it is
    /// and appended to: the blob resumes from what it says, and what is recorded now is
    /// believed next time. (Red when the load gave up: the blob started over and its
    /// partial file was truncated.)
    #[test]
    fn a_journal_that_cannot_be_rewritten_is_kept_and_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.journal");
        let d = Digest::of(b"blob");
        let mut j = Journal::create(&p, &d, 1000).unwrap();
        j.record_durable(&set(&[0..400])).unwrap();
        drop(j);
        // The rewrite's temporary file cannot be made: a directory is in its place.
        let tmp = dir
            .path()
            .join(format!(".x.journal.{}.tmp", std::process::id()));
        std::fs::create_dir(&tmp).unwrap();
        let loaded = Journal::load(&p, &d, 1000).expect("the journal is kept");
        assert_eq!(loaded.present, set(&[0..400]));
        let mut j = loaded.journal;
        j.record_durable(&set(&[0..600])).unwrap();
        drop(j);
        std::fs::remove_dir(&tmp).unwrap();
        let again = Journal::load(&p, &d, 1000).unwrap();
        assert_eq!(again.present, set(&[0..600]));
    }

    #[test]
    fn journal_round_trip_torn_and_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.journal");
        let d = Digest::of(b"blob");
        let mut j = Journal::create(&p, &d, 1000).unwrap();
        j.record_written(&set(&[0..100, 200..300])).unwrap();
        j.record_durable(&set(&[0..100])).unwrap();
        j.record_written(&set(&[0..150, 200..300])).unwrap();
        drop(j);
        let loaded = Journal::load(&p, &d, 1000).unwrap();
        // W records count in the boot that wrote them (this one, in a test).
        let want = if boot_id().is_some() {
            set(&[0..150, 200..300])
        } else {
            set(&[0..100])
        };
        assert_eq!(loaded.present, want);
        drop(loaded);
        // Another blob, another size: not believed.
        assert!(Journal::load(&p, &Digest::of(b"other"), 1000).is_none());
        assert!(Journal::load(&p, &d, 999).is_none());
        // A torn last line, and a line that does not check, end what is believed.
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str(&line("W 300 400"));
        text.push_str("W 400 500 deadbe");
        std::fs::write(&p, &text).unwrap();
        let l = Journal::load(&p, &d, 1000).unwrap();
        assert!(!l.present.iter().any(|r| r.end > 400), "torn line believed");
        drop(l);
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("W 500 600 00000000\n");
        text.push_str(&line("W 600 700"));
        std::fs::write(&p, &text).unwrap();
        let l = Journal::load(&p, &d, 1000).unwrap();
        assert!(
            !l.present.iter().any(|r| r.end > 500),
            "a record after a bad line was believed"
        );
        // Out of range records are not believed either.
        drop(l);
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str(&line("D 900 1001"));
        std::fs::write(&p, &text).unwrap();
        let l = Journal::load(&p, &d, 1000).unwrap();
        assert!(!l.present.iter().any(|r| r.end > 1000));
        // A header that does not check: nothing.
        std::fs::write(
            &p,
            text.replacen("fastpull-journal 1", "fastpull-journal 2", 1),
        )
        .unwrap();
        assert!(Journal::load(&p, &d, 1000).is_none());
    }

    /// A full disk met while appending (here /dev/full): the append fails once, and the
    /// journal is then left alone, claiming what it claimed before.
    #[test]
    fn a_journal_that_cannot_be_appended_to_is_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.journal");
        let d = Digest::of(b"blob");
        let mut j = Journal::create(&p, &d, 1000).unwrap();
        j.record_written(&set(&[0..100])).unwrap();
        let Ok(full) = OpenOptions::new().append(true).open("/dev/full") else {
            return; // no /dev/full here
        };
        j.file = full;
        assert!(
            j.record_written(&set(&[0..200])).is_err(),
            "the disk is full"
        );
        assert!(j.record_written(&set(&[0..300])).is_ok(), "not tried again");
        assert!(j.record_durable(&set(&[0..300])).is_ok(), "not tried again");
        drop(j);
        let l = Journal::load(&p, &d, 1000).unwrap();
        assert!(l.present.len() <= 100, "claims only what it did before");
    }

    #[test]
    fn written_records_of_another_boot_are_not_believed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.journal");
        let d = Digest::of(b"blob");
        let mut text = header(&d, 1000, "00000000-0000-0000-0000-000000000000");
        text.push_str(&line("D 0 100"));
        text.push_str(&line("W 100 900"));
        std::fs::write(&p, text).unwrap();
        let l = Journal::load(&p, &d, 1000).unwrap();
        assert_eq!(l.present, set(&[0..100]));
    }
}
