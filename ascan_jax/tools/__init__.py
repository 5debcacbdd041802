"""Command-line tools: ``python -m ascan_jax.tools.<name>`` (dataset preparation, conversions)."""
