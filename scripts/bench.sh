#!/usr/bin/env bash
# hubsync benchmark: one hub and one local peer on a DokuWiki-shaped tree, next to
# unison and rsync -a on identical copies, with `find` over both trees as the floor;
# then the same over SSH (scripts/bench-ssh.sh: hubsync with libssh2, with OpenSSH and
# with an OpenSSH ControlMaster, unison and rsync over ssh to a private sshd on
# 127.0.0.1, 4 peers against 1, wire bytes, and one big file's throughput).
#
# Usage: scripts/bench.sh [--short] [--keep] [--local-only | --ssh-only]
#
#   --short      CI mode (also BENCH_SHORT=1): 5,000 files, 1 timed repetition, a
#                128 MiB big file; a few minutes
#   --keep       keep the work directories (also BENCH_KEEP=1)
#   --local-only / --ssh-only   run one part (also BENCH_PARTS=local or ssh)
#
# Results: BENCH_OUT/bench.md (both parts, markdown; its path is printed last), and
# per part summary.txt / ssh/summary.md, results.json, runs.tsv.
#
# Environment:
#   HUBSYNC      hubsync binary (default: `cargo build --release` of this repository)
#   BENCH_FILES  number of files in the tree (default 100000; 5000 with --short)
#   BENCH_REPS   timed repetitions per phase (default 5; 1 with --short)
#   BENCH_SEED   tree seed (default 42)
#   BENCH_DIR    where the work directories are made (default /tmp); needs free
#                space of about 50 KB per file for the local part, 120 KB per file
#                (and 3 copies of the big file) for the SSH part
#   BENCH_OUT    where results go (default /tmp/hubsync-bench): summary.txt,
#                results.json, runs.tsv, the hubsync --json documents
#   BENCH_TIMEOUT   seconds after which one run is killed and counted as failed
#                (default 600). If hubsync's first sync fails or is killed, its
#                remaining first-sync runs are skipped and its peer is seeded with
#                `cp -a` plus one hubsync run (reported as "seeded"), so that the
#                later phases still measure hubsync.
#   BENCH_STRICT=1  exit 3 when a target from the issue is missed (local part)
#   BENCH_FRESH_FS=0  first syncs into new directories instead of a fresh
#                loop-mounted ext4 per run (which needs root; without it, or when
#                loop devices fail, new directories are used and the report says so)
#   BENCH_BIG_MB, BENCH_SSH_RC: see scripts/bench-ssh.sh --help
#
# Phases (each tool has its own hub/peer pair: hub_h/peer_h for hubsync, hub_u/peer_u
# for unison, hub_r/peer_r for rsync; all start identical):
#   first     first sync into an empty peer (peer and sync state recreated each time,
#             the peer on a fresh file system: scripts/lib/fresh-fs.sh; the hub keeps
#             its scan cache, only .hubsync/pairs goes)
#   nochange  a run with nothing to do; `find` over hub+peer, in parallel and one
#             after the other, is the floor
#   small     a run after 5 DokuWiki page edits (page, attic revision, .changes,
#             .meta) and 1 image upload (image, media_meta .changes) on the hub, the
#             same bytes and mtimes in each tool's hub
# Each phase runs once as a warm-up (not in the medians; hubsync runs it with --json),
# then BENCH_REPS times. The page cache is NOT dropped: figures are for a warm cache.
# `sync` is run (untimed) before every measured run so that write-back of an earlier
# run does not land in the next one. Wall time is measured around the process; peak
# RSS is GNU time's %M (the process and the children it waited for). hubsync's hub
# process and its `serve` child are also sampled separately (VmHWM every 10 ms).
#
# Exit status: 0 when every run exited 0 and every peer matched its hub (both parts);
# 1 otherwise; 2 usage or set-up errors; 3 with BENCH_STRICT=1 when a target was
# missed. Timings alone never fail it.

set -euo pipefail

die() { echo "bench.sh: error: $*" >&2; exit 2; }
note() { echo "bench.sh: $*" >&2; }

SHORT=${BENCH_SHORT:-0}
KEEP=${BENCH_KEEP:-0}
PARTS=${BENCH_PARTS:-all}
while [[ $# -gt 0 ]]; do
    case $1 in
        --short) SHORT=1 ;;
        --keep) KEEP=1 ;;
        --local-only) PARTS=local ;;
        --ssh-only) PARTS=ssh ;;
        -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
