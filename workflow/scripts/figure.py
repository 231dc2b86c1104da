"""Draw one figure of the report from result tables and write PNG, PDF and caption (the static
caption of workflow/report/ followed by this run's notes)."""

from pathlib import Path

import pandas as pd
from matplotlib import pyplot as plt

from natgrad_impls import results
from natgrad_impls.figures import cost, networks, paper, save, tables

snakemake = globals()["snakemake"]  # set by Snakemake's script directive


def read(paths, **kwargs) -> pd.DataFrame:
    frames = [results.read(p) if not str(p).endswith(".parquet") else pd.read_parquet(p, **kwargs) for p in paths]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def grids_and_cos(paths):
    grids = [p for p in paths if not p.endswith("cos.parquet")]
    best_only = {"filters": [("best", "==", True)]}  # figure 3 draws best runs and their repeats
    return read(grids, **best_only), read([p for p in paths if p.endswith("cos.parquet")])


def reference(draw, paths):
    """`draw` of the committed cost tables, those of scripts/step_cost.py (no task column) named by
    their MLP, with a note on each table measured with other package versions than this run's."""
    frames, notes = [], []
    for path in paths:
        frame = results.read(path)
        if "gradient_equivalents" not in frame.columns:
            continue
        if "task" not in frame.columns:
            sizes = frame["sizes"] if "sizes" in frame.columns else [f"784-{w}-10" for w in frame["width"]]
            frame["task"] = [f"MLP {s}, batch {b}" for s, b in zip(sizes, frame["batch_size"])]
        frames.append(frame)
        notes += tables.version_notes(Path(path).name, frame)
    drawn = draw(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())
    drawn.notes.extend(notes)
    return drawn


DRAW = {
    "fig1-vecfield": lambda paths: paper.vecfield(read(paths)),
    "fig2-misspecification": lambda paths: paper.misspecification(read(paths), model="logistic"),
    "appendix-misspecification-linear": lambda paths: paper.misspecification(read(paths), model="linear"),
    "fig3-optimisation": lambda paths: paper.optimisation(*grids_and_cos(paths)),
    "appendix-optimisation-all-tasks": lambda paths: paper.optimisation(*grids_and_cos(paths)),
    "appendix-starting-point": lambda paths: paper.starting_point(read(paths)),
    "appendix-logit-clip": lambda paths: paper.logit_clip(tables.read_logit_clip_grids(paths)),
    "networks-loss": lambda paths: networks.training(read(paths)),
    "networks-accuracy": lambda paths: networks.accuracy(read(paths)),
    "networks-cosine": lambda paths: networks.cosine(read(paths)),
    "cost-steps": lambda paths: cost.step_cost(read(paths)),
    "cost-devices": lambda paths: cost.devices(read(paths)),
    "cost-scaling": lambda paths: cost.scaling(read(paths)),
    "reference-cost": lambda paths: reference(cost.step_cost, paths),
    "reference-devices": lambda paths: reference(cost.devices, paths),
}


def caption(static: str, notes: str) -> str:
    text = Path(static).read_text().strip()
    return text + (f"\n\n**This run:** {notes}\n" if notes.strip() else "\n")


with results.job_log(snakemake.log[0]):
    name = snakemake.params.figure
    drawn = DRAW[name]([path for path in snakemake.input if path != snakemake.input.caption])
    save(drawn, snakemake.output.png, notes=False)  # the notes go into the caption
    plt.close(drawn.figure)
    results.write_text(caption(snakemake.input.caption, drawn.caption_notes), snakemake.output.caption)
    print(f"{name}: {drawn.caption_notes or 'no notes'}")
