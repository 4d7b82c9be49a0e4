#!/usr/bin/env bash
# The GPU measurements (speed; accuracy on MPNet-base), each part a few steps of one device call.
#
#   scripts/gpu-checks.sh STAGE OUT PART...     (default: speed accuracy)
#
# speed     reference recipes and the project's fast path, random-init roberta-base
# accuracy  MPNet-base, 1 epoch, reference recipe vs `imdb-lora train`
# default   MPNet-base, the default recipe end to end (LoRA r 8, alpha 8, dropout 0.1, rsLoRA, batch 32,
#           lr 4e-4, 512 tokens, 3 epochs, --val-size 0.1): the README's per-epoch table; then
#           `imdb-lora select` reads it with and without window averaging on validation, test once
# compare   `imdb-lora compare`: LoRA vs full fine-tuning on MPNet-base, 1 epoch each, --val-size 0.1
# levers    MPNet-base, one change to the default recipe per run (mean pooling, head+tail, lr 2e-4,
#           2 epochs; each with the weights' moving average evaluated beside the raw weights), their
#           combination if two or more beat the default on validation, then `imdb-lora select` over
#           all finished runs and window strides on validation, test once for the choice and the default
# batches   bench train at 128 and 256 reviews per step (padded) and 128 packed (random-init roberta-base)
# fast-best MPNet-base, 3 epochs at 128 reviews per step, lr 8e-4, head+tail truncation
# fast, fast-accuracy, fast-mpnet  issue 10's flat path (see fast_part below)
#
# Runs live in $RUNS (default ~/runs): a training step that a time limit cut short is resumed by the
# next call (`train --resume`) while the machine is kept, and a finished one is not trained again.
# Across sessions, a cut run's resume state comes back as OUT/NAME.resume.tgz.NN (scripts/gpu_resume.py);
# staged in STAGE for a later call, the run is put back in $RUNS and resumed there.
#
# STAGE holds what ../shared/docs/GPU.md stages (put together under ~/stage there: root's home):
#   aclImdb-labeled.tar.xz, roberta-base/ (config + tokenizer from ../shared/models), reference_lora.py
#   (from ../shared/bench), and for every MPNet part (accuracy, compare, default, levers, fast-best,
#   fast-mpnet) all-mpnet-base-v2-fp16/ (real weights, fp16 copy; made fp32 on the machine).
# Everything goes to OUT/log.txt (full output), OUT/summary.txt (one line per step: status, seconds
# and the figures the docs need) and OUT/summary.json (date, machine, versions, every step's command
# and figures, every run's run.json/metrics/config: for docs/measurements/). Each step has its own time
# limit, so one slow step cannot eat the call. A training run a limit cut also leaves its resume state,
# OUT/NAME.resume.tgz.00, .01, ... (at most 16 MiB each), if the device's 8 files allow.
# QUICK=1 runs every step with tiny settings: a CPU rehearsal of the command lines, not a measurement.
# MPNET=DIR replaces the staged MPNet folder (QUICK rehearsals on a CPU use MiniLM).
# PYTHON=EXE is the interpreter (default python3). Rehearse as the GPU machine runs it with
# PYTHON=.venv-gpu-versions/bin/python (its torch, transformers and peft; `make test-gpu-versions` builds it)
# and PYTHONPATH=scripts/gpu-like (refuses the packages it lacks: FastAPI, uvicorn, Ray, Playwright).
set -uo pipefail