[[ $SHORT == 1 ]] && def_files=5000 def_reps=1 || def_files=100000 def_reps=5
FILES=${BENCH_FILES:-$def_files}
REPS=${BENCH_REPS:-$def_reps}
SEED=${BENCH_SEED:-42}
TIMEOUT=${BENCH_TIMEOUT:-600}
BENCH_DIR=${BENCH_DIR:-/tmp}
BENCH_OUT=${BENCH_OUT:-/tmp/hubsync-bench}
[[ $FILES =~ ^[0-9]+$ && $FILES -ge 100 ]] || die "BENCH_FILES must be a number >= 100"
[[ $REPS =~ ^[0-9]+$ && $REPS -ge 1 ]] || die "BENCH_REPS must be a number >= 1"
[[ $SEED =~ ^[0-9]+$ ]] || die "BENCH_SEED must be a number"
[[ $TIMEOUT =~ ^[0-9]+$ && $TIMEOUT -ge 1 ]] || die "BENCH_TIMEOUT must be a number of seconds"
[[ $PARTS =~ ^(all|local|ssh)$ ]] || die "BENCH_PARTS must be all, local or ssh"

SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$SCRIPTS")
GEN=$SCRIPTS/gen-tree.py
# shellcheck source=/dev/null # scripts/lib/fresh-fs.sh
source "$SCRIPTS/lib/fresh-fs.sh"

# ---- tools -------------------------------------------------------------------------
missing=()
for t in python3 unison rsync find cp df sync sort awk; do
    command -v "$t" >/dev/null || missing+=("$t")
