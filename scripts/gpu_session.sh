#!/usr/bin/env bash
# The GPU checks, for a session that has a GPU machine for a short while: a bare Linux box with
# CUDA, Python 3.12, PyTorch, JAX and the scientific stack installed, but no network. Everything
# the checks measure goes to $OUT (default results/gpu), named by the GPU (h100, h200, ...), ready
# to be committed under results/reference/ (then update results/README.md's "What the tables
# predate" and the staleness sentence of workflow/report/reference-*.rst).
#
#   bash scripts/gpu_session.sh wheels            # HERE, with network: .whl/ = py3.12 wheels of every
#                                                 #   pinned package (requirements.lock) the GPU machine lacks
#   bash scripts/gpu_session.sh check [SECONDS]   # THERE: all the parts below, most needed first, within
#                                                 #   SECONDS (default 420) in all. .whl/ is git-ignored: the
#                                                 #   device tool's run must name it (carry: [".whl"]), or
#                                                 #   kfac-jax, asv and snakemake are missing there
#   bash scripts/gpu_session.sh PART [SECONDS]    # THERE: one part alone
#
# Parts, in the order `check` runs them, each stopped where its share of the budget ends:
#   costs     step costs on cuda (scripts/step_cost.py; the MNIST-size MLP 784-1000-10 at batch 512
#             until 35% of the budget, then 784-128-10 at 128 until 55%): the numbers the GPU
#             targets are about
#   tests     the GPU tests (pytest -m gpu), until 75%; the whole log in pytest_<gpu>.log
#   pipeline  the default pipeline's cost rule on cuda, then on cpu beside it, until 90% (`check`;
#             alone, the scaling rule too)
#   asv       the asv suite's cuda parameters, with what is left (`check`: in quick mode, which
#             shows that they run, not what they measure; alone: in full)
# A device lease is short (minutes, machine start included), so every part is stopped when the
# budget runs out, keeping what it finished: step_cost.py rewrites its table after each row.
# $OUT/check_<gpu>.txt says what ran, for how long and how it ended. Each part installs .whl/ first
# (into /tmp/site, nothing outside it), so each can run on a fresh machine. The machine's own torch
# and jax are used, whatever their versions: the files record them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-results/gpu}")
SITE=${SITE:-/tmp/site}  # where the carried wheels are installed

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

wheels() {  # afresh: wheels left from an older requirements.lock would make pip refuse the install there
    rm -rf .whl
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
    local foreign  # a wheel built here for this Python (a download that failed, then a wheel of C code)
    foreign=$(ls .whl | grep -Ev -- '-(py3-none|py2\.py3-none|cp312-cp312|cp3[0-9]+-abi3)-' || true)
    if [ -n "$foreign" ]; then echo "not for Python 3.12 (download it again): $foreign" >&2; return 1; fi
    du -sh .whl
}

