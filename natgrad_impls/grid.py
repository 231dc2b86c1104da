"""Kunstner grids (DESIGN 4, 7) as one vectorised computation, not a loop of runs.

    result = grid.run_grid("breastcancer", ["sgd", "ngd", "ef"])      # the paper's grid
    result.frame                    # long format, one row per run per recorded step
    result.best                     # each optimizer's best run, with its chaos check

A full-batch convex task is a linear model f = Z theta (Z = the inputs, with a column of ones when
the layer has a bias) with a gaussian or bernoulli likelihood, so everything a step needs has a
closed form that batches over runs: for B runs stacked as Theta (B x D),

    F = Theta Z^T (B x N),  r = mean(F) - y,  G = r Z / N + l2 Theta,
    C_b = sum_n w_bn z_n z_n^T / N  =  W (P / N),   P_n = the upper triangle of z_n z_n^T,

with w = r^2 (EF) or the output-space Fisher (c(1-c), or 1 for the gaussian; or its MC estimate
from the same label draws the framework's `ngd` makes: the draws depend only on (seed, step), so one
draw serves every run). Forming every run's C is one matrix product of B x N by N x D(D+1)/2, the
floating-point floor of about N D^2 flops per run and step; the solves are batched. sgd and adam
are lr grids, ef, ngd and kfac lr x damping grids.

The computation is written once against an array namespace (`numpy`, `torch`, `jax.numpy`; see
`_Backend`), so a float64 grid in any framework reproduces the framework's own `natgrad run` to
round-off on runs that are not chaotic. Runs go through in chunks (cache-sized on numpy, spread over
the CPU cores in threads); a run that diverges (loss > 100 x its first loss or NaN/inf, as after a
failed solve) is recorded up to that step and masked out of the rest of the computation. On numpy and
torch a run whose Fisher weights are bitwise those of its previous step reuses that step's matrix
(the product would give the same matrix): exactly the same numbers, less work. The chaos repeats
and the whole grid are float64 by default; `dtype` float32 runs the same computation in float32.

Rows are those of `natgrad run` (steps 0..steps, loss and grad_norm at theta_k, diverged on every
row of a diverged run), except time_s: the run's share of the batched computation's wall-clock
(each chunk-step's time divided by the runs in it), cumulated like a run's step time.

Chaos (DESIGN 4): each optimizer's best run (lowest last recorded loss) is repeated from
theta0 + 1e-14 * noise (`repeats` draws); it is chaotic when a repeat's last loss differs from the
best run's by more than 1e-8 relative. The repeats are rows of the frame with repeat = 1..R (the grid
itself is repeat 0), `best` marks the best run and its repeats, and `chaotic` is set on their rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from natgrad_impls import models, results
from natgrad_impls.hyperparameters import PAPER_DAMPINGS, PAPER_LRS, bounds_text
from natgrad_impls.names import DType, Device, Fisher, Framework, Likelihood, Optimizer, parse
from natgrad_impls.numpy import reference
from natgrad_impls.runner import (
    accepted, check_seed, checkpoint_path, code_version, diverged, hyperparameter_columns, is_convex,
    make_hyperparameters, ordered_columns, progress_bar, resolve_task, check_setting, task_columns, usable_cores,
)
from natgrad_impls.timing import device_name

CHAOS_NOISE = 1e-14
CHAOS_TOLERANCE = 1e-8
DEFAULT_REPEATS = 5
MAX_ROWS = 2 * 10**7  # an optimizer's grid in memory: 20 paper grids' (9,881 runs x 101 steps), ~4 GB at its peak
PROGRESS_EVERY_S = 30  # a line in a job log this often (a paper grid on a1a takes minutes per optimizer)
WITH_DAMPING = tuple(o for o in Optimizer if "damping" in accepted(o))


def logspace(bounds) -> np.ndarray:
    """np.logspace(start, stop, num) from (start, stop, num) log10 bounds."""
    start, stop, num = bounds
    return np.logspace(float(start), float(stop), int(num))


def check_values(bounds, field: str) -> np.ndarray:
    """The logspace of `bounds`, or a ValueError naming the field where an end leaves float64:
    10**400 is inf and 10**-400 is 0, neither the value asked for (`natgrad run` refuses an lr of inf;
    a damping of 0 it takes, but a grid of log10 values cannot mean it)."""
    with np.errstate(over="ignore", under="ignore"):  # the check below says it in one line
        values = logspace(bounds)
    for exponent, value in ((bounds[0], values[0]), (bounds[1], values[-1])):  # monotone: the ends are the extremes
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{field}: {float(value)!r} (10**{float(exponent):g}) must be a finite number > 0")
    return values


def check_size(optimizers, lrs, dampings, steps: int) -> None:
    """A ValueError naming lrs (and dampings) where an optimizer's grid would record more than
    MAX_ROWS rows (about 200 bytes each at its peak): it is computed and held in memory at once,
    and a mistyped NUM would otherwise end in a MemoryError or the kernel's kill, minutes later."""
    for optimizer in optimizers:
        damped = optimizer in WITH_DAMPING
        rows = int(lrs[2]) * (int(dampings[2]) if damped else 1) * (steps + 1)
        if rows > MAX_ROWS:
            fields = "lrs x dampings" if damped else "lrs"
            raise ValueError(f"{fields}: {optimizer.value}'s grid would record {rows:,} rows ({fields} x (steps + 1)), "
                             f"more than the {MAX_ROWS:,} one grid holds in memory: fewer values or steps")