done
[[ -x /usr/bin/time ]] && /usr/bin/time -f %M true >/dev/null 2>&1 || missing+=("/usr/bin/time (GNU time)")
if [[ ${#missing[@]} -gt 0 ]]; then
    die "missing: ${missing[*]} (Debian/Ubuntu: apt-get install -y time unison rsync python3 findutils)"
fi
find /dev/null -maxdepth 0 -printf '' 2>/dev/null || die "find must be GNU find (-printf)"
[[ -f $GEN ]] || die "missing $GEN"

if [[ -n ${HUBSYNC:-} ]]; then
    [[ -x $HUBSYNC ]] || die "HUBSYNC=$HUBSYNC is not an executable"
    HUBSYNC=$(cd "$(dirname "$HUBSYNC")" && pwd)/$(basename "$HUBSYNC")
else
    command -v cargo >/dev/null || die "no HUBSYNC given and no cargo to build $REPO"
    note "building $REPO (cargo build --release)"
    cargo build --release --quiet --manifest-path "$REPO/Cargo.toml" || die "cargo build failed"
    tdir=$(cargo metadata --format-version 1 --no-deps --manifest-path "$REPO/Cargo.toml" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    HUBSYNC=$tdir/release/hubsync
    [[ -x $HUBSYNC ]] || die "no binary at $HUBSYNC after the build"
fi
"$HUBSYNC" --version >/dev/null 2>&1 || die "$HUBSYNC --version failed"

# ssh_part LOCAL_RC: runs scripts/bench-ssh.sh, writes BENCH_OUT/bench.md and exits
# with the worse of the two parts' statuses.
ssh_part() {
    local local_rc=$1 ssh_rc=0 md=$BENCH_OUT/bench.md
    if [[ $PARTS != local ]]; then
        note "SSH part: scripts/bench-ssh.sh"
        HUBSYNC=$HUBSYNC BENCH_FILES=$FILES BENCH_REPS=$REPS BENCH_SEED=$SEED BENCH_TIMEOUT=$TIMEOUT \
            BENCH_DIR=$BENCH_DIR BENCH_SSH_OUT=$BENCH_OUT/ssh BENCH_SHORT=$SHORT BENCH_KEEP=$KEEP \
            "$SCRIPTS/bench-ssh.sh" || ssh_rc=$?
    fi
    {
        echo "# hubsync benchmark ($(date -u '+%Y-%m-%d %H:%M UTC'), $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
        echo
        if [[ $PARTS != ssh && -f $BENCH_OUT/summary.txt ]]; then
            echo "## Local peer (hub and peer on this machine)"
            echo
            echo '```'
            cat "$BENCH_OUT/summary.txt"
            echo '```'
            echo
        fi
        if [[ $PARTS != local ]]; then
            if [[ -f $BENCH_OUT/ssh/summary.md ]]; then cat "$BENCH_OUT/ssh/summary.md"; else echo "SSH part: no summary (exit $ssh_rc)"; fi
        fi
    } >"$md"
    note "results: $md"
    local rc
    for rc in 2 1 3; do
        if [[ $local_rc == "$rc" || $ssh_rc == "$rc" ]]; then exit "$rc"; fi
    done
    [[ $local_rc == 0 && $ssh_rc == 0 ]] || exit 1
    exit 0
}
if [[ $PARTS == ssh ]]; then
    mkdir -p "$BENCH_OUT" || die "cannot create $BENCH_OUT"
    rm -f "$BENCH_OUT"/summary.txt "$BENCH_OUT"/bench.md
    ssh_part 0
fi

# ---- work directory ----------------------------------------------------------------
mkdir -p "$BENCH_DIR" "$BENCH_OUT" || die "cannot create $BENCH_DIR or $BENCH_OUT"
need=$((FILES * 50 * 1024 + 512 * 1024 * 1024))
avail=$(df -P -B1 "$BENCH_DIR" | awk 'NR == 2 { print $4 }')
if [[ $avail -lt $need ]]; then
    die "$BENCH_DIR has $((avail >> 20)) MiB free; $FILES files need about $((need >> 20)) MiB (set BENCH_DIR)"
fi
W=$(mktemp -d "$BENCH_DIR/hubsync-bench.XXXXXX")
drop_work() {
    fresh_fs_cleanup
    if [[ $KEEP == 1 ]]; then
        note "kept $W"
    else
        rm -rf -- "$W"
    fi
}
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    local rc=$?
    drop_work
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$W/logs" "$W/edits" "$W/fs"
rm -f "$BENCH_OUT"/runs.tsv "$BENCH_OUT"/hubsync-*.json "$BENCH_OUT"/summary.txt "$BENCH_OUT"/results.json \
    "$BENCH_OUT"/verify.txt "$BENCH_OUT"/failed-*.log "$BENCH_OUT"/bench.md
fresh_fs_init "$W/fs"
# Each tool's peer: a new directory in a fresh file system for every first sync.
declare -A PEER=([h]=$W/peer_h [u]=$W/peer_u [r]=$W/peer_r)

# ---- measurement helper ------------------------------------------------------------
# scripts/lib/measure.py runs and samples one command and appends a row to runs.tsv.
TSV=$BENCH_OUT/runs.tsv
printf 'phase\ttool\trep\tkind\twall_s\ttime_e\tmaxrss_kb\texit\tmain_hwm_kb\tchild_hwm_kb\tprocs\tremote_hwm_kb\tremote_procs\n' >"$TSV"
FAILED=0
LAST_RC=0
LOCAL_RC=0

# measure PHASE TOOL REP KIND STDOUT CMD...
measure() {
    local phase=$1 tool=$2 rep=$3 kind=$4 out=$5
    shift 5
    local log=$W/logs/$phase-$tool-$rep.log rc=0
    sync
    python3 "$SCRIPTS/lib/measure.py" "$phase" "$tool" "$rep" "$kind" "$out" "$TSV" "$log" "$TIMEOUT" -- "$@" || rc=$?
    LAST_RC=$rc
    if [[ $rc -ne 0 ]]; then
        FAILED=1
        note "WARNING: $phase/$tool/$rep exited $rc: $*"
        sed 's/^/    | /' "$log" | tail -n 20 >&2
        cp "$log" "$BENCH_OUT/failed-$phase-$tool-$rep.log"
    fi
}

# shellcheck disable=SC2016 # expanded by the bash that measure starts
FIND_PAR='find "$1" -printf "%s %T@\n" >/dev/null & find "$2" -printf "%s %T@\n" >/dev/null & wait'
# shellcheck disable=SC2016 # expanded by the bash that measure starts
FIND_SEQ='find "$1" -printf "%s %T@\n" >/dev/null; find "$2" -printf "%s %T@\n" >/dev/null'
export UNISON=$W/unison-state

# run TOOL PHASE REP KIND: one measured run of a tool on its own pair.
run() {
    local tool=$1 phase=$2 rep=$3 kind=$4
    case $tool in
        hubsync)
            if [[ $kind == json ]]; then
                measure "$phase" "$tool" "$rep" "$kind" "$BENCH_OUT/hubsync-$phase-$rep.json" \
                    "$HUBSYNC" sync --json "$W/hub_h" "${PEER[h]}"
            else
                measure "$phase" "$tool" "$rep" "$kind" /dev/null \
                    "$HUBSYNC" sync -q "$W/hub_h" "${PEER[h]}"
            fi ;;
        unison)
            measure "$phase" "$tool" "$rep" "$kind" /dev/null \
                unison "$W/hub_u" "${PEER[u]}" -batch -times -fastcheck true -auto -ui text -silent ;;
        rsync)
            measure "$phase" "$tool" "$rep" "$kind" /dev/null rsync -a "$W/hub_r/" "${PEER[r]}/" ;;
        find-par)
            measure "$phase" "$tool" "$rep" "$kind" /dev/null bash -c "$FIND_PAR" _ "$W/hub_h" "${PEER[h]}" ;;
        find-seq)
            measure "$phase" "$tool" "$rep" "$kind" /dev/null bash -c "$FIND_SEQ" _ "$W/hub_h" "${PEER[h]}" ;;
    esac
}

