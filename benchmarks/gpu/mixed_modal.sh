#!/usr/bin/env bash
# GPU run of the mixed-modal comparison (issue 25): benchmarks/mixed_modal.py at GPU size, the two settings as
# two processes sharing one GPU (bf16 autocast; at most about 8 minutes on one H100/H200).
#
#   bash benchmarks/gpu/mixed_modal.sh [OUT_DIR]            # GPU size: d_model 256, 6 layers, batch 128
#   bash benchmarks/gpu/mixed_modal.sh --smoke [OUT_DIR]    # the same path on CPU, tiny, about a minute (tested)
#
# Writes OUT_DIR/mixed_modal_{chameleon,transfusion}.json (+ .png); OUT_DIR defaults to $OUT or ./gpu-out.
# STEPS, D_MODEL, LAYERS, BATCH and SEEDS override the GPU sizes.
# shellcheck source=benchmarks/gpu/_args.sh
source "$(dirname "$0")/_args.sh"
if [ "$SMOKE" = 1 ]; then
    ARGS=(--smoke --device cpu --threads 1)
else
    ARGS=(--steps "${STEPS:-1500}" --d-model "${D_MODEL:-256}" --layers "${LAYERS:-6}" --heads 8 --batch-size "${BATCH:-128}"
          --lr 1e-3 --lr-transfusion 1e-3 --eval-every 100 --seeds "${SEEDS:-0,1,2}" --candidates "" --threads 4 --device cuda
          --sample-steps 100 --caption-eval 200)
fi
pids=()
for setting in chameleon transfusion; do
    "$PY" benchmarks/mixed_modal.py "${ARGS[@]}" --settings "$setting" --runs-dir "$OUT_DIR/runs-$setting" \
        --out "$OUT_DIR/mixed_modal_$setting.json" > "$OUT_DIR/mixed_modal_$setting.log" 2>&1 &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
for setting in chameleon transfusion; do tail -n 3 "$OUT_DIR/mixed_modal_$setting.log"; done
exit $status
