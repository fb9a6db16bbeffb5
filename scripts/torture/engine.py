#!/usr/bin/env python3
"""The trials of scripts/torture.sh (which sets up sshd, namespaces and tmpfs first).

Every file the suite writes carries its own length and checksum in a header line
(`HSV1 <len> <sha256>`), so a torn or partial file is recognised from its content
alone; every version ever written is also remembered by its hash.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HUB = os.environ["HUBSYNC"]
WORK = os.environ["WORK"]
SSH_USER = os.environ["SSH_USER"]
SSH_KEY = os.environ["SSH_KEY"]
KNOWN = os.environ["SSH_KNOWN_HOSTS"]
SSH_A_PORT = os.environ["SSH_A_PORT"]
SSH_A_PID = int(os.environ["SSH_A_PID"])
SSH_B_PORT = os.environ["SSH_B_PORT"]
SSH_NS_PID = int(os.environ["SSH_NS_PID"])
SSH_NS_PORT = os.environ["SSH_NS_PORT"]
NS_HUB = os.environ["NS_HUB"]
NS_HUB_DEV = os.environ["NS_HUB_DEV"]
ADDR_PEER = os.environ["ADDR_PEER"]
SMALL_FS = os.environ["SMALL_FS"]
SMALL_FS2 = os.environ["SMALL_FS2"]
OPENSSH = f"ssh -F /dev/null -o BatchMode=yes -o GlobalKnownHostsFile=/dev/null -o LogLevel=ERROR"
KINDS = ["crash-hub", "crash-serve", "net-stop", "net-silent", "net-cut", "disk-full", "writers"]
T_START = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T_START:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------ content
EVER = set()  # the id of every version ever written whole


def vid_of(data):
    return hashlib.blake2b(data, digest_size=10).hexdigest()


def make(path, tag, size):
    """A self-checking version of `path`, about `size` bytes."""
    head = f"{path}\n{tag}\n".encode()
    pat = hashlib.sha256(head).hexdigest().encode() + b"\n"
    body = head + (pat * (max(0, size - len(head)) // len(pat) + 1))[: max(0, size - len(head))]
    data = b"HSV1 %d %s\n" % (len(body), hashlib.sha256(body).hexdigest().encode()) + body
    v = vid_of(data)
    EVER.add(v)
    return data, v


def valid(data):
    nl = data.find(b"\n")
    if nl < 0 or not data.startswith(b"HSV1 "):
        return False
    parts = data[:nl].split()
    if len(parts) != 3:
        return False
    body = data[nl + 1:]
    try:
        n = int(parts[1])
    except ValueError:
        return False
    return len(body) == n and hashlib.sha256(body).hexdigest().encode() == parts[2]


def write(root, rel, data, mtime=None):
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    if mtime is not None:
        os.utime(p, ns=(mtime, mtime))


def is_hubsync_temp(name):
    return name.startswith(".hubsync.") and name.endswith(".tmp")


# ------------------------------------------------------------------ snapshots
class Snap:
    """Files (path -> version id), directories, and what should not be there."""

    def __init__(self):
        self.files = {}
        self.dirs = set()
        self.invalid = {}  # path -> (size, first bytes)
        self.temps = []  # .hubsync.*.tmp outside .hubsync
        self.foreign = []  # writer temp files (.wtmp.*)


_cache = {}


def read_version(p):
    st = os.lstat(p)
    key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    hit = _cache.get(p)
    if hit and hit[0] == key:
        return hit[1], hit[2], hit[3]
    with open(p, "rb") as f:
        data = f.read()
    st2 = os.lstat(p)
    v, ok, head = vid_of(data), valid(data), data[:60]
    if (st2.st_size, st2.st_mtime_ns, st2.st_ino, st2.st_ctime_ns) == key:
        _cache[p] = (key, v, ok, head)
    return v, ok, head


def snapshot(root):
    s = Snap()
    for d, dirs, files in os.walk(root):
        rel_d = os.path.relpath(d, root)
        if rel_d == ".":
            if ".hubsync" in dirs:
                dirs.remove(".hubsync")
            rel_d = ""
        else:
            s.dirs.add(rel_d)
        for name in files:
            rel = os.path.join(rel_d, name) if rel_d else name
            if is_hubsync_temp(name):
                s.temps.append(rel)
                continue
            if name.startswith(".wtmp."):
                s.foreign.append(rel)
                continue
            try:
                v, ok, head = read_version(os.path.join(d, name))
            except FileNotFoundError:
                continue
            s.files[rel] = v
            if not ok:
                s.invalid[rel] = head
    return s


def conflicts(root):
    """Version ids kept under root/.hubsync/conflicts, and the invalid copies."""
    out, bad = set(), []
    base = os.path.join(root, ".hubsync", "conflicts")
    for d, _, files in os.walk(base):
        for name in files:
            p = os.path.join(d, name)
            try:
                v, ok, _ = read_version(p)
            except FileNotFoundError:
                continue
            out.add(v)
            if not ok:
                bad.append(os.path.relpath(p, root))
    return out, bad


# ------------------------------------------------------------------ processes
def procs():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        comm = st[st.index("(") + 1: st.rindex(")")]
        rest = st[st.rindex(")") + 2:].split()
        out[int(pid)] = (comm, rest[0], int(rest[1]), [c.decode(errors="replace") for c in cmd if c])
    return out


def serve_pids(root):
    return [pid for pid, (_, state, _, cmd) in procs().items()
            if state not in "ZX" and len(cmd) >= 3 and cmd[-2] == "serve" and cmd[-1] == root]


def hubsync_pids(roots):
    # By the binary's name, whatever it is called (a copy under test may be renamed).
    names = {"hubsync", os.path.basename(HUB)}
    return [(pid, " ".join(cmd)) for pid, (_, state, _, cmd) in procs().items()
            if state not in "ZX" and cmd and os.path.basename(cmd[0]) in names
            and any(r in cmd for r in roots)]


def sshd_tree(root_pid):
    """The sshd processes of one server: the listener and its per-connection ones."""
    ps = procs()
    kids = {}
    for pid, (comm, _, ppid, _) in ps.items():
        kids.setdefault(ppid, []).append(pid)
    if root_pid not in ps:
        return []
    out, i = [root_pid], 0
    while i < len(out):
        for c in kids.get(out[i], []):
            if ps[c][0].startswith("sshd"):
                out.append(c)
        i += 1
    return out


def freeze(root_pid):
    stopped = []
    for _ in range(20):
        new = [p for p in sshd_tree(root_pid) if p not in stopped]
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            stopped.append(p)
        time.sleep(0.02)
    return stopped


def thaw(root_pid, stopped):
    for p in set(stopped) | set(sshd_tree(root_pid)):
        try:
            os.kill(p, signal.SIGCONT)
        except ProcessLookupError:
            pass


def diagnose(pid):
    """What a hung hub and the processes around it are doing (for the report)."""
    lines = []
    ps = procs()
    for q, (comm, state, ppid, cmd) in sorted(ps.items()):
        if q == pid or ppid == pid or (cmd and os.path.basename(cmd[0]) == "hubsync"
                                       and any(WORK in c for c in cmd)):
            try:
                with open(f"/proc/{q}/wchan") as f:
                    wchan = f.read()
            except OSError:
                wchan = "?"
            lines.append(f"pid {q} ppid {ppid} state {state} wchan {wchan} {' '.join(cmd)[:200]}")
    if shutil.which("gdb"):
        r = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 25"],
                           capture_output=True, text=True, timeout=120)
        lines += [l for l in r.stdout.splitlines() if l.startswith(("#", "Thread"))]
    return "\n".join(lines)


# ------------------------------------------------------------------ worlds
class Failure(Exception):
    pass


class Run(subprocess.Popen):
    """A hub run whose output goes to files, not pipes: nothing reads a pipe while
    a trial waits for its moment to kill, and a run that filled one would block in
    a write and look hung."""

    def __init__(self, cmd):
        self.files = (tempfile.TemporaryFile(), tempfile.TemporaryFile())
        super().__init__(cmd, stdin=subprocess.DEVNULL, stdout=self.files[0],
                         stderr=self.files[1], start_new_session=True)

    def communicate(self, timeout=None):
        self.wait(timeout)
        out = []
        for f in self.files:
            f.seek(0)
            out.append(f.read().decode(errors="replace"))
            f.close()
        return tuple(out)


class World:
    def __init__(self, name, roots, peers, prefix=(), extra=()):
        self.name, self.roots, self.peers = name, roots, list(peers)
        self.prefix, self.extra = list(prefix), list(extra)
        self.base = {}  # the converged tree: path -> version
        self.base_dirs = set()
        # Every run of the current trial (command line, exit, output), kept with
        # the work directory when the trial fails.
        self.journal = []

    def note(self, what, code, out, err):
        self.journal.append(f"--- {what}: exit {code}\n{out or ''}{err or ''}")

    def cmd(self, args=()):
        return self.prefix + [HUB, "sync", self.roots[0], *self.peers, "--identity", SSH_KEY,
                              "--known-hosts", KNOWN, "--remote-command", HUB,
                              *([] if "--json" in args else ["-v"]), *self.extra, *args]

    def start(self, args=()):
        # A session of its own, so that the hub and its local children (a local
        # peer's serve, the ssh client) can be killed together.
        return Run(self.cmd(args))

    def run(self, args=(), limit=180):
        t = time.monotonic()
        p = self.start(args)
        try:
            out, err = p.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            diag = diagnose(p.pid)
            p.kill()
            out, err = p.communicate()
            raise Failure(f"{self.name}: HANG: a run took more than {limit}s; stderr:\n"
                          f"{err[-3000:]}\n{diag}")
        self.note(f"run {' '.join(args)}", p.returncode, out, err)
        return p.returncode, out, err, time.monotonic() - t

    def recover(self, limit_s=90):
        """Runs until a run succeeds and a second one plans nothing; returns the number
        of runs needed. A run refused because a stale `serve` still holds a peer's lock
        (exit 2 or 75) is retried until limit_s."""
        t0, runs, last = time.monotonic(), 0, ""
        while True:
            code, out, err, _ = self.run()
            runs += 1
            if code == 0:
                break
            last = err
            if runs == 1:
                self.first_refusal = next((l for l in err.splitlines() if "error" in l), err[-300:])
            if code not in (2, 75):
                raise Failure(f"{self.name}: recovery run exited {code}:\n{err[-3000:]}")
            if time.monotonic() - t0 > limit_s:
                raise Failure(f"{self.name}: no successful run within {limit_s}s after the "
                              f"fault ({runs} runs, last exit {code}); still running: "
                              f"{hubsync_pids(self.roots)}\n{last[-3000:]}")
            time.sleep(1)
        code, out, err, _ = self.run(["--json"])
        if code != 0:
            raise Failure(f"{self.name}: the run after recovery exited {code}:\n{err[-3000:]}")
        plan = json.loads(out).get("plan")
        if plan:
            raise Failure(f"{self.name}: a run after convergence still plans {json.dumps(plan)[:2000]}")
        return runs

    def snaps(self):
        return [snapshot(r) for r in self.roots]

    def no_leftover_processes(self):
        deadline = time.monotonic() + 15
        while True:
            left = hubsync_pids(self.roots)
            if not left:
                return []
            if time.monotonic() > deadline:
                return [f"hubsync processes left after recovery: {left}"]
            time.sleep(0.2)

    def settle(self):
        """Checks the converged state; makes it the base of the next trial."""
        problems = []
        snaps = self.snaps()
        for i, s in enumerate(snaps):
            for p, head in s.invalid.items():
                problems.append(f"r{i}: {p} holds content never written whole: {head!r}")
            for p, v in s.files.items():
                if v not in EVER:
                    problems.append(f"r{i}: {p} holds an unknown version {v}")
            for p in s.temps:
                problems.append(f"r{i}: temp file {p} left outside .hubsync")
            for p in s.foreign:
                problems.append(f"r{i}: writer temp file {p} left after convergence")
        for i in (1, 2):
            if snaps[i].files != snaps[0].files or snaps[i].dirs != snaps[0].dirs:
                diff = sorted(set(snaps[i].files.items()) ^ set(snaps[0].files.items()))[:10]
                ddiff = sorted(snaps[i].dirs ^ snaps[0].dirs)[:10]
                problems.append(f"r{i} differs from r0 after convergence: files {diff} dirs {ddiff}")
        self.base = dict(snaps[0].files)
        self.base_dirs = set(snaps[0].dirs)
        return snaps, problems

    def kept(self):
        out, bad = set(), []
        for i, r in enumerate(self.roots):
            c, b = conflicts(r)
            out |= c
            bad += [f"r{i}: conflict copy {x} holds content never written whole" for x in b]
        return out, bad


def check_nothing_lost(world, pre, final, kept):
    """pre: the replicas' snapshots before the trial (after its batch); final: after
    recovery. Returns (problems, number of lost versions)."""
    problems, lost = [], 0
    base = world.base_prev
    final_versions = set(final[0].files.values())
    touched = set()
    for i, s in enumerate(pre):
        for p, v in s.files.items():
            if base.get(p) != v:
                touched.add(p)
                # Written by the batch: must survive, in the tree or as a conflict copy.
                if v not in final_versions and v not in kept:
                    lost += 1
                    problems.append(f"LOST: the version {v} of {p} written on r{i} is in no "
                                    f"final tree and in no conflicts directory")
        for p in base:
            if p not in s.files:
                touched.add(p)
    for p, v in base.items():
        if p not in touched and final[0].files.get(p) != v:
            lost += 1
            problems.append(f"LOST: {p}, untouched by the batch, is {final[0].files.get(p)} "
                            f"instead of {v}")
    for p in base:
        written = any(p in s.files and s.files[p] != base[p] for s in pre)
        deleted = any(p not in s.files for s in pre)
        if deleted and not written and p in final[0].files:
            problems.append(f"a deletion of {p} was undone (it is back as {final[0].files[p]})")
    return problems, lost


def selftest():
    """The checks must catch what they are for: run them on made-up snapshots."""
    def snap(files):
        x = Snap()
        x.files = dict(files)
        return x

    class W:
        base_prev = {"a": "v0", "b": "v1", "c": "v2"}
    pre = [snap({"a": "v0", "b": "v1new", "c": "v2"}), snap({"a": "v0", "b": "v1"}),
           snap({"a": "v0", "b": "v1", "c": "v2", "d": "vd"})]
    cases = [  # final tree, conflict copies, (problems expected?, versions lost)
        ({"a": "v0", "b": "v1new", "d": "vd"}, set(), (False, 0)),
        ({"a": "v0", "b": "v1", "d": "vd"}, {"v1new"}, (False, 0)),
        ({"a": "v0", "b": "v1", "d": "vd"}, set(), (True, 1)),
        ({"a": "v0", "b": "v1new"}, set(), (True, 1)),
        ({"a": "vX", "b": "v1new", "d": "vd"}, set(), (True, 1)),
        ({"b": "v1new", "d": "vd"}, set(), (True, 1)),
        ({"a": "v0", "b": "v1new", "c": "v2", "d": "vd"}, set(), (True, 0)),
    ]
    for final, kept, want in cases:
        problems, lost = check_nothing_lost(W, pre, [snap(final)] * 3, kept)
        if (bool(problems), lost) != want:
            raise SystemExit(f"torture: self-test of the checks failed on {final} {kept}: "
                             f"{problems} {lost}")
    data, _ = make("x/y", "t", 5000)
    if not valid(data) or valid(data[:-1]) or valid(data[:4000] + b"\0" * 1000) or valid(b""):
        raise SystemExit("torture: self-test of the content check failed")


# ------------------------------------------------------------------ batches
class Batch:
    def __init__(self, world, rng, tag):
        self.w, self.rng, self.tag, self.n = world, rng, tag, 0
        self.deleted = set()

    def new(self, rel, size=None):
        self.n += 1
        if size is None:
            size = self.rng.choice([120, 400, 1500, 3000, 6000, 12000])
        return make(rel, f"{self.tag}.{self.n}", size)[0]

    def put(self, r, rel, size=None):
        write(self.w.roots[r], rel, self.new(rel, size))

    def delete(self, r, rel):
        try:
            os.unlink(os.path.join(self.w.roots[r], rel))
        except FileNotFoundError:
            pass

    def mixed(self, edits, creates, deletes, conflicts, big=0, big_size=(256 << 10, 3 << 20),
              rmdir=True, drop_big=0.7):
        """A batch of every kind of change, on all three replicas."""
        rng, base = self.rng, self.w.base
        paths = sorted(base)
        rng.shuffle(paths)
        take = iter(paths)
        for _ in range(edits):
            p = next(take)
            r = rng.randrange(3)
            self.put(r, p)
            if rng.random() < 0.1:  # written twice: the first version is superseded
                self.put(r, p)
        for _ in range(conflicts):
            p = next(take)
            rs = rng.sample(range(3), rng.choice([2, 2, 3]))
            if rng.random() < 0.3:  # edit against delete
                self.delete(rs[0], p)
                rs = rs[1:]
            for r in rs:
                self.put(r, p)
        for _ in range(deletes):
            self.delete(rng.randrange(3), next(take))
        for k in range(creates):
            d = rng.choice([f"new/{self.tag}", os.path.dirname(rng.choice(paths)) or "top"])
            p = f"{d}/c{self.tag}-{k}.txt"
            rs = [rng.randrange(3)]
            if rng.random() < 0.15:  # created on two replicas at once
                rs = rng.sample(range(3), 2)
            for r in rs:
                self.put(r, p)
        for k in range(big):
            p = f"big/b{self.tag}-{k}.bin"
            self.put(rng.randrange(3), p, rng.randint(*big_size))
        # The big files of earlier batches go again.
        for p in paths:
            if p.startswith("big/") and rng.random() < drop_big:
                self.delete(rng.randrange(3), p)
        if rmdir:
            # A whole small directory removed on one replica, while another replica
            # edits a file in it and a third creates one.
            dirs = {}
            for p in base:
                if "/" in p and not p.startswith("big/"):
                    dirs.setdefault(os.path.dirname(p), []).append(p)
            small = sorted(d for d, fs in dirs.items() if len(fs) <= 12)
            if small:
                d = rng.choice(small)
                r, o, c = rng.sample(range(3), 3)
                shutil.rmtree(os.path.join(self.w.roots[r], d), ignore_errors=True)
                if rng.random() < 0.5:
                    self.put(o, rng.choice(dirs[d]))
                if rng.random() < 0.5:
                    self.put(c, f"{d}/added-{self.tag}.txt")


def populate(world, rng, nfiles, dirs):
    """The initial tree, made on the hub and spread by a first run."""
    for i in range(nfiles):
        d = f"ns{rng.randrange(dirs)}/sub{rng.randrange(4)}"
        rel = f"{d}/page{i}.txt"
        write(world.roots[0], rel, make(rel, f"init.{i}", rng.choice([100, 300, 900, 2500, 8000]))[0])
    code, _, err, dur = world.run(limit=600)
    if code != 0:
        raise Failure(f"{world.name}: the first run exited {code}:\n{err[-3000:]}")
    world.recover()
    _, problems = world.settle()
    if problems:
        raise Failure(f"{world.name}: the first sync: " + "; ".join(problems[:10]))
    log(f"{world.name}: {nfiles} files on 3 replicas, first sync {dur:.1f}s")


# ------------------------------------------------------------------ the suite
class Suite:
    def __init__(self, seed, short):
        self.seed, self.short = seed, short
        self.rng = random.Random(seed)
        self.stats = {k: {"trials": 0, "landed": 0, "failures": 0, "lost": 0, "notes": []}
                      for k in KINDS}
        self.failures = []
        self.world = None

    def fail(self, kind, trial, problems, lost=0):
        st = self.stats[kind]
        st["failures"] += 1
        st["lost"] += lost
        text = f"{kind} trial {trial} (seed {self.seed}):\n    " + "\n    ".join(problems[:40])
        self.failures.append(text)
        log("FAIL " + text)
        if self.world is not None:
            path = os.path.join(WORK, f"trial-{trial}-runs.log")
            with open(path, "w") as f:
                f.write("\n".join(self.world.journal))
            log(f"  the trial's runs: {path}")
        if os.environ.get("TORTURE_STOP_ON_FAIL"):
            raise Failure(f"stopped at the first failure (TORTURE_STOP_ON_FAIL); the "
                          f"replicas are as the failed trial left them")

    def finish_trial(self, kind, trial, world, pre, extra_problems=()):
        """Recovery and every check; returns the problems found."""
        problems = list(extra_problems)
        try:
            runs = world.recover()
        except Failure as e:
            problems.append(str(e))
            self.fail(kind, trial, problems)
            # Try to get back to a converged state for the next trials.
            try:
                time.sleep(3)
                world.recover(limit_s=60)
                world.settle()
            except Failure as e2:
                raise Failure(f"{world.name} cannot converge any more: {e2}")
            return
        if runs > 1:
            self.stats[kind]["notes"].append(runs)
            log(f"  recovery took {runs} runs; the first said: {world.first_refusal[:300]}")
        problems += world.no_leftover_processes()
        final, p2 = world.settle()
        problems += p2
        kept, bad = world.kept()
        problems += bad
        p3, lost = check_nothing_lost(world, pre, final, kept)
        problems += p3
        if problems:
            self.fail(kind, trial, problems, lost)

    def begin(self, world):
        world.base_prev = dict(world.base)
        world.journal = []
        self.world = world  # whose journal a failure of this trial writes out

    # ---------------------------------------------------------------- crashes
    def crash(self, world, n_hub, n_serve):
        rng = self.rng
        est = {1: [], 4: []}
        # Calibration runs (not counted as trials, but checked): how long a run of
        # such a batch takes, to spread the kills over it. Batches come in two sizes.
        schedule = ["calibrate"] * 4 + ["crash-hub"] * n_hub + ["crash-serve"] * n_serve
        rest = schedule[4:]
        rng.shuffle(rest)
        schedule[4:] = rest
        for t, kind in enumerate(schedule):
            self.begin(world)
            b = Batch(world, rng, f"t{t}")
            scale = (1, 4)[t % 2] if kind == "calibrate" else rng.choice([1, 1, 1, 4])
            b.mixed(edits=scale * rng.randint(20, 60), creates=scale * rng.randint(10, 40),
                    deletes=scale * rng.randint(5, 25), conflicts=scale * rng.randint(3, 12),
                    big=rng.randint(1, 4), big_size=(256 << 10, scale * (3 << 20)))
            pre = world.snaps()
            openssh = rng.random() < 0.4
            args = ["--ssh-command", OPENSSH] if openssh else []
            if kind == "calibrate":
                code, _, err, dur = world.run(args)
                est[scale].append(dur)
                log(f"calibration run {t} (batch x{scale}): {dur:.2f}s exit {code}")
                extra = [] if code == 0 else [f"calibration run exited {code}: {err[-2000:]}"]
                if extra:
                    self.fail("crash-hub", t, extra)
                self.finish_trial("crash-hub", t, world, pre)
                continue
            span = max(est[scale][-8:]) * 1.1
            delay = rng.uniform(0.0, span)
            target = rng.choice([1, 2]) if kind == "crash-serve" else 0
            if target and os.environ.get("TORTURE_SERVE_TARGET"):
                target = int(os.environ["TORTURE_SERVE_TARGET"])
            # The hub's host dying takes the local peer's serve and the ssh client
            # with it: sometimes the whole process group goes.
            group = target == 0 and rng.random() < 0.3
            # And sometimes the run after the crash crashes too.
            again = rng.random() < float(os.environ.get("TORTURE_AGAIN", "0.25"))
            # Sometimes the next run starts at once, while the killed run's serves may
            # still hold their locks and finish their batches, as a timer would.
            hurry = rng.random() < 0.3
            st = self.stats[kind]
            st["trials"] += 1
            t0 = time.monotonic()
            p = world.start(args)
            landed, victim, hung = False, None, False
            while time.monotonic() - t0 < delay and p.poll() is None:
                time.sleep(0.002)
            # The victim: the hub, or the serve of one peer (waited for if the run
            # has not started it yet).
            while p.poll() is None and not landed:
                if target == 0:
                    victim = p.pid
                else:
                    pids = serve_pids(world.roots[target])
                    victim = pids[0] if pids else None
                if victim:
                    try:
                        if group:
                            os.killpg(victim, signal.SIGKILL)
                        else:
                            os.kill(victim, signal.SIGKILL)
                        landed = True
                    except ProcessLookupError:
                        pass
                else:
                    time.sleep(0.002)
            try:
                out, err = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                diag = diagnose(p.pid)
                p.kill()
                out, err = p.communicate()
                self.fail(kind, t, [f"HANG: the hub did not end within 60s after "
                                    f"{'the kill of r%d serve' % target if target else 'the kill'} "
                                    f"at {delay:.2f}s (--timeout is 10s):\n{err[-2000:]}\n"
                                    f"{diag}"])
                hung = True
            dur = time.monotonic() - t0
            world.note(f"trial run, kill at {delay:.2f}s (landed: {landed})", p.returncode, out, err)
            if landed and not hurry:
                # How long the serves of the dead run hold their locks.
                t_dead = time.monotonic()
                while hubsync_pids(world.roots) and time.monotonic() - t_dead < 60:
                    time.sleep(0.02)
                orphan = time.monotonic() - t_dead
                st["orphan"] = max(st.get("orphan", 0), orphan)
                if orphan >= 60:
                    self.fail(kind, t, [f"processes of the killed run still hold locks after "
                                        f"60s: {hubsync_pids(world.roots)}"])
            if not landed and p.returncode == 0:
                est[scale].append(dur)
            second = ""
            if landed and again and not hung:
                # The next run is killed as well (the hub), at its own random moment.
                d2 = rng.uniform(0.0, span)
                t2 = time.monotonic()
                p2 = world.start(args)
                while time.monotonic() - t2 < d2 and p2.poll() is None:
                    time.sleep(0.002)
                second = f"; the next run killed at {d2:.2f}s: "
                if p2.poll() is None:
                    os.kill(p2.pid, signal.SIGKILL)
                    second += "killed"
                else:
                    second += f"already over (exit {p2.returncode})"
                try:
                    o2, e2 = p2.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    p2.kill()
                    o2, e2 = p2.communicate()
                    self.fail(kind, t, ["HANG: the run after the crash took more than 60s"])
                world.note(f"the next run{second}", p2.returncode, o2, e2)
                t_dead = time.monotonic()
                while not hurry and hubsync_pids(world.roots) and time.monotonic() - t_dead < 60:
                    time.sleep(0.02)
            extra = []
            if landed:
                st["landed"] += 1
                if target and p.returncode not in (0, 2) and not hung:
                    extra.append(f"the hub exited {p.returncode} after serve r{target} was "
                                 f"killed (expected 2, or 0 if it was done):\n{err[-2000:]}")
            elif p.returncode != 0:
                extra.append(f"a run exited {p.returncode} without a fault:\n{err[-2000:]}")
            what = f"r{target} serve" if target else ("hub's process group" if group else "hub")
            log(f"{kind} trial {t}: x{scale} batch, kill {what} "
                f"at {delay:.2f}s/{span:.2f}s via {'openssh' if openssh else 'libssh2'}: "
                f"{'killed' if landed else 'run already over'}, exit {p.returncode}{second}"
                f"{'; no wait for its serves' if landed and hurry else ''}")
            self.finish_trial(kind, t, world, pre, extra)

    # ---------------------------------------------------------------- network
    def net(self, kind, world, n, faulty_root, freeze_pid=None):
        rng = self.rng
        for t in range(n):
            st = self.stats[kind]
            st["trials"] += 1
            self.begin(world)
            b = Batch(world, rng, f"{kind}{t}")
            b.mixed(edits=rng.randint(5, 15), creates=rng.randint(3, 10), deletes=rng.randint(2, 6),
                    conflicts=rng.randint(1, 4), rmdir=False, drop_big=1)
            bigname = f"big/{kind}-{t}.bin"
            b.put(0, bigname, rng.randint(64, 160) << 20)
            pre = world.snaps()
            openssh = rng.random() < 0.4 and kind != "net-cut"
            args = ["--timeout", "5s", "--connect-timeout", "3s"]
            if openssh:
                args += ["--ssh-command", OPENSSH]
            extra, stopped = [], []
            if kind == "net-silent":
                stopped = freeze(freeze_pid)
            t0 = time.monotonic()
            p = world.start(args)
            t_fault = t0
            if kind != "net-silent":
                bigdir = os.path.join(faulty_root, "big")
                while p.poll() is None and time.monotonic() - t0 < 60:
                    try:
                        if any(is_hubsync_temp(x) for x in os.listdir(bigdir)):
                            break
                    except FileNotFoundError:
                        pass
                    time.sleep(0.003)
                time.sleep(rng.uniform(0, 0.15))
                if p.poll() is None:
                    t_fault = time.monotonic()
                    if kind == "net-stop":
                        stopped = freeze(freeze_pid)
                    else:
                        subprocess.run(["ip", "-n", NS_HUB, "link", "set", NS_HUB_DEV, "down"], check=True)
                    st["landed"] += 1
                else:
                    extra.append("the transfer was over before the fault (not a failure of hubsync)")
            else:
                st["landed"] += 1
            try:
                out, err = p.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                extra.append(f"the hub hung for 90s after the fault:\n{err[-2000:]}")
            gave_up = time.monotonic() - t_fault
            bound = 20 if kind != "net-silent" else 25
            after = world.snaps()
            if kind == "net-silent" or t_fault != t0:
                if p.returncode != 2:
                    extra.append(f"exit {p.returncode} (expected 2):\n{err[-2000:]}")
                if gave_up > bound:
                    extra.append(f"gave up {gave_up:.1f}s after the fault (bound {bound}s, --timeout 5s)")
                if after[2].files.get(bigname) != pre[0].files[bigname]:
                    extra.append(f"the healthy peer r2 did not get {bigname}")
                if kind == "net-silent" and after[2].files != after[0].files:
                    extra.append("the hub and the healthy peer differ after the run")
            for i, s in enumerate(after):
                for q, head in s.invalid.items():
                    extra.append(f"r{i}: {q} is partial right after the fault: {head!r}")
            if extra and extra[0].startswith("the transfer was over"):
                st["notes"].append("missed")
                extra = extra[1:]
            log(f"{kind} trial {t}: {'openssh' if openssh else 'libssh2'}, exit {p.returncode}, "
                f"gave up {gave_up:.1f}s after the fault")
            if kind == "net-cut":
                subprocess.run(["ip", "-n", NS_HUB, "link", "set", NS_HUB_DEV, "up"], check=True)
            elif stopped:
                thaw(freeze_pid, stopped)
            self.finish_trial(kind, t, world, pre, extra)

    # ---------------------------------------------------------------- disk full
    def disk_full(self, world, n):
        """The filesystem of one receiving replica fills up mid-run: in turn the SSH
        peer r1 (the run is partial: exit 2) and the hub's own root r0 (the hub's own
        replica failed: exit 1). Both roots live on small tmpfs mounts."""
        rng = self.rng
        kind = "disk-full"
        for t in range(n):
            full = (1, 0)[t % 2]
            fs = (SMALL_FS2, SMALL_FS)[full]
            filler = os.path.join(fs, "filler")
            source = 0 if full == 1 else 2
            st = self.stats[kind]
            st["trials"] += 1
            st["landed"] += 1
            # The big files of the trial before go first (a run of its own), so that
            # the deletions of this run free no room.
            olds = [p for p in world.base if p.startswith("big/")]
            if olds:
                for p in olds:
                    os.unlink(os.path.join(world.roots[0], p))
                world.recover()
                world.settle()
            self.begin(world)
            b = Batch(world, rng, f"df{t}")
            b.mixed(edits=rng.randint(3, 10), creates=rng.randint(2, 6), deletes=rng.randint(1, 4),
                    conflicts=rng.randint(0, 2), rmdir=False, drop_big=0)
            # Fill the replica's filesystem, leaving a little room, sometimes none
            # even for its own state files.
            vfs = os.statvfs(fs)
            room = rng.choice([0, 4 << 10, 64 << 10]) if rng.random() < 0.25 else \
                rng.randint(256 << 10, 6 << 20)
            free = vfs.f_bavail * vfs.f_frsize
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, free - room))
            # Then more than that room of new and replaced files on another replica.
            need, k, newp = room + rng.randint(1 << 20, 8 << 20), 0, []
            while need > 0:
                size = rng.randint(256 << 10, 3 << 20)
                p = f"big/df{t}-{k}.bin"
                b.put(source, p, size)
                newp.append(p)
                need -= size
                k += 1
            victim = rng.choice(sorted(p for p in world.base if not p.startswith("big/")))
            b.put(source, victim, 2 << 20)
            pre = world.snaps()
            code, out, err, dur = world.run(["--timeout", "10s"], limit=120)
            extra = []
            want = 2 if full == 1 else 1
            who = "the peer r1" if full == 1 else "the hub r0"
            if code != want:
                extra.append(f"exit {code} with {who}'s disk full (expected {want}):\n{err[-2000:]}")
            if "space" not in err.lower():
                extra.append(f"no word of the full disk in the report:\n{err[-2000:]}")
            names = ["127.0.0.1", world.peers[0]] if full == 1 else ["hub", world.roots[0]]
            if not any(x in err for x in names):
                extra.append(f"the report does not name {who}:\n{err[-2000:]}")
            if not any(x in err for x in newp + [victim]):
                extra.append(f"the report names none of the paths that did not fit:\n{err[-2000:]}")
            log(f"disk-full trial {t}: {who} full, {room >> 10} KiB free, exit {code} in {dur:.1f}s; "
                f"report: {' | '.join(l for l in err.splitlines() if 'space' in l.lower())[:300]}")
            after = snapshot(world.roots[full])
            deleted_by_batch = {p for s in pre for p in world.base if p not in s.files}
            allowed = {}
            for s in pre:
                for p, v in s.files.items():
                    allowed.setdefault(p, set()).add(v)
            for p, v in pre[full].files.items():
                if p not in after.files and p not in deleted_by_batch:
                    extra.append(f"r{full} (full): {p} is gone")
                elif p in after.files and after.files[p] not in allowed.get(p, ()):
                    extra.append(f"r{full} (full): {p} holds {after.files[p]}, not a version of it")
            for q, head in after.invalid.items():
                extra.append(f"r{full} (full): {q} is partial: {head!r}")
            os.unlink(filler)
            self.finish_trial(kind, t, world, pre, extra)

    # ---------------------------------------------------------------- writers
    def writers(self, world, n, seconds, pages=40):
        rng = self.rng
        kind = "writers"
        names = [f"wiki/pages/ns{i % 6}/page{i}.txt" for i in range(pages)]
        for name in names:
            if name not in world.base:
                write(world.roots[0], name, make(name, "w.init", 1000)[0])
        world.recover()
        world.settle()
        for t in range(n):
            st = self.stats[kind]
            st["trials"] += 1
            st["landed"] += 1
            self.begin(world)
            pre = world.snaps()
            stop = threading.Event()
            inplace = {}  # (replica, path) -> [[start, end], ...] of in-place writes
            final = {}
            torn, reads, writes, runs = [], [0], [0], []
            wrng, crng = random.Random(rng.random()), random.Random(rng.random())

            def writer():
                last = {}
                seq = 0
                next_t = time.monotonic()
                while not stop.is_set():
                    now = time.monotonic()
                    name = wrng.choice(names)
                    if now - last.get(name, 0) < 0.03:
                        continue
                    r = wrng.randrange(3)
                    seq += 1
                    data, v = make(name, f"w{t}.{seq}.r{r}",
                                   wrng.choice([200, 800, 3000, 9000, 30000, 200000]))
                    path = os.path.join(world.roots[r], name)
                    if wrng.random() < 0.5:
                        span = [time.monotonic(), float("inf")]
                        inplace.setdefault((r, name), []).append(span)
                        with open(path, "wb") as f:  # truncate, then write: like DokuWiki
                            f.write(data)
                        span[1] = time.monotonic()
                    else:
                        tmp = os.path.join(os.path.dirname(path), f".wtmp.{seq}")
                        with open(tmp, "wb") as f:
                            f.write(data)
                        os.rename(tmp, path)
                    last[name] = time.monotonic()
                    final[name] = v
                    writes[0] += 1
                    next_t += 0.01
                    time.sleep(max(0, next_t - time.monotonic()))

            def checker():
                while not stop.is_set():
                    r = crng.randrange(3)
                    name = crng.choice(names)
                    t0 = time.monotonic()
                    try:
                        with open(os.path.join(world.roots[r], name), "rb") as f:
                            data = f.read()
                    except FileNotFoundError:
                        continue
                    t1 = time.monotonic()
                    reads[0] += 1
                    time.sleep(0.0005)  # leave the cores to hubsync and the writer
                    if valid(data):
                        continue
                    own = any(s < t1 and e > t0 for s, e in inplace.get((r, name), []))
                    if not own:
                        torn.append(f"r{r}: {name} seen torn ({len(data)} bytes: {data[:50]!r}) "
                                    f"with no in-place write of it on r{r} at the time")

            def syncer():
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        code, _, err, dur = world.run(limit=120)
                    except Failure as e:
                        torn.append(str(e))
                        continue
                    runs.append(code)
                    if code != 0:
                        torn.append(f"a run during the writes exited {code}:\n{err[-1500:]}")
                    stop.wait(max(0, 2 - (time.monotonic() - t0)))

            threads = [threading.Thread(target=f) for f in (writer, checker, syncer)]
            for th in threads:
                th.start()
            time.sleep(seconds)
            stop.set()
            for th in threads:
                th.join()
            log(f"writers trial {t}: {writes[0]} writes in {seconds}s "
                f"({writes[0] / seconds:.0f}/s), {len(runs)} runs (exits {sorted(set(runs))}), "
                f"{reads[0]} reads checked")
            extra = list(torn)
            # The writer's final version of each page is what every replica ends with;
            # the earlier ones may be superseded, but never torn.
            world.recover()
            snaps = [snapshot(r) for r in world.roots]
            kept, _ = world.kept()
            for name, v in sorted(final.items()):
                for i, s in enumerate(snaps):
                    if s.files.get(name) != v:
                        where = "kept only as a conflict copy" if v in kept else "LOST"
                        extra.append(f"r{i}: {name} is {s.files.get(name)}, not the writer's last "
                                     f"version {v} ({where})")
                        if v not in kept:
                            st["lost"] += 1
            # Pages are not in the batch sense "new versions that must survive":
            # only their final versions count.
            for s in pre:
                for name in names:
                    s.files.pop(name, None)
            world.base_prev = {p: v for p, v in world.base_prev.items() if p not in names}
            for name in names:
                world.base.pop(name, None)
            self.finish_trial(kind, t, world, pre, extra)

    # ---------------------------------------------------------------- table
    def table(self):
        lines = [f"{'fault kind':<12} {'trials':>6} {'landed':>6} {'failures':>8} {'lost':>5}  notes"]
        tot = [0, 0, 0, 0]
        for k in KINDS:
            s = self.stats[k]
            if not s["trials"]:
                continue
            notes = ""
            retries = [x for x in s["notes"] if isinstance(x, int)]
            missed = s["notes"].count("missed")
            if retries:
                notes += f"recovery needed >1 run {len(retries)}x (max {max(retries)}) "
            if missed:
                notes += f"{missed} transfers ended before the fault "
            if "orphan" in s:
                notes += f"leftover processes gone within {s['orphan']:.1f}s"
            lines.append(f"{k:<12} {s['trials']:>6} {s['landed']:>6} {s['failures']:>8} "
                         f"{s['lost']:>5}  {notes}")
            for j, key in enumerate(["trials", "landed", "failures", "lost"]):
                tot[j] += s[key]
        lines.append(f"{'total':<12} {tot[0]:>6} {tot[1]:>6} {tot[2]:>8} {tot[3]:>5}")
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(prog="torture.sh")
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--only")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "big")
    only = set(a.only.split(",")) if a.only else set(KINDS)
    bad = only - set(KINDS)
    if bad:
        ap.error(f"unknown kinds {sorted(bad)}; known: {', '.join(KINDS)}")
    mode = "short" if a.short else "long"
    print(f"torture: {mode} mode, seed {seed} (reproduce with --seed {seed}), binary {HUB}", flush=True)
    selftest()
    s = Suite(seed, a.short)
    rng = s.rng
    R = lambda name: os.path.join(WORK, name)
    ssh = lambda port, root, host="127.0.0.1": f"ssh://{SSH_USER}@{host}:{port}{root}"
    n = (lambda short, long: short if a.short else long)
    try:
        if only & {"crash-hub", "crash-serve"}:
            roots = [R("crash/r0"), R("crash/r1"), R("crash/r2")]
            for r in roots:
                os.makedirs(r)
            w = World("crash", roots, [ssh(SSH_A_PORT, roots[1]), roots[2]])
            populate(w, rng, n(2000, 3000), 60)
            s.crash(w, n(8, 60) if "crash-hub" in only else 0,
                    n(8, 50) if "crash-serve" in only else 0)
        if only & {"net-stop", "net-silent"}:
            roots = [R("net/r0"), R("net/r1"), R("net/r2")]
            for r in roots:
                os.makedirs(r)
            w = World("net", roots, [ssh(SSH_A_PORT, roots[1]), ssh(SSH_B_PORT, roots[2])])
            populate(w, rng, 500, 20)
            if "net-stop" in only:
                s.net("net-stop", w, n(3, 8), roots[1], SSH_A_PID)
            if "net-silent" in only:
                s.net("net-silent", w, n(3, 6), roots[1], SSH_A_PID)
        if "net-cut" in only:
            roots = [R("cut/r0"), R("cut/r1"), R("cut/r2")]
            for r in roots:
                os.makedirs(r)
            w = World("cut", roots, [ssh(SSH_NS_PORT, roots[1], ADDR_PEER), roots[2]],
                      prefix=["ip", "netns", "exec", NS_HUB])
            populate(w, rng, 500, 20)
            s.net("net-cut", w, n(3, 8), roots[1])
        if "disk-full" in only:
            roots = [os.path.join(SMALL_FS2, "r0"), os.path.join(SMALL_FS, "r1"), R("full/r2")]
            for r in roots:
                os.makedirs(r)
            w = World("full", roots, [ssh(SSH_B_PORT, roots[1]), roots[2]])
            populate(w, rng, 300, 10)
            s.disk_full(w, n(3, 8))
        if "writers" in only:
            roots = [R("writers/r0"), R("writers/r1"), R("writers/r2")]
            for r in roots:
                os.makedirs(r)
            w = World("writers", roots, [ssh(SSH_A_PORT, roots[1]), roots[2]])
            populate(w, rng, 1000, 20)
            s.writers(w, n(1, 3), n(20, 60))
    except Failure as e:
        s.failures.append(f"aborted: {e}")
        log(f"ABORTED: {e}")
    except KeyboardInterrupt:
        s.failures.append("interrupted")
    print("\n" + s.table(), flush=True)
    elapsed = time.monotonic() - T_START
    if s.failures:
        print(f"\ntorture: FAILED ({len(s.failures)} failures, "
              f"{sum(x['lost'] for x in s.stats.values())} versions lost) in {elapsed:.0f}s; "
              f"seed {seed} (reproduce with --seed {seed}"
              f"{' --short' if a.short else ''}):", flush=True)
        for f in s.failures:
            print("  - " + f.replace("\n", "\n    "), flush=True)
        sys.exit(1)
    print(f"\ntorture: all trials passed, nothing lost, in {elapsed:.0f}s (seed {seed})", flush=True)


if __name__ == "__main__":
    main()
