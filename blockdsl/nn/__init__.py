"""Plain PyTorch primitives: they take plain arguments and know nothing of the DSL.

Their keyword defaults serve direct PyTorch use (tests/nn, benchmarks). A spec never
reaches them: each registry entry's lowering passes every constructor argument, from the
schema's defaults (register() and tests/test_lower.py check both directions), so a
spec's defaults are written once, in the registry.
"""
