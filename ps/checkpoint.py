"""Atomic binary checkpoints of the server state: ``ckpt-<version>.npz`` holding arrays and JSON metadata.

Format: a NumPy ``.npz`` (no pickle: read with ``allow_pickle=False``) with the float32 arrays (``weights``,
``opt_<name>`` optimizer state) and ``__meta__``, the UTF-8 bytes of a JSON object (version, mode, optimizer
step, fingerprint, per-worker last step / attempt). Written to a temporary file in the same directory,
flushed and fsynced, then ``os.replace``d over the final name and the directory fsynced: a crash leaves
either the old checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import json
import os
import re
import tempfile

import numpy as np

PATTERN = re.compile(r"^ckpt-(\d{12})\.npz$")
META_KEY = "__meta__"


def save(directory: str, arrays: dict, meta: dict, keep: int = 3) -> str:
    """Write one checkpoint atomically -> its path. Keeps the newest ``keep`` checkpoints."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"ckpt-{int(meta['version']):012d}.npz")
    payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload[META_KEY] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        os.unlink(old)
    return path


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint paths in ``directory``, oldest first (by version)."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if PATTERN.match(n))
    return [os.path.join(directory, n) for n in names]


def latest(directory: str) -> str | None:
    paths = list_checkpoints(directory)
    return paths[-1] if paths else None


def load(path: str) -> tuple[dict, dict]:
    """-> (arrays, metadata). Raises ValueError naming the file if it is not a valid checkpoint."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable ffps checkpoint: {exc}") from exc
    if META_KEY not in arrays or "weights" not in arrays:
        raise ValueError(f"{path} lacks {META_KEY!r} or 'weights'; not an ffps checkpoint")
    meta = json.loads(arrays.pop(META_KEY).tobytes().decode())
    return arrays, meta
