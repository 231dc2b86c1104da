"""The five optimizers in JAX, one functional interface (DESIGN 5), mirroring natgrad_impls.torch:

    opt = natgrad_impls.jax.ngd(problem, lr=0.1, damping=1e-4)
    state = opt.init(params)
    params, state, info = opt.step(params, state, batch)

params is a dict name -> array (a pytree, `Model.param_names`), batch is (x, y); info holds the loss
at the parameters the step started from and the gradient norm. `step` is one jitted function with
the problem and the hyperparameters closed over (static), except those that the runs of a tuning job
vary, lr, damping and the MC label sampler's seed: they are scalar arguments of the program, not
constants compiled into it, so that one compiled program serves every value and the pipeline's
persistent compilation cache compiles a tuning job's step once, not once per setting; the optimizer
that steps gives its own (`_with_own_hyperparameters`), so that, as in torch, a state another
optimizer made steps with this one's values. The jitted programs are built once per problem and
compiled hyperparameters (`_shared`), so that the runs of one process (a tuning job's settings and
seeds) reuse them, traced and compiled, instead of tracing, lowering and reading back the same
program every run (on digits-mlp, 0.07 s a run for sgd and 0.14 s for kfac). States are NamedTuples
of arrays, the step counter included. K-FAC's step is two compiled programs, with and without the
inverse refresh, picked on the host from a host copy of its counter: a `lax.cond` on the device
counter costs a host sync every step on a GPU (XLA's ConditionalThunk copies the predicate to the
host and blocks until the stream is done, so no later step can be queued behind it).
The curvature-based optimizers differ only in the curvature they precondition with.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from natgrad_impls import hyperparameters as hp
from natgrad_impls.interface import FunctionalOptimizer, functional_optimizer
from natgrad_impls.jax import curvature as C
from natgrad_impls.jax import model as M
from natgrad_impls.models import Problem
from natgrad_impls.names import Curvature, Fisher


class SGDState(NamedTuple):
    step: jax.Array
    momentum: dict | None


class AdamState(NamedTuple):
    step: jax.Array
    m: dict
    v: dict


class NaturalGradientState(NamedTuple):
    step: jax.Array


class KFACState(NamedTuple):
    step: int  # on the host (as in torch): it picks the program (module docstring)
    A: dict  # moving averages of the factors, {layer: in' x in'} and {layer: out x out}
    G: dict
    A_inv: dict  # damped inverses, refreshed every kfac_update_period steps
    G_inv: dict
    device_step: jax.Array  # the same count, for the program: a host int would be copied in every call


def _counter(params: dict) -> jax.Array:
    """Step 0, placed like the parameters (committed to their device where they are, as every
    later state is), so that the jitted step sees the same argument types from its first call on:
    one compilation, not a second one at step 1."""
    return jnp.zeros_like(next(iter(params.values())), shape=(), dtype=jnp.int32)


def _traced(h, params: dict, *names: str) -> dict:
    """The hyperparameters `names` of `h` as float64 scalars placed like the parameters, arguments of
    the program (module docstring); "seed", the MC label sampler's, as an int64 one (the key of a Python
    int seed). Where a float meets the parameters it is rounded to their dtype, as a Python float
    is, so a step multiplies by the same numbers as with the values compiled in (`curvature.damped`
    says where a division moves by round-off)."""
    like = next(iter(params.values()))
    values = {name: np.asarray(getattr(h, name), dtype=np.int64 if name == "seed" else np.float64) for name in names}
    # Transfers, not programs (jnp.full_like compiled one per dtype at a process's first step),
    # committed to a device where the parameters are (as jit's outputs then are: a mix compiles anew).
    if isinstance(like, jax.core.Tracer) or not like.committed:  # (in a caller's trace: its constants)
        return {name: jnp.asarray(value) for name, value in values.items()}
    sharding = like.sharding
    if not sharding.is_fully_replicated:  # a parameter split over devices: the scalars on each of them
        if not isinstance(sharding, jax.sharding.NamedSharding):
            return {name: jnp.full_like(like, value, shape=(), dtype=value.dtype) for name, value in values.items()}
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return {name: jax.device_put(value, sharding) for name, value in values.items()}


def _with_own_hyperparameters(compiled, h, *names: str):
    """`compiled`'s step given this optimizer's traced `names` (its `traced` argument): the optimizer
    that steps decides them, as in torch, whichever optimizer's init made the state (an lr schedule
    may rebuild the optimizer each step). Made once per placement of the parameters (a step on
    another device takes its own), and afresh inside a caller's trace (jax.jit(opt.step), lax.scan),
    whose tracers must not outlive it."""
    made = {}  # sharding of the parameters -> the scalars placed like them

    def step(params, state, batch, **static):  # (static: K-FAC's refresh)
        like = next(iter(params.values()))
        if isinstance(like, jax.core.Tracer):
            traced = _traced(h, params, *names)
        else:
            traced = made.get(like.sharding) or made.setdefault(like.sharding, _traced(h, params, *names))
        return compiled(params, state, batch, traced, **static)

    return step


def _damping(h, traced):
    """The traced damping, or a Python 0.0: zero damping selects the dense solve at trace time
    (curvature.FactorCurvature), so it stays a constant of its own program."""
    return traced["damping"] if h.damping else 0.0


def _descend(params: dict, direction: dict, lr: jax.Array) -> dict:
    return {k: p - lr.astype(p.dtype) * direction[k] for k, p in params.items()}


def _compiled(h):
    """`h` as its programs see it: lr, damping and seed are traced (`_traced`), so any
    value compiles alike, except a damping of 0, which picks the dense solve at trace time
    (`_damping`); K-FAC's period picks a program on the host, never inside one."""
    masked = {"lr": 0.0}
    if hasattr(h, "damping"):
        masked["damping"] = 1.0 if h.damping else 0.0
    if hasattr(h, "seed"):
        masked["seed"] = 0
    if hasattr(h, "kfac_update_period"):
        masked["kfac_update_period"] = 1
    return dataclasses.replace(h, **masked)


