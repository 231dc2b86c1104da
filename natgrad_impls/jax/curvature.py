"""Curvature in JAX: empirical Fisher, true Fisher (exact or MC) and K-FAC (DESIGN 4, 5).

A mirror of `natgrad_impls.torch.curvature`, function by function (the torch side also fuses ops by
hand to launch fewer kernels, which XLA does here on its own, and folds s^2 into the Woodbury kernel's
shift to solve in place of the Gram matrix). Every curvature here is built from one
forward pass and one batched backward pass (`linearize`): the parametric layers' inputs a and the
output gradients delta for a stack of output-space cotangents. Layers work on augmented weights
W' = [W | b] (out x in'), so a per-example gradient of a dense layer is delta a^T.

- `FactorCurvature`, C = s^2 U U^T + shift I, U's columns being per-example (pseudo-)gradients:
  EF (cotangent: the residual), exact Fisher (cotangents: the columns of Lambda^1/2), MC Fisher
  (cotangents: residuals at sampled labels). Solves use Woodbury on the M = r N columns, with the
  Gram matrix sum_l (Delta Delta^T) * (A A^T), never a D x D matrix, unless D <= M (dense solve).
  A vector in U's span, as ef's gradient without l2, is solved for by push-through instead
  (`inverse_factor_multiply`; `inverse_column_mean` for ef's gradient and its norm from the same
  Gram matrix); so is the exact Fisher's gradient without l2, U alpha / N with alpha the residuals
  in its root's columns (`multiply_inverse_mean`, which also takes MC's by Woodbury, U^T g from
  the Gram product where that is cheaper).
  `precondition` picks.
- `KroneckerCurvature`, per layer A (x) G (K-FAC, KFC for convolutions).
Both offer multiply, multiply_inverse and to_dense (in `Model.param_names` order) for the tests,
and the same products on layer matrices (`*_layers`), which the optimizers use. They are plain
containers used inside jitted functions; the choices they make (Woodbury or dense, scale, shift)
depend only on shapes and Python floats, so they are static under jit.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve, solve_triangular

from natgrad_impls.hyperparameters import structurally_singular
from natgrad_impls.jax import model as M
from natgrad_impls.models import Conv2d, Model, Problem
from natgrad_impls.names import Curvature


# -- layer matrices: params dict <-> {layer: W' (..., out, in')} <-> flat canonical vector --------

def to_layers(model: Model, params: dict) -> dict[str, jax.Array]:
    """Augmented weights [W | b]; works with leading batch dimensions."""
    layers = {}
    for name, layer in model.parametric():
        w = params[f"{name}.weight"]
        lead = w.shape[: w.ndim - (4 if isinstance(layer, Conv2d) else 2)]
        w = w.reshape(*lead, w.shape[len(lead)], -1)
        layers[name] = jnp.concatenate([w, params[f"{name}.bias"][..., None]], -1) if layer.bias else w
    return layers


def from_layers(model: Model, layers: dict) -> dict[str, jax.Array]:
    params = {}
    shapes = model.param_shapes()
    for name, layer in model.parametric():
        w = layers[name]
        lead = w.shape[:-2]
        if layer.bias:
            params[f"{name}.weight"] = w[..., :-1].reshape(*lead, *shapes[f"{name}.weight"])
            params[f"{name}.bias"] = w[..., -1]
        else:
            params[f"{name}.weight"] = w.reshape(*lead, *shapes[f"{name}.weight"])
    return params


def flatten(model: Model, params: dict) -> jax.Array:
    """Canonical flat vector(s); leading batch dimensions are kept."""
    shapes = model.param_shapes()
    parts = []
    for name, shape in shapes.items():
        p = params[name]
        parts.append(p.reshape(*p.shape[: p.ndim - len(shape)], -1))
    return jnp.concatenate(parts, -1)


def unflatten(model: Model, vector: jax.Array) -> dict[str, jax.Array]:
    params, offset = {}, 0
    for name, shape in model.param_shapes().items():
        size = math.prod(shape)
        params[name] = vector[..., offset : offset + size].reshape(*vector.shape[:-1], *shape)
        offset += size
    return params


# -- one forward, one batched backward --------------------------------------------------------------

def linearize(problem: Problem, params: dict, x: jax.Array):
    """Output f, layer inputs {layer: a}, and pullback(cotangents r x N x k) -> {layer: delta}.

    delta is r x N x out (Dense) or r x N x T x out (Conv2d, T output positions)."""
    model = problem.model
    zeros = _perturbation_zeros(model, x)

    def run(perturbations):
        return M.forward(model, params, x, perturbations)

    f, vjp, inputs = jax.vjp(run, zeros, has_aux=True)

    def pullback(cotangents: jax.Array) -> dict[str, jax.Array]:
        deltas = jax.vmap(vjp)(cotangents)[0]
        return {
            name: (d.reshape(*d.shape[:3], -1).transpose(0, 1, 3, 2) if d.ndim == 5 else d)
            for name, d in deltas.items()
        }

    return f, inputs, pullback


def _perturbation_zeros(model: Model, x: jax.Array) -> dict[str, jax.Array]:
    return {name: jnp.zeros((x.shape[0], *shape), x.dtype) for name, shape in model.output_shapes().items()}


# -- C = s^2 U U^T + shift I ---------------------------------------------------------------------------

@dataclasses.dataclass
class FactorCurvature:
    """C = scale^2 U U^T + shift I; U's M = r N columns are delta_(c,n) a_n^T per layer.

    inputs: {layer: a (N x in' or N x T x in')}; deltas: {layer: delta (r x N x out, r x N x T x out)}.
    """

    model: Model
    inputs: dict
    deltas: dict
    scale: float
    shift: float = 0.0
    # {layer: (1 + r) x N x out}: the data residual's deltas stacked before U's (`deltas` is its
    # [1:]), kept for the true Fisher, whose gradient they give but whose columns they are not
    stacked: dict | None = None
    # the true Fisher's gradient without l2 as g = U c + V w (as in torch): `coefficients` c (r x N),
    # `outside` w (N); None for MC (c = 0, w = 1/N)
    coefficients: jax.Array | None = None
    outside: jax.Array | None = None

    @property
    def num_columns(self) -> int:
        d = next(iter(self.deltas.values()))
        return d.shape[0] * d.shape[1]

    def _solves_densely(self, lam) -> bool:
        """Woodbury needs lam > 0, and pays only while the columns are fewer than the parameters.
        A traced lam is positive: the optimizers pass zero damping as a Python 0.0 (`damped`)."""
        return (not isinstance(lam, jax.Array) and lam == 0) or self.model.num_params() <= self.num_columns

    def _lam(self, damping):
        return damped(damping, self.shift, next(iter(self.deltas.values())).dtype)

    def gram(self, rows: dict | None = None) -> jax.Array:
        """W^T U, W's columns built from the deltas `rows` (e x N x out) like U's from `deltas`; by
        default W = U, U^T U (M x M). Layer by layer: (Delta_W Delta_U^T) * (A A^T) for Dense layers;
        convolutions materialise their per-example gradients (DESIGN 4 allows it)."""
        total = 0
        for name, a in self.inputs.items():
            d = self.deltas[name]
            w = d if rows is None else rows[name]
            r, n, e = d.shape[0], d.shape[1], w.shape[0]
            if a.ndim == 2:
                dd = w.reshape(e * n, -1) @ d.reshape(r * n, -1).T
                total = total + dd * jnp.tile(a @ a.T, (e, r))
            else:
                g = jnp.einsum("cnto,nti->cnoi", d, a).reshape(r * n, -1)
                gw = g if rows is None else jnp.einsum("cnto,nti->cnoi", w, a).reshape(e * n, -1)
                total = total + gw @ g.T
        return total

    def transpose_multiply(self, layers: dict) -> jax.Array:
        """U^T v for v given as layer matrices: r x N."""
        total = 0
        for name, a in self.inputs.items():
            av = a @ layers[name].T  # N (x T) x out
            d = self.deltas[name]
            total = total + (d * av).sum(-1) if a.ndim == 2 else total + (d * av).sum((-1, -2))
        return total

    def factor_multiply(self, c: jax.Array, rows: dict | None = None) -> dict:
        """U c for coefficients c (r x N), as layer matrices, or W c for W's columns built from the
        deltas `rows` (e x N x out, c then e x N) as `gram`'s."""
        out = {}
        for name, a in self.inputs.items():
            d = self.deltas[name] if rows is None else rows[name]
            if a.ndim == 2:
                out[name] = jnp.einsum("cno,cn,ni->oi", d, c, a)
            else:
                out[name] = jnp.einsum("cnto,cn,nti->oi", d, c, a)
        return out

    def columns(self) -> jax.Array:
        """U^T as M x D in canonical order (small problems and tests only)."""
        per_layer = {}
        for name, a in self.inputs.items():
            d = self.deltas[name]
            eq = "cno,ni->cnoi" if a.ndim == 2 else "cnto,nti->cnoi"
            g = jnp.einsum(eq, d, a)
            per_layer[name] = g.reshape(-1, *g.shape[2:])
        return flatten(self.model, from_layers(self.model, per_layer))

    def multiply(self, v: dict) -> dict:
        layers = to_layers(self.model, v)
        u = self.factor_multiply(self.scale**2 * self.transpose_multiply(layers))
        return from_layers(self.model, {k: u[k] + self.shift * layers[k] for k in layers})

    def multiply_inverse(self, v: dict, damping: float) -> dict:
        return from_layers(self.model, self.multiply_inverse_layers(to_layers(self.model, v), damping))

    def multiply_inverse_layers(self, layers: dict, damping: float) -> dict:
        """(C + damping I)^-1 v for v as layer matrices: Woodbury on the M columns, or a dense solve
        when D <= M. The choice is made on Python floats and shapes, so it is static under jit."""
        lam = self._lam(damping)
        if self._solves_densely(lam):
            return to_layers(self.model, self._dense_solve(from_layers(self.model, layers), lam))
        return self._woodbury(layers, self.gram(), self.transpose_multiply(layers), lam)

    def multiply_inverse_mean(self, layers: dict, damping: float, by_gram: bool | None = None) -> dict:
        """(C + damping I)^-1 g for the true Fisher's gradient without l2, g = U c + V w (see
        `coefficients`), g also given as layer matrices: push-through for U's span and Woodbury for
        the rest, one solve with the Woodbury kernel for both (torch's docstring says why); U^T v from
        the Gram product over V's and U's rows together where that is cheaper, unless `by_gram` says
        otherwise."""
        lam = self._lam(damping)
        if by_gram is None:
            by_gram = self._mean_by_gram_is_cheaper()
        if self._solves_densely(lam):
            return self.multiply_inverse_layers(layers, damping)
        r, n = next(iter(self.deltas.values())).shape[:2]
        w = self.outside if self.outside is not None else jnp.full((n,), 1 / n, layers[next(iter(layers))].dtype)
        if by_gram:
            joint = self.gram(self.stacked)  # [V | U]^T U: V^T U in the first N rows
            gram, transposed = joint[n:], w @ joint[:n]
        else:
            v = layers if self.coefficients is None else self.factor_multiply(w[None], self._data_rows())
            gram, transposed = self.gram(), self.transpose_multiply(v)
        rhs = -transposed.reshape(r, n) / lam
        if self.coefficients is not None:
            rhs = rhs + self.coefficients / self.scale**2
        # (z as torch's: this module's kernel, lam I + s^2 U^T U, is s^2 times torch's)
        z = self._kernel_solve(gram, self.scale**2 * rhs, lam).reshape(r, n)
        return self.factor_multiply(jnp.concatenate([w[None] / lam, z]), self.stacked)  # V w / lam + U z

    def _data_rows(self) -> dict:
        return {k: d[:1] for k, d in self.stacked.items()}

    def _mean_by_gram_is_cheaper(self) -> bool:
        if self.stacked is None or any(a.ndim != 2 for a in self.inputs.values()):
            return False
        outs = {k: d.shape[-1] for k, d in self.deltas.items()}
        by_gram = self.num_columns * sum(outs.values())
        by_inputs = sum(a.shape[-1] * outs[k] for k, a in self.inputs.items())
        return by_gram < by_inputs

    def _woodbury(self, layers: dict, gram: jax.Array, transposed: jax.Array, lam: float) -> dict:
        """(lam I + s^2 U U^T)^-1 v = (v - s^2 U c) / lam with (lam I + s^2 U^T U) c = U^T v, given U^T U
        (`gram`) and U^T v (`transposed`)."""
        r, n = next(iter(self.deltas.values())).shape[:2]
        coeff = self._kernel_solve(gram, transposed, lam).reshape(r, n)
        correction = self.factor_multiply(self.scale**2 * coeff)
        return {k: (layers[k] - correction[k]) / lam for k in layers}

    def inverse_factor_multiply(self, c: jax.Array, damping: float, gram: jax.Array | None = None) -> dict:
        """(C + damping I)^-1 U c for coefficients c (r x N), as layer matrices: for a vector in the
        factor's span (ef's gradient without l2 is U 1/N). By the push-through identity
        (lam I + s^2 U U^T)^-1 U = U (lam I + s^2 U^T U)^-1 this is one solve with the Woodbury kernel
        and one product with U: no U^T v, and no (v - U c) / lam, which cancels when lam is small.
        `gram`: U^T U, where the caller has it."""
        lam = self._lam(damping)
        if self._solves_densely(lam):
            return self.multiply_inverse_layers(self.factor_multiply(c), damping)
        gram = self.gram() if gram is None else gram
        return self.factor_multiply(self._kernel_solve(gram, c, lam).reshape(c.shape))

    def inverse_column_mean(self, damping: float) -> tuple[dict, jax.Array]:
        """(C + damping I)^-1 g and ||g|| for g = U 1/N, the mean of the columns (ef's gradient
        without l2), as layer matrices and a scalar. Woodbury's Gram matrix gives both, the norm as
        ||g||^2 = 1^T U^T U 1 / N^2, so g itself, out x in' products per layer (on the cost MLP
        almost half a gradient's arithmetic), is never formed (XLA drops an unused gradient)."""
        a = next(iter(self.inputs.values()))
        n, lam = a.shape[0], self._lam(damping)
        c = jnp.full((1, n), 1 / n, a.dtype)
        if self._solves_densely(lam):  # (D <= M: g is cheaper than the M x M Gram matrix)
            g = self.factor_multiply(c)
            return self.multiply_inverse_layers(g, damping), total_norm(g.values())
        gram = self.gram()
        norm = jnp.sqrt(jnp.maximum(gram.sum(), 0)) / n
        return self.inverse_factor_multiply(c, damping, gram), norm

    def _kernel_solve(self, gram: jax.Array, rhs: jax.Array, lam: float) -> jax.Array:
        """(lam I + s^2 U^T U)^-1 rhs, flat, given U^T U (`gram`): the Woodbury kernel, symmetric
        positive definite (Cholesky, not LU)."""
        kernel = self.scale**2 * gram + lam * jnp.eye(gram.shape[0], dtype=gram.dtype)
        return cho_solve(cho_factor(kernel, lower=True), rhs.reshape(-1))

    def _dense_solve(self, v: dict, lam: float) -> dict:
        """The D x D solve of small problems, NaN where the matrix is singular for certain (as in torch)."""
        flat = flatten(self.model, v)
        if not isinstance(lam, jax.Array) and structurally_singular(lam, self.num_columns, self.model.num_params()):
            return unflatten(self.model, jnp.full_like(flat, jnp.nan))
        u = self.columns()
        matrix = self.scale**2 * (u.T @ u)
        matrix = matrix + lam * jnp.eye(matrix.shape[0], dtype=matrix.dtype)
        return unflatten(self.model, jnp.linalg.solve(matrix, flat))

    def to_dense(self) -> jax.Array:
        u = self.columns()
        matrix = self.scale**2 * (u.T @ u)
        return matrix + self.shift * jnp.eye(matrix.shape[0], dtype=matrix.dtype)


