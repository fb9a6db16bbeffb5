"""One measured run for scripts/bench.sh and scripts/bench-ssh.sh.

    measure.py PHASE TOOL REP KIND STDOUT TSV LOG LIMIT -- CMD...

Runs CMD under GNU time, samples the VmHWM of every descendant every 10 ms, kills it
after LIMIT seconds (exit 124), appends one row to TSV, exits as CMD did.

With MEASURE_REMOTE_PID set (the pid of a private sshd's listener), the processes that
sshd starts for the run (the peer's side of an SSH sync: `hubsync serve`, unison
-server, rsync --server, ...; sshd's own processes are left out) are sampled too and
reported as remote_hwm_kb / remote_procs. Sessions multiplexed over an existing
OpenSSH ControlMaster connection hang below an sshd process that predates the run;
they are found because every existing descendant of the listener is known at start.
"""
import os, signal, subprocess, sys, tempfile, threading, time

phase, tool, rep, kind, out, tsv, log, limit = sys.argv[1:9]
assert sys.argv[9] == "--"
cmd = sys.argv[10:]
limit = float(limit)
remote_root = int(os.environ.get("MEASURE_REMOTE_PID") or 0)
REMOTE = 1000  # depths from here on are below the sshd listener
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

def existing_below(root):
    """Every current descendant of root (root included), by depth."""
    children = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                children.setdefault(stat(int(e))[1], []).append(int(e))
            except (OSError, ValueError):
                pass
    depth, todo = {root: REMOTE}, [root]
    while todo:
        p = todo.pop()
        for c in children.get(p, ()):
            if c not in depth:
                depth[c] = depth[p] + 1
                todo.append(c)
    return depth

def poll(root, depth):
    depth[root] = 0
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
                if p[1] in ("", "time", "bash", "sh", "env", "?") or p[1].startswith("sshd"):
                    p[1] = name_of(pid)  # seen between fork and exec
            except (OSError, ValueError):
                pass
        done.wait(0.01)

depth0 = existing_below(remote_root) if remote_root else {}
with open(out, "wb") as so, open(log, "ab") as se:
    se.write((" ".join(cmd) + "\n").encode())
    se.flush()
    t0 = time.monotonic()
    # Its own session, so that a run over the time limit goes with all its children.
    p = subprocess.Popen(["/usr/bin/time", "-f", "%e %M", "-o", tfile, "--"] + cmd,
                         stdout=so, stderr=se, start_new_session=True)
    th = threading.Thread(target=poll, args=(p.pid, depth0), daemon=True)
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
local = {k: v for k, v in peaks.items() if v[0] < REMOTE}
remote = {k: v for k, v in peaks.items() if v[0] >= REMOTE and not v[1].startswith("sshd")}
main = max((v[2] for v in local.values() if v[0] == 1), default=0)
child = max((v[2] for v in local.values() if v[0] >= 2), default=0)
rmax = max((v[2] for v in remote.values()), default=0)
names = ",".join(sorted({v[1] for v in local.values()}))
rnames = ",".join(sorted({v[1] for v in remote.values()}))
with open(tsv, "a") as f:
    f.write(f"{phase}\t{tool}\t{rep}\t{kind}\t{wall:.4f}\t{e}\t{m}\t{rc}\t{main}\t{child}\t{names}"
            f"\t{rmax}\t{rnames}\n")
sys.exit(rc)
