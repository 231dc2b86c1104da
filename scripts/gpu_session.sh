#!/usr/bin/env bash
# The GPU checks, for a session that has a GPU machine for a short while: a bare Linux box with
# CUDA, Python 3.12, PyTorch, JAX and the scientific stack installed, but no network. Everything
# the checks measure goes to $OUT (default results/gpu), named by the GPU (h100, h200, ...), ready
# to be committed under results/reference/.
#
#   bash scripts/gpu_session.sh wheels     # HERE, with network: .whl/ = py3.12 wheels of every pinned
#                                          #   package (requirements.lock) that the GPU machine lacks
#   bash scripts/gpu_session.sh tests      # THERE: versions, the GPU tests, step costs on cuda
#   bash scripts/gpu_session.sh asv        # THERE: the asv suite's cuda parameters
#   bash scripts/gpu_session.sh pipeline   # THERE: the default pipeline's timing rules on cpu and cuda
#
# Each of the last three is meant to fit in one 10-minute command (not yet timed on a GPU) and
# installs .whl/ first (into /tmp/site, nothing outside it), so each can run on a fresh machine.
# The machine's own torch and jax are used, whatever their versions: the files record them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-results/gpu}")
SITE=/tmp/site

# What such a machine's image lacked (compare `python3 -m pip list` there): the pipeline's,
# asv's and the independent references' packages. Versions come from requirements.lock.
LACKS="annotated-types argparse-dataclass asv asv_runner backpack-for-pytorch conda-inject ConfigArgParse
connection_pool curvlinops-for-pytorch decorator distlib distrax dm-tree docutils dpath einconv
fastjsonschema gast gitdb GitPython greenlet humanfriendly immutabledict immutables importlib_metadata
json5 jsonschema jsonschema-specifications jupyter_core kfac-jax lazy-importer mnist1d nbformat
platformdirs PuLP pydantic pydantic_core Pympler python-discovery referencing rpds-py smart_open smmap
snakemake snakemake-executor-plugin-slurm snakemake-executor-plugin-slurm-jobstep
snakemake-interface-common snakemake-interface-executor-plugins snakemake-interface-logger-plugins
snakemake-interface-report-plugins snakemake-interface-scheduler-plugins
snakemake-interface-storage-plugins SQLAlchemy sqlmodel tenacity tfp-nightly throttler traitlets
typing-inspection tzdata unfoldNd virtualenv yte"

pinned() {  # NAME... -> NAME==VERSION lines from requirements.lock (names compared as pip does)
    python3 - "$@" <<'EOF'
import re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
lock = {norm(line.split("==")[0]): line.strip() for line in open("requirements.lock") if "==" in line}
missing = [name for name in sys.argv[1:] if norm(name) not in lock]
if missing:
    sys.exit(f"not in requirements.lock: {', '.join(missing)}")
print("\n".join(lock[norm(name)] for name in sys.argv[1:]))
EOF
}

wheels() {
    mkdir -p .whl
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.whl/" >> .git/info/exclude; }
    local platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
                     --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
    local requirements
    # shellcheck disable=SC2086
    requirements=$(pinned $LACKS)
    for req in $requirements; do
        # shellcheck disable=SC2086
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            $platforms -d .whl "$req" 2>/dev/null \
            || python3 -m pip wheel -q --no-deps -w .whl "$req"  # sdist only: a pure-python wheel
    done
    du -sh .whl
}

setup() {  # on the GPU machine: the carried wheels, and a `natgrad` command (the package needs 3.11)
    if [ ! -d "$SITE/snakemake" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    fi
    mkdir -p "$SITE/bin"
    printf '#!/bin/sh\nexec python3 -m natgrad_impls.cli "$@"\n' > "$SITE/bin/natgrad"
    chmod +x "$SITE/bin/natgrad"
    export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1
    mkdir -p "$OUT"
    GPU=$(python3 -c "import torch; n = torch.cuda.get_device_name(0).split(); print(next(w for w in n if any(c.isdigit() for c in w)).lower())")
}

tests() {
    setup
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        python3 -c "import torch, jax; print('torch', torch.__version__, 'jax', jax.__version__)"
        echo
        python3 -m pytest -q -ra -m gpu -p no:cacheprovider 2>&1 | grep -E "^(SKIPPED|FAILED|ERROR)|passed|failed" || true
    } | tee "$OUT/gpu_tests_$GPU.txt"
    for size in "128 128" "1000 512"; do
        set -- $size
        python3 scripts/step_cost.py --device cuda --width "$1" --batch-size "$2" --rounds 3 \
            --out "$OUT/step_cost_cuda_${GPU}_w$1_b$2.csv"
    done
}

asv_cuda() {
    setup
    cd benchmarks
    asv machine --yes > /dev/null
    # --python=same without --set-commit-hash needs no git history (none travels) and saves nothing:
    # the printed tables are the record. The timeouts end each command inside the machine's limit,
    # keeping what was printed or written so far.
    NATGRAD_ASV_DEVICES=cuda COLUMNS=200 timeout 540 asv run --python=same --bench 'Step|Cost|OverPeer' --show-stderr 2>&1 \
        | tee "$OUT/asv_cuda_$GPU.txt" | tail -n 40 || true
}

pipeline() {
    setup
    timeout 540 snakemake --cores all --until cost scaling --config 'devices=[cpu,cuda]' 2>&1 | tail -n 40 || true
    tar czf "$OUT/timing_$GPU.tar.gz" results/cost results/scaling
}

case "${1:-}" in
    wheels) wheels ;;
    tests) tests ;;
    asv) asv_cuda ;;
    pipeline) pipeline ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
esac
