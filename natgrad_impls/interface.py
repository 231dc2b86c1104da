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


def functional_optimizer(init, step, hyperparameters, state_type: type) -> FunctionalOptimizer:
    """The optimizer of `init` and `step`, its step refusing a state its init does not make (a
    TypeError naming it): a None, a step before init, was an AttributeError from inside the step,
    and another optimizer's state stepped as if fresh (every state's counter starts alike)."""

    def checked_step(params, state, batch):
        if not isinstance(state, state_type):
            hint = " (make one with opt.init(params))" if state is None else ""
            given, wanted = type(state).__name__, state_type.__name__
            if given == wanted:  # another framework's (torch's SGDState in jax's sgd)
                given, wanted = (f"{t.__module__}.{t.__qualname__}" for t in (type(state), state_type))
            raise TypeError(f"state: this step takes the {wanted} its optimizer's init makes, not {given}{hint}")
        return step(params, state, batch)

    return FunctionalOptimizer(init, checked_step, hyperparameters)
