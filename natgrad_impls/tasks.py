"""The task registry (DESIGN 6): a data set, a model with its likelihood, and a batch policy.

    task = get_task("breastcancer")
    (X, y), test = task.load(seed=0)      # float64 NumPy; test is None for the convex Kunstner tasks

Shapes: X is (N, D) for linear models and MLPs and (N, C, H, W) for CNNs; y is (N, 1) float for the
gaussian and bernoulli tasks with one output, (N,) int64 for categorical tasks and (N, 784) for the
autoencoder (its target is its input).

Seeds: the real data sets never depend on `seed` (fixed splits, so that seeds only move the
initialisation and the batch order); the generated toys (`vecfield`, `misspec`) are drawn from it,
with NumPy's legacy RandomState so that seed 0 gives the data of Kunstner et al.'s code bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import random
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from natgrad_impls import data, models
from natgrad_impls.models import (
    KUNSTNER_LOGIT_CLIP, Act, Conv2d, Dense, Flatten, MaxPool2d, Model, Problem,
)
from natgrad_impls.names import Activation, Likelihood, LogitClip, parse


class Split(NamedTuple):
    X: np.ndarray
    y: np.ndarray


class Dataset(NamedTuple):
    train: Split
    test: Split | None


@dataclasses.dataclass(frozen=True)
class Task:
    """A benchmark task. `n_train` is known without loading (for `natgrad tasks` offline);
    `batch_size=None` means full batch; `steps` is the default number of optimizer steps."""

    name: str
    problem: Problem
    offline: bool
    source: str
    n_train: int
    batch_size: int | None
    steps: int
    loader: Callable[[int], Dataset] = dataclasses.field(repr=False, compare=False)
    variant: str | None = None  # misspec only: which of its data sets
    variants: tuple[str, ...] = ()

    def load(self, seed: int = 0, dtype=np.float64) -> Dataset:
        """Train (and test, or None) arrays; floating arrays in `dtype`, integer labels as int64.
        ValueError naming the split where a categorical task's labels are not its classes' indices:
        torch's steps would stop at an index error, and jax, which cannot check on the device, would
        give a label out of range a NaN loss (a divergence at step 0), a negative one a wrong finite one."""
        train, test = self.loader(seed)

        def cast(split, name):
            if split is None:
                return None
            y = split.y if split.y.dtype.kind in "iu" else split.y.astype(dtype, copy=False)
            categorical = self.problem.likelihood == Likelihood.CATEGORICAL
            if categorical and len(y) and (y.min() < 0 or y.max() >= self.classes):
                raise ValueError(f"{self.name} {name}: labels from {y.min()} to {y.max()}, not class indices "
                                 f"0 to {self.classes - 1}")
            return Split(np.ascontiguousarray(split.X, dtype=dtype), np.ascontiguousarray(y))

        return Dataset(cast(train, "train"), cast(test, "test"))

    @property
    def classes(self) -> int | None:
        """Number of classes: categorical outputs, 2 for one Bernoulli output, else None."""
        outputs = self.problem.model.num_outputs
        if self.problem.likelihood == Likelihood.CATEGORICAL:
            return outputs
        return 2 if self.problem.likelihood == Likelihood.BERNOULLI and outputs == 1 else None

    def with_logit_clip(self, clip: LogitClip | str) -> Task:
        """The same task with its Bernoulli logits clipped as the paper code does (`paper`) or not
        (`none`: the exact likelihood). `none` leaves a task without a Bernoulli likelihood as it is."""
        clip = parse(LogitClip, clip, "logit_clip")
        if self.problem.likelihood != Likelihood.BERNOULLI:
            if clip == LogitClip.PAPER:
                raise ValueError(f"logit_clip: 'paper' clips a bernoulli likelihood; task {self.name!r} is "
                                 f"{self.problem.likelihood.value} (one of none)")
            return self
        value = KUNSTNER_LOGIT_CLIP if clip == LogitClip.PAPER else None
        return dataclasses.replace(self, problem=dataclasses.replace(self.problem, logit_clip=value))

    def with_variant(self, variant: str) -> Task:
        if not self.variants:
            raise ValueError(f"variant: {self.name} has no variants (misspec has: {', '.join(MISSPEC_VARIANTS)})")
        if variant not in self.variants:
            raise ValueError(f"variant: {variant!r} is not one of {', '.join(self.variants)}")
        task = _misspec(variant)
        if self.problem.likelihood == task.problem.likelihood == Likelihood.BERNOULLI:  # keep the clip chosen before
            clipped = dataclasses.replace(task.problem, logit_clip=self.problem.logit_clip)
            task = dataclasses.replace(task, problem=clipped)
        return task


def _split(X, y) -> Split:
    return Split(np.asarray(X), np.asarray(y))


# -- Kunstner et al. (2019), figure 3: raw features, a column of ones appended LAST ----------------

def _kunstner(X, y) -> Dataset:
    X = np.asarray(X, dtype=np.float64)
    X = np.hstack([X, np.ones((X.shape[0], 1))])
    return Dataset(_split(X, np.asarray(y, dtype=np.float64).reshape(-1, 1)), None)


def _kunstner_task(name, features, likelihood, source, n, loader, offline) -> Task:
    # The paper code clips the Bernoulli mean everywhere (DESIGN 4); with_logit_clip('none') switches it off.
    clip = KUNSTNER_LOGIT_CLIP if likelihood == "bernoulli" else None
    problem = Problem(models.linear(features + 1, 1, bias=False), likelihood, logit_clip=clip)
    return Task(name, problem, offline, source, n, None, 100, loader)


def _wine(seed):
    d = _packaged("scikit-learn-wine", "scikit-learn", functools.partial(_scikit_learn_set, "load_wine"))
    return _kunstner(d["X"], d["y"])  # the class label as a real number, as in the paper


def _breastcancer(seed):
    d = _packaged("scikit-learn-breastcancer", "scikit-learn",
                  functools.partial(_scikit_learn_set, "load_breast_cancer"))
    return _kunstner(d["X"], d["y"])


def _scikit_learn_set(loader: str) -> dict[str, np.ndarray]:
    import sklearn.datasets

    X, y = getattr(sklearn.datasets, loader)(return_X_y=True)
    return {"X": X, "y": y}


def _packaged(name: str, package: str, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays of an offline data set that `make` builds from an installed `package`, made once
    per version of the package and per recipe (`_recipe`: a change to `make` must not be hidden by a
    file made before it), then read back from the data cache (data.generated,
    `generated/<name>-<version>-<recipe>.npz`). Importing scikit-learn alone takes 0.7 s and
    generating MNIST-1D 0.9 s, which every pipeline job on these tasks paid; a read takes 0.03 s."""
    from importlib.metadata import version

    return data.generated(f"{name}-{version(package)}-{_recipe(make)}", make)


