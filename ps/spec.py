"""One frozen training spec: every setting of a training run, checked once, handed to server and workers alike.

Each launcher (the Spark estimator, ``ps.runner``, the command lines, the benchmarks) builds one
:class:`TrainingSpec`; the server takes it, and ``server.client_config()`` carries it to every worker next to
the address, the keys and the ids. A bad value raises :class:`SpecError` (a ValueError) naming the setting
and the value; :meth:`TrainingSpec.build` names it as the caller spells it (e.g. Spark's ``stepSize``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from core.backends import BACKEND_NAMES
from core.backends.numpy_ops import PRECISIONS
from core.cli import backend_of
from core.optimizers import OPTIMIZERS, SCHEDULES
from core.validation import check_int, check_layers, check_seed, int_rule

from .client import MAX_TIMEOUT_S
from .modes import AUTO_WINDOW_MAX, DEFAULT_WINDOW, MODE_NAMES, MODES, get_mode
from .protocol import FLAG_LOCAL_WEIGHTS, FLOAT32, RUNS32, SPARSE32, WIRE_DTYPES
from .rules import default_alpha

MAX_EPOCHS = 0xFFFF             # the header's epoch field (ps/protocol.py)


class SpecError(ValueError):
    """A setting out of range. ``relabel(names)`` words the message with the caller's names for settings."""

    def __init__(self, setting: str, template: str, **values):
        self.setting, self.template, self.values = setting, template, values
        super().__init__(template.format(name=setting, **values))

    def relabel(self, names: dict) -> ValueError:
        return ValueError(self.template.format(name=names.get(self.setting, self.setting), **self.values))


def _int_setting(spec, name, low=1):
    """Field ``name`` of ``spec`` checked by :func:`core.validation.check_int` (any Integral type) and set as an
    int, so a NumPy count reaches JSON and the wire as a plain one."""
    value = getattr(spec, name)
    try:
        object.__setattr__(spec, name, check_int(name, value, low))
    except ValueError:
        raise SpecError(name, "{name} must be %s, got {v!r}" % int_rule(low), v=value) from None


def _positive_number(name, value):
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise SpecError(name, "{name} must be a positive number, got {v!r}", v=value)


