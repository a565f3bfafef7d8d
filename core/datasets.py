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
