#!/usr/bin/env python3
"""perf/write.py: fastpull's blob writer (mmap) against a pwrite baseline doing the same work,
and the in-order hasher, on this machine.

Runs `cargo bench --bench write` (criterion; benches/write.rs), reads its medians and writes
perf/results/write.json (or $OUT/write.json) for perf/report.py, with the commit,
architecture and date it measured (perf/util.py bench_meta) and the filesystem the blobs
were written to ($TMPDIR, default /tmp: the writers fsync, so the disk under it counts).
Run it with nothing else busy on the machine.
"""
import json
import os
import subprocess
import sys
import tempfile

import util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRIT = os.path.join(ROOT, "target", "criterion")
# benches/write.rs: the blob, its chunks (written out of order) and the frames they come in.
SIZE = 128 << 20
CHUNK = 8 << 20
FRAME = 16 << 10
WRITERS = ("mmap-chunks", "pwrite-chunks")
HASHER_BLOBS = (1, 2, 4)


def median_s(*parts):
    path = os.path.join(CRIT, *parts, "new", "estimates.json")
    with open(path) as f:
        return json.load(f)["median"]["point_estimate"] / 1e9


def filesystem(path):
    """The type of the filesystem holding `path` (findmnt: "ext4"; `stat -f` says "ext2/ext3")."""
    out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", path],
                         capture_output=True, text=True).stdout.strip()
    return out or subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True,
                                 text=True).stdout.strip() or "?"


def main():
    subprocess.run(["cargo", "bench", "--features", "bench-internals", "--bench", "write"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    tmp = tempfile.gettempdir()
    res = util.bench_meta(ROOT)
    res.update({
        "size": SIZE,
        "chunk": CHUNK,
        "frame": FRAME,
        "dir": tmp,
        "filesystem": filesystem(tmp),
        "writers": {w: median_s("write", w) for w in WRITERS},
        # criterion writes BenchmarkId "write+hash, blobs"/N under this directory name.
        "hasher": {str(n): median_s("in-order-hasher", "write+hash, blobs", str(n))
                   for n in HASHER_BLOBS},
    })
    out = os.path.join(os.environ.get("OUT", os.path.join(ROOT, "perf", "results")), "write.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
