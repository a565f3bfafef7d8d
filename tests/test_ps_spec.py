"""The training spec and the mode objects: one place that checks every setting, one class per mode."""
import dataclasses
import pickle

import numpy as np
import pytest

from ps import ParameterServer
from ps.modes import DEFAULT_WINDOW, MODE_NAMES, MODES, Mode, get_mode
from ps.protocol import FLAG_ELASTIC, FLAG_LOCAL_WEIGHTS
from ps.spec import SpecError, TrainingSpec, add_spec_flags, spec_from_flags


def test_defaults_are_normalised_once():
    spec = TrainingSpec(layers=[64.0, 100, 10], num_workers=3, seed=-1)
    assert spec.layers == (64, 100, 10) and spec.mode == "async" and spec.tau == DEFAULT_WINDOW == 4
    assert spec.alpha == pytest.approx(0.9 / 3)              # the EASGD authors' beta / p
    assert spec.seed == 2 ** 32 - 1                          # one reduction of Spark's signed hash seeds
    assert spec.num_params == 64 * 100 + 100 + 100 * 10 + 10
    assert pickle.loads(pickle.dumps(spec)) == spec          # it travels to the workers inside cfg
    with pytest.raises(AttributeError):
        spec.mode = "sync"                                    # frozen: server and workers see the same spec
    np.testing.assert_array_equal(spec.initial_weights(), TrainingSpec(layers=[64, 100, 10], seed=-1)
                                  .initial_weights())


@pytest.mark.parametrize("fields,message", [
    (dict(num_workers=0), "num_workers must be an integer >= 1, got 0"),
    (dict(epochs=2.5), "epochs must be an integer >= 1, got 2.5"),
    (dict(epochs=70_000), "epochs must be at most 65535 (a push names its epoch in 16 bits), got 70000"),
    (dict(learning_rate=-1.0), "learning_rate must be a positive number, got -1.0"),
    (dict(learning_rate=float("nan")), "learning_rate must be a positive number, got nan"),
    (dict(mode="sync", tau=3), "tau must be 1 in sync mode, got 3"),
    (dict(local_momentum=1.0), "local_momentum must be in [0, 1), got 1.0"),
    (dict(mode="easgd", staleness=2), "staleness applies to mode='async' only, got staleness=2 with mode='easgd'"),
    (dict(mode="eamsgd", optimizer="adam"), "optimizer='adam' applies to the gradient modes (sync, async), not "
                                            "mode='eamsgd': its server moves by the workers' elastic differences"),
    (dict(staleness=-1), "staleness must be an integer >= 0, got -1"),
    (dict(optimizer="lbfgs"), "optimizer must be one of sgd, momentum, nesterov, adagrad, adam, got 'lbfgs'"),
    (dict(backend="tpu"), "backend must be one of auto, cupy, numba, numpy, got 'tpu'"),
    (dict(barrier_timeout=0), "barrier_timeout must be a positive number, got 0"),
    (dict(worker_timeout=3e6), "worker_timeout must be at most 2147483 seconds, got 3000000.0"),
    (dict(alpha=-0.5), "alpha must be a positive number, got -0.5"),
    (dict(mode="downpour"), "mode must be one of ('sync', 'async', 'easgd', 'async-easgd', 'eamsgd'), got 'downpour'"),
    (dict(layers=[3]), "at least two sizes"),
    (dict(precision="fp8"), "precision must be one of fp32, tf32, bf16, got 'fp8'"),
    (dict(cuda_graphs=1), "cuda_graphs must be True or False, got 1"),
    (dict(pipeline="yes"), "pipeline must be True or False, got 'yes'"),
    (dict(mode="sync", pipeline=True), "pipeline applies to the asynchronous modes (async, async-easgd, eamsgd), "
                                       "not mode='sync'"),
    (dict(mode="easgd", pipeline=True), "not mode='easgd'"),
    (dict(wire_dtype="int8"), "wire_dtype must be one of float32, bfloat16, float16, got 'int8'"),
    (dict(mode="easgd", wire_dtype="bfloat16"), "wire_dtype='bfloat16' does not apply to mode='easgd': it pushes "
                                                "its weights"),
])
def test_every_setting_is_checked_with_its_value(fields, message):
    with pytest.raises(ValueError) as err:
        TrainingSpec(**fields)
    assert message in str(err.value)


