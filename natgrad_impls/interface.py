"""The functional optimizer interface shared by the numpy, torch and jax implementations (DESIGN 5):

    opt = natgrad_impls.<framework>.<optimizer>(problem, **hyperparameters)
    state = opt.init(params)
    params, state, info = opt.step(params, state, batch)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


class FunctionalOptimizer(NamedTuple):
    init: Callable[[dict], Any]
    step: Callable[[dict, Any, tuple], tuple[dict, Any, dict]]
    hyperparameters: Any  # the validated dataclass of natgrad_impls.hyperparameters
