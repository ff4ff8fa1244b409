#!/usr/bin/env bash
# Issue 5, targets 2 and 3: one `octolog-bench` run between two measurements of what the disk
# itself does with the same kind of writes, and the ratios.
#
#   durable    fio: sequential writes of 256 KiB with an fdatasync after each, into a new file,
#              TOTAL_BYTES once (default 2GiB), before and after
#              `octolog-bench --fsync always --producers 4 --total-bytes TOTAL_BYTES`.
#              The file is new and written once because that is what a log does: every append
#              goes to new blocks. (A time-based fio run over a small file, which earlier
#              sessions used, rewrites blocks already allocated and pages already cached after
#              its first pass: on this machine that read ~1,000 MB/s where new blocks take
#              440-500 MB/s.)
#   sustained  dd: 8 GiB of 1 MiB writes to a new file and one fdatasync at the end
#              (conv=fdatasync), before and after
#              `octolog-bench --fsync interval-ms=1000 --total-bytes TOTAL_BYTES` (default 20GiB).
#
# Usage: bash benches/against-disk.sh durable|sustained [more octolog-bench flags...]
#   e.g. bash benches/against-disk.sh durable --replay
# The script sets --fsync, --total-bytes, --json (and --producers for durable): do not repeat
# them.
# Env: BIN (default target/release); DIR, the folder of the disk measurements and of the
# bench's own broker (default ${TMPDIR:-/tmp}); TOTAL_BYTES.
# Build first: cargo build --release -p octolog-bench
# Run on a quiet machine: on ext4 every fdatasync waits for whatever else is queued in the journal.
set -euo pipefail
export LC_ALL=C

mode="${1:-}"
[ $# -gt 0 ] && shift
BIN=${BIN:-target/release}
DIR=${DIR:-${TMPDIR:-/tmp}}
case "$mode" in
durable)
    TOTAL_BYTES=${TOTAL_BYTES:-2GiB}
    bench_flags=(--fsync always --producers 4 --total-bytes "$TOTAL_BYTES")
    ;;
sustained)
    TOTAL_BYTES=${TOTAL_BYTES:-20GiB}
    bench_flags=(--fsync interval-ms=1000 --total-bytes "$TOTAL_BYTES")
    ;;
*)
    echo "usage: bash benches/against-disk.sh durable|sustained [octolog-bench flags...]" >&2
    exit 2
    ;;
esac
[ -x "$BIN/octolog-bench" ] || {
    echo "against-disk: no $BIN/octolog-bench (cargo build --release -p octolog-bench)" >&2
    exit 1
}
[ -d "$DIR" ] || {
    echo "against-disk: $DIR is not a folder" >&2
    exit 1
}
if [ "$(stat -f -c %T "$DIR")" = tmpfs ]; then
    echo "against-disk: $DIR is on tmpfs (memory, not a disk): set DIR to a folder on the disk" >&2
    exit 1
fi
if [ "$mode" = durable ] && ! command -v fio >/dev/null 2>&1; then
    echo "against-disk: durable needs fio (apt-get install fio)" >&2
    exit 1
fi
work="$(mktemp -d "$DIR/octolog-against-disk.XXXXXX")"
trap 'rm -rf -- "$work"' EXIT

# fio's size suffixes are binary (2g = 2 GiB), as the bench's GiB; MB and GB are decimal.
fio_size() {
    case "$1" in
    *GiB) echo "${1%GiB}g" ;;
    *MiB) echo "${1%MiB}m" ;;
    *) echo "octolog-bench size $1: use MiB or GiB here" >&2; exit 2 ;;
    esac
}

# Prints the disk's MB/s (10^6 bytes per second) for the mode.
disk() {
    local file="$work/disk"
    rm -f -- "$file"*
    if [ "$mode" = durable ]; then
        # Terse v3: field 47 is KiB written, field 50 the write time in ms.
        fio --name=disk --filename="$file" --rw=write --bs=256k --ioengine=psync --fdatasync=1 \
            --size="$(fio_size "$TOTAL_BYTES")" --output-format=terse --terse-version=3 |
            awk -F ';' 'NF >= 50 && $50 > 0 { printf "%.1f\n", $47 * 1024 / ($50 / 1000) / 1e6 }'
    else
        # GNU dd: "8589934592 bytes (8.6 GB, 8.0 GiB) copied, 17.1 s, 502 MB/s".
        dd if=/dev/zero of="$file" bs=1M count=8192 conv=fdatasync 2>&1 | tail -n 1 |
            awk -F ', ' '{ split($1, b, " "); s = $(NF - 1); sub(/ s$/, "", s);
                           if (s > 0) printf "%.1f\n", b[1] / s / 1e6 }'
    fi
    rm -f -- "$file"*
}

if [ "$mode" = durable ]; then
    fio_size "$TOTAL_BYTES" >/dev/null
    what="fio 256 KiB writes + fdatasync each, new file, $TOTAL_BYTES"
else
    what="dd 8 GiB bs=1M conv=fdatasync, new file"
fi
before="$(disk)"
[ -n "$before" ] || { echo "against-disk: cannot read the disk measurement" >&2; exit 1; }
echo "disk before: $before MB/s ($what)"
json="$(TMPDIR="$DIR" "$BIN/octolog-bench" "${bench_flags[@]}" "$@" --json)"
produce="$(sed -n 's/.*"produce_mb_s":\([0-9.]*\).*/\1/p' <<<"$json")"
consume="$(sed -n 's/.*"consume_mb_s":\([0-9.]*\).*/\1/p' <<<"$json")"
[ -n "$produce" ] || { echo "against-disk: no produce_mb_s in: $json" >&2; exit 1; }
echo "octolog-bench ${bench_flags[*]} $*: produce $produce MB/s, consume $consume MB/s"
after="$(disk)"
[ -n "$after" ] || { echo "against-disk: cannot read the disk measurement" >&2; exit 1; }
echo "disk after: $after MB/s"
awk -v p="$produce" -v b="$before" -v a="$after" 'BEGIN {
    printf "produce / disk: %.0f%% of before, %.0f%% of after, %.0f%% of their mean\n",
        100 * p / b, 100 * p / a, 200 * p / (a + b) }'
echo "json: $json"
