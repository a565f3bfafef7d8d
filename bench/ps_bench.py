"""Parameter-server benchmarks; prints a table and writes bench/results/ps_bench.json.

1. push+pull round trip of the digits net's 7.5k-float vector and of 1M / 10M float32 vectors through
   ParameterClient/ParameterServer (security off, then CURVE on, then CURVE on a server sharded into --shards
   slices, default ps.shards.auto_shards) against a raw pyzmq DEALER/ROUTER round trip of the same bytes,
   measured in the same run (the anchor in ../shared/anchors/zmq_loopback.py). Ratio = raw time / our time
   (1.0 = as fast as raw). For the small vector also the anchor with its client on a ZeroMQ context of its
   own, as ours has, and the round trip with the client in a process of its own, as a worker runs it.
2. updates/s (push + new weights back) with 1, 2, 4, 8 worker processes on the digits net's vector.
3. samples/s of the Spark-free runner on digits (CPU workers) vs one process training alone, no server.
4. ``mid``: the runner on a mid-size net ([784,256,256,10], 60k synthetic rows, async, window 4, batch 128)
   with 1, 2 and 4 workers sharing one device, as shipped (op by op, exchange in line) and with this
   project's GPU options (cuda_graphs, pipeline, bfloat16 gradient frames), beside one process alone
   (MinibatchTrainer, no server) in both configurations. On a GPU: ``--backend cupy``.
5. ``wide`` (only when asked): a wide sparse model, ``core.datasets.hashed_text`` (--wide-rows documents of 30
   words hashed into 2^18 columns, as HashingTF makes them), [262144, 16, 2], async, window 4, batch 32, 3
   passes, numba, CURVE on: the runner with 1 and 2 workers (one server, and sharded in 2), beside one process
   alone (MinibatchTrainer, no server), and sync with 2 workers (window 1). Its steps, pushes, server updates
   and replies go by entries (the sparse first layer's touched rows), not the 4.2M-float vector.

    .venv/bin/python bench/ps_bench.py [--quick] [--backend numba] [--sections round_trip,updates,runner,mid,wide]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import threading
import time

import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ps import ParameterClient, ParameterServer  # noqa: E402
from ps.shards import auto_shards, connect, make_server  # noqa: E402
from ps.spec import TrainingSpec  # noqa: E402


RAW_TIMEOUT_MS = 60_000   # the anchor's sockets wait at most this long: a lost message fails the run, never hangs it


def _raw_socket(ctx, kind):
    """A socket of the raw anchor, with receive and send timeouts (zmq.Again after RAW_TIMEOUT_MS)."""
    s = ctx.socket(kind)
    for opt, value in ((zmq.RCVTIMEO, RAW_TIMEOUT_MS), (zmq.SNDTIMEO, RAW_TIMEOUT_MS), (zmq.LINGER, 0)):
        s.setsockopt(opt, value)
    return s


def _raw_serve(srv, total):
    """The anchor's ROUTER loop: apply w -= 0.01 g, send w back zero-copy, ``total`` times."""
    w = None
    for _ in range(total):
        ident, _hdr, payload = srv.recv_multipart(copy=False)
        g = np.frombuffer(payload.buffer, dtype=np.float32)
        if w is None:
            w = np.zeros_like(g)
        w -= 0.01 * g
        srv.send_multipart([ident.bytes, b"ok", w], copy=False)


def _raw_client_loop(c, g, warm, reps):
    """The anchor's DEALER side: ``warm`` untimed round trips, then -> seconds per round trip of ``reps``."""
    for _ in range(warm):
        c.send_multipart([b"push", g], copy=False)
        c.recv_multipart(copy=False)
    t0 = time.perf_counter()
    for _ in range(reps):
        c.send_multipart([b"push", g], copy=False)
        c.recv_multipart(copy=False)
    return (time.perf_counter() - t0) / reps


def _ours_client_loop(c, g, warm, reps):
    """Our client's side of the same: push ``g``, get the weights back."""
    for _ in range(warm):
        c.push(g, want_weights=True)
    t0 = time.perf_counter()
    for _ in range(reps):
        c.push(g, want_weights=True)
    return (time.perf_counter() - t0) / reps


