#!/usr/bin/env python3
"""Deterministic DokuWiki-shaped trees for benchmarking hubsync (stdlib only).

    gen-tree.py tree DIR [--files N] [--seed S]
        Writes a fresh tree of exactly N files (default 100000) under DIR/data:
          pages/       3 levels of namespaces of .txt pages (1-8 KB of wiki text)
          attic/       <page>.<unixtime>.txt.gz, 1-6 old revisions per page
          meta/        <page>.changes (tab-separated, leading unix time), <page>.meta
          media/       ~1.5% of the files: binary "images", 20-300 KB of random bytes
          media_meta/  <image>.changes
        mtimes are set from the (seeded) revision times, so two runs with the same
        N and seed produce byte- and mtime-identical trees.

    gen-tree.py edit REF OUT --round K --mtime-ns T [--seed S] [--pages 5] [--images 1]
        Writes into OUT (a staging tree, relative paths as in REF) what DokuWiki
        would write when someone edits --pages pages and uploads --images images at
        time T: the new page text, its attic revision, the .changes line appended,
        a new .meta; the image and its media_meta .changes. REF is read, not changed.

    gen-tree.py apply OUT ROOT...
        Copies every file of the staging tree OUT into each ROOT in place (existing
        files are truncated and rewritten, as DokuWiki does) and gives it the mtime it
        has in OUT, so every ROOT ends up with identical content and mtimes.
"""

import argparse
import gzip
import os
import random
import shutil
import sys
import time

BASE_TS = 1262304000  # 2010-01-01
END_TS = 1704067200  # 2024-01-01

COMMON = (
    "the of and to a in is it you that he was for on are with as his they be at one "
    "have this from or had by hot word but what some we can out other were all there "
    "when up use your how said an each she which do their time if will way about many "
    "then them write would like so these her long make thing see him two has look more "
    "day could go come did number sound no most people my over know water than call "
    "first who may down side been now find server config backup install user page wiki "
    "network update release module cache index plugin template admin login access"
).split()
SYLLABLES = (
    "ka ri to mu ne sa lo vi de ra po li ta me su ko ba ni fe go ha ju ke lu mo na pe "
    "qui ro se tu va we xi yo za an el in on ur ex al or is"
).split()
USERS = ["admin", "jdoe", "msmith", "kwong", "lgarcia", "pnovak", "rsingh", "tkato"]
SUMMARIES = ["", "typo", "update", "more details", "fixed links", "new section",
             "cleanup", "added example", "reworded", "see discussion"]


def vocabulary(rng, n=3000):
    words = set(COMMON)
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


class Text:
    """Wiki text made of a fixed vocabulary."""

    def __init__(self, rng):
        self.rng = rng
        self.words = vocabulary(rng)

    def sentence(self):
        ws = self.rng.choices(self.words, k=self.rng.randint(6, 18))
        return " ".join(ws).capitalize() + "."

    def paragraph(self, links):
        r = self.rng.random()
        if r < 0.15:
            return "\n".join("  * " + self.sentence() for _ in range(self.rng.randint(2, 6)))
        if r < 0.22:
            body = "\n".join("  " + " ".join(self.rng.choices(self.words, k=5))
                             for _ in range(self.rng.randint(2, 8)))
            return "<code>\n" + body + "\n</code>"
        s = " ".join(self.sentence() for _ in range(self.rng.randint(2, 6)))
        if links and self.rng.random() < 0.5:
            s += " See [[" + self.rng.choice(links) + "]]."
        return s

    def heading(self, level=None):
        level = level or self.rng.randint(2, 5)
        eq = "=" * (7 - level)
        return f"{eq} {' '.join(self.rng.choices(self.words, k=self.rng.randint(1, 4))).title()} {eq}"

    def page(self, title, size, links):
        parts = [f"====== {title} ======", ""]
        n = len(parts[0]) + 1
        while n < size:
            p = self.heading() if self.rng.random() < 0.2 else self.paragraph(links)
            parts.append(p)
            parts.append("")
            n += len(p) + 2
        s = "\n".join(parts)
        if len(s) > size:  # cut at a word boundary, keep it >= 1 KB
            cut = s.rfind(" ", 0, size)
            s = s[: cut if cut > 1024 else size]
        return s.rstrip() + "\n"

    def revise(self, text):
        """An earlier or later revision: some paragraphs dropped, changed or added."""
        paras = text.split("\n\n")
        out = [paras[0]]
        for p in paras[1:]:
            r = self.rng.random()
            if r < 0.08:
                continue
            if r < 0.16:
                out.append(self.paragraph([]))
            else:
                out.append(p)
        if self.rng.random() < 0.5:
            out.append(self.paragraph([]))
        return "\n\n".join(out).rstrip() + "\n"


def page_size(rng):
    # 1-8 KB, more small pages than big ones.
    return int(min(8192, max(1024, rng.lognormvariate(8.2, 0.45))))