def test_errors_in_the_callers_words():
    with pytest.raises(ValueError, match=r"^stepSize must be a positive number, got -1.0$"):
        TrainingSpec.build({"learning_rate": "stepSize"}, learning_rate=-1.0)
    with pytest.raises(SpecError) as err:
        TrainingSpec(tau=-1)
    assert err.value.setting == "tau"


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_tau_zero_is_the_modes_own_window(mode):
    """No window given: one exchange per step only where it must be (sync), DEFAULT_WINDOW elsewhere; a given
    window is kept, and sync still refuses any other than 1."""
    expected = 1 if mode == "sync" else 4
    assert TrainingSpec(mode=mode).tau == TrainingSpec(mode=mode, tau=0).tau == expected
    assert TrainingSpec(mode=mode, tau=1).tau == 1
    if mode != "sync":
        assert TrainingSpec(mode=mode, tau=7).tau == 7
    with pytest.raises(ValueError, match="tau must be an integer >= 0, got -2"):
        TrainingSpec(mode=mode, tau=-2)
    # replace(mode=...) takes the new mode's own window where the old one had its own, keeps a window given
    for other in MODE_NAMES:
        assert TrainingSpec(mode=mode).replace(mode=other).tau == (1 if other == "sync" else 4)
    if mode != "sync":
        assert TrainingSpec(mode=mode, tau=7).replace(mode="easgd").tau == 7


def test_server_takes_a_spec_or_its_fields_not_both():
    spec = TrainingSpec(mode="sync", num_workers=3, layers=[2, 2])
    s = ParameterServer(np.zeros(6, np.float32), spec=spec)
    assert s.spec is spec and s.mode == "sync" and s.num_workers == 3
    assert ParameterServer(np.zeros(6, np.float32), mode="easgd", tau=5).spec.tau == 5
    with pytest.raises(TypeError, match="either spec= or its fields"):
        ParameterServer(np.zeros(6, np.float32), spec=spec, mode="async")


def test_client_config_carries_address_ids_keys_and_the_spec_only():
    spec = TrainingSpec(layers=[2, 2], epochs=3, batch_size=16, local_momentum=0.5)
    with ParameterServer(np.zeros(6, np.float32), spec=spec, progress=False) as s:
        cfg = s.client_config()
    assert set(cfg) == {"address", "job_id", "fingerprint", "num_params", "protocol", "secure", "spec",
                        "server_public", "client_public", "client_secret"}
    assert cfg["spec"] is spec


def test_every_mode_is_one_class_with_the_hooks_its_kind_needs():
    assert MODE_NAMES == ("sync", "async", "easgd", "async-easgd", "eamsgd")
    for name, mode in MODES.items():
        assert get_mode(name) is mode and mode.name == name
        kind = type(mode)
        server_hook = "apply_round" if mode.rounds else "apply_push"
        assert getattr(kind, server_hook) is not getattr(Mode, server_hook), (name, server_hook)
        split = all(getattr(kind, hook) is not getattr(Mode, hook) for hook in ("send", "talk", "receive"))
        assert kind.exchange is not Mode.exchange or split, name      # an exchange in one piece or in three
        assert split or not mode.pipelines, name                      # a pipeline needs the three pieces
        assert mode.equal_shards == mode.rounds
    assert [n for n, m in MODES.items() if m.pushes_gradients] == ["sync", "async"]
    assert MODES["easgd"].push_flag == FLAG_LOCAL_WEIGHTS and MODES["eamsgd"].push_flag == FLAG_ELASTIC
    assert MODES["eamsgd"].local_optimizer == "nesterov" and MODES["async-easgd"].local_optimizer == "sgd"
    assert [n for n, m in MODES.items() if not m.windowed] == ["sync"]
    assert [n for n, m in MODES.items() if m.pipelines] == ["async", "async-easgd", "eamsgd"]
    with pytest.raises(ValueError, match="mode must be one of"):
        get_mode("hogwild")


