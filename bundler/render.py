"""jinja2 templates (StrictUndefined: a missing value is an error, never an empty string)."""

from __future__ import annotations

import shlex
from typing import Any


def render(name: str, context: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("bundler", "templates"), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["sh"] = shlex.quote  # shell-quote any value put into a script
    return env.get_template(name).render(**context)
