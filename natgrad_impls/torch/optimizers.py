"""The five optimizers in PyTorch, one functional interface (DESIGN 5):

    opt = natgrad_impls.torch.ngd(problem, lr=0.1, damping=1e-4)
    state = opt.init(params)
    params, state, info = opt.step(params, state, batch)

params is a dict name -> tensor (`Model.param_names`), batch is (x, y); info holds the loss at the
parameters the step started from and the gradient norm (tensors, so that no step synchronises).
The curvature-based optimizers differ only in the curvature they precondition with.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from natgrad_impls import hyperparameters as hp
from natgrad_impls.interface import FunctionalOptimizer, functional_optimizer
from natgrad_impls.models import Problem
from natgrad_impls.names import Curvature, Fisher
from natgrad_impls.torch import curvature as C
from natgrad_impls.torch import model as M


class SGDState(NamedTuple):
    step: int
    momentum: dict | None


class AdamState(NamedTuple):
    step: int
    m: dict
    v: dict


class NaturalGradientState(NamedTuple):
    step: int


class KFACState(NamedTuple):
    step: int
    A: dict | None  # moving averages of the Kronecker factors, per layer
    G: dict | None
    A_inv: dict | None  # their damped inverses, refreshed every kfac_update_period steps
    G_inv: dict | None


@torch.no_grad()
def _descend(params: dict, direction: dict, lr: float) -> dict:
    """params - lr direction, one foreach op over all tensors (one kernel per step on a GPU); out of
    autograd's sight, so that parameters that require grad (a module's) do not chain every step's
    update into one growing graph."""
    names = list(params)
    return dict(zip(names, torch._foreach_add([params[k] for k in names], [direction[k] for k in names], alpha=-lr)))


def mc_sampler(seed: int, step: int, device) -> torch.Generator:
    """The MC label sampler of one step: reproducible from (seed, step) alone."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


@hp.documented
def sgd(problem: Problem, lr: float, momentum: float = 0.0) -> FunctionalOptimizer:
    """Stochastic gradient descent, optionally with heavy-ball momentum.

    b <- momentum b + g (b_0 = 0);  theta <- theta - lr b.
    Matches torch.optim.SGD (dampening 0, no Nesterov) and optax.sgd.
    """
    h = hp.SGD(lr, momentum)

    def init(params):
        return SGDState(0, {k: torch.zeros_like(p) for k, p in params.items()} if h.momentum else None)

    def step(params, state, batch):
        value, grad = M.loss_and_grad(problem, params, batch)
        names, g = list(grad), list(grad.values())
        direction, buffers = grad, None
        if h.momentum:  # foreach ops: one kernel per operation over all tensors, as torch.optim
            b = torch._foreach_mul([state.momentum[k] for k in names], h.momentum)
            torch._foreach_add_(b, g)
            direction = buffers = dict(zip(names, b))
        new = _descend(params, direction, h.lr)
        return new, SGDState(state.step + 1, buffers), {"loss": value, "grad_norm": C.total_norm(g)}

    return functional_optimizer(init, step, h, SGDState)


