"""Overhead of `natgrad run` around the optimizer step.

    python scripts/run_overhead.py [--repeats 7]

For each case, the runner's step loop (recording, divergence checks, periodic evaluation, the
progress bar's bookkeeping, the final evaluation step) against a bare loop of the same optimizer
steps, timed the same way:

    overhead = runner loop wall-clock / bare loop wall-clock - 1      (target: under 10%)

The bare loop cuts its mini-batches in the loop as the runner does (the same `_Batches`: a
per-epoch permutation gathered on the device), since every training loop must; what that costs is
shown apart, as the share of the bare loop that a loop on batches cut beforehand saves ("cutting").
From the runner alone, the share of its loop spent outside the timed steps, (loop_s - step_s) /
loop_s, split into evaluation and the rest (the rest includes the cutting). Times are the minimum
over --repeats (the least disturbed by other processes on a shared machine), shares their median.
"""

from __future__ import annotations

import argparse
import statistics
import time


from natgrad_impls import make_optimizer, models, runner

CASES = [
    # task, optimizer, framework, hyperparameters, steps (enough for a loop of 0.1 s or more: shorter ones vary by 10%)
    ("breastcancer", "ngd", "numpy", {"lr": 1.0, "damping": 1e-4}, 2000),
    ("breastcancer", "ef", "torch", {"lr": 0.05, "damping": 1e-4}, 2000),
    ("breastcancer", "ngd", "jax", {"lr": 1.0, "damping": 1e-4}, 2000),
    ("digits-mlp", "sgd", "torch", {"lr": 0.05}, 1000),
    ("digits-mlp", "adam", "jax", {"lr": 1e-3}, 1000),
    ("mnist1d-mlp", "kfac", "torch", {"lr": 0.01, "damping": 1e-2}, 300),
]


def bare_loop(task_name, optimizer, framework, hp, steps, seed=0, precut=False) -> float:
    """The same steps without the runner: step + sync in a loop, each step's batch cut in the loop
    as the runner cuts it, or (precut) all of them cut before the clock starts."""
    spec = runner.resolve(task_name, optimizer, framework, hyperparameters=hp, seed=seed)
    task = spec.task
    data = task.load(seed)
    io = runner._IO[spec.framework](task.problem, spec.device, spec.dtype)
    batches = runner._Batches(io, data.train.X, data.train.y, task.batch_size, seed)
    prepared = [batches.next() for _ in range(steps)] if precut else None
    convex = runner.is_convex(task)
    params = io.params(models.init_params(task.problem.model, seed, "zeros" if convex else "glorot"))
    opt = make_optimizer(spec.framework, spec.optimizer, task.problem, **spec.kwargs())
    state = opt.init(params)
    runner.warm_up(io, opt, params, state, batches.first())
    start = time.perf_counter()
    for k in range(steps):
        batch = prepared[k] if precut else batches.next()
        new_params, new_state, info = opt.step(params, state, batch)
        io.sync(new_params)
        params, state = new_params, new_state
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable timings on a shared machine; 0 = torch's default)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.torch_threads < 0:
        parser.error("--repeats must be >= 1 and --torch-threads >= 0")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    print(f"{'case':36s} {'steps':>5s} {'bare s':>8s} {'runner s':>9s} {'overhead':>9s} {'cutting':>8s} {'eval':>7s} "
          f"{'other':>7s}")
    worst = 0.0
    for task, optimizer, framework, hp, steps in CASES:
        bare, precut, loops, evals, others = [], [], [], [], []
        for _ in range(args.repeats):
            bare.append(bare_loop(task, optimizer, framework, hp, steps))
            precut.append(bare_loop(task, optimizer, framework, hp, steps, precut=True))
            frame = runner.run(task, optimizer, framework, hyperparameters=hp, steps=steps, progress=False)
            a = frame.attrs
            loops.append(a["loop_s"])
            evals.append(a["eval_s"] / a["loop_s"])
            others.append((a["loop_s"] - a["step_s"] - a["eval_s"]) / a["loop_s"])
        b, l = min(bare), min(loops)
        overhead = l / b - 1
        worst = max(worst, overhead)
        print(f"{task + ' ' + optimizer + ' ' + framework:36s} {steps:5d} {b:8.3f} {l:9.3f} {overhead:9.1%} "
              f"{1 - min(precut) / b:8.1%} {statistics.median(evals):7.1%} {statistics.median(others):7.1%}")
    print(f"worst overhead: {worst:.1%} (target: under 10%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
