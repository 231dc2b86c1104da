"""Rerun the best EF run of a numpy grid with the EF/NGD cosine recorded at every step (DESIGN 4:
cos(EF, NGD) along the best `ef` run, with that run's damping; cos(NGD, gradient) beside it)."""

import pandas as pd

from natgrad_impls import results, runner

snakemake = globals()["snakemake"]  # set by Snakemake's script directive

with results.job_log(snakemake.log[0]):
    grid = pd.read_parquet(snakemake.input[0], columns=["task", "optimizer", "lr", "damping", "best", "repeat"],
                           filters=[("optimizer", "==", "ef"), ("best", "==", True), ("repeat", "==", 0)])
    if grid.empty:
        print(message := f"{snakemake.input[0]}: no best ef run (is ef in `optimizers`?)")  # in the log too
        raise SystemExit(message)
    best = grid.iloc[0]
    hyperparameters = {"lr": float(best["lr"]), "damping": float(best["damping"])}
    print(f"{best['task']}: best ef run {hyperparameters}, rerun with cos_ef_ngd", flush=True)
    frame = runner.run(str(best["task"]), "ef", "numpy", hyperparameters=hyperparameters,
                       steps=snakemake.params.steps, cos_ef_ngd=True, progress=False)
    results.write(frame, snakemake.output[0])
    print(f"wrote {len(frame)} rows to {snakemake.output[0]}")
