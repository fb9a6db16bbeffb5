#!/usr/bin/env bash
# Fault-injection suite for hubsync ("prove that nothing is lost").
#
# Three replicas (a hub, an SSH peer, a local peer) of a tree of a few thousand
# self-checking files (each carries its own length and checksum), and faults:
#   crash-hub    kill -9 of the hub at a random moment of a run with a batch of
#                creates, edits, deletes and conflicts on all three replicas
#   crash-serve  the same, killing a `serve` (the SSH peer's or the local child)
#   net-stop     the SSH peer's sshd stopped (SIGSTOP) mid-transfer
#   net-silent   the SSH peer accepts TCP but never answers (sshd stopped before)
#   net-cut      the link to the SSH peer taken down mid-transfer (the hub and the
#                peer's sshd in two network namespaces joined by a veth pair)
#   disk-full    a receiving replica's filesystem (a small tmpfs) fills up mid-run:
#                in turn the SSH peer's and the hub's own
#   writers      a writer rewriting files on all replicas (temp + rename, and in
#                place) at ~100 writes/s while a run starts every 2 s
# After each trial hubsync runs again (the recovery) and the suite checks: every
# replica converges (and a further run plans nothing), every version the batch
# wrote is in a final tree or in some replica's .hubsync/conflicts/ unless the
# batch itself replaced it, nothing the batch did not delete is gone, no file
# anywhere holds content that was never written whole, no .hubsync.*.tmp is left
# outside .hubsync, no hubsync process and so no lock is left behind.
#
# Usage: scripts/torture.sh [--short] [--seed N] [--only KIND[,KIND...]] [--keep]
#   --short   CI mode: a handful of trials of every kind, a few minutes
#             (default: the release mode, >= 100 crash trials, under 45 minutes)
#   --seed N  reproduce a run (the seed is printed at the start and the end)
#   --only    run only these kinds (see above)
#   --keep    keep the work directory (it is always kept after a failure)
# Environment: HUBSYNC = the binary to test (default: cargo build --release here);
#   TORTURE_STOP_ON_FAIL=1 stops at the first failed trial, its replicas as it left
#   them; TORTURE_SERVE_TARGET=1|2 aims crash-serve at one peer's serve;
#   TORTURE_AGAIN=P kills the run after a crash too with probability P (0.25).
# A failed trial leaves WORK/trial-N-runs.log: every run of it, with -v output.
# Exits 0 only if no trial failed and nothing was lost. Needs root (network
# namespaces, tmpfs); installs missing Debian packages itself.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
ARGS=("$@")
KEEP=0
for a in "$@"; do
  case "$a" in
    -h|--help) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --keep) KEEP=1 ;;
  esac
