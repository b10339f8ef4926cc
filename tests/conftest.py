"""Test-session settings that must precede torch's OpenMP start-up."""

import os

# The CLI sets this too: with spinning OpenMP threads, small kernels ran up to 20x slower
# whenever another process shared the two cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
