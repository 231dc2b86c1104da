"""The report's tables: each optimizer's best hyperparameters with its final loss and time to a
target loss, their summary across tasks (`summary`, ranked, with the cost of a step), and the
environment the numbers were measured in.

Target rule (`best_hyperparameters`): per task, the target is the *worst of the best final losses*,
the largest over (optimizer, framework, device) of the median-over-seeds final loss of its best
setting (settings that diverged on any seed left out, and those that end no lower than they
started). Every optimizer that set it or beat it reaches it by construction (in the median over
seeds), so it gets a time, and the time compares how fast each gets to the loss the slowest one ends
at: the question the wall-clock figures ask. A fixed number (say, 1.1 x the best final loss) would
leave most optimizers without a time on most tasks.

The objective is the full-train loss (`train_loss`) where the frame has it, since mini-batch losses
are noisy enough to cross a target by luck; else `loss` (the full-batch objective on the convex
tasks). Time to target: `time_s` at the first recorded row at or below the target, the low median
over seeds (a seed that never gets there counts as infinitely slow: empty when more than half never
do). Time is cumulative step time, so evaluation (every `eval_every` steps) makes its
resolution coarse on networks; the step at which the target is reached is given too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import sys

import numpy as np
import pandas as pd

from natgrad_impls import timing
from natgrad_impls.hyperparameters import HYPERPARAMETERS
from natgrad_impls.names import Device, Framework, Optimizer, legends
from natgrad_impls.runner import HYPERPARAMETER_ORDER, accepted

GROUP = ["task", "optimizer", "framework", "device", "dtype"]
# what tells one setting from another: the optimizer's hyperparameters and the mini-batch size
SETTING_COLUMNS = (*HYPERPARAMETER_ORDER, "batch_size")
# counts, written as integers (a column with gaps would otherwise be float: "10.0" for a period)
COUNTS = ("samples", "kfac_update_period", "batch_size", "seeds", "steps", "steps_to_target", "settings_tried")


def best_hyperparameters(runs: pd.DataFrame) -> pd.DataFrame:
    """Per task x optimizer x framework x device (x dtype) the best hyperparameters, with
    final_loss (median over seeds, and its min and max), the task's target_loss, steps_to_target and
    time_to_target_s (low medians over seeds), seeds, steps, and final_test_accuracy (median over
    seeds, and its min and max) where measured.

    `runs`: runner frames (tuned runs, any number of seeds and settings: the best setting is the one
    with the lowest median final loss) or grid frames (`natgrad grid`: its rows with best == True
    and repeat == 0 are the best run; chaotic is carried over, and final_loss_min and _max span the
    best run and its chaos repeats, the same run from theta0 + 1e-14 noise, since a grid has one
    seed)."""
    frame = _runs(runs)
    if frame.empty:
        return pd.DataFrame(columns=GROUP + ["final_loss", "target_loss", "time_to_target_s"])
    objective, group, hp = _columns(frame)
    frame = _keyed(frame, group, hp)
    measured = frame[frame[objective].notna()]
    best = _best_settings(measured, group, hp, objective)
    # a setting that diverged on any seed sets no target (its median is one seed from blowing up), nor
    # one that ends no lower than it started (every run would have reached that target at step 0)
    start = measured[measured["step"] == 0].groupby("task", observed=True)[objective].median()
    improved = best["final_loss"].to_numpy() < best["task"].map(start).astype(float).to_numpy()
    reliable = best[np.isfinite(best["final_loss"]) & ~best["diverged"].astype(bool) & improved]
    targets = reliable.groupby("task", observed=True)["final_loss"].max().rename("target_loss")
    best = best.merge(targets, on="task", how="left")
    reach = _reach(measured, best, group, objective)
    best = best.merge(reach, on=group, how="left")
    if "repeat" in runs.columns:
        best = _repeat_range(runs, best, group, objective)
    best["objective"] = objective
    order = group + hp + ["seeds", "steps", "final_loss", "final_loss_min", "final_loss_max", "target_loss",
                          "steps_to_target", "time_to_target_s", "objective", "diverged"]
    order += [c for c in ("final_test_accuracy", "final_test_accuracy_min", "final_test_accuracy_max", "chaotic")
              if c in best.columns]
    best = best[order]
    best["_order"] = best["optimizer"].map({o.value: i for i, o in enumerate(Optimizer)})
    best = best.sort_values(["task", "_order", "framework", "device"]).drop(columns="_order").reset_index(drop=True)
    best = best.dropna(axis=1, how="all")
    return best.astype({c: "Int64" for c in COUNTS if c in best.columns})


def in_best_setting(runs: pd.DataFrame) -> pd.Series:
    """True on the rows of `runs` (runner frames) that ran their group's best setting, the one
    `best_hyperparameters` lists, so that a figure draws the setting its table names."""
    frame = _runs(runs)
    objective, group, hp = _columns(frame)
    frame = _keyed(frame, group, hp)
    best = _best_settings(frame[frame[objective].notna()], group, hp, objective)
    chosen = pd.MultiIndex.from_frame(best[group + ["_setting"]])
    ran = pd.MultiIndex.from_frame(frame[group + ["_setting"]])
    return pd.Series(ran.isin(chosen), index=frame.index)


def _columns(frame) -> tuple[str, list[str], list[str]]:
    """The objective that ranks settings, the group columns and the hyperparameter columns present."""
    objective = "train_loss" if "train_loss" in frame.columns and frame["train_loss"].notna().any() else "loss"
    return objective, [c for c in GROUP if c in frame.columns], [c for c in SETTING_COLUMNS if c in frame.columns]


def _best_settings(measured, group, hp, objective) -> pd.DataFrame:
    """Per group, its best setting's row of `_per_setting` (with its `_setting` key)."""
    settings = _per_setting(_per_run(measured, group, hp, objective), group, hp)
    # a setting that diverged on any seed ranks after every setting that did not (its median can hide
    # a seed in three blowing up: a setting on the edge of stability, chosen by luck); among settings
    # that all diverged (final_loss inf), the one that ran longest before it did, not the first listed
    ranked = settings.sort_values(["diverged", "final_loss", "survived"], ascending=[True, True, False],
                                  na_position="last", kind="stable")
    return ranked.groupby(group, observed=True, sort=False).head(1)


