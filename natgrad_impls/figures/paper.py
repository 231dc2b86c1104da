"""The paper's figures (Kunstner, Balles & Hennig 2019), drawn from tidy tables only.

    drawn = paper.vecfield(toys.vecfield_table())                       # figure 1
    drawn = paper.misspecification(toys.misspec_table(), "logistic")    # figure 2 ("linear": appendix)
    drawn = paper.optimisation(grid_frame, cos_frame, tasks=["breastcancer", "wine"])   # figure 3
    drawn = paper.starting_point(toys.starting_point_table())           # appendix
    drawn = paper.logit_clip(grid_frames_of_both_clips)                 # appendix: clipped vs exact

Every function takes DataFrames (the `kind`-tagged tables of `natgrad_impls.toys`, or the long
frames of `natgrad grid` / `natgrad run --cos-ef-ngd`) and returns a `Drawn`. What the table lacks
is left out with a caption note, never an exception, so that a partial run still gives a figure.
Artists carry a gid ("trajectory", "start", "minimum", "field", "fit", "data", "ellipse-exact",
"ellipse-empirical", "band", "cos", "gauge", ...) so that tests and users can find what was drawn.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogLocator

from natgrad_impls.figures import Drawn, style, tables
from natgrad_impls.names import LogitClip

GREY = "0.55"
LIGHT_GREY = "0.75"
CLASS_COLORS = ("#004488", "#DDAA33")  # Paul Tol's high-contrast blue and yellow, as in the paper
TOY_OPTIMIZERS = ("sgd", "ngd", "ef")
VARIANT_TITLES = {"correct": "Correct", "misspecified-a": "Misspecified (A)", "misspecified-b": "Misspecified (B)"}
BAND_ALPHA = 0.25


# -- shared helpers ---------------------------------------------------------------------------------

def _rows(table: pd.DataFrame, kind: str, **where) -> pd.DataFrame:
    rows = table[table["kind"] == kind] if "kind" in table else table.iloc[:0]
    for name, value in where.items():
        if rows.empty:  # a table without this kind's rows may lack its columns too
            break
        rows = rows[rows[name] == value]
    return rows


def _grid_values(rows: pd.DataFrame, value: str):
    """(axis_0, axis_1, values[j, i]) of contour rows laid out on a theta_0 x theta_1 grid."""
    pivot = rows.pivot_table(index="theta_1", columns="theta_0", values=value)
    return pivot.columns.to_numpy(), pivot.index.to_numpy(), pivot.to_numpy()


def _sqrt_levels(values: np.ndarray, minimum: float, count: int = 6) -> np.ndarray:
    """Contour levels equally spaced in sqrt(L - L*): equally spaced ellipses on a quadratic."""
    top = math.sqrt(max(np.nanmax(values) - minimum, 0.0))
    return minimum + (top * np.linspace(0, 1, count + 2)[1:-1]) ** 2


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color=GREY, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def _no_data_figure(notes: list[str], width=style.COLUMN_WIDTH) -> Drawn:
    fig, ax = plt.subplots(figsize=(width, 1.2))
    _empty(ax, "nothing to draw: " + " ".join(notes))
    ax.grid(False)
    return Drawn(fig, notes)


def _mark_minimum(ax, theta_0, theta_1, label=None) -> None:
    ax.plot([theta_0], [theta_1], marker="*", color="k", markersize=7, linestyle="none", zorder=5, gid="minimum",
            label=label)


# -- figure 1: vector fields ------------------------------------------------------------------------

def vecfield(table: pd.DataFrame) -> Drawn:
    """Figure 1: the data, then per optimizer (SGD, NGD, EF) a panel with the loss contours, the
    direction of its flow -lr C^-1 g (arrows of unit length: the direction is the point), its
    trajectories from the four starting points (hexagons) and the minimum (star).

    table: `toys.vecfield_table()` (kinds data, minimum, contour, field, trajectory).
    """
    notes = []
    moving = pd.concat([_rows(table, "field"), _rows(table, "trajectory")])
    optimizers, missing = style.present(moving["optimizer"].dropna().unique() if len(moving) else [], TOY_OPTIMIZERS)
    notes += missing
    minimum = _rows(table, "minimum")
    contour = _rows(table, "contour")
    data = _rows(table, "data")
    with style.paper():
        panels = 1 + len(optimizers)
        fig, axes = plt.subplots(1, panels, figsize=(style.FULL_WIDTH, style.FULL_WIDTH / 4 + 0.35), squeeze=False,
                                 layout="constrained")
        axes = axes[0]
        _vecfield_data(axes[0], data, minimum)
        for ax, optimizer in zip(axes[1:], optimizers):
            _vecfield_panel(ax, table, optimizer, minimum, contour)
        if not len(data):
            notes.append("The table has no data rows: the data panel is empty.")
        lr = {o: _rows(table, "trajectory", optimizer=o)["lr"].dropna() for o in optimizers}
        speeds = ", ".join(f"{style.LABELS[o]} {lr[o].iloc[0]:.3g}" for o in optimizers if len(lr[o]))
        if speeds:
            notes.append(f"Flows -lr C^-1 g with lr: {speeds}; arrows show directions only.")
    return Drawn(fig, notes)


def _vecfield_data(ax, data: pd.DataFrame, minimum: pd.DataFrame) -> None:
    ax.set_title("Data")
    if not len(data):
        _empty(ax, "no data rows")
        return
    ax.plot(data["x"], data["y"], ".", markersize=1.5, alpha=0.35, color=CLASS_COLORS[0], gid="data")
    if len(minimum):
        b, slope = minimum["theta_0"].iloc[0], minimum["theta_1"].iloc[0]
        xs = np.linspace(0, np.nanmax(data["x"]), 50)
        ax.plot(xs, b + slope * xs, "--", color="k", linewidth=1.0, gid="fit", label=r"$y = b + \theta x$")
        ax.legend(loc="upper left", handlelength=1.6)
    ax.set_xlabel("$x$")
    ax.set_ylabel("$y$")
    ax.set_box_aspect(1)


def _vecfield_panel(ax, table, optimizer, minimum, contour) -> None:
    kwargs = style.line_kwargs(optimizer)
    ax.set_title(kwargs["label"])
    if len(contour):
        x0, x1, values = _grid_values(contour, "loss")
        low = minimum["loss"].iloc[0] if len(minimum) else np.nanmin(values)
        ax.contour(x0, x1, values, levels=_sqrt_levels(values, low), colors=LIGHT_GREY, linewidths=0.6)
        ax.set_xlim(x0.min(), x0.max())
        ax.set_ylim(x1.min(), x1.max())
    field = _rows(table, "field", optimizer=optimizer)
    if len(field):
        d = field[["d_0", "d_1"]].to_numpy()
        norm = np.linalg.norm(d, axis=1)
        d = d / np.where(norm > 0, norm, 1.0)[:, None]
        ax.quiver(field["theta_0"], field["theta_1"], d[:, 0], d[:, 1], angles="xy", color=GREY, width=0.006,
                  headwidth=3.5, headlength=3.5, headaxislength=3, scale=22, gid="field", zorder=2)
    runs = _rows(table, "trajectory", optimizer=optimizer)
    for start, path in runs.groupby("start", sort=True) if len(runs) else ():
        path = path.sort_values("step")
        ax.plot(path["theta_0"], path["theta_1"], color=kwargs["color"], linestyle="-", linewidth=2.0, alpha=0.9,
                solid_capstyle="round", gid="trajectory", label=kwargs["label"] if start == 0 else None, zorder=3)
        ax.plot(path["theta_0"].iloc[:1], path["theta_1"].iloc[:1], marker="h", color="k", markersize=4,
                linestyle="none", gid="start", zorder=4)
    if len(minimum):
        _mark_minimum(ax, minimum["theta_0"].iloc[0], minimum["theta_1"].iloc[0])
    ax.set_xlabel("$b$")
    ax.set_ylabel(r"$\theta$")
    ax.set_aspect("equal")
    ax.grid(False)


# -- figure 2: misspecification ---------------------------------------------------------------------

def _variants(table: pd.DataFrame, model: str) -> list[str]:
    """The variants of `model` in the paper's order: correct, misspecified (A), misspecified (B)."""
    if "variant" not in table:
        return []
    present = set(map(str, table["variant"].dropna().unique()))
    return [f"{model}-{suffix}" for suffix in VARIANT_TITLES if f"{model}-{suffix}" in present]


