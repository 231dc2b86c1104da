"""numpy, torch and jax agree step by step in float64 from the same initial point (DESIGN 4):
to ~1e-10 relative over 100 steps on a convex task, ~1e-8 on a small network. The settings are
away from the chaotic regime of `ef` (large steps, tiny damping), where no two implementations
can agree beyond their round-off amplified by the dynamics."""

from __future__ import annotations

import numpy as np
import pytest

from natgrad_impls import make_optimizer, models
from conftest import PROBLEMS, JaxImpl, TorchImpl, every_optimizer, make_data

SETTINGS = every_optimizer({
    "sgd": {"lr": 0.2, "momentum": 0.5},
    "adam": {"lr": 0.05},
    "ef": {"lr": 0.1, "damping": 1e-2},
    "ngd": {"lr": 0.3, "damping": 1e-2},
    "kfac": {"lr": 0.3, "damping": 1e-2, "kfac_update_period": 3, "fisher": "exact"},
})
# On the small CNN of conftest, K-FAC at lr 0.3 diverges (the loss passes 1e17 by step 10, in both
# frameworks alike); at lr 0.1 it learns, so agreement there says something.
CNN_SETTINGS = {**SETTINGS, "kfac": {**SETTINGS["kfac"], "lr": 0.1}}


def logistic_regression(n=200, d=5, seed=0):
    """A logistic regression with a bias, labels from a noisy linear rule."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (x @ rng.normal(size=d) + 0.5 * rng.normal(size=n) > 0).astype(np.float64)[:, None]
    return models.Problem(models.linear(d, 1, bias=True), "bernoulli"), x, y


def linear_regression_l2(n=200, d=5, seed=0):
    """A Gaussian linear regression with an l2 prior: l2 in the loss, gradient and Fisher, not the EF."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (x @ rng.normal(size=d) + 0.5 * rng.normal(size=n))[:, None]
    return models.Problem(models.linear(d, 1, bias=True), "gaussian", l2=0.05), x, y


def clipped_logistic_regression(n=200, d=5, seed=0):
    """The logistic regression with its logits clipped at 0.5, which the steps soon reach: the
    straight-through gradient and the clipped mean's Fisher in every framework."""
    problem, x, y = logistic_regression(n, d, seed)
    return models.Problem(problem.model, "bernoulli", logit_clip=0.5), x, y


CONVEX = {"logistic": logistic_regression, "gaussian-l2": linear_regression_l2, "clipped": clipped_logistic_regression}


def wide_logistic_regression(l2, n=12, d=30, seed=0):
    """Fewer examples than weights (12 against 31): torch and jax solve ef and ngd by Woodbury and
    push-through on the N columns, as on every network, where numpy solves the D x D system."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (x @ rng.normal(size=d) + rng.normal(size=n) > 0).astype(np.float64)[:, None]
    return models.Problem(models.linear(d, 1, bias=True), "bernoulli", l2=l2), x, y


def small_network(n=64, seed=0, likelihood="categorical"):
    """A 6-10-3 tanh MLP whose 3 outputs follow the first 3 inputs: a class (their argmax), 3 binary
    labels (their signs), or 3 regression targets with an l2 prior."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    target = x[:, :3] + 0.3 * rng.normal(size=(n, 3))
    y = {"categorical": np.argmax(target, axis=1), "bernoulli": (target > 0).astype(np.float64),
         "gaussian": target}[likelihood]
    l2 = 0.01 if likelihood == "gaussian" else 0.0
    return models.Problem(models.mlp((6, 10, 3), "tanh"), likelihood, l2=l2), x, y


