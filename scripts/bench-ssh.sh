#!/usr/bin/env bash
# hubsync benchmark over SSH: the SSH part of scripts/bench.sh (which runs it after the
# local part and is the entry point; run alone, it needs HUBSYNC).
#
# Usage: HUBSYNC=/abs/target/release/hubsync scripts/bench-ssh.sh [--short] [--keep]
#
# A private sshd on 127.0.0.1 (scripts/lib/sshd.sh) serves every peer. On one
# DokuWiki-shaped tree (gen-tree.py), each tool has its own hub and peer:
#   h2      hubsync, built-in SSH (libssh2)
#   ho      hubsync --ssh-command "ssh ..." (OpenSSH), a new connection per run
#   hc      the same with ControlMaster=auto, ControlPersist (ControlPath in a temp
#           dir); one warm-up connection opens the master before the runs
#   unison  unison -batch -times -fastcheck true -prefer newer over ssh (-sshargs, -servercmd)
#   rsync   rsync -a -e "ssh ..."
#   h2x4    hubsync/libssh2, one hub and 4 peers (all on the same sshd)
#   find    `find` on the hub in parallel with `find` on the peer through the
#           ControlMaster: the floor of a no-change run without connecting
#   findssh the same over a new SSH connection: the floor as issue 3 defines it
# The remote side of hubsync is `$HUBSYNC serve` (--remote-command). Every ssh uses
# -F /dev/null and the defaults (cipher, no compression) of its client.
#
# Phases:
#   first     first sync into an empty peer; as root each run gets a fresh ext4 (a
#             loop-mounted image, mkfs.ext4 with eager inode tables) so that no tool
#             writes into a file system that just had 100k files deleted; hubsync's
#             hub keeps its scan cache (primed before), only .hubsync/pairs is
#             removed. `sync -f PEER` after each run is timed separately (+syncfs):
#             hubsync makes received data durable itself, rsync and unison do not.
#             No warm-up (the hub trees are in the page cache already). The 4-peer
#             hub's first sync runs once.
#   nochange  nothing to do; 1 warm-up, then the timed runs; then one --json run per
#             hubsync variant for the wire bytes per peer and direction
#   small     after 5 page edits and 1 image upload (gen-tree.py edit) applied to
#             every hub; 1 warm-up, timed runs, then one --json run per variant
#   both      5 page edits and 1 upload on the hub, 5 others and 1 upload on the peer a
#             second later; 1 warm-up, timed runs (rsync: -au there, then -au back)
#   big       one file of random bytes (BENCH_BIG_MB) on a tmpfs (as root) synced up
#             (hub -> empty peer) and down (peer -> empty hub) with h2 and ho, next
#             to rsync -e ssh (up) and a plain `ssh cat` pipe (the OpenSSH ceiling)
# Tools are interleaved and their order rotates from one trial to the next. `sync` is
# run (untimed) before every measured run. Every peer is compared with its hub after
# every run of the first and small phases (names, sizes, mtimes, modes; content with
# cmp for the edited files, diff -r at the end of each phase), after each nochange
# trial, and every big file is compared after its runs.
#
# Environment (as for bench.sh): BENCH_FILES (100000; --short 5000), BENCH_REPS
# (timed trials, 5; --short 1), BENCH_SEED, BENCH_DIR (/tmp), BENCH_TIMEOUT (600 s
# per run), BENCH_SSH_OUT (results; default $BENCH_OUT/ssh or /tmp/hubsync-bench/ssh),
# BENCH_BIG_MB (1024; --short 128), BENCH_FRESH_FS (1: fresh ext4 per first sync when
# root; 0: plain new directories), BENCH_SSH_RC (0: sshd gets SetEnv SHLVL=1 after the
# first timed `ssh true`, so that bash skips ~/.bashrc in the sessions; 1: keep it).
#
# Exit status: 0 when every run exited 0 and every peer matched its hub; 1 otherwise;
# 2 usage or set-up errors. Timings never fail the run.

set -euo pipefail

die() { echo "bench-ssh.sh: error: $*" >&2; exit 2; }
note() { echo "bench-ssh.sh: $*" >&2; }

