#!/usr/bin/env bash
# End-to-end test of hubsync against two real DokuWiki instances.
#
# Debian's `dokuwiki` package (2022-07-31b "Igor") is fetched with `apt-get download`
# and unpacked with dpkg (nothing installed system-wide, no web server): instances A
# and B each get their own code, conf and data dir and run under `php -S` on loopback.
# Pages are saved and media uploaded over HTTP with curl (login, sectok from the form,
# POST), A's data dir (the hub, local) is synced with B's (a peer reached over a
# private sshd on 127.0.0.1), and the results are checked through DokuWiki's own
# pages (?do=revisions, ?do=recent, "Last modified ... by USER", search) on both.
#
# Usage: scripts/dokuwiki-e2e.sh [--keep] [--mode auto|profile|merge|plain]
#   --keep        leave the work dir (instances, logs, HTML) for inspection
#   --mode        how hubsync is told about DokuWiki (default auto: the first it supports)
#                   profile  `--profile dokuwiki`
#                   merge    cache excludes + a config file with [[merge]] line-union
#                            rules for *.changes
#                   plain    cache excludes only (--no-profile is the same)
# Environment:
#   HUBSYNC       the hubsync binary (default: `cargo build` this repo, target/debug)
#   DOKUWIKI_DEB_CACHE  where the .debs are kept (default ~/.cache/hubsync-dokuwiki)
# Exits 0 only if every assertion passed. Installs missing Debian packages as root.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
DWHTML=("python3" "$HERE/dokuwiki/dwhtml.py")
# free_port, sshd_start (a private sshd on 127.0.0.1)
# shellcheck source=SCRIPTDIR/lib/sshd.sh
. "$HERE/lib/sshd.sh"
KEEP=0
MODE=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --no-profile) MODE=plain ;;
    --mode) MODE=${2:-}; shift ;;
    --mode=*) MODE=${1#--mode=} ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "dokuwiki-e2e: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
case "$MODE" in auto|profile|merge|plain) ;; *) echo "dokuwiki-e2e: --mode auto|profile|merge|plain" >&2; exit 2 ;; esac
START_TIME=$(date +%s)
log() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
info() { printf '   %s\n' "$*"; }
die() { echo "dokuwiki-e2e: $*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites
declare -A wanted=(
  [php]=php-cli [curl]=curl [python3]=python3 [ssh-keygen]=openssh-client
  [/usr/sbin/sshd]=openssh-server [dpkg-deb]=dpkg
)
missing=()
for cmd in "${!wanted[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
done
# PHP extensions DokuWiki uses: xml (dom/xml), mbstring (utf8), gd (media), intl.
if command -v php >/dev/null 2>&1; then
  mods="$(php -m 2>/dev/null | tr 'A-Z' 'a-z')"
  for ext in xml:php-xml mbstring:php-mbstring gd:php-gd intl:php-intl; do
    grep -qx "${ext%%:*}" <<<"$mods" || missing+=("${ext#*:}")
  done
else
  missing+=(php-xml php-mbstring php-gd php-intl)
fi
SUDO=()
[ "$(id -u)" = 0 ] || SUDO=(sudo)
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  log "installing ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
# sshd refuses to start without its privilege-separation directory.
"${SUDO[@]}" mkdir -p /run/sshd

if [ -z "${HUBSYNC:-}" ]; then
  log "building hubsync (cargo build in $REPO)"
  (cd "$REPO" && cargo build --quiet)
  HUBSYNC="${CARGO_TARGET_DIR:-$REPO/target}/debug/hubsync"
fi
HUBSYNC="$(cd "$(dirname "$HUBSYNC")" && pwd)/$(basename "$HUBSYNC")"  # sshd needs an absolute path
[ -x "$HUBSYNC" ] || die "no hubsync binary at $HUBSYNC"

# ---------------------------------------------------------------- work dir, cleanup
W="$(mktemp -d /tmp/dokuwiki-e2e.XXXXXX)"
echo "dokuwiki-e2e: work dir $W (kept with --keep)"
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$KEEP" = 1 ]; then
    echo "dokuwiki-e2e: left $W"
  else
    rm -rf "$W"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {  # PORT: wait until something listens (5 s)
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}

# ---------------------------------------------------------------- Debian packages
CACHE="${DOKUWIKI_DEB_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/hubsync-dokuwiki}"
mkdir -p "$CACHE"
DEBS=(dokuwiki php-phpseclib php-geshi libphp-simplepie)
need_download=()
for p in "${DEBS[@]}"; do
  compgen -G "$CACHE/${p}_*.deb" >/dev/null || need_download+=("$p")
done
download() { (cd "$CACHE" && apt-get download -q "$@") >"$W/apt-download.log" 2>&1; }
if [ ${#need_download[@]} -gt 0 ]; then
  log "apt-get download ${need_download[*]} into $CACHE"
  if ! download "${need_download[@]}"; then
    "${SUDO[@]}" apt-get update -qq
    download "${need_download[@]}" || { cat "$W/apt-download.log" >&2; die "apt-get download failed"; }
  fi
fi
X="$W/unpacked"
for p in "${DEBS[@]}"; do
  deb="$(ls "$CACHE/${p}"_*.deb 2>/dev/null | sort -V | tail -1)"
  [ -n "$deb" ] || die "apt-get download $p failed"
  mkdir -p "$X/$p"
  dpkg-deb -x "$deb" "$X/$p"
done
DWVERSION="$(cat "$X/dokuwiki/usr/share/dokuwiki/VERSION")"
info "DokuWiki $DWVERSION from $(basename "$(ls "$CACHE"/dokuwiki_*.deb | sort -V | tail -1)")"

# ---------------------------------------------------------------- instances
# Users are the same on both nodes (conf/ is deployed, not synced).
make_users() {  # prints users.auth.php
  echo "# users.auth.php written by dokuwiki-e2e.sh"
  for u in alice bob; do
    php -r 'echo $argv[1].":".password_hash($argv[1]."-pw", PASSWORD_BCRYPT).":".ucfirst($argv[1])." Example:".$argv[1]."@example.com:user\n";' "$u"
  done
}
make_users >"$W/users.auth.php"

# make_instance NAME PORT: code in $W/NAME/www, data in $W/NAME/data
make_instance() {
  local name=$1 port=$2 d="$W/$1"
  local www="$d/www" data="$d/data"
  mkdir -p "$d/sessions"
  cp -a "$X/dokuwiki/usr/share/dokuwiki" "$www"
  rm -f "$www/.htaccess" "$www/lib/tpl" "$www/lib/plugins"
  cp -a "$X/dokuwiki/var/lib/dokuwiki/lib/tpl" "$X/dokuwiki/var/lib/dokuwiki/lib/plugins" "$www/lib/"
  # Debian's preload.php hard-codes /etc/dokuwiki; without it DOKU_CONF is www/conf/.
  rm -f "$www/inc/preload.php"
  # The PHP libraries DokuWiki's package depends on, unpacked under vendor/debian.
  mkdir -p "$www/vendor/debian"
  cp -a "$X/php-phpseclib/usr/share/php/phpseclib" "$www/vendor/debian/phpseclib"
  cp -a "$X/php-geshi/usr/share/php-geshi" "$www/vendor/debian/php-geshi"
  cp -a "$X/libphp-simplepie/usr/share/php/simplepie" "$www/vendor/debian/simplepie"
  sed -i -e "s#\$vendorDir \. '/usr/share/php/#'$www/vendor/debian/#g" \
         -e "s#/usr/share/php/#$www/vendor/debian/#g" \
         -e "s#/usr/share/php-geshi/#$www/vendor/debian/php-geshi/#g" \
    "$www"/vendor/composer/autoload_*.php "$www/inc/load.php" "$www/inc/parserutils.php"
  # conf: Debian's /etc/dokuwiki plus our users, ACL and local.php
  cp -a "$X/dokuwiki/etc/dokuwiki" "$www/conf"
  rm -f "$www/conf/acl.auth.php" "$www/conf/users.auth.php"
  cp "$W/users.auth.php" "$www/conf/users.auth.php"
  printf '%s\n' '# acl.auth.php written by dokuwiki-e2e.sh' \
    '*               @ALL        1' '*               @user       16' >"$www/conf/acl.auth.php"
  cat >"$www/conf/local.php" <<EOF
<?php
\$conf['title']       = 'e2e $name';
\$conf['savedir']     = '$data';
\$conf['useacl']      = 1;
\$conf['authtype']    = 'authplain';
\$conf['superuser']   = '@admin';
\$conf['dformat']     = '%Y-%m-%d %H:%M:%S';
\$conf['dnslookups']  = 0;
\$conf['updatecheck'] = 0;
\$conf['usedraft']    = 0;
\$conf['userewrite']  = 0;
\$conf['recent']      = 100;
// The cookie name includes the server port when securecookie is on; behind one
// load balancer both nodes see the same port, here they have different ones.
\$conf['securecookie'] = 0;
EOF
  # data: the package's skeleton without its sample pages and media
  mkdir -p "$data"
  for sub in attic cache index locks log media media_attic media_meta meta pages tmp; do
    mkdir -p "$data/$sub"
  done
  # php -S, with this instance's own PHP session dir (no shared session storage)
  # (PHP_CLI_SERVER_WORKERS: serve several requests at once, like a real web server)
  PHP_CLI_SERVER_WORKERS=4 setsid php -S "127.0.0.1:$port" -t "$www" \
    -d session.save_path="$d/sessions" -d display_errors=0 -d log_errors=1 \
    -d error_log="$d/php-errors.log" -d upload_max_filesize=8M \
    >"$d/php-server.log" 2>&1 &
  PIDS+=($!)
  wait_port "$port" || die "php -S for $name did not start (see $d/php-server.log)"
}

PORT_A=$(free_port); PORT_B=$(free_port)
while [ "$PORT_B" = "$PORT_A" ]; do PORT_B=$(free_port); done
log "starting DokuWiki A on 127.0.0.1:$PORT_A and B on 127.0.0.1:$PORT_B"
make_instance A "$PORT_A"
make_instance B "$PORT_B"
declare -A URL=([A]="http://127.0.0.1:$PORT_A" [B]="http://127.0.0.1:$PORT_B")
DATA_A="$W/A/data"; DATA_B="$W/B/data"

# ---------------------------------------------------------------- sshd on loopback
S="$W/ssh"
sshd_start "$S" || die "sshd did not start (see $S/sshd.log)"
PIDS+=("$SSHD_PID")
info "sshd on 127.0.0.1:$SSH_PORT (log $S/sshd.log)"

# ---------------------------------------------------------------- hubsync
SYNC_ARGS=(--identity "$SSH_KEY" --known-hosts "$SSH_KNOWN_HOSTS" --remote-command "$HUBSYNC")
CACHE_EXCLUDES=()
for g in 'cache/**' 'index/**' 'locks/**' 'tmp/**' 'log/**' '*.indexed' 'meta/*.trimmed' 'meta/*_tmp'; do
  CACHE_EXCLUDES+=(--exclude "$g")
done
# A config file with only [[merge]] rules (the root and the peer come from the command line).
cat >"$W/merge.toml" <<'EOF'
[[merge]]
glob = "**/*.changes"
sort_by_leading_number = true
same_entry_fields = [1, 4]
prefer_nonempty_field = 5
EOF
has_profile() { "$HUBSYNC" sync --help 2>/dev/null | grep -q -- --profile; }
has_merge() {
  mkdir -p "$W/probe/a" "$W/probe/b"
  "$HUBSYNC" sync -n -q -c "$W/merge.toml" "$W/probe/a" "$W/probe/b" >/dev/null 2>&1
}
if [ "$MODE" = auto ]; then
  if has_profile; then MODE=profile; elif has_merge; then MODE=merge; else MODE=plain; fi
fi
case "$MODE" in
  profile) has_profile || die "this hubsync has no --profile"
           PROFILE_MODE="--profile dokuwiki"; SYNC_ARGS+=(--profile dokuwiki) ;;
  merge)   has_merge || die "this hubsync takes no [[merge]] rules"
           PROFILE_MODE="no --profile: cache excludes + [[merge]] line-union of **/*.changes"
           SYNC_ARGS+=(-c "$W/merge.toml" "${CACHE_EXCLUDES[@]}") ;;
  plain)   PROFILE_MODE="no --profile: cache excludes only"; SYNC_ARGS+=("${CACHE_EXCLUDES[@]}") ;;
