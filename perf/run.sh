#!/usr/bin/env bash
# perf/run.sh: time fastpull against skopeo and an oci-client peer in the loopback world of
# perf/world.sh, then write perf/RESULTS.md (perf/report.py).
#
#   perf/run.sh                           capped500 capped1g uncapped uncapped-cold mem
#   perf/run.sh matrix                    the world matrix of issue #10 (every world below but
#                                         uncapped-cold/mem/tune-*): fastpull's DEFAULT flags
#                                         (FASTPULL_ARGS must be empty), skopeo and oci-client in
#                                         one hyperfine run per world, then one sampled run per
#                                         tool for peak RssAnon
#   perf/run.sh capped500 uncapped        only these scenarios (the report keeps the others'
#                                         last results found in $OUT)
#   perf/run.sh tune-capped500 tune-uncapped
#                                         fastpull alone over -j x --chunk-size (TUNE_J, TUNE_CHUNK)
#
# Scenarios:
#   capped500  perf/img500 (5 layers, 500 MiB) through the redirecting registry: blobs come from
#              the nginx CDN capped at CDN_RATE (25 MiB/s) per connection
#   capped1g   perf/img1g (one 1 GiB layer), same path
#              (capped500/capped1g are the matrix's smooth-cap worlds, (a))
#   burst500, burst1g   (b1) the CDN with nginx's default sendfile_max_chunk: each response
#              starts with a burst, then the cap
#   after500, after1g   (b2) the CDN with `limit_rate_after 4m`: the first 4 MiB of each
#              response uncapped
#   tail500    (e) slow tail: every 4th connection to the CDN gets 5m instead of 25m
#   link500    (g) a shared link: perf/delay-proxy gives each connection to the CDN a token
#              bucket of CDN_RATE and all of them together LINK_RATE (150m)
#   norange500 (h) a CDN that ignores Range (nginx max_ranges 0), capped at CDN_RATE
#   connlimit500 (i) a CDN that answers CONN_LIMIT (6) requests at once per client and
#              refuses the others with 503 (nginx limit_conn), capped at CDN_RATE
#   h2500      (j) an HTTP/2 CDN over TLS whose cap (CDN_RATE) is per TCP connection: requests
#              multiplexed on one connection share it (perf/delay-proxy in front of nginx http2)
#   close500   (k) a CDN that closes the connection after every response (keepalive_timeout 0),
#              capped at CDN_RATE
#   proxied500 (l) a registry that serves its blobs itself (no redirect) behind an nginx
#              reverse proxy capping each connection at CDN_RATE: every range is a registry GET
#   tls500     (f) TLS on the registry and the CDN (smooth cap), a throw-away CA: fastpull
#              --ca-file, skopeo --src-cert-dir, oci-client peer --ca-file
#   rtt40-small, rtt100-small, rtt40-1g, rtt100-1g   (d) +40 / +100 ms RTT to registry, token
#              service and (smooth-capped) CDN, token auth on; perf/imgsmall (49 layers, ~85 MiB)
#              or perf/img1g
#   fartls-small, fartls-1g   (m) +100 ms RTT (FARTLS_RTT) and TLS on every hop: an HTTP/2
#              registry with token auth, the token service and the (smooth-capped) CDN, all
#              over HTTPS; perf/imgsmall or perf/img1g. Same CA options as tls500
#   uncapped   perf/img500 from the registry without redirect (it serves blobs itself, no cap)
#   uncapped-cold  the same, but each run's preparation waits COLD_PAUSE (3 s) after its sync,
#              so that a VM's free page reporting has handed the freed memory back to the
#              hypervisor (a first pull on an idle VM; see perf/README.md)
#   rootfs500  (issue #14) perf/img500's root filesystem through the smooth-capped CDN:
#              fastpull --format rootfs against skopeo copy + umoci unpack (perf/peers/skopeo-umoci)
#   rootfs1g   the same for perf/img1g (one 1 GiB gzip layer) from the uncapped registry
#   mem        peak RSS / RssAnon (sampled every 50 ms) of each tool pulling img1g: fastpull
#              through the capped CDN and all three from the uncapped registry
#   tune-capped500, tune-uncapped   fastpull -j {TUNE_J} x --chunk-size {TUNE_CHUNK}
#
# Environment:
#   RUNS=5               hyperfine runs per command (TUNE_RUNS=3 for tune-*)
#   MEM=1                after each matrix world's hyperfine run, one more run per tool with
#                        /proc/PID/status sampled every 50 ms (peak RssAnon); 0 = skip
#   COLD_PAUSE=3         seconds uncapped-cold waits after each preparation's sync
#   FASTPULL_ARGS=""     extra fastpull flags, e.g. "-j 32 --chunk-size 16M"
#   TOOLS="..."          the tools timed in every scenario, from: fastpull, skopeo
#                        (`skopeo copy ... oci:DEST`, layers in parallel), skopeo-dir (`skopeo
#                        copy ... dir:DEST`, which copies one layer at a time), oci-client (the
#                        peer in perf/peers/oci-client-pull), oci-client-fsync (the same peer
#                        fsyncing each blob, as fastpull does). Default: fastpull skopeo
#                        oci-client for every world of the matrix; uncapped-cold adds
#                        oci-client-fsync.
#   WARMUP=N             hyperfine warm-up runs per tool (default 1 for uncapped, 0 otherwise:
#                        a warm-up of the capped cases would cost a 40 s skopeo run)
#   TUNE_J="8 16 32" TUNE_CHUNK="4M 8M 16M 32M"
#   OUT=perf/results     hyperfine JSON, memory samples, metadata; the report goes to
#                        perf/RESULTS.md, or to $OUT/RESULTS.md when OUT is set elsewhere
#   DEST_ROOT=/tmp/fastpull-perf-dest   where the pulled images go (deleted before each run)
#   KEEP_WORLD=1         leave the world running afterwards (perf/world.sh stop ends it)
#   CDN_RATE=25m, ports, cache dirs: see perf/world.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