def _curvature_matrix(row) -> np.ndarray:
    return np.array([[row["c_00"], row["c_01"]], [row["c_01"], row["c_11"]]])


def ellipse(center, matrix: np.ndarray, radius: float, points: int = 200) -> np.ndarray:
    """points x 2: the level set {theta : (theta - center)^T C (theta - center) = radius^2}, i.e.
    center + radius C^-1/2 u over the unit circle."""
    values, vectors = np.linalg.eigh(matrix)
    root = vectors @ np.diag(1.0 / np.sqrt(values)) @ vectors.T
    t = np.linspace(0, 2 * np.pi, points)
    return np.asarray(center)[None, :] + radius * np.stack([np.cos(t), np.sin(t)], axis=1) @ root.T


def misspecification(table: pd.DataFrame, model: str = "logistic") -> Drawn:
    """Figure 2 (model="logistic") or its appendix version (model="linear"): top row the data of the
    correct and the two misspecified sets, bottom row the loss contours around the minimum with
    the quadratic models of the Fisher (NGD's colour) and of the EF (EF's colour).

    table: `toys.misspec_table()` (columns variant, kind = data | minimum | contour | curvature).
    The ellipses are the level sets Delta^T C Delta = radius^2 (the table's radius, the paper's
    3/sqrt(N)); the loss contours are drawn at L* + (radius s)^2 / 2 for s = 1/2, 1, 3/2, ...: on a
    quadratic loss with Hessian C the contour s = 1 is the ellipse.
    """
    if model not in ("logistic", "linear"):
        raise ValueError(f"model: {model!r} is not one of logistic, linear")
    variants = _variants(table, model)
    notes = [f"{VARIANT_TITLES[s]}: not in the table, left out." for s in VARIANT_TITLES
             if f"{model}-{s}" not in variants]
    if not variants:
        return _no_data_figure(notes, style.FULL_WIDTH)
    with style.paper():
        fig, axes = plt.subplots(2, len(variants), figsize=(style.FULL_WIDTH * len(variants) / 3, 4.3), squeeze=False,
                                 layout="constrained")
        for column, variant in enumerate(variants):
            rows = table[table["variant"] == variant]
            top, bottom = axes[0, column], axes[1, column]
            top.set_title(VARIANT_TITLES[variant.removeprefix(model + "-")])
            (_logistic_data if model == "logistic" else _linear_data)(top, rows)
            notes += _quadratic_models(bottom, rows, variant)
        axes[0, 0].set_ylabel("Data")
        axes[1, 0].set_ylabel("Quadratic models\nat the minimum")
        handles = [
            Line2D([], [], color=GREY, linewidth=0.8, label="Loss contour"),
            Line2D([], [], color=style.COLORS["ngd"], linestyle=style.LINESTYLES["ngd"], label="Fisher"),
            Line2D([], [], color=style.COLORS["ef"], linestyle=style.LINESTYLES["ef"], label="Empirical Fisher"),
            Line2D([], [], color="k", marker="*", linestyle="none", label="Minimum"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=4, handlelength=3)
    return Drawn(fig, notes)


def _strip(ax) -> None:
    ax.tick_params(labelbottom=False, labelleft=False, length=0)


def _logistic_data(ax, rows: pd.DataFrame) -> None:
    data = _rows(rows, "data")
    for label, marker, color, size in ((0, "^", CLASS_COLORS[0], 1.6), (1, "x", CLASS_COLORS[1], 2.0)):
        cls = data[data["y"] == label]
        ax.plot(cls["x_0"], cls["x_1"], marker=marker, markersize=size, markeredgewidth=0.5, linestyle="none",
                alpha=0.45, color=color, gid="data", label=f"$y = {label}$")
    ax.set_xlim(-9, 9)
    ax.set_ylim(-9, 9)
    ax.set_aspect("equal")
    _strip(ax)


def _linear_data(ax, rows: pd.DataFrame) -> None:
    data = _rows(rows, "data")
    ax.plot(data["x_0"], data["y"], "x", markersize=2.0, markeredgewidth=0.5, alpha=0.45, color=CLASS_COLORS[1],
            gid="data")
    minimum = _rows(rows, "minimum")
    ax.set_xlim(-4, 4)
    ax.set_ylim(-6, 10)
    ax.set_box_aspect(1)  # square, like the quadratic-model panel under it
    if len(minimum):
        xs = np.array([-4.0, 4.0])
        ax.plot(xs, minimum["theta_0"].iloc[0] * xs + minimum["theta_1"].iloc[0], color=CLASS_COLORS[0],
                linewidth=1.2, gid="fit")
    _strip(ax)


def _quadratic_models(ax, rows: pd.DataFrame, variant: str) -> list[str]:
    notes = []
    minimum = _rows(rows, "minimum")
    contour = _rows(rows, "contour")
    curvature = _rows(rows, "curvature")
    if not len(minimum):
        _empty(ax, "no minimum in the table")
        return [f"{variant}: no minimum in the table, quadratic models left out."]
    star = minimum[["theta_0", "theta_1"]].to_numpy()[0]
    radius = float(curvature["radius"].iloc[0]) if len(curvature) else math.nan
    if len(contour):
        x0, x1, values = _grid_values(contour, "loss")
        low = float(minimum["loss"].iloc[0])
        if math.isfinite(radius):
            levels = low + 0.5 * (radius * np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])) ** 2
        else:
            levels = _sqrt_levels(values, low)
        ax.contour(x0, x1, values, levels=levels, colors=GREY, linewidths=0.6)
        ax.set_xlim(x0.min(), x0.max())
        ax.set_ylim(x1.min(), x1.max())
    for name, optimizer in (("exact", "ngd"), ("empirical", "ef")):
        row = _rows(rows, "curvature", curvature=name)
        if not len(row):
            notes.append(f"{variant}: no {name} Fisher in the table, its ellipse left out.")
            continue
        points = ellipse(star, _curvature_matrix(row.iloc[0]), float(row["radius"].iloc[0]))
        ax.plot(points[:, 0], points[:, 1], color=style.COLORS[optimizer], linestyle=style.LINESTYLES[optimizer],
                linewidth=1.6, gid=f"ellipse-{name}", label="Fisher" if name == "exact" else "Empirical Fisher")
    _mark_minimum(ax, *star)
    ax.set_aspect("equal")
    ax.grid(False)
    _strip(ax)
    return notes


