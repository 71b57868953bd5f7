#!/usr/bin/env bash
# perf/world.sh: the loopback benchmark world for fastpull (issue #3).
#
# What it builds, all on 127.0.0.0/8 (no network namespace, no qdisc: see RTT below):
#   - REG     127.0.0.1:$REG_PORT      CNCF distribution registry (`docker-registry serve`),
#                                      filesystem storage, with the `redirect` storage middleware:
#                                      every blob GET/HEAD answers 307 to the CDN below.
#   - DIRECT  127.0.0.1:$DIRECT_PORT   a second registry on the same storage dir, no middleware:
#                                      blobs are served by the registry itself (uncapped loopback).
#   - CDN     127.0.0.2:$CDN_PORT      nginx serving the storage root read-only, per-request
#                                      `limit_rate $CDN_RATE` (default 25m = 25 MiB/s; 0 = uncapped),
#                                      Range support, 403 to any request carrying Authorization.
#   The world matrix (issue #10) adds, on the same storage, one registry + one nginx server
#   block per world (one nginx process serves all CDN variants):
#   - REG_BURST 127.0.0.1:15002 -> 127.0.0.2:15082  limit_rate $CDN_RATE with nginx's DEFAULT
#                                      sendfile_max_chunk (2m): each response starts with a burst
#   - REG_AFTER 127.0.0.1:15003 -> 127.0.0.2:15083  limit_rate $CDN_RATE, sendfile_max_chunk
#                                      $CDN_SEND_CHUNK, `limit_rate_after $CDN_RATE_AFTER` (4m)
#   - REG_TAIL  127.0.0.1:15004 -> 127.0.0.2:15084  slow tail: limit_rate from a `map` on
#                                      $connection: every 4th connection $TAIL_RATE (5m), the
#                                      others $CDN_RATE
#   - REG_TLS   https://127.0.0.1:15005 -> https://127.0.0.2:15085  TLS on registry and CDN
#                                      (smooth cap), certificates from a throw-away CA made here
#                                      with openssl ($WORLD_DIR/tls/ca.crt)
#   - REG_LINK  127.0.0.1:15006 -> 127.0.0.2:15086  a shared link: perf/delay-proxy (no added
#                                      delay) in front of an uncapped nginx block (15096) gives
#                                      each connection a token bucket of $CDN_RATE and all of
#                                      them together $LINK_RATE (150m): more connections pay up
#                                      to ~6, then nothing
#   - REG_NORANGE 127.0.0.1:15007 -> 127.0.0.2:15087  a CDN that ignores Range (nginx
#                                      `max_ranges 0`: every Range GET answers 200 and the whole
#                                      blob), limit_rate $CDN_RATE: no puller can split a blob
#   - REG_CONNLIMIT 127.0.0.1:15008 -> 127.0.0.2:15088  a CDN that answers $CONN_LIMIT requests
#                                      at once per client and refuses the others with 503
#                                      (nginx `limit_conn`), limit_rate $CDN_RATE each
#   - REG_H2  https://127.0.0.1:15009 -> https://127.0.0.2:15089  an HTTP/2 CDN over TLS (ALPN
#                                      h2, as the big CDNs answer) whose cap is per TCP connection:
#                                      perf/delay-proxy (no added delay) gives each connection a
#                                      token bucket of $CDN_RATE in front of an uncapped nginx
#                                      `http2` block (15099). Requests multiplexed on one
#                                      connection share its cap
#   - REG_CLOSE 127.0.0.1:15010 -> 127.0.0.2:15090  a CDN that closes the connection after every
#                                      response (nginx `keepalive_timeout 0`), limit_rate
#                                      $CDN_RATE: every request pays a new connection
#   - REG_PROXIED 127.0.0.2:15091 -> DIRECT  a registry that serves its blobs itself (no
#                                      redirect) behind an nginx reverse proxy that caps each
#                                      connection at limit_rate $CDN_RATE (as self-hosted
#                                      registries sit behind a proxy): every range is a GET the
#                                      registry answers, and nginx lets each response's first
#                                      second through at once
#   - REG_RTT40  127.0.0.3:15040, REG_RTT100 127.0.0.4:15041: far registries. Token auth on
#                                      (`auth: token`, issuer perf/token_issuer.py on
#                                      127.0.0.1:$TOKEN_PORT, ES256, its self-signed certificate
#                                      is the rootcertbundle). Registry, token service and the
#                                      smooth CDN are each reached through perf/delay-proxy (a
#                                      small Rust program, built here with cargo), which adds 40
#                                      or 100 ms of RTT (this kernel has no sch_netem, so
#                                      `tc netem` is not available).
#   - REG_FARTLS https://127.0.0.1:15045: far and TLS on every hop (world (m)). A registry with
#                                      TLS and token auth (127.0.0.1:15055, HTTP/2 by ALPN as
#                                      Go serves it), the token service over HTTPS
#                                      (127.0.0.1:15056) and the TLS CDN above, each reached
#                                      through perf/delay-proxy adding $FARTLS_RTT ms (the
#                                      proxies: 127.0.0.1:15045, 127.0.0.1:15046, $CDN_HOST:15047,
#                                      inside the certificate's names). TLS runs end to end, so
#                                      its handshakes pay the round trips too
#   - images  perf/img500 (5 gzip layers of random bytes: 300, 80, 60, 40, 20 MiB),
#             perf/img1g (one 1 GiB layer) and perf/imgsmall (49 layers, 16 KiB..20 MiB,
#             ~85 MiB), generated once into $PERF_CACHE as OCI layouts, pushed with skopeo.
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
#   CDN_RATE_AFTER=4m                    limit_rate_after of the REG_AFTER world's CDN
#   TAIL_RATE=5m                         the slow connections' rate in the REG_TAIL world
#   LINK_RATE=150m                       the shared link of the REG_LINK world
#   RTTS="40 100"                        the far worlds' added round-trip times (ms; at most 2)
#   FARTLS_RTT=100                       the far TLS world's added round-trip time (ms)
#   TOKEN_PORT=15049
#   NGINX_WORKERS=2
#
# Needs root (or sudo) only to install missing packages with apt-get, and cargo to build
# perf/delay-proxy for the far worlds and the shared link.

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
  CDN_RATE_AFTER=${CDN_RATE_AFTER:-4m}
  TAIL_RATE=${TAIL_RATE:-5m}
  LINK_RATE=${LINK_RATE:-150m}
  RTTS=${RTTS:-40 100}
  TOKEN_PORT=${TOKEN_PORT:-15049}
  NGINX_WORKERS=${NGINX_WORKERS:-2}
  REG=127.0.0.1:$REG_PORT
  DIRECT=127.0.0.1:$DIRECT_PORT
  CDN=$CDN_HOST:$CDN_PORT
  STORAGE=$WORLD_DIR/storage
  IMAGES="perf/img500 perf/img1g perf/imgsmall"
  REG_BURST=127.0.0.1:15002 CDN_BURST=$CDN_HOST:15082
  REG_AFTER=127.0.0.1:15003 CDN_AFTER=$CDN_HOST:15083
  REG_TAIL=127.0.0.1:15004 CDN_TAIL=$CDN_HOST:15084
  REG_TLS=127.0.0.1:15005 CDN_TLS=$CDN_HOST:15085
  REG_LINK=127.0.0.1:15006 CDN_LINK=$CDN_HOST:15086 CDN_OPEN=$CDN_HOST:15096
  REG_NORANGE=127.0.0.1:15007 CDN_NORANGE=$CDN_HOST:15087
  REG_CONNLIMIT=127.0.0.1:15008 CDN_CONNLIMIT=$CDN_HOST:15088
  REG_H2=127.0.0.1:15009 CDN_H2=$CDN_HOST:15089 CDN_H2_OPEN=$CDN_HOST:15099
  REG_CLOSE=127.0.0.1:15010 CDN_CLOSE=$CDN_HOST:15090
  REG_PROXIED=$CDN_HOST:15091
  FARTLS_RTT=${FARTLS_RTT:-100}
  REG_FARTLS=127.0.0.1:15045 TOKEN_FARTLS=127.0.0.1:15046 CDN_FARTLS=$CDN_HOST:15047
  FARTLS_BACK=127.0.0.1:15055 TOKEN_TLS=127.0.0.1:15056
  CONN_LIMIT=${CONN_LIMIT:-6}
  TLS_DIR=$WORLD_DIR/tls
  TOKEN=127.0.0.1:$TOKEN_PORT
  # The far worlds: index i (0, 1) -> proxies on 127.0.0.(3+i), backing registry 127.0.0.1:1504i.
  local i=0 r
  RTT_WORLDS=""
  for r in $RTTS; do
    [ "$i" -lt 2 ] || break
    RTT_WORLDS+="$r:127.0.0.$((3 + i)):$((15040 + i)) "
    printf -v "REG_RTT$r" '%s' "127.0.0.$((3 + i)):$((15040 + i))"
    i=$((i + 1))
  done
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
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
  python3 -c 'import cryptography' >/dev/null 2>&1 || need+=(python3-cryptography)
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
  [ -f "$WORLD_DIR/env" ] && cmp -s "$WORLD_DIR/env" <(world_env) && [ -f "$WORLD_DIR/daemons" ] || return 1
  local name
  for name in $(cat "$WORLD_DIR/daemons"); do _pid_alive "$WORLD_DIR/$name.pid" || return 1; done
  _pid_alive "$WORLD_DIR/nginx/nginx.pid"
}