def _recipe(make) -> str:
    """8 hex digits of the sha256 of `make`'s source code (with a partial's arguments): what, beside
    the package, fixes the arrays. An edit to the comments in `make` only costs one remake."""
    import hashlib
    import inspect

    func, args = (make.func, make.args) if isinstance(make, functools.partial) else (make, ())
    return hashlib.sha256((inspect.getsource(func) + repr(args)).encode()).hexdigest()[:8]


A1A_SHAPE = (1605, 123)  # LIBSVM's a1a, examples x features


def _a1a(seed):
    resource = data.RESOURCES["a1a"]
    X, y = data.read_libsvm(data.fetch(resource), n_features=A1A_SHAPE[1])
    if resource.sha256 is None and X.shape != A1A_SHAPE:  # no checksum tells another file from a1a
        raise data.DataUnavailable(
            f"a1a: {data.cache_path(resource)} has {len(X)} examples where LIBSVM's a1a has {A1A_SHAPE[0]}: "
            f"another file; delete it and run again to download a1a, or put LIBSVM's a1a there by hand")
    return _kunstner(X, (y + 1) / 2)  # labels -1/+1 -> 0/1


def _energy(seed):
    # First output (Y1, heating load), as in the UCI splits the paper code reads.
    table = data.numeric_rows(data.read_xlsx(data.fetch(data.RESOURCES["energy"])), 10)
    return _kunstner(table[:, :8], table[:, 8])