RUNS=${RUNS:-5}
COLD_PAUSE=${COLD_PAUSE:-3}
TUNE_RUNS=${TUNE_RUNS:-3}
FASTPULL_ARGS=${FASTPULL_ARGS:-}
TUNE_J=${TUNE_J:-8 16 32}
TUNE_CHUNK=${TUNE_CHUNK:-4M 8M 16M 32M}
OUT=${OUT:-$root/perf/results}
DEST_ROOT=${DEST_ROOT:-/tmp/fastpull-perf-dest}
BIN=${BIN:-/tmp/fastpull-perf-bin}

MATRIX="capped500 capped1g burst500 burst1g after500 after1g uncapped tail500 tls500 rtt40-small rtt100-small rtt40-1g rtt100-1g link500 norange500 connlimit500 h2500 close500 proxied500 fartls-small fartls-1g"
MEM=${MEM:-1}
if [ $# -eq 0 ]; then set -- capped500 capped1g uncapped uncapped-cold mem; fi
if [ "$*" = matrix ]; then
  if [ -n "$FASTPULL_ARGS" ]; then
    echo "run.sh: the matrix times fastpull's default flags; unset FASTPULL_ARGS (='$FASTPULL_ARGS')" >&2
    exit 2
  fi
  # shellcheck disable=SC2086
  set -- $MATRIX
fi
for s in "$@"; do
  case "$s" in capped500 | capped1g | burst500 | burst1g | after500 | after1g | tail500 | tls500 | \
    rtt40-small | rtt100-small | rtt40-1g | rtt100-1g | link500 | norange500 | connlimit500 | h2500 | close500 | proxied500 | uncapped | uncapped-cold | mem | tune-capped500 | tune-uncapped | \
    fartls-small | fartls-1g | \
    rootfs500 | rootfs1g) ;;
    *) echo "run.sh: unknown scenario $s" >&2; sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done

log() { echo "== $*" >&2; }

# shellcheck source=perf/world.sh
source "$root/perf/world.sh"
if world_running; then
  log "reusing the running world"
  world_start
else
  [ "${KEEP_WORLD:-0}" = 1 ] || trap world_stop EXIT
  world_start
fi
# shellcheck disable=SC1091
source "$WORLD_DIR/env"

# --- builds -------------------------------------------------------------------------------
# fastpull's sources may be mid-edit by someone else: retry a failing build for a while, then
# copy the binary out of target/ so a rebuild during the benchmark cannot swap it.
mkdir -p "$BIN" "$OUT" "$DEST_ROOT"
log "building fastpull (release)"
for try in $(seq 1 20); do
  if cargo build --release --quiet 2>"$BIN/build.log"; then break; fi
  [ "$try" -lt 20 ] || { cat "$BIN/build.log" >&2; exit 1; }
  log "fastpull build failed (attempt $try), retrying in 30 s"; sleep 30
done
cp -f "$root/target/release/fastpull" "$BIN/fastpull"
fastpull_commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$root" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
  fastpull_commit="$fastpull_commit+uncommitted changes"
fi
log "building the oci-client peer (release)"
cargo build --release --locked --quiet --manifest-path "$root/perf/peers/oci-client-pull/Cargo.toml" \
  --target-dir "$root/perf/peers/oci-client-pull/target"