# -- figure 3: optimisation -------------------------------------------------------------------------

def _task_order(names) -> list[str]:
    from natgrad_impls.tasks import TASKS

    names = list(dict.fromkeys(map(str, names)))
    return sorted(names, key=lambda n: (list(TASKS).index(n) if n in TASKS else len(TASKS), n))


def _flag(column: pd.Series) -> np.ndarray:
    return column.astype("boolean").fillna(False).to_numpy(dtype=bool)


def _hyperparameters(rows: pd.DataFrame) -> str:
    lr = rows["lr"].iloc[0]
    damping = rows["damping"].iloc[0] if "damping" in rows else math.nan
    return f"lr {lr:.3g}" + ("" if pd.isna(damping) else f", damping {damping:.3g}")


def _layout(count: int, with_cos: bool):
    """Figure and the (loss, cos or None) axes of each task: one block column per task, at most four
    per row, rows balanced (5 tasks: 3 + 2); loss panels twice the height of the cosine panels."""
    block_rows = math.ceil(count / 4)
    per_row = math.ceil(count / block_rows)
    width = style.COLUMN_WIDTH if count <= 2 else style.FULL_WIDTH
    unit = 2 if with_cos else 1
    ratios = ([2, 1] if with_cos else [1]) * block_rows
    height = block_rows * (2.1 if with_cos else 1.5) + 0.35
    fig = plt.figure(figsize=(width, height), layout="constrained")
    spec = fig.add_gridspec(unit * block_rows, per_row, height_ratios=ratios)
    blocks = []
    for i in range(count):
        r, c = divmod(i, per_row)
        loss_ax = fig.add_subplot(spec[unit * r, c])
        cos_ax = fig.add_subplot(spec[unit * r + 1, c], sharex=loss_ax) if with_cos else None
        blocks.append((loss_ax, cos_ax))
    return fig, blocks, per_row


