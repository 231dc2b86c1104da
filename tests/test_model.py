"""The forward pass and likelihoods that every reference builds on, against torch.nn; NumPy
initialisation is seeded and shared by all frameworks."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import dense_reference as ref
from conftest import PROBLEMS, make_data
from natgrad_impls import models
from natgrad_impls.names import Activation
from natgrad_impls.torch import model as M


@pytest.mark.parametrize("name", PROBLEMS)
def test_forward_matches_torch_nn(name):
    """The outputs, and every parametric layer's output shape (jax's linearisation reads them from
    `output_shapes`, not from a forward pass: a padding left out of the arithmetic)."""
    problem = PROBLEMS[name]
    params = models.init_params(problem.model, 0)
    x, _ = make_data(problem, 5)
    x = torch.tensor(x)
    net = ref.torch_nn(problem.model, params)
    expected = net(x)
    torch.testing.assert_close(M.output(problem.model, M.to_torch(params), x), expected, rtol=1e-13, atol=1e-13)
    shapes, h = problem.model.output_shapes(), x
    for index, (layer, module) in enumerate(zip(problem.model.layers, net, strict=True)):
        h, name = module(h), models.layer_name(index, layer)
        if name:
            assert shapes[name] == tuple(h.shape[1:]), name


def _cifar10_cnn():
    from natgrad_impls.tasks import get_task

    return get_task("cifar10-cnn").problem


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("name", ["cnn-strided", "cifar10-cnn"])
def test_every_layer_of_a_strided_padded_cnn_matches_torch_nn(name, framework):
    """Strided convolutions and padded max-pools (cifar10-cnn's 3x3, stride-2, padding-1 pools),
    layer by layer, so that a failure names the layer: jax's forward pass is otherwise checked only
    through its agreement with torch's. (jax: the prefixes' shapes by tracing alone, then one jitted
    program for all their outputs, which compiles in a fifth of the time that eager ops take.)"""
    problem = PROBLEMS[name] if name in PROBLEMS else _cifar10_cnn()
    model, params = problem.model, models.init_params(problem.model, 0)
    prefixes = [models.Model(model.layers[: i + 1], model.input_shape) for i in range(len(model.layers))]
    own = lambda prefix, every: {k: every[k] for k in prefix.param_names()}  # noqa: E731  (a prefix's parameters)
    x, _ = make_data(problem, 2)
    h, expected = torch.tensor(x), []
    for module in ref.torch_nn(model, params):
        h = module(h)
        expected.append(h.detach().numpy())
    if framework == "jax":
        import jax

        import natgrad_impls.jax  # noqa: F401  (float64)
        from natgrad_impls.jax import model as JM

        jparams = JM.to_jax(params)
        for index, prefix in enumerate(prefixes):
            shape = jax.eval_shape(functools.partial(JM.output, prefix), own(prefix, jparams), x).shape
            assert shape == expected[index].shape, f"layer {index}: {model.layers[index]}"
        outputs = jax.jit(lambda p, x: [JM.output(prefix, own(prefix, p), x) for prefix in prefixes])(jparams, x)
    else:
        outputs = [M.output(prefix, own(prefix, M.to_torch(params)), torch.tensor(x)) for prefix in prefixes]
    for index, (actual, wanted) in enumerate(zip(outputs, expected)):
        np.testing.assert_allclose(np.asarray(actual), wanted, rtol=0, atol=1e-12 * np.abs(wanted).max(),
                                   err_msg=f"layer {index}: {model.layers[index]}")


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("name", ["cnn-categorical", "cnn-strided"])
def test_recorded_layer_inputs_times_the_weights_are_the_layer_outputs(name, framework):
    """The layer inputs that every curvature is built from (Conv2d: the unfolded patches, one row
    per output position, at the conv's own stride and padding) give each layer's torch.nn output
    with the bias-augmented weight; the plain forward pass never unfolds, so only this sees them."""
    problem = PROBLEMS[name]
    model, params = problem.model, models.init_params(problem.model, 0)
    x, _ = make_data(problem, 2)
    if framework == "jax":
        import jax

        import natgrad_impls.jax  # noqa: F401  (float64)
        from natgrad_impls.jax import model as JM

        inputs = jax.jit(lambda p, x: JM.forward(model, p, x)[1])(JM.to_jax(params), x)
    else:
        inputs = {}
        M.forward(model, M.to_torch(params), torch.tensor(x), inputs=inputs)
    h = torch.tensor(x)
    for index, module in enumerate(ref.torch_nn(model, params)):
        h, layer = module(h), model.layers[index]
        key = models.layer_name(index, layer)
        if key is None:
            continue
        out = h.detach().numpy().reshape(len(x), h.shape[1], -1).transpose(0, 2, 1)  # N x T x out
        a = np.asarray(inputs[key]).reshape(len(x), -1, inputs[key].shape[-1])  # Dense: T = 1
        assert a.shape[1] == out.shape[1], f"{key}: {a.shape[1]} rows of inputs for {out.shape[1]} output positions"
        w = params[f"{key}.weight"].reshape(len(params[f"{key}.weight"]), -1)
        w = np.hstack([w, params[f"{key}.bias"][:, None]]) if layer.bias else w
        np.testing.assert_allclose(a @ w.T, out, rtol=0, atol=1e-12 * np.abs(out).max(), err_msg=key)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli", "categorical"])
def test_nll_matches_the_likelihood_written_out(impl, likelihood):
    """Each framework's per-example NLL against the formula in NumPy (dense_reference.nll), at logits
    up to +-30 (where torch's softplus, which returns f above 20, is 1e-13 to 2e-9 off)."""
    rng = np.random.default_rng(0)
    f = np.column_stack([rng.normal(size=6), 10 * rng.normal(size=6), [-30.0, -21.0, -3.0, 3.0, 21.0, 30.0]])
    y = (rng.integers(0, 3, size=6) if likelihood == "categorical" else
         (rng.normal(size=(6, 3)) > 0).astype(float) if likelihood == "bernoulli" else rng.normal(size=(6, 3)))
    problem = models.Problem(models.linear(3, 3), likelihood)
    _, labels = impl.batch(np.zeros(1), y)
    value = impl.numpy(impl.module.model.nll(problem, impl.params({"f": f})["f"], labels))
    np.testing.assert_allclose(value, ref.nll(likelihood, f, y), rtol=1e-12, atol=1e-14)


def test_a_model_describes_itself_for_captions():
    assert models.mlp((64, 128, 10), "tanh").describe() == "MLP 64-128-10 (tanh), 9610 parameters"
    assert models.linear(5, 1, bias=True).describe() == "linear 5-1, 6 parameters"
    cnn = models.cnn((1, 8, 8), (2,), (10,))
    assert cnn.describe() == f"CNN, {cnn.num_params()} parameters"


def test_mlp_is_affine_activation_affine_with_logits_out():
    """mlp((3, 4, 2), "tanh") is f(x) = W2 tanh(W1 x + b1) + b2, written out in NumPy: the activation
    between layers only, so that the outputs are logits for the likelihood to link. The torch.nn
    comparison above builds its network from the same layer list, so it cannot see an extra or a
    missing activation."""
    model = models.mlp((3, 4, 2), "tanh")
    params = {k: v + 0.1 for k, v in models.init_params(model, 0).items()}  # non-zero biases too
    x = np.random.default_rng(0).normal(size=(5, 3))
    hidden = np.tanh(x @ params["dense0.weight"].T + params["dense0.bias"])
    expected = hidden @ params["dense2.weight"].T + params["dense2.bias"]
    actual = M.output(model, M.to_torch(params), torch.tensor(x)).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-13, atol=1e-13)


def test_autoencoder_has_a_linear_code_layer():
    """The K-FAC paper's MNIST autoencoder (Hinton & Salakhutdinov 2006): 784-1000-500-250-30 and
    mirrored, a sigmoid after every dense layer but the 30-unit code layer, which is linear, and the
    last, whose logits the bernoulli likelihood takes."""
    model = models.autoencoder()
    layers = model.layers
    dense = [(i, layer) for i, layer in enumerate(layers) if isinstance(layer, models.Dense)]
    assert [(d.in_features, d.out_features) for _, d in dense] == [
        (784, 1000), (1000, 500), (500, 250), (250, 30), (30, 250), (250, 500), (500, 1000), (1000, 784)]
    after = [layers[i + 1].kind if i + 1 < len(layers) and isinstance(layers[i + 1], models.Act) else None
             for i, _ in dense]
    assert after == ["sigmoid"] * 3 + [None] + ["sigmoid"] * 3 + [None]


def test_the_paper_clip_is_the_logit_of_its_mean_bound():
    """DESIGN 4: the paper code clips the Bernoulli mean to [1e-8, 1 - 1e-8]; the logit clip is that
    bound's logit, so its sigmoid gives the bound back to round-off (log(1e8) would be 1e-8 off)."""
    import math

    clip = models.KUNSTNER_LOGIT_CLIP
    assert 1 / (1 + math.exp(clip)) == pytest.approx(1e-8, rel=1e-12, abs=0)
    assert 1 / (1 + math.exp(-clip)) == pytest.approx(1 - 1e-8, rel=0, abs=1e-15)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_the_logit_clip_is_exact_at_any_logit_and_straight_through(framework):
    """The clipped logit is np.clip's to the last bit, however large the logit (the paper grid's large
    steps reach |f| = 1e12 and more: written f + (clip(f) - f) it rounded to f's ulp, 16.0 for 18.42 at
    1e17, and torch and jax left numpy's runs), and its gradient is 1 everywhere."""
    clip = models.KUNSTNER_LOGIT_CLIP
    problem = models.Problem(models.linear(1, 1), "bernoulli", logit_clip=clip)
    f = np.array([[1e17], [-1e12], [20.0], [-3.0], [0.0], [clip]])
    if framework == "torch":
        t = torch.tensor(f, requires_grad=True)
        value = M.clip_logits(problem, t)
        value.sum().backward()
        value, grad = value.detach().numpy(), t.grad.numpy()
    else:
        import jax
        import jax.numpy as jnp

        from natgrad_impls.jax import model as JM

        clipped = jax.jit(lambda z: JM.clip_logits(problem, z))
        value = np.asarray(clipped(jnp.asarray(f)))
        grad = np.asarray(jax.grad(lambda z: clipped(z).sum())(jnp.asarray(f)))
    assert value.tolist() == np.clip(f, -clip, clip).tolist()
    assert grad.tolist() == np.ones_like(f).tolist()


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_a_confident_bernoulli_loss_is_exact_and_its_gradient_smooth(framework):
    """softplus(f) - y f for a label the logit agrees with is a small difference of large numbers:
    numpy's reference and jax kept 2 digits at f = 30 and none at 36 (torch's BCE and the grid's form
    do not cancel). The gradient sigmoid(f) - y holds at f = 0 too, where the Kunstner runs start (a
    form with |f| or relu(f) has no derivative there)."""
    problem = models.Problem(models.linear(1, 1, bias=True), "bernoulli")  # the exact likelihood: no clip
    f = np.array([30.0, -36.0, 10.0, 0.0, 0.0])
    y = np.array([1.0, 0.0, 0.0, 1.0, 0.0])
    per_example = []
    for logit, label in zip(f, y):  # f = 0 x + bias: the gradient in the bias is sigmoid(f) - y
        params = {"dense0.weight": np.zeros((1, 1)), "dense0.bias": np.array([logit])}
        batch = (np.ones((1, 1)), np.array([[label]]))
        if framework == "numpy":
            from natgrad_impls.numpy import reference as R

            per_example.append((R.loss(problem, params, batch), R.gradient(problem, params, batch)[1]))
        elif framework == "torch":
            value, grad = M.loss_and_grad(problem, M.to_torch(params), tuple(map(torch.as_tensor, batch)))
            per_example.append((value.item(), grad["dense0.bias"].item()))
        else:
            import jax
            import jax.numpy as jnp

            from natgrad_impls.jax import model as JM

            value, grad = jax.value_and_grad(lambda p: JM.loss(problem, p, tuple(map(jnp.asarray, batch))))(
                JM.to_jax(params))
            per_example.append((float(value), float(grad["dense0.bias"][0])))
    values, grads = np.array(per_example).T
    exact = np.logaddexp(0.0, np.where(y == 1, -f, f))
    # (torch's own BCE rounds log(1 + 2.3e-16) at f = -36 to 0: an absolute 2e-16, not a relative 1e-2)
    np.testing.assert_allclose(values, exact, rtol=1e-15, atol=1e-15 if framework == "torch" else 0)
    np.testing.assert_allclose(grads, 1 / (1 + np.exp(-f)) - y, rtol=0, atol=1e-15)


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


def test_conv_glorot_bound_counts_the_receptive_field():
    """Glorot fans of a conv weight are channels x kernel area, as torch.nn.init counts them (a
    dense layer's in/out would draw from a bound sqrt(25) times too wide); 300 draws reach near it."""
    model = models.Model((models.Conv2d(3, 4, 5),), (3, 5, 5))
    weight = models.init_params(model, 0)["conv0.weight"]
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(4, 3, 5, 5))
    bound = np.sqrt(6 / (fan_in + fan_out))
    largest = np.abs(weight).max()
    assert weight.shape == (4, 3, 5, 5)
    assert 0.95 * bound < largest <= bound