SHORT=${BENCH_SHORT:-0}
KEEP=${BENCH_KEEP:-0}
while [[ $# -gt 0 ]]; do
    case $1 in
        --short) SHORT=1 ;;
        --keep) KEEP=1 ;;
        -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
if [[ $SHORT == 1 ]]; then def_files=5000 def_reps=1 def_big=128; else def_files=100000 def_reps=5 def_big=1024; fi
FILES=${BENCH_FILES:-$def_files}
REPS=${BENCH_REPS:-$def_reps}
BIG_MB=${BENCH_BIG_MB:-$def_big}
SEED=${BENCH_SEED:-42}
TIMEOUT=${BENCH_TIMEOUT:-600}
BENCH_DIR=${BENCH_DIR:-/tmp}
OUT=${BENCH_SSH_OUT:-${BENCH_OUT:-/tmp/hubsync-bench}/ssh}
FRESH_FS=${BENCH_FRESH_FS:-1}
[[ $FILES =~ ^[0-9]+$ && $FILES -ge 100 ]] || die "BENCH_FILES must be a number >= 100"
[[ $REPS =~ ^[0-9]+$ && $REPS -ge 1 ]] || die "BENCH_REPS must be a number >= 1"
[[ $BIG_MB =~ ^[0-9]+$ && $BIG_MB -ge 1 ]] || die "BENCH_BIG_MB must be a number >= 1"
[[ $SEED =~ ^[0-9]+$ ]] || die "BENCH_SEED must be a number"
[[ $TIMEOUT =~ ^[0-9]+$ && $TIMEOUT -ge 1 ]] || die "BENCH_TIMEOUT must be a number of seconds"

SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GEN=$SCRIPTS/gen-tree.py
LIB=$SCRIPTS/lib
# shellcheck source=/dev/null # scripts/lib/sshd.sh
source "$LIB/sshd.sh"
# shellcheck source=/dev/null # scripts/lib/fresh-fs.sh
source "$LIB/fresh-fs.sh"

# ---- tools -------------------------------------------------------------------------
missing=()
for t in python3 unison rsync ssh ssh-keygen find cmp diff cp df sync sort awk head; do
    command -v "$t" >/dev/null || missing+=("$t")
