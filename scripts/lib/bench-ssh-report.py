"""The report of scripts/bench-ssh.sh: OUT/summary.md (printed too) and OUT/results.json.

    bench-ssh-report.py OUT

Reads OUT/runs.tsv (measure.py rows), OUT/meta.json and the hubsync --json documents.
"""
import csv, json, math, os, statistics, sys

out = sys.argv[1]
meta = json.load(open(os.path.join(out, "meta.json")))
rows = list(csv.DictReader(open(os.path.join(out, "runs.tsv")), delimiter="\t"))
NAN = float("nan")
MB = 1024 / 1e6  # KiB -> MB (10^6 bytes)

LABEL = {
    "h2": "hubsync/libssh2", "ho": "hubsync/OpenSSH", "hc": "hubsync/OpenSSH+CM",
    "unison": "unison/ssh", "rsync": "rsync -a/ssh", "h2x4": "hubsync/libssh2, 4 peers",
    "find": "floor: find ∥ ssh(CM) find",
    "findssh": "floor: find ∥ ssh find",
    "ssh-rc": "new connection, login shell rc files run", "ssh": "new connection", "ssh-cm": "over the ControlMaster",
    "h2-up": "hubsync/libssh2", "ho-up": "hubsync/OpenSSH", "rsync-up": "rsync -a/ssh",
    "ssh-up": "ssh 'cat >/dev/null'", "h2-down": "hubsync/libssh2", "ho-down": "hubsync/OpenSSH",
    "ssh-down": "ssh 'cat FILE'", "h2-noop": "hubsync/libssh2, no change", "ho-noop": "hubsync/OpenSSH, no change",
}


def sel(phase, tool, kinds=("timed",)):
    return [r for r in rows if r["phase"] == phase and r["tool"] == tool and r["kind"] in kinds]


def cell(phase, tool):
    runs = sel(phase, tool)
    allr = sel(phase, tool, ("timed", "warm", "json", "extra"))
    if not allr:
        return None
    ok = [r for r in runs if r["exit"] == "0"]
    w = [float(r["wall_s"]) for r in ok]
    kb = lambda k: max((int(r[k] or 0) for r in runs), default=0) * MB
    return {
        "median_s": statistics.median(w) if w and len(ok) == len(runs) else NAN,
        "min_s": min(w) if w else NAN, "max_s": max(w) if w else NAN, "n": len(runs),
        "runs_s": [float(r["wall_s"]) for r in runs],
        "local_mb": kb("maxrss_kb"), "local_main_mb": kb("main_hwm_kb"), "remote_mb": kb("remote_hwm_kb"),
        "remote_procs": sorted({p for r in runs for p in (r.get("remote_procs") or "").split(",") if p}),
        "exits": sorted({int(r["exit"]) for r in allr}),
        "other_runs": [(r["rep"], r["kind"], float(r["wall_s"]), int(r["exit"])) for r in allr if r["kind"] != "timed"],
    }


stats = {}
for r in rows:
    k = (r["phase"], r["tool"])
    if k not in stats:
        stats[k] = cell(*k)


def med(p, t):
    s = stats.get((p, t))
    return s["median_s"] if s else NAN


def ratio(a, b):
    return a / b if b and b > 0 and not math.isnan(b) else NAN


def f(v, spec=".3f"):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def mb(v):
    return f(v, ".1f") if v else "–"  # 0: not sampled (the process lived < 10 ms)


def span(s):
    return "–" if math.isnan(s["min_s"]) else f"{f(s['min_s'])}–{f(s['max_s'])}"


def table(header, body, align):
    """A markdown table, padded so that it also reads as plain text."""
    cols = [header] + body
    width = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    def line(r):
        return "| " + " | ".join(str(c).rjust(w) if a == "r" else str(c).ljust(w)
                                 for c, w, a in zip(r, width, align)) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(width, align)) + "|"
    return [line(header), sep] + [line(r) for r in body]


def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None


L = []
p = L.append
v = meta["versions"]
p(f"## hubsync over SSH: {meta['files']:,} files, {meta['tree_bytes'] / 1e6:.0f} MB, to a private sshd on 127.0.0.1")
p("")
p(f"- {v['hubsync']} ({meta['hubsync_path']}); {v['unison']}; {v['rsync']}; {v['openssh']}")
p(f"- {meta['cpus']} CPUs, shared with other jobs: load average {meta['load_start']} at the start, "
  f"{meta['load_end']} at the end; median of {meta['reps']} timed trial(s) per cell "
  f"(no-change, small and big: after 1 warm-up), tools interleaved in a rotating order; `sync` before every run")
p(f"- hubs on {meta['hub_fs']}; first syncs into "
  + ("a fresh loop-mounted ext4 per run" if meta["fresh_fs"] else f"new directories on {meta['hub_fs']} (no fresh file system: not root or no loop device)")
  + f"; big file on {meta['big_fs']}")
p("- × h2 = median / median of hubsync/libssh2 in the same phase; local MB = GNU time %M of the command "
  "(with the ssh client it waited for); peer MB = peak VmHWM of what sshd ran for it (`hubsync serve`, "
  "unison -server, rsync --server), sampled every 10 ms; MB = 10^6 bytes")