EDGE_HYPERPARAMETERS = ("lr", "damping")


def grid_edges(tuning: pd.DataFrame, best: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per group of `best_hyperparameters`, where its best setting lies on the edge of the tuning
    grid: `edge` names each of lr and damping at the smallest or largest value tried ("lr largest";
    empty inside). A best on the edge says the grid may stop short of a better setting. And
    `settings_tried`, the grid's size: a tuning budget, which differs between optimizers. `best`:
    `best_hyperparameters(tuning)` where the caller has it already."""
    frame = _runs(tuning)
    _, group, hp = _columns(frame)
    best = best_hyperparameters(tuning) if best is None else best
    rows = []
    for _, chosen in best.iterrows():
        tried = frame.loc[(frame[group] == chosen[group]).all(axis=1)]
        edges = []
        for name in EDGE_HYPERPARAMETERS:
            values = np.unique(tried[name].dropna()) if name in tried.columns and name in chosen.index else []
            if len(values) > 1 and chosen[name] in (values[0], values[-1]):
                edges.append(f"{name} {'smallest' if chosen[name] == values[0] else 'largest'}")
        rows.append((*chosen[group], ", ".join(edges), setting_key(tried, hp).nunique()))
    return pd.DataFrame(rows, columns=group + ["edge", "settings_tried"])


def _runs(runs: pd.DataFrame, every_repeat: bool = False) -> pd.DataFrame:
    """Plain-string names; a grid frame cut to its best runs (repeat 0, or with their chaos repeats)."""
    frame = runs.copy()
    if "best" in frame.columns:
        frame = frame[frame["best"].astype(bool)]
        if "repeat" in frame.columns and not every_repeat:
            frame = frame[frame["repeat"] == 0]
    for name in GROUP:
        if name in frame.columns:
            frame[name] = frame[name].astype(str)
    for column, default in (("seed", 0), ("diverged", False), ("time_s", np.nan)):
        if column not in frame.columns:
            frame[column] = default
    return frame


def _repeat_range(grid: pd.DataFrame, best: pd.DataFrame, group, objective) -> pd.DataFrame:
    """final_loss_min and _max over a grid's best run and its chaos repeats (diverged: inf)."""
    runs = _runs(grid, every_repeat=True).sort_values("step").groupby(group + ["repeat"], observed=True, sort=False)
    final = runs[objective].last().where(~runs["diverged"].any(), np.inf)
    final = final.replace([np.nan, -np.inf], np.inf).groupby(level=group, observed=True).agg(["min", "max"])
    spans = final.rename(columns={"min": "final_loss_min", "max": "final_loss_max"}).reset_index()
    return best.drop(columns=["final_loss_min", "final_loss_max"]).merge(spans, on=group, how="left")


def setting_key(frame, hp) -> pd.Series:
    """One id (a hash) per hyperparameter setting: NaN-safe, unlike grouping on float columns."""
    return pd.util.hash_pandas_object(frame[hp], index=False) if hp else pd.Series(0, index=frame.index)


def _keyed(frame, group, hp) -> pd.DataFrame:
    """`frame` with `_setting` (`setting_key`, hashed once for every use below) and `_last_step`,
    each run's last recorded step over all of its rows: a network run's objective is recorded at
    evaluations only, and two runs that diverged between the same two evaluations would tie on
    their last objective row."""
    frame = frame.assign(_setting=setting_key(frame, hp))
    runs = frame.groupby(group + ["_setting", "seed"], observed=True)
    return frame.assign(_last_step=runs["step"].transform("max"))


def _per_run(frame, group, hp, objective) -> pd.DataFrame:
    """One row per run of a `_keyed` frame: its setting, final objective (inf when diverged), steps,
    test accuracy."""
    frame = frame.sort_values("step", kind="stable")
    runs = frame.groupby(group + ["_setting", "seed"], observed=True, sort=False)
    out = runs.agg(final=(objective, "last"), steps=("step", "max"), diverged=("diverged", "any"),
                   last_step=("_last_step", "max"), **{h: (h, "first") for h in hp})
    if "test_accuracy" in frame.columns:
        out["final_test_accuracy"] = runs["test_accuracy"].agg(lambda v: v.dropna().iloc[-1] if v.notna().any() else np.nan)
    if "chaotic" in frame.columns:
        out["chaotic"] = runs["chaotic"].agg(lambda v: bool(v.fillna(False).astype(bool).any()))
    out.loc[out["diverged"] | ~np.isfinite(out["final"]), "final"] = np.inf
    return out.reset_index()


def _per_setting(per_run, group, hp) -> pd.DataFrame:
    """Median over seeds per setting (and the min..max), the number of seeds, diverged if any seed
    did, and survived, the median of the seeds' last recorded steps (`_keyed`: a diverged
    run's last before it blew up)."""
    settings = per_run.groupby(group + ["_setting"], observed=True, sort=False)
    out = settings.agg(final_loss=("final", "median"), final_loss_min=("final", "min"),
                       final_loss_max=("final", "max"), seeds=("seed", "nunique"), steps=("steps", "max"),
                       diverged=("diverged", "any"), survived=("last_step", "median"),
                       **{h: (h, "first") for h in hp})
    if "final_test_accuracy" in per_run.columns:  # with its range: a test set of 360 moves 0.003 an example
        accuracy = settings["final_test_accuracy"]
        out = out.assign(final_test_accuracy=accuracy.median(), final_test_accuracy_min=accuracy.min(),
                         final_test_accuracy_max=accuracy.max())
    if "chaotic" in per_run.columns:
        out["chaotic"] = settings["chaotic"].any()
    return out.reset_index()


def _reach(measured, best, group, objective) -> pd.DataFrame:
    """Median over the best setting's seeds of the first step (and time_s) at or below the target (a
    seed that diverged too: where it got there first, as the captions say); `measured`: rows of a
    `_keyed` frame."""
    frame = measured.merge(best[group + ["_setting", "target_loss"]], on=group + ["_setting"])
    rows = []
    for key, group_rows in frame.groupby(group, observed=True, sort=False):
        steps, times = [], []
        for _, run in group_rows.sort_values("step").groupby("seed", sort=False):
            hit = run[run[objective] <= run["target_loss"]]
            steps.append(hit["step"].iloc[0] if len(hit) else math.inf)
            times.append(hit["time_s"].iloc[0] if len(hit) else math.inf)
        rows.append((*key, _finite_median(steps), _finite_median(times)))
    return pd.DataFrame(rows, columns=group + ["steps_to_target", "time_to_target_s"])


def _finite_median(values) -> float:
    """The low median (an actual seed's value): with the target at most the best setting's median
    final loss, at least half the seeds reach it, so the low median is finite for every group that
    set or beat the target. NaN when more than half never get there."""
    value = float(statistics.median_low(values)) if values else math.nan
    return value if math.isfinite(value) else math.nan


# -- the paper code's logit clip against the exact likelihood ----------------------------------------

LOGIT_CLIP_COLUMNS = ["task", "optimizer", "lr", "damping", "step", "loss", "diverged", "repeat", "best", "chaotic",
                      "logit_clip"]  # what the comparison reads of a grid file (a third of its bytes)


def read_logit_clip_grids(paths) -> pd.DataFrame:
    """The comparison's columns of `natgrad grid` parquet files. A file written before grids had a
    logit_clip column was run with its task's own clip, which it is given here, so that a pipeline
    run on an older results/ folder need not redo its grids."""
    import pyarrow.parquet as pq

    from natgrad_impls.models import logit_clip_name
    from natgrad_impls.tasks import get_task

    frames = []
    for path in paths:
        present = set(pq.read_schema(path).names)
        frame = pd.read_parquet(path, columns=[c for c in LOGIT_CLIP_COLUMNS if c in present])
        if "logit_clip" not in present:
            frame["logit_clip"] = frame["task"].astype(str).map(lambda t: logit_clip_name(get_task(t).problem))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=LOGIT_CLIP_COLUMNS)


