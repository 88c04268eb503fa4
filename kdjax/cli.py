"""Shared command-line plumbing: one-line errors with exit code 2 instead of tracebacks."""

import contextlib
import os
import sys
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from kdjax import checkpoint, loop
from kdjax import config as config_lib
from kdjax.data.errors import DataError

# Expected failures end with one line and exit code 2 instead of a traceback.
USER_ERRORS = (config_lib.ConfigError, DataError, checkpoint.CheckpointError, loop.TrainingDiverged)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (exit 2) for bad or unknown config overrides."""
  try:
    argv = flags.FLAGS(argv)
    config_file = config_flags.get_config_filename(flags.FLAGS['config']).split(':')[0]
    if not os.path.isfile(config_file):
      message = f'--config: no such file {config_file!r}'
    else:
      return argv
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # A locked ConfigDict raises these for `--config.<key>` overrides naming no key.
    detail = e.args[0] if e.args else e
    message = f'bad --config override: {detail}'
  print('error: ' + _one_line(str(message)), file=sys.stderr)
  sys.exit(2)


def _one_line(message: str) -> str:
  """Flattens absl/ml_collections messages, which may embed a traceback or escaped newlines."""
  lines = [line.strip() for line in message.replace('\\n', '\n').splitlines() if line.strip()]
  marker = 'Traceback (most recent call last):'
  start = next((i for i, line in enumerate(lines) if marker in line), None)
  if start is not None:
    # Keep what failed (before the traceback) and why (the exception, last line).
    lines = lines[:start] + [lines[start].replace(marker, ''), lines[-1]]
  return ' '.join(' '.join(lines).replace("'", '').replace('\\', '').split())


# A run stopped by SIGTERM/preemption after saving exits as a SIGTERM-killed process would.
PREEMPTED_EXIT_CODE = 143


@contextlib.contextmanager
def exit_on_user_errors():
  """Expected failures (bad config, data, checkpoint; divergence) end as one line, exit 2;
  a preempted run (checkpoint saved) as one line, exit 143."""
  try:
    yield
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except loop.Preempted as e:
    print(f'stopped: {e}', file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)


def run_config_main(run: Callable[[Any, str], Any]) -> None:
  """`python -m <module> --config=<file>[:args] --workdir=DIR` for a `run(config, workdir)`.

  The flags are defined here, when a module is run, not at import, so two entry-point modules
  can be imported side by side without their flag names clashing.
  """
  config_flag = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file.', lock_config=True
  )
  workdir_flag = flags.DEFINE_string(
    'workdir', None, 'Run directory (created; resumed if present).'
  )
  flags.mark_flags_as_required(['config', 'workdir'])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    with exit_on_user_errors():
      run(config_flag.value, workdir_flag.value)

  app.run(main, flags_parser=parse_flags)
