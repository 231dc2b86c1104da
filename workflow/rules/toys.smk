# Figures 1, 2 and the starting-point figure: small tables computed from the generated toys
# (natgrad_impls.toys). The starting-point figure reuses the numpy wine grid when there is one.


rule toy:
    input:
        toy_inputs,
    output:
        f"{RESULTS}/toys/{{toy}}.parquet",
    conda:
        ENVIRONMENT
    log:
        f"{LOGS}/toys/{{toy}}.log",
    wildcard_constraints:
        toy="vecfield|misspec|starting_point",
    params:
        code=computed_by(),
    threads: 1
    script:
        "../scripts/toy.py"