done
say() { printf 'torture: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  say "needs root (network namespaces, tmpfs mounts)"
  exit 1
fi

# ---------------------------------------------------------------- prerequisites
declare -A wanted=(
  [/usr/sbin/sshd]=openssh-server
  [/usr/bin/ssh]=openssh-client
  [/usr/bin/ssh-keygen]=openssh-client
  [ip]=iproute2
  [python3]=python3
  [mount]=mount
  [setsid]=util-linux
)
missing=()
for cmd in "${!wanted[@]}"; do
  if [[ $cmd == /* ]]; then [ -x "$cmd" ] || missing+=("${wanted[$cmd]}")
  else command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
mkdir -p /run/sshd

if [ -z "${HUBSYNC:-}" ]; then
  say "building hubsync (cargo build --release in $REPO)"
  (cd "$REPO" && cargo build --release --locked --quiet)
  HUBSYNC="${CARGO_TARGET_DIR:-$REPO/target}/release/hubsync"
fi
HUBSYNC="$(realpath "$HUBSYNC")"
[ -x "$HUBSYNC" ] || { say "no executable at $HUBSYNC"; exit 1; }
export HUBSYNC

# ---------------------------------------------------------------- the test bed
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hubsync-torture.XXXXXX")"
NS_HUB="hstort-h$$"
NS_PEER="hstort-p$$"
# The veth pair's private addresses exist only inside the two namespaces.
ADDR_HUB=10.213.47.1
ADDR_PEER=10.213.47.2
NS_PORT=2222
SSHD_PIDS=()
MOUNTS=()
status=1

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local pid m
  for pid in "${SSHD_PIDS[@]}"; do kill -CONT -- "-$pid" 2>/dev/null || true; kill -TERM -- "-$pid" 2>/dev/null || true; done
  ip netns del "$NS_HUB" 2>/dev/null || true
  ip netns del "$NS_PEER" 2>/dev/null || true
  for m in "${MOUNTS[@]}"; do umount -l "$m" 2>/dev/null || true; done
  if [ "$status" = 0 ] && [ "$KEEP" = 0 ]; then
    rm -rf "$WORK"
  else
    say "work directory kept: $WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source-path=SCRIPTDIR source=lib/sshd.sh
. "$HERE/lib/sshd.sh"

# Two loopback servers, so that stopping one (the faulty peer's) leaves the other.
sshd_start "$WORK/sshd-a"
SSHD_PIDS+=("$SSHD_PID")
export SSH_A_PORT=$SSH_PORT SSH_A_PID=$SSHD_PID
sshd_start "$WORK/sshd-b"
SSHD_PIDS+=("$SSHD_PID")
export SSH_B_PORT=$SSH_PORT SSH_B_PID=$SSHD_PID
# One client key for all servers: b's accepts a's key too.
cat "$WORK/sshd-a/id_ed25519.pub" >>"$WORK/sshd-b/authorized_keys"
KNOWN="$WORK/known_hosts"
cat "$WORK/sshd-a/known_hosts" "$WORK/sshd-b/known_hosts" >"$KNOWN"
export SSH_USER SSH_KEY="$WORK/sshd-a/id_ed25519" SSH_KNOWN_HOSTS="$KNOWN"

# Two network namespaces joined by a veth pair: the hub runs in one, the peer's sshd
# in the other. Taking a link down cuts every connection between them.
ip netns add "$NS_HUB"
ip netns add "$NS_PEER"
ip link add hst-h$$ netns "$NS_HUB" type veth peer name hst-p$$ netns "$NS_PEER"
ip -n "$NS_HUB" addr add "$ADDR_HUB/30" dev "hst-h$$"
ip -n "$NS_PEER" addr add "$ADDR_PEER/30" dev "hst-p$$"
for ns in "$NS_HUB" "$NS_PEER"; do ip -n "$ns" link set lo up; done
ip -n "$NS_HUB" link set "hst-h$$" up
ip -n "$NS_PEER" link set "hst-p$$" up
NSD="$WORK/sshd-ns"
mkdir -p "$NSD"
cp "$WORK/sshd-a/host_key" "$WORK/sshd-a/host_key.pub" "$WORK/sshd-a/authorized_keys" "$NSD/"
sed -e "s|^ListenAddress .*|ListenAddress $ADDR_PEER:$NS_PORT|" \
    -e "s|$WORK/sshd-a/|$NSD/|g" "$WORK/sshd-a/sshd_config" >"$NSD/sshd_config"
ip netns exec "$NS_PEER" setsid /usr/sbin/sshd -D -e -f "$NSD/sshd_config" >>"$NSD/sshd.log" 2>&1 &
SSHD_PIDS+=("$!")
export SSH_NS_PID=$! SSH_NS_PORT=$NS_PORT NS_HUB NS_PEER ADDR_PEER
export NS_HUB_DEV="hst-h$$"
echo "[$ADDR_PEER]:$NS_PORT $(cut -d' ' -f1,2 "$NSD/host_key.pub")" >>"$KNOWN"
ready=0
for _ in $(seq 100); do
  if ip netns exec "$NS_HUB" timeout 1 bash -c "exec 3<>/dev/tcp/$ADDR_PEER/$NS_PORT; head -c 8 <&3" 2>/dev/null | grep -q '^SSH-2.0-'; then
    ready=1; break
  fi
  sleep 0.1
done
[ "$ready" = 1 ] || { say "the namespace's sshd did not start (see $NSD/sshd.log)"; exit 1; }

# Small filesystems for the disk-full trials: one for a peer's root, one for the hub's.
for fs in small small2; do
  mkdir -p "$WORK/$fs"
  mount -t tmpfs -o size=48m,mode=0755 hubsync-torture "$WORK/$fs"
  MOUNTS+=("$WORK/$fs")
done
export SMALL_FS="$WORK/small" SMALL_FS2="$WORK/small2" WORK

set +e
python3 "$HERE/torture/engine.py" "${ARGS[@]}"
status=$?
set -e
exit "$status"
