#!/usr/bin/env bash
# The one command for a lent GPU machine (issue 12; read /work/.library/device/README.md first). With the
# device tool, from the repo root here:
#
#     run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
#
# It fits one 10-minute call (the session's device time is 15 minutes, start-up included):
#   1. installs sglp-fast into the machine's python3 offline (--no-deps --no-build-isolation: its torch,
#      triton, transformers, safetensors, pybind11 and ninja are the image's; the C++ extension builds there,
#      for its Python; nothing here is carried);
#   2. benchmarks/gpu_70b.py with the time left less the tests' share (the checkpoint, the matmul rate, the
#      block forward's MFU, the pipeline under --max-memory 24GiB): scale_gpu.md and scale_gpu.json;
#   3. the CUDA-only tests with what is left (real Triton kernels, GPU vs CPU compensation maps, the GPU
#      offload paths): tests.log.
# Everything lands in $OUT (the device tool brings it back): copy scale_gpu.md to benchmarks/results/.
# On a machine without CUDA, TINY=1 runs the same flow at toy size on the CPU (tests/test_gpu_70b_script.py,
# with RUN_TESTS=0: step 3 is the test suite's own).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/sglp-gpu-session}
TOTAL=${TOTAL:-580}        # seconds for all three steps (the call's limit is 600)
TESTS=${TESTS:-100}        # seconds kept for step 3
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

echo "== 1. install ($("$PY" --version 2>&1))"
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { tail -30 "$OUT/install.log"; echo "gpu_session: the install failed (log above)"; exit 1; }
"$PY" -c "import sglp_fast._fisher, sglp_fast.kernels" || { echo "gpu_session: sglp_fast does not import"; exit 1; }
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'triton', triton.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"

left=$(( TOTAL - $(elapsed) - TESTS ))
echo "== 2. gpu_70b.py, ${left} s"
tiny=()
[ "${TINY:-0}" = 1 ] && tiny=(--tiny)
"$PY" benchmarks/gpu_70b.py ${tiny[@]+"${tiny[@]}"} --scratch "${SCRATCH:-/tmp/sglp-gpu70b}" --time-limit "$left" \
    --out "$OUT/scale_gpu.md" --json "$OUT/scale_gpu.json" >"$OUT/gpu_70b.log" 2>&1
echo "gpu_70b.py exit $?"
tail -40 "$OUT/gpu_70b.log"

left=$(( TOTAL - $(elapsed) - 5 ))
echo "== 3. CUDA-only tests, ${left} s"
if [ "${RUN_TESTS:-1}" = 1 ] && [ "$left" -gt 10 ]; then
    timeout "$left" "$PY" -m pytest -q -p no:cacheprovider -x \
        "tests/test_matrix_store.py::test_the_solve_on_the_gpu_gives_the_cpus_maps" \
        tests/test_devices.py tests/test_offload.py tests/test_kernels.py tests/test_cka.py >"$OUT/tests.log" 2>&1
    echo "tests exit $? (124: out of time)"
    tail -15 "$OUT/tests.log"
fi
echo "gpu_session: $(elapsed) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
