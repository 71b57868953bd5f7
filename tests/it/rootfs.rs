//! `--format rootfs`: the unpacked root filesystem equals `umoci unpack`'s (as root, and
//! rootless; a 1 GiB file and 0 B ones too), hostile layers cannot reach outside it, and it
//! appears only once every layer is verified. `--unpack ROOTFS` beside an OCI or dir
//! layout: the same tree, the layout as without it, blobs already there not fetched again.
//!
//! Layers are written byte by byte here (ustar headers, PAX records, GNU long names), so
//! that odd and hostile archives can be built as well as ordinary ones.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::interop::{fastpull, image_ref, require_tools, umoci_unpack};
use crate::support::cli::{assert_exit, Run};
use crate::support::fstree::{assert_same, snapshot};
use crate::support::*;

const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// A tar stream written header by header.
#[derive(Default)]
struct Tar(Vec<u8>);

/// Header fields of one entry.
#[derive(Clone)]
struct H {
    flag: u8,
    name: Vec<u8>,
    link: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    size: u64,
    dev: (u32, u32),
}

fn h(flag: u8, name: &str, mode: u32) -> H {
    H {
        flag,
        name: name.as_bytes().to_vec(),
        link: Vec::new(),
        mode,
        uid: 0,
        gid: 0,
        mtime: T0,
        size: 0,
        dev: (0, 0),
    }
}

/// A time every entry has unless it says otherwise.
const T0: u64 = 1_600_000_000;

impl Tar {
    /// A ustar header block for `e` (names of at most 100 bytes: longer ones go through
    /// [`Tar::pax`] or [`Tar::gnu_long`]; the header keeps a truncated one).
    fn header(e: &H) -> [u8; 512] {
        let mut hd = tar::Header::new_ustar();
        {
            let old = hd.as_old_mut();
            let n = e.name.len().min(100);
            old.name = [0; 100];
            old.name[..n].copy_from_slice(&e.name[..n]);
            let l = e.link.len().min(100);
            old.linkname = [0; 100];
            old.linkname[..l].copy_from_slice(&e.link[..l]);
        }
        hd.set_entry_type(tar::EntryType::new(e.flag));
        hd.set_mode(e.mode);
        hd.set_uid(e.uid);
        hd.set_gid(e.gid);
        hd.set_mtime(e.mtime);
        hd.set_size(e.size);
        if e.flag == b'3' || e.flag == b'4' {
            hd.set_device_major(e.dev.0).expect("device major");
            hd.set_device_minor(e.dev.1).expect("device minor");
        }
        hd.set_cksum();
        let mut out = [0u8; 512];
        out.copy_from_slice(hd.as_bytes());
        out
    }

    /// Appends a header and `data`, padded to a block.
    fn raw(&mut self, e: &H, data: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&Tar::header(e));
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    /// An entry whose header size is its data's length.
    fn add(&mut self, mut e: H, data: &[u8]) -> &mut Self {
        e.size = data.len() as u64;
        self.raw(&e, data)
    }

    /// A PAX extended header (`x`) for the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut body = Vec::new();
        for (k, v) in records {
            let rest = 1 + k.len() + 1 + v.len() + 1; // " k=v\n"
            let mut len = rest + 1;
            while len.to_string().len() + rest != len {
                len += 1;
            }
            body.extend_from_slice(format!("{len} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        self.add(h(b'x', "././@PaxHeader", 0o644), &body)
    }

    /// A GNU long name (`L`) or long link (`K`) for the next entry.
    fn gnu_long(&mut self, flag: u8, name: &str) -> &mut Self {
        let mut data = name.as_bytes().to_vec();
        data.push(0);
        let mut e = h(flag, "././@LongLink", 0o644);
        e.mtime = 0;
        // GNU long names go in GNU headers; a ustar header is what tar-rs also accepts.
        self.add(e, &data)
    }

    fn dir(&mut self, name: &str, mode: u32, mtime: u64) -> &mut Self {
        let mut e = h(b'5', name, mode);
        e.mtime = mtime;
        self.add(e, b"")
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.add(h(b'0', name, mode), data)
    }

    fn owned(&mut self, name: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> &mut Self {
        let mut e = h(b'0', name, mode);
        e.uid = uid;
        e.gid = gid;
        self.add(e, data)
    }

    fn owned_dir(&mut self, name: &str, mode: u32, uid: u64, gid: u64, mtime: u64) -> &mut Self {
        let mut e = h(b'5', name, mode);
        e.uid = uid;
        e.gid = gid;
        e.mtime = mtime;
        self.add(e, b"")
    }

    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        let mut e = h(b'2', name, 0o777);
        e.link = target.as_bytes().to_vec();
        self.add(e, b"")
    }

    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        let mut e = h(b'1', name, 0o644);
        e.link = target.as_bytes().to_vec();
        self.add(e, b"")
    }

    fn whiteout(&mut self, name: &str) -> &mut Self {
        self.file(name, 0o644, b"")
    }

    /// The two zero blocks that end an archive.
    fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.0);
        out.extend_from_slice(&[0u8; 1024]);
        out
    }
}

/// A layer blob of `tar` with `media_type`, and its diff_id.
fn layer(tar: &[u8], media_type: &str) -> (Blob, String) {
    let bytes = match media_type {
        OCI_GZIP => gzip(tar),
        OCI_ZSTD => zstd::encode_all(tar, 3).expect("zstd into memory"),
        _ => tar.to_vec(),
    };
    (Blob::new(media_type, bytes), sha256_digest(tar))
}

fn image(layers: Vec<(Blob, String)>) -> Image {
    let mut b = ImageBuilder::new(Flavor::Oci);
    for (blob, diff_id) in layers {
        b = b.raw_layer(blob, diff_id);
    }
    b.build()
}

/// `fastpull --plain-http --format rootfs IMAGE DEST`, as the current user.
fn pull_rootfs(image: &str, dest: &Path) -> Output {
    fastpull_command()
        .args(["--plain-http", "--format", "rootfs", image])
        .arg(dest)
        .output()
        .expect("run fastpull")
}

/// The reference tree for `reference` (tagged `tag`): fastpull writes its OCI layout to
/// `work/layout`, and `umoci unpack` makes `work/bundle` of it; returns the bundle's rootfs.
fn umoci_tree(reg: &Registry, reference: &str, tag: &str, work: &Path) -> PathBuf {
    let layout = work.join("layout");
    fastpull(reg, &[OsStr::new(reference), layout.as_os_str()]);
    umoci_unpack(reg, &layout, tag, &work.join("bundle"))
}

/// `ours` (a tree fastpull unpacked from `repo:gzip`) equals `umoci unpack`'s tree of it.
fn assert_like_umoci(reg: &Registry, repo: &str, ours: &Path, work: &Path, label: &str) {
    let theirs = umoci_tree(reg, &image_ref(reg, repo, "gzip"), "gzip", work);
    assert_same(
        label,
        &snapshot(ours, &IMPLICIT),
        "umoci unpack",
        &snapshot(&theirs, &IMPLICIT),
    );
}

