"""The spark-submit app on Spark's bundled multiclass sample (libsvm): train, predict, evaluate; ffps train."""
import glob
import json
import os
import subprocess
import sys

import pytest

from tests.spark_helpers import REPO, spark  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(600)


def sample_data() -> str:
    import pyspark

    path = os.path.join(os.path.dirname(pyspark.__file__), "data", "mllib", "sample_multiclass_classification_data.txt")
    if not os.path.exists(path):
        pytest.skip(f"pyspark does not ship {path}")
    return path


def test_app_train_then_predict_then_evaluate(spark, tmp_path, capsys):
    from spark.app import main

    data, model_dir, out_dir = sample_data(), str(tmp_path / "model"), str(tmp_path / "pred")
    # the README's example: 75 rows a worker at the default batch of 32 is 3 steps a pass, under the default
    # window of 4 (epoch 1 ended no exchange, and no epoch was ever reported)
    assert main(["--mode", "train", "--dir", model_dir, data, "--epochs", "60", "--backend", "numba", "--seed", "1",
                 "--json-out", str(tmp_path / "train.json")]) == 0
    captured = capsys.readouterr()
    trained = json.loads(captured.out.strip().splitlines()[-1])
    assert json.loads((tmp_path / "train.json").read_text()) == trained
    assert trained["layers"] == [4, 100, 3]               # inferred from the data
    # where the server listens, one line per epoch on stderr while it trains (stderr is no terminal here: no
    # bar), then why it stopped
    assert "ffps: training [4, 100, 3] on 2 workers, mode=async, server tcp://127.0.0.1:" in captured.err
    epochs = [ln for ln in captured.err.splitlines() if ln.startswith("ffps epoch ")]
    assert epochs[0].startswith("ffps epoch 1/60 loss ") and "samples/s staleness" in epochs[0]
    assert len(epochs) == len(trained["objective_history"]) and trained["stop_reason"] in ("tol", "maxIter")
    assert len(epochs) == 60 or trained["stop_reason"] == "tol"
    assert f"ffps: training stopped: {trained['stop_message']}" in captured.err
    assert trained["train_accuracy"] >= 0.85 and trained["warnings"] == []
    assert os.path.isdir(os.path.join(model_dir, "metadata")) and os.path.isdir(os.path.join(model_dir, "data"))

    assert main(["--mode", "predict", "--dir", model_dir, data, "--output", out_dir]) == 0
    predicted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert predicted["rows"] == 150
    rows = spark.read.parquet(out_dir).collect()
    assert len(rows) == 150 and {"label", "prediction", "probability"} <= set(rows[0].asDict())
    acc = sum(r.label == r.prediction for r in rows) / len(rows)
    assert abs(acc - trained["train_accuracy"]) < 1e-9

    assert main(["--mode", "evaluate", "--dir", model_dir, data]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(evaluated["accuracy"] - acc) < 1e-9 and evaluated["rows"] == 150


def test_app_reads_csv_and_parquet_feature_columns(spark, tmp_path, capsys):
    from spark.app import main

    rows = [(float(i % 3), i % 3 + 0.1 * (i % 5), -(i % 3) + 0.05 * (i % 7)) for i in range(60)]
    df = spark.createDataFrame(rows, ["label", "a", "b"])
    df.coalesce(1).write.option("header", True).csv(str(tmp_path / "d.csv"))
    df.write.parquet(str(tmp_path / "d.parquet"))
    for data in (str(tmp_path / "d.csv"), str(tmp_path / "d.parquet")):
        model_dir = data + ".model"
        assert main(["--mode", "train", "--dir", model_dir, data, "--epochs", "40", "--batch-size", "8",
                     "--backend", "numpy", "--layers", "2,16,3"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["train_accuracy"] >= 0.9
        assert main(["--mode", "evaluate", "--dir", model_dir, data]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] >= 0.9


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "-5"], "--epochs (maxIter) must be an integer >= 1, got -5"),
    (["--batch-size", "0"], "--batch-size (blockSize) must be an integer >= 1, got 0"),
    (["--learning-rate", "-0.1"], "--learning-rate (stepSize) must be a positive number, got -0.1"),
    (["--trainer", "sync", "--window", "4"], "--window (communicationWindow) must be 1 in sync mode, got 4"),
    (["--layers", "4,0,3"], "must be positive"),
    (["--ps-port", "70000"], "--ps-port (psPort) must be 0..65535, got 70000"),
    (["--max-retries", "-1"], "--max-retries (maxRetries) must be an integer >= 0, got -1"),
    (["--resume"], "resume=True needs --checkpoint-dir (checkpointDir)"),
    (["--checkpoint-interval", "5"], "--checkpoint-interval 5 needs --checkpoint-dir: without a directory no "
                                     "checkpoint is written"),
    (["--json-out", "/"], "--json-out '/' is a directory; give a file path"),
    (["--json-out", "/no/such/dir/r.json"], "its directory '/no/such/dir' does not exist or cannot be written"),
])
def test_app_training_flags_are_checked_before_spark_starts(tmp_path, capsys, monkeypatch, flags, message):
    from spark import app

    def no_session(master=None):
        raise AssertionError("Spark started before the flags were checked")
    monkeypatch.setattr(app, "session", no_session)
    assert app.main(["--mode", "train", "--dir", str(tmp_path / "m"), "data.txt", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_app_server_and_recovery_flags_reach_the_estimator():
    """An operator pins the server's port for a firewall, or resumes a fit whose driver died, from spark-submit."""
    from spark import FeedForwardNetworkPSClassifier
    from spark.app import build_parser, classifier

    args = build_parser().parse_args(["--mode", "train", "--dir", "m", "d.txt", "--ps-host", "10.0.0.2", "--ps-port",
                                      "7070", "--ps-shards", "2", "--checkpoint-dir", "/ck", "--checkpoint-interval",
                                      "50", "--resume", "--max-retries", "0", "--worker-timeout", "12.5"])
    clf = classifier(args, [4, 8, 3])
    assert (clf.getPsHost(), clf.getPsPort(), clf.getPsShards(), clf.getCheckpointDir(), clf.getCheckpointInterval(),
            clf.getResume(), clf.getMaxRetries(), clf.getWorkerTimeout()) == \
        ("10.0.0.2", 7070, 2, "/ck", 50, True, 0, 12.5)
    default = classifier(build_parser().parse_args(["--mode", "train", "--dir", "m", "d.txt"]), [4, 8, 3])
    for name in ("psHost", "psPort", "psShards", "checkpointDir", "checkpointInterval", "resume", "maxRetries",
                 "workerTimeout"):              # the flags' defaults are the Params'
        assert default.getOrDefault(name) == FeedForwardNetworkPSClassifier().getOrDefault(name), name


def test_app_errors_are_clear(spark, tmp_path, capsys):
    from spark.app import main

    data = sample_data()
    assert main(["--mode", "predict", "--dir", str(tmp_path / "nothing"), data]) == 2
    assert "is not a saved ffps model" in capsys.readouterr().err
    assert main(["--mode", "train", "--dir", str(tmp_path / "m"), data, "--layers", "5,10,3",
                 "--backend", "numpy"]) == 2
    assert "has vectors of size 4 but layers[0] is 5; set --layers to start with the feature width" \
        in capsys.readouterr().err                       # the app's own check, before a training stage
    csv = str(tmp_path / "d.csv")
    spark.createDataFrame([(0.0, 1.0), (1.0, 2.0)], ["target", "a"]).coalesce(1).write.option("header", True).csv(csv)
    for argv, said in ((["--mode", "train", "--dir", str(tmp_path / "m"), csv],
                        "--label-col 'label' is not a column of the DataFrame; columns: ['target', 'a', 'features']"),
                       (["--mode", "train", "--dir", str(tmp_path / "m"), csv, "--format", "parquet"],
                        f"cannot read '{csv}' as parquet: file:{csv}/part-"),
                       (["--mode", "train", "--dir", str(tmp_path / "m"), csv, "--workers", "3"],
                        "numWorkers=3 needs 3 training tasks running at once")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ffps: error: ") and said in err and len(err.splitlines()) == 1, err
        assert "An error occurred while calling" not in err


def test_ffps_train_still_runs_the_spark_free_demo(capsys):
    from spark.app import main

    assert main(["train", "--epochs", "1", "--backend", "numpy"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_spark_package_does_not_import_pyspark_until_used():
    code = ("import sys, spark, spark.app; assert 'pyspark' not in sys.modules, 'pyspark imported eagerly'; "
            "from spark import FeedForwardNetworkPSClassifier; assert 'pyspark' in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_console_script_points_at_the_app():
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["ffps"] == "spark.app:main"
    assert glob.glob(os.path.join(REPO, "spark", "app.py"))


def test_a_missing_input_path_is_a_one_line_error(spark, tmp_path, capsys):
    from spark.app import main

    for data in ("/no/such/file.parquet", "/no/such/data.txt"):
        assert main(["--mode", "train", "--dir", str(tmp_path / "m"), data]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ffps: error: cannot read '{data}' as ") and "does not exist" in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_epoch_reporter_draws_one_bar_on_a_terminal_and_lines_elsewhere():
    import io
    import logging

    from spark.console import report_epochs

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    log = logging.getLogger("spark.estimator")
    figures = {"epoch": 1, "loss": 0.5, "accuracy": 0.75, "rows": 10, "samples_per_s": 1234.4, "staleness": 0.5}
    for stream in (Terminal(), io.StringIO()):
        with report_epochs(stream):
            for e in (1, 2):
                log.info("ffps epoch", extra={"ffps_epoch": dict(figures, epoch=e), "ffps_epochs": 4})
            log.info("unrelated line")                   # only epoch and stop lines are the reporter's
            log.info("ffps: training stopped: ran all 4 epochs (maxIter)")
        text = stream.getvalue()
        assert "unrelated" not in text
        if isinstance(stream, Terminal):
            assert text.count("\r[") == 2 and "\r[######------------------] epoch 1/4".replace("-", ".") in text
            assert "\r[############............] epoch 2/4 loss 0.5000 accuracy 0.7500 1234 samples/s" in text
            assert text.endswith("\nffps: training stopped: ran all 4 epochs (maxIter)\n")
        else:
            assert text.splitlines() == ["ffps epoch 1/4 loss 0.5000 accuracy 0.7500 1234 samples/s staleness 0.5",
                                         "ffps epoch 2/4 loss 0.5000 accuracy 0.7500 1234 samples/s staleness 0.5",
                                         "ffps: training stopped: ran all 4 epochs (maxIter)"]
    assert log.level == logging.NOTSET and not log.handlers    # left as it was


def _snapshot(root) -> dict:
    """{relative path: bytes} of every file under ``root``."""
    out = {}
    for path in glob.glob(os.path.join(root, "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_app_never_writes_over_data_it_was_not_told_to_replace(spark, tmp_path, capsys, monkeypatch):
    import shutil

    from spark import FeedForwardNetworkPSClassifier
    from spark.app import main

    data = str(tmp_path / "sample.txt")                  # a copy: a bug here must not eat pyspark's own file
    shutil.copy(sample_data(), data)
    model_dir = str(tmp_path / "model")
    assert main(["--mode", "train", "--dir", model_dir, data, "--epochs", "2", "--backend", "numpy"]) == 0
    capsys.readouterr()
    model_files, data_bytes = _snapshot(model_dir), open(data, "rb").read()

    def no_training(self, dataset):
        raise AssertionError("the app trained before finding that it could not save")
    monkeypatch.setattr(FeedForwardNetworkPSClassifier, "_fit", no_training)
    assert main(["--mode", "train", "--dir", model_dir, data, "--backend", "numpy"]) == 2
    assert f"--dir {model_dir!r} already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["--mode", "train", "--dir", data, data, "--backend", "numpy", "--overwrite"]) == 2
    assert f"--dir {data!r} would write over the input data" in capsys.readouterr().err
    monkeypatch.undo()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    assert main(["--mode", "predict", "--dir", model_dir, data, "--output", str(existing)]) == 2
    assert f"--output {str(existing)!r} already exists; pass --overwrite" in capsys.readouterr().err
    assert (existing / "notes.txt").read_text() == "keep me"
    for output, what in ((data, "input data"), (model_dir, "model"), (os.path.join(model_dir, "pred"), "model")):
        assert main(["--mode", "predict", "--dir", model_dir, data, "--output", output, "--overwrite"]) == 2
        assert f"--output {output!r} would write over the {what}" in capsys.readouterr().err
    assert _snapshot(model_dir) == model_files and open(data, "rb").read() == data_bytes

    assert main(["--mode", "predict", "--dir", model_dir, data, "--output", str(existing), "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 150
    assert not (existing / "notes.txt").exists() and spark.read.parquet(str(existing)).count() == 150


def test_app_data_that_does_not_fit_the_model_is_one_line(spark, tmp_path, capsys):
    """predict and evaluate on data of another width: the schema's numeric columns are counted before any job;
    what only a job finds (a libsvm index past the model's width, a Vector column of another size) ends in one
    'ffps: error:' line naming it, exit status 2."""
    from pyspark.ml.linalg import Vectors

    from spark.app import main

    data, model_dir = sample_data(), str(tmp_path / "model")
    assert main(["--mode", "train", "--dir", model_dir, data, "--epochs", "2", "--backend", "numpy"]) == 0
    capsys.readouterr()
    wide = spark.createDataFrame([(float(i % 3),) + tuple(float(i + k) for k in range(6)) for i in range(12)],
                                 ["label"] + [f"x{k}" for k in range(6)])
    wide.coalesce(1).write.option("header", True).csv(str(tmp_path / "wide.csv"))
    assert main(["--mode", "evaluate", "--dir", model_dir, str(tmp_path / "wide.csv")]) == 2
    assert "6 numeric feature columns besides 'label' but the model takes 4 features" in capsys.readouterr().err

    (tmp_path / "wide.txt").write_text("1 1:0.5 2:0.1 7:0.3\n0 1:0.2 3:0.4\n")
    assert main(["--mode", "predict", "--dir", model_dir, str(tmp_path / "wide.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ffps: error: a Spark job failed on the input data: ")
    assert "out of bounds for vector of size 4" in err

    vectors = spark.createDataFrame([(0.0, Vectors.dense([0.1] * 5))], ["label", "features"])
    vectors.write.parquet(str(tmp_path / "v.parquet"))
    assert main(["--mode", "evaluate", "--dir", model_dir, str(tmp_path / "v.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "ffps: error: a Spark job failed on the input data: feature vectors have width 5 but the model " \
                  "expects 4"

    # a csv column with a cell that is not a number is text: refused by name (it was left out of the features)
    text = spark.createDataFrame([(0.0, 0.1, "0.2"), (1.0, 0.3, " 0.4"), (1.0, 0.5, "n/a")], ["label", "a", "b"])
    text.coalesce(1).write.option("header", True).csv(str(tmp_path / "text.csv"))
    for mode, extra in (("train", ["--epochs", "1"]), ("evaluate", [])):
        out_dir = model_dir if mode == "evaluate" else str(tmp_path / "text_model")
        assert main(["--mode", mode, "--dir", out_dir, str(tmp_path / "text.csv"), *extra]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"ffps: error: {tmp_path / 'text.csv'}: column 'b' is string, not numeric: its value 'n/a' is not a "
            f"number; every column besides 'label' is a feature and must be numeric")
    assert not (tmp_path / "text_model").exists()
    # a csv file read as libsvm: the reader's failure, and which reading was asked for
    assert main(["--mode", "evaluate", "--dir", model_dir, "--format", "libsvm", str(tmp_path / "wide.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('ffps: error: a Spark job failed on the input data: For input string: "')
    assert err.endswith("(read as libsvm: --format csv or parquet reads other files)")
