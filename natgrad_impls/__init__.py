"""natgrad-bench: SGD, Adam, EF, NGD and K-FAC in NumPy (float64 reference), PyTorch and JAX.

    import natgrad_impls.torch as nt          # or natgrad_impls.jax, natgrad_impls.numpy
    opt = nt.ngd(problem, lr=1.0, damping=1e-4)
    state = opt.init(params)
    params, state, info = opt.step(params, state, batch)

The framework subpackages are imported on demand, so that using one does not load the others.
"""

import importlib

from natgrad_impls.names import Framework, Optimizer, parse

__version__ = "0.1.0"


def make_optimizer(framework, optimizer, problem, **hyperparameters):
    """`natgrad_impls.<framework>.<optimizer>(problem, **hyperparameters)` from names."""
    framework = parse(Framework, framework, "framework")
    optimizer = parse(Optimizer, optimizer, "optimizer")
    module = importlib.import_module(f"natgrad_impls.{framework.value}")
    if optimizer not in module.OPTIMIZERS:
        allowed = ", ".join(o.value for o in module.OPTIMIZERS)
        raise ValueError(f"optimizer: {optimizer.value!r} is not available in {framework.value} (one of {allowed})")
    return module.OPTIMIZERS[optimizer](problem, **hyperparameters)
