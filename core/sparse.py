"""Sparse feature rows (CSR) for the CPU backends: text features (HashingTF's 2^18 columns, a few dozen set per
row) trained without ever making them dense.

A dense copy of 100k such rows is 100 GB; their CSR form is a few MB. The first layer reads them as a sparse
product (``ops.sparse_gemm``: nnz x d1 multiply-adds instead of m x d0 x d1) and writes its weight gradient as a
scatter (``ops.sparse_gemm_t``); every later layer is dense as before. :class:`CsrRows` is the one container:
host arrays, batches are row views that share them, an epoch's shuffle gathers the rows once.
"""
from __future__ import annotations

import numpy as np


def offsets(lengths) -> np.ndarray:
    """Rows of ``lengths`` stored values each -> their indptr (m + 1,) int64, from 0."""
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return indptr


def sorted_unique(values) -> np.ndarray:
    """``np.unique(values)`` by a sort and a neighbour compare: NumPy 2's unique hashes, and took 0.12 ms for a
    text batch's 2,600 columns where this takes 0.03."""
    out = np.sort(np.asarray(values).ravel())
    if out.size > 1:
        keep = np.empty(out.size, dtype=bool)
        keep[0] = True
        np.not_equal(out[1:], out[:-1], out=keep[1:])
        out = out[keep]
    return out


def value_rows(lengths) -> np.ndarray:
    """Rows of ``lengths`` stored values each -> the row (0..m-1) of each value, in storage order."""
    return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


