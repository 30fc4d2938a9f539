# shellcheck shell=bash
# Shared machinery of the benchmark scripts (benches/load/run.sh, benches/s3/throughput.sh,
# benches/s3/large_object.sh). Sourced, never run: it defines functions and a few globals,
# and arms the exit traps (see "Process bookkeeping").
#
# The scripts measure one process (the proxy or nginx) against a fast upstream on a 2-core
# machine that other people may be using, so they all need the same things: every process they
# start stopped however they end, a hard time bound, a quiet machine before each measurement,
# CPU time read from /proc, and the proxy and the load pinned to different cores. Keeping that
# in one place keeps the numbers of the scripts comparable: a fix to, say, how "the machine is
# busy" is computed applies to every benchmark at once.
#
# Contract with the sourcing script:
#   - set LOG_TAG (the "[tag]" in front of every message) before sourcing;
#   - `set -euo pipefail` is assumed (everything here is written for it) but not set here, so
#     that sourcing never changes the caller's shell options;
#   - the tunables read here (MAX_SECONDS, PIN, PROXY_CPU, LOAD_CPU, BUILD, QUIET_WAIT,
#     QUIET_MAX, QUIET_BUDGET) stay defined by the script, with its own defaults and its own
#     documentation, and must be set before the function that reads them is called;
#   - WORK (the temp dir, removed on exit) and PIDS (processes to stop on exit) are globals
#     the script fills in.

# SC2034: globals set here (PIN_LOAD, PINNING, CLK_TCK, ...) are read by the sourcing scripts,
# which a check of this file alone does not see.
# shellcheck disable=SC2034

: "${LOG_TAG:?set LOG_TAG before sourcing benches/lib.sh}"

# The repository, from this file's place in it (benches/lib.sh), so that it does not depend on
# how deep the sourcing script sits.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release/envelope-proxy

# Messages go to stderr: stdout is the report, which callers pipe into tee/OUT.
log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() {
	printf '[%s] error: %s\n' "$LOG_TAG" "$*" >&2
	exit 1
}

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: every background process is recorded and stopped on exit.
#
# A benchmark that dies half-way must not leave a proxy, nginx or an upstream listening (the
# next run would find its ports taken, or measure against a stray process), so the traps are
# armed as soon as this file is sourced, before anything is started.

PIDS=()
WORK=""
WATCHDOG=""

# TERM first, so that a process can end cleanly; KILL only after 5 s. Returns once the process
# is gone, so that its port is free for whatever the run starts next.
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
	local i f
	# The reverse of the start order: a proxy stops before the upstream it forwards to.
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
		stop_pid "${PIDS[$i]}"
	done
	if [[ -n $WATCHDOG ]]; then
		# The watchdog first (so it cannot act on its sleep ending), then its sleep: a sleep left
		# behind would outlive the run and keep its stdout (a pipe, say) open up to MAX_SECONDS.
		local sleeper
		sleeper=$(pgrep -P "$WATCHDOG" 2>/dev/null || true)
		kill -KILL "$WATCHDOG" 2>/dev/null || true
		wait "$WATCHDOG" 2>/dev/null || true
		if [[ -n $sleeper ]]; then
			kill "$sleeper" 2>/dev/null || true
		fi
	fi
	if [[ -n $WORK && -d $WORK ]]; then
		# The temp dir goes away with the logs in it: show them first when the run failed.
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
# INT and TERM go through `exit` so that the EXIT trap (cleanup) runs with the usual codes.
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Remove a pid from PIDS once it has been stopped (a later process may reuse the number).
forget_pid() {
	local pid=$1 keep=() p
	for p in "${PIDS[@]}"; do
		[[ $p == "$pid" ]] || keep+=("$p")
	done
	PIDS=("${keep[@]+"${keep[@]}"}")
}

# The whole run is bounded: a watchdog ends it after MAX_SECONDS. TERM (not KILL) so that the
# cleanup trap still stops everything the run started.
start_watchdog() {
	(
		sleep "$MAX_SECONDS"
		printf '[%s] error: MAX_SECONDS=%s reached, stopping\n' "$LOG_TAG" "$MAX_SECONDS" >&2
		kill -TERM $$ 2>/dev/null
	) &
	WATCHDOG=$!
}

# ---------------------------------------------------------------------------------------------
# Tools and setup.

