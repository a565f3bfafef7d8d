"""Why a training task failed, said on the driver.

A failed task aborts its barrier stage, and Spark's error names only "barrier task ResultTask(12, 1) finished
unsuccessfully" up front. So each task reports its own Python exception to the parameter server (REPORT:
type, message, the last frame of ours, the executor's address, host and pid) before it fails, and the driver
names the first report of the failed attempt; where no report came (the task died before it could send one),
it reads the Python traceback Spark's error carries. Failures that repeat on every attempt (an import error,
BackendUnavailable) are not retried.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import traceback
from dataclasses import dataclass

DETERMINISTIC = ("ImportError", "ModuleNotFoundError", "BackendUnavailable")
_OUR_MODULE_MISSING = re.compile(r"No module named '(core|ps|spark)[.']")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGES = ("core", "ps", "spark")
_OURS = tuple(os.path.join(_ROOT, pkg) + os.sep for pkg in _PACKAGES)


CRASHED = "Python worker exited unexpectedly"     # a task's Python process died (killed, out of memory)
_LOST_TASK = re.compile(r"Lost task \S+ in stage \S+ \(TID \d+\) \([^)]*\)")


# Spark's abort of a barrier stage: "... Stage failed because barrier task ResultTask(17, 0) finished
# unsuccessfully.", then the task's own failure on the next line (DAGScheduler: failure.toErrorString)
_BARRIER_TASK = re.compile(r"barrier task (.+?) finished unsuccessfully\.\n([^\n]+)")


def short_error(exc: BaseException) -> str:
    """First informative line of a (possibly Java) exception; for a crashed task's Python, that and the task
    (Spark's first line is only 'Job aborted due to stage failure'); for a barrier stage whose task failed
    otherwise (an executor lost), the task and Spark's reason."""
    text = str(exc)
    if CRASHED in text:
        lost = _LOST_TASK.search(text)
        said = text[text.index(CRASHED):].split("\n", 1)[0].strip()
        return (f"{lost.group(0)}: " if lost else "") + said[:300]
    barrier = _BARRIER_TASK.search(text)
    # (not a task's own Python error, whose next line is a traceback's header: from_spark_error reads those)
    if barrier and barrier.group(2).strip() and "Traceback" not in barrier.group(2):
        reason = barrier.group(2).strip()
        lost = "its executor was lost: " if reason.startswith("ExecutorLostFailure") else ""
        return f"barrier task {barrier.group(1)} failed, {lost}{reason[:300]}"
    for line in text.splitlines():
        line = line.strip().removeprefix(": ").strip()
        if line and not line.startswith(("at ", "An error occurred while calling")):
            return line[:500]
    return type(exc).__name__


def root_cause(exc: BaseException) -> str:
    """The deepest 'Caused by' of a Java error (a reader's 'is not a Parquet file', VectorAssembler's 'Encountered
    null'), without its class; a Python UDF's own error line; else the first informative line. Spark's first line
    is only 'Job aborted due to stage failure'."""
    text = str(exc)
    causes = [" ".join(c.split()) for c in re.findall(r"Caused by: (.*?)(?=\n\s+at |\n\s*Caused by:|\n\s*\.\.\. |\Z)",
                                                      text, re.S) if "Exception thrown in awaitResult" not in c]
    cause = re.sub(r"^(?:[\w$]+\.)+[\w$]*(?:Exception|Error): ", "", causes[-1]) if causes else short_error(exc)
    if "Traceback (most recent call last)" in cause or "PythonException" in cause or not causes:
        python = re.findall(r"^(\w+(?:Error|Exception): \S.*)$", text, re.M)
        if python:
            return python[-1][:500]
    return cause[:500]


class TrainingFailed(RuntimeError):
    """The training stage failed; ``failure`` (a :class:`TaskFailure`, or None) says which task and why."""

    def __init__(self, message: str, failure: "TaskFailure | None" = None, attempts: int = 1):
        super().__init__(message)
        self.failure, self.attempts = failure, attempts


# cancelAllJobs, cancelJobGroup (CrossValidator's, a notebook's stop button), a job tag, a stopped SparkContext
# (Spark 3.5: "Job 9 cancelled ...", Spark 4: "[SPARK_JOB_CANCELLED] Job 9 cancelled ..."), and Spark Connect's
# interrupt of the operation
CANCELLED = re.compile(r"Job \d+ cancelled|\[OPERATION_CANCELED\]")


class TrainingCancelled(RuntimeError):
    """The training stage's job was cancelled (or the driver's call into Spark interrupted): not retried."""


def _chain(exc: BaseException) -> list:
    """exc and the exceptions it arose from (its cause, else its context), innermost last."""
    found = []
    while exc is not None and len(found) < 16 and all(exc is not e for e in found):
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


def _cancellation(exc: BaseException) -> BaseException | None:
    """The exception of exc's chain that says the job was cancelled, or a py4j call broken without any Java
    exception (PySpark 3.5's Ctrl-C handler breaks the call it interrupts); None. The chain matters: PySpark
    3.5's call-site guard raised AttributeError('setCallSite') over "Job 4 cancelled because SparkContext was
    shut down" when another thread stopped the session."""
    return next((e for e in _chain(exc) if CANCELLED.search(str(e)) or _broken_call(e)), None)


def _broken_call(exc: BaseException) -> bool:
    """A py4j call that failed without any Java exception: PySpark 3.5's Ctrl-C handler breaks the call it
    interrupts that way (a Java failure is a Py4JJavaError)."""
    return type(exc).__name__ == "Py4JError"


def cancelled(exc: BaseException) -> bool:
    """Whether a failed ``collect`` of the training stage was the user's (or Spark's) cancellation rather than
    a failed attempt (:func:`_cancellation`)."""
    return _cancellation(exc) is not None


def interrupted(exc: BaseException) -> bool:
    """Whether the cancellation was Ctrl-C in the driver as PySpark 3.5 reports it (a broken py4j call): the
    fit raises KeyboardInterrupt then, as Spark 4's does, so that ``except Exception`` does not swallow it."""
    found = _cancellation(exc)
    return found is not None and _broken_call(found)


def cancel_reason(exc: BaseException) -> str:
    """What stopped the fit, for its TrainingCancelled: Spark's cancel message, or for a py4j call broken
    without a Java exception (PySpark 3.5's Ctrl-C handler) that the driver was interrupted; the bare 'Py4JError'
    said nothing of it."""
    found = _cancellation(exc) or exc
    if _broken_call(found):
        return "the driver was interrupted (Ctrl-C, SIGINT) while it waited for the training stage"
    return short_error(found)


@dataclass
class TaskFailure:
    type: str
    message: str
    worker: int | None = None
    attempt: int | None = None
    frame: str | None = None          # "spark/training.py:93 in train_shard": the last frame in core/ps/spark
    executor: str | None = None       # "host:port" of the task's executor
    host: str | None = None
    pid: int | None = None

    @property
    def deterministic(self) -> bool:
        return self.type in DETERMINISTIC

    def describe(self) -> str:
        who = f"task {self.worker}" if self.worker is not None else "a task"
        where = [f"executor {self.executor}"] if self.executor else []
        if self.host:
            where.append(f"host {self.host}" + (f", pid {self.pid}" if self.pid else ""))
        at = f" at {self.frame}" if self.frame else ""
        text = f"{who}{' on ' + '; '.join(where) if where else ''} failed with {self.type}: {self.message}{at}"
        return text + self.hint()

    def in_ffps(self) -> bool:
        """Whether the failing frame is in ffps's own code (:func:`_where` writes those relative to the checkout;
        another frame keeps its path)."""
        return bool(self.frame) and self.frame.startswith(tuple(pkg + "/" for pkg in _PACKAGES))

    def hint(self) -> str:
        """What to do, where the failure has a usual cause: the executors' Python lacking ffps."""
        if self.type in ("ModuleNotFoundError", "ImportError") and _OUR_MODULE_MISSING.search(self.message):
            return (f". The executors' Python cannot import ffps: Spark starts it from PYSPARK_PYTHON (unset: "
                    f"python3 on the PATH), not from the driver's interpreter. Set PYSPARK_PYTHON="
                    f"{sys.executable} before the SparkSession starts (local mode, or the same path on every "
                    f"node), or install ffps into the executors' Python")
        return ""


def _ours(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_OURS)


def _where(frames: list) -> str | None:
    """"spark/training.py:93 in train_shard": the last of ``frames`` [(file, line, function)] in core/ps/spark,
    else the last one; None for none."""
    ours = [f for f in frames if _ours(f[0])]
    frame = ours[-1] if ours else (frames[-1] if frames else None)
    if frame is None:
        return None
    name = os.path.relpath(frame[0], _ROOT) if _ours(frame[0]) else frame[0]
    return f"{name}:{frame[1]} in {frame[2]}"


def task_report(exc: BaseException, executor: str | None = None) -> dict:
    """What a failing task sends the server: JSON-ready, a few hundred bytes."""
    frames = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(exc.__traceback__)]
    return {"type": type(exc).__name__, "message": str(exc)[:1000], "frame": _where(frames),
            "executor": executor, "host": socket.gethostname(), "pid": os.getpid()}