def php_meta(page_id, title, creator, created, modified, user, abstract):
    def s(x):
        b = x.encode()
        return f's:{len(b)}:"{x}";'
    cur = (
        "a:5:{" + s("date") + "a:2:{" + s("created") + f"i:{created};" + s("modified")
        + f"i:{modified};" + "}" + s("creator") + s(creator) + s("title") + s(title)
        + s("description") + "a:1:{" + s("abstract") + s(abstract) + "}"
        + s("last_change") + "a:3:{" + s("date") + f"i:{modified};" + s("id") + s(page_id)
        + s("user") + s(user) + "}}"
    )
    return "a:2:{" + s("current") + cur + s("persistent") + "a:1:{" + s("creator") + s(creator) + "}}"


def change_line(ts, kind, page_id, user, summary, sizechange):
    ip = f"10.{ts % 7}.{ts % 251}.{ts % 13 + 1}"
    return f"{ts}\t{ip}\t{kind}\t{page_id}\t{user}\t{summary}\t\t{sizechange}\n"


def write(path, data, mtime, dirs):
    d = os.path.dirname(path)
    if d not in dirs:
        os.makedirs(d, exist_ok=True)
        dirs.add(d)
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, (mtime, mtime))


def namespaces(rng, words, n_pages):
    want = max(3, n_pages // 25)
    per = max(2, round(want ** (1 / 3)))
    out = []
    for _ in range(per):
        a = rng.choice(words)
        out.append((a,))
        for _ in range(per):
            b = rng.choice(words)
            out.append((a, b))
            for _ in range(per):
                out.append((a, b, rng.choice(words)))
    return sorted(set(out))


def fake_image(rng, size, ext):
    head = {
        "jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00",
        "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        "gif": b"GIF89a",
    }[ext]
    return head + rng.randbytes(size - len(head))


def cmd_tree(args):
    n = args.files
    if n < 100:
        sys.exit("gen-tree.py: --files must be at least 100")
    root = os.path.join(args.dir, "data")
    if os.path.exists(root):
        sys.exit(f"gen-tree.py: {root} already exists")
    rng = random.Random(args.seed)
    text = Text(random.Random(args.seed + 1))
    words = text.words

    n_media = max(1, round(n * 0.015))
    budget = n - 2 * n_media
    attic_counts = []
    while budget >= 9:
        a = rng.randint(1, 6)
        attic_counts.append(a)
        budget -= 3 + a
    if budget >= 4 or not attic_counts:
        attic_counts.append(budget - 3)
    else:
        attic_counts[-1] += budget
    n_pages = len(attic_counts)

    nss = namespaces(rng, words, n_pages)
    # Place pages: every namespace starts with "start", the rest at random.
    ids = []
    used = set()
    for i in range(n_pages):
        ns = nss[i] if i < len(nss) else rng.choice(nss)
        name = "start" if i < len(nss) else "_".join(rng.choices(words, k=rng.randint(1, 3)))
        pid = ":".join(ns + (name,))
        while pid in used:
            name += "_" + rng.choice(words)
            pid = ":".join(ns + (name,))
        used.add(pid)
        ids.append(pid)

    dirs = set()
    count = 0
    total = 0
    for pid, n_attic in zip(ids, attic_counts):
        rel = pid.replace(":", "/")
        title = pid.rsplit(":", 1)[1].replace("_", " ").title()
        links = rng.sample(ids, 3)
        final = text.page(title, page_size(rng), links)
        # n_attic old revisions + the current one, oldest first.
        times = sorted(rng.sample(range(BASE_TS, END_TS), n_attic + 1))
        revs = [final]
        for _ in range(n_attic):
            revs.append(text.revise(revs[-1]))
        revs.reverse()  # oldest first; revs[-1] == final
        users = [rng.choice(USERS) for _ in times]
        changes = []
        prev = 0
        for k, (ts, body) in enumerate(zip(times, revs)):
            size = len(body.encode())
            changes.append(change_line(ts, "C" if k == 0 else "E", pid, users[k],
                                       "created" if k == 0 else rng.choice(SUMMARIES),
                                       size - prev))
            prev = size
            if k < n_attic:
                gz = gzip.compress(body.encode(), compresslevel=6, mtime=ts)
                write(os.path.join(root, "attic", f"{rel}.{ts}.txt.gz"), gz, ts, dirs)
                count += 1
                total += len(gz)
        data = final.encode()
        last = times[-1]
        write(os.path.join(root, "pages", rel + ".txt"), data, last, dirs)
        ch = "".join(changes).encode()
        write(os.path.join(root, "meta", rel + ".changes"), ch, last, dirs)
        abstract = " ".join(final.split("\n\n", 1)[-1].split())[:250]
        meta = php_meta(pid, title, users[0], times[0], last, users[-1], abstract).encode()
        write(os.path.join(root, "meta", rel + ".meta"), meta, last, dirs)
        count += 3
        total += len(data) + len(ch) + len(meta)

    media_names = set()
    for _ in range(n_media):
        ns = rng.choice(nss)
        ext = rng.choice(["jpg", "jpg", "jpg", "png", "png", "gif"])
        name = "_".join(rng.choices(words, k=rng.randint(1, 2)))
        while (ns, name) in media_names:
            name += "_" + str(rng.randint(0, 99))
        media_names.add((ns, name))
        ts = rng.randrange(BASE_TS, END_TS)
        size = rng.randint(20 << 10, 300 << 10)
        rel = "/".join(ns + (f"{name}.{ext}",))
        data = fake_image(rng, size, ext)
        write(os.path.join(root, "media", rel), data, ts, dirs)
        mid = ":".join(ns + (f"{name}.{ext}",))
        ch = change_line(ts, "C", mid, rng.choice(USERS), "created", size).encode()
        write(os.path.join(root, "media_meta", rel + ".changes"), ch, ts, dirs)
        count += 2
        total += len(data) + len(ch)
    assert count == n, (count, n)
    print(f"gen-tree.py: {count} files, {total / 1e6:.1f} MB, {n_pages} pages, "
          f"{len(nss)} namespaces, {n_media} images in {root}", file=sys.stderr)


def cmd_edit(args):
    ref = os.path.join(args.ref, "data")
    rng = random.Random(args.seed * 1000003 + args.round)
    text = Text(random.Random(args.seed + 1))  # same vocabulary as the tree
    pages = []
    top = os.path.join(ref, "pages")
    for d, subdirs, files in os.walk(top):
        subdirs.sort()
        for f in sorted(files):
            if f.endswith(".txt"):
                pages.append(os.path.relpath(os.path.join(d, f), top)[: -len(".txt")])
    if len(pages) < args.pages:
        sys.exit("gen-tree.py: not enough pages to edit")
    t_ns = args.mtime_ns
    ts = t_ns // 1_000_000_000
    out = os.path.join(args.out, "data")
    dirs = set()

    def put(rel, data):
        path = os.path.join(out, rel)
        d = os.path.dirname(path)
        if d not in dirs:
            os.makedirs(d, exist_ok=True)
            dirs.add(d)
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, ns=(t_ns, t_ns))

    for rel in rng.sample(pages, args.pages):
        pid = rel.replace("/", ":")
        with open(os.path.join(ref, "pages", rel + ".txt"), "rb") as f:
            old = f.read()
        new = text.revise(old.decode())
        new += f"\n===== Edit {args.round} =====\n\n" + text.paragraph([]) + "\n"
        data = new.encode()
        user = rng.choice(USERS)
        put(f"pages/{rel}.txt", data)
        put(f"attic/{rel}.{ts}.txt.gz", gzip.compress(data, compresslevel=6, mtime=ts))
        with open(os.path.join(ref, "meta", rel + ".changes"), "rb") as f:
            ch = f.read()
        first = ch.split(b"\n", 1)[0].split(b"\t")
        ch += change_line(ts, "E", pid, user, rng.choice(SUMMARIES), len(data) - len(old)).encode()
        put(f"meta/{rel}.changes", ch)
        title = rel.rsplit("/", 1)[-1].replace("_", " ").title()
        abstract = " ".join(new.split("\n\n", 1)[-1].split())[:250]
        put(f"meta/{rel}.meta",
            php_meta(pid, title, first[4].decode(), int(first[0]), ts, user, abstract).encode())
    for i in range(args.images):
        ns = os.path.dirname(rng.choice(pages))
        name = f"upload_r{args.round}_{i}_{rng.randint(0, 10**6)}.jpg"
        rel = os.path.join(ns, name) if ns else name
        size = rng.randint(20 << 10, 300 << 10)
        put(f"media/{rel}", fake_image(rng, size, "jpg"))
        put(f"media_meta/{rel}.changes",
            change_line(ts, "C", rel.replace("/", ":"), rng.choice(USERS), "created", size).encode())


