# Figure 3: the Kunstner grid of every optimizer on each full-batch convex task (`natgrad grid`),
# and the EF/NGD cosine along the best EF run of the numpy grid; the appendix's logit-clip grids.


rule grid:
    input:
        data_inputs,
    output:
        f"{RESULTS}/grid/{{task}}/{{framework}}-{{device}}.parquet",
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/grid/{{task}}/{{framework}}-{{device}}.log",
    params:
        optimizers=",".join(config["optimizers"]),
        options=grid_options,
        env=single_threaded(1),
        checkpoints=checkpoints_beside,
        code=computed_by(),
    threads: 1
    priority: 10  # the longest jobs: start them first
    resources:
        gpu=gpu_resources,
    shell:
        "{params.env} natgrad grid --task {wildcards.task} --optimizers {params.optimizers} "
        "--framework {wildcards.framework} --device {wildcards.device} {params.options} "
        "--checkpoints {params.checkpoints} --out {output} > {log} 2>&1"  # off a terminal: progress as log lines


# The same grid with the exact Bernoulli likelihood instead of the paper code's clipped logits
# (convex.compare_logit_clip): the appendix figure and table of where the two differ.
use rule grid as grid_logit_clip_none with:
    output:
        f"{RESULTS}/grid/{{task}}/{{framework}}-{{device}}-logit_clip-none.parquet",
    log:
        f"{LOGS}/grid/{{task}}/{{framework}}-{{device}}-logit_clip-none.log",
    params:
        optimizers=",".join(config["optimizers"]),
        options=lambda wildcards: grid_options(wildcards) + " --logit-clip none",
        env=single_threaded(1),
        checkpoints=checkpoints_beside,
        code=computed_by(),


rule cos_along_best_ef:
    input:
        f"{RESULTS}/grid/{{task}}/numpy-cpu.parquet",
    output:
        f"{RESULTS}/grid/{{task}}/cos.parquet",
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/grid/{{task}}/cos.log",
    params:
        steps=config["convex"]["steps"],
        code=computed_by(),
    threads: 1
    script:
        "../scripts/cos_along_best_ef.py"