esac
info "hubsync: $HUBSYNC ($PROFILE_MODE)"
SYNCS=0
sync_now() {  # one hubsync run: A (hub) <-> B over ssh
  SYNCS=$((SYNCS + 1))
  local out="$W/sync-$SYNCS.log" rc=0
  "$HUBSYNC" sync -v "${SYNC_ARGS[@]}" "$DATA_A" "ssh://$SSH_USER@127.0.0.1:$SSH_PORT$DATA_B" \
    >"$out" 2>&1 || rc=$?
  info "sync #$SYNCS (exit $rc): $(grep -v '^ ' "$out" | tail -1)"
  grep '^hubsync: conflict' "$out" | sed "s#$W/##g; s/^/     /" || true
  if [ "$rc" != 0 ]; then sed 's/^/     | /' "$out"; fi
  return 0
}

# ---------------------------------------------------------------- HTTP with curl
# One cookie jar per node and user: $W/jar-NODE-USER. Pages are saved to $W/http/.
H="$W/http"; mkdir -p "$H"
echo 0 >"$H/.n"
next_req() { NREQ=$(( $(cat "$H/.n") + 1 )); echo "$NREQ" >"$H/.n"; }  # works in $(...) too
# get NODE USER QUERY -> prints the path of the saved response body
get() {
  local node=$1 user=$2 q=$3 jar="$W/jar-$1-$2"
  next_req
  local out="$H/$NREQ-$node-$user.html"
  curl -sS -o "$out" -c "$jar" -b "$jar" "${URL[$node]}/$q" || die "GET $node $q failed"
  echo "$out"
}
# post NODE USER PATH BODYFILE -> prints the HTTP status
post() {
  local node=$1 user=$2 path=$3 body=$4 jar="$W/jar-$1-$2"
  next_req
  curl -sS -o "$H/$NREQ-$node-$user-post.html" -w '%{http_code}' -c "$jar" -b "$jar" \
    -H 'Content-Type: application/x-www-form-urlencoded' --data-binary "@$body" \
    "${URL[$node]}/$path" || die "POST $node $path failed"
}
view() { get "$1" "${3:-anon}" "doku.php?id=$2"; }          # view NODE PAGE [USER]
login() {  # login NODE USER
  local node=$1 user=$2 f
  rm -f "$W/jar-$node-$user"
  f=$(get "$node" "$user" "doku.php?id=start&do=login")
  "${DWHTML[@]}" form dw__login "u=$user" "p=$user-pw" <"$f" >"$W/body"
  local code; code=$(post "$node" "$user" "doku.php?id=start&do=login" "$W/body")
  grep -q $'\tDW[0-9a-f]\{32\}\t' "$W/jar-$node-$user" \
    || die "login of $user on $node failed (HTTP $code, no DW cookie)"
}
# save NODE USER PAGE SUMMARY TEXT  (empty TEXT deletes the page)
save() {
  local node=$1 user=$2 page=$3 summary=$4 text=$5 f code
  f=$(get "$node" "$user" "doku.php?id=$page&do=edit")
  grep -q 'id="dw__editform"' "$f" || die "no edit form for $page on $node as $user ($f)"
  printf '%s' "$text" >"$W/wikitext"
  "${DWHTML[@]}" form dw__editform "wikitext=@$W/wikitext" "summary=$summary" 'do[save]=1' <"$f" >"$W/body"
  code=$(post "$node" "$user" "doku.php" "$W/body")
  [ "$code" = 302 ] || [ "$code" = 303 ] \
    || die "saving $page on $node as $user: HTTP $code, not a redirect ($H/$(cat "$H/.n")-$node-$user-post.html)"
}
# upload NODE USER NAMESPACE FILE MEDIANAME
upload() {
  local node=$1 user=$2 ns=$3 file=$4 name=$5 f tok jar="$W/jar-$1-$2"
  f=$(get "$node" "$user" "doku.php?id=start&do=media&ns=$ns")
  tok=$("${DWHTML[@]}" field sectok <"$f")
  next_req
  local code
  code=$(curl -sS -o "$H/$NREQ-$node-$user-upload.html" -w '%{http_code}' -c "$jar" -b "$jar" \
    -F "sectok=$tok" -F "ns=$ns" -F "mediaid=$name" -F "upload=@$file" \
    "${URL[$node]}/lib/exe/mediamanager.php?ns=$ns")
  [ "$code" = 200 ] || [ "$code" = 302 ] || die "upload of $name on $node: HTTP $code"
}
index_page() { get "$1" anon "lib/exe/taskrunner.php?id=$2" >/dev/null; }   # index_page NODE PAGE

