# Sourced by demo.sh and test.sh: create or reuse .venv and install requirements.txt into it.
# Re-installs only when requirements.txt changed (a stamp file holds its checksum).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setting up $VENV (first run: about a minute)"
  "$PY" -m venv "$VENV"
fi
want="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt" 2>&1 \
    | grep -v "is ignored: it is neither" || true
  "$VENV/bin/python" -c "import tensorflow, keras, h5py, PIL, tqdm, matplotlib" \
    || { echo "error: installing requirements.txt into $VENV failed (see above)"; exit 1; }
  echo "$want" > "$VENV/.requirements.sha256"
fi
export PATH="$VENV/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