setup() {  # on the GPU machine: the carried wheels, and a `natgrad` command (the package needs 3.11)
    mkdir -p "$OUT" "$SITE/bin"
    printf '#!/bin/sh\nexec python3 -m natgrad_impls.cli "$@"\n' > "$SITE/bin/natgrad"
    chmod +x "$SITE/bin/natgrad"
    # jax takes 75% of the GPU's memory at its start, in every process, CPU jobs' too: on demand here
    export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
    # h100, h200, ...: the first word of the name with a digit in it ("nogpu" where torch sees none)
    GPU=$(python3 -c "import torch; name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''
print(next((w.lower() for w in name.split() if any(c.isdigit() for c in w)), 'nogpu'))")
    # (a failure or timeout is said below; the parts that need none still run. 63 wheels, 40 MB: seconds)
    if [ -d .whl ] && [ ! -d "$SITE/snakemake" ]; then
        timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl 2>&1 | tail -n 5 | tee -a "$OUT/check_$GPU.txt" || true
    fi
    local missing  # said loudly: without them the peer comparison, asv and the pipeline are skipped
    missing=$(python3 -c "import importlib.util as u
print(' '.join(m for m in ('kfac_jax', 'asv', 'snakemake') if u.find_spec(m) is None))")
    if [ -n "$missing" ]; then
        echo "MISSING on this machine: $missing (was .whl/ carried? run's carry: [\".whl\"])" | tee -a "$OUT/check_$GPU.txt"
    fi
}

START=$SECONDS
BUDGET=${2:-420}
CHECK=0  # 1 under `check`: each part stops where its share ends (leave_after()), so the ones after it run
left() { echo $(( BUDGET - (SECONDS - START) )); }
leave_after() {  # PERCENT: the seconds to leave to the parts after this one, at PERCENT of the budget (0 alone)
    if (( CHECK )); then echo $(( BUDGET * (100 - $1) / 100 )); else echo 0; fi
}

within_budget() {  # [--leave N] COMMAND...: run it with the seconds left (less N, at least 20), never failing the script
    local seconds leave=0
    if [ "$1" = --leave ]; then leave=$2; shift 2; fi
    seconds=$(( $(left) - leave ))
    if (( seconds < 20 )); then
        echo "skipped (${seconds} s left): $*" | tee -a "$OUT/check_$GPU.txt"
        return 0
    fi
    timeout --kill-after=10 "$seconds" "$@" \
        || echo "ended with status $? (124: out of time): $*" | tee -a "$OUT/check_$GPU.txt"
}

part() {  # NAME: run part_NAME, and note in check_<gpu>.txt how long it took and how it ended
    local began=$SECONDS
    "part_$1" || true
    echo "$1: $(( SECONDS - began )) s, $(left) s of the budget left" | tee -a "$OUT/check_$GPU.txt"
}

part_versions() {
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        python3 -c "import torch, jax; print('torch', torch.__version__, 'jax', jax.__version__, jax.devices())"
        echo
    } | tee "$OUT/gpu_tests_$GPU.txt"
}

part_costs() {  # the MNIST-size MLP until 35% of the budget, the small one until 55%
    local size end_percent=35
    for size in "1000 512" "128 128"; do
        set -- $size
        within_budget --leave "$(leave_after $end_percent)" python3 scripts/step_cost.py --device cuda --width "$1" \
            --batch-size "$2" --rounds 3 --out "$OUT/step_cost_cuda_${GPU}_w$1_b$2.csv" 2>&1 \
            | tee -a "$OUT/step_cost_cuda_${GPU}.log" | tail -n 20
        end_percent=55
    done
}

part_tests() {  # the summary beside the versions, the whole log (tracebacks, mismatches) beside it
    within_budget --leave "$(leave_after 75)" python3 -m pytest -q -ra -m gpu -p no:cacheprovider 2>&1 \
        | tee "$OUT/pytest_$GPU.log" \
        | grep -E "^(SKIPPED|FAILED|ERROR|skipped)| in [0-9.]+s|status" | tee -a "$OUT/gpu_tests_$GPU.txt" || true
}

part_asv() {
    (
        cd benchmarks
        asv machine --yes > /dev/null
        # --python=same without --set-commit-hash needs no git history (none travels) and saves
        # nothing: the printed tables are the record. asv hands its benchmark processes
        # ASV_PYTHONPATH, not PYTHONPATH: without it they find neither the package nor the wheels.
        # One round of Cost and OverPeer: the GPU machine runs nothing else, on a fixed budget. Under
        # `check`, the last part, in quick mode: what is left shows that the cuda parameters run.
        ASV_PYTHONPATH=$PYTHONPATH NATGRAD_ASV_DEVICES=cuda NATGRAD_ASV_ROUNDS=1 NATGRAD_ASV_QUICK=$CHECK COLUMNS=200 \
            within_budget asv run --python=same --bench 'Cost|OverPeer|Step|DeviceMemory|Training' --show-stderr 2>&1 \
            | tee "$OUT/asv_cuda_$GPU.txt" | tail -n 40
    )
}

part_pipeline() {
    # Not the default profile, whose report-after-run fails a run stopped --until the timing rules
    # (the report's figures are never made): its settings but that one, and --keep-going, so that
    # one failing job does not stop the others. cuda's jobs first, the machine's CPU beside them
    # after (the second run keeps the first's outputs: `devices` is no parameter of a job).
    # Under `check`, the cost rule alone: the scaling rule's jax jobs compile a program per grid point.
    local devices rules="cost scaling"
    if (( CHECK )); then rules="cost"; fi
    for devices in '[cuda]' '[cpu,cuda]'; do
        # shellcheck disable=SC2086
        within_budget --leave "$(leave_after 90)" snakemake --workflow-profile none --cores all --resources gpu=1 \
            --rerun-incomplete --show-failed-logs --keep-going --until $rules --config "devices=$devices" 2>&1 \
            | tail -n 40
    done
    local written
    written=$(ls -d results/cost results/scaling results/logs/cost results/logs/scaling 2>/dev/null || true)
    if [ -n "$written" ]; then tar czf "$OUT/timing_$GPU.tar.gz" $written; else echo "no timing results yet"; fi
}

case "${1:-}" in
    wheels) wheels ;;
    check) setup; CHECK=1; for name in versions costs tests pipeline asv; do part "$name"; done ;;
    costs|tests|asv|pipeline) setup; part versions; part "$1" ;;
    *) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 2 ;;
esac