def test_flags_one_spelling_old_ones_hidden():
    import argparse

    from core.cli import add_training_flags

    ap = argparse.ArgumentParser()
    add_training_flags(ap, layers=[4, 8, 3])
    add_spec_flags(ap)
    spec = spec_from_flags(ap.parse_args(["--trainer", "eamsgd", "--window", "5", "--learning-rate", "0.2",
                                          "--momentum", "0.5", "--workers", "3"]))
    assert (spec.mode, spec.tau, spec.learning_rate, spec.local_momentum, spec.num_workers) == \
        ("eamsgd", 5, 0.2, 0.5, 3)
    old = spec_from_flags(ap.parse_args(["--mode", "eamsgd", "--tau", "5", "--lr", "0.2", "--momentum", "0.5",
                                         "--workers", "3"]))
    assert old == spec
    assert spec_from_flags(ap.parse_args(["--step-size", "0.3"])).learning_rate == 0.3
    text = ap.format_help()
    for hidden in ("--mode", "--tau", "--lr", "--step-size", "--optimizer"):
        assert hidden not in text.replace("--server-optimizer", "")
    momentum = spec_from_flags(ap.parse_args(["--server-optimizer", "nesterov", "--momentum", "0.8"]))
    assert momentum.optimizer == "nesterov" and momentum.optimizer_options == {"momentum": 0.8}
    with pytest.raises(ValueError, match="--window must be 1 in sync mode, got 2"):
        spec_from_flags(ap.parse_args(["--trainer", "sync", "--window", "2"]))


def test_issue13_flags_reach_the_spec_and_their_errors_name_the_flag():
    import argparse

    from core.cli import add_training_flags

    ap = argparse.ArgumentParser()
    add_training_flags(ap, layers=[4, 8, 3])
    add_spec_flags(ap)
    default = spec_from_flags(ap.parse_args([]))
    assert (default.precision, default.cuda_graphs, default.pipeline, default.wire_dtype) == \
        ("fp32", False, False, "float32")
    spec = spec_from_flags(ap.parse_args(["--precision", "tf32", "--cuda-graphs", "--pipeline",
                                          "--wire-dtype", "float16"]))
    assert (spec.precision, spec.cuda_graphs, spec.pipeline, spec.wire_dtype) == ("tf32", True, True, "float16")
    assert spec.push_dtype_codes == (1, 4, 5, 3) and default.push_dtype_codes == (1, 4, 5)   # 4, 5: sparse frames
    with pytest.raises(ValueError, match="^--pipeline applies to the asynchronous modes"):
        spec_from_flags(ap.parse_args(["--trainer", "sync", "--pipeline"]))


def test_flags_backend_is_the_flags_then_the_environments_then_the_parsers_fallback(monkeypatch):
    """--backend's help says $FFPS_BACKEND is read: spec_from_flags reads it (it took "auto" in its place)."""
    import argparse

    from core.cli import add_training_flags

    def spec(argv, fallback="auto"):
        ap = argparse.ArgumentParser()
        add_training_flags(ap, layers=[4, 8, 3], backend_fallback=fallback)
        add_spec_flags(ap)
        return spec_from_flags(ap.parse_args(argv))

    monkeypatch.delenv("FFPS_BACKEND", raising=False)
    assert spec([]).backend == "auto" and spec([], fallback="numpy").backend == "numpy"
    monkeypatch.setenv("FFPS_BACKEND", "numba")
    assert spec([]).backend == "numba" and spec([], fallback="numpy").backend == "numba"
    assert spec(["--backend", "numpy"]).backend == "numpy"
    monkeypatch.setenv("FFPS_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"\$FFPS_BACKEND='cuda' is not a backend"):
        spec([])


def test_numpy_counts_are_taken_as_plain_ints():
    """Counts from NumPy (a grid of settings, a shape) pass the one integer rule and are kept as int: the spec
    goes to JSON (checkpoints, the hello reply) where np.int64 cannot."""
    import json

    spec = TrainingSpec(layers=[4, 8, 3], num_workers=np.int64(2), epochs=np.int32(3), batch_size=np.uint16(16),
                        tau=np.int64(0), mode="async", staleness=np.int8(2))
    assert (spec.num_workers, spec.epochs, spec.batch_size, spec.staleness) == (2, 3, 16, 2)
    assert all(type(v) is int for v in (spec.num_workers, spec.epochs, spec.batch_size, spec.tau, spec.staleness))
    json.dumps(dataclasses.asdict(spec))
    with pytest.raises(ValueError, match=r"^epochs must be an integer >= 1, got True$"):
        TrainingSpec(epochs=True)
