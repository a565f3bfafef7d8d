"""Optimizers on the flat parameter vector, with learning-rate schedules: the one home of every update rule.

The arithmetic is the backend's (``sgd_update``, ``momentum_update``, ``adagrad_update``, ``adam_update`` in
:class:`core.backends.numpy_ops.NumpyOps`, fused by numba and cupy); this module adds the schedule, the step
counter and the state arrays. Both the trainer's local steps and the parameter server use these classes.
One convention for every rule (PyTorch's), written down in ps/README.md::

    sgd       w' = w - lr g
    momentum  v' = mu v + g;  w' = w - lr v'             (nesterov: w' = w - lr (g + mu v'))
    adagrad   G' = G + g^2;   w' = w - lr g / (sqrt(G') + eps)
    adam      m' = b1 m + (1-b1) g; v' = b2 v + (1-b2) g^2; w' = w - lr m'/(1-b1^t) / (sqrt(v'/(1-b2^t)) + eps)

``step(w, g, out=None)`` writes the new weights into ``out`` (None: ``w`` in place; the server passes a buffer
that is not in flight). ``state_dict()`` / ``load_state_dict()`` round-trip the state through checkpoints.
"""
from __future__ import annotations

import copy
import enum
import math

import numpy as np

SCHEDULES = ("constant", "step", "inverse_time", "cosine")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "adam")
LOCAL_OPTIMIZERS = ("sgd", "momentum", "nesterov")   # the trainer's own steps (every backend fuses these)


class Schedule:
    """Learning rate at update t = 0, 1, 2, ...

    constant: lr0; step: lr0 * gamma ** (t // step_size); inverse_time: lr0 / (1 + decay * t);
    cosine: lr_min + (lr0 - lr_min) * (1 + cos(pi * min(t, total) / total)) / 2.
    """

    def __init__(self, learning_rate=0.1, kind="constant", step_size=1000, gamma=0.5, decay=1e-3,
                 total_steps=10000, lr_min=0.0):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        if isinstance(learning_rate, bool) or not (isinstance(learning_rate, (int, float))
                                                   and math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate!r}")
        if kind == "step" and (int(step_size) < 1 or not 0 < gamma <= 1):
            raise ValueError(f"step schedule needs step_size >= 1 and 0 < gamma <= 1, got {step_size}, {gamma}")
        if kind == "cosine" and int(total_steps) < 1:
            raise ValueError(f"cosine schedule needs total_steps >= 1, got {total_steps}")
        if kind == "inverse_time" and decay < 0:
            raise ValueError(f"inverse_time schedule needs decay >= 0, got {decay}")
        self.lr0, self.kind = float(learning_rate), kind
        self.step_size, self.gamma, self.decay = int(step_size), float(gamma), float(decay)
        self.total_steps, self.lr_min = int(total_steps), float(lr_min)

    def __call__(self, t: int) -> float:
        if self.kind == "constant":
            return self.lr0
        if self.kind == "step":
            return self.lr0 * self.gamma ** (t // self.step_size)
        if self.kind == "inverse_time":
            return self.lr0 / (1.0 + self.decay * t)
        frac = min(t, self.total_steps) / self.total_steps
        return self.lr_min + (self.lr0 - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * frac))


class Verdict(enum.Enum):
    """What a checked update did; true only when it was applied."""
    APPLIED = "applied"
    BAD_GRADIENT = "gradient"    # the gradient held NaN/inf: nothing changed
    BAD_RESULT = "result"        # a finite gradient gave non-finite weights: rolled back, nothing changed

    def __bool__(self) -> bool:
        return self is Verdict.APPLIED


