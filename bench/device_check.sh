#!/usr/bin/env bash
# Every GPU check of the project, for the device machine (H100/H200: Python 3.12 with cupy 14 / CUDA 13, numba,
# numpy, torch, scikit-learn, pytest; no Java, no pyspark, no pyzmq). A session has 15 device minutes and 10 per
# command: run the stages in two calls, and read the results under $OUT.
#
#   here, once (.gitignore keeps /.whl/ out of git; pyzmq >= 27.3: older wheels have a 30x slower CURVE):
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl pyzmq==27.3.0
#   device:      run(command="bash bench/device_check.sh smoke tests", carry=[".whl"], timeout_s=580)
#                run(command="bash bench/device_check.sh step ps", carry=[".whl"], timeout_s=580)
#
# Stages (any order, default all):
#   tests  pytest -m gpu (cupy parity and gradients per precision, cuBLAS compute types, CUDA-graph windows
#          against the op-by-op trainer, summing softmax kernel, pinned async copies), then the Spark-free test
#          files in full (backend "auto" is cupy there; pipelined exchange and 16-bit frames included)
#   step   bench/step_bench.py --quick: single steps (CPU nets on numpy/numba, every net on cupy op by op and as
#          a recorded CUDA-graph window in fp32/tf32/bf16, the wide net, torch eager fp32/tf32/bf16 beside them),
#          then whole-epoch trainer rows on 60k rows (ffps numpy/numba/cupy/cupy+graphs vs a torch eager loop)
#   ps     bench/ps_bench.py --quick --backend cupy: round trips, updates/s, digits runner with 1/2/4 GPU workers,
#          and the mid-size table ([784,256,256,10], 60k rows, async window 4, 1/2/4 workers on one GPU, as
#          shipped and with cuda_graphs + pipeline + bfloat16 frames, beside one process alone)
#   smoke  one short script: graph capture, compute types and async copies on the GPU, each saying OK or why not
#   gpu    pytest -m gpu alone (the first stage to run when device minutes are short)
#   mid    ps_bench's mid-size cupy runner table alone
#   cpu16  the CPU targets of #14: ps_bench round trips (7.5k/1M/10M floats, CURVE, sharded) and updates/s with
#          numba, then bench/scale_bench.py with 1/2/4/8 numba workers of 2 threads each, and 1/8 pipelined
#   cpu16x two leads for the 8 x 2 target, 1 and 8 workers each: OpenBLAS helpers that sleep at once
#          (OPENBLAS_THREAD_TIMEOUT=4: on the 2-core VM it lifted 2 oversubscribed workers 6x, cost a lone
#          process 10-15 %), and the server cut into 2 shards (a 1 MB CURVE round trip 4.8 -> 3.4 ms on idle cores);
#          then 1 and 8 workers with the automatic window (the default fit's; --window 0)
# Each stage is capped (CAP_<stage> seconds, or its default) so one slow stage cannot eat a call.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1          # a stage cut off at its cap still leaves what it printed
cap() { local v="CAP_$1"; echo "${!v:-$2}"; }   # a stage's seconds: CAP_<stage> overrides the default
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
  tests/test_numba_step.py tests/test_ops_parity.py tests/test_precision.py tests/test_ps_pipeline.py
  tests/test_ps_rules.py tests/test_ps_runner.py tests/test_ps_server.py tests/test_ps_convergence.py
  tests/test_ps_spec.py tests/test_ps_wire16.py tests/test_ps_shards.py tests/test_ps_hardening.py
  tests/test_spark_data.py tests/test_trainer.py tests/test_windows.py tests/test_bench_rows.py
  tests/test_ps_adaptive_window.py"

