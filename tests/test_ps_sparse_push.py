"""Sparse push frames: a mostly-zero gradient (a sparse first layer's) goes as its non-zero entries and is
applied exactly as its dense frame would be; malformed ones are refused and the weights stay."""
import numpy as np
import pytest

from ps import ParameterClient, ParameterServer, Reason, Status
from ps.protocol import (FLOAT32, RUNS32, SPARSE32, SPARSE_MIN_VALUES, Entries, Header, ProtocolError,
                         encode_array, encode_push, entries_frame, read_array, sparse_parts)
from ps.spec import TrainingSpec

try:
    from tests.ps_helpers import SessionEngine, header_for, raw_push, raw_socket, request, sparse_frame
except ImportError:  # pytest run without the repository root on sys.path
    from ps_helpers import SessionEngine, header_for, raw_push, raw_socket, request, sparse_frame

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


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "momentum"])
def test_the_server_applies_a_sparse_push_as_the_dense_one(optimizer):
    """Two servers, one push each of the same gradient: by the client's sparse frame (sgd and adagrad: in place
    on its entries), and dense (raw frames)."""
    n = 2 * SPARSE_MIN_VALUES
    w0 = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    gs = [mostly_zero(n, 0.02, seed=3), mostly_zero(n, 0.02, seed=4)]     # the second meets the first's state
    assert encode_push(gs[0])[1] == SPARSE32
    spec = TrainingSpec(layers=None, mode="async", num_workers=1, learning_rate=0.5, optimizer=optimizer)
    got = []
    for sparse in (True, False):
        with ParameterServer(w0, spec=spec, progress=False).start() as s:
            cfg = s.client_config()
            with ParameterClient(cfg, worker_id=0, timeout=10) as c:
                if sparse:
                    for g in gs:
                        r = c.push(g, want_weights=True)
                    got.append(np.array(r.weights))
                else:
                    ctx, sock = raw_socket(cfg)
                    try:
                        for step, g in enumerate(gs, 1):
                            h, _ = request(sock, [header_for(cfg, 3, worker_id=0, step=step, wversion=step - 1,
                                                             dtype=FLOAT32, n_values=n, session=c.session).pack(),
                                                  g.tobytes()])
                            assert h.status == Status.OK
                    finally:
                        sock.close(linger=0)
                        ctx.term()
                    got.append(s.weights())
            assert s.stats()["applied"] == 2
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


@pytest.mark.parametrize("values,reason,message", [
    ([1.0, np.nan], Reason.NON_FINITE, b"NaN or inf"),
    ([1.0, -3e38], Reason.NON_FINITE_UPDATE, b"rolled back"),       # 0.1 x 3e38 from 3.4e38: beyond float32
])
def test_a_sparse_push_updated_in_place_writes_nothing_when_it_is_refused(values, reason, message):
    w0 = np.full(SPARSE_MIN_VALUES, 3.4e38, np.float32)
    frame = sparse_frame(np.array([4, 9], np.uint32), np.array(values, np.float32))
    h, text, weights, applied = raw_push(w0, SPARSE32, frame.tobytes(), SPARSE_MIN_VALUES)
    assert h.code == reason and message in text
    np.testing.assert_array_equal(weights, w0)
    assert applied == 0


class Unfinished:
    """A send's tracker that has not finished (the interface ParameterServer registers: ``done``)."""
    done = False


def test_a_sparse_push_updates_the_weights_in_place_unless_a_reply_is_still_sending_them():
    n = SPARSE_MIN_VALUES
    spec = TrainingSpec(mode="async", num_workers=1, learning_rate=0.5)
    eng = SessionEngine(np.ones(n, np.float32), spec, job_id=b"j" * 16, fingerprint=7)
    eng.handle(b"t", [Header(op=1, job_id=b"j" * 16, fingerprint=7, worker_id=0).pack()])          # HELLO

    def push(step, at):
        g = np.zeros(n, np.float32)
        g[at] = 2.0
        frame, code = encode_push(g)
        h = Header(op=3, job_id=b"j" * 16, fingerprint=7, worker_id=0, step=step, wversion=eng.version,
                   dtype=code, n_values=n)
        assert eng.handle(b"t", [h.pack(), frame.tobytes()])[0][1].status == Status.OK

    first = eng.weights
    push(1, [3, 70])
    assert eng.weights is first and first[3] == first[70] == 0.0 and first.sum() == n - 2     # O(k), in place
    eng.pool.track(first, Unfinished())          # a whole reply of these weights is still being sent
    push(2, [5])
    assert eng.weights is not first and first[5] == 1.0          # the buffer in flight was not written to
    assert eng.weights[5] == 0.0 and eng.weights[3] == 0.0 and eng.weights.sum() == n - 3
    assert eng.optimizer.t == 2 and eng.version == 2


