"""Soak: 8 clients push to one server for 10 minutes; the server's memory must stay flat and no update be lost.

    .venv/bin/python bench/soak.py                      # 8 clients, 10 minutes, [784,256,256,10] (269k params)
    .venv/bin/python bench/soak.py --minutes 1 --clients 4

The server (CURVE on) runs in this process, each client in a process of its own, pushing a gradient and
taking the new weights back, as an async worker does. Every ``--every`` seconds the server's resident memory
is sampled. At the end: every push a client counted was applied (server version == pushes), and the memory
samples after the first minute stay within +-10 % of their median. Writes bench/results/soak.json (or
$OUT/soak.json) and prints one line per sample and a verdict; exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.network import param_layout  # noqa: E402
from ps import ParameterClient, ParameterServer  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def client(cfg, worker_id, seconds, out_q):
    """Push until ``seconds`` have passed -> (pushes, errors) on out_q."""
    rng = np.random.default_rng(worker_id)
    g = (rng.standard_normal(cfg["num_params"]) * 1e-6).astype(np.float32)
    pushes = errors = 0
    with ParameterClient(cfg, worker_id=worker_id, timeout=30) as c:
        c.barrier(1)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            try:
                c.push(g, loss=0.5, accuracy=0.5, batch_size=32, want_weights=True)
                pushes += 1
            except Exception as exc:  # noqa: BLE001 - count it; the check below fails on any
                errors += 1
                print(f"client {worker_id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        c.bye()
    out_q.put((worker_id, pushes, errors))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--layers", default="784,256,256,10")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between memory samples")
    a = ap.parse_args(argv)
    layers = [int(v) for v in a.layers.split(",")]
    num_params = param_layout(layers)[-1].end
    seconds = a.minutes * 60
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    samples = []
    with ParameterServer(np.zeros(num_params, np.float32), mode="async", learning_rate=0.01,
                         num_workers=a.clients, layers=layers, progress=False, barrier_timeout=120) as s:
        cfg = s.client_config()
        procs = [ctx.Process(target=client, args=(cfg, i, seconds, q), daemon=True) for i in range(a.clients)]
        for p in procs:
            p.start()
        t0 = time.monotonic()
        while any(p.is_alive() for p in procs) and time.monotonic() - t0 < seconds + 120:
            time.sleep(a.every)
            st = s.stats()
            samples.append({"t": round(time.monotonic() - t0, 1), "rss_mb": round(rss_mb(), 1),
                            "version": st["version"], "rejected": st["rejected_total"]})
            print(f"{samples[-1]['t']:7.1f} s  rss {samples[-1]['rss_mb']:7.1f} MB  applied {st['version']:>9,}  "
                  f"rejected {st['rejected_total']}", flush=True)
        results = [q.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        st = s.stats()
    pushes = sum(r[1] for r in results)
    errors = sum(r[2] for r in results)
    steady = [x["rss_mb"] for x in samples if x["t"] >= 60] or [x["rss_mb"] for x in samples]
    median = statistics.median(steady)
    spread = (max(steady) - min(steady)) / median if median else float("nan")
    checks = {"nothing_lost": pushes == st["version"] == st["applied"] and errors == 0,
              "memory_flat": max(abs(v - median) for v in steady) <= 0.10 * median}
    report = {"clients": a.clients, "minutes": a.minutes, "layers": layers, "num_params": num_params,
              "pushes": pushes, "client_errors": errors, "server_applied": st["applied"],
              "server_rejected": st["rejected_total"], "updates_per_s": pushes / seconds,
              "rss_median_mb": median, "rss_min_mb": min(steady), "rss_max_mb": max(steady),
              "rss_spread": spread, "samples": samples, "checks": checks}
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    print(f"{a.clients} clients x {a.minutes:g} min: {pushes:,} pushes ({pushes / seconds:,.0f}/s), server applied "
          f"{st['applied']:,}, client errors {errors}; server RSS after the first minute {min(steady):.1f}.."
          f"{max(steady):.1f} MB (median {median:.1f}, spread {100 * spread:.1f} %); "
          + ", ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in checks.items()))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
