"""Training-step benchmark: ms/step, samples/s and GFLOP/s per backend, beside anchors measured in the same run.

One step = forward + backward + SGD update of the flat vector on one device-resident batch.
FLOPs per step = 6 * batch * sum(d_in * d_out). Anchors in the same process: the machine's (cu)BLAS sgemm
rate, a straightforward NumPy (CuPy on GPU) step, and PyTorch eager when torch is installed.

On a GPU each net also gets the recorded path (``ffps_cupy_graph``: a window of steps replayed as one CUDA
graph, per-step time = window time / steps) in fp32, tf32 and bf16, beside PyTorch eager in fp32, tf32 and
bf16 autocast.

The trainer rows (``trainer``) time whole epochs of ``MinibatchTrainer`` (shuffle, steps, updates, the loss read
once per epoch; default threads) on 60k rows of digits-like and seed-net data, beside a PyTorch eager loop doing
the same work (randperm, gather, forward, backward, SGD, loss summed on the device).

    python bench/step_bench.py                 # CPU nets on numpy + numba (+ cupy and the wide net on a GPU)
    python bench/step_bench.py --quick         # fewer repetitions
    python bench/step_bench.py --nets digits --no-trainer
Writes bench/results/step_bench.json (or $OUT/step_bench.json when $OUT is set) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core import FeedForwardNetwork, available_backends  # noqa: E402

CPU_NETS = {"digits[64,100,10]x128": ([64, 100, 10], 128),
            "seed[6,50,200,50,100]x256": ([6, 50, 200, 50, 100], 256),
            "mnist[784,1024,1024,10]x1024": ([784, 1024, 1024, 10], 1024)}
GPU_ONLY_NETS = {"wide[4096x4,1000]x4096": ([4096, 4096, 4096, 4096, 1000], 4096)}
TRAINER_NETS = {"digits-like[64,100,10]x128": ([64, 100, 10], 128),
                "seed[6,50,200,50,100]x256": ([6, 50, 200, 50, 100], 256),
                # the net on which numba with its default threads once ran 6x slower than with one (issue #14)
                "mid[784,256,256,10]x128": ([784, 256, 256, 10], 128)}


def flops(layers, batch):
    return 6 * batch * sum(a * b for a, b in zip(layers[:-1], layers[1:]))


def cpu_timer(fn, reps):
    """Per-call seconds of ``reps`` back-to-back calls."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def gpu_timer(fn, reps):
    """Per-call seconds from CUDA events around each call (after queued work drained)."""
    import cupy

    cupy.cuda.get_current_stream().synchronize()
    out = []
    for _ in range(reps):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return out


def rounds_for(layers, batch, quick):
    """(rounds, calls per contender per round): contenders are interleaved round by round, so a burst of
    load from elsewhere hits every contender alike and the ratios stay fair."""
    heavy = flops(layers, batch) > 5e9
    if heavy:
        return (3, 2) if quick else (7, 3)
    return (5, 20) if quick else (15, 40)


# ------------------------------------------------------------------------ ours
def ours_step(backend, layers, batch, precision="fp32"):
    net = FeedForwardNetwork(layers, backend=backend, precision=precision)
    rng = np.random.default_rng(0)
    data = net.upload(rng.standard_normal((batch, layers[0])), rng.integers(0, layers[-1], batch))
    w = net.ops.asarray(net.init_params(0))
    grad = net.ops.empty((net.num_params,), net.dtype)

    def step():
        net.gradient_device(w, data.X, data.y, grad)
        net.ops.sgd_update(w, grad, 0.01)
    return step


def graph_window_steps(layers, batch):
    """Steps per timed call of the recorded path: enough to hide the launch, few on the heavy nets."""
    return 2 if flops(layers, batch) > 5e10 else 32


def ours_graph_window(layers, batch, precision="fp32"):
    """One window of ``graph_window_steps`` SGD steps through MinibatchTrainer(cuda_graphs=True): each batch
    gathered on the device, the whole window one CUDA graph launch, the loss read once per window."""
    from core import MinibatchTrainer

    steps = graph_window_steps(layers, batch)
    net = FeedForwardNetwork(layers, backend="cupy", precision=precision)
    rng = np.random.default_rng(0)
    data = net.upload(rng.standard_normal((batch * steps, layers[0])), rng.integers(0, layers[-1], batch * steps))
    trainer = MinibatchTrainer(net, batch_size=batch, learning_rate=0.01, cuda_graphs=True)
    w = net.ops.asarray(net.init_params(0))
    trainer.begin_epoch(data)

    def window():
        trainer.run_window(w, data, 0, steps)
        trainer.take_sums()
    window()
    if trainer.graph_problem is not None:
        raise RuntimeError(f"no CUDA graph: {trainer.graph_problem}")
    return window


