"""When does the parameter server pay off? N workers against the best single process at equal total cores.

    .venv/bin/python bench/scale_bench.py                      # [784,256,256,10], 48k rows, async window 8, CURVE on
    .venv/bin/python bench/scale_bench.py --workers 1,2,4 --backend numba --window 8 --epochs 3
    .venv/bin/python bench/scale_bench.py --quick              # 6k rows, 2 epochs: checks it runs
    .venv/bin/python bench/scale_bench.py --workers 2 --compare-pipeline 5   # in line vs pipelined, alternating

1. The anchors: one process with no server (numba and numpy backends, default threads: all cores).
2. The runner: N worker processes (cores // N threads each) and a CURVE server on this machine.
   Each run: samples/s (training, from the workers' own clocks), wall time, time to a target training
   accuracy (the single process's last epoch's, minus a point), test accuracy, and the ratio to the best
   single process at the same total cores.
3. A model of the run from measured parts: the step time at c threads (whole epochs; for the points measured
   on this machine, with N processes stepping at once, as its workers do), the push+pull round trip of the
   model's bytes (plain and CURVE, loopback), the server's update time. Per window of tau steps a worker spends
   T = tau * t_step + t_exchange; the server serves one exchange in t_server. Then

       samples/s(N) = min(N * tau * b / T, tau * b / t_server, cores / cpu_per_sample)

   (with ``--pipeline`` T = max(tau * t_step, t_exchange): the exchange runs while the next window computes;
   with ``--window 0``, the default automatic window, tau is what the worker's pacer would choose: enough
   steps that the exchange is a fifth of T, in windows of 4, up to 64 and a quarter of a pass; the measured
   points take the steps a push their workers did average)

   where the last term (same machine only) is the machine's CPU, shared by workers and server. The model is
   checked against the measured points (ratio printed), then projected to N executors of ``--executor-cores``
   each over a network of ``--gbits`` Gbit/s and ``--latency-ms`` one way, the server on the driver.

4. ``--compare-pipeline K``: only the runner, K times in line and K times pipelined, alternating, at each N:
   medians of samples/s and test accuracy (runs of one setting spread by ~10 % on the 2-core VM).

Writes bench/results/scale_bench.json (or $OUT/) and, with matplotlib, scale_bench.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core import FeedForwardNetwork, MinibatchTrainer, limit_cpu_threads  # noqa: E402
from core.backends import available_backends  # noqa: E402
from core.backends.threads import shared_threads  # noqa: E402


def synthetic(n_train, n_test, d=784, classes=10, seed=0):
    """Standard-normal features, labels from a noisy linear teacher (compare_trainers' synthetic set)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_train + n_test, d)).astype(np.float32)
    W = rng.standard_normal((d, classes)) / math.sqrt(d)
    z = X.astype(np.float64) @ W
    y = np.argmax(z / 0.1 + rng.gumbel(size=z.shape), axis=1).astype(np.int64)
    return X[:n_train], X[n_train:], y[:n_train], y[n_train:]


# ------------------------------------------------------------------------------------------ measurements
def single_process(Xtr, ytr, Xte, yte, layers, backend, a):
    """One process, no server, default threads -> figures per epoch."""
    net = FeedForwardNetwork(layers, backend=backend)
    warm = MinibatchTrainer(net, batch_size=a.batch, learning_rate=a.lr, seed=1)
    warm.fit(Xtr[:4 * a.batch], ytr[:4 * a.batch], epochs=1)            # kernels loaded, caches filled
    trainer = MinibatchTrainer(net, batch_size=a.batch, learning_rate=a.lr, seed=1)
    t0 = time.perf_counter()
    w, history = trainer.fit(Xtr, ytr, epochs=a.epochs, w0=net.init_params(a.seed))
    seconds = time.perf_counter() - t0
    curve, t = [], 0.0
    for e in history:
        t += e.seconds
        curve.append((t, e.epoch, e.accuracy))
    return {"kind": "single", "backend": backend, "samples_per_s": len(ytr) * a.epochs / seconds,
            "seconds": seconds, "curve": curve, "test_accuracy": net.evaluate(w, Xte, yte)[1]}


def ps_run(Xtr, ytr, Xte, yte, layers, workers, a):
    from ps.runner import run
    from ps.spec import TrainingSpec

    spec = TrainingSpec(layers=layers, mode="async", num_workers=workers, epochs=a.epochs, batch_size=a.batch,
                        learning_rate=a.lr, tau=a.window, backend=a.backend, seed=a.seed, barrier_timeout=60.0,
                        pipeline=a.pipeline, wire_dtype=a.wire_dtype)
    res = run(Xtr, ytr, spec=spec, secure=True, timeout=1800, threads_per_worker=a.threads_per_worker,
              shards=a.shards)
    hist = res.history
    per_epoch = {}
    steps = {str(w): r["steps_per_epoch"] for w, r in res.workers.items()}
    taus = {str(w): r["tau"] for w, r in res.workers.items()}       # pushes count windows of tau steps
    start = min(h["time"] for h in hist) - min(r["seconds"] / max(1, r["pushes"]) for r in res.workers.values())
    for h in hist:
        epoch = math.ceil(h["step"] * taus[str(h["worker"])] / steps[str(h["worker"])])
        acc = per_epoch.setdefault(epoch, [0.0, 0, 0.0])
        acc[0] += h["accuracy"] * h["batch_size"]
        acc[1] += h["batch_size"]
        acc[2] = max(acc[2], h["time"] - start)
    curve = [(v[2], e, v[0] / v[1]) for e, v in sorted(per_epoch.items()) if v[1]]
    net = FeedForwardNetwork(layers, backend="numpy")
    return {"kind": "ps", "workers": workers, "samples_per_s": res.steady_samples_per_s,
            "wall_samples_per_s": res.samples_per_s, "seconds": max(r["seconds"] for r in res.workers.values()),
            "curve": curve, "test_accuracy": net.evaluate(res.weights, Xte, yte)[1],
            "stale": sum(r["stale"] for r in res.workers.values()),
            "steps_per_push": float(np.mean([r["local_steps"] / max(1, r["pushes"]) for r in res.workers.values()])),
            "steps_per_pass": min(r["steps_per_epoch"] for r in res.workers.values()),
            # what the workers' clocks say a window cost in this run: its steps, and the wait on the server
            "in_run_step_s": float(np.mean([(r["seconds"] - r["exchange_s"]) / max(1, r["local_steps"])
                                            for r in res.workers.values()])),
            "in_run_exchange_s": float(np.mean([r["exchange_s"] / max(1, r["pushes"]) for r in res.workers.values()]))}


def time_to(curve, target):
    return next((t for t, _, acc in curve if acc >= target), None)


def step_seconds(layers, batch, backend, threads, window, epochs=3):
    """One worker's local step at ``threads`` threads, as a whole epoch pays it: shuffle, gradient and local
    update of every step (MinibatchTrainer.run_epoch on 32 batches), the median epoch / its steps. A best-of
    timing of the gradient alone made the model 1.4-1.9x optimistic."""
    limit_cpu_threads(threads)
    net = FeedForwardNetwork(layers, backend=backend)
    rng = np.random.default_rng(0)
    rows = batch * max(32, 4 * window)
    data = net.upload(rng.standard_normal((rows, layers[0])).astype(np.float32), rng.integers(0, layers[-1], rows))
    trainer = MinibatchTrainer(net, batch_size=batch, learning_rate=1e-3)
    w = net.ops.asarray(net.init_params(0))
    trainer.run_epoch(w, data, 0)                       # kernels loaded, caches filled
    seconds = sorted(trainer.run_epoch(w, data, e + 1).seconds for e in range(epochs))
    return seconds[len(seconds) // 2] / trainer.steps_per_epoch(rows)


def _step_in_child(args, q):
    q.put(step_seconds(*args))


def concurrent_step_seconds(n, layers, batch, backend, threads, window):
    """The step time when ``n`` processes step at once on this machine (they share its cores, caches and memory
    bandwidth, as the workers of a same-machine run do): the median of theirs; n == 1: alone."""
    if n == 1:
        return step_seconds(layers, batch, backend, threads, window)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_step_in_child, args=((layers, batch, backend, threads, window), q)) for _ in range(n)]
    for p in procs:
        p.start()
    times = sorted(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(60)
    return times[len(times) // 2]


def exchange_parts(num_params, reps=5):
    """(plain round trip s, CURVE round trip s, server update s) of a push + new weights of num_params."""
    from core.backends import host_ops
    from core.optimizers import make_optimizer
    from ps import ParameterClient, ParameterServer

    g = (np.random.default_rng(0).standard_normal(num_params) * 1e-6).astype(np.float32)
    rts = {}
    for secure in (False, True):
        with ParameterServer(np.zeros(num_params, np.float32), num_workers=1, secure=secure, progress=False) as s:
            with ParameterClient(s.client_config(), worker_id=0, timeout=60) as c:
                c.push(g, want_weights=True)
                best = float("inf")
                for _ in range(reps):
                    t0 = time.perf_counter()
                    c.push(g, want_weights=True)
                    best = min(best, time.perf_counter() - t0)
        rts[secure] = best
    opt = make_optimizer("sgd", num_params, 0.01, ops=host_ops())
    w, out = np.zeros(num_params, np.float32), np.empty(num_params, np.float32)
    opt.step_checked(w, g, out)
    t0 = time.perf_counter()
    for _ in range(reps):
        opt.step_checked(w, g, out)
    return rts[False], rts[True], (time.perf_counter() - t0) / reps


# ------------------------------------------------------------------------------------------------- model
def paced_window(t_step, t_exchange, steps_per_pass=None):
    """The steps a push the automatic window settles at for these times: ps.worker.WindowPacer's aim (the
    exchange a fifth of the window, in windows of DEFAULT_WINDOW) within ps.worker.pacer_bound (AUTO_WINDOW_MAX,
    and a quarter of a pass when ``steps_per_pass`` is given)."""
    from ps.modes import AUTO_WINDOW_MAX, DEFAULT_WINDOW
    from ps.worker import MIN_PUSHES_PER_PASS, WindowPacer, pacer_bound

    if steps_per_pass is None:                          # a pass long enough that its quarter does not bind
        steps_per_pass = MIN_PUSHES_PER_PASS * AUTO_WINDOW_MAX
    bound = pacer_bound(AUTO_WINDOW_MAX, DEFAULT_WINDOW, steps_per_pass)
    if bound is None:                                   # too short for the pacer: one window a push
        return DEFAULT_WINDOW
    windows = WindowPacer.wanted(DEFAULT_WINDOW, t_step, t_exchange)
    return min(windows, bound // DEFAULT_WINDOW) * DEFAULT_WINDOW


def model(parts, n, *, tau, batch, cores_per_worker, bandwidth=None, latency=0.0, machine_cores=None,
          pipelined=False, steps_per_pass=None):
    """Projected samples/s of N workers (see the module docstring). ``parts``: the measured pieces. tau: the
    steps a push; None: the automatic window's (:func:`paced_window`, within ``steps_per_pass`` // 4).
    bandwidth (bytes/s) and latency (s, one way) add a network between workers and server; machine_cores: all
    on one machine of that many cores (its CPU caps the run); pipelined: each exchange overlaps the next
    window, so a window costs the longer of its steps and its exchange instead of their sum."""
    nbytes = 4 * parts["num_params"]
    t_step = parts["step_s"][str(cores_per_worker)]
    if machine_cores:                                   # all on this machine: the step as n peers slow it
        t_step = parts.get("step_under_load_s", {}).get(f"{n}x{cores_per_worker}", t_step)
    crypto = parts["curve_rt_s"] - parts["plain_rt_s"]          # encryption both ways, client and server side
    t_exchange = parts["curve_rt_s"] + (2 * nbytes / bandwidth + 2 * latency if bandwidth else 0.0)
    if tau is None:
        tau = paced_window(t_step, t_exchange, steps_per_pass)
    window = max(tau * t_step, t_exchange) if pipelined else tau * t_step + t_exchange
    t_server = parts["apply_s"] + crypto / 2 + parts["plain_rt_s"] / 2   # its half of the crypto and copies
    rate = min(n * tau * batch / window, tau * batch / t_server)
    if machine_cores:
        cpu_per_window = tau * t_step * cores_per_worker + parts["curve_rt_s"] + parts["apply_s"]
        rate = min(rate, machine_cores * tau * batch / cpu_per_window)
    return rate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--rows", type=int, default=48_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--window", type=int, default=8, help="local steps a push; 0: the automatic window")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--layers", default="784,256,256,10")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--executor-cores", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=None,
                    help="BLAS/numba threads of each worker (default: the cores shared out, cores // N)")
    ap.add_argument("--gbits", type=float, default=10.0, help="network of the projection, Gbit/s")
    ap.add_argument("--latency-ms", type=float, default=0.1, help="one-way latency of the projection")
    ap.add_argument("--pipeline", action="store_true", help="overlap each exchange with the next window")
    ap.add_argument("--shards", type=int, default=None,
                    help="slices of the vector the server serves in parallel (default: ps.shards.auto_shards)")
    ap.add_argument("--wire-dtype", default="float32", help="float32, bfloat16 or float16 gradient frames")
    ap.add_argument("--quick", action="store_true", help="6k rows, 2 epochs, workers 1,2")
    ap.add_argument("--compare-pipeline", type=int, default=0, metavar="K",
                    help="only the runner: K in-line and K pipelined runs, alternating, medians")
    a = ap.parse_args(argv)
    if a.quick:
        a.rows, a.epochs, a.workers = 6_000, 2, "1,2"
    layers = [int(v) for v in a.layers.split(",")]
    workers = [int(v) for v in a.workers.split(",")]
    cores = os.cpu_count() or 1
    Xtr, Xte, ytr, yte = synthetic(a.rows, max(2000, a.rows // 5), d=layers[0], classes=layers[-1], seed=a.seed)
    print(f"{a.rows} rows, {layers}, batch {a.batch}, async window {a.window or 'automatic'}, CURVE on, "
          f"{cores} cores"
          + (f", {a.shards} server shards" if a.shards else ""), flush=True)

    if a.compare_pipeline:
        return compare_pipeline(Xtr, ytr, Xte, yte, layers, workers, a)
    singles = [single_process(Xtr, ytr, Xte, yte, layers, b, a) for b in ("numba", "numpy")
               if b in available_backends()]
    best = max(singles, key=lambda r: r["samples_per_s"])
    target = best["curve"][-1][2] - 0.01
    for r in singles:
        print(f"  single process {r['backend']:6s}: {r['samples_per_s']:9,.0f} samples/s, test acc "
              f"{r['test_accuracy']:.3f}, to {target:.3f} train acc in {time_to(r['curve'], target)} s", flush=True)
    runs = []
    for n in workers:
        r = ps_run(Xtr, ytr, Xte, yte, layers, n, a)
        r["threads_per_worker"] = a.threads_per_worker or shared_threads(n, cores)
        r["vs_best_single"] = r["samples_per_s"] / best["samples_per_s"]
        r["vs_one_worker"] = r["samples_per_s"] / runs[0]["samples_per_s"] if runs else 1.0
        r["time_to_target"] = time_to(r["curve"], target)
        runs.append(r)
        print(f"  {n} workers x {r['threads_per_worker']} threads: {r['samples_per_s']:9,.0f} samples/s steady "
              f"({r['vs_best_single']:.2f}x the best single process, {r['vs_one_worker']:.2f}x one worker), test acc "
              f"{r['test_accuracy']:.3f}, to target "
              f"in {r['time_to_target']} s, stale {r['stale']}", flush=True)

    num_params = FeedForwardNetwork(layers, backend="numpy").num_params
    plain, curve_rt, apply = exchange_parts(num_params)
    step = {str(c): step_seconds(layers, a.batch, a.backend, c, a.window)
            for c in sorted({r["threads_per_worker"] for r in runs} | {a.executor_cores}, reverse=True)}
    loaded = {f"{r['workers']}x{r['threads_per_worker']}": concurrent_step_seconds(
        r["workers"], layers, a.batch, a.backend, r["threads_per_worker"], a.window) for r in runs}
    parts = {"num_params": num_params, "plain_rt_s": plain, "curve_rt_s": curve_rt, "apply_s": apply,
             "step_s": step, "step_under_load_s": loaded}
    print(f"  parts: step {', '.join(f'{1e3 * v:.2f} ms @{k}t' for k, v in step.items())}; round trip "
          f"{1e3 * plain:.2f} ms plain, {1e3 * curve_rt:.2f} ms CURVE; server update {1e3 * apply:.2f} ms")
    for r in runs:
        c = r["threads_per_worker"]
        key = f"{r['workers']}x{c}"
        r["model_samples_per_s"] = model(parts, r["workers"], tau=a.window or r["steps_per_push"], batch=a.batch,
                                         cores_per_worker=c, machine_cores=cores, pipelined=a.pipeline)
        r["model_over_measured"] = r["model_samples_per_s"] / r["samples_per_s"]
        print(f"  model, {r['workers']} workers here: {r['model_samples_per_s']:9,.0f} samples/s "
              f"({r['model_over_measured']:.2f}x the measured); in the run a step took "
              f"{1e3 * r['in_run_step_s']:.2f} ms (alone {1e3 * step[str(c)]:.2f}, with its peers stepping "
              f"{1e3 * loaded[key]:.2f}), an exchange "
              f"{1e3 * r['in_run_exchange_s']:.2f} ms (alone {1e3 * curve_rt:.2f})")
    bandwidth, latency = a.gbits * 1e9 / 8, a.latency_ms / 1e3
    projection = []
    for n in (1, 2, 4, 8, 16, 32, 64):
        rate = model(parts, n, tau=a.window or None, batch=a.batch, cores_per_worker=a.executor_cores,
                     bandwidth=bandwidth, latency=latency, pipelined=a.pipeline,
                     steps_per_pass=math.ceil(a.rows / n / a.batch))
        projection.append({"executors": n, "samples_per_s": rate, "vs_best_single": rate / best["samples_per_s"]})
    print(f"  projection{', pipelined' if a.pipeline else ''}, executors of {a.executor_cores} cores over "
          f"{a.gbits:g} Gbit/s, {a.latency_ms:g} ms: "
          + ", ".join(f"{p['executors']}: {p['samples_per_s']:,.0f} ({p['vs_best_single']:.1f}x)" for p in projection))
    report = {"machine_cores": cores, "settings": vars(a), "layers": layers, "target_train_accuracy": target,
              "single": singles, "ps": runs, "parts": parts, "projection": projection}
    out = _results_dir()
    (out / "scale_bench.json").write_text(json.dumps(report, indent=1))
    _plot(report, out / "scale_bench.png")
    return 0


def _results_dir() -> Path:
    """$OUT, or bench/results: where the reports go (made if missing)."""
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    return out


def compare_pipeline(Xtr, ytr, Xte, yte, layers, workers, a) -> int:
    """In-line and pipelined runner runs, alternating, ``a.compare_pipeline`` of each per worker count."""
    import statistics

    report = []
    for n in workers:
        runs = {False: [], True: []}
        for _ in range(a.compare_pipeline):
            for pipeline in (False, True):
                a.pipeline = pipeline
                r = ps_run(Xtr, ytr, Xte, yte, layers, n, a)
                runs[pipeline].append({"samples_per_s": r["samples_per_s"], "test_accuracy": r["test_accuracy"]})
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("samples_per_s", "test_accuracy")}
               for k, v in runs.items()}
        print(f"  {n} workers, {a.compare_pipeline} runs each: in line {med[False]['samples_per_s']:,.0f} samples/s, "
              f"test acc {med[False]['test_accuracy']:.3f}; pipelined {med[True]['samples_per_s']:,.0f} "
              f"({med[True]['samples_per_s'] / med[False]['samples_per_s']:.2f}x), test acc "
              f"{med[True]['test_accuracy']:.3f} (medians)", flush=True)
        report.append({"workers": n, "in_line": runs[False], "pipelined": runs[True], "medians": {
            "in_line": med[False], "pipelined": med[True]}})
    summary = {"settings": vars(a), "runs": report}
    (_results_dir() / "scale_bench_pipeline.json").write_text(json.dumps(summary, indent=1))
    return 0


def _plot(report, path):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    best = max(r["samples_per_s"] for r in report["single"])
    ax.axhline(best, color="k", ls="--", lw=1, label=f"best single process ({report['machine_cores']} cores)")
    n = [r["workers"] for r in report["ps"]]
    ax.plot(n, [r["samples_per_s"] for r in report["ps"]], "o", color="C0", label="measured: N workers, this machine")
    ax.plot(n, [r["model_samples_per_s"] for r in report["ps"]], "x--", color="C0", label="model, this machine")
    p = report["projection"]
    s = report["settings"]
    ax.plot([q["executors"] for q in p], [q["samples_per_s"] for q in p], "s-", color="C1",
            label=f"model: N executors x {s['executor_cores']} cores, {s['gbits']:g} Gbit/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers / executors")
    ax.set_ylabel("samples/s")
    ax.set_title(f"{report['layers']}, batch {s['batch']}, async window {s['window'] or 'automatic'}, CURVE on")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
