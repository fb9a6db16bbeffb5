"""Do a peer and its hub agree?  (scripts/bench.sh, scripts/bench-ssh.sh)

    same.py HUB_LISTING PEER_LISTING TOLERANCE_NS

The listings are `find -printf` output as made by listing() in the scripts: "d PATH"
for directories, "TYPE PATH SIZE MTIME MODE" for the rest. Prints how many entries
differ (and up to 3 examples on stderr); mtimes may differ by the tolerance (unison
keeps mtimes as floating-point seconds, so only to about a microsecond).
"""
import sys
def load(path):
    out = {}
    for line in open(path, encoding="utf-8", errors="surrogateescape"):
        f = line.rstrip("\n").split(" ")
        if f[0] == "d":
            out[" ".join(f[1:])] = ("d",)
        else:
            sec, _, frac = f[-2].partition(".")
            ns = int(sec) * 10**9 + int((frac + "000000000")[:9])
            out[" ".join(f[1:-3])] = (f[0], f[-3], ns, f[-1])
    return out
a, b, tol = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
bad = []
for k in sorted(set(a) | set(b)):
    x, y = a.get(k), b.get(k)
    same = x is not None and y is not None and (
        x == y or (len(x) == 4 and len(y) == 4 and x[0] == y[0] and x[1] == y[1]
                   and x[3] == y[3] and abs(x[2] - y[2]) <= tol))
    if not same:
        bad.append(f"{k}: hub {x} peer {y}")
for e in bad[:3]:
    print("    | " + e, file=sys.stderr)
print(len(bad))