cp -f "$root/perf/peers/oci-client-pull/target/release/oci-client-pull" "$BIN/oci-client-pull"
oci_client_version=$(grep -A1 '^name = "oci-client"$' "$root/perf/peers/oci-client-pull/Cargo.lock" | sed -n 's/^version = "\(.*\)"$/\1/p')

FP="$BIN/fastpull"
PEER="$BIN/oci-client-pull"
# How fast durable writes are where the pulls land (fastpull fsyncs every blob; on a VM the
# fsync waits for the host to persist what it cached): recorded with every world.
disk_probe=$(python3 "$root/perf/util.py" disk "$DEST_ROOT")
log "disk: $disk_probe"
# shellcheck disable=SC2206
fp_args=(-q --plain-http $FASTPULL_ARGS)

tool_cmd() { # tool registry image dest
  # Transport options: plain HTTP, or (the TLS world) the throw-away CA given the ordinary way.
  local fpt=(--plain-http) skt=(--src-tls-verify=false) pt=(--plain-http)
  if [ "$2" = "$REG_TLS" ] || [ "$2" = "$REG_H2" ] || [ "$2" = "$REG_FARTLS" ]; then
    fpt=(--ca-file "$TLS_CA") skt=(--src-cert-dir "$TLS_CERT_DIR") pt=(--ca-file "$TLS_CA")
  fi
  # shellcheck disable=SC2206
  local fpa=(-q "${fpt[@]}" $FASTPULL_ARGS)
  # The rootfs worlds (issue #14): fastpull writes the root filesystem itself.
  [ "${FORMAT:-}" = rootfs ] && fpa+=(--format rootfs)
  case "$1" in
    fastpull) echo "$FP ${fpa[*]} $2/$3:latest $4" ;;
    skopeo-umoci) echo "$root/perf/peers/skopeo-umoci ${pt[*]} $2/$3:latest $4" ;;
    skopeo) echo "skopeo copy -q ${skt[*]} --insecure-policy docker://$2/$3:latest oci:$4:latest" ;;
    skopeo-dir) echo "skopeo copy -q ${skt[*]} --insecure-policy docker://$2/$3:latest dir:$4" ;;
    oci-client) echo "$PEER ${pt[*]} $2/$3:latest $4" ;;
    oci-client-fsync) echo "$PEER ${pt[*]} --fsync $2/$3:latest $4" ;;
    *) echo "run.sh: unknown tool $1" >&2; return 1 ;;
  esac
}