/// Layers of an image with everything umoci's unpacking has rules for. The second layer
/// is returned as a tar, to be compressed either way.
fn rich_layers(with_devices: bool) -> Vec<(Vec<u8>, &'static str)> {
    let long_pax = format!("long/{}", "p".repeat(120));
    let long_gnu = format!("long/{}", "g".repeat(150));
    let long_target = format!("/long/{}", "g".repeat(150));
    let mut l0 = Tar::default();
    l0.dir("./", 0o755, T0 + 1)
        .dir("etc/", 0o755, T0 + 2)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .owned("etc/shadow", 0o640, 0, 42, b"root:*:19000::::::\n")
        .dir("bin/", 0o755, T0 + 3)
        .owned("bin/tool", 0o4755, 0, 0, b"#!/bin/sh\necho tool\n")
        .owned("bin/sgid", 0o2755, 0, 50, b"sgid\n")
        .dir("usr/", 0o755, T0 + 4)
        .dir("usr/lib/", 0o755, T0 + 5)
        .file("usr/lib/libfoo.so.1", 0o755, &[7u8; 3000])
        .symlink("usr/lib/libfoo.so", "libfoo.so.1")
        .symlink("usr/lib/abs", "/etc/passwd")
        .symlink("lib", "usr/lib")
        .dir("data/", 0o755, T0 + 6)
        .file("data/a", 0o644, b"a")
        .file("data/b", 0o644, b"b")
        .dir("data/sub/", 0o700, T0 + 7)
        .file("data/sub/c", 0o600, b"c")
        .dir("gone/", 0o755, T0 + 8)
        .file("gone/x", 0o644, b"x")
        .file("gonefile", 0o644, b"gone")
        .file("empty", 0o644, b"")
        .owned("owned", 0o600, 1000, 1000, b"mine")
        .dir("sticky/", 0o1777, T0 + 9)
        .file("hl-base", 0o644, b"linked twice")
        .hardlink("hl-same", "hl-base")
        .pax(&[
            ("SCHILY.xattr.user.test", b"hello"),
            ("SCHILY.xattr.user.bin", &[0, 1, 2, 255]),
        ])
        .file("xattr-file", 0o644, b"xattrs")
        .pax(&[("SCHILY.xattr.user.dir", b"1")])
        .dir("xattr-dir/", 0o755, T0 + 10)
        .pax(&[("mtime", b"1700000000.123456789")])
        .file("ns-file", 0o644, b"nanoseconds")
        .dir("long/", 0o755, T0 + 11)
        .pax(&[("path", long_pax.as_bytes())])
        .file(&long_pax[..100], 0o644, b"pax long name")
        .gnu_long(b'L', &long_gnu)
        .file(&long_gnu[..100], 0o644, b"gnu long name")
        .gnu_long(b'K', &long_target)
        .symlink("long-link", &long_target[..100])
        .add(h(b'6', "fifo", 0o640), b"")
        .dir("opq2/", 0o755, T0 + 13)
        .file("opq2/old", 0o644, b"old")
        .file("f2d", 0o644, b"a file, then a directory")
        .dir("imp-parent/", 0o755, T0 + 12)
        .file("imp-parent/implicit/f", 0o644, b"in an implicit dir");
    if with_devices {
        let mut c = h(b'3', "null-ish", 0o666);
        c.dev = (1, 3);
        let mut b = h(b'4', "loop-ish", 0o660);
        b.dev = (7, 0);
        b.gid = 6;
        l0.add(c, b"").add(b, b"");
    }
    let l0 = l0.finish();

    let mut l1 = Tar::default();
    l1.whiteout(".wh.gonefile")
        .whiteout(".wh.gone")
        .dir("data/", 0o755, T0 + 20)
        .file("data/new", 0o644, b"new")
        .whiteout("data/.wh..wh..opq")
        .symlink("bin/tool", "/usr/lib/libfoo.so")
        .dir("usr/lib/abs/", 0o750, T0 + 21)
        .file("empty2", 0o000, b"")
        .pax(&[("SCHILY.xattr.user.x", b"y")])
        .dir("etc/", 0o750, T0 + 22)
        .whiteout(".wh.never-existed");
    let l1 = l1.finish();

    let empty = Tar::default().finish();

    let mut l3 = Tar::default();
    l3.whiteout(".wh.hl-base")
        .dir("newdir/", 0o755, T0 + 30)
        .whiteout("newdir/.wh.nonexistent")
        .file("sticky", 0o644, b"a file where a directory was")
        .file("data/a", 0o644, b"a is back")
        // An opaque marker before its siblings, a whiteout after a re-creation (both spare
        // what this layer wrote), a file replaced by a directory.
        .dir("opq2/", 0o755, T0 + 32)
        .whiteout("opq2/.wh..wh..opq")
        .file("opq2/fresh", 0o644, b"fresh")
        .file(
            "recreated",
            0o644,
            b"written, then whited out in the same layer",
        )
        .whiteout(".wh.recreated")
        .dir("f2d/", 0o711, T0 + 31)
        .file("f2d/x", 0o644, b"x")
        // Hard links within the layer, a lower directory kept with new children (and new
        // metadata from its header), a symlink into a lower directory.
        .file("usr/lib/libbar.so.2", 0o755, b"bar")
        .hardlink("usr/lib/libbar-copy", "usr/lib/libbar.so.2")
        .hardlink("bar-top", "usr/lib/libbar.so.2")
        .symlink("usr/lib/libbar.so", "libbar.so.2")
        .owned_dir("bin/", 0o750, 0, 7, T0 + 33)
        .file("bin/new-tool", 0o755, b"#!/bin/sh\n");
    let l3 = l3.finish();

    // Applied directly, not merged: a hard link to a lower layer's file (its staging
    // tree has no such file; found while staging)...
    let mut l4 = Tar::default();
    l4.hardlink("hl-lower", "etc/passwd");
    let l4 = l4.finish();
    // ... and a directory made only as a parent where the layers below have a symlink
    // (umoci writes through it; found before merging).
    let mut l5 = Tar::default();
    l5.file("lib/through-link", 0o644, b"through a lower symlink");
    let l5 = l5.finish();

    // Merged again, after the direct ones: replaces what one of them wrote, and gives a
    // lower directory new metadata.
    let mut l6 = Tar::default();
    l6.file("usr/lib/through-link", 0o600, b"replaced")
        .dir("data/", 0o700, T0 + 40);
    let l6 = l6.finish();
    vec![
        (l0, OCI_GZIP),
        (l1, OCI_ZSTD),
        (empty, OCI_GZIP),
        (l3, OCI_GZIP),
        (l4, OCI_GZIP),
        (l5, OCI_GZIP),
        (l6, OCI_GZIP),
    ]
}

/// Of the rich image's layers, how many are merged from their own trees (the bottom one
/// included) and how many applied directly.
const RICH_MERGED: u64 = 5;
const RICH_DIRECT: u64 = 2;

/// The `unpacked` summary of a `--json` pull's `done` event: (merged, direct).
fn merged_direct(o: &Output) -> (u64, u64) {
    let out = String::from_utf8_lossy(&o.stdout);
    let done: serde_json::Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "done")
        .unwrap_or_else(|| panic!("no done event:\n{}", text(o)));
    let u = &done["unpacked"];
    let n = |k: &str| {
        u[k].as_u64()
            .unwrap_or_else(|| panic!("unpacked.{k} missing: {done}"))
    };
    assert_eq!(n("merged") + n("direct"), n("layers"), "{done}");
    (n("merged"), n("direct"))
}

/// Directories umoci and fastpull both give the current time (implicit ones, and the one
/// an implicit directory was made in).
const IMPLICIT: [&str; 2] = ["imp-parent", "imp-parent/implicit"];

/// The same image twice: as built (a zstd layer), and with every layer gzip (umoci 0.4.7
/// does not read zstd layers; the tars, hence the diff_ids, are the same).
fn rich_images(with_devices: bool) -> (Image, Image) {
    let tars = rich_layers(with_devices);
    let as_built = image(tars.iter().map(|(t, mt)| layer(t, mt)).collect());
    let gzip_only = image(tars.iter().map(|(t, _)| layer(t, OCI_GZIP)).collect());
    let cfg = |i: &Image| -> serde_json::Value { serde_json::from_slice(&i.config.bytes).unwrap() };
    assert_eq!(cfg(&as_built)["rootfs"], cfg(&gzip_only)["rootfs"]);
    (as_built, gzip_only)
}

#[test]
fn rootfs_equals_umoci_unpack() {
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let root = rustix::process::geteuid().is_root();
    let (as_built, gzip_only) = rich_images(root);
    push_image(&reg, "rootfs/rich", "zstd", &as_built);
    push_image(&reg, "rootfs/rich", "gzip", &gzip_only);

    let ours = work.path().join("ours");
    let o = fastpull_command()
        .args(["--plain-http", "--json", "--format", "rootfs"])
        .arg(image_ref(&reg, "rootfs/rich", "zstd"))
        .arg(&ours)
        .output()
        .expect("run fastpull");
    assert!(
        o.status.success(),
        "fastpull --format rootfs failed:\n{}",
        text(&o)
    );
    // The untainted layers went through their own trees and the merge; the one with a
    // cross-layer hard link was applied directly.
    assert_eq!(
        merged_direct(&o),
        (RICH_MERGED, RICH_DIRECT),
        "{}",
        text(&o)
    );
    let ours_gz = work.path().join("ours-gz");
    let o = pull_rootfs(&image_ref(&reg, "rootfs/rich", "gzip"), &ours_gz);
    assert!(
        o.status.success(),
        "fastpull --format rootfs failed:\n{}",
        text(&o)
    );

    let theirs = umoci_tree(
        &reg,
        &image_ref(&reg, "rootfs/rich", "gzip"),
        "gzip",
        work.path(),
    );

    let a = snapshot(&ours, &IMPLICIT);
    let b = snapshot(&theirs, &IMPLICIT);
    assert_same("fastpull (zstd layer)", &a, "umoci unpack", &b);
    assert_same(
        "fastpull (zstd layer)",
        &a,
        "fastpull (gzip layers)",
        &snapshot(&ours_gz, &IMPLICIT),
    );

    // The walk compared what both wrote; check it holds what the image says, so that an
    // agreement on something wrong cannot pass.
    let line = |p: &str| {
        a.get(p)
            .unwrap_or_else(|| panic!("{p} missing: {a:#?}"))
            .clone()
    };
    for gone in [
        "gonefile",
        "gone",
        "data/b",
        "data/sub",
        "hl-base",
        "never-existed",
        "opq2/old",
    ] {
        assert!(!a.contains_key(gone), "{gone} should have been whited out");
    }
    assert!(line("data/new").contains("size=3"), "{}", line("data/new"));
    assert!(line("opq2/fresh").starts_with("file") && line("recreated").starts_with("file"));
    assert!(line("f2d").starts_with("dir mode=0711"), "{}", line("f2d"));
    assert!(line("data/a").contains("size=9"), "{}", line("data/a"));
    assert!(line("hl-lower").contains("nlink=2") && line("etc/passwd").contains("nlink=2"));
    assert!(line("hl-same").contains("nlink=1"), "{}", line("hl-same"));
    assert!(
        line("bin/tool").starts_with("symlink")
            && line("bin/tool").contains("-> /usr/lib/libfoo.so")
    );
    assert!(
        line("bin/sgid").contains("mode=2755 uid=0 gid=50"),
        "{}",
        line("bin/sgid")
    );
    assert!(
        line("owned").contains("mode=0600 uid=1000 gid=1000"),
        "{}",
        line("owned")
    );
    assert!(
        line("etc").contains("mode=0750")
            && line("etc").contains(&format!("mtime={}.000000000", T0 + 22))
    );
    assert!(line("etc").contains("xattr:user.x=79"), "{}", line("etc"));
    assert!(line("xattr-file").contains("xattr:user.bin=000102ff xattr:user.test=68656c6c6f"));
    assert!(
        line("ns-file").contains("mtime=1700000000.123456789"),
        "{}",
        line("ns-file")
    );
    assert!(line("sticky").starts_with("file"), "{}", line("sticky"));
    assert!(
        line("usr/lib/abs").starts_with("dir mode=0750"),
        "{}",
        line("usr/lib/abs")
    );
    assert!(line("empty2").contains("mode=0000"));
    assert!(line("fifo").starts_with("fifo mode=0640"));
    assert!(line("/").contains(&format!("mode=0755 uid=0 gid=0 mtime={}.000000000", T0 + 1)));
    assert!(a.contains_key(&format!("long/{}", "p".repeat(120))));
    assert!(a.contains_key(&format!("long/{}", "g".repeat(150))));
    assert!(line("long-link").contains(&format!("-> /long/{}", "g".repeat(150))));
    assert!(line("imp-parent/implicit").starts_with("dir mode=0755"));
    // What the merge moved: hard links of one layer still one inode, a lower directory
    // with new children and the new header's metadata, a file a direct layer wrote
    // through a lower symlink replaced by a later merged one.
    assert!(line("bar-top").contains("nlink=3"), "{}", line("bar-top"));
    assert!(line("usr/lib/libbar-copy").contains("nlink=3"));
    assert!(line("usr/lib/libbar.so").contains("-> libbar.so.2"));
    assert!(
        line("bin").contains("dir mode=0750 uid=0 gid=7"),
        "{}",
        line("bin")
    );
    assert!(a.contains_key("bin/new-tool") && a.contains_key("bin/sgid"));
    assert!(line("lib").starts_with("symlink"), "{}", line("lib"));
    assert!(
        line("usr/lib/through-link").contains("mode=0600")
            && line("usr/lib/through-link").contains("size=8"),
        "{}",
        line("usr/lib/through-link")
    );
    assert!(
        line("data").starts_with("dir mode=0700"),
        "{}",
        line("data")
    );
    if root {
        assert!(
            line("null-ish").starts_with("char mode=0666") && line("null-ish").contains("rdev=103")
        );
        assert!(line("loop-ish").starts_with("block mode=0660 uid=0 gid=6"));
    }
    // Blobs are not kept; nothing else was left beside the root filesystem.
    let mut names: Vec<String> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["bundle", "layout", "ours", "ours-gz"]);
}