# ---------------------------------------------------------------- reading DokuWiki's pages
parse() { "${DWHTML[@]}" "$@"; }
revs() { parse revisions <"$(get "$1" anon "doku.php?id=$2&do=revisions")"; }   # revs NODE PAGE
recent() { parse recent <"$(get "$1" anon "doku.php?id=start&do=recent${3:-}")"; }  # recent NODE - [QUERY]
lastmod() { parse lastmod <"$(view "$1" "$2")"; }                                 # lastmod NODE PAGE
rendered() { parse content <"$(view "$1" "$2")"; }                                # rendered NODE PAGE
raw() { curl -sS "${URL[$1]}/doku.php?id=$2&do=export_raw"; }                     # raw NODE PAGE
search() { parse search <"$(get "$1" anon "doku.php?id=start&do=search&q=$2")"; }  # search NODE WORD
status_of() { curl -s -o /dev/null -w '%{http_code}' "${URL[$1]}/doku.php?id=$2"; }
# "exists" or "missing", as DokuWiki's view of PAGE on NODE says
existence() { if rendered "$1" "$2" | grep -q 'does not exist'; then echo missing; else echo exists; fi; }

# show_revs LABEL NODE PAGE: the revisions list as DokuWiki renders it, then parsed
show_revs() {
  local f; f=$(get "$2" anon "doku.php?id=$3&do=revisions")
  echo "   [$1] $2 ?id=$3&do=revisions:"
  # one <li> a line, without the checkbox, icons and diff links
  parse snippet revisions <"$f" | sed -e 's#<input [^>]*/> *##g' -e 's#<img [^>]*/> *##g' \
    -e 's#<a [^>]*class="diff_link"></a> *##g' -e 's#</li>#</li>\n#g' \
    | sed -e '/^$/d' -e 's/^/     html| /'
  parse revisions <"$f" | sed 's/^/     list| /'
}
# show_recent LABEL NODE REGEX [QUERY]: the recent-changes entries matching REGEX
show_recent() {
  local f; f=$(get "$2" anon "doku.php?id=start&do=recent${4:-}")
  echo "   [$1] $2 ?do=recent${4:-} (entries matching $3):"
  parse snippet recent <"$f" | sed -e 's#<input [^>]*/> *##g' -e 's#<img [^>]*/> *##g' \
    -e 's#<a [^>]*class="\(diff\|revisions\)_link"></a> *##g' -e 's#</li>#</li>\n#g' \
    | grep -- "$3" | sed -e 's/^<ul >//' -e 's/^/     html| /' || true
  parse recent <"$f" | { grep -- "$3" || true; } | sed 's/^/     list| /'
}
ev() { sed 's/^/     | /'; }          # evidence, indented

