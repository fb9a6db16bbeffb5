#!/usr/bin/env bash
# Installs what the tests need (Debian packages) and runs every test: formatting,
# lints, unit and integration tests (including those against a real sshd on
# 127.0.0.1), the DokuWiki end-to-end test, and the benchmark and the
# fault-injection suite in their short modes.
# CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use, by the command that shows they are there.
declare -A wanted=(
  [/usr/sbin/sshd]=openssh-server
  [/usr/bin/ssh]=openssh-client
  [/usr/bin/ssh-keygen]=openssh-client
  [/usr/bin/rsync]=rsync
  [/usr/bin/unison]=unison
  [/usr/bin/time]=time
)
missing=()
for cmd in "${!wanted[@]}"; do
  [ -x "$cmd" ] || missing+=("${wanted[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
    echo "scripts/test.sh: missing packages: ${missing[*]} (and no root or sudo to install them)" >&2
    exit 1
  fi
  echo "scripts/test.sh: installing ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# sshd refuses to start without its privilege-separation directory.
if [ "$(id -u)" = 0 ]; then mkdir -p /run/sshd; fi
# The SSH tests fail, not skip, when sshd cannot run.
export HUBSYNC_REQUIRE_SSHD=1

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
# DokuWiki end to end: two real instances (Debian's package, fetched with
# apt-get download) synced over a loopback sshd, checked through their pages.
scripts/dokuwiki-e2e.sh
if [ -x scripts/bench.sh ]; then
  scripts/bench.sh --short
fi
# Fault injection (crashes, network faults, a full disk, concurrent writers), short mode.
if [ -x scripts/torture.sh ]; then
  scripts/torture.sh --short
fi
echo "scripts/test.sh: all tests passed"