CLIP_TOLERANCE = 1e-12  # a run is "changed" by the clip when its last loss moves by more (relative)
CLIPS = ("paper", "none")  # names.LogitClip's values, in the table's column order
RUN = ["task", "optimizer", "logit_clip", "lr", "damping"]  # one grid run (of repeat 0)


def logit_clip_comparison(grid: pd.DataFrame) -> pd.DataFrame:
    """Per task x optimizer, the same Kunstner grid run with the paper code's logit clip and with the
    exact likelihood (`natgrad grid --logit-clip paper|none`): where the two differ (DESIGN 4).

    grid: both grids' frames concatenated (column logit_clip = paper | none; best and repeat as
    `natgrad grid` writes them). Columns, each with _paper and _none: the best run's lr, damping,
    final_loss and its range over the chaos repeats (final_loss_min, final_loss_max; empty without
    repeats), chaotic, diverged (every run did, so the best is a diverged one) and diverged_runs (of
    `runs`); then best_loss_change ((none - paper) / paper; empty where a best run diverged),
    beyond_chaos (the two best runs' ranges over their repeats do not overlap, so the change is not
    ef's chaos), changed_runs (runs whose last loss, last step or divergence the clip changes; the
    others never reached a clipped logit and agree to round-off) with smallest_lr_changed, and
    diverged_only_none (runs that diverge without the clip but not with it) with the smallest such lr
    and its_divergence_step (the earliest step at which one of those runs at that lr, of any
    damping, diverges)."""
    clipped = grid[grid["logit_clip"].astype(str).isin(CLIPS)]
    last = runs_by_clip(final_losses(clipped))
    best = clipped[clipped["best"].astype(bool)]  # the best runs and their chaos repeats
    best = dict(list(best.groupby([best[c].astype(str) for c in RUN[:3]])))
    rows = []
    for task, optimizer in dict.fromkeys((t, o) for t, o, _ in last):
        if not all((task, optimizer, clip) in last for clip in CLIPS):
            continue
        runs = {clip: last[task, optimizer, clip] for clip in CLIPS}
        row = {"task": task, "optimizer": optimizer, "runs": len(runs["paper"])}
        for clip in CLIPS:
            mine = best.get((task, optimizer, clip), clipped.iloc[:0])
            row.update({f"{k}_{clip}": v for k, v in _best_of(mine).items()})
            row[f"diverged_runs_{clip}"] = int(runs[clip]["diverged"].sum())
        row.update(_changes(runs["paper"], runs["none"], row))
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["_order"] = table["optimizer"].map({o.value: i for i, o in enumerate(Optimizer)})
    return table.sort_values(["task", "_order"]).drop(columns="_order").reset_index(drop=True)


