"""Server-side optimizers on the flat float32 vector, with a learning-rate schedule. Pure NumPy, no sockets.

Every optimizer is ``step(w, g, out) -> out``: new weights from w (P,) and gradient g (P,) written into ``out``
(P,), which may be ``w`` itself or a fresh buffer (the server writes into a buffer that is not in flight, so
weights already handed to ZeroMQ are never modified). ``state_dict()`` / ``load_state_dict()`` round-trip
the state (arrays + step counter) through checkpoints.

    sgd       w' = w - lr g
    momentum  v' = mu v + g;  w' = w - lr v'             (nesterov: w' = w - lr (g + mu v'))
    adagrad   G' = G + g^2;   w' = w - lr g / (sqrt(G') + eps)
    adam      m' = b1 m + (1-b1) g; v' = b2 v + (1-b2) g^2; w' = w - lr m'/(1-b1^t) / (sqrt(v'/(1-b2^t)) + eps)
"""
from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("constant", "step", "inverse_time", "cosine")


class Schedule:
    """Learning rate at update t = 0, 1, 2, ...

    constant: lr0; step: lr0 * gamma ** (t // step_size); inverse_time: lr0 / (1 + decay * t);
    cosine: lr_min + (lr0 - lr_min) * (1 + cos(pi * min(t, total) / total)) / 2.
    """

    def __init__(self, learning_rate=0.1, kind="constant", step_size=1000, gamma=0.5, decay=1e-3,
                 total_steps=10000, lr_min=0.0):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
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