def optimisation(grid: pd.DataFrame, cos: pd.DataFrame | None = None, tasks=None) -> Drawn:
    """Figure 3: per task (columns) the loss (log scale) along the best run of every optimizer in
    the grid frame (rows best & repeat == 0), and under it the cosine between the EF and the NGD
    directions along the best EF run, with the cosine between the NGD direction and the gradient
    as a gauge: where that is near 1 as well, both steps are gradient steps.

    grid: a `natgrad grid` frame (task, optimizer, lr, damping, step, loss, repeat, best, chaotic).
    A chaotic best run (DESIGN 4) is drawn with a band, min..max per step over the best run and its
    repeats from theta0 + 1e-14 noise (rows best, repeat >= 0). cos: rows task, step, cos_ef_ngd
    and cos_ngd_grad (a `natgrad run --cos-ef-ngd` frame of the best EF run, several tasks
    concatenated), or None: then the cosine row is left out with a note. tasks: the tasks to draw
    (default: every task in the frame, in the registry's order); absent ones are left out with a note.
    """
    notes = []
    present_tasks = _task_order(grid["task"].unique()) if len(grid) else []
    wanted = present_tasks if tasks is None else list(tasks)
    notes += [f"{t}: not in the grid frame, left out." for t in wanted if t not in present_tasks]
    drawn_tasks = [t for t in wanted if t in present_tasks]
    if not drawn_tasks:
        return _no_data_figure(notes or ["the grid frame is empty."])
    best = grid[_flag(grid["best"])]
    optimizers, missing = style.present(best[best["task"].isin(drawn_tasks)]["optimizer"].unique())
    notes += missing
    if cos is None:
        notes.append("cos(EF, NGD): no cosine frame given, left out.")
    elif not {"task", "step"} <= set(cos.columns):  # without a task, one task's cosine would be drawn under every task
        raise ValueError(f"cos: missing column {'task' if 'task' not in cos.columns else 'step'} "
                         "(a `natgrad run --cos-ef-ngd` frame)")
    with style.paper():
        fig, blocks, per_row = _layout(len(drawn_tasks), cos is not None)
        for i, (task, (loss_ax, cos_ax)) in enumerate(zip(drawn_tasks, blocks)):
            notes += _loss_panel(loss_ax, best[best["task"] == task], task, optimizers)
            if cos_ax is not None:
                notes += _cos_panel(cos_ax, cos, task, best[(best["task"] == task) & (best["optimizer"] == "ef")])
                loss_ax.tick_params(labelbottom=False)
            (cos_ax or loss_ax).set_xlabel("step")
            if i % per_row == 0:
                loss_ax.set_ylabel("Loss")
                if cos_ax is not None:
                    cos_ax.set_ylabel("cos(EF, NGD)")
        handles = [Line2D([], [], **style.line_kwargs(o)) for o in optimizers]
        if handles and style.gauge_drawn(fig):
            handles.append(style.gauge_handle(fig))
        if handles:  # at column width: short handles, tight spacing, two rows for more than five entries
            narrow = fig.get_figwidth() <= style.COLUMN_WIDTH
            ncol = math.ceil(len(handles) / 2) if narrow and len(handles) > 5 else len(handles)
            fig.legend(handles=handles, loc="outside upper center", ncol=ncol,
                       handlelength=3.0 if narrow else 3.4, columnspacing=0.7 if narrow else 1.2,
                       handletextpad=0.4 if narrow else 0.8)
    return Drawn(fig, notes)


