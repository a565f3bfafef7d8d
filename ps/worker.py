"""The training loop one worker runs against the server, for every mode (the rules: ps/README.md, "Modes").

What differs between modes (the local window, the exchange) is the mode object's (:mod:`ps.modes`); every
setting comes from the server's training spec in ``cfg``. Local steps use the core trainer (any backend:
numpy, numba, cupy with a device ordinal) a window at a time (one recorded launch per window with
``cuda_graphs``); the client moves float32 host vectors, through page-locked buffers on a GPU. Exchange ``s``
(1, 2, ...) covers local steps ``(s-1)*tau+1 .. s*tau`` of a deterministic batch sequence (seeded per worker),
so a restarted worker (attempt + 1) skips exactly the exchanges the server already applied for it and no
mini-batch is applied twice. With an adaptive window (the spec's ``window_max``) one push may cover windows s
.. s+m-1 and carries step s+m-1: the numbering, and with it every resume, stays in windows of tau steps. With
the spec's ``pipeline`` (asynchronous modes) the push and pull of window k run on a thread while window k+1
computes.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from core.optimizers import steady_gain
from core.sparse import CsrRows

from .convergence import exchange_epoch, last_window_of_epoch
from .shards import connect

log = logging.getLogger("ps.worker")


class WorkerLoop:
    """One worker's state between the mode's hooks: ``w`` (its weights on the backend), ``acc`` (summed
    gradients of the window) and ``spare_acc`` (the one in flight), ``version`` (of the weights last
    received), ``window_version`` (of the weights the current window started from), ``window_start`` (pipelined
    gradient modes: the weights themselves, else None), ``rebase_gain`` (the server optimizer's
    :func:`core.optimizers.steady_gain`), ``push_scale`` (the factor on the current push's sum:
    :meth:`ps.modes.Mode.push_scale`), ``stats``."""

    def __init__(self, spec, net, trainer, client, stats):
        self.spec, self.net, self.ops, self.trainer, self.client, self.stats = (
            spec, net, net.ops, trainer, client, stats)
        self.host = self.ops.pinned_empty((net.num_params,), np.float32)
        self._outboxes = [self.ops.pinned_empty((net.num_params,), net.dtype) for _ in range(2)]
        self.acc = self.ops.zeros((net.num_params,), net.dtype)
        self.spare_acc = self.ops.zeros((net.num_params,), net.dtype)
        self.w = None
        self.window_start = self.ops.zeros((net.num_params,), net.dtype) \
            if spec.pipeline and spec.rule.pushes_gradients else None
        # the entries where window_start may differ from w since it was last brought up to date (a list of index
        # arrays; None: anywhere), so that a sparse window's send copies those, not the whole vector
        self.start_behind: list | None = None
        self.apart: np.ndarray | None = None
        # the server's optimizer moves about this many times the worker's own SGD steps for the same gradients
        self.rebase_gain = steady_gain(spec.optimizer, spec.optimizer_options)
        self.push_scale = 1.0
        self.version = 0
        self.window_version = 0
        self._kept: dict = {}           # step -> copies of its window's batches, where the mode may recompute it
        # a wait on a copy or on the exchange thread outlasts every retry the client makes, then gives up
        self.wait_timeout = 2 * (client.retries + 1) * (spec.worker_timeout + spec.barrier_timeout) + 10.0

    @property
    def rebase_factor(self) -> float:
        """How far the server will move the weights for the current push's local SGD steps (pipelined rebase)."""
        return self.rebase_gain * self.push_scale

    def to_host(self, x) -> np.ndarray:
        """A device vector copied into the one host buffer the client sends from."""
        return self.ops.to_host(x, out=self.host)

    def keep_batches(self, step: int, batches: list) -> None:
        """Copies of more batches of window ``step`` (a window may span an epoch: the next epoch's shuffle
        would overwrite the views)."""
        self._kept.setdefault(step, []).extend((X.copy(), y.copy()) for X, y in batches)

    def kept_window(self, step: int) -> list:
        return self._kept.get(step, [])

    def forget_window(self, step: int) -> None:
        self._kept.pop(step, None)

    def outbox(self, step: int) -> np.ndarray:
        """The host buffer exchange ``step`` sends from: two, alternating, so a pipelined exchange's buffer
        is never refilled while it is still on its way."""
        return self._outboxes[step % 2]


