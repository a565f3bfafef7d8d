"""Input checks shared by the network, the trainer and (later) the Spark stage.

Each raises ``ValueError`` naming the problem and the offending value, before anything is computed or written.
"""
from __future__ import annotations

import numbers

import numpy as np

from .backends.numpy_ops import PRECISIONS
from .sparse import is_sparse

SUPPORTED_DTYPES = ("float32", "float64")


def check_layers(layers) -> list[int]:
    """Layer sizes [d0, d1, ..., C]: at least two, each a positive integer."""
    try:
        if isinstance(layers, (str, bytes)):        # "64,100,10" is a sequence too, of characters
            raise TypeError
        sizes = list(layers)
    except TypeError:
        raise ValueError(f"layers must be a list of layer sizes such as [64, 100, 10], got {layers!r}") from None
    if len(sizes) < 2:
        raise ValueError(f"layers needs at least two sizes (inputs and classes), got {sizes!r}")
    out = []
    for i, s in enumerate(sizes):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) and not (
                isinstance(s, numbers.Real) and float(s).is_integer()):
            raise ValueError(f"layer size {s!r} at position {i} of {sizes!r} is not an integer")
        if int(s) <= 0:
            raise ValueError(f"layer size {s!r} at position {i} of {sizes!r} must be positive")
        out.append(int(s))
    if out[-1] < 2:
        raise ValueError(f"the last layer size is the number of classes and must be >= 2, got {out[-1]}")
    return out


SEED_MODULUS = 2 ** 32          # numpy's seeds are unsigned; Spark's default seed is a signed hash


def check_seed(seed) -> int:
    """A seed as numpy takes it: any integer, reduced modulo 2**32 (negative ones too), else ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return int(seed) % SEED_MODULUS


def int_rule(low: int = 1, high: int | None = None) -> str:
    """The words of :func:`check_int`'s rule: 'an integer >= 1', 'an integer in 0..65535'."""
    return f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"


def check_int(name: str, value, low: int = 1, high: int | None = None) -> int:
    """A count or a field such as epochs, chunk_rows or a header's worker_id: an integer (any Integral type, not
    a bool) in ``low``..``high`` (no upper bound when None), else ValueError naming it and the value. The one
    integer rule of the project, so every caller says it in the same words."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
            high is not None and value > high):
        raise ValueError(f"{name} must be {int_rule(low, high)}, got {value!r}")
    return int(value)


def check_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype) if dtype is not None else np.dtype("float32")
    except TypeError:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}") from None
    if dt.name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
    return dt


def check_precision(precision, dtype: np.dtype) -> str:
    """GEMM input precision: fp32 (default), tf32 or bf16; the reduced ones need float32 weights (they round
    float32 operands and accumulate in float32; master weights, optimizer and loss stay float32)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "fp32" and np.dtype(dtype) != np.float32:
        raise ValueError(f"precision={precision!r} rounds float32 GEMM inputs and needs dtype float32, "
                         f"got dtype {np.dtype(dtype).name}")
    return precision


def check_features(X, width: int, dtype: np.dtype) -> np.ndarray:
    """X (m, width) numeric, finite -> C-contiguous array of ``dtype``."""
    if is_sparse(X):       # np.asarray would make a 0-d object array of it, and the error would say "0-D"
        raise ValueError(f"X is a sparse matrix ({type(X).__name__}, shape {X.shape}) and this path takes dense rows: "
                         f"pass X.toarray(), or core.sparse.check_sparse_features for sparse rows")
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"X must be a 2-D array (rows, features), got {arr.ndim}-D with shape {arr.shape}")
    if arr.shape[1] != width:
        raise ValueError(f"X has {arr.shape[1]} features per row but layers[0] is {width}")
    if arr.shape[0] == 0:
        raise ValueError("X has no rows")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"X must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"X contains a non-finite value {arr[tuple(bad)].item()} at row {bad[0]}, column {bad[1]}")
    return arr


def check_labels(y, n_rows: int, n_classes: int) -> np.ndarray:
    """y (m,) integral values in 0..C-1 -> int32 array."""
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {arr.shape}")
    if arr.shape[0] != n_rows:
        raise ValueError(f"got {arr.shape[0]} labels for {n_rows} rows of X")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"labels must be integers 0..{n_classes - 1}, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"label {arr[i].item()} at row {i} is not an integer class index")
    out_of_range = (arr < 0) | (arr >= n_classes)
    if out_of_range.any():
        i = int(np.argmax(out_of_range))
        raise ValueError(f"label {arr[i].item()} at row {i} is outside 0..{n_classes - 1} (layers[-1] = {n_classes})")
    return arr.astype(np.int32)


def check_params(w, num_params: int, dtype: np.dtype) -> np.ndarray:
    """Flat parameter vector of length num_params, finite -> contiguous ``dtype`` array."""
    arr = np.asarray(w)
    if arr.ndim != 1 or arr.shape[0] != num_params:
        raise ValueError(f"parameter vector must have shape ({num_params},), got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(arr).all():
        i = int(np.argmax(~np.isfinite(arr)))
        raise ValueError(f"parameter vector contains a non-finite value {arr[i].item()} at index {i}")
    return arr
