"""Trainer comparison report: every parameter-server mode and a single worker, same budget, same data.

Trains ``single`` (core MinibatchTrainer, one process, no server) and every server mode -- sync, async
(DOWNPOUR, tau = 1 and tau = 4), easgd, async-easgd, eamsgd -- with the Spark-free runner on
  * digits:    scikit-learn digits / 16, stratified 70/30 split (seed 0), net [64, 100, 10];
  * synthetic: 60k x 100 standard-normal features, 10 classes drawn from a random linear teacher's softmax
               (temperature 0.1, so even the teacher itself is right only ~89 % of the time), net [100, 128, 10].
Every trainer gets the same passes over the data, the same batch size and the same learning rate (see
TRAINERS for the per-mode knobs). For each (dataset, trainer): test accuracy and macro F1 of the final
(server) weights, training seconds, samples/s, final training loss and the training loss curve.

    .venv/bin/python bench/compare_trainers.py                    # full run, ~2 minutes on 2 cores
    .venv/bin/python bench/compare_trainers.py --quick            # ~30-50 s (the test: --quick --backend numpy)
    .venv/bin/python bench/compare_trainers.py --workers 4 --trainers single,async,eamsgd --datasets digits

Writes compare_trainers.json and, per dataset, <dataset>_bars.png (F1, accuracy, training time) and
<dataset>_loss.png (training loss vs seconds and vs epochs) into --out (default bench/results/compare/, or
$OUT/compare when $OUT is set), and prints a table.

Timing. Every trainer runs in freshly spawned processes. Each process first loads its backend's kernels (a
few throw-away steps; numba needs ~1 s per process), then the workers of a server mode wait for each other
and start together (StartGate, as tasks of a Spark barrier stage would; --no-start-gate shows the runner's
own staggered start). "train s" runs from that common start to the final weights (the last update the
server applied; for single, the end of its last epoch); "wall s" adds process start, imports and the kernel
load. samples/s = rows trained / train s. The single worker gets one worker's share of the cores
(cpu_count // workers threads), as each server-mode worker does.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import BackendUnavailable, FeedForwardNetwork, get_backend  # noqa: E402
from core.backends.threads import shared_threads  # noqa: E402
from ps.modes import get_mode  # noqa: E402
from ps.rules import default_alpha  # noqa: E402
from ps.runner import load_arrays, save_arrays  # noqa: E402

# ----------------------------------------------------------------------------------------------- settings
# One dict of per-trainer knobs. Everything else (epochs, batch size, learning rate) is the dataset's budget
# below and is the same for every trainer. EASGD family: beta = 0.9, alpha = beta / p, tau = 10 (the low end
# of the authors' 10..100, because digits gives each worker only ~20 mini-batches per pass) and Nesterov
# momentum delta = 0.99 for eamsgd (ps.spec's default, from the authors' reference code). Momentum multiplies the
# stationary step by 1 / (1 - delta), so eamsgd's local learning rate is the budget's rate times
# (1 - delta): the same effective step as everyone else, not a 100x larger one (lr_scale below).
# DOWNPOUR keeps plain SGD on the server (the paper's Adagrad would be a second change at once).
TRAINERS = {
    "single":        dict(label="single",       kind="single", optimizer="sgd"),
    "sync":          dict(label="sync",         mode="sync"),
    "async":         dict(label="async τ=1",    mode="async", tau=1, optimizer="sgd"),
    "downpour-tau4": dict(label="downpour τ=4", mode="async", tau=4, optimizer="sgd"),
    "easgd":         dict(label="easgd",        mode="easgd", tau=10, beta=0.9),
    "async-easgd":   dict(label="async-easgd",  mode="async-easgd", tau=10, beta=0.9),
    "eamsgd":        dict(label="eamsgd",       mode="eamsgd", tau=10, beta=0.9, momentum=0.99, lr_scale=0.01),
}

# The budget each trainer gets per dataset; --quick shrinks it (QUICK overrides).
DATASETS = {
    "digits":    dict(layers=[64, 100, 10], epochs=30, batch_size=32, learning_rate=0.1),
    "synthetic": dict(layers=[100, 128, 10], epochs=10, batch_size=64, learning_rate=0.1,
                      n_train=60_000, n_test=15_000, temperature=0.1),
}
QUICK = {
    "digits":    dict(epochs=15),
    "synthetic": dict(epochs=3, n_train=6_000, n_test=2_000),
}
RUN_TIMEOUT_S = 600.0       # per trainer; the runner and the single-worker process both honour it
GATE_TIMEOUT_S = 120.0      # a worker waits at most this long for the others to come up (then it fails)


# ------------------------------------------------------------------------------------------------- data
def digits_data(seed: int = 0):
    """(X_train (1257, 64), X_test (540, 64), y_train, y_test): digits / 16, stratified 70/30, float32."""
    from core.datasets import load_digits_split

    return load_digits_split(seed)


def synthetic_data(n_train: int, n_test: int, d: int = 100, classes: int = 10, temperature: float = 0.1,
                   seed: int = 0):
    """Standard-normal X (n, d); y drawn from softmax(X W / temperature), W ~ N(0, 1/d) (d, classes).

    Sampling with Gumbel noise (argmax(z / T + G) ~ softmax(z / T)) keeps the labels noisy, so no classifier
    reaches 100 %; the teacher's own argmax accuracy on the test rows is returned as a reference.
    -> (X_train, X_test, y_train, y_test, teacher_test_accuracy)
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    X = rng.standard_normal((n, d)).astype(np.float32)
    W = rng.standard_normal((d, classes)) / math.sqrt(d)
    z = X.astype(np.float64) @ W
    y = np.argmax(z / temperature + rng.gumbel(size=z.shape), axis=1).astype(np.int64)
    teacher = float(np.mean(np.argmax(z[n_train:], axis=1) == y[n_train:]))
    return X[:n_train], X[n_train:], y[:n_train], y[n_train:], teacher


