#!/usr/bin/env bash
# Load run for envelope-proxy: GET and POST of a ~1 KiB JSON document against a fast upstream
# (the proxy's built-in in-memory demo store, in a process of its own), four ways:
#
#   direct       wrk → demo store
#   passthrough  wrk → envelope-proxy (passthrough = true route) → demo store
#   encrypting   wrk → envelope-proxy (3 fields sealed / opened)  → demo store
#   nginx        wrk → nginx proxy_pass (1 worker, upstream keep-alive) → demo store
#
# Loopback only, bounded in time (MAX_SECONDS), and every process it starts is stopped on exit.
# See benches/load/README.md. Tunables (environment):
#
#   DURATION=10       seconds per measured throughput run (after WARMUP seconds of warm-up)
#   WARMUP=2          seconds of unrecorded warm-up before each throughput run
#   THREADS=2         wrk threads;  CONNS=64  wrk connections for the throughput runs
#   LAT_DURATION=5    seconds per single-connection latency run (0 = skip those runs)
#   CASES="direct passthrough encrypting nginx"   METHODS="GET POST"
#   BASE_PORT=18080   ports BASE_PORT..BASE_PORT+3 on 127.0.0.1 are used
#   PROXY_CPU=0 LOAD_CPU=1   cores for the proxy/nginx and for wrk + demo store (taskset)
#   PIN=1             0 = do not pin anything
#   ENVELOPE_PROXY_LOG=warn  log filter of the proxy under test (info logs every audit event)
#   AUDIT_FILE=0      1 = the proxy writes the hash-chained audit log to a file
#   BUILD=1           0 = do not run `cargo build --release` (use the existing binary)
#   QUIET_WAIT=120 QUIET_MAX=10  before each measurement, wait up to QUIET_WAIT s until other
#                     processes use at most QUIET_MAX % of the machine (0 = do not wait)
#   MAX_SECONDS=900   hard limit for the whole run
#   OUT=              also write the results table (markdown) to this file
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
LAT_DURATION=${LAT_DURATION:-5}
CASES=${CASES:-"direct passthrough encrypting nginx"}
METHODS=${METHODS:-"GET POST"}
BASE_PORT=${BASE_PORT:-18080}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PIN=${PIN:-1}
AUDIT_FILE=${AUDIT_FILE:-0}
BUILD=${BUILD:-1}
QUIET_WAIT=${QUIET_WAIT:-120}
QUIET_MAX=${QUIET_MAX:-10}
MAX_SECONDS=${MAX_SECONDS:-900}
OUT=${OUT:-}
export ENVELOPE_PROXY_LOG=${ENVELOPE_PROXY_LOG:-warn}

UPSTREAM_PORT=$BASE_PORT           # demo store
UPSTREAM_ADMIN_PORT=$((BASE_PORT + 1)) # the upstream process's own (unused) proxy listener
PROXY_PORT=$((BASE_PORT + 2))
NGINX_PORT=$((BASE_PORT + 3))
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release/envelope-proxy
DOC=$HERE/doc.json
POST_LUA=$HERE/post.lua
SEED_ID=bench-1
# Values of the three encrypted fields in doc.json, to check the round trip.
SSN=078-05-1120

log() { printf '[load] %s\n' "$*" >&2; }
die() {
	printf '[load] error: %s\n' "$*" >&2
	exit 1
}

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: every background process is recorded and stopped on exit.

PIDS=()
WORK=""
WATCHDOG=""