# reset_first TOOL: an empty peer on a fresh file system (scripts/lib/fresh-fs.sh) and
# no sync state; hubsync's hub keeps its scan cache (as a hub that adds a peer has it).
reset_first() {
    local x=${1:0:1}
    fresh_fs "$W/fs/$x" "$FS_BYTES" "$FS_INODES"
    PEER[$x]=$W/fs/$x/peer
    mkdir "${PEER[$x]}"
    case $1 in
        hubsync) rm -rf "$W/hub_h/.hubsync/pairs" ;;
        unison) rm -rf "$UNISON"; mkdir "$UNISON" ;;
    esac
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

# scripts/lib/same.py compares two listings (unison's mtimes within 2 us).

# verify PHASE [content]: every peer against its hub.
verify() {
    local phase=$1 what=${2:-}
    for pair in h:hubsync u:unison r:rsync; do
        local x=${pair%%:*} tool=${pair#*:} res=ok n tol=0
        [[ $x == u ]] && tol=2000
        listing "$W/hub_$x" >"$W/logs/list-hub"
        listing "${PEER[$x]}" >"$W/logs/list-peer"
        n=$(python3 "$SCRIPTS/lib/same.py" "$W/logs/list-hub" "$W/logs/list-peer" $tol)
        if [[ $n -ne 0 ]]; then
            res="$n entries differ (name/size/mtime/mode)"
        fi
        if [[ $what == content ]] && ! diff -rq --exclude=.hubsync "$W/hub_$x" "${PEER[$x]}" >"$W/logs/diff-$x" 2>&1; then
            res="$res; content differs in $(wc -l <"$W/logs/diff-$x") paths"
        fi
        printf '%s\t%s\t%s\n' "$phase" "$tool" "$res" >>"$BENCH_OUT/verify.txt"
        if [[ $res != ok ]]; then
            FAILED=1
            note "WARNING: after $phase, $tool's peer does not match its hub: $res"
        fi
    done
}

# ---- the tree ----------------------------------------------------------------------
started=$(date +%s)
note "generating $FILES files (seed $SEED) in $W"
python3 "$GEN" tree "$W/hub_r" --files "$FILES" --seed "$SEED" 2>"$W/logs/gen.log" || { cat "$W/logs/gen.log" >&2; die "tree generation failed"; }
cat "$W/logs/gen.log" >&2
cp -a "$W/hub_r" "$W/hub_h"
cp -a "$W/hub_r" "$W/hub_u"
mkdir -p "$UNISON"
TREE_BYTES=$(du -sb --apparent-size "$W/hub_r" | awk '{print $1}')
FS_BYTES=$(($(du -sB1 "$W/hub_r" | awk '{print $1}') * 2 + 256 * 1024 * 1024))
FS_INODES=$((FILES * 3 / 2 + 20000))
note "tree: $(find "$W/hub_r" -type f | wc -l) files, $((TREE_BYTES / 1000000)) MB; $REPS timed repetition(s) + 1 warm-up per phase"
note "first syncs into $([[ $FRESH_FS == 1 ]] && echo "a fresh loop-mounted ext4 each" || echo "new directories on $BENCH_DIR ($FRESH_FS_WHY)")"

# ---- phase 1: first sync into an empty peer ----------------------------------------
H_FIRST_OK=1
for ((rep = 0; rep <= REPS; rep++)); do
    kind=timed
    [[ $rep -eq 0 ]] && kind=warm
    note "first sync, $kind run $rep"
    for tool in $(rotated $rep hubsync unison rsync); do
        [[ $tool == hubsync && $H_FIRST_OK == 0 ]] && continue
        reset_first "$tool"
        k=$kind
        [[ $tool == hubsync && $rep -eq 0 ]] && k=json
        run "$tool" first "$rep" "$k"
        if [[ $tool == hubsync && $LAST_RC -ne 0 ]]; then
            H_FIRST_OK=0
            note "hubsync's first sync failed (exit $LAST_RC): skipping its other first-sync runs"
        fi
    done
done
if [[ $H_FIRST_OK == 0 ]]; then
    note "seeding peer_h with cp -a and one hubsync run, for the later phases"
    rm -rf "${PEER[h]}" "$W/hub_h/.hubsync"
    cp -a "$W/hub_h" "${PEER[h]}"
    sleep 3 # past hubsync's 2 s racy-ctime window, as an older copy would be
    run hubsync first seeded json
fi
verify first content

# ---- phase 2: no change -------------------------------------------------------------
for ((rep = 0; rep <= REPS; rep++)); do
    kind=timed
    [[ $rep -eq 0 ]] && kind=warm
    note "no change, $kind run $rep"
    for tool in $(rotated $rep hubsync unison rsync find-par find-seq); do
        k=$kind
        [[ $tool == hubsync && $rep -eq 0 ]] && k=json
        run "$tool" nochange "$rep" "$k"
    done
done
# One more hubsync --json no-change run, not in the medians: the wire bytes of a
# steady-state run (the warm-up is the first run after the first sync).
run hubsync nochange json json
verify nochange

# ---- phase 3: small change ----------------------------------------------------------
for ((rep = 0; rep <= REPS; rep++)); do
    kind=timed
    [[ $rep -eq 0 ]] && kind=warm
    note "small change, $kind run $rep"
    python3 "$GEN" edit "$W/hub_r" "$W/edits/$rep" --round $((rep + 1)) --seed "$SEED" --mtime-ns "$(date +%s%N)"
    python3 "$GEN" apply "$W/edits/$rep" "$W/hub_h" "$W/hub_u" "$W/hub_r"
    for tool in $(rotated $rep hubsync unison rsync); do
        k=$kind
        [[ $tool == hubsync && $rep -eq 0 ]] && k=json
        run "$tool" small "$rep" "$k"
    done
done
# And one --json small-change run, not in the medians, to show what was moved.
python3 "$GEN" edit "$W/hub_r" "$W/edits/json" --round 999 --seed "$SEED" --mtime-ns "$(date +%s%N)"
python3 "$GEN" apply "$W/edits/json" "$W/hub_h" "$W/hub_u" "$W/hub_r"
run hubsync small json json
run unison small json warm
run rsync small json warm
verify small content

# ---- report -------------------------------------------------------------------------
ELAPSED=$(($(date +%s) - started))
python3 - "$BENCH_OUT" "$FILES" "$TREE_BYTES" "$REPS" "$SEED" "$ELAPSED" "$HUBSYNC" \
    "$("$HUBSYNC" --version)" "$(unison -version 2>&1 | head -n 1)" "$(rsync --version | head -n 1)" \
    "$(nproc)" "$(df -PT "$W" | awk 'NR == 2 { print $2 }')" "$FAILED" "${BENCH_STRICT:-0}" "$TIMEOUT" \
    "$FRESH_FS" "$FRESH_FS_WHY" <<'EOF' || LOCAL_RC=$?
import csv, json, math, os, statistics, sys

(out, files, tree_bytes, reps, seed, elapsed, exe, v_h, v_u, v_r, cpus, fstype,
 failed, strict, limit, fresh_fs, fresh_why) = sys.argv[1:]
files, tree_bytes, reps, limit = int(files), int(tree_bytes), int(reps), int(limit)
rows = list(csv.DictReader(open(os.path.join(out, "runs.tsv")), delimiter="\t"))
MB = 1024 / 1e6  # KiB -> MB (10^6 bytes)
NAN = float("nan")
PHASES = ("first", "nochange", "small")
TOOLS = ("hubsync", "unison", "rsync", "find-par", "find-seq")

def sel(phase, tool, kinds=("timed",), rep=None):
    return [r for r in rows if r["phase"] == phase and r["tool"] == tool and r["kind"] in kinds
            and (rep is None or r["rep"] == rep)]

def cell(runs, allr):
    ok = [r for r in runs if r["exit"] == "0"]
    w = [float(r["wall_s"]) for r in ok]
    kb = lambda rs, k: max((int(r[k]) for r in rs), default=0) * MB
    return {
        "median_s": statistics.median(w) if w and len(ok) == len(runs) else NAN,
        "min_s": min(w) if w else NAN, "max_s": max(w) if w else NAN,
        "runs_s": [float(r["wall_s"]) for r in runs],
        "peak_mb": kb(runs, "maxrss_kb"), "main_mb": kb(runs, "main_hwm_kb"), "child_mb": kb(runs, "child_hwm_kb"),
        "peak_mb_all_runs": kb(allr, "maxrss_kb"), "main_mb_all_runs": kb(allr, "main_hwm_kb"),
        "other_runs": [(r["rep"], r["kind"], float(r["wall_s"]), int(r["exit"])) for r in allr if r["kind"] != "timed"],
        "exits": sorted({int(r["exit"]) for r in allr}),
    }

stats = {}
for phase in PHASES:
    for tool in TOOLS:
        allr = [r for r in sel(phase, tool, ("timed", "warm", "json")) if r["rep"] != "seeded"]
        if allr:
            stats[(phase, tool)] = cell(sel(phase, tool), allr)
seeded = sel("first", "hubsync", ("json",), "seeded")
if seeded:
    stats[("first", "hubsync-seeded")] = cell(seeded, seeded)

def med(p, t):
    return stats[(p, t)]["median_s"] if (p, t) in stats else NAN

def ratio(a, b):
    return a / b if b > 0 else NAN

def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError) as e:
        return {"_error": f"{name}: {e.__class__.__name__}: {e}"}

