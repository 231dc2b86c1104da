"""What a step costs: gradient-equivalents per optimizer, scaling with width and batch size, and
CPU against GPU, PyTorch against JAX.

Inputs are the tables of `natgrad_impls.timing`:
- `step_cost` and `devices` read `cost_table` rows: task, optimizer, setting, framework, device,
  step_s, gradient_s, gradient_equivalents (several tasks, frameworks and devices concatenated);
- `scaling` reads `scaling_table` rows: framework, device, optimizer, setting, width, batch_size,
  step_s, gradient_s.
A table without `setting` is read as one of each optimizer's default setting (setting = optimizer).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colors as mcolors
from matplotlib import pyplot as plt
from matplotlib.lines import Line2D

from natgrad_impls.figures import Drawn, placeholder, style
from natgrad_impls.timing import CONTENDED_RATIO, CONTENDED_TRIES, SETTINGS

VARIANT_LABELS = {"mc": "MC", "exact": "exact", "momentum": "momentum"}
ROW_HEIGHT = 0.2  # inches per setting in the dot plots, for up to two dots side by side; more widen it


def _row_height(dots: int) -> float:
    """Inches per setting's row with `dots` dots in it: their 4.5 pt markers clear of each other."""
    return ROW_HEIGHT * max(1.0, dots / 2)


# -- names ----------------------------------------------------------------------------------------------

def setting_label(setting: str) -> str:
    """Legend name of a label of `timing.SETTINGS`: "NGD (MC)", "SGD (momentum)", "K-FAC"."""
    optimizer, _, variant = setting.partition("-")
    name = style.LABELS.get(optimizer, optimizer)
    return f"{name} ({VARIANT_LABELS.get(variant, variant)})" if variant else name


def setting_style(setting: str) -> dict:
    """Colour, line style and label of a setting: its optimizer's colour and line style, lighter for
    a later variant of that optimizer in `timing.SETTINGS` (sgd-momentum, ngd-mc) in every figure,
    whichever of its siblings a table has."""
    optimizer = setting.partition("-")[0]
    first = next((s for s in SETTINGS if s.partition("-")[0] == optimizer), setting)
    color = style.COLORS.get(optimizer, "0.3")
    return {"color": color if setting == first else _lighter(color),
            "linestyle": style.LINESTYLES.get(optimizer, "-"), "label": setting_label(setting)}


def _lighter(color, amount: float = 0.45):
    rgb = np.array(mcolors.to_rgb(color))
    return tuple(rgb + (1 - rgb) * amount)


def _order(settings) -> list[str]:
    """Settings in the order of `timing.SETTINGS` (legend order), unknown ones after."""
    found = list(dict.fromkeys(map(str, settings)))
    return [s for s in SETTINGS if s in found] + sorted(s for s in found if s not in SETTINGS)


