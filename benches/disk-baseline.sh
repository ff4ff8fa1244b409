#!/usr/bin/env bash
# What the machine itself does, to read the storage `append` benchmarks against: the same write
# sizes as the log's appends, in the same regime, with fio (and dd), in the folder the benchmarks
# use: ${OCTOLOG_BENCH_DIR:-/tmp}.
#
#   pagecache-16KiB    1 GiB of 15,556-byte writes to a new file, no sync: the page cache's own
#   pagecache-256KiB   speed for `append/never/16KiB` and `/256KiB` (their batches are exactly
#                      15,556 and 261,788 bytes, which the benchmark prints; the writes are not
#                      page-aligned, as a log's appends are not, which costs the kernel
#                      partial-page work that 16 KiB-aligned writes do not pay).
#   fdatasync-16KiB    writes of 15,556 / 261,788 bytes to a growing file with an fdatasync after
#   fdatasync-256KiB   each, sustained for FIO_SUSTAINED_S seconds: `append/always` writes for as
#                      long (criterion's 2 s warm-up + 10 s measurement), and this disk slows
#                      down after its first few hundred MB of synced writes, so a short burst
#                      would overstate it.
#   seq-fdatasync      dd, 1 GiB of 256 KiB writes, one fdatasync at the end: streaming bandwidth.
#   dsync-16KiB        dd, 16 MiB / 64 MiB of 16 KiB / 256 KiB writes with oflag=dsync: the short
#   dsync-256KiB       burst, for reference only.
#
# Every file is new. The plain cases grow it with each write, so each sync also commits the
# file's new size; the `-fa` cases write into blocks fallocate reserved first (fio
# --fallocate=native), as the storage engine now does for an active segment: compare appends
# with the faster of the two. Files are removed on exit.
# fio is needed for the first four cases (apt-get install fio); without it only the dd ones run.
set -euo pipefail
export LC_ALL=C

dir="${OCTOLOG_BENCH_DIR:-/tmp}"
# Sizes: the 1 GiB streaming write outgrows the disk's own cache; the synced ones are bounded so
# that a slow disk (~4 ms per sync) still finishes in a few seconds.
SEQ_COUNT=4096        # x 256 KiB = 1 GiB
DSYNC_16K_COUNT=1024  # x 16 KiB = 16 MiB
DSYNC_256K_COUNT=256  # x 256 KiB = 64 MiB
SMALL_BATCH_BYTES=15556   # append/*/16KiB: one batch of 15 records of 1 KiB
LARGE_BATCH_BYTES=261788  # append/*/256KiB: one batch of 253 records of 1 KiB
PAGECACHE_SIZE=1g         # as much as an append/never log holds before it is replaced
FIO_SUSTAINED_S=12        # criterion's warm-up (2 s) + measurement (10 s) of append/always
FIO_SUSTAINED_SIZE=16g    # a bound the sustained runs do not reach on this disk

if [[ ! -d "$dir" ]]; then
    echo "disk-baseline: $dir is not a folder (set OCTOLOG_BENCH_DIR to an existing one)" >&2
    exit 1
fi
work="$(mktemp -d "$dir/octolog-disk-baseline.XXXXXX")"
trap 'rm -rf -- "$work"' EXIT

echo "folder: $dir (file system: $(stat -f -c %T "$dir"), device: $(df --output=source "$dir" | tail -n 1))"

# Runs dd with the given arguments writing a new file, and prints bandwidth and, for synced
# writes, the time per write.
# Usage: run_dd NAME COUNT DESCRIPTION dd-args...
run_dd() {
    local name="$1" count="$2" description="$3"
    shift 3
    local file="$work/$name" summary
    rm -f -- "$file"
    summary="$(dd if=/dev/zero of="$file" "$@" count="$count" 2>&1 | tail -n 1)"
    rm -f -- "$file"
    # GNU dd: "16777216 bytes (17 MB, 16 MiB) copied, 4.02 s, 4.2 MB/s".
    awk -v name="$name" -v count="$count" -v description="$description" -v summary="$summary" '
        BEGIN {
            n = split(summary, parts, ", ")
            split(parts[1], first, " ")
            bytes = first[1]
            seconds = parts[n - 1]
            sub(/ s$/, "", seconds)
            if (n < 4 || bytes <= 0 || seconds <= 0) {
                printf "dd  %-16s cannot parse dd output: %s\n", name, summary
                exit 1
            }
            printf "dd  %-16s %9.1f MB/s  %8.3f ms/write  (%s, %d MB in %.2f s)\n",
                name, bytes / seconds / 1e6, seconds * 1000 / count, description,
                bytes / 1e6, seconds
        }'
}

