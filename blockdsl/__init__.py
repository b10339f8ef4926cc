"""blockdsl: compose, compile and search transformer block architectures."""

__version__ = "0.1.0"
