"""Models and likelihoods in JAX, functional (params are a dict name -> array, a pytree).

`forward` can add a perturbation to every parametric layer's output and capture every parametric
layer's (bias-augmented) input; the vector-Jacobian product with respect to the perturbations gives
the backpropagated output gradients delta. Inputs and deltas are all that the gradient, the Gram
matrix of the Woodbury solves and the K-FAC factors need (DESIGN 4). Layouts are torch's (NCHW
activations, OIHW kernels, Dense weights out x in), so the same NumPy parameters fit both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from natgrad_impls.models import Act, Conv2d, Dense, Flatten, MaxPool2d, Model, Problem, check_inputs, layer_name
from natgrad_impls.names import Activation, Likelihood

_ACTIVATIONS = {Activation.RELU: jax.nn.relu, Activation.TANH: jnp.tanh, Activation.SIGMOID: jax.nn.sigmoid}
_CONV_LAYOUT = ("NCHW", "OIHW", "NCHW")


def jax_device(device: str | jax.Device | None) -> jax.Device | None:
    """The jax device of the suite's device name (cpu, or cuda: jax's first GPU), or `device` itself."""
    if not isinstance(device, str):
        return device
    return jax.devices("gpu" if device == "cuda" else device)[0]


def to_jax(arrays: dict, device=None, dtype=jnp.float64) -> dict[str, jax.Array]:
    """`arrays` (numpy, e.g. models.init_params) as jax arrays on `device` (cpu, cuda, a jax.Device or
    None: jax's default) in `dtype`, as to_torch takes them."""
    return {name: jax.device_put(jnp.asarray(value, dtype=dtype), jax_device(device)) for name, value in arrays.items()}


def _augment(a: jax.Array, bias: bool) -> jax.Array:
    """Append the constant 1 that multiplies the bias column of the augmented weight."""
    return jnp.concatenate([a, jnp.ones_like(a[..., :1])], axis=-1) if bias else a


def _patches(h: jax.Array, layer: Conv2d) -> jax.Array:
    """N x T x in*k*k patches with torch's F.unfold feature order (channel, then kh, kw).

    HIGHEST precision: the patches are an identity convolution, which TF32/bf16 passes would round.
    """
    k, p = layer.kernel_size, layer.padding
    patches = lax.conv_general_dilated_patches(
        h, (k, k), (layer.stride, layer.stride), [(p, p), (p, p)],
        dimension_numbers=_CONV_LAYOUT, precision=lax.Precision.HIGHEST,
    )
    return patches.reshape(*patches.shape[:2], -1).transpose(0, 2, 1)


def forward(model: Model, params: dict, x: jax.Array, perturbations: dict | None = None):
    """Model output, and {layer: input} of every parametric layer (Dense: N x in'; Conv2d: the
    unfolded patches N x T x in*k*k'; ' = with the bias column)."""
    model.check_params(params)
    check_inputs(model, x.shape, x.dtype, next(iter(params.values())).dtype)
    inputs = {}
    h = x
    for index, layer in enumerate(model.layers):
        name = layer_name(index, layer)
        if isinstance(layer, Dense):
            inputs[name] = _augment(h, layer.bias)
            h = h @ params[f"{name}.weight"].T
            if layer.bias:
                h = h + params[f"{name}.bias"]
        elif isinstance(layer, Conv2d):
            inputs[name] = _augment(_patches(h, layer), layer.bias)
            p = layer.padding
            h = lax.conv_general_dilated(
                h, params[f"{name}.weight"], (layer.stride, layer.stride), [(p, p), (p, p)],
                dimension_numbers=_CONV_LAYOUT,
            )
            if layer.bias:
                h = h + params[f"{name}.bias"][:, None, None]
        elif isinstance(layer, Act):
            h = _ACTIVATIONS[layer.kind](h)
        elif isinstance(layer, MaxPool2d):
            # torch's F.max_pool2d: implicit -inf padding, floor mode (windows that fit). The init
            # value must be a concrete -inf (NumPy, not a traced jnp value) for JAX to recognise
            # a max-pool, which it can differentiate, rather than a generic reduction.
            k, s, p = layer.kernel_size, layer.stride, layer.padding
            h = lax.reduce_window(
                h, np.array(-np.inf, h.dtype), lax.max, (1, 1, k, k), (1, 1, s, s), [(0, 0), (0, 0), (p, p), (p, p)]
            )
        elif isinstance(layer, Flatten):
            h = h.reshape(h.shape[0], -1)
        if name is not None and perturbations is not None:
            h = h + perturbations[name]
        # (the perturbations are zeros: they only mark where delta is read off)
    return h, inputs


def output(model: Model, params: dict, x: jax.Array) -> jax.Array:
    return forward(model, params, x)[0]


def clip_logits(problem: Problem, f: jax.Array) -> jax.Array:
    """Logits clipped to +-logit_clip with a straight-through gradient (identity where unclipped).
    Written clip(f) + (f - f) with the clip and one f held, whose value is clip(f) exactly: as
    f + (clip(f) - f), the sum rounds to f's ulp (16.0 for 18.42 at f = 1e17)."""
    if problem.logit_clip is None:
        return f
    held = lax.stop_gradient(f)
    return jnp.clip(held, -problem.logit_clip, problem.logit_clip) + (f - held)


def check_targets(problem: Problem, f: jax.Array, y: jax.Array) -> None:
    """`Problem.check_targets` on the outputs f and the batch's y, where a step takes its batch
    (`loss`, `curvature.gradient_and_curvature`; shapes and dtypes: at trace time)."""
    problem.check_targets(f.shape, f.dtype, y.shape, y.dtype, jnp.issubdtype(y.dtype, jnp.integer))


def nll(problem: Problem, f: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example negative log-likelihood (N,), summed over output dimensions."""
    if problem.likelihood == Likelihood.GAUSSIAN:
        return 0.5 * ((f - y) ** 2).sum(-1)
    if problem.likelihood == Likelihood.BERNOULLI:
        f = clip_logits(problem, f)
        # softplus(f) - y f without its cancellation where f is large (numpy reference's _nll); smooth
        # at f = 0, where relu(f) + log1p(exp(-|f|)) has no derivative for autodiff to take
        return (y * jax.nn.softplus(-f) + (1 - y) * jax.nn.softplus(f)).sum(-1)
    return jax.nn.logsumexp(f, -1) - jnp.take_along_axis(f, y[:, None], -1)[:, 0]


def loss(problem: Problem, params: dict, batch) -> jax.Array:
    """Mean NLL over the batch plus the l2 term (DESIGN 4)."""
    x, y = batch
    f = output(problem.model, params, x)
    check_targets(problem, f, y)
    value = nll(problem, f, y).mean()
    if problem.l2:
        value = value + 0.5 * problem.l2 * sum((p**2).sum() for p in params.values())
    return value


def predictive_mean(problem: Problem, f: jax.Array) -> jax.Array:
    """E[T(y) | f], T(y) the sufficient statistic (`target`): f, sigmoid(f) or softmax(f). Computed
    once per step and shared by the residuals, the label sampler and the exact Fisher factor."""
    if problem.likelihood == Likelihood.GAUSSIAN:
        return f
    if problem.likelihood == Likelihood.BERNOULLI:
        return jax.nn.sigmoid(clip_logits(problem, f))
    return jax.nn.softmax(f, -1)


def target(problem: Problem, y: jax.Array, like: jax.Array) -> jax.Array:
    """T(y): the labels themselves, or one-hot vectors for categorical labels (... x N)."""
    if problem.likelihood == Likelihood.CATEGORICAL:
        return jax.nn.one_hot(y, like.shape[-1], dtype=like.dtype)
    return y


def residual(problem: Problem, mean: jax.Array, y: jax.Array) -> jax.Array:
    """d nll_n / d f_n = mean_n - T(y_n) in closed form (the likelihoods are exponential families
    in f), ... x N x k for labels y with leading dimensions (the mean convention divides by N later)."""
    return mean - target(problem, y, mean)


def fisher_factor(problem: Problem, mean: jax.Array, y: jax.Array | None = None):
    """Square roots E_n of the output-space Fishers, Lambda_n = E_n E_n^T, stacked as r x N x k,
    from the predictive mean; and, given labels y (None: K-FAC), the residual in their columns,
    (alpha (r x N) with E_n alpha_n = residual_n, where that holds (N booleans)). As torch's
    (`natgrad_impls.torch.model.fisher_factor`, which derives the closed forms and the pivot)."""
    n, k = mean.shape
    eye = jnp.eye(k, dtype=mean.dtype)
    if problem.likelihood == Likelihood.GAUSSIAN:
        root = jnp.broadcast_to(eye, (n, k, k)).transpose(2, 0, 1)
        return root, None if y is None else (residual(problem, mean, y).T, jnp.ones(n, bool))
    tiny = jnp.finfo(mean.dtype).tiny
    if problem.likelihood == Likelihood.BERNOULLI:
        variance = mean * (1 - mean)
        deviation = jnp.sqrt(variance)
        root = (deviation[:, :, None] * eye).transpose(2, 0, 1)
        if y is None:
            return root, None
        r, scaled = residual(problem, mean, y), variance >= tiny
        held = (scaled | (r == 0)).all(-1)  # (a sigmoid rounded to its label: 0 = 0 alpha)
        return root, (jnp.where(scaled & held[:, None], r / deviation, 0.0).T, held)
    swap, mean = _pivot_last(mean)  # in the classes' order with q last; rows swapped back at the end
    root = jnp.sqrt(mean)
    last = root[:, -1:]
    scale = 1 / (1 + last)
    w = jnp.concatenate([mean[:, :-1] * scale, last], 1)
    factor = root[:, None, :-1] * eye[:, :-1] - w[:, :, None] * root[:, None, :-1]
    factor = jnp.take_along_axis(factor, swap[:, :, None], 1).transpose(2, 0, 1)
    if y is None:
        return factor, None
    y = jnp.take_along_axis(swap, y[:, None], 1)  # (the label's place in that order)
    label = jnp.take_along_axis(mean, y, 1)  # p_y, N x 1
    held = label[:, 0] >= tiny
    inverse = lax.rsqrt(label)
    alpha = root[:, :-1] * jnp.where(y == k - 1, inverse, scale) - target(problem, y[:, 0], mean)[:, :-1] * inverse
    alpha = jnp.where(held[:, None], alpha, 0.0)  # (NaN from 0 * inf where p_y = 0)
    return factor, (alpha.T, held)


def _pivot_last(mean: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per example, the index that swaps its most probable class with the last (its own inverse),
    N x k, and the mean in that order."""
    k = mean.shape[-1]
    top = jnp.argmax(mean, -1)[:, None]
    order = jnp.arange(k)
    swap = jnp.where(order == top, k - 1, jnp.where(order == k - 1, top, order))
    return swap, jnp.take_along_axis(mean, swap, 1)


def flat_draw(sampler, key: jax.Array, shape: tuple, dtype) -> jax.Array:
    """sampler(key, shape, dtype) (jax.random.normal, uniform, gumbel) drawn as a vector and
    reshaped: the same numbers, since partitionable threefry counts the elements in row-major
    order, but XLA:CPU compiles a draw of a multi-dimensional shape about ten times slower (jax
    0.10: 2.8 s against 0.3 s for 2 x 32 x 10), once in every program that samples."""
    return sampler(key, (int(np.prod(shape)),), dtype).reshape(shape)


def sample_labels(problem: Problem, mean: jax.Array, samples: int, key: jax.Array) -> jax.Array:
    """Labels drawn from the model at its predictive mean, samples x N (x k for gaussian and
    bernoulli); their residuals r satisfy E[r r^T] = Lambda_n. The draws are those of
    jax.random.normal, uniform and categorical (Gumbel argmax) with this shape."""
    shape = (samples, *mean.shape)
    if problem.likelihood == Likelihood.GAUSSIAN:
        return mean + flat_draw(jax.random.normal, key, shape, mean.dtype)
    if problem.likelihood == Likelihood.BERNOULLI:
        return (flat_draw(jax.random.uniform, key, shape, mean.dtype) < mean).astype(mean.dtype)
    return jnp.argmax(jnp.log(mean) + flat_draw(jax.random.gumbel, key, shape, mean.dtype), axis=-1)