def report_to_server(cfg: dict, worker: int, attempt: int, session, exc: BaseException, ctx=None) -> None:
    """Executor side: send :func:`task_report` of ``exc`` as this task (its registered ``session``, or a new
    registration when it had none yet); never raises, since the task is failing anyway."""
    from ps.client import ParameterClient

    try:
        executor = ctx.getTaskInfos()[worker].address if ctx is not None else None
    except Exception:  # noqa: BLE001 - the report goes without it
        executor = None
    client = None
    try:
        first = cfg["shards"][0] if "shards" in cfg else cfg        # a sharded server hears reports on shard 0
        client = ParameterClient(first, worker_id=worker, attempt=attempt, timeout=5.0, retries=0,
                                 register=session is None)
        if session is not None:
            client.session = session
        client.report_failure(task_report(exc, executor))
    except Exception:  # noqa: BLE001 - the server may be gone: Spark's own error still carries the traceback
        pass
    finally:
        if client is not None:
            client.close()


def from_reports(reports: list, attempt: int) -> TaskFailure | None:
    """The first report the server kept from this attempt's tasks."""
    for r in reports:
        if r.get("attempt") == attempt:
            return TaskFailure(type=str(r.get("type")), message=str(r.get("message")), worker=r.get("worker"),
                               attempt=attempt, frame=r.get("frame"), executor=r.get("executor"),
                               host=r.get("host"), pid=r.get("pid"))
    return None


_FILE_LINE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)')
_TASK = re.compile(r"ResultTask\(\d+, (?P<partition>\d+)\)|Lost task \d+\.\d+ in stage \S+ \(TID \d+\) \("
                   r"(?P<executor>[^)]*)\)")


def from_spark_error(exc: BaseException) -> TaskFailure | None:
    """The Python exception inside Spark's job-failure text (the task's last traceback), or None."""
    lines = str(exc).splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip().endswith("Traceback (most recent call last):")]
    if not starts:
        return None
    frames, last = [], None
    for line in lines[starts[-1] + 1:]:
        if line.startswith(" "):                     # '  File ..., line N, in f' and its source line
            m = _FILE_LINE.search(line)
            if m:
                frames.append((m["file"], int(m["line"]), m["name"]))
            continue
        last = line.strip()
        break
    if not last:
        return None
    type_, _, message = last.partition(": ")
    task = _TASK.search(str(exc))
    worker = int(task["partition"]) if task and task["partition"] else None
    executor = task["executor"] if task and task["executor"] else None
    return TaskFailure(type=type_.rsplit(".", 1)[-1], message=message.strip()[:1000], worker=worker,
                       frame=_where(frames), executor=executor)
