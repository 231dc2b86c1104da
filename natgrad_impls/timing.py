"""Wall-clock cost of one optimizer step and of one mini-batch gradient (DESIGN 4: "Time").

Both are timed the same way: built and warmed up (jit compilation, allocator, then WARMUP_S of
calls) first, then each call synchronised (torch.cuda.synchronize, jax block_until_ready) and the
median of `repeats` samples taken, the step's and the gradient's in turn (`alternating_medians`),
each sample after a moment of untimed calls of its own where a longer call ran before it (SETTLE_S).
Cost in gradient-equivalents = time(step) / time(gradient) on the same task, framework, device.
The asv suite (benchmarks/), the cost script (scripts/step_cost.py) and the pipeline's timing rules
all time through here, with the settings in `SETTINGS`: on the MLP `mlp_problem` builds (asv, the
script, the scaling rule) or on a task's own model (`task_problem`, the cost rule).

Peers, the libraries users would otherwise pick, are timed the same way on the same parameters and
batch (`peer_step_call`): torch.optim.SGD/Adam (foreach), optax.sgd/adam (jitted), and kfac-jax's
K-FAC optimizer with fixed learning rate, damping and no momentum.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import sys
import time
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

from natgrad_impls import make_optimizer, models
from natgrad_impls.models import Problem
from natgrad_impls.hyperparameters import HYPERPARAMETERS, KFAC
from natgrad_impls.names import Curvature, Device, DType, Fisher, Framework, Likelihood, Optimizer, parse


# -- what is timed ------------------------------------------------------------------------------------

def mlp_problem(width: int = 128, batch_size: int = 128, seed: int = 0, sizes: Iterable[int] | None = None):
    """(problem, params, batch) of the cost benchmarks: a 784-width-10 relu MLP (width 128: 101,770
    parameters; `sizes` gives other layer sizes, input first), categorical likelihood, NumPy
    float64 Glorot parameters from `seed` and a random batch of `batch_size` standard-normal inputs with
    uniform labels. Random data is enough for timing: the work of a step does not depend on the values."""
    sizes = tuple(sizes) if sizes is not None else (784, width, 10)
    model = models.mlp(sizes, "relu")
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(batch_size, sizes[0])), rng.integers(0, sizes[-1], batch_size)
    return Problem(model, Likelihood.CATEGORICAL), models.init_params(model, seed), data


def kfac_floor(model: models.Model, batch_size: int, period: int = 10) -> dict:
    """Multiply-adds of a K-FAC step on a dense MLP against those of the mini-batch gradient: the
    arithmetic floor of its cost in gradient-equivalents, if every product ran at the gradient's
    rate. Per layer (in' = in + 1 with the bias, N = batch_size):
      gradient:     2 N out in' (forward, weight gradient) + N out in (backward into the input;
                    not for the first layer);
      precondition: out^2 in' + out in'^2 (G^-1 grad A^-1, every step);
      factors:      N (in'^2 + out^2) / 2 (the symmetric halves of A and G, every step);
      inverses:     (in'^3 + out^3) / (2 period) (Cholesky n^3 / 6 and inverse from it n^3 / 3).
    `floor` counts the gradient and the preconditioning only (nothing cheaper computes the update
    from given inverses); `with_factors` adds the factors and the amortised inverses."""
    counts = dict.fromkeys(("gradient", "precondition", "factors", "inverses"), 0.0)
    for index, (_, layer) in enumerate(model.parametric()):
        if not isinstance(layer, models.Dense):
            raise ValueError(f"model: kfac_floor counts dense layers only, not {type(layer).__name__}")
        out, inp = layer.out_features, layer.in_features + int(layer.bias)
        counts["gradient"] += 2 * batch_size * out * inp + (batch_size * out * layer.in_features if index else 0)
        counts["precondition"] += out * out * inp + out * inp * inp
        counts["factors"] += batch_size * (inp * inp + out * out) / 2
        counts["inverses"] += (inp**3 + out**3) / (2 * period)
    gradient = counts["gradient"]
    return {**counts, "floor": (gradient + counts["precondition"]) / gradient,
            "with_factors": sum(counts.values()) / gradient}


# What is timed, by label (the cost tables' `setting` column): "sgd", "ngd-mc", ... -> (optimizer, hyperparameters).
# Unnamed hyperparameters are the library's defaults (`kfac`: MC labels, one sample, ema 0.95). The
# lr is small: timing runs take hundreds of steps on random data and must not diverge.
SETTINGS: dict[str, tuple[str, dict]] = {
    "sgd": ("sgd", {"lr": 1e-4}),
    "sgd-momentum": ("sgd", {"lr": 1e-4, "momentum": 0.9}),
    "adam": ("adam", {"lr": 1e-4}),
    "ef": ("ef", {"lr": 1e-4, "damping": 1e-3}),
    "ngd-exact": ("ngd", {"lr": 1e-4, "damping": 1e-3, "fisher": "exact"}),
    "ngd-mc": ("ngd", {"lr": 1e-4, "damping": 1e-3, "fisher": "mc"}),
    "kfac": ("kfac", {"lr": 1e-4, "damping": 1e-3, "kfac_update_period": 10}),
}


def setting(label: str) -> tuple[str, dict]:
    """(optimizer, hyperparameters) of a label of `SETTINGS`, or a ValueError naming the labels."""
    if label not in SETTINGS:
        raise ValueError(f"setting: {label!r} is not one of {', '.join(SETTINGS)}")
    optimizer, hyperparameters = SETTINGS[label]
    return optimizer, dict(hyperparameters)


def device_available(framework, device) -> bool:
    """Whether `framework` sees a `device` (cpu always; cuda where a GPU is visible to it)."""
    from natgrad_impls.runner import available_devices  # (runner imports this module)

    framework, device = parse(Framework, framework, "framework"), parse(Device, device, "device")
    return device in available_devices(framework)


def cpu_threads(framework) -> int:
    """The CPU threads `framework` (torch or jax) may use in this process: torch's intra-op pool;
    XLA's, sized from PJRT_NPROC or NPROC (runner.thread_environment) or else the cores this process
    may run on. A table records it beside its machine: jax's two-thread ratios on a small MLP move
    between runs, where one thread gives another number (results/README)."""
    import os

    from natgrad_impls.runner import usable_cores

    framework = parse(Framework, framework, "framework")
    if framework == Framework.NUMPY:
        raise ValueError("framework: numpy steps are not timed (torch or jax)")
    if framework == Framework.TORCH:
        import torch

        return torch.get_num_threads()
    for name in ("PJRT_NPROC", "NPROC"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return usable_cores()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, sysctl on macOS), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    """The installed version of a package, without importing it (jax and torch imports are slow)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_versions(packages) -> str:
    """"torch 2.13.0, jax 0.10.2": what a saved timing table was measured with (a table outlives the
    versions it was measured on, and a framework's release moves its rows); those not installed
    left out."""
    versions = ((name, package_version(name)) for name in dict.fromkeys(map(str, packages)))
    return ", ".join(f"{name} {version}" for name, version in versions if version is not None)


# The package behind each peer's prefix (timing.PEERS), whose release moves its over_<peer> ratio.
PEER_PACKAGES = {"torch.optim": "torch", "optax": "optax", "kfac_jax": "kfac-jax"}


def device_name(device, framework="torch") -> str:
    """What ran a measurement on `device`: the CPU's model, or the model of the GPU `framework`
    (torch or jax; numpy: torch's) sees first, so that a saved table names its machine."""
    device, framework = parse(Device, device, "device"), parse(Framework, framework, "framework")
    if device == Device.CPU:
        return cpu_model()
    if framework == Framework.JAX:
        import jax

        return jax.devices("gpu")[0].device_kind
    import torch

    return torch.cuda.get_device_name(0)


def _parsed(framework, device, dtype) -> tuple[Framework, Device, DType]:
    """The three names as Enums, or a ValueError naming the bad field and its allowed values."""
    return parse(Framework, framework, "framework"), parse(Device, device, "device"), parse(DType, dtype, "dtype")


def _framework_io(framework: Framework, device: Device, dtype: DType):
    """(to params, to batch, synchronise) for a framework on a device."""
    if framework == Framework.TORCH:
        import torch

        import natgrad_impls.torch as nt

        torch_dtype = getattr(torch, dtype.value)

        def batch(x, y):
            y = torch.as_tensor(y, device=device.value)
            return torch.as_tensor(x, dtype=torch_dtype, device=device.value), (y.to(torch_dtype) if y.is_floating_point() else y)

        sync = torch.cuda.synchronize if device == Device.CUDA else (lambda *_: None)
        return (lambda p: nt.to_torch(p, device.value, torch_dtype)), batch, (lambda out: sync())
    if framework == Framework.JAX:
        import jax
        import jax.numpy as jnp

        import natgrad_impls.jax as nj

        jax_device = nj.jax_device(device)
        jax_dtype = getattr(jnp, dtype.value)
        put = lambda a, t=None: jax.device_put(jnp.asarray(a, dtype=t), jax_device)

        def batch(x, y):
            return put(x, jax_dtype), put(y, jax_dtype if np.issubdtype(np.asarray(y).dtype, np.floating) else None)

        return (lambda p: {k: put(v, jax_dtype) for k, v in p.items()}), batch, jax.block_until_ready
    if device != Device.CPU or dtype != DType.FLOAT64:
        raise ValueError("framework: numpy runs on cpu in float64 only")
    return (lambda p: {k: np.asarray(v, np.float64) for k, v in p.items()}), (lambda x, y: (x, y)), (lambda out: None)


# Measured on digits-mlp in jax on a 2-core CPU: a step timed right after its compile ran 2-4x
# slower over its first milliseconds than later (sgd 0.66-0.94 ms against 0.21-0.32 after 0.2 s).
WARMUP_S = 0.2  # seconds of calls, at least, before any sample
MIN_SAMPLE_S = 2e-3  # a sample spans whole blocks lasting this long at least: a timer read and a
                     # scheduler tick must not weigh on a sub-millisecond call
# Measured in jax on 784-1000-10 at batch 512 on a 2-core CPU: the first 4 or 5 gradients after an
# exact-NGD step (0.57 s) took 6-16 ms against 4.1 ms in a row, so a gradient sampled right after
# that step came out at 7.4-9.1 ms, and the step at half its gradient-equivalents.
# After an exact-NGD step of 11 ms (mnist1d-mlp) only the first gradient was slow (0.26 against 0.14 ms):
# a wake lasts a fraction of the call that leaves it, so a settle lasts as long as the sample before it.
SETTLE_S = 0.05  # at most, untimed calls of the same kind before each sample taken in turn with others


class Timed(NamedTuple):
    """A zero-argument call, the sync that waits for its output, and the calls a sample's blocks
    hold (K-FAC's inversion period: each block charges its steps their share of the inversion)."""

    call: Callable[[], object]
    sync: Callable[[object], None]
    block: int = 1


def alternating_medians(timed: Sequence[Timed], repeats: int, warmup: int = 2, warmup_s: float = WARMUP_S,
                        min_sample_s: float = MIN_SAMPLE_S, settle_s: float = SETTLE_S) -> list[float]:
    """Per timed call, the median over `repeats` samples of the mean time of one call, each call
    synchronised as the runner's steps are (no more of the syncs than the gradient a step is
    divided by). The calls are warmed up (`warm_up`: a block that may compile, then `warmup` blocks,
    and more until `warmup_s` has passed) and then sampled in turn, so that a burst of load on a
    shared machine falls on all of them and their ratios (gradient-equivalents, ours over a peer's)
    are steadier than their times. Where several calls take turns, each sample of a call follows its
    own untimed blocks for as long as the sample before it took, `settle_s` at most (none where one
    block of the call is longer): it measures the call in a row, as training runs it, not in the wake of
    a longer call of another kind (SETTLE_S)."""
    warm = [_warm_up(t, warmup, warmup_s, min_sample_s) for t in timed]
    samples = [[] for _ in timed]
    previous_s = warm[-1][1]  # the seconds of the last sample (at first, of the last warm-up block)
    for _ in range(repeats):
        for t, (calls, block_s), times in zip(timed, warm, samples):
            settle = min(settle_s, previous_s)
            if len(timed) > 1 and block_s < settle:
                _run_for(t, settle)
            seconds = _block_seconds(t.call, t.sync, calls)
            times.append(seconds / calls)
            previous_s = seconds
    return [statistics.median(times) for times in samples]


def warm_up(t: Timed, warmup: int = 2, warmup_s: float = WARMUP_S, min_sample_s: float = MIN_SAMPLE_S) -> int:
    """Run one block of `t`, which may compile, then `warmup` blocks, and more until `warmup_s` has
    passed since that first block (a compile longer than `warmup_s` would otherwise end the warm-up
    with it, and size the samples by it); return the calls a sample takes: as many whole blocks as
    last `min_sample_s`, by the last block's time."""
    return _warm_up(t, warmup, warmup_s, min_sample_s)[0]


def _warm_up(t: Timed, warmup: int, warmup_s: float, min_sample_s: float) -> tuple[int, float]:
    """`warm_up`'s calls per sample, and the seconds of its last block."""
    took = _block_seconds(t.call, t.sync, t.block)
    start, done = time.perf_counter(), 0
    while done < warmup or time.perf_counter() - start < warmup_s:
        took, done = _block_seconds(t.call, t.sync, t.block), done + 1
    blocks = math.ceil(min_sample_s / max(took, 1e-9)) if min_sample_s > 0 else 1
    return t.block * max(1, blocks), took


def _run_for(t: Timed, seconds: float) -> None:
    """Whole blocks of `t`, untimed, until `seconds` have passed."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        _block_seconds(t.call, t.sync, t.block)


def _block_seconds(call: Callable[[], object], sync: Callable[[object], None], block: int) -> float:
    """Wall-clock of `block` consecutive calls, each followed by its sync."""
    start = time.perf_counter()
    for _ in range(block):
        sync(call())
    return time.perf_counter() - start


def step_call(framework, optimizer, problem: Problem, params, batch, device="cpu", dtype="float32", **hyperparameters):
    """A zero-argument callable that performs one optimizer step (carrying its state along) and
    returns (params, state), the matching sync, and the number of steps over which the step's cost
    repeats (K-FAC's period). Steps keep updating the same run, as in training."""
    framework, device, dtype = _parsed(framework, device, dtype)
    to_params, to_batch, sync = _framework_io(framework, device, dtype)
    opt = make_optimizer(framework, optimizer, problem, **hyperparameters)
    carry = {"params": to_params(params)}
    carry["state"] = opt.init(carry["params"])
    data = to_batch(*batch)

    def call():  # the state too: jax's sync must wait for the factors' update as well as the params'
        carry["params"], carry["state"], info = opt.step(carry["params"], carry["state"], data)
        return carry["params"], carry["state"]

    return call, sync, getattr(opt.hyperparameters, "kfac_update_period", 1)


def gradient_call(framework, problem: Problem, params, batch, device="cpu", dtype="float32"):
    """A zero-argument callable computing one mini-batch loss and gradient: the unit of cost."""
    framework, device, dtype = _parsed(framework, device, dtype)
    to_params, to_batch, sync = _framework_io(framework, device, dtype)
    p, data = to_params(params), to_batch(*batch)
    if framework == Framework.TORCH:
        from natgrad_impls.torch import model as M

        # one reverse pass of plain autograd (torch.func.grad_and_value adds ~0.3 ms a call)
        return (lambda: M.loss_and_grad(problem, p, data)), sync
    if framework == Framework.JAX:
        import jax

        import natgrad_impls.jax as nj

        grad = jax.jit(jax.value_and_grad(lambda q, b: nj.loss(problem, q, b)))
        return (lambda: grad(p, data)), sync
    import natgrad_impls.numpy as nn

    return (lambda: nn.gradient(problem, p, data)), sync


def kfac_inverse_call(framework, problem: Problem, params, batch, device="cpu", dtype="float32", damping=1e-3):
    """A zero-argument callable that refreshes K-FAC's damped inverses from one batch's factors, and
    its sync: the work a `kfac` step does once every kfac_update_period steps, timed alone so that a
    K-FAC step's cost splits into what the period amortises and what it does not. The factors are
    those of a `kfac` run's first step (MC labels drawn as its step 0 draws them, seed 0), so the
    call computes the inverses that step computes."""
    framework, device, dtype = _parsed(framework, device, dtype)
    to_params, to_batch, sync = _framework_io(framework, device, dtype)
    p, data = to_params(params), to_batch(*batch)
    if framework == Framework.TORCH:
        from natgrad_impls.torch import curvature as C, optimizers

        generator = optimizers.mc_sampler(0, 0, device.value)
        factors = C.kronecker(C.gradient_and_curvature(problem, p, data, Curvature.MC, 1, generator)[2])
        return (lambda: factors.inverse(damping)), sync
    if framework == Framework.JAX:
        import jax

        from natgrad_impls.jax import curvature as C, optimizers

        key = optimizers.mc_sampler(0, 0)
        factors = C.kronecker(C.gradient_and_curvature(problem, p, data, Curvature.MC, 1, key)[2])

        def invert(A, G):  # both inverses are returned, or XLA would drop the unused one
            inverse = C.KroneckerCurvature(problem.model, A, G, factors.shift).inverse(damping)
            return inverse.A, inverse.G

        invert = jax.jit(invert)
        return (lambda: invert(factors.A, factors.G)), sync
    raise ValueError("framework: kfac_inverse_call times torch or jax (numpy's kfac is for linear models)")


def gradient_equivalents(framework, optimizer, problem, params, batch, device="cpu", dtype="float32", repeats=20,
                         **hyperparameters) -> dict:
    """Median step time, median gradient time and their ratio, sampled in turn in one process."""
    step, sync, period = step_call(framework, optimizer, problem, params, batch, device, dtype, **hyperparameters)
    grad, _ = gradient_call(framework, problem, params, batch, device, dtype)
    step_s, grad_s = alternating_medians([Timed(step, sync, period), Timed(grad, sync)], repeats)
    return {"step_s": step_s, "gradient_s": grad_s, "gradient_equivalents": step_s / grad_s}


def peak_device_bytes(framework, device, run: Callable[[], object]) -> int:
    """The most bytes `framework`'s allocator held on `device` while `run()` ran, from the
    allocator's own counters: torch.cuda.max_memory_allocated after a reset of its peak, and jax's
    `peak_bytes_in_use`, which cannot be reset and so counts from the process's start (call it in
    a fresh process, as asv's one process per benchmark is). cuda only: on the CPU neither framework
    counts its allocations, and a process's resident memory (asv's peakmem_) is the measure there."""
    framework, device = parse(Framework, framework, "framework"), parse(Device, device, "device")
    if framework not in (Framework.TORCH, Framework.JAX):
        raise ValueError(f"framework: peak_device_bytes reads torch's or jax's allocator, not {framework.value}'s")
    if device != Device.CUDA:
        raise ValueError(f"device: peak_device_bytes reads a cuda allocator, not {device.value}'s")
    if framework == Framework.TORCH:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    import jax

    jax.block_until_ready(run())
    stats = jax.devices("gpu")[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:  # XLA_PYTHON_CLIENT_ALLOCATOR=platform keeps none
        raise RuntimeError("jax's GPU allocator keeps no peak_bytes_in_use (is XLA_PYTHON_CLIENT_ALLOCATOR set?)")
    return int(stats["peak_bytes_in_use"])


def torch_ops(optimizer, problem: Problem, params, batch, dtype="float32", **hyperparameters) -> dict:
    """Operators a torch step dispatches that write new data (`dispatched_ops`), averaged over one
    K-FAC period after warm-up, those of the mini-batch gradient, and their ratio. On a GPU a small
    model's step is bound by kernel launches, one or a few per such operator: the ratio is a
    device-independent proxy of its cost in gradient-equivalents there, counted on the CPU."""
    def count(call, calls):
        for _ in range(calls):  # warm-up: K-FAC's first step has no moving average to update
            call()
        return sum(dispatched_ops(call, calls).values()) / calls

    step, _, period = step_call("torch", optimizer, problem, params, batch, "cpu", dtype, **hyperparameters)
    grad, _ = gradient_call("torch", problem, params, batch, "cpu", dtype)
    step_ops, gradient_ops = count(step, period), count(grad, 1)
    return {"step_ops": step_ops, "gradient_ops": gradient_ops, "ops_over_gradient": step_ops / gradient_ops}


def dispatched_ops(call: Callable[[], object], calls: int = 1) -> "collections.Counter[str]":
    """Names and counts of the torch operators that `calls` calls of `call` dispatch and that write
    new data (views excluded), backward passes included (a TorchDispatchMode sees every one)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Record() as record:
        for _ in range(calls):
            call()
    return record.ops


def scaling_sweep(framework, label: str, widths: Iterable[int], batch_sizes: Iterable[int], device="cpu",
                  dtype="float32", repeats: int = 20, hyperparameters: dict | None = None, seed: int = 0):
    """Step and gradient time over a grid of MLP widths and batch sizes (`mlp_problem`), one row per
    grid point, long format: framework, device, dtype, optimizer, setting, width, batch_size,
    num_params, step_s, gradient_s, gradient_equivalents. `label` is a label of `SETTINGS` ("kfac",
    "ngd-mc", ...: the setting column; the optimizer column gets its optimizer's name);
    `hyperparameters` override the label's. The report's cost figures and the pipeline's timing
    rules read this table; the asv suite (bench_scaling) times one grid point per benchmark."""
    import pandas as pd

    name, hp = setting(label)
    hp.update(hyperparameters or {})
    framework, device, dtype = _parsed(framework, device, dtype)
    if not device_available(framework, device):
        raise ValueError(f"device: {device.value!r} is not visible to {framework.value}")
    rows = []
    for width in widths:
        for batch_size in batch_sizes:
            problem, params, batch = mlp_problem(width, batch_size, seed)
            cost = gradient_equivalents(framework, name, problem, params, batch, device, dtype, repeats, **hp)
            rows.append(dict(framework=framework.value, device=device.value, dtype=dtype.value, optimizer=name,
                             setting=label, width=width, batch_size=batch_size,
                             num_params=problem.model.num_params(), **cost))
    return pd.DataFrame(rows)


def task_problem(task: str, seed: int = 0):
    """(task, problem, params, batch) of a task's own model: Glorot parameters from `seed`
    (`models.init_params`) and one mini-batch of the task's batch size (full batch when it has
    none), drawn from its training set by `seed`. Real data, so that a timed step sees the shapes
    and values of training."""
    from natgrad_impls.tasks import get_task

    task = get_task(task)
    train = task.load(seed).train
    n = len(train.X)
    size = n if task.batch_size is None else min(task.batch_size, n)
    rows = np.sort(models.random_stream(seed, "timing_rows").choice(n, size, replace=False))
    return task, task.problem, models.init_params(task.problem.model, seed), (train.X[rows], train.y[rows])


COST_REPEATS = 10  # samples per median: a digits-mlp or mnist1d-mlp cost table in ~5-10 s on 2 CPU cores
COST_BUDGET_S = 1.5  # seconds of samples per setting at most (3 samples at least; see affordable_repeats)


def affordable_repeats(call, sync, repeats: int, block: int = 1, budget_s: float = COST_BUDGET_S) -> int:
    """`repeats`, or fewer (at least 3) when one block of calls is so slow that `repeats` of them would
    take more than `budget_s`: a slow setting (ngd-exact on a busy CPU takes up to a second a step)
    must not hold up a whole cost table. One block first compiles whatever a block runs (jax's
    K-FAC: its step with and its step without the inverse refresh), then one timed block decides;
    both count as the start of the step's warm-up."""
    _block_seconds(call, sync, block)
    took = _block_seconds(call, sync, block)
    return int(max(3, min(repeats, budget_s // max(took, 1e-9))))


def cost_table(task: str, framework, device="cpu", dtype="float32", settings: Iterable[str] = tuple(SETTINGS),
               repeats: int = COST_REPEATS, seed: int = 0):
    """One optimizer step of every setting (labels of `SETTINGS`) and one mini-batch gradient on a
    task's own model and batch (`task_problem`), one row per setting: task, optimizer, setting,
    framework, device, dtype, batch_size, num_params, step_s, gradient_s, gradient_equivalents,
    contended.
    The gradient is sampled in turn with each step so that both see the same machine load (the
    machine may be shared), and a setting whose gradient shows outside load is measured again
    (`remeasure_contended`); K-FAC's samples span whole inversion periods. The report's step-cost
    figure reads this table; `mlp_problem` tables (`scaling_table`) measure the same on a fixed MLP."""
    import pandas as pd

    framework, device, dtype = _parsed(framework, device, dtype)
    if not device_available(framework, device):
        raise ValueError(f"device: {device.value!r} is not visible to {framework.value}")
    labels = list(settings)
    for label in labels:
        setting(label)  # fail on a bad label before measuring anything
    spec, problem, params, batch = task_problem(task, seed)
    grad, grad_sync = gradient_call(framework, problem, params, batch, device, dtype)

    def measure(label):
        optimizer, hp = setting(label)
        step, sync, period = step_call(framework, optimizer, problem, params, batch, device, dtype, **hp)
        samples = affordable_repeats(step, sync, repeats, period)
        step_s, grad_s = alternating_medians([Timed(step, sync, period), Timed(grad, grad_sync)], samples, warmup=0)
        return dict(step_s=step_s, gradient_s=grad_s, gradient_equivalents=step_s / grad_s)

    rows = []
    for i, label in enumerate(labels):
        rows.append(dict(task=spec.name, optimizer=setting(label)[0], setting=label, framework=framework.value,
                         device=device.value, dtype=dtype.value, batch_size=len(batch[0]),
                         num_params=problem.model.num_params(), **measure(label)))
        _progress(f"{spec.name} {framework.value} {device.value} {label}", rows[-1], i + 1, len(labels))
    return remeasure_contended(pd.DataFrame(rows), lambda row: measure(row.setting), ["task"])


def _progress(name: str, row: dict, done: int, total: int) -> None:
    """One line per measured setting, flushed: a timing job's log is a file, and a long one (the
    scaling sweep with jax: minutes) should show where it is."""
    print(f"timing: {name}: {row['gradient_equivalents']:.3g} gradient-equivalents ({done} of {total})", flush=True)


# A row whose gradient took over CONTENDED_RATIO x the fastest gradient of the same model and batch
# in its table was sampled while something else held the cores: torch's OpenMP threads then wait
# for a time slice each (on 2 cores, both busy: 40 ms for a 784-128-10 gradient against 0.4 ms).
# The step beside it was slowed too, by another factor, so the row is measured again.
CONTENDED_RATIO = 2.0
CONTENDED_TRIES = 2


def remeasure_contended(table, measure: Callable[[object], dict], same_gradient: list[str],
                        ratio: float = CONTENDED_RATIO, tries: int = CONTENDED_TRIES):
    """`table` with each row whose gradient_s exceeds `ratio` x the least gradient_s among the rows
    that share its `same_gradient` columns (one model and batch) measured again by `measure(row)`
    (a dict of new values), up to `tries` times. A new measurement replaces the row only where its
    step and gradient took less time together: load only adds time, and a burst can land on the
    step's samples alone. The rows still slow then are named on stderr and marked in a `contended`
    column. Load that lasts a whole table is not detected: nothing in it is fast to compare with."""
    def contended():
        fastest = table.groupby(same_gradient)["gradient_s"].transform("min")
        return table.index[table["gradient_s"] > ratio * fastest], fastest

    for _ in range(tries):
        slow, fastest = contended()
        for i in slow:
            row = table.loc[i]
            print(f"timing: {_row_name(row)}: gradient {row.gradient_s:.3g} s, {row.gradient_s / fastest[i]:.0f}x the "
                  "fastest of the same model; measured again (the machine was busy)", file=sys.stderr, flush=True)
            again = measure(row)
            if again["step_s"] + again["gradient_s"] < row.step_s + row.gradient_s:
                for column, value in again.items():
                    table.loc[i, column] = value
            else:
                print(f"timing: {_row_name(row)}: the new measurement took longer (step {again['step_s']:.3g} s, "
                      f"gradient {again['gradient_s']:.3g} s); the row keeps the first", file=sys.stderr, flush=True)
    slow, fastest = contended()
    for i in slow:
        row = table.loc[i]
        print(f"timing: {_row_name(row)}: gradient still {row.gradient_s / fastest[i]:.0f}x the fastest after {tries} "
              "new measurements; its times are those of a busy machine (column contended)", file=sys.stderr, flush=True)
    table["contended"] = table.index.isin(slow)
    return table


def _row_name(row) -> str:
    """A timing row as its log names it: the setting, and the model where the table has several."""
    sizes = f" width {row.width} batch {row.batch_size}" if "width" in row else ""
    return f"{row.setting}{sizes}"


SCALING_SETTINGS = ("sgd", "adam", "ef", "ngd-mc", "kfac")  # ngd-exact (classes x the work of ngd-mc) on request


def scaling_table(framework, device="cpu", widths: Iterable[int] = (64, 128, 256), batch_sizes: Iterable[int] = (32, 128),
                  settings: Iterable[str] = SCALING_SETTINGS, dtype="float32", repeats: int = 5, seed: int = 0):
    """`scaling_sweep` over several settings as one tidy table: framework, device, dtype, optimizer,
    setting (the label of `SETTINGS`), width, batch_size, num_params, step_s, gradient_s,
    gradient_equivalents, contended; one row per setting and grid point of the 784-width-10 MLP
    (`mlp_problem`); rows that show outside load are measured again, as in `cost_table`. The
    scaling figure fits log-log slopes to it. The defaults (5 settings, 6 grid points, 5 samples
    each) take about half a minute for torch on 2 idle CPU cores; jax pays one compilation per
    setting and grid point on top (about 1.5 minutes for 4 x 3 points)."""
    import pandas as pd

    widths, batch_sizes, labels = list(widths), list(batch_sizes), list(settings)
    for label in labels:
        setting(label)
    frames = []
    for i, label in enumerate(labels):
        frames.append(scaling_sweep(framework, label, widths, batch_sizes, device, dtype, repeats, seed=seed))
        largest = frames[-1].iloc[-1].to_dict()  # the sweep's last point (the largest, as configured)
        _progress(f"{framework} {device} {label} at width {largest['width']}, batch {largest['batch_size']}", largest,
                  i + 1, len(labels))
    columns = ["framework", "device", "dtype", "optimizer", "setting", "width", "batch_size", "num_params", "step_s",
               "gradient_s", "gradient_equivalents"]

    def measure(row):
        again = scaling_sweep(framework, row.setting, [row.width], [row.batch_size], device, dtype, repeats, seed=seed)
        return again.iloc[0][["step_s", "gradient_s", "gradient_equivalents"]].to_dict()

    return remeasure_contended(pd.concat(frames, ignore_index=True)[columns], measure, ["width", "batch_size"])


PEERS = ("torch.optim.SGD", "torch.optim.Adam", "optax.sgd", "optax.adam", "kfac_jax.Optimizer")
# Which of our settings each peer is compared with (same hyperparameters, same model and batch).
PEER_OF = {
    "torch.optim.SGD": "sgd", "torch.optim.Adam": "adam", "optax.sgd": "sgd", "optax.adam": "adam",
    "kfac_jax.Optimizer": "kfac",
}


def peer_framework(peer: str) -> Framework:
    """The framework a peer runs in, or a ValueError naming the peers."""
    if peer not in PEERS:
        raise ValueError(f"peer: {peer!r} is not one of {', '.join(PEERS)}")
    return Framework.TORCH if peer.startswith("torch") else Framework.JAX


def peer_step_call(peer: str, problem: Problem, params, batch, device="cpu", dtype="float32", **hyperparameters):
    """One training step (loss, gradient, update) of a library users would otherwise pick, on the
    same parameters and batch as `step_call`: torch.optim (foreach), optax (jitted) or kfac-jax's
    K-FAC (`kfac_jax_step_call`). Returns (call, sync, period) like `step_call`."""
    framework = peer_framework(peer)
    device, dtype = parse(Device, device, "device"), parse(DType, dtype, "dtype")
    if peer == "kfac_jax.Optimizer":
        return kfac_jax_step_call(problem, params, batch, device, dtype, **hyperparameters)
    to_params, to_batch, sync = _framework_io(framework, device, dtype)
    data = to_batch(*batch)
    hyperparameters = _with_our_defaults(PEER_OF[peer], hyperparameters)
    if framework == Framework.TORCH:
        import torch

        import natgrad_impls.torch as nt

        leaves = {k: v.requires_grad_() for k, v in to_params(params).items()}
        make = torch.optim.SGD if peer.endswith("SGD") else torch.optim.Adam
        opt = make(list(leaves.values()), foreach=True, **_torch_names(hyperparameters))

        def call():
            opt.zero_grad(set_to_none=True)
            nt.loss(problem, leaves, data).backward()
            opt.step()
            return leaves, None  # torch.cuda.synchronize waits for the optimizer's state too

        return call, sync, 1
    import jax
    import optax

    import natgrad_impls.jax as nj

    make = optax.sgd if peer.endswith("sgd") else optax.adam
    transform = make(**_optax_names(hyperparameters))

    @jax.jit
    def update(p, state, b):
        grads = jax.grad(lambda q: nj.loss(problem, q, b))(p)
        updates, state = transform.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    carry = {"params": to_params(params)}
    carry["state"] = transform.init(carry["params"])

    def call():
        carry["params"], carry["state"] = update(carry["params"], carry["state"], data)
        return carry["params"], carry["state"]

    return call, sync, 1


PEER_KEYS = 1000


def kfac_jax_step_call(problem: Problem, params, batch, device="cpu", dtype="float32", **hyperparameters):
    """kfac-jax's `Optimizer.step` on our MLP, configured as our `kfac` with `hyperparameters`
    (hyperparameters.KFAC's: lr and damping, the others defaulting as ours do): fixed learning rate
    and damping (no adaptation, no momentum, no l2), factors as moving averages with decay
    `kfac_ema` updated every step, inverses refreshed every `kfac_update_period` steps, MC labels
    ("fisher_gradients", `samples` per example) or the exact Fisher ("fisher_exact"). Layers are
    registered by hand (register_dense, register_softmax_cross_entropy_loss), not by graph matching.
    kfac-jax's dense layers compute x @ w + b with w in x out: our weights are handed over transposed.
    Its step is jitted internally; the Python step counter is passed along (`global_step_int`) so
    that a step does not wait for the device to read it back. kfac-jax comes shimmed for this jax
    (`natgrad_impls.kfac_jax_compat`). Returns (call, sync, period)."""
    import jax
    import jax.numpy as jnp

    import natgrad_impls.jax as nj
    from natgrad_impls.kfac_jax_compat import import_kfac_jax

    kfac_jax = import_kfac_jax()
    model = problem.model
    if problem.likelihood != Likelihood.CATEGORICAL or problem.l2 or model.has_conv:
        raise ValueError("problem: the kfac_jax peer takes MLPs with the categorical likelihood and no l2")
    device, dtype = parse(Device, device, "device"), parse(DType, dtype, "dtype")
    h = KFAC(**hyperparameters)
    fisher = {Fisher.MC: "fisher_gradients", Fisher.EXACT: "fisher_exact"}[h.fisher]
    jax_device = nj.jax_device(device)
    put = lambda a, t=getattr(jnp, dtype.value): jax.device_put(jnp.asarray(a, dtype=t), jax_device)
    layers = [name for name, _ in model.parametric()]
    activations = [layer for layer in model.layers if not isinstance(layer, models.Dense)]
    import natgrad_impls.jax.model as M

    act = M._ACTIVATIONS[activations[0].kind] if activations else None

    def loss(p, data):
        x, y = data
        h = x
        for index, (w, b) in enumerate(p):
            if index:
                h = act(h)
            h = kfac_jax.register_dense(h @ w + b, h, w, b)
        kfac_jax.register_softmax_cross_entropy_loss(h, y)
        return jnp.mean(jax.nn.logsumexp(h, -1) - jnp.take_along_axis(h, y[:, None], -1)[:, 0])

    optimizer = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss),
        l2_reg=0.0,
        use_adaptive_learning_rate=False,
        learning_rate_schedule=lambda step: h.lr,
        use_adaptive_momentum=False,
        momentum_schedule=lambda step: 0.0,
        use_adaptive_damping=False,
        damping_schedule=lambda step: h.damping,
        estimation_mode=fisher,
        num_estimator_samples=h.samples,
        curvature_ema=h.kfac_ema,
        curvature_update_period=1,
        inverse_update_period=h.kfac_update_period,
        num_burnin_steps=0,
        use_automatic_registration=False,
        multi_device=False,
    )
    p = [(put(params[f"{n}.weight"].T), put(params[f"{n}.bias"])) for n in layers]
    data = (put(batch[0]), put(batch[1], jnp.int32))
    key = jax.random.key(h.seed)
    carry = {"params": p, "state": optimizer.init(p, key, data), "step": 0}
    # the steps' keys made beforehand (reused after PEER_KEYS steps: the draws do not change the
    # work), so that a timed step is kfac-jax's alone, as our kfac folds its key in inside its jit
    keys = list(jax.random.split(jax.random.fold_in(key, 1), PEER_KEYS))

    def call():
        step = carry["step"]
        carry["params"], carry["state"], _ = optimizer.step(
            carry["params"], carry["state"], keys[step % PEER_KEYS], batch=data, global_step_int=step
        )
        carry["step"] = step + 1
        return carry["params"], carry["state"]

    return call, jax.block_until_ready, h.kfac_update_period


def _with_our_defaults(optimizer: str, hyperparameters: dict) -> dict:
    """Every hyperparameter of our `optimizer` (hyperparameters.py's defaults where not given), so a
    peer takes the step ours takes and not its own defaults (Adam's eps and betas, should ours move)."""
    return dataclasses.asdict(HYPERPARAMETERS[Optimizer(optimizer)](**hyperparameters))


def _optax_names(hyperparameters: dict) -> dict:
    """Our names (lr) in optax's (learning_rate); momentum 0 is optax's None (no trace)."""
    out = dict(hyperparameters)
    out["learning_rate"] = out.pop("lr")
    if "momentum" in out and not out["momentum"]:
        del out["momentum"]
    return out


def _torch_names(hyperparameters: dict) -> dict:
    """Our Adam names (b1, b2) in torch.optim's (betas)."""
    out = dict(hyperparameters)
    if "b1" in out:
        out["betas"] = (out.pop("b1"), out.pop("b2"))
    return out
