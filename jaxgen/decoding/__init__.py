"""Decoders: one jitted ``lax.while_loop`` program per strategy, sharing `engine`'s step machinery."""
