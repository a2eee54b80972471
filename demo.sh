#!/usr/bin/env bash
# The whole pipeline on the built-in synthetic dataset. Re-running reuses (or resumes) what is done.
#   DATA=data/synth RUN=runs/synth EPOCHS=8 ./demo.sh
#   ENCODER=inception_v3 WEIGHTS=none ./demo.sh   pick the encoder / weights yourself
#   DECODER=show_and_tell ./demo.sh   im2txt's pooled-vector decoder instead of the Transformer decoder
#   DECODER=attention ./demo.sh       the attention LSTM (Show, Attend and Tell) over the same grid
#   GRID=grid ./demo.sh      a grid decoder over the encoder's last stride-32 map (Lite0: 7x7) instead of
#                            the stride-16 one (grid16, 14x14: the Transformer's default)
#   FINETUNE=1 ./demo.sh     also runs a short stage-2 fine-tune of the CNN (slow on CPU)
#   SCST=1 ./demo.sh         also runs self-critical training (CIDEr-D reward) on the cached features
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source ./env.sh || exit 1
DATA="${DATA:-data/synth}"
SIZE="${SIZE:-128}"
OUT="${OUT:-out/demo}"
T0=$SECONDS

# The best encoder this machine has: Inception v3 with ImageNet weights when its file is in the
# Keras cache, else EfficientNet-Lite0 with the ImageNet weights its pip package ships; random
# weights only when asked (WEIGHTS=none).
IMAGENET="${KERAS_HOME:-$HOME/.keras}/models/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
if [ -z "${ENCODER:-}" ]; then
  if [ "${WEIGHTS:-imagenet}" = none ]; then ENCODER=inception_v3; WHY="WEIGHTS=none: random weights, as asked"
  elif [ -f "$IMAGENET" ]; then ENCODER=inception_v3; WHY="its ImageNet weights are in $IMAGENET"
  else ENCODER=efficientnet_lite0; WHY="no Inception v3 ImageNet file at $IMAGENET; Lite0's ImageNet weights come with pip"
  fi
else WHY="ENCODER=$ENCODER"; fi
WEIGHTS="${WEIGHTS:-imagenet}"
# Extraction size for the 128 px built-in images (measured: see the README's results)
case "$ENCODER" in efficientnet_lite0) FEAT_SIZE="${FEAT_SIZE:-224}" ;; *) FEAT_SIZE="${FEAT_SIZE:-$SIZE}" ;; esac
# The decoder: the Transformer over the encoder's stride-16 grid (default: measured best,
# docs/results.md), the attention LSTM over the stride-32 grid, or im2txt's pooled-vector Show and Tell decoder; each with
# its measured recipe (the Transformer: a cosine decay from 5e-4, 5 epochs; the LSTMs: Adam 1e-3, 8).
DECODER="${DECODER:-transformer}"
case "$DECODER" in
  transformer) KIND="${GRID:-grid16}"; SHOW=(--attention); MAPS=(--attention-maps 6)
    RECIPE=(--lr 5e-4 --lr-schedule cosine); EPOCHS="${EPOCHS:-5}" ;;
  attention) KIND="${GRID:-grid}"; SHOW=(--attention); MAPS=(--attention-maps 6); RECIPE=(); EPOCHS="${EPOCHS:-8}" ;;
  show_and_tell) KIND=pooled; SHOW=(); MAPS=(); RECIPE=(); EPOCHS="${EPOCHS:-8}" ;;
  *) echo "DECODER=$DECODER: choose attention, transformer or show_and_tell" >&2; exit 2 ;;
esac
case "$KIND" in grid|grid16|pooled) ;; *) echo "GRID=$KIND: choose grid or grid16" >&2; exit 2 ;; esac
FEATURES="$DATA/features-$ENCODER-$WEIGHTS-$FEAT_SIZE-$KIND"
# a run keeps to its kind of features: the stride-16 grid's run has a name of its own
case "$KIND" in grid16) TAG=-grid16 ;; *) TAG= ;; esac
RUN="${RUN:-runs/synth-$ENCODER-$DECODER$TAG}"
echo "encoder: $ENCODER ($WEIGHTS weights, $FEAT_SIZE px): $WHY"
echo "decoder: $DECODER (reads $KIND features)"