@dataclass(frozen=True)
class TrainingSpec:
    """Every setting of one training run.

    mode: a :data:`ps.modes.MODE_NAMES` entry. learning_rate: the server optimizer's rate and the workers'
    local-step rate. optimizer (+ optimizer_options, schedule): the server's update rule for gradient pushes.
    tau: local steps between exchanges; 0 (the default) = the mode's own (:attr:`ps.modes.Mode.default_tau`: 1 in
    sync, 4 in the others, where it may grow: ``window_max``). alpha: the elastic modes' moving rate (default 0.9 /
    num_workers). local_momentum: eamsgd's Nesterov momentum delta on the local steps. staleness: async only,
    refuse a push computed on weights more than this many updates old. ssp_slack: hold a pull at clock c until
    every other live worker reached c - slack. barrier_timeout: seconds a round, barrier or SSP wait may last.
    worker_timeout: seconds a worker waits for one reply. epochs, batch_size, backend, seed: the workers' loop.
    tol: stop early when the relative change of the epoch's mean training loss falls below it (0 = never;
    :mod:`ps.convergence`).
    precision: the workers' GEMM input precision (fp32, tf32, bf16; weights stay float32). cuda_graphs: workers
    on a GPU record each window of local steps as one CUDA graph (core/windows.py). pipeline: asynchronous modes
    overlap window k's push and pull with window k+1's steps (staleness one higher; each worker keeps its own
    progress across the exchange in flight). wire_dtype: float32, or bfloat16 / float16 frames for gradient
    and elastic-difference pushes (the server adds them in float32).
    The four are off (fp32, False, False, float32) by default.
    window_max: the adaptive window's bound, in local steps: a worker of an asynchronous mode covers as many
    windows of tau steps in one push as keep its waits on exchanges near a fifth of its time
    (:class:`ps.worker.WindowPacer`), up to window_max steps; 0 = every push covers one window. None (the
    default) = :data:`ps.modes.AUTO_WINDOW_MAX` where tau is 0 (the mode's own) in an asynchronous mode without
    ``staleness`` or ``ssp_slack``, else 0: a window the user sets stays fixed, and so does the run's schedule.
    In async a push of m windows carries 1/sqrt(min(m, num_workers)) of its gradient sum (:meth:`Mode.push_scale`).
    """
    layers: tuple | None = None
    mode: str = "async"
    num_workers: int = 2
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 0.1
    optimizer: str = "sgd"
    optimizer_options: dict = field(default_factory=dict)
    schedule: str = "constant"
    tau: int = 0
    alpha: float | None = None
    local_momentum: float = 0.99
    staleness: int | None = None
    ssp_slack: int | None = None
    barrier_timeout: float = 30.0
    worker_timeout: float = 10.0
    backend: str = "auto"
    seed: int = 0
    tol: float = 0.0
    precision: str = "fp32"
    cuda_graphs: bool = False
    pipeline: bool = False
    wire_dtype: str = "float32"
    window_max: int | None = None

    def __post_init__(self):
        put = object.__setattr__          # frozen: normalised values are set once, here
        mode = get_mode(self.mode)
        if self.layers is not None:
            put(self, "layers", tuple(check_layers(self.layers)))
        for name in ("num_workers", "epochs", "batch_size"):
            _int_setting(self, name)
        _int_setting(self, "tau", low=0)
        auto_window = self.tau == 0
        if auto_window:
            put(self, "tau", mode.default_tau)
        self._check_window_max(mode, auto_window)
        if self.epochs > MAX_EPOCHS:
            raise SpecError("epochs", "{name} must be at most %d (a push names its epoch in 16 bits), got {v!r}"
                            % MAX_EPOCHS, v=self.epochs)
        _positive_number("learning_rate", self.learning_rate)
        if self.tau != 1 and not mode.windowed:
            raise SpecError("tau", "{name} must be 1 in {mode} mode, got {v}", mode=self.mode, v=self.tau)
        if isinstance(self.local_momentum, bool) or not (isinstance(self.local_momentum, (int, float))
                                                         and 0 <= self.local_momentum < 1):
            raise SpecError("local_momentum", "{name} must be in [0, 1), got {v!r}", v=self.local_momentum)
        if self.staleness is not None:
            _int_setting(self, "staleness", low=0)
            if not mode.bounded_staleness:
                takes = " or ".join(f"mode={m!r}" for m, o in MODES.items() if o.bounded_staleness)
                raise SpecError("staleness", "{name} applies to %s only, got {name}={v} with mode={mode!r}" % takes,
                                v=self.staleness, mode=self.mode)
        if self.ssp_slack is not None:
            _int_setting(self, "ssp_slack", low=0)
        for name in ("barrier_timeout", "worker_timeout"):
            _positive_number(name, getattr(self, name))
        if self.worker_timeout > MAX_TIMEOUT_S:            # the client's socket takes it in int32 milliseconds
            raise SpecError("worker_timeout", "{name} must be at most %d seconds, got {v!r}" % MAX_TIMEOUT_S,
                            v=self.worker_timeout)
        if isinstance(self.tol, bool) or not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol)
                                              and self.tol >= 0):
            raise SpecError("tol", "{name} must be a number >= 0 (0 = never stop early), got {v!r}", v=self.tol)
        put(self, "tol", float(self.tol))
        for name in ("cuda_graphs", "pipeline"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(name, "{name} must be True or False, got {v!r}", v=getattr(self, name))
        if self.pipeline and not mode.pipelines:
            takes = ", ".join(m for m, o in MODES.items() if o.pipelines)
            raise SpecError("pipeline", "{name} applies to the asynchronous modes (%s), not mode={mode!r}: its "
                            "rounds wait for every worker's push of the same step" % takes, mode=self.mode)
        if self.optimizer != "sgd" and not mode.pushes_gradients:     # as staleness: refused, not ignored
            takes = ", ".join(m for m, o in MODES.items() if o.pushes_gradients)
            raise SpecError("optimizer", "{name}={v!r} applies to the gradient modes (%s), not mode={mode!r}: its "
                            "server moves by the workers' elastic differences or weights, no optimizer's step"
                            % takes, v=self.optimizer, mode=self.mode)
        if self.wire_dtype != "float32" and mode.push_flag == FLAG_LOCAL_WEIGHTS:
            raise SpecError("wire_dtype", "{name}={v!r} does not apply to mode={mode!r}: it pushes its weights, "
                            "which 16-bit frames would round; use float32", v=self.wire_dtype, mode=self.mode)
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("backend", BACKEND_NAMES),
                              ("precision", PRECISIONS), ("wire_dtype", tuple(WIRE_DTYPES))):
            if getattr(self, name) not in choices:
                raise SpecError(name, "{name} must be one of {c}, got {v!r}", c=", ".join(choices),
                                v=getattr(self, name))
        put(self, "optimizer_options", dict(self.optimizer_options or {}))
        if self.alpha is None:
            put(self, "alpha", default_alpha(self.num_workers))
        else:
            _positive_number("alpha", self.alpha)
            put(self, "alpha", float(self.alpha))
        try:
            put(self, "seed", check_seed(self.seed))
        except ValueError:
            raise SpecError("seed", "{name} must be an integer, got {v!r}", v=self.seed) from None
        put(self, "learning_rate", float(self.learning_rate))

    def _check_window_max(self, mode, auto_window: bool) -> None:
        bounded = self.staleness is not None or self.ssp_slack is not None
        if self.window_max is None:
            grows = auto_window and mode.pipelines and not bounded
            object.__setattr__(self, "window_max", AUTO_WINDOW_MAX if grows else 0)
            return
        _int_setting(self, "window_max", low=0)
        if self.window_max == 0:
            return
        if not mode.pipelines:
            takes = ", ".join(m for m, o in MODES.items() if o.pipelines)
            raise SpecError("window_max", "{name} applies to the asynchronous modes (%s), not mode={mode!r}: its "
                            "rounds take one window from every worker" % takes, mode=self.mode)
        if self.window_max < self.tau:
            raise SpecError("window_max", "{name} must be 0 or at least the window tau={tau}, got {v}",
                            tau=self.tau, v=self.window_max)
        if bounded:
            raise SpecError("window_max", "{name}={v} does not combine with a staleness bound or an SSP slack "
                            "(their clocks count windows of tau steps); use 0", v=self.window_max)

    @classmethod
    def build(cls, names: dict | None = None, **settings) -> "TrainingSpec":
        """``TrainingSpec(**settings)``, with an error worded in ``names`` (setting -> the caller's name)."""
        try:
            return cls(**settings)
        except SpecError as exc:
            raise exc.relabel(names or {}) from None

    def replace(self, **changes) -> "TrainingSpec":
        """A copy with ``changes``; a window that was the old mode's own (tau 0 resolved) follows a new mode."""
        if "mode" in changes and "tau" not in changes and self.tau == self.rule.default_tau:
            changes["tau"] = 0
            changes.setdefault("window_max", None)         # and so does an adaptive window's bound
        return dataclasses.replace(self, **changes)

    @property
    def rule(self):
        """The :class:`ps.modes.Mode` object of ``mode``."""
        return get_mode(self.mode)

    @property
    def push_dtype_codes(self) -> tuple:
        """Payload dtype codes the server takes in a push: float32, sparse (a mostly-zero vector's non-zero
        entries), and the spec's 16-bit one if set."""
        code = WIRE_DTYPES[self.wire_dtype]
        return (FLOAT32, SPARSE32, RUNS32) if code == FLOAT32 else (FLOAT32, SPARSE32, RUNS32, code)

    @property
    def num_params(self) -> int:
        from core.network import param_layout

        return param_layout(self.layers)[-1].end

    def initial_weights(self):
        """He-normal weights from ``seed`` (the same vector on every backend), float32 (P,)."""
        from core import FeedForwardNetwork

        return FeedForwardNetwork(list(self.layers), backend="numpy").init_params(self.seed)


