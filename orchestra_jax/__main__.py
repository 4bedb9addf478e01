import sys

from orchestra_jax.cli import entry

sys.exit(entry())