[ $# -ge 2 ] || { echo "usage: scripts/gpu-checks.sh STAGE OUT [speed] [accuracy] [default] [compare] [levers] [batches] [fast-best] [fast] [fast-accuracy] [fast-mpnet]" >&2; exit 2; }
stage=$(cd "$1" && pwd) || exit 2
out=$2
shift 2
parts=${*:-speed accuracy}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true TQDM_DISABLE=1  # no progress bars in the log
data=$stage/aclImdb-labeled.tar.xz
roberta=$stage/roberta-base
ref=$stage/reference_lora.py
runs=${RUNS:-$HOME/runs}
mkdir -p "$runs"
quick=${QUICK:-0}
log=$out/log.txt
summary=$out/summary.txt
steps=$(mktemp)  # one JSON line per step, gathered into OUT/summary.json at the end
new_runs=()  # runs this call trained: each leaves OUT/NAME.tar.gz for the next session

if [ "$quick" = 1 ]; then  # small batches and lengths: a 2-core, 24 GiB CPU must survive it
  ref_steps=(--max-steps 3 --bs 4)
  bench=(--steps 2 --warmup 1 --samples 64 --batch-size 4 --max-length 128)
  bench_eval=(--samples 64 --batch-size 4 --max-length 128)  # eval has no steps: it times two passes
  small=(--max-train-samples 64 --max-eval-samples 32 --batch-size 4 --max-length 128)
  few=(--max-samples 32)
  limit=900 stride=64 head=32 need_default=20 need_lever=20 need_compare=20
else
  ref_steps=(--max-steps 60); bench=(--steps 30 --warmup 5); bench_eval=(); small=(); few=(); limit=${LIMIT:-300}
  # windows every 256 tokens at 512; head+tail as 128 + 382 tokens. Seconds a run needs on an H200,
  # from the 2026-11-30 `default` call (MPNet-base, batch 32: 82-91 s of training and 21-24 s of
  # validation + test evaluation per epoch, ~25 s of data and loading): the default recipe's 3 epochs
  # with test each epoch ~370 s; a lever's 3 epochs without test ~300 s; compare's 1 epoch each of LoRA
  # and full fine-tuning ~300 s (estimated: full fine-tuning was not timed). Less left: not started.
  stride=256 head=128 need_default=370 need_lever=300 need_compare=300
fi

# step NAME SECONDS CMD...: run with a time limit, keep all output, note status, wall seconds and the
# step's own figure lines (JSON reports, epoch lines, the reference's rates, accuracy, memory, wall time).
# DEADLINE (seconds since the script started) caps every step, so the call ends with its summary
# inside the device call's own limit; a step with under 20 s left is skipped and says so.
deadline=${DEADLINE:-100000}
step() {
  local name=$1 secs=$2
  shift 2
  local t0=$SECONDS part="$out/.step.txt" left=$((deadline - SECONDS))
  if [ "$left" -lt 20 ]; then
    printf '%-28s skipped (DEADLINE)\n' "$name" >>"$summary"
    $py "$here/gpu_summary.py" record "$steps" "$name" skipped 0 /dev/null -- "$@"
    return 124
  fi
  [ "$secs" -gt "$left" ] && secs=$left
  echo "=== $name: $*" >>"$log"
  # The time limit goes inside /usr/bin/time: its SIGTERM reaches the whole group, and GNU time dies of
  # it at once, so the step ended while the training it timed was still stopping (its last lines lost,
  # its run directory packed while it was being written). KILL 15 s after TERM: nothing hangs the call.
  local wrap=() cmd=("$@")
  if [ "$1" = /usr/bin/time ] && [ "${2:-}" = -f ]; then
    wrap=("$1" "$2" "$3")
    shift 3
  fi
  ${wrap[@]+"${wrap[@]}"} timeout -k 15 "$secs" "$@" >"$part" 2>&1
  local rc=$?
  cat "$part" >>"$log"
  printf '%-28s rc=%-3s %5ss\n' "$name" "$rc" "$((SECONDS - t0))" >>"$summary"
  $py "$here/gpu_summary.py" record "$steps" "$name" "$rc" "$((SECONDS - t0))" "$part" -- "${cmd[@]}"
  # progress bars end in a carriage return, not a newline: the line after one (a bench's --json
  # report) starts with the bar's remains, so split at carriage returns before matching
  tr '\r' '\n' <"$part" | grep -E '^\{|^epoch [0-9]+:|^epoch [0-9]+ steps|tok/s|peak_mem|total_s|^wall|^done:|^time: |^chosen|^(val|test) |^\| |error|^resuming|stopped by SIGTERM' \
    | cut -c1-600 | sed 's/^/    /' >>"$summary"
  rm -f "$part"
  return $rc
}

# ---- issue 10's fast path (self-contained: its own steps, table and JSON) ----------------------------
# fast           one call of at most ~7 minutes (DEADLINE defaults to 400 s for it): the CUDA
#                equivalence tests, reference_lora.py and the project's benches on random-init
#                roberta-base (real IMDB lengths, max length 512, seed LoRA settings, batch 32): flat
#                with CUDA graphs, the same with bf16 working copies of the trainable weights, the same
#                with q/k/v fused too, then compiled with and without graphs, a real 3-epoch `train`
#                (flat + CUDA graphs, with the fastest captured step's flags: compiled, working copies,
#                or working copies + fused q/k/v; validation and test
#                each epoch), flat evaluation cold and warm, padded (today's default), packed
#                evaluation, flat eager (the deadline cuts from the end: the last three were measured
#                on 2026-11-30 and are the least needed). scripts/fast_summary.py prints one table and writes
#                OUT/fast-summary.json (date, GPU, versions, commands, every figure) for docs/measurements/,
#                with the 3-epoch run's wall time by phase (its run.json's time_breakdown).
# fast-accuracy  all-MiniLM-L6-v2 (real weights, bert architecture: it takes the flat path; staged as
#                all-MiniLM-L6-v2-fp16/) 1 epoch, default recipe, padded, flat + CUDA graphs and flat +
#                CUDA graphs + bf16 working copies + fused q/k/v in the same call: the fast path must not
#                cost accuracy.
# fast-mpnet     MPNet's flat path (FlexAttention; no attention dropout), at most ~9 minutes (DEADLINE
#                defaults to 540 s for it; needs all-mpnet-base-v2-fp16/ staged): its CUDA tests, bench
#                train flat and padded on random-init MPNet-base (max length 512, batch 32), then the
#                accuracy guard: MPNet-base (real weights) 1 epoch, default recipe, --batching flat (to
#                set against the plain recipe's 95.34%), and padded in the same call if time is left.
fast_part() {
  local fb=(--steps 30 --warmup 5) gb=(--steps 60 --warmup 30 --profile 3) eb=() ep=(--epochs 3)
  local rs=("${ref_steps[@]}") cl=200  # cl: a compiled bench's cap (on the CPU, compiling takes minutes)
  if [ "$quick" = 1 ]; then  # smaller still than QUICK's usual settings: roberta-base on 2 shared cores
    fb=(--steps 1 --warmup 1 --samples 16 --batch-size 4 --max-length 64) gb=("${fb[@]}")
    eb=(--samples 16 --batch-size 4 --max-length 64) rs=(--max-steps 1 --bs 1)
    ep=(--epochs 1 --max-train-samples 16 --max-eval-samples 8 --batch-size 4 --max-length 64 --val-size 0.25)
    cl=$limit
  fi
  [ -z "${DEADLINE:-}" ] && [ "$quick" != 1 ] && deadline=$((SECONDS + 400))  # one call of <= 7 minutes
  # The captured step against the eager one on this GPU (tiny models; skipped where pytest is missing).
  local shared=$out/.shared
  mkdir -p "$shared/models" && ln -sfn "$roberta" "$shared/models/roberta-base"
  if $py -c "import pytest" 2>/dev/null; then
    step fast-cuda-tests 120 env IMDB_LORA_SHARED="$shared" $py -m pytest -q -p no:cacheprovider \
      tests/modeling/test_flat.py tests/modeling/test_working_copies.py tests/modeling/test_fused_qkv.py \
      -m "not slow" \
      -k "cuda or flash or flat_logits or flat_loss or static_buffer" -rs
  fi
  step fast-ref "$limit" $py "$ref" --model "$roberta" --random-init --data "$data" "${rs[@]}"
  # Order: what the last call (2026-11-30) did not measure comes right after the baseline and the
  # captured step it is set against: torch.compile (capped at 200 s each: compile time is the least
  # predictable), with and without CUDA graphs.
  step fast-bench-train-flat-graphs "$limit" $py -m imdb_lora bench train --model "$roberta" --random-init \
    --data "$data" --batching flat --cuda-graphs "${gb[@]}" --json
  # the same captured step with bf16 working copies of the trainable weights (training/working.py):
  # the CPU count says ~30% fewer ops per step; tokens/s and kernels per step (--profile) against the line above
  step fast-bench-train-flat-graphs-working "$limit" $py -m imdb_lora bench train --model "$roberta" \
    --random-init --data "$data" --batching flat --cuda-graphs --bf16-working-copies "${gb[@]}" --json
  # and with q/k/v fused (training/fused.py): one GEMM each for the base, the LoRA A's and B's, one
  # dropout mask; the CPU count says 24% fewer ops per step than the working copies alone
  step fast-bench-train-flat-graphs-working-fused "$limit" $py -m imdb_lora bench train --model "$roberta" \
    --random-init --data "$data" --batching flat --cuda-graphs --bf16-working-copies --fused-qkv "${gb[@]}" \
    --json
  step fast-bench-train-flat-compiled-graphs "$cl" $py -m imdb_lora bench train --model "$roberta" \
    --random-init --data "$data" --batching flat --compile --cuda-graphs "${gb[@]}" --json
  step fast-bench-train-flat-compiled "$cl" $py -m imdb_lora bench train --model "$roberta" \
    --random-init --data "$data" --batching flat --compile "${fb[@]}" --json
  # the whole job with the fastest captured step the benches above measured (plain, compiled, with
  # the bf16 working copies, or with them and fused q/k/v; one that failed is never chosen)
  local best=()
  read -r -a best <<<"$($py scripts/fast_summary.py --fastest-captured "$log")"
  step fast-train-3-epochs "$limit" /usr/bin/time -f "wall %e s" $py -m imdb_lora train --model "$roberta" \
    --random-init --data "$data" "${ep[@]}" --batching flat --cuda-graphs "${best[@]}" \
    --output-dir "$runs/roberta-random-flat-3ep" --overwrite
  step fast-bench-eval-flat "$limit" $py -m imdb_lora bench eval --model "$roberta" --random-init \
    --data "$data" --batching flat "${eb[@]}" --json
  step fast-bench-train-padded "$limit" $py -m imdb_lora bench train --model "$roberta" --random-init \
    --data "$data" --batching padded "${fb[@]}" --json
  step fast-bench-eval-packed "$limit" $py -m imdb_lora bench eval --model "$roberta" --random-init \
    --data "$data" --batching packed "${eb[@]}" --json
  step fast-bench-train-flat "$limit" $py -m imdb_lora bench train --model "$roberta" --random-init \
    --data "$data" --batching flat "${fb[@]}" --json
  $py scripts/fast_summary.py "$log" "$out/fast-summary.json" "$runs/roberta-random-flat-3ep" | tee -a "$summary"
}

fast_accuracy_part() {
  local minilm=$runs/minilm-fp32
  [ -d "$minilm" ] || step minilm-fp32 300 $py -c "
import sys, torch
from transformers import AutoModel, AutoTokenizer
AutoModel.from_pretrained(sys.argv[1], dtype=torch.float32).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])" "$stage/all-MiniLM-L6-v2-fp16" "$minilm"
  local how tiny=()
  [ "$quick" = 1 ] && tiny=(--max-train-samples 16 --max-eval-samples 8 --batch-size 4 --max-length 64 --val-size 0.25)
  # flat-working-fused: the captured step with bf16 working copies (training/working.py), whose bf16
  # gradient sums differ from autocast's, and fused q/k/v (training/fused.py), whose LoRA branches share
  # one dropout mask: both recipe changes in one run (the call is capped), its accuracy against the
  # other two before either could become a default
  for how in padded flat flat-working-fused; do
    local extra=(--batching "${how%%-*}")
    [ "$how" != padded ] && [ "$quick" != 1 ] && extra+=(--cuda-graphs)  # no CUDA on the CPU rehearsal
    [ "$how" = flat-working-fused ] && extra+=(--bf16-working-copies --fused-qkv)
    step "fast-accuracy-minilm-$how" "$limit" /usr/bin/time -f "wall %e s" $py -m imdb_lora train \
      --model "$minilm" --data "$data" --epochs 1 "${extra[@]}" "${tiny[@]}" \
      --output-dir "$runs/minilm-$how" --overwrite
  done
}