/// The uid and gid tests run rootless as (nobody).
const NOBODY: u32 = 65534;

/// Whether this test can run commands as another user: root, with `setpriv`.
fn can_drop_privileges() -> bool {
    rustix::process::geteuid().is_root()
        && std::process::Command::new("setpriv")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

fn setpriv_prefix() -> String {
    format!("setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups")
}

#[test]
fn rootless_equals_umoci_rootless() {
    if !can_drop_privileges() {
        eprintln!(
            "SKIPPED rootless_equals_umoci_rootless: needs root and setpriv to run fastpull and \
             umoci as an unprivileged user"
        );
        return;
    }
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    std::os::unix::fs::chown(work.path(), Some(NOBODY), Some(NOBODY)).expect("chown work dir");
    let (as_built, gzip_only) = rich_images(true);
    push_image(&reg, "rootfs/rootless", "zstd", &as_built);
    push_image(&reg, "rootfs/rootless", "gzip", &gzip_only);
    let home = work.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();

    let runner = std::env::var(runner::RUNNER_ENV).unwrap_or_default();
    let as_nobody = || {
        let mut cmd = runner::fastpull_command_through(&format!("{} {runner}", setpriv_prefix()));
        cmd.env("HOME", &home);
        cmd
    };
    let ours = work.path().join("ours");
    let o = as_nobody()
        .args([
            "--plain-http",
            "--format",
            "rootfs",
            &image_ref(&reg, "rootfs/rootless", "zstd"),
        ])
        .arg(&ours)
        .output()
        .expect("run fastpull");
    assert!(
        o.status.success(),
        "rootless fastpull --format rootfs failed:\n{}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("2 device node(s) written as empty regular files")
            || String::from_utf8_lossy(&o.stdout)
                .contains("2 device node(s) written as empty regular files"),
        "one summary line for the emulated devices:\n{}",
        text(&o)
    );

    let layout = work.path().join("layout");
    let o = as_nobody()
        .args(["--plain-http", &image_ref(&reg, "rootfs/rootless", "gzip")])
        .arg(&layout)
        .output()
        .expect("run fastpull");
    assert!(o.status.success(), "{}", text(&o));
    let bundle = work.path().join("bundle");
    let image = format!("{}:gzip", layout.display());
    let mut umoci = std::process::Command::new("setpriv");
    umoci
        .args(setpriv_prefix().split_whitespace().skip(1))
        .args(["umoci", "unpack", "--rootless", "--image", &image])
        .arg(&bundle)
        .env("HOME", &home);
    let u = umoci.output().expect("run umoci");
    assert!(
        u.status.success(),
        "umoci unpack --rootless failed:\n{}",
        text(&u)
    );

    // Once more with --json: the untainted layers went through the merge, rootless too
    // (directory modes follow the renamed inodes), and the tree is the same.
    let ours_json = work.path().join("ours-json");
    let o = as_nobody()
        .args(["--plain-http", "--json", "--format", "rootfs"])
        .arg(image_ref(&reg, "rootfs/rootless", "gzip"))
        .arg(&ours_json)
        .output()
        .expect("run fastpull");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        merged_direct(&o),
        (RICH_MERGED, RICH_DIRECT),
        "{}",
        text(&o)
    );

    let a = snapshot(&ours, &IMPLICIT);
    let b = snapshot(&bundle.join("rootfs"), &IMPLICIT);
    assert_same("rootless fastpull", &a, "umoci unpack --rootless", &b);
    assert_same(
        "rootless fastpull",
        &a,
        "rootless fastpull (gzip layers)",
        &snapshot(&ours_json, &IMPLICIT),
    );
    let line = |p: &str| a.get(p).unwrap_or_else(|| panic!("{p} missing")).clone();
    // Owned by us, the image's owner in user.rootlesscontainers (0 written as NoopID).
    assert!(
        line("owned").contains(&format!("uid={NOBODY} gid={NOBODY}")),
        "{}",
        line("owned")
    );
    assert!(
        line("owned").contains("xattr:user.rootlesscontainers=08e80710e807"),
        "{}",
        line("owned")
    );
    assert!(
        line("etc/shadow").contains("xattr:user.rootlesscontainers=08ffffffff0f102a"),
        "{}",
        line("etc/shadow")
    );
    assert!(line("null-ish").starts_with("file mode=0666") && line("null-ish").contains("size=0"));
    assert!(!line("etc/passwd").contains("rootlesscontainers"));
}

/// One hostile case: a name, the layers, and what must happen.
struct Case {
    name: &'static str,
    layers: Vec<Vec<u8>>,
    /// `None`: the pull succeeds (the entry is contained) and `check` holds; `Some(text)`:
    /// it fails with exit 4 and says `text`.
    fails_with: Option<&'static str>,
    check: fn(&Path),
}

fn no_check(_: &Path) {}

fn hostile_cases(sentinel: &Path) -> Vec<Case> {
    let s = sentinel.to_str().expect("utf-8 temp path").to_string();
    let one = |t: &mut Tar| vec![t.finish()];
    let mut cases = Vec::new();
    cases.push(Case {
        name: "../ and absolute names land inside",
        layers: one(Tar::default()
            .file("../escape-rel", 0o644, b"x")
            .file("../../../escape-rel2", 0o644, b"x")
            .add(h(b'0', &format!("{s}/abs-file"), 0o644), b"")),
        fails_with: None,
        check: |r| {
            assert!(r.join("escape-rel").is_file() && r.join("escape-rel2").is_file());
        },
    });
    cases.push(Case {
        name: "symlink to an absolute path outside, then written through",
        layers: one(Tar::default()
            .symlink("out", &s)
            .file("out/pwned", 0o644, b"x")),
        fails_with: None,
        check: |r| {
            let inside: PathBuf = r.join(
                r.parent()
                    .unwrap()
                    .join("sentinel")
                    .strip_prefix("/")
                    .unwrap(),
            );
            assert!(
                inside.join("pwned").is_file(),
                "the file went to {} inside",
                inside.display()
            );
        },
    });
    cases.push(Case {
        name: "symlink to .. (and to /), then written through",
        layers: one(Tar::default()
            .symlink("up", "../../../..")
            .file("up/sentinel/pwned-up", 0o644, b"x")
            .symlink("root", "/")
            .file("root/pwned-root", 0o644, b"x")),
        fails_with: None,
        check: |r| {
            assert!(r.join("sentinel/pwned-up").is_file());
            assert!(r.join("pwned-root").is_file());
        },
    });
    cases.push(Case {
        name: "symlink, then a directory of the same name (CVE-2026-33056)",
        layers: one(Tar::default().symlink("d", &s).dir("d/", 0o777, T0)),
        fails_with: None,
        check: |r| {
            let md = std::fs::symlink_metadata(r.join("d")).unwrap();
            assert!(md.is_dir() && md.mode() & 0o7777 == 0o777);
        },
    });
    cases.push(Case {
        name: "symlinked parent swapped in by an earlier layer",
        layers: vec![
            Tar::default().dir("p/", 0o755, T0).finish(),
            Tar::default()
                .whiteout(".wh.p")
                .symlink("p", &s)
                .file("p/pwned-swap", 0o644, b"x")
                .finish(),
        ],
        fails_with: None,
        check: |r| {
            assert!(r
                .join(
                    r.parent()
                        .unwrap()
                        .join("sentinel/pwned-swap")
                        .strip_prefix("/")
                        .unwrap()
                )
                .is_file());
        },
    });
    cases.push(Case {
        name: "hard link to an absolute path outside",
        layers: one(Tar::default().hardlink("hl", &format!("{s}/secret"))),
        fails_with: Some("does not exist"),
        check: no_check,
    });
    cases.push(Case {
        name: "hard link to ../../x",
        layers: one(Tar::default().hardlink("hl", "../../sentinel/secret")),
        fails_with: Some("does not exist"),
        check: no_check,
    });
    cases.push(Case {
        name: "hard link through a symlink to outside",
        layers: one(Tar::default().symlink("sl", &s).hardlink("hl", "sl/secret")),
        fails_with: Some("does not exist"),
        check: no_check,
    });
    for (name, wh) in [
        ("whiteout .wh.", ".wh."),
        ("whiteout .wh.. (the parent)", ".wh.."),
        ("whiteout .wh...", ".wh..."),
    ] {
        cases.push(Case {
            name,
            layers: one(Tar::default()
                .dir("sub/", 0o755, T0)
                .whiteout(&format!("sub/{wh}"))),
            fails_with: Some("names no file"),
            check: no_check,
        });
    }
    cases.push(Case {
        name: "top-level .wh.. (would remove the root's parent)",
        layers: one(Tar::default().whiteout(".wh..")),
        fails_with: Some("names no file"),
        check: no_check,
    });
    cases.push(Case {
        name: "a symlink with data (size != 0)",
        layers: one(Tar::default().raw(
            &H {
                size: 512,
                link: b"target".to_vec(),
                ..h(b'2', "sl", 0o777)
            },
            &Tar::header(&h(b'0', "smuggled", 0o644)),
        )),
        fails_with: Some("reads no data for it"),
        check: no_check,
    });
    cases.push(Case {
        // GHSA-3cv2-h65g-fgmm: a PAX size is the next *file's*, not the GNU long name's in
        // between. Read as Go reads it: the file is empty, and what its header claimed as
        // data is the next entry.
        name: "PAX size before a GNU long name (tar-rs < 0.4.46 desync)",
        layers: one(Tar::default()
            .pax(&[("size", b"0")])
            .gnu_long(b'L', &format!("pax-then-long-{}", "l".repeat(100)))
            .raw(
                &H {
                    size: 512,
                    ..h(b'0', "pax-then-long", 0o644)
                },
                &Tar::header(&h(b'0', "smuggled", 0o644)),
            )),
        fails_with: None,
        check: |r| {
            let long = r.join(format!("pax-then-long-{}", "l".repeat(100)));
            assert_eq!(
                std::fs::metadata(&long).unwrap().len(),
                0,
                "the PAX size applies"
            );
            assert!(
                r.join("smuggled").is_file(),
                "Go reads the next header there"
            );
        },
    });
    cases.push(Case {
        name: "a zero block, then more entries",
        layers: vec![zero_block_then_entry()],
        fails_with: Some("single zero block"),
        check: no_check,
    });
    cases.push(Case {
        name: "root entry that is not a directory",
        layers: one(Tar::default().symlink("./", &s)),
        fails_with: Some("root directory"),
        check: no_check,
    });
    cases.push(Case {
        name: "a 4 MiB GNU long name",
        layers: one(Tar::default()
            .gnu_long(b'L', &"n".repeat(4 << 20))
            .file("x", 0o644, b"")),
        fails_with: Some("larger than"),
        check: no_check,
    });
    cases
}

