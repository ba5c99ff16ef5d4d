"""The ``convcrf`` command group: assembles the commands of :mod:`convcrf_cli.commands`."""

from __future__ import annotations

import click

from convcrf_cli import __version__
from convcrf_cli.commands.batch_cmd import batch_command
from convcrf_cli.commands.fit_cmd import fit_command
from convcrf_cli.commands.info_cmd import info_command
from convcrf_cli.commands.params_cmd import params_command
from convcrf_cli.commands.refine_cmd import refine_command
from convcrf_cli.commands.synth_cmd import synth_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convcrf")
def main() -> None:
    """Refine semantic segmentations with a Convolutional CRF (ConvCRF)."""


main.add_command(params_command)
main.add_command(info_command)
main.add_command(refine_command)
main.add_command(batch_command)
main.add_command(synth_command)
main.add_command(fit_command)