def _powerplant(seed):
    member = data.read_zip_member(data.fetch(data.RESOURCES["powerplant"]), "CCPP/Folds5x2_pp.xlsx")
    table = data.numeric_rows(data.read_xlsx(io.BytesIO(member)), 5)  # Sheet1: AT, V, AP, RH -> PE
    return _kunstner(table[:, :4], table[:, 4])


def _yacht(seed):
    table = data.read_table(data.fetch(data.RESOURCES["yacht"]))
    return _kunstner(table[:, :6], table[:, 6])


# -- Kunstner et al. (2019), figures 1 and 2: generated toys ---------------------------------------
TOY_N = 1000
PRIOR_VARIANCE = 0.1  # the paper's Gaussian prior on the linear toys: l2 = 1 / (0.1 N)


def _vecfield(seed):
    rng = np.random.RandomState(seed)  # legacy stream: seed 0 reproduces the paper's data
    X = np.hstack([np.ones((TOY_N, 1)), rng.lognormal(0.0, 0.75, (TOY_N, 1))])  # bias FIRST here
    y = X @ np.array([[2.0], [2.0]]) + rng.randn(TOY_N, 1)
    return Dataset(_split(X, y), None)


# Logistic sets: two classes of N/2 points each, x = mean + z A with z ~ N(0, I), so the class
# covariance is A^T A. Label 0 for the first class, 1 for the second. No bias, no prior.
_LOGISTIC = {
    "logistic-correct": (((1, 1), 2 * np.eye(2)), ((-1, -1), 2 * np.eye(2))),
    # misspecified (A): unequal class covariances
    "logistic-misspecified-a": (((1.5, 1.5), 3 * np.eye(2)), ((-1.5, -1.5), np.eye(2))),
    # misspecified (B): correlated classes, tilted in opposite directions
    "logistic-misspecified-b": (
        ((1, 1), 1.5 * np.array([[1, -0.6], [-0.6, 1]])),
        ((-1, -1), 1.5 * np.array([[1, 0.6], [0.6, 1]])),
    ),
}
# Linear sets (appendix): x ~ N(0, 1), inputs [x, 1] (bias LAST), y = x + 1 (+ a term the model
# lacks) + noise, added in that order as the paper code does (bit for bit); prior var 0.1.
# variant: (the missing term, or None; the noise's standard deviation)
_LINEAR = {
    "linear-correct": (None, 1.0),
    "linear-misspecified-a": (None, 2.0),  # noise of the wrong scale
    "linear-misspecified-b": (lambda x: 0.5 * x**2, 1.0),  # missing quadratic term
}
MISSPEC_VARIANTS = (*_LOGISTIC, *_LINEAR)


def _logistic_set(variant, seed):
    rng = np.random.RandomState(seed)
    half = TOY_N // 2
    X = np.vstack([np.asarray(mean) + rng.randn(half, 2) @ scale for mean, scale in _LOGISTIC[variant]])
    y = np.vstack([np.zeros((half, 1)), np.ones((half, 1))])
    return Dataset(_split(X, y), None)


def _linear_set(variant, seed):
    rng = np.random.RandomState(seed)
    x = rng.randn(TOY_N, 1)
    X = np.hstack([x, np.ones((TOY_N, 1))])
    missing, noise = _LINEAR[variant]
    y = X @ np.array([[1.0], [1.0]])
    if missing is not None:
        y = y + missing(x)
    y = y + noise * rng.randn(TOY_N, 1)
    return Dataset(_split(X, y), None)


def _misspec(variant: str) -> Task:
    if variant in _LOGISTIC:
        # same likelihood code as the paper's other logistic problems, so clipped by default
        problem = Problem(models.linear(2, 1), Likelihood.BERNOULLI, logit_clip=KUNSTNER_LOGIT_CLIP)
        loader = functools.partial(_logistic_set, variant)
    else:
        problem = Problem(models.linear(2, 1), Likelihood.GAUSSIAN, l2=1 / (PRIOR_VARIANCE * TOY_N))
        loader = functools.partial(_linear_set, variant)
    source = f"generated: Kunstner et al. 2019 fig. 2 / appendix ({variant})"
    return Task("misspec", problem, True, source, TOY_N, None, 100, loader, variant, MISSPEC_VARIANTS)