def raw_round_trip(n, reps, contexts=1):
    """The anchor: ROUTER thread applies w -= 0.01 g and sends w back zero-copy; DEALER times round trips.

    contexts=1 is the anchor as written: both sockets on one ZeroMQ context, so one I/O thread carries both
    ends. contexts=2 gives the DEALER a context of its own, as our client has (and any worker, in its own
    process): each message then crosses two I/O threads."""
    ctx = zmq.Context()
    client_ctx = zmq.Context() if contexts == 2 else ctx
    srv = _raw_socket(ctx, zmq.ROUTER)
    port = srv.bind_to_random_port("tcp://127.0.0.1")
    t = threading.Thread(target=_raw_serve, args=(srv, reps + 2), daemon=True)
    t.start()
    c = _raw_socket(client_ctx, zmq.DEALER)
    c.connect(f"tcp://127.0.0.1:{port}")
    dt = _raw_client_loop(c, np.random.default_rng(0).random(n, dtype=np.float32), 2, reps)
    t.join(RAW_TIMEOUT_MS / 1000)
    c.close(linger=0)
    srv.close(linger=0)
    if client_ctx is not ctx:
        client_ctx.term()
    ctx.term()
    return dt


def ours_round_trip(n, reps, secure, shards=1):
    g = np.random.default_rng(0).random(n, dtype=np.float32)
    spec = TrainingSpec(mode="async", learning_rate=0.01, num_workers=1)
    with make_server(np.zeros(n, np.float32), spec=spec, shards=shards, secure=secure, progress=False) as s:
        with connect(s.client_config(), worker_id=0, timeout=60) as c:
            dt = _ours_client_loop(c, g, 2, reps)
        assert s.stats()["applied"] == reps + 2
    return dt


def _raw_client_process(address, n, reps, q):
    ctx = zmq.Context()
    c = _raw_socket(ctx, zmq.DEALER)
    c.connect(address)
    q.put(_raw_client_loop(c, np.random.default_rng(0).random(n, dtype=np.float32), 20, reps))
    c.close(linger=0)
    ctx.term()


def _ours_client_process(cfg, n, reps, q):
    g = np.random.default_rng(0).random(n, dtype=np.float32)
    with connect(cfg, worker_id=0, timeout=60) as c:
        q.put(_ours_client_loop(c, g, 20, reps))


def process_round_trip(n, reps, ours):
    """The round trip as a worker meets it: the client in a process of its own (spawned), the server (the
    anchor's ROUTER thread, or ours, security off) in this one -> seconds per round trip."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    if ours:
        spec = TrainingSpec(mode="async", learning_rate=0.01, num_workers=1)
        with make_server(np.zeros(n, np.float32), spec=spec, shards=1, secure=False, progress=False) as s:
            p = ctx.Process(target=_ours_client_process, args=(s.client_config(), n, reps, q))
            p.start()
            dt = q.get(timeout=300)
            p.join(60)
        return dt
    zctx = zmq.Context()
    srv = _raw_socket(zctx, zmq.ROUTER)
    port = srv.bind_to_random_port("tcp://127.0.0.1")
    t = threading.Thread(target=_raw_serve, args=(srv, reps + 20), daemon=True)
    t.start()
    p = ctx.Process(target=_raw_client_process, args=(f"tcp://127.0.0.1:{port}", n, reps, q))
    p.start()
    dt = q.get(timeout=300)
    p.join(60)
    t.join(60)
    srv.close(linger=0)
    zctx.term()
    return dt


def _updates_worker(cfg, wid, seconds, q):
    g = np.full(cfg["num_params"], 1e-6, np.float32)
    with ParameterClient(cfg, worker_id=wid, timeout=30) as c:
        c.barrier(1)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            c.push(g, want_weights=True)
            n += 1
        q.put((n, time.perf_counter() - t0))


def updates_per_second(workers, num_params, seconds, secure):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with ParameterServer(np.zeros(num_params, np.float32), mode="async", num_workers=workers, secure=secure,
                         progress=False, barrier_timeout=60) as s:
        cfg = s.client_config()
        ps_ = [ctx.Process(target=_updates_worker, args=(cfg, i, seconds, q)) for i in range(workers)]
        for p in ps_:
            p.start()
        res = [q.get(timeout=120) for _ in ps_]
        for p in ps_:
            p.join(30)
        applied = s.stats()["applied"]
    total = sum(n for n, _ in res)
    assert applied == total, (applied, total)
    return total / max(dt for _, dt in res)


def runner_throughput(workers, backend, epochs, secure, tau=1):
    from core.datasets import load_digits_split
    from ps.runner import run
    from core import FeedForwardNetwork

    Xtr, Xte, ytr, yte = load_digits_split()
    res = run(Xtr, ytr, [64, 100, 10], mode="async", workers=workers, backend=backend, epochs=epochs,
              batch_size=32, learning_rate=0.1, secure=secure, tau=tau, timeout=600)
    acc = FeedForwardNetwork([64, 100, 10], backend="numpy").evaluate(res.weights, Xte, yte)[1]
    return res.samples_per_s, res.steady_samples_per_s, acc


def alone_throughput(backend, epochs):
    from core.datasets import load_digits_split
    from core import FeedForwardNetwork, MinibatchTrainer

    Xtr, Xte, ytr, yte = load_digits_split()
    net = FeedForwardNetwork([64, 100, 10], backend=backend)
    tr = MinibatchTrainer(net, batch_size=32, learning_rate=0.1)
    tr.fit(Xtr, ytr, epochs=1)                                  # warm-up (numba compile / caches)
    t0 = time.perf_counter()
    w, _ = MinibatchTrainer(net, batch_size=32, learning_rate=0.1).fit(Xtr, ytr, epochs=epochs)
    dt = time.perf_counter() - t0
    return len(ytr) * epochs / dt, net.evaluate(w, Xte, yte)[1]


MID_LAYERS = [784, 256, 256, 10]


def mid_data(rows, seed=0):
    """MNIST-shaped synthetic rows: class centres in 784 dimensions plus noise, 10 classes (learnable)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, 784)).astype(np.float32) * 0.3
    y = rng.integers(0, 10, rows)
    X = centres[y] + rng.standard_normal((rows, 784)).astype(np.float32)
    return X, y


