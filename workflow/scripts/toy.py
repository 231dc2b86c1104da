"""Compute one toy table (natgrad_impls.toys) and write it atomically."""

import pandas as pd

from natgrad_impls import results, toys

snakemake = globals()["snakemake"]  # set by Snakemake's script directive

with results.job_log(snakemake.log[0]):
    toy = snakemake.wildcards.toy
    if toy == "starting_point":
        grid = (pd.read_parquet(snakemake.input[0], filters=[("best", "==", True)]) if snakemake.input
                else None)  # no numpy wine grid in this config: the paper grid is run here
        table = toys.starting_point_table(grid=grid)
    else:
        table = getattr(toys, f"{toy}_table")()
    results.write(table, snakemake.output[0])
    print(f"{toy}: wrote {len(table)} rows to {snakemake.output[0]}")
