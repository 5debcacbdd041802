"""Pure flax.linen modules: AsCAN blocks, attention, backbones. No training code lives here."""
