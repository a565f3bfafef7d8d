"""The server's weight buffers: never hand out the current weights or a buffer still being sent."""
import numpy as np

from ps.engine import BufferPool


class Send:
    """A send in flight until ``done`` is set (the part of zmq.MessageTracker the pool reads)."""

    def __init__(self):
        self.done = False


def test_acquire_skips_current_and_in_flight_buffers_and_reuses_finished_ones():
    pool = BufferPool(np.zeros(4, np.float32), max_free=2)
    first = pool.current
    a = pool.acquire()
    assert a is not first
    pool.current = a                                   # a update committed: a is current and being sent
    sending = Send()
    pool.track(a, sending)
    b = pool.acquire()
    assert b is first                                  # the old weights are free again
    pool.current = b
    c = pool.acquire()
    assert c is not a and c is not b                   # b is current, a still in flight: a third buffer
    sending.done = True
    assert pool.acquire() is a                         # the send finished: a is free again
    assert pool.acquire(exclude=(a,)) is c
    assert len(pool._all) == 3


def test_idle_buffers_are_capped_at_max_free():
    pool = BufferPool(np.zeros(4, np.float32), max_free=2)
    sends = []
    for _ in range(5):                                 # five buffers, all in flight at once
        buf = pool.acquire()
        s = Send()
        pool.track(buf, s)
        sends.append(s)
    assert len(pool._all) == 6
    for s in sends:
        s.done = True
    pool.acquire()
    assert len(pool._all) == 1 + 2                     # current + max_free idle