def final_losses(grid: pd.DataFrame) -> pd.DataFrame:
    """One row per grid run (rows of repeat 0): its last recorded step, loss and diverged flag,
    indexed by task, optimizer, logit_clip, lr and damping (damping -1 for sgd and adam: NaN would
    not group), from one grouping of every row."""
    runs = grid.loc[grid["repeat"] == 0, RUN + ["step", "loss", "diverged"]]
    runs = runs.assign(**{c: runs[c].astype(str) for c in RUN[:3]}, damping=runs["damping"].fillna(-1.0))
    return runs.sort_values("step", kind="stable").groupby(RUN, sort=True).agg(
        step=("step", "last"), loss=("loss", "last"), diverged=("diverged", "any"))


def runs_by_clip(finals: pd.DataFrame) -> dict[tuple[str, str, str], pd.DataFrame]:
    """`final_losses` split by (task, optimizer, logit_clip), each indexed by lr and damping."""
    return {key: rows.droplevel(RUN[:3]) for key, rows in finals.groupby(level=RUN[:3], sort=False)}


def _best_of(best: pd.DataFrame) -> dict:
    """The best run's setting, final loss, its range over the chaos repeats, and flags, from the
    grid's rows marked best (the run, repeat 0, and its repeats)."""
    run = best[best["repeat"] == 0].sort_values("step")
    if not len(run):
        return {"lr": math.nan, "damping": math.nan, "final_loss": math.nan, "chaotic": pd.NA, "diverged": pd.NA}
    finals = best.sort_values("step").groupby("repeat")["loss"].last()
    repeats = finals.drop(index=0, errors="ignore")
    return {"lr": float(run["lr"].iloc[0]), "damping": float(run["damping"].iloc[0]),
            "final_loss": float(finals.loc[0]),
            "final_loss_min": float(finals.min()) if len(repeats) else math.nan,
            "final_loss_max": float(finals.max()) if len(repeats) else math.nan,
            "chaotic": bool(_flag_any(run["chaotic"])), "diverged": bool(run["diverged"].any())}


