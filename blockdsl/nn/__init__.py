"""Plain PyTorch primitives: they take plain arguments and know nothing of the DSL."""
