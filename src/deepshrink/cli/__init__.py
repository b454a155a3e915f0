"""The `deepshrink` command. Each family registers its subcommands from its own module."""

from __future__ import annotations

import signal

import typer

from deepshrink.cli import compress, core, distill, early_exit, export, prune, quantize, redesign, run
from deepshrink.cli.common import friendly_errors, quiet_unless_main
from deepshrink.cli.options import with_common_options

app = typer.Typer(help="deepshrink: make trained PyTorch models small and fast.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# One line per family: module with a `register(app)` function.
for _module in (core, prune, compress, distill, quantize, redesign, early_exit, export, run):
    _module.register(app)
for _command in app.registered_commands:  # --import and --threads on every command
    _command.callback = with_common_options(_command.callback, friendly_errors)


def _on_signal(signum: int, _frame: object) -> None:
    # Unwind like Ctrl-C, so that `finally` blocks remove temporary files and directories.
    raise SystemExit(128 + signum)


def main() -> None:
    quiet_unless_main()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    app()