def load_dataset(name: str, spec: dict, seed: int):
    """-> (X_train, X_test, y_train, y_test, info dict)."""
    if name == "digits":
        Xtr, Xte, ytr, yte = digits_data(seed)
        info = {"source": "sklearn.datasets.load_digits, X / 16, stratified 70/30 split", "split_seed": seed}
    else:
        Xtr, Xte, ytr, yte, teacher = synthetic_data(spec["n_train"], spec["n_test"], d=spec["layers"][0],
                                                     classes=spec["layers"][-1], temperature=spec["temperature"],
                                                     seed=seed)
        info = {"source": "standard-normal features, labels ~ softmax(linear teacher / temperature)",
                "temperature": spec["temperature"], "teacher_test_accuracy": teacher, "seed": seed}
    info.update(n_train=int(len(ytr)), n_test=int(len(yte)), n_features=int(Xtr.shape[1]),
                n_classes=int(spec["layers"][-1]))
    return Xtr, Xte, ytr, yte, info


# --------------------------------------------------------------------------------------------- trainers
def trainer_settings(name: str, spec: dict, workers: int) -> dict:
    """The concrete hyper-parameters one trainer runs with on one dataset (recorded in the JSON)."""
    t = TRAINERS[name]
    s = {"label": t["label"], "epochs": spec["epochs"], "batch_size": spec["batch_size"],
         "learning_rate": spec["learning_rate"] * t.get("lr_scale", 1.0)}
    if t.get("kind") == "single":
        # one worker without the server: the thread share a runner worker gets
        s.update(kind="single", workers=1, optimizer=t["optimizer"], cpu_threads=shared_threads(workers))
        return s
    s.update(kind="ps", mode=t["mode"], workers=workers, tau=t.get("tau", 1))
    if get_mode(t["mode"]).pushes_gradients:
        s["server_optimizer"] = t.get("optimizer", "sgd")
    else:
        s["beta"] = t["beta"]
        s["alpha"] = default_alpha(workers, t["beta"])
    if "momentum" in t:
        s["momentum"] = t["momentum"]
    return s


