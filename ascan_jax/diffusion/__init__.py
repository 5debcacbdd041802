"""DDPM diffusion for AsCAN (arXiv 2411.04967, sections 5-6), pure JAX and model-agnostic.

``schedule``: the scaled-linear noise schedule and the epsilon-prediction training helpers;
``samplers``: DDPM, DDIM, Euler, Heun and DPM-Solver++(2M) with exact NFE accounting;
``guidance``: classifier-free guidance and its per-step scale schedules.
"""