/// A single zero block followed by an entry: Go stops with an error, so must we.
fn zero_block_then_entry() -> Vec<u8> {
    let mut t = Tar::default();
    t.file("first", 0o644, b"1");
    let mut out = std::mem::take(&mut t.0);
    out.extend_from_slice(&[0u8; 512]);
    out.extend_from_slice(&Tar::header(&h(b'0', "hidden", 0o644)));
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn hostile_layers_stay_inside_rootfs() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let sentinel = work.path().join("sentinel");
    std::fs::create_dir(&sentinel).unwrap();
    std::fs::write(sentinel.join("secret"), b"do not touch").unwrap();
    std::fs::set_permissions(
        &sentinel,
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
    let before = snapshot(work.path(), &["/"]);
    for (i, case) in hostile_cases(&sentinel).iter().enumerate() {
        let img = image(case.layers.iter().map(|t| layer(t, OCI_GZIP)).collect());
        let repo = format!("rootfs/hostile{i}");
        push_image(&reg, &repo, "t", &img);
        let dest = work.path().join("rootfs");
        let o = pull_rootfs(&image_ref(&reg, &repo, "t"), &dest);
        match case.fails_with {
            None => {
                assert!(
                    o.status.success(),
                    "{}: should be contained:\n{}",
                    case.name,
                    text(&o)
                );
                (case.check)(&dest);
            }
            Some(msg) => {
                assert_eq!(
                    o.status.code(),
                    Some(4),
                    "{}: exit 4 expected:\n{}",
                    case.name,
                    text(&o)
                );
                let err = String::from_utf8_lossy(&o.stderr);
                eprintln!("{}: {}", case.name, err.trim());
                assert!(
                    err.contains(msg),
                    "{}: stderr should say {msg:?}:\n{}",
                    case.name,
                    text(&o)
                );
                assert!(
                    !dest.exists(),
                    "{}: a failed pull left {}",
                    case.name,
                    dest.display()
                );
            }
        }
        // Nothing outside ROOTFS changed: the sentinel, its file, and no new names.
        if dest.exists() {
            remove_tree(&dest);
        }
        let after = snapshot(work.path(), &["/"]);
        assert_same("before", &before, &format!("after {:?}", case.name), &after);
    }
    assert!(
        !Path::new("/pwned-root").exists() && !Path::new("/escape-rel").exists(),
        "something escaped to /"
    );
}

/// Removes a tree a test unpacked (directories may have had their write bit taken away).
fn remove_tree(p: &Path) {
    let _ = std::process::Command::new("chmod")
        .args(["-R", "u+rwx"])
        .arg(p)
        .status();
    std::fs::remove_dir_all(p).unwrap_or_else(|e| panic!("remove {}: {e}", p.display()));
}

#[test]
fn diff_id_mismatch_leaves_nothing() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let good = Tar::default().file("a", 0o644, b"a").finish();
    let (blob, _) = layer(&good, OCI_GZIP);
    let wrong = sha256_digest(b"not this layer");
    let img = ImageBuilder::new(Flavor::Oci)
        .raw_layer(blob, wrong.clone())
        .build();
    push_image(&reg, "rootfs/bad-diffid", "t", &img);
    let dest = work.path().join("rootfs");
    let o = pull_rootfs(&image_ref(&reg, "rootfs/bad-diffid", "t"), &dest);
    assert_exit(&o, 4);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("diff_ids") && err.contains(&wrong),
        "{}",
        text(&o)
    );
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert!(left.is_empty(), "a failed pull left {left:?}");

    // A second layer that fails leaves an existing empty ROOTFS as it was.
    std::fs::create_dir(&dest).unwrap();
    let img = ImageBuilder::new(Flavor::Oci)
        .raw_layer(layer(&good, OCI_GZIP).0, sha256_digest(&good))
        .raw_layer(layer(&good, OCI_TAR).0, wrong)
        .build();
    push_image(&reg, "rootfs/bad-diffid2", "t", &img);
    let o = pull_rootfs(&image_ref(&reg, "rootfs/bad-diffid2", "t"), &dest);
    assert_exit(&o, 4);
    assert!(
        std::fs::read_dir(&dest).unwrap().next().is_none(),
        "ROOTFS was written to"
    );
    assert_eq!(
        std::fs::read_dir(work.path()).unwrap().count(),
        1,
        "only ROOTFS is left"
    );
}

/// A zstd layer that expands past the default ratio bound (64 MiB of one byte in a few KiB:
/// a decompression bomb, or a legitimate file of zeros) ends the pull with exit 4 and leaves
/// nothing; `--max-unpack-ratio 0` lifts the bound and the same image unpacks. A gzip layer
/// of the same file is within deflate's own 1032:1 and unpacks with the default.
#[test]
fn a_decompression_bomb_is_refused_unless_the_bound_is_lifted() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let zeros = vec![0u8; 64 << 20];
    let tar = Tar::default().file("zeros", 0o644, &zeros).finish();
    push_image(
        &reg,
        "rootfs/bomb",
        "t",
        &image(vec![layer(&tar, OCI_ZSTD)]),
    );
    push_image(
        &reg,
        "rootfs/bomb",
        "gz",
        &image(vec![layer(&tar, OCI_GZIP)]),
    );
    let reference = image_ref(&reg, "rootfs/bomb", "t");

    let dest = work.path().join("rootfs");
    let o = pull_rootfs(&reference, &dest);
    assert_exit(&o, 4);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("decompression bomb") && err.contains("--max-unpack-ratio"),
        "{}",
        text(&o)
    );
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert!(left.is_empty(), "a refused layer left {left:?}");

    let o = fastpull_command()
        .args([
            "--plain-http",
            "--format",
            "rootfs",
            "--max-unpack-ratio",
            "0",
        ])
        .arg(&reference)
        .arg(&dest)
        .output()
        .expect("run fastpull");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::metadata(dest.join("zeros")).expect("zeros").len(),
        64 << 20
    );

    let gz = work.path().join("gz");
    let o = pull_rootfs(&image_ref(&reg, "rootfs/bomb", "gz"), &gz);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::metadata(gz.join("zeros")).expect("zeros").len(),
        64 << 20
    );
}

#[test]
fn rootfs_destination_rules() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let tar = Tar::default().file("hello", 0o644, b"hi").finish();
    let img = image(vec![layer(&tar, OCI_TAR)]);
    push_image(&reg, "rootfs/dest", "t", &img);
    let reference = image_ref(&reg, "rootfs/dest", "t");

    // A non-empty directory is refused, untouched.
    let full = work.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep"), b"mine").unwrap();
    let o = pull_rootfs(&reference, &full);
    assert_exit(&o, 5);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not empty"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(full.join("keep")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 1);

    // An empty directory is filled (exchanged), a missing one made.
    for name in ["empty", "new/nested"] {
        let dest = work.path().join(name);
        if name == "empty" {
            std::fs::create_dir(&dest).unwrap();
        }
        let o = pull_rootfs(&reference, &dest);
        assert!(o.status.success(), "{name}:\n{}", text(&o));
        assert_eq!(std::fs::read(dest.join("hello")).unwrap(), b"hi");
        let md = std::fs::metadata(&dest).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o755);
        assert_eq!(md.mtime(), 0, "the root's mtime is the epoch, as umoci's");
    }
    let mut names: Vec<String> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["empty", "full", "new"],
        "no staging directory is left"
    );

    // Several platforms cannot be one root filesystem.
    let o = fastpull_command()
        .args([
            "--plain-http",
            "--format",
            "rootfs",
            "--all-platforms",
            &reference,
        ])
        .arg(work.path().join("multi"))
        .output()
        .unwrap();
    assert_exit(&o, 2);
    assert!(!work.path().join("multi").exists());
}

/// The staging directory of a pull into `work/rootfs`, if there is one.
fn staging_in(work: &Path) -> Option<PathBuf> {
    std::fs::read_dir(work)
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".rootfs.fastpull-")
        })
        .map(|e| e.path())
}

/// Starts a rootfs pull of `image` into `work/rootfs`, waits until `ready` holds, sends
/// SIGINT, and returns what the process did.
fn interrupt_when(image: &str, work: &Path, ready: impl Fn() -> bool) -> Output {
    let mut cmd = fastpull_command();
    cmd.args(["--plain-http", "--format", "rootfs", image])
        .arg(work.join("rootfs"));
    interrupt(cmd, ready)
}

