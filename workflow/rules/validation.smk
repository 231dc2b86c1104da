# The configuration checked against workflow/schemas/config.schema.yaml before anything reads it.
import math

import jsonschema
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


def schema_error(error) -> str:
    """A jsonschema ValidationError as one line: the field, what is wrong with it and what it takes
    (Snakemake's own message goes on to print the whole schema, hundreds of lines)."""
    where = "config" + "".join(f"[{part!r}]" for part in error.absolute_path)
    described = error.schema.get("description") if isinstance(error.schema, dict) else None
    if error.validator == "additionalProperties":
        what = f"{error.message}; it takes {', '.join(error.schema.get('properties', {}))}"
    elif error.validator == "pattern" and described:
        what = f"{error.instance!r} is not {described}"  # (not the regular expression)
    elif error.validator == "type" and error.validator_value == "string" and isinstance(error.instance, (int, float)):
        # YAML 1.1 reads an unquoted -10:10:41 as a base-60 integer (-36641)
        what = f"YAML read the unquoted value as the number {error.instance!r}; quote it" + (
            f" ({described})" if described else "")
    else:
        what = f"{error.message} ({described})" if described else error.message
    return f"Error validating config file: {where}: {what}"


def non_finite_numbers(node, where="config"):
    """(field, value) of every number in the configuration that is not finite: YAML's .inf and .nan,
    which no field takes and a schema's bounds let through (NaN compares false with every bound)."""
    if isinstance(node, dict):
        return [found for key, value in node.items() for found in non_finite_numbers(value, f"{where}[{key!r}]")]
    if isinstance(node, list):
        return [found for i, value in enumerate(node) for found in non_finite_numbers(value, f"{where}[{i}]")]
    return [(where, node)] if isinstance(node, float) and not math.isfinite(node) else []


try:
    validate(config, "../schemas/config.schema.yaml")  # (relative to this file)
except WorkflowError as error:
    if not isinstance(error.__context__, jsonschema.ValidationError):
        raise
    raise WorkflowError(schema_error(error.__context__)) from None
non_finite = non_finite_numbers(config)
if non_finite:
    field, value = non_finite[0]
    raise WorkflowError(f"Error validating config file: {field}: {value} is not a finite number")