def _with_setting(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    if "setting" not in table.columns:
        table["setting"] = table["optimizer"]
    for name in ("optimizer", "setting", "framework", "device"):
        if name in table.columns:
            table[name] = table[name].astype(str)
    return table


def _missing_settings(table) -> list[str]:
    """Caption notes for optimizers without any setting in the table."""
    return style.present(table["optimizer"].unique())[1]


def _cost_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """A cost table with `setting` and `task` columns (task "" when it has none), and the notes on
    optimizers it lacks."""
    table = _with_setting(table)
    if "task" not in table.columns:
        table["task"] = ""
    return table, _missing_settings(table) + _contended_notes(table)


def _contended_notes(table) -> list[str]:
    """A note naming the rows `timing.remeasure_contended` could not measure on a quiet machine."""
    if "contended" not in table.columns:
        return []
    busy = table[table["contended"].astype(str).str.lower() == "true"]  # (a bool, or "True" read from a CSV)
    names = [" ".join(str(row[c]) for c in ("task", "framework", "device", "setting") if row[c])
             for _, row in busy.iterrows()]
    return [f"Timed on a busy machine (the gradient still over {CONTENDED_RATIO:g}x the fastest of its model "
            f"after {CONTENDED_TRIES} new measurements): {', '.join(dict.fromkeys(names))}."] if names else []


def _median(table, keys, value="step_s") -> pd.DataFrame:
    """One number per key (a table of several rounds has several rows per setting)."""
    return table.groupby(keys, observed=True, sort=False)[value].median().reset_index()


# -- step cost ------------------------------------------------------------------------------------------

def step_cost(table: pd.DataFrame) -> Drawn:
    """One step of each setting in gradient-equivalents (step time / mini-batch gradient time), a
    dot per framework and device, one panel per task, log x with the cost of one gradient marked.
    Marker: framework (`style.FRAMEWORK_MARKERS`); filled on CPU, hollow on GPU. Where the table
    has the `FLOORS` columns (K-FAC rows of scripts/step_cost.py), bars mark them."""
    table, notes = _cost_rows(table)
    if table.empty:
        return placeholder("No cost rows in the table: nothing to draw.", notes)
    tasks = list(dict.fromkeys(table["task"]))
    settings = _order(table["setting"])
    combos = style.combos(table)
    values = _median(table, ["task", "setting", "framework", "device"], "gradient_equivalents")
    height = _row_height(len(combos)) * len(settings) + 0.75
    width = style.COLUMN_WIDTH if len(tasks) == 1 else style.FULL_WIDTH
    with style.paper():
        fig, axes = plt.subplots(1, len(tasks), figsize=(width, height), sharey=True, sharex=True, squeeze=False,
                                 layout="constrained")
        floors = set()
        for ax, task in zip(axes[0], tasks):
            _dots(ax, values[values["task"] == task], settings, combos, "gradient_equivalents")
            floors.update(_floor_ticks(ax, table[table["task"] == task], settings))
            ax.axvline(1.0, color="0.4", linewidth=0.7, linestyle=":", zorder=0)
            ax.set_xscale("log")
            ax.set_xlabel("step cost [gradient-equivalents]")
            if task:
                ax.set_title(task)
            for combo in combos:
                if values[(values["task"] == task) & (values["framework"] == combo[0])
                          & (values["device"] == combo[1])].empty:
                    notes.append(f"{task or 'table'}: no {style.combo_label(combo)} rows.")
        axes[0, 0].set_yticks(range(len(settings)), [setting_label(s) for s in settings])
        _combo_legend(fig, combos, floors)
    return Drawn(fig, notes)


def _floor_ticks(ax, rows, settings) -> list[str]:
    """A bar at each of a setting's arithmetic floors (`FLOORS`: columns of scripts/step_cost.py,
    `timing.kfac_floor`) where the table has them; the floor columns drawn."""
    drawn = []
    for column, marker in FLOORS.items():
        if column not in rows.columns:
            continue
        floors = rows.dropna(subset=[column]).groupby("setting")[column].first()
        for setting, value in floors.items():
            if setting in settings:
                ax.plot(value, settings.index(setting), **marker)
                drawn.append(column)
    return drawn


def _dots(ax, values, settings, combos, column) -> None:
    """A dot per setting and framework/device, side by side within the setting's row."""
    spread = 0.18 if len(combos) <= 2 else 0.3
    offsets = np.linspace(-spread, spread, len(combos)) if len(combos) > 1 else [0.0]
    for offset, (framework, device) in zip(offsets, combos):
        rows = values[(values["framework"] == framework) & (values["device"] == device)]
        for y, setting in enumerate(settings):
            point = rows[rows["setting"] == setting]
            if point.empty:
                continue
            color = setting_style(setting)["color"]
            ax.plot(point[column].iloc[0], y + offset, linestyle="none", markersize=4.5,
                    **_marker(framework, device, color))
    ax.set_ylim(len(settings) - 0.5, -0.5)
    ax.grid(axis="y", visible=False)


def _marker(framework, device, color) -> dict:
    """Framework by shape, device by fill (CPU filled, GPU hollow)."""
    face = color if device == "cpu" else "white"
    return {"marker": style.FRAMEWORK_MARKERS.get(framework, "o"), "color": color, "markerfacecolor": face,
            "markeredgecolor": color, "markeredgewidth": 1.0}


# K-FAC's multiply-adds over the gradient's: the gradient and the preconditioning G^-1 grad A^-1
# (what no step computing the update from given inverses avoids), and with the factors and the
# amortised inversions added (a whole step). Both count arithmetic at the gradient's rate.
FLOORS = {
    "floor_gradient_equivalents": {"marker": "|", "markersize": 11, "markeredgewidth": 1.5, "color": "black",
                                   "linestyle": "none", "label": "multiply-adds: gradient + preconditioning"},
    "floor_with_factors": {"marker": "|", "markersize": 11, "markeredgewidth": 1.5, "color": "0.6",
                           "linestyle": "none", "label": "+ factors and inversions"},
}


def _combo_legend(fig, combos, floors=()) -> None:
    handles = [Line2D([], [], linestyle="none", markersize=4.5, label=style.combo_label(c), **_marker(*c, "0.25"))
               for c in combos]
    handles += [Line2D([], [], **marker) for column, marker in FLOORS.items() if column in floors]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 4))


