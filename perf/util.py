#!/usr/bin/env python3
"""Helpers for perf/run.sh.

  util.py verify IMAGE_JSON DIR          every file under DIR named by 64 hex digits hashes to
                                         its name, and every blob of the image is there
  util.py verify-rootfs IMAGE_JSON STORAGE DIR
                                         DIR holds exactly the regular files the image's layers
                                         (read from the registry's STORAGE) leave, same sizes
                                         and sha256
  util.py mem OUT_JSON LABEL -- CMD...   run CMD, sample /proc/PID/status every 50 ms, append
                                         {label, wall_s, peak_rss_kib (VmHWM / ru_maxrss),
                                         peak_rss_anon_kib, peak_rss_file_kib, ...} to OUT_JSON
  util.py meta OUT_JSON KEY=VALUE...     machine and tool versions (+ the given pairs) as JSON
  util.py disk DIR                       durable writes in DIR: 512 MiB written, then one fsync
"""
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def verify(image_json, root):
    info = json.load(open(image_json))
    found = {}
    bad = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not HEX64.match(name):
                continue
            path = os.path.join(dirpath, name)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(4 << 20), b""):
                    h.update(block)
            if h.hexdigest() != name:
                bad.append(f"{path}: sha256 is {h.hexdigest()}")
            found[name] = os.path.getsize(path)
    for blob in info["blobs"]:
        hexd = blob["digest"].split(":", 1)[1]
        if hexd not in found:
            bad.append(f"{root}: missing {blob['digest']}")
        elif found[hexd] != blob["size"]:
            bad.append(f"{root}: {blob['digest']} has {found[hexd]} bytes, want {blob['size']}")
    if bad:
        print("\n".join("  BAD " + b for b in bad))
        return 1
    print(f"  ok  {root}: {len(found)} files named by digest, all hashes match, all {len(info['blobs'])} blobs present")
    return 0


def verify_rootfs(image_json, storage, root):
    """The tree at ROOT holds exactly the regular files the image's layers put there, in
    order (a later layer's file replaces an earlier one's; `.wh.` whiteouts remove), each
    with the right size and sha256. The layers are read from the registry's storage."""
    import tarfile
    def blob(digest):
        hexd = digest.split(":", 1)[1]
        return os.path.join(storage, "docker/registry/v2/blobs/sha256", hexd[:2], hexd, "data")

    manifest = json.load(open(blob(json.load(open(image_json))["manifest"])))
    want = {}
    for layer in manifest["layers"]:
        path = blob(layer["digest"])
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                name = os.path.normpath(m.name.lstrip("/"))
                base = os.path.basename(name)
                if base.startswith(".wh."):
                    gone = os.path.join(os.path.dirname(name), base[4:])
                    for k in [k for k in want if k == gone or k.startswith(gone + "/")]:
                        del want[k]
                    continue
                if m.isfile():
                    h = hashlib.sha256()
                    f = tar.extractfile(m)
                    for block in iter(lambda: f.read(4 << 20), b""):
                        h.update(block)
                    want[name] = (m.size, h.hexdigest())
                else:
                    want.pop(name, None)
    got = {}
    for dirpath, _, files in os.walk(root):
        for fname in files:
            path = os.path.join(dirpath, fname)
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(4 << 20), b""):
                    h.update(block)
            got[os.path.relpath(path, root)] = (os.path.getsize(path), h.hexdigest())
    bad = [f"{root}: {k} missing" for k in want if k not in got]
    bad += [f"{root}: {k} is {got[k]}, want {want[k]}" for k in want if k in got and got[k] != want[k]]
    bad += [f"{root}: {k} should not be there" for k in got if k not in want]
    if bad:
        print("\n".join("  BAD " + b for b in bad[:20]))
        return 1
    print(f"  ok  {root}: {len(got)} regular files, sizes and sha256 as the layers say")
    return 0


