# natgrad-bench: `snakemake --cores all` reproduces every figure and table and writes
# results/report.html (profiles/default). Rules by stage in workflow/rules/; the configuration is
# config/config.yaml (overlays: --configfile config/smoke.yaml, paper.yaml, gpu.yaml), checked
# against workflow/schemas/config.schema.yaml before any job runs.
import jsonschema
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


def schema_error(error) -> str:
    """A jsonschema ValidationError as one line: the field, what is wrong with it and what it takes
    (Snakemake's own message goes on to print the whole schema, hundreds of lines)."""
    where = "config" + "".join(f"[{part!r}]" for part in error.absolute_path)
    described = error.schema.get("description") if isinstance(error.schema, dict) else None
    if error.validator == "additionalProperties":
        what = f"{error.message}; it takes {', '.join(error.schema.get('properties', {}))}"
    elif error.validator == "pattern" and described:
        what = f"{error.instance!r} is not {described}"  # (not the regular expression)
    else:
        what = f"{error.message} ({described})" if described else error.message
    return f"Error validating config file: {where}: {what}"


try:
    validate(config, "workflow/schemas/config.schema.yaml")
except WorkflowError as error:
    if not isinstance(error.__context__, jsonschema.ValidationError):
        raise
    raise WorkflowError(schema_error(error.__context__)) from None


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/grid.smk"
include: "workflow/rules/toys.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/timing.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"


share_jax_compilations()  # in the environment that every job inherits


onstart:
    remove_stale_temporaries()


rule all:
    input:
        all_targets(),
    default_target: True
