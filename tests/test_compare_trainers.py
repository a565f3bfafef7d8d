"""bench/compare_trainers.py: the quick comparison runs end to end; bad arguments fail before any training."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "compare_trainers.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_script():
    spec = importlib.util.spec_from_file_location("compare_trainers_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """One --quick run (numpy backend: no per-process numba kernel load, so ~30 s on 2 cores)."""
    out = tmp_path_factory.mktemp("compare")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--backend", "numpy", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "compare_trainers.json") as f:
        return json.load(f), out, proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_reports_every_trainer_on_every_dataset(quick_report):
    report, out, stdout = quick_report
    mod = load_script()
    assert set(report["datasets"]) == set(mod.DATASETS)
    assert report["machine"]["cpus"] == os.cpu_count() and report["settings"]["backend"] == "numpy"
    for dataset, block in report["datasets"].items():
        assert list(block["trainers"]) == list(mod.TRAINERS), dataset
        for name, row in block["trainers"].items():
            where = f"{dataset}/{name}"
            for key in ("test_accuracy", "macro_f1", "train_accuracy"):
                assert 0.0 <= row[key] <= 1.0, (where, key, row[key])
            assert row["train_s"] > 0 and row["wall_s"] >= row["train_s"] and row["samples_per_s"] > 0, where
            assert row["samples"] > 0 and row["final_train_loss"] > 0, where
            curve = row["curve"]
            assert len(curve["seconds"]) == len(curve["loss"]) == len(curve["epoch"]) >= 1, where
            assert curve["seconds"] == sorted(curve["seconds"]) and all(t >= 0 for t in curve["seconds"]), where
            # the budget is the same for every trainer on a dataset
            assert row["settings"]["epochs"] == block["budget"]["epochs"], where
            assert row["settings"]["batch_size"] == block["budget"]["batch_size"], where
            if dataset == "digits":
                # quick budget: seen 0.90-0.97 over seeds 0-3 on numpy and numba (eamsgd lowest); 0.8 keeps a margin
                assert row["test_accuracy"] > 0.8, (where, row["test_accuracy"])
        assert block["info"]["n_test"] > 0
        for kind in ("bars", "loss"):
            png = out / f"{dataset}_{kind}.png"
            data = png.read_bytes()
            assert data[:8] == PNG_SIGNATURE and len(data) > 20_000, (png, len(data))
    assert "macro F1" in stdout and "downpour" in stdout


@pytest.mark.parametrize("argv,needle", [
    (["--workers", "0"], "--workers"),
    (["--workers", "two"], "two"),
    (["--trainers", "single,hogwild"], "hogwild"),
    (["--datasets", "mnist"], "mnist"),
    (["--epochs", "-1"], "-1"),
    (["--timeout", "0"], "--timeout"),
    (["--backend", "tpu"], "tpu"),
])
def test_bad_arguments_fail_before_training(argv, needle, tmp_path, capsys):
    mod = load_script()
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        mod.main(argv + ["--out", str(out), "--no-plot"])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()                   # nothing was trained or written


def test_cupy_without_gpu_is_a_clear_error(tmp_path, capsys):
    from core.backends import available_backends

    if "cupy" in available_backends():
        pytest.skip("cupy is usable here")
    with pytest.raises(SystemExit) as exc:
        load_script().main(["--backend", "cupy", "--out", str(tmp_path / "never")])
    assert exc.value.code == 2               # argparse's usage error, not a crash inside training
    assert "--backend 'cupy' cannot be used here: backend 'cupy' requested but" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
