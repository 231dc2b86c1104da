"""Write one table of the report: best hyperparameters (grids or tuned network runs), their summary,
the logit-clip comparison of the Bernoulli grids, or the environment the numbers were measured in."""

import pandas as pd

from natgrad_impls import results
from natgrad_impls.figures import tables

snakemake = globals()["snakemake"]  # set by Snakemake's script directive


def read(paths) -> pd.DataFrame:
    # grids: only their best runs (best == True; best_hyperparameters keeps repeat 0)
    kwargs = {"filters": [("best", "==", True)]} if snakemake.params.table == "best-convex" else {}
    return pd.concat([pd.read_parquet(p, **kwargs) for p in paths], ignore_index=True)


def best_networks(inputs) -> pd.DataFrame:
    """The reruns' table, with where each chosen setting lies in its tuning grid."""
    best = tables.best_hyperparameters(read(inputs.runs))
    return best.merge(tables.grid_edges(read(inputs.tuning)), on=tables.GROUP, how="left")


def summary(inputs) -> pd.DataFrame:
    """The best-hyperparameters tables in one, ranked, with each step's cost where it was timed."""
    best = pd.concat([results.read(p) for p in inputs.best], ignore_index=True)
    cost = pd.concat([results.read(p) for p in inputs.cost], ignore_index=True) if inputs.cost else None
    return tables.summary(best, cost)


MAKE = {
    "environment": lambda inputs: tables.environment(),
    "best-convex": lambda inputs: tables.best_hyperparameters(read(inputs.runs)),
    "best-networks": best_networks,
    "summary": summary,
    "logit-clip": lambda inputs: tables.logit_clip_comparison(tables.read_logit_clip_grids(inputs.runs)),
}


with results.job_log(snakemake.log[0]):
    table = MAKE[snakemake.params.table](snakemake.input)
    results.write(table, snakemake.output.csv)  # the data
    results.write_text(tables.to_html(table), snakemake.output.html)  # what the report shows
    print(table.to_string())