class Exchanges:
    """Runs the mode's exchanges in order: in line, or (pipelined) each on one thread while the next window
    computes; an exchange is received (its weights applied) before the next one is sent."""

    def __init__(self, loop, mode, pipelined: bool):
        self.loop, self.mode = loop, mode
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ffps-exchange") if pipelined else None
        self.pending = None

    def __call__(self, step: int, metrics: dict) -> None:
        if self.pool is None:
            self.mode.exchange(self.loop, step, metrics)
            return
        self.finish()
        out = self.mode.send(self.loop, step, metrics)
        self.pending = (out, self.pool.submit(self.mode.talk, self.loop, out))

    def finish(self) -> None:
        """Receive the exchange in flight, if any (its errors are raised here)."""
        if self.pending is not None:
            out, future = self.pending
            self.pending = None
            self.mode.receive(self.loop, out, future.result(timeout=self.loop.wait_timeout))

    def close(self) -> None:
        """Let a talk still in flight end (the client's own timeouts bound it) before its socket closes."""
        if self.pool is not None:
            if self.pending is not None:
                try:
                    self.pending[1].result(timeout=self.loop.wait_timeout)
                except Exception:  # noqa: BLE001 - already failing: the first error is the one raised
                    pass
            self.pool.shutdown(wait=False)


MIN_PUSHES_PER_PASS = 4     # an adaptive window covers at most a quarter of a pass over the worker's shard


