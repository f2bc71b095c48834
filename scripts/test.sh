#!/usr/bin/env bash
# Run the test suite in .venv. pytest's exit code 5 ("no tests collected") is a failure here, said out loud.
set -uo pipefail
cd "$(dirname "$0")/.."
# CI has no GPU: Triton kernels run in the interpreter on the CPU (set here and in tests/conftest.py).
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    export TRITON_INTERPRET=1
fi
.venv/bin/python -m pytest --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests: that is a failure, not a pass" >&2
    exit 1
fi
exit "$rc"
