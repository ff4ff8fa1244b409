#!/usr/bin/env bash
# Partition scale (issue 5, target 5): one `octolog serve` per partition count, in its own
# process so that its memory, open files and memory maps can be read from /proc, and one
# `octolog-bench` run against it (1 producer, 1 consumer, 1 KiB records, fsync never).
#
# Usage: bash benches/partition-scale.sh [PARTITIONS...]   (default: 1 100 1000 10000)
# Env: BIN (default target/release), TOTAL_BYTES (default 1GiB), FSYNC (the broker's --fsync,
# default never), KEEP_DIR=1 keeps the data folder of each run and prints its path (for the
# start-up measurements).
# Build first: cargo build --release -p octolog-bench -p octolog-broker
set -euo pipefail

BIN=${BIN:-target/release}
TOTAL_BYTES=${TOTAL_BYTES:-1GiB}
FSYNC=${FSYNC:-never}
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(1 100 1000 10000)

# Prints "fds maps rss_kib hwm_kib anon_kib" of process $1. RSS counts the pages of the mapped
# segment files that the process touched (page cache, shared); RssAnon is its own memory.
sample() {
    local pid=$1
    local fds maps rss hwm anon
    fds=$(ls "/proc/$pid/fd" | wc -l)
    maps=$(wc -l <"/proc/$pid/maps")
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
    hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")
    anon=$(awk '/^RssAnon/ {print $2}' "/proc/$pid/status")
    echo "$fds $maps $rss $hwm $anon"
}

for p in "${counts[@]}"; do
    dir=$(mktemp -d /tmp/octolog-scale-XXXXXX)
    out=$(mktemp)
    "$BIN/octolog" serve --data-dir "$dir" --listen 127.0.0.1:0 --fsync "$FSYNC" >"$out" 2>"$out.err" &
    pid=$!
    for _ in $(seq 1 600); do
        grep -q 'listening on' "$out" && break
        sleep 0.1
    done
    addr=$(sed -n 's/^octolog listening on //p' "$out")
    [ -n "$addr" ] || { echo "broker did not start: $(cat "$out.err")" >&2; kill "$pid"; exit 1; }
    read -r fds0 maps0 rss0 _ _ < <(sample "$pid")
    # The highest descriptor and map counts seen during the run, sampled every 0.5 s.
    peak_file=$(mktemp)
    (
        fmax=0; mmax=0
        while kill -0 "$pid" 2>/dev/null; do
            read -r f m _ _ _ < <(sample "$pid") || break
            [ "$f" -gt "$fmax" ] && fmax=$f
            [ "$m" -gt "$mmax" ] && mmax=$m
            echo "$fmax $mmax" >"$peak_file"
            sleep 0.5
        done
    ) &
    sampler=$!
    set +e
    "$BIN/octolog-bench" --broker "$addr" --partitions "$p" --total-bytes "$TOTAL_BYTES" --json \
        >"$out.json" 2>"$out.bench-err"
    status=$?
    set -e
    read -r fds maps rss hwm anon < <(sample "$pid")
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    read -r fdsmax mapsmax <"$peak_file" || { fdsmax=$fds; mapsmax=$maps; }
    t0=$(date +%s.%N)
    kill -TERM "$pid"
    wait "$pid" || true
    t1=$(date +%s.%N)
    echo "partitions=$p bench_exit=$status"
    echo "  broker shutdown (SIGTERM until exit) after the run: $(echo "$t1 - $t0" | bc) s"
    echo "  broker idle before the run: fds=$fds0 maps=$maps0 rss_kib=$rss0"
    echo "  broker after the run: fds=$fds (max seen $fdsmax) maps=$maps (max seen $mapsmax) rss_kib=$rss peak_rss_kib=$hwm rss_anon_kib=$anon"
    if [ "$status" -eq 0 ]; then
        echo "  bench: $(cat "$out.json")"
    else
        echo "  bench failed: $(tail -3 "$out.bench-err")"
    fi
    grep -iE 'error|warn' "$out.err" | head -5 | sed 's/^/  broker log: /' || true
    if [ "${KEEP_DIR:-0}" = 1 ]; then
        echo "  data dir kept: $dir"
    else
        rm -rf "$dir"
    fi
    rm -f "$out" "$out.err" "$out.json" "$out.bench-err" "$peak_file"
done