# ------------------------------------------------------------------------------------- command-line flags
def add_spec_flags(parser: argparse.ArgumentParser, mode_alias: bool = True) -> None:
    """The parameter-server flags every launcher spells alike: --trainer, --workers, --window,
    --server-optimizer, --momentum, --staleness, --insecure, --pipeline, --wire-dtype (the training loop's own
    flags, --precision and --cuda-graphs among them, are
    :func:`core.cli.add_training_flags`). mode_alias: also accept the old --mode (not where --mode is taken)."""
    from core.cli import add_flag

    add_flag(parser, "--trainer", *(["--mode"] if mode_alias else []), choices=MODE_NAMES, default="async",
             help="parameter-server mode (async = DOWNPOUR; ps/README.md compares them)")
    parser.add_argument("--workers", type=int, default=2, help="training workers (Spark: numWorkers)")
    add_flag(parser, "--window", "--tau", type=int, default=0,
             help="local steps between exchanges with the server (communicationWindow); 0: 1 in sync mode, %d in "
                  "the others, where a push may cover several windows (up to %d steps) while exchanges take more "
                  "than a fifth of a worker's time" % (DEFAULT_WINDOW, AUTO_WINDOW_MAX))
    add_flag(parser, "--server-optimizer", "--optimizer", choices=OPTIMIZERS, default="sgd",
             help="update rule the server applies to gradient pushes (sync, async)")
    parser.add_argument("--momentum", type=float, default=None,
                        help="momentum of the server optimizer momentum/nesterov and eamsgd's local Nesterov "
                             "momentum (default: 0.9 in Spark, 0.99 for eamsgd elsewhere)")
    parser.add_argument("--staleness", type=int, default=None,
                        help="async: refuse pushes computed on weights more than this many updates old")
    parser.add_argument("--tol", type=float, default=None,
                        help="stop when the relative change of the epoch's mean training loss falls below this "
                             "(default: never in ps.runner; Spark's tol default 1e-6 in the Spark app)")
    parser.add_argument("--insecure", action="store_true", help="turn CURVE off (trusted networks only)")
    parser.add_argument("--pipeline", action="store_true",
                        help="asynchronous modes: push and pull window k while window k+1 computes (staleness "
                             "one higher; pipelineExchange)")
    parser.add_argument("--wire-dtype", choices=tuple(WIRE_DTYPES), default="float32",
                        help="frames of gradient / elastic-difference pushes; the server adds them in float32 "
                             "(wireDtype)")


