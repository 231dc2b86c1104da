"""PyTorch implementations: `natgrad_impls.torch.<optimizer>(problem, **hyperparameters)`."""

import torch

from natgrad_impls.names import Optimizer
from natgrad_impls.torch.model import loss, output, to_torch
from natgrad_impls.torch.optimizers import FunctionalOptimizer, adam, ef, kfac, ngd, sgd

# float32 means float32, as in natgrad_impls.jax: torch's float32 matrix products are full precision
# by default, but its cuDNN convolutions run in TF32 on Ampere and newer GPUs (about 1e-3 relative),
# which would set the CNN tasks' torch runs and timings apart from jax's on a GPU. (The legacy flag:
# it sets cuDNN's convolutions and RNNs alike, where the newer per-operator ones would leave the
# legacy getters, which libraries still read, raising on the mismatch.)
torch.backends.cudnn.allow_tf32 = False

OPTIMIZERS = {Optimizer.SGD: sgd, Optimizer.ADAM: adam, Optimizer.EF: ef, Optimizer.NGD: ngd, Optimizer.KFAC: kfac}

__all__ = ["OPTIMIZERS", "FunctionalOptimizer", "adam", "ef", "kfac", "loss", "ngd", "output", "sgd", "to_torch"]