def _flag_any(column: pd.Series) -> bool:
    return bool(column.astype("boolean").fillna(False).any())


def _changes(paper: pd.DataFrame, none: pd.DataFrame, row: dict) -> dict:
    """How the exact likelihood's grid differs from the clipped one's, run by run and at the best."""
    both = paper.merge(none, left_index=True, right_index=True, suffixes=("_paper", "_none"))
    same = (np.isclose(both["loss_none"], both["loss_paper"], rtol=CLIP_TOLERANCE, atol=0.0, equal_nan=True)
            & (both["step_none"] == both["step_paper"]) & (both["diverged_none"] == both["diverged_paper"]))
    changed = both[~same]
    only_none = both[~both["diverged_paper"] & both["diverged_none"]]
    lrs = only_none.index.get_level_values("lr")
    first = only_none[lrs == lrs.min()] if len(only_none) else only_none  # the smallest such lr, every damping
    paper_loss, none_loss = row["final_loss_paper"], row["final_loss_none"]
    comparable = paper_loss and not (row["diverged_paper"] is True or row["diverged_none"] is True)
    return {
        "best_loss_change": (none_loss - paper_loss) / abs(paper_loss) if comparable else math.nan,
        "beyond_chaos": _apart(_spread(row, "paper"), _spread(row, "none")),
        "changed_runs": len(changed),
        "smallest_lr_changed": float(changed.index.get_level_values("lr").min()) if len(changed) else math.nan,
        "diverged_only_none": len(only_none),
        "smallest_lr_diverged_only_none": float(lrs.min()) if len(first) else math.nan,
        "its_divergence_step": int(first["step_none"].min()) if len(first) else pd.NA,
    }


def _spread(row: dict, clip: str) -> tuple[float, float]:
    """The best run's final loss over its chaos repeats (the loss itself without repeats)."""
    low, high = row.get(f"final_loss_min_{clip}", math.nan), row.get(f"final_loss_max_{clip}", math.nan)
    loss = row[f"final_loss_{clip}"]
    return (loss, loss) if math.isnan(low) else (low, high)


