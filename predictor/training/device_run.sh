#!/usr/bin/env bash
# The ta-ema-200 training run as ONE device call (one NVIDIA GPU, 16 cores, no network), start-up
# included, within BUDGET seconds (540 by default, under the call's 600 s limit):
#
#   here, once:     make device-data        # .cache/device/: the training JPEGs' archive (15.6 MiB) to carry
#   the call:       bash predictor/training/device_run.sh            carry [".cache/device"], timeout_s 600
#   back here:      make train-gpu-export RESULT=<the call's files_at folder>
#                   # export (fp16 weights, temperature, model card), int8 graph + calibration set, evaluation
#
# What it does: unpacks the archive (kept between calls on a warm machine), then runs
#   python -m predictor.training.train --recipe ta-ema-200 --device cuda --compile ... --result-dir $OUT
# which decodes the JPEGs once, moves the uint8 training set to the GPU, augments on the GPU and trains
# with bf16 autocast, channels_last and torch.compile. Every 10 epochs, and when it stops, it writes
# the full checkpoint to $RUN_DIR/last.pt (128 MiB: stays on that machine) and the small result to
# $OUT (the weights to export in two fp16 parts of <= 15 MiB, result.json): a call cut off still hands
# back the last one. It stops cleanly after the last epoch that ends within the budget; then
# result.json says "finished": false and the same command again, on the same warm machine (it keeps
# ignored paths such as runs/ between calls), resumes from $RUN_DIR/last.pt.
#
# Arguments are passed on to the trainer (the last of a flag given twice wins). A dry run on this CPU,
# through this same script: make train-device-dry-run (--device cpu --limit 2048 --epochs 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
BUDGET=${BUDGET:-540}
PY=${PY:-python3}
OUT=${OUT:?set OUT to the folder that comes back (the device sets it)}
RUN_DIR=${RUN_DIR:-runs/ta-ema-200}
ARCHIVE=${ARCHIVE:-.cache/device/cifar10-train-jpeg.tar.gz}
WORK=${WORK:-.cache/device-run}   # unpacked JPEGs and their decoded cache: not carried, so a warm machine keeps them
mkdir -p "$OUT" "$RUN_DIR" "$WORK"

main() {
    echo "device_run: $(date -u +%FT%TZ) budget ${BUDGET}s, args: $*"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
    fi
    if [ ! -f "$WORK/cifar10/.unpacked" ]; then
        [ -f "$ARCHIVE" ] || { echo "device_run: $ARCHIVE missing: run 'make device-data' here and carry .cache/device"; return 2; }
        rm -rf "$WORK/cifar10" && mkdir -p "$WORK/cifar10" && tar -xzf "$ARCHIVE" -C "$WORK/cifar10"
        touch "$WORK/cifar10/.unpacked"
    fi
    local resume=()
    if [ -f "$RUN_DIR/last.pt" ]; then
        resume=(--resume)
        echo "device_run: $RUN_DIR/last.pt found: resuming it"
    fi
    local elapsed=$(( $(date +%s) - START ))
    # The trainer's clean stop leaves 30 s for Python's start and the last writes; `timeout` is the hard stop.
    local left=$(( BUDGET - elapsed - 30 ))
    TRAIN_LAUNCHER="bash predictor/training/device_run.sh $*" PYTHONUNBUFFERED=1 \
        timeout --signal=TERM --kill-after=5 $(( BUDGET - elapsed - 5 )) \
        "$PY" -m predictor.training.train --recipe ta-ema-200 --data "$WORK/cifar10" --cache-dir "$WORK" \
            --device cuda --compile --run-dir "$RUN_DIR" --result-dir "$OUT" --no-export --checkpoint-every 10 \
            --time-limit "$left" "${resume[@]}" "$@"
    "$PY" - "$OUT/result.json" <<'EOF'
import json, statistics, sys
r = json.load(open(sys.argv[1]))
h = r["history"]
steady = [e["seconds"] for e in h[1:]] or [h[-1]["seconds"]]
print(f"device_run: epoch {r['epoch']} of {r['args']['epochs']}, finished {r['finished']}; "
      f"first epoch {h[0]['seconds']} s (compilation included), then {statistics.median(steady)} s/epoch median "
      f"({statistics.median([e['images_per_second'] for e in h[1:] or h])} images/s); "
      f"last: val {h[-1]['val_accuracy']}, EMA val {h[-1].get('ema_val_accuracy')}; {r['seconds_this_call']} s in the trainer")
if not r["finished"]:
    print("device_run: NOT FINISHED: run the same command again on this warm machine to resume it")
EOF
    echo "device_run: $(( $(date +%s) - START )) s in all"
    ls -l "$OUT"
}

set -o pipefail
main "$@" 2>&1 | tee "$OUT/run.log"
