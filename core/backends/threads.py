"""The process's thread model for CPU math: who gets the cores (BLAS), and the call that caps them."""
from __future__ import annotations

import os
import sys

# One thread model per process: BLAS owns the cores. numba's elementwise kernels run in parallel only where
# BLAS is single-threaded; beside a threaded BLAS they run serially, because the two pools spin on the same
# cores: on the 2-core VM a MinibatchTrainer epoch of [784,256,256,10] x 128 ran 13.5k samples/s with both
# pools at 2 threads, 86.9k with one thread each, and the numba SGD update of 269k floats took 3-7 ms instead
# of ~0.05 ms once OpenBLAS's threads were spinning beside numba's.
_blas_threads: int | None = None
_numba_threads: int | None = None     # the cap limit_cpu_threads set, for numba's pool once numba loads


def blas_threads() -> int:
    """Threads NumPy's BLAS may use in this process (threadpoolctl, read once; limit_cpu_threads keeps it)."""
    global _blas_threads
    if _blas_threads is None:
        from threadpoolctl import threadpool_info

        counts = [int(p.get("num_threads") or 1) for p in threadpool_info() if p.get("user_api") == "blas"]
        _blas_threads = max(counts, default=1)
    return _blas_threads


def shared_threads(workers: int, cores: int | None = None) -> int:
    """Each of ``workers`` processes' share of the machine's cores (at least 1): what a worker gets by default."""
    return max(1, (cores or os.cpu_count() or 1) // workers)


def limit_cpu_threads(n: int) -> None:
    """Cap the threads this process's CPU math may use: BLAS (through threadpoolctl) and numba's pool.

    Call it in each worker process with its share of the cores (cores / workers on the machine, or Spark's
    task CPUs). Two processes each running a 2-thread BLAS on 2 cores make small GEMMs wait for a descheduled
    helper thread: a digits step was seen going from 0.15 to 24 ms that way. Within the share, BLAS takes the
    threads and numba's kernels stay serial unless n is 1 for BLAS (the module's thread model above).
    """
    global _blas_threads, _numba_threads
    from ..validation import check_int          # core.validation imports core.backends: bound at the call

    check_int("thread count", n)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n)
    _blas_threads = None
    _numba_threads = n
    cap_numba_threads()


def cap_numba_threads() -> None:
    """numba's pool within limit_cpu_threads's cap, where numba is loaded; its kernels' module calls this when
    it loads. A process that never trains on numba never loads it: a numpy worker under
    spark.executor.pyspark.memory=512m failed here, in numba's import (its LLVM library could not be mapped)."""
    if _numba_threads is not None and "numba" in sys.modules:
        import numba

        numba.set_num_threads(min(_numba_threads, numba.config.NUMBA_NUM_THREADS))