def _status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(val.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def mem(out_json, label, cmd):
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = {}
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        for k, v in _status(proc.pid).items():
            peak[k] = max(peak.get(k, 0), v)
        time.sleep(0.05)
    wall = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    rec = {
        "label": label,
        "command": " ".join(cmd),
        "exit": code,
        "wall_s": round(wall, 3),
        "user_s": rusage.ru_utime,
        "sys_s": rusage.ru_stime,
        # ru_maxrss is the kernel's exact peak RSS (KiB); VmHWM sampled is the same figure.
        "peak_rss_kib": max(rusage.ru_maxrss, peak.get("VmHWM", 0)),
        "peak_rss_anon_kib": peak.get("RssAnon", 0),
        "peak_rss_file_kib": peak.get("RssFile", 0),
        "peak_rss_shmem_kib": peak.get("RssShmem", 0),
        "samples_every_s": 0.05,
    }
    recs = json.load(open(out_json)) if os.path.exists(out_json) else []
    recs = [r for r in recs if r["label"] != label] + [rec]
    json.dump(recs, open(out_json, "w"), indent=1)
    print(f"  {label}: {wall:.2f} s, peak RSS {rec['peak_rss_kib'] / 1024:.1f} MiB, "
          f"peak RssAnon {rec['peak_rss_anon_kib'] / 1024:.1f} MiB")
    return code


def _run(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or r.stderr.strip()
    except Exception as e:  # a missing tool is reported, not fatal
        return f"unavailable ({e})"


def _page_reporting():
    """Whether the guest hands freed memory back to its hypervisor (virtio-balloon free page
    reporting): then memory freed a few seconds ago costs host page faults when it is used
    again, which makes the uncapped case bimodal (perf/README.md)."""
    d = "/sys/module/page_reporting/parameters"
    try:
        order = open(os.path.join(d, "page_reporting_order")).read().strip()
        kib = int(open(os.path.join(d, "reported_kib")).read().strip())
    except (OSError, ValueError):
        return ""
    if kib == 0:
        return f"available (order {order}), nothing reported so far"
    return (f"active: free blocks of order >= {order} ({4 << int(order)} KiB) go back to the "
            f"hypervisor ({kib / 2**20:.0f} GiB so far)")


def meta(out_json, pairs):
    lscpu = _run(["lscpu"])
    model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    mem_kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    flags = next((l for l in lscpu.splitlines() if l.startswith("Flags")), "")
    os_name = next((l.split("=", 1)[1].strip().strip('"') for l in open("/etc/os-release")
                    if l.startswith("PRETTY_NAME")), "?")
    nginx = _run(["/usr/sbin/nginx", "-v"]) if os.path.exists("/usr/sbin/nginx") else _run(["nginx", "-v"])
    m = {
        "cpu_model": model,
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "sha_ni": " sha_ni" in flags,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": os_name,
        "virtualization": next((l.split(":", 1)[1].strip() for l in lscpu.splitlines()
                                if l.startswith("Hypervisor vendor")), "none"),
        "versions": {
            "skopeo": _run(["skopeo", "--version"]),
            "docker-registry": _run(["docker-registry", "--version"]),
            "nginx": nginx,
            "hyperfine": _run(["hyperfine", "--version"]),
            "rustc": _run(["rustc", "--version"]),
        },
        "page_reporting": _page_reporting(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for p in pairs:
        k, _, v = p.partition("=")
        m[k] = v
    json.dump(m, open(out_json, "w"), indent=1)
    return 0


def bench_meta(root, paths=("src", "benches", "Cargo.toml", "Cargo.lock")):
    """What a criterion run (perf/hash.py, perf/write.py) records beside its numbers: the
    commit measured (with "+uncommitted changes" when `paths` differ from it), the machine's
    architecture, CPU and kernel, rustc, and the date."""
    commit = _run(["git", "-C", root, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", *paths],
                           capture_output=True, text=True).stdout.strip()
    lscpu = _run(["lscpu"])
    return {
        "commit": commit + ("+uncommitted changes" if dirty else ""),
        "arch": platform.machine(),
        "cpu_model": next((l.split(":", 1)[1].strip() for l in lscpu.splitlines()
                           if l.startswith("Model name")), "?"),
        "cores": os.cpu_count() or 1,
        "kernel": platform.release(),
        "rustc": _run(["rustc", "--version"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def disk(directory):
    """Prints how fast durable writes are where the pulls land: 512 MiB written into the page
    cache, then one fsync. On a VM whose virtual disk is the host's page cache, the fsync is
    where the host persists it all, and a puller that fsyncs (fastpull, oci-client-fsync)
    waits for it unless it overlapped the flush with its downloads. One JSON object."""
    path = os.path.join(directory, ".perf-disk-probe")
    block = os.urandom(8 << 20)
    os.sync()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        t0 = time.monotonic()
        for _ in range(64):
            os.write(fd, block)
        t1 = time.monotonic()
        os.fsync(fd)
        t2 = time.monotonic()
        os.close(fd)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    size = 64 * len(block)
    print(json.dumps({"bytes": size, "write_s": round(t1 - t0, 3), "fsync_s": round(t2 - t1, 3),
                      "durable_mb_per_s": round(size / (t2 - t0) / 1e6)}))
    return 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "disk":
        return disk(argv[1])
    if len(argv) >= 3 and argv[0] == "verify":
        return verify(argv[1], argv[2])
    if len(argv) >= 4 and argv[0] == "verify-rootfs":
        return verify_rootfs(argv[1], argv[2], argv[3])
    if len(argv) >= 5 and argv[0] == "mem" and argv[3] == "--":
        return mem(argv[1], argv[2], argv[4:])
    if len(argv) >= 2 and argv[0] == "meta":
        return meta(argv[1], argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