def _loss_panel(ax, best: pd.DataFrame, task: str, optimizers) -> list[str]:
    notes, settings = [], []
    ax.set_title(task)
    ax.set_yscale("log")
    for optimizer in optimizers:
        rows = best[best["optimizer"] == optimizer]
        run = rows[rows["repeat"] == 0].sort_values("step")
        if not len(run):
            notes.append(f"{style.LABELS[optimizer]}: no best run on {task}, left out.")
            continue
        kwargs = style.line_kwargs(optimizer)
        ax.plot(run["step"], run["loss"], gid="best", **kwargs)
        settings.append(f"{style.LABELS[optimizer]} {_hyperparameters(run)}")
        if _flag(run["chaotic"]).any():
            repeats = rows[rows["repeat"] >= 0]
            band = repeats.groupby("step")["loss"].agg(["min", "max"])
            ax.fill_between(band.index, band["min"], band["max"], color=kwargs["color"], alpha=BAND_ALPHA,
                            linewidth=0, gid="band")
            count = rows.loc[rows["repeat"] >= 1, "repeat"].nunique()
            last = band.iloc[-1]  # a narrow band hides under its line on a log axis: its width in numbers
            notes.append(f"{style.LABELS[optimizer]} on {task}: the best run is chaotic; the band spans it and "
                         f"its {count} repeats from theta0 + 1e-14 noise (at step {band.index[-1]}: "
                         f"{last['min']:.4g} to {last['max']:.4g}).")
        if "diverged" in run and run["diverged"].astype(bool).any():
            notes.append(f"{style.LABELS[optimizer]} on {task}: every run diverged; the best stops early.")
    if settings:
        notes.append(f"Best runs on {task}: " + "; ".join(settings) + ".")
    return notes