def check_bounds(optimizers, lrs, dampings, steps: int):
    """lrs and dampings ('START:STOP:NUM' or (start, stop, num)) as bounds tuples and their
    logspaces, a ValueError naming the field where they do not parse, would make a grid too large
    to hold (`check_size`, first: before a logspace is allocated) or leave float64 (`check_values`)."""
    lrs = parse_bounds(lrs, "lrs") if isinstance(lrs, str) else tuple(lrs)
    dampings = parse_bounds(dampings, "dampings") if isinstance(dampings, str) else tuple(dampings)
    check_size(optimizers, lrs, dampings, steps)
    return lrs, dampings, check_values(lrs, "lrs"), check_values(dampings, "dampings")


def parse_bounds(text: str, field: str) -> tuple[float, float, int]:
    """'START:STOP:NUM' (log10 bounds) as a tuple, or a ValueError naming the field."""
    parts = str(text).split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
        if not (math.isfinite(start) and math.isfinite(stop)) or num < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{field}: {text!r} must be START:STOP:NUM (log10 bounds, NUM an integer >= 1), "
                         f"e.g. {bounds_text(PAPER_LRS if field == 'lrs' else PAPER_DAMPINGS)}") from None
    return start, stop, num


# -- array namespaces ----------------------------------------------------------------------------------

class _Backend:
    """What the batched computation needs beyond the operators the three array modules share
    (`@`, arithmetic, exp, log1p, abs, sqrt, isfinite, where, clip, mean/sum over the last axis)."""

    name: str
    xp = None
    compact_below = 1.0  # compact the chunk when fewer than this fraction of its rows are active
    reuse = False  # skip forming a run's matrix when its weights did not change (needs row scatter)
    workers = 1
    chunk = 4096

    def asarray(self, a):
        raise NotImplementedError

    def numpy(self, a) -> np.ndarray:
        raise NotImplementedError

    def sync(self, a):
        pass


class _NumpyBackend(_Backend):
    name = "numpy"
    xp = np
    reuse = True

    def __init__(self, device, dtype):
        cores = int(os.environ.get("OMP_NUM_THREADS", usable_cores()))  # a pipeline job's share of the machine
        self.workers = max(1, min(8, cores))  # chunks in parallel threads, BLAS single-threaded in each

    def asarray(self, a):
        return np.asarray(a, dtype=np.float64)

    def index(self, a):
        return a

    def cast(self, mask):
        return mask.astype(np.float64)

    def relu(self, a):
        return np.maximum(a, 0.0)

    def take_columns(self, a, index):
        return np.take(a, index, axis=1)

    def numpy(self, a):
        return a

    def eye(self, d):
        return np.eye(d)

    def damped_solve(self, matrices, shifts, b):
        """(matrices + shifts I)^-1 b per run, NaN for a singular one, as the numpy reference's
        `solve`. `matrices` has one matrix per run, or one shared by all."""
        A = np.array(matrices, copy=True) if matrices.shape[0] == len(shifts) else np.repeat(matrices, len(shifts), 0)
        d = A.shape[-1]
        A.reshape(len(A), d * d)[:, :: d + 1] += shifts[:, None]  # the diagonal, in place in the copy
        try:
            return np.linalg.solve(A, b[..., None])[..., 0]
        except np.linalg.LinAlgError:  # one singular matrix fails the whole call: run by run
            return np.stack([reference.solve(a, v) for a, v in zip(A, b)])

    def damped_inverse(self, A, shifts):
        """inv(A + s I) per run, NaN for a singular one, as numpy's kfac does."""
        M = A + shifts[:, None, None] * np.eye(A.shape[-1])
        try:
            return np.linalg.inv(M)
        except np.linalg.LinAlgError:
            return np.stack([reference.inverse(m) for m in M])

    def draws(self, kind, seed, step, samples, n):
        rng = models.random_stream(seed, "labels", step)  # natgrad_impls.numpy's sampler
        return rng.random((samples, n)) if kind == "uniform" else rng.standard_normal((samples, n))


class _TorchBackend(_Backend):
    name = "torch"
    reuse = True

    def __init__(self, device, dtype):
        import torch

        from natgrad_impls.torch import optimizers

        self.xp = torch
        self._mc_sampler = optimizers.mc_sampler
        self.device = torch.device(device.value)
        self.dtype = getattr(torch, dtype.value)
        self.cuda = device == Device.CUDA
        self.chunk = 16384 if self.cuda else 2048

    def asarray(self, a):
        return self.xp.as_tensor(np.asarray(a), dtype=self.dtype, device=self.device)

    def index(self, a):
        return self.xp.as_tensor(a, device=self.device)

    def cast(self, mask):
        return mask.to(self.dtype)

    def relu(self, a):
        return self.xp.relu(a)

    def take_columns(self, a, index):
        return a[:, index]

    def numpy(self, a):
        return a.detach().cpu().numpy()

    def sync(self, a):
        if self.cuda:
            self.xp.cuda.synchronize()

    def eye(self, d):
        return self.xp.eye(d, dtype=self.dtype, device=self.device)

    def damped_solve(self, matrices, shifts, b):
        """(matrices + shifts I)^-1 b per run, NaN for a singular one (the status stays on the
        device: reading it back would wait for the device every step)."""
        x, info = self.xp.linalg.solve_ex(matrices + shifts[:, None, None] * self.eye(matrices.shape[-1]), b[..., None])
        return x[..., 0].masked_fill_((info != 0)[:, None], self.xp.nan)

    def damped_inverse(self, A, shifts):
        """cholesky_inverse(cholesky(A + s I)) per run, NaN for a failed one, as torch's kfac does."""
        torch = self.xp
        L, info = torch.linalg.cholesky_ex(A + shifts[:, None, None] * self.eye(A.shape[-1]))
        return torch.cholesky_inverse(L).masked_fill_((info != 0)[:, None, None], torch.nan)

    def draws(self, kind, seed, step, samples, n):
        """torch.rand/randn of shape (samples, N, 1) from torch's kfac/ngd generator for (seed, step)."""
        generator = self._mc_sampler(seed, step, self.device)
        draw = self.xp.rand if kind == "uniform" else self.xp.randn
        return draw((samples, n, 1), generator=generator, dtype=self.dtype, device=self.device)[..., 0]


