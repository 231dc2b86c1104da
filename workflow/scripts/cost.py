"""Time one rule's cost table: a network task's (rule cost) or the scaling sweep (rule scaling)."""

import os

from natgrad_impls.runner import thread_environment

snakemake = globals()["snakemake"]  # set by Snakemake's script directive
# The rule's threads for torch, BLAS and XLA alike, before torch or jax is imported: Snakemake sets
# OMP_NUM_THREADS, which XLA ignores (it sizes its pool from PJRT_NPROC, else the CPU affinity), so
# with --cores below the machine's, jax's steps had every core and torch's the rule's.
os.environ.update(thread_environment(snakemake.threads))

from natgrad_impls import results, timing  # noqa: E402

w, t = snakemake.wildcards, snakemake.params.timing
with results.job_log(snakemake.log[0]):
    # the CPU's or GPU's model: on a cluster, the tables a figure sets side by side may come from
    # different nodes (asked before measuring: it may start the framework's GPU client)
    machine = timing.device_name(w.device, w.framework)
    if snakemake.rule == "cost":
        table = timing.cost_table(w.task, w.framework, w.device, t["dtype"], t["settings"], t["repeats"])
    else:
        s = snakemake.params.scaling
        table = timing.scaling_table(w.framework, w.device, s["widths"], s["batch_sizes"], s["settings"], t["dtype"],
                                     t["repeats"])
    table["machine"] = machine
    table["threads"] = timing.cpu_threads(w.framework)
    results.write(table, snakemake.output[0])
    print(table.to_string())
