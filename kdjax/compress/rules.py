"""Which parameters a transform touches: regex rules over '/'-joined parameter paths.

One engine for every transform that targets parameters (pruning, quantization, low-rank
factorisation, the optimizer's weight-decay mask): a rule is a regular expression matched with
`re.search` against paths such as 'layer_0/attention/query/kernel'. A rule that matches no
parameter is an error naming the rule and some existing paths, because a typo in a rule
would otherwise silently compress (or decay) nothing.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax


class RuleError(ValueError):
  """A rule is not a valid regex, or matches no parameter; the message names it."""


def path_string(path: Sequence[Any]) -> str:
  """'a/b/kernel' for a jax tree path of DictKey/SequenceKey/GetAttrKey entries."""
  parts = []
  for entry in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return '/'.join(parts)


def param_paths(params) -> list[str]:
  """Every leaf's path, in tree order."""
  return [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _compile(rules: Sequence[str], what: str) -> list[re.Pattern]:
  if isinstance(rules, str):
    raise RuleError(f'{what}: rules must be a sequence of regexes, got the string {rules!r}')
  compiled = []
  for rule in rules:
    try:
      compiled.append(re.compile(rule))
    except re.error as e:
      raise RuleError(f'{what}: rule {rule!r} is not a valid regex ({e})') from None
  return compiled


def match(params, rules: Sequence[str], what: str = 'rules', exclude: Sequence[str] = ()):
  """A pytree of bools like `params`: True where a path matches some rule of `rules` and no
  rule of `exclude`. Every rule of `rules` must match at least one path."""
  compiled = _compile(rules, what)
  excluded = _compile(exclude, f'{what} (exclude)')
  paths = param_paths(params)
  for rule, pattern in zip(rules, compiled):
    if not any(pattern.search(p) for p in paths):
      sample = ', '.join(paths[:6]) + (', ...' if len(paths) > 6 else '')
      raise RuleError(f'{what}: rule {rule!r} matches no parameter; paths look like: {sample}')

  def selected(path, _):
    name = path_string(path)
    return any(p.search(name) for p in compiled) and not any(p.search(name) for p in excluded)

  return jax.tree_util.tree_map_with_path(selected, params)


def selected_paths(params, rules: Sequence[str], what: str = 'rules', exclude=()) -> list[str]:
  """The paths `match` selects, in tree order (for reports and error messages)."""
  flags = jax.tree_util.tree_leaves(match(params, rules, what, exclude))
  return [p for p, f in zip(param_paths(params), flags) if f]
