#!/usr/bin/env bash
# GPU check of the trainer (issue 12), one prepared command, < 8 minutes on one H200:
#   bash scripts/gpu_check_train.sh [OUT_DIR]       # OUT_DIR default: $OUT, else /tmp/fastpmd-gpu-train
# torchrun with one process (nccl, a world of 1) trains the tiny-arith model (shrunk: 16 prompts x 8 responses,
# 100 supervised warm-up steps so that some rewards differ and the PMD gradient is not zero, 16 eval problems)
# on CUDA in bf16 with the HF engine, backend=auto (Triton on CUDA), activation checkpointing and token-budget
# micro-batches (optim.micro_batch_tokens, when this trainer knows the option),
# for STEPS steps (default 3) with a checkpoint at the end; then a second torchrun resumes for one more step;
# then, where vllm imports, two steps with --engine vllm (sleep/wake, sync, vLLM's memory fraction).
# PASS/FAIL per phase; logs, metrics.jsonl and checkpoints in OUT_DIR. Needs transformers on the device: bring
# it as wheels with `bash bench/gpu_env.sh download train` (carry .whl; see bench/gpu_env.sh).
# CPU run of the same command line (gloo, float32), as tests/bench/test_gpu_scripts.py does:
#   TRAIN_CHECK_DEVICE=cpu TRAIN_CHECK_DTYPE=float32 STEPS=1 bash scripts/gpu_check_train.sh /tmp/train-check
# Exit status: 0 when every phase passed, 1 otherwise, 2 without CUDA (device cuda).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp/fastpmd-gpu-train}}"
DEVICE="${TRAIN_CHECK_DEVICE:-cuda}"
DTYPE="${TRAIN_CHECK_DTYPE:-bfloat16}"
STEPS="${STEPS:-3}"
MB_TOKENS="${MB_TOKENS:-256}"
CAP_S="${TRAIN_CHECK_CAP_S:-200}"
RUN="$OUT_DIR/run"
mkdir -p "$OUT_DIR" && rm -rf "$RUN" || { echo "gpu_check_train: cannot use $OUT_DIR" >&2; exit 2; }
unset TRITON_INTERPRET
source bench/gpu_env.sh
gpu_check_init "$OUT_DIR" gpu_check_train "$DEVICE" || exit 2
backend="$("$PYTHON" - "$DEVICE" <<'EOF'
import sys, torch
from fastpmd.logprobs import resolve_backend
print(resolve_backend("auto", torch.device(sys.argv[1])))
EOF
)"
say "backend auto -> $backend on $DEVICE"
if [[ $DEVICE == cuda && $backend != triton ]]; then
    phase_verdict "backend auto resolves to triton on CUDA" 1
fi

ARGS=(--preset tiny-arith --device "$DEVICE" --param-dtype "$DTYPE" --backend auto --engine hf
      --prompts-per-step 16 --group-size 8 --mini-batches 2 --warmup-steps "${WARMUP_STEPS:-100}" --eval-n 2 --threads 1
      --set data.eval_size=16 --set model.activation_checkpointing=True --no-plots --no-progress --out "$RUN")
if "$PYTHON" -m fastpmd.train "${ARGS[@]}" --set "optim.micro_batch_tokens=$MB_TOKENS" --print-config \
        >/dev/null 2>"$OUT_DIR/option_check.log"; then
    ARGS+=(--set "optim.micro_batch_tokens=$MB_TOKENS")
    say "token-budget micro-batches: optim.micro_batch_tokens=$MB_TOKENS"
else
    say "SKIP  optim.micro_batch_tokens unknown to this trainer ($(tail -n 1 "$OUT_DIR/option_check.log")): by count"
fi
phase_verdict "set-up and config" 0

torchrun_() {  # $1 = log file, rest = trainer arguments
    local log="$1"; shift
    timeout -k 10 "$CAP_S" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 \
        -m fastpmd.train "$@" >"$log" 2>&1
    local rc=$?
    tail -n 3 "$log"
    return $rc
}

