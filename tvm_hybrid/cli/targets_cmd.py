"""`tvm-hybrid targets`: the target profiles and their capacity."""

from __future__ import annotations

import click

from .output import emit_json


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def command(as_json: bool) -> None:
    """List target profiles with their capacity.

    \b
    tvm-hybrid targets
    tvm-hybrid targets --json | jq '.targets[].name'
    """
    from ..targets import all_profiles, host_profile_name

    profiles = all_profiles()
    host = host_profile_name()
    if as_json:
        emit_json({"host": host, "targets": [p.to_dict() | {"source": p.source} for p in profiles.values()]})
        return
    rows = [("NAME", "WHERE", "MEMORY", "GFLOP/S", "DESCRIPTION")]
    for p in profiles.values():
        mem = p.capacity.get("memory_bytes", 0) / 2**20
        rows.append(
            (
                p.name + (" (host)" if p.name == host else ""),
                p.placement,
                f"{mem:.0f} MiB",
                f"{p.capacity.get('peak_gflops', 0):g}",
                p.description,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
