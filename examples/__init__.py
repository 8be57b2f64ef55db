"""Plug-in examples: methods that live outside the ``flux_app`` package (docs/EXTENDING.md)."""
