#!/usr/bin/env bash
# Load run for envelope-proxy: GET and POST of a ~1 KiB JSON document against a fast upstream
# (the proxy's built-in in-memory demo store, in a process of its own), four ways:
#
#   direct       wrk → demo store
#   passthrough  wrk → envelope-proxy (passthrough = true route) → demo store
#   encrypting   wrk → envelope-proxy (3 fields sealed / opened)  → demo store
#   authorized   the same, with a key policy on the route's key (a statement with a
#                context condition, decided per request with a warm decision cache)
#   encrypting-v2  the encrypting route with token_format = "v2" (compact tokens; data-key
#                records in a directory vault, read once, then cached)
#   nginx        wrk → nginx proxy_pass (1 worker, upstream keep-alive) → demo store
#
# Loopback only, bounded in time (MAX_SECONDS), and every process it starts is stopped on exit.
# See benches/load/README.md. Tunables (environment):
#
#   DURATION=10       seconds per measured throughput run (after WARMUP seconds of warm-up)
#   WARMUP=2          seconds of unrecorded warm-up before each throughput run
#   THREADS=2         wrk threads;  CONNS=64  wrk connections for the throughput runs
#   LAT_DURATION=5    seconds per single-connection latency run (0 = skip those runs)
#   CASES="direct passthrough encrypting encrypting-v2 authorized nginx"   METHODS="GET POST"
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
LOG_TAG=load
# shellcheck source=../lib.sh source-path=SCRIPTDIR
source "$HERE/../lib.sh" # log/die, cleanup traps, watchdog, pinning, CPU accounting, ROOT, BIN

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
LAT_DURATION=${LAT_DURATION:-5}
CASES=${CASES:-"direct passthrough encrypting encrypting-v2 authorized nginx"}
METHODS=${METHODS:-"GET POST"}
BASE_PORT=${BASE_PORT:-18080}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PIN=${PIN:-1}
AUDIT_FILE=${AUDIT_FILE:-0}
BUILD=${BUILD:-1}
QUIET_WAIT=${QUIET_WAIT:-120}
QUIET_MAX=${QUIET_MAX:-10}
QUIET_BUDGET= # no cap on the total waiting here (each run is short); not a tunable of this script
MAX_SECONDS=${MAX_SECONDS:-900}
OUT=${OUT:-}
export ENVELOPE_PROXY_LOG=${ENVELOPE_PROXY_LOG:-warn}

UPSTREAM_PORT=$BASE_PORT           # demo store
UPSTREAM_ADMIN_PORT=$((BASE_PORT + 1)) # the upstream process's own (unused) proxy listener
PROXY_PORT=$((BASE_PORT + 2))
NGINX_PORT=$((BASE_PORT + 3))
DOC=$HERE/doc.json
POST_LUA=$HERE/post.lua
SEED_ID=bench-1
# Values of the three encrypted fields in doc.json, to check the round trip.
SSN=078-05-1120

# ---------------------------------------------------------------------------------------------
# Tools and setup (benches/lib.sh).

install_missing wrk nginx curl
find_nginx
setup_pinning "wrk and the demo store"
build_binary
start_watchdog # the whole run is bounded: MAX_SECONDS
check_ports_free "$UPSTREAM_PORT" "$UPSTREAM_ADMIN_PORT" "$PROXY_PORT" "$NGINX_PORT"

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
auth = "none"
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
auth = "none"
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

# The same proxy with a key policy on "users": what authorization costs per request.
cp "$WORK/proxy.toml" "$WORK/proxy-authorized.toml"
cat >>"$WORK/proxy-authorized.toml" <<EOF

[[key_policy]]
key = "users"
[[key_policy.statement]]
sid = "bench"
effect = "allow"
principals = ["anonymous"]
actions = ["seal", "open"]
conditions = { "context.tenant" = { like = "acme*" }, "context.table" = "users" }
EOF

# The same proxy writing compact v2 tokens (records in a directory vault).
sed -e 's|^message_context = { id = "{path.id\|json.id}" }$|&\ntoken_format = "v2"\n[route.key_vault]\nkind = "dir"\ndir = "'"$WORK"'/proxy/vault"|' \
	"$WORK/proxy.toml" >"$WORK/proxy-v2.toml"
grep -q 'token_format = "v2"' "$WORK/proxy-v2.toml" || die "proxy-v2.toml: the v2 settings were not added"

sed -e "s|@PREFIX@|$WORK|g" -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" -e "s|@NGINX_PORT@|$NGINX_PORT|g" \
	"$HERE/nginx.conf.template" >"$WORK/nginx.conf"

# ---------------------------------------------------------------------------------------------
# Starting and stopping the pieces.

UPSTREAM_PID=""
SUT_PID=""