write_meta() { # scenario registry image [k=v...]
  local s=$1 reg=$2 img=$3; shift 3
  python3 "$root/perf/util.py" meta "$OUT/$s.meta.json" \
    scenario="$s" registry="$reg" image="$img" image_info="$(tr -d '\n ' <"$WORLD_DIR/images/${img#perf/}.json")" \
    runs="$RUNS" fastpull_args="$FASTPULL_ARGS" fastpull_commit="$fastpull_commit" \
    oci_client="$oci_client_version" cdn_rate="$CDN_RATE" cdn_send_chunk="$CDN_SEND_CHUNK" cdn="$CDN" \
    cdn_rate_after="$CDN_RATE_AFTER" tail_rate="$TAIL_RATE" link_rate="$LINK_RATE" conn_limit="$CONN_LIMIT" fartls_rtt="${FARTLS_RTT:-}" probe="$(tr -d '\n' <"$WORLD_DIR/probe.json" 2>/dev/null || echo '{}')" \
    fastpull_sha256="$("$FP" --version | sed -n 's/^sha256: //p')" delay_proxy="${DELAY_PROXY:-}" disk="$disk_probe" "$@"
}

# A tool's output is right: blobs named by their digests, or (rootfs worlds) the files the
# layers leave, read back from the registry's storage.
check_output() { # image tool dir
  local json="$WORLD_DIR/images/${1#perf/}.json"
  if [ "${FORMAT:-}" = rootfs ]; then
    local tree=$3
    [ "$2" = skopeo-umoci ] && tree=$3/bundle/rootfs
    python3 "$root/perf/util.py" verify-rootfs "$json" "$STORAGE" "$tree"
  else
    python3 "$root/perf/util.py" verify "$json" "$3"
  fi
}

bench() { # scenario registry image default-tools default-warmup [pause-after-sync]
  local s=$1 reg=$2 img=$3 dest="$DEST_ROOT/$1" tool names=() preps=() cmds=()
  local TOOLS=${TOOLS:-$4} warmup=${WARMUP:-$5} pause=${6:-0}
  rm -rf "$dest"; mkdir -p "$dest"
  # hyperfine matches -n and --prepare to the commands by position.
  for tool in $TOOLS; do
    names+=(-n "$tool")
    preps+=(--prepare "bash -c 'rm -rf $dest/$tool; sync; sleep $pause'")
    cmds+=("$(tool_cmd "$tool" "$reg" "$img" "$dest/$tool")")
  done
  log "$s: $img from $reg, $RUNS runs each (warm-up $warmup): $TOOLS"
  hyperfine -N -r "$RUNS" -w "$warmup" --style basic --export-json "$OUT/$s.json" "${names[@]}" "${preps[@]}" "${cmds[@]}"
  local cmdpairs=() i=0
  for tool in $TOOLS; do cmdpairs+=("cmd_$tool=${cmds[i]}"); i=$((i + 1)); done
  write_meta "$s" "$reg" "$img" tools="$TOOLS" warmup="$warmup" prepare_pause="$pause" "${cmdpairs[@]}"
  log "$s: checking every tool's output (sha256 of each blob file = its name)"
  local fail=0
  for tool in $TOOLS; do
    check_output "$img" "$tool" "$dest/$tool" || fail=1
  done
  rm -rf "$dest"
  [ "$fail" -eq 0 ] || { log "$s: a tool's output is wrong"; exit 1; }
  [ "${FORMAT:-}" = rootfs ] && rootfs_tail "$s" "$reg" "$img"
  # (skopeo-umoci is a script: its own memory says nothing of skopeo's or umoci's.)
  [ "$MEM" = 1 ] && world_mem "$s" "$reg" "$img" "${TOOLS/skopeo-umoci/}"
  return 0
}

# Rootfs worlds: RUNS more fastpull runs at -v, each timed whole and with the time from the
# fetch's last byte to the finished tree (fastpull logs it as after_last_blob_secs):
# $OUT/SCENARIO.tail.json.
rootfs_tail() { # scenario registry image
  local s=$1 dest="$DEST_ROOT/$1-tail" i t0 t1 runs=()
  log "$s: $RUNS more fastpull runs at -v: last byte to rootfs"
  for i in $(seq "$RUNS"); do
    rm -rf "$dest"; sync
    t0=$(date +%s%N)
    # shellcheck disable=SC2046
    $(tool_cmd fastpull "$2" "$3" "$dest" | sed 's/ -q / -v /') 2>"$DEST_ROOT/tail.log" >/dev/null
    t1=$(date +%s%N)
    runs+=("$(( (t1 - t0) / 1000000 )):$(sed -n 's/.*after_last_blob_secs=\([0-9.e-]*\).*/\1/p' "$DEST_ROOT/tail.log" | tail -1)")
  done
  rm -rf "$dest" "$DEST_ROOT/tail.log"
  python3 -c 'import json, sys
runs = [dict(total_s=int(a) / 1000, after_last_blob_s=float(b)) for a, b in (r.split(":") for r in sys.argv[2:])]
json.dump(runs, open(sys.argv[1], "w"), indent=1)' "$OUT/$s.tail.json" "${runs[@]}"
}

# One more run per tool with /proc/PID/status sampled every 50 ms: $OUT/SCENARIO.mem.json.
world_mem() { # scenario registry image tools
  local s=$1 reg=$2 img=$3 dest="$DEST_ROOT/$1-mem" tool
  rm -f "$OUT/$s.mem.json"
  for tool in $4; do
    rm -rf "$dest"; mkdir -p "$dest"; sync
    log "$s: $tool once more, sampling its memory"
    # shellcheck disable=SC2046
    python3 "$root/perf/util.py" mem "$OUT/$s.mem.json" "$tool" -- $(tool_cmd "$tool" "$reg" "$img" "$dest/$tool")
    check_output "$img" "$tool" "$dest/$tool" >/dev/null ||
      { log "$s: $tool's output (memory run) is wrong"; exit 1; }
  done
  rm -rf "$dest"
}

memory() {
  local dest="$DEST_ROOT/mem" tool reg label
  rm -f "$OUT/mem.json"
  for spec in "fastpull $REG capped" "fastpull $DIRECT uncapped" "skopeo $DIRECT uncapped" "oci-client $DIRECT uncapped"; do
    read -r tool reg label <<<"$spec"
    rm -rf "$dest"; mkdir -p "$dest"; sync
    log "mem: $tool pulling perf/img1g from $reg ($label)"
    # shellcheck disable=SC2046
    python3 "$root/perf/util.py" mem "$OUT/mem.json" "$tool $label" -- $(tool_cmd "$tool" "$reg" perf/img1g "$dest/$tool")
    python3 "$root/perf/util.py" verify "$WORLD_DIR/images/img1g.json" "$dest/$tool"
  done
  rm -rf "$dest"
  write_meta mem "$REG" perf/img1g
}

tune() { # scenario registry image
  local s=$1 reg=$2 img=$3 dest="$DEST_ROOT/$1"
  rm -rf "$dest"; mkdir -p "$dest"
  log "$s: fastpull -j {${TUNE_J// /,}} x --chunk-size {${TUNE_CHUNK// /,}}, $TUNE_RUNS runs each"
  hyperfine -N -r "$TUNE_RUNS" --style basic --export-json "$OUT/$s.json" \
    -L j "${TUNE_J// /,}" -L chunk "${TUNE_CHUNK// /,}" \
    --prepare "bash -c 'rm -rf $dest/fastpull; sync'" \
    "$FP ${fp_args[*]} -j {j} --chunk-size {chunk} $reg/$img:latest $dest/fastpull"
  python3 "$root/perf/util.py" verify "$WORLD_DIR/images/${img#perf/}.json" "$dest/fastpull"
  rm -rf "$dest"
  RUNS=$TUNE_RUNS write_meta "$s" "$reg" "$img" tools=fastpull \
    "cmd_fastpull=$FP ${fp_args[*]} -j {j} --chunk-size {chunk} $reg/$img:latest DEST"
}

T3="fastpull skopeo oci-client"
for s in "$@"; do
  case "$s" in
    capped500) bench capped500 "$REG" perf/img500 "$T3" 0 ;;
    capped1g) bench capped1g "$REG" perf/img1g "$T3" 0 ;;
    burst500) bench burst500 "$REG_BURST" perf/img500 "$T3" 0 ;;
    burst1g) bench burst1g "$REG_BURST" perf/img1g "$T3" 0 ;;
    after500) bench after500 "$REG_AFTER" perf/img500 "$T3" 0 ;;
    after1g) bench after1g "$REG_AFTER" perf/img1g "$T3" 0 ;;
    tail500) bench tail500 "$REG_TAIL" perf/img500 "$T3" 0 ;;
    tls500) bench tls500 "$REG_TLS" perf/img500 "$T3" 0 ;;
    rtt40-small) bench rtt40-small "$REG_RTT40" perf/imgsmall "$T3" 0 ;;
    rtt100-small) bench rtt100-small "$REG_RTT100" perf/imgsmall "$T3" 0 ;;
    rtt40-1g) bench rtt40-1g "$REG_RTT40" perf/img1g "$T3" 0 ;;
    rtt100-1g) bench rtt100-1g "$REG_RTT100" perf/img1g "$T3" 0 ;;
    link500) bench link500 "$REG_LINK" perf/img500 "$T3" 0 ;;
    norange500) bench norange500 "$REG_NORANGE" perf/img500 "$T3" 0 ;;
    connlimit500) bench connlimit500 "$REG_CONNLIMIT" perf/img500 "$T3" 0 ;;
    h2500) bench h2500 "$REG_H2" perf/img500 "$T3" 0 ;;
    close500) bench close500 "$REG_CLOSE" perf/img500 "$T3" 0 ;;
    proxied500) bench proxied500 "$REG_PROXIED" perf/img500 "$T3" 0 ;;
    fartls-small) bench fartls-small "$REG_FARTLS" perf/imgsmall "$T3" 0 ;;
    fartls-1g) bench fartls-1g "$REG_FARTLS" perf/img1g "$T3" 0 ;;
    uncapped) bench uncapped "$DIRECT" perf/img500 "$T3" 1 ;;
    rootfs500) FORMAT=rootfs bench rootfs500 "$REG" perf/img500 "fastpull skopeo-umoci" 0 ;;
    rootfs1g) FORMAT=rootfs bench rootfs1g "$DIRECT" perf/img1g "fastpull skopeo-umoci" 1 ;;
    uncapped-cold) MEM=0 bench uncapped-cold "$DIRECT" perf/img500 "$T3 oci-client-fsync" 0 "$COLD_PAUSE" ;;
    mem) memory ;;
    tune-capped500) tune tune-capped500 "$REG" perf/img500 ;;
    tune-uncapped) tune tune-uncapped "$DIRECT" perf/img500 ;;
  esac
done

report="$root/perf/RESULTS.md"
[ "$(realpath "$OUT")" = "$(realpath "$root/perf/results")" ] || report="$OUT/RESULTS.md"
log "writing $report"
python3 "$root/perf/report.py" "$OUT" "$report"