# -- K-FAC ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class KroneckerCurvature:
    """Block diagonal, one block A (x) G per layer acting as V -> G V A on W' (G, A symmetric)."""

    model: Model
    A: dict
    G: dict
    shift: float = 0.0  # the problem's l2: multiply adds it, inverse adds it to the damping

    def multiply(self, v: dict) -> dict:
        return from_layers(self.model, self.multiply_layers(to_layers(self.model, v)))

    def multiply_layers(self, layers: dict) -> dict:
        return {k: self.G[k] @ x @ self.A[k] + self.shift * x for k, x in layers.items()}

    def inverse(self, damping: float) -> "KroneckerCurvature":
        """Factored Tikhonov (Martens & Grosse 2015, 6.3) with lambda = damping + shift: the inverses
        of A + pi sqrt(lambda) I and G + sqrt(lambda)/pi I, pi = sqrt((tr A/dim A) / (tr G/dim G)),
        so that each factor is damped in proportion to its own scale (DESIGN 4 has the two swapped).
        Where a factor is zero (a layer whose outputs get no gradient: all its units dead, or
        saturated logits), A (x) G is too and the damped block is lambda I: both inverses are then
        I / sqrt(lambda) (kfac-jax's zero case), where pi would be 0/0 or inf and the step NaN; so
        they are where G is so small beside A (or A beside G) that pi overflows (or underflows).
        Returned as a KroneckerCurvature whose multiply applies them."""
        root = damped(damping, self.shift, next(iter(self.A.values())).dtype, root=True)
        A_inv, G_inv = {}, {}
        for k in self.A:
            a, g = jnp.diagonal(self.A[k]).mean(), jnp.diagonal(self.G[k]).mean()
            live = (a > 0) & (g > 0)
            # roots first: a / g overflows where G is tiny beside A (a confident fit's MC residuals)
            pi = jnp.sqrt(jnp.where(live, a, 1.0)) / jnp.sqrt(jnp.where(live, g, 1.0))  # no 0/0 where unused
            live = live & jnp.isfinite(pi) & (pi > 0)
            pi = jnp.where(live, pi, 1.0)
            A_inv[k] = _damped_inverse(self.A[k] * live, root * pi)
            G_inv[k] = _damped_inverse(self.G[k] * live, root / pi)
        return KroneckerCurvature(self.model, A_inv, G_inv)

    def multiply_inverse(self, v: dict, damping: float) -> dict:
        return self.inverse(damping).multiply(v)

    def to_dense(self) -> jax.Array:
        return _dense_by_columns(self.model, self.multiply, next(iter(self.A.values())))


