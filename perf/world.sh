#!/usr/bin/env bash
# perf/world.sh: the loopback benchmark world for fastpull (issue #3).
#
# What it builds, all on 127.0.0.0/8:
#   - REG     127.0.0.1:$REG_PORT      CNCF distribution registry (`docker-registry serve`),
#                                      filesystem storage, with the `redirect` storage middleware:
#                                      every blob GET/HEAD answers 307 to the CDN below.
#   - DIRECT  127.0.0.1:$DIRECT_PORT   a second registry on the same storage dir, no middleware:
#                                      blobs are served by the registry itself (uncapped loopback).
#   - CDN     127.0.0.2:$CDN_PORT      nginx serving the storage root read-only, per-request
#                                      `limit_rate $CDN_RATE` (default 25m = 25 MiB/s; 0 = uncapped),
#                                      Range support, 403 to any request carrying Authorization.
#   - images  perf/img500 (5 gzip layers of random bytes: 300, 80, 60, 40, 20 MiB) and
#             perf/img1g (one 1 GiB layer), generated once into $PERF_CACHE as OCI layouts
#             and pushed with `skopeo copy`.
#
# Usage:
#   perf/world.sh            start everything, print the endpoints, wait; Ctrl-C stops and cleans up
#   perf/world.sh start      start in the background (idempotent: reuses a running world) and exit
#   perf/world.sh stop       stop a world started with `start` and delete its state dir
#   perf/world.sh status     print the endpoints of a running world (exit 1 if none)
#   perf/world.sh check      run the self-checks (307 to the CDN, bytes, Range, 403, rate)
#   source perf/world.sh     defines world_start / world_stop / world_check / world_env
#                            (perf/run.sh does this) without running anything
#
# After a start, $WORLD_DIR/env holds shell assignments (REG, DIRECT, CDN, CDN_RATE, IMAGES,
# STORAGE, ...) that other scripts can source.
#
# Environment (all optional):
#   WORLD_DIR=/tmp/fastpull-perf-world   state: storage, configs, logs, pids
#   PERF_CACHE=/tmp/fastpull-perf-cache  generated OCI layouts, kept across runs
#   REG_PORT=15000 DIRECT_PORT=15001 CDN_PORT=15080 CDN_HOST=127.0.0.2
#   CDN_RATE=25m                         nginx limit_rate per request (0 = uncapped)
#   CDN_SEND_CHUNK=128k                  nginx sendfile_max_chunk. nginx enforces limit_rate by
#                                        sleeping after each send, and the last send of a response
#                                        is never waited for: with its default (2m) a 4 MiB Range
#                                        response arrives at ~2x the cap. 128k keeps the overshoot
#                                        per response small, as a real per-connection cap would.
#   NGINX_WORKERS=2
#
# Needs root (or sudo) only to install missing packages with apt-get.

_world_self="${BASH_SOURCE[0]}"

world_defaults() {
  WORLD_DIR=${WORLD_DIR:-/tmp/fastpull-perf-world}
  PERF_CACHE=${PERF_CACHE:-/tmp/fastpull-perf-cache}
  REG_PORT=${REG_PORT:-15000}
  DIRECT_PORT=${DIRECT_PORT:-15001}
  CDN_PORT=${CDN_PORT:-15080}
  CDN_HOST=${CDN_HOST:-127.0.0.2}
  CDN_RATE=${CDN_RATE:-25m}
  CDN_SEND_CHUNK=${CDN_SEND_CHUNK:-128k}
  NGINX_WORKERS=${NGINX_WORKERS:-2}
  REG=127.0.0.1:$REG_PORT
  DIRECT=127.0.0.1:$DIRECT_PORT
  CDN=$CDN_HOST:$CDN_PORT
  STORAGE=$WORLD_DIR/storage
  IMAGES="perf/img500 perf/img1g"
}

world_log() { echo "world: $*" >&2; }

