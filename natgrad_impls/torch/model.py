"""Models and likelihoods in PyTorch, functional (params are a dict name -> tensor).

`forward` can record every parametric layer's output and capture every parametric layer's
(bias-augmented) input; the vector-Jacobian product with respect to the recorded outputs gives the
backpropagated output gradients delta. Inputs and deltas are all that the gradient, the Gram
matrix of the Woodbury solves and the K-FAC factors need (DESIGN 4).

On a GPU a small model's step is bound by kernel launches, not arithmetic, and a host sync stalls
the launch queue: the step code here launches few kernels and never waits for the device
(`one_hot` and the label sampler avoid torch's data-checking `.item()`; `tests/test_torch_sync.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from natgrad_impls.models import Act, Conv2d, Dense, Flatten, MaxPool2d, Model, Problem, check_inputs, layer_name
from natgrad_impls.names import Activation, Likelihood

_ACTIVATIONS = {Activation.RELU: torch.relu, Activation.TANH: torch.tanh, Activation.SIGMOID: torch.sigmoid}


def to_torch(arrays: dict, device="cpu", dtype=torch.float64) -> dict[str, torch.Tensor]:
    """`arrays` (numpy, e.g. models.init_params) as tensors on `device` in `dtype` (a torch.dtype or
    its name, "float32"); to_jax takes the same."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return {name: torch.as_tensor(value, dtype=dtype, device=device) for name, value in arrays.items()}


def _augment(a: torch.Tensor, bias: bool) -> torch.Tensor:
    """Append the constant 1 that multiplies the bias column of the augmented weight (one pad: a
    cat with ones_like would dispatch two operators)."""
    return F.pad(a, (0, 1), value=1.0) if bias else a


def forward(model: Model, params: dict, x: torch.Tensor, inputs: dict | None = None, outputs: dict | None = None):
    """Model output. With `inputs`, every parametric layer's input is recorded there (Dense: N x in';
    Conv2d: the unfolded patches N x T x in*k*k'; ' = with the bias column); with `outputs`, its
    output, differentiable: the first one is made a leaf that requires grad, so that autograd
    records the rest of the model from it and nothing before it. (Without them nothing is
    augmented or unfolded: the plain gradient, the unit of cost, does no more than it needs.)"""
    model.check_params(params)
    check_inputs(model, x.shape, x.dtype, next(iter(params.values())).dtype)
    h = x
    for index, layer in enumerate(model.layers):
        name = layer_name(index, layer)
        if isinstance(layer, Dense):
            if inputs is not None:
                inputs[name] = _augment(h, layer.bias)
            h = F.linear(h, params[f"{name}.weight"], params[f"{name}.bias"] if layer.bias else None)
        elif isinstance(layer, Conv2d):
            if inputs is not None:
                patches = F.unfold(h, layer.kernel_size, padding=layer.padding, stride=layer.stride)
                inputs[name] = _augment(patches.transpose(1, 2), layer.bias)
            bias = params[f"{name}.bias"] if layer.bias else None
            h = F.conv2d(h, params[f"{name}.weight"], bias, layer.stride, layer.padding)
        elif isinstance(layer, Act):
            h = _ACTIVATIONS[layer.kind](h)
        elif isinstance(layer, MaxPool2d):
            h = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding)
        elif isinstance(layer, Flatten):
            h = h.flatten(1)
        if name is not None and outputs is not None:
            h = h if outputs else h.detach().requires_grad_()
            outputs[name] = h
    return h


def output(model: Model, params: dict, x: torch.Tensor) -> torch.Tensor:
    return forward(model, params, x)


def clip_logits(problem: Problem, f: torch.Tensor) -> torch.Tensor:
    """Logits clipped to +-logit_clip with a straight-through gradient (identity where unclipped).
    Written clip(f) + (f - f) with the clip and one f detached, whose value is clip(f) exactly: as
    f + (clip(f) - f), the sum rounds to f's ulp (16.0 for 18.42 at f = 1e17)."""
    if problem.logit_clip is None:
        return f
    return f.detach().clamp(-problem.logit_clip, problem.logit_clip) + (f - f.detach())


def check_targets(problem: Problem, f: torch.Tensor, y: torch.Tensor) -> None:
    """`Problem.check_targets` on the outputs f and the batch's y, where a step takes its batch
    (`loss`, `curvature.gradient_and_curvature`)."""
    problem.check_targets(f.shape, f.dtype, y.shape, y.dtype, not y.is_floating_point())