def spec_from_flags(args, **settings) -> TrainingSpec:
    """The spec of :func:`add_spec_flags` + :func:`core.cli.add_training_flags` flags; ``settings`` add or
    override fields. The backend is --backend's, else $FFPS_BACKEND's, else the parser's fallback."""
    options = {}
    if args.momentum is not None and args.server_optimizer in ("momentum", "nesterov"):
        options["momentum"] = args.momentum
    fields = dict(layers=args.layers, mode=args.trainer, num_workers=args.workers, epochs=args.epochs,
                  batch_size=args.batch_size, learning_rate=args.learning_rate, optimizer=args.server_optimizer,
                  optimizer_options=options, tau=args.window, staleness=args.staleness, seed=args.seed,
                  backend=backend_of(args), tol=0.0 if args.tol is None else args.tol,
                  precision=args.precision, cuda_graphs=args.cuda_graphs, pipeline=args.pipeline,
                  wire_dtype=args.wire_dtype)
    if args.momentum is not None:
        fields["local_momentum"] = args.momentum
    fields.update(settings)
    return TrainingSpec.build(FLAG_NAMES, **fields)


FLAG_NAMES = {"mode": "--trainer", "num_workers": "--workers", "epochs": "--epochs", "batch_size": "--batch-size",
              "learning_rate": "--learning-rate", "tau": "--window", "local_momentum": "--momentum",
              "staleness": "--staleness", "optimizer": "--server-optimizer", "tol": "--tol",
              "precision": "--precision", "cuda_graphs": "--cuda-graphs", "pipeline": "--pipeline",
              "wire_dtype": "--wire-dtype"}
