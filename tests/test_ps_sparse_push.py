"""Sparse push frames: a mostly-zero gradient (a sparse first layer's) goes as its non-zero entries and is
applied exactly as its dense frame would be; malformed ones are refused and the weights stay."""
import numpy as np
import pytest

from ps import ParameterClient, ParameterServer, Reason, Status
from ps.protocol import (FLOAT32, SPARSE32, SPARSE_MIN_VALUES, Header, ProtocolError, encode_array, encode_push,
                         read_array)
from ps.spec import TrainingSpec

try:
    from tests.ps_helpers import header_for, raw_push, raw_socket, request
except ImportError:  # pytest run without the repository root on sys.path
    from ps_helpers import header_for, raw_push, raw_socket, request

pytestmark = pytest.mark.timeout(120)

ACCEPT = (FLOAT32, SPARSE32)


def mostly_zero(n, share, seed=0):
    rng = np.random.default_rng(seed)
    g = np.zeros(n, np.float32)
    at = rng.choice(n, int(n * share), replace=False)
    g[at] = rng.standard_normal(at.size)
    return g


def test_a_mostly_zero_vector_goes_as_its_entries_and_reads_back_exactly():
    n = 4 * SPARSE_MIN_VALUES
    g = mostly_zero(n, 0.01)
    frame, code = encode_push(g)
    k = np.count_nonzero(g)
    assert code == SPARSE32 and frame.dtype == np.uint32 and frame.size == 2 * k     # 8 bytes an entry
    back = read_array(Header(op=3, dtype=SPARSE32, n_values=n), frame.tobytes(), n, accept=ACCEPT)
    np.testing.assert_array_equal(back, g)
    # dense enough, too small, or 16-bit frames that are smaller still: the dense frame as before
    dense = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    assert encode_push(dense)[1] == FLOAT32 and encode_push(dense)[0] is dense
    assert encode_push(mostly_zero(n, 0.2))[1] == SPARSE32         # 8 bytes x 20 % of the entries: under 2 of 4
    assert encode_push(mostly_zero(n, 0.3))[1] == FLOAT32          # 8 x 30 %: over half the dense frame
    assert encode_push(np.zeros(SPARSE_MIN_VALUES - 1, np.float32))[1] == FLOAT32
    assert encode_push(mostly_zero(n, 0.01), "bfloat16")[1] == SPARSE32
    assert encode_push(mostly_zero(n, 0.15), "bfloat16")[1] == encode_array(g, "bfloat16")[1]   # 1.2 > 2 / 2
    empty, code = encode_push(np.zeros(n, np.float32))
    assert code == SPARSE32 and empty.size == 0
    assert not read_array(Header(op=3, dtype=SPARSE32, n_values=n), b"", n, accept=ACCEPT).any()


@pytest.mark.parametrize("make,reason,message", [
    (lambda i, v: np.concatenate([i, v.view(np.uint32)]).tobytes()[:-4], Reason.BAD_PAYLOAD, "pairs of 8 bytes"),
    (lambda i, v: np.concatenate([i[::-1], v.view(np.uint32)]).tobytes(), Reason.BAD_PAYLOAD, "increase strictly"),
    (lambda i, v: np.concatenate([i + 10**6, v.view(np.uint32)]).tobytes(), Reason.BAD_PAYLOAD, "stay below 1000"),
    (lambda i, v: np.concatenate([np.zeros(2, np.uint32) + 3, v[:2].view(np.uint32)]).tobytes(), Reason.BAD_PAYLOAD,
     "increase strictly"),
    (lambda i, v: np.concatenate([i, np.where(np.arange(i.size) == 2, np.nan, v).astype(np.float32).view(np.uint32)])
     .tobytes(), Reason.NON_FINITE, "NaN or inf"),
    (lambda i, v: np.zeros(2 * 501, np.uint32).tobytes(), Reason.BAD_PAYLOAD, "at most 500 for 1000 values"),
])
def test_malformed_sparse_payloads_are_refused(make, reason, message):
    index = np.array([3, 17, 256, 999], np.uint32)
    values = np.array([1.0, -2.0, 0.5, 4.0], np.float32)
    with pytest.raises(ProtocolError, match=message) as err:
        read_array(Header(op=3, dtype=SPARSE32, n_values=1000), make(index, values), 1000, accept=ACCEPT)
    assert err.value.reason == reason
    with pytest.raises(ProtocolError, match="n_values=999, model needs 1000"):
        read_array(Header(op=3, dtype=SPARSE32, n_values=999), make(index, values), 1000, accept=ACCEPT)
    with pytest.raises(ProtocolError, match="payload dtype code 4 is not float32"):
        read_array(Header(op=3, dtype=SPARSE32, n_values=1000), make(index, values), 1000)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_the_server_applies_a_sparse_push_as_the_dense_one(optimizer):
    """Two servers, one push each of the same gradient: by the client's sparse frame, and dense (raw frames)."""
    n = 2 * SPARSE_MIN_VALUES
    w0 = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    g = mostly_zero(n, 0.02, seed=3)
    assert encode_push(g)[1] == SPARSE32
    spec = TrainingSpec(layers=None, mode="async", num_workers=1, learning_rate=0.5, optimizer=optimizer)
    got = []
    for sparse in (True, False):
        with ParameterServer(w0, spec=spec, progress=False).start() as s:
            cfg = s.client_config()
            with ParameterClient(cfg, worker_id=0, timeout=10) as c:
                if sparse:
                    r = c.push(g, want_weights=True)
                    got.append(np.array(r.weights))
                else:
                    ctx, sock = raw_socket(cfg)
                    try:
                        h, _ = request(sock, [header_for(cfg, 3, worker_id=0, step=1, dtype=FLOAT32, n_values=n,
                                                         session=c.session).pack(), g.tobytes()])
                        assert h.status == Status.OK
                    finally:
                        sock.close(linger=0)
                        ctx.term()
                    got.append(s.weights())
            assert s.stats()["applied"] == 1
    np.testing.assert_array_equal(got[0], got[1])
    assert not np.array_equal(got[0], w0)


def test_a_bad_sparse_push_leaves_the_weights():
    w0 = np.arange(SPARSE_MIN_VALUES, dtype=np.float32)
    frame = np.array([5, 5, 1, 1], np.uint32)            # index 5 twice
    h, text, weights, applied = raw_push(w0, SPARSE32, frame.tobytes(), SPARSE_MIN_VALUES)
    assert h.status == Status.ERROR and h.code == Reason.BAD_PAYLOAD and b"increase strictly" in text
    np.testing.assert_array_equal(weights, w0)
    assert applied == 0


def test_an_all_zero_push_is_an_empty_sparse_frame_and_is_applied():
    n = SPARSE_MIN_VALUES
    w0 = np.linspace(-1, 1, n, dtype=np.float32)
    with ParameterServer(w0, mode="async", num_workers=1, progress=False).start() as s:
        with ParameterClient(s.client_config(), worker_id=0, timeout=10) as c:
            r = c.push(np.zeros(n, np.float32), want_weights=True)
            np.testing.assert_array_equal(r.weights, w0)
            assert r.version == 1 and s.stats()["applied"] == 1