def damped(damping, shift: float, dtype, root: bool = False):
    """lam = damping + shift, the damping a solve adds, or sqrt(lam) (`root`). A traced damping (a
    float64 scalar of the optimizers' state) is summed (and rooted) in float64 and then rounded to
    `dtype` once, as a Python float is where it meets an array, so no float32 computation is
    promoted to float64. (With lam a constant, XLA turned x / lam into x times a rounded 1/lam; a
    traced lam is divided by, as torch does: Woodbury's results move by round-off.)"""
    lam = damping + shift
    if isinstance(lam, jax.Array):
        return (jnp.sqrt(lam) if root else lam).astype(dtype)
    return math.sqrt(lam) if root else lam


def _damped_inverse(matrix: jax.Array, shift) -> jax.Array:
    """(matrix + shift I)^-1 = L^-T L^-1 from its Cholesky factor L (NaN where not positive definite).

    Not cho_solve(L, I): jax has no LAPACK potri, and the two n x n triangular solves of cho_solve
    run on one thread on the CPU (natgrad_impls.jax keeps jaxlib's LAPACK there); L^-1 by blocks
    puts most of the work into XLA's matrix products instead: about half cho_solve's time for a
    785 x 785 float32 K-FAC factor on 2 cores (5 against 9.5 ms)."""
    eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    inverse = _lower_triangular_inverse(jnp.linalg.cholesky(matrix + shift * eye))
    return inverse.T @ inverse


