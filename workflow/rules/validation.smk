# The configuration checked against workflow/schemas/config.schema.yaml before anything reads it.
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
    else:
        what = f"{error.message} ({described})" if described else error.message
    return f"Error validating config file: {where}: {what}"


try:
    validate(config, "../schemas/config.schema.yaml")  # (relative to this file)
except WorkflowError as error:
    if not isinstance(error.__context__, jsonschema.ValidationError):
        raise
    raise WorkflowError(schema_error(error.__context__)) from None
