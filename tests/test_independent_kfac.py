"""Our K-FAC Kronecker factors against independent public implementations, in float64.

References: curvlinops' `KFACLinearOperator` (PyTorch module hooks, type-2 Fisher) and kfac-jax's
`BlockDiagonalCurvature` ("fisher_exact", tag-registered dense layers and losses). Both build the
same object as ours (DESIGN 4): per dense layer A = (1/N) sum_n a_n a_n^T on the bias-augmented input
(the 1 appended last) and G = (1/N) sum_n sum_c delta_nc delta_nc^T, delta_nc the backprop of the
c-th column of a square root of the output-space Fisher Lambda_n of the example's own NLL. They
differ from ours only in how the loss is scaled, so every comparison multiplies by a factor derived
(not fitted) from the reference's documented loss convention; the derivations sit next to the
factor tables below.
A convolution (KFC, Grosse & Martens 2016; curvlinops' KFAC-expand) is checked against curvlinops
only: there A sums and G averages over the T output positions, curvlinops the other way round.

Our conventions (natgrad_impls.<framework>.model.nll): the per-example NLL is summed over outputs;
gaussian l_n = |f_n - y_n|^2 / 2 (Lambda = I), bernoulli: binary cross-entropy with logits
(Lambda = diag(s(1 - s))), categorical cross-entropy (Lambda = diag(p) - p p^T).

Our side runs in torch and in jax (the `impl` fixture of conftest.py); both references are
computed once per likelihood and compared with both frameworks.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import dense_reference as ref
from conftest import PROBLEMS, make_data
from natgrad_impls import models
from natgrad_impls.names import Curvature, Likelihood
from natgrad_impls.torch import model as torch_model, to_torch

SIZES = (6, 8, 5, 3)  # three dense layers: dense0, dense2, dense4 (tanh in between)
N = 16
K = SIZES[-1]  # output dimension (classes / regression targets / independent Bernoullis)
LIKELIHOODS = (Likelihood.CATEGORICAL, Likelihood.GAUSSIAN, Likelihood.BERNOULLI)
CNN_INPUT = (2, 6, 6)  # conv0 (3x3, 'same'): T = 36 output positions; relu, 2x2 max-pool, dense 27-4-K
CNNS = {  # name -> (model, T of conv0)
    "same": (models.cnn(CNN_INPUT, (3,), (4, K)), 36),
    "strided": (PROBLEMS["cnn-strided"].model, 25),  # stride 2, padding 1, a padded pool, a second conv
}
TOL = 1e-12  # relative (max-abs error / max-abs entry), float64; round-off measured at ~5e-16
MC_SAMPLES = 4000


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def setup(likelihood: Likelihood, seed: int = 0, cnn: str | None = None):
    """Problem (the MLP, or the CNN named `cnn` in CNNS), NumPy params (biases made nonzero so that
    they matter in the forward pass), data."""
    model = CNNS[cnn][0] if cnn else models.mlp(SIZES, "tanh")
    problem = models.Problem(model, likelihood)
    params = models.init_params(problem.model, seed)
    rng = np.random.default_rng(seed + 1)
    for name in params:
        if name.endswith(".bias"):
            params[name] = 0.5 * rng.standard_normal(params[name].shape)
    x = 2.0 * rng.standard_normal((N, *model.input_shape))  # large enough to leave tanh's linear range
    if likelihood == Likelihood.CATEGORICAL:
        y = rng.integers(0, K, size=N)
    elif likelihood == Likelihood.BERNOULLI:
        y = rng.integers(0, 2, size=(N, K)).astype(np.float64)  # curvlinops wants binary targets
    else:
        y = rng.standard_normal((N, K))
    return problem, params, x, y


def layer_names(problem) -> list[str]:
    return [name for name, _ in problem.model.parametric()]


def module_name(name: str) -> str:
    """Our layer name -> its nn.Sequential index ("dense4" -> "4", "conv0" -> "0")."""
    return name.removeprefix("dense").removeprefix("conv")


def ours(impl, likelihood, curvature=Curvature.EXACT, samples=1, cnn=None):
    """Our K-FAC as NumPy: A and G per layer, and (exact curvature) the dense matrix in
    Model.param_names order."""
    problem, params, x, y = setup(likelihood, cnn=cnn)
    rng = impl.rng(1234) if curvature == Curvature.MC else None

    def kfac(params, batch, rng):
        _, _, factor = impl.curvature.gradient_and_curvature(problem, params, batch, curvature, samples, rng)
        kron = impl.curvature.kronecker(factor)
        return kron.A, kron.G, kron.to_dense() if curvature == Curvature.EXACT else None

    if impl.name == "jax":  # one compilation instead of op-by-op dispatch (seconds on a CPU)
        import jax

        kfac = jax.jit(kfac)
    A, G, dense = kfac(impl.params(params), impl.batch(x, y), rng)
    return problem, impl.numpy(A), impl.numpy(G), (impl.numpy(dense) if dense is not None else None)


# -- curvlinops ---------------------------------------------------------------------------------------

# G_curvlinops = s * G_ours, with curvlinops' losses at reduction="mean" (N = batch size, K outputs).
# curvlinops (kfac.py, FisherType.TYPE2) backpropagates the columns of S_n / N, S_n S_n^T the
# Hessian of ITS per-example loss term (kfac_utils.loss_hessian_matrix_sqrt), and multiplies the
# summed outer products by num_loss_terms^2 / N_data = N^2 / N = N for one batch of all the data:
# G = (1/N) sum_n sum_c delta delta^T with delta from S_n, i.e. our normalisation; only S_n differs.
#  - CrossEntropyLoss(mean): per-example term = our categorical NLL; S S^T = diag(p) - p p^T. s = 1.
#  - MSELoss(mean) = (1/(N K)) sum_n |f_n - y_n|^2 averages over the K outputs too and has no 1/2:
#    per-example term (1/K)|f - y|^2 = (2/K) x ours (|f - y|^2 / 2); Hessian (2/K) I (the
#    docstring's "2c I", c = 1/K).  s = 2/K.
#  - BCEWithLogitsLoss(mean) also averages over the K outputs: per-example term (1/K) x our summed
#    Bernoulli NLL; Hessian (1/K) diag(s(1-s)).  s = 1/K.
# A needs no factor: with separate_weight_and_bias=False curvlinops appends the 1 LAST (kfac.py,
# _hook_accumulate_input_covariance) and divides by N_data = N, exactly our A.
CURVLINOPS_SCALE = {
    Likelihood.CATEGORICAL: 1.0,
    Likelihood.GAUSSIAN: 2.0 / K,
    Likelihood.BERNOULLI: 1.0 / K,
}


@functools.cache
def curvlinops_reference(likelihood, cnn=None):
    """curvlinops' (A, G) per layer (our layer names) and its dense K-FAC matrix."""
    return curvlinops_kfac(*setup(likelihood, cnn=cnn))