# -- scaling --------------------------------------------------------------------------------------------

def _end_slope(x, y) -> float:
    """`fitted_slope` between the two largest x (sorted ascending)."""
    return fitted_slope(np.asarray(x)[-2:], np.asarray(y)[-2:])


def fitted_slope(x, y) -> float:
    """Slope of log y against log x (least squares, `numpy.polyfit`): the exponent of a power law."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2 or np.unique(x[keep]).size < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


def scaling(table: pd.DataFrame, batch_size: int | None = None, width: int | None = None) -> Drawn:
    """Step time against width (at `batch_size`, default the largest in the table) and against batch
    size (at `width`, default the largest), log-log, one row of two panels per framework and device;
    each line's log-log slope is in its legend entry, and the mini-batch gradient is drawn for
    reference (a thin near-black line with crosses). The largest sizes are the defaults because
    fixed per-call overheads flatten the small ones; for the same reason each slope is that between
    the two largest sizes, where a line with a kink has its growth, not an average of its regimes."""
    table = _with_setting(table)
    notes = _missing_settings(table)
    if table.empty:
        return placeholder("No scaling rows in the table: nothing to draw.", notes)
    batch_size = int(table["batch_size"].max()) if batch_size is None else int(batch_size)
    width = int(table["width"].max()) if width is None else int(width)
    combos = style.combos(table)
    settings = _order(table["setting"])
    with style.paper():
        fig, axes = plt.subplots(len(combos), 2, figsize=(style.FULL_WIDTH, 2.3 * len(combos) + 0.2), squeeze=False,
                                 layout="constrained")
        for r, combo in enumerate(combos):
            rows = table[(table["framework"] == combo[0]) & (table["device"] == combo[1])]
            for ax, (x, fixed, value) in zip(axes[r], [("width", "batch_size", batch_size), ("batch_size", "width", width)]):
                cut = rows[rows[fixed] == value]
                if cut[x].nunique() < 2:
                    ax.text(0.5, 0.5, f"fewer than two {x.replace('_', ' ')}s at {fixed.replace('_', ' ')} {value}",
                            transform=ax.transAxes, ha="center", va="center", color="0.5")
                    notes.append(f"{style.combo_label(combo)}: no {x.replace('_', ' ')} sweep at "
                                 f"{fixed.replace('_', ' ')} {value}.")
                    continue
                _scaling_lines(ax, cut, x, settings, combo)
                ax.set_xlabel(("hidden width" if x == "width" else "batch size") + f" ({fixed.replace('_', ' ')} {value})")
                ax.set_ylabel("time per step [s]")
                ax.set_title(style.combo_label(combo))
                _headroom(ax, LEGEND_ROOM)
                ax.legend(loc="upper left", fontsize=5.5, ncols=3, title="log-log slope, two largest sizes",
                          title_fontsize=5.5, handlelength=3.5, columnspacing=0.8, alignment="left")
    return Drawn(fig, notes)


def _scaling_lines(ax, cut, x, settings, combo) -> None:
    """A line per setting (median over repeats of the table), labelled with its slope between the
    two largest sizes, marked as the other cost figures mark the framework and device."""
    for setting in settings:
        line = _median(cut[cut["setting"] == setting], [x]).sort_values(x)
        if line.empty:
            continue
        kwargs = setting_style(setting)
        kwargs["label"] = f"{kwargs['label']}: {_end_slope(line[x], line['step_s']):.2f}"
        ax.plot(line[x], line["step_s"], markersize=3, **{**kwargs, **_marker(*combo, kwargs["color"])})
    grad = _median(cut, [x], "gradient_s").sort_values(x)
    ax.plot(grad[x], grad["gradient_s"], color="0.1", linewidth=0.8, marker="x", markersize=3, zorder=1,
            label=f"gradient: {_end_slope(grad[x], grad['gradient_s']):.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted(cut[x].unique())
    ax.set_xticks(ticks, [str(int(v)) for v in ticks])
    ax.minorticks_off()


LEGEND_ROOM = 0.4  # share of a scaling panel's height kept free above the lines for the legend


def _headroom(ax, share: float) -> None:
    """Raise the top of a log y axis so that the data fill only the lower 1 - `share` of it."""
    low, high = ax.get_ylim()
    ax.set_ylim(low, low * (high / low) ** (1 / (1 - share)))


# -- devices and frameworks -----------------------------------------------------------------------------

def devices(table: pd.DataFrame) -> Drawn:
    """Step time of each setting on CPU against GPU (left) and in PyTorch against JAX (right), as
    pairs joined by a line on a log axis, one row per task. A table without GPU rows (or with one
    framework) draws the other comparison and says in a note what could not be compared."""
    table, notes = _cost_rows(table)
    if table.empty:
        return placeholder("No cost rows in the table: nothing to draw.", notes)
    tasks = list(dict.fromkeys(table["task"]))
    settings = _order(table["setting"])
    values = _median(table, ["task", "setting", "framework", "device"])
    pairs = [p for p in [("device", "framework", ("cpu", "cuda"), "CPU against GPU"),
                         ("framework", "device", ("torch", "jax"), "PyTorch against JAX")]
             if set(values[p[0]]) >= set(p[2])]
    for compared, _, (a, b), title in [("device", None, ("cpu", "cuda"), "CPU against GPU"),
                                       ("framework", None, ("torch", "jax"), "PyTorch against JAX")]:
        absent = [_name(compared, x) for x in (a, b) if x not in set(values[compared])]
        if absent:
            notes.append(f"{title} not drawn: no {', '.join(absent)} rows.")
    if not pairs:
        return placeholder("Neither two devices nor two frameworks in the table: nothing to compare.", notes)
    height = (ROW_HEIGHT * len(settings) + 0.5) * len(tasks) + 0.3
    width = style.FULL_WIDTH if len(pairs) == 2 else style.COLUMN_WIDTH
    with style.paper():
        # one time axis per comparison across tasks, labelled on every row: tasks compare at a glance
        fig, axes = plt.subplots(len(tasks), len(pairs), figsize=(width, height), squeeze=False, sharey=True,
                                 sharex="col", layout="constrained")
        for t, task in enumerate(tasks):
            rows = values[values["task"] == task]
            for ax, (compared, within, (a, b), title) in zip(axes[t], pairs):
                if not (set(rows[compared]) >= {a, b}):
                    absent = ", ".join(_name(compared, x) for x in (a, b) if x not in set(rows[compared]))
                    ax.text(0.5, 0.5, f"no {absent} rows", transform=ax.transAxes, ha="center", va="center",
                            color="0.5")
                    # this panel's ticks only: set_xticks([]) would empty the locator its column shares
                    ax.tick_params(axis="x", which="both", bottom=False, labelbottom=False)
                    notes.append(f"{task or 'table'}: {title} not drawn, no {absent} rows.")
                else:
                    _pairs(ax, rows, settings, compared, within, a, b)
                    ax.set_xscale("log")
                    ax.set_xlabel("time per step [s]")
                    ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_title(f"{task}: {title}" if task else title)
            axes[t, 0].set_yticks(range(len(settings)), [setting_label(s) for s in settings])
            axes[t, 0].set_ylim(len(settings) - 0.5, -0.5)
        _pair_legend(fig, values)
    return Drawn(fig, notes)


def _name(kind, value) -> str:
    return (style.DEVICE_LABELS if kind == "device" else style.FRAMEWORK_LABELS).get(value, value)


def _pairs(ax, rows, settings, compared, within, a, b) -> None:
    """For each setting and each value of `within`: the step time at `a` and at `b`, joined."""
    order = style.FRAMEWORK_ORDER if within == "framework" else style.DEVICE_ORDER
    groups = [g for g in order if g in set(rows[within])]
    offsets = np.linspace(-0.2, 0.2, len(groups)) if len(groups) > 1 else [0.0]
    for offset, group in zip(offsets, groups):
        for y, setting in enumerate(settings):
            cell = rows[(rows["setting"] == setting) & (rows[within] == group)].set_index(compared)["step_s"]
            if not {a, b} <= set(cell.index):
                continue
            color = setting_style(setting)["color"]
            ax.plot([cell[a], cell[b]], [y + offset] * 2, color=color, linewidth=0.8, alpha=0.7)
            for side in (a, b):
                framework, device = (group, side) if compared == "device" else (side, group)
                ax.plot(cell[side], y + offset, linestyle="none", markersize=4.5, **_marker(framework, device, color))
    ax.grid(axis="y", visible=False)


def _pair_legend(fig, values) -> None:
    combos = style.combos(values)
    _combo_legend(fig, combos)