def misspec_sets(seed: int = 0) -> dict[str, tuple[Task, Dataset]]:
    """Every misspec variant with its data: {variant: (task, dataset)}."""
    return {v: (task, task.load(seed)) for v in MISSPEC_VARIANTS for task in [_misspec(v)]}


# -- small networks, offline -----------------------------------------------------------------------

def _digits(seed):
    d = _packaged("scikit-learn-digits", "scikit-learn", _make_digits)
    return Dataset(_split(d["x"], d["y"]), _split(d["x_test"], d["y_test"]))


def _make_digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    # A fixed stratified 80/20 split, whatever the seed.
    X_tr, X_te, y_tr, y_te = train_test_split(X / 16.0, y.astype(np.int64), test_size=0.2, random_state=0, stratify=y)
    return {"x": X_tr, "y": y_tr, "x_test": X_te, "y_test": y_te}


def _make_mnist1d() -> dict[str, np.ndarray]:
    # make_dataset generates the data set locally (get_dataset would try to download a pickle
    # first). It seeds NumPy's and Python's global generators, so restore them afterwards.
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {key: np.asarray(d[key]) for key in ("x", "y", "x_test", "y_test")}


def _mnist1d(seed):
    # The standard MNIST-1D (mnist1d's default arguments fix the generator); making it means scipy
    # interpolation of 5000 signals and importing mnist1d, which imports pyplot.
    d = _packaged("mnist1d", "mnist1d", _make_mnist1d)
    return Dataset(_split(d["x"], d["y"].astype(np.int64)), _split(d["x_test"], d["y_test"].astype(np.int64)))


# -- larger networks, download ---------------------------------------------------------------------

def _idx_set(prefix, image_shape):
    def split(part):
        images = data.read_idx(data.fetch(data.RESOURCES[f"{prefix}/{part}-images"]))
        labels = data.read_idx(data.fetch(data.RESOURCES[f"{prefix}/{part}-labels"]))
        return _split(images.reshape(len(images), *image_shape) / 255.0, labels.astype(np.int64))

    return Dataset(split("train"), split("test"))


def _mnist(seed):
    return _idx_set("mnist", (784,))


def _fashionmnist(seed):
    return _idx_set("fashion-mnist", (1, 28, 28))


def _cifar10(seed):
    (X, y), (X_te, y_te) = data.read_cifar10(data.fetch(data.RESOURCES["cifar10"]))
    return Dataset(_split(X / 255.0, y), _split(X_te / 255.0, y_te))


def _mnist_autoencoder(seed):
    train, test = _mnist(seed)
    # Bernoulli likelihood on the grey values in [0, 1]: the target is the input.
    return Dataset(_split(train.X, train.X.copy()), _split(test.X, test.X.copy()))


def cifar10_3c3d() -> Model:
    """DeepOBS cifar10_3c3d: conv 5x5 64 (valid), conv 3x3 96 (valid), conv 3x3 128 (same), each
    followed by relu and a 3x3 stride-2 max-pool, then dense 512, 256, 10. TensorFlow's 'same'
    pooling pads asymmetrically; padding 1 on both sides gives the same sizes (28->14, 12->6, 6->3)."""
    relu = Act(Activation.RELU)
    pool = MaxPool2d(3, 2, padding=1)
    return Model(
        (
            Conv2d(3, 64, 5), relu, pool,
            Conv2d(64, 96, 3), relu, pool,
            Conv2d(96, 128, 3, padding=1), relu, pool,
            Flatten(), Dense(128 * 3 * 3, 512), relu, Dense(512, 256), relu, Dense(256, 10),
        ),
        (3, 32, 32),
    )


def _url(key: str) -> str:
    return data.RESOURCES[key].url