# Shell assignments describing the world (written to $WORLD_DIR/env). DELAY_PROXY names the
# far worlds' proxy for run.sh's metadata (a world started with the Python one, before
# perf/delay-proxy, has no such line, so world_running does not reuse it).
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
CDN_RATE_AFTER=$CDN_RATE_AFTER
TAIL_RATE=$TAIL_RATE
REG_BURST=$REG_BURST
CDN_BURST=$CDN_BURST
REG_AFTER=$REG_AFTER
CDN_AFTER=$CDN_AFTER
REG_TAIL=$REG_TAIL
CDN_TAIL=$CDN_TAIL
REG_TLS=$REG_TLS
CDN_TLS=$CDN_TLS
REG_LINK=$REG_LINK
CDN_LINK=$CDN_LINK
CDN_OPEN=$CDN_OPEN
LINK_RATE=$LINK_RATE
REG_NORANGE=$REG_NORANGE
CDN_NORANGE=$CDN_NORANGE
REG_CONNLIMIT=$REG_CONNLIMIT
CDN_CONNLIMIT=$CDN_CONNLIMIT
CONN_LIMIT=$CONN_LIMIT
REG_H2=$REG_H2
CDN_H2=$CDN_H2
REG_CLOSE=$REG_CLOSE
CDN_CLOSE=$CDN_CLOSE
REG_PROXIED=$REG_PROXIED
REG_FARTLS=$REG_FARTLS
FARTLS_RTT=$FARTLS_RTT
TLS_CA=$TLS_DIR/ca.crt
TLS_CERT_DIR=$TLS_DIR/certs.d
TOKEN=$TOKEN
RTT_WORLDS="$RTT_WORLDS"
DELAY_PROXY=perf/delay-proxy
EOF
  local w
  for w in $RTT_WORLDS; do echo "REG_RTT${w%%:*}=${w#*:}"; done
}

