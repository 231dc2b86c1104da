"""PyTorch implementations: `natgrad_impls.torch.<optimizer>(problem, **hyperparameters)`."""

from natgrad_impls.names import Optimizer
from natgrad_impls.torch.model import loss, output, to_torch
from natgrad_impls.torch.optimizers import FunctionalOptimizer, adam, ef, kfac, ngd, sgd

OPTIMIZERS = {Optimizer.SGD: sgd, Optimizer.ADAM: adam, Optimizer.EF: ef, Optimizer.NGD: ngd, Optimizer.KFAC: kfac}

__all__ = ["OPTIMIZERS", "FunctionalOptimizer", "adam", "ef", "kfac", "loss", "ngd", "output", "sgd", "to_torch"]