def warm_up_kernels(layers, backend, batch_size) -> None:
    """A few SGD and Nesterov steps on random rows, in this process: the backend loads its kernels on first
    use (numba compiles or reads its cache, ~1 s a process), so that one-time cost is not timed as training."""
    from core import FeedForwardNetwork, MinibatchTrainer

    net = FeedForwardNetwork(layers, backend=backend)
    rng = np.random.default_rng(0)
    data = net.upload(rng.random((2 * batch_size + 1, layers[0]), dtype=np.float32),
                      rng.integers(0, layers[-1], 2 * batch_size + 1))
    for optimizer in ("sgd", "nesterov"):
        trainer = MinibatchTrainer(net, batch_size=batch_size, learning_rate=1e-3, optimizer=optimizer)
        w = net.ops.asarray(net.init_params(0))
        for Xb, yb in trainer.batches(data):             # full batches and a ragged one
            trainer.step(w, Xb, yb)
        acc = net.ops.zeros((net.num_params,), net.dtype)
        acc += trainer.grad                              # what a gradient-mode worker does between pushes
        net.ops.to_host(acc, out=np.empty(net.num_params, np.float32))
    net.ops.synchronize()


class StartGate:
    """``on_step`` hook for ps.worker: before its first local step each worker loads its kernels, then waits
    until every worker is ready, so all start training together (as tasks of a Spark barrier stage do).

    Without it the runner's workers start up to a second apart (spawn, imports, first-call kernel load); on
    digits one worker's whole share takes less than that, so an async run is really one worker after the
    other. ``released`` receives the wall-clock time (time.time()) the gate opened: the first stamp taken after
    the barrier let the workers go (every push comes after its own worker's stamp, so after the first; the
    last stamp can come after a quick worker's first push when its worker was descheduled).
    """

    def __init__(self, barrier, released, layers, backend, batch_size, timeout):
        self.barrier, self.released = barrier, released
        self.layers, self.backend, self.batch_size, self.timeout = layers, backend, batch_size, timeout
        self.passed = False

    def __call__(self, local_step):
        if self.passed:
            return
        self.passed = True
        warm_up_kernels(self.layers, self.backend, self.batch_size)
        self.barrier.wait(self.timeout)                  # BrokenBarrierError on timeout: the runner reports it
        now = time.time()
        with self.released.get_lock():
            self.released.value = now if self.released.value == 0.0 else min(self.released.value, now)


def _single_main(out_q, data, layers, backend, epochs, batch_size, learning_rate, optimizer, seed, cpu_threads,
                 warm_up):
    """Child process of :func:`train_single`: the same one-time costs a parameter-server worker pays."""
    try:
        from core import FeedForwardNetwork, MinibatchTrainer, limit_cpu_threads

        X, y = load_arrays(data)

        limit_cpu_threads(cpu_threads)

        net = FeedForwardNetwork(layers, backend=backend)
        trainer = MinibatchTrainer(net, batch_size=batch_size, learning_rate=learning_rate, optimizer=optimizer,
                                   seed=seed * 1000)
        data = net.upload(X, y)
        if warm_up:
            warm_up_kernels(layers, backend, batch_size)
        curve = []
        t0 = time.perf_counter()
        w, history = trainer.fit(data, epochs=epochs, w0=net.init_params(seed),
                                 callback=lambda st: curve.append((time.perf_counter() - t0, st.epoch, st.loss)))
        seconds = time.perf_counter() - t0
        out_q.put(("ok", {"weights": np.asarray(w, np.float32), "seconds": seconds, "curve": curve,
                          "samples": int(sum(h.samples for h in history)), "backend": net.backend_name}))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it; never leave it waiting
        out_q.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1)


def train_single(Xtr, ytr, spec, settings, backend, seed, timeout, start_gate=True):
    """One process, no server. -> dict(weights, train_s, wall_s, samples, curve=[(s, epoch, loss)])."""
    with tempfile.TemporaryDirectory(prefix="ffps-single-") as tmp:     # data as files: save_arrays says why
        data = save_arrays(tmp, "train", np.ascontiguousarray(Xtr, np.float32), np.asarray(ytr))
        ctx = mp.get_context("spawn")
        out_q = ctx.Queue()
        t_launch = time.perf_counter()
        p = ctx.Process(target=_single_main, name="single-trainer", daemon=True,
                        args=(out_q, data, spec["layers"], backend, settings["epochs"], settings["batch_size"],
                              settings["learning_rate"], settings["optimizer"], seed, settings["cpu_threads"],
                              start_gate))
        p.start()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    kind, payload = out_q.get(timeout=0.5)
                    break
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"single trainer did not finish within {timeout}s")
                    if not p.is_alive() and out_q.empty():
                        time.sleep(0.5)                      # its last message may still be in the pipe
                        if out_q.empty():
                            raise RuntimeError(f"single trainer exited with code {p.exitcode} and no result")
            wall = time.perf_counter() - t_launch
        finally:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if kind != "ok":
            raise RuntimeError(f"single trainer failed: {payload}")
        return {"weights": payload["weights"], "train_s": payload["seconds"], "wall_s": wall,
                "samples": payload["samples"], "curve": payload["curve"], "server": None}


