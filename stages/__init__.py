"""Thin entry points of the DVC stages (run as ``python -m stages.<name>`` from the repository root)."""