# Installs what the world needs, if missing (Debian/Ubuntu packages).
world_deps() {
  local need=()
  command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
  command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
  command -v hyperfine >/dev/null 2>&1 || need+=(hyperfine)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v python3 >/dev/null 2>&1 || need+=(python3)
  command -v gzip >/dev/null 2>&1 || need+=(gzip)
  command -v lscpu >/dev/null 2>&1 || need+=(util-linux)
  local nginx_missing=0
  [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || nginx_missing=1
  [ ${#need[@]} -gt 0 ] || [ "$nginx_missing" -eq 1 ] || return 0
  local sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  world_log "installing ${need[*]} $([ "$nginx_missing" -eq 1 ] && echo nginx-light)"
  "${sudo_cmd[@]}" apt-get update -qq
  if [ ${#need[@]} -gt 0 ]; then
    "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  if [ "$nginx_missing" -eq 1 ]; then
    # nginx-light where it exists (Debian 12), nginx otherwise. The packages' own service is
    # not used (a postinst that fails to start it on a busy port 80 is fine).
    "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends nginx-light >/dev/null 2>&1 ||
      "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends nginx >/dev/null 2>&1 || true
    [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || { world_log "could not install nginx"; return 1; }
  fi
}

_nginx_bin() { if [ -x /usr/sbin/nginx ]; then echo /usr/sbin/nginx; else command -v nginx; fi; }

_port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

_wait_http() { # url [tries]
  local i
  for i in $(seq 1 "${2:-100}"); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

_pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

world_running() {
  world_defaults
  _pid_alive "$WORLD_DIR/reg.pid" && _pid_alive "$WORLD_DIR/direct.pid" && _pid_alive "$WORLD_DIR/nginx/nginx.pid" &&
    [ -f "$WORLD_DIR/env" ] && cmp -s "$WORLD_DIR/env" <(world_env)
}

# Shell assignments describing the world (written to $WORLD_DIR/env).
world_env() {
  cat <<EOF
WORLD_DIR=$WORLD_DIR
PERF_CACHE=$PERF_CACHE
REG=$REG
DIRECT=$DIRECT
CDN=$CDN
CDN_RATE=$CDN_RATE
CDN_SEND_CHUNK=$CDN_SEND_CHUNK
STORAGE=$STORAGE
IMAGES="$IMAGES"
EOF
}

_registry_config() { # port redirect(0|1)
  cat <<YAML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $STORAGE
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$1
YAML
  if [ "$2" = 1 ]; then
    cat <<YAML
middleware:
  storage:
    - name: redirect
      options:
        baseurl: http://$CDN/
YAML
  fi
}

_nginx_config() {
  local rate_line="limit_rate $CDN_RATE;"
  [ "$CDN_RATE" = 0 ] && rate_line="# uncapped (CDN_RATE=0)"
  cat <<CONF
# The CDN of the perf world: static files from the registry's storage root.
user root;
worker_processes $NGINX_WORKERS;
pid $WORLD_DIR/nginx/nginx.pid;
error_log $WORLD_DIR/nginx/error.log error;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    sendfile_max_chunk $CDN_SEND_CHUNK;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path $WORLD_DIR/nginx/tmp/client_body;
    proxy_temp_path $WORLD_DIR/nginx/tmp/proxy;
    fastcgi_temp_path $WORLD_DIR/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORLD_DIR/nginx/tmp/uwsgi;
    scgi_temp_path $WORLD_DIR/nginx/tmp/scgi;
    server {
        listen $CDN;
        root $STORAGE;
        location / {
            limit_except GET { deny all; }
            # A CDN / object store rejects the registry's credentials: clients must not forward them.
            if (\$http_authorization) { return 403; }
            # Per request (= per connection for a client that does one at a time).
            $rate_line
        }
    }
}
CONF
}

world_stop() {
  world_defaults
  local f pid
  for f in "$WORLD_DIR/nginx/nginx.pid" "$WORLD_DIR/reg.pid" "$WORLD_DIR/direct.pid"; do
    if _pid_alive "$f"; then
      pid=$(cat "$f")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$WORLD_DIR"
}

_start_daemons() {
  mkdir -p "$STORAGE" "$WORLD_DIR/nginx/tmp"
  local p
  for p in "127.0.0.1 $REG_PORT" "127.0.0.1 $DIRECT_PORT" "$CDN_HOST $CDN_PORT"; do
    # shellcheck disable=SC2086
    if _port_busy $p; then world_log "port ${p/ /:} is in use (set REG_PORT/DIRECT_PORT/CDN_PORT)"; return 1; fi
  done
  _registry_config "$REG_PORT" 1 >"$WORLD_DIR/reg.yml"
  _registry_config "$DIRECT_PORT" 0 >"$WORLD_DIR/direct.yml"
  _nginx_config >"$WORLD_DIR/nginx/nginx.conf"
  # setsid: the daemons live in their own session, so that `start` can exit and leave them.
  setsid docker-registry serve "$WORLD_DIR/reg.yml" >"$WORLD_DIR/reg.log" 2>&1 </dev/null &
  echo $! >"$WORLD_DIR/reg.pid"
  setsid docker-registry serve "$WORLD_DIR/direct.yml" >"$WORLD_DIR/direct.log" 2>&1 </dev/null &
  echo $! >"$WORLD_DIR/direct.pid"
  # nginx daemonizes itself and writes its master's pid to nginx.pid.
  "$(_nginx_bin)" -p "$WORLD_DIR/nginx" -e "$WORLD_DIR/nginx/error.log" -c "$WORLD_DIR/nginx/nginx.conf" -g 'daemon on;'
  _wait_http "http://$REG/v2/" || { cat "$WORLD_DIR/reg.log" >&2; world_log "registry did not start"; return 1; }
  _wait_http "http://$DIRECT/v2/" || { cat "$WORLD_DIR/direct.log" >&2; world_log "direct registry did not start"; return 1; }
  if ! _pid_alive "$WORLD_DIR/reg.pid" || ! _pid_alive "$WORLD_DIR/direct.pid"; then
    world_log "a registry exited (see $WORLD_DIR/*.log)"; return 1
  fi
  for _ in $(seq 1 50); do _pid_alive "$WORLD_DIR/nginx/nginx.pid" && break; sleep 0.1; done
  _pid_alive "$WORLD_DIR/nginx/nginx.pid" || { cat "$WORLD_DIR/nginx/error.log" >&2; world_log "nginx did not start"; return 1; }
}

# Generates an OCI layout $PERF_CACHE/NAME with gzip layers of random bytes (sizes in MiB).
_gen_image() { # name mib...
  local name=$1; shift
  local dir="$PERF_CACHE/$name"
  [ -f "$dir/index.json" ] && return 0
  world_log "generating $name (layers of $* MiB, once; cached in $dir)"
  local tmp="$PERF_CACHE/.gen-$name"
  rm -rf "$tmp" "$dir"
  mkdir -p "$tmp/layout/blobs/sha256"
  local i=0 mib pids=()
  for mib in "$@"; do
    i=$((i + 1))
    # gzip -1 of random bytes: incompressible, so the blob is ~ the data size.
    (
      mkdir -p "$tmp/l$i/data$i"
      head -c $((mib * 1024 * 1024)) /dev/urandom >"$tmp/l$i/data$i/random.bin"
      tar -C "$tmp/l$i" -cf "$tmp/l$i.tar" "data$i"
      rm -rf "$tmp/l$i"
      sha256sum "$tmp/l$i.tar" | cut -d' ' -f1 >"$tmp/l$i.diffid"
      gzip -1 -n -c "$tmp/l$i.tar" >"$tmp/l$i.tar.gz"
      rm -f "$tmp/l$i.tar"
    ) &
    pids+=($!)
    # two at a time (2 cores)
    if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  done
  for p in "${pids[@]}"; do wait "$p"; done
  python3 - "$tmp" "$i" <<'PY'
import hashlib, json, os, sys
tmp, n = sys.argv[1], int(sys.argv[2])
blobs = os.path.join(tmp, "layout", "blobs", "sha256")
def put_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    d = h.hexdigest(); size = os.path.getsize(path)
    os.rename(path, os.path.join(blobs, d))
    return d, size
def put_bytes(data):
    d = hashlib.sha256(data).hexdigest()
    open(os.path.join(blobs, d), "wb").write(data)
    return d, len(data)
layers, diff_ids = [], []
for i in range(1, n + 1):
    d, s = put_file(os.path.join(tmp, f"l{i}.tar.gz"))
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + d, "size": s})
    diff_ids.append("sha256:" + open(os.path.join(tmp, f"l{i}.diffid")).read().strip())
config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                     "rootfs": {"type": "layers", "diff_ids": diff_ids}}, separators=(",", ":")).encode()
cd, cs = put_bytes(config)
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + cd, "size": cs},
                       "layers": layers}, separators=(",", ":")).encode()