done
[[ -x /usr/sbin/sshd ]] || missing+=("/usr/sbin/sshd (openssh-server)")
[[ -x /usr/bin/time ]] && /usr/bin/time -f %M true >/dev/null 2>&1 || missing+=("/usr/bin/time (GNU time)")
if [[ ${#missing[@]} -gt 0 ]]; then
    die "missing: ${missing[*]} (Debian: apt-get install -y openssh-server openssh-client time unison rsync python3)"
fi
[[ -n ${HUBSYNC:-} && -x ${HUBSYNC:-} ]] || die "set HUBSYNC to the hubsync binary (scripts/bench.sh does)"
HUBSYNC=$(cd "$(dirname "$HUBSYNC")" && pwd)/$(basename "$HUBSYNC")
"$HUBSYNC" --version >/dev/null 2>&1 || die "$HUBSYNC --version failed"
UNISON_BIN=$(command -v unison)
RSYNC_BIN=$(command -v rsync)
FIND_BIN=$(command -v find)

# ---- work directory ----------------------------------------------------------------
mkdir -p "$BENCH_DIR" "$OUT" || die "cannot create $BENCH_DIR or $OUT"
# 6 hubs, 5 peers and 4 more for the 4-peer hub (each ~7 KB per file on disk), the old
# loop image of a first sync while the new one fills, and the big file (3 copies,
# unless on tmpfs).
need=$((FILES * 120 * 1024 + BIG_MB * 3 * 1024 * 1024 + 512 * 1024 * 1024))
avail=$(df -P -B1 "$BENCH_DIR" | awk 'NR == 2 { print $4 }')
if [[ $avail -lt $need ]]; then
    die "$BENCH_DIR has $((avail >> 20)) MiB free; $FILES files need about $((need >> 20)) MiB (set BENCH_DIR)"
fi
W=$(mktemp -d "$BENCH_DIR/hubsync-bench-ssh.XXXXXX")
# hubsync's --ssh-command is split at whitespace.
[[ $W != *[[:space:]]* ]] || { rmdir "$W"; die "BENCH_DIR must not contain whitespace"; }
CMDIR=$(mktemp -d /tmp/hubsync-cm.XXXXXX) # short: ControlPath is a unix socket path
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    local rc=$?
    if declare -F cm_stop >/dev/null; then cm_stop; fi
    sshd_stop
    fresh_fs_cleanup
    rm -rf -- "$CMDIR"
    if [[ $KEEP == 1 ]]; then
        note "kept $W"
    else
        rm -rf -- "$W"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$W/logs" "$W/edits" "$W/fs"
rm -rf "${OUT:?}"/runs.tsv "$OUT"/hubsync-*.json "$OUT"/summary.md "$OUT"/results.json \
    "$OUT"/verify.txt "$OUT"/failed-*.log
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date +%s)

fresh_fs_init "$W/fs"
[[ $FRESH_FS == 1 ]] || note "first syncs go into new directories on $BENCH_DIR, not fresh file systems: $FRESH_FS_WHY"

# ---- measurement -------------------------------------------------------------------
TSV=$OUT/runs.tsv
printf 'phase\ttool\trep\tkind\twall_s\ttime_e\tmaxrss_kb\texit\tmain_hwm_kb\tchild_hwm_kb\tprocs\tremote_hwm_kb\tremote_procs\n' >"$TSV"
FAILED=0

# measure PHASE TOOL REP KIND STDOUT CMD...
measure() {
    local phase=$1 tool=$2 rep=$3 kind=$4 out=$5
    shift 5
    local log=$W/logs/$phase-$tool-$rep.log rc=0
    sync
    MEASURE_REMOTE_PID=$SSHD_PID python3 "$LIB/measure.py" "$phase" "$tool" "$rep" "$kind" "$out" "$TSV" "$log" "$TIMEOUT" -- "$@" || rc=$?
    if [[ $rc -ne 0 ]]; then
        FAILED=1
        note "WARNING: $phase/$tool/$rep exited $rc: $*"
        sed 's/^/    | /' "$log" | tail -n 20 >&2
        cp "$log" "$OUT/failed-$phase-$tool-$rep.log"
    fi
}

# rotated REP WORD...: the words rotated by REP (so no tool always runs first).
rotated() {
    local k=$1
    shift
    local a=("$@") n=$#
    for ((i = 0; i < n; i++)); do printf '%s ' "${a[$(((i + k) % n))]}"; done
}

# listing DIR: what a peer must match (type, path, size, mtime, mode; directories by
# name only), without hubsync's state directory.
listing() {
    (cd "$1" && find . -path ./.hubsync -prune -o \( -type d -printf 'd %P\n' \) \
        -o -printf '%y %P %s %T@ %m\n' | LC_ALL=C sort)
}

# check PHASE TOOL HUB PEER [content|FILELIST]: the peer against its hub (listing; all
# content with diff -r, or the files named in FILELIST with cmp).
check() {
    local phase=$1 tool=$2 hub=$3 peer=$4 what=${5:-} res=ok n tol=0 f
    [[ $tool == unison ]] && tol=2000
    listing "$hub" >"$W/logs/list-hub"
    listing "$peer" >"$W/logs/list-peer"
    if ! cmp -s "$W/logs/list-hub" "$W/logs/list-peer"; then
        n=$(python3 "$LIB/same.py" "$W/logs/list-hub" "$W/logs/list-peer" $tol)
        [[ $n -eq 0 ]] || res="$n entries differ (name/size/mtime/mode)"
    fi
    if [[ $what == content ]]; then
        if ! diff -rq --exclude=.hubsync "$hub" "$peer" >"$W/logs/diff" 2>&1; then
            res="$res; content differs in $(wc -l <"$W/logs/diff") paths"
        fi
    elif [[ -n $what ]]; then
        n=0
        while IFS= read -r f; do
            cmp -s "$hub/$f" "$peer/$f" || n=$((n + 1))
        done <"$what"
        [[ $n -eq 0 ]] || res="$res; content of $n edited files differs"
    fi
    printf '%s\t%s\t%s\n' "$phase" "$tool" "$res" >>"$OUT/verify.txt"
    if [[ $res != ok ]]; then
        FAILED=1
        note "WARNING: after $phase, $tool's peer $peer does not match its hub: $res"
    fi
}

# ---- sshd and the clients ----------------------------------------------------------
sshd_start "$W/sshd" || die "cannot start sshd (as root, /run/sshd must exist)"
TARGET=$SSH_USER@127.0.0.1
SSH_OPTS="-F /dev/null -i $SSH_KEY -o IdentitiesOnly=yes -o UserKnownHostsFile=$SSH_KNOWN_HOSTS -o StrictHostKeyChecking=yes -o BatchMode=yes"
CM_OPTS="-o ControlMaster=auto -o ControlPath=$CMDIR/%C -o ControlPersist=3600"
read -ra SSH_ARGV <<<"ssh $SSH_OPTS -p $SSH_PORT"
read -ra CM_ARGV <<<"ssh $SSH_OPTS $CM_OPTS -p $SSH_PORT"
# shellcheck disable=SC2317 # called by cleanup
cm_stop() { "${CM_ARGV[@]}" -O exit "$TARGET" >/dev/null 2>&1 || true; }
# cm_up: the ControlMaster runs (the warm-up connection opens it).
cm_up() {
    "${CM_ARGV[@]}" -O check "$TARGET" >/dev/null 2>&1 && return 0
    "${CM_ARGV[@]}" "$TARGET" true || die "cannot open the ControlMaster connection"
}
"${SSH_ARGV[@]}" "$TARGET" true || die "ssh to the private sshd fails"
# What an SSH session costs before the tool starts. The login shell's rc files run
# first in every session (Debian's bash sources ~/.bashrc for commands run by sshd;
# root's on a development machine may run `pyenv init` and the like); they are timed,
# then turned off unless BENCH_SSH_RC=1, so that the figures are the tools' own:
# sshd's SetEnv SHLVL=1 makes bash skip ~/.bashrc (it reads it only at shell level 1).
for ((i = 1; i <= 3; i++)); do measure conn ssh-rc "$i" timed /dev/null "${SSH_ARGV[@]}" "$TARGET" true; done
RC=${BENCH_SSH_RC:-0}
if [[ $RC != 1 ]]; then
    echo "SetEnv SHLVL=1" >>"$W/sshd/sshd_config"
    kill -HUP "$SSHD_PID" # sshd executes itself again and rereads its config
    ok=0
    for ((i = 0; i < 100; i++)); do
        sleep 0.1
        # shellcheck disable=SC2016 # for the remote shell
        if [[ $("${SSH_ARGV[@]}" "$TARGET" 'echo $SHLVL' 2>/dev/null) == 2 ]]; then ok=1; break; fi
    done
    [[ $ok == 1 ]] || die "sshd did not come back with SetEnv SHLVL=1 after SIGHUP (see $W/sshd/sshd.log)"
fi
cm_up
for ((i = 1; i <= 3; i++)); do
    measure conn ssh "$i" timed /dev/null "${SSH_ARGV[@]}" "$TARGET" true
    measure conn ssh-cm "$i" timed /dev/null "${CM_ARGV[@]}" "$TARGET" true
done
url() { echo "ssh://$SSH_USER@127.0.0.1:$SSH_PORT$1"; }
export UNISON=$W/unison-local
UNISON_REMOTE=$W/unison-remote
mkdir -p "$UNISON" "$UNISON_REMOTE"

declare -A PEER
HUBSYNC_TOOLS=(h2 ho hc)

# hs TOOL PHASE REP KIND NAME HUB PEER_URL...: one hubsync run (NAME as recorded).
hs() {
    local tool=$1 phase=$2 rep=$3 kind=$4 name=$5 hub=$6
    shift 6
    local a=(--remote-command "$HUBSYNC")
    case $tool in
        h2) a+=(--identity "$SSH_KEY" --known-hosts "$SSH_KNOWN_HOSTS") ;;
        ho) a+=(--ssh-command "ssh $SSH_OPTS") ;;
        hc) cm_up; a+=(--ssh-command "ssh $SSH_OPTS $CM_OPTS") ;;
    esac
    if [[ $kind == json ]]; then
        measure "$phase" "$name" "$rep" "$kind" "$OUT/hubsync-$phase-$name-$rep.json" \
            "$HUBSYNC" sync --json "${a[@]}" "$hub" "$@"
    else
        measure "$phase" "$name" "$rep" "$kind" /dev/null "$HUBSYNC" sync -q "${a[@]}" "$hub" "$@"
    fi
}

