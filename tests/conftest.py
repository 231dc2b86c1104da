"""Shared test fixtures: one interface over the torch and jax implementations (BackPACK-style), so
that every curvature and optimizer test runs against both, and the `gpu` marker."""

from __future__ import annotations

import contextlib
import importlib
import os

# The jax tests are bound by XLA compiling their programs (two thirds of their time on the CPU), not
# by running them: LLVM at optimisation level 0 compiles a K-FAC step in half the time. Results move
# by rounding only (a 20-step float64 digits-mlp run of every optimizer: relative 2e-15 or less);
# the pipeline, the benchmarks and users keep the default level. Set before jax starts a backend;
# the tests' subprocesses, pipeline jobs included, inherit it. Not on a machine with an NVIDIA GPU:
# XLA's GPU backend supports level 2 and up only (it says so in an error, and kernels have failed
# to link at 0 there).
if not os.path.exists("/dev/nvidiactl"):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from natgrad_impls import models  # noqa: E402


def same_dashes(line, optimizer) -> bool:
    """The line's dash pattern is the one the figures' style gives `optimizer` (matplotlib scales
    dashes by the line width, so compare against a line drawn with the same width; get_linestyle
    alone says "--" for every custom dash pattern)."""
    from matplotlib import pyplot as plt

    from natgrad_impls.figures import style

    probe = plt.figure().add_subplot().plot([0, 1], [0, 1], linestyle=style.LINESTYLES[optimizer],
                                            linewidth=line.get_linewidth())[0]
    return line.get_linestyle() == probe.get_linestyle() and line._dash_pattern == probe._dash_pattern


def cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a visible CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class TorchImpl:
    name = "torch"

    def __init__(self, device="cpu"):
        self.device = device
        self.module = importlib.import_module("natgrad_impls.torch")
        self.curvature = importlib.import_module("natgrad_impls.torch.curvature")

    def params(self, arrays, dtype="float64"):
        return self.module.to_torch(arrays, self.device, getattr(torch, dtype))

    def batch(self, x, y, dtype="float64"):
        x = torch.as_tensor(x, dtype=getattr(torch, dtype), device=self.device)
        y = torch.as_tensor(y, device=self.device)
        return x, (y.to(x.dtype) if y.is_floating_point() else y)

    def rng(self, seed):
        return torch.Generator(device=self.device).manual_seed(seed)

    @staticmethod
    def numpy(tree):
        if isinstance(tree, dict):
            return {k: v.detach().cpu().numpy() for k, v in tree.items()}
        return tree.detach().cpu().numpy()


class JaxImpl:
    name = "jax"

    def __init__(self):
        self.module = importlib.import_module("natgrad_impls.jax")
        self.curvature = importlib.import_module("natgrad_impls.jax.curvature")
        import jax.numpy as jnp

        self.jnp = jnp

    def params(self, arrays, dtype="float64"):
        return self.module.to_jax(arrays, dtype=getattr(self.jnp, dtype))

    def batch(self, x, y, dtype="float64"):
        x = self.jnp.asarray(x, dtype=getattr(self.jnp, dtype))
        y = self.jnp.asarray(y)
        return x, (y.astype(x.dtype) if self.jnp.issubdtype(y.dtype, self.jnp.floating) else y)

    def rng(self, seed):
        import jax

        return jax.random.key(seed)

    @staticmethod
    def numpy(tree):
        if isinstance(tree, dict):
            return {k: np.asarray(v) for k, v in tree.items()}
        return np.asarray(tree)


@pytest.fixture(params=["torch", "jax"])
def impl(request):
    if request.param == "torch":
        return TorchImpl()
    pytest.importorskip("jax")
    return JaxImpl()


@pytest.fixture(autouse=True)
def fresh_jax_programs():
    """Every test traces its own jax programs. A process keeps the programs it built to share them
    between runs (natgrad_impls.jax.optimizers._shared, the runner's `_jax_*`), and would hand a test
    one traced before the test patched what it calls (a label sampler, jax.lax) or compiled before it
    counted compilations."""
    import sys

    optimizers, runner = sys.modules.get("natgrad_impls.jax.optimizers"), sys.modules.get("natgrad_impls.runner")
    if optimizers is not None:
        optimizers._shared.cache_clear()
    if runner is not None:
        for cached in (runner._jax_batch_cutter, runner._jax_evaluator, runner._jax_cosine):
            cached.cache_clear()


