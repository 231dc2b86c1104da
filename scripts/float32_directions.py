"""How far float32's exact-Fisher NGD direction is from float64's, by damping.

    python scripts/float32_directions.py [--task mnist1d-mlp] [--adam-steps 1000] [--dampings 1e-2,...]

Trains the task's network with Adam in float64 (torch, lr 1e-3, batches of --batch-size) to leave
its random start, then on one more batch prints, for each framework and damping,

    error = |d_float32 - d_float64| / |d_float64|,   d = (F + damping I)^-1 g

for the direction the step takes (`precondition`: push-through, the gradient being in the exact
Fisher's span) and for the general Woodbury form (g - U K^-1 U^T g) / damping, which divides
float32's round-off by the damping. The float64 direction of each framework is its own reference.
"""

from __future__ import annotations

import argparse

import numpy as np


def trained_point(task_name: str, adam_steps: int, batch_size: int, seed: int = 0):
    """(problem, float64 numpy parameters after Adam, one batch (x, y) of the training set)."""
    import torch

    from natgrad_impls import models, tasks
    from natgrad_impls import torch as nt

    task = tasks.get_task(task_name)
    x, y = task.load(seed).train
    rng = models.random_stream(seed, "batches")
    params = nt.to_torch(models.init_params(task.problem.model, seed))
    opt = nt.adam(task.problem, lr=1e-3)
    state = opt.init(params)
    for _ in range(adam_steps):
        rows = rng.choice(len(x), batch_size, replace=False)
        params, state, _ = opt.step(params, state, (torch.as_tensor(x[rows]), torch.as_tensor(y[rows])))
    rows = rng.choice(len(x), batch_size, replace=False)
    return task.problem, {k: v.numpy() for k, v in params.items()}, (x[rows], y[rows])


def directions(framework: str, problem, params, batch, dtype: str, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """The step's direction and the general Woodbury one, flat, as float64 numpy."""
    import importlib

    from natgrad_impls import models
    from natgrad_impls.names import Curvature

    module = importlib.import_module(f"natgrad_impls.{framework}")
    C = importlib.import_module(f"natgrad_impls.{framework}.curvature")
    convert = module.to_torch if framework == "torch" else module.to_jax
    x, y = batch
    labels = "int64" if y.dtype.kind in "iu" else dtype  # (class indices, or targets in the outputs' dtype)
    arrays = convert({"x": x}, dtype=dtype)["x"], convert({"y": y}, dtype=labels)["y"]
    _, grad, factor = C.gradient_and_curvature(problem, convert(params, dtype=dtype), arrays, Curvature.EXACT)
    if problem.model.num_params() <= factor.num_columns:  # (the solve the step takes then: curvature.py)
        raise SystemExit(f"--batch-size {len(x)} gives the factor {factor.num_columns} columns for "
                         f"{problem.model.num_params()} parameters: a dense solve, neither push-through nor Woodbury")
    step, _ = C.precondition(problem, Curvature.EXACT, grad, factor, damping)
    woodbury = factor.multiply_inverse_layers(grad, damping)
    flat = lambda layers: models.flatten(problem.model, {k: np.asarray(v, np.float64) for k, v in _host(
        C.from_layers(problem.model, layers)).items()})
    return flat(step), flat(woodbury)


def _host(tree: dict) -> dict:
    return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in tree.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d-mlp")
    parser.add_argument("--adam-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dampings", default="1e-2,1e-3,1e-4,1e-5,1e-6,1e-8,1e-10,1e-14")
    parser.add_argument("--frameworks", default="torch,jax")
    args = parser.parse_args(argv)
    from natgrad_impls import runner, tasks

    networks = [name for name, task in tasks.TASKS.items() if not runner.is_convex(task)]
    if args.task not in networks:
        parser.error(f"--task: {args.task!r} is not a network task (one of {', '.join(networks)})")
    try:
        dampings = [float(d) for d in args.dampings.split(",")]
    except ValueError:
        dampings = []
    if not dampings or not all(d > 0 for d in dampings):  # (NaN too)
        parser.error(f"--dampings: {args.dampings!r} must be comma-separated numbers > 0")
    if not {"torch", "jax"} >= set(args.frameworks.split(",")):
        parser.error(f"--frameworks: {args.frameworks!r} must be torch, jax or both, comma-separated")
    if args.adam_steps < 0 or args.batch_size < 1:
        parser.error("--adam-steps must be >= 0 and --batch-size >= 1")
    problem, params, batch = trained_point(args.task, args.adam_steps, args.batch_size)
    print(f"{args.task} after {args.adam_steps} Adam steps; error of float32's direction against float64's")
    print(f"{'framework':>9} {'damping':>8} {'step':>9} {'woodbury':>9}")
    for framework in args.frameworks.split(","):
        for damping in dampings:
            step64, woodbury64 = directions(framework, problem, params, batch, "float64", damping)
            step32, woodbury32 = directions(framework, problem, params, batch, "float32", damping)
            error = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
            print(f"{framework:>9} {damping:8.0e} {error(step32, step64):9.1e} {error(woodbury32, woodbury64):9.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