# mpnet_fp32: $runs/mpnet-fp32, the staged fp16 MPNet turned back into fp32 once (both recipes and
# every part get the same fp32 weights).
mpnet_fp32() {
  mpnet=$runs/mpnet-fp32
  [ -d "$mpnet" ] && return 0
  step mpnet-fp32 300 $py -c "
import sys, torch
from transformers import AutoModel
AutoModel.from_pretrained(sys.argv[1], dtype=torch.float32).save_pretrained(sys.argv[2])
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])" "${MPNET:-$stage/all-mpnet-base-v2-fp16}" "$mpnet"
}

fast_mpnet_part() {
  local fb=(--steps 30 --warmup 5) ep=() need_flat=200 need_padded=150
  if [ "$quick" = 1 ]; then  # MPNet-base on 2 shared cores: tiny batches, short reviews
    fb=(--steps 1 --warmup 1 --samples 16 --batch-size 4 --max-length 64)
    ep=(--max-train-samples 16 --max-eval-samples 8 --batch-size 4 --max-length 64 --val-size 0.25)
    need_flat=20 need_padded=20
  fi
  [ -z "${DEADLINE:-}" ] && [ "$quick" != 1 ] && deadline=$((SECONDS + 540))
  mpnet_fp32
  if $py -c "import pytest" 2>/dev/null; then
    step fast-mpnet-tests 150 $py -m pytest -q -p no:cacheprovider \
      tests/modeling/test_flat_mpnet.py -m "not slow" -rs
  fi
  local how
  for how in flat padded; do
    step "fast-mpnet-bench-train-$how" "$limit" $py -m imdb_lora bench train --model "$mpnet" --random-init \
      --data "$data" --batching "$how" "${fb[@]}" --json
  done
  # Accuracy: the flat run first (set against 95.34%, the plain recipe's 1-epoch test accuracy), then
  # padded in the same call when the time for a whole run is left (a cut-short run tells nothing).
  for how in flat padded; do
    local need=$need_flat
    [ "$how" = padded ] && need=$need_padded
    if [ $((deadline - SECONDS)) -lt "$need" ]; then
      printf '%-28s skipped (DEADLINE: needs ~%ss, %ss left)\n' "fast-mpnet-1ep-$how" "$need" "$((deadline - SECONDS))" >>"$summary"
      continue
    fi
    step "fast-mpnet-1ep-$how" "$limit" /usr/bin/time -f "wall %e s" $py -m imdb_lora train --model "$mpnet" \
      --data "$data" --epochs 1 --batching "$how" "${ep[@]}" --output-dir "$runs/mpnet-1ep-$how" --overwrite
  done
  $py scripts/fast_summary.py "$log" "$out/fast-mpnet-summary.json" | tee -a "$summary"
}

