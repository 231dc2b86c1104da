"""Cost of one step of each optimizer, measured side by side in one run.

Prints, on the MLP of `natgrad_impls.timing.mlp_problem` (784-128-10 relu, 101,770 parameters,
batch 128, float32 by default), with the settings of `timing.SETTINGS`:
  - every optimizer's step in gradient-equivalents, time(step) / time(mini-batch gradient)
    (targets on CPU: ef and ngd-mc <= 4, kfac (period 10) <= 3, below kfac's arithmetic floor of
    4.5 on this MLP (`kfac_floor` below); ngd-exact 7 to 39 x ngd-mc on a 2-core CPU: classes - 1
    times its columns, and a Cholesky that grows with their cube);
  - for torch, the operators a step dispatches over the gradient's (`timing.torch_ops`): kernel
    launches bound a small model's step on a GPU, so this predicts gradient-equivalents there;
  - for kfac, its arithmetic floor in the same unit (`timing.kfac_floor`: multiply-adds of the
    gradient plus the preconditioning, and with the factors and amortised inverses added), so the
    measured cost can be read against what the model's shapes allow; and the time of one refresh
    of its inverses (`inverse_s`, `timing.kfac_inverse_call`) with its amortised share of the step
    (`inverse_share` = inverse_s / period / step_s, a lower bound: a refresh step also does more
    than the inversions);
  - our step time over the peer's on the same parameters and batch (`over_<peer>`): sgd and adam
    over torch.optim (foreach) and optax (target <= 1.2), kfac over kfac-jax's K-FAC (target <= 1).
Every time is the median of `--repeats` samples, a row's calls sampled in turn (timing.alternating_medians);
a K-FAC sample spans whole inversion periods. Over several --rounds each column is the median over
the rounds, ratios of the per-round ratios: step_s / gradient_s can differ from gradient_equivalents
by a few percent.
`--rounds R` builds every step once (jax compiles once), times them all R times in turn and
reports the median of the rounds (the machine may be shared: rounds spread a burst of load over
several samples); `--out` is rewritten after every row a round times (its `rounds` column says how
many rounds a row has), so a run stopped early keeps what it timed, and a setting that fails is
reported and left out of the table.

    python scripts/step_cost.py [--frameworks torch,jax] [--device cpu|cuda] [--dtype float32]
        [--repeats 30] [--rounds 1] [--settings sgd,adam,...] [--sizes 40,128,10] [--out results/step_cost.csv]
    python scripts/step_cost.py --sweep --widths 64,128,256,512 --batch-sizes 32,128,512 \\
        --out results/scaling.csv          # timing.scaling_sweep over the grid, long format
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import pandas as pd

from natgrad_impls import results, timing
from natgrad_impls.names import Device, DType, Framework, parse

PEER_COLUMN = {"torch.optim.SGD": "over_torch", "torch.optim.Adam": "over_torch", "optax.sgd": "over_optax",
               "optax.adam": "over_optax", "kfac_jax.Optimizer": "over_kfac_jax"}


def _peers(optimizer: str, framework: str) -> list[str]:
    """The peers in `framework` that take our `optimizer`'s step (with the row's hyperparameters:
    sgd-momentum is compared with torch.optim.SGD and optax.sgd with momentum)."""
    return [peer for peer, ours in timing.PEER_OF.items()
            if ours == optimizer and timing.peer_framework(peer) == framework]


class _Measurement(NamedTuple):
    """What one row of the table times, built once: the calls and the columns that need no timing."""

    row: dict  # framework, device, dtype, optimizer, setting
    counts: dict  # ops_over_gradient (torch), the kfac floor
    step: tuple  # (call, sync, period) of `timing.step_call`
    grad: tuple  # (call, sync) of `timing.gradient_call`
    inverse: tuple | None  # (call, sync) of `timing.kfac_inverse_call`, for kfac
    peers: dict  # over_<peer> column -> (call, sync, period) of `timing.peer_step_call`


def _measurements(frameworks, settings, device, dtype, problem, params, batch, peers) -> list[_Measurement]:
    """One per (framework, setting), each call built once (jax compiles here and in no later round:
    on a GPU, compiling costs more than timing). One that fails to build is reported and left out:
    a table without it is worth more than none (on a borrowed GPU, a rerun may not be possible)."""
    measurements = []
    for framework in frameworks:
        try:
            grad = timing.gradient_call(framework, problem, params, batch, device, dtype)
        except Exception as error:
            print(f"skipping {framework}: its gradient: {type(error).__name__}: {error}", flush=True)
            continue
        for label in settings:
            try:
                measurements.append(_measurement(framework, label, grad, device, dtype, problem, params, batch, peers))
            except Exception as error:
                print(f"skipping {framework} {label}: {type(error).__name__}: {error}", flush=True)
    return measurements


def _measurement(framework, label, grad, device, dtype, problem, params, batch, peers) -> _Measurement:
    optimizer, hp = timing.setting(label)
    step = timing.step_call(framework, optimizer, problem, params, batch, device, dtype, **hp)
    counts, inverse = {}, None
    if framework == "torch":  # the GPU launch proxy (timing.torch_ops): a count, the same on any device
        ops = timing.torch_ops(optimizer, problem, params, batch, dtype, **hp)
        counts["ops_over_gradient"] = ops["ops_over_gradient"]
    if optimizer == "kfac":  # what no implementation can beat (timing.kfac_floor), and the inversion alone
        floor = timing.kfac_floor(problem.model, len(batch[0]), step[2])
        counts.update(floor_gradient_equivalents=floor["floor"], floor_with_factors=floor["with_factors"])
        inverse = timing.kfac_inverse_call(framework, problem, params, batch, device, dtype, hp["damping"])
    peer_calls = {}
    for peer in _peers(optimizer, framework) if peers else ():
        try:  # built and called once: a peer that fails (kfac-jax is a test extra) must not cost the row
            call, sync, period = timing.peer_step_call(peer, problem, params, batch, device, dtype, **hp)
            sync(call())
            peer_calls[PEER_COLUMN[peer]] = (call, sync, period)
        except Exception as error:
            print(f"skipping {peer}: {type(error).__name__}: {error}", flush=True)
    row = dict(framework=framework, device=device, dtype=dtype, optimizer=optimizer, setting=label)
    return _Measurement(row, counts, step, grad, inverse, peer_calls)


def _time_round(m: _Measurement, repeats: int, warmup_s: float) -> dict:
    """One round of one measurement: step, gradient, inversion and peer times, sampled in turn (so
    that all of them see the same machine load), and their ratios."""
    peers = list(m.peers.items())
    timed = [timing.Timed(*m.step), timing.Timed(*m.grad), *([timing.Timed(*m.inverse)] if m.inverse else []),
             *(timing.Timed(*peer) for _, peer in peers)]
    step_s, grad_s, *others = timing.alternating_medians(timed, repeats, warmup_s=warmup_s)
    times = dict(step_s=step_s, gradient_s=grad_s, gradient_equivalents=step_s / grad_s)
    if m.inverse:  # one refresh of K-FAC's inverses, and its amortised share of the step
        inverse_s = others.pop(0)
        times.update(inverse_s=inverse_s, inverse_share=inverse_s / m.step[2] / step_s)
    for (column, _), peer_s in zip(peers, others):
        times.update({column: step_s / peer_s, column.replace("over_", "") + "_s": peer_s})
    return times


def cost_table(frameworks, settings, device="cpu", dtype="float32", repeats=30, width=128, batch_size=128,
               peers=True, sizes=None, rounds=1, on_update=None) -> pd.DataFrame:
    """One row per (framework, setting): step_s, gradient_s, gradient_equivalents and, where a peer
    exists, the ratio of our step time to the peer's (`over_<peer>`, and the peer's time). Every
    call is built once, then all of them are timed `rounds` times in turn; each column is the median
    over a row's rounds (of the per-round ratios for ratios; `rounds` says how many), and
    `on_update(table)` is given the table after every measurement, so that a run stopped early keeps
    every row it timed. A measurement that fails is reported and timed no more."""
    problem, params, batch = timing.mlp_problem(width, batch_size, sizes=sizes)
    # width: the widest hidden layer (0 for a model without one, not --width, which it does not have)
    shape = dict(width=max(sizes[1:-1], default=0) if sizes else width,
                 sizes="-".join(str(size) for size in (sizes or (784, width, 10))), batch_size=batch_size,
                 num_params=problem.model.num_params())
    measurements = _measurements(frameworks, settings, device, dtype, problem, params, batch, peers)
    history, failed = [[] for _ in measurements], set()  # per measurement, the times of each round
    table = pd.DataFrame()
    for done in range(1, rounds + 1):
        for index, (times, m) in enumerate(zip(history, measurements)):
            if index in failed:
                continue
            try:  # later rounds find the calls warm
                times.append(_time_round(m, repeats, timing.WARMUP_S if done == 1 else 0.0))
            except Exception as error:
                print(f"stopped timing {m.row['framework']} {m.row['setting']}: {type(error).__name__}: {error}",
                      flush=True)
                failed.add(index)
                continue
            table = pd.DataFrame([{**m.row, **shape, **pd.DataFrame(times).median().to_dict(), **m.counts,
                                   "rounds": len(times)} for times, m in zip(history, measurements) if times])
            print(f"round {done} of {rounds}: {m.row['framework']} {m.row['setting']} measured", flush=True)
            if on_update:
                on_update(table)
    if table.empty:
        print("nothing was timed (every measurement failed: see above)", flush=True)
    return table


def _checked(args):
    """(frameworks, settings, sizes, widths, batch sizes) from the arguments; ValueError naming the
    argument for a value the measurement would refuse later, after minutes of other work."""
    frameworks, settings = args.frameworks.split(","), args.settings.split(",")
    device, dtype = parse(Device, args.device, "device"), parse(DType, args.dtype, "dtype")
    for framework in frameworks:
        if parse(Framework, framework, "framework") == Framework.NUMPY:
            raise ValueError("framework: numpy is not timed here (one of torch, jax)")
        if not timing.device_available(framework, device):
            raise ValueError(f"device: {device.value!r} is not visible to {framework}")
    for label in settings:
        timing.setting(label)
    if args.out:
        results.check_path(args.out)
    sizes, widths, batch_sizes = (_positive_integers(getattr(args, name), name) if getattr(args, name) else None
                                  for name in ("sizes", "widths", "batch_sizes"))
    for name in ("width", "batch_size", "repeats", "rounds"):
        _positive_integers(str(getattr(args, name)), name)
    return frameworks, settings, sizes, widths, batch_sizes


def _positive_integers(text: str, name: str) -> list[int]:
    values = [v.strip() for v in text.split(",")]
    if not all(v.isdigit() and int(v) >= 1 for v in values):
        raise ValueError(f"{name.replace('_', '-')}: {text!r} must be integers >= 1, comma-separated")
    return [int(v) for v in values]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", default="torch,jax", help="comma-separated (default: torch,jax)")
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
    try:  # bad input is one line, before anything is measured
        frameworks, settings, sizes, widths, batch_sizes = _checked(args)
    except ValueError as error:
        parser.error(str(error))

    machine = timing.device_name(args.device, frameworks[0])  # once, before anything is measured
    peers = [timing.PEER_PACKAGES[p.rsplit(".", 1)[0]] for p in timing.PEERS
             if timing.peer_framework(p).value in frameworks] if not (args.no_peers or args.sweep) else []
    versions = timing.package_versions([*frameworks, *peers])  # the peers' releases move the over_ ratios

    def keep(table):  # on disk as soon as it is measured: a run stopped by a time limit keeps it
        if args.out:
            threads = table["framework"].map(timing.cpu_threads)
            results.write(table.assign(machine=machine, threads=threads, versions=versions), args.out)

    if args.sweep:
        table = pd.concat(
            [timing.scaling_sweep(f, label, widths, batch_sizes, args.device, args.dtype, args.repeats)
             for f in frameworks for label in settings],
            ignore_index=True,
        )
        keep(table)
    else:
        table = cost_table(frameworks, settings, args.device, args.dtype, args.repeats, args.width, args.batch_size,
                           not args.no_peers, sizes, args.rounds, keep)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))


if __name__ == "__main__":
    main()