stop_pid() {
	local pid=$1
	kill -0 "$pid" 2>/dev/null || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 1 50); do
		kill -0 "$pid" 2>/dev/null || {
			wait "$pid" 2>/dev/null || true
			return 0
		}
		sleep 0.1
	done
	log "pid $pid did not stop on TERM; killing it"
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	local i
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
		stop_pid "${PIDS[$i]}"
	done
	if [[ -n $WATCHDOG ]]; then
		# The watchdog first (so it cannot act on its sleep ending), then its sleep.
		local sleeper
		sleeper=$(pgrep -P "$WATCHDOG" 2>/dev/null || true)
		kill -KILL "$WATCHDOG" 2>/dev/null || true
		wait "$WATCHDOG" 2>/dev/null || true
		if [[ -n $sleeper ]]; then
			kill "$sleeper" 2>/dev/null || true
		fi
	fi
	if [[ -n $WORK && -d $WORK ]]; then
		if [[ $rc -ne 0 ]]; then
			log "logs of the failed run:"
			for f in "$WORK"/*.log; do
				[[ -s $f ]] || continue
				log "--- $(basename "$f") (last 20 lines)"
				tail -n 20 "$f" >&2 || true
			done
		fi
		rm -rf "$WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Remove a pid from PIDS once it has been stopped.
forget_pid() {
	local pid=$1 keep=() p
	for p in "${PIDS[@]}"; do
		[[ $p == "$pid" ]] || keep+=("$p")
	done
	PIDS=("${keep[@]+"${keep[@]}"}")
}

# ---------------------------------------------------------------------------------------------
# Tools.

install_missing() {
	local pkgs=() p
	command -v wrk >/dev/null || pkgs+=(wrk)
	command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || pkgs+=(nginx)
	command -v curl >/dev/null || pkgs+=(curl)
	[[ ${#pkgs[@]} -eq 0 ]] && return 0
	command -v apt-get >/dev/null || die "missing ${pkgs[*]} and no apt-get: install them by hand"
	local sudo=()
	if [[ $EUID -ne 0 ]]; then
		command -v sudo >/dev/null || die "missing ${pkgs[*]}: install them (needs root)"
		sudo=(sudo)
	fi
	# Only refresh the package lists when a package has no install candidate.
	local need_update=0
	for p in "${pkgs[@]}" nginx-light; do
		if ! apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
			[[ $p == nginx-light ]] || need_update=1
		fi
	done
	if [[ $need_update -eq 1 ]]; then
		log "apt-get update"
		"${sudo[@]}" apt-get update -qq
	fi
	# nginx-light (smaller) when the distribution still has it.
	local i
	for i in "${!pkgs[@]}"; do
		if [[ ${pkgs[$i]} == nginx ]] && apt-cache policy nginx-light 2>/dev/null | grep -q 'Candidate: [0-9]'; then
			pkgs[i]=nginx-light
		fi
	done
	log "apt-get install -y ${pkgs[*]}"
	DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${pkgs[@]}" >/dev/null
}

install_missing
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $NGINX ]] || die "nginx not found"

if [[ $PIN -eq 1 ]] && command -v taskset >/dev/null && [[ $(nproc --all) -ge 2 ]]; then
	PIN_PROXY=(taskset -c "$PROXY_CPU")
	PIN_LOAD=(taskset -c "$LOAD_CPU")
	PINNING="proxy/nginx on cpu $PROXY_CPU; wrk and the demo store on cpu $LOAD_CPU"
else
	PIN_PROXY=()
	PIN_LOAD=()
	PINNING="none (taskset missing, fewer than 2 cores, or PIN=0)"
fi

if [[ $BUILD -eq 1 ]]; then
	log "cargo build --release"
	(cd "$ROOT" && cargo build --release --quiet --bin envelope-proxy)
fi
[[ -x $BIN ]] || die "$BIN not found: run cargo build --release"

# The whole run is bounded: a watchdog ends it after MAX_SECONDS.
(
	sleep "$MAX_SECONDS"
	printf '[load] error: MAX_SECONDS=%s reached, stopping\n' "$MAX_SECONDS" >&2
	kill -TERM $$ 2>/dev/null
) &
WATCHDOG=$!

for port in $UPSTREAM_PORT $UPSTREAM_ADMIN_PORT $PROXY_PORT $NGINX_PORT; do
	if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
		die "127.0.0.1:$port is already in use (set BASE_PORT)"
	fi
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/envelope-load.XXXXXX")
RESULTS=$WORK/results.tsv
: >"$RESULTS"

# ---------------------------------------------------------------------------------------------
# Configurations.

mkdir -p "$WORK/upstream" "$WORK/proxy"
cat >"$WORK/upstream.toml" <<EOF
# The fast upstream: only the demo store is used (a proxy config needs a route, so one idle one).
[server]
listen = "127.0.0.1:$UPSTREAM_ADMIN_PORT"
[keyring]
path = "$WORK/upstream/keyring.json"
master_key_file = "$WORK/upstream/master.key"
[demo_store]
listen = "127.0.0.1:$UPSTREAM_PORT"
[[route]]
name = "unused"
path = "/unused"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
passthrough = true
EOF

AUDIT_SECTION=""
if [[ $AUDIT_FILE -eq 1 ]]; then
	AUDIT_SECTION="[audit]
path = \"$WORK/proxy/audit.log\""
fi
cat >"$WORK/proxy.toml" <<EOF
[server]
listen = "127.0.0.1:$PROXY_PORT"
[keyring]
path = "$WORK/proxy/keyring.json"
master_key_file = "$WORK/proxy/master.key"
create_missing_keys = true
$AUDIT_SECTION

# Encrypting route: 3 fields of the document, key context from a path capture and a literal.
[[route]]
name = "users"
path = "/tenants/{tenant}/users/{id?}"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
key = "users"
fields = ["\$.ssn", "\$.card.number", "\$.profile"]
context = { tenant = "{path.tenant}", table = "users" }
message_context = { id = "{path.id|json.id}" }

# Pass-through route to the same store (its own collections under /raw).
[[route]]
name = "raw"
path = "/raw/**"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
passthrough = true
EOF

sed -e "s|@PREFIX@|$WORK|g" -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" -e "s|@NGINX_PORT@|$NGINX_PORT|g" \
	"$HERE/nginx.conf.template" >"$WORK/nginx.conf"

# ---------------------------------------------------------------------------------------------
# Starting and stopping the pieces.

wait_port() {
	local port=$1 pid=$2 what=$3
	for _ in $(seq 1 100); do
		kill -0 "$pid" 2>/dev/null || die "$what exited at start (see its log)"
		if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
			return 0
		fi
		sleep 0.1
	done
	die "$what did not listen on 127.0.0.1:$port within 10 s"
}

UPSTREAM_PID=""
SUT_PID=""

start_upstream() {
	"${PIN_LOAD[@]}" "$BIN" serve --config "$WORK/upstream.toml" >>"$WORK/upstream.log" 2>&1 &
	UPSTREAM_PID=$!
	PIDS+=("$UPSTREAM_PID")
	wait_port "$UPSTREAM_PORT" "$UPSTREAM_PID" "demo store"
}

start_proxy() {
	"${PIN_PROXY[@]}" "$BIN" serve --config "$WORK/proxy.toml" >>"$WORK/proxy.log" 2>&1 &
	SUT_PID=$!
	PIDS+=("$SUT_PID")
	wait_port "$PROXY_PORT" "$SUT_PID" "envelope-proxy"
}

start_nginx() {
	"$NGINX" -t -q -c "$WORK/nginx.conf" -p "$WORK" -e stderr >>"$WORK/nginx.log" 2>&1 ||
		die "nginx rejected its configuration"
	"${PIN_PROXY[@]}" "$NGINX" -c "$WORK/nginx.conf" -p "$WORK" -e stderr >>"$WORK/nginx.log" 2>&1 &
	SUT_PID=$!
	PIDS+=("$SUT_PID")
	wait_port "$NGINX_PORT" "$SUT_PID" "nginx"
}

stop_all() {
	if [[ -n $SUT_PID ]]; then
		stop_pid "$SUT_PID"
		forget_pid "$SUT_PID"
		SUT_PID=""
	fi
	if [[ -n $UPSTREAM_PID ]]; then
		stop_pid "$UPSTREAM_PID"
		forget_pid "$UPSTREAM_PID"
		UPSTREAM_PID=""
	fi
}

# curl helpers: print the body, fail unless the status is the expected one.
http() {
	local expect=$1 method=$2 url=$3 body_file=${4:-}
	local args=(-sS -o "$WORK/reply" -w '%{http_code}' -X "$method" --max-time 5)
	[[ -n $body_file ]] && args+=(-H 'content-type: application/json' --data-binary "@$body_file")
	local code
	code=$(curl "${args[@]}" "$url") || die "$method $url failed"
	[[ $code == "$expect" ]] || die "$method $url: status $code, expected $expect: $(head -c 300 "$WORK/reply")"
	cat "$WORK/reply"
}

# ---------------------------------------------------------------------------------------------
# Seed: one document sealed by the proxy, as stored; every case's store gets a copy of it at
# /tenants/acme/users/bench-1 (read by direct, nginx and the encrypting route) and at
# /raw/tenants/acme/users/bench-1 (read by the pass-through route), so every GET case has the
# upstream send the same bytes.

sed '1s/^{/{"id":"'"$SEED_ID"'",/' "$DOC" >"$WORK/seed.json"
log "sealing the seed document through the encrypting route"
start_upstream
start_proxy
http 201 POST "http://127.0.0.1:$PROXY_PORT/tenants/acme/users" "$WORK/seed.json" >/dev/null
http 200 GET "http://127.0.0.1:$UPSTREAM_PORT/tenants/acme/users/$SEED_ID" >"$WORK/sealed.json"
grep -q 'enc:v1:' "$WORK/sealed.json" || die "the stored document holds no token"
if grep -q "$SSN" "$WORK/sealed.json"; then die "plaintext reached the store"; fi
http 200 GET "http://127.0.0.1:$PROXY_PORT/tenants/acme/users/$SEED_ID" | grep -q "$SSN" ||
	die "the encrypting route did not decrypt the seed document"
stop_all
: >"$WORK/proxy.log" # the keyring and key creation warnings of the first start
log "document: $(printf "%s" "$(cat "$DOC")" | wc -c) bytes plaintext, $(wc -c <"$WORK/sealed.json") bytes as stored"

seed_store() {
	http 201 POST "http://127.0.0.1:$UPSTREAM_PORT/tenants/acme/users" "$WORK/sealed.json" >/dev/null
	http 201 POST "http://127.0.0.1:$UPSTREAM_PORT/raw/tenants/acme/users" "$WORK/sealed.json" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# Measurements.

CLK_TCK=$(getconf CLK_TCK)

# "utime stime" (ticks) of processes, summed (all their threads).
proc_ticks() {
	local u=0 s=0 pid t
	for pid in "$@"; do
		[[ -r /proc/$pid/stat ]] || continue
		# Fields after the "(comm)" part: utime is the 12th, stime the 13th.
		read -r -a t < <(sed 's/^.*) //' "/proc/$pid/stat")
		u=$((u + t[11]))
		s=$((s + t[12]))
	done
	echo "$u $s"
}

# "user+nice of all cores, busy of the load core, total of the load core" (jiffies).
cpu_sample() {
	awk -v c="cpu$LOAD_CPU" '
		$1 == "cpu" { u = $2 + $3 }
		$1 == c { t = 0; for (i = 2; i <= 9; i++) t += $i; lb = t - $5 - $6; lt = t }
		END { print u, lb, lt }' /proc/stat
}

# "busy total" jiffies of all cores.
all_busy() {
	awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

# User ticks of this shell's reaped children (wrk). `times` must run in this shell, not in a
# command substitution (a subshell has no children of its own).
children_user_ticks() {
	times >"$WORK/times"
	awk -v hz="$CLK_TCK" 'NR == 2 { split($1, a, /[ms]/); printf "%d\n", (a[1] * 60 + a[2]) * hz }' "$WORK/times"
}

# This machine may be shared (other builds): wait until it is quiet before a measurement.
NOISY_RUNS=0
wait_quiet() {
	[[ $QUIET_WAIT -gt 0 ]] || return 0
	local start=$SECONDS a b busy
	while :; do
		a=$(all_busy)
		sleep 1
		b=$(all_busy)
		busy=$(awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); print (y[2] > x[2] ? int(100 * (y[1] - x[1]) / (y[2] - x[2])) : 0) }')
		[[ $busy -le $QUIET_MAX ]] && return 0
		if ((SECONDS - start >= QUIET_WAIT)); then
			log "  the machine is still busy ($busy% of all cores) after ${QUIET_WAIT}s: measuring anyway"
			NOISY_RUNS=$((NOISY_RUNS + 1))
			return 0
		fi
		log "  the machine is busy ($busy% of all cores, not this run): waiting"
		sleep 4
	done
}

# The proxy or nginx (master + worker) of the current case; none for direct.
sut_pids() {
	if [[ -n $SUT_PID ]]; then
		# shellcheck disable=SC2046 # one pid per word
		echo "$SUT_PID" $(pgrep -P "$SUT_PID" || true)
	fi
}

# run_wrk CASE METHOD PORT PATH MODE(tput|lat|warm) SECONDS THREADS CONNS
run_wrk() {
	local case=$1 method=$2 port=$3 path=$4 mode=$5 secs=$6 threads=$7 conns=$8
	local url="http://127.0.0.1:$port"
	local args=(-t"$threads" -c"$conns" -d"${secs}s" --timeout 5s --latency)
	if [[ $method == POST ]]; then
		args+=(-s "$POST_LUA" "$url/" -- "$path" "$DOC" "$mode")
	else
		args+=("$url$path")
	fi
	local out=$WORK/wrk-$case-$method-$mode.txt
	if [[ $mode == warm ]]; then
		timeout $((secs + 30)) "${PIN_LOAD[@]}" wrk "${args[@]}" >"$out" 2>&1 ||
			die "wrk failed for $case $method: $(cat "$out")"
		return 0
	fi
	wait_quiet
	local sut t0 t1 sut0 sut1 st0 st1 cpu0 cpu1 kid0 kid1
	sut=$(sut_pids)
	kid0=$(children_user_ticks)
	# shellcheck disable=SC2086
	sut0=$(proc_ticks $sut)
	st0=$(proc_ticks "$UPSTREAM_PID")
	cpu0=$(cpu_sample)
	t0=$EPOCHREALTIME
	timeout $((secs + 30)) "${PIN_LOAD[@]}" wrk "${args[@]}" >"$out" 2>&1 ||
		die "wrk failed for $case $method: $(cat "$out")"
	t1=$EPOCHREALTIME
	cpu1=$(cpu_sample)
	# shellcheck disable=SC2086
	sut1=$(proc_ticks $sut)
	st1=$(proc_ticks "$UPSTREAM_PID")
	kid1=$(children_user_ticks)
	awk -v case="$case" -v method="$method" -v mode="$mode" -v conns="$conns" -v hz="$CLK_TCK" \
		-v wall="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" -v has_sut="${sut:+1}" \
		-v sut0="$sut0" -v sut1="$sut1" -v st0="$st0" -v st1="$st1" -v cpu0="$cpu0" -v cpu1="$cpu1" \
		-v wrk_user=$((kid1 - kid0)) '
		function us(v) {
			if (v ~ /us$/) return v + 0
			if (v ~ /ms$/) return (v + 0) * 1000
			if (v ~ /m$/) return (v + 0) * 60e6
			if (v ~ /s$/) return (v + 0) * 1e6
			return v + 0
		}
		/^ *50%/ { p50 = us($2) }
		/^ *99%/ { p99 = us($2) }
		/Non-2xx or 3xx responses:/ { bad = $NF }
		/Socket errors:/ { errs = $0; sub(/^ *Socket errors: */, "", errs) }
		/^Requests\/sec:/ { rps = $2 }
		END {
			split(sut0, a, " "); split(sut1, b, " "); split(st0, c, " "); split(st1, d, " ")
			split(cpu0, e, " "); split(cpu1, f, " ")
			per = 100 / hz / wall
			sut = has_sut ? sprintf("%.0f", (b[1] + b[2] - a[1] - a[2]) * per) : "-"
			store = (d[1] + d[2] - c[1] - c[2]) * per
			load = (f[3] > e[3]) ? 100 * (f[2] - e[2]) / (f[3] - e[3]) : 0
			# User time of every core, less that of the proxy/nginx, the store and wrk.
			other = ((f[1] - e[1]) - (b[1] - a[1]) - (d[1] - c[1]) - wrk_user) * per
			if (other < 0) other = 0
			printf "%s\t%s\t%s\t%s\t%.0f\t%.0f\t%.0f\t%d\t%s\t%s\t%.0f\t%.0f\t%.0f\n", case, method, mode, conns, rps, p50, p99, bad + 0, (errs == "" ? "-" : errs), sut, store, load, other
		}' "$out" >>"$RESULTS"
}

