#!/usr/bin/env python3
"""Write perf/RESULTS.md from the files perf/run.sh leaves in perf/results/.

    perf/report.py [RESULTS_DIR [OUT_MD]]

Reads SCENARIO.json (hyperfine --export-json), SCENARIO.meta.json (machine, versions,
image, commands), SCENARIO.mem.json and mem.json (peak memory samples), hash.json
(perf/hash.py) and write.json (perf/write.py); missing ones are left out. Every number and
verdict in RESULTS.md is computed here from those files.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The world matrix (issue #10), in report order: id, title, description ({rate}, {after},
# {tail}, {pause} filled in from the metadata), and which targets apply (see targets()).
SCENARIOS = [
    ("capped500", "(a) Smooth cap, img500",
     "perf/img500 ({shape}) via the redirecting registry; blobs from nginx "
     "capped at {rate} per connection, `sendfile_max_chunk {chunk}`", "capped"),
    ("capped1g", "(a) Smooth cap, img1g",
     "perf/img1g ({shape}), the same smooth cap", "capped-1g"),
    ("burst500", "(b1) Bursty cap (nginx default chunk), img500",
     "perf/img500; the CDN caps at {rate} per connection with nginx's default "
     "`sendfile_max_chunk`, so each response starts with a burst", "capped"),
    ("burst1g", "(b1) Bursty cap (nginx default chunk), img1g",
     "perf/img1g, the same bursty CDN", "capped-1g"),
    ("after500", "(b2) Bursty cap (`limit_rate_after {after}`), img500",
     "perf/img500; the CDN caps at {rate} per connection after the first {after} of each "
     "response (`limit_rate_after`)", "capped"),
    ("after1g", "(b2) Bursty cap (`limit_rate_after {after}`), img1g",
     "perf/img1g, the same CDN", "capped-1g"),
    ("uncapped", "(c) Uncapped loopback, img500",
     "perf/img500 from the registry without redirect: it serves the blobs itself, no cap; "
     "registry and clients share the machine's cores", "uncapped"),
    ("rtt40-small", "(d) +40 ms RTT, token auth, many small layers",
     "perf/imgsmall ({layers} layers) from a registry with token auth (`auth: token`, our "
     "ES256 issuer), registry, token service and CDN (smooth cap, {rate}) each {rtt} ms further "
     "away ({proxy})", "rtt-small"),
    ("rtt100-small", "(d) +100 ms RTT, token auth, many small layers",
     "The same as +40 ms with {rtt} ms", None),
    ("rtt40-1g", "(d) +40 ms RTT, token auth, one 1 GiB layer",
     "perf/img1g through the far registry and CDN of the +40 ms world", "capped-1g"),
    ("rtt100-1g", "(d) +100 ms RTT, token auth, one 1 GiB layer",
     "perf/img1g through the far registry and CDN of the +100 ms world", "capped-1g"),
    ("tail500", "(e) Slow tail, img500",
     "perf/img500; the CDN serves every 4th connection at {tail}, the others at {rate} "
     "(`limit_rate` from a `map` on `$connection`)", "tail"),
    ("tls500", "(f) TLS on registry and CDN, img500",
     "perf/img500 over HTTPS to the registry and the CDN (smooth cap, {rate}), certificates from "
     "a throw-away CA given to each tool (fastpull `--ca-file`, skopeo `--src-cert-dir`, the "
     "oci-client peer `--ca-file`)", "capped"),
    ("link500", "(g) Shared link, img500",
     "perf/img500; each connection to the CDN gets a token bucket of {rate} and all of them "
     "share one of {link} (perf/delay-proxy, no added delay, in front of an uncapped nginx): "
     "more connections pay up to about {link_conns} and then nothing. Not a world of issue #10 "
     "(no speed target): it shows whether the controller stops where the link is full", "link"),
    ("norange500", "(h) CDN that ignores Range, img500",
     "perf/img500; the CDN caps at {rate} per connection and answers every Range request with "
     "200 and the whole blob (nginx `max_ranges 0`): no puller can split a blob, so the largest "
     "layer on one connection bounds every tool. Not a world of issue #10 (no speed target): it "
     "shows what fastpull costs where splitting is impossible", "norange"),
    ("connlimit500", "(i) CDN that answers {conn_limit} requests at once, img500",
     "perf/img500; the CDN caps at {rate} per connection and answers at most {conn_limit} "
     "requests at once from one client, refusing the others with 503 at once (nginx "
     "`limit_conn`), as servers that limit concurrency per client do (some answer 429). Not a "
     "world of issue #10 (no speed target): it shows whether the pull takes the connections it "
     "may have and no more", "connlimit"),
    ("h2500", "(j) HTTP/2 CDN capped per connection, img500",
     "perf/img500 over HTTPS; the CDN answers HTTP/2 (ALPN h2, as the big CDNs do) and caps each "
     "TCP connection at {rate} whatever it multiplexes (perf/delay-proxy's per-connection bucket, "
     "no added delay, in front of an uncapped nginx `http2` block): a client that multiplexes "
     "its requests on one connection gets one connection's rate. Same CA options as (f)",
     "capped"),
    ("close500", "(k) CDN that closes every connection, img500",
     "perf/img500; the CDN caps at {rate} per connection and closes the connection after each "
     "response (nginx `keepalive_timeout 0`), so every request opens a new connection", "capped"),
    ("proxied500", "(l) Registry behind a capping reverse proxy, img500",
     "perf/img500 from a registry that serves its blobs itself (no redirect to a CDN), behind an "
     "nginx reverse proxy that caps each connection at {rate} and lets each response's first "
     "second through at once (nginx's `limit_rate` accounting): every range a client asks for is "
     "a GET the registry answers, at its price per request", "capped"),
    ("fartls-small", "(m) +{fartls_rtt} ms RTT and TLS on every hop, many small layers",
     "perf/imgsmall ({layers} layers) from a registry with TLS (HTTP/2 by ALPN, as Go serves it) "
     "and token auth, its token service over HTTPS and the CDN of (f) (TLS, smooth cap, {rate}), "
     "each {fartls_rtt} ms further away ({proxy}; TLS runs end to end through it, so each "
     "handshake pays its round trips): a far registry as users meet them. Same CA options as "
     "(f). Not a world of issue #10's list (no target); (d) +100 ms has its targets", None),
    ("fartls-1g", "(m) +{fartls_rtt} ms RTT and TLS on every hop, one 1 GiB layer",
     "perf/img1g through the far TLS registry and CDN of the world above. No target: (d) +100 ms "
     "1 GiB shows why 20x is out of reach this far on this machine", None),
    ("rootfs500", "(r) Root filesystem, smooth cap, img500",
     "perf/img500's root filesystem ({shape}) through the smooth-capped CDN of (a): fastpull "
     "`--format rootfs` (layers unpacked as they download, verified before the tree appears) "
     "against `skopeo copy` to an OCI layout then `umoci unpack` (perf/peers/skopeo-umoci)",
     "rootfs-capped"),
    ("rootfs1g", "(r) Root filesystem, uncapped loopback, img1g",
     "perf/img1g's root filesystem (one 1 GiB gzip layer) from the registry of (c), which serves "
     "the blobs itself; the same two tools", "rootfs-uncapped"),
    ("uncapped-cold", "Uncapped loopback, img500, cold memory (not in the matrix)",
     "The same pull as (c), but each run's preparation also waits {pause} s after the `sync`, long "
     "enough for the guest's free page reporting to hand the memory freed by the previous run "
     "back to the hypervisor: like a first pull on a VM that has been idle, not a pull into "
     "memory freed a moment before. No target: this shows what the warm case hides", None),
]
# Issue #10 targets: fastpull's speedup (peer median / fastpull median, same run).
SPEEDUP = {
    "capped": {"skopeo": 10, "oci-client": 10},
    "capped-1g": {"skopeo": 20, "oci-client": 20},
    "rtt-small": {"skopeo": 3, "oci-client": 1.3},
    "uncapped": {"skopeo": 2, "oci-client": 1.0},
    # Issue #14: fastpull --format rootfs against skopeo copy + umoci unpack.
    "rootfs-capped": {"skopeo-umoci": 5},
    "rootfs-uncapped": {"skopeo-umoci": 2},
}
ROOTFS_TAIL_MAX = 0.10  # issue #14: last byte -> rootfs complete, share of the whole pull
TAIL_MAX = 1.3          # slow-tail fastpull median within 1.3x of the smooth world's
RSS_ANON_MAX_MIB = 128  # fastpull's peak RssAnon in every world
TUNES = [("tune-capped500", "Capped CDN, img500"), ("tune-uncapped", "Uncapped loopback, img500")]
HASH_OPENSSL_MIN = 0.95  # issue #3: the hashing core at least 95% of openssl per core


def delay_proxy(meta):
    """The far worlds' delay proxy a result went through: run.sh records it since the Rust one
    (perf/delay-proxy) replaced the Python perf/delay_proxy.py (same delays, more CPU)."""
    return meta.get("delay_proxy") or "perf/delay_proxy.py"


def link_conns(meta):
    """How many capped connections fill the shared link (LINK_RATE / CDN_RATE), as text."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30}

    def size(v):
        v = str(v).lower()
        return float(v[:-1]) * units[v[-1]] if v and v[-1] in units else float(v)
    try:
        return f"{size(meta['link_rate']) / size(meta['cdn_rate']):.0f}"
    except (KeyError, ValueError, ZeroDivisionError):
        return "?"


