"""What a fit did, epoch by epoch and worker by worker: ``model.summary`` of a fitted model.

    s = model.summary                  # FeedForwardNetworkPSTrainingSummary
    s.objectiveHistory                 # [mean training loss of epoch 1, 2, ...], like MLlib's
    s.accuracyHistory, s.totalIterations, s.trainingSeconds
    s.stopReason, s.stopMessage        # "tol" (converged early) or "maxIter", and why in words
    s.epochs(); s.workers(); s.history; s.toPandas()
    s.plot("curves.png")               # loss and accuracy vs time or passes (pip install ffps[plot])

Built from ``model.trainingStats``: the server's record of every applied push and each worker's stats. Push
``s`` of a worker covers its local steps (s-1)*tau+1 .. min(s*tau, epochs*steps_per_epoch) (the last window
may be shorter), so it belongs to the epoch of its last step (a window across an epoch boundary counts in
the later epoch; an epoch in which no window ends has no entry). Steps keep counting across relaunched
attempts, so records of every attempt land in their epoch. A push's loss and accuracy are means over its
rows, so an epoch's value is the row-weighted mean of its pushes over all workers: the mean training loss
over one pass, measured on the weights each worker had while it trained (not a loss of the final model).
The server keeps its last 100,000 records; a longer fit's summary starts at the first epoch still recorded.
"""
from __future__ import annotations

import math

from .metrics import FeedForwardNetworkPSSummary

_PLOT_HINT = "pip install ffps[plot]"
PASSES_BELOW_S = 5.0    # a fit whose updates all fell within this many seconds is plotted against passes


def _weighted(records, key):
    rows = sum(r["batch_size"] for r in records)
    return sum(r[key] * r["batch_size"] for r in records) / rows if rows else float("nan")