/// Starts `cmd`, waits until `ready` holds, sends SIGINT, and returns what it did.
fn interrupt(mut cmd: std::process::Command, ready: impl Fn() -> bool) -> Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn fastpull");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !ready() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
    // A fastpull that ignores the signal must fail the test, not hang it: killed after
    // 180 s, it exits by SIGKILL rather than with 130.
    let (exited, wait) = std::sync::mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        if wait
            .recv_timeout(std::time::Duration::from_secs(180))
            .is_err()
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    });
    let o = child.wait_with_output().expect("wait for fastpull");
    let _ = exited.send(());
    let _ = killer.join();
    o
}

#[test]
fn interrupted_rootfs_pull_leaves_nothing() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");

    // Stopped while the blobs download (slowly, through a capped proxy).
    let slow = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(7, 1, 4 << 20))
        .build();
    push_image(&reg, "rootfs/slow", "t", &slow);
    let proxy = CountingProxy::start(&reg.addr());
    proxy.cap(
        Which::PathContains("/blobs/".into()),
        Cap::smooth(256 << 10),
    );
    let o = interrupt_when(
        &format!("{}/rootfs/slow:t", proxy.addr()),
        work.path(),
        || staging_in(work.path()).is_some_and(|s| s.join("blobs").is_dir()),
    );
    assert_exit(&o, 130);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("was not written"),
        "{}",
        text(&o)
    );
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "interrupted while downloading, it left {left:?}"
    );

    // Stopped while it unpacks (many entries, so that there is time to).
    let mut t = Tar::default();
    t.dir("many/", 0o755, T0);
    for i in 0..30_000 {
        t.file(&format!("many/f{i}"), 0o644, b"");
    }
    let many = image(vec![layer(&t.finish(), OCI_GZIP)]);
    push_image(&reg, "rootfs/many", "t", &many);
    let o = interrupt_when(&image_ref(&reg, "rootfs/many", "t"), work.path(), || {
        staging_in(work.path()).is_some_and(|s| s.join("rootfs/many").is_dir())
    });
    if o.status.code() == Some(0) {
        // The signal came after the rename: then the tree must be whole.
        eprintln!("interrupted_rootfs_pull_leaves_nothing: the unpack finished before SIGINT");
        assert_eq!(
            std::fs::read_dir(work.path().join("rootfs/many"))
                .unwrap()
                .count(),
            30_000
        );
        assert!(staging_in(work.path()).is_none());
    } else {
        assert_exit(&o, 130);
        let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
        assert!(
            left.is_empty(),
            "interrupted while unpacking, it left {left:?}"
        );
    }
}

/// A staging directory a killed pull left beside ROOTFS (unlocked, older than 10 s) is
/// removed by the next pull, without following the symlinks in it; one a running pull holds
/// (its `flock`), or one just made, is left alone.
#[test]
fn stale_staging_directories_are_swept_held_and_young_ones_kept() {
    use std::os::fd::AsFd;
    use std::time::{Duration, SystemTime};
    let reg = Registry::start();
    let tar = Tar::default().file("hello", 0o644, b"hi").finish();
    let img = image(vec![layer(&tar, OCI_TAR)]);
    push_image(&reg, "rootfs/sweep", "t", &img);
    let reference = image_ref(&reg, "rootfs/sweep", "t");
    let work = tempfile::tempdir().expect("temp dir");
    let sentinel = work.path().join("sentinel");
    std::fs::create_dir(&sentinel).expect("sentinel");
    std::fs::write(sentinel.join("keep"), b"mine").expect("sentinel file");
    let staging = |tag: &str| work.path().join(format!(".root.fastpull-{tag}"));
    let (stale, held, young) = (
        staging("dead0001"),
        staging("beef0002"),
        staging("cafe0003"),
    );
    for d in [&stale, &held, &young] {
        std::fs::create_dir_all(d.join("blobs/sha256")).expect("staging");
        std::fs::write(d.join("blobs/sha256/x"), b"partial").expect("file");
        std::os::unix::fs::symlink(&sentinel, d.join("out")).expect("symlink");
    }
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for d in [&stale, &held] {
        std::fs::File::open(d)
            .and_then(|f| f.set_modified(hour_ago))
            .expect("age the directory");
    }
    let lock = std::fs::File::open(&held).expect("open held");
    rustix::fs::flock(
        lock.as_fd(),
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .expect("hold it as a running pull would");

    let dest = work.path().join("root");
    let o = pull_rootfs(&reference, &dest);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(dest.join("hello")).expect("hello"), b"hi");
    assert!(
        !stale.exists(),
        "the stale staging directory is still there"
    );
    assert!(
        held.join("blobs/sha256/x").is_file(),
        "a held one was swept"
    );
    assert!(
        young.join("blobs/sha256/x").is_file(),
        "a young one was swept"
    );
    assert_eq!(
        std::fs::read(sentinel.join("keep")).expect("sentinel"),
        b"mine",
        "the sweep followed a symlink"
    );
    drop(lock);
}

/// Layers are unpacked while the image downloads: with the second layer's body held by the
/// proxy (nothing of it relayed), the first layer's `layer_applied` event still comes, and
/// comes before that blob is done; once the hold is released the pull finishes with the
/// same tree as `umoci unpack`. An ordering check, not a timing one: the event is seen
/// while the held blob cannot be complete.
#[test]
fn layers_unpack_while_later_layers_download() {
    use std::io::BufRead;
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let (_, img) = rich_images(rustix::process::geteuid().is_root());
    assert!(img.layers.len() >= 2, "two layers at least");
    push_image(&reg, "rootfs/stream", "gzip", &img);
    let proxy = CountingProxy::start(&reg.addr());
    let held = img.layers[1].digest.clone();
    proxy.hold(&format!("/blobs/{held}"), 0);

    let ours = work.path().join("ours");
    let mut child = fastpull_command()
        .args(["--plain-http", "--json", "--format", "rootfs"])
        .arg(format!("{}/rootfs/stream:gzip", proxy.addr()))
        .arg(&ours)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn fastpull");
    // Should streaming be broken, the pull would wait for the held blob for ever: a
    // watchdog lets it go (and the check below fails). Generous, for qemu: it only bounds
    // how long a broken build takes to fail.
    let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let (released, proxy_release) = (released.clone(), proxy.releaser());
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(90));
            if !released.swap(true, std::sync::atomic::Ordering::SeqCst) {
                proxy_release();
            }
        })
    };
    let stdout = child.stdout.take().expect("stdout");
    let mut events: Vec<serde_json::Value> = Vec::new();
    let mut first_applied_while_held = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.expect("read fastpull's stdout");
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        if v["event"] == "layer_applied" && v["index"] == 0 && first_applied_while_held.is_none() {
            let held_blob_done = events
                .iter()
                .any(|e| e["event"] == "blob_done" && e["digest"] == held.as_str());
            let still_held = !released.load(std::sync::atomic::Ordering::SeqCst);
            first_applied_while_held = Some(still_held && !held_blob_done);
            if !released.swap(true, std::sync::atomic::Ordering::SeqCst) {
                proxy.release();
            }
        }
        events.push(v);
    }
    let o = child.wait_with_output().expect("wait for fastpull");
    drop(watchdog);
    assert!(o.status.success(), "fastpull failed:\n{}", text(&o));
    assert_eq!(
        first_applied_while_held,
        Some(true),
        "layer 0 was not applied while layer 1's blob was held: {events:#?}"
    );
    // Each layer once, in order, with what the layer holds.
    let applied: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "layer_applied")
        .collect();
    assert_eq!(applied.len(), img.layers.len(), "{events:#?}");
    for (i, (e, l)) in applied.iter().zip(&img.layers).enumerate() {
        assert_eq!(e["index"], i);
        assert_eq!(e["digest"], l.digest.as_str());
        // An empty layer has no entries, but its two end blocks.
        assert!(e["entries"].as_u64().is_some(), "{e}");
        assert!(e["uncompressed"].as_u64().is_some_and(|n| n >= 1024), "{e}");
    }
    let done = events.last().expect("events");
    assert_eq!(done["event"], "done");
    assert_eq!(done["unpacked"]["layers"], img.layers.len());
    assert_eq!(
        done["unpacked"]["entries"],
        applied
            .iter()
            .filter_map(|e| e["entries"].as_u64())
            .sum::<u64>()
    );

    assert_like_umoci(
        &reg,
        "rootfs/stream",
        &ours,
        work.path(),
        "fastpull (streamed)",
    );
}

/// A layer whose first fetch is corrupted (by a proxy, once) while it is being unpacked:
/// what was unpacked from the bad bytes is not kept (the blob is fetched again and the tree
/// built from verified bytes), and the result is the image's. Corrupted every time, the
/// pull fails (exit 4) and an existing empty ROOTFS stays empty, nothing else left.
#[test]
fn a_layer_repaired_while_it_streams_gives_the_image_and_a_bad_one_leaves_nothing() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let big = random_layer(14_001, 4, 1 << 20);
    let small = layer(
        &Tar::default().file("small", 0o644, b"s").finish(),
        OCI_GZIP,
    );
    let img = ImageBuilder::new(Flavor::Oci)
        .layer(big)
        .raw_layer(small.0, small.1)
        .build();
    push_image(&reg, "rootfs/repair", "t", &img);
    let clean = work.path().join("clean");
    let o = pull_rootfs(&image_ref(&reg, "rootfs/repair", "t"), &clean);
    assert!(o.status.success(), "{}", text(&o));

    let bad = img.layers[0].digest.clone();
    let once = FaultProxy::start(&reg.addr());
    once.add(
        Rule::new(&format!("/blobs/{bad}"), Fault::Corrupt { at: 777_777 })
            .range_start(0)
            .times(1),
    );
    let repaired = work.path().join("repaired");
    let o = fastpull_command()
        .args(["-v", "--plain-http", "--format", "rootfs"])
        .arg(format!("{}/rootfs/repair:t", once.addr()))
        .arg(&repaired)
        .output()
        .expect("run fastpull");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        once.blob_requests(&bad).len() >= 2,
        "the corrupted blob was fetched again: {}",
        text(&o)
    );
    if !String::from_utf8_lossy(&o.stderr).contains("unpacking again from the verified blobs") {
        eprintln!("note: the unpacker had read nothing of the bad fetch (no fallback needed)");
    }
    assert_same(
        "clean pull",
        &snapshot(&clean, &[]),
        "repaired pull",
        &snapshot(&repaired, &[]),
    );

    let always = FaultProxy::start(&reg.addr());
    always.add(
        Rule::new(&format!("/blobs/{bad}"), Fault::Corrupt { at: 777_777 })
            .range_start(0)
            .times(usize::MAX),
    );
    let dest = work.path().join("empty");
    std::fs::create_dir(&dest).unwrap();
    let o = pull_rootfs(&format!("{}/rootfs/repair:t", always.addr()), &dest);
    assert_exit(&o, 4);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&bad),
        "the error names the blob: {}",
        text(&o)
    );
    assert!(
        std::fs::read_dir(&dest).unwrap().next().is_none(),
        "ROOTFS was written to"
    );
    let mut left: Vec<String> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["clean", "empty", "repaired"]);
}