class Optimizer:
    """Base: plain SGD. Subclasses keep per-parameter state arrays in ``self.state``."""
    name = "sgd"

    def __init__(self, num_params: int, schedule: Schedule, dtype=np.float32):
        self.schedule = schedule
        self.t = 0                       # updates applied so far
        self.dtype = np.dtype(dtype)
        self.state: dict[str, np.ndarray] = {}
        self._tmp = np.empty(num_params, dtype=self.dtype)

    @property
    def lr(self) -> float:
        return self.schedule(self.t)

    def direction(self, g: np.ndarray, lr: float) -> np.ndarray:
        """The step to subtract, lr * (preconditioned) g, written into self._tmp."""
        return np.multiply(g, self.dtype.type(lr), out=self._tmp)

    def step(self, w: np.ndarray, g: np.ndarray, out: np.ndarray) -> np.ndarray:
        d = self.direction(g, self.lr)
        np.subtract(w, d, out=out)
        self.t += 1
        return out

    @property
    def screens_in_step(self) -> bool:
        """Plain float32 SGD (no state to spoil) can screen NaN/inf in the same pass as its update."""
        return type(self).direction is Optimizer.direction and self.dtype == np.float32

    # one fused pass (read w and g, write out, sum g*g) instead of a screen plus two NumPy passes: the
    # server's update of a 1M-parameter push drops from ~0.68 to ~0.24 ms (2-core VM)
    def step_screened(self, w: np.ndarray, g: np.ndarray, out: np.ndarray) -> bool:
        """``step`` unless g holds NaN/inf -> False with ``out`` scribbled on and nothing else changed.

        ``out`` must not be ``w`` (it is a scratch buffer until the caller commits it)."""
        if not self.screens_in_step:
            raise TypeError(f"{self.name} keeps state: screen the gradient before step()")
        screen = _sgd_screened()(w, g, np.float32(self.lr), out)
        if not math.isfinite(screen) and not np.isfinite(g).all():   # a finite g whose squares overflowed is fine
            return False
        self.t += 1
        return True

    def state_dict(self) -> dict:
        return {"t": self.t, "arrays": {k: v.copy() for k, v in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        missing = set(self.state) - set(sd["arrays"])
        if missing:
            raise ValueError(f"optimizer state for {self.name!r} lacks {sorted(missing)}")
        for k, v in self.state.items():
            if sd["arrays"][k].shape != v.shape:
                raise ValueError(f"optimizer state {k!r} has shape {sd['arrays'][k].shape}, expected {v.shape}")
            v[...] = sd["arrays"][k]
        self.t = int(sd["t"])


class Momentum(Optimizer):
    name = "momentum"

    def __init__(self, num_params, schedule, dtype=np.float32, momentum=0.9, nesterov=False):
        super().__init__(num_params, schedule, dtype)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.mu, self.nesterov = self.dtype.type(momentum), bool(nesterov)
        self.state["velocity"] = np.zeros(num_params, dtype=self.dtype)

    def direction(self, g, lr):
        v = self.state["velocity"]
        v *= self.mu
        v += g
        if self.nesterov:
            np.multiply(v, self.mu, out=self._tmp)
            self._tmp += g
        else:
            self._tmp[...] = v
        self._tmp *= self.dtype.type(lr)
        return self._tmp


class Adagrad(Optimizer):
    name = "adagrad"

    def __init__(self, num_params, schedule, dtype=np.float32, eps=1e-8):
        super().__init__(num_params, schedule, dtype)
        self.eps = self.dtype.type(eps)
        self.state["sum_sq"] = np.zeros(num_params, dtype=self.dtype)

    def direction(self, g, lr):
        G = self.state["sum_sq"]
        G += g * g
        np.sqrt(G, out=self._tmp)
        self._tmp += self.eps
        np.divide(g, self._tmp, out=self._tmp)
        self._tmp *= self.dtype.type(lr)
        return self._tmp


class Adam(Optimizer):
    name = "adam"

    def __init__(self, num_params, schedule, dtype=np.float32, beta1=0.9, beta2=0.999, eps=1e-8):
        super().__init__(num_params, schedule, dtype)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"adam needs 0 <= beta1, beta2 < 1, got {beta1}, {beta2}")
        self.b1, self.b2, self.eps = float(beta1), float(beta2), self.dtype.type(eps)
        self.state["m"] = np.zeros(num_params, dtype=self.dtype)
        self.state["v"] = np.zeros(num_params, dtype=self.dtype)

    def direction(self, g, lr):
        m, v, t = self.state["m"], self.state["v"], self.t + 1
        T = self.dtype.type
        m *= T(self.b1)
        m += T(1 - self.b1) * g
        v *= T(self.b2)
        v += T(1 - self.b2) * (g * g)
        np.divide(v, T(1 - self.b2 ** t), out=self._tmp)
        np.sqrt(self._tmp, out=self._tmp)
        self._tmp += self.eps
        np.divide(m, self._tmp, out=self._tmp)
        self._tmp *= T(lr / (1 - self.b1 ** t))
        return self._tmp


OPTIMIZERS = {"sgd": Optimizer, "momentum": Momentum, "nesterov": Momentum, "adagrad": Adagrad, "adam": Adam}


def _sgd_screened():
    """numba kernel out = w - lr g returning sum(g*g); lives with the other numba code in core.backends."""
    from core.backends.numba_ops import sgd_screened

    return sgd_screened


def make_optimizer(name: str, num_params: int, learning_rate=0.1, schedule="constant", dtype=np.float32,
                   **kw) -> Optimizer:
    """``make_optimizer("adam", P, 1e-3, schedule="cosine", total_steps=5000)``.

    kw: optimizer hyper-parameters (momentum, beta1, beta2, eps) and schedule ones (step_size, gamma,
    decay, total_steps, lr_min); unknown keys raise.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    sched_keys = {"step_size", "gamma", "decay", "total_steps", "lr_min"}
    sched = Schedule(learning_rate, schedule, **{k: kw.pop(k) for k in list(kw) if k in sched_keys})
    opt_keys = {"sgd": set(), "momentum": {"momentum", "nesterov"}, "nesterov": {"momentum"}, "adagrad": {"eps"},
                "adam": {"beta1", "beta2", "eps"}}[name]
    unknown = set(kw) - opt_keys
    if unknown:
        raise ValueError(f"optimizer {name!r} does not take {sorted(unknown)}")
    if name == "nesterov":
        kw["nesterov"] = True
    return OPTIMIZERS[name](int(num_params), sched, dtype=dtype, **kw)
