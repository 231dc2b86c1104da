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
            raise TypeError(f"state: this step takes the {state_type.__name__} its optimizer's init makes, "
                            f"not {type(state).__name__}{hint}")
        return step(params, state, batch)

    return FunctionalOptimizer(init, checked_step, hyperparameters)