def test_init_params_draws_the_weights_in_order_from_default_rng_of_the_seed():
    """init_params' stream is default_rng(seed) itself (random_stream's purposes are kept apart from
    it): the weights in param_names order, each uniform in its Glorot bound, and the zero biases
    draw nothing. Pinned by hand, since every committed run starts from these numbers."""
    model = models.mlp((3, 4, 2))
    params = models.init_params(model, 7)
    rng = np.random.default_rng(7)
    expected = {
        "dense0.weight": rng.uniform(-np.sqrt(6 / 7), np.sqrt(6 / 7), size=(4, 3)),
        "dense0.bias": np.zeros(4),
        "dense2.weight": rng.uniform(-np.sqrt(6 / 6), np.sqrt(6 / 6), size=(2, 4)),
        "dense2.bias": np.zeros(2),
    }
    assert list(params) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(params[name], expected[name], err_msg=name)
        assert params[name].dtype == np.float64


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


def test_a_problem_names_a_model_it_cannot_take():
    with pytest.raises(TypeError, match=r"^model: a natgrad_impls.models.Model \(linear, mlp, cnn .*not Linear$"):
        models.Problem(torch.nn.Linear(3, 1), "gaussian")


BAD_BATCHES = {  # likelihood, the parameters' dtype, the batch from a good one (NumPy), the error
    "gaussian y of (N,)": ("gaussian", "float64", lambda x, y: (x, y[:, 0]),
                           r"y must have the outputs' shape \(8, 2\) for a gaussian likelihood, not \(8,\)"),
    "bernoulli y of (N,)": ("bernoulli", "float64", lambda x, y: (x, y[:, 0]),
                            r"y must have the outputs' shape \(8, 2\)"),
    "gaussian y in float64, params in float32": ("gaussian", "float32", lambda x, y: (x, y.astype("float64")),
                                                 r"y is (torch\.)?float64 and the outputs are (torch\.)?float32"),
    "float class labels": ("categorical", "float64", lambda x, y: (x, y.astype("float64")),
                           r"y must be integer class labels of shape \(8,\) for a categorical likelihood, not float"),
    "class labels of (N, 1)": ("categorical", "float64", lambda x, y: (x, y[:, None]),
                               r"y must be integer .* not integer of \(8, 1\)"),
    "x in float64, params in float32": ("gaussian", "float32", lambda x, y: (x.astype("float64"), y),
                                        r"x is (torch\.)?float64 and the parameters are (torch\.)?float32"),
    "x of another width": ("categorical", "float64", lambda x, y: (x[:, :2], y),
                           r"x must be of shape \(N, 3\) for this model, not \(8, 2\)"),
    "x with an extra axis": ("gaussian", "float64", lambda x, y: (x[:, None, :], y),
                             r"x must be of shape \(N, 3\) for this model, not \(8, 1, 3\)"),
}