@functools.lru_cache(maxsize=32)
def _shared(build, problem: Problem, h, *static):
    """`build(problem, h, *static)`'s jitted program, one per (problem, compiled hyperparameters,
    static) for the process (module docstring); `h` from `_compiled`. Bounded: the test suite
    builds hundreds."""
    return build(problem, h, *static)


def _loss_and_grad(problem: Problem, params: dict, batch):
    return jax.value_and_grad(lambda p: M.loss(problem, p, batch))(params)


def mc_sampler(seed: int, step: jax.Array) -> jax.Array:
    """The MC label sampler of one step: reproducible from (seed, step) alone."""
    return jax.random.fold_in(jax.random.key(seed), step)


@hp.documented
def sgd(problem: Problem, lr: float, momentum: float = 0.0) -> FunctionalOptimizer:
    """Stochastic gradient descent, optionally with heavy-ball momentum.

    b <- momentum b + g (b_0 = 0);  theta <- theta - lr b.
    Matches torch.optim.SGD (dampening 0, no Nesterov) and optax.sgd.
    """
    h = hp.SGD(lr, momentum)

    def init(params):
        momentum = {k: jnp.zeros_like(p) for k, p in params.items()} if h.momentum else None
        return SGDState(_counter(params), momentum)

    step = _with_own_hyperparameters(_shared(_sgd_step, problem, _compiled(h)), h, "lr")
    return functional_optimizer(init, step, h, SGDState)


def _sgd_step(problem: Problem, h: hp.SGD):
    @jax.jit
    def step(params, state, batch, traced):
        value, grad = _loss_and_grad(problem, params, batch)
        direction, buffers = grad, None
        if h.momentum:
            buffers = {k: h.momentum * state.momentum[k] + g for k, g in grad.items()}
            direction = buffers
        new = _descend(params, direction, traced["lr"])
        info = {"loss": value, "grad_norm": C.total_norm(grad.values())}
        return new, SGDState(state.step + 1, buffers), info

    return step