def nll(problem: Problem, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example negative log-likelihood (N,), summed over output dimensions."""
    if problem.likelihood == Likelihood.GAUSSIAN:
        return 0.5 * ((f - y) ** 2).sum(-1)
    if problem.likelihood == Likelihood.BERNOULLI:
        # (not softplus(f) - y f: torch's softplus returns f exactly above its threshold of 20)
        return F.binary_cross_entropy_with_logits(clip_logits(problem, f), y, reduction="none").sum(-1)
    return F.cross_entropy(f, y, reduction="none")


def mean_nll(problem: Problem, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch's mean NLL. Categorical: cross_entropy's own mean reduction, which saves a mean
    and its backward (two of the ~20 kernels of an sgd step, where a GPU step is launch-bound)."""
    if problem.likelihood == Likelihood.CATEGORICAL:
        return F.cross_entropy(f, y)
    return nll(problem, f, y).mean()


def loss(problem: Problem, params: dict, batch) -> torch.Tensor:
    """Mean NLL over the batch plus the l2 term (DESIGN 4)."""
    x, y = batch
    f = output(problem.model, params, x)
    check_targets(problem, f, y)
    value = mean_nll(problem, f, y)
    if problem.l2:
        value = value + 0.5 * problem.l2 * sum((p**2).sum() for p in params.values())
    return value


def loss_and_grad(problem: Problem, params: dict, batch) -> tuple[torch.Tensor, dict]:
    """Loss and its gradient by one reverse pass of plain autograd: the unit of cost, and what
    sgd and adam use (torch.func.grad_and_value adds ~0.3 ms a call, measured on a 100k MLP)."""
    leaves = {k: p.detach().requires_grad_() for k, p in params.items()}
    value = loss(problem, leaves, batch)
    grads = torch.autograd.grad(value, list(leaves.values()))
    return value.detach(), dict(zip(leaves, grads))


def predictive_mean(problem: Problem, f: torch.Tensor) -> torch.Tensor:
    """E[T(y) | f], T(y) the sufficient statistic (`target`): f, sigmoid(f) or softmax(f). Computed
    once per step and shared by the residuals, the label sampler and the exact Fisher factor."""
    if problem.likelihood == Likelihood.GAUSSIAN:
        return f
    if problem.likelihood == Likelihood.BERNOULLI:
        return torch.sigmoid(clip_logits(problem, f))
    return torch.softmax(f, -1)


def target(problem: Problem, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """T(y): the labels themselves, or one-hot vectors for categorical labels (... x N)."""
    return one_hot(y, like) if problem.likelihood == Likelihood.CATEGORICAL else y


def residual(problem: Problem, mean: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d nll_n / d f_n = mean_n - T(y_n) in closed form (the likelihoods are exponential families
    in f), ... x N x k for labels y with leading dimensions (the mean convention divides by N later)."""
    return mean - target(problem, y, mean)


def one_hot(labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Indicator vectors of `labels` (... x N) in `like`'s last dimension, dtype and device: F.one_hot
    reads the labels' range back to the host first (a sync on a GPU); here a label out of range is
    an index error (a device-side assert on a GPU)."""
    shape = (*labels.shape, like.shape[-1])
    return like.new_zeros(shape).scatter_(-1, labels[..., None], 1.0)


def fisher_factor(problem: Problem, mean: torch.Tensor, y: torch.Tensor | None = None):
    """Square roots E_n of the output-space Fishers, Lambda_n = E_n E_n^T, stacked as r x N x k,
    from the predictive mean; and, given labels y (None: K-FAC, which needs the root alone), the
    residual in their columns, (alpha (r x N) with E_n alpha_n = residual_n, where that holds (N
    booleans)): the exact Fisher's gradient as U alpha / N, which NGD solves for without
    cancellation (`FactorCurvature.multiply_inverse_mean`).

    gaussian: E = I, alpha = r; bernoulli: E = diag(sqrt(s(1-s))), alpha = r / sqrt(s(1-s));
    categorical: Lambda = diag(p) - p p^T has rank k - 1 (Lambda 1 = 0), and so has the k x (k - 1)
    root pivoted on the example's most probable class q, with columns E_j = sqrt(p_j) (e_j - w),
    j != q, w_j = p_j / (1 + sqrt(p_q)), w_q = sqrt(p_q): a tenth fewer Woodbury columns than a
    k-column root at k = 10, and (1 + sqrt(p_q)) >= 1 divides nothing small. alpha = E^T (r / p),
    since Lambda (r / p) = r - p 1^T r = r, in closed form for r = p - e_y (r / p would cancel):
    alpha_j = sqrt(p_j) / (1 + sqrt(p_q)) - [j = y] / sqrt(p_y) for y != q, sqrt(p_j / p_q) for y = q.
    E alpha sums terms as large as alpha_j sqrt(p_j): at most sqrt(k) with the most probable class
    as the pivot, but 1 / sqrt(p_q) with another (on a pivot of p_q = 1e-20, float32 keeps none of a
    confidently wrong example's digits). alpha does not hold where its divisor (p_y; s(1-s) at any
    of a bernoulli example's outputs whose residual is not 0, as where float32 rounds a sigmoid to
    1 at a label of 1) is below the dtype's smallest normal number: there the residual leaves the
    root's range (a label of probability 0), and alpha is 0.
    """
    n, k = mean.shape
    if problem.likelihood == Likelihood.GAUSSIAN:
        root = torch.eye(k, dtype=mean.dtype, device=mean.device).expand(n, k, k).permute(2, 0, 1)
        held = torch.ones(n, dtype=torch.bool, device=mean.device)
        return root, None if y is None else (residual(problem, mean, y).T, held)
    tiny = torch.finfo(mean.dtype).tiny
    if problem.likelihood == Likelihood.BERNOULLI:
        variance = mean * (1 - mean)
        deviation = variance.sqrt()
        root = torch.diag_embed(deviation).permute(2, 0, 1)
        if y is None:
            return root, None
        r, scaled = residual(problem, mean, y), variance >= tiny
        held = (scaled | (r == 0)).all(-1)  # (a sigmoid rounded to its label: 0 = 0 alpha)
        return root, (torch.where(scaled & held[:, None], r / deviation, 0.0).T, held)
    swap, mean = _pivot_last(mean)  # in the classes' order with q last; rows swapped back at the end
    root = mean.sqrt()
    last = root[:, -1:]
    scale = 1 / (1 + last)
    w = torch.cat([mean[:, :-1] * scale, last], 1)
    factor = torch.diag_embed(root)[:, :, :-1] - w[:, :, None] * root[:, None, :-1]
    factor = factor.gather(1, swap[:, :, None].expand(n, k, k - 1)).permute(2, 0, 1)
    if y is None:
        return factor, None
    y = swap.gather(1, y[:, None])  # (the label's place in that order)
    label = mean.gather(1, y)  # p_y, N x 1
    held = label[:, 0] >= tiny
    inverse = label.rsqrt()
    alpha = root[:, :-1] * torch.where(y == k - 1, inverse, scale) - one_hot(y[:, 0], mean)[:, :-1] * inverse
    alpha = torch.where(held[:, None], alpha, 0.0)  # (NaN from 0 * inf where p_y = 0)
    return factor, (alpha.T, held)


def _pivot_last(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, the index that swaps its most probable class with the last (its own inverse),
    N x k, and the mean in that order."""
    n, k = mean.shape
    top = mean.argmax(-1, keepdim=True)
    swap = torch.arange(k, device=mean.device).expand(n, k).scatter(1, top, k - 1)
    swap[:, -1:] = top
    return swap, mean.gather(1, swap)


def sample_labels(problem: Problem, mean: torch.Tensor, samples: int, generator: torch.Generator):
    """Labels drawn from the model at its predictive mean, samples x N (x k for gaussian and
    bernoulli); their residuals r satisfy E[r r^T] = Lambda_n."""
    shape = (samples, *mean.shape)
    if problem.likelihood == Likelihood.GAUSSIAN:
        return mean + torch.randn(shape, generator=generator, dtype=mean.dtype, device=mean.device)
    if problem.likelihood == Likelihood.BERNOULLI:
        u = torch.rand(shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return (u < mean).to(mean.dtype)
    return _categorical(mean, samples, generator)


def _categorical(p: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
    """samples x N labels drawn from the rows of p: argmax p / e, e ~ Exp(1) (the exponential race,
    which is what torch.multinomial does for one sample, after a host-side check of p that syncs)."""
    race = torch.empty((samples, *p.shape), dtype=p.dtype, device=p.device).exponential_(generator=generator)
    return (p / race).argmax(-1)
