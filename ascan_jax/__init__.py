"""ascan_jax: AsCAN (Asymmetric Convolution-Attention Networks, arXiv 2411.04967) in JAX/Flax.

Flow: config -> task (ascan_jax.tasks) -> generic loop (ascan_jax.train) -> data / model / state
-> metrics. Models live in ascan_jax.models and know nothing about training.
"""
