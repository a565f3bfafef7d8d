"""16-bit push frames (spec wire_dtype): bfloat16 / float16 on the wire, widened to float32 and added in float32
on the server; refused (weights untouched) where the job did not ask for them, or when size or values are bad."""
import numpy as np
import pytest

from ps import ParameterClient, ParameterServer, Reason, Status
from ps.protocol import (BFLOAT16, FLOAT16, FLOAT32, ProtocolError, encode_array, from_bfloat16, read_array,
                         to_bfloat16)
from ps.spec import TrainingSpec

try:
    from tests.ps_helpers import digits, raw_push
except ImportError:  # pytest run without the repository root on sys.path
    from ps_helpers import digits, raw_push

pytestmark = pytest.mark.timeout(120)


def test_bfloat16_rounds_to_nearest_even_and_widens_exactly():
    one_ulp = 2.0 ** -7
    x = np.array([1.0, 1 + one_ulp / 2, 1 + 1.5 * one_ulp, -(1 + 1.5 * one_ulp), 3.0e38, np.inf, -np.inf, 0.0,
                  1e-40], np.float32)
    back = from_bfloat16(to_bfloat16(x))
    # 1 + ulp/2 is a tie: to the even neighbour 1; 1 + 1.5 ulp: to 1 + 2 ulp
    np.testing.assert_array_equal(back[:4], np.array([1.0, 1.0, 1 + 2 * one_ulp, -(1 + 2 * one_ulp)], np.float32))
    assert abs(back[4] - 3.0e38) / 3.0e38 < 2 ** -8
    assert back[5] == np.inf and back[6] == -np.inf and back[7] == 0.0
    assert np.isnan(from_bfloat16(to_bfloat16(np.array([np.nan], np.float32))))[0]
    bits = to_bfloat16(x)
    assert bits.dtype == np.uint16 and from_bfloat16(bits).dtype == np.float32
    np.testing.assert_array_equal(from_bfloat16(to_bfloat16(back)), back)      # bf16 values are fixed points
    r = np.random.default_rng(0).standard_normal(100000).astype(np.float32)
    assert (np.abs(from_bfloat16(to_bfloat16(r)) - r) <= np.abs(r) * 2 ** -8).all()


def test_encode_float16_falls_back_to_float32_only_when_a_value_does_not_fit():
    small = np.linspace(-100, 100, 11, dtype=np.float32)
    arr, code = encode_array(small, "float16")
    assert code == FLOAT16 and arr.dtype == np.float16
    big = small.copy()
    big[3] = 1e5
    arr, code = encode_array(big, "float16")
    assert code == FLOAT32 and arr is big
    assert encode_array(small, "bfloat16")[1] == BFLOAT16 and encode_array(small, "float32")[1] == FLOAT32
    with pytest.raises(ValueError, match="wire_dtype must be one of float32, bfloat16, float16, got 'int8'"):
        encode_array(small, "int8")


@pytest.mark.parametrize("wire,code", [("bfloat16", BFLOAT16), ("float16", FLOAT16)])
def test_read_array_widens_accepted_codes_and_refuses_the_rest(wire, code):
    from ps.protocol import Header

    g = np.random.default_rng(1).standard_normal(50).astype(np.float32)
    payload, got_code = encode_array(g, wire)
    assert got_code == code
    h = Header(op=3, dtype=code, n_values=50)
    wide = read_array(h, payload.tobytes(), 50, accept=(FLOAT32, code))
    assert wide.dtype == np.float32
    np.testing.assert_allclose(wide, g, rtol=2 ** -8 if wire == "bfloat16" else 2 ** -11)
    with pytest.raises(ProtocolError, match=f"payload dtype code {code} is not float32 \\(code 1\\)") as err:
        read_array(h, payload.tobytes(), 50)                      # a job that did not ask for 16-bit frames
    assert err.value.reason == Reason.BAD_PAYLOAD
    with pytest.raises(ProtocolError, match="model needs 50"):
        read_array(Header(op=3, dtype=code, n_values=50), payload[:49].tobytes(), 50, accept=(FLOAT32, code))
    bad = payload.copy()
    bad[7] = 0x7FC0 if wire == "bfloat16" else np.float16(np.nan)
    with pytest.raises(ProtocolError, match="NaN or inf") as err:
        read_array(h, bad.tobytes(), 50, accept=(FLOAT32, code))
    assert err.value.reason == Reason.NON_FINITE


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_server_adds_16_bit_pushes_in_float32(wire):
    P = 1000
    w0 = np.random.default_rng(2).standard_normal(P).astype(np.float32)
    g = np.random.default_rng(3).standard_normal(P).astype(np.float32)
    spec = TrainingSpec(layers=None, mode="async", num_workers=1, learning_rate=0.5, wire_dtype=wire)
    with ParameterServer(w0, spec=spec, progress=False).start() as s:
        with ParameterClient(s.client_config(), worker_id=0, timeout=10) as c:
            r = c.push(g, want_weights=True)
            sent = encode_array(g, wire)[0]
            widened = from_bfloat16(sent) if wire == "bfloat16" else sent.astype(np.float32)
            want = w0 - np.float32(0.5) * widened
            np.testing.assert_array_equal(r.weights, want)
            assert not np.array_equal(widened, g)             # the frame really was 16-bit
        assert s.stats()["applied"] == 1


def test_a_float32_job_refuses_16_bit_frames_and_keeps_its_weights():
    P = 64
    w0 = np.arange(P, dtype=np.float32)
    h, text, weights, applied = raw_push(w0, BFLOAT16, to_bfloat16(np.ones(P, np.float32)).tobytes(), P)
    assert h.status == Status.ERROR and h.code == Reason.BAD_PAYLOAD
    assert b"payload dtype code 2 is not float32 (code 1)" in text
    np.testing.assert_array_equal(weights, w0)
    assert applied == 0


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_runner_with_16_bit_gradients_trains_digits(wire):
    from core import FeedForwardNetwork
    from ps.runner import run

    Xtr, Xte, ytr, yte = digits()
    res = run(Xtr, ytr, [64, 100, 10], mode="async", workers=2, backend="numpy", epochs=20, batch_size=32,
              learning_rate=0.1, tau=2, wire_dtype=wire, timeout=100)
    acc = FeedForwardNetwork([64, 100, 10], backend="numpy").evaluate(res.weights, Xte, yte)[1]
    assert acc >= 0.95, (wire, acc)
    assert res.stats["rejected_total"] == 0