def _apart(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Two ranges of final losses that do not overlap: a change that the chaos of ef cannot explain."""
    return bool(a[1] < b[0] or b[1] < a[0])


# -- at a glance ----------------------------------------------------------------------------------------

SUMMARY = ["task", "framework", "device", "dtype", "optimizer", "momentum", "fisher", "samples", "rank",
           "final_loss", "loss_over_best", "final_loss_min", "final_loss_max", "steps_to_target", "time_to_target_s",
           "final_test_accuracy", "gradient_equivalents", "diverged", "chaotic"]
TIE_DIGITS = 9  # final losses equal to 1e-9 relative share a rank: float64 frameworks agree to ~1e-12


def summary(best: pd.DataFrame, cost: pd.DataFrame | None = None) -> pd.DataFrame:
    """The report's first table: per task x framework x device (x dtype), each optimizer's best setting
    (`best_hyperparameters` rows, convex and network tables concatenated) ranked by final loss, 1 the
    lowest (a setting that diverged ranks after every other; ties to 1e-9 share a rank), with
    `loss_over_best`, its final loss over the lowest there, and the range of final losses behind it
    (`final_loss_min`, `_max`: over the seeds of a network, the chaos repeats of a convex grid's best
    run), which says whether a rank is resolved; where `cost` (`timing.cost_table` rows) timed that
    task, framework and device, one step's cost in gradient-equivalents of the setting the optimizer
    ran with (`cost_setting`; none where no setting times it). SGD's momentum, the Fisher of NGD and
    K-FAC (exact, or MC with its samples), steps and time to target, test accuracy, diverged and
    chaotic as in `best`."""
    frame = best.copy()
    place = [c for c in ("task", "framework", "device", "dtype") if c in frame.columns]
    groups = [frame[c] for c in place]
    finite = frame["final_loss"].where(~frame["diverged"].astype(bool))  # a diverged one: NaN, ranked last
    lowest = finite.groupby(groups).transform("min")
    frame["loss_over_best"] = frame["final_loss"] / lowest
    # ties to round-off share a rank (wine's least-squares minimum, reached by three optimizers)
    frame["rank"] = (finite / lowest).groupby(groups).transform(_tied_ranks).astype("Int64")
    if cost is not None and not cost.empty:
        frame["setting"] = frame.apply(cost_setting, axis=1)
        on = ["task", "framework", "device", "setting"]
        frame = frame.merge(cost.groupby(on, as_index=False)["gradient_equivalents"].median(), on=on, how="left")
    frame["_order"] = frame["optimizer"].map({o.value: i for i, o in enumerate(Optimizer)})
    frame = frame.sort_values(place + ["rank", "_order"], kind="stable").reset_index(drop=True)
    return frame[[c for c in SUMMARY if c in frame.columns]]


def _tied_ranks(ratios: pd.Series) -> pd.Series:
    """Ranks 1, 2, ... of `ratios` (final losses over the lowest), those within 10^-TIE_DIGITS
    (relative) of their tie's smallest sharing its rank, NaN (diverged) last and tied: rounding the
    ratios split two values 2e-15 apart that straddled a rounding boundary."""
    values = ratios.fillna(np.inf).to_numpy(dtype=float)
    ranks, anchor, anchor_rank = np.zeros(len(values), dtype=int), None, 0
    for position, i in enumerate(np.argsort(values, kind="stable"), start=1):  # (by position: labels may repeat)
        if anchor is None or not values[i] <= anchor * (1 + 10.0**-TIE_DIGITS):
            anchor, anchor_rank = values[i], position
        ranks[i] = anchor_rank
    return pd.Series(ranks, index=ratios.index)


# The hyperparameters that decide what a step computes, not only the numbers it computes with
# (momentum: whether there is any): runs that agree on them take steps of the same cost.
STEP_WORK = {"momentum": lambda v: v > 0, "fisher": lambda v: getattr(v, "value", v), "samples": int,
             "kfac_update_period": int}


def step_work(optimizer: str, values) -> tuple:
    """The optimizer and its STEP_WORK hyperparameters, from `values` (a mapping; a value missing or
    NaN is the optimizer's default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(HYPERPARAMETERS[Optimizer(optimizer)])}
    work, taken = [optimizer], accepted(optimizer)
    for name, reads in STEP_WORK.items():
        if name in taken:
            value = values.get(name)
            work.append(reads(defaults[name] if value is None or pd.isna(value) else value))
    return tuple(work)


def cost_setting(row) -> str | None:
    """The label of `timing.SETTINGS` that times the step a best-hyperparameters row ran: the one of
    the same `step_work` (sgd with momentum is sgd-momentum, ngd's Fisher picks ngd-exact or ngd-mc,
    a K-FAC run refreshing every 10 steps is kfac); None where no label times that step."""
    work = step_work(row["optimizer"], row)
    return next((label for label, (optimizer, values) in timing.SETTINGS.items()
                 if step_work(optimizer, values) == work), None)


def to_html(frame: pd.DataFrame, digits: int = 4) -> str:
    """A whole HTML page of the table, as the report shows it (a CSV there is a download only):
    optimizer names as legends (SGD, K-FAC), frameworks and devices as in the figures, numbers to
    `digits` significant digits, empty cells blank."""
    shown = frame.copy()
    for column, names in {"optimizer": Optimizer, "framework": Framework, "device": Device}.items():
        if column in shown.columns:
            labels = legends(names)
            shown[column] = shown[column].map(lambda v, labels=labels: labels.get(v, v))
    formatters = {c: (lambda v: "" if pd.isna(v) else f"{v:.{digits}g}")
                  for c in shown.columns if pd.api.types.is_float_dtype(shown[c])}
    table = shown.to_html(index=False, formatters=formatters, na_rep="", border=0, classes="natgrad-table")
    # numbers right-aligned, names and flags left: pandas gives cells no class, so columns go by position
    text = [not pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]) for c in frame]
    left = "".join(f" td:nth-child({i + 1}), th:nth-child({i + 1}) {{ text-align: left; }}"
                   for i, is_text in enumerate(text) if is_text)
    return f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><style>{_TABLE_STYLE}{left}</style></head>\n" \
           f"<body>\n{table}\n</body></html>\n"