md, ms = put_bytes(manifest)
open(os.path.join(tmp, "layout", "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
           "digest": "sha256:" + md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "latest"}}]},
          open(os.path.join(tmp, "layout", "index.json"), "w"))
PY
  mv "$tmp/layout" "$dir"
  rm -rf "$tmp"
}

# Writes $WORLD_DIR/images/NAME.json: manifest digest, blobs (digest, size), total bytes.
_image_info() { # name
  python3 - "$PERF_CACHE/$1" "$WORLD_DIR/images/$1.json" <<'PY'
import json, os, sys
src, out = sys.argv[1], sys.argv[2]
idx = json.load(open(os.path.join(src, "index.json")))
md = idx["manifests"][0]["digest"]
m = json.load(open(os.path.join(src, "blobs", "sha256", md.split(":")[1])))
blobs = [m["config"]] + m["layers"]
info = {"manifest": md, "blobs": [{"digest": b["digest"], "size": b["size"]} for b in blobs],
        "layers": [b["size"] for b in m["layers"]], "bytes": sum(b["size"] for b in blobs)}
os.makedirs(os.path.dirname(out), exist_ok=True)
json.dump(info, open(out, "w"), indent=1)
PY
}

_seed() {
  mkdir -p "$PERF_CACHE"
  _gen_image img500 300 80 60 40 20
  _gen_image img1g 1024
  mkdir -p "$WORLD_DIR/images"
  local name
  for name in img500 img1g; do
    _image_info "$name"
    if curl -fsS -o /dev/null -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$DIRECT/v2/perf/$name/manifests/latest" 2>/dev/null; then
      continue
    fi
    world_log "pushing perf/$name with skopeo"
    skopeo copy --quiet --insecure-policy --dest-tls-verify=false \
      "oci:$PERF_CACHE/$name:latest" "docker://$DIRECT/perf/$name:latest"
  done
  # Warm the page cache with the blobs, so every tool's first run sees the same server.
  find "$STORAGE" -name data -type f -exec cat {} + >/dev/null
}

