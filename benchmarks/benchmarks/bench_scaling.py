"""The scaling sweep of the report's cost figures: a step in gradient-equivalents against the MLP's
width (784-width-10) and the batch size, through `natgrad_impls.timing.scaling_sweep`, the function
the pipeline's timing rules and `scripts/step_cost.py --sweep` call, one grid point per benchmark.
"""

from __future__ import annotations

from natgrad_impls import timing

from .common import (DEVICES, DTYPE, FRAMEWORKS, REPEATS, SWEEP_BATCH_SIZES, SWEEP_SETTINGS, SWEEP_WIDTHS,
                     require_device)


class Scaling:
    """`track_gradient_equivalents` at one (width, batch size); the sweep is the parameter grid."""

    params = [SWEEP_SETTINGS, FRAMEWORKS, DEVICES, SWEEP_WIDTHS, SWEEP_BATCH_SIZES]
    param_names = ["setting", "framework", "device", "width", "batch_size"]
    unit = "gradients"
    processes = 1
    timeout = 600

    def setup(self, setting, framework, device, width, batch_size):
        require_device(framework, device)

    def track_gradient_equivalents(self, setting, framework, device, width, batch_size):
        table = timing.scaling_sweep(framework, setting, [width], [batch_size], device, DTYPE, REPEATS)
        return float(table["gradient_equivalents"].iloc[0])
