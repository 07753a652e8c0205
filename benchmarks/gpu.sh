#!/usr/bin/env bash
# The GPU checks of the kernels, in one run of at most 8 minutes on one H100: whenever a GPU is at hand,
# run this first.
#
#   bash benchmarks/gpu.sh            # CUDA tests, then benchmarks/attention_gpu.py; writes BENCHMARKS.md
#   bash benchmarks/gpu.sh --quick    # a subset, about 4 minutes
#   bash benchmarks/gpu.sh --smoke    # no GPU: tiny shapes on the CPU, every code path, writes nothing
#
# From the device tool: run(command="ZOO_COMMIT=<git rev-parse --short HEAD here> bash benchmarks/gpu.sh")
# (the copy of the tree sent there may have no .git). Everything printed goes to $OUT/gpu.log too, with
# $OUT/pytest.log, $OUT/attention_gpu.{jsonl,md} and $OUT/BENCHMARKS.md; without $OUT, under out/gpu/.
# Back here, `python -m benchmarks.attention_gpu --splice <that BENCHMARKS.md>` copies the section in.
#
# Time plan (seconds, full run): GPU facts 5; CUDA tests (fp16/bf16, autotuned launches) at most 140;
# benchmarks at most 300 (their own process per stage: env 20, sparse 140, psa 65, bra 45, patterns 30, each stopped
# at its budget, what it measured kept); 35 to spare. Any stage's failure leaves the others running; the
# exit status is the tests' or, if they passed, the benchmarks'.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODE=full
for arg in "$@"; do
    case "$arg" in
        --quick) MODE=quick ;;
        --smoke) MODE=smoke ;;
        *) echo "usage: bash benchmarks/gpu.sh [--quick|--smoke]" >&2; exit 2 ;;
    esac
done
OUT_DIR="${OUT:-out/gpu}"  # attention_gpu.py writes to the same place: $OUT, else out/gpu
mkdir -p "$OUT_DIR"
PY="${PYTHON:-$(command -v python3 || command -v python)}"

case "$MODE" in
    full) TOTAL=480; T_TESTS=140; FLAG="" ;;
    quick) TOTAL=300; T_TESTS=110; FLAG="--quick" ;;
    smoke) TOTAL=3000; T_TESTS=60; FLAG="--smoke" ;;
esac

main() {
    local start=$SECONDS tests_rc=0 bench_rc=0
    echo "== benchmarks/gpu.sh ($MODE), $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(uname -n)"
    # Read-only queries: the card's settings are left as they are.
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi || true
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
            --format=csv || true
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF' || true
import torch, triton
print(f"python torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"cuda available: {torch.cuda.is_available()}")
EOF
    if [[ -z "${ZOO_COMMIT:-}" ]] && git rev-parse --short HEAD >/dev/null 2>&1; then
        ZOO_COMMIT="$(git rev-parse --short HEAD)"
        ZOO_DIRTY="$([[ -n "$(git status --porcelain 2>/dev/null)" ]] && echo 1 || echo 0)"
    fi
    export ZOO_COMMIT="${ZOO_COMMIT:-}" ZOO_DIRTY="${ZOO_DIRTY:-}" ZOO_GPU_SH=1 PYTHONUNBUFFERED=1
    echo "code: commit ${ZOO_COMMIT:-unknown}, fingerprint $("$PY" -m benchmarks.attention_gpu --fingerprint)"

    # tests/conftest.py turns the Triton interpreter on unless told otherwise: on a GPU it must be off, or
    # the kernels would run on the host and nothing would be autotuned.
    echo "== CUDA tests (at most ${T_TESTS} s)"
    local xdist=()
    if [[ "$MODE" != smoke ]] && "$PY" -c "import xdist" 2>/dev/null; then
        xdist=(-n 4)  # compiling is the slow part: four workers compile side by side
    fi
    if [[ "$MODE" == smoke ]]; then
        export TRITON_INTERPRET=1
    else
        export TRITON_INTERPRET=0
    fi
    if timeout --signal=TERM --kill-after=10 "$T_TESTS" "$PY" -m pytest -q -x -p no:cacheprovider "${xdist[@]}" \
        tests/kernels/test_block_sparse_attention_cuda.py 2>&1 | tee "$OUT_DIR/pytest.log"; then
        tests_rc=0
    else
        tests_rc=$?
    fi
    if [[ "$MODE" == smoke && $tests_rc -eq 5 ]]; then
        tests_rc=0  # pytest's "no tests ran": the CUDA tests skip themselves without a GPU
    fi
    echo "== CUDA tests: exit status $tests_rc after $((SECONDS - start)) s"
    unset TRITON_INTERPRET  # attention_gpu.py sets it for its own stages

    local left=$((TOTAL - (SECONDS - start) - 25))
    echo "== benchmarks (at most ${left} s)"
    export ZOO_TESTS_STATUS="$tests_rc" ZOO_TESTS_LOG="$OUT_DIR/pytest.log"
    if timeout --signal=TERM --kill-after=15 "$((left + 10))" \
        "$PY" -m benchmarks.attention_gpu --budget "$left" $FLAG; then
        bench_rc=0
    else
        bench_rc=$?
    fi
    if [[ "$MODE" != smoke && -f BENCHMARKS.md ]]; then
        cp BENCHMARKS.md "$OUT_DIR/BENCHMARKS.md"
    fi
    echo "== done in $((SECONDS - start)) s: tests exit $tests_rc, benchmarks exit $bench_rc; files in $OUT_DIR"
    if [[ $tests_rc -ne 0 ]]; then return "$tests_rc"; fi
    return "$bench_rc"
}

main 2>&1 | tee "$OUT_DIR/gpu.log"
