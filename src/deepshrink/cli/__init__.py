"""The `deepshrink` command. Each family registers its subcommands from its own module."""

from __future__ import annotations

import typer

from deepshrink.cli import compress, core, distill, prune, quantize, run

app = typer.Typer(help="deepshrink: make trained PyTorch models small and fast.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# One line per family: module with a `register(app)` function.
for _module in (core, prune, compress, distill, quantize, run):
    _module.register(app)


def main() -> None:
    app()
