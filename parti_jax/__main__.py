"""`python -m parti_jax <command>`: the same as the `parti-jax` console script."""

import sys

from parti_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