# run TOOL PHASE REP KIND: one measured run of a tool on its own pair.
run() {
    local tool=$1 phase=$2 rep=$3 kind=$4
    case $tool in
        h2 | ho | hc) hs "$tool" "$phase" "$rep" "$kind" "$tool" "$W/hub_$tool" "$(url "${PEER[$tool]}")" ;;
        h2x4) hs h2 "$phase" "$rep" "$kind" h2x4 "$W/hub_m" "$(url "${PEER[m1]}")" "$(url "${PEER[m2]}")" \
            "$(url "${PEER[m3]}")" "$(url "${PEER[m4]}")" ;;
        unison)
            measure "$phase" "$tool" "$rep" "$kind" /dev/null "$UNISON_BIN" -batch -times -fastcheck true -prefer newer \
                -auto -ui text -silent -sshargs "$SSH_OPTS" -servercmd "env UNISON=$UNISON_REMOTE $UNISON_BIN" \
                "$W/hub_unison" "ssh://$SSH_USER@127.0.0.1:$SSH_PORT/${PEER[unison]}" ;;
        rsync)
            if [[ $phase == both ]]; then
                # shellcheck disable=SC2016 # expanded by the bash that measure starts
                measure "$phase" "$tool" "$rep" "$kind" /dev/null bash -c '"${@:3}" "$1" "$2" && "${@:3}" "$2" "$1"' \
                    _ "$W/hub_rsync/" "$TARGET:${PEER[rsync]}/" "$RSYNC_BIN" -au --rsync-path="$RSYNC_BIN" \
                    -e "ssh $SSH_OPTS -p $SSH_PORT"
            else
                measure "$phase" "$tool" "$rep" "$kind" /dev/null "$RSYNC_BIN" -a --rsync-path="$RSYNC_BIN" \
                    -e "ssh $SSH_OPTS -p $SSH_PORT" "$W/hub_rsync/" "$TARGET:${PEER[rsync]}/"
            fi ;;
        find)
            cm_up
            # shellcheck disable=SC2016 # expanded by the bash that measure starts
            measure "$phase" "$tool" "$rep" "$kind" /dev/null bash -c \
                'find "$1" -printf "%s %T@\n" >/dev/null & "${@:3}" & wait' _ "$W/hub_h2" "${PEER[h2]}" \
                "${CM_ARGV[@]}" "$TARGET" "$FIND_BIN $(printf %q "${PEER[h2]}") -printf '%s %T@\n' >/dev/null" ;;
        findssh)
            # The floor as issue 3 defines it: one new SSH connection included.
            # shellcheck disable=SC2016 # expanded by the bash that measure starts
            measure "$phase" "$tool" "$rep" "$kind" /dev/null bash -c \
                'find "$1" -printf "%s %T@\n" >/dev/null & "${@:3}" & wait' _ "$W/hub_h2" "${PEER[h2]}" \
                "${SSH_ARGV[@]}" "$TARGET" "$FIND_BIN $(printf %q "${PEER[h2]}") -printf '%s %T@\n' >/dev/null" ;;
    esac
}