def _cos_panel(ax, cos: pd.DataFrame | None, task: str, best_ef: pd.DataFrame) -> list[str]:
    ax.set_ylim(-1.1, 1.1)
    ax.set_yticks([-1, 0, 1])
    ax.axhline(0, color=LIGHT_GREY, linewidth=0.6, zorder=0)
    rows = None if cos is None else cos[cos["task"] == task]
    if "optimizer" in getattr(rows, "columns", []):
        rows = rows[rows["optimizer"] == "ef"]
    if rows is None or "cos_ef_ngd" not in rows or not rows["cos_ef_ngd"].notna().any():
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color=GREY, fontsize=7)
        return [f"cos(EF, NGD) on {task}: not in the cosine frame, left out."]
    rows = rows.sort_values("step")
    ax.plot(rows["step"], rows["cos_ef_ngd"], ".", markersize=2.5, color=style.COLORS["ef"], gid="cos")
    notes = []
    if "cos_ngd_grad" in rows and rows["cos_ngd_grad"].notna().any():
        ax.plot(rows["step"], rows["cos_ngd_grad"], **style.gauge_kwargs(style.COLORS["ef"]))
        # at this axis' scale a gauge within a few hundredths of 0 lies on the zero line: say how close
        notes.append(f"{style.GAUGE_LABEL} on {task}: within {rows['cos_ngd_grad'].abs().max():.2g} of 0 throughout.")
    else:  # a frame written before the gauge was recorded
        notes.append(f"{style.GAUGE_LABEL} on {task}: not in the cosine frame, left out.")
    run = best_ef[best_ef["repeat"] == 0]
    if len(run) and {"lr", "damping"} <= set(rows.columns):
        # relative only: the grid's dampings reach 1e-10, below np.isclose's default atol of 1e-8
        same = all(math.isclose(rows[name].iloc[0], run[name].iloc[0], rel_tol=1e-9) for name in ("lr", "damping"))
        if not same:
            notes.append(f"cos(EF, NGD) on {task}: measured along {_hyperparameters(rows)}, not along the best "
                         f"EF run of the grid ({_hyperparameters(run)}).")
    return notes


# -- appendix: the paper code's logit clip against the exact likelihood ------------------------------