@hp.documented
def adam(problem: Problem, lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """Adam: a diagonal second-moment preconditioner with bias correction.

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;  theta <- theta - lr m^ / (sqrt(v^) + eps),
    m^ = m / (1 - b1^t), v^ = v / (1 - b2^t), t the step count from 1 (eps outside the root).
    Matches torch.optim.Adam and optax.adam to float64 round-off.
    """
    h = hp.Adam(lr, b1, b2, eps)

    def init(params):
        zeros = lambda: {k: torch.zeros_like(p) for k, p in params.items()}
        return AdamState(0, zeros(), zeros())

    def step(params, state, batch):
        value, grad = M.loss_and_grad(problem, params, batch)
        names, g = list(grad), list(grad.values())
        t = state.step + 1
        c1, c2 = 1 - h.b1**t, 1 - h.b2**t
        # foreach ops: one kernel per operation over all tensors, as torch.optim's foreach Adam
        m = torch._foreach_mul([state.m[k] for k in names], h.b1)
        torch._foreach_add_(m, g, alpha=1 - h.b1)
        v = torch._foreach_mul([state.v[k] for k in names], h.b2)
        torch._foreach_addcmul_(v, g, g, value=1 - h.b2)
        denominator = torch._foreach_sqrt(v)
        torch._foreach_div_(denominator, math.sqrt(c2))
        torch._foreach_add_(denominator, h.eps)
        with torch.no_grad():  # (as _descend)
            new = torch._foreach_addcdiv([params[k] for k in names], m, denominator, value=-h.lr / c1)
        state = AdamState(t, dict(zip(names, m)), dict(zip(names, v)))
        return dict(zip(names, new)), state, {"loss": value, "grad_norm": C.total_norm(g)}

    return functional_optimizer(init, step, h, AdamState)


def _natural_gradient(problem: Problem, h: hp.NaturalGradient, curvature: Curvature) -> FunctionalOptimizer:
    gradient = C.gradient_needed(problem, curvature)

    def init(params):
        return NaturalGradientState(0)

    def step(params, state, batch):
        generator = mc_sampler(h.seed, state.step, batch[0].device) if curvature == Curvature.MC else None
        value, grad, factor = C.gradient_and_curvature(problem, params, batch, curvature, h.samples, generator, gradient)
        layers, grad_norm = C.precondition(problem, curvature, grad, factor, h.damping)
        new = _descend(params, C.from_layers(problem.model, layers), h.lr)
        return new, NaturalGradientState(state.step + 1), {"loss": value, "grad_norm": grad_norm}

    return functional_optimizer(init, step, h, NaturalGradientState)


@hp.documented
def ef(problem: Problem, lr: float, damping: float) -> FunctionalOptimizer:
    """NGD preconditioned by the damped empirical Fisher.

    theta <- theta - lr (EF + damping I)^-1 g,  EF = (1/N) sum_n g_n g_n^T,
    g_n the gradient of example n's own NLL (the l2 term enters g, never EF), over the step's batch
    of N examples (g and EF from the same batch). Woodbury on the N per-example gradients (Gram
    matrix from layer inputs and output gradients) unless D <= N.
    """
    return _natural_gradient(problem, hp.NaturalGradient(lr, damping), Curvature.EMPIRICAL)


@hp.documented
def ngd(problem: Problem, lr: float, damping: float, fisher: Fisher | str = Fisher.EXACT, samples: int = 1,
        seed: int = 0) -> FunctionalOptimizer:
    """NGD preconditioned by the damped true Fisher.

    theta <- theta - lr (F + l2 I + damping I)^-1 g,  F = (1/N) sum_n J_n^T Lambda_n J_n over the
    step's batch of N examples (g and F from the same batch), J_n the Jacobian of example n's outputs.
    fisher="exact": Lambda_n in closed form (a root of k columns per example, k the outputs, or
    k - 1 for k classes: its rank);
    fisher="mc": (1/S) sum_s r_s r_s^T with r_s the residual at a label drawn from the model
    (`samples` S per example, sampler seeded by `seed` and the step count).
    """
    h = hp.NaturalGradient(lr, damping, fisher, samples, seed)
    return _natural_gradient(problem, h, Curvature(h.fisher.value))


@hp.documented
def kfac(problem: Problem, lr: float, damping: float, kfac_update_period: int = 10, kfac_ema: float = 0.95,
         fisher: Fisher | str = Fisher.MC, samples: int = 1, seed: int = 0) -> FunctionalOptimizer:
    """K-FAC (Martens & Grosse 2015; KFC for convolutions): block-diagonal Kronecker Fisher.

    Per layer, A = E[a a^T], G = E[delta delta^T] (delta from labels drawn from the model, or from
    the exact output Fisher factor), kept as moving averages X <- ema X + (1 - ema) X_batch
    (X_0 = the first batch's); every `kfac_update_period` steps (from step 0) the damped inverses
    are refreshed with factored Tikhonov damping pi; the update is
    W' <- W' - lr (G + sqrt(lambda)/pi I)^-1 grad_W' (A + pi sqrt(lambda) I)^-1, lambda = damping + l2,
    W' = [W | b] the bias-augmented weight, pi = sqrt((tr A / dim A) / (tr G / dim G)). E[.] is the
    mean over the step's batch (a convolution's A sums over positions, its G averages over them);
    MC labels are `samples` per example, their G averaged, drawn from (seed, step) by the
    framework's own sampler (torch's and jax's draws differ).
    """
    h = hp.KFAC(lr, damping, kfac_update_period, kfac_ema, fisher, samples, seed)
    curvature = Curvature(h.fisher.value)

    def init(params):
        return KFACState(0, None, None, None, None)

    def step(params, state, batch):
        generator = mc_sampler(h.seed, state.step, batch[0].device) if curvature == Curvature.MC else None
        value, grad, factor = C.gradient_and_curvature(problem, params, batch, curvature, h.samples, generator,
                                                       coordinates=False)
        first = state.step == 0
        factors = C.kronecker(factor, 1.0 if first else 1 - h.kfac_ema)
        if not first:  # X <- ema X + (1 - ema) X_batch, in place (the batch's are fresh tensors)
            names = list(factors.A)
            torch._foreach_add_([factors.A[k] for k in names] + [factors.G[k] for k in names],
                                [state.A[k] for k in names] + [state.G[k] for k in names], alpha=h.kfac_ema)
        if state.step % h.kfac_update_period == 0:
            inverse = factors.inverse(h.damping)
        else:
            inverse = C.KroneckerCurvature(problem.model, state.A_inv, state.G_inv)
        new = _descend(params, C.from_layers(problem.model, inverse.multiply_layers(grad)), h.lr)
        new_state = KFACState(state.step + 1, factors.A, factors.G, inverse.A, inverse.G)
        return new, new_state, {"loss": value, "grad_norm": C.total_norm(grad.values())}

    return functional_optimizer(init, step, h, KFACState)
