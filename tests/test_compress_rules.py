"""The shared parameter-rule engine: regex selection over paths, and its errors."""

import jax.numpy as jnp
import pytest

from kdjax.compress import rules

PARAMS = {
  'layer_0': {
    'attention': {'query': {'kernel': jnp.ones((4, 4)), 'bias': jnp.ones(4)}},
    'ffn': {'kernel': jnp.ones((4, 8))},
  },
  'classifier': {'kernel': jnp.ones((4, 2)), 'bias': jnp.ones(2)},
  'blocks': [jnp.ones(3), {'w': jnp.ones((2, 2))}],
}


def test_paths_are_slash_joined_in_tree_order():
  assert rules.param_paths(PARAMS) == [
    'blocks/0',
    'blocks/1/w',
    'classifier/bias',
    'classifier/kernel',
    'layer_0/attention/query/bias',
    'layer_0/attention/query/kernel',
    'layer_0/ffn/kernel',
  ]


def test_match_selects_with_search_and_exclude():
  got = rules.selected_paths(PARAMS, [r'kernel$'], exclude=[r'^classifier/'])
  assert got == ['layer_0/attention/query/kernel', 'layer_0/ffn/kernel']
  flags = rules.match(PARAMS, [r'/w$', r'query/bias'])
  assert flags['blocks'][1]['w'] and flags['layer_0']['attention']['query']['bias']
  assert not flags['classifier']['kernel']


def test_a_rule_matching_nothing_is_an_error_naming_it():
  with pytest.raises(rules.RuleError, match=r"prune: rule 'kernal\$' matches no parameter"):
    rules.match(PARAMS, [r'kernel$', r'kernal$'], what='prune')


def test_bad_regex_and_bare_string_are_errors():
  with pytest.raises(rules.RuleError, match=r"rule '\(' is not a valid regex"):
    rules.match(PARAMS, ['('])
  with pytest.raises(rules.RuleError, match='must be a sequence of regexes'):
    rules.match(PARAMS, 'kernel')