class WindowPacer:
    """How many windows of ``tau`` steps a worker's next push covers (an adaptive window, ``window_max`` > tau):
    enough that its wait on the exchange is about ``SHARE`` of the time between pushes, from running means of
    a local step's time and an exchange's wait. Starts at one window; grows at most twofold a push (a slow first
    exchange does not jump to the bound); never past ``window_max`` steps. Only the timing of this worker moves
    it, so runs that set their window keep a fixed schedule (no pacer)."""

    SHARE = 0.2         # of a worker's time between two pushes that its wait on the exchange may take
    SMOOTHING = 0.5     # weight of the newest measurement in the running means

    def __init__(self, tau: int, window_max: int):
        self.tau, self.most = tau, max(1, window_max // tau)
        self.windows = 1
        self.step_s = self.wait_s = None

    @classmethod
    def wanted(cls, tau: int, step_s: float, wait_s: float) -> int:
        """Windows of ``tau`` steps a push that keep a wait of ``wait_s`` at SHARE of it (>= 1, unbounded)."""
        need = wait_s * (1 - cls.SHARE) / cls.SHARE / step_s        # steps a push
        return max(1, -(-int(need) // tau))

    def observe(self, steps: int, compute_s: float, wait_s: float) -> int:
        """One push's figures (its local steps, their time, the wait on its exchange) -> windows of the next."""
        if steps > 0:
            step_s = max(compute_s, 0.0) / steps
            a = self.SMOOTHING
            self.step_s = step_s if self.step_s is None else a * step_s + (1 - a) * self.step_s
            self.wait_s = wait_s if self.wait_s is None else a * wait_s + (1 - a) * self.wait_s
            want = self.wanted(self.tau, self.step_s, self.wait_s) if self.step_s > 0 else self.most
            self.windows = max(1, min(want, 2 * self.windows, self.most))
        return self.windows


def pacer_bound(window_max: int, tau: int, steps_per_epoch: int) -> int | None:
    """The adaptive window's bound in local steps: ``window_max``, and at most a quarter of a pass, so that a
    small shard still exchanges a few times a pass (digits on 4 workers, 10 steps a pass: whole-pass pushes lost
    ~0.5 % accuracy); None where that leaves no room for two windows (no pacer)."""
    most = min(window_max, max(tau, steps_per_epoch // MIN_PUSHES_PER_PASS))
    return most if most >= 2 * tau else None


def window_within_an_epoch(spec, steps_per_epoch: int):
    """``spec`` with its window cut to a pass over the shard when it is longer: an exchange counts in the epoch
    of its last step, so with fewer steps per pass than ``tau`` some epochs ended no exchange, had no figures,
    and held the server's epoch bookkeeping (progress lines, objective history, the ``tol`` decision) at the
    first of them for the rest of the fit. Every worker of a round mode has the same shard size, so the same
    window."""
    if spec.tau <= steps_per_epoch or steps_per_epoch < 1:
        return spec
    log.info("worker: %d local steps per pass over this shard, fewer than the window of %d: exchanging every %d "
             "steps, so every epoch ends at least one exchange", steps_per_epoch, spec.tau, steps_per_epoch)
    # an adaptive window's bound follows (its pushes never cross an epoch's end either)
    return spec.replace(tau=steps_per_epoch, **({"window_max": steps_per_epoch} if spec.window_max else {}))


def run_worker(cfg: dict, worker_id: int, X: np.ndarray, y: np.ndarray, *, device=None, attempt=0,
               on_step=None, step_delay=0.0, cpu_threads=None, start_together=False, client=None) -> dict:
    """Train on this shard (X (n, d0), y (n,)) against the server in ``cfg``, by its spec -> summary dict.

    device: CUDA ordinal (cupy). cpu_threads: this worker's share of the machine's cores for BLAS/numba (None
    leaves the defaults); workers sharing a machine must not each spin up a thread per core.
    start_together: wait at the server's barrier 0 until every worker is ready (data uploaded, kernels
    loaded) before the first pull, so no worker races through its shard while a peer is still starting;
    for launchers that start all workers at once (a Spark barrier stage), never for a lone restarted worker.
    on_step(local_step): optional hook; step_delay: seconds of sleep per local step (fault tests use it to
    keep training running long enough to kill a worker mid-way); either makes every step a window of its
    own. client: a registered ParameterClient of this (worker_id, attempt) to use instead of opening one;
    run_worker closes it when training ends.
    """
    from core import FeedForwardNetwork, MinibatchTrainer, limit_cpu_threads  # the only ps module that trains

    if cpu_threads is not None:
        limit_cpu_threads(cpu_threads)
    spec = cfg["spec"]
    mode = spec.rule
    net = FeedForwardNetwork(list(spec.layers), backend=spec.backend, device=device, precision=spec.precision)
    trainer = MinibatchTrainer(net, batch_size=spec.batch_size, learning_rate=spec.learning_rate,
                               optimizer=mode.local_optimizer, momentum=spec.local_momentum,
                               seed=spec.seed * 1000 + worker_id, cuda_graphs=spec.cuda_graphs,
                               ragged_share=not mode.weighs_rows)
    data = net.upload(X, y)
    if isinstance(data.X, CsrRows) and mode.tracks_entries(spec):
        trainer.track_entries()        # a sparse window's sum is pushed (and its weights taken back) by entries
    steps_per_epoch = trainer.steps_per_epoch(data.n_rows)
    spec = window_within_an_epoch(spec, steps_per_epoch)
    tau = spec.tau
    most = pacer_bound(spec.window_max, tau, steps_per_epoch)
    pacer = WindowPacer(tau, most) if most is not None and not mode.keeps_window(spec) else None
    t_ready = time.perf_counter()
    if client is None:
        client = connect(cfg, worker_id=worker_id, attempt=attempt, timeout=spec.worker_timeout)
    t0 = time.perf_counter()
    resume_after = client.step
    stats = {"worker_id": worker_id, "attempt": attempt, "resumed_after": resume_after, "pushes": 0,
             "stale": 0, "rejected_updates": 0, "duplicates": 0, "local_steps": 0, "samples": 0, "exchange_s": 0.0,
             "tau": tau, "window_max": most if pacer else tau, "longest_push": 0, "epochs": spec.epochs,
             # batches per pass: exchange s ends in epoch ceil(s * tau / steps_per_epoch)
             "steps_per_epoch": steps_per_epoch, "pipelined": bool(spec.pipeline)}
    loop = WorkerLoop(spec, net, trainer, client, stats)
    exchanges = Exchanges(loop, mode, pipelined=spec.pipeline)
    per_step = on_step is not None or bool(step_delay)
    keep = mode.keeps_window(spec)
    try:
        if start_together:
            m = min(spec.batch_size, data.n_rows)        # load/compile the kernels before lining up
            net.gradient_device(net.ops.zeros((net.num_params,), net.dtype), data.X[:m], data.y[:m], trainer.grad)
            client.barrier(0)
            t0 = time.perf_counter()
        loop.version, wh = client.pull()
        loop.w = net.ops.asarray(np.array(wh, copy=True))
        loop.window_version = loop.version
        # the entries where w and the weights the client holds may differ: none yet (async-easgd by entries)
        loop.apart = np.empty(0, dtype=np.int64) if client.held_version is not None else None

        def exchange(step, steps, started):
            loss_sum, correct, rows = trainer.take_sums()     # the window's one host read
            epoch, last = exchange_epoch(step, tau, steps_per_epoch, spec.epochs)
            t = time.perf_counter()
            exchanges(step, dict(loss=loss_sum / rows, accuracy=correct / rows, batch_size=rows, epoch=epoch,
                                 last_of_epoch=last))
            wait = time.perf_counter() - t
            stats["exchange_s"] += wait                          # the time training waited on the server
            stats["pushes"] += 1
            stats["samples"] += rows
            stats["longest_push"] = max(stats["longest_push"], steps)
            if pacer is not None:
                pacer.observe(steps, t - started, wait)

        k = 0                                  # local steps of the whole run so far (done or skipped)
        in_window = 0                          # steps of the current push so far
        push_end = 0                           # the last window the current push covers
        started = 0.0                          # when the current push's first step began
        for _ in range(spec.epochs):
            if client.stop_requested:          # the server decided (tol): end after the last exchange
                break
            trainer.begin_epoch(data)          # every epoch draws its permutation, skipped or not
            b = 0
            while b < steps_per_epoch and not client.stop_requested:
                window = k // tau + 1                                  # the exchange batch b belongs to
                if window <= resume_after:                            # applied by an earlier attempt
                    skip = min(steps_per_epoch - b, resume_after * tau - k)
                    b, k = b + skip, k + skip
                    continue
                if in_window == 0:
                    push_end = window if pacer is None else min(
                        window + pacer.windows - 1, last_window_of_epoch(window, tau, steps_per_epoch, spec.epochs))
                    loop.push_scale = mode.push_scale(spec, push_end - window + 1)
                    loop.window_version = loop.version
                    started = time.perf_counter()
                # a push of several windows still runs them a window at a time (the shapes a CUDA graph recorded)
                count = 1 if per_step else min(steps_per_epoch - b, window * tau - k)
                if per_step:
                    if on_step is not None:
                        on_step(k + 1)
                    if step_delay:
                        time.sleep(step_delay)
                if keep:
                    loop.keep_batches(window, [trainer.batch(data, i) for i in range(b, b + count)])
                mode.local_window(loop, data, b, count)
                b, k, in_window = b + count, k + count, in_window + count
                stats["local_steps"] += count
                if k == push_end * tau:
                    exchange(push_end, in_window, started)
                    in_window = 0
        if in_window and not client.stop_requested:
            exchange((k - 1) // tau + 1, in_window, started)    # the last, shorter window: no batch goes unsent
        exchanges.finish()
        client.bye()
    finally:
        exchanges.close()
        client.close()
    stats.update(seconds=time.perf_counter() - t0, start_wait_s=t0 - t_ready, last_step=client.step,
                 backend=net.backend_name, precision=net.precision, graphs=trainer.graphs is not None,
                 graph_problem=trainer.graph_problem, stopped_by_server=client.stop_requested)
    return stats
