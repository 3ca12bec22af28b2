"""`python -m rocketkv_jax.cli ...`: the `rocketkv` command."""

import sys

from rocketkv_jax.cli import main

sys.exit(main())