class _JaxBackend(_Backend):
    name = "jax"
    compact_below = 0.5  # every new shape recompiles: compact geometrically, mask in between

    def __init__(self, device, dtype):
        import jax
        import jax.numpy as jnp

        import natgrad_impls.jax  # noqa: F401  (enables float64)
        from natgrad_impls.jax import curvature, model, optimizers

        self.jax, self.xp = jax, jnp
        self._mc_sampler, self._flat_draw = optimizers.mc_sampler, model.flat_draw
        self._inverse = jax.jit(jax.vmap(curvature._damped_inverse, in_axes=(None, 0)))
        self._solve = jax.jit(self._damped_solve)
        self.device = model.jax_device(device)
        self.dtype = getattr(jnp, dtype.value)

    def asarray(self, a):
        return self.jax.device_put(self.xp.asarray(np.asarray(a), dtype=self.dtype), self.device)

    def index(self, a):
        return self.jax.device_put(self.xp.asarray(a), self.device)

    def cast(self, mask):
        return mask.astype(self.dtype)

    def relu(self, a):
        return self.xp.maximum(a, 0.0)

    def take_columns(self, a, index):
        return a[:, index]

    def numpy(self, a):
        return np.asarray(a)

    def sync(self, a):
        self.jax.block_until_ready(a)

    def eye(self, d):
        return self.xp.eye(d, dtype=self.dtype)

    def damped_solve(self, matrices, shifts, b):
        return self._solve(matrices, shifts, b)  # failures are NaNs, as in jax's own steps

    def damped_inverse(self, A, shifts):
        return self._inverse(A, shifts)

    def _damped_solve(self, matrices, shifts, b):
        """(matrices + shifts I)^-1 b per run, in one compiled call (eager, the shift alone took a
        tenth of an ef grid)."""
        A = matrices + shifts[:, None, None] * self.xp.eye(matrices.shape[-1], dtype=matrices.dtype)
        return self.xp.linalg.solve(A, b[..., None])[..., 0]

    def draws(self, kind, seed, step, samples, n):
        """jax.random.uniform/normal of shape (samples, N, 1) from the jax optimizers' key for (seed, step)."""
        key = self._mc_sampler(seed, self.xp.asarray(step, self.xp.int32))
        draw = self.jax.random.uniform if kind == "uniform" else self.jax.random.normal
        return self._flat_draw(draw, key, (samples, n, 1), self.dtype)[..., 0]


_BACKENDS = {Framework.NUMPY: _NumpyBackend, Framework.TORCH: _TorchBackend, Framework.JAX: _JaxBackend}


# -- the linear model, batched over runs -------------------------------------------------------------

class _Linear:
    """Closed forms of a one-output linear model, for B parameter vectors at once."""

    def __init__(self, be, problem, x, y):
        xp = be.xp
        z = np.asarray(x, dtype=np.float64)
        if problem.model.layers[0].bias:
            z = np.hstack([z, np.ones((len(z), 1))])
        self.be, self.problem = be, problem
        self.n, self.d = z.shape
        self.bernoulli = problem.likelihood == Likelihood.BERNOULLI
        self.clip = problem.logit_clip if self.bernoulli else None
        self.l2 = float(problem.l2)
        self.Z = be.asarray(z)
        self.ZT = be.asarray(np.ascontiguousarray(z.T))
        labels = np.asarray(y, dtype=np.float64).reshape(1, -1)
        self.y = be.asarray(labels)
        binary = self.bernoulli and np.all((labels == 0) | (labels == 1))
        self.sign = be.asarray(1 - 2 * labels) if binary else None
        upper_i, upper_j = np.triu_indices(self.d)
        self.P = be.asarray(z[:, upper_i] * z[:, upper_j] / self.n)  # N x D(D+1)/2, 1/N folded in
        unpack = np.zeros((self.d, self.d), dtype=np.int64)
        unpack[upper_i, upper_j] = unpack[upper_j, upper_i] = np.arange(len(upper_i))
        self.unpack = be.index(unpack.reshape(-1))
        self.eye = be.eye(self.d)
        if be.name == "jax":  # one compilation per chunk shape instead of one per operation
            self.forward, self.form = be.jax.jit(self.forward), be.jax.jit(self.form)
        self.gram = self.form(be.asarray(np.ones((1, self.n))))[0]  # Z^T Z / N: the gaussian Fisher, K-FAC's A

    def forward(self, theta):
        """loss (B), gradient (B x D), residual r = mean - y (B x N) and the predictive mean c
        (B x N; None for the gaussian, whose mean is f) at every run's theta."""
        xp, be = self.be.xp, self.be
        f = theta @ self.ZT
        if self.bernoulli:
            if self.clip is not None:  # straight-through: the clipped logits are used everywhere
                f = xp.clip(f, -self.clip, self.clip)
            e = xp.exp(-xp.abs(f))
            # softplus(f) - y f = log1p(e) + relu(f) - y f; for labels in {0, 1}, relu(f) - y f is
            # exactly relu(s f) with s = 1 - 2y (one pass less, the same numbers)
            nll = xp.log1p(e) + (be.relu(self.sign * f) if self.sign is not None else be.relu(f) - self.y * f)
            c = xp.where(f >= 0, 1.0, e) / (1 + e)
            r = c - self.y
        else:
            r = f - self.y
            nll = 0.5 * r * r
            c = None
        loss = nll.mean(-1)
        grad = (r @ self.Z) / self.n
        if self.l2:
            loss = loss + 0.5 * self.l2 * (theta * theta).sum(-1)
            grad = grad + self.l2 * theta
        return loss, grad, r, c

    @staticmethod
    def fisher_weight(c):
        """The output-space Fisher c (1 - c) of the bernoulli; None (= 1) for the gaussian."""
        return None if c is None else c * (1 - c)

    def form(self, w):
        """sum_n w_bn z_n z_n^T / N for every row of w (B x N): one product with P."""
        packed = w @ self.P
        return self.be.take_columns(packed, self.unpack).reshape(packed.shape[0], self.d, self.d)

    def sampled_weights(self, c, draws):
        """The MC Fisher weight (1/S) sum_s r_s^2 at labels drawn from the model, from the shared
        draws (S x N): uniforms for bernoulli (y = u < c), normals for gaussian (r = -noise)."""
        if c is None:
            return (draws * draws).mean(0)[None, :]
        r = c[:, None, :] - self.be.cast(draws[None] < c[:, None, :])
        return (r * r).mean(1)


