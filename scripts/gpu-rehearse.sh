#!/usr/bin/env bash
# A CPU rehearsal of the GPU session's calls (docs/development.md, "A GPU session, call by call"), run as
# the device runs them: the chunks scripts/gpu-stage.sh made are copied and put back together with
# `cat | tar`, then scripts/gpu-checks.sh runs with QUICK=1 under the GPU machine's library versions
# (.venv-gpu-versions, from `make test-gpu-versions`) and without the packages it lacks (scripts/gpu-like).
#
#   bash scripts/gpu-rehearse.sh [WORK]      (WORK default: a new temporary folder; kept, with the logs)
#
# Call 1 runs the `fast` part on the staged roberta-base; call 5 the `default` part (PARTS5 to change it,
# e.g. "default compare"). QUICK with the real MPNet-base trains at ~20 s a step on 2 cores, too slow for
# the step limits, so call 5 rehearses with MiniLM in MPNet's place (MPNET; the staged MPNet is still put
# together and checked). Takes 20-40 minutes on the 2-core machine. Exit status: 0 if both calls were.
set -uo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d /tmp/gpu-rehearse.XXXX)}
python=${PYTHON:-$PWD/.venv-gpu-versions/bin/python}
minilm=${MPNET:-${PRETRAINED_DIR:-$HOME/.cache/pretrained}/all-MiniLM-L6-v2}
for need in .stage/speed/c1 .stage/mpnet/c4 "$python" "$minilm"; do
  [ -e "$need" ] || { echo "gpu-rehearse: $need is missing (bash scripts/gpu-stage.sh; make test-gpu-versions)" >&2; exit 2; }
done
mkdir -p "$work/stage"
export PYTHONPATH=scripts/gpu-like PYTHON=$python QUICK=1 RUNS=$work/runs

# put_together NAME: what calls 1-5 do with the chunks on the device, checked against the stage's sha256.
put_together() {
  local sum
  cp ".stage/$1"/c*/part-* "$work/stage/"
  sum=$(cat "$work/stage"/part-* | sha256sum | cut -d' ' -f1)
  cat "$work/stage"/part-* | tar -x -C "$work/stage" && rm "$work/stage"/part-*
  [ "$sum" = "$(cat ".stage/$1/SHA256")" ] || { echo "gpu-rehearse: .stage/$1 did not put together" >&2; exit 1; }
}

# call STEM PARTS...: gpu-checks.sh exits 0 whatever its steps did; a step's status is in OUT/summary.txt.
call() {
  local name=$1 t0=$SECONDS failed
  shift
  bash scripts/gpu-checks.sh "$work/stage" "$work/$name" "$@" >"$work/$name.log" 2>&1
  failed=$(grep -h "rc=[1-9]" "$work/$name/summary.txt" 2>/dev/null)
  [ -f "$work/$name/summary.json" ] || failed+=" (no summary.json: see $work/$name.log)"
  echo "$name ($*): $((SECONDS - t0)) s, ${failed:+FAILED: }${failed:-every step rc 0}; $work/$name/summary.txt"
  [ -z "$failed" ]
}

put_together speed
call call1 fast
rc1=$?
put_together mpnet
[ -f "$work/stage/all-mpnet-base-v2-fp16/model.safetensors" ] || { echo "gpu-rehearse: no MPNet in .stage/mpnet" >&2; exit 1; }
# shellcheck disable=SC2086  # PARTS5 is a list of parts
MPNET=$minilm DEADLINE=900 call call5 ${PARTS5:-default}
rc5=$?
[ "$rc1" = 0 ] && [ "$rc5" = 0 ]