def test_entries_go_as_the_sparse_frame_of_their_vector_or_whole_when_too_many():
    n = 4 * SPARSE_MIN_VALUES
    g = mostly_zero(n, 0.02, seed=5)
    index = np.flatnonzero(g)
    frame, code = encode_push(Entries(index, g[index], n))
    assert code == SPARSE32 and np.array_equal(frame, encode_push(g)[0])
    dense = mostly_zero(n, 0.3, seed=6)
    index = np.flatnonzero(dense)
    frame, code = encode_push(Entries(index, dense[index], n))
    assert code == FLOAT32 and np.array_equal(frame, dense)
    part = Entries(np.array([2, 5, 9, 14], np.uint32), np.array([1.0, 2.0, 3.0, 4.0], np.float32), 16).slice(5, 10)
    assert part.size == 5 and part.index.tolist() == [0, 4] and part.values.tolist() == [2.0, 3.0]


def test_entries_in_runs_go_as_runs_and_read_back_exactly():
    n = 4 * SPARSE_MIN_VALUES
    rows = np.sort(np.random.default_rng(7).choice(n // 16 - 1, 300, replace=False))
    index = (rows[:, None] * 16 + np.arange(16)).ravel()                    # a first layer's rows of 16
    index = np.concatenate([index, np.arange(n - 50, n)])                    # and the later layers
    values = np.random.default_rng(8).standard_normal(index.size).astype(np.float32)
    frame, code = entries_frame(index, values)
    runs = frame[0]
    assert code == RUNS32 and runs <= 301 and frame.nbytes == 4 * (1 + 2 * runs + index.size)   # not 8 a value
    back, got = sparse_parts(frame.tobytes(), n, RUNS32)
    np.testing.assert_array_equal(back, index)
    np.testing.assert_array_equal(got, values)
    g = np.zeros(n, np.float32)
    g[index] = values
    np.testing.assert_array_equal(read_array(Header(op=3, dtype=RUNS32, n_values=n), frame.tobytes(), n,
                                             accept=(FLOAT32, SPARSE32, RUNS32)), g)
    assert encode_push(Entries(index, values, n))[1] == RUNS32 and encode_push(g)[1] == RUNS32
    scattered = np.array([3, 9, 27], np.uint32)                              # no two in a row: pairs are smaller
    assert entries_frame(scattered, np.ones(3, np.float32))[1] == SPARSE32
    assert entries_frame(np.empty(0, np.uint32), np.empty(0, np.float32))[1] == SPARSE32


@pytest.mark.parametrize("words,message", [
    ([2, 10, 0, 3, 3, 1, 1, 1, 1, 1, 1], "runs must increase with gaps"),  # [10,13) then [0,3)
    ([2, 0, 3, 3, 3, 1, 1, 1, 1, 1, 1], "runs must increase with gaps"),   # [0,3) then [3,6): no gap
    ([1, 0, 0], "at least one index"),
    ([1, 998, 5, 1, 1, 1, 1, 1], "end by 1000"),
    ([1, 0, 3, 1, 1], "cover 3 indices, it holds 2 values"),
    ([5, 0, 1], "run count r"),
])
def test_malformed_runs_payloads_are_refused(words, message):
    frame = np.array(words, np.uint32).tobytes()
    with pytest.raises(ProtocolError, match=message) as err:
        read_array(Header(op=3, dtype=RUNS32, n_values=1000), frame, 1000, accept=(FLOAT32, SPARSE32, RUNS32))
    assert err.value.reason == Reason.BAD_PAYLOAD
    with pytest.raises(ProtocolError, match="4-byte words"):
        sparse_parts(frame[:-1], 1000, RUNS32)
