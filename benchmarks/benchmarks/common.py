"""Parameters and helpers shared by the benchmark classes.

NATGRAD_ASV_QUICK=1 shrinks every parameter list to its smallest useful point (one tiny MLP, few
training steps, two samples per timing), so that `make test` can run the whole suite once in about a
minute and fail on a broken benchmark; the numbers it produces mean nothing. Without it, the sizes
are those of the report (`small` is the MLP of scripts/step_cost.py). NATGRAD_ASV_DEVICES=cuda (a
comma list) keeps only those devices, so that a GPU machine spends its time on cuda alone;
NATGRAD_ASV_ROUNDS (default 3, quick 1) sets how many measurements Cost and OverPeer take the median of.
"""

from __future__ import annotations

import os

from asv_runner.benchmarks.mark import SkipNotImplemented

# Everything a benchmark needs is imported here, once: asv.conf.json launches benchmarks from a
# forkserver that imports the suite and forks one process per benchmark and parameter set, so
# these imports are not paid again in every process. Importing runs no computation (no thread
# pools, no device), so forking afterwards is safe. torch.func's first call imports torch._dynamo
# (1.4 s); optax and kfac-jax are the peers'.
import jax  # noqa: E402,F401
import optax  # noqa: E402,F401
import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401

import natgrad_impls.jax  # noqa: E402,F401  (enables float64 in JAX, as every entry point does)
import natgrad_impls.torch  # noqa: E402,F401
from natgrad_impls import timing  # noqa: E402
from natgrad_impls.kfac_jax_compat import import_kfac_jax  # noqa: E402

try:
    import_kfac_jax()  # a test extra, shimmed for this jax; PeerStep skips it where it does not import
except ImportError:
    pass

QUICK = os.environ.get("NATGRAD_ASV_QUICK", "") not in ("", "0")

SETTINGS = list(timing.SETTINGS)  # sgd, sgd-momentum, adam, ef, ngd-exact, ngd-mc, kfac
FRAMEWORKS = ["torch", "jax"]
DEVICES = [d for d in os.environ.get("NATGRAD_ASV_DEVICES", "cpu,cuda").split(",") if d]
if not DEVICES or not set(DEVICES) <= {"cpu", "cuda"}:
    raise ValueError(f"NATGRAD_ASV_DEVICES: {','.join(DEVICES)!r} is not a comma list of cpu, cuda")
# size -> (MLP width, batch size); the MLP is 784-width-10 (timing.mlp_problem).
SIZES = {"tiny": (32, 32)} if QUICK else {"small": (128, 128), "large": (512, 256)}
DTYPE = "float32"
# Median of this many samples in the track_ benchmarks that time through natgrad_impls.timing.
REPEATS = 2 if QUICK else 20
# Cost and OverPeer report the median of this many whole measurements (NATGRAD_ASV_ROUNDS): one taken
# while another process held a core can come out several-fold off (a ratio of 0.05 among 1.08s on a
# busy machine). scripts/gpu_session.sh sets 1: its GPU machine runs nothing else, on a fixed budget.
_ROUNDS = os.environ.get("NATGRAD_ASV_ROUNDS", "1" if QUICK else "3")
if not (_ROUNDS.isdigit() and int(_ROUNDS) >= 1):
    raise ValueError(f"NATGRAD_ASV_ROUNDS: {_ROUNDS!r} is not a whole number of at least 1")
ROUNDS = int(_ROUNDS)
# The scaling sweep (width x batch size) of the report's cost figures, a few settings only.
SWEEP_SETTINGS = ["kfac"] if QUICK else list(timing.SCALING_SETTINGS)
SWEEP_WIDTHS = [32] if QUICK else [64, 128, 256, 512, 1024]
SWEEP_BATCH_SIZES = [32] if QUICK else [32, 128, 512]


def require_device(framework: str, device: str) -> None:
    """SkipNotImplemented where `framework` does not see `device` (cuda without a GPU)."""
    if not timing.device_available(framework, device):
        raise SkipNotImplemented(f"{framework} sees no {device} device")


def warm_up(call, sync, period: int) -> None:
    """Compile, then warm up as every other timing of the project does (`timing.warm_up`: two whole
    periods at least, K-FAC's two inversions, and `timing.WARMUP_S` of calls after the compile), so
    that asv's samples start on a period's first step of a warm step."""
    timing.warm_up(timing.Timed(call, sync, period))


_BUILT: dict = {}


def built(key, build):
    """`build()` for `key`, made once and then returned again: asv (asv_runner >= 0.3) runs `setup`
    before every timed call of a sample when `number` > 1, and each call must be the next step of
    one run (K-FAC's inversion once per period, jax's program compiled once), not the first step of
    a new one. One entry: asv times one parameter set at a time."""
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = build()
    return _BUILT[key]