def cmd_apply(args):
    for root in args.roots:
        for d, subdirs, files in os.walk(args.out):
            subdirs.sort()
            for f in sorted(files):
                src = os.path.join(d, f)
                dst = os.path.join(root, os.path.relpath(src, args.out))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                st = os.stat(src)
                shutil.copyfile(src, dst)  # truncates and rewrites an existing file
                os.utime(dst, ns=(st.st_mtime_ns, st.st_mtime_ns))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tree")
    t.add_argument("dir")
    t.add_argument("--files", type=int, default=100000)
    t.add_argument("--seed", type=int, default=42)
    e = sub.add_parser("edit")
    e.add_argument("ref")
    e.add_argument("out")
    e.add_argument("--round", type=int, required=True)
    e.add_argument("--mtime-ns", type=int, default=None)
    e.add_argument("--seed", type=int, default=42)
    e.add_argument("--pages", type=int, default=5)
    e.add_argument("--images", type=int, default=1)
    a = sub.add_parser("apply")
    a.add_argument("out")
    a.add_argument("roots", nargs="+")
    args = p.parse_args()
    if args.cmd == "tree":
        cmd_tree(args)
    elif args.cmd == "edit":
        if args.mtime_ns is None:
            args.mtime_ns = time.time_ns()
        cmd_edit(args)
    else:
        cmd_apply(args)


if __name__ == "__main__":
    main()
