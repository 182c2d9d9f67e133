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
    metavar="NAME:DIMS[:DTYPE] | NAME=VALUE",
    help="Fix an input's shape (and dtype), e.g. x:1x3x320x320 or x:1x3x320x320:float32; or fix an input's "
         "value, for inputs a shape depends on (axes, sizes, a trip count): axes=[0,2] (JSON) or axes=axes.npy. "
         "Repeatable.",
)


def plan_options(f):
    """--cloud and the plan flags, collected into ``plan: PlanSettings`` and ``cloud``."""
    opts = [
        click.option("--cloud", default="cloud-x86", show_default=True, metavar="PROFILE",
                     help="Cloud profile for what the device cannot carry; 'none' never splits."),
        click.option("--bandwidth", metavar="RATE", help="Device↔cloud bandwidth, e.g. 20Mbps (default: the target's link)."),
        click.option("--rtt", metavar="TIME", help="Round-trip time, e.g. 40ms (default: the target's link)."),
        click.option("--memory", metavar="SIZE", help="Device memory budget, e.g. 512MiB (default: the target's capacity)."),
        click.option("--keep-input-local/--no-keep-input-local", default=True, show_default=True,
                     help="The nodes that read the model's input run on the device."),
        click.option("--max-crossings", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Device↔cloud crossings allowed (1: a device prefix, a cloud suffix)."),
    ]  # fmt: skip
    for o in reversed(opts):
        f = o(f)
    return f


def plan_settings(kwargs: dict):
    """Pop the plan flags from a command's kwargs: (cloud profile name or None, PlanSettings)."""
    from ..compiler.package import PlanSettings

    cloud = kwargs.pop("cloud")
    settings = PlanSettings(
        bandwidth=kwargs.pop("bandwidth"),
        rtt=kwargs.pop("rtt"),
        memory=kwargs.pop("memory"),
        keep_input_local=kwargs.pop("keep_input_local"),
        max_crossings=kwargs.pop("max_crossings"),
    )
    return (None if cloud.lower() == "none" else cloud), settings
