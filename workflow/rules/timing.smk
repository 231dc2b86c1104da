# Cost of one step in gradient-equivalents on each network task (natgrad_impls.timing.cost_table),
# and the scaling sweep over width and batch size (timing.scaling_table). Timing jobs take every
# core, so that nothing else runs beside them and the numbers are those of a quiet machine.


rule cost:
    input:
        data_inputs,
    output:
        f"{RESULTS}/cost/{{task}}/{{framework}}-{{device}}.csv",
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/cost/{{task}}/{{framework}}-{{device}}.log",
    params:
        timing=fields(config["timing"], "dtype", "settings", "repeats"),
        code=computed_by(),
    threads: workflow.cores
    resources:
        gpu=gpu_resources,
    script:
        "../scripts/cost.py"


rule scaling:
    output:
        f"{RESULTS}/scaling/{{framework}}-{{device}}.csv",
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/scaling/{{framework}}-{{device}}.log",
    params:
        scaling=fields(config["timing"]["scaling"], "widths", "batch_sizes", "settings"),
        timing=fields(config["timing"], "dtype", "repeats"),
        code=computed_by(),
    threads: workflow.cores
    resources:
        gpu=gpu_resources,
    script:
        "../scripts/cost.py"
