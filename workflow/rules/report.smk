# The report: `snakemake --cores all` with profiles/default writes results/report.html after the
# run, with every figure and table above under its category and caption.


report: "../report/workflow.rst"


def all_targets():
    return ([f"{RESULTS}/figures/{name}.png" for name in figures()]
            + [f"{RESULTS}/tables/{name}.csv" for name in tables()])