def curvlinops_kfac(problem, params, x, y):
    """curvlinops' (A, G) per layer (our layer names) and its dense K-FAC matrix at `params`."""
    import curvlinops

    likelihood = problem.likelihood
    net = ref.torch_nn(problem.model, params)
    # net.parameters() is (weight, bias) per layer in forward order, and curvlinops flattens a
    # weight (out, in[, kh, kw]) row-major: our canonical order, so its dense matrix needs no permutation.
    assert [n for n, _ in net.named_parameters()] == [module_name(n) for n in problem.model.param_names()]
    loss_func = {
        Likelihood.CATEGORICAL: torch.nn.CrossEntropyLoss(reduction="mean"),
        Likelihood.GAUSSIAN: torch.nn.MSELoss(reduction="mean"),
        Likelihood.BERNOULLI: torch.nn.BCEWithLogitsLoss(reduction="mean"),
    }[likelihood]
    xt = torch.as_tensor(x)
    ours_f = torch_model.output(problem.model, to_torch(params), xt)
    torch.testing.assert_close(net(xt), ours_f, rtol=1e-13, atol=0)  # the network is ours
    yt = torch.as_tensor(y, dtype=torch.long if likelihood == Likelihood.CATEGORICAL else torch.float64)
    kfac = curvlinops.KFACLinearOperator(
        net,
        loss_func,
        list(net.parameters()),
        [(xt, yt)],
        fisher_type=curvlinops.FisherType.TYPE2,
        kfac_approx=curvlinops.KFACType.EXPAND,  # KFC for the conv (the default; no-op for Linear)
        separate_weight_and_bias=False,  # one (in + 1) x (in + 1) A per layer, like ours
        check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    state = kfac.state_dict()
    factors = {
        name: (
            state["input_covariances"][module_name(name)].numpy(),
            state["gradient_covariances"][module_name(name)].numpy(),
        )
        for name in layer_names(problem)
    }
    dense = (kfac @ torch.eye(problem.model.num_params(), dtype=torch.float64)).numpy()
    return factors, dense


@pytest.fixture
def curvlinops():
    return pytest.importorskip("curvlinops")


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_factors_match_curvlinops(impl, curvlinops, likelihood):
    problem, A, G, _ = ours(impl, likelihood)
    factors, _ = curvlinops_reference(likelihood)
    s = CURVLINOPS_SCALE[likelihood]
    for name in layer_names(problem):
        A_ref, G_ref = factors[name]
        assert A_ref.shape == A[name].shape  # (in + 1) x (in + 1): bias augmented
        assert rel_err(A[name], A_ref) < TOL, name
        assert rel_err(s * G[name], G_ref) < TOL, name


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_dense_kfac_matches_curvlinops(impl, curvlinops, likelihood):
    """The whole block-diagonal matrix in Model.param_names order (checks our layout of the joint
    (W | b) block and the canonical flattening, which the factor test cannot see)."""
    _, _, _, dense = ours(impl, likelihood)
    _, reference = curvlinops_reference(likelihood)
    assert rel_err(CURVLINOPS_SCALE[likelihood] * dense, reference) < TOL
    assert np.count_nonzero(np.abs(reference) > 1e-12) > 3 * reference.shape[0]  # not near-diagonal


@pytest.mark.parametrize("period", [2, 3])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_kfac_steps_are_curvlinops_factors_averaged_damped_and_inverted_by_hand(impl, curvlinops, likelihood, period):
    """Six K-FAC steps (exact Fisher, ema 0.8) on the 3-layer MLP against a loop built from
    independent pieces: curvlinops' factors at each step's parameters, averaged X <- ema X + (1 - ema)
    X_batch (X_0 the first batch's), every `period`-th step (from step 0) damped as Martens & Grosse 6.3,
    A + pi sqrt(lambda) I and G + sqrt(lambda)/pi I with pi = sqrt((tr A/dim A) / (tr G/dim G)), and
    inverted by numpy, then applied to the autograd gradient: W' <- W' - lr G^-1 grad_W' A^-1, W' = [W | b].
    torch and jax mirror each other; this is what neither wrote. Period 2 refreshes at steps 0, 2, 4
    and period 3 at 0, 3: a step counter that advanced by 2 would refresh at period 3's steps too."""
    problem, params, x, y = setup(likelihood)
    lr, damping, ema, steps = 0.3, 1e-2, 0.8, 6
    expected, averaged, inverses = dict(params), {}, {}
    for step in range(steps):
        batch_factors, _ = curvlinops_kfac(problem, expected, x, y)
        gradient = models.unflatten(problem.model, ref.loss_gradient(problem, expected, x, y))
        for name in layer_names(problem):
            A, G = batch_factors[name][0], batch_factors[name][1] / CURVLINOPS_SCALE[likelihood]
            if step:
                A, G = ema * averaged[name][0] + (1 - ema) * A, ema * averaged[name][1] + (1 - ema) * G
            averaged[name] = A, G
            if step % period == 0:
                pi = np.sqrt(np.trace(A) / len(A) / (np.trace(G) / len(G)))
                root = np.sqrt(damping)
                inverses[name] = (np.linalg.inv(A + pi * root * np.eye(len(A))),
                                  np.linalg.inv(G + root / pi * np.eye(len(G))))
            A_inv, G_inv = inverses[name]
            direction = G_inv @ np.hstack([gradient[f"{name}.weight"], gradient[f"{name}.bias"][:, None]]) @ A_inv
            expected[f"{name}.weight"] = expected[f"{name}.weight"] - lr * direction[:, :-1]
            expected[f"{name}.bias"] = expected[f"{name}.bias"] - lr * direction[:, -1]
    opt = impl.module.kfac(problem, lr=lr, damping=damping, kfac_update_period=period, kfac_ema=ema, fisher="exact")
    ours, batch = impl.params(params), impl.batch(x, y)
    state = opt.init(ours)
    for _ in range(steps):
        ours, state, _ = opt.step(ours, state, batch)
    moved = models.flatten(problem.model, expected) - models.flatten(problem.model, params)
    assert np.abs(moved).max() > 1e-2  # the steps are not negligible
    assert rel_err(models.flatten(problem.model, impl.numpy(ours)), models.flatten(problem.model, expected)) < 1e-10


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_mc_factors_converge_to_curvlinops_type2(impl, curvlinops, likelihood):
    """Curvature.MC's normalisation, G = (1/(N S)) sum over sampled labels, against curvlinops'
    exact G: with S = 4000 draws per example the Monte-Carlo error is ~1/sqrt(N S) ~ 0.4% (measured
    0.4-0.8% in torch), while a wrong normalisation (S or N missing, a wrong sampler variance) is off
    by far more than the 3% allowed. A does not depend on the labels and stays exact."""
    problem, A, G, _ = ours(impl, likelihood, Curvature.MC, MC_SAMPLES)
    factors, _ = curvlinops_reference(likelihood)
    s = CURVLINOPS_SCALE[likelihood]
    for name in layer_names(problem):
        A_ref, G_ref = factors[name]
        assert rel_err(A[name], A_ref) < TOL, name
        assert rel_err(s * G[name], G_ref) < 0.03, name


@pytest.mark.parametrize("cnn", list(CNNS))
def test_kfc_conv_kfac_matches_curvlinops_expand(impl, curvlinops, cnn):
    """KFC with T > 1 positions ('same' padding; stride 2 with padding, beside a padded pool): per
    layer G (x) A and the whole matrix equal curvlinops' KFAC-expand (A summed over T, G averaged
    over T: only the product is fixed, curvlinops puts 1/T in A)."""
    problem, A, G, dense = ours(impl, Likelihood.CATEGORICAL, cnn=cnn)
    factors, reference = curvlinops_reference(Likelihood.CATEGORICAL, cnn=cnn)
    assert np.prod(problem.model.output_shapes()["conv0"][1:]) == CNNS[cnn][1]
    for name in layer_names(problem):
        A_ref, G_ref = factors[name]
        assert rel_err(np.kron(G[name], A[name]), np.kron(G_ref, A_ref)) < TOL, name
    assert rel_err(dense, reference) < TOL  # (CURVLINOPS_SCALE[CATEGORICAL] = 1)


# -- kfac-jax -----------------------------------------------------------------------------------------

# G_kfac_jax = s * G_ours. kfac-jax's loss registrations describe the per-example NLL summed over
# outputs (not averaged over them), with the batch mean left to the curvature blocks, which divide
# both factors by batch_size (DenseTwoKroneckerFactored.update_curvature_matrix_estimate).
# "fisher_exact" loops over the K output indices with ema_new / K and scales each Fisher-factor
# column by sqrt(K) (BlockDiagonalCurvature.update_curvature_matrix_estimate), so with ema_old = 0,
# ema_new = 1: A = sum_c (1/K)(1/N) sum_n a a^T = our A, and
# G = sum_c (1/K) K (1/N) sum_n delta_nc delta_nc^T = our normalisation; only Lambda differs:
#  - register_softmax_cross_entropy_loss: categorical NLL, Fisher diag(p) - p p^T.  s = 1.
#  - register_normal_predictive_distribution (default variance 0.5, i.e. the loss |f - y|^2 =
#    2 x ours): Fisher = I / variance = 2 I.  s = 1 / 0.5 = 2.
#  - register_sigmoid_cross_entropy_loss: Bernoulli NLL summed over outputs, Fisher
#    diag(s(1-s)).  s = 1.
# A: with a bias, the block appends a column of ones LAST, as we do. The blocks' fixed_scale is 1.
KFAC_JAX_VARIANCE = 0.5
KFAC_JAX_SCALE = {
    Likelihood.CATEGORICAL: 1.0,
    Likelihood.GAUSSIAN: 1.0 / KFAC_JAX_VARIANCE,
    Likelihood.BERNOULLI: 1.0,
}


@functools.cache
def kfac_jax_reference(likelihood):
    """kfac-jax's (A, G) per layer (inputs_factor, outputs_factor) and its K-FAC matrix in our
    canonical order, built column by column with the estimator's own `multiply` (its
    `to_dense_matrix` needs jax's Var.count, gone in jax 0.10). Call with the kfac_jax fixture."""
    import jax
    import jax.numpy as jnp
    import kfac_jax

    problem, params, x, y = setup(likelihood)
    names = layer_names(problem)
    D = problem.model.num_params()
    with jax.enable_x64(True):
        # kfac-jax dense layers compute x @ w + b, w is (in, out): the transpose of torch's weight.
        jparams = [(jnp.asarray(params[f"{n}.weight"].T), jnp.asarray(params[f"{n}.bias"])) for n in names]
        args = (jparams, (jnp.asarray(x), jnp.asarray(y)))

        def loss(jparams, batch):
            x, y = batch
            h = x
            for index, (w, b) in enumerate(jparams):
                if index:
                    h = jnp.tanh(h)
                h = kfac_jax.register_dense(h @ w + b, h, w, b)
            if likelihood == Likelihood.CATEGORICAL:
                kfac_jax.register_softmax_cross_entropy_loss(h, y)
                return jnp.mean(jax.nn.logsumexp(h, -1) - jnp.take_along_axis(h, y[:, None], 1)[:, 0])
            if likelihood == Likelihood.GAUSSIAN:
                kfac_jax.register_normal_predictive_distribution(h, y, variance=KFAC_JAX_VARIANCE)
                return jnp.mean(jnp.sum((h - y) ** 2, -1))
            kfac_jax.register_sigmoid_cross_entropy_loss(h, y)
            return jnp.mean(jnp.sum(jax.nn.softplus(h) - y * h, -1))

        estimator = kfac_jax.BlockDiagonalCurvature(
            func=loss, default_estimation_mode="fisher_exact", auto_register_tags=False
        )
        key = jax.random.PRNGKey(0)

        def multiply(state, vector):  # our canonical flat vector -> kfac-jax's K-FAC times it
            offset, pytree = 0, []
            for w, _ in jparams:
                inp, out = w.shape
                weight = vector[offset : offset + out * inp].reshape(out, inp).T
                pytree.append((weight, vector[offset + out * inp : offset + out * inp + out]))
                offset += out * inp + out
            result = estimator.multiply(
                state, pytree, identity_weight=0.0, exact_power=True, use_cached=False, pmap_axis_name=None
            )
            return jnp.concatenate([jnp.concatenate([w.T.reshape(-1), b]) for w, b in result])

        # One update from the zero state with ema_old = 0, ema_new = 1: the factors are this batch's.
        # One jit per likelihood: op-by-op dispatch would compile ~200 small programs (~7 s on CPU).
        @jax.jit
        def estimate(args):
            state = estimator.init(
                key, args, exact_powers_to_cache=None, approx_powers_to_cache=None, cache_eigenvalues=False
            )
            state = estimator.update_curvature_matrix_estimate(
                state, ema_old=0.0, ema_new=1.0, identity_weight=0.0, batch_size=N, rng=key,
                func_args=args, estimation_mode="fisher_exact",
            )
            return state, jax.vmap(lambda e: multiply(state, e), out_axes=1)(jnp.eye(D))

        state, dense = estimate(args)
        assert len(estimator.blocks) == len(names)
        factors = {}
        for name, (w, b), block, block_state in zip(names, jparams, estimator.blocks, state.blocks_states):
            # blocks come in registration order; the (all distinct) shapes tie each to its layer
            assert block.parameters_shapes == (w.shape, b.shape)
            assert block.fixed_scale() == 1.0
            factors[name] = tuple(np.asarray(f.value) for f in block_state.factors)  # (inputs, outputs)
        return factors, np.asarray(dense)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # kfac-jax 0.0.8 uses deprecated jax.core names
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_factors_and_dense_match_kfac_jax(impl, kfac_jax, likelihood):
    problem, A, G, dense = ours(impl, likelihood)
    factors, reference = kfac_jax_reference(likelihood)
    s = KFAC_JAX_SCALE[likelihood]
    for name in layer_names(problem):
        A_ref, G_ref = factors[name]
        assert A_ref.shape == A[name].shape  # (in + 1) x (in + 1): bias augmented, 1 last
        assert rel_err(A[name], A_ref) < TOL, name
        assert rel_err(s * G[name], G_ref) < TOL, name
    # the estimator's own matrix-vector product, in our canonical order
    assert rel_err(s * dense, reference) < TOL


@pytest.mark.parametrize("zero", [None, "A", "G", "both"])
def test_damped_inverses_match_kfac_jax_pi_adjusted_inverse(impl, kfac_jax, zero):
    """Factored Tikhonov damping: our damped inverse factors equal kfac-jax's
    pi_adjusted_kronecker_inverse of the same factors (Martens & Grosse 2015, 6.3); also where a
    factor of the first layer is zero (a layer all of whose units are dead), kfac-jax's zero case."""
    import jax
    import jax.numpy as jnp
    from kfac_jax._src.utils.math import pi_adjusted_kronecker_inverse

    jax.config.update("jax_enable_x64", True)

    problem = models.Problem(models.mlp((6, 8, 3), "tanh"), "categorical")
    x, y = make_data(problem, 16, seed=0)
    params = models.init_params(problem.model, 0)
    x = 10.0 * x  # A's scale far from G's, so that a swapped pi would show
    _, _, factor = impl.curvature.gradient_and_curvature(
        problem, impl.params(params), impl.batch(x, y), Curvature.EXACT, 1, None
    )
    kron = impl.curvature.kronecker(factor)
    first = next(iter(kron.A))
    for which in {"A": ["A"], "G": ["G"], "both": ["A", "G"]}.get(zero, []):
        factors = getattr(kron, which)
        factors[first] = 0 * factors[first]
    damping = 1e-2
    inverse = kron.inverse(damping)
    for name in kron.A:
        A, G = np.asarray(impl.numpy(kron.A[name])), np.asarray(impl.numpy(kron.G[name]))
        A_inv, G_inv = (np.asarray(a) for a in pi_adjusted_kronecker_inverse(jnp.asarray(A), jnp.asarray(G), damping=damping))
        # Only the product is defined: kfac-jax moves a scalar from one factor to the other.
        ours = np.kron(impl.numpy(inverse.G[name]), impl.numpy(inverse.A[name]))
        assert rel_err(ours, np.kron(G_inv, A_inv)) < 1e-10