names_json = ["first-0", "first-seeded", "nochange-0", "nochange-json", "small-0", "small-json"]
docs = {n: load(f"hubsync-{n}.json") for n in names_json if os.path.exists(os.path.join(out, f"hubsync-{n}.json"))}

def figures(doc):
    res = {}
    for r in doc.get("replicas") or []:
        res[r.get("label", "?")] = {k: r.get(k) for k in (
            "status", "files_in", "bytes_in", "removed", "metadata", "deferred", "failed_actions",
            "wire_sent", "wire_received", "scan")}
    return {"result": doc.get("result"), "exit_code": doc.get("exit_code"), "seconds": doc.get("seconds"),
            "replicas": res, "warnings": doc.get("warnings"), "errors": doc.get("errors"),
            "conflicts": len(doc.get("conflicts") or []), "plan_items": len(doc.get("plan") or []),
            "error": doc.get("_error")}

figs = {n: figures(d) for n, d in docs.items()}

L = []
p = L.append
p(f"hubsync benchmark: {files} files, {tree_bytes / 1e6:.0f} MB (seed {seed}), {cpus} CPUs, {fstype}; "
  f"{reps} timed run(s) per cell after 1 warm-up")
p(f"  {v_h} ({exe}); {v_u}; {v_r}")
p("  page cache NOT dropped: all figures are warm-cache medians; `sync` before every run")
p("  first syncs into " + ("a fresh loop-mounted ext4 each (hubs keep their scan caches)" if fresh_fs == "1"
                           else f"new directories on {fstype}, not fresh file systems ({fresh_why})"))
