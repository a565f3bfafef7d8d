"""System calls per small-vector round trip, ours against the raw pyzmq anchor: a count that does not swing
with a busy machine the way wall time does. Each side runs in a child under ``strace -f -c`` twice (a short and
a long run, same setup); the difference divided by the extra round trips is the per-round-trip count.

    .venv/bin/python bench/round_trip_syscalls.py [--n 7510] [--reps 5000]

Needs strace (Linux). Security off, client and server in one process (as ``ps_bench.py``'s first row).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def _child(which: str, n: int, reps: int) -> None:
    sys.path.insert(0, os.path.dirname(HERE))
    sys.path.insert(0, HERE)
    import logging

    logging.disable(logging.WARNING)
    from ps_bench import ours_round_trip, raw_round_trip

    raw_round_trip(n, reps) if which == "raw" else ours_round_trip(n, reps, secure=False)


def _counts(path: str) -> dict:
    """strace -c's summary table -> {syscall: calls}."""
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                out[parts[-1]] = int(parts[3])
    return out


def per_round_trip(which: str, n: int, reps: int, base: int = 100) -> dict:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in (base, base + reps):
            path = os.path.join(tmp, f"{which}{r}.txt")
            subprocess.run(["strace", "-f", "-c", "-o", path, sys.executable, os.path.abspath(__file__),
                            "--child", which, "--n", str(n), "--reps", str(r)], check=True,
                           stdout=subprocess.DEVNULL)
            runs.append(_counts(path))
    short, long_ = runs
    return {k: (long_.get(k, 0) - short.get(k, 0)) / reps for k in long_}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=7510, help="floats per message (default: the digits net)")
    ap.add_argument("--reps", type=int, default=5000)
    ap.add_argument("--child", choices=("raw", "ours"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child(a.child, a.n, a.reps)
    if shutil.which("strace") is None:
        sys.exit("strace is not installed: this count needs it (apt-get install strace)")
    print(f"system calls per round trip, {a.n} floats, security off, one process (strace -f -c, "
          f"{a.reps} round trips)")
    for which in ("raw", "ours"):
        calls = per_round_trip(which, a.n, a.reps)
        top = sorted(((v, k) for k, v in calls.items() if abs(v) >= 0.05), reverse=True)
        print(f"  {which:4s} {sum(calls.values()):6.1f}: " + ", ".join(f"{k} {v:.1f}" for v, k in top))


if __name__ == "__main__":
    main()
