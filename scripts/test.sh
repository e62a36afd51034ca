#!/usr/bin/env bash
# Install what is missing, lint, then run the test suite.  Extra arguments go to pytest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVD_TOPK_VENV:-$REPO/.venv}"

"$REPO/scripts/install.sh"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$REPO"
ruff check .
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest "$@"
