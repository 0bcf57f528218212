"""Command-line interface (``biosam``)."""
