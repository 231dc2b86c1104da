"""A torch step never waits for the device. On a GPU a small model's step is bound by kernel
launches, and a host sync (reading a device value back) stalls the launch queue (see
`natgrad_impls.torch.model`). On the CPU every op a step dispatches is recorded and none may be one
that reads a value back; on a GPU, torch's own sync detector must stay silent through a step.
Both solves are covered: the Woodbury one, and the dense one that replaces it on tiny problems
(D <= M: logistic, 6 parameters, at a batch of 8)."""

from __future__ import annotations

import pytest
import torch

from conftest import PROBLEMS, TorchImpl, every_optimizer, make_data
from natgrad_impls import models, timing

# Ops that read a device value back to the host: `.item()` and Python truth values (also
# F.one_hot's range check), torch.linalg's raising error checks, data-dependent output shapes, and
# torch.multinomial (for one sample it checks its argument on the host first).
SYNCING = {"_local_scalar_dense", "_linalg_check_errors", "is_nonzero", "equal", "nonzero", "unique",
           "masked_select", "multinomial"}

STEPS = {
    "sgd": ("sgd", {"lr": 0.1, "momentum": 0.9}),
    "adam": ("adam", {"lr": 0.01}),
    "ef": ("ef", {"lr": 0.1, "damping": 1e-2}),
    "ngd-exact": ("ngd", {"lr": 0.1, "damping": 1e-2, "fisher": "exact"}),
    "ngd-mc": ("ngd", {"lr": 0.1, "damping": 1e-2, "fisher": "mc", "samples": 2}),
    "kfac-mc": ("kfac", {"lr": 0.1, "damping": 1e-2, "kfac_update_period": 2}),
    "kfac-exact": ("kfac", {"lr": 0.1, "damping": 1e-2, "kfac_update_period": 2, "fisher": "exact"}),
}
every_optimizer(STEPS, [optimizer for optimizer, _ in STEPS.values()])
BATCH = 8


def _steps(device, setting, problem_name):
    """A callable taking one step of `setting` on `problem_name` (state carried along), after a
    first step (first-call costs are allowed to sync)."""
    problem = PROBLEMS[problem_name]
    impl = TorchImpl(device)
    x, y = make_data(problem, BATCH, seed=0)
    params, batch = impl.params(models.init_params(problem.model, 0), "float32"), impl.batch(x, y, "float32")
    optimizer, hyperparameters = STEPS[setting]
    opt = getattr(impl.module, optimizer)(problem, **hyperparameters)
    carry = {"params": params, "state": opt.init(params)}

    def step():
        carry["params"], carry["state"], _ = opt.step(carry["params"], carry["state"], batch)

    step()
    return step


@pytest.mark.parametrize("problem", ["mlp-categorical", "mlp-bernoulli", "mlp-gaussian-l2", "cnn-categorical",
                                     "logistic"])
@pytest.mark.parametrize("setting", list(STEPS))
def test_torch_steps_dispatch_no_host_sync(setting, problem):
    """Three steps: K-FAC (period 2) reuses its inverses, then refreshes them."""
    dispatched = set(timing.dispatched_ops(_steps("cpu", setting, problem), calls=3))
    assert not dispatched & SYNCING, f"{setting} on {problem} reads back: {dispatched & SYNCING}"
    assert {"addmm", "mm"} & dispatched  # the recorder saw the step's work


def test_the_recorder_sees_a_host_sync():
    """The check above can fail: the ops it forbids are the ones torch dispatches for these calls."""
    labels = torch.tensor([0, 2, 1])

    def syncing():
        torch.nn.functional.one_hot(labels, 3)
        torch.linalg.cholesky(torch.eye(2))
        torch.multinomial(torch.ones(3), 1)

    assert {"_local_scalar_dense", "_linalg_check_errors", "multinomial"} <= set(timing.dispatched_ops(syncing))


@pytest.mark.gpu
@pytest.mark.parametrize("setting", list(STEPS))
def test_cuda_steps_do_not_synchronise(setting):
    """torch's sync detector raises on any synchronising CUDA call inside the steps."""
    step = _steps("cuda", setting, "mlp-categorical")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
