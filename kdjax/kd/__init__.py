"""The distillation method library: pure loss functions over `(logits, out)` model outputs.

  output.py     logit-level terms (KL both ways, JSD, soft CE, logit MSE, DKD, label smoothing)
  features.py   hidden-state, embedding, [CLS] and attention-map terms, and layer maps
  relations.py  MiniLM / MiniLMv2 self-attention relation terms
  crd.py        contrastive representation distillation (in-batch or memory-bank negatives)
  heads.py      the learned projections some terms need (trained with the student)
  schedules.py  per-step schedules for the temperature and every term's weight
  objective.py  the config-driven sum of terms used by the distillation train steps
  ensemble.py   several teachers as one soft target; deep mutual learning among students
Every term returns a (sum, count) pair (see kdjax.losses) so metrics average exactly.
"""
