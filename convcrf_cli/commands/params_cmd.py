"""``convcrf params``: print parameters (defaults, a preset or a file, with options) as JSON."""

from __future__ import annotations

from pathlib import Path

import click

from convcrf_cli.commands.common import crf_options, echo_out, params_from_options, reports_errors
from convcrf_cli.params import PRESETS, CRFParams, ParamsError, read_params_json, split_transforms


def read_fields(path: Path) -> CRFParams:
    """The CRF fields of the parameter file ``path`` (``-``: stdin); a file that also holds
    C/T matrices is a :class:`ParamsError` naming it, since only the fields are printed."""

    def fields_only(data: object) -> CRFParams:
        fields, transforms = split_transforms(data)
        if transforms:
            raise ParamsError(
                f"learned {' and '.join(transforms)} matrices present (written by `convcrf fit "
                "--learn ...,C,T`): `convcrf params` prints only the CRF fields and would drop "
                "them; pass the file to `convcrf fit --params` with the options to change, or "
                "use it in PyTorch through convcrf_cli.torch.ConvCRF.load"
            )
        return CRFParams.from_dict(fields)

    return read_params_json(path, fields_only)


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
def params_command(preset: str | None, **options: object) -> None:
    """Print CRF parameters as JSON (the format --params reads)."""
    params_file = options.pop("params_file", None)
    if preset is not None and params_file is not None:
        raise click.UsageError("give --preset or --params, not both")
    base = read_fields(params_file) if params_file is not None else PRESETS.get(preset)
    params = params_from_options(options, base)
    echo_out(params.to_json(), "the parameters", newline=False)
