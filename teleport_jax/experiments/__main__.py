import sys

from teleport_jax.experiments.cli import main

sys.exit(main())
