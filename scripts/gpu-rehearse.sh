#!/usr/bin/env bash
# A CPU rehearsal of the GPU session's calls (docs/development.md, "A GPU session, call by call"), run as
# the device runs them: the chunks scripts/gpu-stage.sh made are copied and put back together with
# `cat | tar`, then scripts/gpu-checks.sh runs with QUICK=1 under the GPU machine's library versions
# (.venv-gpu-versions, from `make test-gpu-versions`) and without the packages it lacks (scripts/gpu-like).
#
#   bash scripts/gpu-rehearse.sh [WORK]      (WORK default: a new temporary folder; kept, with the logs)
#
# Call 1 runs the `fast` part on the staged roberta-base, call 2 `fast-accuracy` on the staged MiniLM (a
# `fast` session's two calls); call 5 the `default` part (PARTS5 to change it,
# e.g. "default compare"). QUICK with the real MPNet-base trains at ~20 s a step on 2 cores, too slow for
# the step limits, so call 5 rehearses with MiniLM in MPNet's place (MPNET; the staged MPNet is still put
# together and checked). Takes 20-40 minutes on the 2-core machine. Exit status: 0 if every call was.
# FAST=0 leaves calls 1 and 2 out. CUT=S rehearses a run cut by the deadline and carried to the next session:
# call 5 runs with DEADLINE=S (small enough to cut `default`'s training after its first epoch), and what
# it brings back (OUT/NAME.resume.tgz.NN) is staged with a copy of the stage under another path for
# call 6, on a "fresh machine" (another RUNS), which must finish the run with --resume.
set -uo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d /tmp/gpu-rehearse.XXXX)}
python=${PYTHON:-$PWD/.venv-gpu-versions/bin/python}
minilm=${MPNET:-${PRETRAINED_DIR:-$HOME/.cache/pretrained}/all-MiniLM-L6-v2}
for need in .stage/speed/c1 .stage/minilm/c1 .stage/mpnet/c4 "$python" "$minilm"; do
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

# call STEM PARTS...: gpu-checks.sh exits 0 whatever its steps did; a step's status is in OUT/summary.txt
# (STAGE: the stage folder, default $work/stage; CUT_OK=1: a step cut by the deadline, rc 124, is no failure).
call() {
  local name=$1 t0=$SECONDS failed
  shift
  bash scripts/gpu-checks.sh "${STAGE:-$work/stage}" "$work/$name" "$@" >"$work/$name.log" 2>&1
  failed=$(grep -h "rc=[1-9]" "$work/$name/summary.txt" 2>/dev/null)
  [ "${CUT_OK:-0}" = 1 ] && failed=$(grep -v "rc=124" <<<"$failed")
  [ -f "$work/$name/summary.json" ] || failed+=" (no summary.json: see $work/$name.log)"
  local ok="every step rc 0"
  [ "${CUT_OK:-0}" = 1 ] && ok="every step rc 0 or cut by the deadline (124)"
  echo "$name ($*): $((SECONDS - t0)) s, ${failed:+FAILED: }${failed:-$ok}; $work/$name/summary.txt"
  [ -z "$failed" ]
}

rc1=0
if [ "${FAST:-1}" != 0 ]; then
  put_together speed
  call call1 fast
  rc1=$?
  put_together minilm  # call 2 of a `fast` session: MiniLM beside call 1's data
  call call2 fast-accuracy || rc1=1
fi
put_together mpnet
[ -f "$work/stage/all-mpnet-base-v2-fp16/model.safetensors" ] || { echo "gpu-rehearse: no MPNet in .stage/mpnet" >&2; exit 1; }
if [ -z "${CUT:-}" ]; then
  # shellcheck disable=SC2086  # PARTS5 is a list of parts
  MPNET=$minilm DEADLINE=900 call call5 ${PARTS5:-default}
  rc5=$?
else
  # shellcheck disable=SC2086  # PARTS5 is a list of parts
  MPNET=$minilm DEADLINE=$CUT CUT_OK=1 call call5 ${PARTS5:-default}
  rc5=$?
  back=("$work"/call5/*.resume.tgz.[0-9][0-9])
  [ -f "${back[0]}" ] || { echo "gpu-rehearse: call 5 (DEADLINE=$CUT) brought back no resume state" >&2; exit 1; }
  echo "call5 brought back: $(cd "$work/call5" && ls)"
  mkdir -p "$work/stage6" && cp -al "$work/stage/." "$work/stage6/" && cp "${back[@]}" "$work/stage6/"
  # shellcheck disable=SC2086  # PARTS5 is a list of parts
  MPNET=$minilm DEADLINE=900 STAGE=$work/stage6 RUNS=$work/runs6 call call6 ${PARTS5:-default} || rc5=1
  grep -h "resume state\|^mpnet-default" "$work/call6/summary.txt"
fi
[ "$rc1" = 0 ] && [ "$rc5" = 0 ]
