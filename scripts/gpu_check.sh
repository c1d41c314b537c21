#!/usr/bin/env bash
# The trainer's checks that need a GPU (scripts/gpu_check.py), as one command of a few
# minutes on one GPU; needs only torch, transformers, peft and tokenizers. The engine
# checks (scripts/gpu_check_engine.py: engine_layouts, engine_channel, grpo_shared_gpu)
# need vLLM (and Ray) too and say SKIPPED without them.
#
#   bash scripts/gpu_check.sh [--cpu] [--only CHECK,...] [OUT_DIR]
#
# OUT_DIR: else $OUT, else ./gpu_check_out; it receives gpu_check.log (everything printed)
# and gpu_check.json (every check's status and figures). Python: $PYTHON, else the
# repository's .venv, else python3. --cpu: the CPU variants on gloo (make test runs them).
# Exit status: 0 when no check failed (SKIPPED ones included), 1 otherwise.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
flags=()
out=""
while (($#)); do
  case "$1" in
    --only)
      flags+=("$1" "${2:?--only takes a comma-separated list of checks}")
      shift 2
      ;;
    -h | --help)
      sed -n '2,12p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    -*)
      flags+=("$1")
      shift
      ;;
    *)
      if [[ -n "$out" ]]; then
        echo "gpu_check.sh: one output folder only (got '$out' and '$1')" >&2
        exit 2
      fi
      out="$1"
      shift
      ;;
  esac
done
out="${out:-${OUT:-./gpu_check_out}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

if [[ -n "${PYTHON:-}" ]]; then
  python="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
  python="$repo/.venv/bin/python"
else
  python="python3"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" # local folders only: no downloads
export HF_HUB_DISABLE_PROGRESS_BARS=1

log="$out/gpu_check.log"
{
  echo "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname): $python ($("$python" --version 2>&1))"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
} | tee "$log"
set +e
"$python" -u "$repo/scripts/gpu_check.py" ${flags[@]+"${flags[@]}"} --out "$out" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
set -e
echo "log: $log; results: $out/gpu_check.json; exit status $status" | tee -a "$log"
exit "$status"
