"""What a step achieves, next to what it costs: the loss after a fixed number of steps.

A change that makes a step fast but wrong moves these numbers. Two runs (RUNS): `digits-mlp`
(scikit-learn digits, 64-128-10 tanh MLP) in float64, and `mnist1d-mlp` (40-100-100-10 relu, as the
timed MLPs) in float32, the path the timing benchmarks take; categorical, offline, parameters from
seed 0, STEPS mini-batches of 32 in a fixed order (one permutation, cycled), fixed hyperparameters
(reasonable, not tuned to the last digit); the tracked value is the mean NLL over the whole
training set after the last step. In float64, runs that do not sample agree between torch and jax
to ~1e-12; `ngd-mc` and `kfac` draw their MC labels from each framework's own generator, so theirs
differ between frameworks (but not across commits).
"""

from __future__ import annotations

import jax
import numpy as np
import torch

import natgrad_impls.jax
import natgrad_impls.torch
from natgrad_impls import make_optimizer, models, timing
from natgrad_impls.tasks import get_task

from .common import DEVICES, FRAMEWORKS, QUICK, SETTINGS, require_device

RUNS = {"digits-mlp-float64": ("digits-mlp", "float64"), "mnist1d-mlp-float32": ("mnist1d-mlp", "float32")}
STEPS = 5 if QUICK else 50
BATCH_SIZE = 32
SEED = 0
# label of timing.SETTINGS -> hyperparameters for this task (the timing ones use a tiny lr).
HYPERPARAMETERS = {
    "sgd": {"lr": 0.5},
    "sgd-momentum": {"lr": 0.1, "momentum": 0.9},
    "adam": {"lr": 1e-2},
    "ef": {"lr": 0.3, "damping": 0.1},
    "ngd-exact": {"lr": 0.1, "damping": 1e-2, "fisher": "exact"},
    "ngd-mc": {"lr": 0.1, "damping": 0.1, "fisher": "mc"},
    "kfac": {"lr": 0.05, "damping": 1e-2, "kfac_update_period": 10},  # 0.1 diverges on mnist1d-mlp in float32
}
assert set(HYPERPARAMETERS) == set(timing.SETTINGS)


def train(label: str, framework: str, device: str = "cpu", run: str = "digits-mlp-float64", steps: int = STEPS) -> float:
    """Training-set loss after `steps` steps of `label` in `run` (RUNS; see the module docstring), on
    one torch thread: torch's float32 sums depend on how many threads split them (mnist1d-mlp's
    ngd-exact ended 0.76% apart on one and two), and the value must move only when a step does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(label, framework, device, run, steps)
    finally:
        torch.set_num_threads(threads)


def _train(label, framework, device, run, steps) -> float:
    name, dtype = RUNS[run]
    task = get_task(name)
    (X, y), _ = task.load(SEED)
    problem = task.problem
    optimizer, _ = timing.setting(label)
    opt = make_optimizer(framework, optimizer, problem, **HYPERPARAMETERS[label])
    floating = lambda a: np.issubdtype(np.asarray(a).dtype, np.floating)  # labels stay integers
    if framework == "torch":
        put = lambda a: torch.as_tensor(a, device=device, dtype=getattr(torch, dtype) if floating(a) else None)
        loss = natgrad_impls.torch.loss
    else:
        jax_device = natgrad_impls.jax.jax_device(device)
        put = lambda a: jax.device_put(np.asarray(a, dtype=dtype) if floating(a) else a, jax_device)
        loss = natgrad_impls.jax.loss
    params = {k: put(v) for k, v in models.init_params(problem.model, SEED).items()}
    state = opt.init(params)
    order = np.random.default_rng(SEED).permutation(len(X))
    batches = [order[i : i + BATCH_SIZE] for i in range(0, len(X) - BATCH_SIZE + 1, BATCH_SIZE)]
    batches = [(put(X[i]), put(y[i])) for i in batches]
    for step in range(steps):
        params, state, _ = opt.step(params, state, batches[step % len(batches)])
    return float(loss(problem, params, (put(X), put(y))))


class Training:
    """`track_loss`: mean training NLL after STEPS steps of each run of RUNS (fixed seed)."""

    params = [SETTINGS, FRAMEWORKS, DEVICES, list(RUNS)]
    param_names = ["setting", "framework", "device", "run"]
    unit = "nll"
    processes = 1
    timeout = 600

    def setup(self, setting, framework, device, run):
        require_device(framework, device)

    def track_loss(self, setting, framework, device, run):
        return train(setting, framework, device, run)
