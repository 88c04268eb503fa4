"""The command line of the small from-scratch run (BERT teacher stage, then a CNN student
distilled from it) that the end-to-end, multi-host and crash tests start as subprocesses."""

import sys


def main_command(workdir, *overrides: str, train_limit: int = 3000) -> list[str]:
  return [
    sys.executable,
    '-m',
    'kdjax.main',
    '--config=experiments/sst2_from_scratch.py:runlocal,student=cnn',
    f'--workdir={workdir}',
    f'--config.data.train_limit={train_limit}',
    "--config.stages=('teacher','distill')",
    *overrides,
  ]