def train_ps(Xtr, ytr, spec, settings, backend, seed, timeout, start_gate=True):
    """Server + ``workers`` spawned processes via ps.runner. -> same keys as :func:`train_single`.

    The server's history stamps every applied push (seconds since the server was made). Training starts when
    the :class:`StartGate` opens (start_gate=False: when the first worker connected, i.e. its last push minus
    the seconds it reports) and ends with the last applied push: the final weights.
    """
    from ps.runner import Runner, shard_bounds
    from ps.spec import TrainingSpec

    extra = {"optimizer": settings["server_optimizer"]} if "server_optimizer" in settings else {}
    if "momentum" in settings:
        extra["local_momentum"] = settings["momentum"]
    training = TrainingSpec(layers=spec["layers"], mode=settings["mode"], num_workers=settings["workers"],
                            backend=backend, epochs=settings["epochs"], batch_size=settings["batch_size"],
                            learning_rate=settings["learning_rate"], seed=seed, tau=settings["tau"],
                            alpha=settings.get("alpha"), barrier_timeout=20.0, **extra)
    kw = dict(spec=training, progress=False, start_together=start_gate)
    released = None
    if start_gate:
        ctx = mp.get_context("spawn")                    # the runner's context: these travel with the workers
        released = ctx.Value("d", 0.0)
        kw["worker_options"] = {"on_step": StartGate(ctx.Barrier(settings["workers"]), released, spec["layers"],
                                                     backend, settings["batch_size"], min(timeout, GATE_TIMEOUT_S))}
    runner = Runner(Xtr, ytr, **kw)
    t_ref = _history_origin(runner.server)               # the wall-clock time the server's history counts from
    res = runner.start().join(timeout)
    hist = res.history
    if not hist or not res.workers:
        raise RuntimeError(f"{settings['mode']}: no update was applied (stats {res.stats})")
    last_push = {}
    for h in hist:
        last_push[h["worker"]] = max(last_push.get(h["worker"], 0.0), h["time"])
    ready = {str(w): float(last_push[w] - r["seconds"]) for w, r in res.workers.items() if w in last_push}
    start = released.value - t_ref if start_gate else min(ready.values())
    end = max(last_push.values())
    rows_per_pass = sum(b - a for a, b in shard_bounds(len(ytr), settings["workers"],
                                                         equal=training.rule.equal_shards))
    curve = _epoch_curve(hist, start, rows_per_pass)
    samples = int(sum(h["batch_size"] for h in hist))
    stale = [h["staleness"] for h in hist]
    server = {"applied": res.stats["applied"], "rejected": res.stats["rejected_total"],
              "rounds": res.stats.get("rounds", 0), "version": res.stats["version"],
              "max_staleness": int(max(stale)), "mean_staleness": float(np.mean(stale)),
              "worker_connected_s": ready, "start_gate_s": start if start_gate else None}
    return {"weights": res.weights, "train_s": end - start, "wall_s": res.seconds, "samples": samples,
            "curve": curve, "server": server}


def _history_origin(server) -> float:
    """time.time() at which the server's push history starts counting (a sharded server: its first shard's)."""
    first = server.shards[0] if hasattr(server, "shards") else server
    return first.engine.t_start


