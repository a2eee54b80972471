#!/usr/bin/env bash
# The whole pipeline on the built-in synthetic dataset. Re-running reuses what is done.
#   DATA=data/synth RUN=runs/synth ./demo.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
DATA="${DATA:-data/synth}"
RUN="${RUN:-runs/synth}"
SIZE="${SIZE:-128}"

echo "== 1/5 built-in dataset -> $DATA"
if [ -f "$DATA/annotations/captions_test.json" ]; then echo "exists, reused"
else python -m prepare synth --out "$DATA" --size "$SIZE"; fi

echo "== 2/5 prepare captions -> $DATA/captions.h5"
if [ -f "$DATA/captions.h5" ]; then echo "exists, reused"
else python -m prepare captions --dataset "$DATA" --max-len 28; fi

echo
echo "done. outputs:"
echo "  dataset:   $DATA/images, $DATA/annotations"
echo "  captions:  $DATA/captions.h5"