PASSED=(); FAILED=()
pass() { PASSED+=("$1"); printf '\033[32mPASS\033[0m %s\n' "$1"; }
fail() { FAILED+=("$1"); printf '\033[31mFAIL\033[0m %s\n' "$1"; }
# check NAME COMMAND...: PASS if the command succeeds
check() { local name=$1; shift; if "$@"; then pass "$name"; else fail "$name"; fi; }

# The "(external edit)" marks DokuWiki shows when a page's mtime and changelog disagree.
no_external_edit() {  # no_external_edit FILE...: fails (and prints) if any mentions it
  if grep -il 'external edit\|127\.0\.0\.1' "$@" >/dev/null 2>&1; then
    grep -i 'external edit\|127\.0\.0\.1' "$@" | ev; return 1
  fi
}
same_lists() {  # same_lists FILE_A FILE_B
  if cmp -s "$1" "$2"; then return 0; fi
  diff -u --label A --label B "$1" "$2" | ev; return 1
}
contains() {  # contains FILE REGEX [LABEL]
  grep -q -- "$2" "$1" && return 0
  echo "${3:-$1} lacks /$2/:" | ev; ev <"$1"; return 1
}
# meta_info DATA PAGEPATH: mtimes of the page, its .indexed, and .meta's last_change
meta_info() {
  local d=$1 p=$2
  printf 'page mtime %s, .indexed mtime %s, .meta last_change: %s' \
    "$(stat -c %Y "$d/pages/$p.txt" 2>/dev/null || echo -)" "$(stat -c %Y "$d/meta/$p.indexed" 2>/dev/null || echo -)" \
    "$(php -r '$m = @unserialize(@file_get_contents($argv[1])); $c = $m["current"]["last_change"] ?? null;
      echo is_array($c) ? "date=".$c["date"]." user=".($c["user"] === "" ? "(empty)" : $c["user"])." sum=".$c["sum"] : var_export($c, true);' \
      "$d/meta/$p.meta")"
}
error_log_lines() { { cat "$1"/log/error/*.log 2>/dev/null || true; } | wc -l; }
# empty_user_lines DATA PAGEPATH: changelog lines whose user field is empty
empty_user_lines() { awk -F'\t' '$5 == ""' "$1/meta/$2.changes" 2>/dev/null; }

T="$W/t"; mkdir -p "$T"   # parsed lists, per step
# ================================================================ setup
log "setup: alice creates pages on A, first sync to the empty B"
login A alice
save A alice e2e:shared "shared created" "A page both nodes will edit."
save A alice e2e:stale "stale created" "Fruit list: apple, banana."
save A alice e2e:doomed "doomed created" "This page will be deleted."
save A alice e2e:busy "busy created" "Viewed while being synced, version 0."
save A alice e2e:zombie "zombie created" "Edited on B, then deleted on A."
sync_now
login A bob
login B alice
login B bob

# ================================================================ 1. edit on A shows on B
log "1. an edit on A appears on B with the right author, no external edit, same revisions"
save A alice e2e:one "one created on A" "First version, by alice on A."
sleep 1
save A alice e2e:one "one edited on A" "Second version, by alice on A. Word: ocelot."
show_revs before-sync A e2e:one
sync_now
show_revs after-sync A e2e:one
show_revs after-sync B e2e:one
check1() {  # check1 ROUND WORD
  local r=$1 word=$2 n
  for n in A B; do
    lastmod "$n" e2e:one >"$T/1$r-lastmod-$n"; revs "$n" e2e:one >"$T/1$r-revs-$n"
    recent "$n" >"$T/1$r-recent-$n"; rendered "$n" e2e:one >"$T/1$r-content-$n"
  done
  info "B: $(cat "$T/1$r-lastmod-B")"
  check "1$r. B renders A's edit (\"$word\")" contains "$T/1$r-content-B" "$word" "B's e2e:one"
  check "1$r. B's \"Last modified\" line names alice" contains "$T/1$r-lastmod-B" ' by alice$' "B's docInfo"
  check "1$r. A's \"Last modified\" line names alice" contains "$T/1$r-lastmod-A" ' by alice$' "A's docInfo"
  check "1$r. no external edit on A or B (last modified, revisions, recent changes)" \
    no_external_edit "$T/1$r-lastmod-A" "$T/1$r-lastmod-B" "$T/1$r-revs-A" "$T/1$r-revs-B" \
    "$T/1$r-recent-A" "$T/1$r-recent-B"
  check "1$r. revisions of e2e:one identical on A and B" same_lists "$T/1$r-revs-A" "$T/1$r-revs-B"
}
check1 a ocelot
# B has now viewed (rendered) the page; A edits it again a second later.
sleep 1
save A alice e2e:one "one edited again on A" "Third version, by alice on A. Word: pangolin."
sync_now
show_revs after-sync B e2e:one
check1 b pangolin

# ================================================================ 6. cookies
log "6. a login cookie obtained from A is accepted by B"
cp "$W/jar-A-alice" "$W/jar-B-fromA"
f=$(get B fromA "doku.php?id=e2e:one")
who=$(parse loggedin <"$f")
info "B with A's cookies shows: ${who:-(not logged in)}"
f2=$(get B fromA "doku.php?id=e2e:cookie&do=edit")   # (leaves an edit lock on that page only)
nobody=$(parse loggedin <"$(get B nobody "doku.php?id=e2e:one")")
info "(control: B without those cookies shows: ${nobody:-(not logged in)})"
check "6. B accepts alice's login cookie from A (logged in, edit form offered)" \
  bash -c '[[ "$1" == *alice* ]] && grep -q "id=\"dw__editform\"" "$2"' _ "$who" "$f2"

# ================================================================ 2. different pages, one interval
log "2. different pages edited on A (alice) and B (bob) in one interval"
save A alice e2e:alpha "alpha by alice on A" "Alpha page, written on A."
save B bob e2e:beta "beta by bob on B" "Beta page, written on B."
show_recent before-sync A 'e2e:\(alpha\|beta\)'
show_recent before-sync B 'e2e:\(alpha\|beta\)'
sync_now
show_recent after-sync A 'e2e:\(alpha\|beta\)'
show_recent after-sync B 'e2e:\(alpha\|beta\)'
for n in A B; do
  recent "$n" >"$T/2-recent-$n"
  for p in alpha:alice beta:bob; do
    raw "$n" "e2e:${p%%:*}" >"$T/2-raw-$n-${p%%:*}"
    lastmod "$n" "e2e:${p%%:*}" >"$T/2-lastmod-$n-${p%%:*}"
  done
done
check "2. both edits on both servers (alpha by alice, beta by bob)" bash -c '
  for n in A B; do
    grep -q "Alpha page, written on A" "$1/2-raw-$n-alpha" && grep -q " by alice$" "$1/2-lastmod-$n-alpha" \
      && grep -q "Beta page, written on B" "$1/2-raw-$n-beta" && grep -q " by bob$" "$1/2-lastmod-$n-beta" \
      || { echo "$n: alpha: $(cat "$1/2-lastmod-$n-alpha"); beta: $(cat "$1/2-lastmod-$n-beta")" | sed "s/^/     | /"; exit 1; }
  done' _ "$T"
for n in A B; do
  check "2. recent changes on $n list both (alpha by alice, beta by bob)" bash -c '
    grep -q "| e2e:alpha | alpha by alice on A | alice$" "$1" && grep -q "| e2e:beta | beta by bob on B | bob$" "$1" \
      || { grep "e2e:\(alpha\|beta\)" "$1" | sed "s/^/     | /"; exit 1; }' _ "$T/2-recent-$n"
done

# ================================================================ 3. same page, one interval
log "3. the same page edited on A (alice), then on B (bob), in one interval"
errs_a=$(error_log_lines "$DATA_A"); errs_b=$(error_log_lines "$DATA_B")
save A alice e2e:shared "shared: alice on A" "Alice's text, written on A."
sleep 1
save B bob e2e:shared "shared: bob on B" "Bob's text, written on B a second later."
show_revs before-sync A e2e:shared
show_revs before-sync B e2e:shared
sync_now
show_revs after-sync A e2e:shared
show_revs after-sync B e2e:shared
for n in A B; do
  raw "$n" e2e:shared >"$T/3-raw-$n"; lastmod "$n" e2e:shared >"$T/3-lastmod-$n"
  revs "$n" e2e:shared >"$T/3-revs-$n"
  info "$n: $(cat "$T/3-lastmod-$n") -- text: $(cat "$T/3-raw-$n")"
done
for n in A B; do
  check "3. bob's text is current on $n, last modified by bob" bash -c '
    grep -q "^Bob'"'"'s text" "$1" && grep -q " by bob$" "$2" \
      || { cat "$1" "$2" | sed "s/^/     | /"; exit 1; }' _ "$T/3-raw-$n" "$T/3-lastmod-$n"
  check "3. alice's edit is a normal revision in $n's history" \
    contains "$T/3-revs-$n" '| shared: alice on A | alice |' "$n's revisions"
done
check "3. revisions of e2e:shared identical on A and B" same_lists "$T/3-revs-A" "$T/3-revs-B"
check "3. no external edit on A or B" no_external_edit "$T"/3-revs-? "$T"/3-lastmod-?
check "3. nothing new in data/log/error/ on A or B" bash -c '
  lines() { cat "$1"/log/error/*.log 2>/dev/null || true; }
  a=$(lines "$1" | wc -l); b=$(lines "$2" | wc -l)
  [ "$a" = "$3" ] && [ "$b" = "$4" ] && exit 0
  { lines "$1" | tail -n +$(($3 + 1)) | sed "s/^/A: /"
    lines "$2" | tail -n +$(($4 + 1)) | sed "s/^/B: /"; } | cut -c1-300 | sed "s/^/     | /"; exit 1
  ' _ "$DATA_A" "$DATA_B" "$errs_a" "$errs_b"

# ================================================================ 4. stale render cache and index
log "4. B viewed and indexed a page before A's edit arrives"
save A alice e2e:stale "stale: zebrafruit added on A" "Fruit list: apple, banana, zebrafruit."
index_page A e2e:stale
sleep 1
view B e2e:stale >/dev/null
index_page B e2e:stale
search B banana >"$T/4-search-B-before"
info "B indexed the old text before the sync: search 'banana' on B finds: $(tr '\n' ' ' <"$T/4-search-B-before")"
sleep 1
sync_now
# what a browser on B does: view the page (whose invisible task-runner image indexes it)
rendered B e2e:stale >"$T/4-content-B"
lastmod B e2e:stale >"$T/4-lastmod-B"
lastmod A e2e:stale >"$T/4-lastmod-A"
index_page B e2e:stale
search B zebrafruit >"$T/4-search-B"
search A zebrafruit >"$T/4-search-A"
info "B: $(cat "$T/4-lastmod-B") -- renders: $(cat "$T/4-content-B")"
info "A: $(cat "$T/4-lastmod-A")"
info "A: $(meta_info "$DATA_A" e2e/stale)"
info "B: $(meta_info "$DATA_B" e2e/stale)"
show_revs after-sync B e2e:stale
info "search 'zebrafruit': on A finds [$(tr '\n' ' ' <"$T/4-search-A")], on B finds [$(tr '\n' ' ' <"$T/4-search-B")]"
check "4. B renders A's new text after the sync" contains "$T/4-content-B" zebrafruit "B's rendered e2e:stale"
check "4. B's search finds A's new word" contains "$T/4-search-B" '^e2e:stale$' "B's search results for zebrafruit"
check "4. \"Last modified\" names alice on A and B" bash -c \
  'grep -q " by alice$" "$1" && grep -q " by alice$" "$2" || { cat "$1" "$2" | sed "s/^/     | /"; exit 1; }' \
  _ "$T/4-lastmod-A" "$T/4-lastmod-B"

# ================================================================ 5. media and deletion
log "5. a media upload and a page deletion propagate; the deleted page stays deleted"
python3 - "$W/pic.png" <<'PY'
import struct, sys, zlib
def chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
rows = b"".join(b"\0" + b"".join(bytes([x * 16, y * 16, 200]) for x in range(16)) for y in range(16))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0)) \
    + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
open(sys.argv[1], "wb").write(png)
PY
# e2e:zombie: bob edits it on B, a second later alice deletes it on A
save B bob e2e:zombie "zombie: bob on B" "Bob's edit, before alice deletes the page."
sleep 1
upload A alice e2e "$W/pic.png" pic.png
view B e2e:doomed >/dev/null
save A alice e2e:doomed "doomed: deleted on A" ""
save A alice e2e:zombie "zombie: deleted on A" ""
show_revs before-sync A e2e:doomed
show_revs before-sync A e2e:zombie
show_revs before-sync B e2e:zombie
sync_now
show_revs after-sync B e2e:doomed
show_revs after-sync A e2e:zombie
show_revs after-sync B e2e:zombie
show_recent after-sync B 'pic.png' '&show_changes=mediafiles'
curl -sS -o "$W/pic-from-B.png" "${URL[B]}/lib/exe/fetch.php?media=e2e:pic.png"
recent B - '&show_changes=mediafiles' >"$T/5-media-recent-B"
check "5. the uploaded image is served by B, byte for byte" cmp "$W/pic.png" "$W/pic-from-B.png"
check "5. B's media changes list the upload by alice" \
  contains "$T/5-media-recent-B" '| e2e:pic.png | .* | alice$' "B's recent media changes"
for n in A B; do revs "$n" e2e:doomed >"$T/5-revs-$n"; done
st_b=$(existence B e2e:doomed)
info "B: e2e:doomed is shown as $st_b; pages/e2e/doomed.txt $( [ -e "$DATA_B/pages/e2e/doomed.txt" ] && echo exists || echo absent)"
check "5. the deletion reached B (\"does not exist\", no page file)" bash -c '[ "$1" = missing ] && [ ! -e "$2" ]' _ "$st_b" "$DATA_B/pages/e2e/doomed.txt"
check "5. B's history of the deleted page equals A's, deletion by alice" bash -c '
  grep -q "| doomed: deleted on A | alice" "$1" || { echo "no deletion entry on B" | sed "s/^/     | /"; }
  grep -q "| doomed: deleted on A | alice" "$1" && cmp -s "$1" "$2" && exit 0
  diff -u --label A --label B "$2" "$1" | sed "s/^/     | /"; exit 1' _ "$T/5-revs-B" "$T/5-revs-A"
for n in A B; do revs "$n" e2e:zombie >"$T/5-zrevs-$n"; done
check "5. e2e:zombie (bob's edit on B, then alice's deletion on A) is deleted on A and B" bash -c '
  for n in A B; do
    d=$2; [ $n = B ] && d=$3
    last=$(tail -1 "$d/meta/e2e/zombie.changes" | cut -f3,5,6)
    if [ -e "$d/pages/e2e/zombie.txt" ]; then
      echo "$n: pages/e2e/zombie.txt exists: $(cat "$d/pages/e2e/zombie.txt"); last changelog line: $last" | sed "s/^/     | /"; bad=1
    fi
  done; exit ${bad:-0}' _ "$T" "$DATA_A" "$DATA_B"
check "5. e2e:zombie's history on A and B has bob's edit and alice's deletion, identical" bash -c '
  grep -q "| zombie: bob on B | bob" "$1" && grep -q "| zombie: deleted on A | alice" "$1" && cmp -s "$1" "$2" && exit 0
  diff -u --label A --label B "$1" "$2" | sed "s/^/     | /"; echo "A:" | sed "s/^/     | /"; sed "s/^/     | /" "$1"; exit 1' \
  _ "$T/5-zrevs-A" "$T/5-zrevs-B"
# more views on B and two more syncs: nothing may bring the page back
view B e2e:doomed >/dev/null; get B bob "doku.php?id=e2e:doomed&do=revisions" >/dev/null
sleep 1
sync_now
view A e2e:doomed >/dev/null; view B e2e:doomed >/dev/null
sync_now
res=""
for n in A B; do
  d=$([ "$n" = A ] && echo "$DATA_A" || echo "$DATA_B")
  st=$(existence "$n" e2e:doomed)
  last=$(tail -1 "$d/meta/e2e/doomed.changes" | cut -f3)
  info "$n after two more syncs: shown as $st, last changelog type $last, page file $( [ -e "$d/pages/e2e/doomed.txt" ] && echo exists || echo absent), .meta $( [ -e "$d/meta/e2e/doomed.meta" ] && echo exists || echo absent)"
  [ "$st" = missing ] && [ "$last" = D ] && [ ! -e "$d/pages/e2e/doomed.txt" ] || res="$res $n"
done
check "5. the deleted page is not resurrected (missing, last changelog line 'D' on A and B)" test -z "$res"

# ================================================================ 7. views during syncs
log "7. a page viewed repeatedly on B while syncs install A's edits"
mkdir -p "$W/busy"
touch "$W/busy.flag"
errs_b=$(error_log_lines "$DATA_B")
VIEWERS=()
for v in 1 2; do
  (  # browsers hammering B: the page, and every third time its revisions (parsed later)
    i=0
    while [ -e "$W/busy.flag" ]; do
      i=$((i + 1))
      curl -s -o "$W/busy/$v-$i-view.html" "${URL[B]}/doku.php?id=e2e:busy" || true
      if [ $((i % 3)) = 0 ]; then
        curl -s -o "$W/busy/$v-$i-revs.html" "${URL[B]}/doku.php?id=e2e:busy&do=revisions" || true
      fi
    done
  ) &
  VIEWERS+=($!)
  PIDS+=($!)
done
for i in 1 2 3 4 5 6; do
  sleep 1
  save A alice e2e:busy "busy: v$i on A" "Viewed while being synced, version $i."
  sync_now
done
rm -f "$W/busy.flag"
for v in "${VIEWERS[@]}"; do wait "$v" 2>/dev/null || true; done
parse each lastmod "$W"/busy/*-view.html >"$W/busy-lastmod.txt"
# the first line of each revisions list (the current revision)
for f in "$W"/busy/*-revs.html; do echo "$f"; done \
  | xargs "${DWHTML[@]}" each revisions_top >"$W/busy-revtop.txt"
info "B served $(wc -l <"$W/busy-lastmod.txt") views and $(wc -l <"$W/busy-revtop.txt") revision lists during the 6 syncs; \"Last modified\" lines seen:"
sort "$W/busy-lastmod.txt" | uniq -c | ev
info "current revisions at the top of those revision lists that were external edits or had no user:"
{ grep -i 'external edit\|127\.0\.0\.1\|| *|' "$W/busy-revtop.txt" | sort | uniq -c || echo "(none)"; } | ev
show_revs after-syncs A e2e:busy
show_revs after-syncs B e2e:busy
for n in A B; do revs "$n" e2e:busy >"$T/7-revs-$n"; lastmod "$n" e2e:busy >"$T/7-lastmod-$n"; done
check "7. B's revisions of e2e:busy show no external edit" no_external_edit "$T/7-revs-B"
check "7. no empty-user lines in meta/e2e/busy.changes on A or B" bash -c '
  x=$(awk -F"\t" "\$5 == \"\"" "$1/meta/e2e/busy.changes" "$2/meta/e2e/busy.changes")
  [ -z "$x" ] || { echo "$x" | sed "s/^/     | /"; exit 1; }' _ "$DATA_A" "$DATA_B"
check "7. revisions of e2e:busy identical on A and B" same_lists "$T/7-revs-A" "$T/7-revs-B"
check "7. nothing new in B's data/log/error/ during the syncs" bash -c '
  n=$({ cat "$1"/log/error/*.log 2>/dev/null || true; } | wc -l); [ "$n" = "$2" ] && exit 0
  cat "$1"/log/error/*.log | tail -n +$(($2 + 1)) | cut -c1-300 | sed "s/^/     | /"; exit 1' _ "$DATA_B" "$errs_b"
check "7. \"Last modified\" names alice on A and B" bash -c \
  'grep -q " by alice$" "$1" && grep -q " by alice$" "$2" || { cat "$1" "$2" | sed "s/^/     | /"; exit 1; }' \
  _ "$T/7-lastmod-A" "$T/7-lastmod-B"

# ================================================================ final sweep
log "final: every e2e page on A and B as DokuWiki shows it now (last modified; current revision)"
for n in A B; do
  for p in one alpha beta shared stale doomed zombie busy; do
    printf '%s %-11s %s\n' "$n" "e2e:$p" "$(lastmod "$n" "e2e:$p")"
    printf '%s %-11s   current: %s\n' "$n" "e2e:$p" \
      "$(parse revisions_top <"$(get "$n" anon "doku.php?id=e2e:$p&do=revisions")")"
  done
done >"$T/final-pages"
ev <"$T/final-pages"
check "final: no page on A or B shows an external edit" no_external_edit "$T/final-pages"
check "final: no changelog line on A or B has an empty user" bash -c '
  x=$(cd "$1" && grep -rP "^\d+\t[^\t]*\t[^\t]*\t[^\t]*\t\t" --include="*.changes" A/data/meta B/data/meta A/data/media_meta B/data/media_meta)
  [ -z "$x" ] || { echo "$x" | sed "s/^/     | /"; exit 1; }' _ "$W"

# ================================================================ summary
log "summary"
for n in A B; do
  d=$([ "$n" = A ] && echo "$DATA_A" || echo "$DATA_B")
  info "$n: data/log/error has $(error_log_lines "$d") line(s)$( [ "$(error_log_lines "$d")" = 0 ] || echo ', entries by page and message:')"
  # (an empty error log is the good case: grep finding nothing must not end the script)
  { cat "$d"/log/error/*.log 2>/dev/null || true; } | { grep -v '^ ' || true; } | cut -f2- | sed "s#$W/##" | sort | uniq -c | ev
done
info "conflict copies kept by hubsync: A $(find "$DATA_A/.hubsync/conflicts" -type f 2>/dev/null | wc -l), B $(find "$DATA_B/.hubsync/conflicts" -type f 2>/dev/null | wc -l)"
echo "DokuWiki $DWVERSION, hubsync $HUBSYNC ($PROFILE_MODE), $SYNCS syncs, $(( $(date +%s) - START_TIME )) s"
for p in "${PASSED[@]}"; do echo "  PASS $p"; done
for f in "${FAILED[@]}"; do echo "  FAIL $f"; done
echo "dokuwiki-e2e: ${#PASSED[@]} passed, ${#FAILED[@]} failed"
[ ${#FAILED[@]} = 0 ]
