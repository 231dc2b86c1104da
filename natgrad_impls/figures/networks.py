"""Training on the network tasks: loss, EF/NGD cosine and test accuracy of tuned runs over seeds.

Input: runner frames (`runner.run`, DESIGN 7) of tuned runs, concatenated: several seeds per task,
optimizer, framework and device. Columns read: task, optimizer, framework, device, seed, step,
time_s, diverged, the hyperparameter columns (fisher and samples among them), and what is drawn:
train_loss (the default), test_loss, loss, cos_ef_ngd (with cos_ngd_grad) or test_accuracy (rows
where measured).

Layout (the same for every figure here): one row of panels per task (two for `training`: against
step, then against wall-clock seconds), one column per framework and device (PyTorch CPU, JAX CPU,
PyTorch GPU, JAX GPU: those present). Panels of a row share their axes, so that a glance along the
time row compares frameworks and devices on the same clock, a logarithmic one (`LOG_X`). In a panel:
the median over seeds as a line, the min..max over seeds as a band, one colour and line style per
optimizer (`style`).

A (task, optimizer, framework, device) with runs of more than one hyperparameter setting is drawn
with the one the best-hyperparameters table lists (`tables.in_best_setting`: lowest median final
full-train loss, a setting that diverged on any seed last), and a caption note says so.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.ticker import LogLocator, MaxNLocator

from natgrad_impls.figures import Drawn, placeholder, style, tables

KEYS = ["task", "optimizer", "framework", "device"]
PANEL_WIDTH = 1.65  # inches per column: four columns at full width
PANEL_HEIGHT = 1.35
BAND_ALPHA = 0.18
# x axes drawn on a log scale: one step's cost spans decades between optimizers (on a CPU, exact
# NGD's step costs 60 to 130 gradients on the default networks, SGD's one or two), so on a linear
# clock the fast runs would be a sliver at its left; time 0 (the start) has no place on it
LOG_X = {"time_s"}
DECADES_LABELLED = 8  # a log time axis labels each decade up to this many (matplotlib's default: fewer)
LOG_X_NOTE = "Time axes logarithmic (step costs span decades between optimizers); the start, at time 0, is not drawn."
# Where a full evaluation was measured: small and edgeless, so that 20 or so per line leave the
# line style readable.
EVALUATION_MARKER = {"marker": "o", "markersize": 2.0, "markeredgewidth": 0}


# -- public figures -----------------------------------------------------------------------------------

def training(frame: pd.DataFrame, y: str = "train_loss", smooth: int | None = None) -> Drawn:
    """Loss against step and against wall-clock seconds (time_s) per task, log-scale loss.

    y: "train_loss" (the default: the full-train loss that tuning ranks settings by, on the rows
    where it was evaluated, with markers there), "test_loss", or "loss" (the step's mini-batch
    loss: every step has one, but it follows the epoch's order of batches). smooth: for "loss"
    only, a running mean over this many steps of each run before taking the median over seeds
    (default: 1/50 of the run, at least 1), because single mini-batch losses are noisy enough to
    hide the comparison; the caption says which window was used."""
    frame, notes = _prepare(frame, y)
    if frame.empty:
        return placeholder(f"No {y} values in the table: nothing to draw.", notes)
    if y == "loss":
        frame = _smooth(frame, [y], smooth, notes, "Mini-batch loss")
    kinds = [("step", "step"), ("time_s", "time [s]")]
    return _grid(frame, y, kinds, ylabel=_YLABELS.get(y, y), log=True, notes=notes, markers=y != "loss")


def cosine(frame: pd.DataFrame, smooth: int | None = None) -> Drawn:
    """cos(EF direction, NGD direction) along training, on the rows where it was measured
    (`runner.run(..., cos_ef_ngd=True)`): how far the empirical Fisher points from the true one.
    Beside it, dotted, cos(NGD direction, gradient) (cos_ngd_grad, where the table has it): where
    that is near 1 too (typically: the damping outweighs the curvature), both steps are gradient
    steps, so a cosine of 1 there says nothing of the EF against the Fisher.
    smooth: running mean over this many measurements (default: 1/50 of them when there are more
    than 100, since a cosine on each mini-batch is as noisy as its loss)."""
    frame, notes = _prepare(frame, "cos_ef_ngd")
    if frame.empty:
        return placeholder("No cos_ef_ngd values in the table: nothing to draw.", notes)
    along = [style.LABELS.get(o, o) for o in style.present(frame["optimizer"].unique())[0]]
    notes.append(f"Cosine measured along the runs of {', '.join(along)}.")
    gauge = "cos_ngd_grad" if "cos_ngd_grad" in frame and frame["cos_ngd_grad"].notna().any() else None
    notes.extend(_without_gauge(frame, gauge))
    values = ["cos_ef_ngd"] + ([gauge] if gauge else [])
    frame = _smooth(frame, values, smooth, notes, "Cosines" if gauge else "Cosine")
    drawn = _grid(frame, "cos_ef_ngd", [("step", "step")], ylabel="cos(EF, NGD)", log=False, notes=notes,
                  note_missing=False, gauge=gauge)
    for ax in drawn.figure.axes:
        if ax.has_data():
            ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
    return drawn


def _without_gauge(frame, gauge) -> list[str]:
    """Notes on the runs whose table has no gauge (runs made before it was recorded)."""
    if gauge is None:
        return ["No cos_ngd_grad in the table (runs made before it was recorded): the cosine is drawn alone."]
    lacking = frame.groupby(KEYS, observed=True)[gauge].apply(lambda v: v.isna().all())
    return [f"{task}, {style.LABELS.get(o, o)}, {style.combo_label((fw, dev))}: no cos_ngd_grad in its table "
            "(runs made before it was recorded)." for (task, o, fw, dev), missing in lacking.items() if missing]


def _smooth(frame, values, window, notes, name) -> pd.DataFrame:
    """Each run's `values` (columns) as running means over `window` measurements (default: 1/50 of
    the longest run's measurements when it has more than 100, else none), with a note saying so."""
    frame = frame.reset_index(drop=True)  # tables concatenated as read repeat index labels, which assign refuses
    runs = frame.sort_values("step").groupby(KEYS + ["seed"], observed=True)
    if window is None:
        longest = int(runs.size().max())
        window = longest // 50 if longest > 100 else 1
    if window <= 1:
        return frame
    notes.append(f"{name} as a running mean over {window} measurements.")
    smoothed = runs[values].transform(lambda v: v.rolling(window, min_periods=1).mean())
    return frame.assign(**{value: smoothed[value] for value in values})


def accuracy(frame: pd.DataFrame) -> Drawn:
    """Test accuracy against wall-clock seconds, on the rows where it was evaluated; markers at
    the evaluations, since they are few."""
    frame, notes = _prepare(frame, "test_accuracy")
    if frame.empty:
        return placeholder("No test_accuracy values in the table: nothing to draw.", notes)
    drawn = _grid(frame, "test_accuracy", [("time_s", "time [s]")], ylabel="test accuracy", log=False, notes=notes,
                  markers=True)
    ncols = len(style.combos(frame))  # _grid's panels: a row per task, a column per framework/device
    for t, task in enumerate(dict.fromkeys(frame["task"])):
        low = _accuracy_floor(frame[frame["task"] == task])  # per task: one task's worst must not flatten another's
        if low > 0:
            for ax in drawn.figure.axes[t * ncols:(t + 1) * ncols]:
                if ax.has_data():
                    ax.set_ylim(low, 1.0)
            drawn.notes.append(f"{task}: accuracy axis from {low:.2f}; the first evaluations lie below.")
    return drawn


def _accuracy_floor(frame) -> float:
    """Where the accuracy axis starts: twice the worst final error below the worst final accuracy
    (the comparison is in the last percent; the climb from chance is not), 0 if that is below 0."""
    final = frame.sort_values("step").groupby(KEYS + ["seed"], observed=True)["test_accuracy"].last()
    worst = float(final.groupby(level=KEYS, observed=True).median().min())
    return max(0.0, round(worst - 2 * (1 - worst), 2))


_YLABELS = {"loss": "mini-batch loss", "train_loss": "train loss", "test_loss": "test loss"}


# -- preparing the table ------------------------------------------------------------------------------

def _prepare(frame: pd.DataFrame, value: str) -> tuple[pd.DataFrame, list[str]]:
    """The rows where `value` is measured, names as plain strings, one hyperparameter setting per
    (task, optimizer, framework, device), and the notes that go with it."""
    missing = [c for c in KEYS + ["seed", "step", "time_s"] if c not in frame.columns]
    if missing:
        raise ValueError(f"frame: missing columns {', '.join(missing)} (runner.run's long format)")
    if value not in frame.columns:
        return frame.iloc[:0], []
    frame, notes = _one_setting(frame.astype({name: str for name in KEYS}))  # chosen on every row, as the table does
    measured = frame[np.isfinite(frame[value].astype(float))].copy()
    # the runs drawn, every row of them: their last step is the run's length wherever `value` was measured
    setup = _setup_notes(frame[frame.set_index(KEYS[:2]).index.isin(measured.set_index(KEYS[:2]).index)])
    notes += _fisher_notes(measured) + _setting_differences(measured) + _diverged_notes(measured)
    return measured, setup + notes


def _label(frame) -> pd.Series:
    return (frame["task"] + ", " + frame["optimizer"].map(lambda o: style.LABELS.get(o, o)) + ", "
            + frame["framework"].map(lambda f: style.FRAMEWORK_LABELS.get(f, f)) + " "
            + frame["device"].map(lambda d: style.DEVICE_LABELS.get(d, d)))


def _setup_notes(frame) -> list[str]:
    """'<task>: MLP 64-128-10 (tanh), 9610 parameters; batch 128, 400 steps, float32, 3 seeds.' per
    task, and 'SGD: momentum 0.9.': what the runs were, which the captions cannot know (the config
    sets it)."""
    from natgrad_impls.tasks import TASKS

    notes = []
    for task, rows in frame.groupby("task", observed=True):
        parts = [TASKS[task].problem.model.describe() + ";"] if task in TASKS else []
        if "batch_size" in rows:
            sizes = sorted({int(b) for b in rows["batch_size"].dropna()})
            parts.append("batch " + "/".join(map(str, sizes)) + "," if sizes else "full batch,")
        finished = rows[~rows["diverged"].astype(bool)] if "diverged" in rows else rows
        if len(finished):
            parts.append(f"{int(finished['step'].max())} steps,")
        else:  # a diverged run stops early: the runs' length is not in the table
            parts.append(f"{int(rows['step'].max())} steps at most (every run diverged),")
        if "dtype" in rows:
            parts.append(", ".join(sorted(set(rows["dtype"].astype(str)))) + ",")
        parts.append(f"{rows['seed'].nunique()} seeds.")
        notes.append(f"{task}: {' '.join(parts)}")
    if "momentum" in frame:  # the legend's SGD is heavy-ball SGD on the networks, plain GD on the convex tasks
        momenta = sorted({float(m) for m in frame.loc[frame["optimizer"] == "sgd", "momentum"].dropna()})
        if momenta:
            notes.append(f"SGD: momentum {' / '.join(f'{m:g}' for m in momenta)}.")
    return notes


def _diverged_notes(frame) -> list[str]:
    """'<task>, <optimizer>, <framework> <device>: k of n seeds diverged (drawn up to there).'"""
    if "diverged" not in frame.columns or frame.empty:
        return []
    runs = frame.groupby(KEYS + ["seed"], observed=True)["diverged"].any()
    notes = []
    for key, flags in runs.groupby(level=KEYS, observed=True):
        if flags.any():
            label = _label(pd.DataFrame([dict(zip(KEYS, key))])).iloc[0]
            notes.append(f"{label}: {int(flags.sum())} of {len(flags)} seeds diverged (drawn up to their divergence).")
    return notes


def _fisher_notes(frame) -> list[str]:
    """'NGD, K-FAC: the Monte-Carlo Fisher, 1 sampled label per example (not the expectation over
    labels).' per Fisher drawn, so that a reader does not take a sampled Fisher for the exact one
    that the legend's name suggests; 'NGD: the exact Fisher.' otherwise."""
    if "fisher" not in frame.columns:
        return []
    drawn = frame[frame["fisher"].notna()]
    samples = drawn["samples"].where(drawn["fisher"] == "mc") if "samples" in drawn else np.nan  # exact: none
    kinds = drawn.assign(samples=samples).groupby(["fisher", "samples"], dropna=False, observed=True)
    notes = []
    for (fisher, samples), rows in kinds:
        names = ", ".join(style.LABELS.get(o, o) for o in style.present(rows["optimizer"].unique())[0])
        if fisher == "mc":
            count = "" if pd.isna(samples) else f", {int(samples)} sampled label{'s' * (int(samples) != 1)} per example"
            notes.append(f"{names}: the Monte-Carlo Fisher{count} (not the expectation over labels).")
        else:
            notes.append(f"{names}: the {fisher} Fisher.")
    return notes


def _setting_differences(frame) -> list[str]:
    """'<task>, <optimizer>: tuned to different settings per column (PyTorch CPU: lr 0.3; JAX CPU:
    lr 0.1).' where the columns of a row draw different settings (each is tuned on its own), naming
    only the hyperparameters that differ, so that a reader does not take it for a framework gap."""
    columns = [c for c in tables.SETTING_COLUMNS if c in frame.columns]
    notes = []
    for (task, optimizer), rows in frame.groupby(["task", "optimizer"], observed=True):
        chosen = rows.groupby(["framework", "device"], observed=True)[columns].first()
        differ = [c for c in columns if chosen[c].nunique(dropna=False) > 1]
        if not differ:
            continue
        each = "; ".join(f"{style.combo_label(combo)}: "
                         + ", ".join(f"{c} {_plain(chosen.loc[combo, c])}" for c in differ) for combo in chosen.index)
        notes.append(f"{task}, {style.LABELS.get(optimizer, optimizer)}: tuned to different settings per column "
                     f"({each}); the curves differ by that too.")
    return notes


def _plain(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _one_setting(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Keep, per (task, optimizer, framework, device), the runs of the setting the best-hyperparameters
    table lists (`tables.in_best_setting`), with a note where there were several to choose from."""
    columns = [c for c in tables.SETTING_COLUMNS if c in frame.columns]
    if not columns or frame.empty:
        return frame, []
    counts = tables.setting_key(frame, columns).groupby([frame[k] for k in KEYS], observed=True).nunique()
    notes = [f"{task}, {style.LABELS.get(optimizer, optimizer)}, {style.combo_label((framework, device))}: {n} "
             f"hyperparameter settings, the best-hyperparameters table's (lowest median final loss) drawn."
             for (task, optimizer, framework, device), n in counts.items() if n > 1]
    return frame[tables.in_best_setting(frame)], notes


def summarise(frame: pd.DataFrame, value: str, x: str) -> pd.DataFrame:
    """Per optimizer and step: median, min and max of `value` over seeds, and the median of `x`
    (the clock differs a little between seeds; steps align them)."""
    grouped = frame.groupby(["optimizer", "step"], observed=True)
    out = grouped[value].agg(["median", "min", "max"])
    out["x"] = grouped[x].median()
    return out.reset_index().sort_values(["optimizer", "x"])


# -- drawing -----------------------------------------------------------------------------------------


def _grid(frame, value, kinds, ylabel, log, notes, markers=False, note_missing=True, gauge=None) -> Drawn:
    """Rows: task x kind of x axis; columns: framework/device. One y range per task, one x range per
    row, so that panels side by side compare on the same scales. gauge: a second column drawn per
    optimizer as its median alone (style.gauge_kwargs), with a legend entry of its own."""
    tasks = list(dict.fromkeys(frame["task"]))
    combos = style.combos(frame)
    nrows, ncols = len(tasks) * len(kinds), len(combos)
    width = min(style.FULL_WIDTH, max(style.COLUMN_WIDTH, PANEL_WIDTH * ncols))
    with style.paper():
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, PANEL_HEIGHT * nrows + 0.45), squeeze=False,
                                 layout="constrained")
        shown = set()
        for t, task in enumerate(tasks):
            rows = frame[frame["task"] == task]
            there, missing = style.present(rows["optimizer"].unique())
            notes.extend(f"{task}: {m}" for m in missing if note_missing)
            for k, (x, xlabel) in enumerate(kinds):
                r = t * len(kinds) + k
                for c, combo in enumerate(combos):
                    ax = axes[r, c]
                    cell = rows[(rows["framework"] == combo[0]) & (rows["device"] == combo[1])]
                    if k == 0:
                        ax.set_title(f"{task} · {style.combo_label(combo)}")
                    if cell.empty:
                        _no_runs(ax)
                        if k == 0:
                            notes.append(f"{task}: no {style.combo_label(combo)} runs.")
                        continue
                    if x in LOG_X:
                        cell = cell[cell[x] > 0]
                        ax.set_xscale("log")
                        ax.xaxis.set_major_locator(LogLocator(numticks=DECADES_LABELLED))  # not every 3rd decade
                        if LOG_X_NOTE not in notes:
                            notes.append(LOG_X_NOTE)
                    shown |= _draw_cell(ax, cell, value, x, there, markers, gauge)
                    if log:
                        ax.set_yscale("log")
                    else:  # accuracy and cosine: enough ticks to read a final value off
                        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
                    ax.set_xlabel(xlabel)
                    if c == 0:
                        ax.set_ylabel(ylabel)
                _same_limits(axes[r], "x")
            _same_limits(axes[t * len(kinds):(t + 1) * len(kinds)].ravel(), "y")
        _legend(fig, [o for o in style.OPTIMIZERS if o in shown], markers, style.gauge_drawn(fig))
    return Drawn(fig, notes)


def _draw_cell(ax, cell, value, x, optimizers, markers, gauge=None) -> set[str]:
    """Median line and min..max band per optimizer (and the gauge's median); returns the optimizers drawn."""
    summary = summarise(cell, value, x)
    gauges = summarise(cell[cell[gauge].notna()], gauge, x) if gauge else None
    drawn = set()
    for optimizer in optimizers:
        line = summary[summary["optimizer"] == optimizer]
        if line.empty:
            continue
        kwargs = style.line_kwargs(optimizer)
        if markers:
            kwargs.update(EVALUATION_MARKER)
        ax.plot(line["x"], line["median"], **kwargs)
        if cell.loc[cell["optimizer"] == optimizer, "seed"].nunique() > 1:
            ax.fill_between(line["x"], line["min"], line["max"], color=kwargs["color"], alpha=BAND_ALPHA,
                            linewidth=0, label="_band")
        mine = None if gauges is None else gauges[gauges["optimizer"] == optimizer]
        if mine is not None and not mine.empty:
            ax.plot(mine["x"], mine["median"], **style.gauge_kwargs(kwargs["color"]))
        drawn.add(optimizer)
    return drawn


def _same_limits(axes, which: str) -> None:
    """One range on axis `which` ("x" or "y") for the panels that have data."""
    used = [ax for ax in axes if ax.has_data()]
    if not used:
        return
    get, set_ = f"get_{which}lim", f"set_{which}lim"
    low = min(getattr(ax, get)()[0] for ax in used)
    high = max(getattr(ax, get)()[1] for ax in used)
    for ax in used:
        getattr(ax, set_)(low, high)


def _legend(fig, optimizers, markers=False, gauge=False) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], **style.line_kwargs(o), **(EVALUATION_MARKER if markers else {})) for o in optimizers]
    if gauge and handles:
        handles.append(style.gauge_handle(fig))
    if handles:
        fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), handlelength=3)


def _no_runs(ax) -> None:
    ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax.set_xticks([])
    ax.set_yticks([])