p("")

p("### One SSH session running `true` (OpenSSH client)")
p("")
body = []
for t in ("ssh-rc", "ssh", "ssh-cm"):
    s = stats.get(("conn", t))
    if s:
        body.append([LABEL[t], f(s["median_s"]), span(s), s["n"]])
L.extend(table(["session", "median s", "min–max s", "n"], body, "lrrr"))
rc_cost = med("conn", "ssh-rc") - med("conn", "ssh")
p("The benchmark's sshd " + ("runs the login shell's rc files (BENCH_SSH_RC=1)" if meta.get("login_rc") else
  f"skips the login shell's ~/.bashrc (SetEnv SHLVL=1) after the first row: here it cost {f(rc_cost)} s "
  "per session, which every SSH tool pays once per peer and run") + ".")
p("")

PH = [("first", "First sync into an empty peer", ["h2", "ho", "hc", "unison", "rsync"]),
      ("nochange", "No change", ["h2", "ho", "hc", "unison", "rsync", "find", "findssh", "h2x4"]),
      ("small", "Small change (5 page edits, 1 image upload)", ["h2", "ho", "hc", "unison", "rsync", "h2x4"]),
      ("both", "Edits on both sides (5 pages + 1 image on each; rsync: -au both ways)",
       ["h2", "ho", "hc", "unison", "rsync"])]
spreads = []
for phase, title, tools in PH:
    p(f"### {title}")
    p("")
    hdr = ["tool", "median s", "× h2", "min–max s", "n", "local MB", "peer MB"]
    if phase == "first":
        hdr[4:4] = ["+syncfs s"]
    body = []
    for t in tools:
        s = stats.get((phase, t))
        if not s:
            continue
        if s["n"] >= 2 and s["min_s"] > 0:
            spreads.append((s["max_s"] / s["min_s"], f"{phase}/{t}"))
        row = [LABEL[t], f(s["median_s"]), f(ratio(s["median_s"], med(phase, "h2")), ".2f"),
               span(s), s["n"], f(s["local_mb"], ".1f"), mb(s["remote_mb"])]
        if phase == "first":
            row[4:4] = [f(med("first-syncfs", t))]
        bad = [x for x in s["exits"] if x != 0]
        if bad:
            row[0] += f" (EXIT {','.join(map(str, bad))})"
        body.append(row)
    L.extend(table(hdr, body, "lrrrrrrr" if phase == "first" else "lrrrrrr"))
    p("")
    if phase == "first":
        p("+syncfs: a `sync -f PEER` right after the run (timed apart): what making the received data durable "
          "still costs; hubsync syncs before it exposes files, rsync and unison leave it to the kernel. "
          "The hubs keep their scan caches (hubsync) between runs; unison starts without archives.")
        s4 = stats.get(("first", "h2x4"))
        if s4:
            p(f"4-peer hub (libssh2, 1 run): {f(s4['median_s'])} s, + syncfs {f(med('first-syncfs', 'h2x4'))} s, "
              f"hub %M {f(s4['local_mb'], '.1f')} MB — {f(ratio(s4['median_s'], med('first', 'h2')), '.2f')}× one peer.")
        p("")

# 4 peers against 1
p("### 4 peers in one run against 1 (hubsync/libssh2)")
p("")
body = []
for phase, name in (("first", "first sync"), ("nochange", "no change"), ("small", "small change")):
    one, four = med(phase, "h2"), med(phase, "h2x4")
    body.append([name, f(one), f(four), f(ratio(four, one), ".2f"), f(4 * one)])
L.extend(table(["phase", "1 peer s", "4 peers s", "4 / 1", "sum of 4 × 1 peer s"], body, "lrrrr"))
p(f"(one hub, 4 peers on the same sshd and the same {meta['cpus']} CPUs: 4 peers' scans and `serve` processes "
  "compete for them; the 1-peer figure is the h2 pair of the same trials; first sync: 1 run)")
p("")

# Wire bytes
p("### Wire bytes per peer (hubsync --json, one run after the timed ones)")
p("")
body = []
docs = {}
for phase in ("nochange", "small"):
    for t in ("h2", "ho", "hc", "h2x4"):
        d = load(f"hubsync-{phase}-{t}-json.json")
        if d is None:
            continue
        docs[f"{phase}/{t}"] = {k: d.get(k) for k in ("result", "exit_code", "seconds", "peak_memory")}
        docs[f"{phase}/{t}"]["replicas"] = d.get("replicas")
        for r in d.get("replicas") or []:
            if r.get("label") == "hub":
                continue
            body.append([("no change" if phase == "nochange" else "small change"), LABEL[t], r.get("label"),
                         r.get("wire_sent"), r.get("wire_received"), r.get("files_in"), r.get("bytes_in"),
                         f(d.get("seconds")), f((d.get("peak_memory") or 0) / 1e6, ".1f"), d.get("result")])
L.extend(table(["run", "transport", "peer", "hub→peer B", "peer→hub B", "files in", "bytes in", "s",
                "hub peak MB", "result"], body, "lllrrrrrrl"))
