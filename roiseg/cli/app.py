"""The ``roiseg`` group: every command exits 1 on a usage error as on any other user error."""
from __future__ import annotations

import logging
import sys

import click

from roiseg.cli.common import PanelCommand


class ExitOneGroup(click.Group):
    """Usage errors (unknown option, bad choice, missing argument) exit 1 like every other user
    error, not click's 2: one rule for scripts that call the CLI.  Its commands list their options
    in ``--help`` panels."""

    command_class = PanelCommand

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            exc.show()
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=ExitOneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool):
    """ROI-conditioned person segmentation: feature cache + decoder trainer."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
