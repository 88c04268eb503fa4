"""kdjax: knowledge distillation and model compression for NLP in JAX/Flax."""

__version__ = '0.1.0'