GPU_OPTIONS = dict(cuda_graphs=True, pipeline=True, wire_dtype="bfloat16")


def mid_runner(workers, backend, epochs, rows, options):
    from ps.runner import run

    X, y = mid_data(rows)
    devices = [0] * workers if backend == "cupy" else None
    res = run(X, y, MID_LAYERS, mode="async", workers=workers, backend=backend, epochs=epochs, batch_size=128,
              learning_rate=0.05, secure=True, timeout=900, devices=devices, **dict({"tau": 4}, **options))
    loss = res.history[-1]["loss"] if res.history else float("nan")
    graphs = [r.get("graph_problem") for r in res.workers.values()]
    return res.samples_per_s, res.steady_samples_per_s, loss, graphs


def mid_alone(backend, epochs, rows, graphs):
    from core import FeedForwardNetwork, MinibatchTrainer

    X, y = mid_data(rows)
    net = FeedForwardNetwork(MID_LAYERS, backend=backend)
    trainer = MinibatchTrainer(net, batch_size=128, learning_rate=0.05, cuda_graphs=graphs)
    data = net.upload(X, y)
    w = net.ops.asarray(net.init_params(0))
    trainer.run_epoch(w, data, 0)                                  # warm-up: compile, record
    t0 = time.perf_counter()
    for e in range(epochs):
        stats = trainer.run_epoch(w, data, e + 1)
    dt = time.perf_counter() - t0
    return rows * epochs / dt, stats.loss, trainer.graph_problem


def mid_section(backend, quick, out, rows=60_000):
    epochs = 2 if quick else 4
    print(f"\nmid-size net {MID_LAYERS}, {rows} rows, async window 4 (or automatic), batch 128, backend {backend}, "
          f"CURVE on")
    configs = [("as shipped", {}), ("automatic window", {"tau": 0})]     # tau 0: a push may cover 1-16 windows
    if backend == "cupy":
        configs.append(("graphs+pipeline+bf16 frames", GPU_OPTIONS))
    alone = {}                                  # one single-process run per graphs setting
    for label, options in configs:
        graphs = bool(options.get("cuda_graphs"))
        if graphs not in alone:
            alone[graphs] = mid_alone(backend, epochs, rows, graphs=graphs)
        sps, loss, problem = alone[graphs]
        out["mid"].append({"workers": 0, "label": "one process, no server", "config": label, "backend": backend,
                           "samples_per_s": sps, "train_loss": loss, "graph_problem": problem})
        print(f"  {label:28s} alone (no server): {sps:10.0f} samples/s, loss {loss:.4f}"
              + (f" [no graph: {problem}]" if problem and options else ""))
        one = None
        for w in (1, 2, 4):
            wall, steady, loss, problems = mid_runner(w, backend, epochs, rows, options)
            one = steady if w == 1 else one
            row = {"workers": w, "config": label, "backend": backend, "tau": options.get("tau", 4),
                   "samples_per_s_wall": wall,
                   "samples_per_s_steady": steady, "train_loss_last_push": loss,
                   "steady_over_one_worker": steady / one if one else None, "graph_problems": problems}
            out["mid"].append(row)
            print(f"  {label:28s} workers={w}: {wall:10.0f} samples/s wall, {steady:10.0f} steady "
                  f"({steady / one:.2f}x one worker), last loss {loss:.4f}")