_registry_config() { # addr redirect-baseurl|"" [tls(0|1)] [token-realm]
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
  addr: $1
YAML
  if [ "${3:-0}" = 1 ]; then
    cat <<YAML
  tls:
    certificate: $TLS_DIR/server.crt
    key: $TLS_DIR/server.key
YAML
  fi
  if [ -n "$2" ]; then
    cat <<YAML
middleware:
  storage:
    - name: redirect
      options:
        baseurl: $2
YAML
  fi
  if [ -n "${4:-}" ]; then
    cat <<YAML
auth:
  token:
    realm: "$4"
    service: fastpull-perf
    issuer: fastpull-perf-issuer
    rootcertbundle: $TLS_DIR/issuer.crt
YAML
  fi
}

# The throw-away CA and the server certificate (127.0.0.1, 127.0.0.2) of the TLS world, and the
# token issuer's self-signed ES256 certificate (the RTT worlds' rootcertbundle).
_make_certs() {
  mkdir -p "$TLS_DIR/certs.d"
  local d=$TLS_DIR
  [ -f "$d/server.crt" ] && [ -f "$d/issuer.crt" ] && return 0
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj "/CN=fastpull perf throw-away CA" -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,IP:127.0.0.2\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$d/server.ext"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 30 -extfile "$d/server.ext" -out "$d/server.crt" 2>/dev/null
  cp "$d/ca.crt" "$d/certs.d/ca.crt" # skopeo --src-cert-dir: *.crt are CA roots
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj "/CN=fastpull-perf-issuer" -keyout "$d/issuer.key" -out "$d/issuer.crt" 2>/dev/null
}

_nginx_server() { # listen-addr "extra directives"
  cat <<CONF
    server {
        listen $1;
        root $STORAGE;
        $2
        location / {
            limit_except GET { deny all; }
            # A CDN / object store rejects the registry's credentials: clients must not forward them.
            if (\$http_authorization) { return 403; }
        }
    }
CONF
}

_nginx_config() {
  # Per request (= per connection for a client that does one at a time).
  local rate_line="limit_rate $CDN_RATE;"
  [ "$CDN_RATE" = 0 ] && rate_line="# uncapped (CDN_RATE=0)"
  local chunk="sendfile_max_chunk $CDN_SEND_CHUNK;"
  cat <<CONF
# The CDNs of the perf world: static files from the registry's storage root.
user root;
worker_processes $NGINX_WORKERS;
pid $WORLD_DIR/nginx/nginx.pid;
error_log $WORLD_DIR/nginx/error.log error;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path $WORLD_DIR/nginx/tmp/client_body;
    proxy_temp_path $WORLD_DIR/nginx/tmp/proxy;
    fastcgi_temp_path $WORLD_DIR/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORLD_DIR/nginx/tmp/uwsgi;
    scgi_temp_path $WORLD_DIR/nginx/tmp/scgi;
    # Slow tail: \$connection (nginx's connection serial number, shared by the workers) divisible
    # by 4, i.e. 0, 4, 8 or ending in [02468][048] / [13579][26], gets TAIL_RATE.
    # The connection-limited world: requests in progress per client address.
    limit_conn_zone \$binary_remote_addr zone=fp_per_client:1m;
    map \$connection \$fp_tail_rate {
        "~^([048]|[0-9]*[02468][048]|[0-9]*[13579][26])\$" $TAIL_RATE;
        default $CDN_RATE;
    }
CONF
  _nginx_server "$CDN" "$chunk $rate_line"
  # The burst world: nginx's default sendfile_max_chunk (no directive).
  _nginx_server "$CDN_BURST" "$rate_line"
  _nginx_server "$CDN_AFTER" "$chunk $rate_line limit_rate_after $CDN_RATE_AFTER;"
  _nginx_server "$CDN_TAIL" "$chunk limit_rate \$fp_tail_rate;"
  _nginx_server "$CDN_TLS ssl" "$chunk $rate_line ssl_certificate $TLS_DIR/server.crt; ssl_certificate_key $TLS_DIR/server.key;"
  # Uncapped, reached only through the shared link's proxy (CDN_LINK), which does the capping.
  _nginx_server "$CDN_OPEN" "$chunk"
  _nginx_server "$CDN_NORANGE" "$chunk $rate_line max_ranges 0;"
  _nginx_server "$CDN_CONNLIMIT" "$chunk $rate_line limit_conn fp_per_client $CONN_LIMIT; limit_conn_status 503;"
  # Uncapped HTTP/2 over TLS, reached only through the per-connection buckets of CDN_H2.
  # (`listen ... http2`: nginx before 1.25 has no `http2 on;`, later ones still accept this.)
  _nginx_server "$CDN_H2_OPEN ssl http2" "$chunk ssl_certificate $TLS_DIR/server.crt; ssl_certificate_key $TLS_DIR/server.key;"
  _nginx_server "$CDN_CLOSE" "$chunk $rate_line keepalive_timeout 0;"
  # A registry behind a capping reverse proxy: the registry (DIRECT, no redirect) answers
  # every request itself, nginx passes it on at CDN_RATE per connection (nothing spooled to
  # disk: a full buffer holds the upstream back).
  cat <<CONF
    upstream fp_direct { server $DIRECT; keepalive 64; }
    server {
        listen $REG_PROXIED;
        $rate_line
        location / {
            proxy_pass http://fp_direct;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
            proxy_max_temp_file_size 0;
        }
    }
CONF
  echo "}"
}

