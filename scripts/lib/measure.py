"""One measured run for scripts/bench.sh.

    measure.py PHASE TOOL REP KIND STDOUT TSV LOG LIMIT -- CMD...

Runs CMD under GNU time, samples the VmHWM of every descendant every 10 ms, kills it
after LIMIT seconds (exit 124), appends one row to TSV, exits as CMD did.
"""
import os, signal, subprocess, sys, tempfile, threading, time

phase, tool, rep, kind, out, tsv, log, limit = sys.argv[1:9]
assert sys.argv[9] == "--"
cmd = sys.argv[10:]
limit = float(limit)
tfile = tempfile.NamedTemporaryFile(prefix="time.", delete=False).name
peaks = {}   # pid -> [depth, name, hwm_kb]
done = threading.Event()

def stat(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        s = f.read()
    r = s.rindex(b")")
    return s[s.index(b"(") + 1:r].decode(errors="replace"), int(s[r + 2:].split()[1])

def hwm(pid):
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1])
    return 0

def name_of(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        name = os.path.basename(argv[0].decode(errors="replace"))
        if len(argv) > 1 and argv[1] == b"serve":
            name += " serve"
        return name
    except OSError:
        return "?"

def poll(root):
    depth = {root: 0}
    while not done.is_set():
        # New descendants have higher pids (no wrap-around in a short run).
        for e in os.listdir("/proc"):
            if e.isdigit():
                pid = int(e)
                if pid > root and pid not in depth:
                    try:
                        _, ppid = stat(pid)
                    except (OSError, ValueError):
                        continue
                    if ppid in depth:
                        depth[pid] = depth[ppid] + 1
                        peaks[pid] = [depth[pid], name_of(pid), 0]
        for pid, p in list(peaks.items()):
            try:
                p[2] = max(p[2], hwm(pid))
                if p[1] in ("time", "bash", "?"):  # seen between fork and exec
                    p[1] = name_of(pid)
            except (OSError, ValueError):
                pass
        done.wait(0.01)

with open(out, "wb") as so, open(log, "ab") as se:
    se.write((" ".join(cmd) + "\n").encode())
    se.flush()
    t0 = time.monotonic()
    # Its own session, so that a run over the time limit goes with all its children.
    p = subprocess.Popen(["/usr/bin/time", "-f", "%e %M", "-o", tfile, "--"] + cmd,
                         stdout=so, stderr=se, start_new_session=True)
    th = threading.Thread(target=poll, args=(p.pid,), daemon=True)
    th.start()
    killed = []
    def kill(sig):
        killed.append(sig)
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
    timers = [threading.Timer(limit, kill, (signal.SIGTERM,)),
              threading.Timer(limit + 10, kill, (signal.SIGKILL,))]
    for t in timers:
        t.daemon = True
        t.start()
    def interrupted(sig, frame):  # ^C or TERM: take the measured command along
        kill(signal.SIGKILL)
        os._exit(128 + sig)
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    rc = p.wait()  # a blocking wait: wait(timeout=...) polls and rounds the time up
    wall = time.monotonic() - t0
    for t in timers:
        t.cancel()
    if killed:
        se.write(f"measure.py: killed after {limit:g} s (BENCH_TIMEOUT)\n".encode())
        rc = 124
    done.set()
    th.join()
with open(tfile) as f:
    lines = [l for l in f.read().splitlines() if l.strip()]
os.unlink(tfile)
try:
    e, m = lines[-1].split()
except (IndexError, ValueError):
    e, m = "nan", "0"
main = max((v[2] for v in peaks.values() if v[0] == 1), default=0)
child = max((v[2] for v in peaks.values() if v[0] >= 2), default=0)
names = ",".join(sorted({v[1] for v in peaks.values()}))
with open(tsv, "a") as f:
    f.write(f"{phase}\t{tool}\t{rep}\t{kind}\t{wall:.4f}\t{e}\t{m}\t{rc}\t{main}\t{child}\t{names}\n")
sys.exit(rc)
