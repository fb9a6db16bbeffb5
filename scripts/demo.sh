#!/usr/bin/env bash
# Builds hubsync and runs a real sync of three sample directories: a first sync,
# then edits on every replica (one of them a conflict), shown first as a dry run
# and then carried out. Needs only Rust. Leaves the sample under $DEMO_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
hubsync="$PWD/target/release/hubsync"
demo="${DEMO_DIR:-$(mktemp -d /tmp/hubsync-demo.XXXXXX)}"
mkdir -p "$demo"
cd "$demo"
rm -rf web1 web2 web3
mkdir -p web1/data/pages/wiki web2/data/pages web3
printf 'Welcome to the wiki.\n' > web1/data/pages/wiki/start.txt
printf 'Rules of the house.\n' > web2/data/pages/rules.txt
mkdir -p web1/data/cache && printf 'rendered\n' > web1/data/cache/x.xhtml

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
run() { say "$@"; "$@" 2>&1 || echo "(exit $?)"; }
tree() { (cd "$1" && find . -path ./.hubsync -prune -o -type f -printf '%p  %s bytes  %TY-%Tm-%Td %TH:%TM:%.10TS\n' | sort); }

run "$hubsync" sync --exclude 'data/cache/**' web1 web2 web3
for r in web1 web2 web3; do echo "== $r"; tree "$r"; done

# Edits on all three replicas within one interval: a new page on web2, an edit on
# web3, and the same page edited on web1 and web3 (a conflict).
printf 'A new page.\n' > web2/data/pages/new.txt
printf 'Welcome (edited on web1).\n' > web1/data/pages/wiki/start.txt
sleep 1
printf 'Welcome (edited on web3, later).\n' > web3/data/pages/wiki/start.txt
rm web1/data/pages/rules.txt

run "$hubsync" sync --dry-run --exclude 'data/cache/**' web1 web2 web3
run "$hubsync" sync -v --exclude 'data/cache/**' web1 web2 web3
for r in web1 web2 web3; do echo "== $r"; tree "$r"; done
say "find . -path '*conflicts*' -type f"
find . -path '*conflicts*' -type f -exec sh -c 'echo "{}: $(cat "{}")"' \;
run "$hubsync" sync --exclude 'data/cache/**' web1 web2 web3
echo
echo "The sample is in $demo"
