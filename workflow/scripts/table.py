"""Write one table of the report: best hyperparameters (grids or tuned network runs), or the
environment the numbers were measured in."""

import contextlib

import pandas as pd

from natgrad_impls import results
from natgrad_impls.figures import tables

snakemake = globals()["snakemake"]  # set by Snakemake's script directive


def read(paths) -> pd.DataFrame:
    # grids: only their best runs (best == True; best_hyperparameters keeps repeat 0)
    kwargs = {"filters": [("best", "==", True)]} if snakemake.params.table == "best-convex" else {}
    return pd.concat([pd.read_parquet(p, **kwargs) for p in paths], ignore_index=True)


with open(snakemake.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    if snakemake.params.table == "environment":
        table = tables.environment()
    else:
        table = tables.best_hyperparameters(read(snakemake.input))
    results.write(table, snakemake.output.csv)
    print(table.to_string())