_TABLE_STYLE = ("body { font-family: sans-serif; font-size: 13px; margin: 0.5em; } "
                "table { border-collapse: collapse; } "
                "th, td { padding: 2px 8px; text-align: right; white-space: nowrap; } "
                "th { border-bottom: 1px solid #888; position: sticky; top: 0; background: #fff; } "
                "tbody tr:nth-child(even) { background: #f2f2f2; }")


# -- environment ----------------------------------------------------------------------------------------

PACKAGES = ("numpy", "torch", "jax", "jaxlib", "optax", "pandas", "matplotlib", "seaborn", "snakemake")


def environment() -> pd.DataFrame:
    """(key, value) rows: python, the versions of the packages that made the numbers (those
    importable), platform, CPU model, cores, and the GPU torch or jax sees, if any."""
    rows = [("python", sys.version.split()[0]), ("platform", platform.platform())]
    rows += [(name, version) for name in PACKAGES if (version := timing.package_version(name)) is not None]
    rows += [("cpu", timing.cpu_model()), ("cpu cores (logical)", str(os.cpu_count()))]
    if hasattr(os, "sched_getaffinity"):
        rows.append(("cpu cores (usable)", str(len(os.sched_getaffinity(0)))))
    rows += [(f"gpu ({framework})", name) for framework, name in _gpus()]
    return pd.DataFrame(rows, columns=["key", "value"])


def version_notes(name: str, frame: pd.DataFrame) -> list[str]:
    """A note where the timing table `name` was measured with other package versions than those
    installed (its `versions` column, timing.package_versions), or records none."""
    if "versions" not in frame.columns or frame["versions"].isna().all():
        return [f"{name}: records no package versions (measured before tables recorded them); results/README.md "
                "says what it predates."]
    measured = str(frame["versions"].dropna().iloc[0])
    installed = timing.package_versions(part.split()[0] for part in measured.split(", "))
    return [] if measured == installed else [f"{name}: measured with {measured}; this run has {installed}."]


def _gpus() -> list[tuple[str, str]]:
    """The GPUs torch and jax see (only frameworks already imported or importable; no GPU: none)."""
    found = []
    try:
        import torch

        if torch.cuda.is_available():
            found += [("torch", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    try:
        import jax

        try:
            found += [("jax", getattr(d, "device_kind", str(d))) for d in jax.devices("gpu")]
        except RuntimeError:
            pass
    except ImportError:
        pass
    return found