@pytest.mark.parametrize("optimizer", ["sgd", "ngd"])  # the loss alone, and the curvature's pass
@pytest.mark.parametrize("bad", BAD_BATCHES)
def test_a_step_names_what_is_wrong_with_its_batch(impl, bad, optimizer):
    """A y that does not fit the outputs, or an x of another shape than the model's input or in
    another dtype than the parameters, stops the step with a ValueError naming it: a gaussian y of
    (N,) broadcast against the outputs to an N x N loss (193 for 1.56, and sgd ran on), jax took
    float32 parameters to float64, and its curvature refused a float64 y inside a VJP; an x of
    another width met torch's and jax's own errors about matrices."""
    likelihood, dtype, spoil, message = BAD_BATCHES[bad]
    problem = models.Problem(models.mlp((3, 4, 2 if likelihood != "categorical" else 3)), likelihood)
    x, y = make_data(problem, 8)
    x, y = spoil(x.astype(dtype), y.astype(dtype) if y.dtype.kind == "f" else y)
    batch = tuple(impl.params({"a": a}, a.dtype.name)["a"] for a in (x, y))  # (each in its own dtype)
    params = impl.params(models.init_params(problem.model, 0), dtype)
    opt = getattr(impl.module, optimizer)(problem, lr=0.1, **({"damping": 0.1} if optimizer == "ngd" else {}))
    with pytest.raises(ValueError, match=f"^batch: {message}"):
        opt.step(params, opt.init(params), batch)