class FeedForwardNetworkPSTrainingSummary(FeedForwardNetworkPSSummary):
    """Training summary of one ``FeedForwardNetworkPSClassifier.fit`` (see the module docstring). Its
    classification figures (accuracy, weightedPrecision, ... of :class:`spark.metrics.FeedForwardNetworkPSSummary`)
    are the final model's on the training frame, as MLlib's are; ``predictions`` makes that frame when first
    asked for. ``model.summary()`` works too (MLlib's MLPC has summary as a method)."""

    def __init__(self, stats: dict, predictions=None, label_col: str = "label", prediction_col: str = "prediction"):
        super().__init__(predictions if predictions is not None else self._no_frame, label_col, prediction_col)
        self._stats = stats
        self._workers = {int(k): v for k, v in stats["workers"].items()}
        missing = [w for w, v in self._workers.items() if "steps_per_epoch" not in v or "epochs" not in v]
        if missing:
            raise ValueError(f"training stats of workers {missing} have no steps_per_epoch/epochs: they come "
                             f"from an older ffps; refit the model to get a summary")
        latest = {}                      # (worker, step) -> record; a re-applied step counts once, the last
        for r in stats["history"]:
            latest[(int(r["worker"]), int(r["step"]))] = r
        self._history = [dict(r, epoch=self._epoch_of(r)) for r in latest.values()]
        self._history.sort(key=lambda r: r["time"])
        by_epoch: dict[int, list] = {}
        for r in self._history:
            by_epoch.setdefault(r["epoch"], []).append(r)
        self._epochs = [{"epoch": e, "loss": _weighted(rs, "loss"), "accuracy": _weighted(rs, "accuracy"),
                         "samples": sum(r["batch_size"] for r in rs), "seconds_end": max(r["time"] for r in rs)}
                        for e, rs in sorted(by_epoch.items())]

    @staticmethod
    def _no_frame():
        raise ValueError("this training summary has no training frame to compute classification figures on; "
                         "use model.evaluate(df)")

    def __call__(self):
        return self

    def _epoch_of(self, record) -> int:
        w = self._workers[int(record["worker"])]
        # the window's last local step; the final window may be shorter than tau
        last = min(int(record["step"]) * int(w["tau"]), int(w["epochs"]) * int(w["steps_per_epoch"]))
        return math.ceil(last / int(w["steps_per_epoch"]))

    # ------------------------------------------------------------------ MLlib-style attributes
    @property
    def objectiveHistory(self) -> list[float]:
        """Mean training loss (NLL) of each epoch, first to last."""
        return [e["loss"] for e in self._epochs]

    @property
    def accuracyHistory(self) -> list[float]:
        """Mean training accuracy of each epoch (of the mini-batches as they were trained)."""
        return [e["accuracy"] for e in self._epochs]

    @property
    def totalIterations(self) -> int:
        """Epochs completed (passes over the data): the last epoch that any push reached."""
        return self._epochs[-1]["epoch"] if self._epochs else 0

    @property
    def trainingSeconds(self) -> float:
        """Seconds the training stage(s) took on the driver, retries included."""
        return float(self._stats["seconds"])

    @property
    def stopReason(self) -> str:
        """Why training stopped: ``"tol"`` (the relative change of the epoch's mean training loss fell below
        tol: see :attr:`stopMessage`) or ``"maxIter"`` (every pass ran)."""
        return "tol" if self._convergence().get("stop_reason") == "tol" else "maxIter"

    @property
    def stopMessage(self) -> str:
        """Why training stopped, in words (the server's decision at the epoch boundary)."""
        return self._convergence().get("message") or f"ran {self.totalIterations} epochs (maxIter)"

    def _convergence(self) -> dict:
        return self._stats.get("server", {}).get("convergence") or {}

    @property
    def history(self) -> list[dict]:
        """The server's records of the applied pushes, oldest first, each with its ``epoch`` added.

        Keys: time (seconds since the server started), worker, attempt, step, version, loss, accuracy,
        batch_size (rows of the push), staleness, samples_per_s, epoch.
        """
        return [dict(r) for r in self._history]

    # ------------------------------------------------------------------ tables
    def epochs(self) -> list[dict]:
        """One dict per epoch: epoch, loss, accuracy, samples (rows applied), seconds_end (time of its last push)."""
        return [dict(e) for e in self._epochs]

    def workers(self) -> list[dict]:
        """One dict per worker: pushes, attempts, samples, loss/accuracy over its last epoch, samples_per_s
        (applied rows per second between its first and last push), staleness mean/max, stale (pushes the
        server rejected as too stale in the final attempt), seconds (its final attempt's training time)."""
        out = []
        for w, stats in sorted(self._workers.items()):
            rs = [r for r in self._history if int(r["worker"]) == w]
            last = [r for r in rs if r["epoch"] == rs[-1]["epoch"]]
            samples = sum(r["batch_size"] for r in rs)
            span = rs[-1]["time"] - rs[0]["time"] if len(rs) > 1 else 0.0
            out.append({
                "worker": w, "pushes": len(rs), "attempts": len({r["attempt"] for r in rs}), "samples": samples,
                "loss": _weighted(last, "loss"), "accuracy": _weighted(last, "accuracy"),
                "samples_per_s": (samples - rs[0]["batch_size"]) / span if span > 0 else None,
                "staleness_mean": sum(r["staleness"] for r in rs) / len(rs) if rs else None,
                "staleness_max": max((r["staleness"] for r in rs), default=None),
                "stale": stats.get("stale", 0), "seconds": stats.get("seconds")})
        return out

    def toPandas(self):
        """The history as a pandas DataFrame, one row per applied push."""
        import pandas as pd

        return pd.DataFrame(self._history, columns=["time", "worker", "attempt", "step", "epoch", "version",
                                                    "loss", "accuracy", "batch_size", "staleness",
                                                    "samples_per_s"])

    def __repr__(self):
        last = f", final loss {self._epochs[-1]['loss']:.4f}" if self._epochs else ""
        return (f"FeedForwardNetworkPSTrainingSummary({self.totalIterations} epochs, {len(self._workers)} workers, "
                f"{self.trainingSeconds:.1f}s{last})")

    # ------------------------------------------------------------------ plot
    def plot(self, path):
        """Write a PNG: training loss (log scale) and accuracy, one line per worker and the per-epoch means as
        markers -> ``path``. The x axis is seconds since the first applied update, or passes over the data when
        all updates fell within ``PASSES_BELOW_S`` seconds (a small fit's time axis shows only start-up noise).
        Needs matplotlib (``pip install ffps[plot]``)."""
        try:   # the object-oriented API renders with Agg and leaves pyplot's global backend alone
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(f"summary.plot() needs matplotlib, which is not installed: {_PLOT_HINT}") from exc
        fig = Figure(figsize=(9, 6.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax_loss, ax_acc = fig.subplots(2, 1, sharex=True)
        x_of, x_epoch, x_label = self._plot_axis()
        for w in sorted(self._workers):
            rs = [r for r in self._history if int(r["worker"]) == w]
            x = [x_of(r) for r in rs]
            ax_loss.plot(x, [r["loss"] for r in rs], lw=0.8, alpha=0.7, label=f"worker {w}")
            ax_acc.plot(x, [r["accuracy"] for r in rs], lw=0.8, alpha=0.7, label=f"worker {w}")
        x_end = [x_epoch(e) for e in self._epochs]
        ax_loss.plot(x_end, self.objectiveHistory, "ko", ms=4, label="epoch mean")
        ax_acc.plot(x_end, self.accuracyHistory, "ko", ms=4, label="epoch mean")
        if all(r["loss"] > 0 for r in self._history):
            ax_loss.set_yscale("log")
        ax_loss.set_ylabel("training loss (NLL)")
        ax_acc.set_ylabel("training accuracy")
        ax_acc.set_xlabel(x_label)
        server = self._stats.get("server", {})
        stopped = " (stopped by tol)" if self.stopReason == "tol" else ""
        ax_loss.set_title(f"ffps {server.get('mode', '')} training: {len(self._workers)} workers, "
                          f"{self.totalIterations} epochs{stopped}, {self.trainingSeconds:.1f} s")
        for ax in (ax_loss, ax_acc):
            ax.grid(True, alpha=0.3)
            ax.legend(loc="best", fontsize="small")
        fig.savefig(path, dpi=110)
        return path

    def _plot_axis(self):
        """(x of a push record, x of an epoch's mean, axis label). Passes: a push sits at the end of its window
        (its last local step / steps per pass), an epoch's mean at the end of its pass. Seconds: from the first
        applied update (the server's clock starts with Spark's start-up), an epoch's mean at the time its last
        push was applied."""
        times = [r["time"] for r in self._history]
        t0 = min(times, default=0.0)
        if times and max(times) - t0 >= PASSES_BELOW_S:
            return (lambda r: r["time"] - t0), (lambda e: e["seconds_end"] - t0), "seconds since the first update"

        def passes(r):
            w = self._workers[int(r["worker"])]
            spe = int(w["steps_per_epoch"])
            return min(int(r["step"]) * int(w["tau"]), int(w["epochs"]) * spe) / spe
        return passes, (lambda e: float(e["epoch"])), "passes over the data"