# install_missing CMD...: installs, with apt-get, the package of each command that is missing.
# nginx counts as present in /usr/sbin too (not on a non-root PATH), and is installed as
# nginx-light where the distribution still has that smaller package. The package lists are only
# refreshed when a package has no install candidate: `apt-get update` is slow and needs the
# network, which a machine that has everything already should not need.
install_missing() {
	local pkgs=() p
	for p in "$@"; do
		if [[ $p == nginx ]]; then
			command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || pkgs+=(nginx)
		else
			command -v "$p" >/dev/null || pkgs+=("$p")
		fi
	done
	[[ ${#pkgs[@]} -eq 0 ]] && return 0
	command -v apt-get >/dev/null || die "missing ${pkgs[*]} and no apt-get: install them by hand"
	local sudo=()
	if [[ $EUID -ne 0 ]]; then
		command -v sudo >/dev/null || die "missing ${pkgs[*]}: install them (needs root)"
		sudo=(sudo)
	fi
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
	local i
	for i in "${!pkgs[@]}"; do
		if [[ ${pkgs[$i]} == nginx ]] && apt-cache policy nginx-light 2>/dev/null | grep -q 'Candidate: [0-9]'; then
			pkgs[i]=nginx-light
		fi
	done
	log "apt-get install -y ${pkgs[*]}"
	DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${pkgs[@]}" >/dev/null
}

# Sets NGINX to the nginx binary (after install_missing nginx).
find_nginx() {
	NGINX=$(command -v nginx || echo /usr/sbin/nginx)
	[[ -x $NGINX ]] || die "nginx not found"
}

# setup_pinning LOAD_SIDE: sets PIN_PROXY and PIN_LOAD (command prefixes) and PINNING (for the
# report; LOAD_SIDE names what runs on LOAD_CPU). With one core for the process under test and
# the other for the load and the upstream, the two do not take turns on a core, and the proxy's
# CPU time is not blurred by the load generator's. Pinning needs 2 cores; without them, or with
# PIN=0, nothing is pinned and the report says so.
setup_pinning() {
	if [[ $PIN -eq 1 ]] && command -v taskset >/dev/null && [[ $(nproc --all) -ge 2 ]]; then
		PIN_PROXY=(taskset -c "$PROXY_CPU")
		PIN_LOAD=(taskset -c "$LOAD_CPU")
		PINNING="proxy/nginx on cpu $PROXY_CPU; $1 on cpu $LOAD_CPU"
	else
		PIN_PROXY=()
		PIN_LOAD=()
		PINNING="none (taskset missing, fewer than 2 cores, or PIN=0)"
	fi
}

# Builds the release binary unless BUILD=0 (an existing build is then measured as it is).
build_binary() {
	if [[ $BUILD -eq 1 ]]; then
		log "cargo build --release"
		(cd "$ROOT" && cargo build --release --quiet --bin envelope-proxy)
	fi
	[[ -x $BIN ]] || die "$BIN not found: run cargo build --release"
}

# check_ports_free PORT...: a taken port would have the run measure (or fail against) whatever
# already listens there, so refuse to start instead.
check_ports_free() {
	local port
	for port in "$@"; do
		if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
			die "127.0.0.1:$port is already in use (set BASE_PORT)"
		fi
	done
}

# ---------------------------------------------------------------------------------------------
# Starting the pieces.

# wait_port PORT PID WHAT: until PID listens on 127.0.0.1:PORT (10 s at most). Watching the pid
# too makes a process that fails at start (bad config, port taken) fail the run at once.
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

# start_bg LOG PORT WHAT CMD...: runs CMD in the background (appending its output to LOG),
# records it in PIDS and waits for it to listen on PORT. The pid is left in BG_PID, not
# printed: the process must be a child of the script's own shell (a command substitution would
# make it a grandchild that `wait` cannot reap). CMD is run directly (no subshell), so BG_PID is
# the process itself (taskset execs it), whose /proc entries the measurements read.
BG_PID=""
start_bg() {
	local log=$1 port=$2 what=$3
	shift 3
	"$@" >>"$log" 2>&1 &
	BG_PID=$!
	PIDS+=("$BG_PID")
	wait_port "$port" "$BG_PID" "$what"
}

# start_nginx_on PORT: nginx with $WORK/nginx.conf (daemon off: it stays our child), pinned
# like the proxy, logging to $WORK/nginx.log; its master's pid in BG_PID. The configuration is
# checked first, so that a bad one is reported as such, not as "exited at start".
start_nginx_on() {
	"$NGINX" -t -q -c "$WORK/nginx.conf" -p "$WORK" -e stderr >>"$WORK/nginx.log" 2>&1 ||
		die "nginx rejected its configuration"
	start_bg "$WORK/nginx.log" "$1" nginx "${PIN_PROXY[@]}" "$NGINX" -c "$WORK/nginx.conf" -p "$WORK" -e stderr
}

# with_children PID: PID and its children, one per word (nginx: the master and its worker, whose
# CPU time and memory count too); nothing for an empty PID (the direct case has no proxy).
with_children() {
	[[ -n ${1:-} ]] || return 0
	# shellcheck disable=SC2046 # one pid per word
	echo "$1" $(pgrep -P "$1" || true)
}

# ---------------------------------------------------------------------------------------------
# CPU accounting from /proc.

CLK_TCK=$(getconf CLK_TCK)

# "utime stime" (ticks) of processes, summed (all their threads).
proc_ticks() {
	local u=0 s=0 pid t
	for pid in "$@"; do
		[[ -r /proc/$pid/stat ]] || continue
		# Fields after the "(comm)" part (comm may hold spaces): utime is the 12th, stime the 13th.
		read -r -a t < <(sed 's/^.*) //' "/proc/$pid/stat")
		u=$((u + t[11]))
		s=$((s + t[12]))
	done
	echo "$u $s"
}

# cpu_sample user|user+system: "CPU of all cores, busy of the load core, total of the load core"
# (ticks). The first is what the "other processes" figure is taken from: user+nice where the
# caller can subtract only the user time of its own processes (load/run.sh: `times` gives
# wrk's), user+nice+system where it can subtract both (s3/throughput.sh: `time` gives curl's).
cpu_sample() {
	local last
	case $1 in
	user) last=3 ;;
	user+system) last=4 ;;
	*) die "cpu_sample: unknown kind $1" ;;
	esac
	awk -v c="cpu$LOAD_CPU" -v last="$last" '
		$1 == "cpu" { u = 0; for (i = 2; i <= last; i++) u += $i }
		$1 == c { t = 0; for (i = 2; i <= 9; i++) t += $i; lb = t - $5 - $6; lt = t }
		END { print u, lb, lt }' /proc/stat
}

