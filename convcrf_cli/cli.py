"""The ``convcrf`` command group: assembles the commands of :mod:`convcrf_cli.commands`."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

import click
import click.utils

from convcrf_cli import __version__
from convcrf_cli.commands.batch_cmd import batch_command
from convcrf_cli.commands.common import fail
from convcrf_cli.commands.fit_cmd import fit_command
from convcrf_cli.commands.info_cmd import info_command
from convcrf_cli.commands.params_cmd import params_command
from convcrf_cli.commands.refine_cmd import refine_command
from convcrf_cli.commands.synth_cmd import synth_command
from convcrf_cli.outputs import stdout_failure

# Click >= 8.2 raises this (a UsageError holding the help text) for a group run without a command.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class ConvCRFGroup(click.Group):
    """The command group, reporting Click's usage errors as the other errors: one line
    ``convcrf: error: problem (see 'convcrf CMD --help')`` on stderr, exit status 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Click's ``main``; in standalone mode, its errors as one line and an exit status."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            status = super().main(*args, standalone_mode=False, **kwargs)
        except _NO_ARGS_IS_HELP as exc:  # plain `convcrf`: the help, as Click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "convcrf"
            fail(f"{exc.format_message().rstrip('.')} (see '{command} --help')", exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            fail("aborted", 1)
        except OSError as exc:  # --help or --version to a stdout that cannot be written
            if not _in_click_echo(exc.__traceback__):
                raise
            arguments = kwargs.get("args")
            arguments = sys.argv[1:] if arguments is None else arguments
            what = "the version" if "--version" in arguments else "the help"
            fail(str(stdout_failure(exc, what)), 1)
        sys.exit(status if isinstance(status, int) else 0)


def _in_click_echo(traceback: TracebackType | None) -> bool:
    """Whether ``traceback`` passes through ``click.echo``: Click writing its help or version
    (the commands write their output through :func:`~convcrf_cli.commands.common.echo_out`,
    which reports its own failures)."""
    while traceback is not None:
        if traceback.tb_frame.f_code is click.utils.echo.__code__:
            return True
        traceback = traceback.tb_next
    return False


@click.group(cls=ConvCRFGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convcrf")
def main() -> None:
    """Refine semantic segmentations with a Convolutional CRF (ConvCRF)."""


main.add_command(params_command)
main.add_command(info_command)
main.add_command(refine_command)
main.add_command(batch_command)
main.add_command(synth_command)
main.add_command(fit_command)
