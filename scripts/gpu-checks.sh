#!/usr/bin/env bash
# The GPU checks of proof-of-training, as one prepared run on the GPU machine (the device tool), which has torch:
#   here:   bash scripts/gpu-wheels.sh
#   device: run(command="bash scripts/gpu-checks.sh", carry=[".whl"], timeout_s=600)
# It runs the gpu-marked tests (async hashing of CUDA state, bit-for-bit CUDA replay, CUDA work checked on the CPU
# within a calibrated tolerance, a bf16 CUDA provider refereed on the CPU relative to each update, a provider
# training on CUDA in fp32 and bf16 and re-deriving states, a verifier on the same GPU model replaying bit for bit
# and catching a float8 step) and
# `gridmint bench proof --device cuda` (proof overhead with torch.compile and where it goes: overhead_detail,
# cross-device verification in fp32 and bf16, same-device replay: same_device_fp32/bf16); logs in $OUT.
# On an H200 (2026-12-04) it took 261 s with 10 cross-device units and 2 per adversary (tests 21 s, bench 220 s; each cross-device section's calibration ~17-21 s
# and honest units ~12-15 s by its figures): the defaults below (3x the units, 2x the cheats) should add ~100 s, the
# same-device sections (not yet run on a GPU: ~10k tiny steps, estimated ~50 s) the rest, inside the budget; they
# run last, so a cut-off run loses only them. The overhead runs 5 plain/committed pairs (was 3: on the H200 they
# spread 0.93-0.97, so the median of 3 moved with one pair; each pair of 300 steps is ~23 s there, +46 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gridmint-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout "${TESTS_S:-160}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/node/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.log"
tests_rc=${PIPESTATUS[0]}
# the bench gets what the tests left of the whole budget (TOTAL_S, inside the device call's 600 s); its figures are
# logged section by section, so a cut-off run still leaves the finished sections' figures in the log
bench_s=${BENCH_S:-$(( ${TOTAL_S:-555} - SECONDS ))}
echo "bench budget ${bench_s} s"
timeout "$bench_s" python3 -c "import sys; from gridmint.bench.proof import main; sys.exit(main(sys.argv[1:]))" \
  --device cuda --repeats "${REPEATS:-5}" --cross-units "${CROSS_UNITS:-30}" --cross-cheat-units "${CROSS_CHEATS:-4}" \
  2>&1 | tee "$OUT/bench-proof-cuda.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc $tests_rc, bench rc $bench_rc"
exit $(( tests_rc || bench_rc ))
