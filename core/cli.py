"""``ffps`` command line. ``ffps train`` trains on scikit-learn's digits (real data) in one process.

The Spark job (spark/app.py) reuses the same flags; this module never imports pyspark.
"""
from __future__ import annotations

import argparse
import sys
import time

from .backends import BACKEND_NAMES, ENV_VAR, BackendUnavailable
from .backends.numpy_ops import PRECISIONS
from .datasets import load_digits_split
from .network import FeedForwardNetwork
from .optimizers import LOCAL_OPTIMIZERS
from .trainer import MinibatchTrainer, TrainingDiverged


def parse_layers(text: str) -> list[int]:
    """'64,100,10' -> [64, 100, 10] (sizes are validated by the network)."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated integers like 64,100,10, got {text!r}")


def add_flag(parser, flag: str, *hidden: str, **kw):
    """``parser.add_argument(flag, **kw)``, plus old spellings (``hidden``) that set the same value and are not
    listed in --help: every command line spells one setting one way, and old scripts keep working."""
    action = parser.add_argument(flag, **kw)
    for old in hidden:
        same = {k: v for k, v in kw.items() if k not in ("help", "default", "dest")}
        parser.add_argument(old, **same, dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return action


def add_backend_flag(parser: argparse.ArgumentParser, fallback: str = "auto") -> None:
    """--backend (default None: ``backend_choice`` reads $FFPS_BACKEND, else ``fallback``)."""
    said = "auto = cupy with a GPU, else numba" if fallback == "auto" else fallback
    parser.add_argument("--backend", choices=BACKEND_NAMES, default=None,
                        help=f"compute backend (default: ${ENV_VAR} or {said})")
    parser.set_defaults(backend_fallback=fallback)


def backend_choice(flag: str | None, fallback: str = "auto") -> str:
    """The backend --backend named, else $FFPS_BACKEND's (ValueError for an unknown one), else ``fallback``."""
    import os

    name = flag or os.environ.get(ENV_VAR, "") or fallback
    if name not in BACKEND_NAMES:
        raise ValueError(f"${ENV_VAR}={name!r} is not a backend; use one of {', '.join(BACKEND_NAMES)}")
    return name


def backend_of(args: argparse.Namespace) -> str:
    """:func:`backend_choice` of parsed :func:`add_backend_flag` flags, with the fallback the parser was given."""
    return backend_choice(args.backend, getattr(args, "backend_fallback", "auto"))


def add_training_flags(parser: argparse.ArgumentParser, layers=(64, 100, 10), epochs=30,
                       backend_fallback: str = "auto") -> None:
    """The training loop's flags, spelled alike in ``ffps train``, ``python -m ps.runner`` and the Spark app:
    --layers, --epochs, --batch-size, --learning-rate, --seed, --backend, --precision, --cuda-graphs."""
    parser.add_argument("--layers", type=parse_layers, default=None if layers is None else list(layers),
                        help="layer sizes, e.g. 64,100,10" + (" (default: features,100,classes from the data)"
                                                               if layers is None else ""))
    parser.add_argument("--epochs", type=int, default=epochs,
                        help="passes over the training data (maxIter; default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per step (blockSize; default %(default)s)")
    add_flag(parser, "--learning-rate", "--lr", "--step-size", type=float, default=0.1,
             help="stepSize (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default %(default)s")
    add_backend_flag(parser, backend_fallback)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="GEMM input precision: fp32, tf32 (10-bit mantissa) or bf16 (7-bit), float32 sums "
                             "and weights; tensor cores on a GPU, emulated (slowly) on the CPU")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="cupy: record each window of steps as one CUDA graph (no host work per step)")


def cmd_train(args) -> int:
    Xtr, Xte, ytr, yte = load_digits_split(seed=0)
    net = FeedForwardNetwork(args.layers, backend=args.backend, dtype=args.dtype, precision=args.precision)
    print(f"digits: {len(Xtr)} train / {len(Xte)} test rows; {net}", flush=True)
    trainer = MinibatchTrainer(net, batch_size=args.batch_size, learning_rate=args.learning_rate,
                               optimizer=args.optimizer, momentum=args.momentum, seed=args.seed,
                               cuda_graphs=args.cuda_graphs)

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
    train.add_argument("--optimizer", choices=LOCAL_OPTIMIZERS, default="momentum")
    train.add_argument("--momentum", type=float, default=0.9)
    train.add_argument("--dtype", choices=["float32", "float64"], default="float32")
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