/// A layer is unpacked from the part of it that has arrived: with one large layer's body
/// held after 6 of its ~8 MiB (one request), the files of its first part appear in the
/// staging tree while the rest is held; released, the pull completes. An ordering check:
/// the file is seen while the blob cannot be complete.
#[test]
fn a_layer_unpacks_from_its_first_bytes_while_the_rest_is_held() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let seed = 14_101;
    let img = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(seed, 8, 1 << 20))
        .build();
    push_image(&reg, "rootfs/prefix", "t", &img);
    let proxy = CountingProxy::start(&reg.addr());
    proxy.hold(&format!("/blobs/{}", img.layers[0].digest), 6 << 20);
    let mut child = fastpull_command()
        // One request, never re-issued while it is held (a re-issued range from 6 MiB
        // would be relayed whole).
        .args([
            "--plain-http",
            "--chunk-size",
            "64M",
            "--stall-timeout",
            "600",
        ])
        .args(["--format", "rootfs"])
        .arg(format!("{}/rootfs/prefix:t", proxy.addr()))
        .arg(work.path().join("rootfs"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn fastpull");
    // file-4 starts past 4 MiB of the tar, well inside the 6 MiB relayed.
    let early = format!("rootfs/layer-{seed}/file-4.bin");
    // Generous, for qemu: only a broken build waits this long.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut seen_while_held = false;
    while std::time::Instant::now() < deadline {
        if staging_in(work.path()).is_some_and(|s| s.join(&early).exists()) {
            let delivered = proxy.snapshot().delivered(&img.layers[0].digest);
            seen_while_held = proxy.held() > 0 && delivered < img.layers[0].size();
            break;
        }
        if child.try_wait().expect("poll fastpull").is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    proxy.release();
    let o = child.wait_with_output().expect("wait for fastpull");
    assert!(o.status.success(), "fastpull failed:\n{}", text(&o));
    assert!(
        seen_while_held,
        "{early} did not appear while the rest of the layer was held"
    );
    let dir = work.path().join(format!("rootfs/layer-{seed}"));
    let mut sizes: Vec<u64> = std::fs::read_dir(&dir)
        .expect("the layer's directory")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .collect();
    sizes.sort();
    assert_eq!(sizes, vec![1 << 20; 8]);
}

// ---------------------------------------------------------------------------------------------
// --unpack ROOTFS beside a layout
// ---------------------------------------------------------------------------------------------

/// `fastpull --plain-http ARGS… IMAGE DEST --unpack ROOTFS`.
fn pull_unpack(args: &[&str], image: &str, dest: &Path, rootfs: &Path) -> Output {
    fastpull_command()
        .arg("--plain-http")
        .args(args)
        .arg(image)
        .arg(dest)
        .arg("--unpack")
        .arg(rootfs)
        .output()
        .expect("run fastpull")
}

/// The names in `dir`, sorted (what a pull left beside its destinations).
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The last line of `--json` output: the `done` event.
fn done_event(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let last = out
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no output: {}", text(o)));
    let v: serde_json::Value = serde_json::from_str(last).expect("a JSON line");
    assert_eq!(v["event"], "done", "{}", text(o));
    v
}

/// `IMAGE DEST --unpack ROOTFS`, with `--format oci` and `dir`: ROOTFS is the tree
/// `--format rootfs` and `umoci unpack` give (the rich image: whiteouts, hard links, a zstd
/// layer…); DEST is, file for file, what the same pull without `--unpack` writes, skopeo
/// copies the image out of it byte for byte, and umoci unpacks the OCI one to the same tree.
#[test]
fn unpack_beside_a_layout_gives_the_layout_and_the_rootfs() {
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let w = |name: &str| work.path().join(name);
    let (as_built, gzip_only) = rich_images(rustix::process::geteuid().is_root());
    push_image(&reg, "unpack/rich", "zstd", &as_built);
    push_image(&reg, "unpack/rich", "gzip", &gzip_only);

    let o = pull_rootfs(&image_ref(&reg, "unpack/rich", "zstd"), &w("rootfs-only"));
    assert!(o.status.success(), "{}", text(&o));
    let want = snapshot(&w("rootfs-only"), &IMPLICIT);

    for (format, tag, img) in [("oci", "gzip", &gzip_only), ("dir", "zstd", &as_built)] {
        let reference = image_ref(&reg, "unpack/rich", tag);
        let (dest, rootfs) = (w(&format!("{format}-dest")), w(&format!("{format}-rootfs")));
        let o = pull_unpack(&["--json", "--format", format], &reference, &dest, &rootfs);
        assert!(o.status.success(), "--format {format}:\n{}", text(&o));
        let done = done_event(&o);
        assert_eq!(done["dest"], dest.display().to_string());
        assert_eq!(done["unpacked"]["path"], rootfs.display().to_string());
        assert_eq!(done["unpacked"]["layers"], img.layers.len());
        assert_same(
            &format!("--format {format} --unpack"),
            &snapshot(&rootfs, &IMPLICIT),
            "--format rootfs",
            &want,
        );

        let plain = w(&format!("{format}-plain"));
        fastpull(
            &reg,
            &[
                OsStr::new("--format"),
                OsStr::new(format),
                OsStr::new(&reference),
                plain.as_os_str(),
            ],
        );
        crate::interop::assert_same_tree(
            "DEST",
            "with --unpack",
            &crate::interop::tree(&dest),
            "without",
            &crate::interop::tree(&plain),
        );
        let src = match format {
            "oci" => format!("oci:{}:{tag}", dest.display()),
            _ => format!("dir:{}", dest.display()),
        };
        crate::interop::assert_skopeo_copies(&reg, &src, img, &w(&format!("{format}-skopeo")));
    }
    let theirs = umoci_unpack(&reg, &w("oci-dest"), "gzip", &w("bundle"));
    assert_same(
        "--unpack",
        &snapshot(&w("oci-rootfs"), &IMPLICIT),
        "umoci unpack of DEST",
        &snapshot(&theirs, &IMPLICIT),
    );
    // No staging directory is left beside ROOTFS.
    assert_eq!(
        names_in(work.path()),
        [
            "bundle",
            "dir-dest",
            "dir-plain",
            "dir-rootfs",
            "dir-skopeo",
            "oci-dest",
            "oci-plain",
            "oci-rootfs",
            "oci-skopeo",
            "rootfs-only"
        ]
    );
}

/// Blobs already verified in DEST are unpacked from their files: a re-pull with `--unpack`
/// fetches no blob byte (counted at a proxy), and an image sharing a layer with the one in
/// DEST fetches only its own; each ROOTFS holds its image's files.
#[test]
fn unpack_from_blobs_already_in_the_layout_fetches_only_what_is_missing() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let (base, top) = ((14_201, 3, 200_000), (14_202, 2, 100_000));
    let a = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(base.0, base.1, base.2))
        .build();
    let b = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(base.0, base.1, base.2))
        .layer(random_layer(top.0, top.1, top.2))
        .build();
    push_image(&reg, "unpack/cached", "a", &a);
    push_image(&reg, "unpack/cached", "b", &b);
    // Every pull through the proxy: DEST records the image under the registry it came from.
    let proxy = CountingProxy::start(&reg.addr());
    let dest = work.path().join("layout");
    let o = fastpull_command()
        .args(["--plain-http", &format!("{}/unpack/cached:a", proxy.addr())])
        .arg(&dest)
        .output()
        .expect("run fastpull");
    assert!(o.status.success(), "{}", text(&o));
    let fetched = |log: &crate::support::counting::Log, digest: &str| log.body_gets(digest).len();
    let before = proxy.settle();
    for blob in a.blobs() {
        assert!(
            fetched(&before, &blob.digest) > 0,
            "the first pull fetched {}",
            blob.digest
        );
    }

    let rootfs_a = work.path().join("rootfs-a");
    let o = pull_unpack(
        &["--json"],
        &format!("{}/unpack/cached:a", proxy.addr()),
        &dest,
        &rootfs_a,
    );
    assert!(o.status.success(), "{}", text(&o));
    let log = proxy.settle();
    for blob in a.blobs() {
        assert!(
            fetched(&log, &blob.digest) == fetched(&before, &blob.digest),
            "blob {} was fetched again: {}",
            blob.digest,
            log.describe()
        );
    }
    let done = done_event(&o);
    assert_eq!(done["downloaded"], 0);
    assert_eq!(done["unpacked"]["layers"], 1);
    crate::interop::assert_same_tree(
        "ROOTFS from the blobs in DEST",
        "ROOTFS",
        &crate::interop::tree(&rootfs_a),
        "image a",
        &crate::interop::expected_rootfs(&[base]),
    );

    let rootfs_b = work.path().join("rootfs-b");
    let o = pull_unpack(
        &[],
        &format!("{}/unpack/cached:b", proxy.addr()),
        &dest,
        &rootfs_b,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("Unpacked to {}", rootfs_b.display())),
        "{}",
        text(&o)
    );
    let log = proxy.settle();
    assert!(
        fetched(&log, &b.layers[0].digest) == fetched(&before, &b.layers[0].digest),
        "the shared layer was fetched: {}",
        log.describe()
    );
    assert_eq!(log.delivered(&b.layers[1].digest), b.layers[1].size());
    crate::interop::assert_same_tree(
        "ROOTFS from a blob in DEST and a fetched one",
        "ROOTFS",
        &crate::interop::tree(&rootfs_b),
        "image b",
        &crate::interop::expected_rootfs(&[base, top]),
    );
    let index = crate::interop::read_json(&dest.join("index.json"));
    let names: Vec<&str> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .collect();
    assert_eq!(names, ["a", "b"], "{index}");
}

