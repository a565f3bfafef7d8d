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
    assert X.shape[1] == bench.MID_LAYERS[0] and len(set(y.tolist())) == bench.MID_LAYERS[-1]   # fits the mid net


def test_scale_model_adds_workers_until_the_server_or_the_machine_is_the_limit():
    bench = load("scale_bench")
    parts = {"num_params": 1000, "plain_rt_s": 0.001, "curve_rt_s": 0.003, "apply_s": 0.0005,
             "step_s": {"1": 0.002}, "step_under_load_s": {"2x1": 0.004}}
    kw = dict(tau=4, batch=100, cores_per_worker=1)
    one = bench.model(parts, 1, **kw)
    assert math.isclose(one, 4 * 100 / (4 * 0.002 + 0.003))                     # a window: 4 steps + an exchange
    assert math.isclose(bench.model(parts, 2, **kw), 2 * one)                  # separate machines add up
    server = 4 * 100 / (0.0005 + (0.003 - 0.001) / 2 + 0.001 / 2)              # one exchange at a time
    assert math.isclose(bench.model(parts, 64, **kw), server)
    # the same two workers on one machine step at their measured loaded pace and share its 2 cores
    here = bench.model(parts, 2, machine_cores=2, **kw)
    assert math.isclose(here, min(2 * 4 * 100 / (4 * 0.004 + 0.003), 2 * 4 * 100 / (4 * 0.004 + 0.003 + 0.0005)))
    # over a network the exchange also moves 2 x 4 kB and waits 2 x latency
    slow = bench.model(parts, 1, bandwidth=4000 * 2 / 0.001, latency=0.0005, **kw)
    assert math.isclose(slow, 4 * 100 / (4 * 0.002 + 0.003 + 0.001 + 0.001))
    # pipelined, the exchange hides behind the window's steps until it is the longer of the two
    assert math.isclose(bench.model(parts, 1, pipelined=True, **kw), 4 * 100 / (4 * 0.002))
    assert math.isclose(bench.model(parts, 1, bandwidth=4000 * 2 / 0.001, latency=0.005, pipelined=True, **kw),
                        4 * 100 / (0.003 + 0.001 + 0.01))
    assert math.isclose(bench.model(parts, 64, pipelined=True, **kw), server)     # the server's cap stays


def test_scale_model_of_the_automatic_window_takes_the_pacers_steps_a_push():
    bench = load("scale_bench")
    # 1 ms steps, 4 ms exchanges: 16 steps keep the exchange a fifth of the window
    assert bench.paced_window(0.001, 0.004) == 16
    assert bench.paced_window(0.001, 0.0041) == 16                 # as the pacer rounds: whole steps (16.4 -> 16)
    assert bench.paced_window(0.001, 0.00425) == 20                # then up to whole windows of 4 (17 -> 20)
    assert bench.paced_window(0.001, 1.0) == 64                    # the bound
    assert bench.paced_window(0.001, 1.0, steps_per_pass=100) == 24    # a quarter of a pass, in windows of 4
    assert bench.paced_window(0.001, 1.0, steps_per_pass=20) == 4      # too short to grow
    assert bench.paced_window(0.01, 0.0001) == 4                   # exchanges cheap: one window
    parts = {"num_params": 1000, "plain_rt_s": 0.001, "curve_rt_s": 0.004, "apply_s": 0.0005,
             "step_s": {"1": 0.001}}
    auto = bench.model(parts, 1, tau=None, batch=100, cores_per_worker=1)
    assert math.isclose(auto, bench.model(parts, 1, tau=16, batch=100, cores_per_worker=1))
    assert math.isclose(auto, 16 * 100 / (16 * 0.001 + 0.004))


def test_syscall_counts_are_read_from_straces_summary_table(tmp_path):
    bench = load("round_trip_syscalls")
    table = tmp_path / "s.txt"
    table.write_text("% time     seconds  usecs/call     calls    errors syscall\n"
                     "------ ----------- ----------- --------- --------- ----------------\n"
                     " 41.10    0.123456          12     10000           poll\n"
                     "  9.00    0.010000           3      3003        17 recvfrom\n"
                     "------ ----------- ----------- --------- --------- ----------------\n"
                     "100.00    0.133456          10     13003        17 total\n")
    assert bench._counts(str(table)) == {"poll": 10000, "recvfrom": 3003}


def test_hashed_text_is_sparse_like_hashingtf_and_the_wide_rows_train_by_entries():
    from core.datasets import hashed_text

    X, y = hashed_text(400, width=1 << 12, words=10, vocabulary=200)
    assert X.shape == (400, 1 << 12) and X.dtype.name == "float32" and list(y[:4]) == [0, 1, 0, 1]
    counts = X.sum(axis=1).A.ravel()
    assert (counts == 10).all() and (X.getnnz(axis=1) <= 10).all()      # term counts: repeated words add up
    seen = [set(X[y == c].indices.tolist()) for c in (0, 1)]
    assert len(seen[0] & seen[1]) < 0.2 * len(seen[0])                   # the halves of the vocabulary differ
    bench = load("ps_bench")
    out = {"wide": []}
    bench.wide_section(300, out, epochs=1)
    alone, *runs = out["wide"]
    assert alone["workers"] == 0 and [(r["mode"], r["workers"], r["shards"], r["pipeline"]) for r in runs] == [
        ("async", 1, 1, False), ("async", 2, 1, False), ("async", 2, 1, True), ("async", 2, 2, False),
        ("sync", 2, 1, False)]
    assert all(r["delta_replies"] > 0 and r["seconds"] > 0 for r in runs)
