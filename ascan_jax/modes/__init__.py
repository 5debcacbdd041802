"""What ``main.py --mode=...`` runs: train (the generic loop), eval, sample, geneval, bench,
summary.

The top layer: modes may import every other part of the package; nothing imports them except
``main.py`` (and the tools that run a mode).
"""
