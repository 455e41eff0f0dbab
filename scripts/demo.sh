#!/usr/bin/env bash
# The two-process check of the README, scripted: one `xcp serve`, then `xcp ping` and
# `xcp send` against it as separate processes, over TCP and a Unix socket, with the Cap'n Proto
# header and the JSON header form (SPEC §2.2), with JSON and Protobuf bodies.
#
# Usage: bash scripts/demo.sh
# It builds the release binary once, prints what happens at each step, stops the servers, and
# exits non-zero when any step failed. Needs only the Rust toolchain.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

echo "== building: cargo build --release --bin xcp"
cargo build --release --bin xcp
xcp="${CARGO_TARGET_DIR:-$repo/target}/release/xcp"
[[ -x "$xcp" ]] || { echo "demo: no binary at $xcp" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/xcp-demo.XXXXXX")"
server_pids=()
cleanup() {
    local pid
    for pid in ${server_pids[@]+"${server_pids[@]}"}; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

failures=0
steps=0

# start_server NAME LISTEN-URL: starts `xcp serve` in the background and sets $url to the URL
# from its first stdout line and $pid to its process id.
start_server() {
    local name=$1 listen=$2 line="" i
    "$xcp" serve --listen "$listen" >"$work/$name.out" 2>"$work/$name.log" &
    pid=$!
    server_pids+=("$pid")
    for ((i = 0; i < 200; i++)); do
        line="$(head -n 1 "$work/$name.out" 2>/dev/null || true)"
        [[ -n "$line" ]] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    if [[ "$line" != "listening on "* ]]; then
        echo "demo: xcp serve --listen $listen did not announce its address" >&2
        cat "$work/$name.log" >&2
        exit 1
    fi
    url="${line#listening on }"
    echo "== server $name: $line (pid $pid)"
}

# step DESCRIPTION EXPECTED-STDOUT-PATTERN -- COMMAND...: runs one client command, shows its
# output, and counts it as failed on a non-zero exit or when stdout lacks the pattern.
step() {
    local what=$1 expect=$2
    shift 3
    steps=$((steps + 1))
    echo
    echo "-- step $steps: $what"
    local cmdline="xcp $*"
    if [[ ${#cmdline} -gt 160 ]]; then
        cmdline="${cmdline:0:150} ... (${#cmdline} chars)"
    fi
    echo "   \$ $cmdline"
    local out rc=0
    out="$("$xcp" "$@" 2>"$work/step.err")" || rc=$?
    # Long lines (the chunked step's reply) are cut for display.
    cut -c 1-160 <<<"$out" | sed 's/^/   | /'
    if [[ -s "$work/step.err" ]]; then
        sed 's/^/   ! /' "$work/step.err"
    fi
    if [[ $rc -ne 0 ]]; then
        echo "   FAILED (exit $rc)"
        failures=$((failures + 1))
    elif ! grep -q -F -- "$expect" <<<"$out"; then
        echo "   FAILED (stdout lacks: ${expect:0:80})"
        failures=$((failures + 1))
    else
        echo "   ok"
    fi
}

# stop_server NAME PID: SIGTERM, then expects a clean exit 0 within 10 s.
stop_server() {
    local name=$1 pid=$2 i rc=0
    kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    steps=$((steps + 1))
    echo
    echo "-- step $steps: stop server $name with SIGTERM"
    wait "$pid" || rc=$?
    echo "   its log (stderr):"
    sed 's/^/   | /' "$work/$name.log"
    if [[ $rc -ne 0 ]]; then
        echo "   FAILED (server exit $rc)"
        failures=$((failures + 1))
    else
        echo "   ok (exit 0)"
    fi
}

hello='"text": "hello"'
ether='{"kind":"embedding","schema_version":1,"payload":{"values":[0.25,0.5],"dim":2},"metadata":{"trace_id":"demo-1"}}'

start_server tcp "tcp://127.0.0.1:0"
tcp_url=$url tcp_pid=$pid
start_server unix "unix://$work/xcp.sock"
unix_url=$url unix_pid=$pid

for u in "$tcp_url" "$unix_url"; do
    for form in capnp json; do
        flags=()
        [[ $form == json ]] && flags=(--json-header)
        step "ping $u ($form header)" "5 received, 0.0% loss" -- \
            ping "$u" --count 5 --interval 0 ${flags[@]+"${flags[@]}"}
        step "send text, JSON body, $form header" "$hello" -- \
            send "$u" --text hello ${flags[@]+"${flags[@]}"}
        step "send text, Protobuf body, $form header" "$hello" -- \
            send "$u" --text hello --codec protobuf ${flags[@]+"${flags[@]}"}
    done
done
printf '%s\n' "$ether" >"$work/embedding.json"
step "send an embedding Ether read from a file, on channel 3" '"trace_id": "demo-1"' -- \
    send "$tcp_url" --ether "$work/embedding.json" --channel 3
# A single argument may be at most 128 KiB on Linux; 100 000 bytes fit.
big="$(head -c 100000 /dev/zero | tr '\0' 'x')"
step "send a 100 KB text, chunked in 16 KiB frames both ways" "\"text\": \"$big\"" -- \
    send "$tcp_url" --text "$big" --max-frame-bytes 16KiB

stop_server tcp "$tcp_pid"
stop_server unix "$unix_pid"
server_pids=()
if [[ -e "$work/xcp.sock" ]]; then
    echo "FAILED: the Unix socket file was left behind"
    failures=$((failures + 1))
fi

echo
if [[ $failures -ne 0 ]]; then
    echo "demo: $failures of $steps steps FAILED"
    exit 1
fi
echo "demo: all $steps steps passed"