WIDE_LAYERS = [1 << 18, 16, 2]


def wide_section(rows, out, epochs=3):
    from core import FeedForwardNetwork, MinibatchTrainer
    from core.datasets import hashed_text
    from ps.runner import run

    X, y = hashed_text(rows)
    print(f"\nwide sparse model {WIDE_LAYERS}, {rows} hashed documents of 30 words, async window 4, batch 32, "
          f"{epochs} passes, numba, CURVE on")
    net = FeedForwardNetwork(WIDE_LAYERS, backend="numba")
    MinibatchTrainer(net, batch_size=32, learning_rate=0.1).fit(X[:1000], y[:1000], epochs=1)     # compile
    t0 = time.perf_counter()
    w, hist = MinibatchTrainer(net, batch_size=32, learning_rate=0.1).fit(X, y, epochs=epochs)
    alone = time.perf_counter() - t0
    out["wide"].append({"workers": 0, "label": "one process, no server", "seconds": alone,
                        "train_accuracy": hist[-1].accuracy})
    print(f"  one process alone (no server): {alone:6.2f} s, train accuracy {hist[-1].accuracy:.4f}")
    for mode, workers, shards, pipeline in (("async", 1, 1, False), ("async", 2, 1, False), ("async", 2, 1, True),
                                            ("async", 2, 2, False), ("sync", 2, 1, False)):
        t0 = time.perf_counter()
        res = run(X, y, WIDE_LAYERS, mode=mode, workers=workers, backend="numba", epochs=epochs, batch_size=32,
                  learning_rate=0.1, tau=0, secure=True, shards=shards, pipeline=pipeline, timeout=900)
        wall = time.perf_counter() - t0
        acc = net.evaluate(res.weights, X, y)[1]
        waits = [round(r["exchange_s"], 2) for r in res.workers.values()]
        stats = res.stats.get("shards", [res.stats])
        deltas = sum(s.get("delta_replies", 0) for s in stats)
        out["wide"].append({"mode": mode, "workers": workers, "shards": shards, "pipeline": pipeline, "seconds": wall,
                            "train_accuracy": acc, "exchange_s": waits, "delta_replies": deltas,
                            "over_alone": wall / alone})
        label = mode + (" pipelined" if pipeline else "")
        print(f"  {label} workers={workers} shards={shards}: {wall:6.2f} s ({wall / alone:.2f}x alone), train accuracy "
              f"{acc:.4f}, workers waited {waits} s on exchanges, {deltas} delta replies")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--sections", default="round_trip,updates,runner,mid",
                    help="comma-separated subset of round_trip, updates, runner, mid, wide")
    ap.add_argument("--mid-rows", type=int, default=60_000, help="rows of the mid-size net's data")
    ap.add_argument("--wide-rows", type=int, default=20_000, help="documents of the wide section")
    ap.add_argument("--shards", type=int, default=0, help="round trips: slices of a sharded server (0 = auto)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "ps_bench.json"))
    a = ap.parse_args(argv)
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pyzmq": zmq.pyzmq_version(),
                       "libzmq": zmq.zmq_version(), "platform": platform.platform()}, "round_trip": [],
           "updates_per_s": [], "runner": [], "mid": [], "wide": []}
    sections = set(a.sections.split(","))
    unknown = sections - {"round_trip", "updates", "runner", "mid", "wide"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    if "round_trip" in sections:
        round_trips(a, out)
    if "updates" in sections:
        updates_table(a, out)
    if "runner" in sections:
        runner_table(a, out)
    if "mid" in sections:
        mid_section(a.backend, a.quick, out, a.mid_rows)
    if "wide" in sections:
        wide_section(a.wide_rows, out)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {a.out}")


def round_trips(a, out):
    print("push+pull round trip (one client, loopback tcp); ours/raw = raw time / ours; CURVE cost = / plain")
    print(f"{'size':>8} {'raw ms':>9} {'ours ms':>9} {'ours/raw':>9} {'curve ms':>9} {'curve cost':>10} "
          f"{'shards':>6} {'sharded ms':>10} {'cost':>6} {'GB/s ours':>9}")
    for n, reps in ((7510, 1000 if a.quick else 3000), (1_000_000, 20 if a.quick else 50),
                    (10_000_000, 4 if a.quick else 10)):
        shards = a.shards or auto_shards(n)
        raw, ours, curve, sharded, raw2 = [], [], [], [], []
        for _ in range(3 if a.quick else 5):   # interleave to share the machine's noise; best of each
            raw.append(raw_round_trip(n, reps))
            if n == 7510:                      # the small vector, where the I/O threads' wake-ups show
                raw2.append(raw_round_trip(n, reps, contexts=2))
            ours.append(ours_round_trip(n, reps, secure=False))
            curve.append(ours_round_trip(n, max(2, reps // 2), secure=True))
            if shards > 1:
                sharded.append(ours_round_trip(n, max(2, reps // 2), secure=True, shards=shards))
        r, o, c = min(raw), min(ours), min(curve)
        cs = min(sharded) if sharded else c
        row = {"n_params": n, "mbytes": n * 4 / 2**20, "raw_ms": r * 1e3, "ours_ms": o * 1e3,
               "ratio_ours_over_raw_throughput": r / o, "curve_ms": c * 1e3, "curve_cost_x": c / o,
               "shards": shards, "sharded_curve_ms": cs * 1e3, "sharded_curve_cost_x": cs / o,
               "ours_gb_s_both_ways": 2 * n * 4 / o / 1e9}
        out["round_trip"].append(row)
        print(f"{row['mbytes']:6.2f}MB {row['raw_ms']:9.3f} {row['ours_ms']:9.3f} "
              f"{row['ratio_ours_over_raw_throughput']:8.2f}x {row['curve_ms']:9.2f} {row['curve_cost_x']:9.2f}x "
              f"{shards:6d} {row['sharded_curve_ms']:10.2f} {row['sharded_curve_cost_x']:5.2f}x "
              f"{row['ours_gb_s_both_ways']:9.2f}")
        if raw2:
            row.update(raw_two_contexts_ms=min(raw2) * 1e3, ratio_ours_over_raw_two_contexts=min(raw2) / o)
            print(f"         the anchor's client on a context of its own (as ours): raw "
                  f"{row['raw_two_contexts_ms']:.3f} ms, ours/that {row['ratio_ours_over_raw_two_contexts']:.2f}x")
    n, reps = 7510, 1000 if a.quick else 3000
    raw, ours = [], []
    for _ in range(3 if a.quick else 5):
        raw.append(process_round_trip(n, reps, ours=False))
        ours.append(process_round_trip(n, reps, ours=True))
    r, o = min(raw), min(ours)
    out["round_trip_processes"] = {"n_params": n, "raw_ms": r * 1e3, "ours_ms": o * 1e3,
                                   "ratio_ours_over_raw_throughput": r / o}
    print(f"client in its own process (as a worker), {n} floats, security off: raw {r * 1e3:.3f} ms, ours "
          f"{o * 1e3:.3f} ms, ours/raw {r / o:.2f}x")


def updates_table(a, out):
    P = 64 * 100 + 100 + 100 * 10 + 10
    print(f"\nupdates/s, push + weights back, {P} params (digits net), worker processes")
    for secure in (False, True):
        for w in (1, 2, 4, 8):
            u = updates_per_second(w, P, 1.5 if a.quick else 3.0, secure)
            out["updates_per_s"].append({"workers": w, "secure": secure, "updates_per_s": u})
            print(f"  workers={w} secure={secure!s:5}: {u:9.0f} updates/s")


def runner_table(a, out):
    print(f"\nSpark-free runner, digits, async, batch 32, backend {a.backend}")
    epochs = 10 if a.quick else 30
    sps, acc = alone_throughput(a.backend, epochs)
    out["runner"].append({"workers": 0, "label": "one process, no server", "backend": a.backend,
                          "samples_per_s": sps, "test_accuracy": acc})
    print(f"  alone (no server)  : {sps:9.0f} samples/s, test acc {acc:.4f}")
    for w, tau in ((1, 1), (2, 1), (4, 1), (2, 4), (4, 4)):
        sps, steady, acc = runner_throughput(w, a.backend, epochs, secure=True, tau=tau)
        out["runner"].append({"workers": w, "tau": tau, "backend": a.backend, "secure": True,
                              "samples_per_s_wall": sps, "samples_per_s_steady": steady, "test_accuracy": acc})
        print(f"  runner workers={w} tau={tau}: {sps:9.0f} samples/s wall (incl. spawn), {steady:9.0f} steady, "
              f"test acc {acc:.4f}")


if __name__ == "__main__":
    main()
