#!/usr/bin/env bash
# Start-up and shutdown times of `octolog serve` on an existing data folder (issue 5, target 5):
# start after a clean shutdown, the clean shutdown itself (SIGTERM until exit), and start after
# `kill -9`. Times run from launching the process until it prints its `listening` line.
#
# Usage: bash benches/startup-time.sh DATA_DIR [ROUNDS]   (ROUNDS default 2)
# Env: BIN (default target/release).
set -euo pipefail

BIN=${BIN:-target/release}
dir=$1
rounds=${2:-2}
out=$(mktemp)

now() { date +%s.%N; }

# Starts the broker on $dir; sets $pid, and $secs to the seconds until it listened.
start() {
    : >"$out"
    local t0 t1
    t0=$(now)
    "$BIN/octolog" serve --data-dir "$dir" --listen 127.0.0.1:0 --fsync never >"$out" 2>"$out.err" &
    pid=$!
    until grep -q 'listening on' "$out"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "broker exited: $(tail -3 "$out.err")" >&2
            exit 1
        fi
        sleep 0.01
    done
    t1=$(now)
    secs=$(echo "$t1 - $t0" | bc)
}

# Stops the broker with SIGTERM; sets $secs to the seconds until it exited.
stop() {
    local t0 t1
    t0=$(now)
    kill -TERM "$pid"
    wait "$pid" || true
    t1=$(now)
    secs=$(echo "$t1 - $t0" | bc)
}

# The first start may find the folder after a crash or a clean stop: make it clean first.
start
echo "first start (state as found): $secs s"
sleep 1
echo "  idle broker: fds=$(ls "/proc/$pid/fd" | wc -l) maps=$(wc -l <"/proc/$pid/maps")" \
    "$(grep -E '^(VmRSS|RssAnon)' "/proc/$pid/status" | tr -s ' \t' ' ' | tr '\n' ' ')"
stop
echo "clean shutdown: $secs s"
for round in $(seq 1 "$rounds"); do
    start
    echo "round $round: start after clean shutdown: $secs s"
    sleep 1
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
    start
    echo "round $round: start after kill -9: $secs s"
    stop
    echo "round $round: clean shutdown: $secs s"
done
rm -f "$out" "$out.err"