# -- optimizers as batched updates -------------------------------------------------------------------

class _Method:
    """State and update of one optimizer over a chunk of runs. `state` is a dict of per-run arrays
    (leading axis = run) and shared arrays; `per_run` names the per-run ones (for compaction)."""

    per_run: tuple[str, ...] = ()

    def __init__(self, model, be, h, lr, damping, seed):
        self.model, self.be, self.h, self.seed = model, be, h, seed
        self.lr = lr[:, None]

    def init(self, theta):
        return {}

    def update(self, k, theta, state, grad, r, c):
        """(new theta, new state) from the forward pass's gradient, residual r and predictive mean c
        at theta (a failed solve gives a NaN theta, whose loss diverges at the next step)."""
        raise NotImplementedError

    def select(self, state, keep):
        """The state (and per-run settings) of the runs in `keep` (compaction)."""
        self.lr = self.lr[keep]
        return {name: (value[keep] if name in self.per_run and value is not None else value) for name, value in state.items()}


class _SGD(_Method):
    per_run = ("buffer",)

    def init(self, theta):
        return {"buffer": theta * 0 if self.h.momentum else None}

    def update(self, k, theta, state, grad, r, c):
        if self.h.momentum:
            buffer = self.h.momentum * state["buffer"] + grad
            return theta - self.lr * buffer, {"buffer": buffer}
        return theta - self.lr * grad, state


class _Adam(_Method):
    per_run = ("m", "v")

    def init(self, theta):
        return {"m": theta * 0, "v": theta * 0}

    def update(self, k, theta, state, grad, r, c):
        h, xp = self.h, self.be.xp
        m = h.b1 * state["m"] + (1 - h.b1) * grad
        v = h.b2 * state["v"] + (1 - h.b2) * grad * grad
        t = k + 1
        c1, c2 = 1 - h.b1**t, 1 - h.b2**t  # in float64, as torch's Python floats and the jax code
        return theta - self.lr * (m / c1) / (xp.sqrt(v / c2) + h.eps), {"m": m, "v": v}


class _NaturalGradient(_Method):
    """ef (w = r^2, shift = damping) and ngd (w = the Fisher weight, shift = l2 + damping)."""

    per_run = ("weights", "matrix")

    def __init__(self, model, be, h, lr, damping, seed, empirical):
        super().__init__(model, be, h, lr, damping, seed)
        self.empirical = empirical
        self.shift = damping if empirical else model.l2 + damping

    def init(self, theta):
        return {"weights": None, "matrix": None}

    def select(self, state, keep):
        self.shift = self.shift[keep]
        return super().select(state, keep)

    def _weights(self, k, r, c):
        model, h = self.model, self.h
        if self.empirical:
            return r * r
        if h.fisher == Fisher.MC:
            kind = "uniform" if model.bernoulli else "normal"
            return model.sampled_weights(c, self.be.draws(kind, h.seed, k, h.samples, model.n))
        return model.fisher_weight(c)  # None for the gaussian: the Fisher is Z^T Z / N

    def update(self, k, theta, state, grad, r, c):
        model, be = self.model, self.be
        w = self._weights(k, r, c)
        previous = state["weights"]
        if w is None:
            matrix = model.gram[None]
        elif w.shape[0] == 1:  # the same weights for every run (gaussian mc)
            matrix = model.form(w)
        elif be.reuse and previous is not None:
            changed = be.numpy((w != previous).any(-1))
            if changed.all():
                matrix = model.form(w)
            elif not changed.any():
                matrix = state["matrix"]
            else:  # the previous matrices belong to this state alone: update them in place
                matrix = state["matrix"]
                matrix[changed] = model.form(w[changed])
        else:
            matrix = model.form(w)
        keep_w = w if (be.reuse and w is not None and w.shape[0] > 1) else None
        direction = be.damped_solve(matrix, self.shift, grad)
        return theta - self.lr * direction, {"weights": keep_w, "matrix": matrix if keep_w is not None else None}


