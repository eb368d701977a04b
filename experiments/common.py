"""What every entry point shares. Importing it registers the sentiment testbed (its data
source and gold reward), which the library itself never imports."""

from absl import flags
from absl import logging

import rlhf_jax.testbed  # noqa: F401  (registers data source 'testbed' and reward 'gold')


def quiet_logging() -> None:
  """absl WARNING unless --verbosity was given: Orbax logs every file it reads or writes at INFO."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
