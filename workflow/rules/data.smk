# Download tasks (config/paper.yaml, config/gpu.yaml): fetch and verify their files (pinned URL and
# sha256, cache NATGRAD_DATA) once, before the jobs that use them; offline, this job fails with the
# message that names the file and where to put it by hand. Offline tasks need no job here.


rule data:
    output:
        f"{RESULTS}/data/{{task}}.csv",
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/data/{{task}}.log",
    threads: 1
    localrule: True  # on a cluster, where the network is (compute nodes often have none)
    retries: 2  # the network may fail; the checksum makes a retry safe
    script:
        "../scripts/data.py"
