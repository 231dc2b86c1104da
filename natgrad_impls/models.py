"""Framework-agnostic models and problems (DESIGN 5).

A `Model` is a tuple of layers. The parametric layers (`Dense`, `Conv2d`) form the explicit layer
table that K-FAC and the Woodbury solves use: each has a name ("dense0", "conv1", ...) and owns the
parameters "<name>.weight" and, with a bias, "<name>.bias", in torch's layouts (Dense: out x in;
Conv2d: out x in x kh x kw). `param_names` fixes the canonical order of the flat parameter vector
used by every dense reference. Parameters are drawn in NumPy from the seed (`init_params`) and
handed to the framework, so numpy, torch and jax runs start from the same point.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Union

import numpy as np

from natgrad_impls.names import Activation, Curvature, Likelihood, LogitClip, parse


@dataclasses.dataclass(frozen=True)
class Dense:
    in_features: int
    out_features: int
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class Conv2d:
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class Act:
    kind: Activation

    def __post_init__(self):  # Act("relu") as mlp(..., "relu") takes it, or a ValueError naming the kinds
        object.__setattr__(self, "kind", parse(Activation, self.kind, "activation"))


@dataclasses.dataclass(frozen=True)
class MaxPool2d:
    kernel_size: int
    stride: int
    padding: int = 0


@dataclasses.dataclass(frozen=True)
class Flatten:
    pass


Layer = Union[Dense, Conv2d, Act, MaxPool2d, Flatten]
Parametric = Union[Dense, Conv2d]


def layer_name(index: int, layer: Layer) -> str | None:
    """"dense<index>" / "conv<index>" for parametric layers, None for the others."""
    if isinstance(layer, Dense):
        return f"dense{index}"
    if isinstance(layer, Conv2d):
        return f"conv{index}"
    return None


@dataclasses.dataclass(frozen=True)
class Model:
    layers: tuple[Layer, ...]
    input_shape: tuple[int, ...]  # of one example, e.g. (D,) or (channels, height, width)

    def parametric(self) -> list[tuple[str, Parametric]]:
        """The layer table: (name, layer) of every Dense and Conv2d, in forward order."""
        return [(layer_name(i, layer), layer) for i, layer in enumerate(self.layers) if layer_name(i, layer)]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for name, layer in self.parametric():
            if isinstance(layer, Dense):
                shapes[f"{name}.weight"] = (layer.out_features, layer.in_features)
                if layer.bias:
                    shapes[f"{name}.bias"] = (layer.out_features,)
            else:
                k = layer.kernel_size
                shapes[f"{name}.weight"] = (layer.out_channels, layer.in_channels, k, k)
                if layer.bias:
                    shapes[f"{name}.bias"] = (layer.out_channels,)
        return shapes

    def param_names(self) -> list[str]:
        """Canonical order of the flat parameter vector: layers in order, weight then bias."""
        return list(self._param_names)

    @functools.cached_property
    def _param_names(self) -> tuple[str, ...]:  # (made once: every step's check reads them)
        return tuple(self.param_shapes())

    def check_params(self, params: dict) -> None:
        """A KeyError naming the parameters that `params` lacks or holds beyond the model's: an extra
        one stopped torch's autograd, passed through jax's sgd and adam untouched and was a bare
        KeyError in the curvatures."""
        if set(params) == set(self._param_names):
            return
        missing = [name for name in self._param_names if name not in params]
        extra = sorted(map(str, set(params) - set(self._param_names)))
        said = [f"lacks {', '.join(missing)}"] * bool(missing) + [f"has {', '.join(extra)}"] * bool(extra)
        raise KeyError(f"params: {' and '.join(said)} (the model's are {', '.join(self._param_names)})")

    def num_params(self) -> int:
        return sum(math.prod(shape) for shape in self.param_shapes().values())

    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-example output shape of every parametric layer (where delta is read off)."""
        return {name: shape for name, shape in self._shapes() if name}

    @property
    def num_outputs(self) -> int:
        """k, the width of the model's output (after every layer, a last Flatten's too), which the
        likelihood reads: the classes of a categorical model."""
        return math.prod(list(self._shapes())[-1][1])

    def _shapes(self):
        """(parametric layer's name or None, per-example output shape) of every layer, in order."""
        shape = self.input_shape
        for index, layer in enumerate(self.layers):
            if isinstance(layer, Dense):
                shape = (layer.out_features,)
            elif isinstance(layer, Conv2d):
                side = lambda n: (n + 2 * layer.padding - layer.kernel_size) // layer.stride + 1
                shape = (layer.out_channels, side(shape[1]), side(shape[2]))
            elif isinstance(layer, MaxPool2d):
                side = lambda n: (n + 2 * layer.padding - layer.kernel_size) // layer.stride + 1
                shape = (shape[0], side(shape[1]), side(shape[2]))
            elif isinstance(layer, Flatten):
                shape = (math.prod(shape),)
            yield layer_name(index, layer), shape

    @property
    def has_conv(self) -> bool:
        return any(isinstance(layer, Conv2d) for layer in self.layers)

    def describe(self) -> str:
        """For captions: 'MLP 64-128-10 (tanh), 9610 parameters', 'linear 13-1, 14 parameters', or
        for a model with convolutions 'CNN, 895210 parameters'."""
        size = f"{self.num_params()} parameters"
        if self.has_conv:
            return f"CNN, {size}"
        dense = [layer for layer in self.layers if isinstance(layer, Dense)]
        if len(dense) == 1:
            return f"linear {dense[0].in_features}-{dense[0].out_features}, {size}"
        widths = "-".join(str(n) for n in [dense[0].in_features] + [layer.out_features for layer in dense])
        kinds = ", ".join(sorted({layer.kind.value for layer in self.layers if isinstance(layer, Act)}))
        return f"MLP {widths}{f' ({kinds})' if kinds else ''}, {size}"


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model with its likelihood: the loss is the mean NLL plus l2/2 |theta|^2 (DESIGN 4).

    l2 is a Gaussian prior's precision divided by N (vecfield: 1/(0.1 N)); it enters the loss, the
    gradient and the true Fisher, never the empirical Fisher. logit_clip, for Bernoulli only, clips
    logits to +-logit_clip with a straight-through gradient (the paper code's mean clipping).
    """

    model: Model
    likelihood: Likelihood
    l2: float = 0.0
    logit_clip: float | None = None

    def __post_init__(self):
        if not isinstance(self.model, Model):  # (a torch.nn.Module, say: it would fail at the first step)
            raise TypeError(f"model: a natgrad_impls.models.Model (linear, mlp, cnn or Model(layers, input_shape)), "
                            f"not {type(self.model).__name__}")
        object.__setattr__(self, "likelihood", parse(Likelihood, self.likelihood, "likelihood"))
        if self.logit_clip is not None and self.likelihood != Likelihood.BERNOULLI:
            raise ValueError(f"logit_clip: only the bernoulli likelihood clips, not {self.likelihood}")

    def factor_columns(self, curvature: Curvature | str, batch_size: int, samples: int = 1) -> int:
        """Columns of a batch's curvature factor U (the frameworks' `FactorCurvature.num_columns`):
        per example, its gradient (the EF), the output Fisher root's rank (exact: k - 1 of k classes,
        else the k outputs) or `samples` residuals at drawn labels (MC)."""
        curvature = parse(Curvature, curvature, "curvature")
        if curvature == Curvature.EMPIRICAL:
            return batch_size
        if curvature == Curvature.MC:
            return samples * batch_size
        outputs = self.model.num_outputs
        return (outputs - 1 if self.likelihood == Likelihood.CATEGORICAL else outputs) * batch_size

    def check_targets(self, f_shape, f_dtype, y_shape, y_dtype, y_integer: bool) -> None:
        """A ValueError naming the batch's y where it does not fit the outputs f (N x k): y of f's
        shape and dtype with gaussian and bernoulli (a y of (N,) would broadcast against f to N x N;
        jax's curvature refuses another dtype deep inside a VJP), integer class labels of shape (N,)
        with categorical. Shapes and dtypes only: no host sync, and in jax nothing traced."""
        if self.likelihood == Likelihood.CATEGORICAL:
            if tuple(y_shape) != tuple(f_shape[:-1]) or not y_integer:
                kind = "integer" if y_integer else "float"
                raise ValueError(f"batch: y must be integer class labels of shape {tuple(f_shape[:-1])} for a "
                                 f"categorical likelihood, not {kind} of {tuple(y_shape)}")
        elif tuple(y_shape) != tuple(f_shape):
            raise ValueError(f"batch: y must have the outputs' shape {tuple(f_shape)} for a {self.likelihood} "
                             f"likelihood, not {tuple(y_shape)}")
        elif y_dtype != f_dtype:
            raise ValueError(f"batch: y is {y_dtype} and the outputs are {f_dtype}: give them one dtype")


# The paper code clips the Bernoulli mean to [1e-8, 1 - 1e-8]; on the logit that is +-this.
KUNSTNER_LOGIT_CLIP = math.log((1 - 1e-8) / 1e-8)


def check_inputs(model: Model, x_shape, x_dtype=None, param_dtype=None) -> None:
    """A ValueError naming the batch's x where its examples are not of the model's input_shape
    (torch and jax stopped at the first product with an error about matrices), or its dtype is not
    the parameters' (torch would stop there too, jax would promote the step to float64 and return
    float64 parameters; not checked where a dtype is None: the numpy reference's float64 copy)."""
    if tuple(x_shape[1:]) != tuple(model.input_shape):
        expected = ", ".join(["N", *map(str, model.input_shape)])
        raise ValueError(f"batch: x must be of shape ({expected}) for this model, not {tuple(x_shape)}")
    if x_dtype != param_dtype:
        raise ValueError(f"batch: x is {x_dtype} and the parameters are {param_dtype}: give them one dtype")


def logit_clip_name(problem: Problem) -> str | None:
    """A result's `logit_clip` column: paper, none (names.LogitClip) or a clip of the caller's own
    as a number; None where the likelihood is not Bernoulli (the column is left out)."""
    if problem.likelihood != Likelihood.BERNOULLI:
        return None
    if problem.logit_clip is None:
        return LogitClip.NONE.value
    return LogitClip.PAPER.value if problem.logit_clip == KUNSTNER_LOGIT_CLIP else f"{problem.logit_clip:g}"


def linear(in_features: int, out_features: int = 1, bias: bool = False) -> Model:
    """Linear model; the Kunstner tasks carry their bias as a column of ones in the data."""
    return Model((Dense(in_features, out_features, bias),), (in_features,))


def mlp(sizes: tuple[int, ...], activation: Activation | str = Activation.TANH) -> Model:
    """Dense layers of the given sizes, with `activation` between them (none after the last)."""
    activation = parse(Activation, activation, "activation")
    layers: list[Layer] = []
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if index:
            layers.append(Act(activation))
        layers.append(Dense(n_in, n_out))
    return Model(tuple(layers), (sizes[0],))


def cnn(
    input_shape: tuple[int, int, int],
    channels: tuple[int, ...],
    dense: tuple[int, ...],
    kernel_size: int = 3,
    activation: Activation | str = Activation.RELU,
) -> Model:
    """Conv(k, 'same') + activation + 2x2 max-pool per entry of `channels`, then an MLP on the
    flattened features whose hidden and output sizes are `dense` (DeepOBS 2c2d/3c3d in spirit)."""
    activation = parse(Activation, activation, "activation")
    c, h, w = input_shape
    layers: list[Layer] = []
    for out in channels:
        layers += [Conv2d(c, out, kernel_size, padding=kernel_size // 2), Act(activation), MaxPool2d(2, 2)]
        c, h, w = out, h // 2, w // 2
    layers.append(Flatten())
    sizes = (c * h * w, *dense)
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if index:
            layers.append(Act(activation))
        layers.append(Dense(n_in, n_out))
    return Model(tuple(layers), input_shape)


def autoencoder(sizes: tuple[int, ...] = (784, 1000, 500, 250, 30), activation=Activation.SIGMOID) -> Model:
    """The symmetric deep autoencoder of the K-FAC paper: encoder `sizes`, mirrored decoder, linear
    code layer, logits out (pair with the bernoulli likelihood)."""
    activation = parse(Activation, activation, "activation")
    widths = (*sizes, *reversed(sizes[:-1]))
    layers: list[Layer] = []
    code = len(sizes) - 1
    for index, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        if index and index != code:
            layers.append(Act(activation))
        layers.append(Dense(n_in, n_out))
    return Model(tuple(layers), (sizes[0],))


RANDOM_STREAMS = ("labels", "batches", "chaos", "timing_rows")  # what a seed draws in numpy, beside init_params


def random_stream(seed: int, purpose: str, *counters: int) -> np.random.Generator:
    """numpy's generator for one purpose of a seed (RANDOM_STREAMS: the MC Fisher's labels of a
    step, a run's mini-batch order, the grid's chaos noise, the rows of a timing batch), independent
    of every other purpose's and of `init_params`' default_rng(seed). Not default_rng((seed, k)):
    numpy pads a seed tuple with zeros, so (seed, 0) would be default_rng(seed) itself, and (seed, 2)
    the labels of step 2 as well as the chaos noise; a spawn key keeps the streams apart."""
    key = (RANDOM_STREAMS.index(purpose) + 1, *counters)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def init_params(model: Model, seed: int, scheme: str = "glorot", dtype=np.float64) -> dict[str, np.ndarray]:
    """Parameters drawn in NumPy from `seed`: Glorot-uniform weights and zero biases ("glorot"), or
    all zeros ("zeros", the Kunstner protocol's theta0 = 0)."""
    if scheme not in ("glorot", "zeros"):
        raise ValueError(f"scheme: {scheme!r} is not one of glorot, zeros")
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in model.param_shapes().items():
        if scheme == "zeros" or name.endswith(".bias"):
            params[name] = np.zeros(shape, dtype=dtype)
        else:
            receptive = math.prod(shape[2:])
            fan_out, fan_in = shape[0] * receptive, shape[1] * receptive
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            params[name] = rng.uniform(-bound, bound, size=shape).astype(dtype)
    return params


def flatten(model: Model, params: dict) -> np.ndarray:
    """The canonical flat vector of a NumPy parameter dict (`Model.param_names` order)."""
    return np.concatenate([np.asarray(params[name]).reshape(-1) for name in model.param_names()])


def unflatten(model: Model, vector: np.ndarray) -> dict[str, np.ndarray]:
    params, offset = {}, 0
    for name, shape in model.param_shapes().items():
        size = math.prod(shape)
        params[name] = np.asarray(vector[offset : offset + size]).reshape(shape)
        offset += size
    return params
