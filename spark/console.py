"""The app's view of a running fit: one line per epoch on stderr, or a progress bar when stderr is a terminal.

``fit`` logs each completed epoch on the ``spark.estimator`` logger (the record carries the figures, see
:func:`spark.estimator.epoch_logger`); :func:`report_epochs` hangs a handler on that logger while a fit runs.
"""
from __future__ import annotations

import contextlib
import logging
import sys

from ps.progress import epoch_line

LOGGER = "spark.estimator"
BAR_WIDTH = 24


class EpochReporter(logging.Handler):
    """Writes the estimator's epoch records to ``stream``: plain lines, or one redrawn bar on a terminal."""

    def __init__(self, stream, bar: bool):
        super().__init__(logging.INFO)
        self.stream, self.bar, self._open = stream, bar, False

    def emit(self, record: logging.LogRecord) -> None:
        figures = getattr(record, "ffps_epoch", None)
        try:
            if figures is None:
                self._end_bar()
                self.stream.write(f"ffps: {record.getMessage().removeprefix('ffps: ')}\n")
            elif self.bar:
                epochs = getattr(record, "ffps_epochs", None) or figures["epoch"]
                done = min(1.0, figures["epoch"] / epochs)
                filled = int(round(done * BAR_WIDTH))
                self.stream.write(f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
                                  f"{epoch_line(figures, epochs)}\x1b[K")
                self._open = True
            else:
                self.stream.write(f"ffps {epoch_line(figures, getattr(record, 'ffps_epochs', None))}\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001 - a broken terminal must not stop the fit
            self.handleError(record)

    def _end_bar(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False

    def close(self) -> None:
        self._end_bar()
        super().close()


@contextlib.contextmanager
def report_epochs(stream=None, bar: bool | None = None):
    """While the block runs, the estimator's epoch lines (and its stop line) go to ``stream`` (stderr), as a
    progress bar when ``bar`` (default: the stream is a terminal)."""
    stream = sys.stderr if stream is None else stream
    if bar is None:
        bar = bool(getattr(stream, "isatty", lambda: False)())
    logger = logging.getLogger(LOGGER)
    handler = EpochReporter(stream, bar)
    # the epochs; where the server listens, and the stop line; resuming; the fit's warnings
    handler.addFilter(lambda r: hasattr(r, "ffps_epoch") or r.levelno >= logging.WARNING
                      or r.getMessage().startswith(("ffps: training", "ffps: resuming")))
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
