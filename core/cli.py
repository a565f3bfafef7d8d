"""``ffps`` command line. ``ffps train`` trains on scikit-learn's digits (real data) in one process.

The Spark job (spark/app.py) reuses the same flags; this module never imports pyspark.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .backends import BACKEND_NAMES, ENV_VAR, BackendUnavailable
from .network import FeedForwardNetwork
from .trainer import OPTIMIZERS, MinibatchTrainer, TrainingDiverged


def parse_layers(text: str) -> list[int]:
    """'64,100,10' -> [64, 100, 10] (sizes are validated by the network)."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated integers like 64,100,10, got {text!r}")


def add_backend_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKEND_NAMES, default=None,
                        help=f"compute backend (default: ${ENV_VAR} or auto = cupy with a GPU, else numba)")


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=parse_layers, default=[64, 100, 10], help="layer sizes, e.g. 64,100,10")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training data")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", "--lr", type=float, default=0.1)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="momentum")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    add_backend_flag(parser)


def load_digits_split(seed: int = 0, test_size: float = 0.3):
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1], stratified split -> Xtr, Xte, ytr, yte."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, test_size=test_size, random_state=seed, stratify=y)


def cmd_train(args) -> int:
    Xtr, Xte, ytr, yte = load_digits_split(seed=0)
    net = FeedForwardNetwork(args.layers, backend=args.backend, dtype=args.dtype)
    print(f"digits: {len(Xtr)} train / {len(Xte)} test rows; {net}", flush=True)
    trainer = MinibatchTrainer(net, batch_size=args.batch_size, learning_rate=args.learning_rate,
                               optimizer=args.optimizer, momentum=args.momentum, seed=args.seed)

    def report(s):
        print(f"epoch {s.epoch:3d}  loss {s.loss:.4f}  train acc {s.accuracy:.4f}  "
              f"test acc {s.val_accuracy:.4f}  {s.samples_per_s:,.0f} samples/s", flush=True)

    t0 = time.perf_counter()
    w, history = trainer.fit(Xtr, ytr, epochs=args.epochs, w0=net.init_params(args.seed),
                             validation=(Xte, yte), callback=report)
    seconds = time.perf_counter() - t0
    loss, acc = net.evaluate(w, Xte, yte)
    print(f"test accuracy {acc:.4f} (loss {loss:.4f}) after {args.epochs} epochs in {seconds:.2f} s "
          f"on backend {net.backend_name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffps", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train on scikit-learn's digits in this process and report test accuracy")
    add_training_flags(train)
    train.set_defaults(func=cmd_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, BackendUnavailable, TrainingDiverged) as exc:
        print(f"ffps: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