@contextlib.contextmanager
def jax_compiles(mark=lambda: True):
    """The XLA compilations inside the block, as a list that grows with each: `mark()`'s value at
    the time (True by default)."""
    import jax

    compiles = []

    def listen(event, seconds, **metadata):
        if event.endswith("backend_compile_duration"):
            compiles.append(mark())

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture
def kfac_jax():
    """kfac-jax, shimmed for this jax (natgrad_impls.kfac_jax_compat); skips where it is missing or
    does not import."""
    from natgrad_impls.kfac_jax_compat import import_kfac_jax

    try:
        return import_kfac_jax()
    except ImportError as error:
        pytest.skip(str(error))


def every_optimizer(table, names=None):
    """`table`, a test's settings per optimizer, once it is checked to cover every optimizer the
    library has (`names`: the optimizer of each entry, default the keys): an optimizer added to
    names.Optimizer fails the collection of each such test module until its tables take it, where
    it would otherwise go untested without a word."""
    from natgrad_impls.names import Optimizer

    names = set(table) if names is None else set(names)
    missing = [o.value for o in Optimizer if o.value not in names]
    assert not missing, f"a per-optimizer test table lacks {', '.join(missing)}"
    return table


# -- small problems shared by the tests ------------------------------------------------------------

def make_data(problem: models.Problem, n: int, seed: int = 0):
    """Random inputs and labels of the right kind for `problem` (float64 NumPy)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *problem.model.input_shape))
    k = problem.model.num_outputs
    if problem.likelihood == "gaussian":
        y = rng.normal(size=(n, k))
    elif problem.likelihood == "bernoulli":
        y = rng.integers(0, 2, size=(n, k)).astype(np.float64)
    else:
        y = rng.integers(0, k, size=n)
    return x, y


PROBLEMS = {
    "linear-gaussian": models.Problem(models.linear(4, 2, bias=True), "gaussian"),
    "logistic": models.Problem(models.linear(5, 1, bias=True), "bernoulli"),
    "softmax-regression": models.Problem(models.linear(4, 3, bias=True), "categorical"),
    "mlp-categorical": models.Problem(models.mlp((5, 6, 3), "tanh"), "categorical"),
    "mlp-gaussian-l2": models.Problem(models.mlp((3, 5, 2), "sigmoid"), "gaussian", l2=0.03),
    "mlp-bernoulli": models.Problem(models.mlp((4, 5, 3), "relu"), "bernoulli"),
    "cnn-categorical": models.Problem(models.cnn((2, 6, 6), (3,), (4, 3)), "categorical"),
    # models.cnn has neither a strided conv nor a padded pool (cifar10-cnn has both): 9x9 -> conv
    # stride 2, padding 1 -> 5x5 -> pool 3, stride 2, padding 1 (edge windows overhang) -> 3x3 -> 2x2.
    "cnn-strided": models.Problem(
        models.Model(
            (
                models.Conv2d(2, 3, 3, stride=2, padding=1), models.Act("relu"),
                models.MaxPool2d(3, 2, padding=1), models.Conv2d(3, 2, 2), models.Flatten(),
                models.Dense(2 * 2 * 2, 3),
            ),
            (2, 9, 9),
        ),
        "categorical",
    ),
}


def singular_task():
    """A linear regression whose two inputs are the same column: Z^T Z is exactly singular."""
    from natgrad_impls.tasks import Dataset, Split, Task

    x = np.repeat(np.linspace(-1, 1, 20)[:, None], 2, axis=1)
    data = Dataset(Split(x, (x[:, :1] * 3 + 1)), None)
    problem = models.Problem(models.linear(2, 1), "gaussian")
    return Task("singular", problem, True, "test", 20, None, 10, lambda seed: data)


def overflowing_task():
    """A linear regression to targets of 1e200: the squared error at theta0 = 0 overflows to inf."""
    from natgrad_impls.tasks import Dataset, Split, Task

    x = np.linspace(-1, 1, 20)[:, None]
    data = Dataset(Split(x, np.full((20, 1), 1e200)), None)
    problem = models.Problem(models.linear(1, 1), "gaussian")
    return Task("overflow", problem, True, "test", 20, None, 10, lambda seed: data)


def underdetermined_task(examples: int = 3, l2: float = 0.0):
    """3 examples of 5 random inputs: every curvature of the 5 weights has rank <= 3, singular without
    damping, yet LU's pivots, perturbed by round-off, are not exactly 0 (5 examples: invertible; an
    l2 prior makes the true Fisher invertible too, never the empirical one)."""
    from natgrad_impls.tasks import Dataset, Split, Task

    x = np.random.default_rng(0).normal(size=(examples, 5))
    data = Dataset(Split(x, x @ np.arange(1.0, 6.0)[:, None]), None)
    problem = models.Problem(models.linear(5, 1), "gaussian", l2=l2)
    return Task("underdetermined", problem, True, "test", examples, None, 10, lambda seed: data)