p("  peak MB = GNU time %M (process + waited children, max over timed runs), 10^6 bytes;")
p("  hub/serve MB = VmHWM of hubsync's hub process / its serve child, sampled every 10 ms")
p("")
hdr = f"{'phase':<13}{'tool':<22}{'median s':>9}{'min s':>8}{'max s':>8}{'peak MB':>9}{'hub MB':>8}{'serve MB':>9}  exit"
p(hdr)
p("-" * len(hdr))
names = {"hubsync": "hubsync", "unison": "unison", "rsync": "rsync -a", "hubsync-seeded": "hubsync, seeded peer",
         "find-par": "find floor (parallel)", "find-seq": "find floor (sequent.)"}
pnames = {"first": "first sync", "nochange": "no change", "small": "small change"}
notes = []
for phase in PHASES:
    first = True
    for tool in ("hubsync", "hubsync-seeded", "unison", "rsync", "find-par", "find-seq"):
        s = stats.get((phase, tool))
        if not s:
            continue
        label = pnames[phase] if first else ""
        first = False
        exits = ",".join(map(str, s["exits"]))
        if not s["runs_s"]:
            bad = [o for o in s["other_runs"] if o[3] != 0]
            what = "; ".join(f"{'KILLED after' if e == 124 else f'exit {e} after'} {w:.0f} s ({k} run)"
                             for _, k, w, e in bad)
            p(f"{label:<13}{names[tool]:<22}  {'FAILED: ' + what if bad else 'no timed run'}")
            p(f"{'':<13}{'':<22}{'':>25}{s['peak_mb_all_runs']:9.1f}{s['main_mb_all_runs']:8.1f}{'':9}  {exits}")
            continue
        hub = f"{s['main_mb']:8.1f}{s['child_mb']:9.1f}" if tool.startswith("hubsync") else f"{'':8}{'':9}"
        p(f"{label:<13}{names[tool]:<22}{s['median_s']:9.3f}{s['min_s']:8.3f}{s['max_s']:8.3f}"
          f"{s['peak_mb']:9.1f}{hub}  {exits}")
        if tool == "hubsync-seeded":
            notes.append("hubsync, seeded peer: the peer was made with `cp -a` and hubsync run once (hashes both "
                         "sides, moves no data), because the first sync into an empty peer failed; the later "
                         "phases start from there")
