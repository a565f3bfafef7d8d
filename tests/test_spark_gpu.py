"""GPU addresses -> CUDA ordinals, the training task's use of them, and the local-cluster[2,1,1024] run.

The cluster test runs in a subprocess (one SparkContext per process): fake discovery script, one GPU per
executor, CUDA_VISIBLE_DEVICES=3,5 on the executors, a stage-level ResourceProfile on the training stage.
It also runs fit/transform/save/load on real executor processes, catching closure-pickling bugs.
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from tests.spark_helpers import REPO, vector_batch

from spark.gpu import cuda_ordinal, supports_stage_level_scheduling, task_gpu, unused_gpu_warning


@pytest.mark.parametrize("address,visible,ordinal", [
    ("0", None, 0), ("3", None, 3), ("5", "3,5", 1), ("3", "3,5", 0), ("2", "0,1,2,3", 2),
    ("GPU-aa", "GPU-bb,GPU-aa", 1), ("7", " 7 ", 0),
])
def test_cuda_ordinal_maps_through_visible_devices(address, visible, ordinal):
    assert cuda_ordinal(address, visible) == ordinal


def test_cuda_ordinal_rejects_invisible_gpus():
    with pytest.raises(ValueError, match="assigned GPU '4' .* CUDA_VISIBLE_DEVICES='3,5' does not list it"):
        cuda_ordinal("4", "3,5")
    with pytest.raises(ValueError, match="not an ordinal and CUDA_VISIBLE_DEVICES is unset"):
        cuda_ordinal("GPU-aa", None)


def test_use_gpu_on_the_cpu_names_its_cause():
    """useGpu=True that trained on the CPU: no GPU given (Spark's confs), GPUs given to a CPU backend the user
    chose (the backend), or 'auto' beside given GPUs without a usable cupy (the install)."""
    def workers(backend, *addresses):
        return {i: {"backend": backend, "gpu_address": a} for i, a in enumerate(addresses)}

    assert unused_gpu_warning("auto", workers("cupy", "0", "1")) is None
    none_given = unused_gpu_warning("numpy", workers("numpy", None, None))
    assert none_given.startswith("useGpu=True, but no GPU reached the training tasks (the training tasks trained "
                                 "on numpy)") and "spark.task.resource.gpu.amount" in none_given
    assert unused_gpu_warning("numba", workers("numba", "5", "5")) == (
        "useGpu=True, but backend='numba' trains on the CPU: GPU 5 given to the tasks sat idle; set "
        "backend='auto' or 'cupy'")
    no_cupy = unused_gpu_warning("auto", workers("numba", "0", "1"))
    assert no_cupy.startswith("useGpu=True and the tasks were given GPUs 0, 1, but the training tasks trained on "
                              "numba: cupy is not importable") and "ffps[gpu]" in no_cupy


def test_task_gpu_reads_task_resources(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert task_gpu({"gpu": SimpleNamespace(addresses=["5"])}) == ("5", 1)
    assert task_gpu({}) == (None, None)
    assert task_gpu({"gpu": SimpleNamespace(addresses=[])}) == (None, None)


def test_stage_level_scheduling_only_where_supported():
    assert supports_stage_level_scheduling("local-cluster[2,1,1024]")
    assert supports_stage_level_scheduling("spark://master:7077")
    assert supports_stage_level_scheduling("yarn") and supports_stage_level_scheduling("k8s://https://api:6443")
    assert not supports_stage_level_scheduling("local[2]") and not supports_stage_level_scheduling("local[*]")


def test_gpu_profile_asks_one_gpu_per_task():
    from spark.gpu import gpu_profile

    profile = gpu_profile()
    assert profile.taskResources["gpu"].amount == 1.0


class FakeBarrierContext:
    def __init__(self, worker, gpus):
        self.worker, self.gpus = worker, gpus

    def partitionId(self):
        return self.worker

    def resources(self):
        return {"gpu": SimpleNamespace(addresses=self.gpus)} if self.gpus else {}

    def cpus(self):
        return 1


def run_task_beside_a_peer_of_7_rows(monkeypatch, backend, may_reshuffle=False, rows=None, resolve=None):
    """The task function of worker 1 (10 rows) run in-process with a fake barrier context against a real sync
    server, worker 0 (7 rows) played by a thread -> (run_worker's arguments, the gathered reports, the task's
    stats). rows: worker 1's 10 feature rows as vector_column takes them (default 3 dense features);
    resolve: what the backend settings resolve to (default themselves)."""
    import threading

    import pyspark
    import ps.worker
    import core
    from ps import ParameterClient, ParameterServer

    from spark.data import partition_report
    from spark.training import DATA_BARRIER, make_train_function

    calls = {}

    def fake_run_worker(cfg, worker, X, y, **kw):
        calls.update(worker=worker, X=X, y=y, backend=cfg["spec"].backend, **kw)
        return {"worker_id": worker}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(pyspark.BarrierTaskContext, "get", classmethod(lambda cls: FakeBarrierContext(1, ["5"])))
    monkeypatch.setattr(ps.worker, "run_worker", fake_run_worker)
    monkeypatch.setattr(core, "resolve_backend_name", lambda name: (resolve or {}).get(name, name))
    rows = rows or [[1, 2, 3], [4, 5, 6]] * 5
    width = rows[0][1] if isinstance(rows[0], tuple) else len(rows[0])
    layers = [width, 4, 2]
    with ParameterServer(np.zeros(width * 4 + 4 + 4 * 2 + 2, np.float32), mode="sync", num_workers=2,
                         secure=False, layers=layers, barrier_timeout=20.0, epochs=1, batch_size=4,
                         backend=backend, seed=0, worker_timeout=20.0) as server:
        cfg = server.client_config()
        seven = partition_report(np.zeros(7), rows=7, null_features=0, min_width=width, max_width=width,
                                 null_labels=0)
        gathered = {}

        def worker0():
            with ParameterClient(cfg, worker_id=0, timeout=20.0) as client:
                gathered["reports"] = client.gather(DATA_BARRIER, seven)
        peer = threading.Thread(target=worker0)
        peer.start()
        fn = make_train_function(cfg, attempt=0, features_col="f", label_col="label", may_reshuffle=may_reshuffle)
        # 10 rows beside the peer's 7, as the driver's own shuffle may leave them: cut to 7 (may_reshuffle is
        # for the input's own partitions)
        batches = [vector_batch(rows, [0.0, 1.0] * 5)]
        out = list(fn(iter(batches)))
        peer.join(30)
    return calls, gathered, json.loads(out[0].column(1)[0].as_py())


@pytest.mark.parametrize("backend,expect_device", [("cupy", 1), ("numba", None)])
def test_training_task_hands_the_mapped_ordinal_to_the_backend(monkeypatch, backend, expect_device):
    """cupy gets CUDA device 1 for address 5, and the shard is cut to worker 0's 7 rows."""
    calls, gathered, stats = run_task_beside_a_peer_of_7_rows(monkeypatch, backend)
    assert [r["rows"] for r in gathered["reports"]] == [7, 10]
    assert calls["device"] == expect_device and calls["backend"] == backend and calls["worker"] == 1
    assert calls["X"].shape == (7, 3) and calls["X"].dtype == np.float32 and calls["X"].flags.c_contiguous
    assert calls["y"].tolist() == [0, 1, 0, 1, 0, 1, 0]               # cut to the smallest shard (7 rows)
    assert stats["gpu_address"] == "5" and stats["cuda_ordinal"] == 1 and stats["partition_rows"] == [7, 10]
    assert "uneven" not in stats


SPARSE_ROWS = [("sparse", 40, [3 * i], [1.0 + i]) for i in range(10)]      # 2.5 % of 40 features non-zero


def test_a_gpu_task_makes_its_sparse_rows_dense_within_the_bound(monkeypatch):
    calls, _, stats = run_task_beside_a_peer_of_7_rows(monkeypatch, "cupy", rows=SPARSE_ROWS)
    expect = np.zeros((7, 40), np.float32)
    expect[range(7), [3 * i for i in range(7)]] = [1.0 + i for i in range(7)]
    assert calls["backend"] == "cupy" and calls["device"] == 1 and stats["gpu_declined"] is None
    assert isinstance(calls["X"], np.ndarray)
    np.testing.assert_array_equal(calls["X"], expect)
    assert stats["sparse_rows"] is False


def test_auto_trains_sparse_rows_too_large_to_make_dense_on_the_cpu(monkeypatch):
    """backend='auto' resolved to cupy, and 10 rows x 40 features over the (lowered) bound: the worker trains
    its sparse rows on the CPU backend, says why in its stats, and the driver's warning names it."""
    import spark.data
    from core.backends import cpu_backend_name
    from core.sparse import CsrRows

    monkeypatch.setattr(spark.data, "GPU_DENSE_MAX_BYTES", 1000)           # 10 x 40 x 4 = 1600 bytes dense
    calls, _, stats = run_task_beside_a_peer_of_7_rows(monkeypatch, "auto", rows=SPARSE_ROWS,
                                                       resolve={"auto": "cupy"})
    assert calls["backend"] == cpu_backend_name() and calls["device"] is None
    assert isinstance(calls["X"], CsrRows) and calls["X"].shape == (7, 40)
    np.testing.assert_array_equal(calls["X"].toarray()[:, :21:3], np.diag(np.arange(1.0, 8.0)))
    assert stats["gpu_declined"] == (f"10 sparse rows of 40 features would be {1600 / 2**30:.1f} GiB dense for cupy: "
                                     f"trained on {cpu_backend_name()} by their sparse rows")
    said = unused_gpu_warning("auto", {0: {"backend": "cupy"}, 1: {**stats, "backend": calls["backend"]}})
    assert said.startswith("GPU left unused where a partition was too sparse and large to make dense") and \
        "worker 1: 10 sparse rows of 40 features" in said


def test_cupy_refuses_sparse_rows_too_large_to_make_dense_before_training(monkeypatch):
    import spark.data

    monkeypatch.setattr(spark.data, "GPU_DENSE_MAX_BYTES", 1000)
    calls, gathered, stats = run_task_beside_a_peer_of_7_rows(monkeypatch, "cupy", rows=SPARSE_ROWS)
    assert calls == {} and gathered["reports"][1]["gpu_dense_bytes"] == 1600
    assert stats["data_error"].startswith(
        "featuresCol 'f' holds sparse vectors and backend='cupy' trains dense rows: a partition of 10 rows x 40 "
        "features is 0.0 GiB dense, over the 0 GiB a GPU task makes dense; set backend='auto'")


def test_the_inputs_own_uneven_partitions_stop_the_task_for_a_shuffle(monkeypatch):
    """The same 7 and 10 rows as the input's own partitions (may_reshuffle): 3 of 17 rows would be cut, so the
    task trains nothing and says why; the driver then shuffles (test_spark_estimator)."""
    calls, _, stats = run_task_beside_a_peer_of_7_rows(monkeypatch, "numba", may_reshuffle=True)
    assert calls == {} and "3 of 17 rows would go unused" in stats["uneven"]


@pytest.mark.timeout(420)
@pytest.mark.one_spark_line
def test_local_cluster_training_tasks_get_mapped_gpus(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "tests.spark_helpers", "cluster-job", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["master"] == "local-cluster[2,1,1024]"
    workers = report["workers"]
    assert sorted(workers) == ["0", "1"]
    for w in workers.values():
        assert w["gpu_address"] == "5", "each training task receives its GPU through the ResourceProfile"
        assert w["cuda_visible_devices"] == "3,5"
        assert w["cuda_ordinal"] == 1, "physical GPU 5 is CUDA device 1 when CUDA_VISIBLE_DEVICES=3,5"
    assert len({w["pid"] for w in workers.values()}) == 2, "tasks ran in two executor processes"
    assert report["accuracy"] >= 0.9 and report["same_after_load"]
    # the numpy backend left the given GPU idle, and the warning says so (not "no GPU reached them")
    assert report["warnings"] == ["useGpu=True, but backend='numpy' trains on the CPU: GPU 5 given to the tasks sat "
                                  "idle; set backend='auto' or 'cupy'"]
