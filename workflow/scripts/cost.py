"""Time one rule's cost table: a network task's (rule cost) or the scaling sweep (rule scaling)."""

from natgrad_impls import results, timing

snakemake = globals()["snakemake"]  # set by Snakemake's script directive

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