status=0
stage() {   # name, command...: output to $OUT/<name>.txt and the log, exit status remembered
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -${TAIL:-25} "$OUT/$name.txt"
  echo "== $name exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}

# the CPU too: whether the 16 cores are 8 with two hardware threads each decides what 8 workers x 2 threads
# can reach (the 8 x 2 target of #14), so threads per core, sockets, NUMA nodes and caches go into the record
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo "nproc $(nproc)"
  lscpu 2>/dev/null | grep -E '^(Model name|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|NUMA node\(s\)|L3 cache|CPU max MHz)'
  python3 -c \
  "import cupy, numba, numpy, zmq; print('cupy', cupy.__version__, 'cuda', cupy.cuda.runtime.runtimeGetVersion(), \
'numba', numba.__version__, 'numpy', numpy.__version__, 'pyzmq', zmq.pyzmq_version())"; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

for s in ${*:-smoke tests step ps}; do
  case "$s" in
    smoke) stage gpu_smoke timeout $(cap smoke 120) python3 bench/gpu_smoke.py ;;
    gpu)   stage pytest_gpu timeout $(cap gpu 200) python3 -m pytest -q -m gpu -p no:cacheprovider $SPARK_FREE ;;
    tests) stage pytest_gpu timeout $(cap tests 300) python3 -m pytest -q -m gpu -p no:cacheprovider $SPARK_FREE
           stage pytest_spark_free timeout $(cap tests 400) python3 -m pytest -q -p no:cacheprovider $SPARK_FREE ;;
    step)  TAIL=80 stage step_bench timeout $(cap step 300) python3 bench/step_bench.py --quick ;;
    ps)    TAIL=40 stage ps_bench timeout $(cap ps 400) python3 bench/ps_bench.py --quick --backend cupy \
             --out "$OUT/ps_bench_cupy.json" ;;
    mid)   TAIL=30 stage ps_mid timeout $(cap mid 200) python3 bench/ps_bench.py --quick --backend cupy --sections mid \
             --mid-rows ${MID_ROWS:-60000} --out "$OUT/ps_mid.json" ;;
    # the CPU targets of #14 on this 16-core host: the server's round trips and updates/s (1 vs 8 clients,
    # sharded CURVE), and 1/2/4/8 numba workers of 2 threads each against the best single process
    cpu16) TAIL=30 stage ps_cpu timeout $(cap ps_cpu 150) python3 bench/ps_bench.py --quick --backend numba \
             --sections round_trip,updates --out "$OUT/ps_cpu.json"
           TAIL=30 stage scale timeout $(cap scale 200) python3 bench/scale_bench.py --backend numba --workers 1,2,4,8 \
             --threads-per-worker 2 --rows ${SCALE_ROWS:-48000} --epochs 2
           TAIL=30 stage scale_pipelined timeout $(cap scale 200) python3 bench/scale_bench.py --backend numba \
             --workers 1,8 --threads-per-worker 2 --rows ${SCALE_ROWS:-48000} --epochs 2 --pipeline ;;
    cpu16x) TAIL=30 stage scale_blas_sleep env OPENBLAS_THREAD_TIMEOUT=4 timeout $(cap scale 200) python3 \
             bench/scale_bench.py --backend numba --workers 1,8 --threads-per-worker 2 --rows ${SCALE_ROWS:-48000} --epochs 2
           TAIL=30 stage scale_shards2 timeout $(cap scale 200) python3 bench/scale_bench.py --backend numba \
             --workers 1,8 --threads-per-worker 2 --rows ${SCALE_ROWS:-48000} --epochs 2 --shards 2
           TAIL=30 stage scale_auto timeout $(cap scale_auto 150) python3 bench/scale_bench.py --backend numba \
             --workers 1,8 --threads-per-worker 2 --rows ${SCALE_ROWS:-48000} --epochs 2 --window 0 ;;
    *)     echo "unknown stage $s (smoke, gpu, tests, step, ps, mid, cpu16, cpu16x)" >&2; status=2 ;;
  esac
done
# the device tool brings back at most 8 files: the stage logs, and everything else in one archive
(cd "$OUT" && tar czf /tmp/ffps-device-all.tgz . 2>/dev/null; mv /tmp/ffps-device-all.tgz all.tgz
 find . -maxdepth 1 -type f ! -name '*.txt' ! -name all.tgz -delete)
exit $status