# "busy total" ticks of all cores (busy: all but idle and iowait).
all_busy() {
	awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

# How busy the whole machine is over the next second, in % of all cores.
busy_percent() {
	local a b
	a=$(all_busy)
	sleep 1
	b=$(all_busy)
	awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); print (y[2] > x[2] ? int(100 * (y[1] - x[1]) / (y[2] - x[2])) : 0) }'
}

# ---------------------------------------------------------------------------------------------
# Quiet-machine waiting.
#
# This machine may be shared (other builds, test suites): a measurement taken while something
# else runs says little about the proxy. wait_quiet INDENT waits, before a measurement, up to
# QUIET_WAIT seconds until other processes use at most QUIET_MAX % of the machine (QUIET_WAIT=0:
# do not wait). With QUIET_BUDGET set (seconds), all the waiting of the run together is capped
# too, so a long run on a busy machine still ends; empty = no cap. A measurement taken anyway
# counts in NOISY, which the report turns into a warning. INDENT lines the messages up with the
# caller's own.
NOISY=0
QUIET_SPENT=0
wait_quiet() {
	local indent=$1 budget=${QUIET_BUDGET:-}
	[[ $QUIET_WAIT -gt 0 ]] || return 0
	local start=$SECONDS busy
	if [[ -n $budget ]] && ((QUIET_SPENT >= budget)); then
		NOISY=$((NOISY + 1))
		return 0
	fi
	while :; do
		busy=$(busy_percent)
		if [[ $busy -le $QUIET_MAX ]]; then
			# Only the waiting counts against the budget, not the one-second sample.
			((SECONDS - start > 1)) && QUIET_SPENT=$((QUIET_SPENT + SECONDS - start - 1))
			return 0
		fi
		if ((SECONDS - start >= QUIET_WAIT)) || { [[ -n $budget ]] && ((QUIET_SPENT + SECONDS - start >= budget)); }; then
			QUIET_SPENT=$((QUIET_SPENT + SECONDS - start))
			if [[ -n $budget ]]; then
				log "${indent}the machine is still busy ($busy% of all cores): measuring anyway (QUIET_WAIT/QUIET_BUDGET)"
			else
				log "${indent}the machine is still busy ($busy% of all cores) after ${QUIET_WAIT}s: measuring anyway"
			fi
			NOISY=$((NOISY + 1))
			return 0
		fi
		log "${indent}the machine is busy ($busy% of all cores, not this run): waiting"
		sleep 4
	done
}

# ---------------------------------------------------------------------------------------------
# Report.

# "date, N cores (CPU model)": what a result must be read against.
machine_summary() {
	echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc --all) cores ($(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'))"
}

# The commit measured, marked " (dirty)" when the tree has uncommitted changes.
git_revision() {
	echo "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty)')"
}

# ---------------------------------------------------------------------------------------------
# S3 gateway configuration.

# s3_route_toml UPSTREAM_URL REGION UPSTREAM_AK_FILE UPSTREAM_SK_FILE CLIENT_AK CLIENT_SK_FILE:
# the encrypting S3 route both S3 benchmarks put in front of their upstream (every object
# sealed under key "objects", key context = the bucket).
s3_route_toml() {
	cat <<EOF
[[route]]
name = "objects"
kind = "s3"
path = "/**"
upstream = "$1"
key = "objects"
context = { bucket = "{s3.bucket}" }
[route.s3]
region = "$2"
upstream_checksum = ${UPSTREAM_CHECKSUM:-true}
upstream_access_key_id_file = "$3"
upstream_secret_access_key_file = "$4"
[[route.s3.client]]
access_key_id = "$5"
secret_access_key_file = "$6"
identity = "bench"
EOF
}
