"""On a visible CUDA device: every optimizer runs there, in torch and jax, and its float64
trajectory equals the CPU one (GPU reductions change the round-off, not the run); float32 runs
stay float32 there (no TF32)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import PROBLEMS, TorchImpl, make_data
from natgrad_impls import models
from test_parity import CNN_SETTINGS, SETTINGS  # the non-chaotic settings of the CPU parity tests

pytestmark = pytest.mark.gpu


class JaxCuda:
    """The jax implementation with every array placed on the GPU."""

    name = "jax"

    def __init__(self, device):
        import jax
        import jax.numpy as jnp

        import natgrad_impls.jax as nj

        self.module, self.jax, self.jnp = nj, jax, jnp
        self.device = nj.jax_device(device)

    def params(self, arrays, dtype="float64"):
        return {k: self.jax.device_put(self.jnp.asarray(v, dtype=dtype), self.device) for k, v in arrays.items()}

    def batch(self, x, y, dtype="float64"):
        y = np.asarray(y)
        put = lambda a, t=None: self.jax.device_put(self.jnp.asarray(a, dtype=t), self.device)
        return put(x, dtype), put(y, dtype if y.dtype.kind == "f" else None)

    @staticmethod
    def numpy(tree):
        return {k: np.asarray(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree)


def trajectory(impl, optimizer, name, steps=30, dtype="float64"):
    problem = PROBLEMS[name]
    settings = CNN_SETTINGS if name == "cnn-categorical" else SETTINGS
    x, y = make_data(problem, 32, seed=0)
    params = impl.params(models.init_params(problem.model, 0), dtype)
    opt = getattr(impl.module, optimizer)(problem, **settings[optimizer])
    state, batch, losses = opt.init(params), impl.batch(x, y, dtype), []
    for _ in range(steps):
        params, state, info = opt.step(params, state, batch)
        losses.append(float(impl.numpy(info["loss"])))
    return np.array(losses), models.flatten(problem.model, impl.numpy(params))


@pytest.mark.parametrize("name", ["mlp-categorical", "cnn-categorical", "logistic"])
@pytest.mark.parametrize("optimizer", list(SETTINGS))
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cuda_matches_cpu_in_float64(framework, optimizer, name):
    cpu, cuda = (TorchImpl("cpu"), TorchImpl("cuda")) if framework == "torch" else (JaxCuda("cpu"), JaxCuda("cuda"))
    expected, got = trajectory(cpu, optimizer, name), trajectory(cuda, optimizer, name)
    assert expected[0][-1] < 0.9 * expected[0][0], "the CPU run does not learn: agreement would say little"
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-9)
    np.testing.assert_allclose(got[1], expected[1], rtol=0, atol=1e-9 * np.abs(expected[1]).max())


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "kfac"])
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cuda_float32_stays_near_cpu_float32_on_a_cnn(framework, optimizer):
    """Convolutions and matrix products in float32, not TF32 (natgrad_impls.torch and .jax set it on
    import): 20 float32 steps on the small CNN end where the CPU's do, to round-off. TF32 (about
    1e-3 relative a product) put jax's 1e-4 to 1e-2 away on an H100; full float32 within 1e-6."""
    cpu, cuda = (TorchImpl("cpu"), TorchImpl("cuda")) if framework == "torch" else (JaxCuda("cpu"), JaxCuda("cuda"))
    runs = [trajectory(impl, optimizer, "cnn-categorical", 20, "float32") for impl in (cpu, cuda)]
    (losses, expected), (_, got) = runs
    assert losses[-1] < 0.9 * losses[0], "the CPU run does not learn: agreement would say little"
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("optimizer", ["ngd", "kfac"])
def test_cuda_float32_mc_runs_and_learns(optimizer):
    """The float32 MC paths (sampling on the device) run and reduce the loss."""
    problem = PROBLEMS["mlp-categorical"]
    hp = dict(SETTINGS[optimizer], fisher="mc")
    x, y = make_data(problem, 64, seed=0)
    impl = TorchImpl("cuda")
    params = impl.params(models.init_params(problem.model, 0), "float32")
    opt = getattr(impl.module, optimizer)(problem, **hp)
    state, batch = opt.init(params), impl.batch(x, y, "float32")
    losses = []
    for _ in range(30):
        params, state, info = opt.step(params, state, batch)
        losses.append(float(info["loss"]))
    assert losses[-1] < 0.8 * losses[0]


HOLD = {  # a run that holds SIZE bytes (float32) on the GPU, in each framework
    "torch": "import torch; hold = lambda size: torch.ones(size // 4, device='cuda').sum()",
    "jax": "import jax, jax.numpy as jnp; hold = lambda size: jnp.ones(size // 4, jnp.float32).sum()",
}


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_peak_device_bytes_counts_what_a_run_allocates(framework):
    """DeviceMemory's measure, each in a fresh process (jax's peak counts from the process's start,
    as in asv): a run that holds 64 MiB peaks at 64 MiB or more, one that holds 1 MiB below that."""
    import subprocess
    import sys

    def peak(size):
        code = (f"{HOLD[framework]}; from natgrad_impls import timing; "
                f"print(timing.peak_device_bytes({framework!r}, 'cuda', lambda: hold({size})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    mib = 2**20
    assert peak(64 * mib) >= 64 * mib
    assert peak(mib) < 64 * mib