class NumpyImpl:
    name = "numpy"

    def params(self, arrays, dtype="float64"):
        return {k: np.array(v) for k, v in arrays.items()}

    def batch(self, x, y, dtype="float64"):
        return x, y

    @staticmethod
    def numpy(tree):
        return {k: np.asarray(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree)


def trajectory(impl, optimizer, problem, x, y, steps, settings=SETTINGS, dtype="float64"):
    params = impl.params(models.init_params(problem.model, 0), dtype)
    opt = make_optimizer(impl.name, optimizer, problem, **settings[optimizer])
    state, batch, losses = opt.init(params), impl.batch(x, y, dtype), []
    for _ in range(steps):
        params, state, info = opt.step(params, state, batch)
        losses.append(float(impl.numpy(info["loss"])))
    return np.array(losses), models.flatten(problem.model, impl.numpy(params))


def assert_agree(a, b, rtol):
    (losses_a, params_a), (losses_b, params_b) = a, b
    np.testing.assert_allclose(losses_a, losses_b, rtol=rtol, atol=0)
    np.testing.assert_allclose(params_a, params_b, rtol=0, atol=rtol * np.abs(params_b).max())


@pytest.mark.parametrize("task", list(CONVEX))
@pytest.mark.parametrize("optimizer", list(SETTINGS))
def test_numpy_torch_jax_agree_on_convex_tasks(optimizer, task):
    problem, x, y = CONVEX[task]()
    runs = {impl.name: trajectory(impl, optimizer, problem, x, y, 100) for impl in (NumpyImpl(), TorchImpl(), JaxImpl())}
    # The run must actually move, or agreement would prove nothing.
    assert runs["numpy"][0][-1] < 0.9 * runs["numpy"][0][0]
    if problem.logit_clip is not None:  # and the clip must be active at the end
        assert np.mean(np.abs(np.hstack([x, np.ones((len(x), 1))]) @ runs["numpy"][1]) > problem.logit_clip) > 0.2
    assert_agree(runs["torch"], runs["numpy"], 1e-10)
    assert_agree(runs["jax"], runs["numpy"], 1e-10)


def test_numpy_torch_jax_agree_at_the_paper_grids_large_steps():
    """ngd on breastcancer at lr 1e7 (the paper grid reaches 1e10): its logits pass 1e12, where only
    an exact clip keeps torch and jax on numpy's run (each agreed with the other and ended 5x away)."""
    from natgrad_impls import runner

    setting = dict(hyperparameters={"lr": 1e7, "damping": 1e-2}, steps=30, progress=False)
    runs = {framework: runner.run("breastcancer", "ngd", framework, **setting)
            for framework in ("numpy", "torch", "jax")}
    assert runs["numpy"]["loss"].nunique() > 10 and runs["numpy"]["loss"].max() > 10  # it moves, its logits saturated
    for framework in ("torch", "jax"):
        np.testing.assert_allclose(runs[framework]["loss"], runs["numpy"]["loss"], rtol=1e-10, err_msg=framework)


@pytest.mark.parametrize("l2", [0.0, 0.05])
@pytest.mark.parametrize("optimizer", ["ef", "ngd"])
def test_woodbury_solves_agree_with_numpys_dense_solve(optimizer, l2, monkeypatch):
    """The convex tasks above have more examples than weights, so every framework solves densely
    there; here the kernel solve of Woodbury and push-through runs in torch and jax at each step."""
    import natgrad_impls.jax.curvature as jax_curvature
    import natgrad_impls.torch.curvature as torch_curvature

    kernel_solves = []
    for module in (torch_curvature, jax_curvature):
        solve = module.FactorCurvature._kernel_solve
        monkeypatch.setattr(module.FactorCurvature, "_kernel_solve",
                            lambda self, *args, solve=solve, name=module.__name__: (kernel_solves.append(name),
                                                                                   solve(self, *args))[1])
    problem, x, y = wide_logistic_regression(l2)
    impls = (NumpyImpl(), TorchImpl(), JaxImpl())
    runs = {impl.name: trajectory(impl, optimizer, problem, x, y, 100) for impl in impls}
    assert set(kernel_solves) == {torch_curvature.__name__, jax_curvature.__name__}  # (jax: when it traces)
    assert runs["numpy"][0][-1] < 0.9 * runs["numpy"][0][0]
    assert_agree(runs["torch"], runs["numpy"], 1e-10)
    assert_agree(runs["jax"], runs["numpy"], 1e-10)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
@pytest.mark.parametrize("optimizer", list(SETTINGS))
def test_torch_jax_agree_on_a_small_network(optimizer, likelihood):
    problem, x, y = small_network(likelihood=likelihood)
    torch_run = trajectory(TorchImpl(), optimizer, problem, x, y, 100)
    jax_run = trajectory(JaxImpl(), optimizer, problem, x, y, 100)
    assert torch_run[0][-1] < 0.9 * torch_run[0][0]
    assert_agree(jax_run, torch_run, 1e-8)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
@pytest.mark.parametrize("optimizer", list(SETTINGS))
def test_float32_runs_follow_the_float64_run_in_torch_and_jax(optimizer, likelihood):
    """float32, the networks' dtype in the pipeline: over 30 steps each framework's float32 losses stay
    within 3e-5 of the float64 run's (measured: 3.3e-6 at most, ef's gaussian), and torch's and jax's
    float32 runs within 1e-4 of each other (1.7e-5 at most), so neither framework's float32 path
    (its casts, its solves) drifts off."""
    problem, x, y = small_network(likelihood=likelihood)
    exact = trajectory(TorchImpl(), optimizer, problem, x, y, 30)[0]
    single = {impl.name: trajectory(impl, optimizer, problem, x, y, 30, dtype="float32")[0]
              for impl in (TorchImpl(), JaxImpl())}
    for name, losses in single.items():
        np.testing.assert_allclose(losses, exact, rtol=3e-5, err_msg=name)
    np.testing.assert_allclose(single["jax"], single["torch"], rtol=1e-4)


MC_SETTINGS = {"ngd": {**SETTINGS["ngd"], "fisher": "mc", "samples": 2},
               "kfac": {**SETTINGS["kfac"], "fisher": "mc", "samples": 2}}


class _SharedUniforms:
    """One table of uniform draws, steps x samples x N x outputs, and each framework's MC labels made
    from it by the same rule: y = [u < c] (bernoulli), y = mean + Phi^-1(u) (gaussian), the argmax of
    log p + Gumbel(u) (categorical). The labels still follow the model, so a step that reads the
    wrong mean (or the wrong step's row) parts the frameworks."""

    def __init__(self, steps, samples, n, outputs, seed=9):
        from scipy.special import ndtri

        self.u = np.random.default_rng(seed).uniform(1e-12, 1 - 1e-12, size=(steps, samples, n, outputs))
        self.normal, self.gumbel = ndtri(self.u), -np.log(-np.log(self.u))

    def patch(self, monkeypatch, impl, module):
        """torch or jax: mc_sampler hands the step to sample_labels, which labels from its row (the
        tables as float64 arrays of the framework: batch's inputs)."""
        xp = impl.module.torch if impl.name == "torch" else impl.jnp
        u, normal, gumbel = (impl.batch(table, table)[0] for table in (self.u, self.normal, self.gumbel))

        def labels(problem, mean, samples, step):
            if problem.likelihood == "bernoulli":
                return (u[step] < mean) * xp.ones_like(mean)
            if problem.likelihood == "gaussian":
                return mean + normal[step]
            return xp.argmax(xp.log(mean) + gumbel[step], -1)

        monkeypatch.setattr(module, "mc_sampler", lambda seed, step, *device: step)
        monkeypatch.setattr(impl.curvature.M, "sample_labels", labels)

    def patch_numpy(self, monkeypatch):
        """numpy (one output): random_stream(seed, "labels", step) gives the step's row; the reference
        turns u into a label itself, and draws a gaussian's residual (its sign does not matter)."""
        from natgrad_impls.numpy import reference

        table = self

        class Row:
            def __init__(self, step):
                self.step = step

            def random(self, shape):
                return table.u[self.step, ..., 0].reshape(shape)

            def standard_normal(self, shape):
                return table.normal[self.step, ..., 0].reshape(shape)

        monkeypatch.setattr(reference, "random_stream", lambda seed, purpose, step: Row(step))


@pytest.mark.parametrize("task", list(CONVEX))
@pytest.mark.parametrize("optimizer", list(MC_SETTINGS))
def test_numpy_torch_jax_agree_with_the_mc_fisher_on_shared_draws_on_convex_tasks(optimizer, task, monkeypatch):
    """The convex tasks' MC Fisher, from one table of uniforms: the numpy reference's weights r^2
    against torch's and jax's sampled labels."""
    import natgrad_impls.jax.optimizers as jax_optimizers
    import natgrad_impls.torch.optimizers as torch_optimizers

    problem, x, y = CONVEX[task]()
    steps = 60
    draws = _SharedUniforms(steps, MC_SETTINGS[optimizer]["samples"], len(x), 1)
    draws.patch_numpy(monkeypatch)
    for impl, module in ((TorchImpl(), torch_optimizers), (JaxImpl(), jax_optimizers)):
        draws.patch(monkeypatch, impl, module)
    runs = {impl.name: trajectory(impl, optimizer, problem, x, y, steps, MC_SETTINGS)
            for impl in (NumpyImpl(), TorchImpl(), JaxImpl())}
    assert runs["numpy"][0][-1] < 0.9 * runs["numpy"][0][0]
    assert_agree(runs["torch"], runs["numpy"], 1e-10)
    assert_agree(runs["jax"], runs["numpy"], 1e-10)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "categorical"])
