"""Runnable studies: each module's `get_config(arg)` (and `get_sweep()` for sweeps)."""


def parse_args(arg: str, valid: dict, source: str) -> dict:
  """'a=1,flag' -> {'a': '1', 'flag': True}; `valid` maps each name to its help text, and
  anything else is refused in one line naming the file and the valid arguments."""
  args = dict(a.split('=', 1) if '=' in a else (a, True) for a in arg.split(',') if a)
  unknown = sorted(set(args) - set(valid))
  if unknown:
    accepted = ', '.join(f'{name}{"=" + v if v else ""}' for name, v in valid.items())
    raise ValueError(f'{source}: unknown argument(s) {unknown}; valid: {accepted}')
  return args
