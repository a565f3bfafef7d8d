"""The benchmarks' new rows run and report what they claim (small sizes; no timing is asserted)."""
import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_rows_time_whole_epochs_that_train():
    bench = load("step_bench")
    X, y = bench.trainer_data([64, 20, 10], 3000)
    assert X.shape == (3000, 64) and set(y) <= set(range(10))
    out = bench.trainer_bench({"tiny[64,20,10]x100": ([64, 20, 10], 100)}, ["numpy"], False, True, 3000)
    row = out["tiny[64,20,10]x100"]
    assert row["rows"] == 3000 and row["batch"] == 100
    r = row["ffps_numpy"]
    assert r["samples_per_s"] > 0 and r["epoch_s"] > 0
    assert math.isfinite(r["train_loss"]) and r["train_loss"] < math.log(10)   # it learned something


def test_mid_size_data_is_learnable_and_shaped_like_mnist():
    bench = load("ps_bench")
    X, y = bench.mid_data(500)
    assert X.shape == (500, 784) and X.dtype.name == "float32" and set(y) <= set(range(10))
    assert bench.MID_LAYERS == [784, 256, 256, 10] and bench.GPU_OPTIONS["pipeline"] is True