@pytest.mark.parametrize("optimizer", list(MC_SETTINGS))
def test_torch_jax_agree_with_the_mc_fisher_on_shared_draws(optimizer, likelihood, monkeypatch):
    """Each framework draws its own labels (torch's exponential race and uniforms, jax's Gumbel argmax
    and uniforms), so their MC runs agree only in distribution; labelling from one table of uniforms,
    they agree step by step on the network's three likelihoods, the K-FAC default (fisher mc) included."""
    import natgrad_impls.jax.optimizers as jax_optimizers
    import natgrad_impls.torch.optimizers as torch_optimizers

    problem, x, y = small_network(likelihood=likelihood)
    steps = 40
    draws = _SharedUniforms(steps, MC_SETTINGS[optimizer]["samples"], len(x), 3)
    for impl, module in ((TorchImpl(), torch_optimizers), (JaxImpl(), jax_optimizers)):
        draws.patch(monkeypatch, impl, module)
    torch_run = trajectory(TorchImpl(), optimizer, problem, x, y, steps, MC_SETTINGS)
    jax_run = trajectory(JaxImpl(), optimizer, problem, x, y, steps, MC_SETTINGS)
    assert torch_run[0][-1] < 0.9 * torch_run[0][0]
    assert_agree(jax_run, torch_run, 1e-8)


@pytest.mark.parametrize("optimizer", list(CNN_SETTINGS))
def test_torch_jax_agree_on_a_small_cnn(optimizer):
    """The convolution paths too (KFC factors, vmapped per-example gradients, max-pooling)."""
    problem = PROBLEMS["cnn-categorical"]
    x, y = make_data(problem, 32, seed=0)
    torch_run = trajectory(TorchImpl(), optimizer, problem, x, y, 50, CNN_SETTINGS)
    jax_run = trajectory(JaxImpl(), optimizer, problem, x, y, 50, CNN_SETTINGS)
    assert torch_run[0][-1] < 0.9 * torch_run[0][0]
    assert_agree(jax_run, torch_run, 1e-8)
