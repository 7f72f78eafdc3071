#!/usr/bin/env bash
# The day a GPU is lent: one script, <= 8 minutes on one GPU. Runs every `gpu`-marked test, then the
# engine's decode benchmark on CUDA (bf16, a random ~1.1B Llama, batch 1 and 32: tokens/s and MBU),
# and prints one JSON object on stdout (logs go to stderr). Exit status 0 only if both passed.
#
#     bench/gpu_check.sh                 # PYTHON=... to pick the interpreter (a CUDA build of torch)
#
# Not yet run on a GPU: written and checked on CPU (tests/engine/test_bench_decode.py runs the same
# decode code with --device cpu).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo '{"error": "torch sees no CUDA device: run this on a GPU machine with a CUDA build of torch"}'
  exit 2
fi

start=$(date +%s)
# The tests: 5 minutes at most (the gpu tests are a handful; a hang must not eat the bench's time).
timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests --junitxml="$work/gpu.xml" >&2
tests_rc=$?
tests_s=$(( $(date +%s) - start ))

start=$(date +%s)
timeout 170 "$PYTHON" bench/engine.py --decode --device cuda --dtype bfloat16 --shape 1b \
  --decode-batch-sizes 1,32 --json >"$work/bench.json"
bench_rc=$?
bench_s=$(( $(date +%s) - start ))

"$PYTHON" - "$work" "$tests_rc" "$tests_s" "$bench_rc" "$bench_s" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

work, tests_rc, tests_s, bench_rc, bench_s = sys.argv[1], *map(int, sys.argv[2:])
tests = {"exit_code": tests_rc, "seconds": tests_s}
xml = Path(work, "gpu.xml")
if xml.exists():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
bench_text = Path(work, "bench.json").read_text().strip()
bench = json.loads(bench_text) if bench_rc == 0 and bench_text else None
print(json.dumps({"gpu_tests": tests, "engine_decode": bench, "bench_exit_code": bench_rc,
                  "bench_seconds": bench_s, "ok": tests_rc == 0 and bench_rc == 0}))
PY
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
