"""Float64 NumPy reference for the convex tasks (DESIGN 3-5): one Dense layer, one output,
gaussian or bernoulli likelihood, written from the closed forms so that the torch and jax code
can be checked against it.

Everything works on the flat parameter vector theta in the canonical order of
`natgrad_impls.models.flatten` (weight entries, then the bias) and on the design matrix
Z = [X, 1] (the column of ones only when the layer has a bias), so that f = Z theta and

    L(theta) = (1/N) sum_n l_n + l2/2 |theta|^2,        g_n = r_n z_n,     g = (1/N) Z^T r + l2 theta,
    EF = (1/N) sum_n g_n g_n^T,                         F = (1/N) Z^T diag(lambda) Z + l2 I,

with r_n = f_n - y_n, lambda_n = 1 (gaussian, l_n = (f_n - y_n)^2/2) or r_n = c_n - y_n,
lambda_n = c_n (1 - c_n), c_n = sigmoid(clip(f_n)) (bernoulli, l_n = softplus(clip(f)) - y clip(f);
clip = +-problem.logit_clip with a straight-through gradient, the paper code's mean clipping).
The l2 term (a prior) enters the loss, the gradient and the true Fisher, never the EF.

MC Fisher labels are drawn from `models.random_stream(seed, "labels", step)`: reproducible, but not the
same draws as torch's or jax's samplers, so mc runs agree across frameworks only in distribution.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.special import expit

from natgrad_impls import hyperparameters as hp
from natgrad_impls.interface import FunctionalOptimizer, functional_optimizer
from natgrad_impls.models import Dense, Problem, check_inputs, flatten, random_stream, unflatten
from natgrad_impls.names import Fisher, Likelihood, parse


class SGDState(NamedTuple):
    step: int
    momentum: np.ndarray | None  # flat heavy-ball buffer b


class AdamState(NamedTuple):
    step: int
    m: np.ndarray
    v: np.ndarray


class NaturalGradientState(NamedTuple):
    step: int


class KFACState(NamedTuple):
    step: int
    A: np.ndarray | None  # moving average of Z^T Z / N (D' x D')
    G: float | None  # moving average of the output-space Fisher (a scalar: one output)
    A_inv: np.ndarray | None  # damped inverses, refreshed every kfac_update_period steps
    G_inv: float | None


# -- the model in closed form ---------------------------------------------------------------------

def check_problem(problem: Problem) -> None:
    """ValueError naming the field unless `problem` is one Dense layer with one output and a
    gaussian or bernoulli likelihood (the convex tasks)."""
    layers = problem.model.layers
    if len(layers) != 1 or not isinstance(layers[0], Dense) or layers[0].out_features != 1:
        raise ValueError("model: the numpy reference supports a single Dense layer with one output")
    if problem.likelihood not in (Likelihood.GAUSSIAN, Likelihood.BERNOULLI):
        raise ValueError(f"likelihood: {problem.likelihood.value!r} is not supported by the numpy reference "
                         "(one of gaussian, bernoulli)")


def _design(problem: Problem, batch) -> tuple[np.ndarray, np.ndarray]:
    """Z = [X, 1] (or X without a bias) and y as a flat vector, both float64."""
    x, y = batch
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    check_inputs(problem.model, x.shape)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"batch: expected X (N, D) and y (N, 1), got {x.shape} and {np.shape(batch[1])}")
    z = np.hstack([x, np.ones((x.shape[0], 1))]) if problem.model.layers[0].bias else x
    return z, y


def _theta(problem: Problem, params: dict) -> np.ndarray:
    problem.model.check_params(params)
    return flatten(problem.model, {k: np.asarray(v, dtype=np.float64) for k, v in params.items()})


def _params(problem: Problem, theta: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in unflatten(problem.model, theta).items()}


def _logits(problem: Problem, z: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """f = Z theta; bernoulli logits clipped to +-logit_clip. The clip is straight-through: the
    gradient and the Fisher below differentiate as if it were the identity, so using the clipped
    value everywhere is all there is to it."""
    f = z @ theta
    if problem.likelihood == Likelihood.BERNOULLI and problem.logit_clip is not None:
        f = np.clip(f, -problem.logit_clip, problem.logit_clip)
    return f


def _nll(problem: Problem, f: np.ndarray, y: np.ndarray) -> np.ndarray:
    if problem.likelihood == Likelihood.GAUSSIAN:
        return 0.5 * (f - y) ** 2
    # softplus(f) - y f written as y softplus(-f) + (1 - y) softplus(f): the same for every y, but
    # for labels in {0, 1} one term, so a confident fit's small loss is not a difference of two
    # large numbers (softplus(30) - 30 kept 2 digits)
    return y * np.logaddexp(0.0, -f) + (1 - y) * np.logaddexp(0.0, f)


def _mean(problem: Problem, f: np.ndarray) -> np.ndarray:
    """The predictive mean: f (gaussian) or sigmoid(f) (bernoulli); the residual is mean - y."""
    return f if problem.likelihood == Likelihood.GAUSSIAN else expit(f)


def _loss_value(problem: Problem, theta: np.ndarray, f: np.ndarray, y: np.ndarray) -> float:
    return float(_nll(problem, f, y).mean() + 0.5 * problem.l2 * theta @ theta)


def _fisher_weights(problem: Problem, f: np.ndarray, fisher: Fisher, samples: int = 1, rng=None) -> np.ndarray:
    """lambda_n, the output-space Fisher of each example (a scalar: one output).

    exact: 1 (gaussian), c (1 - c) (bernoulli). mc: (1/S) sum_s r_ns^2 with r_ns = mean_n - y_ns at
    labels y_ns drawn from the model, an unbiased estimate of the exact weight."""
    n = f.shape[0]
    if fisher == Fisher.EXACT:
        if problem.likelihood == Likelihood.GAUSSIAN:
            return np.ones(n)
        c = expit(f)
        return c * (1 - c)
    if problem.likelihood == Likelihood.GAUSSIAN:
        r = rng.standard_normal((samples, n))  # y = f + noise, r = -noise; only r^2 matters
    else:
        c = expit(f)
        r = c - (rng.random((samples, n)) < c)
    return (r**2).mean(axis=0)


# -- plain functions (dense references for the tests and the grid runner) -------------------------

def loss(problem: Problem, params: dict, batch) -> float:
    """L(theta) = mean NLL + l2/2 |theta|^2."""
    check_problem(problem)
    z, y = _design(problem, batch)
    theta = _theta(problem, params)
    return _loss_value(problem, theta, _logits(problem, z, theta), y)


def per_example_gradients(problem: Problem, params: dict, batch) -> np.ndarray:
    """g_n = r_n z_n, N x D' in canonical order (each example's own NLL: no l2 term)."""
    check_problem(problem)
    z, y = _design(problem, batch)
    theta = _theta(problem, params)
    return (_mean(problem, _logits(problem, z, theta)) - y)[:, None] * z


def gradient(problem: Problem, params: dict, batch) -> np.ndarray:
    """g = (1/N) sum_n g_n + l2 theta, a flat vector in canonical order."""
    check_problem(problem)
    theta = _theta(problem, params)
    return per_example_gradients(problem, params, batch).mean(axis=0) + problem.l2 * theta


def empirical_fisher(problem: Problem, params: dict, batch) -> np.ndarray:
    """EF = (1/N) sum_n g_n g_n^T, D' x D' (no l2 term)."""
    g = per_example_gradients(problem, params, batch)
    return g.T @ g / g.shape[0]


def fisher(problem: Problem, params: dict, batch, fisher: Fisher | str = Fisher.EXACT, samples: int = 1,
           seed: int = 0, step: int = 0) -> np.ndarray:
    """F = (1/N) Z^T diag(lambda) Z + l2 I, D' x D' (the prior's precision l2 included, as in the
    loss); fisher="mc" draws `samples` labels per example from random_stream(seed, "labels", step)."""
    check_problem(problem)
    fisher = parse(Fisher, fisher, "fisher")
    z, _ = _design(problem, batch)
    theta = _theta(problem, params)
    rng = random_stream(seed, "labels", step) if fisher == Fisher.MC else None
    lam = _fisher_weights(problem, _logits(problem, z, theta), fisher, samples, rng)
    return (z * lam[:, None]).T @ z / z.shape[0] + problem.l2 * np.eye(z.shape[1])


# -- optimizers ------------------------------------------------------------------------------------

def solve(matrix: np.ndarray, b: np.ndarray, singular: bool = False) -> np.ndarray:
    """matrix^-1 b, NaN where LU finds matrix singular: as in jax and in torch's Cholesky solves,
    which never raise, a failed solve makes the next parameters NaN and the run diverges at the next
    step (its loss NaN), in every framework alike. `singular`: known to be (hp.structurally_singular).
    A matrix singular by its data alone may pass LU on round-off pivots (hp.NaturalGradient)."""
    if singular:
        return np.full(np.broadcast_shapes(matrix.shape[:-1], b.shape), np.nan)
    try:
        return np.linalg.solve(matrix, b)
    except np.linalg.LinAlgError:
        return np.full(np.broadcast_shapes(matrix.shape[:-1], b.shape), np.nan)


def inverse(matrix: np.ndarray) -> np.ndarray:
    """matrix^-1, NaN where singular (as `solve`)."""
    try:
        return np.linalg.inv(matrix)
    except np.linalg.LinAlgError:
        return np.full(matrix.shape, np.nan)


def _loss_and_grad(problem: Problem, params: dict, batch):
    """theta, Z, logits f, residuals r, loss and gradient of one batch, from one forward pass."""
    z, y = _design(problem, batch)
    theta = _theta(problem, params)
    f = _logits(problem, z, theta)
    r = _mean(problem, f) - y
    grad = z.T @ r / z.shape[0] + problem.l2 * theta
    return theta, z, f, r, _loss_value(problem, theta, f, y), grad


def _info(value: float, grad: np.ndarray) -> dict:
    return {"loss": value, "grad_norm": float(np.linalg.norm(grad))}


@hp.documented
def sgd(problem: Problem, lr: float, momentum: float = 0.0) -> FunctionalOptimizer:
    """Stochastic gradient descent, optionally with heavy-ball momentum.

    b <- momentum b + g (b_0 = 0);  theta <- theta - lr b  (b = g without momentum).
    Conventions as torch.optim.SGD (dampening 0, no Nesterov) and optax.sgd.
    """
    check_problem(problem)
    h = hp.SGD(lr, momentum)

    def init(params):
        return SGDState(0, np.zeros(problem.model.num_params()) if h.momentum else None)

    def step(params, state, batch):
        theta, _, _, _, value, grad = _loss_and_grad(problem, params, batch)
        buffer = h.momentum * state.momentum + grad if h.momentum else None
        direction = grad if buffer is None else buffer
        return _params(problem, theta - h.lr * direction), SGDState(state.step + 1, buffer), _info(value, grad)

    return functional_optimizer(init, step, h, SGDState)


@hp.documented
def adam(problem: Problem, lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """Adam, as torch.optim.Adam and optax.adam.

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;  theta <- theta - lr m^ / (sqrt(v^) + eps),
    m^ = m / (1 - b1^t), v^ = v / (1 - b2^t), t the step count from 1 (eps outside the root).
    """
    check_problem(problem)
    h = hp.Adam(lr, b1, b2, eps)

    def init(params):
        d = problem.model.num_params()
        return AdamState(0, np.zeros(d), np.zeros(d))

    def step(params, state, batch):
        theta, _, _, _, value, grad = _loss_and_grad(problem, params, batch)
        t = state.step + 1
        m = h.b1 * state.m + (1 - h.b1) * grad
        v = h.b2 * state.v + (1 - h.b2) * grad**2
        m_hat, v_hat = m / (1 - h.b1**t), v / (1 - h.b2**t)
        new = theta - h.lr * m_hat / (np.sqrt(v_hat) + h.eps)
        return _params(problem, new), AdamState(t, m, v), _info(value, grad)

    return functional_optimizer(init, step, h, AdamState)


@hp.documented
def ef(problem: Problem, lr: float, damping: float) -> FunctionalOptimizer:
    """NGD preconditioned by the damped empirical Fisher.

    theta <- theta - lr (EF + damping I)^-1 g,  EF = (1/N) sum_n g_n g_n^T (no l2 term in EF; g
    includes it). A dense D' x D' solve: the convex tasks are small.
    """
    check_problem(problem)
    h = hp.NaturalGradient(lr, damping)

    def step(params, state, batch):
        theta, z, f, r, value, grad = _loss_and_grad(problem, params, batch)
        per_example = r[:, None] * z
        matrix = per_example.T @ per_example / z.shape[0] + h.damping * np.eye(z.shape[1])
        new = theta - h.lr * solve(matrix, grad, hp.structurally_singular(h.damping, *z.shape))
        return _params(problem, new), NaturalGradientState(state.step + 1), _info(value, grad)

    return functional_optimizer(lambda params: NaturalGradientState(0), step, h, NaturalGradientState)


@hp.documented
def ngd(problem: Problem, lr: float, damping: float, fisher: Fisher | str = Fisher.EXACT, samples: int = 1,
        seed: int = 0) -> FunctionalOptimizer:
    """NGD preconditioned by the damped true Fisher.

    theta <- theta - lr (F + (l2 + damping) I)^-1 g,  F = (1/N) Z^T diag(lambda) Z, with lambda_n
    = 1 (gaussian), c_n (1 - c_n) (bernoulli) for fisher="exact", or for fisher="mc" the mean of
    r^2 over `samples` labels per example drawn from random_stream(seed, "labels", step) (not the torch/jax
    draws). A dense D' x D' solve.
    """
    check_problem(problem)
    h = hp.NaturalGradient(lr, damping, fisher, samples, seed)

    def step(params, state, batch):
        theta, z, f, r, value, grad = _loss_and_grad(problem, params, batch)
        rng = random_stream(h.seed, "labels", state.step) if h.fisher == Fisher.MC else None
        lam = _fisher_weights(problem, f, h.fisher, h.samples, rng)
        matrix = (z * lam[:, None]).T @ z / z.shape[0] + (problem.l2 + h.damping) * np.eye(z.shape[1])
        new = theta - h.lr * solve(matrix, grad, hp.structurally_singular(problem.l2 + h.damping, *z.shape))
        return _params(problem, new), NaturalGradientState(state.step + 1), _info(value, grad)

    return functional_optimizer(lambda params: NaturalGradientState(0), step, h, NaturalGradientState)


@hp.documented
def kfac(problem: Problem, lr: float, damping: float, kfac_update_period: int = 10, kfac_ema: float = 0.95,
         fisher: Fisher | str = Fisher.MC, samples: int = 1, seed: int = 0) -> FunctionalOptimizer:
    """K-FAC (Martens & Grosse 2015) for one Dense layer with one output.

    A = Z^T Z / N (the bias-augmented inputs), G = (1/N) sum_n lambda_n (a scalar: the output-space
    Fisher, exact or mc as in `ngd`), both kept as moving averages X <- ema X + (1 - ema) X_batch
    (X_0 = the first batch's). At steps 0, period, 2 period, ... the damped inverses are refreshed
    with factored Tikhonov damping, lambda = damping + l2, pi = sqrt((tr A / dim A) / G):
    theta <- theta - lr (G + sqrt(lambda)/pi)^-1 (A + pi sqrt(lambda) I)^-1 g.
    With one output the block A (x) G is the true Fisher up to replacing lambda_n by its mean.
    Where G (or A) is zero (every logit saturated) the damped block is lambda I, and both inverses
    are I / sqrt(lambda) (kfac-jax's zero case, as in torch and jax).
    """
    check_problem(problem)
    h = hp.KFAC(lr, damping, kfac_update_period, kfac_ema, fisher, samples, seed)

    def init(params):
        return KFACState(0, None, None, None, None)

    def step(params, state, batch):
        theta, z, f, r, value, grad = _loss_and_grad(problem, params, batch)
        rng = random_stream(h.seed, "labels", state.step) if h.fisher == Fisher.MC else None
        A_batch = z.T @ z / z.shape[0]
        G_batch = float(_fisher_weights(problem, f, h.fisher, h.samples, rng).mean())
        if state.A is None:
            A, G = A_batch, G_batch
        else:
            A = h.kfac_ema * state.A + (1 - h.kfac_ema) * A_batch
            G = h.kfac_ema * state.G + (1 - h.kfac_ema) * G_batch
        A_inv, G_inv = state.A_inv, state.G_inv
        if state.step % h.kfac_update_period == 0:
            root = math.sqrt(h.damping + problem.l2)
            a = np.trace(A) / A.shape[0]
            pi = math.sqrt(a) / math.sqrt(G) if a > 0 and G > 0 else 0.0  # (a / G overflows where G is tiny)
            live = 0 < pi < math.inf
            pi = pi if live else 1.0
            A_inv = inverse(A * live + root * pi * np.eye(A.shape[0]))
            G_inv = 1.0 / (G * live + root / pi)
        new = theta - h.lr * G_inv * (A_inv @ grad)
        return _params(problem, new), KFACState(state.step + 1, A, G, A_inv, G_inv), _info(value, grad)

    return functional_optimizer(init, step, h, KFACState)