p("")
for n in notes:
    p("note: " + n)
first_lb = None
if math.isnan(med("first", "hubsync")) and ("first", "hubsync") in stats:
    killed = [o[2] for o in stats[("first", "hubsync")]["other_runs"] if o[3] == 124]
    first_lb = min(killed) if killed else None
ratios = {
    "first": {"hubsync/unison": ratio(med("first", "hubsync"), med("first", "unison")),
              "hubsync/rsync": ratio(med("first", "hubsync"), med("first", "rsync"))},
    "nochange": {"hubsync/find_parallel": ratio(med("nochange", "hubsync"), med("nochange", "find-par")),
                 "hubsync/find_sequential": ratio(med("nochange", "hubsync"), med("nochange", "find-seq")),
                 "hubsync/unison": ratio(med("nochange", "hubsync"), med("nochange", "unison")),
                 "hubsync/rsync": ratio(med("nochange", "hubsync"), med("nochange", "rsync"))},
    "small": {"hubsync/unison": ratio(med("small", "hubsync"), med("small", "unison")),
              "hubsync/rsync": ratio(med("small", "hubsync"), med("small", "rsync")),
              "hubsync_small_minus_nochange_s": med("small", "hubsync") - med("nochange", "hubsync")},
}
if first_lb:
    ratios["first"] = {"hubsync/unison_at_least": ratio(first_lb, med("first", "unison")),
                       "hubsync/rsync_at_least": ratio(first_lb, med("first", "rsync"))}
p("ratios (medians):")
def fmt(k, v):
    if k.endswith("_s"):
        return f"{k} {v:+.3f} s"
    if k.endswith("_at_least"):
        return f"{k[:-9]} >{v:.0f}x (killed at {first_lb:.0f} s)"
    return f"{k} {v:.2f}x"
for phase, rs in ratios.items():
    p(f"  {pnames[phase]:<13}" + "   ".join(fmt(k, v) for k, v in rs.items()))
