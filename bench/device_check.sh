#!/usr/bin/env bash
# Every GPU check of the project, for the device machine (H100/H200: Python 3.12 with cupy, numba, numpy,
# torch, scikit-learn, pytest; no Java, no pyspark, no pyzmq). A session has 30 device minutes and 10 per
# command: run the stages in as few calls as fit, and read the results under $OUT.
#
#   here, once (.gitignore keeps /.whl/ out of git):
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl pyzmq==27.1.0
#   device:      run(command="bash bench/device_check.sh tests step", carry=[".whl"])
#                run(command="bash bench/device_check.sh ps", carry=[".whl"])
#
# Stages (any order, default all):
#   tests  pytest -m gpu, then the Spark-free test files in full (backend "auto" is cupy there)
#   step   bench/step_bench.py: CPU nets on numpy/numba, every net on cupy, the wide net, torch beside them
#   ps     bench/ps_bench.py --quick --backend cupy: round trips, updates/s, runner with 1/2/4 GPU workers
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "could not install the carried wheels" >&2; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# the test files that import neither pyspark nor Java
SPARK_FREE="tests/test_backends.py tests/test_cli.py tests/test_gpu.py tests/test_gradients.py tests/test_network.py
  tests/test_numba_step.py tests/test_ops_parity.py tests/test_ps_rules.py tests/test_ps_runner.py
  tests/test_ps_server.py tests/test_ps_convergence.py tests/test_ps_spec.py tests/test_spark_data.py tests/test_trainer.py"

status=0
stage() {   # name, command...: output to $OUT/<name>.txt and the log, exit status remembered
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -25 "$OUT/$name.txt"
  echo "== $name exit $rc"
  [ $rc -eq 0 ] || status=1
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
  "import cupy, numba, numpy; print('cupy', cupy.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)"; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

for s in ${*:-tests step ps}; do
  case "$s" in
    tests) stage pytest_gpu python3 -m pytest -q -m gpu -p no:cacheprovider $SPARK_FREE
           stage pytest_spark_free python3 -m pytest -q -p no:cacheprovider $SPARK_FREE ;;
    step)  stage step_bench python3 bench/step_bench.py ;;
    ps)    stage ps_bench python3 bench/ps_bench.py --quick --backend cupy --out "$OUT/ps_bench_cupy.json" ;;
    *)     echo "unknown stage $s (tests, step, ps)" >&2; status=2 ;;
  esac
done
exit $status