def logit_clip(grid: pd.DataFrame) -> Drawn:
    """Where the paper code's logit clip matters: per Bernoulli task (rows) and optimizer (columns),
    the final loss after the grid's steps against lr (the lowest over dampings, diverged runs left
    out), with the logits clipped as the paper's code does (solid) and with the exact likelihood
    (dashed); dots mark each grid's best run. The caption notes count the runs the clip changes and
    give each best final loss's change (`tables.logit_clip_comparison`).

    grid: `natgrad grid` frames of both (column logit_clip = paper | none), every run's rows (at
    least each run's last one) with best and repeat as the grid writes them.
    """
    nothing = "no Bernoulli task has grids with both logit_clip paper and none."
    if "logit_clip" not in grid:  # a Gaussian task's grid
        return _no_data_figure([nothing])
    both = grid[grid["logit_clip"].astype(str).isin(tables.CLIPS)]
    comparison = tables.logit_clip_comparison(both)  # the tasks with both grids, one row per optimizer
    if comparison.empty:
        return _no_data_figure([nothing])
    runs = tables.runs_by_clip(tables.final_losses(both))
    tasks = _task_order(comparison["task"].unique())
    optimizers, notes = style.present(comparison["optimizer"].unique())
    with style.paper():
        fig, axes = plt.subplots(len(tasks), len(optimizers), figsize=(style.FULL_WIDTH, 1.55 * len(tasks) + 0.45),
                                 squeeze=False, sharex=True, sharey="row", layout="constrained")
        starts = []
        for row, task in zip(axes, tasks):
            for ax, optimizer in zip(row, optimizers):
                compared = comparison[(comparison["task"] == task) & (comparison["optimizer"] == optimizer)]
                for clip in LogitClip:
                    final = runs.get((task, optimizer, clip.value))
                    if final is not None and len(compared):
                        starts.append(_clip_sweep(ax, final, compared.iloc[0], optimizer, clip))
                ax.set_title(f"{style.LABELS[optimizer]}" if len(tasks) == 1 else f"{task}: {style.LABELS[optimizer]}")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.xaxis.set_major_locator(LogLocator(base=1e10, numticks=10))  # 1e-10, 1, 1e10: round lrs
            row[0].set_ylabel(f"{task}\nfinal loss")  # the task is named on every row, one or several
        axes[0, 0].set_xlim(left=min(starts))
        for ax in axes[-1]:
            ax.set_xlabel("lr")
        handles = [Line2D([], [], color="0.3", linestyle=_CLIP_LINES[c], label=c.legend) for c in LogitClip]
        handles.append(Patch(label="Exact: every run diverges", **_ALL_DIVERGE))
        fig.legend(handles=handles, loc="outside upper center", ncol=len(handles))
    notes += [_logit_clip_note(task, comparison[comparison["task"] == task]) for task in tasks]
    return Drawn(fig, notes)


_CLIP_LINES = {"paper": "-", "none": (0, (3, 1.5))}
_ALL_DIVERGE = {"color": "0.5", "alpha": 0.12, "linewidth": 0}


def _clip_sweep(ax, final: pd.DataFrame, compared: pd.Series, optimizer: str, clip) -> float:
    """Final loss against lr, the lowest over dampings among runs that did not diverge (`final`: one
    clip's `tables.final_losses`, indexed by lr and damping), and a dot at the best run (`compared`:
    its row of the comparison; filled: clipped, open: exact); grey from the lr on which every exact
    run diverges. Returns the smallest lr worth showing: a thousandth of the best lr or of the lr
    where the sweep leaves the flat start of runs too slow to move the loss, whichever is smaller."""
    sweep = final[~final["diverged"]].groupby(level="lr")["loss"].min()
    color, paper = style.COLORS[optimizer], clip.value == "paper"
    ax.plot(sweep.index, sweep.to_numpy(), color=color, linestyle=_CLIP_LINES[clip.value],
            linewidth=1.4 if paper else 1.0, gid=f"sweep-{clip.value}")
    lrs = final.index.get_level_values("lr")
    all_diverge = final["diverged"].groupby(level="lr").all()
    if not paper and all_diverge.any():
        ax.axvspan(all_diverge[all_diverge].index.min(), lrs.max(), gid="all-diverge", **_ALL_DIVERGE)
    interesting = []
    lr, damping = compared[f"lr_{clip.value}"], compared[f"damping_{clip.value}"]
    if not pd.isna(lr) and not _true(compared[f"diverged_{clip.value}"]):  # (diverged: all are, grey already)
        loss = final.loc[(lr, -1.0 if pd.isna(damping) else damping), "loss"]
        ax.plot([lr], [loss], "o", color=color, markersize=3.0 if paper else 5.5, zorder=4 if paper else 3,
                markerfacecolor=color if paper else "white", gid=f"best-{clip.value}")
        interesting.append(lr)
    moved = sweep[~np.isclose(sweep, sweep.iloc[0], rtol=1e-3)] if len(sweep) else sweep
    if len(moved):
        interesting.append(moved.index.min())
    return max(lrs.min(), min(interesting) / 1e3) if interesting else lrs.min()


