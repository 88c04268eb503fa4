"""The fully connected image classifiers of Hinton et al. (2015), for MNIST."""

from typing import Sequence

import flax.linen as nn

from kdjax.compress import lowrank


class MLPClassifier(nn.Module):
  """flattened image -> dropout -> [Dense relu -> dropout] × len(hidden_sizes) -> logits.

  `out` holds the input ('hidden_0') and every hidden layer's activations ('hidden_i'), and
  'pooled' (the last hidden layer), like the text models, so feature terms can read them.
  Dropout on the input and on hidden units is the regularisation of Hinton et al.'s teacher
  (Srivastava et al. 2014 use 0.2 and 0.5).
  """

  hidden_sizes: Sequence[int]
  num_classes: int = 10
  input_dropout: float = 0.0
  hidden_dropout: float = 0.0
  # ((layer path, rank), ...): these Dense layers ('dense_{i}', 'classifier') built as
  # LowRankDense.
  low_rank: lowrank.LowRank = ()

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    x = images.reshape(images.shape[0], -1)
    out = {'hidden_0': x}
    x = nn.Dropout(self.input_dropout)(x, deterministic=deterministic)
    for i, width in enumerate(self.hidden_sizes):
      x = nn.relu(lowrank.dense(width, f'dense_{i}', self.low_rank)(x))
      out[f'hidden_{i + 1}'] = x
      x = nn.Dropout(self.hidden_dropout)(x, deterministic=deterministic)
    out['pooled'] = out[f'hidden_{len(self.hidden_sizes)}']
    return lowrank.dense(self.num_classes, 'classifier', self.low_rank)(x), out
