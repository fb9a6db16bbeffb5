# shellcheck shell=bash disable=SC2034 # sourced; the variables are for the caller
# Fresh file systems for first-sync benchmarks (sourced by scripts/bench.sh and
# scripts/bench-ssh.sh).
#
# ext4 is 5-10x slower for every tool at creating 100,000 files in a file system that
# just had 100,000 files deleted (its inode allocator), so repeated first syncs into
# the same directory measure that rather than the tool. As root, each first sync gets
# a new loop-mounted ext4 instead (eager inode tables and journal, so that no lazy
# initialisation runs in the background during the timed run).
#
#   fresh_fs_init DIR     probes loop mounts in DIR: FRESH_FS=1 when they work, else
#                         FRESH_FS=0 and FRESH_FS_WHY says why (not root, no loop
#                         device, BENCH_FRESH_FS=0, ...)
#   fresh_fs MNT BYTES INODES
#                         MNT becomes an empty file system of BYTES (sparse image
#                         MNT.img) with INODES inodes; with FRESH_FS=0 a new empty
#                         directory. The old one at MNT is unmounted and removed.
#                         Use a subdirectory of MNT (ext4 has lost+found at its root).
#   fresh_fs_cleanup      unmounts every file system made here

FRESH_FS=0
FRESH_FS_WHY=
FRESH_FS_MOUNTS=()

fresh_fs_init() {
  local dir=$1
  if [ "${BENCH_FRESH_FS:-1}" != 1 ]; then
    FRESH_FS_WHY="BENCH_FRESH_FS=${BENCH_FRESH_FS:-}"
  elif [ "$(id -u)" != 0 ]; then
    FRESH_FS_WHY="not root"
  elif ! command -v mkfs.ext4 >/dev/null || ! command -v mountpoint >/dev/null; then
    FRESH_FS_WHY="no mkfs.ext4 or mountpoint"
  else
    mkdir -p "$dir/probe"
    if truncate -s 64M "$dir/probe.img" && mkfs.ext4 -q -F "$dir/probe.img" >"$dir/probe.log" 2>&1 &&
      mount -o loop "$dir/probe.img" "$dir/probe" >>"$dir/probe.log" 2>&1; then
      umount "$dir/probe"
      FRESH_FS=1
    else
      FRESH_FS_WHY="cannot loop-mount an ext4 image: $(tr '\n' ' ' <"$dir/probe.log")"
    fi
    rm -rf "$dir/probe" "$dir/probe.img" "$dir/probe.log"
  fi
}

fresh_fs() {
  local mnt=$1 bytes=$2 inodes=$3
  if mountpoint -q "$mnt" 2>/dev/null; then umount "$mnt"; fi
  rm -rf "$mnt" "$mnt.img"
  mkdir -p "$mnt"
  if [ "$FRESH_FS" = 1 ]; then
    truncate -s "$bytes" "$mnt.img"
    mkfs.ext4 -q -F -N "$inodes" -E lazy_itable_init=0,lazy_journal_init=0 "$mnt.img"
    mount -o loop "$mnt.img" "$mnt"
    FRESH_FS_MOUNTS+=("$mnt")
  fi
}

fresh_fs_cleanup() {
  local m
  for m in "${FRESH_FS_MOUNTS[@]}"; do
    if mountpoint -q "$m" 2>/dev/null; then umount "$m" 2>/dev/null || umount -l "$m" || true; fi
  done
  FRESH_FS_MOUNTS=()
}
