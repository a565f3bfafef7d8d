"""``FeedForwardNetworkPSClassifier``: the Estimator whose ``fit`` trains on a parameter server.

    clf = FeedForwardNetworkPSClassifier(layers=[64, 100, 10], maxIter=30, stepSize=0.1, blockSize=64,
                                         seed=1, mode="async", numWorkers=2, backend="auto")
    model = clf.fit(df)          # featuresCol: Vector, labelCol: numeric class index 0..C-1
    model.transform(df)          # + rawPrediction (centred logits), probability (softmax), prediction (double)

``fit`` checks the params (into one :class:`ps.spec.TrainingSpec`) and the schema before any job, starts the
parameter server on the driver, runs one barrier stage of ``numWorkers`` tasks (relaunched by the driver after
a failure) whose tasks check the data they read before any update, and returns the server's final weights in
a model. Training stops after ``maxIter`` passes, or earlier when the relative change of the epoch's mean
training loss falls below ``tol`` (the server decides at each epoch boundary; ``model.summary.stopReason``
says which). One log line per epoch goes to this module's logger. On a Spark Connect session the same stage
runs through DataFrame APIs only (:mod:`spark.session`); the parameter server runs in the client process.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Estimator
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable

from . import training
from .data import (batches_bounded_while_fitting, check_output_columns, check_schema, check_width, prepared,
                   reads_arrays, rows_cut)
from .gpu import unused_gpu_warning
from .model import FeedForwardNetworkPSClassificationModel, TrainingFrame
from .params import (COLUMN_PARAMS, TRAINING_PARAMS, FeedForwardNetworkPSParams, add_setters, initial_weights,
                     keyword_signature, output_columns, ps_bind, training_spec)
from .persistence import EstimatorReader
from .session import (barrier_chain_problem, conf, connect_server_host, local_task_slots, master, num_partitions,
                      require_connect_support)
from .tracking import log_fit

log = logging.getLogger("spark.estimator")

_ARGUMENTS = tuple(COLUMN_PARAMS) + TRAINING_PARAMS


class FeedForwardNetworkPSClassifier(Estimator, FeedForwardNetworkPSParams, DefaultParamsReadable,
                                     DefaultParamsWritable):
    """Feed-forward network classifier (Dense -> ReLU -> ... -> softmax) trained by a parameter server.

    Same column conventions as Spark's MultilayerPerceptronClassifier. ``maxIter`` = passes over the data,
    ``blockSize`` = mini-batch rows per worker step, ``stepSize`` = learning rate. See ``explainParams()``.
    Keyword arguments only: every Param by name (the signature lists them with their defaults).

    ``liveServerLine`` (an attribute, not a Param: it is about this console, not the model): the parameter
    server's live per-worker line on stderr; None (default) = when stderr is a terminal, False = never (the
    app turns it off: its epoch bar takes the line).
    """

    liveServerLine = None

    @keyword_only
    def __init__(self, **kwargs):
        super().__init__()
        self.setParams(**kwargs)

    @classmethod
    def read(cls):
        """A reader that loads a saved estimator only (a saved model's path is refused by name)."""
        return EstimatorReader(cls)

    @keyword_only
    def setParams(self, **kwargs):
        """Sets params for this classifier (keyword arguments only; None leaves a Param as it is)."""
        unknown = sorted(set(kwargs) - set(_ARGUMENTS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {unknown}")
        return self._set(**{k: v for k, v in kwargs.items() if v is not None})

    # ------------------------------------------------------------------ fit
    def _fit(self, dataset):
        spec = training_spec(self)
        features_col, label_col = self.getFeaturesCol(), self.getLabelCol()
        check_schema(dataset.schema, features_col, label_col)
        check_output_columns(dataset.columns, output_columns(self))    # the model could not score its own frame
        require_connect_support(dataset)
        spark = dataset.sparkSession
        check_width(dataset.schema, features_col, spec.layers[0], "layers[0]")
        check_task_slots(spark, spec.num_workers)
        with batches_bounded_while_fitting(spark, features_col, spec.layers[0]):
            return self._fit_bounded(dataset, spec, spark)

    def _fit_bounded(self, dataset, spec, spark):
        """The fit's jobs, with Arrow batches the JVM can send (:func:`spark.data.batches_bounded_while_fitting`)."""
        bind = ps_bind(master(spark), conf(spark, "spark.driver.host"), self.getPsHost(), self.getPsPort(),
                       connect_server_host(spark))
        nw = spec.num_workers
        # one partition per worker: shuffled (round-robin) unless the frame already has numWorkers partitions,
        # as xgboost.spark does; a frame whose lineage Spark will not run in a barrier stage (coalesce, union,
        # limit) is shuffled too, up front where its RDDs show it, else after Spark refuses the stage. Spark
        # Connect shows no partition count without a job: shuffled there.
        shuffle = self.getForceRepartition() or num_partitions(dataset) != nw
        chain = None if shuffle else barrier_chain_problem(dataset)
        reshuffled = None if chain is None else _shuffling(UNRUNNABLE.format(chain), nw)
        shuffle = shuffle or chain is not None
        try:
            with FITS.running() as fit:
                model, stats = self._train(self._prepared(dataset, shuffle), spec, bind, shuffled=shuffle, fit=fit)
        except (training.UnsupportedBarrierChain, training.UnevenPartitions) as exc:
            if shuffle:
                if isinstance(exc, training.UnevenPartitions):   # a round-robin shuffle left one empty
                    raise ValueError(f"{exc} after shuffling the rows into numWorkers={nw} partitions; use fewer "
                                     f"workers") from None
                raise
            reshuffled = _shuffling(str(exc) if isinstance(exc, training.UnevenPartitions) else
                                    UNRUNNABLE.format(exc), nw)
            shuffle = True
            with FITS.running() as fit:
                model, stats = self._train(self._prepared(dataset, True), spec, bind, shuffled=True, fit=fit)
        counts = stats["workers"][0]["partition_rows"]                 # every worker holds the gathered counts
        stats["rows"] = sum(counts)
        # round modes cut every shard to the smallest: rows of a partition kept as it is (under 1 %), or the
        # remainder of a round-robin shuffle, that no worker trains on
        stats["unused_rows"] = rows_cut(counts) if spec.rule.equal_shards else 0
        if stats["unused_rows"]:
            log.info("ffps: mode=%r trains each worker on as many rows as the smallest partition holds: %d of %d "
                     "rows unused (rows per partition: %s%s)", spec.mode, stats["unused_rows"], sum(counts), counts,
                     "" if shuffle else "; forceRepartition=True deals them out evenly")
        stats["reshuffled"] = reshuffled
        model.trainingStats = stats
        model._training_frame = TrainingFrame(dataset)   # the summary's classification figures, if asked
        model._resetUid(self.uid)
        model = self._copyValues(model)
        log_fit(self, model)      # to MLflow when wanted (spark/tracking.py); a logging failure only warns
        return model

    def _prepared(self, dataset, shuffle):
        """(features Vector, or array<float> where :func:`spark.data.reads_arrays`; label) under private names,
        in numWorkers partitions when ``shuffle``.

        Nothing is cached: the training stage reads the rows once into NumPy (a relaunched stage reads the
        shuffle's output again), and its tasks check the data as they read it.
        """
        arrays = reads_arrays(dataset.sparkSession, self.getLayers()[0])
        prep = prepared(dataset, self.getFeaturesCol(), self.getLabelCol(), arrays)
        return prep.repartition(self.getNumWorkers()) if shuffle else prep

    def _train(self, prep, spec, bind, shuffled: bool, fit: int | None = None):
        from ps.server import insecure_warning
        from ps.shards import auto_shards, make_server

        checkpoint_dir = self.getCheckpointDir() or None
        w0 = initial_weights(self, spec)
        server = make_server(w0, spec=spec, shards=self.getPsShards() or auto_shards(w0.shape[0]), bind=bind,
                             secure=self.getSecure(), checkpoint_dir=checkpoint_dir, resume=self.getResume(),
                             checkpoint_every=self.getCheckpointInterval() if checkpoint_dir else None,
                             progress=self.liveServerLine, on_epoch=epoch_logger(spec.epochs, fit))
        first_attempt = server.next_attempt()
        if server.resumed_from:
            log.info("ffps: resuming from %s (version %d)", server.resumed_from, server.version)
        try:
            server.start()
        except OSError as exc:
            if self.getPsPort() and FITS.concurrent():     # CrossValidator(parallelism=2) under a fixed psPort
                raise OSError(f"{exc}; another ffps fit runs in this process (a CrossValidator or "
                              f"TrainValidationSplit with parallelism > 1, a thread), and each fit's server needs a "
                              f"port of its own: leave psPort at 0 (any free port), or fit one at a time") from exc
            raise
        cfg = server.client_config()
        features_col, label_col = self.getFeaturesCol(), self.getLabelCol()   # plain locals: pickled to executors

        def make_fn(attempt):
            return training.make_train_function(cfg, attempt=attempt, features_col=features_col,
                                                label_col=label_col, may_reshuffle=not shuffled)

        log.info("ffps: training %s on %d workers, mode=%s, server %s", list(spec.layers), spec.num_workers,
                 spec.mode, server.address)
        t0 = time.perf_counter()
        try:
            workers, attempts = training.run_barrier_stage(
                prep, make_fn, num_workers=spec.num_workers, max_retries=self.getMaxRetries(),
                use_gpu=self.getUseGpu() or spec.backend == "cupy", server=server, first_attempt=first_attempt)
        except BaseException:
            problem = stop_keeping_the_weights(server)
            if problem:                          # the training error is the one raised
                log.warning("ffps: %s", problem)
            raise
        checkpoint_problem = stop_keeping_the_weights(server)
        if checkpoint_problem:
            log.warning("ffps: %s. The trained model is returned; save it with model.save(path)", checkpoint_problem)
        seconds = time.perf_counter() - t0
        w = server.weights()
        if not np.isfinite(w).all():
            raise FloatingPointError(f"training diverged (non-finite weights) with stepSize={spec.learning_rate}; "
                                     f"lower stepSize")
        stats = {"seconds": seconds, "attempts": attempts, "workers": workers, "server": server.stats(),
                 "history": server.history(),
                 "resumed_from": {"path": server.resumed_from, "attempt": first_attempt}
                 if server.resumed_from else None}
        log.info("ffps: training stopped: %s", stats["server"]["convergence"]["message"] or "all workers finished")
        warning = not_learned(stats["server"]["convergence"]["completed"], spec.layers[-1], spec.learning_rate)
        declined = any(w.get("gpu_declined") for w in workers.values())
        no_gpu = unused_gpu_warning(spec.backend, workers) if self.getUseGpu() or declined else None
        insecure = None if self.getSecure() else insecure_warning(server.address)     # logged at start
        stats["warnings"] = [w for w in (insecure, checkpoint_problem, no_gpu, warning) if w]
        hint = exchange_bound(workers, spec)
        stats["hints"] = [hint] if hint else []
        if hint:
            log.info("ffps: %s", hint)
        for said in (no_gpu, warning):
            if said:
                log.warning("ffps: %s", said)
        return FeedForwardNetworkPSClassificationModel(weights=w, layers=spec.layers), stats


def stop_keeping_the_weights(server) -> str | None:
    """Stop the server -> None, or the words of a last checkpoint that could not be written (a full disk): the
    weights are still readable, so a finished fit returns its model (the error threw it away)."""
    from ps.checkpoint import CheckpointNotWritten

    try:
        server.stop()
    except CheckpointNotWritten as exc:
        return str(exc)
    return None


CHANCE_MARGIN = 0.9     # a last epoch's mean loss above this share of ln(classes) has learned next to nothing
BLOWN_UP = 2.0          # an epoch's mean loss above this many times ln(classes): the first steps overshot
STILL_FALLING = 0.01    # the last epoch lowered the loss by at least this share of ln(classes): still learning
GOT_WORSE = 1.5         # a last epoch's mean loss this many times the lowest epoch's, and at least
GOT_WORSE_BY = 0.1      # this share of ln(classes) above it: training went back (raw digits: 0.77 -> 2.02)


EXCHANGE_BOUND_SHARE = 0.5     # of the workers' training time spent waiting on exchanges, past which a fit says so
EXCHANGE_BOUND_SECONDS = 1.0   # and only where that wait is a second or more


def exchange_bound(workers: dict, spec) -> str | None:
    """A hint (``trainingStats["hints"]``, an INFO line) where the workers of an asynchronous mode waited on
    exchanges for most of their training time, and the window they used: a longer communicationWindow
    exchanges less often (a text model with 256 hidden units on local[2]: 17.5 s at a window of 4, 4.9 s at 64;
    1M rows of 20 features through [20, 64, 64, 2]: 3.8 s and 1.6 s). The automatic window grows by itself up
    to ``spec.window_max`` steps; a fit still bound at its longest push is told to set a longer one; else None."""
    if spec.rule.rounds or not workers:
        return None
    stats = list(workers.values())
    wait = sum(w.get("exchange_s", 0.0) for w in stats) / len(stats)
    loop = sum(w.get("seconds", 0.0) for w in stats) / len(stats)
    if loop <= 0 or wait < EXCHANGE_BOUND_SECONDS or wait < EXCHANGE_BOUND_SHARE * loop:
        return None
    tau = max(int(w.get("tau", spec.tau) or 1) for w in stats)
    longest = max(int(w.get("longest_push", 0) or 0) for w in stats)
    pushes = round(sum(w.get("pushes", 0) for w in stats) / len(stats))
    used = (f"it was {tau}" if longest <= tau else
            f"the automatic window grew from {tau} to {longest} local steps a push")
    return (f"the workers waited on the parameter server for {100 * wait / loop:.0f} % of their training time "
            f"({wait:.1f} of {loop:.1f} s each, {pushes} exchanges): a longer communicationWindow ({used}) "
            f"exchanges less often; try {4 * max(tau, longest)}. Small networks and wide sparse ones (HashingTF) "
            f"gain the most")


def not_learned(epochs: list, classes: int, step_size: float) -> str | None:
    """A warning when training ran two epochs or more and the last one's mean loss is still within 10 % of a
    uniform guess's, ln(classes) (a geometric-mean probability of the true class of at most classes**-0.9);
    else None. Raw, unscaled features with the default stepSize do this: the first steps blow the ReLUs up and
    the network settles on one class, while the fit itself succeeds. So does a stepSize too small for the
    epochs run, with a loss that still falls at the end. The advice follows the losses: an epoch far above
    chance (overshoot), a loss falling every epoch (too slow), or neither."""
    if len(epochs) < 2 or classes < 2:
        return None
    losses = [e["loss"] for e in epochs]
    last, chance = losses[-1], math.log(classes)
    if not math.isfinite(last):
        return None
    if last < CHANCE_MARGIN * chance:
        return got_worse(epochs, losses, chance, step_size)
    said = (f"the model has learned next to nothing: the mean training loss of epoch {epochs[-1]['epoch']} is "
            f"{last:.3f}, against ln({classes}) = {chance:.3f} for a uniform guess among {classes} classes. ")
    if max(losses) > BLOWN_UP * chance:
        return said + (f"An epoch's loss ({max(losses):.3f}) far above chance says the first steps overshot: "
                       f"unscaled features (e.g. raw pixel values) or too large a stepSize ({step_size:g}) usually "
                       f"do this: scale the features (pyspark.ml.feature.StandardScaler) or lower stepSize")
    if all(b < a for a, b in zip(losses, losses[1:])) and losses[-2] - last >= STILL_FALLING * chance:
        return said + (f"The loss still falls every epoch ({losses[0]:.3f} in the first): too small a stepSize "
                       f"({step_size:g}) for {len(losses)} epochs usually does this: raise stepSize or maxIter")
    return said + (f"Features that say little about the labels, unscaled features, or a stepSize ({step_size:g}) "
                   f"far from right usually do this: check the features, scale them "
                   f"(pyspark.ml.feature.StandardScaler), or try another stepSize")


def got_worse(epochs: list, losses: list, chance: float, step_size: float) -> str | None:
    """A warning when the last epoch's mean loss is far above the lowest of the fit (GOT_WORSE times it, and
    GOT_WORSE_BY x ln(classes) above it), else None. Raw digits (pixels 0-16) at the default stepSize fell to
    0.77 and ended at 2.02, 0.2 accuracy, short of the chance-level band: steps too large for the features
    undo what the first epochs learned, and the returned model is the last epoch's, not the best one's.
    losses: the epochs' mean losses, as not_learned has them."""
    best = min(range(len(losses)), key=losses.__getitem__)
    last, low = losses[-1], losses[best]
    if not (last > GOT_WORSE * low and last - low >= GOT_WORSE_BY * chance):
        return None
    return (f"training went back: the mean training loss fell to {low:.3f} in epoch {epochs[best]['epoch']} and "
            f"ended at {last:.3f} in epoch {epochs[-1]['epoch']}; the model is the last epoch's. Steps too large for "
            f"the features usually do this: scale the features (pyspark.ml.feature.StandardScaler) or lower "
            f"stepSize ({step_size:g})")


def check_task_slots(spark, num_workers: int) -> None:
    """A local master that cannot run numWorkers tasks at once is refused before anything starts: Spark's barrier
    scheduler would otherwise wait for slots that never come (40 checks of 15 s by default) on every attempt.
    So is dynamic allocation on a cluster: Spark refuses a barrier stage under it, on every attempt."""
    m, cpus = master(spark), conf(spark, "spark.task.cpus", "1")
    if not m.startswith("local") and str(conf(spark, "spark.dynamicAllocation.enabled", "false")).lower() == "true":
        raise ValueError(training.NOT_RETRIED["BarrierJobRunWithDynamicAllocationException"] + f" (master {m!r})")
    slots = local_task_slots(m, cpus)
    if slots is not None and num_workers > slots:
        raise ValueError(f"numWorkers={num_workers} needs {num_workers} training tasks running at once (a barrier "
                         f"stage), but master {m!r} runs at most {slots} (spark.task.cpus={cpus}); set numWorkers "
                         f"to {max(slots, 1)} or less, or give the master more cores")


class Fits:
    """The fits in progress in this process, numbered from 1: CrossValidator(parallelism > 1) runs several at
    once, and while it does their epoch lines say which fit each is."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active: set = set()
        self._count = 0

    @contextmanager
    def running(self):
        """-> this fit's number, for the time the block runs."""
        with self._lock:
            self._count += 1
            fit = self._count
            self._active.add(fit)
        try:
            yield fit
        finally:
            with self._lock:
                self._active.discard(fit)

    def concurrent(self) -> bool:
        return len(self._active) > 1


FITS = Fits()


UNRUNNABLE = "the input's partitions cannot run in a barrier stage ({})"


def _shuffling(reason: str, num_workers: int) -> str:
    """Why the rows are shuffled (trainingStats["reshuffled"]), logged once."""
    log.info("ffps: %s; shuffling the rows into %d partitions", reason, num_workers)
    return reason


def epoch_logger(epochs: int, fit: int | None = None, fits: Fits = FITS):
    """-> on_epoch(figures) for the server: one INFO line per completed epoch on this module's logger, which
    names the fit (``fit``) while others run beside it; the record carries the figures (``ffps_epoch``), the
    planned epochs (``ffps_epochs``) and the fit (``ffps_fit``) for handlers such as the app's progress bar."""
    from ps.progress import epoch_line

    def on_epoch(figures):
        which = f" (fit {fit})" if fit is not None and fits.concurrent() else ""
        log.info("ffps %s%s", epoch_line(figures, epochs), which,
                 extra={"ffps_epoch": figures, "ffps_epochs": epochs, "ffps_fit": fit})
    return on_epoch


FeedForwardNetworkPSClassifier.__init__.__signature__ = keyword_signature(_ARGUMENTS)
FeedForwardNetworkPSClassifier.setParams.__signature__ = keyword_signature(_ARGUMENTS)
add_setters(FeedForwardNetworkPSClassifier, _ARGUMENTS)
