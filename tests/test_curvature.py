"""Every curvature against a dense float64 reference built independently with autograd
(tests/dense_reference.py), in torch and in jax (DESIGN 4; curvlinops-style), and the numpy
reference's closed forms against the same."""

from __future__ import annotations

import numpy as np
import pytest

import dense_reference as ref
from conftest import PROBLEMS, make_data
from natgrad_impls import models
from natgrad_impls.names import Curvature

RTOL = 1e-10


def close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(np.abs(expected).max(), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def build(impl, problem, n, curvature, seed=0, samples=1):
    x, y = make_data(problem, n, seed)
    params = models.init_params(problem.model, seed + 1)
    rng = impl.rng(seed) if curvature == Curvature.MC else None
    value, grad, factor = impl.curvature.gradient_and_curvature(
        problem, impl.params(params), impl.batch(x, y), curvature, samples, rng
    )
    return (x, y, params), value, grad, factor


def flat(impl, problem, tree):
    return models.flatten(problem.model, impl.numpy(tree))


@pytest.mark.parametrize("name", PROBLEMS)
def test_loss_and_gradient_match_autograd(impl, name):
    problem = PROBLEMS[name]
    (x, y, params), value, grad, _ = build(impl, problem, 9, Curvature.EMPIRICAL)
    grad = impl.curvature.from_layers(problem.model, grad)
    close(flat(impl, problem, grad), ref.loss_gradient(problem, params, x, y))
    close(float(value), float(impl.numpy(impl.module.loss(problem, impl.params(params), impl.batch(x, y)))))


@pytest.mark.parametrize("name", PROBLEMS)
def test_loss_value_matches_autograd_reference(impl, name):
    """The loss value (of the curvature pass and of `<framework>.loss`, which sgd and adam
    differentiate) against the dense reference's. The test above takes the gradient from closed-form
    residuals, which never read the NLL, and compares the two values with each other: an NLL averaged
    over several outputs instead of summed (gaussian, bernoulli) passed it. (The reference's NLL is
    written out in NumPy, on the model's outputs.)"""
    problem = PROBLEMS[name]
    (x, y, params), value, _, _ = build(impl, problem, 9, Curvature.EMPIRICAL)
    expected = ref.loss(problem, params, x, y)
    close(float(value), expected)
    close(float(impl.numpy(impl.module.loss(problem, impl.params(params), impl.batch(x, y)))), expected)


@pytest.mark.parametrize("name", PROBLEMS)
def test_empirical_fisher_matches_per_example_gradients(impl, name):
    problem = PROBLEMS[name]
    (x, y, params), _, _, factor = build(impl, problem, 9, Curvature.EMPIRICAL)
    close(impl.numpy(factor.to_dense()), ref.empirical_fisher(problem, params, x, y))


@pytest.mark.parametrize("name", PROBLEMS)
def test_exact_fisher_matches_jacobian_reference(impl, name):
    problem = PROBLEMS[name]
    (x, y, params), _, _, factor = build(impl, problem, 9, Curvature.EXACT)
    close(impl.numpy(factor.to_dense()), ref.fisher(problem, params, x, y))


def test_kfac_takes_the_exact_fisher_without_its_gradients_coordinates(impl, monkeypatch):
    """K-FAC needs the exact Fisher's columns alone: its steps skip the gradient's coordinates in
    them (torch: 17 operators a step on the cost MLP), and the factor is the same without them."""
    problem = PROBLEMS["mlp-categorical"]
    x, y = make_data(problem, 6)
    params, batch = impl.params(models.init_params(problem.model, 1)), impl.batch(x, y)
    with_split = impl.curvature.gradient_and_curvature(problem, params, batch, Curvature.EXACT)[2]
    without = impl.curvature.gradient_and_curvature(problem, params, batch, Curvature.EXACT, coordinates=False)[2]
    assert with_split.coefficients is not None and without.coefficients is None and without.outside is None
    np.testing.assert_array_equal(impl.numpy(without.to_dense()), impl.numpy(with_split.to_dense()))
    asked, original = [], impl.curvature.gradient_and_curvature

    def spy(*args, **kwargs):
        asked.append(kwargs.get("coordinates", True))
        return original(*args, **kwargs)

    monkeypatch.setattr(impl.curvature, "gradient_and_curvature", spy)
    opt = impl.module.kfac(problem, lr=0.1, damping=0.1, fisher="exact")
    opt.step(params, opt.init(params), batch)
    assert asked == [False]


def test_exact_fisher_does_not_depend_on_samples(impl):
    """`samples` counts MC label draws. The exact Fisher draws none (the optimizers refuse samples > 1
    with it), yet the curvature builders take samples whatever the Fisher: given 3, the exact Fisher,
    and the K-FAC built from it (exact for a linear gaussian model), must still be the dense
    reference's, not divided by the number of samples."""
    problem = models.Problem(models.linear(4, 3, bias=True), "gaussian")
    (x, y, params), _, _, factor = build(impl, problem, 7, Curvature.EXACT, samples=3)
    fisher = ref.fisher(problem, params, x, y)
    close(impl.numpy(factor.to_dense()), fisher)
    close(impl.numpy(impl.curvature.kronecker(factor).to_dense()), fisher)


def test_categorical_fisher_root_has_rank_many_columns_and_holds_in_float32(impl):
    """Lambda = diag(p) - p p^T from a k x (k - 1) root (its rank, so (k - 1) N Woodbury columns),
    to float32 round-off also where the model is sure of the first or of the last class (the
    root's pivot, its most probable class) or gives a class probability 0."""
    k = 5
    p = np.random.default_rng(0).dirichlet(np.ones(k), size=4)
    p[1] = [1 - 4e-7, 1e-7, 1e-7, 1e-7, 1e-7]
    p[2] = p[1][::-1]
    p[3] = [0.5, 0.5, 0.0, 0.0, 0.0]
    problem = models.Problem(models.linear(3, k), "categorical")
    mean = impl.params({"p": p}, "float32")["p"]
    root = impl.numpy(impl.module.model.fisher_factor(problem, mean)[0]).astype(np.float64)
    assert root.shape == (k - 1, 4, k)
    expected = np.stack([np.diag(q) - np.outer(q, q) for q in p.astype(np.float32).astype(np.float64)])
    np.testing.assert_allclose(np.einsum("cnk,cnl->nkl", root, root), expected, rtol=0, atol=3e-7)
    _, _, _, factor = build(impl, problem, 6, Curvature.EXACT)
    assert factor.num_columns == (k - 1) * 6


# mean, labels and whether the residual lies in the root's range, per dtype (a probability of
# 1e-40 is subnormal in float32, where it counts as 0)
COORDINATE_CASES = {
    "gaussian": ([[0.3, -2.0], [1e3, 4.0]], [[1.0, 0.5], [-1e3, 4.0]], {"float64": [1, 1], "float32": [1, 1]}),
    "bernoulli": (  # (a sigmoid rounded to 1 at a label of 1: held, at 0: not; s (1 - s) = 1e-40 is
        # a normal number in float64, not in float32)
        [[0.3, 0.8], [1e-6, 1 - 1e-6], [1.0, 0.5], [1.0, 0.5], [0.0, 0.5], [1e-40, 0.5]],
        [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]],
        {"float64": [1, 1, 1, 0, 0, 1], "float32": [1, 1, 1, 0, 0, 0]},
    ),
    "categorical": (
        [[0.1, 0.2, 0.3, 0.4], [1 - 3e-7, 1e-7, 1e-7, 1e-7], [1e-7, 1e-7, 1e-7, 1 - 3e-7],
         [1 - 3e-7, 1e-7, 1e-7, 1e-7], [1 - 3e-7, 1e-7, 1e-7, 1e-7], [0.5, 0.5, 0.0, 0.0],
         [0.5, 0.5, 0.0, 0.0], [1 - 1e-40, 1e-40, 0.0, 0.0], [1.0, 0.0, 0.0, 1e-20]],
        [2, 0, 3, 3, 1, 2, 3, 1, 3],
        {"float64": [1, 1, 1, 1, 1, 0, 0, 1, 1], "float32": [1, 1, 1, 1, 1, 0, 0, 0, 1]},
    ),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("likelihood", list(COORDINATE_CASES))
def test_fisher_factor_gives_the_residual_in_the_roots_columns(impl, likelihood, dtype):
    """E_n alpha_n = residual_n, E_n the exact Fisher's root: its gradient in its factor's columns,
    which NGD's push-through solve takes. To the dtype's round-off for confident predictions, right
    (the label is the categorical root's pivot) and wrong (a pivot on the last class instead loses
    1 / sqrt(p_y) times the round-off: all of it at 1e-20); alpha = 0 and not
    held exactly where the residual leaves the root's range (a label of probability 0, or below the
    smallest normal number; a bernoulli output at s (1 - s) = 0 unless its residual is 0 too)."""
    mean, labels, held = COORDINATE_CASES[likelihood]
    k = len(mean[0])
    problem = models.Problem(models.linear(3, k), likelihood)
    mean = impl.params({"m": np.array(mean)}, dtype)["m"]
    _, y = impl.batch(np.zeros(1), np.array(labels), dtype)
    root, (alpha, actual) = impl.module.model.fisher_factor(problem, mean, y)
    root, alpha = impl.numpy(root).astype(np.float64), impl.numpy(alpha).astype(np.float64)
    residual = impl.numpy(impl.module.model.residual(problem, mean, y)).astype(np.float64)
    np.testing.assert_array_equal(impl.numpy(actual), np.array(held[dtype], bool))
    inside = np.array(held[dtype], bool)
    np.testing.assert_array_equal(alpha[:, ~inside], 0.0)
    represented = np.einsum("cnk,cn->nk", root, alpha)
    scale = np.maximum(np.abs(residual), 1.0)
    np.testing.assert_allclose(represented[inside] / scale[inside], residual[inside] / scale[inside], rtol=0,
                               atol=8 * np.finfo(dtype).eps)


def _exact_ngd_directions(impl, problem, params, x, y, damping, dtype):
    """precondition's (push-through) and plain Woodbury's exact-Fisher NGD directions, flat float64."""
    _, grad, factor = impl.curvature.gradient_and_curvature(
        problem, impl.params(params, dtype), impl.batch(x, y, dtype), Curvature.EXACT)
    pushed, _ = impl.curvature.precondition(problem, Curvature.EXACT, grad, factor, damping)
    woodbury = factor.multiply_inverse_layers(grad, damping)
    as_flat = lambda layers: flat(impl, problem, impl.curvature.from_layers(problem.model, layers)).astype(np.float64)
    return as_flat(pushed), as_flat(woodbury)


def test_exact_ngd_direction_holds_in_float32_at_small_dampings(impl):
    """The exact Fisher's gradient lies in its factor's span, g = U c: Woodbury's (g - U K^-1 U^T g) /
    damping subtracts two nearly equal vectors and divides float32's round-off by the damping (here
    2 to 5 times the direction's size off float64's at 1e-8), push-through's U K^-1 c / s^2 does not."""
    problem = models.Problem(models.mlp((10, 8, 5), "tanh"), "categorical")
    x, y = make_data(problem, 8)
    params = models.init_params(problem.model, 1)
    expected, _ = _exact_ngd_directions(impl, problem, params, x, y, 1e-8, "float64")
    pushed, woodbury = _exact_ngd_directions(impl, problem, params, x, y, 1e-8, "float32")
    error = lambda d: np.linalg.norm(d - expected) / np.linalg.norm(expected)
    assert error(pushed) < 1e-4
    assert error(woodbury) > 0.1  # (the cancellation this setting provokes)


@pytest.mark.parametrize("by_gram", [True, False])
def test_exact_ngd_solves_for_a_label_the_model_gives_probability_zero(impl, by_gram):
    """A label whose probability underflows (a logit margin over 745 in float64) leaves the Fisher
    root's range: that example's residual is solved for by Woodbury (`outside`), the others' by
    push-through, in one solve that equals a dense solve with autograd's gradient."""
    problem = PROBLEMS["softmax-regression"]
    x, y = make_data(problem, 4)
    params = models.init_params(problem.model, 1)
    logits = params["dense0.weight"] @ x[0]
    x[0] *= 1000 / np.ptp(logits)
    y[0] = np.argmin(logits)
    _, grad, factor = impl.curvature.gradient_and_curvature(
        problem, impl.params(params), impl.batch(x, y), Curvature.EXACT)
    assert impl.numpy(factor.outside).tolist() == [0.25, 0, 0, 0]  # (1/N where not held)
    assert problem.model.num_params() > factor.num_columns  # Woodbury, not the dense fallback
    damping = 1e-3
    solution = impl.curvature.from_layers(problem.model, factor.multiply_inverse_mean(grad, damping, by_gram))
    dense = ref.fisher(problem, params, x, y) + damping * np.eye(problem.model.num_params())
    close(flat(impl, problem, solution), np.linalg.solve(dense, ref.loss_gradient(problem, params, x, y)), rtol=1e-8)


@pytest.mark.parametrize("curvature", list(Curvature))
@pytest.mark.parametrize("name", ["linear-gaussian", "mlp-bernoulli", "cnn-categorical", "conv-last"])
def test_problem_counts_the_factor_columns_a_batch_gives(impl, name, curvature):
    """models.Problem.factor_columns (which the runner's float32 check reads) against the factor's,
    also for a model whose output is a flattened convolution's (12 outputs, not its 3 channels)."""
    conv_last = models.Model((models.Conv2d(2, 3, 2), models.Flatten()), (2, 3, 3))
    problem = models.Problem(conv_last, "categorical") if name == "conv-last" else PROBLEMS[name]
    _, _, _, factor = build(impl, problem, 5, curvature, samples=2)
    assert problem.factor_columns(curvature, 5, samples=2) == factor.num_columns


@pytest.mark.parametrize("name", ["linear-gaussian", "logistic", "softmax-regression"])
def test_fisher_equals_loss_hessian_for_linear_models(impl, name):
    """Canonical links and a linear model: the Hessian of the NLL is the Fisher (GGN)."""
    problem = PROBLEMS[name]
    (x, y, params), _, _, factor = build(impl, problem, 9, Curvature.EXACT)
    close(impl.numpy(factor.to_dense()), ref.loss_hessian(problem, params, x, y))


@pytest.mark.parametrize("curvature", list(Curvature))
@pytest.mark.parametrize("name", ["mlp-categorical", "mlp-gaussian-l2", "cnn-categorical", "logistic"])
def test_multiply_matches_dense(impl, name, curvature):
    problem = PROBLEMS[name]
    _, _, _, factor = build(impl, problem, 5, curvature, samples=2)
    dense = impl.numpy(factor.to_dense())
    v = np.random.default_rng(3).normal(size=problem.model.num_params())
    product = factor.multiply(impl.params(models.unflatten(problem.model, v)))
    close(flat(impl, problem, product), dense @ v)


@pytest.mark.parametrize("curvature", list(Curvature))
@pytest.mark.parametrize(
    "name, n, woodbury",
    [("mlp-categorical", 4, True), ("mlp-gaussian-l2", 3, True), ("cnn-categorical", 3, True),
     ("logistic", 2, True), ("logistic", 20, False)],
)
def test_multiply_inverse_matches_dense_solve(impl, name, n, woodbury, curvature):
    """Woodbury (D > M columns) and the dense path (D <= M) both equal a dense solve."""
    problem = PROBLEMS[name]
    _, _, _, factor = build(impl, problem, n, curvature, samples=2)
    assert (problem.model.num_params() > factor.num_columns) == woodbury
    damping = 1e-3
    dense = impl.numpy(factor.to_dense()) + damping * np.eye(problem.model.num_params())
    v = np.random.default_rng(4).normal(size=problem.model.num_params())
    solution = factor.multiply_inverse(impl.params(models.unflatten(problem.model, v)), damping)
    close(flat(impl, problem, solution), np.linalg.solve(dense, v), rtol=1e-8)


@pytest.mark.parametrize("curvature", list(Curvature))
@pytest.mark.parametrize(
    "name, n, woodbury", [("mlp-categorical", 4, True), ("mlp-gaussian-l2", 3, True), ("logistic", 20, False)]
)
def test_inverse_factor_multiply_matches_dense_solve(impl, name, n, woodbury, curvature):
    """(C + damping I)^-1 U c, the push-through form ef's step takes, equals a dense solve with U c
    (the l2 shift included), and so does its dense fallback."""
    problem = PROBLEMS[name]
    _, _, _, factor = build(impl, problem, n, curvature, samples=2)
    assert (problem.model.num_params() > factor.num_columns) == woodbury
    damping = 1e-3
    dense = impl.numpy(factor.to_dense()) + damping * np.eye(problem.model.num_params())
    c = np.random.default_rng(5).normal(size=(factor.num_columns // n, n))
    u = impl.numpy(factor.columns())  # M x D, rows in c's order
    solution = factor.inverse_factor_multiply(impl.params({"c": c})["c"], damping)
    solution = impl.curvature.from_layers(problem.model, solution)
    close(flat(impl, problem, solution), np.linalg.solve(dense, u.T @ c.reshape(-1)), rtol=1e-8)


@pytest.mark.parametrize("curvature", list(Curvature))
def test_every_undamped_solve_with_fewer_columns_than_weights_is_nan(impl, curvature):
    """damping 0 on an MLP of 57 weights with 4 examples: the dense reference's rank is at most 12, so
    C^-1 does not exist, and every solve a step may take (the dense one, push-through, the column mean,
    `precondition`) gives NaN, a divergence at the next step (DESIGN 4), never a finite step through a
    pseudo-inverse of the Woodbury kernel."""
    problem = PROBLEMS["mlp-categorical"]
    (x, y, params), _, grad, factor = build(impl, problem, 4, curvature)
    dense = (ref.empirical_fisher if curvature == Curvature.EMPIRICAL else ref.fisher)(problem, params, x, y)
    assert np.linalg.matrix_rank(dense) <= 12 < problem.model.num_params()  # (mc: a rank <= the exact one's)
    c = impl.params({"c": np.ones((factor.num_columns // 4, 4))})["c"]
    solves = {
        "multiply_inverse": factor.multiply_inverse(impl.curvature.from_layers(problem.model, grad), 0.0),
        "multiply_inverse_layers": factor.multiply_inverse_layers(grad, 0.0),
        "inverse_factor_multiply": factor.inverse_factor_multiply(c, 0.0),
        "inverse_column_mean": factor.inverse_column_mean(0.0)[0],
        "precondition": impl.curvature.precondition(problem, curvature, grad, factor, 0.0)[0],
    }
    if curvature != Curvature.EMPIRICAL:
        solves["multiply_inverse_mean"] = factor.multiply_inverse_mean(grad, 0.0)
    for name, solution in solves.items():
        assert all(np.isnan(block).all() for block in impl.numpy(solution).values()), name


@pytest.mark.parametrize("by_gram", [True, False])
@pytest.mark.parametrize("curvature", [Curvature.EXACT, Curvature.MC])
@pytest.mark.parametrize("name, n", [("mlp-categorical", 4), ("mlp-bernoulli", 3), ("cnn-categorical", 3)])
def test_multiply_inverse_mean_matches_dense_solve(impl, name, n, curvature, by_gram):
    """The true Fisher's solve with the gradient, U^T g taken from the Gram product over the data's
    and U's rows together (by_gram) or from the layer inputs, equals a dense solve with autograd's
    gradient."""
    problem = PROBLEMS[name]
    (x, y, params), _, grad, factor = build(impl, problem, n, curvature, samples=2)
    assert problem.model.num_params() > factor.num_columns  # Woodbury, not the dense fallback
    damping = 1e-3
    dense = impl.numpy(factor.to_dense()) + damping * np.eye(problem.model.num_params())
    solution = factor.multiply_inverse_mean(grad, damping, by_gram)
    solution = impl.curvature.from_layers(problem.model, solution)
    expected = np.linalg.solve(dense, ref.loss_gradient(problem, params, x, y))
    close(flat(impl, problem, solution), expected, rtol=1e-8)


@pytest.mark.parametrize("by_gram", [True, False])
@pytest.mark.parametrize("curvature", [Curvature.EXACT, Curvature.MC])
def test_multiply_inverse_mean_keeps_the_l2_shift(impl, curvature, by_gram):
    """With l2 the factor's shift is part of C: both ways of taking U^T g solve with F + l2 I + damping I,
    g the mean of autograd's per-example gradients (the data's part of the gradient, as the method
    asks; the optimizers route l2 problems to `multiply_inverse_layers`, which must not hide a lost shift)."""
    problem = PROBLEMS["mlp-gaussian-l2"]
    (x, y, params), _, grad, factor = build(impl, problem, 3, curvature, samples=2)
    assert problem.model.num_params() > factor.num_columns and problem.l2 > 0
    weights = impl.curvature.to_layers(problem.model, impl.params(params))
    data_grad = {k: grad[k] - problem.l2 * weights[k] for k in grad}
    damping = 1e-3
    dense = impl.numpy(factor.to_dense()) + damping * np.eye(problem.model.num_params())
    solution = impl.curvature.from_layers(problem.model, factor.multiply_inverse_mean(data_grad, damping, by_gram))
    expected = np.linalg.solve(dense, ref.per_example_gradients(problem, params, x, y).mean(0))
    close(flat(impl, problem, solution), expected, rtol=1e-8)


@pytest.mark.parametrize("curvature, n, by_gram", [(Curvature.MC, 20, True), (Curvature.EXACT, 20, False),
                                                    (Curvature.EXACT, 4, True), (Curvature.EMPIRICAL, 4, False)])
def test_multiply_inverse_mean_takes_the_gram_product_where_cheaper(impl, curvature, n, by_gram):
    """784-wide-input-like MLP (50-8-3): the Gram product over (1 + r) N rows is cheaper than a
    product of the 51-wide inputs with g while r N sum(out) < sum(in' out) = 435; ef keeps no
    stacked deltas (its gradient is solved for by push-through)."""
    problem = models.Problem(models.mlp((50, 8, 3), "relu"), "categorical")
    _, _, _, factor = build(impl, problem, n, curvature)
    assert factor._mean_by_gram_is_cheaper() == by_gram


@pytest.mark.parametrize("curvature", list(Curvature))
def test_woodbury_kernel_not_positive_definite_gives_nan(impl, curvature):
    """A damping so negative that lambda I + s^2 U^T U is indefinite: NaN in both frameworks (a step
    then diverges at its loss), not a wrong direction and, in torch, not an error that syncs."""
    problem = PROBLEMS["mlp-categorical"]
    _, _, _, factor = build(impl, problem, 4, curvature, samples=2)
    assert problem.model.num_params() > factor.num_columns  # the Woodbury path
    v = np.random.default_rng(4).normal(size=problem.model.num_params())
    solution = factor.multiply_inverse(impl.params(models.unflatten(problem.model, v)), -1e3)
    assert np.isnan(flat(impl, problem, solution)).all()
    c = impl.params({"c": np.ones((factor.num_columns // 4, 4))})["c"]
    solution = impl.curvature.from_layers(problem.model, factor.inverse_factor_multiply(c, -1e3))
    assert np.isnan(flat(impl, problem, solution)).all()


@pytest.mark.parametrize("name", ["mlp-categorical", "mlp-bernoulli", "linear-gaussian"])
def test_mc_fisher_converges_to_exact(impl, name):
    """E[MC Fisher] = Fisher: the relative error falls like 1/sqrt(samples) (seeded)."""
    problem = PROBLEMS[name]
    (x, y, params), _, _, exact = build(impl, problem, 6, Curvature.EXACT)
    exact = impl.numpy(exact.to_dense())
    errors = {}
    for samples in (16, 4096):
        _, _, _, mc = build(impl, problem, 6, Curvature.MC, samples=samples)
        errors[samples] = np.linalg.norm(impl.numpy(mc.to_dense()) - exact) / np.linalg.norm(exact)
    # Expected ratio sqrt(4096/16) = 16; allow a factor 3 for the randomness of one seed.
    assert errors[4096] < errors[16] * 3 / 16
    assert errors[4096] < 0.1


@pytest.mark.parametrize("name", ["mlp-categorical", "mlp-bernoulli", "mlp-gaussian-l2", "cnn-categorical"])
def test_mc_fisher_is_the_mean_empirical_fisher_of_its_draws(impl, monkeypatch, name):
    """Exactly, with the draws fixed: the MC Fisher of S label sets is the mean over them of the
    empirical Fisher (per-example gradients) at those labels, plus l2 I. The convergence test above
    checks the sampler's distribution, but lets a bias of a few percent in the rest pass as noise."""
    problem, samples = PROBLEMS[name], 3
    x, _ = make_data(problem, 5)
    draws = np.stack([make_data(problem, 5, seed=10 + s)[1] for s in range(samples)])  # labels of the right kind
    monkeypatch.setattr(impl.curvature.M, "sample_labels", lambda *args: impl.batch(x, draws)[1])
    params = models.init_params(problem.model, 1)
    _, _, factor = impl.curvature.gradient_and_curvature(
        problem, impl.params(params), impl.batch(x, draws[0]), Curvature.MC, samples, impl.rng(0))
    expected = np.mean([ref.empirical_fisher(problem, params, x, labels) for labels in draws], axis=0)
    close(impl.numpy(factor.to_dense()), expected + problem.l2 * np.eye(len(expected)))


def test_kfac_is_exact_for_linear_gaussian(impl):
    problem = models.Problem(models.linear(4, 3, bias=True), "gaussian")
    (x, y, params), _, _, factor = build(impl, problem, 7, Curvature.EXACT)
    kfac = impl.curvature.kronecker(factor)
    close(impl.numpy(kfac.to_dense()), ref.fisher(problem, params, x, y))


@pytest.mark.parametrize("name", ["mlp-categorical", "mlp-bernoulli", "mlp-gaussian-l2"])
def test_kfac_blocks_are_exact_for_a_single_datum(impl, name):
    """One example: each layer's Fisher block is (a a^T) (x) (sum_c delta_c delta_c^T) exactly."""
    problem = PROBLEMS[name]
    (x, y, params), _, _, factor = build(impl, problem, 1, Curvature.EXACT)
    kfac = impl.numpy(impl.curvature.kronecker(factor).to_dense())
    fisher = ref.fisher(problem, params, x, y)
    for block in ref.layer_blocks(problem.model).values():
        close(kfac[block, block], fisher[block, block])
    off_diagonal = np.ones_like(kfac, dtype=bool)
    for block in ref.layer_blocks(problem.model).values():
        off_diagonal[block, block] = False
    assert np.all(kfac[off_diagonal] == 0)


def test_kfc_is_exact_for_a_convolution_with_one_position(impl):
    """A convolution whose kernel covers its whole input has T = 1 and is a dense layer."""
    model = models.Model((models.Conv2d(2, 3, 3), models.Flatten()), (2, 3, 3))
    problem = models.Problem(model, "gaussian")
    (x, y, params), _, _, factor = build(impl, problem, 1, Curvature.EXACT)
    close(impl.numpy(impl.curvature.kronecker(factor).to_dense()), ref.fisher(problem, params, x, y))


@pytest.mark.parametrize("name", ["mlp-categorical", "mlp-gaussian-l2"])
def test_kfac_inverse_uses_factored_tikhonov(impl, name):
    """With l2 the factors are damped by lambda = damping + l2 (the prior's term is part of the
    curvature K-FAC approximates), not by the damping alone."""
    problem = PROBLEMS[name]
    _, _, _, factor = build(impl, problem, 8, Curvature.EXACT)
    kfac = impl.curvature.kronecker(factor)
    damping = 0.05
    lam = damping + problem.l2
    v = np.random.default_rng(5).normal(size=problem.model.num_params())
    got = flat(impl, problem, kfac.multiply_inverse(impl.params(models.unflatten(problem.model, v)), damping))
    blocks = ref.layer_blocks(problem.model)
    expected = np.zeros_like(v)
    for name, block in blocks.items():
        A, G = impl.numpy(kfac.A[name]), impl.numpy(kfac.G[name])
        pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
        # Martens & Grosse (2015) 6.3: each factor damped in proportion to its own scale.
        damped = np.kron(G + np.sqrt(lam) / pi * np.eye(len(G)), A + pi * np.sqrt(lam) * np.eye(len(A)))
        # kron(G, A) acts on the row-major augmented weight [W | b]; move to canonical order.
        order = _augmented_to_canonical(len(G), len(A))
        expected[block] = np.linalg.solve(damped[np.ix_(order, order)], v[block])
    close(got, expected, rtol=1e-9)


@pytest.mark.parametrize("n", [1, 31, 128, 129, 300])
def test_damped_inverse_matches_numpy(impl, n):
    """The K-FAC factor inverse (matrix + shift I)^-1, in float64 against numpy, on sizes around the
    block size of jax's triangular inverse (128). Not positive definite: NaN (not a wrong number)
    in both frameworks; torch's does not raise, since raising would read its status back to the host."""
    rng = np.random.default_rng(n)
    root = rng.normal(size=(n, n // 2 + 1))
    matrix, shift = root @ root.T / n, 0.01  # singular before the shift: the shift matters
    got = impl.numpy(impl.curvature._damped_inverse(impl.params({"m": matrix})["m"], shift))
    close(got, np.linalg.inv(matrix + shift * np.eye(n)), rtol=1e-10)
    indefinite = impl.params({"m": matrix - 2 * np.abs(matrix).max() * np.eye(n)})["m"]
    assert np.isnan(impl.numpy(impl.curvature._damped_inverse(indefinite, shift))).all()


def _augmented_to_canonical(rows: int, cols: int) -> np.ndarray:
    """Index map: canonical position (weight row-major, then bias) -> row-major [W | b] position."""
    grid = np.arange(rows * cols).reshape(rows, cols)
    return np.concatenate([grid[:, :-1].reshape(-1), grid[:, -1]])


def test_logit_clip_is_straight_through(impl):
    """Clipped Bernoulli: loss at the clipped logit, gradient (c - y) x and Fisher c(1 - c) x x^T
    with c the clipped mean (the paper code's convention)."""
    clip = models.KUNSTNER_LOGIT_CLIP
    problem = models.Problem(models.linear(2, 1), "bernoulli", logit_clip=clip)
    x = np.array([[30.0, 1.0], [-0.5, 1.0]])
    y = np.array([[0.0], [1.0]])
    params = {"dense0.weight": np.array([[2.0, 0.5]])}
    value, grad, factor = impl.curvature.gradient_and_curvature(
        problem, impl.params(params), impl.batch(x, y), Curvature.EXACT, 1, None
    )
    logits = np.clip(x @ params["dense0.weight"][0], -clip, clip)
    c = 1 / (1 + np.exp(-logits))
    nll = np.logaddexp(0, logits) - y[:, 0] * logits  # -log Bernoulli(y; c), without 1 - c cancellation
    close(float(value), nll.mean())
    close(flat(impl, problem, impl.curvature.from_layers(problem.model, grad)), ((c - y[:, 0]) @ x) / 2)
    close(impl.numpy(factor.to_dense()), (x.T * (c * (1 - c))) @ x / 2)


# -- the float64 numpy reference (one output) against the same autograd references --------------------

NUMPY_PROBLEMS = {
    "linear-gaussian-l2": models.Problem(models.linear(4, 1, bias=True), "gaussian", l2=0.05),
    "logistic-l2": models.Problem(models.linear(5, 1, bias=True), "bernoulli", l2=0.1),
    # a clip of 0.3 on logits of size ~1 (params scaled by 4): most examples are clipped
    "logistic-clipped": models.Problem(models.linear(5, 1, bias=False), "bernoulli", logit_clip=0.3),
}


@pytest.mark.parametrize("name", NUMPY_PROBLEMS)
def test_numpy_reference_matches_autograd(name):
    """Its loss, gradient, per-example gradients, empirical and true Fisher, written from the closed
    forms, against autograd's: l2 in the loss, gradient and Fisher but not the EF; the clip's
    straight-through gradient and its c(1 - c) at the clipped logit."""
    import natgrad_impls.numpy as nn

    problem = NUMPY_PROBLEMS[name]
    x, y = make_data(problem, 11, seed=2)
    params = {k: 4 * v for k, v in models.init_params(problem.model, 3).items()}
    batch = (x, y)
    if problem.logit_clip is not None:
        logits = x @ params["dense0.weight"].T
        assert np.mean(np.abs(logits) > problem.logit_clip) > 0.5, "the clip must be active"
    close(nn.loss(problem, params, batch), ref.loss(problem, params, x, y))
    close(nn.gradient(problem, params, batch), ref.loss_gradient(problem, params, x, y))
    close(nn.per_example_gradients(problem, params, batch), ref.per_example_gradients(problem, params, x, y))
    close(nn.empirical_fisher(problem, params, batch), ref.empirical_fisher(problem, params, x, y))
    close(nn.fisher(problem, params, batch), ref.fisher(problem, params, x, y))


@pytest.mark.parametrize("name", NUMPY_PROBLEMS)
def test_numpy_mc_fisher_converges_to_exact(name):
    """The numpy reference's MC weights, (1/S) sum_s r_ns^2, are unbiased: their Fisher's relative
    error falls like 1/sqrt(samples) (seeded), as in torch and jax (the grid's copy of the formula
    is checked against this one on shared draws, not against the exact Fisher)."""
    import natgrad_impls.numpy as nn

    problem = NUMPY_PROBLEMS[name]
    x, y = make_data(problem, 11, seed=2)
    params = {k: 4 * v for k, v in models.init_params(problem.model, 3).items()}
    exact = nn.fisher(problem, params, (x, y))
    errors = {samples: np.linalg.norm(nn.fisher(problem, params, (x, y), "mc", samples) - exact) / np.linalg.norm(exact)
              for samples in (16, 65536)}  # cheap here: 11 examples, one output
    assert errors[65536] < errors[16] * 3 / 64
    assert errors[65536] < 0.01  # a bias of 2% would not pass


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_sampled_labels_follow_the_predictive_distribution(impl, likelihood):
    """The MC Fisher's labels come from p(y | x) at the model's mean: over 20,000 draws at skewed
    probabilities each class's (each output's) frequency lies within 5 standard errors of its
    probability, and a gaussian label's residual has mean 0 and variance 1. A sampler biased towards
    the likely class, or one that ignores the mean, is off by tens of standard errors here."""
    draws = 20_000
    mean = {"categorical": [[0.8, 0.15, 0.05], [0.05, 0.15, 0.8]], "bernoulli": [[0.9, 0.02, 0.5], [0.3, 0.7, 0.99]],
            "gaussian": [[3.0, -1.0, 0.0], [0.5, 2.0, -4.0]]}[likelihood]
    problem = models.Problem(models.linear(2, 3), likelihood)
    labels = impl.numpy(impl.curvature.M.sample_labels(problem, impl.params({"m": np.array(mean)})["m"], draws,
                                                       impl.rng(0)))
    mean = np.array(mean)
    if likelihood == "categorical":
        frequency = np.stack([np.bincount(labels[:, n], minlength=3) for n in range(2)]) / draws
    elif likelihood == "bernoulli":
        frequency = labels.mean(0)
    else:
        residual = labels - mean
        assert np.abs(residual.mean(0)).max() < 5 / np.sqrt(draws)
        assert np.abs(residual.var(0) - 1).max() < 5 * np.sqrt(2 / draws)
        return
    assert (np.abs(frequency - mean) < 5 * np.sqrt(mean * (1 - mean) / draws)).all(), (frequency, mean)