class _KFAC(_Method):
    """K-FAC for one output: A = Z^T Z / N (shared), G = the mean Fisher weight (per run), moving
    averages, damped inverses refreshed every kfac_update_period steps with factored Tikhonov
    damping as in the frameworks' kfac: (A + pi sqrt(lambda) I)^-1, (G + sqrt(lambda)/pi)^-1,
    pi = sqrt((tr A / dim A) / G), lambda = damping + l2; both I / sqrt(lambda) where G is 0 (every
    logit saturated)."""

    per_run = ("G", "A_inv", "G_inv")

    def __init__(self, model, be, h, lr, damping, seed):
        super().__init__(model, be, h, lr, damping, seed)
        self.root = (damping + model.l2) ** 0.5

    def init(self, theta):
        return {"A": None, "G": None, "A_inv": None, "G_inv": None}

    def select(self, state, keep):
        self.root = self.root[keep]
        return super().select(state, keep)

    def update(self, k, theta, state, grad, r, c):
        model, be, h, xp = self.model, self.be, self.h, self.be.xp
        if h.fisher == Fisher.MC:
            kind = "uniform" if model.bernoulli else "normal"
            w = model.sampled_weights(c, be.draws(kind, h.seed, k, h.samples, model.n))
        else:
            w = model.fisher_weight(c)
        G_batch = w.mean(-1) if w is not None else theta[:, 0] * 0 + 1.0
        if G_batch.shape[0] != theta.shape[0]:
            G_batch = G_batch + theta[:, 0] * 0
        if k == 0:
            A, G = model.gram, G_batch
        else:
            A = h.kfac_ema * state["A"] + (1 - h.kfac_ema) * model.gram
            G = h.kfac_ema * state["G"] + (1 - h.kfac_ema) * G_batch
        A_inv, G_inv = state["A_inv"], state["G_inv"]
        if k % h.kfac_update_period == 0:  # the frameworks' factored Tikhonov, their zero case too
            a = A.diagonal().mean()
            live = (a > 0) & (G > 0)
            pi = xp.sqrt(xp.where(live, a, 1.0)) / xp.sqrt(xp.where(live, G, 1.0))  # (a / G overflows where G is tiny)
            live = live & xp.isfinite(pi) & (pi > 0)
            pi = xp.where(live, pi, 1.0)
            A_inv = be.damped_inverse(A, self.root * pi)  # (A is every run's: dead runs' set below)
            A_inv = xp.where(live[:, None, None], A_inv, be.eye(A.shape[-1]) / self.root[:, None, None])
            G_inv = 1 / (G * live + self.root / pi)
        direction = G_inv[:, None] * (A_inv @ grad[..., None])[..., 0]
        return theta - self.lr * direction, {"A": A, "G": G, "A_inv": A_inv, "G_inv": G_inv}


# Each optimizer's batched update, by name: one the table lacks is refused by `validate` (a fallback
# would run another optimizer's update under its name).
METHODS = {
    Optimizer.SGD: _SGD,
    Optimizer.ADAM: _Adam,
    Optimizer.EF: functools.partial(_NaturalGradient, empirical=True),
    Optimizer.NGD: functools.partial(_NaturalGradient, empirical=False),
    Optimizer.KFAC: _KFAC,
}


def _method(optimizer, model, be, h, lr, damping, seed):
    return METHODS[optimizer](model, be, h, lr, damping, seed)


# -- trajectories --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Trajectories:
    """B runs: loss, grad_norm and time_s (B x steps+1, NaN after a run's last step), last (the
    last recorded step), diverged."""

    loss: np.ndarray
    grad_norm: np.ndarray
    time_s: np.ndarray
    last: np.ndarray
    diverged: np.ndarray

    @property
    def final(self) -> np.ndarray:
        """Each run's last recorded loss."""
        return self.loss[np.arange(len(self.last)), self.last]


def _chunk(model, be, optimizer, h, lr, damping, theta0, steps, seed) -> Trajectories:
    """Every run of one chunk through `steps` steps (plus the final evaluation)."""
    xp = be.xp
    count = len(lr)
    out = Trajectories(np.full((count, steps + 1), np.nan), np.full((count, steps + 1), np.nan),
                       np.zeros((count, steps + 1)), np.full(count, steps), np.zeros(count, bool))
    rows = np.arange(count)  # chunk row -> run
    active = np.ones(count, bool)  # rows still running (the others are masked until compaction)
    elapsed = np.zeros(count)
    theta = be.asarray(theta0)
    method = _method(optimizer, model, be, h, be.asarray(lr), be.asarray(damping), seed)
    state = method.init(theta)
    initial = None
    for k in range(steps + 1):
        start = time.perf_counter()
        loss, grad, r, c = model.forward(theta)
        norm = xp.sqrt((grad * grad).sum(-1))
        values, norms = be.numpy(loss), be.numpy(norm)
        took = time.perf_counter() - start
        if initial is None:
            initial = values.copy()
        live = rows[active]
        out.loss[live, k] = values[active]
        out.grad_norm[live, k] = norms[active]
        out.time_s[live, k] = elapsed[live]
        bad = active & diverged(values, initial)
        if bad.any():
            out.last[rows[bad]], out.diverged[rows[bad]] = k, True
            active &= ~bad
        if k == steps or not active.any():
            break
        start = time.perf_counter()
        theta, state = method.update(k, theta, state, grad, r, c)
        be.sync(theta)
        took += time.perf_counter() - start
        elapsed[rows[active]] += took / active.sum()
        if not active.all() and active.sum() < be.compact_below * len(active):
            state = method.select(state, active)
            theta, rows, initial = theta[active], rows[active], initial[active]
            active = active[active]
        elif not active.all() and be.name == "jax":
            # masked rows restart from theta0 so that their (ignored) numbers stay finite
            keep = xp.asarray(active)[:, None]
            theta = xp.where(keep, theta, be.asarray(theta0[rows]))
    return out


