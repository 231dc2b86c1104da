"""Figures and tables in the style of Kunstner, Balles & Hennig (2019), drawn from tidy tables only.

Every figure function takes pandas DataFrames with the columns of DESIGN 7 (or of the small tables
that `natgrad_impls.toys` and the cost code write) and returns a `Drawn`: the matplotlib figure and
the notes that belong in its caption (e.g. an optimizer absent from the table, a chaotic best run).
Nothing is recomputed from the tasks here, so a figure can be redrawn from any run, CPU or GPU,
ours or a user's.

    drawn = paper.optimisation(grid_frame, cos_frame)
    save(drawn, "results/figures/fig3.png")      # writes fig3.png and fig3.pdf, atomically

One look everywhere (`style`): a fixed colour and line style per optimizer, log-scale losses, light
frames, readable at column width.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI machines or cluster nodes

from natgrad_impls import results  # noqa: E402

if TYPE_CHECKING:  # not at run time: the pipeline's tune jobs import `tables`, which draws nothing,
    from matplotlib.figure import Figure  # and pyplot and seaborn would cost each of them 2 s


@dataclasses.dataclass
class Drawn:
    figure: Figure
    notes: list[str] = dataclasses.field(default_factory=list)  # caption notes, one sentence each

    @property
    def caption_notes(self) -> str:
        return " ".join(self.notes)


def placeholder(message: str, notes: list[str]) -> Drawn:
    """A small figure that says what is missing, instead of raising inside a pipeline; the message
    joins the caption notes."""
    from matplotlib import pyplot as plt

    from natgrad_impls.figures import style

    with style.paper():
        fig, ax = plt.subplots(figsize=(style.COLUMN_WIDTH, 1.2), layout="constrained")
        ax.axis("off")
        ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return Drawn(fig, notes + [message])


def save(drawn: Drawn, path, formats=("png", "pdf"), dpi: int = 200, notes: bool = True) -> list[Path]:
    """Write the figure as `path` with each suffix of `formats` (temp file + rename each) and, with
    `notes`, the caption notes beside it as `path` with suffix `.notes.txt`; returns the paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in formats:
        target = path.with_suffix("." + suffix)
        results.atomic(target, lambda temp: drawn.figure.savefig(temp, format=suffix, dpi=dpi, bbox_inches="tight"))
        written.append(target)
    if notes:
        target = path.with_suffix(".notes.txt")
        results.write_text(drawn.caption_notes + "\n", target)
        written.append(target)
    return written
