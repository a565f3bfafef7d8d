"""The real data sets the demos, the tests and the benchmarks share, split one way everywhere."""
from __future__ import annotations

import numpy as np


def load_digits_split(seed: int = 0, test_size: float = 0.3):
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1], stratified split (random_state=seed)
    -> X_train (n, 64) float32, X_test float32, y_train (n,) int64, y_test int64 (1257 / 540 rows at 0.3)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=test_size, random_state=seed, stratify=y)
    return Xtr.astype(np.float32), Xte.astype(np.float32), ytr.astype(np.int64), yte.astype(np.int64)


def hashed_text(rows: int, width: int = 1 << 18, words: int = 30, vocabulary: int = 3000, seed: int = 0):
    """Documents as HashingTF makes them: ``rows`` of ``words`` words each, hashed into ``width`` columns
    (term counts) -> X (rows, width) scipy CSR float32, y (rows,) int64. A document of class c (alternating
    0, 1) draws its words from half c of the vocabulary, so the classes are learnable; the sparse benchmarks and
    tests train on it without Spark."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    column = rng.integers(0, width, vocabulary)
    y = np.arange(rows, dtype=np.int64) % 2
    half = vocabulary // 2
    drawn = rng.integers(0, half, (rows, words)) + half * y[:, None]
    X = sp.csr_matrix((np.ones(rows * words, np.float32), column[drawn].ravel(),
                       np.arange(0, rows * words + 1, words)), shape=(rows, width))
    X.sum_duplicates()
    return X, y