case_port() {
	case $1 in
	direct) echo "$UPSTREAM_PORT" ;;
	passthrough | encrypting) echo "$PROXY_PORT" ;;
	nginx) echo "$NGINX_PORT" ;;
	*) die "unknown case $1" ;;
	esac
}

# Paths per case: GET reads the seeded document; POST creates a new record per request.
get_path() {
	case $1 in
	passthrough) echo "/raw/tenants/acme/users/$SEED_ID" ;;
	*) echo "/tenants/acme/users/$SEED_ID" ;;
	esac
}
post_prefix() {
	case $1 in
	passthrough) echo "/raw/tenants/acme/users/" ;;
	*) echo "/tenants/acme/users/" ;;
	esac
}

for case in $CASES; do
	port=$(case_port "$case")
	log "case $case (port $port)"
	start_upstream
	seed_store
	case $case in
	passthrough | encrypting) start_proxy ;;
	nginx) start_nginx ;;
	esac
	# Functional check before measuring.
	reply=$(http 200 GET "http://127.0.0.1:$port$(get_path "$case")")
	if [[ $case == encrypting ]]; then
		grep -q "$SSN" <<<"$reply" || die "encrypting route: GET did not decrypt"
	else
		grep -q 'enc:v1:' <<<"$reply" || die "$case: GET did not return the stored document"
	fi
	http 201 POST "http://127.0.0.1:$port$(post_prefix "$case")check" "$DOC" >/dev/null
	for method in $METHODS; do
		if [[ $method == GET ]]; then path=$(get_path "$case"); else path=$(post_prefix "$case"); fi
		log "  $method: warm-up ${WARMUP}s, then ${DURATION}s with $THREADS threads x $CONNS connections"
		[[ $WARMUP -gt 0 ]] && run_wrk "$case" "$method" "$port" "$path" warm "$WARMUP" "$THREADS" "$CONNS"
		run_wrk "$case" "$method" "$port" "$path" tput "$DURATION" "$THREADS" "$CONNS"
		if [[ $LAT_DURATION -gt 0 ]]; then
			log "  $method: ${LAT_DURATION}s with 1 connection (latency)"
			run_wrk "$case" "$method" "$port" "$path" lat "$LAT_DURATION" 1 1
		fi
	done
	if [[ $case == passthrough || $case == encrypting ]] && grep -q 'WARN\|ERROR' "$WORK/proxy.log"; then
		log "  the proxy logged warnings or errors:"
		grep -m5 'WARN\|ERROR' "$WORK/proxy.log" >&2 || true
	fi
	: >"$WORK/proxy.log"
	stop_all