run_dd seq-fdatasync "$SEQ_COUNT" "bs=256k, one fdatasync at the end" bs=256k conv=fdatasync
run_dd dsync-16KiB "$DSYNC_16K_COUNT" "bs=16k oflag=dsync" bs=16k oflag=dsync
run_dd dsync-256KiB "$DSYNC_256K_COUNT" "bs=256k oflag=dsync" bs=256k oflag=dsync

if ! command -v fio >/dev/null 2>&1; then
    echo "fio: absent (apt-get install fio for the fio cross-check)"
    exit 0
fi

# Runs one fio job of sequential writes to a new file and prints bandwidth and time per write.
# Usage: run_fio NAME BLOCK_SIZE DESCRIPTION fio-args...
run_fio() {
    local name="$1" block_size="$2" description="$3" terse
    shift 3
    terse="$(fio --name="$name" --directory="$work" --rw=write --bs="$block_size" \
        --ioengine=psync --fallocate=none --output-format=terse --terse-version=3 "$@")"
    rm -f -- "$work/$name".*
    # Terse v3: field 47 is KiB written, 49 write IOPS, 50 write runtime in ms.
    awk -F ';' -v name="$name" -v description="$description" '
        NF >= 50 && $50 > 0 {
            printf "fio %-16s %9.1f MB/s  %8.3f ms/write  (%s, %d MB in %.2f s)\n",
                name, $47 * 1024 / ($50 / 1000) / 1e6, ($49 > 0 ? 1000 / $49 : 0),
                description, $47 * 1024 / 1e6, $50 / 1000
            found = 1
        }
        END { if (!found) { print "fio " name ": cannot parse fio output"; exit 1 } }' <<<"$terse"
}

echo "fio: $(fio --version)"
run_fio pagecache-16KiB "$SMALL_BATCH_BYTES" "bs=$SMALL_BATCH_BYTES, no sync" --size="$PAGECACHE_SIZE"
run_fio pagecache-256KiB "$LARGE_BATCH_BYTES" "bs=$LARGE_BATCH_BYTES, no sync" --size="$PAGECACHE_SIZE"
# The same into a file whose blocks fallocate reserved first, as an active segment's are.
run_fio pagecache-16KiB-fa "$SMALL_BATCH_BYTES" "bs=$SMALL_BATCH_BYTES, no sync, fallocated" \
    --size="$PAGECACHE_SIZE" --fallocate=native
run_fio pagecache-256KiB-fa "$LARGE_BATCH_BYTES" "bs=$LARGE_BATCH_BYTES, no sync, fallocated" \
    --size="$PAGECACHE_SIZE" --fallocate=native
sync
run_fio fdatasync-16KiB "$SMALL_BATCH_BYTES" "bs=$SMALL_BATCH_BYTES fdatasync=1, ${FIO_SUSTAINED_S} s" \
    --fdatasync=1 --size="$FIO_SUSTAINED_SIZE" --time_based --runtime="$FIO_SUSTAINED_S"
run_fio fdatasync-256KiB "$LARGE_BATCH_BYTES" "bs=$LARGE_BATCH_BYTES fdatasync=1, ${FIO_SUSTAINED_S} s" \
    --fdatasync=1 --size="$FIO_SUSTAINED_SIZE" --time_based --runtime="$FIO_SUSTAINED_S"
run_fio fdatasync-16KiB-fa "$SMALL_BATCH_BYTES" "bs=$SMALL_BATCH_BYTES fdatasync=1, fallocated, ${FIO_SUSTAINED_S} s" \
    --fdatasync=1 --size=4g --fallocate=native --time_based --runtime="$FIO_SUSTAINED_S"
run_fio fdatasync-256KiB-fa "$LARGE_BATCH_BYTES" "bs=$LARGE_BATCH_BYTES fdatasync=1, fallocated, ${FIO_SUSTAINED_S} s" \
    --fdatasync=1 --size=4g --fallocate=native --time_based --runtime="$FIO_SUSTAINED_S"
