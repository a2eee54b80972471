#!/usr/bin/env bash
# Run the test suite (slow end-to-end tests included). Extra arguments go to pytest,
# e.g. ./test.sh -m "not slow" for the quick part only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source ./env.sh || exit 1
exec python -m pytest -q --durations=25 "$@"
