"""Evaluators and metrics: classification top-k, generative metrics (FID, IS, ...)."""
