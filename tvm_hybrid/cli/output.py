"""What every command shares: the one JSON document of --json, and the group's --verbose."""

from __future__ import annotations

import json

import click

#: Set by the command group: --verbose given (tracebacks on errors, emulated runs verbose).
_state = {"verbose": False}


def emit_json(doc) -> None:
    """The one JSON document a --json command prints on stdout."""
    click.echo(json.dumps(doc, indent=2, sort_keys=True))