def _logit_clip_note(task: str, rows: pd.DataFrame) -> str:
    """Where the exact likelihood's grid on `task` differs from the clipped one's, in one paragraph."""
    runs, changed = int(rows["runs"].sum()), int(rows["changed_runs"].sum())
    text = f"{task}, exact likelihood against clipped logits: the clip changes {changed} of {runs} runs"
    if changed:
        text += f" (none with lr below {rows['smallest_lr_changed'].min():.3g})"
    diverging = rows[rows["diverged_only_none"] > 0]
    if len(diverging):
        parts = [f"{style.LABELS[r.optimizer]} {r.diverged_only_none} (from lr {r.smallest_lr_diverged_only_none:.3g}, "
                 f"at step {r.its_divergence_step})" for r in diverging.itertuples()]
        text += "; runs that diverge only without it: " + ", ".join(parts)
    return text + ". Best final loss without the clip: " + ", ".join(_change(r) for r in rows.itertuples()) + "."


def _true(flag) -> bool:
    """A table's flag that may be missing (NA: no best run) as a plain bool."""
    return not pd.isna(flag) and bool(flag)


def _change(row) -> str:
    name = style.LABELS[row.optimizer]
    diverged = [word for clip, word in (("paper", "with"), ("none", "without"))
                if _true(getattr(row, f"diverged_{clip}"))]
    if diverged:
        return f"{name} none (every run diverges {' and '.join(diverged)} it)"
    if not np.isfinite(row.best_loss_change):
        return f"{name} n/a"
    if row.best_loss_change == 0:
        return f"{name} the same"
    text = f"{name} {100 * row.best_loss_change:+.2g} %"
    return text if row.beyond_chaos else text + " (within its chaotic repeats)"


# -- appendix: starting points ----------------------------------------------------------------------

# What toys.quadratic_problem minimises: the paper's (x - 1/2)^2 + (x + 1/2)^2 over 4, as the mean
# Gaussian negative log-likelihood of its two examples.
QUADRATIC_TITLE = r"$(\theta^2 + 1/4)\,/\,2$"


def starting_point(table: pd.DataFrame) -> Drawn:
    """The appendix's starting-point figure: per problem (the 1-D quadratic, then the task) the
    excess loss L - L* (log scale) against the step of every optimizer from each starting point;
    darker lines start closer to theta*. Excess losses at round-off (<= 0) are not drawn.

    table: `toys.starting_point_table()` (kinds run, minimum; columns problem, optimizer, start,
    distance, step, loss, excess).
    """
    runs = _rows(table, "run")
    problems = list(dict.fromkeys(map(str, runs["problem"]))) if len(runs) else []
    problems.sort(key=lambda p: p != "quadratic")
    optimizers, missing = style.present(runs["optimizer"].unique() if len(runs) else [], TOY_OPTIMIZERS)
    notes = list(missing)
    if not problems:
        return _no_data_figure(notes + ["The table has no runs."])
    with style.paper():
        fig, axes = plt.subplots(1, len(problems), figsize=(style.COLUMN_WIDTH, 1.75), squeeze=False,
                                 layout="constrained")
        for ax, problem in zip(axes[0], problems):
            _starting_panel(ax, runs[runs["problem"] == problem], optimizers)
            ax.set_title(QUADRATIC_TITLE if problem == "quadratic" else problem)
            ax.set_xlabel("step")
        axes[0, 0].set_ylabel("Loss $-$ min")
        handles = [Line2D([], [], **style.line_kwargs(o)) for o in optimizers]
        fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), handlelength=2.6)
        for problem in problems:
            starts = sorted(runs[runs["problem"] == problem]["start"].unique())
            label = "theta0" if problem == "quadratic" else "theta0 = alpha theta*, alpha"
            notes.append(f"{problem}: {label} in {', '.join(f'{s:g}' for s in starts)}; darker lines start closer "
                         "to the minimum.")
    return Drawn(fig, notes)


def _starting_panel(ax, runs: pd.DataFrame, optimizers) -> None:
    ax.set_yscale("log")
    for optimizer in optimizers:
        rows = runs[runs["optimizer"] == optimizer]
        distances = sorted(rows["distance"].unique(), reverse=True)
        for rank, distance in enumerate(distances):
            run = rows[rows["distance"] == distance].sort_values("step")
            excess = run["excess"].where(run["excess"] > 0)
            alpha = 0.3 + 0.7 * (rank + 1) / len(distances)
            ax.plot(run["step"], excess, alpha=alpha, gid="run", **style.line_kwargs(optimizer))
