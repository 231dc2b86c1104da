"""Cost of one step of each optimizer, measured side by side in one run (issue: core library).

Prints, on the MLP of `natgrad_impls.timing.mlp_problem` (784-128-10 relu, 101,770 parameters,
batch 128, float32 by default), with the settings of `timing.SETTINGS`:
  - every optimizer's step in gradient-equivalents, time(step) / time(mini-batch gradient)
    (targets on CPU: kfac (period 10) <= 3, ef and ngd-mc <= 4; ngd-exact ~ classes x that);
  - for torch, the operators a step dispatches over the gradient's (`timing.torch_ops`): kernel
    launches bound a small model's step on a GPU, so this predicts gradient-equivalents there;
  - for kfac, its arithmetic floor in the same unit (`timing.kfac_floor`: multiply-adds of the
    gradient plus the preconditioning, and with the factors and amortised inverses added), so the
    measured cost can be read against what the model's shapes allow;
  - our step time over the peer's on the same parameters and batch (`over_<peer>`): sgd and adam
    over torch.optim (foreach) and optax (target <= 1.2), kfac over kfac-jax's K-FAC (target <= 1).
Every time is the median of `--repeats` samples; a K-FAC sample spans one inversion period.
`--rounds R` repeats the whole measurement R times in this process and reports the median of the
rounds (the machine may be shared: rounds spread a burst of load over several samples).

    python scripts/step_cost.py [--framework torch,jax] [--device cpu|cuda] [--dtype float32]
        [--repeats 30] [--rounds 1] [--settings sgd,adam,...] [--sizes 40,128,10] [--out results/step_cost.csv]
    python scripts/step_cost.py --sweep --widths 64,128,256,512 --batch-sizes 32,128,512 \\
        --out results/scaling.csv          # timing.scaling_sweep over the grid, long format
"""

from __future__ import annotations

import argparse
import platform

import pandas as pd

from natgrad_impls import timing

PEER_COLUMN = {"torch.optim.SGD": "over_torch", "torch.optim.Adam": "over_torch", "optax.sgd": "over_optax",
               "optax.adam": "over_optax", "kfac_jax.Optimizer": "over_kfac_jax"}


def _peers(label: str, framework: str) -> list[str]:
    return [peer for peer, ours in timing.PEER_OF.items() if ours == label and timing.peer_framework(peer) == framework]


def cost_table(frameworks, settings, device="cpu", dtype="float32", repeats=30, width=128, batch_size=128,
               peers=True, sizes=None) -> pd.DataFrame:
    """One row per (framework, setting): step_s, gradient_s, gradient_equivalents and, where a peer
    exists, the ratio of our step time to the peer's (`over_<peer>`, and the peer's time)."""
    problem, params, batch = timing.mlp_problem(width, batch_size, sizes=sizes)
    mlp = "-".join(str(size) for size in (sizes or (784, width, 10)))
    width = max(sizes[1:-1], default=width) if sizes else width  # the widest hidden layer
    rows = []
    for framework in frameworks:
        grad, grad_sync = timing.gradient_call(framework, problem, params, batch, device, dtype)
        for label in settings:
            optimizer, hp = timing.setting(label)
            step, sync, period = timing.step_call(framework, optimizer, problem, params, batch, device, dtype, **hp)
            step_s = timing.median_seconds(step, sync, repeats, block=period)
            # the unit of cost is timed next to each step, so that both see the same machine load
            grad_s = timing.median_seconds(grad, grad_sync, repeats)
            row = dict(framework=framework, device=device, dtype=dtype, optimizer=optimizer,
                       variant=timing.variant(label), width=width, sizes=mlp, batch_size=batch_size,
                       num_params=problem.model.num_params(), step_s=step_s, gradient_s=grad_s,
                       gradient_equivalents=step_s / grad_s)
            if framework == "torch":  # the GPU launch proxy (timing.torch_ops): a count, the same on any device
                ops = timing.torch_ops(optimizer, problem, params, batch, dtype, **hp)
                row["ops_over_gradient"] = ops["ops_over_gradient"]
            if optimizer == "kfac":  # what no implementation can beat (timing.kfac_floor)
                floor = timing.kfac_floor(problem.model, batch_size, period)
                row.update(floor_gradient_equivalents=floor["floor"], floor_with_factors=floor["with_factors"])
            for peer in _peers(label, framework) if peers else ():
                try:
                    call, psync, pperiod = timing.peer_step_call(peer, problem, params, batch, device, dtype, **hp)
                except ImportError as error:  # kfac-jax is a test extra
                    print(f"skipping {peer}: {error}")
                    continue
                peer_s = timing.median_seconds(call, psync, repeats, block=pperiod)
                row[PEER_COLUMN[peer]] = step_s / peer_s
                row[PEER_COLUMN[peer].replace("over_", "") + "_s"] = peer_s
            rows.append(row)
    return pd.DataFrame(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", default="torch,jax")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--settings", default=",".join(timing.SETTINGS),
                        help=f"labels of timing.SETTINGS (default: all of {', '.join(timing.SETTINGS)})")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--sizes", help="the MLP's layer sizes, input first (e.g. 40,128,128,10); default 784,WIDTH,10")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-peers", action="store_true", help="skip the torch.optim / optax / kfac-jax peers")
    parser.add_argument("--sweep", action="store_true", help="timing.scaling_sweep over --widths x --batch-sizes")
    parser.add_argument("--widths", default="64,128,256,512")
    parser.add_argument("--batch-sizes", default="32,128,512")
    parser.add_argument("--out", help="CSV file for the table")
    args = parser.parse_args(argv)
    frameworks, settings = args.framework.split(","), args.settings.split(",")
    for label in settings:
        timing.setting(label)  # fail on a bad label before measuring anything
    if args.sweep:
        widths = [int(w) for w in args.widths.split(",")]
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        table = pd.concat(
            [timing.scaling_sweep(f, label, widths, batch_sizes, args.device, args.dtype, args.repeats)
             for f in frameworks for label in settings],
            ignore_index=True,
        )
    else:
        sizes = [int(v) for v in args.sizes.split(",")] if args.sizes else None
        rounds = [cost_table(frameworks, settings, args.device, args.dtype, args.repeats, args.width,
                             args.batch_size, not args.no_peers, sizes).assign(round=r) for r in range(args.rounds)]
        table = pd.concat(rounds, ignore_index=True)
        if args.rounds > 1:
            keys = ["framework", "device", "dtype", "optimizer", "variant", "width", "sizes", "batch_size", "num_params"]
            table = table.drop(columns="round").groupby(keys, sort=False, dropna=False).median().reset_index()
            table["rounds"] = args.rounds
    table["machine"] = platform.processor() or platform.machine()
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(table.drop(columns="machine").to_string(index=False))
    if args.out:
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