def trajectories(problem, x, y, optimizer, h, lr, damping, steps, framework="numpy", device="cpu", dtype="float64",
                 theta0=None, seed=0, progress=None, desc="") -> Trajectories:
    """B = len(lr) runs of `optimizer` (hyperparameters `h`, lr and damping per run; damping NaN
    for sgd/adam) on the full batch (x, y), from theta0 (B x D, default zeros), batched."""
    optimizer = parse(Optimizer, optimizer, "optimizer")
    framework = parse(Framework, framework, "framework")
    be = _BACKENDS[framework](parse(Device, device, "device"), parse(DType, dtype, "dtype"))
    lr = np.asarray(lr, dtype=np.float64)
    damping = np.nan_to_num(np.asarray(damping, dtype=np.float64), nan=0.0)
    model = _Linear(be, problem, x, y)
    if theta0 is None:
        theta0 = np.zeros((len(lr), model.d))
    chunk = be.chunk
    if be.name == "numpy":  # keep the B x N temporaries of a chunk in cache
        chunk = int(np.clip(2**18 // model.n, 64, 2048))
    starts = list(range(0, len(lr), chunk))
    parts: list[Trajectories | None] = [None] * len(starts)
    bar = progress_bar(len(lr), desc, progress, log_every_s=PROGRESS_EVERY_S)
    lock = threading.Lock()

    def work(index):
        s = slice(starts[index], starts[index] + chunk)
        with np.errstate(all="ignore"):  # overflow in runs that are diverging is expected
            parts[index] = _chunk(model, be, optimizer, h, lr[s], damping[s], theta0[s], steps, seed)
        with lock:
            bar.update(len(lr[s]))

    if be.name != "numpy":
        for index in range(len(starts)):
            work(index)
    else:  # chunks in parallel threads, BLAS on one thread each (also best for small products)
        with _single_threaded_blas(), ThreadPoolExecutor(min(be.workers, len(starts))) as pool:
            list(pool.map(work, range(len(starts))))
    bar.close()
    return Trajectories(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Trajectories)))


def _single_threaded_blas():
    """BLAS on one thread while the chunks run in parallel threads (no oversubscription)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


# -- the grid --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Best:
    """An optimizer's best run and its chaos check."""

    optimizer: str
    lr: float
    damping: float
    loss: float  # last recorded loss
    step: int  # its step
    diverged: bool
    repeats: np.ndarray  # last losses of the runs from theta0 + 1e-14 noise
    chaotic: bool
    spread: float  # (max - min) / |loss| over the best run and its repeats

    def describe(self) -> str:
        hps = f"lr={self.lr:.3g}" + ("" if math.isnan(self.damping) else f" damping={self.damping:.3g}")
        what = f"{self.optimizer:5s} best {hps:28s} loss {self.loss:.6g} at step {self.step}"
        if self.diverged:
            what += " (diverged: every run did)"
        if len(self.repeats) == 0:
            return what
        if self.chaotic:
            low, high = np.nanmin(np.append(self.repeats, self.loss)), np.nanmax(np.append(self.repeats, self.loss))
            # enough digits to tell the ends apart (6 where the spread is 0, NaN or inf: a repeat that overflowed)
            finite = math.isfinite(self.spread) and self.spread > 0
            digits = max(6, min(17, 2 - math.floor(math.log10(self.spread)))) if finite else 6
            return (f"{what}  CHAOTIC: {len(self.repeats)} repeats from theta0 + 1e-14 noise end between "
                    f"{low:.{digits}g} and {high:.{digits}g} (spread {self.spread:.2g} relative)")
        return f"{what}  not chaotic ({len(self.repeats)} repeats from theta0 + 1e-14 noise: spread {self.spread:.2g} relative)"


@dataclasses.dataclass
class GridResult:
    frame: pd.DataFrame
    best: list[Best]
    seconds: float  # wall-clock of the computation (not of writing the frame)
    runs: int  # grid runs (repeats not counted)
    resumed: tuple = ()  # the optimizers read back from `checkpoints` (an interrupted run's), not computed


def check_grid_task(task) -> None:
    if not (is_convex(task) and task.batch_size is None):
        from natgrad_impls.tasks import TASKS

        allowed = [name for name, t in TASKS.items() if is_convex(t) and t.batch_size is None]
        raise ValueError(f"task: {task.name!r} is not a full-batch convex task (one of {', '.join(allowed)})")


