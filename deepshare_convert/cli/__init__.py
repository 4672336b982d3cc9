"""The ``deepshare`` command line: a thin typer skin over the Python API."""
