#!/usr/bin/env bash
# GPU run of the LMFusion comparison (issue 29): benchmarks/lmfusion.py with the embedded SmolLM2-135M at full
# depth (all 30 layers) as the frozen text model, against a Transfusion model of SmolLM2's shape trained from
# scratch; the two runs of a seed share the GPU (bf16 autocast; at most about 8 minutes on one H100/H200).
#
#   bash benchmarks/gpu/lmfusion.sh [OUT_DIR]            # GPU size: batch 64, 1,500 steps, 1 seed
#   bash benchmarks/gpu/lmfusion.sh --smoke [OUT_DIR]    # the same path on CPU: SmolLM2's first 2 layers, a few steps (tested)
#
# Writes OUT_DIR/lmfusion_gpu.json (+ .png) and OUT_DIR/lmfusion_gpu.log; OUT_DIR defaults to $OUT or ./gpu-out.
# STEPS, BATCH, LR and SEEDS override the GPU sizes.
# shellcheck source=benchmarks/gpu/_args.sh
source "$(dirname "$0")/_args.sh"
if [ "$SMOKE" = 1 ]; then
    ARGS=(--layers 2 --device cpu --workers 1 --seeds 0 --steps-baseline 4 --track-every 2 --batch-size 4 --per-class 1
          --track-per-class 1 --track-captions 4 --sample-steps 2 --classifier-steps 5 --ppl-blocks 2)
else
    # shellcheck disable=SC2086
    ARGS=(--device cuda --workers 2 --seeds ${SEEDS:-0} --steps-baseline "${STEPS:-1500}" --batch-size "${BATCH:-64}"
          --lr-baseline "${LR:-3e-4}" --lr-lmfusion "${LR:-3e-4}" --track-every 250 --per-class 10 --sample-steps 50)
fi
"$PY" benchmarks/lmfusion.py --base-model default "${ARGS[@]}" --work-dir "$OUT_DIR/runs" \
    --out "$OUT_DIR/lmfusion_gpu.json" > "$OUT_DIR/lmfusion_gpu.log" 2>&1 || { tail -n 30 "$OUT_DIR/lmfusion_gpu.log"; exit 1; }
tail -n 40 "$OUT_DIR/lmfusion_gpu.log"
