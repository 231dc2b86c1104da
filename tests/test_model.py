"""The forward pass and likelihoods that every reference builds on, against torch.nn; NumPy
initialisation is seeded and shared by all frameworks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import PROBLEMS, make_data
from natgrad_impls import models
from natgrad_impls.torch import model as M


def as_module(model: models.Model, params: dict) -> torch.nn.Sequential:
    """The same network as torch.nn modules, weights copied in."""
    modules = []
    for index, layer in enumerate(model.layers):
        if isinstance(layer, models.Dense):
            modules.append(torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias))
        elif isinstance(layer, models.Conv2d):
            modules.append(torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                           layer.stride, layer.padding, bias=layer.bias))
        elif isinstance(layer, models.Act):
            modules.append({"relu": torch.nn.ReLU(), "tanh": torch.nn.Tanh(), "sigmoid": torch.nn.Sigmoid()}[layer.kind])
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


@pytest.mark.parametrize("name", PROBLEMS)
def test_forward_matches_torch_nn(name):
    problem = PROBLEMS[name]
    params = models.init_params(problem.model, 0)
    x, _ = make_data(problem, 5)
    x = torch.tensor(x)
    expected = as_module(problem.model, params)(x)
    torch.testing.assert_close(M.output(problem.model, M.to_torch(params), x), expected, rtol=1e-13, atol=1e-13)
    assert tuple(expected.shape[1:]) == list(problem.model.output_shapes().values())[-1]


def test_nll_matches_torch_losses():
    rng = np.random.default_rng(0)
    f = torch.tensor(rng.normal(size=(6, 3)))
    y = torch.tensor(rng.normal(size=(6, 3)))
    gaussian = models.Problem(models.linear(3, 3), "gaussian")
    torch.testing.assert_close(M.nll(gaussian, f, y), 0.5 * F.mse_loss(f, y, reduction="none").sum(-1))
    labels = (y > 0).double()
    bernoulli = models.Problem(models.linear(3, 3), "bernoulli")
    torch.testing.assert_close(
        M.nll(bernoulli, f, labels), F.binary_cross_entropy_with_logits(f, labels, reduction="none").sum(-1)
    )
    classes = torch.tensor(rng.integers(0, 3, size=6))
    categorical = models.Problem(models.linear(3, 3), "categorical")
    torch.testing.assert_close(M.nll(categorical, f, classes), F.cross_entropy(f, classes, reduction="none"))


def test_init_params_is_seeded_and_glorot():
    model = models.mlp((20, 30, 5))
    a, b, c = models.init_params(model, 0), models.init_params(model, 0), models.init_params(model, 1)
    assert list(a) == model.param_names() == ["dense0.weight", "dense0.bias", "dense2.weight", "dense2.bias"]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["dense0.weight"], c["dense0.weight"])
    assert np.abs(a["dense0.weight"]).max() <= np.sqrt(6 / 50) and np.all(a["dense0.bias"] == 0)
    assert all(np.all(v == 0) for v in models.init_params(model, 0, scheme="zeros").values())
    with pytest.raises(ValueError, match="scheme: 'he' is not one of glorot, zeros"):
        models.init_params(model, 0, scheme="he")


def test_each_numpy_random_stream_of_a_seed_is_its_own():
    """The MC labels of each step, the batch order, the chaos noise, the timing rows and the
    initialisation draw from separate streams. With seed tuples they did not: numpy pads a tuple
    with zeros, so default_rng((0, 2)), step 2's labels, was also the chaos noise's stream, and
    (0, 0), step 0's labels, the initialisation's."""
    firsts = [tuple(np.random.default_rng(0).random(3))]  # init_params'
    for purpose in models.RANDOM_STREAMS:
        for counters in ((), (0,), (1,), (2,)):
            firsts.append(tuple(models.random_stream(0, purpose, *counters).random(3)))
    assert len(set(firsts)) == len(firsts)
    np.testing.assert_array_equal(models.random_stream(5, "labels", 3).random(3),
                                  models.random_stream(5, "labels", 3).random(3))  # and reproducible


def test_flatten_roundtrip_and_sizes():
    model = models.cnn((1, 8, 8), (2, 3), (5, 4))
    params = models.init_params(model, 0)
    vector = models.flatten(model, params)
    assert vector.shape == (model.num_params(),)
    back = models.unflatten(model, vector)
    assert all(np.array_equal(back[k], params[k]) for k in params)


def test_problem_rejects_clipping_outside_bernoulli():
    with pytest.raises(ValueError, match="logit_clip"):
        models.Problem(models.linear(2), "gaussian", logit_clip=1.0)
    with pytest.raises(ValueError, match="likelihood: 'poisson' is not one of gaussian, bernoulli, categorical"):
        models.Problem(models.linear(2), "poisson")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli", "categorical"])
def test_jax_label_sampler_draws_what_jax_random_draws_at_the_full_shape(likelihood, dtype):
    """sample_labels draws flat and reshapes (a faster compile); the labels must be exactly those of
    jax.random at the samples x N x k shape, so that MC runs keep their numbers."""
    import jax
    import jax.numpy as jnp

    import natgrad_impls.jax  # noqa: F401  (float64)
    from natgrad_impls.jax import model as JM

    problem = models.Problem(models.linear(4, 3), likelihood)
    mean = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).normal(size=(7, 3)), dtype), axis=-1)
    key = jax.random.fold_in(jax.random.key(5), 2)
    shape = (4, 7, 3)
    expected = {
        "gaussian": lambda: mean + jax.random.normal(key, shape, mean.dtype),
        "bernoulli": lambda: (jax.random.uniform(key, shape, mean.dtype) < mean).astype(mean.dtype),
        "categorical": lambda: jax.random.categorical(key, jnp.log(mean), axis=-1, shape=shape[:-1]),
    }[likelihood]()
    labels = JM.sample_labels(problem, mean, 4, key)
    assert labels.shape == expected.shape and labels.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(labels), np.asarray(expected))