world_stop() {
  world_defaults
  local f pid
  for f in "$WORLD_DIR/nginx/nginx.pid" "$WORLD_DIR"/*.pid; do
    if _pid_alive "$f"; then
      pid=$(cat "$f")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$WORLD_DIR"
}

_daemon() { # name command...: start in its own session (so that `start` can exit and leave it)
  local name=$1; shift
  setsid "$@" >"$WORLD_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$WORLD_DIR/$name.pid"
  echo "$name" >>"$WORLD_DIR/daemons"
}

_wait_up() { # name url [curl args...]: any HTTP answer (200, 401) counts
  local name=$1 url=$2 i code; shift 2
  for i in $(seq 1 100); do
    code=$(curl -sS -o /dev/null -w '%{http_code}' "$@" "$url" 2>/dev/null || true)
    [ "$code" = 200 ] || [ "$code" = 401 ] && return 0
    sleep 0.1
  done
  cat "$WORLD_DIR/$name.log" >&2
  world_log "$name did not start ($url)"
  return 1
}

# The far worlds' and the shared link's proxy, perf/delay-proxy (a standalone cargo project, own [workspace]),
# built (release) and copied into $WORLD_DIR so that a rebuild cannot swap it under a running world.
_build_delay_proxy() {
  local dir
  dir="$(cd "$(dirname "$_world_self")" && pwd)/delay-proxy"
  command -v cargo >/dev/null 2>&1 || { world_log "cargo is needed to build $dir"; return 1; }
  cargo build --release --locked --quiet --manifest-path "$dir/Cargo.toml" --target-dir "$dir/target" || return 1
  mkdir -p "$WORLD_DIR/bin"
  cp -f "$dir/target/release/delay-proxy" "$WORLD_DIR/bin/delay-proxy"
}

_start_daemons() {
  mkdir -p "$STORAGE" "$WORLD_DIR/nginx/tmp"
  : >"$WORLD_DIR/daemons"
  local p w rtt host port
  local addrs="$REG $DIRECT $CDN $REG_BURST $CDN_BURST $REG_AFTER $CDN_AFTER $REG_TAIL $CDN_TAIL $REG_TLS $CDN_TLS $TOKEN"
  addrs+=" $REG_LINK $CDN_LINK $CDN_OPEN $REG_NORANGE $CDN_NORANGE $REG_CONNLIMIT $CDN_CONNLIMIT"
  addrs+=" $REG_H2 $CDN_H2 $CDN_H2_OPEN $REG_CLOSE $CDN_CLOSE $REG_PROXIED"
  addrs+=" $REG_FARTLS $TOKEN_FARTLS $CDN_FARTLS $FARTLS_BACK $TOKEN_TLS"
  for w in $RTT_WORLDS; do
    IFS=: read -r rtt host port <<<"$w"
    addrs+=" 127.0.0.1:$port $host:$port $host:$TOKEN_PORT $host:${CDN##*:}"
  done
  for p in $addrs; do
    if _port_busy "${p%:*}" "${p##*:}"; then world_log "port $p is in use (see the top of perf/world.sh)"; return 1; fi
  done
  _build_delay_proxy || return 1
  _make_certs
  _registry_config "$REG" "http://$CDN/" >"$WORLD_DIR/reg.yml"
  _registry_config "$DIRECT" "" >"$WORLD_DIR/direct.yml"
  _registry_config "$REG_BURST" "http://$CDN_BURST/" >"$WORLD_DIR/reg-burst.yml"
  _registry_config "$REG_AFTER" "http://$CDN_AFTER/" >"$WORLD_DIR/reg-after.yml"
  _registry_config "$REG_TAIL" "http://$CDN_TAIL/" >"$WORLD_DIR/reg-tail.yml"
  _registry_config "$REG_TLS" "https://$CDN_TLS/" 1 >"$WORLD_DIR/reg-tls.yml"
  _registry_config "$REG_LINK" "http://$CDN_LINK/" >"$WORLD_DIR/reg-link.yml"
  _registry_config "$REG_NORANGE" "http://$CDN_NORANGE/" >"$WORLD_DIR/reg-norange.yml"
  _registry_config "$REG_CONNLIMIT" "http://$CDN_CONNLIMIT/" >"$WORLD_DIR/reg-connlimit.yml"
  _registry_config "$REG_H2" "https://$CDN_H2/" 1 >"$WORLD_DIR/reg-h2.yml"
  _registry_config "$REG_CLOSE" "http://$CDN_CLOSE/" >"$WORLD_DIR/reg-close.yml"
  _registry_config "$FARTLS_BACK" "https://$CDN_FARTLS/" 1 "https://$TOKEN_FARTLS/token" >"$WORLD_DIR/reg-fartls.yml"
  _nginx_config >"$WORLD_DIR/nginx/nginx.conf"
  local name
  for name in reg direct reg-burst reg-after reg-tail reg-tls reg-link reg-norange reg-connlimit reg-h2 reg-close reg-fartls; do
    _daemon "$name" docker-registry serve "$WORLD_DIR/$name.yml"
  done
  _daemon token python3 "$(dirname "$_world_self")/token_issuer.py" "$TOKEN" \
    "$TLS_DIR/issuer.key" "$TLS_DIR/issuer.crt" fastpull-perf-issuer fastpull-perf
  # The far TLS world's token service, over HTTPS with the server certificate.
  _daemon token-tls python3 "$(dirname "$_world_self")/token_issuer.py" "$TOKEN_TLS" \
    "$TLS_DIR/issuer.key" "$TLS_DIR/issuer.crt" fastpull-perf-issuer fastpull-perf \
    "$TLS_DIR/server.crt" "$TLS_DIR/server.key"
  _daemon delay-fartls "$WORLD_DIR/bin/delay-proxy" "$FARTLS_RTT" \
    "$REG_FARTLS=$FARTLS_BACK" "$TOKEN_FARTLS=$TOKEN_TLS" "$CDN_FARTLS=$CDN_TLS"
  # The shared link: no delay, a bucket per connection and one for all of them.
  _daemon link "$WORLD_DIR/bin/delay-proxy" 0 "$CDN_LINK=$CDN_OPEN,conn=$CDN_RATE,link=$LINK_RATE"
  # The HTTP/2 CDN: a bucket per TCP connection (TLS passes through), no delay.
  _daemon h2cap "$WORLD_DIR/bin/delay-proxy" 0 "$CDN_H2=$CDN_H2_OPEN,conn=$CDN_RATE"
  for w in $RTT_WORLDS; do
    IFS=: read -r rtt host port <<<"$w"
    # The far registry: its token realm and its redirects point at the delaying proxies.
    _registry_config "127.0.0.1:$port" "http://$host:${CDN##*:}/" 0 "http://$host:$TOKEN_PORT/token" >"$WORLD_DIR/reg-rtt$rtt.yml"
    _daemon "reg-rtt$rtt" docker-registry serve "$WORLD_DIR/reg-rtt$rtt.yml"
    _daemon "delay$rtt" "$WORLD_DIR/bin/delay-proxy" "$rtt" \
      "$host:$port=127.0.0.1:$port" "$host:$TOKEN_PORT=$TOKEN" "$host:${CDN##*:}=$CDN"
  done
  # nginx daemonizes itself and writes its master's pid to nginx.pid.
  "$(_nginx_bin)" -p "$WORLD_DIR/nginx" -e "$WORLD_DIR/nginx/error.log" -c "$WORLD_DIR/nginx/nginx.conf" -g 'daemon on;'
  _wait_up reg "http://$REG/v2/" || return 1
  _wait_up direct "http://$DIRECT/v2/" || return 1
  _wait_up reg-burst "http://$REG_BURST/v2/" || return 1
  _wait_up reg-after "http://$REG_AFTER/v2/" || return 1
  _wait_up reg-tail "http://$REG_TAIL/v2/" || return 1
  _wait_up reg-tls "https://$REG_TLS/v2/" --cacert "$TLS_DIR/ca.crt" || return 1
  _wait_up reg-link "http://$REG_LINK/v2/" || return 1
  _wait_up reg-norange "http://$REG_NORANGE/v2/" || return 1
  _wait_up reg-connlimit "http://$REG_CONNLIMIT/v2/" || return 1
  _wait_up reg-h2 "https://$REG_H2/v2/" --cacert "$TLS_DIR/ca.crt" || return 1
  _wait_up reg-close "http://$REG_CLOSE/v2/" || return 1
  _wait_up token "http://$TOKEN/token?service=fastpull-perf" || return 1
  _wait_up token-tls "https://$TOKEN_TLS/token?service=fastpull-perf" --cacert "$TLS_DIR/ca.crt" || return 1
  _wait_up reg-fartls "https://$FARTLS_BACK/v2/" --cacert "$TLS_DIR/ca.crt" || return 1
  _wait_up delay-fartls "https://$REG_FARTLS/v2/" --cacert "$TLS_DIR/ca.crt" || return 1
  for w in $RTT_WORLDS; do
    IFS=: read -r rtt host port <<<"$w"
    _wait_up "reg-rtt$rtt" "http://127.0.0.1:$port/v2/" || return 1
    _wait_up "delay$rtt" "http://$host:$port/v2/" || return 1
  done
  for name in $(cat "$WORLD_DIR/daemons"); do
    _pid_alive "$WORLD_DIR/$name.pid" || { world_log "$name exited (see $WORLD_DIR/$name.log)"; return 1; }
  done
  for _ in $(seq 1 50); do _pid_alive "$WORLD_DIR/nginx/nginx.pid" && break; sleep 0.1; done
  _pid_alive "$WORLD_DIR/nginx/nginx.pid" || { cat "$WORLD_DIR/nginx/error.log" >&2; world_log "nginx did not start"; return 1; }
}

# Generates an OCI layout $PERF_CACHE/NAME with gzip layers of random bytes (sizes in MiB, or
# KiB with a k suffix).
_gen_image() { # name mib|NNNk...
  local name=$1; shift
  local dir="$PERF_CACHE/$name"
  [ -f "$dir/index.json" ] && return 0
  world_log "generating $name ($# layers: $* (MiB unless k), once; cached in $dir)"
  local tmp="$PERF_CACHE/.gen-$name"
  rm -rf "$tmp" "$dir"
  mkdir -p "$tmp/layout/blobs/sha256"
  local i=0 mib pids=()
  for mib in "$@"; do
    i=$((i + 1))
    # gzip -1 of random bytes: incompressible, so the blob is ~ the data size.
    (
      mkdir -p "$tmp/l$i/data$i"
      case "$mib" in *k) bytes=$((${mib%k} * 1024)) ;; *) bytes=$((mib * 1024 * 1024)) ;; esac
      head -c "$bytes" /dev/urandom >"$tmp/l$i/data$i/random.bin"
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
  # Many small layers (49, ~85 MiB), for the far-registry worlds.
  # shellcheck disable=SC2046
  _gen_image imgsmall 20 10 8 6 5 4 4 3 3 3 2 2 2 2 2 2 $(printf '512k %.0s' 1 2 3 4 5 6 7 8) \
    $(printf '256k %.0s' $(seq 1 10)) $(printf '64k %.0s' $(seq 1 10)) $(printf '16k %.0s' 1 2 3 4 5)
  mkdir -p "$WORLD_DIR/images"
  local name
  for name in img500 img1g imgsmall; do
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
  world_check_matrix "$digest" "$small" "$big"
}

_probe() { # url [curl args...] -> "4MiB-range-B/s 20MiB-range-B/s" over fresh connections
  local url=$1; shift
  echo "$(curl -sS -o /dev/null -w '%{speed_download}' -r 0-4194303 "$@" "$url") $(curl -sS -o /dev/null -w '%{speed_download}' -r 0-20971519 "$@" "$url")"
}

# The matrix worlds: each registry redirects to its own CDN, the CDNs' single-connection speeds
# (written to $WORLD_DIR/probe.json for the report), the slow tail, TLS, token auth and RTT.
world_check_matrix() { # digest smooth-4MiB-B/s smooth-20MiB-B/s
  local digest=$1 path=/docker/registry/v2/blobs/sha256/${1:7:2}/${1#sha256:}/data
  local reg cdn code loc sp probe="{\"smooth\": [$2, $3]"
  for pair in "burst $REG_BURST $CDN_BURST" "after $REG_AFTER $CDN_AFTER"; do
    read -r name reg cdn <<<"$pair"
    loc=$(curl -sS -o /dev/null -w '%{redirect_url}' "http://$reg/v2/perf/img500/blobs/$digest")
    case "$loc" in "http://$cdn/"*) ;; *) world_log "check: $reg redirects to $loc, want $cdn"; return 1 ;; esac
    sp=$(_probe "$loc")
    probe+=", \"$name\": [${sp/ /, }]"
    world_log "check ok: $name world ($reg -> $cdn): 4 MiB range at $(_mib "${sp% *}") MiB/s, 20 MiB range at $(_mib "${sp#* }") MiB/s"
  done
  # Slow tail: 8 fresh connections, 2 MiB each; 2 of them should get TAIL_RATE.
  local speeds="" slow=0 tail_bytes
  tail_bytes=$(_size_bytes "$TAIL_RATE")
  for _ in 1 2 3 4 5 6 7 8; do
    sp=$(curl -sS -o /dev/null -w '%{speed_download}' -r 0-2097151 "http://$CDN_TAIL$path")
    speeds+="${speeds:+, }$sp"
    python3 -c "import sys; sys.exit(0 if $sp < 1.5 * $tail_bytes else 1)" && slow=$((slow + 1))
  done
  probe+=", \"tail\": [$speeds]"
  [ "$slow" = 2 ] || { world_log "check: $slow of 8 connections to $CDN_TAIL were slow, want 2 ($speeds)"; return 1; }
  world_log "check ok: tail world ($REG_TAIL -> $CDN_TAIL): 2 of 8 connections at <= 1.5x $TAIL_RATE"
  # TLS: registry and CDN verified against the throw-away CA, blob bytes through the redirect.
  local got
  got=$(curl -fsSL --cacert "$TLS_DIR/ca.crt" "https://$REG_TLS/v2/perf/img500/blobs/$digest" | sha256sum | cut -d' ' -f1)
  [ "sha256:$got" = "$digest" ] || { world_log "check: bytes via https://$REG_TLS hash to $got"; return 1; }
  loc=$(curl -sS --cacert "$TLS_DIR/ca.crt" -o /dev/null -w '%{redirect_url}' "https://$REG_TLS/v2/perf/img500/blobs/$digest")
  case "$loc" in "https://$CDN_TLS/"*) ;; *) world_log "check: $REG_TLS redirects to $loc"; return 1 ;; esac
  sp=$(_probe "$loc" --cacert "$TLS_DIR/ca.crt")
  probe+=", \"tls\": [${sp/ /, }]"
  world_log "check ok: tls world (https $REG_TLS -> https $CDN_TLS): bytes verified, 4 MiB range at $(_mib "${sp% *}") MiB/s, 20 MiB at $(_mib "${sp#* }") MiB/s"
  # Shared link: one connection gets CDN_RATE, eight together LINK_RATE (20 MiB ranges each).
  loc=$(curl -sS -o /dev/null -w '%{redirect_url}' "http://$REG_LINK/v2/perf/img500/blobs/$digest")
  case "$loc" in "http://$CDN_LINK/"*) ;; *) world_log "check: $REG_LINK redirects to $loc, want $CDN_LINK"; return 1 ;; esac
  sp=$(_probe "$loc")
  local t0 t1 link_bytes agg pids=()
  t0=$(date +%s%N)
  for _ in 1 2 3 4 5 6 7 8; do
    curl -sS -o /dev/null -r 0-20971519 "$loc" &
    pids+=($!)
  done
  wait "${pids[@]}" # (not a bare wait: the world's daemons are this shell's children too)
  t1=$(date +%s%N)
  agg=$(python3 -c "print(8 * 20971520 / (($t1 - $t0) / 1e9))")
  link_bytes=$(_size_bytes "$LINK_RATE")
  probe+=", \"link\": [${sp/ /, }], \"link_8_connections\": $agg"
  python3 -c "import sys; sys.exit(0 if 0.8 * $link_bytes <= $agg <= 1.2 * $link_bytes else 1)" ||
    { world_log "check: 8 connections through $CDN_LINK got $(_mib "$agg") MiB/s together, want ~LINK_RATE=$LINK_RATE"; return 1; }
  world_log "check ok: link world ($REG_LINK -> $CDN_LINK): one connection 20 MiB range at $(_mib "${sp#* }") MiB/s, 8 together $(_mib "$agg") MiB/s"
  # No Range: a Range GET answers 200 with the whole blob.
  loc=$(curl -sS -o /dev/null -w '%{redirect_url}' "http://$REG_NORANGE/v2/perf/img500/blobs/$digest")
  case "$loc" in "http://$CDN_NORANGE/"*) ;; *) world_log "check: $REG_NORANGE redirects to $loc"; return 1 ;; esac
  local answer n_got
  answer=$(curl -sS -o /dev/null -w '%{http_code} %{size_download}' -r 0-1023 "$loc")
  code=${answer% *} n_got=${answer#* }
  [ "$code" = 200 ] && [ "$n_got" = "$size" ] ||
    { world_log "check: Range 0-1023 on $CDN_NORANGE answered $code with $n_got bytes, want 200 and all $size"; return 1; }
  world_log "check ok: norange world ($REG_NORANGE -> $CDN_NORANGE): Range answered 200 with the whole blob"
  # Connection limit: CONN_LIMIT + 2 ranges at once, exactly 2 refused with 503.
  loc=$(curl -sS -o /dev/null -w '%{redirect_url}' "http://$REG_CONNLIMIT/v2/perf/img500/blobs/$digest")
  case "$loc" in "http://$CDN_CONNLIMIT/"*) ;; *) world_log "check: $REG_CONNLIMIT redirects to $loc"; return 1 ;; esac
  local codes=$WORLD_DIR/connlimit.codes
  : >"$codes"
  pids=()
  for _ in $(seq $((CONN_LIMIT + 2))); do
    curl -sS -o /dev/null -w '%{http_code}\n' -r 0-4194303 "$loc" >>"$codes" &
    pids+=($!)
  done
  wait "${pids[@]}"
  local refused
  refused=$(grep -c '^503$' "$codes" || true)
  [ "$refused" = 2 ] ||
    { world_log "check: $((CONN_LIMIT + 2)) ranges at once from $CDN_CONNLIMIT: $refused refused, want 2 ($(tr '\n' ' ' <"$codes"))"; return 1; }
  world_log "check ok: connlimit world ($REG_CONNLIMIT -> $CDN_CONNLIMIT): $((CONN_LIMIT + 2)) ranges at once, 2 refused with 503"
  # HTTP/2: the CDN answers h2 by ALPN, one connection gets CDN_RATE whatever it multiplexes.
  loc=$(curl -sS --cacert "$TLS_DIR/ca.crt" -o /dev/null -w '%{redirect_url}' "https://$REG_H2/v2/perf/img500/blobs/$digest")
  case "$loc" in "https://$CDN_H2/"*) ;; *) world_log "check: $REG_H2 redirects to $loc"; return 1 ;; esac
  local ver
  ver=$(curl -sS --cacert "$TLS_DIR/ca.crt" -o /dev/null -w '%{http_version}' -r 0-1023 "$loc")
  [ "$ver" = 2 ] || { world_log "check: $CDN_H2 answered HTTP/$ver, want 2"; return 1; }
  sp=$(_probe "$loc" --cacert "$TLS_DIR/ca.crt")
  probe+=", \"h2\": [${sp/ /, }]"
  world_log "check ok: h2 world (https $REG_H2 -> https $CDN_H2): HTTP/2, 4 MiB range at $(_mib "${sp% *}") MiB/s, 20 MiB at $(_mib "${sp#* }") MiB/s"
  # Connection: close after every response.
  loc=$(curl -sS -o /dev/null -w '%{redirect_url}' "http://$REG_CLOSE/v2/perf/img500/blobs/$digest")
  case "$loc" in "http://$CDN_CLOSE/"*) ;; *) world_log "check: $REG_CLOSE redirects to $loc"; return 1 ;; esac
  curl -sS -o /dev/null -D - -r 0-1023 "$loc" | tr -d '\r' | grep -qi '^connection: close$' ||
    { world_log "check: $CDN_CLOSE does not close the connection after a response"; return 1; }
  sp=$(_probe "$loc")
  probe+=", \"close\": [${sp/ /, }]"
  world_log "check ok: close world ($REG_CLOSE -> $CDN_CLOSE): Connection: close, 4 MiB range at $(_mib "${sp% *}") MiB/s"
  # The proxied registry: blobs answered by the registry itself (200, no redirect) through
  # nginx, capped per connection after the first second's burst (a 64 MiB range over one
  # connection: 25 MiB at once, then CDN_RATE; well under the uncapped registry's speed).
  local secs big_digest
  big_digest=$(python3 -c 'import json,sys; print(max(json.load(open(sys.argv[1]))["blobs"], key=lambda b: b["size"])["digest"])' "$WORLD_DIR/images/img500.json")
  answer=$(curl -sS -o /dev/null -w '%{http_code} %{size_download} %{time_total}' -r 0-67108863 "http://$REG_PROXIED/v2/perf/img500/blobs/$big_digest")
  read -r code n_got secs <<<"$answer"
  [ "$code" = 206 ] && [ "$n_got" = 67108864 ] ||
    { world_log "check: 64 MiB range through $REG_PROXIED answered $code with $n_got bytes, want 206 and all of it"; return 1; }
  python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) >= 1.0 else 1)" "$secs" ||
    { world_log "check: 64 MiB through $REG_PROXIED took $secs s: not capped"; return 1; }
  sp=$(_probe "http://$REG_PROXIED/v2/perf/img500/blobs/$big_digest")
  probe+=", \"proxied\": [${sp/ /, }]"
  world_log "check ok: proxied world ($REG_PROXIED -> $DIRECT, no redirect): 64 MiB range over one connection in $secs s"
  # Far worlds: token auth really enforced, RTT really added.
  local w rtt host port hdr realm tok t
  for w in $RTT_WORLDS; do
    IFS=: read -r rtt host port <<<"$w"
    reg=$host:$port
    hdr=$(curl -sS -o /dev/null -D - "http://$reg/v2/perf/imgsmall/manifests/latest" | tr -d '\r')
    code=$(printf '%s' "$hdr" | head -1 | awk '{print $2}')
    [ "$code" = 401 ] || { world_log "check: $reg answered $code without a token, want 401"; return 1; }
    realm=$(printf '%s' "$hdr" | sed -n 's/^[Ww]ww-[Aa]uthenticate: Bearer realm="\([^"]*\)".*/\1/p')
    [ "$realm" = "http://$host:$TOKEN_PORT/token" ] || { world_log "check: $reg realm is '$realm'"; return 1; }
    tok=$(curl -fsS "$realm?service=fastpull-perf&scope=repository:perf/imgsmall:pull" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
    code=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $tok" -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$reg/v2/perf/imgsmall/manifests/latest")
    [ "$code" = 200 ] || { world_log "check: $reg answered $code with a token, want 200"; return 1; }
    code=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer ${tok%?????}AAAAA" -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$reg/v2/perf/imgsmall/manifests/latest")
    [ "$code" = 401 ] || { world_log "check: $reg answered $code to a forged token, want 401"; return 1; }
    # A fresh connection and one request: 2 RTTs (handshake + request) on a far registry.
    t=$(curl -sS -o /dev/null -w '%{time_total}' "http://$reg/v2/")
    python3 -c "import sys; sys.exit(0 if 1.8 * $rtt <= 1000 * $t <= 2 * $rtt + 60 else 1)" ||
      { world_log "check: connect + GET /v2/ on $reg took $t s, want ~2x $rtt ms"; return 1; }
    tok=$(curl -fsS "$realm?service=fastpull-perf&scope=repository:perf/img500:pull" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
    loc=$(curl -sS -o /dev/null -w '%{redirect_url}' -H "Authorization: Bearer $tok" "http://$reg/v2/perf/img500/blobs/$digest")
    case "$loc" in "http://$host:${CDN##*:}/"*) ;; *) world_log "check: $reg redirects to $loc"; return 1 ;; esac
    sp=$(_probe "$loc")
    probe+=", \"rtt$rtt\": [${sp/ /, }], \"rtt${rtt}_connect_get_s\": $t"
    world_log "check ok: rtt$rtt world ($reg, token auth enforced: 401 / token 200 / forged 401): connect+GET $t s, CDN 4 MiB range at $(_mib "${sp% *}") MiB/s, 20 MiB at $(_mib "${sp#* }") MiB/s"
  done
  # The far TLS world: token auth over HTTPS, HTTP/2 from the registry, the round trips added
  # to the handshakes too (connect, TLS, GET: 3 RTT through the proxy, which models TCP's).
  local ca=(--cacert "$TLS_DIR/ca.crt") proto
  reg=$REG_FARTLS
  hdr=$(curl -sS "${ca[@]}" -o /dev/null -D - "https://$reg/v2/perf/imgsmall/manifests/latest" | tr -d '\r')
  code=$(printf '%s' "$hdr" | head -1 | awk '{print $2}')
  [ "$code" = 401 ] || { world_log "check: $reg answered $code without a token, want 401"; return 1; }
  realm=$(printf '%s' "$hdr" | sed -n 's/^[Ww]ww-[Aa]uthenticate: Bearer realm="\([^"]*\)".*/\1/p')
  [ "$realm" = "https://$TOKEN_FARTLS/token" ] || { world_log "check: $reg realm is '$realm'"; return 1; }
  tok=$(curl -fsS "${ca[@]}" "$realm?service=fastpull-perf&scope=repository:perf/img500:pull" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  read -r code proto <<<"$(curl -sS "${ca[@]}" -o /dev/null -w '%{http_code} %{http_version}' -H "Authorization: Bearer $tok" "https://$reg/v2/perf/img500/blobs/$digest")"
  [ "$code" = 307 ] && [ "$proto" = 2 ] || { world_log "check: $reg answered $code over HTTP/$proto to a blob GET, want 307 over HTTP/2"; return 1; }
  t=$(curl -sS "${ca[@]}" -o /dev/null -w '%{time_total}' "https://$reg/v2/")
  python3 -c "import sys; sys.exit(0 if 2.8 * $FARTLS_RTT <= 1000 * $t <= 3 * $FARTLS_RTT + 90 else 1)" ||
    { world_log "check: connect + TLS + GET /v2/ on $reg took $t s, want ~3x $FARTLS_RTT ms"; return 1; }
  loc=$(curl -sS "${ca[@]}" -o /dev/null -w '%{redirect_url}' -H "Authorization: Bearer $tok" "https://$reg/v2/perf/img500/blobs/$digest")
  case "$loc" in "https://$CDN_FARTLS/"*) ;; *) world_log "check: $reg redirects to $loc"; return 1 ;; esac
  sp=$(_probe "$loc" "${ca[@]}")
  probe+=", \"fartls\": [${sp/ /, }], \"fartls_connect_tls_get_s\": $t"
  world_log "check ok: far TLS world ($reg, +$FARTLS_RTT ms, token auth over HTTPS, HTTP/2 registry): connect+TLS+GET $t s, CDN 4 MiB range at $(_mib "${sp% *}") MiB/s, 20 MiB at $(_mib "${sp#* }") MiB/s"
  echo "$probe}" >"$WORLD_DIR/probe.json"
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
