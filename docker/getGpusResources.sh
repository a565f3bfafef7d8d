#!/usr/bin/env bash
# Spark GPU discovery script (spark.{worker,executor}.resource.gpu.discoveryScript).
# Prints the machine's GPUs as Spark expects: {"name": "gpu", "addresses": ["0", "1", ...]}.
# Addresses are nvidia-smi's physical indices; ffps maps them through CUDA_VISIBLE_DEVICES in each task.
set -euo pipefail
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo '{"name": "gpu", "addresses": []}'
  exit 0
fi
addresses=""
while IFS= read -r index; do
  index="${index//[[:space:]]/}"
  [ -n "$index" ] || continue
  addresses+="${addresses:+, }\"${index}\""
done < <(nvidia-smi --query-gpu=index --format=csv,noheader,nounits)
printf '{"name": "gpu", "addresses": [%s]}\n' "$addresses"
