"""Curvature in PyTorch: empirical Fisher, true Fisher (exact or MC) and K-FAC (DESIGN 4, 5).

Every curvature here is built from one forward pass and one batched backward pass (`linearize`):
the parametric layers' inputs a and the output gradients delta for a stack of output-space
cotangents. Layers work on augmented weights W' = [W | b] (out x in'), so a per-example gradient of
a dense layer is delta a^T.

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
and the same products on layer matrices (`*_layers`), which the optimizers use. Few kernels and no
host sync per step (see `natgrad_impls.torch.model`): foreach ops over the layers, and a Cholesky
that marks failure with NaN instead of raising (raising reads its status back to the host).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from natgrad_impls.hyperparameters import structurally_singular
from natgrad_impls.models import Conv2d, Model, Problem
from natgrad_impls.names import Curvature
from natgrad_impls.torch import model as M


# -- layer matrices: params dict <-> {layer: W' (..., out, in')} <-> flat canonical vector --------

def to_layers(model: Model, params: dict) -> dict[str, torch.Tensor]:
    """Augmented weights [W | b]; works with leading batch dimensions."""
    layers = {}
    for name, layer in model.parametric():
        w = params[f"{name}.weight"]
        lead = w.shape[: w.dim() - (4 if isinstance(layer, Conv2d) else 2)]
        w = w.reshape(*lead, w.shape[len(lead)], -1)
        layers[name] = torch.cat([w, params[f"{name}.bias"][..., None]], -1) if layer.bias else w
    return layers


def from_layers(model: Model, layers: dict) -> dict[str, torch.Tensor]:
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


def flatten(model: Model, params: dict) -> torch.Tensor:
    """Canonical flat vector(s); leading batch dimensions are kept."""
    shapes = model.param_shapes()
    parts = []
    for name, shape in shapes.items():
        p = params[name]
        parts.append(p.reshape(*p.shape[: p.dim() - len(shape)], -1))
    return torch.cat(parts, -1)


def unflatten(model: Model, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    params, offset = {}, 0
    for name, shape in model.param_shapes().items():
        size = math.prod(shape)
        params[name] = vector[..., offset : offset + size].reshape(*vector.shape[:-1], *shape)
        offset += size
    return params


# -- one forward, one batched backward --------------------------------------------------------------

def linearize(problem: Problem, params: dict, x: torch.Tensor):
    """Output f, layer inputs {layer: a}, and pullback(cotangents r x N x k) -> {layer: delta}.

    delta is r x N x out (Dense) or r x N x T x out (Conv2d, T output positions): the gradients with
    respect to the layers' recorded outputs. Plain autograd, not torch.func.vjp (DESIGN 5's choice
    elsewhere): the same numbers bitwise, and 0.5 ms less per step on the cost MLP (torch.func's
    graph set-up took longer than the forward pass itself)."""
    inputs, outputs = {}, {}
    with torch.enable_grad():
        f = M.forward(problem.model, params, x, inputs, outputs)
    points = list(outputs.values())

    def pullback(cotangents: torch.Tensor) -> dict[str, torch.Tensor]:
        if len(cotangents) == 1:
            deltas = [d[None] for d in torch.autograd.grad(f, points, cotangents[0], retain_graph=True)]
        else:
            deltas = torch.autograd.grad(f, points, cotangents, retain_graph=True, is_grads_batched=True)
        return {name: (d.flatten(3).transpose(2, 3) if d.dim() == 5 else d) for name, d in zip(outputs, deltas)}

    return f.detach(), {name: a.detach() for name, a in inputs.items()}, pullback


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
    # the true Fisher's gradient without l2 as g = U c + V w, V the data residual's per-example
    # gradients (`stacked`'s first block): `coefficients` c (r x N) the exact Fisher's residuals in
    # its root's columns over N (`M.fisher_factor`), `outside` w (N) 1/N for the examples whose
    # residual the root does not hold (rarely any), else 0; None for MC (c = 0, w = 1/N)
    coefficients: torch.Tensor | None = None
    outside: torch.Tensor | None = None

    @property
    def num_columns(self) -> int:
        d = next(iter(self.deltas.values()))
        return d.shape[0] * d.shape[1]

    def _solves_densely(self, lam: float) -> bool:
        """Woodbury needs lam > 0, and pays only while the columns are fewer than the parameters."""
        return lam == 0 or self.model.num_params() <= self.num_columns

    def gram(self, rows: dict | None = None) -> torch.Tensor:
        """W^T U, W's columns built from the deltas `rows` (e x N x out) like U's from `deltas`; by
        default W = U, U^T U (M x M). Layer by layer: (Delta_W Delta_U^T) * (A A^T) for Dense layers;
        convolutions materialise their per-example gradients (DESIGN 4 allows it)."""
        total = None
        for name, a in self.inputs.items():
            d = self.deltas[name]
            w = d if rows is None else rows[name]
            r, n, e = d.shape[0], d.shape[1], w.shape[0]
            if a.dim() == 2:
                term = w.reshape(e * n, -1) @ d.reshape(r * n, -1).T
                term.view(e, n, r, n).mul_((a @ a.T)[:, None, :])
            else:
                g = torch.einsum("cnto,nti->cnoi", d, a).reshape(r * n, -1)
                gw = g if rows is None else torch.einsum("cnto,nti->cnoi", w, a).reshape(e * n, -1)
                term = gw @ g.T
            # in place: on the CPU every fresh M x M tensor is fresh pages, and faulting them in
            # cost more than the arithmetic (exact Fisher, M = 1280: 9 -> 6 ms a Gram matrix)
            total = term if total is None else total.add_(term)
        return total

    def transpose_multiply(self, layers: dict) -> torch.Tensor:
        """U^T v for v given as layer matrices: r x N."""
        terms = []
        for name, a in self.inputs.items():
            av = a @ layers[name].T  # N (x T) x out
            terms.append((self.deltas[name] * av).sum(-1 if a.dim() == 2 else (-1, -2)))
        return sum(terms[1:], terms[0])

    def factor_multiply(self, c: torch.Tensor, rows: dict | None = None) -> dict:
        """U c for coefficients c (r x N), as layer matrices, or W c for W's columns built from the
        deltas `rows` (e x N x out, c then e x N) as `gram`'s: the cotangents' deltas are summed
        first (a does not depend on them), so the large product with a is done once."""
        out = {}
        for name, a in self.inputs.items():
            d = self.deltas[name] if rows is None else rows[name]
            weighted = d * c.reshape(*c.shape, *[1] * (d.dim() - 2))
            weighted = weighted[0] if len(d) == 1 else weighted.sum(0)  # N (x T) x out
            out[name] = weighted.reshape(-1, d.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        return out

    def columns(self) -> torch.Tensor:
        """U^T as M x D in canonical order (small problems and tests only)."""
        per_layer = {}
        for name, a in self.inputs.items():
            d = self.deltas[name]
            eq = "cno,ni->cnoi" if a.dim() == 2 else "cnto,nti->cnoi"
            g = torch.einsum(eq, d, a)
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
        when D <= M. NaN where the Woodbury kernel is not numerically positive definite."""
        lam = damping + self.shift
        if self._solves_densely(lam):
            return to_layers(self.model, self._dense_solve(from_layers(self.model, layers), lam))
        return self._woodbury(layers, self.gram(), self.transpose_multiply(layers), lam)

    def multiply_inverse_mean(self, layers: dict, damping: float, by_gram: bool | None = None) -> dict:
        """(C + damping I)^-1 g for the true Fisher's gradient without l2, g = U c + V w (see
        `coefficients`), g also given as layer matrices. One solve with the Woodbury kernel
        K = lam / s^2 I + U^T U for both parts: push-through for U's span,
        (lam I + s^2 U U^T)^-1 U c = U K^-1 c / s^2, and Woodbury for the rest, (v - U K^-1 U^T v) / lam.
        The exact Fisher's gradient lies in its span: Woodbury alone would subtract two nearly equal
        vectors and divide their round-off by lam (float32 on a trained MLP: 3% off at lam = 1e-5, 30
        times the direction's size at 1e-8; scripts/float32_directions.py).
        U^T v = (V^T U)^T w can come out of one Gram product over V's and U's rows together,
        (1 + r) N x M, instead of a product of every layer's inputs with v: cheaper where
        r N sum(out) < sum(in' out) over Dense layers (MC at batches narrower than the input), the
        choice unless `by_gram` says otherwise."""
        lam = damping + self.shift
        if by_gram is None:
            by_gram = self._mean_by_gram_is_cheaper()
        if self._solves_densely(lam):
            return self.multiply_inverse_layers(layers, damping)
        r, n = next(iter(self.deltas.values())).shape[:2]
        w = self.outside if self.outside is not None else layers[next(iter(layers))].new_full((n,), 1 / n)
        if by_gram:
            joint = self.gram(self.stacked)  # [V | U]^T U: V^T U in the first N rows
            gram, transposed = joint[n:], w @ joint[:n]
        else:
            v = layers if self.coefficients is None else self.factor_multiply(w[None], self._data_rows())
            gram, transposed = self.gram(), self.transpose_multiply(v)
        rhs = transposed.reshape(r, n) / -lam
        if self.coefficients is not None:
            rhs.add_(self.coefficients, alpha=1 / self.scale**2)
        z = self._kernel_solve(gram, rhs, lam).reshape(r, n)
        return self.factor_multiply(torch.cat([w[None] / lam, z]), self.stacked)  # V w / lam + U z

    def _data_rows(self) -> dict:
        return {k: d[:1] for k, d in self.stacked.items()}

    def _mean_by_gram_is_cheaper(self) -> bool:
        if self.stacked is None or any(a.dim() != 2 for a in self.inputs.values()):
            return False
        outs = {k: d.shape[-1] for k, d in self.deltas.items()}
        by_gram = self.num_columns * sum(outs.values())
        by_inputs = sum(a.shape[-1] * outs[k] for k, a in self.inputs.items())
        return by_gram < by_inputs

    def _woodbury(self, layers: dict, gram: torch.Tensor, transposed: torch.Tensor, lam: float) -> dict:
        """(lam I + s^2 U U^T)^-1 v = (v - U c) / lam with (lam / s^2 I + U^T U) c = U^T v, given U^T U
        (`gram`, overwritten) and U^T v (`transposed`)."""
        r, n = next(iter(self.deltas.values())).shape[:2]
        correction = self.factor_multiply(self._kernel_solve(gram, transposed, lam).reshape(r, n))
        names = list(layers)
        solution = torch._foreach_sub([layers[k] for k in names], [correction[k] for k in names])
        torch._foreach_div_(solution, lam)
        return dict(zip(names, solution))

    def inverse_factor_multiply(self, c: torch.Tensor, damping: float, gram: torch.Tensor | None = None) -> dict:
        """(C + damping I)^-1 U c for coefficients c (r x N), as layer matrices: for a vector in the
        factor's span (ef's gradient without l2 is U 1/N). By the push-through identity
        (lam I + s^2 U U^T)^-1 U = U (lam I + s^2 U^T U)^-1 this is one solve with the Woodbury kernel
        and one product with U: no U^T v, and no (v - U c) / lam, which cancels when lam is small.
        `gram`: U^T U, where the caller has it (overwritten)."""
        lam = damping + self.shift
        if self._solves_densely(lam):
            return self.multiply_inverse_layers(self.factor_multiply(c), damping)
        gram = self.gram() if gram is None else gram
        return self.factor_multiply(self._kernel_solve(gram, c / self.scale**2, lam).reshape(c.shape))

    def inverse_column_mean(self, damping: float) -> tuple[dict, torch.Tensor]:
        """(C + damping I)^-1 g and ||g|| for g = U 1/N, the mean of the columns (ef's gradient
        without l2), as layer matrices and a scalar. Woodbury's Gram matrix gives both, the norm as
        ||g||^2 = 1^T U^T U 1 / N^2, so g itself, out x in' products per layer (on the cost MLP
        almost half a gradient's arithmetic), is never formed."""
        a = next(iter(self.inputs.values()))
        n, lam = a.shape[0], damping + self.shift
        c = torch.full((1, n), 1 / n, dtype=a.dtype, device=a.device)
        if self._solves_densely(lam):  # (D <= M: g is cheaper than the M x M Gram matrix)
            g = self.factor_multiply(c)
            return self.multiply_inverse_layers(g, damping), total_norm(g.values())
        gram = self.gram()
        norm = gram.sum().clamp(min=0).sqrt() / n  # (before the solve overwrites gram's diagonal)
        return self.inverse_factor_multiply(c, damping, gram), norm

    def _kernel_solve(self, gram: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
        """(lam / s^2 I + U^T U)^-1 rhs as a column, given U^T U (`gram`, overwritten): the Woodbury
        kernel, symmetric positive definite (Cholesky, not LU), s^2 folded into its shift."""
        gram.diagonal().add_(lam / self.scale**2)
        return torch.cholesky_solve(rhs.reshape(-1, 1), _cholesky(gram))

    def _dense_solve(self, v: dict, lam: float) -> dict:
        """The D x D solve of small problems, NaN where the matrix is singular (as `_cholesky`): for
        certain where lam is 0 and there are fewer columns than parameters (`structurally_singular`),
        which LU's pivots, perturbed by round-off, would miss."""
        flat = flatten(self.model, v)
        if structurally_singular(lam, self.num_columns, self.model.num_params()):
            return unflatten(self.model, torch.full_like(flat, torch.nan))
        u = self.columns()
        matrix = self.scale**2 * (u.T @ u)
        matrix.diagonal().add_(lam)
        x, info = torch.linalg.solve_ex(matrix, flat)
        return unflatten(self.model, x.masked_fill_(info != 0, torch.nan))

    def to_dense(self) -> torch.Tensor:
        u = self.columns()
        matrix = self.scale**2 * (u.T @ u)
        matrix.diagonal().add_(self.shift)
        return matrix


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
        if not self.shift:  # (an inverse: nothing to add)
            return {k: self.G[k] @ x @ self.A[k] for k, x in layers.items()}
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
        root = math.sqrt(damping + self.shift)
        names = list(self.A)
        # every layer's pi at once, tensors, not bools (no read back from the device): a dozen
        # operators for the model, not for each layer (a small model's step on a GPU is bound by
        # kernel launches)
        a = torch.stack([torch.diagonal(self.A[k]).mean() for k in names])
        g = torch.stack([torch.diagonal(self.G[k]).mean() for k in names])
        live = (a > 0) & (g > 0)
        # roots first: a / g overflows where G is tiny beside A (a confident fit's MC residuals)
        pi = torch.sqrt(torch.where(live, a, 1.0)) / torch.sqrt(torch.where(live, g, 1.0))  # no 0/0 where unused
        live = live & torch.isfinite(pi) & (pi > 0)
        pi = torch.where(live, pi, 1.0)
        A_inv = {k: _damped_inverse(self.A[k] * live[i], root * pi[i]) for i, k in enumerate(names)}
        G_inv = {k: _damped_inverse(self.G[k] * live[i], root / pi[i]) for i, k in enumerate(names)}
        return KroneckerCurvature(self.model, A_inv, G_inv)

    def multiply_inverse(self, v: dict, damping: float) -> dict:
        return self.inverse(damping).multiply(v)

    def to_dense(self) -> torch.Tensor:
        return _dense_by_columns(self.model, self.multiply, next(iter(self.A.values())))


def _damped_inverse(matrix: torch.Tensor, shift) -> torch.Tensor:
    """(matrix + shift I)^-1 by Cholesky; NaN if that is not numerically positive definite."""
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return torch.cholesky_inverse(_cholesky(matrix + shift * eye))


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor, NaN where the factorisation failed: torch.linalg.cholesky would raise,
    which reads the status back to the host and so waits for the device on every call. NaNs instead
    reach the loss, where the runner detects them as a divergence (as in jax)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    return factor.masked_fill_(info != 0, torch.nan)  # (in place: no second M x M tensor)



def _dense_by_columns(model: Model, multiply, like: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(model.num_params(), dtype=like.dtype, device=like.device)
    return torch.stack([flatten(model, multiply(unflatten(model, e))) for e in eye], 1)


# -- builders ---------------------------------------------------------------------------------------

def _layer_gradient(inputs: dict, deltas0: dict, n: int) -> dict:
    """(1/N) sum_n delta_n a_n^T per layer, from the residual's deltas (no r axis); one matrix
    product over the N (x T) rows (an einsum here went through bmm, 2x slower on the cost MLP)."""
    names = list(inputs)
    sums = [deltas0[k].reshape(-1, deltas0[k].shape[-1]).T @ inputs[k].reshape(-1, inputs[k].shape[-1]) for k in names]
    torch._foreach_div_(sums, n)
    return dict(zip(names, sums))


def _cotangents(problem: Problem, f, y, curvature: Curvature, samples: int, generator, coordinates: bool):
    """The 1 + r stacked output-space cotangents: the residual at the data's labels, then the
    Fisher's r: none (EF), the columns of Lambda^1/2 (exact) or residuals at sampled labels (MC,
    one residual computation for data and sampled labels); and for the exact Fisher, where
    `coordinates`, the residual's coordinates in those columns (`M.fisher_factor`), else None. The
    predictive mean is computed once."""
    mean = M.predictive_mean(problem, f)
    if curvature == Curvature.EMPIRICAL:
        return M.residual(problem, mean, y)[None], None
    if curvature == Curvature.EXACT:
        root, split = M.fisher_factor(problem, mean, y if coordinates else None)
        return torch.cat([M.residual(problem, mean, y)[None], root]), split
    labels = M.sample_labels(problem, mean, samples, generator)
    return M.residual(problem, mean, torch.cat([y[None], labels])), None


def gradient_and_curvature(problem: Problem, params: dict, batch, curvature: Curvature, samples=1, generator=None,
                           gradient: bool = True, coordinates: bool = True):
    """Loss, gradient (as layer matrices, l2 included) and the FactorCurvature of one batch, from
    one forward and one backward pass over 1 + r stacked cotangents. gradient=False: the gradient
    is None, for a caller that needs only the factor (ef without l2: `inverse_column_mean`).
    coordinates=False: the exact Fisher's factor without its gradient's coordinates, for a caller
    that needs its columns alone (K-FAC: 17 operators fewer a step on the cost MLP)."""
    x, y = batch
    n = x.shape[0]
    f, inputs, pullback = linearize(problem, params, x)
    M.check_targets(problem, f, y)  # (before the residuals, which would broadcast a y of the wrong shape)
    cotangents, split = _cotangents(problem, f, y, curvature, samples, generator, coordinates)
    deltas = pullback(cotangents)
    if curvature == Curvature.EMPIRICAL:
        factor = FactorCurvature(problem.model, inputs, deltas, 1 / math.sqrt(n))
    else:
        draws = samples if curvature == Curvature.MC else 1
        coefficients = outside = None
        if split is not None:
            alpha, held = split
            coefficients, outside = alpha / n, (~held).to(f.dtype) / n
        factor_deltas = {k: d[1:] for k, d in deltas.items()}
        factor = FactorCurvature(problem.model, inputs, factor_deltas, 1 / math.sqrt(n * draws), problem.l2,
                                 stacked=deltas, coefficients=coefficients, outside=outside)
    grad = _layer_gradient(inputs, {k: d[0] for k, d in deltas.items()}, n) if gradient else None
    value = M.mean_nll(problem, f, y)
    if problem.l2:
        layers = to_layers(problem.model, params)
        grad = {k: grad[k] + problem.l2 * layers[k] for k in grad} if gradient else None
        value = value + 0.5 * problem.l2 * sum((p**2).sum() for p in params.values())
    return value, grad, factor


def precondition(problem: Problem, curvature: Curvature, grad: dict | None, factor: FactorCurvature, damping: float):
    """(C + damping I)^-1 g as layer matrices, and ||g||. Without l2 the gradient is the mean of the
    data's per-example gradients: for ef those are its factor's columns, g = U 1/N, solved for by
    `inverse_column_mean` (cheaper, and it cancels less than Woodbury; `grad` may be None there, as
    `gradient_needed` says); the true Fisher's by `multiply_inverse_mean`, the exact one's by
    push-through too (its gradient lies in its factor's span). With l2 (g = U c + l2 theta) Woodbury
    on g: lam >= l2 bounds what its cancellation costs."""
    if not gradient_needed(problem, curvature):  # ef without l2
        return factor.inverse_column_mean(damping)
    if problem.l2:
        return factor.multiply_inverse_layers(grad, damping), total_norm(grad.values())
    return factor.multiply_inverse_mean(grad, damping), total_norm(grad.values())


def gradient_needed(problem: Problem, curvature: Curvature) -> bool:
    """Whether `precondition` needs the gradient itself (all but ef without l2)."""
    return bool(problem.l2) or curvature != Curvature.EMPIRICAL


def total_norm(tensors) -> torch.Tensor:
    """The 2-norm of all of the tensors together, in three operators (no host sync)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))))


def kronecker(factor: FactorCurvature, weight: float = 1.0) -> "KroneckerCurvature":
    """K-FAC from the same columns: A = (1/N) sum_n a a^T (summed over positions T for convs),
    G = scale^2 sum_(c,n) delta delta^T (averaged over T: KFC), so G = E[delta delta^T], both times
    `weight` (a moving average's 1 - ema, which so costs no kernel of its own). Each is one matrix
    product over all rows; the scales are applied in one foreach op."""
    names = list(factor.inputs)
    A = [_product_over_rows(factor.inputs[k]) for k in names]
    G = [_product_over_rows(factor.deltas[k]) for k in names]
    n = next(iter(factor.inputs.values())).shape[0]
    positions = [factor.inputs[k].shape[1] if factor.inputs[k].dim() == 3 else 1 for k in names]
    torch._foreach_mul_(A + G, [weight / n] * len(names) + [weight * factor.scale**2 / t for t in positions])
    return KroneckerCurvature(factor.model, dict(zip(names, A)), dict(zip(names, G)), factor.shift)


def _product_over_rows(m: torch.Tensor) -> torch.Tensor:
    """m^T m, every leading dimension counted as rows."""
    m = m.reshape(-1, m.shape[-1])
    return m.T @ m
