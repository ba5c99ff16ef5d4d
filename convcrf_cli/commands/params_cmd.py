"""``convcrf params``: print parameters (defaults, a preset or a file, with options) as JSON."""

from __future__ import annotations

import click

from convcrf_cli.commands.common import crf_options, echo_out, params_from_options, reports_errors
from convcrf_cli.params import PRESETS


@click.command("params")
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default=None,
    help="Start from a preset: 'default' (this tool's measured defaults) or 'original' "
    "(the original implementation: k=11, blur 4, init log).",
)
@crf_options
@reports_errors
def params_command(preset: str | None, **options) -> None:
    """Print CRF parameters as JSON (the format --params reads)."""
    if preset is not None and options.get("params_file") is not None:
        raise click.UsageError("give --preset or --params, not both")
    params = params_from_options(options, PRESETS[preset] if preset else None)
    echo_out(params.to_json(), "the parameters", newline=False)
