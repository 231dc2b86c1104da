# natgrad-bench: `snakemake --cores all` reproduces every figure and table and writes
# results/report.html (profiles/default). Rules by stage in workflow/rules/; the configuration is
# config/config.yaml (overlays: --configfile config/smoke.yaml, paper.yaml, gpu.yaml), checked
# against workflow/schemas/config.schema.yaml before any job runs.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/validation.smk"
include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/grid.smk"
include: "workflow/rules/toys.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/timing.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"


share_jax_compilations()  # in the environment that every job inherits
jax_allocates_on_demand()
finds_its_own_tools()


onstart:
    check_devices_are_listed_for_other_machines()
    remove_stale_temporaries()


rule all:
    input:
        all_targets(),
    default_target: True