@hp.documented
def adam(problem: Problem, lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """Adam: a diagonal second-moment preconditioner with bias correction.

    m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;  theta <- theta - lr m^ / (sqrt(v^) + eps),
    m^ = m / (1 - b1^t), v^ = v / (1 - b2^t), t the step count from 1 (eps outside the root).
    Matches torch.optim.Adam and optax.adam to float64 round-off.
    """
    h = hp.Adam(lr, b1, b2, eps)

    def init(params):
        zeros = lambda: {k: jnp.zeros_like(p) for k, p in params.items()}
        return AdamState(_counter(params), zeros(), zeros())

    step = _with_own_hyperparameters(_shared(_adam_step, problem, _compiled(h)), h, "lr")
    return functional_optimizer(init, step, h, AdamState)


def _adam_step(problem: Problem, h: hp.Adam):
    @jax.jit
    def step(params, state, batch, traced):
        value, grad = _loss_and_grad(problem, params, batch)
        t = state.step + 1
        m = {k: h.b1 * state.m[k] + (1 - h.b1) * g for k, g in grad.items()}
        v = {k: h.b2 * state.v[k] + (1 - h.b2) * g * g for k, g in grad.items()}
        # The corrections in float64 (as torch's Python floats), then rounded to the params' dtype.
        tf = t.astype(jnp.float64)
        c1, c2 = 1 - h.b1**tf, 1 - h.b2**tf
        # (lr m^) / (...) in this order, not _descend's lr (m^ / (...)): float32 runs keep their numbers.
        lr = traced["lr"]
        new = {
            k: p - lr.astype(p.dtype) * (m[k] / c1.astype(p.dtype)) / (jnp.sqrt(v[k] / c2.astype(p.dtype)) + h.eps)
            for k, p in params.items()
        }
        info = {"loss": value, "grad_norm": C.total_norm(grad.values())}
        return new, AdamState(t, m, v), info

    return step


def _natural_gradient(problem: Problem, h: hp.NaturalGradient, curvature: Curvature) -> FunctionalOptimizer:
    def init(params):
        return NaturalGradientState(_counter(params))

    compiled = _shared(_natural_gradient_step, problem, _compiled(h), curvature)
    step = _with_own_hyperparameters(compiled, h, "lr", "damping", "seed")
    return functional_optimizer(init, step, h, NaturalGradientState)


def _natural_gradient_step(problem: Problem, h: hp.NaturalGradient, curvature: Curvature):
    @jax.jit
    def step(params, state, batch, traced):
        key = mc_sampler(traced["seed"], state.step) if curvature == Curvature.MC else None
        value, grad, factor = C.gradient_and_curvature(problem, params, batch, curvature, h.samples, key)
        layers, grad_norm = C.precondition(problem, curvature, grad, factor, _damping(h, traced))
        new = _descend(params, C.from_layers(problem.model, layers), traced["lr"])
        return new, state._replace(step=state.step + 1), {"loss": value, "grad_norm": grad_norm}

    return step


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
    (`samples` S per example, key = fold_in(key(seed), step)).
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

    def init(params):
        # Zeros of the factors' shapes, so that the state is a fixed pytree from the start; step 0
        # overwrites them with the first batch's factors and refreshes the inverses.
        layers = C.to_layers(problem.model, params)
        square = lambda size, like: jnp.zeros_like(like, shape=(size, size))  # placed like the parameters
        A = {k: square(w.shape[1], w) for k, w in layers.items()}
        G = {k: square(w.shape[0], w) for k, w in layers.items()}
        return KFACState(0, A, G, A, G, _counter(params))

    compiled_step = _with_own_hyperparameters(_shared(_kfac_step, problem, _compiled(h)), h, "lr", "damping", "seed")

    def step(params, state, batch):
        count = int(state.step)  # (a Python int again where a caller moved the state to a device)
        refresh = count % h.kfac_update_period == 0
        new, state, info = compiled_step(params, state._replace(step=None), batch, refresh=refresh)
        return new, state._replace(step=count + 1), info

    return functional_optimizer(init, step, h, KFACState)


def _kfac_step(problem: Problem, h: hp.KFAC):
    curvature = Curvature(h.fisher.value)

    @functools.partial(jax.jit, static_argnames="refresh")
    def compiled_step(params, state, batch, traced, refresh: bool):
        key = mc_sampler(traced["seed"], state.device_step) if curvature == Curvature.MC else None
        value, grad, factor = C.gradient_and_curvature(problem, params, batch, curvature, h.samples, key,
                                                       coordinates=False)
        batch_factors = C.kronecker(factor)
        first = state.device_step == 0
        ema = lambda old, new: h.kfac_ema * old + (1 - h.kfac_ema) * new
        mix = lambda old, new: {k: jnp.where(first, new[k], ema(old[k], new[k])) for k in old}
        factors = C.KroneckerCurvature(problem.model, mix(state.A, batch_factors.A), mix(state.G, batch_factors.G),
                                       batch_factors.shift)

        if refresh:
            inverse = factors.inverse(traced["damping"])
        else:
            inverse = C.KroneckerCurvature(problem.model, state.A_inv, state.G_inv)
        direction = C.from_layers(problem.model, inverse.multiply_layers(grad))
        new = _descend(params, direction, traced["lr"])
        info = {"loss": value, "grad_norm": C.total_norm(grad.values())}
        state = KFACState(None, factors.A, factors.G, inverse.A, inverse.G, state.device_step + 1)
        return new, state, info

    return compiled_step
