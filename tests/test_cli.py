"""The ``ffps`` console script: the digits main job end to end, and its errors."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env_backend=None, timeout=180):
    import os

    env = dict(os.environ)
    env.pop("FFPS_BACKEND", None)
    if env_backend:
        env["FFPS_BACKEND"] = env_backend
    return subprocess.run([sys.executable, "-m", "core.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_train_digits_prints_progress_and_accuracy():
    out = run("train", "--backend", "numba", "--epochs", "20")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert sum(line.startswith("epoch") for line in lines) == 20
    last = lines[-1].split()
    assert last[:2] == ["test", "accuracy"] and float(last[2]) >= 0.96
    assert "backend numba" in lines[-1]


def test_backend_from_environment():
    out = run("train", "--epochs", "1", "--layers", "64,10", env_backend="numpy")
    assert out.returncode == 0, out.stderr
    assert "backend numpy" in out.stdout


def test_bad_flags_are_clear_errors():
    out = run("train", "--layers", "64,0,10", "--epochs", "1")
    assert out.returncode == 2 and "layer size 0 at position 1" in out.stderr
    out = run("train", "--layers", "64,x", "--epochs", "1")
    assert out.returncode == 2 and "comma-separated integers" in out.stderr
    out = run("train", "--layers", "32,10", "--epochs", "1")
    assert out.returncode == 2 and "64 features per row but layers[0] is 32" in out.stderr
    out = run("train", "--backend", "gpu")
    assert out.returncode == 2 and "invalid choice: 'gpu'" in out.stderr


def test_train_with_a_reduced_precision():
    out = run("train", "--backend", "numpy", "--epochs", "2", "--precision", "bf16", "--cuda-graphs")
    assert out.returncode == 0, out.stderr
    assert "precision='bf16'" in out.stdout
    out = run("train", "--precision", "fp8", "--epochs", "1")
    assert out.returncode == 2 and "invalid choice: 'fp8'" in out.stderr
