#!/usr/bin/env bash
# The whole pipeline on the built-in synthetic dataset. Re-running reuses (or resumes) what is done.
#   DATA=data/synth RUN=runs/synth EPOCHS=8 ./demo.sh
#   FINETUNE=1 ./demo.sh     also runs a short stage-2 fine-tune (slow on CPU)
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
DATA="${DATA:-data/synth}"
RUN="${RUN:-runs/synth}"
SIZE="${SIZE:-128}"
EPOCHS="${EPOCHS:-8}"
OUT="${OUT:-out/demo}"
T0=$SECONDS

echo "== 1/6 built-in dataset -> $DATA"
if [ -f "$DATA/annotations/captions_test.json" ]; then echo "exists, reused"
else python -m prepare synth --out "$DATA" --size "$SIZE"; fi

echo "== 2/6 prepare captions -> $DATA/captions.h5"
if [ -f "$DATA/captions.h5" ]; then echo "exists, reused"
else python -m prepare captions --dataset "$DATA" --max-len 28; fi

echo "== 3/6 extract Inception v3 features -> $DATA/features"
IMAGENET="${KERAS_HOME:-$HOME/.keras}/models/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
if [ -z "${WEIGHTS:-}" ]; then
  if [ -f "$IMAGENET" ]; then WEIGHTS=imagenet
  else WEIGHTS=none; echo "(no ImageNet weights at $IMAGENET: using random Inception weights)"; fi
fi
python -m extract --captions "$DATA/captions.h5" --out "$DATA/features" --weights "$WEIGHTS" --image-size "$SIZE"

echo "== 4/6 train the decoder -> $RUN"
python -m model train --data "$DATA" --out "$RUN" --epochs "$EPOCHS" --lstm-units 256 --embedding-size 256

echo "== 5/6 evaluate on the test split"
python -m infer evaluate --run "$RUN" --data "$DATA" --split test --max-len 30 --overwrite

if [ -n "${FINETUNE:-}" ]; then
  echo "== 5b fine-tune Inception v3 + decoder jointly -> $RUN-ft (FINETUNE=1)"
  python -m model finetune --run "$RUN" --data "$DATA" --out "$RUN-ft" --epochs "${FT_EPOCHS:-2}"
  python -m infer evaluate --run "$RUN-ft" --data "$DATA" --split test --max-len 30 --overwrite
  RUN="$RUN-ft"
fi

echo "== 6/6 caption images: test images and real photos -> $OUT"
PHOTOS="$(python -c 'import skimage, os; d = os.path.join(os.path.dirname(skimage.__file__), "data"); print(" ".join(os.path.join(d, f) for f in ("astronaut.png", "chelsea.png", "coffee.png")))')"
python -m infer caption --run "$RUN" --out "$OUT" --max-len 30 --overwrite --quiet \
  $(ls "$DATA"/images/test/*.jpg | head -n 6) $PHOTOS

echo
echo "done in $((SECONDS - T0))s. outputs:"
echo "  dataset:        $DATA/images, $DATA/annotations, $DATA/captions.h5"
echo "  features:       $DATA/features (manifest.json says which weights made them)"
echo "  run directory:  $RUN (training_curve.png, history.json, tb/ for TensorBoard)"
echo "  metrics:        $RUN/eval-test/metrics.json"
echo "  captions:       $OUT/annotated/*.jpg, $OUT/captions.jsonl"
