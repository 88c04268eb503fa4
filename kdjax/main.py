"""Command line: `python -m kdjax.main --config=experiments/<name>.py[:args] --workdir=DIR`.

Overrides use ml_collections config flags (`--config.loss.temperature=4`). The config is
locked, so an override naming a key the schema lacks is an error. Config files are Python
and run as code when loaded: only use config files you trust.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from kdjax import train
from kdjax.cli import USER_ERRORS, parse_flags

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created; resumed if present).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