def numba_per_op():
    from core.backends.numba_ops import NumbaOps

    return NumbaOps(fuse_step=False)


# --------------------------------------------------------------------- anchors
def naive_step(xp, layers, batch):
    """Textbook NumPy/CuPy step: temporaries everywhere, no fusion (the anchors' reference shape)."""
    rs = np.random.RandomState(0)
    Ws = [xp.asarray((rs.standard_normal((a, b)) * np.sqrt(2 / a)).astype(np.float32))
          for a, b in zip(layers[:-1], layers[1:])]
    bs = [xp.zeros(b, np.float32) for b in layers[1:]]
    x = xp.asarray(rs.standard_normal((batch, layers[0])).astype(np.float32))
    y = xp.asarray(rs.randint(0, layers[-1], batch))
    rows = xp.arange(batch)
    lr = np.float32(0.01)

    def step():
        acts, h = [x], x
        for i, (W, b) in enumerate(zip(Ws, bs)):
            h = h @ W + b
            if i < len(Ws) - 1:
                h = xp.maximum(h, 0)
            acts.append(h)
        z = acts[-1] - acts[-1].max(1, keepdims=True)
        p = xp.exp(z)
        p /= p.sum(1, keepdims=True)
        p[rows, y] -= 1
        g = p / batch
        for i in range(len(Ws) - 1, -1, -1):
            gW, gb = acts[i].T @ g, g.sum(0)
            if i > 0:
                g = (g @ Ws[i].T) * (acts[i] > 0)
            Ws[i] -= lr * gW
            bs[i] -= lr * gb
    return step


def torch_net(layers, device):
    import torch

    mods = []
    for i, (a, b) in enumerate(zip(layers[:-1], layers[1:])):
        mods.append(torch.nn.Linear(a, b))
        if i < len(layers) - 2:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods).to(device)