hub_of() { case $1 in h2x4) echo "$W/hub_m" ;; *) echo "$W/hub_$1" ;; esac; }
# check_tool PHASE TOOL [content|FILELIST]
check_tool() {
    local phase=$1 tool=$2 what=${3:-} i
    if [[ $tool == h2x4 ]]; then
        for i in 1 2 3 4; do check "$phase" "h2x4/m$i" "$W/hub_m" "${PEER[m$i]}" "$what"; done
    else
        check "$phase" "$tool" "$(hub_of "$tool")" "${PEER[$tool]}" "$what"
    fi
}

# ---- the tree ----------------------------------------------------------------------
note "generating $FILES files (seed $SEED) in $W"
python3 "$GEN" tree "$W/hub_rsync" --files "$FILES" --seed "$SEED" 2>"$W/logs/gen.log" ||
    { cat "$W/logs/gen.log" >&2; die "tree generation failed"; }
for t in h2 ho hc unison m; do cp -a "$W/hub_rsync" "$W/hub_$t"; done
TREE_BYTES=$(du -sb --apparent-size "$W/hub_rsync" | awk '{print $1}')
TREE_DISK=$(du -sB1 "$W/hub_rsync" | awk '{print $1}')
FS_BYTES=$((TREE_DISK * 2 + 256 * 1024 * 1024))
FS_INODES=$((FILES * 3 / 2 + 20000))
note "tree: $FILES files, $((TREE_BYTES / 1000000)) MB; $REPS timed trial(s); fresh ext4 per first sync: $([[ $FRESH_FS == 1 ]] && echo yes || echo no)"
# Prime each hubsync hub's scan cache (a first sync to a local directory, undone), as a
# hub that adds a new peer has it; past the 2 s racy-ctime window of the copies.
sleep 3
for t in h2 ho hc m; do
    mkdir -p "$W/prime"
    "$HUBSYNC" sync -q "$W/hub_$t" "$W/prime" || die "priming $W/hub_$t failed"
    rm -rf "$W/prime" "$W/hub_$t/.hubsync/pairs"