def _epoch_curve(history, start, rows_per_pass):
    """Per-pass training loss from the server's push records -> [(seconds since start, epoch, loss)].

    Pushes are binned by the rows they cover, summed over workers: pass e holds the pushes whose cumulative
    rows reach e N; its loss is their row-weighted mean and its time the last push's. Rows that never make a
    full pass (a worker's last window shorter than tau is not pushed) end the curve at a fractional epoch.
    In the elastic modes the loss is the workers' local loss (on x_i), not the center's.
    """
    out, acc_rows, acc_loss, seen, epoch, t = [], 0, 0.0, 0, 1, 0.0
    for h in sorted(history, key=lambda r: r["time"]):
        acc_rows += h["batch_size"]
        acc_loss += h["loss"] * h["batch_size"]
        seen += h["batch_size"]
        t = h["time"] - start
        if seen >= epoch * rows_per_pass:
            out.append((t, float(epoch), acc_loss / acc_rows))
            acc_rows, acc_loss, epoch = 0, 0.0, epoch + 1
    if acc_rows:
        out.append((t, seen / rows_per_pass, acc_loss / acc_rows))
    return out


def evaluate(layers, weights, Xtr, ytr, Xte, yte) -> dict:
    """Test accuracy and macro F1 of ``weights`` (predict_proba, numpy backend) and its full training loss."""
    from sklearn.metrics import f1_score

    net = FeedForwardNetwork(layers, backend="numpy")
    pred = net.predict_proba(weights, Xte).argmax(axis=1)
    train_loss, train_acc = net.evaluate(weights, Xtr, ytr)
    return {"test_accuracy": float(np.mean(pred == yte)),
            "macro_f1": float(f1_score(yte, pred, average="macro")),
            "final_train_loss": float(train_loss), "train_accuracy": float(train_acc)}