TASKS: dict[str, Task] = {
    "wine": _kunstner_task("wine", 13, "gaussian", "scikit-learn load_wine", 178, _wine, True),
    "breastcancer": _kunstner_task(
        "breastcancer", 30, "bernoulli", "scikit-learn load_breast_cancer", 569, _breastcancer, True
    ),
    "a1a": _kunstner_task("a1a", A1A_SHAPE[1], "bernoulli", f"LIBSVM a1a ({_url('a1a')})", A1A_SHAPE[0], _a1a,
                          False),
    "energy": _kunstner_task(
        "energy", 8, "gaussian", f"UCI energy efficiency, Y1 ({_url('energy')})", 768, _energy, False
    ),
    "powerplant": _kunstner_task(
        "powerplant", 4, "gaussian", f"UCI combined cycle power plant ({_url('powerplant')})", 9568, _powerplant, False
    ),
    "yacht": _kunstner_task("yacht", 6, "gaussian", f"UCI yacht hydrodynamics ({_url('yacht')})", 308, _yacht, False),
    "vecfield": Task(
        "vecfield",
        Problem(models.linear(2, 1), Likelihood.GAUSSIAN, l2=1 / (PRIOR_VARIANCE * TOY_N)),
        True, "generated: Kunstner et al. 2019 fig. 1", TOY_N, None, 100, _vecfield,
    ),
    "misspec": _misspec("logistic-correct"),
    # tanh: smooth, so Fisher, GGN and finite-difference checks see no relu kinks on this small
    # test bed; one hidden layer of 128 keeps dense references (9,610 parameters) affordable.
    "digits-mlp": Task(
        "digits-mlp", Problem(models.mlp((64, 128, 10), Activation.TANH), Likelihood.CATEGORICAL),
        True, "scikit-learn load_digits, fixed stratified 80/20 split", 1437, 128, 1000, _digits,
    ),
    # relu, as in the MNIST-1D paper's MLP baseline.
    "mnist1d-mlp": Task(
        "mnist1d-mlp", Problem(models.mlp((40, 100, 100, 10), Activation.RELU), Likelihood.CATEGORICAL),
        True, "mnist1d make_dataset (standard arguments, generated locally)", 4000, 128, 1000, _mnist1d,
    ),
    # DeepOBS mnist_mlp.
    "mnist-mlp": Task(
        "mnist-mlp", Problem(models.mlp((784, 1000, 500, 100, 10), Activation.RELU), Likelihood.CATEGORICAL),
        False, f"MNIST ({_url('mnist/train-images')})", 60000, 128, 2000, _mnist,
    ),
    # DeepOBS fmnist_2c2d: 5x5 'same' convolutions of 32 and 64 channels, 2x2 pools, dense 1024, 10.
    "fashionmnist-cnn": Task(
        "fashionmnist-cnn",
        Problem(models.cnn((1, 28, 28), (32, 64), (1024, 10), kernel_size=5), Likelihood.CATEGORICAL),
        False, f"Fashion-MNIST ({_url('fashion-mnist/train-images')})", 60000, 128, 2000, _fashionmnist,
    ),
    "cifar10-cnn": Task(
        "cifar10-cnn", Problem(cifar10_3c3d(), Likelihood.CATEGORICAL),
        False, f"CIFAR-10 ({_url('cifar10')})", 50000, 128, 2000, _cifar10,
    ),
    # Batch 1000: the K-FAC paper trains its autoencoders with large mini-batches.
    "mnist-autoencoder": Task(
        "mnist-autoencoder", Problem(models.autoencoder(), Likelihood.BERNOULLI),
        False, f"MNIST ({_url('mnist/train-images')})", 60000, 1000, 2000, _mnist_autoencoder,
    ),
}


def get_task(name: str, variant: str | None = None) -> Task:
    """The task called `name` (and, for `misspec`, the given variant), or a ValueError naming the
    field and the allowed values, in the format of `names.parse`."""
    if name not in TASKS:
        raise ValueError(f"task: {name!r} is not one of {', '.join(TASKS)}")
    task = TASKS[name]
    return task.with_variant(variant) if variant is not None else task