def _lower_triangular_inverse(L: jax.Array, block: int = 128) -> jax.Array:
    """L^-1 of a lower-triangular L by halves: [[L11, 0], [L21, L22]]^-1 =
    [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]], down to triangular solves of at most `block` rows."""
    n = L.shape[0]
    if n <= block:
        return solve_triangular(L, jnp.eye(n, dtype=L.dtype), lower=True)
    h = n // 2
    top, bottom = _lower_triangular_inverse(L[:h, :h], block), _lower_triangular_inverse(L[h:, h:], block)
    return jnp.block([[top, jnp.zeros((h, n - h), L.dtype)], [-(bottom @ L[h:, :h]) @ top, bottom]])


def _dense_by_columns(model: Model, multiply, like: jax.Array) -> jax.Array:
    eye = jnp.eye(model.num_params(), dtype=like.dtype)
    return jax.vmap(lambda e: flatten(model, multiply(unflatten(model, e))), out_axes=1)(eye)


# -- builders ---------------------------------------------------------------------------------------

def _layer_gradient(inputs: dict, deltas0: dict, n: int) -> dict:
    """(1/N) sum_n delta_n a_n^T per layer, from the residual's deltas (no r axis)."""
    return {
        name: jnp.einsum("no,ni->oi" if a.ndim == 2 else "nto,nti->oi", deltas0[name], a) / n
        for name, a in inputs.items()
    }