def load(path):
    return json.load(open(path)) if os.path.exists(path) else None


def fmt_s(x):
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def size_txt(n):
    """Bytes as the report writes them: whole GiB from 1 GiB on, else whole MiB."""
    return f"{n / 2**30:.0f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def shape(layers):
    """An image's layers in words: "one 1 GiB layer", "5 layers, largest 300 MiB"."""
    if len(layers) == 1:
        return f"one {size_txt(layers[0])} layer"
    return f"{len(layers)} layers, largest {size_txt(max(layers))}"


def sample_interval(rdir):
    """How often the memory runs sampled /proc/PID/status, from the records (None if none)."""
    for name in sorted(os.listdir(rdir)):
        if name.endswith("mem.json"):
            for r in load(os.path.join(rdir, name)) or []:
                if r.get("samples_every_s"):
                    return f"{r['samples_every_s'] * 1000:.0f} ms"
    return None


def recorded(x):
    """Commit, architecture and date of a criterion run (perf/util.py bench_meta)."""
    if not x.get("commit"):
        return "commit, architecture and date not recorded"
    return f"commit {x['commit']}, {x['arch']} ({x.get('cpu_model', '?')}), {x['date']}"


def targets(worlds):
    """Rows (world, target, recorded, met/missed/no data) for the targets of issue #10."""
    rows = []
    by_id = {w[0]: w for w in worlds}

    def verdict(ok, meta):
        if meta and meta.get("fastpull_args"):
            return "n/a (not default flags)"
        return "met" if ok else "**missed**"

    for s, title, kind, meta, res, gb, mem in worlds:
        fp = res.get("fastpull")
        if not fp or s == "uncapped-cold":  # not a world of the matrix
            continue
        for peer, tgt in SPEEDUP.get(kind, {}).items():
            r = res.get(peer)
            if r:
                x = r["median"] / fp["median"]
                rows.append((title, f"≥ {tgt}× {peer}", f"{x:.2f}×", verdict(x >= tgt, meta)))
            else:
                rows.append((title, f"≥ {tgt}× {peer}", "—", "no data"))
        if kind == "tail":
            smooth = by_id.get("capped500")
            if smooth and smooth[4].get("fastpull"):
                x = fp["median"] / smooth[4]["fastpull"]["median"]
                rows.append((title, f"fastpull ≤ {TAIL_MAX}× its smooth-cap img500 time",
                             f"{x:.2f}× ({fmt_s(fp['median'])} s vs {fmt_s(smooth[4]['fastpull']['median'])} s)",
                             verdict(x <= TAIL_MAX, meta)))
            else:
                rows.append((title, f"fastpull ≤ {TAIL_MAX}× its smooth-cap img500 time", "—",
                             "no data (run capped500)"))
        tail = meta.get("_tail") if kind == "rootfs-uncapped" else None
        if tail:
            shares = sorted(r["after_last_blob_s"] / r["total_s"] for r in tail)
            med = shares[len(shares) // 2]
            rows.append((title, f"last byte → rootfs ≤ {ROOTFS_TAIL_MAX:.0%} of the pull (1 GiB gzip layer)",
                         f"{med:.1%} (median of {len(shares)}: "
                         + ", ".join(f"{r['after_last_blob_s']:.2f} of {r['total_s']:.2f} s" for r in tail) + ")",
                         verdict(med <= ROOTFS_TAIL_MAX, meta)))
        oc = res.get("oci-client")
        if oc:
            a = (fp["user"] + fp["system"]) / gb
            b = (oc["user"] + oc["system"]) / gb
            rows.append((title, "fastpull CPU/GB ≤ oci-client's", f"{a:.2f} vs {b:.2f} s/GB",
                         verdict(a <= b, meta)))
        mr = mem.get("fastpull")
        if mr:
            mib = mr["peak_rss_anon_kib"] / 1024
            rows.append((title, f"fastpull peak RssAnon ≤ {RSS_ANON_MAX_MIB} MiB", f"{mib:.1f} MiB",
                         verdict(mib <= RSS_ANON_MAX_MIB, meta)))
        else:
            rows.append((title, f"fastpull peak RssAnon ≤ {RSS_ANON_MAX_MIB} MiB", "—", "no data (no memory run)"))
    return rows


TOOL_COLOURS = {"fastpull": "#d9480f", "skopeo": "#1c7ed6", "oci-client": "#2b8a3e",
                "skopeo-umoci": "#5f3dc4",
                "skopeo-dir": "#74c0fc", "oci-client-fsync": "#8ce99a"}


def draw_chart(worlds, path):
    """A horizontal bar chart (SVG, hand-written): one group per world, one bar per tool,
    median seconds on a log axis."""
    import math
    worlds = [w for w in worlds if w[4] and w[0] != "uncapped-cold"]
    if not worlds:
        return
    times = [r["median"] for w in worlds for r in w[4].values()]
    lo = 10 ** math.floor(math.log10(min(times)))
    hi = 10 ** math.ceil(math.log10(max(times)))
    left, right, bar, gap, top = 340, 60, 13, 12, 40
    width = 1000
    plot_w = width - left - right
    n_bars = sum(len(w[4]) for w in worlds)
    height = top + n_bars * bar + len(worlds) * gap + 50

    def x(t):
        return left + plot_w * (math.log10(t) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    def esc(t):
        return t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "")

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">Median pull time per world '
           f'(seconds, log scale; lower is better)</text>']
    tools = []
    for w in worlds:
        for t in w[4]:
            if t not in tools:
                tools.append(t)
    lx = left
    for t in tools:
        out.append(f'<rect x="{lx}" y="24" width="10" height="10" fill="{TOOL_COLOURS.get(t, "#888")}"/>'
                   f'<text x="{lx + 14}" y="33">{esc(t)}</text>')
        lx += 14 + 7 * len(t) + 18
    y_end = height - 40
    decade = lo
    while decade <= hi * 1.0001:
        for mult in (1, 2, 5):
            t = decade * mult
            if t < lo * 0.9999 or t > hi * 1.0001:
                continue
            xx = x(t)
            out.append(f'<line x1="{xx:.1f}" y1="{top - 2}" x2="{xx:.1f}" y2="{y_end}" '
                       f'stroke="{"#bbb" if mult == 1 else "#e5e5e5"}"/>')
            out.append(f'<text x="{xx:.1f}" y="{y_end + 14}" text-anchor="middle">{t:g}</text>')
        decade *= 10
    out.append(f'<text x="{left + plot_w / 2}" y="{y_end + 30}" text-anchor="middle">seconds (median)</text>')
    y = top
    for s, title, kind, meta, res, gb, mem in worlds:
        gh = len(res) * bar
        out.append(f'<text x="{left - 8}" y="{y + gh / 2 + 4:.1f}" text-anchor="end">{esc(title)}</text>')
        for t, r in res.items():
            xx = x(r["median"])
            out.append(f'<rect x="{left}" y="{y + 1}" width="{max(xx - left, 1):.1f}" height="{bar - 2}" '
                       f'fill="{TOOL_COLOURS.get(t, "#888")}"><title>{esc(t)}: {r["median"]:.3f} s</title></rect>')
            out.append(f'<text x="{xx + 4:.1f}" y="{y + bar - 3}" font-size="10">{fmt_s(r["median"])}</text>')
            y += bar
        y += gap
        out.append(f'<line x1="{left}" y1="{y - gap / 2:.1f}" x2="{width - right}" y2="{y - gap / 2:.1f}" stroke="#f0f0f0"/>')
    out.append("</svg>")
    open(path, "w").write("\n".join(out) + "\n")
    print(f"report.py: wrote {path}")


