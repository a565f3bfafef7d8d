"""A fit whose driver was killed (SIGKILL) is resumed from its checkpoints by a new fit with resume=True."""
import collections
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.spark_helpers import REPO, RESUME_FIT, accuracy, digits_df, spark  # noqa: F401 - fixtures

from ps import checkpoint as ckpt
from spark import FeedForwardNetworkPSClassifier

pytestmark = pytest.mark.timeout(600)


def _kill_driver_after_checkpoint(directory, min_version, timeout=300):
    """Run tests.spark_helpers fit-slowly in its own process group; SIGKILL the group once a checkpoint of
    at least ``min_version`` is on disk -> that version."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "tests.spark_helpers", "fit-slowly", directory], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            newest = ckpt.latest(directory)
            if newest and ckpt.load(newest)[1]["version"] >= min_version:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return ckpt.load(ckpt.latest(directory))[1]["version"]
            if proc.poll() is not None:
                raise AssertionError(f"the driver ended before it was killed: {proc.stderr.read().decode()[-3000:]}")
            time.sleep(0.02)
        raise AssertionError("no checkpoint reached the version to kill at")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.mark.one_spark_line
def test_a_fit_resumes_after_its_driver_was_killed(digits_df, tmp_path):
    train, test = digits_df
    directory = str(tmp_path / "ck")
    killed_at = _kill_driver_after_checkpoint(directory, min_version=60)
    _, meta = ckpt.load(ckpt.latest(directory))
    assert meta["layers"] == RESUME_FIT["layers"] and meta["mode"] == "sync"
    last_steps = {int(w): v["last_step"] for w, v in meta["workers"].items()}

    with pytest.raises(ValueError, match="already holds checkpoints.*resume=True"):  # nothing stored is lost
        FeedForwardNetworkPSClassifier(checkpointDir=directory, **RESUME_FIT).fit(train)
    for change, message in ((dict(layers=[64, 32, 10]), r"made for layers \[64, 100, 10\]; this run has "
                                                        r"layers \[64, 32, 10\]"),
                            (dict(mode="async"), "made by a mode='sync' run; this run's mode is 'async'")):
        with pytest.raises(ValueError, match=message):
            FeedForwardNetworkPSClassifier(checkpointDir=directory, resume=True, **dict(RESUME_FIT, **change)) \
                .fit(train)

    resumed = FeedForwardNetworkPSClassifier(checkpointDir=directory, resume=True, **RESUME_FIT).fit(train)
    stats = resumed.trainingStats
    assert stats["resumed_from"]["path"].endswith(f"ckpt-{killed_at:012d}.npz")
    assert stats["resumed_from"]["attempt"] >= 1                      # above the attempts the checkpoint holds
    # nothing applied twice: each worker's steps after the checkpoint, each once, up to the end
    applied = collections.Counter((h["worker"], h["step"]) for h in stats["history"])
    assert max(applied.values()) == 1
    for w, r in stats["workers"].items():
        assert r["resumed_after"] == last_steps[w]
        assert sorted(s for (ww, s) in applied if ww == w) == list(range(last_steps[w] + 1, r["last_step"] + 1))

    uncheckpointed = {k: v for k, v in RESUME_FIT.items() if k != "checkpointInterval"}
    whole = FeedForwardNetworkPSClassifier(**uncheckpointed).fit(train)          # the same fit, never interrupted
    assert abs(accuracy(resumed.transform(test)) - accuracy(whole.transform(test))) <= 0.01
    np.testing.assert_allclose(resumed.weights.toArray(), whole.weights.toArray(), rtol=1e-4, atol=1e-5)
