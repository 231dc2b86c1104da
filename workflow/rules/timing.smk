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
        timing=timing_protocol("dtype", "settings", "repeats"),
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
        scaling={name: config["timing"]["scaling"][name] for name in ("widths", "batch_sizes", "settings")},
        timing=timing_protocol("dtype", "repeats"),
        code=computed_by(),
    threads: workflow.cores
    resources:
        gpu=gpu_resources,
    script:
        "../scripts/cost.py"
