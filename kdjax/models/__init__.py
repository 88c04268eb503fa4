"""Teacher and student text classifiers; each returns (logits, out) — see registry."""

from kdjax.models.registry import MODELS, build_model, count_params, init_params, param_bytes

__all__ = ['MODELS', 'build_model', 'count_params', 'init_params', 'param_bytes']