class CsrRows:
    """Rows of a sparse matrix in CSR form: row r holds ``values[indptr[r]:indptr[r+1]]`` at columns
    ``indices[...]``. ``indptr`` holds absolute offsets into ``indices``/``values`` (it need not start at 0), so
    a row slice is a view that shares them: ``X[a:b]`` copies nothing. Shape and dtype read as an array's do."""

    ndim = 2
    __slots__ = ("indptr", "indices", "values", "n_cols")

    def __init__(self, indptr, indices, values, n_cols: int):
        self.indptr = indptr        # (m + 1,) int64
        self.indices = indices      # (nnz,) int32, each in 0..n_cols-1
        self.values = values        # (nnz,) float32 or float64
        self.n_cols = int(n_cols)

    def __repr__(self):
        return f"CsrRows(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype.name})"

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.indptr) - 1, self.n_cols

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1] - self.indptr[0])

    def __len__(self):
        return len(self.indptr) - 1

    def __getitem__(self, key) -> "CsrRows":
        """Rows ``key`` (a slice with step 1) as a view."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"CsrRows takes row slices with step 1 (X[a:b]); use take() for {key!r}")
        start, stop, _ = key.indices(len(self))
        return CsrRows(self.indptr[start:max(start, stop) + 1], self.indices, self.values, self.n_cols)

    def take(self, index) -> "CsrRows":
        """Rows ``index`` (k,) gathered into new compact arrays (an epoch's shuffle: O(nnz))."""
        index = np.asarray(index, dtype=np.int64)
        n = len(self)
        if index.size and (index.min() < -n or index.max() >= n):
            raise IndexError(f"row index out of range for {n} rows: {index.min()}..{index.max()}")
        starts = self.indptr[:-1][index]
        lengths = self.indptr[1:][index] - starts
        indptr = offsets(lengths)
        # position p of the gathered rows reads source position starts[row(p)] + (p - indptr[row(p)])
        source = np.arange(indptr[-1], dtype=np.int64) + np.repeat(starts - indptr[:-1], lengths)
        return CsrRows(indptr, self.indices[source], self.values[source], self.n_cols)

    def copy(self) -> "CsrRows":
        """Compact arrays of these rows only (a kept batch outlives the epoch's shuffle)."""
        a, b = int(self.indptr[0]), int(self.indptr[-1])
        return CsrRows(self.indptr - a, self.indices[a:b].copy(), self.values[a:b].copy(), self.n_cols)

    def columns(self) -> np.ndarray:
        """The columns these rows hold a value in, sorted, each once (int64): the first layer's weight rows a
        batch's gradient touches."""
        return sorted_unique(self.indices[self.indptr[0]:self.indptr[-1]].astype(np.int64))

    def row_ids(self) -> np.ndarray:
        """The row (0..m-1) of each stored value, in storage order from indptr[0]."""
        return value_rows(np.diff(self.indptr))

    def toarray(self, unique_columns: bool = False) -> np.ndarray:
        """The dense rows. Duplicate columns of a row add up (scipy's meaning); ``unique_columns``: the caller
        knows a row names each column once (a Spark SparseVector), and one assignment does (~10x faster than
        the unbuffered add)."""
        out = np.zeros(self.shape, dtype=self.dtype)
        a, b = int(self.indptr[0]), int(self.indptr[-1])
        if unique_columns:
            out[self.row_ids(), self.indices[a:b]] = self.values[a:b]
        else:
            np.add.at(out, (self.row_ids(), self.indices[a:b]), self.values[a:b])
        return out


def is_sparse(X) -> bool:
    """A CsrRows or any scipy.sparse matrix/array (without importing scipy when X is not one)."""
    if isinstance(X, CsrRows):
        return True
    return type(X).__module__.startswith("scipy.sparse")


def check_sparse_features(X, width: int, dtype) -> CsrRows:
    """A CsrRows or scipy.sparse matrix (m, width), finite, column indices in range -> compact CsrRows of
    ``dtype`` (int64 indptr, int32 indices). ValueError naming the problem and the value, as check_features."""
    dtype = np.dtype(dtype)
    if not isinstance(X, CsrRows):
        if len(X.shape) != 2:
            raise ValueError(f"X must be a 2-D matrix (rows, features), got shape {X.shape}")
        if not np.issubdtype(X.dtype, np.number) and X.dtype != np.bool_:
            raise ValueError(f"X must be numeric, got dtype {X.dtype}")
        csr = X.tocsr()
        X = CsrRows(np.asarray(csr.indptr, dtype=np.int64), csr.indices, csr.data, csr.shape[1])
    if X.shape[1] != width:
        raise ValueError(f"X has {X.shape[1]} features per row but layers[0] is {width}")
    if X.shape[0] == 0:
        raise ValueError("X has no rows")
    indptr = np.asarray(X.indptr, dtype=np.int64)
    if indptr.ndim != 1 or (np.diff(indptr) < 0).any() or indptr[0] < 0 or indptr[-1] > len(X.values) \
            or len(X.indices) != len(X.values):
        raise ValueError("X's CSR arrays are inconsistent: indptr must be non-decreasing offsets into indices and "
                         "values of equal length")
    X = CsrRows(indptr, X.indices, X.values, X.n_cols).copy()          # compact: indptr from 0
    if not np.issubdtype(X.values.dtype, np.number) and X.values.dtype != np.bool_:
        raise ValueError(f"X must be numeric, got dtype {X.values.dtype}")
    values = np.ascontiguousarray(X.values, dtype=dtype)
    if not np.isfinite(values).all():
        p = int(np.argmax(~np.isfinite(values)))
        row = int(np.searchsorted(X.indptr, p, side="right") - 1)
        raise ValueError(f"X contains a non-finite value {values[p].item()} at row {row}, column "
                         f"{int(X.indices[p])}")
    indices = np.asarray(X.indices)
    if indices.size and (indices.min() < 0 or indices.max() >= width):
        p = int(np.argmax((indices < 0) | (indices >= width)))
        row = int(np.searchsorted(X.indptr, p, side="right") - 1)
        raise ValueError(f"X has column index {int(indices[p])} at row {row}, outside 0..{width - 1}")
    return CsrRows(X.indptr, np.ascontiguousarray(indices, dtype=np.int32), values, width)
