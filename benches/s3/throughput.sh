#!/usr/bin/env bash
# Throughput of the S3 gateway: PUT and GET of one large object (SIZE_MIB, default 1 GiB, one
# single PutObject stream) with curl, four ways, against the same fast S3 upstream:
#
#   direct       curl → upstream
#   passthrough  curl → envelope-proxy (`passthrough = true` route "/**") → upstream
#   encrypting   curl → envelope-proxy (`kind = "s3"` route: body sealed / opened) → upstream
#   nginx        curl → nginx proxy_pass (1 worker, streaming both ways, keep-alive) → upstream
#
# Reports MB/s (10^6 bytes/s, median of RUNS), the peak RSS (VmHWM) of the proxy / nginx and
# the CPU time of each side, and checks the issue's goals. See benches/s3/README.md.
#
# Upstream (UPSTREAM): the proxy must be what limits the throughput, and on a 2-core machine a
# real S3 server never lets it: each spends several times the proxy's CPU per byte. s3s-fs
# 0.14.1, pinned to one core: ~2 CPU-s per GiB on PUT (MD5 ETag and copy), ~2.2 on GET (it reads
# the file 4 KiB at a time through tokio's blocking pool; 6–10 CPU-s unpinned), 400–450 MB/s
# whatever is in front of it. s3rver 3.7.1 (npm) was tried too: ~3 / ~1.2 CPU-s per GiB. The
# default is therefore `sink`: sink_s3.py here, a minimal path-style object store (PUT streams
# the body to a file in 1 MiB reads, GET uses sendfile(2); x-amz-meta-* kept; no MD5, no
# signature check) at ~0.1–0.45 CPU-s per GiB. UPSTREAM=s3s-fs runs the same cases against a
# real, signature-checking S3 server (S3S_FS=path, else s3s-fs on PATH, ~/.cargo/bin or
# tests/peers/cargo, else `cargo install`): it proves the signing below right.
#
# Signing and Host: every request is signed by curl itself (`--aws-sigv4`, UNSIGNED-PAYLOAD,
# one streaming PutObject; curl sends `Expect: 100-continue` for it, as SDKs do; note that
# `-H "Expect:"` makes curl sign an "expect" header it does not send, and the gateway answers
# SignatureDoesNotMatch). The pass-through route forwards the client's signature untouched but
# replaces Host by the upstream's authority (the client's Host goes to X-Forwarded-Host;
# src/pipeline/upstream.rs), and SigV4 signs Host. So in the direct, passthrough and nginx
# cases curl signs with the upstream's credentials for `Host: 127.0.0.1:UPSTREAM_PORT` and sends
# that Host header (the three send the same request), and nginx sends that same Host upstream.
# The encrypting route checks the client's signature (the [[route.s3.client]] credentials,
# Host = the proxy) and signs its own upstream request with the upstream credentials.
#
# Cases run interleaved (run 1 of every case, then run 2, ...) so that a slow phase of a shared
# machine does not hit one case only; before each transfer the run waits for the machine to be
# quiet. Loopback only, bounded in time (MAX_SECONDS), every process it starts is stopped on
# exit and its temp dir (on /dev/shm) removed. Tunables (environment):
#
#   SIZE_MIB=1024     object size (MiB); the source is made once from /dev/urandom, on /dev/shm
#   RUNS=3            transfers per case and direction (the median is reported)
#   CASES="direct passthrough encrypting nginx"
#   UPSTREAM=sink     or s3s-fs (see above)
#   BASE_PORT=18400   ports BASE_PORT..BASE_PORT+3 on 127.0.0.1 (upstream, pass-through proxy,
#                     encrypting proxy, nginx)
#   PIN=1 PROXY_CPU=0 LOAD_CPU=1  proxy/nginx on one core, curl and the upstream on the other
#   NGINX_BUFFER=256k nginx client_body_buffer_size and proxy_buffer_size: how much it reads at
#                     a time while streaming (its defaults, 16k and 4k, cost it ~25% on GET)
#   ENVELOPE_PROXY_LOG=warn  log filter of the proxies (info logs every audit event)
#   BUILD=1           0 = do not run `cargo build --release` (use the existing binary)
#   QUIET_WAIT=30 QUIET_MAX=10  before each transfer, wait up to QUIET_WAIT s until other
#                     processes use at most QUIET_MAX % of the machine (0 = do not wait);
#   QUIET_BUDGET=180  at most this many seconds of such waiting in the whole run
#   TRANSFER_TIMEOUT=180  seconds for one transfer;  MAX_SECONDS=900  for the whole run
#   OUT=              also write the report (markdown) to this file
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOG_TAG=s3-throughput
# shellcheck source=../lib.sh source-path=SCRIPTDIR
source "$HERE/../lib.sh" # log/die, cleanup traps, watchdog, pinning, CPU accounting, ROOT, BIN

SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-3}
CASES=${CASES:-"direct passthrough encrypting nginx"}
UPSTREAM=${UPSTREAM:-sink}
BASE_PORT=${BASE_PORT:-18400}
PIN=${PIN:-1}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
NGINX_BUFFER=${NGINX_BUFFER:-256k}
BUILD=${BUILD:-1}
QUIET_WAIT=${QUIET_WAIT:-30}
QUIET_BUDGET=${QUIET_BUDGET:-180}
QUIET_MAX=${QUIET_MAX:-10}
TRANSFER_TIMEOUT=${TRANSFER_TIMEOUT:-180}
MAX_SECONDS=${MAX_SECONDS:-900}
OUT=${OUT:-}
export ENVELOPE_PROXY_LOG=${ENVELOPE_PROXY_LOG:-warn}

UP_PORT=$BASE_PORT
PASS_PORT=$((BASE_PORT + 1))
ENC_PORT=$((BASE_PORT + 2))
NGINX_PORT=$((BASE_PORT + 3))
BUCKET=bench
REGION=us-east-1
CLIENT_AK=AKIABENCHCLIENT
CLIENT_SK=bench-client-secret

[[ $SIZE_MIB =~ ^[1-9][0-9]*$ ]] || die "SIZE_MIB must be a positive integer"
SIZE=$((SIZE_MIB << 20))
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
for c in $CASES; do
	case $c in direct | passthrough | encrypting | nginx) ;; *) die "unknown case $c" ;; esac
done
has_case() { [[ " $CASES " == *" $1 "* ]]; }

# ---------------------------------------------------------------------------------------------
# Tools and setup (benches/lib.sh).

command -v curl >/dev/null || die "curl is missing (apt-get install curl)"
curl --help all 2>/dev/null | grep -q -- '--aws-sigv4' || die "this curl has no --aws-sigv4 (needs 7.75+)"
NGINX=""
if has_case nginx; then
	install_missing nginx
	find_nginx
fi

UPSTREAM_VERSION=""
case $UPSTREAM in
sink)
	command -v python3 >/dev/null || die "UPSTREAM=sink needs python3"
	UPSTREAM_VERSION="sink_s3.py (python $(python3 -c 'import platform; print(platform.python_version())'))"
	UP_AK=AKIABENCHUPSTREAM # the sink checks no signature; kept for the same requests as s3s-fs
	UP_SK=bench-upstream-secret
	;;
s3s-fs)
	S3S_FS=${S3S_FS:-$(command -v s3s-fs || true)}
	for c in "$HOME/.cargo/bin/s3s-fs" "$ROOT/tests/peers/cargo/bin/s3s-fs"; do
		if [[ -z $S3S_FS && -x $c ]]; then S3S_FS=$c; fi
	done
	if [[ -z $S3S_FS ]]; then
		log "cargo install s3s-fs 0.14.1"
		cargo install -q --locked s3s-fs --version 0.14.1 --features binary
		S3S_FS=$HOME/.cargo/bin/s3s-fs
	fi
	UPSTREAM_VERSION=$("$S3S_FS" --version)
	UP_AK=AKIABENCHUPSTREAM
	UP_SK=bench-upstream-secret
	;;
