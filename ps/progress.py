"""One live progress line on the driver: rich when importable, else a plain log line every few seconds."""
from __future__ import annotations

import logging
import math
import sys
import time

log = logging.getLogger("ps.progress")


def summary_line(stats: dict) -> str:
    """'v120 applied 480 rejected 0 | w0 loss 0.31 acc 0.91 812/s st 1 | w1 ...' from Engine.stats()."""
    parts = [f"v{stats['version']} applied {stats['applied']} rejected {stats['rejected_total']}"]
    for wid, w in stats["workers"].items():
        loss = "-" if not math.isfinite(w["loss"]) else f"{w['loss']:.3f}"
        acc = "-" if not math.isfinite(w["accuracy"]) else f"{w['accuracy']:.3f}"
        parts.append(f"w{wid} loss {loss} acc {acc} {w['samples_per_s']:.0f}/s st {w['staleness']}")
    return " | ".join(parts)


def epoch_line(f: dict, epochs: int | None = None) -> str:
    """'epoch 3/40 loss 0.2513 accuracy 0.9312 48210 samples/s staleness 0.6' from one completed epoch's figures
    (:meth:`ps.convergence.ConvergenceMonitor.pop_completed`)."""
    rate = "-" if f.get("samples_per_s") is None else f"{f['samples_per_s']:.0f}"
    of = f"/{epochs}" if epochs else ""
    return (f"epoch {f['epoch']}{of} loss {f['loss']:.4f} accuracy {f['accuracy']:.4f} {rate} samples/s "
            f"staleness {f['staleness']:.1f}")


class ProgressLine:
    """``update(stats)`` at any rate; redraws at most every ``interval`` s (plain logging: every 5 s)."""

    def __init__(self, enabled: bool = True, interval: float = 0.25):
        self.enabled, self.interval, self._last, self._live = enabled, interval, 0.0, None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            self._text = Text
            self._live = Live(Text("parameter server starting"), console=Console(file=sys.stderr),
                              refresh_per_second=4, transient=False)
            self._live.start()
        except ImportError:
            self.interval = max(interval, 5.0)

    def update(self, stats: dict, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        line = summary_line(stats)
        if self._live is not None:
            self._live.update(self._text(line))
        else:
            log.info("%s", line)

    def close(self, stats: dict | None = None) -> None:
        if stats is not None:
            self.update(stats, force=True)
        if self._live is not None:
            self._live.stop()
            self._live = None