# Self-checks: the registry redirects blob GETs to the CDN; the CDN returns the bytes, honours
# Range, rejects Authorization and caps the rate; the direct registry serves blobs itself.
world_check() {
  world_defaults
  local info="$WORLD_DIR/images/img500.json" digest size hdrs loc got code
  digest=$(python3 -c 'import json,sys; b=json.load(open(sys.argv[1]))["blobs"][-1]; print(b["digest"], b["size"])' "$info")
  size=${digest#* }; digest=${digest% *}
  hdrs=$(curl -sS -I "http://$REG/v2/perf/img500/blobs/$digest")
  code=$(printf '%s' "$hdrs" | head -1 | awk '{print $2}')
  loc=$(printf '%s' "$hdrs" | tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
  [ "$code" = 307 ] || { world_log "check: HEAD blob on $REG answered $code, want 307"; return 1; }
  case "$loc" in "http://$CDN/"*) ;; *) world_log "check: Location $loc is not on $CDN"; return 1 ;; esac
  code=$(curl -sS -o /dev/null -w '%{http_code}' "http://$REG/v2/perf/img500/blobs/$digest")
  [ "$code" = 307 ] || { world_log "check: GET blob on $REG answered $code, want 307"; return 1; }
  got=$(curl -fsSL "http://$REG/v2/perf/img500/blobs/$digest" | sha256sum | cut -d' ' -f1)
  [ "sha256:$got" = "$digest" ] || { world_log "check: bytes via the CDN hash to $got, want $digest"; return 1; }
  code=$(curl -sS -o /dev/null -w '%{http_code}' -r 0-1023 "$loc")
  [ "$code" = 206 ] || { world_log "check: Range on the CDN answered $code, want 206"; return 1; }
  code=$(curl -sS -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer x' "$loc")
  [ "$code" = 403 ] || { world_log "check: Authorization on the CDN answered $code, want 403"; return 1; }
  code=$(curl -sS -o /dev/null -w '%{http_code}' "http://$DIRECT/v2/perf/img500/blobs/$digest")
  [ "$code" = 200 ] || { world_log "check: GET blob on $DIRECT answered $code, want 200"; return 1; }
  got=$(curl -fsS "http://$DIRECT/v2/perf/img500/blobs/$digest" | sha256sum | cut -d' ' -f1)
  [ "sha256:$got" = "$digest" ] || { world_log "check: bytes via $DIRECT hash to $got"; return 1; }
  # The cap, over one connection, for a short and a long Range response.
  local rate_bytes small big
  rate_bytes=$(_size_bytes "$CDN_RATE")
  small=$(curl -sS -o /dev/null -w '%{speed_download}' -r 0-4194303 "$loc")
  big=$(curl -sS -o /dev/null -w '%{speed_download}' -r 0-20971519 "$loc")
  world_log "check ok: 307 -> $CDN, bytes verified ($size B), Range 206, Authorization 403"
  world_log "one connection to the CDN: 4 MiB range at $(_mib "$small") MiB/s, 20 MiB range at $(_mib "$big") MiB/s (CDN_RATE=$CDN_RATE)"
  if [ "$rate_bytes" -gt 0 ] && python3 -c "import sys; sys.exit(0 if max($small, $big) > 1.2 * $rate_bytes else 1)"; then
    world_log "check: the CDN delivers more than 1.2x CDN_RATE on one connection"; return 1
  fi
}

_mib() { python3 -c "print(f'{$1 / 1048576:.1f}')"; }

_size_bytes() { # nginx size: 25m, 512k, 1g, 1000
  python3 -c "
import sys; s = sys.argv[1].lower(); m = {'k': 1 << 10, 'm': 1 << 20, 'g': 1 << 30}
print(int(s[:-1]) * m[s[-1]] if s[-1] in m else int(s))" "$1"
}

world_start() {
  world_defaults
  world_deps
  if world_running; then
    world_log "already running ($WORLD_DIR)"
  else
    world_stop
    mkdir -p "$WORLD_DIR"
    _start_daemons
    world_env >"$WORLD_DIR/env"
  fi
  _seed
  world_check
}

world_status() {
  world_defaults
  world_running || { world_log "not running"; return 1; }
  cat "$WORLD_DIR/env"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case "${1:-up}" in
    start) world_start; world_status ;;
    stop) world_stop ;;
    status) world_status ;;
    check) world_check ;;
    up)
      trap world_stop EXIT
      trap 'exit 130' INT TERM
      world_start
      world_status
      world_log "running; Ctrl-C stops it"
      while world_running; do sleep 1; done
      ;;
    *) sed -n '2,/^$/p' "$_world_self" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
fi