class Optimizer:
    """Plain SGD; subclasses keep per-parameter state arrays (on the backend) in ``self.state``."""
    name = "sgd"

    def __init__(self, num_params: int, schedule: Schedule, *, ops=None, dtype=np.float32):
        if ops is None:
            from .backends import get_backend
            ops = get_backend("numpy")
        self.ops, self.schedule, self.dtype = ops, schedule, np.dtype(dtype)
        self.num_params = int(num_params)
        self.t = 0                       # updates applied so far
        self.state: dict = {}

    @property
    def lr(self) -> float:
        return self.schedule(self.t)

    def _zeros(self):
        return self.ops.zeros((self.num_params,), self.dtype)

    def _update(self, w, g, lr, out):
        return self.ops.sgd_update(w, g, lr, out=out)

    @classmethod
    def steady_gain(cls, **hyper) -> float:
        """How many ``lr * g`` one update moves the weights once the rule has seen the same gradient g for long:
        1 for SGD. Rules that rescale each coordinate by its own history (adagrad, adam) have no such factor:
        1 too."""
        return 1.0

    def step(self, w, g, out=None):
        """New weights from w (P,) and gradient g (P,) into ``out`` (None: in place on w) -> out."""
        out = self._update(w, g, self.schedule(self.t), out)     # not self.lr: a hot path of small steps
        self.t += 1
        return out

    def step_accumulating(self, w, g, acc):
        """``acc += g`` and ``step(w, g)`` in place: a worker's local step inside a parameter-server window (acc
        sums the window's gradients). Plain SGD does both in one pass where the backend fuses them (numba)."""
        if self.plain_sgd:
            self.ops.sgd_update_accumulate(w, g, self.schedule(self.t), acc)
            self.t += 1
            return w
        acc += g
        return self.step(w, g)

    def step_rows(self, w, g, rows, width, tail, acc=None):
        """``step_accumulating`` (``acc`` optional) on rows ``rows`` of the (-1, width) block ``w[:tail]`` and
        on ``w[tail:]``, where g is zero in the block's other rows (a sparse batch's gradient: the first layer's
        rows of its columns, then the later layers): plain SGD touches just those. Plain SGD only."""
        if not self.plain_sgd:
            raise TypeError(f"{self.name} keeps state for every entry: step the whole vector")
        self.ops.sgd_update_rows(w, g, rows, width, tail, self.schedule(self.t), acc)
        self.t += 1
        return w

    def step_entries_checked(self, w, index, values) -> Verdict:
        """A step in place on the entries ``index`` of ``w``, the gradient ``values`` there and zero elsewhere
        (a sparse push), checked as :meth:`step_checked` (BAD_GRADIENT, BAD_RESULT) before anything is written:
        O(k), not a pass over the vector, with the float32 arithmetic of the whole step. Rules whose zero
        gradient entries change nothing only (``sparse_exact``: SGD, adagrad)."""
        if not self.sparse_exact:
            raise TypeError(f"{self.name} keeps state for every entry: step the whole vector")
        if self.plain_sgd:              # no state: one screened pass over the entries, nothing gathered
            bad = self.ops.sgd_entries_screened(w, index, values, w.dtype.type(self.schedule(self.t)))
            if bad is not None:
                return Verdict.BAD_GRADIENT if bad == "gradient" else Verdict.BAD_RESULT
            self.t += 1
            return Verdict.APPLIED
        if not self.ops.all_finite(values):
            return Verdict.BAD_GRADIENT
        with np.errstate(over="ignore", invalid="ignore"):      # an overflow is looked for below
            new, state = self._entries_update(w[index], {k: v[index] for k, v in self.state.items()}, values,
                                              w.dtype.type(self.schedule(self.t)))
        if not self.ops.all_finite(new):
            return Verdict.BAD_RESULT
        w[index] = new
        for k, v in state.items():
            self.state[k][index] = v
        self.t += 1
        return Verdict.APPLIED

    def _entries_update(self, w, state, g, lr):
        """The rule on gathered entries: (new weights, new state arrays) from copies ``w`` and ``state``. Plain
        SGD steps its entries in ``ops.sgd_entries_screened``; a stateful rule that is ``sparse_exact`` defines
        this."""
        raise NotImplementedError(f"{self.name} is sparse_exact but does not step gathered entries")

    def warm_up(self) -> None:
        """Run this rule's checked update once, on a twin over 8 zeros, so that a backend which compiles its kernels
        on first use is ready before the first real update (numba: ~0.7 s for a process's first kernel, which the
        server's first push, and every worker waiting on it, paid). The arrays' types are the server's: writable
        float32 vectors (a received frame's view is writable; numba compiles a read-only one apart). So few
        values take the serial kernels: no parallel region is opened, so a caller may run this beside other
        work. This optimizer's state and step counter are not touched."""
        twin = copy.copy(self)
        twin.num_params, twin.t = 8, 0
        twin.state = {k: twin._zeros() for k in self.state}
        twin.__dict__.pop("_backup", None)
        twin.step_checked(twin._zeros(), twin._zeros(), twin._zeros())

    # True for plain SGD (this class) and False for every subclass. Plain SGD has no state to spoil, so it can
    # screen NaN/inf in the same pass as its update (every subclass keeps state, or may, so it screens before
    # step()), and its update fuses with a window's gradient sum. An attribute, not a property: the server reads
    # it on every push.
    plain_sgd = True

    # True where a zero gradient entry leaves its weight and state exactly as they are (SGD, adagrad), so an
    # update changes only the entries a sparse gradient carries; momentum and adam move every entry they ever saw.
    sparse_exact = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.plain_sgd = False

    def step_screened(self, w, g, out) -> Verdict:
        """``step`` into ``out`` unless g holds NaN/inf (BAD_GRADIENT) or the new weights would not be finite
        (BAD_RESULT); either way ``out`` is scribbled on and nothing else changes.

        ``out`` must not be ``w`` (it is a scratch buffer until the caller commits it). One fused pass on the
        numba backend: the server's update of a 1M-parameter push drops from ~0.68 to ~0.24 ms (2-core VM)."""
        if not self.plain_sgd:
            raise TypeError(f"{self.name} keeps state: screen the gradient before step()")
        problem = self.ops.sgd_update_screened(w, g, self.lr, out)
        if problem is not None:
            return Verdict(problem)
        self.t += 1
        return Verdict.APPLIED

    def step_checked(self, w, g, out) -> Verdict:
        """``step`` into ``out`` (not ``w``), rolled back when the new weights are not finite: BAD_RESULT, with
        the state and the step counter as they were (their arrays are copied first: a pass per state array)."""
        if self.plain_sgd:
            return self.step_screened(w, g, out)
        saved = self._saved_state()
        self.step(w, g, out)
        if self.ops.all_finite(out):
            return Verdict.APPLIED
        for k, v in self.state.items():
            v[...] = saved[k]
        self.t -= 1
        return Verdict.BAD_RESULT

    def _saved_state(self) -> dict:
        backup = self.__dict__.setdefault("_backup", {k: self._zeros() for k in self.state})
        for k, v in self.state.items():
            backup[k][...] = v
        return backup

    def state_dict(self) -> dict:
        """{"t": updates so far, "arrays": host copies of the state arrays}."""
        return {"t": self.t, "arrays": {k: self.ops.to_host(v) for k, v in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        missing = set(self.state) - set(sd["arrays"])
        if missing:
            raise ValueError(f"optimizer state for {self.name!r} lacks {sorted(missing)}")
        for k, v in self.state.items():
            if tuple(sd["arrays"][k].shape) != tuple(v.shape):
                raise ValueError(f"optimizer state {k!r} has shape {sd['arrays'][k].shape}, expected {v.shape}")
            v[...] = self.ops.asarray(sd["arrays"][k], dtype=self.dtype)
        self.t = int(sd["t"])


class Momentum(Optimizer):
    name = "momentum"
    sparse_exact = False

    def __init__(self, num_params, schedule, *, momentum=0.9, nesterov=False, **kw):
        super().__init__(num_params, schedule, **kw)
        if isinstance(momentum, bool) or not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.state["velocity"] = self._zeros()

    def _update(self, w, g, lr, out):
        return self.ops.momentum_update(w, self.state["velocity"], g, lr, self.momentum, self.nesterov, out=out)

    @classmethod
    def steady_gain(cls, momentum=0.9, nesterov=False, **_) -> float:
        """v settles at g / (1 - mu): a step of lr g / (1 - mu), with or without Nesterov's look-ahead."""
        return 1.0 / (1.0 - float(momentum))


class Adagrad(Optimizer):
    name = "adagrad"

    def __init__(self, num_params, schedule, *, eps=1e-8, **kw):
        super().__init__(num_params, schedule, **kw)
        self.eps = float(eps)
        self.state["sum_sq"] = self._zeros()

    def _update(self, w, g, lr, out):
        return self.ops.adagrad_update(w, self.state["sum_sq"], g, lr, self.eps, out=out)

    def _entries_update(self, w, state, g, lr):
        """adagrad_update's steps, in its float32 order."""
        t = w.dtype.type
        state["sum_sq"] += g * g
        step = np.sqrt(state["sum_sq"])
        step += t(self.eps)
        np.divide(g, step, out=step)
        step *= lr
        w -= step
        return w, state


class Adam(Optimizer):
    name = "adam"
    sparse_exact = False

    def __init__(self, num_params, schedule, *, beta1=0.9, beta2=0.999, eps=1e-8, **kw):
        super().__init__(num_params, schedule, **kw)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"adam needs 0 <= beta1, beta2 < 1, got {beta1}, {beta2}")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.state["m"] = self._zeros()
        self.state["v"] = self._zeros()

    def _update(self, w, g, lr, out):
        return self.ops.adam_update(w, self.state["m"], self.state["v"], g, lr, self.beta1, self.beta2, self.eps,
                                    self.t + 1, out=out)


_CLASSES = {"sgd": Optimizer, "momentum": Momentum, "nesterov": Momentum, "adagrad": Adagrad, "adam": Adam}
_HYPER = {"sgd": set(), "momentum": {"momentum", "nesterov"}, "nesterov": {"momentum"}, "adagrad": {"eps"},
          "adam": {"beta1", "beta2", "eps"}}
_SCHEDULE_KEYS = {"step_size", "gamma", "decay", "total_steps", "lr_min"}


def make_optimizer(name: str, num_params: int, learning_rate=0.1, schedule="constant", *, ops=None,
                   dtype=np.float32, **kw) -> Optimizer:
    """``make_optimizer("adam", P, 1e-3, schedule="cosine", total_steps=5000)``.

    ops: the backend whose arrays the optimizer updates (default: the NumPy reference); kw: optimizer
    hyper-parameters (momentum, beta1, beta2, eps) and schedule ones (step_size, gamma, decay, total_steps,
    lr_min); unknown keys raise.
    """
    if name not in _CLASSES:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
    sched = Schedule(learning_rate, schedule, **{k: kw.pop(k) for k in list(kw) if k in _SCHEDULE_KEYS})
    unknown = set(kw) - _HYPER[name]
    if unknown:
        raise ValueError(f"optimizer {name!r} does not take {sorted(unknown)}")
    if name == "nesterov":
        kw["nesterov"] = True
    return _CLASSES[name](int(num_params), sched, ops=ops, dtype=dtype, **kw)


def steady_gain(name: str, options: dict | None = None) -> float:
    """:meth:`Optimizer.steady_gain` of optimizer ``name`` with ``options`` (as make_optimizer takes them;
    schedule keys are ignored)."""
    hyper = {k: v for k, v in (options or {}).items() if k in _HYPER[name]}
    return _CLASSES[name].steady_gain(**hyper)


def local_optimizer(net, name="sgd", learning_rate=0.1, momentum=0.9) -> Optimizer:
    """The trainer's optimizer for ``net``'s parameters on its backend: one of LOCAL_OPTIMIZERS, updating the
    device vector in place (``step(w, grad)``)."""
    if name not in LOCAL_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {LOCAL_OPTIMIZERS}, got {name!r}")
    hyper = {} if name == "sgd" else {"momentum": momentum}
    return make_optimizer(name, net.num_params, learning_rate, ops=net.ops, dtype=net.dtype, **hyper)