def torch_step(layers, batch, device, precision="fp32"):
    """PyTorch eager step; precision tf32 (allow_tf32 while it runs) or bf16 (autocast) on CUDA."""
    import contextlib

    import torch

    net = torch_net(layers, device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(batch, layers[0], device=device)
    y = torch.randint(0, layers[-1], (batch,), device=device)
    lossf = torch.nn.CrossEntropyLoss()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if precision == "bf16" else \
        contextlib.nullcontext

    def step():
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = lossf(net(x), y)
        loss.backward()
        opt.step()
        torch.backends.cuda.matmul.allow_tf32 = False
    return step


SGEMM_N = 2048
SGEMM_FLOPS = 2 * SGEMM_N ** 3


def sgemm_cpu():
    a = np.random.rand(SGEMM_N, SGEMM_N).astype(np.float32)
    b = np.random.rand(SGEMM_N, SGEMM_N).astype(np.float32)
    out = np.empty_like(a)
    return lambda: np.matmul(a, b, out=out)


def sgemm_rate_cpu():
    return SGEMM_FLOPS / float(np.median(cpu_timer(sgemm_cpu(), 15))) / 1e9


def sgemm_rate_gpu(n=8192):
    import cupy

    a = cupy.random.standard_normal((n, n), dtype=cupy.float32)
    b = cupy.random.standard_normal((n, n), dtype=cupy.float32)
    out = cupy.empty_like(a)
    fn = lambda: cupy.matmul(a, b, out=out)  # noqa: E731
    gpu_timer(fn, 3)
    return 2 * n ** 3 / float(np.median(gpu_timer(fn, 10))) / 1e9


def have_torch():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def measure_interleaved(name, layers, batch, contenders, quick, results):
    """contenders: [(label, make_step, timer[, steps per call])]. Median per-step time of each, over
    interleaved rounds."""
    rounds, reps = rounds_for(layers, batch, quick)
    steps, samples, per_call = {}, {}, {}
    for label, make_step, timer, *more in contenders:
        try:
            fn = make_step()
            timer(fn, 2)                         # warm-up: compilation, allocation, BLAS threads
            steps[label], samples[label] = (fn, timer), []
            per_call[label] = more[0] if more else 1
        except Exception as exc:  # keep the rest of the table when one contender cannot run
            results.setdefault(name, {})[label] = {"error": f"{type(exc).__name__}: {exc}"}
    for _ in range(rounds):
        for label, (fn, timer) in steps.items():
            calls = 1 if label == "sgemm" else max(1, reps // per_call[label]) if per_call[label] > 1 else reps
            samples[label].extend(timer(fn, calls))
    for label, ts in samples.items():
        t = float(np.median(ts)) / per_call[label]
        if label == "sgemm":
            results.setdefault(name, {})["sgemm_gflops_same_rounds"] = round(SGEMM_FLOPS / t / 1e9, 1)
            continue
        results.setdefault(name, {})[label] = {"ms": round(t * 1e3, 4), "samples_per_s": round(batch / t),
                                               "gflops": round(flops(layers, batch) / t / 1e9, 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--nets", default="",
                        help="comma-separated subset: digits, seed, mnist, wide, mid (trainer rows)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-trainer", action="store_true", help="skip the whole-epoch trainer rows")
    parser.add_argument("--trainer-only", action="store_true", help="only the whole-epoch trainer rows")
    parser.add_argument("--rows", type=int, default=60_000, help="rows of the trainer rows' data sets")
    args = parser.parse_args(argv)

    backends = available_backends()
    use_torch = have_torch() and not args.no_torch
    report = {"machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                          "processor": platform.processor() or platform.machine(), "backends": backends},
              "cpu_sgemm_gflops": round(sgemm_rate_cpu(), 1), "nets": {}}
    if use_torch:
        import torch

        report["machine"]["torch"] = torch.__version__
        report["machine"]["torch_threads"] = torch.get_num_threads()
    results = report["nets"]
    nets = dict(CPU_NETS)
    if "cupy" in backends:
        import cupy

        report["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        report["gpu_sgemm_gflops"] = round(sgemm_rate_gpu(), 1)
        nets.update(GPU_ONLY_NETS)
    if args.nets:
        nets = {k: v for k, v in nets.items() if k.split("[")[0] in args.nets.split(",")}
    if args.trainer_only:
        nets = {}

    for name, (layers, batch) in nets.items():
        contenders = []
        if name not in GPU_ONLY_NETS:
            contenders.append(("sgemm", sgemm_cpu, cpu_timer))
            contenders.append(("naive_numpy", lambda: naive_step(np, layers, batch), cpu_timer))
            for backend in [b for b in backends if b != "cupy"]:
                contenders.append((f"ffps_{backend}", lambda b=backend: ours_step(b, layers, batch), cpu_timer))
            if "numba" in backends:   # the same backend op by op: what the one-call step (numba_step.py) buys
                contenders.append(("ffps_numba_per_op", lambda: ours_step(numba_per_op(), layers, batch), cpu_timer))
            if use_torch:
                contenders.append(("torch_cpu", lambda: torch_step(layers, batch, "cpu"), cpu_timer))
        measure_interleaved(name, layers, batch, contenders, args.quick, results)
        if "cupy" in backends:
            import cupy

            window = graph_window_steps(layers, batch)
            gpu = [("naive_cupy", lambda: naive_step(cupy, layers, batch), gpu_timer),
                   ("ffps_cupy", lambda: ours_step("cupy", layers, batch), gpu_timer)]
            for p in ("fp32", "tf32", "bf16"):
                label = "ffps_cupy_graph" + ("" if p == "fp32" else f"_{p}")
                gpu.append((label, lambda p=p: ours_graph_window(layers, batch, p), gpu_timer, window))
            if use_torch:
                import torch

                if torch.cuda.is_available():
                    for p in ("fp32", "tf32", "bf16"):
                        label = "torch_cuda" + ("" if p == "fp32" else f"_{p}")
                        gpu.append((label, lambda p=p: torch_step(layers, batch, "cuda", p), gpu_timer))
            measure_interleaved(name, layers, batch, gpu, args.quick, results)
        r = results.get(name, {})
        # ratios against anchors measured in this run
        if "ffps_numba" in r and "ms" in r.get("naive_numpy", {}) and "ms" in r["ffps_numba"]:
            r["numba_speedup_vs_naive_numpy"] = round(r["naive_numpy"]["ms"] / r["ffps_numba"]["ms"], 2)
            if "ms" in r.get("ffps_numba_per_op", {}):
                r["numba_speedup_vs_per_op"] = round(r["ffps_numba_per_op"]["ms"] / r["ffps_numba"]["ms"], 2)
            r["numba_fraction_of_cpu_sgemm"] = round(
                r["ffps_numba"]["gflops"] / r.get("sgemm_gflops_same_rounds", report["cpu_sgemm_gflops"]), 3)
        if "ms" in r.get("ffps_cupy", {}):
            r["cupy_fraction_of_gpu_sgemm"] = round(r["ffps_cupy"]["gflops"] / report["gpu_sgemm_gflops"], 3)
            if "ms" in r.get("naive_cupy", {}):
                r["cupy_speedup_vs_naive_cupy"] = round(r["naive_cupy"]["ms"] / r["ffps_cupy"]["ms"], 2)
            if "ms" in r.get("torch_cuda", {}):
                r["cupy_speedup_vs_torch_cuda"] = round(r["torch_cuda"]["ms"] / r["ffps_cupy"]["ms"], 2)
        for p in ("", "_tf32", "_bf16"):       # the recorded path against torch eager in the same precision
            ours, torch_ = r.get("ffps_cupy_graph" + p, {}), r.get("torch_cuda" + p, {})
            if "ms" in ours:
                r[f"cupy_graph{p}_fraction_of_gpu_sgemm"] = round(ours["gflops"] / report["gpu_sgemm_gflops"], 3)
                if "ms" in r.get("torch_cuda", {}):
                    r[f"cupy_graph{p}_speedup_vs_torch_cuda_fp32"] = round(r["torch_cuda"]["ms"] / ours["ms"], 2)
                if "ms" in torch_:
                    r[f"cupy_graph{p}_speedup_vs_torch_cuda{p}"] = round(torch_["ms"] / ours["ms"], 2)

    if not args.no_trainer:
        trainer_nets = {k: v for k, v in TRAINER_NETS.items()
                        if not args.nets or k.split("[")[0].split("-")[0] in args.nets.split(",")}
        report["trainer"] = trainer_bench(trainer_nets, backends, use_torch, args.quick, args.rows)

    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "step_bench.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nwritten {out_dir / 'step_bench.json'}")


# ------------------------------------------------------------------ whole epochs
def trainer_data(layers, rows, seed=0):
    """Learnable synthetic rows: Gaussian class centres in layers[0] dimensions plus noise, layers[-1] classes."""
    rng = np.random.default_rng(seed)
    classes = layers[-1]
    centres = rng.standard_normal((classes, layers[0])) * 0.5
    y = rng.integers(0, classes, rows)
    X = (centres[y] + rng.standard_normal((rows, layers[0]))).astype(np.float32)
    return X, y.astype(np.int64)


def ours_epoch(backend, layers, batch, X, y, graphs=False, precision="fp32"):
    """One MinibatchTrainer epoch per call (shuffle, every step and update, the loss read at the end)."""
    from core import MinibatchTrainer

    net = FeedForwardNetwork(layers, backend=backend, precision=precision)
    trainer = MinibatchTrainer(net, batch_size=batch, learning_rate=0.05, seed=0, cuda_graphs=graphs)
    data = net.upload(X, y)
    w = net.ops.asarray(net.init_params(0))
    state = {"epoch": 0, "loss": None}

    def epoch():
        state["epoch"] += 1
        state["loss"] = trainer.run_epoch(w, data, state["epoch"]).loss
    epoch()
    if graphs and trainer.graph_problem is not None:
        raise RuntimeError(f"no CUDA graph: {trainer.graph_problem}")
    return epoch, state


def torch_epoch(layers, batch, X, y, device):
    """The same epoch in PyTorch eager: randperm, gather, forward, backward, SGD; loss summed on the device
    and read once at the end, as ffps does."""
    import torch

    torch.manual_seed(0)
    net = torch_net(layers, device)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    lossf = torch.nn.CrossEntropyLoss()
    Xd, yd = torch.as_tensor(X, device=device), torch.as_tensor(y, device=device)
    n = Xd.shape[0]
    state = {"loss": None}

    def epoch():
        perm = torch.randperm(n, device=device)
        Xs, ys = Xd[perm], yd[perm]
        total = torch.zeros((), device=device)
        for start in range(0, n, batch):
            xb, yb = Xs[start:start + batch], ys[start:start + batch]
            opt.zero_grad(set_to_none=True)
            loss = lossf(net(xb), yb)
            loss.backward()
            opt.step()
            total += loss.detach() * xb.shape[0]
        state["loss"] = float(total) / n
    epoch()
    return epoch, state


def trainer_bench(nets, backends, use_torch, quick, rows):
    """Whole epochs per second of each contender, interleaved epoch by epoch (after one warm-up epoch)."""
    out = {}
    rounds = 2 if quick else 4
    for name, (layers, batch) in nets.items():
        X, y = trainer_data(layers, rows)
        contenders = [(f"ffps_{b}", lambda b=b: ours_epoch(b, layers, batch, X, y)) for b in backends if b != "cupy"]
        if "cupy" in backends:
            contenders += [("ffps_cupy", lambda: ours_epoch("cupy", layers, batch, X, y)),
                           ("ffps_cupy_graph", lambda: ours_epoch("cupy", layers, batch, X, y, graphs=True)),
                           ("ffps_cupy_graph_tf32",
                            lambda: ours_epoch("cupy", layers, batch, X, y, graphs=True, precision="tf32"))]
        if use_torch:
            import torch

            contenders.append(("torch_cpu", lambda: torch_epoch(layers, batch, X, y, "cpu")))
            if "cupy" in backends and torch.cuda.is_available():
                contenders.append(("torch_cuda", lambda: torch_epoch(layers, batch, X, y, "cuda")))
        ready, times, row = {}, {}, {}
        for label, make in contenders:
            try:
                ready[label] = make()
                times[label] = []
            except Exception as exc:  # noqa: BLE001 - keep the rest of the table
                row[label] = {"error": f"{type(exc).__name__}: {exc}"}
        for _ in range(rounds):
            for label, (fn, _) in ready.items():
                sync = _sync_for(label)
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[label].append(time.perf_counter() - t)
        for label, ts in times.items():
            t = float(np.median(ts))
            row[label] = {"epoch_s": round(t, 4), "samples_per_s": round(rows / t),
                          "train_loss": round(ready[label][1]["loss"], 4)}
        for ours, anchor in (("ffps_numba", "torch_cpu"), ("ffps_numpy", "torch_cpu"),
                             ("ffps_cupy_graph", "torch_cuda"), ("ffps_cupy", "torch_cuda"),
                             ("ffps_cupy_graph_tf32", "torch_cuda")):
            if "epoch_s" in row.get(ours, {}) and "epoch_s" in row.get(anchor, {}):
                row[f"{ours}_speedup_vs_{anchor}"] = round(row[anchor]["epoch_s"] / row[ours]["epoch_s"], 2)
        row["rows"], row["batch"] = rows, batch
        out[name] = row
    return out


def _sync_for(label):
    if "cuda" in label:
        import torch

        return torch.cuda.synchronize
    if "cupy" in label:
        import cupy

        return lambda: cupy.cuda.get_current_stream().synchronize()
    return lambda: None


def print_table(report):
    print(f"CPU sgemm {report['cpu_sgemm_gflops']} GFLOP/s" +
          (f"; GPU {report['gpu']} sgemm {report['gpu_sgemm_gflops']} GFLOP/s" if "gpu" in report else ""))
    print(f"{'net':32s} {'contender':17s} {'ms/step':>10s} {'samples/s':>12s} {'GFLOP/s':>9s}")
    for name, r in report["nets"].items():
        for label, v in r.items():
            if isinstance(v, dict):
                if "error" in v:
                    print(f"{name:32s} {label:17s} error: {v['error']}")
                else:
                    print(f"{name:32s} {label:17s} {v['ms']:10.4f} {v['samples_per_s']:12,d} {v['gflops']:9.2f}")
        for label, v in r.items():
            if not isinstance(v, dict):
                print(f"{name:32s}   {label} = {v}")
    if report.get("trainer"):
        print("\nwhole epochs (MinibatchTrainer.run_epoch; default threads)")
        print(f"{'net':32s} {'contender':22s} {'s/epoch':>9s} {'samples/s':>12s} {'loss':>8s}")
        for name, r in report["trainer"].items():
            for label, v in r.items():
                if isinstance(v, dict):
                    if "error" in v:
                        print(f"{name:32s} {label:22s} error: {v['error']}")
                    else:
                        print(f"{name:32s} {label:22s} {v['epoch_s']:9.4f} {v['samples_per_s']:12,d} "
                              f"{v['train_loss']:8.4f}")
            for label, v in r.items():
                if not isinstance(v, dict) and label not in ("rows", "batch"):
                    print(f"{name:32s}   {label} = {v}")


if __name__ == "__main__":
    main()