echo "== 1/6 built-in dataset -> $DATA"
if [ -f "$DATA/annotations/captions_test.json" ]; then echo "exists, reused"
else python -m prepare synth --out "$DATA" --size "$SIZE" --overwrite; fi

echo "== 2/6 prepare captions -> $DATA/captions.h5"
if [ -f "$DATA/captions.h5" ]; then echo "exists, reused"
else python -m prepare captions --dataset "$DATA" --max-len 28; fi

echo "== 3/6 extract $ENCODER $KIND features -> $FEATURES"
python -m extract --captions "$DATA/captions.h5" --out "$FEATURES" --encoder "$ENCODER" --weights "$WEIGHTS" \
  --image-size "$FEAT_SIZE" --features "$KIND"

echo "== 4/6 train the decoder -> $RUN"
python -m model train --data "$DATA" --features "$FEATURES" --out "$RUN" --epochs "$EPOCHS" \
  --lstm-units 256 --embedding-size 256 --decoder "$DECODER" "${RECIPE[@]}"

echo "== 5/6 evaluate on the test split"
python -m infer evaluate --run "$RUN" --data "$DATA" --features "$FEATURES" --split test --overwrite "${MAPS[@]}"

if [ -n "${FINETUNE:-}" ] && [ -n "${SCST:-}" ]; then
  echo "FINETUNE=1 and SCST=1: choose one (self-critical training reads the cached features of the stage-1 encoder)" >&2
  exit 2
fi
if [ -n "${SCST:-}" ]; then
  echo "== 5b self-critical training of the decoder -> $RUN-scst (SCST=1)"
  python -m model scst --run "$RUN" --data "$DATA" --features "$FEATURES" --out "$RUN-scst" --epochs "${SCST_EPOCHS:-3}"
  python -m infer evaluate --run "$RUN-scst" --data "$DATA" --features "$FEATURES" --split test --overwrite "${MAPS[@]}"
  RUN="$RUN-scst"
fi

if [ -n "${FINETUNE:-}" ]; then
  echo "== 5b fine-tune $ENCODER + decoder jointly -> $RUN-ft (FINETUNE=1)"
  python -m model finetune --run "$RUN" --data "$DATA" --out "$RUN-ft" --epochs "${FT_EPOCHS:-5}"
  python -m infer evaluate --run "$RUN-ft" --data "$DATA" --split test --overwrite "${MAPS[@]}"
  RUN="$RUN-ft"
fi

echo "== 6/6 caption images: test images and real photos -> $OUT"
PHOTOS="$(python -c 'import skimage, os; d = os.path.join(os.path.dirname(skimage.__file__), "data"); print(" ".join(os.path.join(d, f) for f in ("astronaut.png", "chelsea.png", "coffee.png")))')"
# shellcheck disable=SC2046,SC2086
python -m infer caption --run "$RUN" --out "$OUT" --overwrite --quiet "${SHOW[@]}" \
  $(ls "$DATA"/images/test/*.jpg | head -n 6) $PHOTOS

echo
echo "done in $((SECONDS - T0))s. outputs:"
echo "  dataset:        $DATA/images, $DATA/annotations, $DATA/captions.h5"
echo "  features:       $FEATURES (manifest.json says which encoder and weights made them)"
echo "  run directory:  $RUN (training_curve.png, history.json, tb/ for TensorBoard)"
echo "  metrics:        $RUN/eval-test/metrics.json"
echo "  captions:       $OUT/annotated/*.jpg, $OUT/captions.jsonl"
if [ "$KIND" != pooled ]; then
  echo "  attention maps: $OUT/attention/*.png, $RUN/eval-test/attention/*.png (where it looked for each word)"
fi
echo "Use it elsewhere:  source env.sh; python -m infer export --run $RUN --out exported/   (a SavedModel)"
echo "                   source env.sh; python -m infer serve --run $RUN   (a web page on http://127.0.0.1:8000/)"
echo "The model has only ever seen the built-in world of coloured shapes: captions of real photos are"
echo "sentences about shapes."