done

# ---- phase 1: first sync into an empty peer ----------------------------------------
# reset_first TOOL: an empty peer on a fresh file system and no sync state.
reset_first() {
    local t=$1
    fresh_fs "$W/fs/$t" "$FS_BYTES" "$FS_INODES"
    PEER[$t]=$W/fs/$t/peer
    mkdir "${PEER[$t]}"
    case $t in
        h2 | ho | hc) rm -rf "$W/hub_$t/.hubsync/pairs" ;;
        unison) rm -rf "$UNISON" "$UNISON_REMOTE"; mkdir "$UNISON" "$UNISON_REMOTE" ;;
    esac
}
TOOLS5=(h2 ho hc unison rsync)
for ((rep = 1; rep <= REPS; rep++)); do
    note "first sync, trial $rep of $REPS"
    for tool in $(rotated "$rep" "${TOOLS5[@]}"); do
        reset_first "$tool"
        run "$tool" first "$rep" timed
        measure first-syncfs "$tool" "$rep" timed /dev/null sync -f "${PEER[$tool]}"
        if [[ $rep == "$REPS" ]]; then check_tool first "$tool" content; else check_tool first "$tool"; fi
    done
done
note "first sync of the 4-peer hub"
fresh_fs "$W/fs/m" $((FS_BYTES * 4)) $((FS_INODES * 4))
for i in 1 2 3 4; do PEER[m$i]=$W/fs/m/peer$i; mkdir "${PEER[m$i]}"; done
run h2x4 first 1 timed
measure first-syncfs h2x4 1 timed /dev/null sync -f "${PEER[m1]}"
check_tool first h2x4

# ---- phase 2: no change -------------------------------------------------------------
TOOLS_NC=(h2 ho hc unison rsync h2x4 find findssh)
for ((rep = 0; rep <= REPS; rep++)); do
    kind=timed
    [[ $rep -eq 0 ]] && kind=warm
    note "no change, $kind run $rep"
    for tool in $(rotated "$rep" "${TOOLS_NC[@]}"); do
        run "$tool" nochange "$rep" "$kind"
    done
    for tool in "${TOOLS5[@]}" h2x4; do check_tool nochange "$tool"; done
done
# The wire bytes of a steady-state run.
for tool in "${HUBSYNC_TOOLS[@]}" h2x4; do run "$tool" nochange json json; done

# ---- phase 3: small change ----------------------------------------------------------
# edit NAME ROUND: a DokuWiki edit round applied to every hub; sets EDITED (file list).
edit() {
    local round=$1 dir=$W/edits/$1
    python3 "$GEN" edit "$W/hub_rsync" "$dir" --round "$2" --seed "$SEED" --mtime-ns "$(date +%s%N)"
    python3 "$GEN" apply "$dir" "$W/hub_h2" "$W/hub_ho" "$W/hub_hc" "$W/hub_unison" "$W/hub_rsync" "$W/hub_m"
    EDITED=$W/edits/$round.list
    (cd "$dir" && find . -type f -printf '%P\n') >"$EDITED"
}
TOOLS_SM=(h2 ho hc unison rsync h2x4)
for ((rep = 0; rep <= REPS; rep++)); do
    kind=timed
    [[ $rep -eq 0 ]] && kind=warm
    note "small change, $kind run $rep"
    edit "$rep" $((rep + 1))
    for tool in $(rotated "$rep" "${TOOLS_SM[@]}"); do
        run "$tool" small "$rep" "$kind"
        check_tool small "$tool" "$EDITED"
    done
