"""The release: written once, read by the package, rendered specs and run records."""

__version__ = "0.1.0"
