"""Options shared by several commands."""

from __future__ import annotations

import click


def _parse_inputs(ctx, param, values):
    from ..compiler.importer import InputOverride

    try:
        return tuple(InputOverride.parse(v) for v in values)
    except Exception as e:  # UsageError from parse: show it as click's bad-parameter
        raise click.BadParameter(str(e)) from e


input_option = click.option(
    "--input",
    "inputs",
    multiple=True,
    callback=_parse_inputs,
    metavar="NAME:DIMS[:DTYPE]",
    help="Fix an input's shape (and dtype), e.g. x:1x3x320x320 or x:1x3x320x320:float32. Repeatable.",
)