def validate(task, optimizers, framework="numpy", device="cpu", dtype="float64", lrs=PAPER_LRS, dampings=PAPER_DAMPINGS,
             steps=None, repeats=DEFAULT_REPEATS, variant=None, hyperparameters=None, logit_clip=None, seed=0):
    """Parse and check a grid before any work (ValueError naming the field and the allowed values)."""
    if isinstance(optimizers, str):
        optimizers = [o for o in optimizers.split(",") if o]
    if not optimizers:
        raise ValueError(f"optimizers: none given (a comma-separated list of {', '.join(o.value for o in Optimizer)})")
    optimizers = [parse(Optimizer, o, "optimizers") for o in optimizers]
    missing = [o.value for o in optimizers if o not in METHODS]
    if missing:
        raise ValueError(f"optimizers: {missing[0]!r} has no batched update in natgrad_impls.grid.METHODS "
                         f"(the grid runs {', '.join(o.value for o in METHODS)})")
    twice = [o.value for i, o in enumerate(optimizers) if o in optimizers[:i]]
    if twice:  # the grid would run twice and mark two best runs
        raise ValueError(f"optimizers: {twice[0]!r} is given twice (each optimizer once)")
    framework = parse(Framework, framework, "framework")
    device = parse(Device, device, "device")
    dtype = parse(DType, dtype, "dtype")
    task = resolve_task(task, variant, logit_clip)
    check_grid_task(task)
    check_setting(task, framework, device, dtype)
    steps = task.steps if steps is None else int(steps)
    if steps < 0:
        raise ValueError(f"steps: {steps!r} must be an integer >= 0")
    lrs, dampings, lr_values, damping_values = check_bounds(optimizers, lrs, dampings, steps)
    lr_ends, damping_ends = (values[[0, -1]].tolist() for values in (lr_values, damping_values))
    if int(repeats) < 0:
        raise ValueError(f"repeats: {repeats!r} must be an integer >= 0")
    check_seed(seed)
    extra = dict(hyperparameters or {})
    for name in extra:
        if not any(name in accepted(o) for o in optimizers):
            theirs = sorted({f for o in optimizers for f in accepted(o)} - {"lr", "damping", "seed"})
            said = f"theirs beside lr and damping: {', '.join(theirs)}" if theirs else "lr and damping alone"
            raise ValueError(f"{name}: not a hyperparameter of {', '.join(o.value for o in optimizers)} ({said})")
    for optimizer in optimizers:  # with the grid's own extremes, as `natgrad run` would check each run
        own = {k: v for k, v in extra.items() if k in accepted(optimizer)}
        for lr in lr_ends:
            for damping in damping_ends if optimizer in WITH_DAMPING else [None]:  # None: no damping
                make_hyperparameters(optimizer, {**own, "lr": lr, "damping": damping})
    return task, optimizers, framework, device, dtype, lrs, dampings, steps