p("")
hubs = [stats[(ph, t)] for ph in PHASES for t in ("hubsync", "hubsync-seeded") if (ph, t) in stats]
hub_peak = max(s["main_mb_all_runs"] for s in hubs)
hub_peak_timed = max(s["main_mb"] for s in hubs)
tree_peak = max(s["peak_mb_all_runs"] for s in hubs)
r_floor = ratios["nochange"]["hubsync/find_parallel"]
r_un = ratios["nochange"]["hubsync/unison"]
d_small = ratios["small"]["hubsync_small_minus_nochange_s"]
first_failed = any(e != 0 for e in stats.get(("first", "hubsync"), {}).get("exits", [0]))
targets = [
    ("no-change within 1.2x the find floor (parallel)", r_floor <= 1.2, f"{r_floor:.2f}x"),
    ("no-change faster than unison", r_un < 1.0,
     f"{med('nochange', 'hubsync'):.3f} s vs {med('nochange', 'unison'):.3f} s"),
    ("small-change within 0.1 s of no-change", d_small <= 0.1, f"{d_small:+.3f} s"),
    ("hub peak memory < 60 MB in every phase", False if hub_peak >= 60 else (None if first_failed else True),
     f"hub max {hub_peak:.1f} MB over all runs incl. --json ({hub_peak_timed:.1f} MB in timed -q runs); "
     f"hub+serve %M max {tree_peak:.1f} MB" + ("; NOT MEASURED for a completed first sync into an empty peer"
                                               if first_failed else "")),
]
p("targets from the issue" + ("" if files >= 100000 else f" (they are stated for 100,000 files; this run has {files})") + ":")
for name, ok, detail in targets:
    p(f"  [{ {True: 'PASS', False: 'FAIL', None: 'N/A '}[ok] }] {name}: {detail}")
p("")
p("hubsync --json figures (peer replica; hub in brackets):")
def compact(sc):
    sc = sc or {}
    return f"files={sc.get('files')} hashed={sc.get('hashed_files')}/{sc.get('hashed_bytes')}B delta={sc.get('delta')} {sc.get('millis')}ms"
for n, f in figs.items():
    if f.get("error"):
        p(f"  {n:<14} no JSON document ({f['error']})")
        continue
    hubf = f["replicas"].get("hub", {})
    for label, r in f["replicas"].items():
        if label == "hub":
            continue
        p(f"  {n:<14} result={f['result']} exit={f['exit_code']} {f['seconds']:.3f}s plan={f['plan_items']} | "
          f"{label}: wire_sent={r['wire_sent']} wire_received={r['wire_received']} files_in={r['files_in']} "
          f"bytes_in={r['bytes_in']} deferred={r['deferred']} failed={r['failed_actions']} scan[{compact(r['scan'])}]"
          f" | hub: scan[{compact(hubf.get('scan'))}]")
    if f.get("warnings") or f.get("errors"):
        p(f"  {n:<14} warnings={f['warnings']} errors={f['errors']}")
p("")
ver = [l.rstrip("\n").split("\t") for l in open(os.path.join(out, "verify.txt"))]
bad = [v for v in ver if v[2] != "ok"]
p("peers match their hubs (names, sizes, mtimes [unison: within 2 us], modes; content after first and small): "
  + ("all ok" if not bad else "; ".join(f"{a}/{b}: {c}" for a, b, c in bad)))
p(f"total bench time {elapsed} s; raw runs in {out}/runs.tsv")
text = "\n".join(L) + "\n"
open(os.path.join(out, "summary.txt"), "w").write(text)
print(text, end="")
clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v
res = {
    "files": files, "tree_bytes": tree_bytes, "reps": reps, "seed": int(seed), "cpus": int(cpus),
    "filesystem": fstype, "fresh_fs_per_first_sync": fresh_fs == "1", "timeout_s": limit, "versions": {"hubsync": v_h, "unison": v_u, "rsync": v_r},
    "page_cache": "warm (not dropped); medians of warm runs",
    "stats": {f"{ph}/{t}": {k: clean(v) for k, v in s.items()} for (ph, t), s in stats.items()},
    "ratios": {ph: {k: clean(v) for k, v in rs.items()} for ph, rs in ratios.items()},
    "targets": [{"target": n, "pass": ok, "detail": d} for n, ok, d in targets],
    "hubsync_json": figs, "verify": ver, "elapsed_s": int(elapsed),
}
json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=1)
missed = any(ok is not True for _, ok, _ in targets)
sys.exit(1 if failed == "1" else (3 if strict == "1" and missed else 0))
EOF
drop_work
trap - EXIT
ssh_part "$LOCAL_RC"