done
# One more round with --json, to show what was moved.
edit json 999
for tool in "${TOOLS_SM[@]}"; do
    k=extra
    [[ $tool == h* ]] && k=json
    run "$tool" small json "$k"
    check_tool small "$tool" content
done

# ---- phase 4: edits on both sides ----------------------------------------------------
# DokuWiki edits on the hub and, a second later, others on the peer: each tool carries
# changes both ways in one run (rsync: -au one way, then -au back, the usual trick).
TOOLS_BOTH=(h2 ho hc unison rsync)
both_edit() {
    local dir=$W/edits/both-$1 peers=() t
    python3 "$GEN" edit "$W/hub_rsync" "$dir-hub" --round $((2000 + $1)) --seed "$SEED" --mtime-ns "$(date +%s%N)"
    python3 "$GEN" apply "$dir-hub" "$W/hub_h2" "$W/hub_ho" "$W/hub_hc" "$W/hub_unison" "$W/hub_rsync"
    for t in "${TOOLS_BOTH[@]}"; do peers+=("${PEER[$t]}"); done
    python3 "$GEN" edit "$W/hub_rsync" "$dir-peer" --round $((3000 + $1)) --seed "$SEED" \
        --mtime-ns "$(($(date +%s%N) + 1000000000))"
    python3 "$GEN" apply "$dir-peer" "${peers[@]}"
    EDITED=$W/edits/both-$1.list
    { (cd "$dir-hub" && find . -type f -printf '%P\n') && (cd "$dir-peer" && find . -type f -printf '%P\n'); } |
        sort -u >"$EDITED"
}
for ((rep = 0; rep <= REPS; rep++)); do
    kind=timed
    [[ $rep -eq 0 ]] && kind=warm
    note "edits on both sides, $kind run $rep"
    both_edit "$rep"
    for tool in $(rotated "$rep" "${TOOLS_BOTH[@]}"); do
        run "$tool" both "$rep" "$kind"
        check_tool both "$tool" "$EDITED"
    done
done
for tool in "${TOOLS_BOTH[@]}"; do check_tool both "$tool" content; done

# ---- phase 5: one big file ----------------------------------------------------------
BIG=$W/big
mkdir -p "$BIG"
BIG_FS=$(df -PT "$BENCH_DIR" | awk 'NR == 2 { print $2 }')
if [[ $(id -u) == 0 ]] && mount -t tmpfs -o size=$((BIG_MB * 4 + 256))M hubsync-bench "$BIG" 2>"$W/logs/tmpfs"; then
    FRESH_FS_MOUNTS+=("$BIG")
    BIG_FS=tmpfs
else
    note "no tmpfs for the big file ($(cat "$W/logs/tmpfs" 2>/dev/null)): it goes to $BENCH_DIR ($BIG_FS)"
