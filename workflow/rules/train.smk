# Networks, the DeepOBS protocol: the whole tuning grid on `tuning_seeds` and its best setting by
# median final full-train loss over them (`tune`), then that setting rerun on `seeds` (`train`).
# One job runs all the settings (all the seeds) of one task, optimizer, framework and device in
# one process: a job's fixed cost (interpreter, torch or jax, the data, compilation: about 5 s) is
# several times that of a 400-step run. Both step with one thread (train.py): float32 round-off
# depends on the thread count, and the losses must not depend on the machine's cores. Tune jobs
# share the machine, a core each: only their losses are used. Train jobs hold every core, so that
# nothing runs beside their steps, whose times are the networks figures' time axes and the
# summary's time to target (a job beside them slowed them up to 2x).


rule tune:
    input:
        data_inputs,
    output:
        runs=f"{RESULTS}/tune/{{task}}/{{optimizer}}/{{framework}}-{{device}}.parquet",
        best=f"{RESULTS}/tune/{{task}}/{{optimizer}}/{{framework}}-{{device}}.best.json",
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/tune/{{task}}/{{optimizer}}/{{framework}}-{{device}}.log",
    params:
        runs=lambda w: tuning_runs(w.optimizer),
        seeds=config["networks"]["tuning_seeds"],
        protocol=network_protocol(),
        cos_ef_ngd=False,
        checkpoints=checkpoints_beside,
        code=computed_by(),
    threads: 1
    resources:
        gpu=gpu_resources,
    script:
        "../scripts/train.py"


rule train:
    input:
        data_inputs,
        best=f"{RESULTS}/tune/{{task}}/{{optimizer}}/{{framework}}-{{device}}.best.json",
    output:
        runs=f"{RESULTS}/train/{{task}}/{{optimizer}}/{{framework}}-{{device}}.parquet",
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/train/{{task}}/{{optimizer}}/{{framework}}-{{device}}.log",
    params:
        seeds=config["networks"]["seeds"],
        protocol=network_protocol(),
        cos_ef_ngd=lambda w: w.optimizer in config["networks"].get("cos_ef_ngd", []),
        checkpoints=checkpoints_beside,
        code=computed_by(),
    threads: workflow.cores
    resources:
        gpu=gpu_resources,
    script:
        "../scripts/train.py"
