"""A training task's Python worker dies mid-fit: the driver relaunches the barrier stage and the fit completes
with no mini-batch applied twice and the accuracy of a fault-free run."""
import collections

import pytest

from tests.spark_helpers import accuracy, digits_df, kill_python_worker, spark  # noqa: F401 - fixtures

from spark import FeedForwardNetworkPSClassifier

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("mode,step_size", [("async", 0.1), ("sync", 0.3)])
def test_killed_python_worker_is_retried_without_double_updates(digits_df, mode, step_size, monkeypatch):
    train, test = digits_df
    clf = FeedForwardNetworkPSClassifier(layers=[64, 100, 10], maxIter=40, blockSize=32, stepSize=step_size,
                                         seed=1, mode=mode, numWorkers=2, backend="numba", maxRetries=2)
    kill_python_worker(monkeypatch, 1, 150)   # worker 1's Python process calls os._exit at local step 150, attempt 0
    model = clf.fit(train)
    stats = model.trainingStats
    assert stats["attempts"] == 2, "the barrier stage should have been relaunched once"
    workers = stats["workers"]
    # killed at local step 150: the pushes that ended before it were applied. Steps count windows of tau local
    # steps (4 in async); an automatic window lets one push cover up to window_max steps (here one window:
    # at most a quarter of a pass, 20 steps), so the restarted attempt resumes after a window that ends at most
    # window_max steps before the kill (tests/test_ps_adaptive_window.py kills one mid-way through a longer push)
    tau, window_max = workers[1]["tau"], workers[1]["window_max"]
    assert (tau, window_max) == ((1, 1) if mode == "sync" else (4, 4))
    assert workers[1]["attempt"] == 1 and 149 - window_max <= workers[1]["resumed_after"] * tau <= 149
    # every (worker, step) the server applied appears once, in order: nothing applied twice...
    applied = collections.Counter((h["worker"], h["step"]) for h in stats["history"])
    assert max(applied.values()) == 1
    for w, r in workers.items():
        steps = [h["step"] for h in stats["history"] if h["worker"] == w]
        assert steps == sorted(steps) and steps[-1] == r["last_step"]
        if mode == "sync":
            assert steps == list(range(1, r["last_step"] + 1))
    # ...and nothing skipped: every row of every pass reached the server once (sync rounds cut the two shards
    # to the smaller one's rows)
    rows = train.count() if mode == "async" else 2 * (train.count() // 2)
    assert sum(h["batch_size"] for h in stats["history"]) == 40 * rows
    assert stats["server"]["workers"]["1"]["attempt"] == 1
    assert accuracy(model.transform(test)) >= 0.96


def _raise_in(monkeypatch, worker, step, exc_factory, attempts=(0, 1, 2, 3)):
    """Worker ``worker`` raises exc_factory() at local step ``step`` of the given attempts (hook sent by value)."""
    from spark import training

    real = training.make_train_function

    def with_error(cfg, *, attempt, **kw):
        def on_step(w, k):
            if attempt in attempts and w == worker and k == step:
                raise exc_factory()
        return real(cfg, attempt=attempt, on_step=on_step, **kw)
    monkeypatch.setattr(training, "make_train_function", with_error)


def test_a_frozen_worker_of_an_async_fit_is_relaunched(digits_df, monkeypatch, caplog):
    """A worker that stops (SIGSTOP: a frozen process, a hung device) held an async fit forever: its peer
    finished, the server counted it as gone, and Spark waited for its task. Once it has been silent for
    roundTimeout after its peer finished, the stage is cancelled and relaunched, and the fit completes."""
    import logging
    import os
    import signal

    from spark import training

    real = training.make_train_function

    def freezing(cfg, *, attempt, **kw):
        def on_step(w, k):
            if attempt == 0 and w == 1 and k == 5:
                os.kill(os.getpid(), signal.SIGSTOP)
        return real(cfg, attempt=attempt, on_step=on_step, **kw)
    monkeypatch.setattr(training, "make_train_function", freezing)
    clf = FeedForwardNetworkPSClassifier(layers=[64, 32, 10], maxIter=20, blockSize=32, numWorkers=2, seed=3,
                                         backend="numpy", mode="async", roundTimeout=3.0, maxRetries=1)
    with caplog.at_level(logging.WARNING, logger="spark.training"):
        model = clf.fit(digits_df[0])
    assert model.trainingStats["attempts"] == 2
    assert "worker 1 for " in caplog.text
    assert "sent the parameter server nothing, longer than roundTimeout, after a peer had" in caplog.text
    assert model.trainingStats["workers"][1]["attempt"] == 1
    assert accuracy(model.transform(digits_df[1])) >= 0.9


def test_a_stage_whose_tasks_never_reach_the_server_is_said_once(caplog):
    """A fit whose task slots another job held waited 74 s without a word: the stage's watch says, once, that no
    task has reached the server. (A real server; no stage needed for the watch's own clock.)"""
    import logging
    import time

    import numpy as np

    from ps import ParameterServer
    from spark.training import StallWatch

    with ParameterServer(np.zeros(4, np.float32), num_workers=2, progress=False) as server:
        with caplog.at_level(logging.WARNING, logger="spark.training"):
            with StallWatch(server, None, "unused", num_workers=2, period=0.02, note_s=0.1) as watch:
                time.sleep(0.5)
    said = [r.message for r in caplog.records if "no training task has reached" in r.message]
    assert len(said) == 1 and "starts its 2 tasks only when 2 task slots are free at once" in said[0]
    assert watch.reason is None


def test_a_deterministic_task_failure_is_named_and_not_retried(digits_df, monkeypatch):
    """The driver's error names the failed task's Python exception, where in our code, and its executor; an
    import error would fail every attempt alike, so the stage is not relaunched."""
    from spark.failures import TrainingFailed

    _raise_in(monkeypatch, 1, 3, lambda: ModuleNotFoundError("No module named 'fastmath_plugin'"))
    clf = FeedForwardNetworkPSClassifier(layers=[64, 16, 10], maxIter=2, blockSize=32, numWorkers=2,
                                         backend="numpy", maxRetries=2)
    with pytest.raises(TrainingFailed) as err:
        clf.fit(digits_df[0])
    text = str(err.value)
    assert "task 1 on executor" in text and "ModuleNotFoundError: No module named 'fastmath_plugin'" in text
    assert "at spark/training.py:" in text and "Not retried" in text      # where our code called the hook
    assert err.value.attempts == 1 and err.value.failure.worker == 1 and err.value.failure.host


def test_a_failed_cleanup_does_not_hide_the_stages_error(digits_df, monkeypatch):
    """spark.stop() from another thread mid-fit: clearing the job description then failed ('NoneType' object has
    no attribute 'setJobDescription') and that error replaced the stage's own."""
    from spark import session
    from spark.failures import TrainingFailed

    real = session.set_job_description

    def gone(spark, text):
        if text is None:
            raise AttributeError("'NoneType' object has no attribute 'setJobDescription'")
        return real(spark, text)
    monkeypatch.setattr(session, "set_job_description", gone)
    _raise_in(monkeypatch, 1, 2, lambda: ModuleNotFoundError("No module named 'fastmath_plugin'"))
    clf = FeedForwardNetworkPSClassifier(layers=[64, 16, 10], maxIter=2, blockSize=32, numWorkers=2,
                                         backend="numpy", maxRetries=0)
    with pytest.raises(TrainingFailed, match="No module named 'fastmath_plugin'"):
        clf.fit(digits_df[0])
    monkeypatch.setattr(session, "set_job_description", real)
    real(digits_df[0].sparkSession, None)


def test_a_failure_on_every_attempt_is_named_per_attempt(digits_df, monkeypatch):
    from spark.failures import TrainingFailed

    _raise_in(monkeypatch, 0, 2, lambda: RuntimeError("scratch disk full"))
    clf = FeedForwardNetworkPSClassifier(layers=[64, 16, 10], maxIter=2, blockSize=32, numWorkers=2,
                                         backend="numpy", maxRetries=1)
    with pytest.raises(TrainingFailed) as err:
        clf.fit(digits_df[0])
    text = str(err.value)
    assert err.value.attempts == 2 and "training failed in all 2 attempts" in text
    for attempt in (0, 1):
        assert f"attempt {attempt}: task 0 on executor" in text
    assert text.count("RuntimeError: scratch disk full") == 2


def test_a_transient_task_failure_is_retried(digits_df, monkeypatch):
    _raise_in(monkeypatch, 0, 4, lambda: ConnectionResetError("executor lost its NFS mount"), attempts=(0,))
    clf = FeedForwardNetworkPSClassifier(layers=[64, 16, 10], maxIter=3, blockSize=32, numWorkers=2,
                                         backend="numpy", maxRetries=1)
    model = clf.fit(digits_df[0])
    assert model.trainingStats["attempts"] == 2
    failures = model.trainingStats["server"]["failures"]
    assert failures[0]["type"] == "ConnectionResetError" and failures[0]["attempt"] == 0


def test_too_few_task_slots_is_said_at_once_and_not_retried(digits_df, monkeypatch):
    """Where ffps cannot count the slots (a cluster manager), Spark's barrier scheduler waits for them and gives
    up (here after 3 checks of 1 s; by default 40 of 15 s): that ends the fit, without a relaunch that would
    wait again. On this local[2] session the count is known, so it is hidden from the up-front check."""
    from spark import estimator
    from spark.failures import TrainingFailed

    monkeypatch.setattr(estimator, "local_task_slots", lambda master, cpus: None)
    clf = FeedForwardNetworkPSClassifier(layers=[64, 16, 10], maxIter=1, blockSize=32, numWorkers=3,
                                         backend="numpy", maxRetries=2)
    with pytest.raises(TrainingFailed, match=r"training needs 3 task slots at once \(numWorkers=3, one barrier "
                                             r"stage\).*lower numWorkers or add executors. Not retried") as err:
        clf.fit(digits_df[0])
    assert err.value.attempts == 1


def test_local_task_slots_reads_local_masters_only():
    import os

    from spark.session import local_task_slots

    assert [local_task_slots(m, c) for m, c in (("local", "1"), ("local[4]", 1), ("local[4]", "2"), ("local[3,2]", 1),
                                                ("local-cluster[2,3,1024]", 1), ("local-cluster[2,3,1024]", 2))] \
        == [1, 4, 2, 3, 6, 2]
    assert local_task_slots("local[*]", 1) == local_task_slots("local[*, 3]", 1) == (os.cpu_count() or 1)
    assert local_task_slots("yarn", 1) is local_task_slots("spark://host:7077", 1) is local_task_slots("k8s://x", 1) \
        is None


def test_without_a_report_the_driver_reads_the_task_traceback_in_sparks_error():
    """A task that died before it could report: the failure comes from the Python traceback Spark's error
    carries, named at the last frame of ours (not the library frame below it), with its task and executor."""
    import os

    from spark.failures import _ROOT, from_spark_error, task_report

    ours, theirs = os.path.join(_ROOT, "spark", "training.py"), "/usr/lib/python3/dist-packages/lib.py"
    text = ("Job aborted due to stage failure: Lost task 1.0 in stage 3.0 (TID 7) (10.0.0.5 executor 1): "
            "org.apache.spark.api.python.PythonException: Traceback (most recent call last):\n"
            f'  File "{ours}", line 93, in train_shard\n    helper()\n'
            f'  File "{theirs}", line 5, in helper\n    raise ValueError("bad rows")\n'
            "ValueError: bad rows\n\n\tat org.apache.spark.api.python.BasePythonRunner")
    failure = from_spark_error(RuntimeError(text))
    assert (failure.type, failure.message, failure.frame) == ("ValueError", "bad rows",
                                                              "spark/training.py:93 in train_shard")
    assert failure.executor == "10.0.0.5 executor 1"
    assert from_spark_error(RuntimeError("no traceback here")) is None

    def raises():
        raise KeyError("k")

    try:
        raises()
    except KeyError as exc:
        report = task_report(exc, executor="h:1")
    assert report["type"] == "KeyError" and report["executor"] == "h:1"
    # no frame of ours in that traceback (tests/ is not core, ps or spark): its last frame, by its full path
    assert report["frame"].startswith(os.path.abspath(__file__) + ":") and report["frame"].endswith(" in raises")


def test_an_executor_python_without_ffps_is_told_how_to_fix_it():
    import sys

    from spark.failures import TaskFailure

    missing = TaskFailure(type="ModuleNotFoundError", message="No module named 'ps'", worker=0)
    text = missing.describe()
    assert text.startswith("task 0 failed with ModuleNotFoundError: No module named 'ps'. The executors' Python")
    assert f"Set PYSPARK_PYTHON={sys.executable} before the SparkSession starts" in text
    assert "ModuleNotFoundError: No module named 'core.backends'" in TaskFailure(
        type="ModuleNotFoundError", message="No module named 'core.backends'").describe()
    assert "PYSPARK_PYTHON" in TaskFailure(type="ModuleNotFoundError", message="No module named 'core.x'").describe()
    for other in (TaskFailure(type="ModuleNotFoundError", message="No module named 'fastmath_plugin'"),
                  TaskFailure(type="ModuleNotFoundError", message="No module named 'pselect'"),
                  TaskFailure(type="RuntimeError", message="No module named 'ps'")):
        assert "PYSPARK_PYTHON" not in other.describe()


def test_sparks_refusals_of_the_stage_are_said_at_once_and_not_retried(digits_df, monkeypatch):
    """Dynamic allocation on a cluster, or a GPU stage on a cluster without GPU resources: Spark refuses every
    attempt the same way (the fit relaunched it maxRetries times, then blamed the task slots). Dynamic
    allocation is refused before anything starts; a refusal that still comes from Spark ends the fit at once.
    (Cluster masters are stood in for: this local[2] session is the only Spark here.)"""
    from spark import estimator, gpu
    from spark.failures import TrainingFailed

    real_conf = estimator.conf
    monkeypatch.setattr(estimator, "master", lambda spark: "spark://cluster:7077")
    monkeypatch.setattr(estimator, "conf", lambda spark, key, default=None: "true"
                        if key == "spark.dynamicAllocation.enabled" else real_conf(spark, key, default))
    clf = FeedForwardNetworkPSClassifier(layers=[64, 16, 10], maxIter=1, blockSize=32, numWorkers=2,
                                         backend="numpy", maxRetries=2, useGpu=True)
    with pytest.raises(ValueError, match=r"set spark.dynamicAllocation.enabled=false .*\(master 'spark://cluster"):
        clf.fit(digits_df[0])
    monkeypatch.undo()

    class Refused:
        def collect(self):
            raise RuntimeError("An error occurred while calling o163.withResources.\n: org.apache.spark."
                               "SparkException: No executor resource configs were specified for the following task "
                               "configs: gpu\n\tat org.apache.spark.resource.ResourceProfile.calculate(x.scala:1)")

    launched = []
    monkeypatch.setattr(gpu, "gpu_stage", lambda *a: launched.append(a) or Refused())
    with pytest.raises(TrainingFailed, match=r"no executor of this cluster has GPU resources.*Not retried") as err:
        clf.fit(digits_df[0])
    assert err.value.attempts == 1 and len(launched) == 1


def test_the_retry_warning_names_a_crashed_python_worker_and_its_task():
    """Spark's first line of a killed task's error is 'Job aborted due to stage failure'; the retry warning kept
    only that (and a ': ' of Py4J's layout). It says the Python worker crashed, and which task it was."""
    from spark.failures import short_error as _short

    text = ("An error occurred while calling o120.collectToPython.\n: org.apache.spark.SparkException: Job aborted "
            "due to stage failure: Task 1 in stage 7.0 failed 1 times, most recent failure: Lost task 1.0 in stage "
            "7.0 (TID 15) (10.0.0.5 executor 1): org.apache.spark.SparkException: Python worker exited "
            "unexpectedly (crashed)\n\tat org.apache.spark.api.python.BasePythonRunner.x(PythonRunner.scala:1)")
    assert _short(RuntimeError(text)) == ("Lost task 1.0 in stage 7.0 (TID 15) (10.0.0.5 executor 1): Python worker "
                                          "exited unexpectedly (crashed)")
    assert _short(RuntimeError("An error occurred while calling o1.x.\n: java.io.IOException: disk")) == \
        "java.io.IOException: disk"
    # an executor killed under local-cluster: the retry warning said only 'Could not recover from a failed barrier
    # ResultStage ... finished unsuccessfully.'; Spark's next line (DAGScheduler: the task's failure) says why
    lost = ("An error occurred while calling o99.collectToPython.\n: org.apache.spark.SparkException: Job aborted "
            "due to stage failure: Could not recover from a failed barrier ResultStage. Most recent failure reason: "
            "Stage failed because barrier task ResultTask(17, 0) finished unsuccessfully.\nExecutorLostFailure "
            "(executor 0 exited caused by one of the running tasks) Reason: Command exited with code 137\n\tat "
            "org.apache.spark.scheduler.DAGScheduler.failJobAndIndependentStages(DAGScheduler.scala:2856)")
    assert _short(RuntimeError(lost)) == ("barrier task ResultTask(17, 0) failed, its executor was lost: "
                                          "ExecutorLostFailure (executor 0 exited caused by one of the running "
                                          "tasks) Reason: Command exited with code 137")
    python = lost.replace("ExecutorLostFailure (executor 0 exited caused by one of the running tasks) Reason: "
                          "Command exited with code 137", "org.apache.spark.api.python.PythonException: Traceback "
                          "(most recent call last):")
    assert _short(RuntimeError(python)).startswith("org.apache.spark.SparkException: Job aborted")


@pytest.mark.parametrize("upstream", ["assembler", "python_udf"])
def test_an_input_that_fails_before_ffps_is_named_and_not_retried(spark, upstream, caplog):
    """A stage before ffps that fails (VectorAssembler on a null, a Python UDF): the fit was retried 3 times and
    said only that a barrier task failed, then blamed the task slots (Spark 3.5), or blamed ffps's own Arrow read
    (Spark 4). One plain job over the input names the cause after the first attempt."""
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import VectorAssembler
    from pyspark.sql import functions as F

    from spark.failures import TrainingFailed

    @F.udf("double")
    def breaks_on_7(x):
        if x == 7:
            raise RuntimeError("the upstream UDF broke on row 7")
        return float(x)

    base = spark.range(40).select((F.col("id") % 2).cast("double").alias("label"),
                                  (F.when(F.col("id") % 10 != 0, F.col("id")) if upstream == "assembler"
                                   else breaks_on_7("id")).cast("double").alias("a"), F.lit(1.0).alias("b"))
    fit = Pipeline(stages=[VectorAssembler(inputCols=["a", "b"], outputCol="features"),
                           FeedForwardNetworkPSClassifier(layers=[2, 4, 2], maxIter=2, backend="numpy")])
    with caplog.at_level("WARNING", logger="spark.training"), pytest.raises(TrainingFailed) as err:
        fit.fit(base)
    cause = ('Encountered null while assembling a row with handleInvalid = "error". Consider removing nulls'
             if upstream == "assembler" else "RuntimeError: the upstream UDF broke on row 7")
    assert str(err.value).startswith(f"the input DataFrame fails before ffps reads it: {cause}")
    assert err.value.attempts == 1 and "retrying" not in caplog.text and "task slots" not in str(err.value)


def test_an_input_that_fails_once_is_retried_as_before(spark, tmp_path):
    """A passing failure before ffps (a source that fails its first two reads of a row): the check after the
    first attempt computes the input twice, and a cause that does not repeat is left to the retries."""
    from pyspark.ml.feature import VectorAssembler
    from pyspark.sql import functions as F

    calls = str(tmp_path / "calls")

    @F.udf("double")
    def flaky(x):
        if x == 7:
            with open(calls, "a") as f:
                f.write("x")
            with open(calls) as f:
                if len(f.read()) <= 2:
                    raise OSError("the source failed this read")
        return float(x)

    base = spark.range(40).select((F.col("id") % 2).cast("double").alias("label"), flaky("id").alias("a"),
                                  F.lit(1.0).alias("b"))
    frame = VectorAssembler(inputCols=["a", "b"], outputCol="features").transform(base)
    model = FeedForwardNetworkPSClassifier(layers=[2, 4, 2], maxIter=2, backend="numpy", maxRetries=2).fit(frame)
    assert model.trainingStats["attempts"] == 2
    with open(calls) as f:
        assert len(f.read()) >= 4           # attempt 0, the check's two jobs (one failed), attempt 1


def test_a_cancelled_fit_raises_at_once_and_is_not_retried(digits_df, caplog):
    """A job group cancelled while ffps trains (CrossValidator's, a notebook's stop button; cancelAllJobs and a
    job tag say the same): the fit counted it as a failed attempt, relaunched the stage, and returned a fully
    trained model after maxIter passes, as if nothing had been asked. It raises now, and the next fit trains."""
    import threading

    from spark.failures import TrainingCancelled

    train, _ = digits_df
    sc = train.sparkSession.sparkContext
    started, outcome = threading.Event(), {}

    def fit():
        sc.setJobGroup("ffps-test-tuning", "a tuning run the user stops", interruptOnCancel=True)
        clf = FeedForwardNetworkPSClassifier(layers=[64, 100, 10], maxIter=60_000, tol=0.0, numWorkers=2)
        try:
            outcome["model"] = clf.fit(train)
        except BaseException as exc:  # noqa: BLE001 - what the fit raised is the test's subject
            outcome["error"] = exc

    with caplog.at_level("INFO", logger="spark.estimator"):
        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        for _ in range(600):                       # until the server logs the first finished epoch
            if "ffps epoch 1/60000" in caplog.text or not thread.is_alive():
                started.set()
                break
            thread.join(0.1)
    assert started.is_set() and thread.is_alive(), outcome
    sc.cancelJobGroup("ffps-test-tuning")
    thread.join(120)
    assert not thread.is_alive() and "model" not in outcome
    error = outcome["error"]
    assert isinstance(error, TrainingCancelled), repr(error)
    assert "training cancelled in attempt 0 after" in str(error) and "cancelled part of cancelled job group " \
        "ffps-test-tuning" in str(error)
    assert "retrying" not in caplog.text
    again = FeedForwardNetworkPSClassifier(layers=[64, 100, 10], maxIter=2, numWorkers=2).fit(train)
    assert again.trainingStats["attempts"] == 1


def test_an_error_in_the_driver_during_training_cancels_the_training_jobs(spark):
    """Ctrl-C (or any exception) in the driver while collect() waited left the barrier tasks running: they held
    every task slot until their server had been gone for 3 x workerTimeout, and the next fit waited 91 s for
    them. The stage's jobs carry a tag of their own, and whatever ends the wait early cancels them."""
    import time

    from spark.training import collect_or_cancel

    sc = spark.sparkContext
    slow = sc.parallelize(range(2), 2).map(lambda x: time.sleep(600) or x)
    running = {}

    class Interrupted:
        """A stage whose collect() submits the real job from this thread (so it carries the tag) and is then
        interrupted in the driver, as Ctrl-C interrupts the py4j call of a real collect()."""

        def collect(self):
            running["job"] = slow._jrdd.collectAsync()
            for _ in range(600):
                if sc.statusTracker().getActiveJobsIds():
                    break
                time.sleep(0.05)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect_or_cancel(Interrupted(), spark, "ffps-test-interrupted")
    job = running["job"]
    for _ in range(600):                             # cancelled jobs finish within a few seconds
        if job.isDone():
            break
        time.sleep(0.05)
    assert job.isDone()
    with pytest.raises(Exception, match=r"Job \d+ cancelled"):
        job.get()
    assert list(sc.getJobTags()) == []


@pytest.mark.parametrize("text,is_cancel", [
    ("org.apache.spark.SparkException: Job 9 cancelled as part of cancellation of all jobs", True),   # 3.5
    ("[SPARK_JOB_CANCELLED] Job 9 cancelled part of cancelled job group tuning SQLSTATE: XXKDA", True),  # 4.x
    ("(org.apache.spark.SparkSQLException) [OPERATION_CANCELED] Operation has been canceled. SQLSTATE: HY008",
     True),                                                                        # Spark Connect's interrupt
    ("Job aborted due to stage failure: Could not recover from a failed barrier ResultStage", False),
    ("org.apache.spark.api.python.PythonException: ValueError: cancelled order 3", False),
])
def test_a_cancellation_is_told_from_a_failed_attempt(text, is_cancel):
    """The texts are what each Spark line raised when a running fit was cancelled (measured 2026-12-01)."""
    from py4j.protocol import Py4JError

    from spark.failures import cancel_reason, cancelled

    assert cancelled(RuntimeError(text)) is is_cancel
    broken = Py4JError("An error occurred while calling o212.collectToPython")      # Ctrl-C on 3.5: no Java error
    assert cancelled(broken) and cancel_reason(broken).startswith("the driver was interrupted (Ctrl-C, SIGINT)")


def test_a_stage_that_never_trained_says_what_may_have_stopped_it():
    """Workers crashing at once under spark.executor.pyspark.memory=300m were told to check their task slots;
    the hint names the cap now, and the slots only where no task crashed or reached the server."""
    from spark.training import why_none_trained

    crashed = ["attempt 0: task 1 failed: Python worker exited unexpectedly (crashed)"]
    assert why_none_trained("300m", False, crashed).startswith(
        ". spark.executor.pyspark.memory=300m caps each Python worker's address space")
    assert why_none_trained(None, False, crashed) == ""
    assert "768m caps" in why_none_trained("768m", True, ["attempt 0: task 0 failed with MemoryError:  at x"])
    assert "free task slots" in why_none_trained(None, False, ["attempt 0: stalled"])
    assert why_none_trained("300m", True, ["attempt 0: ValueError: bad"]) == ""


def test_a_cancellation_under_another_error_is_still_one():
    """PySpark 3.5, spark.stop() from another thread mid-fit: its call-site guard raised AttributeError over the
    job's "cancelled because SparkContext was shut down", and the fit took it for a failed attempt."""
    from py4j.protocol import Py4JError

    from spark.failures import cancel_reason, cancelled, interrupted

    try:
        try:
            raise RuntimeError("org.apache.spark.SparkException: Job 4 cancelled because SparkContext was shut down")
        except RuntimeError:
            raise AttributeError("setCallSite")
    except AttributeError as exc:
        hidden = exc
    assert cancelled(hidden) and not interrupted(hidden)
    assert cancel_reason(hidden).endswith("Job 4 cancelled because SparkContext was shut down")
    assert not cancelled(AttributeError("setCallSite"))
    assert interrupted(Py4JError("An error occurred while calling o212.collectToPython"))


def test_ctrl_c_in_the_driver_raises_keyboard_interrupt_and_keeps_the_callers_job_description(digits_df,
                                                                                             monkeypatch):
    """PySpark 3.5 breaks the py4j call Ctrl-C interrupts (Py4JError): the fit said TrainingCancelled, a
    RuntimeError that ``except Exception`` swallowed; Spark 4 raises KeyboardInterrupt, and so does the fit now.
    The caller's job description (under setJobGroup) was left unset after every fit; it is given back."""
    from py4j.protocol import Py4JError

    from spark import training

    sc = digits_df[0].sparkSession.sparkContext
    sc.setJobDescription("nightly training run")
    try:
        clf = FeedForwardNetworkPSClassifier(layers=[64, 16, 10], maxIter=1, numWorkers=2, backend="numpy")
        clf.fit(digits_df[0])
        assert sc.getLocalProperty("spark.job.description") == "nightly training run"

        def broken(stage, spark, tag):
            assert sc.getLocalProperty("spark.job.description") == "ffps training (attempt 0)"
            raise Py4JError("An error occurred while calling o212.collectToPython")
        monkeypatch.setattr(training, "collect_or_cancel", broken)
        with pytest.raises(KeyboardInterrupt, match=r"training cancelled in attempt 0 after [\d.]+s: the driver "
                                                    r"was interrupted \(Ctrl-C, SIGINT\)"):
            clf.fit(digits_df[0])
        assert sc.getLocalProperty("spark.job.description") == "nightly training run"
    finally:
        sc.setJobDescription(None)