done

# ---------------------------------------------------------------------------------------------
# Report.

report() {
	echo "## envelope-proxy load run"
	echo
	echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc --all) cores ($(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')),"
	echo "wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'), $("$NGINX" -v 2>&1 | sed 's/.*: //'), git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty)')."
	echo "Binary: $BIN ($(date -u -r "$BIN" +%Y-%m-%dT%H:%MZ))."
	echo "Pinning: $PINNING. ENVELOPE_PROXY_LOG=$ENVELOPE_PROXY_LOG, audit log to file: $([[ $AUDIT_FILE -eq 1 ]] && echo yes || echo 'no (tracing only)')."
	echo "Document: $(printf "%s" "$(cat "$DOC")" | wc -c) bytes, 3 fields encrypted on the encrypting route ($(wc -c <"$WORK/sealed.json") bytes as stored)."
	echo "Throughput runs: ${DURATION}s, $THREADS threads, $CONNS connections (after ${WARMUP}s warm-up). Latency runs: ${LAT_DURATION}s, 1 connection."
	echo "proxy CPU / store CPU: CPU time of the proxy or nginx / of the demo store during the run, in % of one core;"
	echo "load core: how busy cpu $LOAD_CPU (wrk + demo store) was; other: user CPU of processes outside this run (a shared machine), % of one core."
	[[ $NOISY_RUNS -gt 0 ]] && echo "**Warning: $NOISY_RUNS run(s) measured while other processes kept the machine busy: see the 'other' column.**"
	echo
	echo "| case | method | conns | requests/s | p50 | p99 | non-2xx | proxy CPU | store CPU | load core | other |"
	echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
	awk -F'\t' '
		function fmt(u) { return u >= 1000 ? sprintf("%.2f ms", u / 1000) : sprintf("%.0f µs", u) }
		{ printf "| %s | %s | %s | %d | %s | %s | %d | %s | %d%% | %d%% | %d%%%s |\n", $1, $2, $4, $5, fmt($6), fmt($7), $8, ($10 == "-" ? "-" : $10 "%"), $11, $12, $13, ($13 >= 2 * q ? " ⚠" : "") }
	' q="$QUIET_MAX" "$RESULTS"
	if awk -F'\t' -v q="$QUIET_MAX" '$13 >= 2 * q { found = 1 } END { exit !found }' "$RESULTS"; then
		echo
		echo "⚠: other processes used $((2 * QUIET_MAX))% or more of a core during that run: rerun it (e.g. CASES=nginx) before trusting it."
	fi
	awk -F'\t' '$9 != "-" { printf "\nSocket errors, %s %s (%s): %s\n", $1, $2, $3, $9 }' "$RESULTS"
	echo
	echo "### Goals"
	echo
	awk -F'\t' '
		{ key = $1 "/" $2 "/" $3; rps[key] = $5; p50[key] = $6 }
		END {
			split("GET POST", ms, " ")
			for (i = 1; i <= 2; i++) {
				m = ms[i]
				e = rps["encrypting/" m "/tput"]; p = rps["passthrough/" m "/tput"]; n = rps["nginx/" m "/tput"]
				if (e > 0 && p > 0)
					printf "- %s: encrypting route at %.0f%% of pass-through throughput (goal ≥ 80%%): %s\n", m, 100 * e / p, (e >= 0.8 * p ? "met" : "NOT met")
				if (p > 0 && n > 0)
					printf "- %s: pass-through at %.0f%% of nginx throughput (goal ≥ 100%%): %s\n", m, 100 * p / n, (p >= n ? "met" : "NOT met")
				d = p50["direct/" m "/lat"]
				if (d > 0) {
					split("passthrough encrypting nginx", cs, " ")
					line = ""
					for (j = 1; j <= 3; j++) {
						c = cs[j]; v = p50[c "/" m "/lat"]
						if (v > 0) line = line sprintf("%s%s +%.0f µs", (line == "" ? "" : ", "), c, v - d)
					}
					e = p50["encrypting/" m "/lat"]
					if (e > 0)
						printf "- %s: added p50 latency over direct, 1 connection: %s (goal < 100 µs for encrypting: %s)\n", m, line, (e - d < 100 ? "met" : "NOT met")
				}
			}
		}' "$RESULTS"
}

report | tee "${OUT:-/dev/null}"
