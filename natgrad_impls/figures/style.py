"""The one look of every figure: colours, line styles and labels per optimizer, and the rc settings.

The paper drew GD dashed, NGD solid and EF dash-dot; Adam and K-FAC extend that with dotted and
long-dashed lines. Colours are the colour-blind-safe seaborn palette, fixed per optimizer so that
an optimizer has the same colour in every figure.
"""

from __future__ import annotations

import contextlib

import matplotlib as mpl
import seaborn as sns
from matplotlib import colors as mcolors
from matplotlib import patheffects
from matplotlib.lines import Line2D

from natgrad_impls.names import Device, Framework, Optimizer, legends

OPTIMIZERS = tuple(o.value for o in Optimizer)  # sgd, adam, ef, ngd, kfac: the order of legends
LABELS = legends(Optimizer)  # SGD, Adam, EF, NGD, K-FAC (DESIGN 3)
_PALETTE = sns.color_palette("colorblind")
COLORS = {"sgd": _PALETTE[7], "adam": _PALETTE[2], "ef": _PALETTE[3], "ngd": _PALETTE[0], "kfac": _PALETTE[4]}
LINESTYLES = {"sgd": (0, (5, 2)), "adam": (0, (1, 1.5)), "ef": (0, (6, 2, 1, 2)), "ngd": "-", "kfac": (0, (10, 3))}
FRAMEWORK_LABELS = legends(Framework)
FRAMEWORK_MARKERS = {"numpy": "s", "torch": "o", "jax": "^"}
DEVICE_LABELS = legends(Device)
FRAMEWORK_ORDER = ("numpy", "torch", "jax")
DEVICE_ORDER = ("cpu", "cuda")

# Bottom to top where lines cross or coincide: the solid NGD first, the dashed SGD last, so that a
# line drawn over another leaves gaps it shows through (with its evaluation dots, Adam's dotted
# line is as dense as a solid one, and drawn over SGD it hid SGD wherever their times coincided).
STACKING = ("ngd", "kfac", "ef", "adam", "sgd")


def _check_every_optimizer_is_styled():
    """At import: a figure would draw an optimizer missing here in a default colour or line."""
    for name, table in (("COLORS", COLORS), ("LINESTYLES", LINESTYLES), ("STACKING", STACKING)):
        if set(table) != set(OPTIMIZERS):
            raise ValueError(f"natgrad_impls.figures.style.{name}: has {', '.join(sorted(table))}; "
                             f"it needs one entry for each of {', '.join(OPTIMIZERS)}")


_check_every_optimizer_is_styled()


# The cosine figures' second quantity, cos(NGD step, gradient): thin and dotted in the run's colour, so
# that it reads as a gauge beside the cosine it qualifies; drawn over the cosine with a white halo,
# so that it stays visible where the two coincide.
GAUGE_LABEL = "cos(NGD, gradient)"
_GAUGE = {"linestyle": ":", "linewidth": 1.0}
_GAUGE_HALO = 2.6  # points

COLUMN_WIDTH = 3.25  # inches: one column of a two-column paper
FULL_WIDTH = 6.75

RC = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.linewidth": 1.4,
    "axes.edgecolor": "0.6", "axes.linewidth": 0.6, "axes.spines.top": False, "axes.spines.right": False,
    "grid.color": "0.9", "grid.linewidth": 0.5, "legend.frameon": False,
    "savefig.dpi": 200, "figure.dpi": 100, "pdf.fonttype": 42,  # editable text in PDFs
}


@contextlib.contextmanager
def paper():
    """Draw inside this context: seaborn's white grid with the RC settings above."""
    with sns.axes_style("whitegrid"), mpl.rc_context(RC):
        yield


def line_kwargs(optimizer: str) -> dict:
    """Colour, line style, legend label and stacking (STACKING, among matplotlib's lines at zorder 2)
    of `optimizer` (a name of DESIGN 3)."""
    return {"color": COLORS[optimizer], "linestyle": LINESTYLES[optimizer], "label": LABELS[optimizer],
            "zorder": 2 + 0.01 * STACKING.index(optimizer)}


def gauge_kwargs(color) -> dict:
    """The gauge's line in `color`, with its halo; gid "gauge" so that tests and users can find it."""
    halo = [patheffects.withStroke(linewidth=_GAUGE_HALO, foreground="white")]
    return {"color": color, "gid": "gauge", "label": "_gauge", "zorder": 3, "path_effects": halo, **_GAUGE}


def _gauges(fig) -> list:
    """The gauge lines of `fig` (gauge_kwargs's gid), every panel's."""
    return [line for ax in fig.axes for line in ax.get_lines() if line.get_gid() == "gauge"]


def gauge_drawn(fig) -> bool:
    """Whether any panel of `fig` has a gauge line: then the legend names it."""
    return bool(_gauges(fig))


def gauge_handle(fig) -> Line2D:
    """The gauge's legend entry: in the gauges' colour where `fig` draws them in one (along one
    optimizer's runs), else in a neutral grey, each line having its run's colour."""
    colors = {mcolors.to_hex(line.get_color()) for line in _gauges(fig)}
    return Line2D([], [], color=colors.pop() if len(colors) == 1 else "0.35", label=GAUGE_LABEL, **_GAUGE)


def present(optimizers, wanted=OPTIMIZERS) -> tuple[list[str], list[str]]:
    """(present, missing): the optimizers of `wanted` found in `optimizers`, in legend order, and a
    caption note per absent one."""
    found = set(map(str, optimizers))
    there = [o for o in wanted if o in found]
    missing = [f"{LABELS[o]}: not in the table, left out." for o in wanted if o not in found]
    return there, missing


def combos(frame) -> list[tuple[str, str]]:
    """The (framework, device) pairs present in a table, CPU ones first, then GPU ones."""
    found = set(map(tuple, frame[["framework", "device"]].drop_duplicates().to_numpy()))
    order = [(f, d) for d in DEVICE_ORDER for f in FRAMEWORK_ORDER]
    return [c for c in order if c in found] + sorted(found - set(order))


def combo_label(combo) -> str:
    """'PyTorch CPU', 'JAX GPU', ... for a (framework, device) pair."""
    framework, device = combo
    return f"{FRAMEWORK_LABELS.get(framework, framework)} {DEVICE_LABELS.get(device, device)}"