# ----------------------------------------------------------------------------------------------- report
def machine_info(backend: str) -> dict:
    import numba
    import sklearn
    import zmq

    return {"cpus": os.cpu_count(), "backend": backend, "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__, "scikit-learn": sklearn.__version__,
            "pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def print_table(dataset: str, info: dict, spec: dict, rows: dict) -> None:
    ref = f", teacher {info['teacher_test_accuracy']:.3f}" if "teacher_test_accuracy" in info else ""
    print(f"\n{dataset}: {info['n_train']} train / {info['n_test']} test rows, net {spec['layers']}, "
          f"{spec['epochs']} epochs, batch {spec['batch_size']}, lr {spec['learning_rate']}{ref}")
    print(f"{'trainer':<14} {'test acc':>8} {'macro F1':>8} {'train s':>8} {'wall s':>7} {'samples/s':>10} "
          f"{'train loss':>10}")
    for r in rows.values():
        print(f"{r['settings']['label']:<14} {r['test_accuracy']:8.4f} {r['macro_f1']:8.4f} {r['train_s']:8.2f} "
              f"{r['wall_s']:7.2f} {r['samples_per_s']:10.0f} {r['final_train_loss']:10.4f}")


def _floor_axis(values, step=0.05, pad=0.02):
    """A lower axis limit a little below min(values), on a ``step`` grid, never below 0."""
    return max(0.0, math.floor((min(values) - pad) / step) * step)


def plot_dataset(dataset: str, block: dict, out_dir: Path, meta: str) -> list[str]:
    """<dataset>_bars.png (F1, accuracy, time) and <dataset>_loss.png (loss vs seconds and vs epochs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = block["trainers"]
    names = list(rows)
    labels = [rows[n]["settings"]["label"] for n in names]
    cmap = plt.get_cmap("tab10")
    colors = {n: cmap(list(TRAINERS).index(n) % 10) for n in names}
    ypos = np.arange(len(names))[::-1]           # first trainer on top
    files = []

    fig, axes = plt.subplots(1, 3, figsize=(14, 0.5 * len(names) + 2.6), sharey=True)
    lo = _floor_axis([rows[n][k] for n in names for k in ("macro_f1", "test_accuracy")])   # one scale for both
    for ax, key, title in ((axes[0], "macro_f1", "Macro F1"), (axes[1], "test_accuracy", "Accuracy")):
        vals = [rows[n][key] for n in names]
        ax.barh(ypos, vals, color=[colors[n] for n in names], height=0.7)
        for y, v in zip(ypos, vals):                 # the value at the bar's end, inside when the bar is long
            inside = (v - lo) > 0.18 * (1.0 - lo)
            ax.text(v + (-1 if inside else 1) * (1.0 - lo) * 0.01, y, f"{v:.3f}", va="center", fontsize=9,
                    ha="right" if inside else "left", color="white" if inside else "black")
        ax.set_xlim(lo, 1.0)
        ax.set_title(f"{title} on the test set")
        ax.set_xlabel(f"{title} (0-1; axis starts at {lo:.2f})")
        ax.grid(axis="x", alpha=0.3)
    ax = axes[2]
    train = [rows[n]["train_s"] for n in names]
    startup = [rows[n]["startup_s"] for n in names]
    ax.barh(ypos, train, color=[colors[n] for n in names], height=0.7, label="training")
    ax.barh(ypos, startup, left=train, color="lightgrey", hatch="//", edgecolor="grey", height=0.7,
            label="start-up: spawn, imports, kernel load")
    for y, t, s in zip(ypos, train, startup):
        ax.text(t + s, y, f" {t:.1f} s", va="center", ha="left", fontsize=9)
    ax.set_xlim(0, max(t + s for t, s in zip(train, startup)) * 1.2)
    ax.set_title("Time to final weights (label: training only)")
    ax.set_xlabel("seconds (wall clock)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ypos, labels)
    fig.suptitle(f"{dataset}: trainers compared at the same budget\n{meta}", fontsize=11)
    fig.tight_layout()
    path = out_dir / f"{dataset}_bars.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    files.append(str(path))

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(14, 4.8), sharey=True)
    loss0 = block["info"]["initial_train_loss"]
    for n, label in zip(names, labels):
        c = rows[n]["curve"]
        secs = [0.0] + c["seconds"]
        eps = [0] + c["epoch"]
        loss = [loss0] + c["loss"]
        style = dict(color=colors[n], marker="o", markersize=3, linewidth=1.6,
                     linestyle="--" if n == "single" else "-")
        ax_t.plot(secs, loss, label=label, **style)
        ax_e.plot(eps, loss, label=label, **style)
    ax_t.set_yscale("log")
    # label 1, 2, 3, 5 x 10^k only: every minor tick labelled crowds the decades below 1
    ax_t.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax_t.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax_t.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_t.set_xlabel("seconds since training started (wall clock)")
    ax_t.set_ylabel("training loss (mean NLL, log scale)")
    ax_t.set_title("Training loss vs time")
    ax_e.set_xlabel("passes over the training data (epochs)")
    ax_e.set_title("Training loss vs epochs")
    for ax in (ax_t, ax_e):
        ax.grid(alpha=0.3, which="both")
    ax_e.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, title="trainer")
    fig.suptitle(f"{dataset}: training loss per pass (elastic modes: the workers' local loss)\n{meta}",
                 fontsize=11)
    fig.tight_layout()
    path = out_dir / f"{dataset}_loss.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    files.append(str(path))
    return files


# ------------------------------------------------------------------------------------------------- CLI
def _csv(allowed, what):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
        return list(dict.fromkeys(items))
    return parse


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (>= 1), got {v}")
    return v


def parse_args(argv=None):
    default_out = Path(os.environ["OUT"]) / "compare" if os.environ.get("OUT") else \
        Path(__file__).resolve().parent / "results" / "compare"
    ap = argparse.ArgumentParser(description="Compare the ffps trainers (single worker and every parameter-"
                                             "server mode) on digits and a synthetic set at the same budget.")
    ap.add_argument("--quick", action="store_true", help="tiny budget (few epochs, 6k synthetic rows) for tests")
    ap.add_argument("--workers", type=_positive_int, default=2, help="worker processes per server mode (default 2)")
    ap.add_argument("--backend", default="numba", help="numpy | numba | cupy | auto (default numba)")
    ap.add_argument("--trainers", type=_csv(list(TRAINERS), "trainer"), default=list(TRAINERS),
                    help=f"comma-separated subset of {','.join(TRAINERS)}")
    ap.add_argument("--datasets", type=_csv(list(DATASETS), "dataset"), default=list(DATASETS),
                    help=f"comma-separated subset of {','.join(DATASETS)}")
    ap.add_argument("--epochs", type=_positive_int, default=None, help="override every dataset's epochs")
    ap.add_argument("--seed", type=int, default=0, help="data split, init and batch order seed (default 0)")
    ap.add_argument("--timeout", type=float, default=RUN_TIMEOUT_S, help="seconds one trainer may take")
    ap.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG charts (no matplotlib import)")
    ap.add_argument("--no-start-gate", action="store_true",
                    help="let workers start training as soon as each is up (the runner's own behaviour) and time "
                         "kernel loading as training; default: load kernels, then start all workers together")
    a = ap.parse_args(argv)
    if not (a.timeout > 0 and math.isfinite(a.timeout)):
        ap.error(f"--timeout must be a positive number of seconds, got {a.timeout}")
    try:                                    # an explicit backend that cannot load fails here, not in a worker
        get_backend(a.backend)
    except (BackendUnavailable, ValueError) as exc:
        ap.error(f"--backend {a.backend!r} cannot be used here: {exc}")
    return a


def main(argv=None) -> dict:
    """Run the comparison; returns the report (also written to <out>/compare_trainers.json)."""
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name] + (list(argv) if argv is not None else sys.argv[1:])),
              "settings": {"quick": a.quick, "workers": a.workers, "backend": a.backend, "seed": a.seed,
                           "secure": True, "start_gate": not a.no_start_gate,
                           "trainers": {k: dict(v) for k, v in TRAINERS.items() if k in a.trainers},
                           "timing": ("train_s: all workers released together, kernels loaded -> final weights "
                                      "(last applied update); wall_s: adds process spawn, imports, kernel load"
                                      if not a.no_start_gate else
                                      "train_s: first worker connected -> final weights, kernel load included; "
                                      "wall_s: adds process spawn and imports")},
              "machine": machine_info(a.backend), "datasets": {}}
    files = []
    for dataset in a.datasets:
        spec = dict(DATASETS[dataset], **(QUICK[dataset] if a.quick else {}))
        if a.epochs is not None:
            spec["epochs"] = a.epochs
        Xtr, Xte, ytr, yte, info = load_dataset(dataset, spec, a.seed)
        ref_net = FeedForwardNetwork(spec["layers"], backend="numpy")   # every trainer starts from this init
        info["initial_train_loss"] = ref_net.evaluate(ref_net.init_params(a.seed), Xtr, ytr)[0]
        rows = {}
        for name in a.trainers:
            settings = trainer_settings(name, spec, a.workers)
            print(f"[{dataset}] {settings['label']} ...", flush=True)
            train = train_single if settings["kind"] == "single" else train_ps
            r = train(Xtr, ytr, spec, settings, a.backend, a.seed, a.timeout, start_gate=not a.no_start_gate)
            row = {"settings": settings, **evaluate(spec["layers"], r["weights"], Xtr, ytr, Xte, yte),
                   "train_s": r["train_s"], "wall_s": r["wall_s"], "startup_s": max(0.0, r["wall_s"] - r["train_s"]),
                   "samples": r["samples"], "samples_per_s": r["samples"] / r["train_s"] if r["train_s"] > 0 else 0.0,
                   "last_epoch_loss": r["curve"][-1][2] if r["curve"] else None,
                   "curve": {"seconds": [c[0] for c in r["curve"]], "epoch": [c[1] for c in r["curve"]],
                             "loss": [c[2] for c in r["curve"]]}}
            if r["server"] is not None:
                row["server"] = r["server"]
            rows[name] = row
        block = {"info": info, "budget": {k: spec[k] for k in ("layers", "epochs", "batch_size", "learning_rate")},
                 "trainers": rows}
        report["datasets"][dataset] = block
        print_table(dataset, info, spec, rows)
        if not a.no_plot:
            meta = (f"{a.workers} workers, backend {a.backend}, {spec['epochs']} epochs, batch {spec['batch_size']}, "
                    f"lr {spec['learning_rate']}, net {spec['layers']}, {os.cpu_count()} CPUs")
            files += plot_dataset(dataset, block, a.out, meta)
    path = a.out / "compare_trainers.json"
    report["files"] = [str(path)] + files
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {path}" + "".join(f"\nwrote {p}" for p in files))
    return report


if __name__ == "__main__":
    main()
