#!/usr/bin/env bash
# Everything a lent CUDA machine is for, in one call: the compiled-kernel tests, then every throughput benchmark
# (side by side with its baseline), then the launch-shape sweep of the LM-head kernels. Steps run in priority order
# under one deadline (BUDGET seconds); each writes its log and JSON under $OUT as it finishes.
#
#   bash benchmarks/run_gpu.sh                 # OUT defaults to benchmarks/results/gpu_run
#
# The machine need not have the package installed: grpo_fast/ and kernels/ are laid out under /tmp/pkg, and wheels
# in .whl/ (e.g. the transformers version the project pins) are installed to /tmp/site first.
set -u
OUT=${OUT:-benchmarks/results/gpu_run}
R=${RESULTS:-/tmp/gpu_results}  # JSON, junit and per-step logs; packed into $OUT/results.tgz after every step
rm -rf "$R" && mkdir -p "$R" "$OUT"
LOG=$R/log.txt
N=0
DEADLINE=$(( $(date +%s) + ${BUDGET:-520} ))
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r grpo_fast /tmp/pkg/ && cp -r kernels /tmp/pkg/grpo_fast/kernels
export PYTHONPATH=/tmp/site:/tmp/pkg

step() {  # step LIMIT_S CMD...: runs CMD under min(LIMIT_S, time to the deadline)
  local left=$(( DEADLINE - $(date +%s) )) limit=$1; shift
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then echo "=== SKIPPED (deadline): $*" | tee -a "$LOG"; return; fi
  N=$((N + 1))
  echo "=== [$N] $* (limit ${limit}s)" | tee -a "$LOG"
  local t0=$(date +%s) rc
  timeout "$limit" "$@" >"$R/step$N.txt" 2>&1
  rc=$?
  tail -n 14 "$R/step$N.txt" | cut -c1-160
  echo "=== [$N] rc=$rc after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
  tar -czf "$OUT/results.tgz" -C "$R" .
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee -a "$LOG"

# name → limit (s) and command, in priority order; STEPS="tests update ..." runs a subset.
run() {
  case $1 in
    tests) step 150 env PYTHONSAFEPATH=1 python3 -m pytest -q -n 8 -p no:cacheprovider --junitxml="$R/junit_cuda.xml" \
             tests/test_cuda.py tests/test_grpo_loss.py tests/test_linear_grpo_loss.py tests/test_shared_prefix.py ;;
    logprob) step 70 python3 benchmarks/bench_logprob.py --variants naive ours --repeats 10 --out "$R/logprob_cuda.json" ;;
    grpo) step 60 python3 benchmarks/bench_linear_grpo_loss.py --variants naive_grpo fused_grpo --repeats 10 \
            --out "$R/linear_grpo_loss_cuda.json" ;;
    update) step 150 python3 benchmarks/bench_shared_prefix.py --weights random --repeats 3 \
              --variants padded shared_prefix shared_prefix_matmul --out "$R/shared_prefix_cuda.json" ;;
    sampler_tests) step 120 env PYTHONSAFEPATH=1 python3 -m pytest -q -p no:cacheprovider \
                     --junitxml="$R/junit_sampler_cuda.xml" tests/test_sampler_cuda.py tests/test_cuda.py -k "sampler or prefix" ;;
    sampler) step 60 python3 benchmarks/bench_sampler.py --random-init --dtype bfloat16 --repeats 3 \
               --variants ours ours_eager hf --out "$R/sampler_cuda.json" ;;
    sampler_large) step 120 python3 benchmarks/bench_sampler.py --random-init --dtype bfloat16 --prompts 16 \
                     --group-size 16 --prompt-len 1024 --new-tokens 256 --repeats 3 \
                     --variants ours ours_eager hf hf_static --out "$R/sampler_large_cuda.json" ;;
    sampler_qwen) step 120 python3 benchmarks/bench_sampler.py --config qwen2.5-1.5b --dtype bfloat16 --prompts 16 \
                    --group-size 16 --prompt-len 1024 --new-tokens 256 --repeats 3 --variants ours hf \
                    --out "$R/sampler_qwen_cuda.json" ;;
    sampler_8b) step 180 python3 benchmarks/bench_sampler.py --config llama3-8b --dtype bfloat16 --prompts 16 \
                  --group-size 16 --prompt-len 1024 --new-tokens 256 --repeats 3 --variants ours hf \
                  --out "$R/sampler_8b_cuda.json" ;;
    grpo_loss) step 30 python3 benchmarks/bench_grpo_loss.py --out "$R/grpo_loss_cuda.json" ;;
    logprob7b) step 90 python3 benchmarks/bench_logprob.py --hidden 4096 --vocab 151936 --tokens 4096 16384 \
                 --variants naive ours --repeats 5 --out "$R/logprob_7b_cuda.json" ;;
    advantages) step 30 python3 benchmarks/bench_advantages.py --out "$R/advantages_cuda.json" ;;
    prefix_attention) step 30 python3 benchmarks/bench_prefix_attention.py --out "$R/prefix_attention_cuda.json" ;;
    tune) step 90 python3 benchmarks/tune_logprob.py --out "$R/tune_logprob_cuda.json" ;;
    bf16) step 120 env PYTHONSAFEPATH=1 python3 -m pytest -q -p no:cacheprovider --junitxml="$R/junit_bf16.xml" \
            tests/test_cuda_bf16.py ;;
    e2e) step 240 python3 benchmarks/bench_e2e.py --device cuda --bf16 --weights random --configs short,long \
           --prompts 4 --out "$R/e2e_cuda_bf16.json" ;;
    *) echo "unknown step $1" ;;
  esac
}
# Default order: the GPU issues' acceptance figures first (tests, sampler table, e2e vs TRL, update, 7B head).
for name in ${STEPS:-tests sampler_tests bf16 sampler_large sampler_qwen sampler_8b e2e update logprob7b grpo grpo_loss \
                    advantages prefix_attention logprob sampler tune}; do run "$name"; done

echo "=== summary"
cat "$LOG"