# train_run NAME NEED FLAGS...: one training run into $runs/NAME, skipped when fewer than NEED seconds
# are left before DEADLINE (a cut-short run costs its time and gives nothing); a finished run is kept,
# an interrupted one (resumable) continues with --resume.
train_run() {
  local name=$1 need=$2 dir=$runs/$1
  shift 2
  # A run an earlier session's DEADLINE cut came back as OUT/NAME.resume.tgz.NN and is staged in STAGE
  # (docs/development.md): put back here, its config.yaml pointed at this machine's paths.
  if [ ! -e "$dir" ] && compgen -G "$stage/$name.resume.tgz.[0-9][0-9]" >/dev/null; then
    $py "$here/gpu_resume.py" restore "$stage" "$runs" "$name" "$mpnet" "$data" >>"$summary" 2>&1
  fi
  if [ "$($py -c 'import json,sys; print(json.load(open(sys.argv[1])).get("status"))' "$dir/run.json" 2>/dev/null)" = finished ]; then
    printf '%-28s finished before: kept\n' "$name" >>"$summary"
    return 0
  fi
  # a run to resume needs the time of the epochs it has left (and the loading again)
  [ -f "$dir/checkpoint.safetensors" ] && need=$($py "$here/gpu_resume.py" need "$dir" "$need" || echo "$need")
  if [ $((deadline - SECONDS)) -lt "$need" ]; then
    printf '%-28s skipped (DEADLINE: needs ~%ss, %ss left)\n' "$name" "$need" "$((deadline - SECONDS))" >>"$summary"
    $py "$here/gpu_summary.py" record "$steps" "$name" skipped 0 /dev/null -- train "$@"
    return 124
  fi
  new_runs+=("$name")
  if [ -f "$dir/checkpoint.safetensors" ]; then
    step "$name" 600 /usr/bin/time -f "wall %e s" $py -m imdb_lora train --output-dir "$dir" --resume
  else
    step "$name" 600 /usr/bin/time -f "wall %e s" $py -m imdb_lora train --model "$mpnet" --data "$data" \
      --val-size 0.1 "$@" "${small[@]}" --output-dir "$dir" --overwrite
  fi
}

