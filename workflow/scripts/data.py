"""Fetch and verify one download task's files (natgrad_impls.data) and write what was loaded."""

import pandas as pd

from natgrad_impls import results
from natgrad_impls.tasks import get_task

snakemake = globals()["snakemake"]  # set by Snakemake's script directive

with results.job_log(snakemake.log[0]):
    task = get_task(snakemake.wildcards.task)
    dataset = task.load(0)
    rows = [{"task": task.name, "split": split, "examples": len(part.X), "inputs": int(part.X[0].size),
             "source": task.source} for split, part in (("train", dataset.train), ("test", dataset.test)) if part]
    results.write(pd.DataFrame(rows), snakemake.output[0])
    print(pd.DataFrame(rows).to_string())
