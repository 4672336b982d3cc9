"""The shared rich consoles: tables and progress on stderr when stdout is data (``--json``).

Piped output (not a terminal) is laid out 160 columns wide unless ``COLUMNS`` says
otherwise: rich's default of 80 cut long site names in logs and files.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

_PIPE_WIDTH = 160


def _width(stream) -> int | None:
    """None (rich decides) on a terminal or with COLUMNS set; a wide page for pipes and files."""
    if os.environ.get("COLUMNS") or (hasattr(stream, "isatty") and stream.isatty()):
        return None
    return _PIPE_WIDTH


console = Console(highlight=False, width=_width(sys.stdout))
err_console = Console(stderr=True, highlight=False, width=_width(sys.stderr))