fi
BIG_BYTES=$((BIG_MB * 1024 * 1024))
mkdir -p "$BIG/hub_up" "$BIG/peer_down"
note "big file: $BIG_MB MiB of random bytes on $BIG_FS"
head -c "$BIG_BYTES" /dev/urandom >"$BIG/hub_up/big.bin"
cp -a "$BIG/hub_up/big.bin" "$BIG/peer_down/big.bin"
sleep 3 # racy-ctime window
# big_check PHASE TOOL DIR_A DIR_B [content]
big_check() {
    local res=ok
    if [[ $(stat -c '%s %Y' "$3/big.bin" 2>&1) != $(stat -c '%s %Y' "$4/big.bin" 2>&1) ]]; then
        res="size or mtime differs"
    elif [[ ${5:-} == content ]] && ! cmp -s "$3/big.bin" "$4/big.bin"; then
        res="content differs"
    fi
    printf '%s\t%s\t%s\n' "$1" "$2" "$res" >>"$OUT/verify.txt"
    [[ $res == ok ]] || { FAILED=1; note "WARNING: $1/$2: the big file copy: $res"; }
}
# big TOOL REP KIND: one run of a big-file tool; up runs are followed by a no-change run.
big() {
    local tool=$1 rep=$2 kind=$3 what=
    [[ $rep == "$REPS" ]] && what=content
    case $tool in
        h2-up | ho-up)
            local t=${tool%-up}
            rm -rf "$BIG/hub_up/.hubsync/pairs"
            mkdir "$BIG/peer_$t"
            hs "$t" big "$rep" "$kind" "$tool" "$BIG/hub_up" "$(url "$BIG/peer_$t")"
            big_check big "$tool" "$BIG/hub_up" "$BIG/peer_$t" $what
            hs "$t" big "$rep" "$kind" "$t-noop" "$BIG/hub_up" "$(url "$BIG/peer_$t")"
            rm -rf "$BIG/peer_$t" ;;
        h2-down | ho-down)
            local t=${tool%-down}
            mkdir "$BIG/hub_down"
            hs "$t" big "$rep" "$kind" "$tool" "$BIG/hub_down" "$(url "$BIG/peer_down")"
            big_check big "$tool" "$BIG/peer_down" "$BIG/hub_down" $what
            rm -rf "$BIG/hub_down" ;;
        rsync-up)
            mkdir "$BIG/rsync"
            measure big "$tool" "$rep" "$kind" /dev/null "$RSYNC_BIN" -a --rsync-path="$RSYNC_BIN" \
                -e "ssh $SSH_OPTS -p $SSH_PORT" "$BIG/hub_up/big.bin" "$TARGET:$BIG/rsync/"
            big_check big "$tool" "$BIG/hub_up" "$BIG/rsync" $what
            rm -rf "$BIG/rsync" ;;
        ssh-up)
            # shellcheck disable=SC2016 # expanded by the bash that measure starts
            measure big "$tool" "$rep" "$kind" /dev/null bash -c '"${@:2}" <"$1"' _ "$BIG/hub_up/big.bin" \
                "${SSH_ARGV[@]}" "$TARGET" "cat >/dev/null" ;;
        ssh-down)
            measure big "$tool" "$rep" "$kind" /dev/null "${SSH_ARGV[@]}" "$TARGET" "cat $(printf %q "$BIG/peer_down/big.bin")" ;;
    esac
}
TOOLS_BIG=(h2-up ho-up h2-down ho-down rsync-up ssh-up ssh-down)
for ((rep = 0; rep <= REPS; rep++)); do
    kind=timed
    [[ $rep -eq 0 ]] && kind=warm
    note "big file, $kind run $rep"
    for tool in $(rotated "$rep" "${TOOLS_BIG[@]}"); do big "$tool" "$rep" "$kind"; done
done

# ---- report -------------------------------------------------------------------------
ELAPSED=$(($(date +%s) - started))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$OUT/meta.json" "$FILES" "$TREE_BYTES" "$REPS" "$SEED" "$(nproc)" "$FRESH_FS" \
    "$(df -PT "$W" | awk 'NR == 2 { print $2 }')" "$BIG_BYTES" "$BIG_FS" "$ELAPSED" "$FAILED" \
    "$LOAD_START" "$LOAD_END" "$RC" "$HUBSYNC" "$("$HUBSYNC" --version)" "$("$UNISON_BIN" -version 2>&1 | head -n 1)" \
    "$("$RSYNC_BIN" --version | head -n 1)" "$(ssh -V 2>&1)" <<'EOF'
import json, sys
a = sys.argv[1:]
json.dump({
    "files": int(a[1]), "tree_bytes": int(a[2]), "reps": int(a[3]), "seed": int(a[4]), "cpus": int(a[5]),
    "fresh_fs": a[6] == "1", "hub_fs": a[7], "big_bytes": int(a[8]), "big_fs": a[9], "elapsed_s": int(a[10]),
    "failed": a[11] == "1", "load_start": a[12], "load_end": a[13], "login_rc": a[14] == "1",
    "hubsync_path": a[15], "versions": {"hubsync": a[16], "unison": a[17], "rsync": a[18], "openssh": a[19]},
}, open(a[0], "w"), indent=1)
EOF
python3 "$LIB/bench-ssh-report.py" "$OUT"
note "report: $OUT/summary.md"
exit $((FAILED == 1 ? 1 : 0))