def test_the_numpy_reference_names_an_x_of_another_width():
    from natgrad_impls import numpy as nn

    problem = models.Problem(models.linear(3), "gaussian")
    x, y = make_data(problem, 8)
    opt = nn.sgd(problem, lr=0.1)
    params = models.init_params(problem.model, 0)
    with pytest.raises(ValueError, match=r"^batch: x must be of shape \(N, 3\) for this model, not \(8, 4\)"):
        opt.step(params, opt.init(params), (np.hstack([x, x[:, :1]]), y))


@pytest.mark.parametrize("layer", ["dense2.bias", "conv0.bias"])
def test_parameters_missing_a_bias_are_refused_not_run_without_it(impl, layer):
    """torch's F.linear and F.conv2d take a bias of None: looked up with .get, a missing one had run
    a bias-free model without a word (jax's lookup raised)."""
    problem = PROBLEMS["cnn-categorical"] if layer.startswith("conv") else PROBLEMS["mlp-categorical"]
    every = models.init_params(problem.model, 0)
    assert layer in every
    params = {k: v for k, v in every.items() if k != layer}
    x, y = make_data(problem, 4)
    opt = impl.module.sgd(problem, lr=0.1)
    with pytest.raises(KeyError, match=layer):
        opt.step(impl.params(params), opt.init(impl.params(params)), impl.batch(x, y))


def test_to_jax_and_to_torch_take_the_suites_device_and_dtype_names():
    import jax

    import natgrad_impls.jax as nj

    from natgrad_impls.torch import to_torch

    assert to_torch({"w": np.ones(2)}, "cpu", "float32")["w"].dtype == torch.float32
    placed = nj.to_jax({"w": np.ones(2)}, "cpu", "float32")["w"]
    assert placed.devices() == {jax.devices("cpu")[0]} and placed.dtype == np.float32
    assert nj.jax_device(jax.devices("cpu")[0]) is jax.devices("cpu")[0] and nj.jax_device(None) is None


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


def test_an_activation_layer_takes_its_kind_by_name():
    """Act("relu") as mlp(..., "relu") takes it: the name becomes the Activation (a plain string
    reached the frameworks' lookup and failed there), and an unknown one is named."""
    assert models.Act("relu") == models.Act(Activation.RELU)
    with pytest.raises(ValueError, match="activation: 'gelu' is not one of relu, tanh, sigmoid"):
        models.Act("gelu")