/// A layer that does not match its diff_id with `--unpack`: exit 4, no ROOTFS and no
/// staging directory; DEST keeps the verified blobs (as any failed pull) but does not
/// record the image.
#[test]
fn unpack_with_a_diff_id_mismatch_leaves_no_rootfs_and_no_image_in_dest() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let good = Tar::default().file("a", 0o644, b"a").finish();
    let wrong = sha256_digest(b"not this layer");
    let img = ImageBuilder::new(Flavor::Oci)
        .raw_layer(layer(&good, OCI_GZIP).0, wrong.clone())
        .build();
    push_image(&reg, "unpack/bad-diffid", "t", &img);
    for format in ["oci", "dir"] {
        let dest = work.path().join(format!("{format}-dest"));
        let rootfs = work.path().join(format!("{format}-rootfs"));
        let o = pull_unpack(
            &["--format", format],
            &image_ref(&reg, "unpack/bad-diffid", "t"),
            &dest,
            &rootfs,
        );
        assert_exit(&o, 4);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("diff_id") && err.contains(&wrong),
            "{}",
            text(&o)
        );
        assert!(!rootfs.exists(), "ROOTFS was written");
        let layer_file = match format {
            "oci" => dest.join("blobs/sha256").join(hex(&img.layers[0].digest)),
            _ => dest.join(hex(&img.layers[0].digest)),
        };
        assert_eq!(
            std::fs::read(&layer_file).expect("the verified layer stays in DEST"),
            img.layers[0].bytes
        );
        let index = dest.join("index.json");
        if index.exists() {
            let v = crate::interop::read_json(&index);
            assert_eq!(
                v["manifests"],
                serde_json::json!([]),
                "the image was recorded"
            );
        }
        assert!(
            !dest.join("manifest.json").exists(),
            "the image was recorded"
        );
    }
    assert_eq!(
        names_in(work.path()),
        ["dir-dest", "oci-dest"],
        "a staging directory was left"
    );
}

/// Ctrl-C while the blobs download with `--unpack`: exit 130, DEST keeps its partial
/// download (journaled) for the next run, ROOTFS and its staging directory leave nothing;
/// the same command then resumes and writes both.
#[test]
fn interrupted_unpack_keeps_dest_resumable_and_leaves_no_rootfs() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let seed = 14_301;
    let img = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(seed, 1, 4 << 20))
        .build();
    push_image(&reg, "unpack/slow", "t", &img);
    let proxy = CountingProxy::start(&reg.addr());
    proxy.cap(
        Which::PathContains("/blobs/".into()),
        Cap::smooth(256 << 10),
    );
    let (dest, rootfs) = (work.path().join("dest"), work.path().join("rootfs"));
    let partial = dest
        .join(".fastpull-tmp")
        .join(format!("{}.partial", hex(&img.layers[0].digest)));
    let mut cmd = fastpull_command();
    cmd.args(["--plain-http", &format!("{}/unpack/slow:t", proxy.addr())])
        .arg(&dest)
        .arg("--unpack")
        .arg(&rootfs);
    let o = interrupt(cmd, || {
        staging_in(work.path()).is_some()
            && proxy.snapshot().delivered(&img.layers[0].digest) >= 1 << 20
    });
    assert_exit(&o, 130);
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains(&format!("{} was not written", rootfs.display())),
        "{}",
        text(&o)
    );
    assert_eq!(
        names_in(work.path()),
        ["dest"],
        "ROOTFS or its staging left"
    );
    assert!(
        partial.with_extension("journal").is_file(),
        "the partial download's journal: {:?}",
        std::fs::read_dir(dest.join(".fastpull-tmp")).map(|rd| rd.count())
    );

    let o = pull_unpack(
        &["--json"],
        &image_ref(&reg, "unpack/slow", "t"),
        &dest,
        &rootfs,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\"blob_resumed\""),
        "the rerun resumed the partial download: {}",
        text(&o)
    );
    crate::interop::assert_same_tree(
        "ROOTFS after the rerun",
        "ROOTFS",
        &crate::interop::tree(&rootfs),
        "the image",
        &crate::interop::expected_rootfs(&[(seed, 1, 4 << 20)]),
    );
    assert_eq!(names_in(work.path()), ["dest", "rootfs"]);
}

/// `--format rootfs` keeps no blob beyond the pull, so its blobs (in the staging directory)
/// are scratch: no resume journal beside them while they download, and never fsynced (the
/// pull passes the `fsync` phase of `FASTPULL_TEST_STOP`, src/stop_hook.rs, without
/// stopping there). The same image pulled to a layout does stop there (the control).
#[test]
fn root_filesystem_blobs_are_scratch_without_journal_or_fsync() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let img = ImageBuilder::new(Flavor::Oci)
        .layer(random_layer(14_401, 1, 3 << 20))
        .build();
    push_image(&reg, "unpack/scratch", "t", &img);
    let reference = image_ref(&reg, "unpack/scratch", "t");
    let layer = hex(&img.layers[0].digest).to_string();

    // Runs fastpull with the stop hook at `phase` until it stops there (its marker on
    // stderr: then `at_stop` looks, and it is killed) or exits; returns whether it stopped.
    let run = |dest: &Path, format: &str, phase: &str, at_stop: &dyn Fn()| -> bool {
        let mut cmd = fastpull_command();
        cmd.args(["--plain-http", "--format", format, &reference])
            .arg(dest)
            .env("FASTPULL_TEST_STOP", format!("{phase}@{layer}"));
        // Killed when dropped: a failed assertion must not leave a stopped fastpull behind.
        let mut child = Run::start(cmd);
        let err = child.err_so_far.clone();
        let marker = format!("fastpull-test-stop: {phase}");
        let stopped = child.until(&format!("{format}: a stop at {phase} or the end"), || {
            String::from_utf8_lossy(&err.lock().expect("stderr")).contains(&marker)
        });
        if stopped {
            at_stop();
        } else {
            let o = child.wait();
            assert!(o.status.success(), "{format}: {}: {}", o.status, text(&o));
        }
        stopped
    };
    let files_named = |dir: &Path, ending: &str| -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else if p.to_string_lossy().ends_with(ending) {
                    found.push(p);
                }
            }
        }
        found
    };

    // Every byte of the layer written, its digest pending: the layer's partial file and no
    // journal in the staging directory (the config's fetch may be there too).
    let rootfs = work.path().join("rootfs");
    let at_hash = || {
        let staging = staging_in(work.path()).expect("the staging directory");
        assert_eq!(
            files_named(&staging, &format!("{layer}.partial")).len(),
            1,
            "the layer's partial file"
        );
        assert_eq!(
            files_named(&staging, ".journal"),
            Vec::<PathBuf>::new(),
            "a resume journal for a scratch blob"
        );
    };
    assert!(run(&rootfs, "rootfs", "hash", &at_hash), "stopped at hash");
    // Never fsynced: the pull completes through the phase.
    let _ = std::fs::remove_dir_all(&rootfs);
    if let Some(s) = staging_in(work.path()) {
        std::fs::remove_dir_all(s).expect("remove the killed pull's staging directory");
    }
    assert!(
        !run(&rootfs, "rootfs", "fsync", &|| ()),
        "a --format rootfs pull stopped before fsyncing a blob it throws away"
    );
    crate::interop::assert_same_tree(
        "ROOTFS",
        "ROOTFS",
        &crate::interop::tree(&rootfs),
        "the image",
        &crate::interop::expected_rootfs(&[(14_401, 1, 3 << 20)]),
    );
    // The control: a layout's blobs are fsynced.
    assert!(
        run(&work.path().join("layout"), "oci", "fsync", &|| ()),
        "a layout's blob was not fsynced"
    );
}

/// What `--unpack` refuses, before anything is written: with an archive format or
/// `--format rootfs`, several platforms, and a ROOTFS that is DEST, inside it (through a
/// symlink too) or around it (exit 2); a non-empty ROOTFS (exit 5, untouched). An existing
/// empty ROOTFS is filled.
#[test]
fn unpack_option_rules() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let w = |name: &str| work.path().join(name);
    let tar = Tar::default().file("hello", 0o644, b"hi").finish();
    let img = image(vec![layer(&tar, OCI_TAR)]);
    push_image(&reg, "unpack/rules", "t", &img);
    let reference = image_ref(&reg, "unpack/rules", "t");
    std::fs::create_dir(w("layout")).expect("mkdir");
    std::os::unix::fs::symlink(w("layout"), w("alias")).expect("symlink");

    let refused: [(&[&str], &str, PathBuf, PathBuf); 9] = [
        (&["--format", "rootfs"], "rootfs", w("d1"), w("r1")),
        (
            &["--format", "docker-archive"],
            "oci or dir",
            w("d2.tar"),
            w("r2"),
        ),
        (
            &["--format", "oci-archive"],
            "oci or dir",
            w("d3.tar"),
            w("r3"),
        ),
        (&["--all-platforms"], "one platform", w("d4"), w("r4")),
        (
            &["--platform", "linux/amd64", "--platform", "linux/arm64"],
            "one platform",
            w("d5"),
            w("r5"),
        ),
        (&[], "is DEST or inside it", w("d6"), w("d6")),
        (
            &[],
            "is DEST or inside it",
            w("layout"),
            w("layout/sub/rootfs"),
        ),
        (
            &[],
            "is DEST or inside it",
            w("layout"),
            w("alias/../alias/rootfs"),
        ),
        (&[], "holds DEST", w("r9/layout"), w("r9")),
    ];
    for (args, why, dest, rootfs) in &refused {
        let o = pull_unpack(args, &reference, dest, rootfs);
        assert_exit(&o, 2);
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(why),
            "{args:?}: {}",
            text(&o)
        );
    }
    assert_eq!(
        names_in(work.path()),
        ["alias", "layout"],
        "a refusal wrote"
    );
    assert_eq!(std::fs::read_dir(w("layout")).expect("layout").count(), 0);

    let full = w("full");
    std::fs::create_dir(&full).expect("mkdir");
    std::fs::write(full.join("keep"), b"mine").expect("write");
    let o = pull_unpack(&[], &reference, &w("d10"), &full);
    assert_exit(&o, 5);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not empty"),
        "{}",
        text(&o)
    );
    assert_eq!(names_in(&full), ["keep"]);
    assert!(!w("d10").exists(), "DEST was made for a refused ROOTFS");

    let empty = w("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let o = pull_unpack(&[], &reference, &w("layout"), &empty);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(empty.join("hello")).expect("hello"), b"hi");
    assert!(w("layout/index.json").is_file());
}

