"""The `deepshrink` command. Each family registers its subcommands from its own module."""

from __future__ import annotations

import typer

from deepshrink.cli import compress, core, distill, prune, quantize
from deepshrink.cli.common import quiet_unless_main

app = typer.Typer(help="deepshrink: make trained PyTorch models small and fast.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# One line per family: module with a `register(app)` function.
for _module in (core, prune, compress, distill, quantize):
    _module.register(app)


def main() -> None:
    quiet_unless_main()
    app()
