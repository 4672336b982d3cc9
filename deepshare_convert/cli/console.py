"""The shared rich consoles: tables and progress on stderr when stdout is data (``--json``)."""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
