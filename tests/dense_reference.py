"""Dense float64 references built with torch.func autograd alone: per-example gradients (vmap of
grad), output Jacobians (jacrev) and the Hessian of the NLL with respect to the output. They share
nothing with the layer-wise curvature code under test but the forward pass and the NLL, which
tests/test_model.py checks against torch.nn (`torch_nn`, the same network in torch.nn modules) and
against the likelihoods written out here (`nll`, which `loss` uses)."""

from __future__ import annotations

import numpy as np
import torch

from natgrad_impls import models
from natgrad_impls.torch import model as M


def _flat(model: models.Model, tree: dict, lead: int) -> torch.Tensor:
    """Canonical flattening with `lead` leading batch dimensions kept."""
    return torch.cat([tree[name].reshape(*tree[name].shape[:lead], -1) for name in model.param_names()], -1)


def _setup(problem, params, x, y):
    p = {k: torch.tensor(np.asarray(v), dtype=torch.float64) for k, v in params.items()}
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y)
    y = y.to(torch.float64) if y.is_floating_point() else y
    return p, x, y


def loss(problem, params, x, y) -> float:
    """The mean NLL plus the l2 term, written out in NumPy from the model's outputs (the forward pass
    is the one thing shared with the code under test)."""
    p, xt, _ = _setup(problem, params, x, y)
    f = M.output(problem.model, p, xt).numpy()
    if problem.logit_clip is not None:  # (bernoulli only: the paper code's clip of the logits)
        f = np.clip(f, -problem.logit_clip, problem.logit_clip)
    penalty = 0.5 * problem.l2 * sum(float((np.asarray(v, np.float64) ** 2).sum()) for v in params.values())
    return float(nll(problem.likelihood, f, np.asarray(y)).mean()) + penalty


def nll(likelihood, f: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example negative log-likelihood of outputs f (N x k), written out in float64 (no logit
    clip): gaussian 0.5 |f - y|^2, bernoulli sum log(1 + e^f) - y f, categorical logsumexp(f) - f_y."""
    f = np.asarray(f, np.float64)
    if likelihood == "gaussian":
        return 0.5 * ((f - y) ** 2).sum(-1)
    if likelihood == "bernoulli":
        return (np.logaddexp(0.0, f) - y * f).sum(-1)
    top = f.max(-1)
    return top + np.log(np.exp(f - top[:, None]).sum(-1)) - f[np.arange(len(f)), y]


def loss_gradient(problem, params, x, y) -> np.ndarray:
    p, x, y = _setup(problem, params, x, y)
    grad = torch.func.grad(lambda q: M.loss(problem, q, (x, y)))(p)
    return _flat(problem.model, grad, 0).numpy()


def loss_hessian(problem, params, x, y) -> np.ndarray:
    p, x, y = _setup(problem, params, x, y)
    flat = _flat(problem.model, p, 0)
    return torch.func.hessian(lambda v: M.loss(problem, _unflatten_torch(problem.model, v), (x, y)))(flat).numpy()


def _unflatten_torch(model, vector):
    out, offset = {}, 0
    for name, shape in model.param_shapes().items():
        size = int(np.prod(shape))
        out[name] = vector[offset : offset + size].reshape(shape)
        offset += size
    return out


def per_example_gradients(problem, params, x, y) -> np.ndarray:
    """N x D: gradients of each example's own NLL (no l2 term)."""
    p, x, y = _setup(problem, params, x, y)

    def nll_one(q, xi, yi):
        return M.nll(problem, M.output(problem.model, q, xi[None]), yi[None])[0]

    grads = torch.func.vmap(torch.func.grad(nll_one), in_dims=(None, 0, 0))(p, x, y)
    return _flat(problem.model, grads, 1).numpy()


def empirical_fisher(problem, params, x, y) -> np.ndarray:
    g = per_example_gradients(problem, params, x, y)
    return g.T @ g / len(g)


def fisher(problem, params, x, y) -> np.ndarray:
    """(1/N) sum_n J_n^T H_n J_n + l2 I with J_n = d f_n / d theta (jacrev) and H_n the autograd
    Hessian of the NLL with respect to the output (equal to the output Fisher for these
    likelihoods; with a logit clip, whose gradient is straight-through, c (1 - c) at the clipped
    logit: the Fisher of the clipped mean c)."""
    p, x, y = _setup(problem, params, x, y)
    model = problem.model

    def f_one(q, xi):
        return M.output(model, q, xi[None])[0]

    def nll_of_output(f, yi):
        return M.nll(problem, f[None], yi[None])[0]

    jac = torch.func.vmap(torch.func.jacrev(f_one), in_dims=(None, 0))(p, x)  # name -> N x k x shape
    J = _flat(model, jac, 2)  # N x k x D
    f = M.output(model, p, x)
    H = torch.func.vmap(torch.func.hessian(nll_of_output))(f, y)  # N x k x k
    F = torch.einsum("nkd,nkl,nle->de", J, H, J) / x.shape[0]
    return (F + problem.l2 * torch.eye(F.shape[0], dtype=F.dtype)).numpy()


def cosines(problem, params, x, y, damping: float) -> dict[str, float]:
    """What a run's cos_ef_ngd and cos_ngd_grad columns hold: the cosine between (EF + damping I)^-1 g
    and (F + damping I)^-1 g, and between the latter and g; F with the prior's l2 I (as `fisher`),
    the EF without (DESIGN 6)."""
    g = loss_gradient(problem, params, x, y)
    eye = np.eye(len(g))
    d_ef = np.linalg.solve(empirical_fisher(problem, params, x, y) + damping * eye, g)
    d_ngd = np.linalg.solve(fisher(problem, params, x, y) + damping * eye, g)
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return {"cos_ef_ngd": cos(d_ef, d_ngd), "cos_ngd_grad": cos(d_ngd, g)}


def layer_blocks(model: models.Model) -> dict[str, slice]:
    """Where each parametric layer's weight and bias sit in the canonical vector (contiguous)."""
    blocks, offset = {}, 0
    shapes = model.param_shapes()
    for name, _ in model.parametric():
        size = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(f"{name}."))
        blocks[name] = slice(offset, offset + size)
        offset += size
    return blocks


def torch_nn(model: models.Model, params: dict) -> torch.nn.Sequential:
    """The same network as torch.nn modules in float64, weights copied in; module i is layer i
    ("dense4" is module 4): the independent forward pass the tests compare ours with."""
    modules = []
    for index, layer in enumerate(model.layers):
        if isinstance(layer, models.Dense):
            modules.append(torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias))
        elif isinstance(layer, models.Conv2d):
            modules.append(torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                           layer.stride, layer.padding, bias=layer.bias))
        elif isinstance(layer, models.Act):
            modules.append({"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}[layer.kind]())
        elif isinstance(layer, models.MaxPool2d):
            modules.append(torch.nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding))
        else:
            modules.append(torch.nn.Flatten())
        name = models.layer_name(index, layer)
        if name:
            modules[-1].weight.data = torch.tensor(params[f"{name}.weight"])
            if layer.bias:
                modules[-1].bias.data = torch.tensor(params[f"{name}.bias"])
    return torch.nn.Sequential(*modules).double()
