# Sourced by the GPU scripts: run from the repository root, take an optional --smoke flag and an output folder
# (default $OUT or ./gpu-out), pick the Python (.venv when present) and put src/ on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT_DIR="${1:-${OUT:-gpu-out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