check() {  # $1 = expected last step: metrics rows 1..$1 once each, finite, grad norm > 0, checkpoint present
    "$PYTHON" - "$RUN" "$1" "$MB_TOKENS" <<'EOF' | tee -a "$summary"
import json, math, sys
from pathlib import Path
run, last, budget = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
train = [r for r in rows if r.get("kind") == "train"]
steps = [r["step"] for r in train]
bad = [(r["step"], k) for r in train for k in ("loss", "grad_norm", "reward_mean")
       if not isinstance(r.get(k), (int, float)) or not math.isfinite(r[k])]
ckpt = (run / "checkpoints" / f"step_{last:06d}").is_dir()
mbt = [r.get("micro_batch_tokens_max") for r in train]
zero = [r["step"] for r in train if not bad and r["grad_norm"] <= 0]
print(f"gpu_check_train: steps {steps}, non-finite {bad}, zero gradient {zero}, checkpoint step {last}: {ckpt}, "
      f"micro_batch_tokens_max {mbt}, loss {[round(r['loss'], 5) for r in train]}, "
      f"grad_norm {[round(r['grad_norm'], 4) for r in train]}, reward {[round(r['reward_mean'], 3) for r in train]}")
ok = steps == list(range(1, last + 1)) and not bad and not zero and ckpt
ok = ok and all(m is None or m <= budget for m in mbt)
sys.exit(0 if ok else 1)
EOF
}

torchrun_ "$OUT_DIR/train.log" "${ARGS[@]}" --max-steps "$STEPS" --save-every "$STEPS"
rc=$? ok=1
if [[ $rc -eq 0 ]] && check "$STEPS"; then ok=0; fi
phase_verdict "train $STEPS steps (rc $rc, log $OUT_DIR/train.log)" $ok
torchrun_ "$OUT_DIR/resume.log" "${ARGS[@]}" --max-steps $((STEPS + 1)) --save-every 1 --resume
rc=$? ok=1
if [[ $rc -eq 0 ]] && check $((STEPS + 1)); then ok=0; fi
phase_verdict "resume for step $((STEPS + 1)) (rc $rc, log $OUT_DIR/resume.log)" $ok
# vLLM in the trainer's process (only where vllm imports; its wheel is too large to carry): sleep during the
# update, wake, bf16 sync per FSDP unit; vLLM's extensible KV cache stays off and torch's memory fraction stays 1
if [[ $DEVICE == cuda ]] && "$PYTHON" -c "import vllm" 2>/dev/null; then
    VRUN="$OUT_DIR/vllm_run"
    rm -rf "$VRUN"
    cat >"$OUT_DIR/vllm_check.py" <<'EOF'
import sys, torch
from fastpmd.train.cli import build_config
from fastpmd.train.distributed import init_distributed
from fastpmd.train.trainer import Trainer
cfg, _ = build_config(sys.argv[1:])
d = init_distributed("cuda")
t = Trainer(cfg, d)
cc = t.engine.llm.llm_engine.vllm_config.cache_config
frac = [torch.cuda.get_per_process_memory_fraction(d.device)]
rows = t.fit()
frac.append(torch.cuda.get_per_process_memory_fraction(d.device))
print(f"gpu_check_train vllm: extensible {cc.enable_extensible_kv_cache}, kv_cache_memory_bytes "
      f"{cc.kv_cache_memory_bytes}, memory fraction {frac}, steps {[r['step'] for r in rows]}, "
      f"rollout_logp_diff_mean {[r.get('rollout_logp_diff_mean') for r in rows]}, "
      f"peak GB {torch.cuda.max_memory_allocated(d.device) / 1e9:.2f}")
t.engine.close()
sys.exit(0 if not cc.enable_extensible_kv_cache and frac == [1.0, 1.0] and len(rows) == 2 else 1)
EOF
    # one attention head of width 64 (vLLM's attention backends want head_dim >= 32), as tiny-arith-vllm
    timeout -k 10 "$CAP_S" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 "$OUT_DIR/vllm_check.py" \
        "${ARGS[@]}" --engine vllm --max-steps 2 --no-export --out "$VRUN" --set "model.arch_kwargs={'hidden_size': 64, \
'intermediate_size': 256, 'num_hidden_layers': 2, 'num_attention_heads': 1, 'num_key_value_heads': 1}" \
        >"$OUT_DIR/vllm.log" 2>&1
    rc=$?
    grep "gpu_check_train vllm" "$OUT_DIR/vllm.log" | tee -a "$summary"
    phase_verdict "vLLM engine: sleep, update, wake, bf16 sync, memory fraction (rc $rc, log $OUT_DIR/vllm.log)" $rc
else
    say "SKIP  vLLM engine phase: vllm does not import here (or device $DEVICE)"
fi
if [[ -f "$RUN/hf/config.json" ]]; then
    say "hf export dtype: $(grep -oE '"(torch_)?dtype": *"[a-z0-9]+"' "$RUN/hf/config.json" | head -n 1)"
fi
say "done in $SECONDS s, exit $status"
exit $status