def _cotangents(problem: Problem, f, y, curvature: Curvature, samples: int, key, coordinates: bool):
    """The 1 + r stacked output-space cotangents: the residual at the data's labels, then the
    Fisher's r: none (EF), the columns of Lambda^1/2 (exact) or residuals at sampled labels (MC);
    and for the exact Fisher, where `coordinates`, the residual's coordinates in those columns
    (`M.fisher_factor`), else None. The predictive mean is computed once."""
    mean = M.predictive_mean(problem, f)
    if curvature == Curvature.EMPIRICAL:
        return M.residual(problem, mean, y)[None], None
    if curvature == Curvature.EXACT:
        root, split = M.fisher_factor(problem, mean, y if coordinates else None)
        return jnp.concatenate([M.residual(problem, mean, y)[None], root]), split
    # (one residual per label set, then concatenated: torch's single residual over the concatenated
    # labels compiled to a step 12% slower here, 784-1000-10 at batch 512 on the CPU)
    labels = M.sample_labels(problem, mean, samples, key)
    return jnp.concatenate([M.residual(problem, mean, y)[None], M.residual(problem, mean, labels)]), None


def gradient_and_curvature(problem: Problem, params: dict, batch, curvature: Curvature, samples=1, key=None,
                           coordinates: bool = True):
    """Loss, gradient (as layer matrices, l2 included) and the FactorCurvature of one batch, from
    one forward and one backward pass over 1 + r stacked cotangents. `key` (a jax.random key)
    drives the label sampler of the mc curvature and is ignored otherwise. coordinates=False: the
    exact Fisher's factor without its gradient's coordinates (K-FAC, as torch's)."""
    x, y = batch
    n = x.shape[0]
    f, inputs, pullback = linearize(problem, params, x)
    M.check_targets(problem, f, y)  # (before the residuals, which would broadcast a y of the wrong shape)
    cotangents, split = _cotangents(problem, f, y, curvature, samples, key, coordinates)
    deltas = pullback(cotangents)
    if curvature == Curvature.EMPIRICAL:
        factor = FactorCurvature(problem.model, inputs, deltas, 1 / math.sqrt(n))
    else:
        draws = samples if curvature == Curvature.MC else 1
        coefficients = outside = None
        if split is not None:
            alpha, held = split
            coefficients, outside = alpha / n, (~held).astype(f.dtype) / n
        factor_deltas = {k: d[1:] for k, d in deltas.items()}
        factor = FactorCurvature(problem.model, inputs, factor_deltas, 1 / math.sqrt(n * draws), problem.l2,
                                 stacked=deltas, coefficients=coefficients, outside=outside)
    grad = _layer_gradient(inputs, {k: d[0] for k, d in deltas.items()}, n)
    value = M.nll(problem, f, y).mean()
    if problem.l2:
        layers = to_layers(problem.model, params)
        grad = {k: grad[k] + problem.l2 * layers[k] for k in grad}
        value = value + 0.5 * problem.l2 * sum((p**2).sum() for p in params.values())
    return value, grad, factor


