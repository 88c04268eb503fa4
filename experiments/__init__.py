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


def choice(args: dict, name: str, choices: tuple, source: str) -> str:
  """args[name] if it is one of `choices` (the first is the default), else a one-line error
  naming the file, the argument and the valid values."""
  value = args.get(name, choices[0])
  if value not in choices:
    raise ValueError(f'{source}: {name}={value!r}; valid: {choices}')
  return value
