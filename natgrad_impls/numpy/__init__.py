"""Float64 NumPy reference for the convex tasks: `natgrad_impls.numpy.<optimizer>(problem, ...)`.

One Dense layer with one output, gaussian or bernoulli likelihood, in closed form (see
`reference`); the torch and jax implementations are checked against it.
"""

from natgrad_impls.names import Optimizer
from natgrad_impls.numpy.reference import (
    FunctionalOptimizer,
    adam,
    check_problem,
    ef,
    empirical_fisher,
    fisher,
    gradient,
    kfac,
    loss,
    ngd,
    per_example_gradients,
    sgd,
)

OPTIMIZERS = {Optimizer.SGD: sgd, Optimizer.ADAM: adam, Optimizer.EF: ef, Optimizer.NGD: ngd, Optimizer.KFAC: kfac}

__all__ = ["OPTIMIZERS", "FunctionalOptimizer", "adam", "check_problem", "ef", "empirical_fisher", "fisher",
           "gradient", "kfac", "loss", "ngd", "per_example_gradients", "sgd"]
