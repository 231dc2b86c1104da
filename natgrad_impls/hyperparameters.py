"""Validated hyperparameters, shared by the numpy, torch and jax optimizers (DESIGN 3).

One frozen dataclass per optimizer, so the three frameworks accept exactly the same arguments and
reject bad ones with the same ValueError naming the argument; and the paper's lr and damping grids,
the ranges `natgrad grid` searches by default.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers

from natgrad_impls.names import Fisher, Optimizer, parse


# The lr and damping grids' log10 bounds (start, stop, number): the paper's np.logspace(-20, 10, 241)
# and np.logspace(-10, 10, 41), `natgrad grid`'s defaults. Here, not in grid, so that the CLI's help
# can name them without importing grid's numerical stack.
PAPER_LRS = (-20.0, 10.0, 241)
PAPER_DAMPINGS = (-10.0, 10.0, 41)


def bounds_text(bounds) -> str:
    """(start, stop, num) log10 bounds as the CLI and config write them: (-20.0, 10.0, 241) -> '-20:10:241'."""
    return ":".join(str(int(value)) if float(value).is_integer() else repr(float(value)) for value in bounds)


def _check(condition: bool, name: str, value, requirement: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {value!r} must be {requirement}")


def _as_python_scalars(hyperparameters) -> None:
    """NumPy scalars (a value read from an array) as the Python numbers they hold: every framework
    takes those (torch.Generator.manual_seed refuses np.int64), and so do the result columns."""
    for field in dataclasses.fields(hyperparameters):
        value = getattr(hyperparameters, field.name)
        if isinstance(value, numbers.Number) and type(value).__module__ == "numpy":
            object.__setattr__(hyperparameters, field.name, value.item())


def is_finite_number(value) -> bool:
    """A finite real number (a Python or NumPy int or float: numbers.Real), not a bool: an int to
    Python, but `"lr": true` is a mistake, not lr 1."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value) -> bool:
    """A Python or NumPy integer (numbers.Integral), not a bool: an int to Python, but `true` in a
    JSON file is a slip. Also what the runner checks seeds and batch sizes with."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SGD:
    lr: float
    momentum: float = 0.0

    def __post_init__(self):
        _as_python_scalars(self)
        _check(is_finite_number(self.lr) and self.lr >= 0, "lr", self.lr, "a finite number >= 0")
        _check(is_finite_number(self.momentum) and 0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Adam:
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        _as_python_scalars(self)
        _check(is_finite_number(self.lr) and self.lr >= 0, "lr", self.lr, "a finite number >= 0")
        _check(is_finite_number(self.b1) and 0 <= self.b1 < 1, "b1", self.b1, "in [0, 1)")
        _check(is_finite_number(self.b2) and 0 <= self.b2 < 1, "b2", self.b2, "in [0, 1)")
        _check(is_finite_number(self.eps) and self.eps >= 0, "eps", self.eps, "a finite number >= 0")


def _check_samples_drawn(fisher: Fisher, samples: int) -> None:
    """More than one label per example only where labels are drawn: with the exact Fisher, `samples`
    would be dropped without a word (and no result column would say it was asked for)."""
    _check(fisher == Fisher.MC or samples == 1, "samples", samples, "1 with fisher exact (only mc draws labels)")


def structurally_singular(shift: float, columns: int, size: int) -> bool:
    """Whether U U^T + shift I, U with `columns` columns of length `size` (a curvature's factor: per-example
    gradients, Fisher roots), is singular whatever the data: shift 0 and rank <= columns < size. An LU
    solve misses it, its zero pivots perturbed by round-off, and returns finite, arbitrary numbers."""
    return shift == 0 and columns < size


@dataclasses.dataclass(frozen=True)
class NaturalGradient:
    """`ef` and `ngd`: theta <- theta - lr (C + damping I)^-1 g.

    damping may be 0 only where C (plus the problem's l2 term) is invertible: small D, dense solve.
    Where C has fewer columns than parameters it is singular whatever the data, the step's solve
    gives NaN and the run diverges at the next step (in every framework alike:
    `structurally_singular` names the case that round-off would otherwise hide). A C singular by
    its data alone (repeated examples, collinear features) is not detected: LU's round-off pivots
    give a finite step, arbitrary along C's null space and different in each framework, so give
    such a task a damping > 0.
    """

    lr: float
    damping: float
    fisher: Fisher = Fisher.EXACT  # ignored by `ef`
    samples: int = 1  # labels drawn per example when fisher is mc
    seed: int = 0  # seeds the mc label sampler

    def __post_init__(self):
        _as_python_scalars(self)
        _check(is_finite_number(self.lr) and self.lr >= 0, "lr", self.lr, "a finite number >= 0")
        _check(is_finite_number(self.damping) and self.damping >= 0, "damping", self.damping, "a finite number >= 0")
        object.__setattr__(self, "fisher", parse(Fisher, self.fisher, "fisher"))
        _check(is_integer(self.samples) and self.samples >= 1, "samples", self.samples, "an integer >= 1")
        _check_samples_drawn(self.fisher, self.samples)
        _check(is_integer(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")


@dataclasses.dataclass(frozen=True)
class KFAC:
    lr: float
    damping: float
    kfac_update_period: int = 10
    kfac_ema: float = 0.95
    fisher: Fisher = Fisher.MC
    samples: int = 1
    seed: int = 0

    def __post_init__(self):
        _as_python_scalars(self)
        _check(is_finite_number(self.lr) and self.lr >= 0, "lr", self.lr, "a finite number >= 0")
        _check(is_finite_number(self.damping) and self.damping > 0, "damping", self.damping, "a finite number > 0")
        _check(is_integer(self.kfac_update_period) and self.kfac_update_period >= 1,
               "kfac_update_period", self.kfac_update_period, "an integer >= 1")
        _check(is_finite_number(self.kfac_ema) and 0 <= self.kfac_ema < 1, "kfac_ema", self.kfac_ema, "in [0, 1)")
        object.__setattr__(self, "fisher", parse(Fisher, self.fisher, "fisher"))
        _check(is_integer(self.samples) and self.samples >= 1, "samples", self.samples, "an integer >= 1")
        _check_samples_drawn(self.fisher, self.samples)
        _check(is_integer(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")


HYPERPARAMETERS = {
    Optimizer.SGD: SGD,
    Optimizer.ADAM: Adam,
    Optimizer.EF: NaturalGradient,
    Optimizer.NGD: NaturalGradient,
    Optimizer.KFAC: KFAC,
}


# The arguments of every optimizer, described once for the three frameworks (DESIGN 5 asks each
# optimizer's docstring for them; `documented` appends them, with the signature's defaults).
ARGUMENTS = {
    "problem": "the model and its likelihood (natgrad_impls.models.Problem)",
    "lr": "step size, >= 0",
    "momentum": "heavy-ball coefficient in [0, 1); 0 is plain gradient descent",
    "b1": "decay of the gradient's moving average, in [0, 1)",
    "b2": "decay of the squared gradient's moving average, in [0, 1)",
    "eps": "added to the square root of the second moment (outside it), >= 0",
    "damping": "added to the curvature's diagonal, >= 0 (> 0 for kfac, whose factors are split by pi); 0 "
               "leaves ef's and ngd's curvature singular where it has fewer columns (examples, or examples x "
               "outputs) than parameters, as a network's has: the step is NaN (`natgrad run` refuses it there)",
    "fisher": "exact (the output Fisher in closed form) or mc (labels drawn from the model)",
    "samples": "labels drawn per example when fisher is mc, >= 1",
    "seed": "seeds the mc label sampler (with the step), >= 0",
    "kfac_update_period": "steps between refreshes of the damped inverses, >= 1",
    "kfac_ema": "decay of the factors' moving average, in [0, 1)",
}


def documented(optimizer):
    """`optimizer` with an Arguments section, from ARGUMENTS and its signature, after its docstring.
    Also where each framework's signature is held to the dataclass's defaults (TypeError at import
    where one drifts): the runner, grid and CLI take their defaults from the dataclasses, a direct
    call from the signature, and the two must not tell different stories."""
    validated = HYPERPARAMETERS[Optimizer(optimizer.__name__)]
    fields = {f.name: _default(f) for f in dataclasses.fields(validated)}
    lines = []
    for name, parameter in inspect.signature(optimizer).parameters.items():
        default = parameter.default
        if name in fields and default != fields[name]:
            raise TypeError(f"{optimizer.__module__}.{optimizer.__name__}: {name} defaults to {default!r}, "
                            f"hyperparameters.{validated.__name__} to {fields[name]!r}")
        default = "" if default is inspect.Parameter.empty else f"; default {getattr(default, 'value', default)}"
        lines.append(f"        {name}: {ARGUMENTS[name]}{default}")
    optimizer.__doc__ = f"{(optimizer.__doc__ or '').rstrip()}\n\n    Arguments:\n" + "\n".join(lines) + "\n"
    return optimizer


def _default(field: dataclasses.Field):
    """A dataclass field's default, as inspect spells "none" (Parameter.empty)."""
    return inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