/// Issue 14's size extremes for the umoci comparison: a 1 GiB regular file (a repeating
/// pattern with a block counter, so that no two blocks are equal while its gzip layer stays
/// about 10 MiB) in its own gzip layer, beside 0 B files, unpacked by `--format rootfs` as
/// `umoci unpack` does (size, sha256, mode, owner, mtime…). The tar is never held whole in
/// memory: it is streamed through the hasher (its diff_id) and the compressor.
#[test]
fn a_1gib_file_unpacks_as_umoci_does() {
    use flate2::write::GzEncoder;
    use std::io::Write;
    require_tools();
    // Under qemu (the aarch64 stage) fastpull is many times slower: 64 MiB there.
    let size: u64 = if crate::support::runner::under_emulation() {
        64 << 20
    } else {
        1 << 30
    };
    const BLOCK: usize = 64 << 10;
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");

    // ring's sha256 is assembly, fast in a debug build too.
    let mut diff_id = ring::digest::Context::new(&ring::digest::SHA256);
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut put = |bytes: &[u8]| {
        diff_id.update(bytes);
        gz.write_all(bytes).expect("gzip into memory");
    };
    let mut big = h(b'0', "big/1gib", 0o640);
    big.size = size;
    big.mtime = T0 + 40;
    put(&Tar::header(&big));
    let pattern = b"fastpull: a 1 GiB file, block ";
    let mut block = vec![0u8; BLOCK];
    for (i, b) in block.iter_mut().enumerate() {
        *b = pattern[i % pattern.len()];
    }
    for n in 0..size / BLOCK as u64 {
        block[..16].copy_from_slice(format!("{n:016x}").as_bytes());
        put(&block);
    }
    // Size 1 GiB is a whole number of 512-byte blocks: no padding. Then a 0 B file after
    // it, and the end of the archive.
    let mut zero = h(b'0', "big/zero", 0o600);
    zero.mtime = T0 + 41;
    put(&Tar::header(&zero));
    put(&[0u8; 1024]);
    let blob = Blob::new(OCI_GZIP, gz.finish().expect("finish gzip"));
    let diff_id = format!("sha256:{}", hex::encode(diff_id.finish()));
    assert!(blob.size() < 64 << 20, "the layer is {} bytes", blob.size());
    let small = Tar::default()
        .dir("big/", 0o755, T0 + 39)
        .file("empty", 0o644, b"")
        .finish();
    let img = image(vec![layer(&small, OCI_GZIP), (blob, diff_id)]);
    push_image(&reg, "rootfs/1gib", "t", &img);
    let reference = image_ref(&reg, "rootfs/1gib", "t");

    let ours = work.path().join("ours");
    let o = pull_rootfs(&reference, &ours);
    assert!(o.status.success(), "{}", text(&o));
    let theirs = umoci_tree(&reg, &reference, "t", work.path());
    let a = snapshot(&ours, &[]);
    assert_same("fastpull", &a, "umoci unpack", &snapshot(&theirs, &[]));
    let line = |p: &str| a.get(p).unwrap_or_else(|| panic!("{p}: {a:#?}")).clone();
    assert!(
        line("big/1gib").starts_with("file mode=0640")
            && line("big/1gib").contains(&format!(" size={size} ")),
        "{}",
        line("big/1gib")
    );
    for empty in ["big/zero", "empty"] {
        assert!(line(empty).contains(" size=0 "), "{}", line(empty));
    }
}

/// Layers are staged at once, not one after the other: with the bottom layer's blob held
/// at the proxy before its first byte, the next layer (downloaded whole) is unpacked into
/// its own tree and its diff_id matched (`layer_staged`) while the bottom layer has not
/// had a byte; released, the pull completes, merges, and equals `umoci unpack`'s tree. An
/// ordering check, not a timing one.
#[test]
fn layers_stage_at_once_while_the_bottom_one_is_held() {
    use std::io::BufRead;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    require_tools();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let (_, img) = rich_images(rustix::process::geteuid().is_root());
    push_image(&reg, "rootfs/parallel", "gzip", &img);
    let proxy = CountingProxy::start(&reg.addr());
    let bottom = img.layers[0].digest.clone();
    proxy.hold(&format!("/blobs/{bottom}"), 0);

    let ours = work.path().join("ours");
    let mut child = fastpull_command()
        .args(["--plain-http", "--json", "--format", "rootfs"])
        .arg(format!("{}/rootfs/parallel:gzip", proxy.addr()))
        .arg(&ours)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn fastpull");
    // Were staging sequential, layer 1 would wait for the held layer 0 for ever: a
    // watchdog lets it go (and the check below fails). Generous, for qemu.
    let released = std::sync::Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (released, proxy_release) = (released.clone(), proxy.releaser());
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(90));
            if !released.swap(true, SeqCst) {
                proxy_release();
            }
        })
    };
    let stdout = child.stdout.take().expect("stdout");
    let mut events: Vec<serde_json::Value> = Vec::new();
    let mut staged_while_bottom_empty = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.expect("read fastpull's stdout");
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        if v["event"] == "layer_staged" && v["index"] == 1 && staged_while_bottom_empty.is_none() {
            // Not released yet: no byte of layer 0 can have reached fastpull (its request
            // may not even have been made).
            let still_held = !released.load(SeqCst);
            let bottom_bytes = proxy.snapshot().relayed_for(&bottom);
            staged_while_bottom_empty = Some((still_held, bottom_bytes));
            if !released.swap(true, SeqCst) {
                proxy.release();
            }
        }
        events.push(v);
    }
    let o = child.wait_with_output().expect("wait for fastpull");
    drop(watchdog);
    assert!(o.status.success(), "fastpull failed:\n{}", text(&o));
    assert_eq!(
        staged_while_bottom_empty,
        Some((true, 0)),
        "layer 1 was not staged while layer 0 had no byte (not released, bytes relayed): {events:#?}"
    );
    // Layer 1's staged event names it and its entries; then every layer is applied, in
    // order, layer 1 after layer 0.
    let staged1 = events
        .iter()
        .find(|e| e["event"] == "layer_staged" && e["index"] == 1)
        .expect("layer_staged 1");
    assert_eq!(staged1["digest"], img.layers[1].digest.as_str());
    assert!(
        staged1["entries"].as_u64().is_some_and(|n| n > 0),
        "{staged1}"
    );
    let applied: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "layer_applied")
        .filter_map(|e| e["index"].as_u64())
        .collect();
    assert_eq!(applied, (0..img.layers.len() as u64).collect::<Vec<_>>());
    let done = events.last().expect("events");
    assert_eq!(done["event"], "done");
    assert_eq!(done["unpacked"]["merged"], RICH_MERGED);
    assert_eq!(done["unpacked"]["direct"], RICH_DIRECT);

    assert_like_umoci(
        &reg,
        "rootfs/parallel",
        &ours,
        work.path(),
        "fastpull (staged at once)",
    );
}

/// A layer whose staging tree fails its diff_id is never merged: the pull exits 4 naming
/// it, no `layer_staged` event comes for it, an existing empty ROOTFS stays empty, and no
/// staging directory (nor the staged trees in it) is left.
#[test]
fn a_staged_layer_failing_its_diff_id_is_never_merged() {
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let bottom = Tar::default()
        .dir("etc/", 0o755, T0)
        .file("etc/a", 0o644, b"a")
        .finish();
    let upper = Tar::default()
        .dir("etc/", 0o755, T0)
        .file("etc/b", 0o644, b"b")
        .finish();
    let (upper_blob, _) = layer(&upper, OCI_GZIP);
    let wrong = sha256_digest(b"not this layer");
    let img = ImageBuilder::new(Flavor::Oci)
        .raw_layer(layer(&bottom, OCI_GZIP).0, sha256_digest(&bottom))
        .raw_layer(upper_blob, wrong.clone())
        .build();
    push_image(&reg, "rootfs/staged-diffid", "t", &img);
    let dest = work.path().join("rootfs");
    std::fs::create_dir(&dest).unwrap();
    let o = fastpull_command()
        .args(["--plain-http", "--json", "--format", "rootfs"])
        .arg(image_ref(&reg, "rootfs/staged-diffid", "t"))
        .arg(&dest)
        .output()
        .expect("run fastpull");
    assert_exit(&o, 4);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("diff_ids") && err.contains(&wrong) && err.contains(&img.layers[1].digest),
        "{}",
        text(&o)
    );
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "layer_staged" && e["index"] == 1),
        "the bad layer counted as staged: {events:#?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "layer_applied" && e["index"] == 1),
        "the bad layer was applied: {events:#?}"
    );
    assert!(
        std::fs::read_dir(&dest).unwrap().next().is_none(),
        "ROOTFS was written to"
    );
    let left: Vec<String> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["rootfs"], "only ROOTFS is left");
}
