#!/usr/bin/env python3
"""perf/hash.py: the hashing core against `openssl speed -evp sha256` on this machine.

Runs `cargo bench --bench hash` (criterion), reads its estimates, runs openssl speed with the
same buffer sizes, and writes perf/results/hash.json (or $OUT/hash.json) for perf/report.py,
with the commit, architecture and date it measured (perf/util.py bench_meta). Run it with
nothing else busy on the machine.
"""
import json
import os
import re
import subprocess
import sys

import util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRIT = os.path.join(ROOT, "target", "criterion")
TOTAL = 64 << 20  # bytes hashed per iteration in benches/hash.rs
OPENSSL_SECONDS = 3


def gbps(group, bench, param, bytes_per_iter):
    path = os.path.join(CRIT, group, bench, str(param), "new", "estimates.json")
    with open(path) as f:
        ns = json.load(f)["median"]["point_estimate"]
    return bytes_per_iter / ns  # bytes per ns = GB/s


def openssl(block):
    out = subprocess.run(
        ["openssl", "speed", "-evp", "sha256", "-bytes", str(block), "-seconds",
         str(OPENSSL_SECONDS)],
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"^sha256\s+([\d.]+)k", out, re.M)
    return float(m.group(1)) * 1000 / 1e9  # k = 1000 bytes/s


def main():
    subprocess.run(["cargo", "bench", "--features", "bench-internals", "--bench", "hash"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    res = util.bench_meta(ROOT)
    cores = res["cores"]
    res.update({"bytes_per_iter": TOTAL, "openssl_seconds": OPENSSL_SECONDS, "rows": []})
    for block in (16384, 1048576):
        res["rows"].append({
            "block": block,
            "sha2": gbps("sha256", "fastpull-sha2", block, TOTAL),
            "ring": gbps("sha256", "ring", block, TOTAL),
            "openssl": openssl(block),
        })
    res["parallel"] = {
        str(t): gbps("sha256-parallel", "threads", t, TOTAL * t) for t in sorted({1, cores})
    }
    res["openssl_version"] = subprocess.run(["openssl", "version"], capture_output=True,
                                            text=True).stdout.strip()
    out = os.path.join(os.environ.get("OUT", os.path.join(ROOT, "perf", "results")), "hash.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