*) die "UPSTREAM must be sink or s3s-fs" ;;
esac

setup_pinning "curl and the upstream"
if has_case passthrough || has_case encrypting; then
	build_binary
fi
start_watchdog # the whole run is bounded: MAX_SECONDS
check_ports_free "$UP_PORT" "$PASS_PORT" "$ENC_PORT" "$NGINX_PORT"

# Everything (source object, upstream storage) on tmpfs: the disk is not what is measured.
SHM=/dev/shm
[[ -d $SHM && -w $SHM ]] || SHM=${TMPDIR:-/tmp}
free_kib=$(df -Pk "$SHM" | awk 'NR == 2 { print $4 }')
need_kib=$(((SIZE >> 10) * 5 + 65536))
[[ $free_kib -ge $need_kib ]] || die "$SHM has $((free_kib >> 10)) MiB free, needs $((need_kib >> 10)) MiB (SIZE_MIB × 5)"
WORK=$(mktemp -d "$SHM/envelope-s3bench.XXXXXX")
RESULTS=$WORK/results.tsv
: >"$RESULTS"
mkdir -p "$WORK/store" "$WORK/proxy"

log "source: $SIZE_MIB MiB from /dev/urandom"
head -c "$SIZE" /dev/urandom >"$WORK/src.bin"
SRC=$WORK/src.bin

# ---------------------------------------------------------------------------------------------
# Configurations.

