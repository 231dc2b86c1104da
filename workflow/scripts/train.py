"""Rules tune and train: the runs of one task, optimizer, framework and device, in one process,
written together as one long-format table; a killed job resumes at its next run (runner.run_many).
tune: every setting of params.runs on the tuning seeds, and the best one (lowest median final
full-train loss, diverged runs last; figures.tables) as the JSON that train and `natgrad run
--hyperparameters` read. train: that setting on every seed."""

import json
import math
import os

from natgrad_impls.runner import HYPERPARAMETER_ORDER, thread_environment

snakemake = globals()["snakemake"]  # set by Snakemake's script directive
# One thread, before torch or jax is imported, also where the job holds every core (train): float32
# round-off depends on the thread count, and the losses must not depend on the machine's cores.
os.environ.update(thread_environment(1))

import pandas as pd  # noqa: E402

from natgrad_impls import results, runner  # noqa: E402


def train(settings, seeds, protocol, cos_ef_ngd) -> pd.DataFrame:
    """Every setting on every seed; each finished run is kept in params.checkpoints until the job's
    table is written, so that a killed job (a time limit on a cluster) resumes at its next run."""
    w = snakemake.wildcards
    return runner.run_many(w.task, w.optimizer, w.framework, w.device, settings, seeds, snakemake.params.checkpoints,
                           log=lambda line: print(line, flush=True), dtype=protocol["dtype"], steps=protocol["steps"],
                           eval_every=protocol["eval_every"], cos_ef_ngd=cos_ef_ngd)


def best_setting(runs: pd.DataFrame) -> dict:
    from natgrad_impls.figures import tables

    table = tables.best_hyperparameters(runs)
    best = table.iloc[0]
    chosen = {name: best[name] for name in HYPERPARAMETER_ORDER if name in best and not pd.isna(best[name])}
    chosen = {k: (v.item() if hasattr(v, "item") else v) for k, v in chosen.items()}
    diverged = "" if math.isfinite(best["final_loss"]) else " (every setting diverged)"
    print(f"best of {len(snakemake.params.runs)} settings: {chosen}, final {best['objective']} "
          f"{best['final_loss']:.6g}{diverged}")
    edge = tables.grid_edges(runs, table)["edge"].iloc[0]
    if edge:
        print(f"the best setting is on the edge of the tuning grid ({edge}): a wider grid may find a better one")
    return chosen


with results.job_log(snakemake.log[0]):
    params = snakemake.params
    if snakemake.rule == "tune":
        runs = train(params.runs, params.seeds, params.protocol, params.cos_ef_ngd)
        results.write_text(json.dumps(best_setting(runs), indent=1), snakemake.output.best)
    else:
        with open(snakemake.input.best) as handle:
            runs = train([json.load(handle)], params.seeds, params.protocol, params.cos_ef_ngd)
    results.write(runs, snakemake.output.runs)
    runner.clear_checkpoints(snakemake.params.checkpoints)