# finished_runs NAME...: the run directories among $runs/NAME that finished
finished_runs() {  # each finished run once, in the order given (select refuses a run listed twice)
  local name
  local -A seen=()
  for name in "$@"; do
    [ -z "${seen[$name]:-}" ] || continue
    seen[$name]=1
    grep -qs '"status": "finished"' "$runs/$name/run.json" && echo "$runs/$name"
  done
}

{
  echo "gpu-checks $(date -u +%FT%TZ) parts: $parts quick=$quick"
  $py -c "import platform, torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| python', platform.python_version(), '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
} | tee -a "$log" >"$summary"

for part in $parts; do
  case $part in
  speed)
    # Same call, same machine: the reference recipes first, then the project's fast path.
    # Most needed figures first: the baseline, the project's benches, the whole job; then the
    # seed-like row and the compiled variant (compilation time is the least predictable).
    step ref-plain "$limit" $py "$ref" --model "$roberta" --random-init --data "$data" "${ref_steps[@]}"
    for batching in packed padded; do
      step "bench-train-$batching" "$limit" $py -m imdb_lora bench train --model "$roberta" --random-init \
        --data "$data" --batching "$batching" "${bench[@]}" --profile 3 --json
    done
    for batching in padded packed; do
      step "bench-eval-$batching" "$limit" $py -m imdb_lora bench eval --model "$roberta" --random-init \
        --data "$data" --batching "$batching" "${bench_eval[@]}" --json
    done
    # The whole job: 3 epochs, per-epoch evaluation, data loading and tokenization included.
    step train-3-epochs "$limit" /usr/bin/time -f "wall %e s" $py -m imdb_lora train --model "$roberta" \
      --random-init --data "$data" --epochs 3 "${small[@]}" --output-dir "$runs/roberta-random-3ep" --overwrite
    step ref-seed-like "$limit" $py "$ref" --model "$roberta" --random-init --data "$data" --seed-like "${ref_steps[@]}"
    step bench-train-packed-compiled "$limit" $py -m imdb_lora bench train --model "$roberta" --random-init \
      --data "$data" --batching packed --compile "${bench[@]}" --json
    ;;
  batches)
    # Reviews per step: at batch 32 the H200 waits on per-step host overhead (MFU ~4%), so bigger
    # batches should buy throughput; padded vs packed at the bigger batch.
    for bs in 128 256; do
      step "bench-train-padded-bs$bs" "$limit" $py -m imdb_lora bench train --model "$roberta" --random-init \
        --data "$data" --batching padded "${bench[@]}" --batch-size "$bs" --json
    done
    step bench-train-packed-bs128 "$limit" $py -m imdb_lora bench train --model "$roberta" --random-init \
      --data "$data" --batching packed "${bench[@]}" --batch-size 128 --json
    ;;
  accuracy | compare | fast-best | default | levers)
    # Runs finished in an earlier session come back as OUT/NAME.tar.gz, staged with the next chunks:
    # the default run is the levers' control, and `select` reads every finished run.
    for tarball in "$stage"/mpnet-*.tar.gz; do
      name=$(basename "$tarball" .tar.gz)
      [ -f "$tarball" ] && [ ! -d "$runs/$name" ] && tar -C "$runs" -xzf "$tarball" &&
        printf '%-28s from an earlier session (%s)\n' "$name" "$(basename "$tarball")" >>"$summary"
    done
    mpnet_fp32  # the staged copy is fp16; both recipes get the same fp32 weights
    if [ "$part" = accuracy ]; then
      ref_epochs=(--epochs 1)
      [ "$quick" = 1 ] && ref_epochs=("${ref_steps[@]}")
      step ref-mpnet-1ep "$limit" $py "$ref" --model "$mpnet" --data "$data" "${ref_epochs[@]}"
      step mpnet-1ep "$limit" /usr/bin/time -f "wall %e s" $py -m imdb_lora train --model "$mpnet" \
        --data "$data" --epochs 1 "${small[@]}" --output-dir "$runs/mpnet-1ep" --overwrite
    elif [ "$part" = fast-best ]; then
      # The bigger-batch recipe on real weights: 128 reviews per step, learning rate scaled by
      # sqrt(4) from the reference's 4e-4, head+tail truncation; the epoch is chosen on validation.
      head=128
      [ "$quick" = 1 ] && head=32
      step mpnet-fast-3ep "$limit" /usr/bin/time -f "wall %e s" $py -m imdb_lora train --model "$mpnet" \
        --data "$data" --epochs "${FAST_EPOCHS:-3}" --batch-size 128 --lr 8e-4 --eval-batch-size 256 \
        --truncation head_tail --head-tokens "$head" "${small[@]}" --output-dir "$runs/mpnet-fast" --overwrite
    elif [ "$part" = default ]; then
      # The default recipe as it is (no flag but the larger validation split): the README's table.
      train_run mpnet-default "$need_default"
      # Whole reviews at inference (windows every $stride tokens) vs one truncated window, chosen on
      # validation; test read once for the choice (and for the default as trained, if that lost).
      if [ -n "$(finished_runs mpnet-default)" ]; then
        step select-default 300 $py -m imdb_lora select "$runs/mpnet-default" --window-strides "0,$stride" \
          "${few[@]}" --json
      fi
    elif [ "$part" = levers ]; then
      # One change per run, decided on validation (2,500 reviews); no test during training. Every run
      # also evaluates the moving average of its weights (EMA) beside the raw ones, and saves it if it
      # wins. Order: most expected value first; LEVERS="..." picks or reorders.
      declare -A lever_flags=(
        [mean]="--pooling mean"
        [headtail]="--truncation head_tail --head-tokens $head"
        [lr2e-4]="--lr 2e-4"
        [2ep]="--epochs 2"
      )
      levers=${LEVERS:-mean headtail lr2e-4 2ep}
      for name in $levers; do
        # shellcheck disable=SC2086  # the flags are words
        train_run "mpnet-lever-$name" "$need_lever" ${lever_flags[$name]} --no-eval-test-each-epoch --ema-decay 0.999
      done
      # Levers whose raw weights beat the default's on validation (best epoch); two or more: combined.
      winners=$($py - "$runs" $levers <<'PY'
import json, pathlib, sys

root = pathlib.Path(sys.argv[1])

def best_raw_val(run):
    info, rows = root / run / "run.json", root / run / "metrics.jsonl"
    if not info.is_file() or json.loads(info.read_text()).get("status") != "finished":
        return None
    return max(json.loads(line)["val_accuracy"] for line in rows.read_text().splitlines())

base = best_raw_val("mpnet-default")
scores = {n: best_raw_val(f"mpnet-lever-{n}") for n in sys.argv[2:]}
print(" ".join(n for n, v in scores.items() if None not in (base, v) and v > base))
PY
      )
      echo "    levers whose raw weights beat the default on validation: ${winners:-none}" >>"$summary"
      combined=()
      for name in $winners; do
        # shellcheck disable=SC2206  # the flags are words
        combined+=(${lever_flags[$name]})
      done
      if [ "$(wc -w <<<"$winners")" -ge 2 ]; then
        echo "    combined: ${combined[*]}" >>"$summary"
        train_run mpnet-lever-combined "$need_lever" "${combined[@]}" --no-eval-test-each-epoch --ema-decay 0.999
      fi
      # The choice: every finished run x (one window, windows every $stride tokens) on validation;
      # test once for the winner and for the default as trained (the control, listed first).
      # shellcheck disable=SC2046  # one word per run directory
      candidates=($(finished_runs mpnet-default $(for n in $levers combined; do echo "mpnet-lever-$n"; done)))
      if [ "${#candidates[@]}" -ge 1 ] && [ "${candidates[0]}" = "$runs/mpnet-default" ]; then
        step select-levers 600 $py -m imdb_lora select "${candidates[@]}" --window-strides "0,$stride" \
          "${few[@]}" --json
      else
        echo "    select-levers skipped: the default run (the control) has not finished" >>"$summary"
      fi
    else
      # LoRA and full fine-tuning, 1 epoch each (~300 s on an H200 with loading and evaluation).
      if [ -f "$runs/compare-mpnet/comparison.md" ]; then
        printf '%-28s finished before: kept\n' compare-mpnet >>"$summary"
      elif [ $((deadline - SECONDS)) -lt "$need_compare" ]; then
        printf '%-28s skipped (DEADLINE: needs ~%ss, %ss left)\n' compare-mpnet "$need_compare" "$((deadline - SECONDS))" >>"$summary"
      else
        step compare-mpnet 600 $py -m imdb_lora compare --model "$mpnet" --data "$data" --epochs 1 \
          --val-size 0.1 "${small[@]}" --output-dir "$runs/compare-mpnet" --overwrite
      fi
      cp "$runs/compare-mpnet/comparison.md" "$out/" 2>/dev/null
    fi
    ;;
  fast) fast_part ;;
  fast-accuracy) fast_accuracy_part ;;
  fast-mpnet) fast_mpnet_part ;;
  *) echo "unknown part: $part (speed, accuracy, default, compare, levers, batches, fast-best, fast, fast-accuracy, fast-mpnet)" >&2; exit 2 ;;
  esac
done
for r in "$runs"/*/results.md "$runs"/*/*/results.md; do
  [ -f "$r" ] && { echo "=== $r"; cat "$r"; } >>"$out/results.txt"
done
for name in ${new_runs[@]+"${new_runs[@]}"}; do  # everything but the resume state (27 MB per MPNet LoRA run)
  grep -qs '"status": "finished"' "$runs/$name/run.json" &&
    tar -C "$runs" --exclude checkpoint.safetensors -czf "$out/$name.tar.gz" "$name"
done
# A run a time limit cut: its resume state (checkpoint, best adapter so far, tokenizer, config; 30 MB in
# 2 files for MPNet-base, 38 MB in 3 with --ema-decay) comes back as OUT/NAME.resume.tgz.NN if the 8
# files allow, after the finished runs and before summary.json (one file kept for it).
for name in ${new_runs[@]+"${new_runs[@]}"}; do
  grep -qs '"status": "finished"' "$runs/$name/run.json" ||
    $py "$here/gpu_resume.py" pack "$runs/$name" "$out" >>"$summary" 2>&1
done
$py "$here/gpu_summary.py" write "$steps" "$runs" "$out/summary.json" "$parts" "$quick"
rm -f "$steps"
cat "$summary"
