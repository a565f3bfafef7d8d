"""The new GPU paths in one short run, each line saying OK (with its number) or FAILED and why.

    python bench/gpu_smoke.py      # on a machine with cupy and a CUDA device; exit status 1 if any check failed

1. cublasGemmEx per compute type (fp32, tf32, bf16) on an 8192^3 GEMM: TFLOP/s, and the error against float64
   beside the CPU emulation's (the tf32 target on an H200 is >= 300 TFLOP/s in the wide net's step).
2. CUDA-graph windows: two digits epochs with cuda_graphs=True recorded (or why not), ms per step.
3. Page-locked async copies: a 4 MB round trip, bytes equal.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def check(name, fn, failures):
    try:
        print(f"{name}: OK {fn()}", flush=True)
    except Exception as exc:  # noqa: BLE001 - report every check
        failures.append(name)
        print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(limit=3)


def gemm_rates():
    import cupy

    from core import get_backend
    from core.backends.numpy_ops import NumpyOps

    ops = get_backend("cupy")
    out = {}
    n = 8192
    a = cupy.random.standard_normal((n, n), dtype=cupy.float32)
    b = cupy.random.standard_normal((n, n), dtype=cupy.float32)
    c = cupy.empty((n, n), cupy.float32)
    rng = np.random.default_rng(0)
    sa, sb = rng.standard_normal((256, 512)).astype(np.float32), rng.standard_normal((512, 256)).astype(np.float32)
    exact = sa.astype(np.float64) @ sb.astype(np.float64)
    for p in ("fp32", "tf32", "bf16"):
        ops._recording = p == "fp32"               # fp32 through cublasGemmEx too (the recorded path's GEMM)
        try:
            ops.gemm(a, b, out=c, precision=p)
            cupy.cuda.get_current_stream().synchronize()
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            for _ in range(5):
                ops.gemm(a, b, out=c, precision=p)
            end.record()
            end.synchronize()
            tflops = 5 * 2 * n ** 3 / (cupy.cuda.get_elapsed_time(start, end) / 1e3) / 1e12
            got = cupy.asnumpy(ops.gemm(cupy.asarray(sa), cupy.asarray(sb), precision=p))
        finally:
            ops._recording = False
        err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
        ref = NumpyOps().gemm(sa, sb, precision=p)
        emulated = np.linalg.norm(ref - exact) / np.linalg.norm(exact)
        out[p] = f"{tflops:.1f} TFLOP/s, rel err {err:.2e} (CPU emulation {emulated:.2e})"
    return out


def graph_windows():
    from core import FeedForwardNetwork, MinibatchTrainer
    from core.datasets import load_digits_split

    Xtr, Xte, ytr, yte = load_digits_split()
    net = FeedForwardNetwork([64, 100, 10], backend="cupy")
    trainer = MinibatchTrainer(net, batch_size=32, learning_rate=0.1, optimizer="momentum", cuda_graphs=True)
    w, _ = trainer.fit(Xtr, ytr, epochs=2)
    if trainer.graph_problem is not None:
        raise RuntimeError(trainer.graph_problem)
    data = net.upload(Xtr, ytr)
    wd = net.device_params(w)
    t0 = time.perf_counter()
    for e in range(5):
        trainer.run_epoch(wd, data, e)
    dt = (time.perf_counter() - t0) / (5 * trainer.steps_per_epoch(len(ytr)))
    return f"recorded; {dt * 1e3:.4f} ms per digits step (batch 32, whole epochs incl. shuffle)"


def async_copies():
    import cupy

    from core import get_backend

    ops = get_backend("cupy")
    host = ops.pinned_empty((1 << 20,), np.float32)
    x = cupy.arange(1 << 20, dtype=cupy.float32)
    ops.copy_to_host_async(x, host).wait(timeout=10)
    y = cupy.zeros_like(x)
    ops.copy_from_host_async(y, host).wait(timeout=10)
    if not bool((y == x).all()):
        raise AssertionError("round trip changed the data")
    return "4 MB device->pinned host->device, equal"


def main() -> int:
    failures = []
    check("gemm compute types", gemm_rates, failures)
    check("CUDA-graph windows", graph_windows, failures)
    check("async copies", async_copies, failures)
    print("all OK" if not failures else f"FAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