printf '%s' "$UP_AK" >"$WORK/proxy/upstream-ak"
printf '%s' "$UP_SK" >"$WORK/proxy/upstream-sk"
printf '%s' "$CLIENT_SK" >"$WORK/proxy/client-sk"
chmod 600 "$WORK"/proxy/*

common_toml() {
	cat <<EOF
[server]
listen = "127.0.0.1:$1"
auth = "none"
upstream_timeout_ms = $((TRANSFER_TIMEOUT * 1000))
[keyring]
path = "$WORK/proxy/$2-keyring.json"
master_key_file = "$WORK/proxy/$2-master.key"
create_missing_keys = true
EOF
}
{
	common_toml "$PASS_PORT" passthrough
	cat <<EOF
[[route]]
name = "raw"
path = "/**"
upstream = "http://127.0.0.1:$UP_PORT"
passthrough = true
EOF
} >"$WORK/passthrough.toml"
{
	common_toml "$ENC_PORT" encrypting
	s3_route_toml "http://127.0.0.1:$UP_PORT" "$REGION" "$WORK/proxy/upstream-ak" "$WORK/proxy/upstream-sk" \
		"$CLIENT_AK" "$WORK/proxy/client-sk"
} >"$WORK/encrypting.toml"
sed -e "s|@PREFIX@|$WORK|g" -e "s|@UPSTREAM_PORT@|$UP_PORT|g" -e "s|@NGINX_PORT@|$NGINX_PORT|g" \
	-e "s|@NGINX_BUFFER@|$NGINX_BUFFER|g" "$HERE/nginx.conf.template" >"$WORK/nginx.conf"

# ---------------------------------------------------------------------------------------------
# Starting the pieces (all of them at once: the idle ones cost nothing).

declare -A SUT_PID=()
UP_PID=""

start_upstream() {
	case $UPSTREAM in
	sink) start_bg "$WORK/upstream.log" "$UP_PORT" "$UPSTREAM" \
		"${PIN_LOAD[@]}" python3 "$HERE/sink_s3.py" --port "$UP_PORT" "$WORK/store" ;;
	s3s-fs) start_bg "$WORK/upstream.log" "$UP_PORT" "$UPSTREAM" \
		"${PIN_LOAD[@]}" "$S3S_FS" --host 127.0.0.1 --port "$UP_PORT" --access-key "$UP_AK" \
		--secret-key "$UP_SK" "$WORK/store" ;;
	esac
	UP_PID=$BG_PID
}

start_proxy() {
	local case=$1 port=$2
	start_bg "$WORK/$case.log" "$port" "envelope-proxy ($case)" \
		"${PIN_PROXY[@]}" "$BIN" serve --config "$WORK/$case.toml"
	SUT_PID[$case]=$BG_PID
}

start_nginx() {
	start_nginx_on "$NGINX_PORT"
	SUT_PID[nginx]=$BG_PID
}

start_upstream
has_case passthrough && start_proxy passthrough "$PASS_PORT"
has_case encrypting && start_proxy encrypting "$ENC_PORT"
has_case nginx && start_nginx
# The keyring creation warnings of the first start are expected.
for f in "$WORK"/passthrough.log "$WORK"/encrypting.log; do
	if [[ -f $f ]]; then : >"$f"; fi
done

# ---------------------------------------------------------------------------------------------
# Requests. curl signs (SigV4, UNSIGNED-PAYLOAD); see the header for the Host header.

SIGN=(--aws-sigv4 "aws:amz:$REGION:s3" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD")

# Arguments for curl and the URL of case $1's object.
case_args() {
	local case=$1
	case $case in
	direct) echo "--user $UP_AK:$UP_SK http://127.0.0.1:$UP_PORT" ;;
	passthrough) echo "--user $UP_AK:$UP_SK -H Host:127.0.0.1:$UP_PORT http://127.0.0.1:$PASS_PORT" ;;
	encrypting) echo "--user $CLIENT_AK:$CLIENT_SK http://127.0.0.1:$ENC_PORT" ;;
	nginx) echo "--user $UP_AK:$UP_SK -H Host:127.0.0.1:$UP_PORT http://127.0.0.1:$NGINX_PORT" ;;
	esac
}

# A small request straight to the upstream: METHOD PATH, prints the status.
upstream_call() {
	curl -sS -o "$WORK/reply" -w '%{http_code}' --max-time 30 "${SIGN[@]}" --user "$UP_AK:$UP_SK" \
		-X "$1" -H 'Content-Length: 0' "http://127.0.0.1:$UP_PORT$2"
}

stored_file() {
	case $UPSTREAM in
	*) echo "$WORK/store/$BUCKET/$1.bin" ;;
	esac
}

code=$(upstream_call PUT "/$BUCKET") || die "CreateBucket failed"
[[ $code == 200 ]] || die "CreateBucket: status $code: $(head -c 300 "$WORK/reply")"

# ---------------------------------------------------------------------------------------------
# Measurements.

# The quiet-machine wait (wait_quiet) and the CPU accounting (proc_ticks, cpu_sample) are in
# benches/lib.sh; QUIET_BUDGET caps the waiting of the whole run.

# The proxy or nginx (master + workers) of a case; none for direct.
sut_pids() { with_children "${SUT_PID[$1]:-}"; }

# One timed transfer: CASE PUT|GET RUN. Appends a row to $RESULTS.
transfer() {
	local case=$1 dir=$2 run=$3 args sut rc=0
	read -r -a args <<<"$(case_args "$case")"
	local url=${args[-1]}/$BUCKET/$case.bin
	unset 'args[-1]'
	args+=(-sS --max-time "$TRANSFER_TIMEOUT" "${SIGN[@]}"
		-w '%{http_code} %{size_upload} %{size_download} %{time_total}')
	if [[ $dir == PUT ]]; then
		args+=(-T "$SRC" -o "$WORK/reply")
	else
		args+=(-o /dev/null)
	fi
	wait_quiet "    "
	sut=$(sut_pids "$case")
	local s0 s1 u0 u1 c0 c1
	# shellcheck disable=SC2086
	s0=$(proc_ticks $sut)
	u0=$(proc_ticks "$UP_PID")
	c0=$(cpu_sample user+system)
	local TIMEFORMAT='%R %U %S'
	{ time "${PIN_LOAD[@]}" curl "${args[@]}" "$url" >"$WORK/curl.out" 2>"$WORK/curl.err"; } 2>"$WORK/time.out" || rc=$?
	c1=$(cpu_sample user+system)
	u1=$(proc_ticks "$UP_PID")
	# shellcheck disable=SC2086
	s1=$(proc_ticks $sut)
	[[ $rc -eq 0 ]] || die "$case $dir: curl failed ($rc): $(cat "$WORK/curl.err")"
	local code up down secs
	read -r code up down secs <"$WORK/curl.out" || true # no newline after -w
	[[ $code == 200 ]] || die "$case $dir: status $code: $(head -c 300 "$WORK/reply" 2>/dev/null)"
	if [[ $dir == PUT && $up != "$SIZE" ]] || [[ $dir == GET && $down != "$SIZE" ]]; then
		die "$case $dir: moved ${up}/${down} bytes, expected $SIZE"
	fi
	awk -v case="$case" -v dir="$dir" -v run="$run" -v size="$SIZE" -v secs="$secs" -v hz="$CLK_TCK" \
		-v s0="$s0" -v s1="$s1" -v u0="$u0" -v u1="$u1" -v c0="$c0" -v c1="$c1" \
		-v has_sut="${sut:+1}" -v t="$(cat "$WORK/time.out")" 'BEGIN {
		split(s0, a, " "); split(s1, b, " "); split(u0, c, " "); split(u1, d, " ")
		split(c0, e, " "); split(c1, f, " "); split(t, tm, " ")
		sut_cpu = has_sut ? (b[1] + b[2] - a[1] - a[2]) / hz : -1
		up_cpu = (d[1] + d[2] - c[1] - c[2]) / hz
		curl_cpu = tm[2] + tm[3]
		load = (f[3] > e[3]) ? 100 * (f[2] - e[2]) / (f[3] - e[3]) : 0
		# User + system CPU of every core, less that of the proxy/nginx, the upstream and curl.
		other = (f[1] - e[1] - (b[1] + b[2] - a[1] - a[2]) - (d[1] + d[2] - c[1] - c[2])) / hz - curl_cpu
		if (other < 0) other = 0
		printf "%s\t%s\t%d\t%.1f\t%.3f\t%.2f\t%.2f\t%.2f\t%.0f\t%.2f\t%.0f\n", case, dir, run, size / secs / 1e6, secs, sut_cpu, up_cpu, curl_cpu, load, other, (sut_cpu < 0 ? 0 : 100 * sut_cpu / secs)
	}' >>"$RESULTS"
	log "    $dir $(tail -n 1 "$RESULTS" | awk -F'\t' '{ printf "%s MB/s in %s s; CPU s: proxy %s, upstream %s, curl %s; load core %s%%", $4, $5, ($6 < 0 ? "-" : $6), $7, $8, $9 }')"
}

SRC_SHA=""
verify_stored() {
	local case=$1 f
	f=$(stored_file "$case")
	[[ -f $f ]] || die "$case: no stored object at $f"
	if [[ $case == encrypting ]]; then
		# Stored: 56-byte C2SP header, then 16 bytes of tag per 16 KiB chunk (plus a final chunk).
		local expect=$((56 + SIZE + 16 * (SIZE / 16384 + 1))) got
		got=$(stat -c %s "$f")
		[[ $got == "$expect" ]] || die "encrypting: stored $got bytes, expected $expect (ciphertext size)"
		if cmp -s -n $((1 << 20)) -i 56:0 "$f" "$SRC"; then
			die "encrypting: the stored object holds the plaintext"
		fi
		log "    stored object: $got bytes (plaintext + 56 + 16 per 16 KiB chunk), not the plaintext: ok"
	else
		cmp -s "$f" "$SRC" || die "$case: the stored object differs from the source"
		log "    stored object identical to the source: ok"
	fi
}

verify_roundtrip() {
	local case=$1 args code
	read -r -a args <<<"$(case_args "$case")"
	local url=${args[-1]}/$BUCKET/$case.bin
	unset 'args[-1]'
	[[ -n $SRC_SHA ]] || SRC_SHA=$(sha256sum "$SRC" | cut -d' ' -f1)
	code=$(curl -sS --max-time "$TRANSFER_TIMEOUT" "${SIGN[@]}" "${args[@]}" -o "$WORK/back.bin" -w '%{http_code}' "$url") ||
		die "$case: verification GET failed"
	[[ $code == 200 ]] || die "$case: verification GET: status $code"
	[[ $(sha256sum "$WORK/back.bin" | cut -d' ' -f1) == "$SRC_SHA" ]] ||
		die "$case: the object read back differs from the source (sha256)"
	rm -f "$WORK/back.bin"
	log "    round trip: sha256 of the object read back = the source's: ok"
}

log "upstream: $UPSTREAM_VERSION; pinning: $PINNING"
for run in $(seq 1 "$RUNS"); do
	for case in $CASES; do
		log "run $run/$RUNS, $case"
		transfer "$case" PUT "$run"
		[[ $run -eq 1 ]] && verify_stored "$case"
		transfer "$case" GET "$run"
		[[ $run -eq 1 && $case == encrypting ]] && verify_roundtrip "$case"
		code=$(upstream_call DELETE "/$BUCKET/$case.bin") || die "DeleteObject failed"
		[[ $code == 204 || $code == 200 ]] || die "DeleteObject: status $code"
	done
done

# Peak RSS (VmHWM: high-water mark over the process's life) of each proxy; nginx: master + worker.
declare -A RSS_KIB=()
for case in passthrough encrypting nginx; do
	has_case "$case" || continue
	kib=0
	for p in $(sut_pids "$case"); do
		k=$(awk '/^VmHWM:/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)
		kib=$((kib + ${k:-0}))
	done
	RSS_KIB[$case]=$kib
done

# ---------------------------------------------------------------------------------------------
# Report.

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# Median of column $3 for case $1, direction $2.
med() { awk -F'\t' -v c="$1" -v d="$2" -v k="$3" '$1 == c && $2 == d { print $k }' "$RESULTS" | median; }
all_runs() { awk -F'\t' -v c="$1" -v d="$2" '$1 == c && $2 == d { printf "%s%.0f", (n++ ? ", " : ""), $4 }' "$RESULTS"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }

report() {
	echo "## envelope-proxy S3 throughput"
	echo
	echo "$(machine_summary),"
	echo "$(curl --version | head -1 | awk '{ print $1, $2 }'), ${NGINX:+$("$NGINX" -v 2>&1 | sed 's/.*: //'), }upstream $UPSTREAM_VERSION on tmpfs,"
	echo "git $(git_revision), binary $BIN ($(date -u -r "$BIN" +%Y-%m-%dT%H:%MZ 2>/dev/null || echo '?'))."
	echo "Object: $SIZE_MIB MiB of random bytes, one PutObject (UNSIGNED-PAYLOAD) and one GetObject by curl, $RUNS runs per case (median; cases interleaved)."
	echo "Pinning: $PINNING. nginx buffers: $NGINX_BUFFER."
	echo "MB/s = 10^6 bytes/s over curl's total time. CPU: seconds of CPU time for one transfer; load core: how busy cpu $LOAD_CPU (curl + upstream) was."
	[[ $NOISY -gt 0 ]] && echo "**Warning: $NOISY transfer(s) started while other processes kept the machine busy.**"
	echo
	echo "| case | PUT MB/s | GET MB/s | peak RSS | proxy CPU s, % of its core (PUT / GET) | upstream CPU s (PUT / GET) | curl CPU s (PUT / GET) | load core (PUT / GET) |"
	echo "|---|---:|---:|---:|---:|---:|---:|---:|"
	local case
	for case in $CASES; do
		local rss="-" pcpu="-"
		[[ -n ${RSS_KIB[$case]:-} ]] && rss=$(mib "${RSS_KIB[$case]}")
		if [[ $case != direct ]]; then
			pcpu="$(med "$case" PUT 6) ($(med "$case" PUT 11)%) / $(med "$case" GET 6) ($(med "$case" GET 11)%)"
		fi
		printf '| %s | %.0f | %.0f | %s | %s | %s / %s | %s / %s | %.0f%% / %.0f%% |\n' "$case" \
			"$(med "$case" PUT 4)" "$(med "$case" GET 4)" "$rss" "$pcpu" \
			"$(med "$case" PUT 7)" "$(med "$case" GET 7)" "$(med "$case" PUT 8)" "$(med "$case" GET 8)" \
			"$(med "$case" PUT 9)" "$(med "$case" GET 9)"
	done
	echo
	echo "All runs (MB/s):"
	for case in $CASES; do
		echo "- $case: PUT $(all_runs "$case" PUT); GET $(all_runs "$case" GET)"
	done
	awk -F'\t' '$10 > 0.1 * $5 { n++; if ($10 / $5 > m) m = $10 / $5 }
		END { if (n) printf "- ⚠ in %d transfer(s) other processes used more than 10%% of a core (up to %.0f%%): rerun before trusting close results.\n", n, 100 * m }' "$RESULTS"
	echo
	echo "### Goals"
	echo
	local d e p n
	for d in PUT GET; do
		e=$(med encrypting "$d" 4)
		p=$(med passthrough "$d" 4)
		n=$(med nginx "$d" 4)
		if [[ -n $e && -n $p ]]; then
			awk -v d="$d" -v e="$e" -v p="$p" 'BEGIN { printf "- %s: encrypting route at %.0f%% of the pass-through route (%.0f vs %.0f MB/s; goal ≥ 90%%): %s\n", d, 100 * e / p, e, p, (e >= 0.9 * p ? "met" : "NOT met") }'
		fi
		if [[ -n $p && -n $n ]]; then
			awk -v d="$d" -v p="$p" -v n="$n" 'BEGIN { printf "- %s: pass-through route at %.0f%% of nginx (%.0f vs %.0f MB/s; goal ≥ 100%%): %s\n", d, 100 * p / n, p, n, (p >= n ? "met" : "NOT met") }'
		fi
	done
	for case in passthrough encrypting; do
		[[ -n ${RSS_KIB[$case]:-} ]] || continue
		awk -v c="$case" -v k="${RSS_KIB[$case]}" 'BEGIN { printf "- peak RSS of the proxy, %s: %.1f MiB (goal < 64 MiB): %s\n", c, k / 1024, (k < 65536 ? "met" : "NOT met") }'
	done
	echo
	echo "CPU per GiB of the proxy / nginx, and what one core of it would sustain if nothing else limited it:"
	for case in passthrough encrypting nginx; do
		has_case "$case" || continue
		awk -v c="$case" -v pc="$(med "$case" PUT 6)" -v gc="$(med "$case" GET 6)" -v size="$SIZE" 'BEGIN {
			printf "- %s: PUT %.2f s (%.0f MB/s), GET %.2f s (%.0f MB/s)\n", c, pc * 1073741824 / size, (pc > 0 ? size / pc / 1e6 : 0), gc * 1073741824 / size, (gc > 0 ? size / gc / 1e6 : 0) }'
	done
	local f
	for f in "$WORK"/passthrough.log "$WORK"/encrypting.log "$WORK"/nginx.log; do
		[[ -s $f ]] || continue
		if grep -q 'WARN\|ERROR\|\[error\]\|\[warn\]' "$f"; then
			echo
			echo "$(basename "$f" .log) logged warnings or errors:"
			grep -m5 'WARN\|ERROR\|\[error\]\|\[warn\]' "$f" | sed 's/^/    /'
		fi
	done
}

report | tee "${OUT:-/dev/null}"