def run_grid(task, optimizers=("sgd", "ngd", "ef"), framework="numpy", device="cpu", dtype="float64", lrs=PAPER_LRS,
             dampings=PAPER_DAMPINGS, steps=None, seed=0, repeats=DEFAULT_REPEATS, variant=None, hyperparameters=None,
             progress=None, on_done=None, logit_clip=None, checkpoints=None) -> GridResult:
    """The lr (x damping) grid of each optimizer on a full-batch convex task, batched (module docstring).

    lrs, dampings: (start, stop, num) log10 bounds or 'START:STOP:NUM'; hyperparameters: the
    optimizers' other hyperparameters (e.g. fisher, kfac_update_period), given to those that have them;
    logit_clip: paper or none for a Bernoulli task (default: the task's own, paper on the Kunstner tasks);
    on_done(optimizer, best, seconds): called as each optimizer's grid and repeats are done, with its
    Best (None where no run stayed finite) and the seconds since the start (the CLI's progress in a
    job log, where no bar is drawn); checkpoints: a folder that keeps each optimizer's finished grid,
    so that a grid stopped part way (a paper grid on a1a takes minutes per optimizer) starts again at
    its next optimizer (as `runner.run_many`; the caller removes the folder).
    """
    task, optimizers, framework, device, dtype, lr_bounds, damping_bounds, steps = validate(
        task, optimizers, framework, device, dtype, lrs, dampings, steps, repeats, variant, hyperparameters, logit_clip,
        seed)
    start = time.perf_counter()
    data = task.load(seed)
    frames, bests, resumed = [], [], []
    lr_values, damping_values = logspace(lr_bounds), logspace(damping_bounds)
    noise = CHAOS_NOISE * models.random_stream(seed, "chaos").standard_normal((int(repeats),
                                                                               task.problem.model.num_params()))
    extra = dict(hyperparameters or {})
    machine = None if checkpoints is None else device_name(device, framework)
    for optimizer in optimizers:
        own = {k: v for k, v in extra.items() if k in accepted(optimizer)}
        kept = None if checkpoints is None else checkpoint_path(
            checkpoints, task.name, task_columns(task), optimizer, framework, device, dtype, lr_bounds, damping_bounds,
            steps, seed, len(noise), own, machine, code_version())
        if kept is not None and kept.exists():
            frame, best = _read_kept(kept)
            resumed.append(optimizer)
        else:
            frame, best = _optimizer_grid(task, data.train, optimizer, own, framework, device, dtype, seed, lr_values,
                                          damping_values, steps, noise, progress)
            if kept is not None:
                _keep(kept, frame, best)
        frames.append(frame)
        bests += [best] if best is not None else []
        if on_done is not None:
            on_done(optimizer, best, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    frame = pd.concat(frames, ignore_index=True)
    runs = sum(len(lr_values) * (len(damping_values) if o in WITH_DAMPING else 1) for o in optimizers)
    return GridResult(frame[ordered_columns(frame.columns)], bests, seconds, runs, tuple(resumed))


def _optimizer_grid(task, train, optimizer, own, framework, device, dtype, seed, lr_values, damping_values, steps,
                    noise, progress) -> tuple[pd.DataFrame, Best | None]:
    """One optimizer's grid and the chaos repeats of its best run: their rows, and the Best."""
    x, y = train
    if optimizer in WITH_DAMPING:
        lr, damping = (a.ravel() for a in np.meshgrid(lr_values, damping_values, indexing="ij"))
    else:
        lr, damping = lr_values, np.full(len(lr_values), np.nan)
    h = make_hyperparameters(optimizer, {**own, "lr": 1.0, **({"damping": 1.0} if optimizer in WITH_DAMPING else {})}, seed)
    common = dict(framework=framework, device=device, dtype=dtype, seed=seed)
    runs = trajectories(task.problem, x, y, optimizer, h, lr, damping, steps, progress=progress,
                        desc=f"{task.name} {optimizer.value}", **common)
    finals = runs.final
    if not np.isfinite(finals).any():
        return _frame(task, optimizer, framework, device, dtype, seed, h, lr, damping, runs, 0, None), None
    b = int(np.nanargmin(np.where(np.isfinite(finals), finals, np.nan)))
    rep = None
    if len(noise):
        rep = trajectories(task.problem, x, y, optimizer, h, np.full(len(noise), lr[b]),
                           np.full(len(noise), damping[b]), steps, theta0=noise, progress=False, **common)
    best = _best(optimizer, lr[b], damping[b], runs, b, rep)
    frames = [_frame(task, optimizer, framework, device, dtype, seed, h, lr, damping, runs, 0, (b, best.chaotic))]
    if rep is not None:
        frames.append(_frame(task, optimizer, framework, device, dtype, seed, h, np.full(len(noise), lr[b]),
                             np.full(len(noise), damping[b]), rep, 1, "all", best.chaotic))
    return pd.concat(frames, ignore_index=True), best


def _keep(path, frame: pd.DataFrame, best: Best | None) -> None:
    """An optimizer's finished grid: its Best beside (JSON, first), then its rows, whose file says
    that both are whole."""
    import json

    fields = None if best is None else {**dataclasses.asdict(best), "repeats": best.repeats.tolist()}
    results.write_text(json.dumps(fields), path.with_suffix(".json"))
    results.write(frame, path)


def _read_kept(path) -> tuple[pd.DataFrame, Best | None]:
    import json

    fields = json.loads(path.with_suffix(".json").read_text())
    best = None if fields is None else Best(**{**fields, "repeats": np.array(fields["repeats"], dtype=float)})
    return results.read(path), best


def _best(optimizer, lr, damping, runs, b, rep) -> Best:
    loss = float(runs.final[b])
    repeats = np.array([]) if rep is None else rep.final
    with np.errstate(invalid="ignore"):
        relative = np.abs(repeats - loss) / abs(loss) if loss else np.abs(repeats - loss)
    chaotic = bool(len(repeats) and (not np.all(np.isfinite(repeats)) or np.any(relative > CHAOS_TOLERANCE)
                                     or np.any(rep.last != runs.last[b])))
    values = np.append(repeats, loss)
    spread = float((np.nanmax(values) - np.nanmin(values)) / abs(loss)) if loss and np.isfinite(values).any() else math.nan
    return Best(optimizer.value, float(lr), float(damping), loss, int(runs.last[b]), bool(runs.diverged[b]), repeats,
                chaotic, spread)


def _frame(task, optimizer, framework, device, dtype, seed, h, lr, damping, runs, repeat, best, chaotic=None):
    """Long format: one row per run and recorded step (vectorised: runs x steps, masked)."""
    count, width = runs.loss.shape
    steps = np.arange(width)
    mask = steps[None, :] <= runs.last[:, None]
    run_of_row = np.repeat(np.arange(count), mask.sum(1))
    columns = {
        "task": task.name, "optimizer": optimizer.value, "framework": framework.value, "device": device.value,
        "dtype": dtype.value, "seed": seed,
        **{k: v for k, v in hyperparameter_columns(optimizer, h).items() if k not in ("lr", "damping")},
        "lr": lr[run_of_row], "damping": damping[run_of_row] if optimizer in WITH_DAMPING else np.nan,
        "step": np.broadcast_to(steps, runs.loss.shape)[mask], "loss": runs.loss[mask], "time_s": runs.time_s[mask],
        "diverged": runs.diverged[run_of_row], "grad_norm": runs.grad_norm[mask],
        "repeat": np.zeros(len(run_of_row), np.int64) if repeat == 0 else (run_of_row + 1),
    }
    is_best = np.zeros(len(run_of_row), bool)
    chaos = pd.arrays.BooleanArray(np.zeros(len(run_of_row), bool), np.ones(len(run_of_row), bool))
    if best == "all":
        is_best[:] = True
        chaos[:] = chaotic
    elif best is not None:
        index, flag = best
        is_best = run_of_row == index
        chaos[is_best] = flag
    columns["best"] = is_best
    columns["chaotic"] = chaos
    named = task_columns(task)
    columns.update(named)
    frame = pd.DataFrame(columns)
    for name in ("task", "optimizer", "framework", "device", "dtype", *named):
        frame[name] = frame[name].astype("category")
    for name in ("lr", "damping"):
        frame[name] = frame[name].astype(np.float64)
    return frame
