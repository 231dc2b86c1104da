"""The suite's vocabulary (DESIGN 3): one Enum per choice, shared by code, CLI, config and files.

Every user-facing string is parsed once, by `parse`, into one of these Enums; the error names the
field and the allowed values so that the CLI and the config validation say the same thing.
"""

from __future__ import annotations

import enum
from typing import TypeVar


class Optimizer(enum.StrEnum):
    SGD = "sgd"
    ADAM = "adam"
    EF = "ef"
    NGD = "ngd"
    KFAC = "kfac"

    @property
    def legend(self) -> str:
        return {"sgd": "SGD", "adam": "Adam", "ef": "EF", "ngd": "NGD", "kfac": "K-FAC"}[self.value]


class Framework(enum.StrEnum):
    NUMPY = "numpy"
    TORCH = "torch"
    JAX = "jax"

    @property
    def legend(self) -> str:
        return {"numpy": "NumPy", "torch": "PyTorch", "jax": "JAX"}[self.value]


class Device(enum.StrEnum):
    CPU = "cpu"
    CUDA = "cuda"

    @property
    def legend(self) -> str:
        return {"cpu": "CPU", "cuda": "GPU"}[self.value]


class DType(enum.StrEnum):
    FLOAT64 = "float64"
    FLOAT32 = "float32"


class Fisher(enum.StrEnum):
    """How `ngd` and `kfac` estimate the true Fisher."""

    EXACT = "exact"  # expectation over the model's predictive distribution, in closed form
    MC = "mc"  # labels sampled from the model


class Curvature(enum.StrEnum):
    EMPIRICAL = "empirical"
    EXACT = "exact"
    MC = "mc"


class Likelihood(enum.StrEnum):
    GAUSSIAN = "gaussian"  # unit noise: l = (f - y)^2 / 2, summed over outputs
    BERNOULLI = "bernoulli"  # sigmoid link on logits, summed over outputs
    CATEGORICAL = "categorical"  # softmax over logits, integer labels


class LogitClip(enum.StrEnum):
    """A Bernoulli likelihood's logits: clipped as Kunstner et al.'s code clips the mean (DESIGN 4),
    or not at all (the exact likelihood). Tasks choose a default; `--logit-clip` overrides it."""

    PAPER = "paper"  # +-log((1 - 1e-8) / 1e-8), straight-through: models.KUNSTNER_LOGIT_CLIP
    NONE = "none"

    @property
    def legend(self) -> str:
        return {"paper": "Logits clipped (paper code)", "none": "Exact likelihood"}[self.value]


class Activation(enum.StrEnum):
    RELU = "relu"
    TANH = "tanh"
    SIGMOID = "sigmoid"


E = TypeVar("E", bound=enum.Enum)


def legends(enum_type: type[Optimizer | Framework | Device]) -> dict[str, str]:
    """{value: legend} of a choice that figures and tables show (SGD, PyTorch, GPU, ...)."""
    return {member.value: member.legend for member in enum_type}


def parse(enum_type: type[E], value: str | E, field: str) -> E:
    """`value` as a member of `enum_type`, or a ValueError naming `field` and the allowed values."""
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        raise ValueError(f"{field}: {value!r} is not one of {allowed}") from None