def precondition(problem: Problem, curvature: Curvature, grad: dict, factor: FactorCurvature, damping: float):
    """(C + damping I)^-1 g as layer matrices, and ||g||. Without l2 the gradient is the mean of the
    data's per-example gradients: for ef those are its factor's columns, g = U 1/N, solved for by
    `inverse_column_mean` (cheaper, and it cancels less than Woodbury; `grad` is not used there);
    the true Fisher's by `multiply_inverse_mean`, the exact one's by push-through too (as torch's)."""
    if problem.l2:
        return factor.multiply_inverse_layers(grad, damping), total_norm(grad.values())
    if curvature == Curvature.EMPIRICAL:
        return factor.inverse_column_mean(damping)
    return factor.multiply_inverse_mean(grad, damping), total_norm(grad.values())


def total_norm(arrays) -> jax.Array:
    """The 2-norm of all of the arrays together."""
    return jnp.linalg.norm(jnp.stack([jnp.linalg.norm(a.ravel()) for a in arrays]))


def kronecker(factor: FactorCurvature) -> KroneckerCurvature:
    """K-FAC from the same columns: A = (1/N) sum_n a a^T (summed over positions T for convs),
    G = scale^2 sum_(c,n) delta delta^T (averaged over T: KFC), so G = E[delta delta^T]."""
    A, G = {}, {}
    for name, a in factor.inputs.items():
        d = factor.deltas[name]
        n = a.shape[0]
        if a.ndim == 2:
            A[name] = a.T @ a / n
            G[name] = factor.scale**2 * jnp.einsum("cno,cnp->op", d, d)
        else:
            A[name] = jnp.einsum("nti,ntj->ij", a, a) / n
            G[name] = factor.scale**2 * jnp.einsum("cnto,cntp->op", d, d) / a.shape[1]
    return KroneckerCurvature(factor.model, A, G, factor.shift)
