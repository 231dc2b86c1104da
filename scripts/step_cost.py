"""Cost of one step of each optimizer, measured side by side in one run (issue: core library).

Prints, on an MLP of about 100k parameters (784-128-10, batch 128, float32 by default):
  - our sgd/adam step time over torch.optim (foreach) and optax on the same parameters (target <= 1.2);
  - every optimizer's step in gradient-equivalents, time(step) / time(mini-batch gradient)
    (targets on CPU: kfac (period 10) <= 3, ef and ngd mc <= 4; ngd exact ~ classes x that).
Usage: python scripts/step_cost.py [--framework torch,jax] [--device cpu|cuda] [--dtype float32]
       [--repeats 30] [--out results/step_cost.csv]
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import pandas as pd

from natgrad_impls import models, timing

# Small lr: timing runs take hundreds of steps on random data and must not diverge.
OPTIMIZERS = [
    ("sgd", {"lr": 1e-4}),
    ("sgd", {"lr": 1e-4, "momentum": 0.9}),
    ("adam", {"lr": 1e-4}),
    ("ef", {"lr": 1e-4, "damping": 1e-3}),
    ("ngd", {"lr": 1e-4, "damping": 1e-3, "fisher": "mc"}),
    ("ngd", {"lr": 1e-4, "damping": 1e-3, "fisher": "exact"}),
    ("kfac", {"lr": 1e-4, "damping": 1e-3, "kfac_update_period": 10}),
]
PEERS = {"sgd": ("torch.optim.SGD", "optax.sgd"), "adam": ("torch.optim.Adam", "optax.adam")}


def mlp_problem(width=128, batch=128, seed=0):
    model = models.mlp((784, width, 10), "relu")
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(batch, 784)), rng.integers(0, 10, batch)
    return models.Problem(model, "categorical"), models.init_params(model, seed), data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", default="torch,jax")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    problem, params, batch = mlp_problem(args.width, args.batch_size)
    rows = []
    for framework in args.framework.split(","):
        grad, sync = timing.gradient_call(framework, problem, params, batch, args.device, args.dtype)
        grad_s = timing.median_seconds(grad, sync, args.repeats)
        for optimizer, hp in OPTIMIZERS:
            step, sync, period = timing.step_call(framework, optimizer, problem, params, batch, args.device, args.dtype, **hp)
            step_s = timing.median_seconds(step, sync, args.repeats, block=period)
            row = dict(framework=framework, device=args.device, dtype=args.dtype, optimizer=optimizer,
                       variant=hp.get("fisher", "momentum" if hp.get("momentum") else ""), step_s=step_s,
                       gradient_s=grad_s, gradient_equivalents=step_s / grad_s)
            for peer in PEERS.get(optimizer, ()):
                if peer.startswith(framework):
                    call, psync = timing.peer_step_call(peer, problem, params, batch, args.device, args.dtype, **hp)
                    row[f"over_{peer.split('.')[0]}"] = step_s / timing.median_seconds(call, psync, args.repeats)
            rows.append(row)
    table = pd.DataFrame(rows)
    table["machine"] = platform.processor() or platform.machine()
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(table.drop(columns="machine").to_string(index=False))
    if args.out:
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
