#!/usr/bin/env bash
# What the disk itself does, to read the `append` benchmarks against: the same write patterns as
# the log, with dd (and fio when it is installed), in the folder the benchmarks use:
# ${OCTOLOG_BENCH_DIR:-/tmp}.
#
#   seq-fdatasync  256 KiB writes, one fdatasync at the end: streaming bandwidth, the ceiling of
#                  append/never once the page cache is full of dirty data.
#   dsync-16KiB    an fdatasync after every 16 KiB write: the floor of append/always/16KiB.
#   dsync-256KiB   an fdatasync after every 256 KiB write: the floor of append/always/256KiB.
#
# Every file is new and grows with each write, as an active segment does (segments are never
# pre-allocated), so each sync also commits the file's new size. Files are removed on exit.
# Runs in well under a minute on a disk doing a few MB/s of synced 16 KiB writes; the fio jobs
# stop after FIO_RUNTIME_S seconds each.
set -euo pipefail
export LC_ALL=C

dir="${OCTOLOG_BENCH_DIR:-/tmp}"
# Sizes: the 1 GiB streaming write outgrows the disk's own cache; the synced ones are bounded so
# that a slow disk (~4 ms per sync) still finishes in a few seconds.
SEQ_COUNT=4096        # x 256 KiB = 1 GiB
DSYNC_16K_COUNT=1024  # x 16 KiB = 16 MiB
DSYNC_256K_COUNT=256  # x 256 KiB = 64 MiB
FIO_RUNTIME_S=10

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
                printf "dd  %-14s cannot parse dd output: %s\n", name, summary
                exit 1
            }
            printf "dd  %-14s %9.1f MB/s  %8.3f ms/write  (%s, %d MB in %.2f s)\n",
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

# Runs one fio job of sequential writes with an fdatasync after each, appending to a new file
# like the log does, and prints bandwidth and time per write.
# Usage: run_fio NAME BLOCK_SIZE
run_fio() {
    local name="$1" block_size="$2" terse
    terse="$(fio --name="$name" --directory="$work" --rw=write --bs="$block_size" \
        --fdatasync=1 --size=256m --ioengine=sync --runtime="$FIO_RUNTIME_S" \
        --fallocate=none --output-format=terse --terse-version=3)"
    rm -f -- "$work/$name".*
    # Terse v3: field 47 is KiB written, 49 write IOPS, 50 write runtime in ms.
    awk -F ';' -v name="$name" -v bs="$block_size" '
        NF >= 50 && $50 > 0 {
            printf "fio %-14s %9.1f MB/s  %8.3f ms/write  (bs=%s fdatasync=1, %d MB in %.2f s)\n",
                name, $47 * 1024 / ($50 / 1000) / 1e6, ($49 > 0 ? 1000 / $49 : 0), bs,
                $47 * 1024 / 1e6, $50 / 1000
            found = 1
        }
        END { if (!found) { print "fio " name ": cannot parse fio output"; exit 1 } }' <<<"$terse"
}

echo "fio: $(fio --version)"
run_fio fdatasync-16KiB 16k
run_fio fdatasync-256KiB 256k
