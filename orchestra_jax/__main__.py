import sys

from orchestra_jax.cli import main

sys.exit(main())
