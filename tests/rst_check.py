"""What the report's reStructuredText renderer (docutils, as Snakemake's report calls it) complains
about in a caption: a stray `|x|` reads as an undefined substitution and `*x` as unclosed emphasis,
and the report then shows "System Message: ERROR" boxes inside the caption."""

from __future__ import annotations

import io


def rst_problems(text: str) -> list[str]:
    """The warnings and errors docutils reports for `text` (empty when it renders cleanly)."""
    from docutils.core import publish_parts

    stream = io.StringIO()
    publish_parts(text, writer="html", settings_overrides={"warning_stream": stream, "report_level": 2})
    return [line for line in stream.getvalue().splitlines() if line.strip()]
