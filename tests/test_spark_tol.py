"""tol on Spark local[2], in every mode: the fit stops at the first epoch whose mean training loss changed by
less than tol (relative), the summary says so, and tol = 0 runs every pass; the fit's epoch log lines."""
import logging

import pytest

from tests.spark_helpers import digits_df, spark  # noqa: F401 - fixtures
from tests.test_spark_estimator import MODE_SETTINGS, make

pytestmark = pytest.mark.timeout(600)
TOL = 0.2       # digits: the epoch loss falls by more than 20 % only over the first few passes


@pytest.mark.parametrize("mode", list(MODE_SETTINGS))
def test_tol_stops_each_mode_at_the_first_converged_epoch(digits_df, mode, caplog):
    settings = dict(MODE_SETTINGS[mode], maxIter=40)
    with caplog.at_level(logging.INFO, logger="spark.estimator"):
        model = make(mode=mode, tol=TOL, **settings).fit(digits_df[0])
    s, conv = model.summary, model.trainingStats["server"]["convergence"]
    assert s.stopReason == "tol" and conv["tol"] == TOL
    rel = [e["relative_change"] for e in conv["completed"]]
    first = next(i for i, r in enumerate(rel) if r is not None and r < TOL)
    assert conv["stop_epoch"] == first + 1 < 40
    assert f"from epoch {first} to {first + 1}, below tol=0.2" in s.stopMessage
    # workers end at their next exchange: the summary's epochs stop at the decision (round modes), or at most
    # two epochs after the furthest one any worker had finished then (asynchronous workers run apart)
    ahead = conv["furthest_at_stop"]
    assert conv["stop_epoch"] <= ahead and conv["stop_epoch"] <= s.totalIterations <= ahead + 2
    if mode in ("sync", "easgd"):
        assert s.totalIterations == ahead == conv["stop_epoch"]
    assert all(w["stopped_by_server"] for w in model.trainingStats["workers"].values())
    lines = [r for r in caplog.records if hasattr(r, "ffps_epoch")]
    assert [r.ffps_epoch["epoch"] for r in lines] == list(range(1, conv["stop_epoch"] + 1))
    assert lines[0].getMessage().startswith("ffps epoch 1/40 loss ")
    assert "training stopped: converged" in caplog.text


def test_tol_zero_runs_every_pass_and_the_default_is_mllibs(digits_df):
    model = make(mode="sync", stepSize=0.3, maxIter=4, tol=0.0).fit(digits_df[0])
    assert model.summary.stopReason == "maxIter" and model.summary.totalIterations == 4
    assert model.summary.stopMessage == "ran all 4 epochs (maxIter)"
    assert make().getTol() == 1e-6


def test_bad_tol_fails_before_any_job(spark):
    from tests.test_spark_estimator import small

    with pytest.raises(ValueError, match=r"tol must be a number >= 0 \(0 = never stop early\), got -0.5"):
        make(layers=[3, 3], numWorkers=1, tol=-0.5).fit(small(spark))