def main(argv):
    rdir = argv[0] if argv else os.path.join(HERE, "results")
    out_md = argv[1] if len(argv) > 1 else os.path.join(HERE, "RESULTS.md")
    metas = {s: load(os.path.join(rdir, f"{s}.meta.json"))
             for s in [x[0] for x in SCENARIOS] + ["mem"] + [t for t, _ in TUNES]}
    any_meta = next((m for m in metas.values() if m), None)
    if not any_meta:
        sys.exit(f"report.py: no results in {rdir}; run perf/run.sh first")
    L = []
    w = L.append
    w("# fastpull: loopback benchmark results")
    w("")
    w("Generated by `perf/report.py` from the hyperfine JSON in `perf/results/`, written by "
      "`perf/run.sh` (see the top of that script for how to run it). Do not edit by hand.")
    w("")

    # ---- machine -------------------------------------------------------------------------
    m = any_meta
    v = m["versions"]
    w("## Machine")
    w("")
    if m.get("arch"):
        w(f"- CPU: {m['cpu_model']}, {m['cpus']} cores, {m['arch']} (virtualization: "
          f"{m['virtualization']}; fastpull's sha256: {m.get('fastpull_sha256') or '?'})")
    else:  # results written before run.sh recorded the architecture: x86_64
        w(f"- CPU: {m['cpu_model']}, {m['cpus']} cores, x86_64 (virtualization: "
          f"{m['virtualization']}; "
          f"SHA-NI: {'yes' if m['sha_ni'] else 'no'})")
    w(f"- Memory: {m['mem_gib']} GiB; kernel {m['kernel']}; {m['os']}")
    reporting = next((x["page_reporting"] for x in metas.values()
                      if x and x.get("page_reporting")), None)
    if reporting:
        w(f"- Free page reporting (virtio-balloon): {reporting}")
    disk = next((x["disk"] for x in metas.values() if x and x.get("disk")), None)
    if disk:
        d = json.loads(disk)
        w(f"- Disk where the pulls land: {d['bytes'] >> 20} MiB written into the page cache in "
          f"{d['write_s']} s, then one fsync {d['fsync_s']} s ({d['durable_mb_per_s']} MB/s "
          f"durable; measured once per `perf/run.sh`). fastpull fsyncs every blob; skopeo "
          f"and oci-client do not")
    commits = {}
    for name, x in metas.items():
        if x:
            commits.setdefault(x["fastpull_commit"], []).append(name)
    if len(commits) == 1:
        w(f"- fastpull: commit {m['fastpull_commit']}, release build")
    else:
        w("- fastpull, release build: " + "; ".join(
            f"commit {c} for {', '.join(names)}" for c, names in commits.items()))
    w(f"- oci-client {m['oci_client']} (perf/peers/oci-client-pull); {v['skopeo']}; "
      f"{v['docker-registry']}; {v['nginx']}; {v['hyperfine']}; {v['rustc']}")
    dates = sorted(x["date"] for x in metas.values() if x)
    w(f"- Run: {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else ""))
    w("")

    # ---- method --------------------------------------------------------------------------
    rate = m["cdn_rate"]
    rate_txt = "uncapped" if rate == "0" else f"`limit_rate {rate}` (nginx: m = MiB/s)"
    # The newest world check's probe (worlds rerun later carry a later one).
    probe = {}
    for x in sorted((x for x in metas.values() if x and x.get("probe")), key=lambda x: x["date"]):
        try:
            probe = json.loads(x["probe"]) or probe
        except ValueError:
            pass
    far = {s: delay_proxy(x) for s, x in metas.items()
           if x and (s.startswith("rtt") or s.startswith("fartls"))}
    old_far = sorted(s for s, p in far.items() if p == "perf/delay_proxy.py")
    if not old_far:
        proxy_txt = "`perf/delay-proxy`"
    elif len(old_far) == len(far):
        proxy_txt = ("`perf/delay_proxy.py` (Python; since replaced by `perf/delay-proxy`, the "
                     "same delays in Rust)")
    else:
        proxy_txt = ("`perf/delay-proxy` (for " + ", ".join(old_far) + ": its Python "
                     "predecessor `perf/delay_proxy.py`, the same delays)")
    w("## Method")
    w("")
    w("`perf/world.sh` builds everything on loopback: the CNCF distribution registry "
      "(`docker-registry serve`) on 127.0.0.1 with filesystem storage and its `redirect` storage "
      "middleware (`baseurl: http://" + m["cdn"] + "/`), so every blob GET answers "
      "307 to nginx on " + m["cdn"] + ", which serves the registry's storage root read-only with "
      f"{rate_txt} per request, Range support, `sendfile on` and 403 to any request carrying "
      "`Authorization` (like a CDN or object store). Each world of the matrix has its own "
      "registry on the same storage, redirecting to its own nginx server block (bursty cap, "
      "`limit_rate_after`, slow tail, TLS) or, for the far worlds, to the smooth CDN through "
      + proxy_txt + ", which delays every byte by half the added RTT each way (this "
      "machine's kernel has no `sch_netem`). A registry without the middleware serves blobs "
      "itself (the uncapped world; in (l) behind an nginx reverse proxy capping each "
      "connection). The images are random (incompressible) bytes in gzip layers, "
      "generated once and pushed with skopeo; the blob files are read once before timing so the "
      "servers work from the page cache.")
    w("")
    if probe:
        def mib(x):
            return f"{x / 2**20:.1f}"
        w("What one connection got from each CDN when the world was checked (curl, fresh "
          "connection per request, MiB/s): a 4 MiB range / a 20 MiB range:")
        w("")
        names = {"smooth": "smooth cap", "burst": "bursty (nginx default chunk)",
                 "after": "bursty (`limit_rate_after`)", "tls": "TLS",
                 "proxied": "registry behind a capping proxy (both ranges fit in the first second nginx lets through at once)"}
        for k, label in names.items():
            if k in probe:
                w(f"- {label}: {mib(probe[k][0])} / {mib(probe[k][1])}")
        for k in sorted(x for x in probe if x.startswith("rtt") and not x.endswith("_s")):
            conn = probe.get(f"{k}_connect_get_s")
            w(f"- +{k[3:]} ms RTT (through the delay proxy, incl. connection setup): "
              f"{mib(probe[k][0])} / {mib(probe[k][1])}"
              + (f"; connect + `GET /v2/` {conn * 1000:.0f} ms" if conn else ""))
        if "fartls" in probe:
            conn = probe.get("fartls_connect_tls_get_s")
            w(f"- far TLS world (through the delay proxy, incl. connection setup and TLS): "
              f"{mib(probe['fartls'][0])} / {mib(probe['fartls'][1])}"
              + (f"; connect + TLS + `GET /v2/` {conn * 1000:.0f} ms" if conn else ""))
        if "tail" in probe:
            w("- slow tail, 8 connections of 2 MiB each: "
              + ", ".join(mib(x) for x in probe["tail"]))
        w("")
    every = sample_interval(rdir)
    sampled = f"sampled every {every}" if every else "sampled"
    w("`perf/run.sh` times the clients with hyperfine in one invocation per world "
      "(all runs of one tool, then the next), no shell (`-N`), warm-up runs as stated per table; "
      "before each run the tool's destination is deleted and `sync` flushes dirty pages, so no "
      "run pays for the previous one's writeback. Times are wall clock of the whole process; "
      "speedups compare medians. CPU is hyperfine's mean user+sys of the client process, per GB "
      "(10^9 bytes) of blobs pulled. Peak RssAnon comes from one more run of each tool after the "
      f"timed ones, `/proc/PID/status` {sampled}. After the runs every tool's output is "
      "checked: each file named by a digest hashes to it and every blob of the image is there.")
    w("")
    w("- **fastpull**: `fastpull -q --plain-http [FASTPULL_ARGS] IMAGE DEST` (`--ca-file CA` "
      "instead of `--plain-http` in the TLS world; the matrix runs with FASTPULL_ARGS empty, "
      "i.e. default flags). OCI layout; each blob preallocated, mmapped, verified, fsynced before "
      "its rename.")
    w("- **skopeo**: `skopeo copy -q --src-tls-verify=false --insecure-policy docker://IMAGE "
      "oci:DEST:latest` (`--src-cert-dir` in the TLS world): the OCI layout destination copies "
      "layers in parallel.")
    w("- **skopeo-dir** (when TOOLS asks for it): the same to `dir:DEST`, which copies one layer "
      "at a time.")
    w("- **oci-client**: `perf/peers/oci-client-pull`, the `oci-client` crate used as its docs "
      "suggest: `pull_image_manifest`, then `pull_blob` (streaming, digest-checked) of the config "
      "and every layer into a `tokio::fs::File` behind a 1 MiB `BufWriter`, "
      "`max_concurrent_download` (the crate's default) blobs at once; no fsync, so its "
      "writes may still be in the page cache when it exits.")
    w("- **oci-client-fsync** (uncapped-cold only): the same peer with `--fsync`.")
    w("- **skopeo-umoci** (rootfs worlds): `perf/peers/skopeo-umoci`, what a user without "
      "fastpull runs for a root filesystem: `skopeo copy` to an OCI layout, then `umoci unpack` "
      "(as root, as here: owners and device nodes as the layers say). fastpull runs "
      "`--format rootfs` there. Each tool's tree is checked against the files the layers hold "
      "(read back from the registry's storage: same paths, sizes and sha256).")
    w("")

    # ---- results -------------------------------------------------------------------------
    w("## Results")
    w("")
    w("![median pull time per world and tool](chart.svg)")
    w("")
    worlds = []  # (id, title, kind, meta, {tool: row}, gb, memrecs)
    for s, title, desc, kind in SCENARIOS:
        data, meta = load(os.path.join(rdir, f"{s}.json")), metas[s]
        if not data or not meta:
            continue
        info = json.loads(meta["image_info"])
        gb = info["bytes"] / 1e9
        fill = dict(rate=rate_txt, pause=meta.get("prepare_pause", "?"),
                    after=meta.get("cdn_rate_after", "?"), tail=meta.get("tail_rate", "?"),
                    chunk=meta.get("cdn_send_chunk", "?"), layers=len(info["layers"]),
                    rtt="".join(c for c in s.split("-")[0] if c.isdigit()) or "?",
                    proxy=delay_proxy(meta), shape=shape(info["layers"]),
                    link=meta.get("link_rate", "?"), link_conns=link_conns(meta),
                    conn_limit=meta.get("conn_limit", "?"),
                    fartls_rtt=meta.get("fartls_rtt", "?"))
        title = title.format(**fill)
        memrecs = {r["label"]: r for r in (load(os.path.join(rdir, f"{s}.mem.json")) or [])}
        meta["_tail"] = load(os.path.join(rdir, f"{s}.tail.json"))
        w(f"### {title}")
        w("")
        w(desc.format(**fill) + f". {info['bytes'] / 2**20:.0f} MiB of blobs "
          f"({len(info['layers'])} layer{'s' if len(info['layers']) > 1 else ''} + config); "
          f"{meta['runs']} run{'s' if str(meta['runs']) != '1' else ''} per tool, warm-up "
          f"{meta.get('warmup', '0')}"
          + (f"; **FASTPULL_ARGS=`{meta['fastpull_args']}` (not the default flags)**"
             if meta["fastpull_args"] else "; fastpull's default flags") + ".")
        w("")
        w("| tool | median (s) | mean ± sd (s) | min … max (s) | MB/s (median) | CPU user+sys (s) | CPU s/GB | peak RssAnon (MiB) | fastpull is faster by |")
        w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        res = {r["command"]: r for r in data["results"]}
        fp = res.get("fastpull")
        for name, r in res.items():
            cpu = r["user"] + r["system"]
            ratio = (f"**{r['median'] / fp['median']:.2f}×**" if fp and name != "fastpull" else "—")
            mr = memrecs.get(name)
            anon = f"{mr['peak_rss_anon_kib'] / 1024:.1f}" if mr else "—"
            w(f"| {name} | {fmt_s(r['median'])} | {fmt_s(r['mean'])} ± {fmt_s(r['stddev'] or 0)} | "
              f"{fmt_s(r['min'])} … {fmt_s(r['max'])} | {info['bytes'] / 1e6 / r['median']:.0f} | "
              f"{cpu:.2f} | {cpu / gb:.2f} | {anon} | {ratio} |")
        w("")
        worlds.append((s, title, kind, meta, res, gb, memrecs))

    # ---- targets -------------------------------------------------------------------------
    rows = targets(worlds)
    if rows:
        w("## Targets (issues #10 and #14)")
        w("")
        w("Computed from the tables above: speedup = peer's median / fastpull's median in the same "
          "hyperfine run. Capped targets apply to every world whose CDN caps each connection "
          "(smooth, bursty, TLS, and the far worlds' 1 GiB layer: their CDN is the smooth one). "
          "The (r) rows are issue #14's: `--format rootfs` against skopeo copy + umoci unpack, and "
          "the time from the fetch's last byte to the finished tree (from extra `-v` runs, "
          "`after_last_blob_secs`) as a share of the whole pull.")
        w("")
        w("| world | target | recorded | met |")
        w("| --- | --- | ---: | :---: |")
        for world, target, got, ok in rows:
            w(f"| {world} | {target} | {got} | {ok} |")
        met = sum(1 for r in rows if r[3] == "met")
        w("")
        w(f"{met} of {len(rows)} met.")
        w("")
    draw_chart(worlds, os.path.join(os.path.dirname(out_md), "chart.svg"))

    # ---- memory --------------------------------------------------------------------------
    mem = load(os.path.join(rdir, "mem.json"))
    if mem:
        w("## Memory, pulling the 1 GiB layer")
        w("")
        w(f"One run each, `/proc/PID/status` {sampled} (RssAnon: the anonymous memory, "
          "i.e. heap and buffers; peak RSS is the kernel's exact high-water mark, `ru_maxrss`, "
          "which for fastpull includes the file pages of its mmapped output that are resident). "
          "Target (issue #3): fastpull's RssAnon under 128 MiB whatever the layer size.")
        w("")
        w("| tool, source | wall (s) | peak RssAnon (MiB) | peak RSS (MiB) | peak RssFile (MiB) | CPU user+sys (s) |")
        w("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in mem:
            w(f"| {r['label']} | {r['wall_s']:.2f} | {r['peak_rss_anon_kib'] / 1024:.1f} | "
              f"{r['peak_rss_kib'] / 1024:.1f} | {r['peak_rss_file_kib'] / 1024:.1f} | "
              f"{r['user_s'] + r['sys_s']:.2f} |")
        w("")

    # ---- tuning --------------------------------------------------------------------------
    tunes = [(t, title, load(os.path.join(rdir, f"{t}.json")), metas[t]) for t, title in TUNES]
    tunes = [x for x in tunes if x[2] and x[3]]
    if tunes:
        w("## Tuning fastpull: `-j` × `--chunk-size`")
        w("")
        for t, title, data, meta in tunes:
            rows = data["results"]
            js = sorted({r["parameters"]["j"] for r in rows}, key=int)
            chunks = sorted({r["parameters"]["chunk"] for r in rows}, key=lambda c: int(c[:-1]))
            med = {(r["parameters"]["j"], r["parameters"]["chunk"]): r["median"] for r in rows}
            best = min(med, key=med.get)
            w(f"### {title}: median seconds, {meta['runs']} runs each"
              + (f", plus FASTPULL_ARGS=`{meta['fastpull_args']}`" if meta["fastpull_args"] else ""))
            w("")
            w("| -j \\ --chunk-size | " + " | ".join(chunks) + " |")
            w("| --- |" + " ---: |" * len(chunks))
            for j in js:
                cells = []
                for c in chunks:
                    x = med.get((j, c))
                    cells.append("—" if x is None else (f"**{fmt_s(x)}**" if (j, c) == best else fmt_s(x)))
                w(f"| {j} | " + " | ".join(cells) + " |")
            w("")
            w(f"Best: `-j {best[0]} --chunk-size {best[1]}` ({fmt_s(med[best])} s).")
            w("")

    # ---- hashing core ----------------------------------------------------------------------
    h = load(os.path.join(rdir, "hash.json"))
    if h:
        w("## Hashing core")
        w("")
        per_iter = (f"{size_txt(h['bytes_per_iter'])} hashed" if h.get("bytes_per_iter")
                    else "a buffer hashed")
        secs = f" -seconds {h['openssl_seconds']}" if h.get("openssl_seconds") else ""
        w(f"`perf/hash.py`: criterion medians of `benches/hash.rs` ({per_iter} in blocks of "
          f"the given size) beside `openssl speed -evp sha256 -bytes N{secs}` on the same "
          f"machine ({h['openssl_version']}); {recorded(h)}. GB = 10^9 bytes. Target (issue #3): "
          f"at least {100 * HASH_OPENSSL_MIN:.0f}% of openssl per core; aggregate scales with "
          "cores.")
        w("")
        w(f"| block | fastpull (sha2) GB/s | ring GB/s | openssl GB/s | fastpull / openssl | "
          f"≥ {100 * HASH_OPENSSL_MIN:.0f}% |")
        w("| ---: | ---: | ---: | ---: | ---: | :---: |")
        for r in h["rows"]:
            x = r["sha2"] / r["openssl"]
            w(f"| {r['block']} | {r['sha2']:.3f} | {r['ring']:.3f} | {r['openssl']:.3f} | "
              f"{100 * x:.1f}% | {'met' if x >= HASH_OPENSSL_MIN else '**missed**'} |")
        w("")
        par = h["parallel"]
        one = par.get("1")
        buf = f"one {size_txt(h['bytes_per_iter'])}" if h.get("bytes_per_iter") else "one"
        w(f"Aggregate, {buf} buffer per thread at once: " + ", ".join(
            f"{t} thread{'s' if t != '1' else ''}: {v:.2f} GB/s"
            + (f" ({v / one:.2f}×, {100 * v / one / int(t):.0f}% of linear)"
               if one and t != "1" else "")
            for t, v in sorted(par.items(), key=lambda kv: int(kv[0]))) + f" ({h['cores']} cores).")
        w("")
        big = max(h["rows"], key=lambda r: r["block"] if isinstance(r["block"], (int, float)) else 0)
        w(f"At the largest block ({big['block']}), fastpull's sha2 runs at "
          f"{100 * big['sha2'] / big['ring']:.0f}% of ring's speed and "
          f"{100 * big['sha2'] / big['openssl']:.0f}% of openssl's.")
        w("")

    # ---- writer ----------------------------------------------------------------------------
    wr = load(os.path.join(rdir, "write.json"))
    if wr:
        w("## Writing a blob")
        w("")
        n_chunks = wr["size"] // wr["chunk"]
        w(f"`perf/write.py`: criterion medians of `benches/write.rs`; {recorded(wr)}. One "
          f"{size_txt(wr['size'])} blob in {n_chunks} chunks of {size_txt(wr['chunk'])}, the "
          f"chunks in a shuffled order and each in {wr['frame'] // 1024} KiB frames (what hyper "
          "hands over), into a file preallocated with `fallocate`, then flushed (`fsync`), "
          "renamed to its final name and the directory fsynced, on both sides; the final file "
          "is deleted before the next run (untimed). fastpull's writer (`BlobFile`: the file "
          "mapped, one writer per chunk) against `pwrite` of each frame at its offset. Written "
          f"to {wr['dir']} ({wr['filesystem']}).")
        w("")
        w("| writer | median (s) | GB/s | time / pwrite's |")
        w("| --- | ---: | ---: | ---: |")
        names = {"mmap-chunks": "fastpull (mmap)", "pwrite-chunks": "pwrite"}
        base = wr["writers"].get("pwrite-chunks")
        for k, t in wr["writers"].items():
            w(f"| {names.get(k, k)} | {fmt_s(t)} | {wr['size'] / t / 1e9:.2f} | "
              + (f"{t / base:.2f}× |" if base else "— |"))
        w("")
        m, p = wr["writers"].get("mmap-chunks"), base
        if m and p:
            w(f"fastpull's writer takes {100 * m / p:.0f}% of the baseline's time for the same "
              "work.")
            w("")
        hs = wr.get("hasher") or {}
        if hs:
            one = hs.get("1")
            w("The in-order hasher behind the writer (chunks written out of order, hashed in "
              "order as they complete, blobs interleaved), aggregate: " + ", ".join(
                  f"{n} blob{'s' if n != '1' else ''}: {wr['size'] * int(n) / t / 1e9:.2f} GB/s"
                  + (f" ({one * int(n) / t:.2f}× one blob's)" if one and n != "1" else "")
                  for n, t in sorted(hs.items(), key=lambda kv: int(kv[0])))
              + f" ({wr['cores']} cores).")
            w("")

    # ---- aarch64 -------------------------------------------------------------------------
    w("## aarch64")
    w("")
    w("`scripts/test` also builds fastpull and its benches for aarch64 and runs the test suite "
      "under qemu-user on x86_64. Times under emulation are not performance figures (qemu "
      "translates every instruction and carries out the SHA2 ones in software): no number in "
      "this file comes from qemu. For aarch64 figures, run `perf/run.sh`, `perf/hash.py` and "
      "`cargo bench` on a real aarch64 Linux machine (perf/README.md); the Machine section "
      "above names the architecture each run was made on.")
    w("")

    open(out_md, "w").write("\n".join(L))
    print(f"report.py: wrote {out_md}")


if __name__ == "__main__":
    main(sys.argv[1:])