start_upstream() {
	start_bg "$WORK/upstream.log" "$UPSTREAM_PORT" "demo store" "${PIN_LOAD[@]}" "$BIN" serve --config "$WORK/upstream.toml"
	UPSTREAM_PID=$BG_PID
}

start_proxy() {
	local config=${1:-$WORK/proxy.toml}
	start_bg "$WORK/proxy.log" "$PROXY_PORT" envelope-proxy "${PIN_PROXY[@]}" "$BIN" serve --config "$config"
	SUT_PID=$BG_PID
}

start_nginx() {
	start_nginx_on "$NGINX_PORT"
	SUT_PID=$BG_PID
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
stop_proxy_only() {
	stop_pid "$SUT_PID"
	forget_pid "$SUT_PID"
	SUT_PID=""
}
if [[ " $CASES " == *" encrypting-v2 "* ]]; then
	log "sealing the seed document through the v2 route"
	stop_proxy_only
	start_proxy "$WORK/proxy-v2.toml"
	http 200 PUT "http://127.0.0.1:$PROXY_PORT/tenants/acme/users/$SEED_ID" "$WORK/seed.json" >/dev/null
	http 200 GET "http://127.0.0.1:$UPSTREAM_PORT/tenants/acme/users/$SEED_ID" >"$WORK/sealed-v2.json"
	grep -q 'enc:v2:' "$WORK/sealed-v2.json" || die "the v2 route stored no v2 token"
	if grep -q "$SSN" "$WORK/sealed-v2.json"; then die "plaintext reached the store"; fi
	log "document as stored in v2: $(wc -c <"$WORK/sealed-v2.json") bytes"
fi
stop_all
: >"$WORK/proxy.log" # the keyring and key creation warnings of the first start
log "document: $(printf "%s" "$(cat "$DOC")" | wc -c) bytes plaintext, $(wc -c <"$WORK/sealed.json") bytes as stored"

seed_store() {
	local sealed=$WORK/sealed.json
	[[ ${1:-} == encrypting-v2 ]] && sealed=$WORK/sealed-v2.json
	http 201 POST "http://127.0.0.1:$UPSTREAM_PORT/tenants/acme/users" "$sealed" >/dev/null
	http 201 POST "http://127.0.0.1:$UPSTREAM_PORT/raw/tenants/acme/users" "$WORK/sealed.json" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# Measurements.

# User ticks of this shell's reaped children (wrk). `times` must run in this shell, not in a
# command substitution (a subshell has no children of its own).
children_user_ticks() {
	times >"$WORK/times"
	awk -v hz="$CLK_TCK" 'NR == 2 { split($1, a, /[ms]/); printf "%d\n", (a[1] * 60 + a[2]) * hz }' "$WORK/times"
}

# The proxy or nginx (master + worker) of the current case; none for direct.
sut_pids() { with_children "$SUT_PID"; }

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
	wait_quiet "  "
	local sut t0 t1 sut0 sut1 st0 st1 cpu0 cpu1 kid0 kid1
	sut=$(sut_pids)
	kid0=$(children_user_ticks)
	# shellcheck disable=SC2086
	sut0=$(proc_ticks $sut)
	st0=$(proc_ticks "$UPSTREAM_PID")
	cpu0=$(cpu_sample user)
	t0=$EPOCHREALTIME
	timeout $((secs + 30)) "${PIN_LOAD[@]}" wrk "${args[@]}" >"$out" 2>&1 ||
		die "wrk failed for $case $method: $(cat "$out")"
	t1=$EPOCHREALTIME
	cpu1=$(cpu_sample user)
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
	passthrough | encrypting | encrypting-v2 | authorized) echo "$PROXY_PORT" ;;
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
	seed_store "$case"
	case $case in
	passthrough | encrypting) start_proxy ;;
	encrypting-v2) start_proxy "$WORK/proxy-v2.toml" ;;
	authorized) start_proxy "$WORK/proxy-authorized.toml" ;;
	nginx) start_nginx ;;
	esac
	# Functional check before measuring.
	reply=$(http 200 GET "http://127.0.0.1:$port$(get_path "$case")")
	if [[ $case == encrypting || $case == encrypting-v2 || $case == authorized ]]; then
		grep -q "$SSN" <<<"$reply" || die "$case route: GET did not decrypt"
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
	if [[ $case == passthrough || $case == encrypting || $case == encrypting-v2 || $case == authorized ]] && grep -q 'WARN\|ERROR' "$WORK/proxy.log"; then
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
	echo "$(machine_summary),"
	echo "wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'), $("$NGINX" -v 2>&1 | sed 's/.*: //'), git $(git_revision)."
	echo "Binary: $BIN ($(date -u -r "$BIN" +%Y-%m-%dT%H:%MZ))."
	echo "Pinning: $PINNING. ENVELOPE_PROXY_LOG=$ENVELOPE_PROXY_LOG, audit log to file: $([[ $AUDIT_FILE -eq 1 ]] && echo yes || echo 'no (tracing only)')."
	echo "Document: $(printf "%s" "$(cat "$DOC")" | wc -c) bytes, 3 fields encrypted on the encrypting route ($(wc -c <"$WORK/sealed.json") bytes as stored)."
	echo "Throughput runs: ${DURATION}s, $THREADS threads, $CONNS connections (after ${WARMUP}s warm-up). Latency runs: ${LAT_DURATION}s, 1 connection."
	echo "proxy CPU / store CPU: CPU time of the proxy or nginx / of the demo store during the run, in % of one core;"
	echo "load core: how busy cpu $LOAD_CPU (wrk + demo store) was; other: user CPU of processes outside this run (a shared machine), % of one core."
	[[ $NOISY -gt 0 ]] && echo "**Warning: $NOISY run(s) measured while other processes kept the machine busy: see the 'other' column.**"
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
		{ key = $1 "/" $2 "/" $3; rps[key] = $5; p50[key] = $6; cpu[key] = $10; load[key] = $12 }
		# A route against pass-through, goal in %. Throughput compares the routes only while the
		# proxy core is the limit; when a run was held back by the other core instead (wrk and the
		# store at >= 90 % while the proxy was not), the ratio says nothing, and the proxy CPU per
		# request decides (what throughput would be with the proxy core the limit), said so.
		function held(k) { return load[k] >= 90 && cpu[k] < 90 }
		function judge(label, c, m, goal,    e, p, ce, cp, r, how) {
			e = rps[c "/" m "/tput"]; p = rps["passthrough/" m "/tput"]
			if (!(e > 0 && p > 0)) return
			ce = cpu[c "/" m "/tput"] * 1e4 / e; cp = cpu["passthrough/" m "/tput"] * 1e4 / p
			if (held(c "/" m "/tput") || held("passthrough/" m "/tput")) {
				r = 100 * cp / ce
				how = sprintf("throughput %.0f%% is no measure (the load core was the limit), so by proxy CPU per request: %.0f%%", 100 * e / p, r)
			} else {
				r = 100 * e / p
				how = sprintf("%.0f%% of pass-through throughput", r)
			}
			printf "- %s: %s at %s (goal ≥ %d%%): %s; proxy CPU per request %.1f µs (pass-through %.1f µs)\n", m, label, how, goal, (r >= goal ? "met" : "NOT met"), ce, cp
		}
		END {
			split("GET POST", ms, " ")
			for (i = 1; i <= 2; i++) {
				m = ms[i]
				p = rps["passthrough/" m "/tput"]; n = rps["nginx/" m "/tput"]
				judge("encrypting route", "encrypting", m, 80)
				judge("encrypting route with v2 tokens", "encrypting-v2", m, (m == "GET" ? 80 : 85))
				if (p > 0 && n > 0)
					printf "- %s: pass-through at %.0f%% of nginx throughput (goal ≥ 100%%): %s\n", m, 100 * p / n, (p >= n ? "met" : "NOT met")
				d = p50["direct/" m "/lat"]
				if (d > 0) {
					split("passthrough encrypting encrypting-v2 authorized nginx", cs, " ")
					line = ""
					for (j = 1; j <= 5; j++) {
						c = cs[j]; v = p50[c "/" m "/lat"]
						if (v > 0) line = line sprintf("%s%s +%.0f µs", (line == "" ? "" : ", "), c, v - d)
					}
					e = p50["encrypting/" m "/lat"]
					if (e > 0)
						printf "- %s: added p50 latency over direct, 1 connection: %s (goal < 100 µs for encrypting: %s)\n", m, line, (e - d < 100 ? "met" : "NOT met")
				}
				a = p50["authorized/" m "/lat"]; e = p50["encrypting/" m "/lat"]
				if (a > 0 && e > 0)
					printf "- %s: authorization (key policy, warm decision cache): %+.0f µs p50 per request over the encrypting route, 1 connection (goal ≤ 2 µs; wrk resolves ~1 µs, see benches/policy.rs for the stage alone)\n", m, a - e
				a = rps["authorized/" m "/tput"]; e = rps["encrypting/" m "/tput"]
				if (a > 0 && e > 0)
					printf "- %s: authorized route at %.1f%% of the throughput of the encrypting route (%.2f µs of proxy time per request)\n", m, 100 * a / e, 1e6 / a - 1e6 / e
			}
		}' "$RESULTS"
}

report | tee "${OUT:-/dev/null}"