p("(files/bytes in = what the peer received; hub peak MB = --json peak_memory, the hub process alone)")
p("")

# Big file
big_mb = meta["big_bytes"] / 1e6
p(f"### One big file: {meta['big_bytes'] / 2**20:.0f} MiB of random bytes ({meta['big_fs']})")
p("")
body = []
for direction, tools in (("up: hub → empty peer", ["h2-up", "ho-up", "rsync-up", "ssh-up"]),
                         ("down: peer → empty hub", ["h2-down", "ho-down", "ssh-down"]),
                         ("no change (same pair)", ["h2-noop", "ho-noop"])):
    for t in tools:
        s = stats.get(("big", t))
        if not s:
            continue
        if s["n"] >= 2 and s["min_s"] > 0:
            spreads.append((s["max_s"] / s["min_s"], f"big/{t}"))
        noop = med("big", t.split("-")[0] + "-noop") if t[:2] in ("h2", "ho") and not t.endswith("noop") else NAN
        moving = not t.endswith("noop")
        bad = [x for x in s["exits"] if x != 0]
        body.append([direction, LABEL[t] + (f" (EXIT {','.join(map(str, bad))})" if bad else ""), f(s["median_s"]),
                     f(big_mb / s["median_s"], ".0f") if moving and s["median_s"] > 0 else "",
                     f(big_mb / (s["median_s"] - noop), ".0f") if moving and s["median_s"] > noop else "",
                     span(s), s["n"], f(s["local_mb"], ".1f"), mb(s["remote_mb"])])
        direction = ""
L.extend(table(["direction", "tool", "median s", "MB/s", "MB/s net", "min–max s", "n", "local MB", "peer MB"],
               body, "llrrrrrrr"))
p("(MB/s = file size / median wall time; net = minus the median no-change run of the same pair, i.e. "
  "without connecting, logging in and scanning; `ssh cat` is the plain OpenSSH pipe, nothing written)")
p("")

# Ratios and noise
p("### Ratios and noise")
p("")
for phase, name in (("first", "first sync"), ("nochange", "no change"), ("small", "small change"),
                    ("both", "edits on both sides")):
    h = med(phase, "h2")
    parts = [f"{LABEL[t]} {f(ratio(med(phase, t), h), '.2f')}×" for t in ("ho", "hc", "unison", "rsync")]
    p(f"- {name}: relative to hubsync/libssh2: " + ", ".join(parts))
p(f"- no change against the floor (target ≤ 1.2×): hubsync/libssh2 "
  f"{f(ratio(med('nochange', 'h2'), med('nochange', 'findssh')), '.2f')}× and hubsync/OpenSSH "
  f"{f(ratio(med('nochange', 'ho'), med('nochange', 'findssh')), '.2f')}× find ∥ ssh find; "
  f"hubsync/OpenSSH+CM {f(ratio(med('nochange', 'hc'), med('nochange', 'find')), '.2f')}× find ∥ ssh(CM) find")
p(f"- first sync against rsync (target ≤ 1.5×): hubsync/libssh2 "
  f"{f(ratio(med('first', 'h2'), med('first', 'rsync')), '.2f')}×, hubsync/OpenSSH "
  f"{f(ratio(med('first', 'ho'), med('first', 'rsync')), '.2f')}×, hubsync/OpenSSH+CM "
  f"{f(ratio(med('first', 'hc'), med('first', 'rsync')), '.2f')}×")
ho_up, h2_up = med("big", "ho-up"), med("big", "h2-up")
ho_dn, h2_dn = med("big", "ho-down"), med("big", "h2-down")
p(f"- big file: OpenSSH/libssh2 throughput: up {f(ratio(h2_up, ho_up), '.2f')}×, down {f(ratio(h2_dn, ho_dn), '.2f')}×")
if spreads:
    sp = sorted(x for x, _ in spreads)
    worst = max(spreads)
    p(f"- noise: max/min over the timed runs of a cell: median {statistics.median(sp):.2f}, "
      f"worst {worst[0]:.2f} ({worst[1]}), over {len(sp)} cells")
ver = [l.rstrip("\n").split("\t") for l in open(os.path.join(out, "verify.txt"))]
bad = [x for x in ver if x[2] != "ok"]
p(f"- peers checked against their hubs {len(ver)} times (names, sizes, mtimes [unison: within 2 µs], modes; "
  "content: cmp of the edited files, diff -r at the end of the first, small and both phases, cmp of the big file): "
  + ("all ok" if not bad else "; ".join(f"{a}/{b}: {c}" for a, b, c in bad[:10])))
p(f"- SSH part: {meta['elapsed_s']} s; raw runs in {out}/runs.tsv")
text = "\n".join(L) + "\n"
open(os.path.join(out, "summary.md"), "w").write(text)
print(text, end="")
clean = lambda x: None if isinstance(x, float) and math.isnan(x) else x
json.dump({"meta": meta, "stats": {f"{ph}/{t}": {k: clean(x) for k, x in s.items()} for (ph, t), s in stats.items() if s},
           "hubsync_json": docs, "verify": ver}, open(os.path.join(out, "results.json"), "w"), indent=1)
