"""PyTorch twins of the kdjax models, losses and train steps that benchmarks/distill_step.py
times against kdjax. Same architectures, shapes and parameter counts; weight init differs.

Only imported when the PyTorch side is requested: torch is not a kdjax dependency.
"""

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import rnn as rnn_utils

MASK_BIAS = -1e9  # kdjax.models.bert.MASK_BIAS


class BertEmbeddings(nn.Module):
  def __init__(self, vocab_size, hidden_size, max_len, type_vocab_size, dropout, eps, emb_size):
    super().__init__()
    factorised = emb_size and emb_size != hidden_size
    self.word_embeddings = nn.Embedding(vocab_size, emb_size if factorised else hidden_size)
    # ALBERT-style factorisation, as kdjax's `word_projection` (no bias).
    self.word_projection = nn.Linear(emb_size, hidden_size, bias=False) if factorised else None
    self.position_embeddings = nn.Embedding(max_len, hidden_size)
    self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
    self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)
    self.dropout = nn.Dropout(dropout)

  def forward(self, input_ids):
    words = self.word_embeddings(input_ids)
    if self.word_projection is not None:
      words = self.word_projection(words)
    positions = self.position_embeddings.weight[: input_ids.shape[1]][None]
    types = self.token_type_embeddings.weight[0]  # kdjax feeds all-zero token types
    return self.dropout(self.layer_norm(words + positions + types))


class BertLayer(nn.Module):
  def __init__(self, hidden_size, num_heads, intermediate_size, dropout, attn_dropout, eps):
    super().__init__()
    self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
    self.query = nn.Linear(hidden_size, hidden_size)
    self.key = nn.Linear(hidden_size, hidden_size)
    self.value = nn.Linear(hidden_size, hidden_size)
    self.attention_output = nn.Linear(hidden_size, hidden_size)
    self.attention_layer_norm = nn.LayerNorm(hidden_size, eps=eps)
    self.intermediate = nn.Linear(hidden_size, intermediate_size)
    self.output = nn.Linear(intermediate_size, hidden_size)
    self.output_layer_norm = nn.LayerNorm(hidden_size, eps=eps)
    self.dropout = nn.Dropout(dropout)
    self.attn_dropout = attn_dropout

  def forward(self, x, bias):
    batch, seq_len, width = x.shape
    split = lambda t: t.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    # SDPA is what idiomatic PyTorch (and HF's default 'sdpa' attention) runs.
    context = F.scaled_dot_product_attention(
      q, k, v, attn_mask=bias, dropout_p=self.attn_dropout if self.training else 0.0
    )
    context = context.transpose(1, 2).reshape(batch, seq_len, width)
    x = self.attention_layer_norm(x + self.dropout(self.attention_output(context)))
    h = self.output(F.gelu(self.intermediate(x)))  # exact erf GELU, as kdjax / HF
    return self.output_layer_norm(x + self.dropout(h))


class BertClassifier(nn.Module):
  """kdjax.models.bert.BertClassifier: post-LN BERT, tanh pooler on [CLS], linear head."""

  def __init__(
    self,
    vocab_size,
    num_classes,
    hidden_size,
    num_layers,
    num_heads,
    intermediate_size,
    max_len=512,
    type_vocab_size=2,
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
    layer_norm_eps=1e-12,
    embedding_size=0,
    head_dim=0,
  ):
    super().__init__()
    if head_dim and head_dim * num_heads != hidden_size:
      raise ValueError('torch_reference.BertClassifier: pruned heads are not mirrored')
    self.embeddings = BertEmbeddings(
      vocab_size,
      hidden_size,
      max_len,
      type_vocab_size,
      dropout_rate,
      layer_norm_eps,
      embedding_size,
    )
    self.layers = nn.ModuleList(
      BertLayer(
        hidden_size,
        num_heads,
        intermediate_size,
        dropout_rate,
        attention_dropout_rate,
        layer_norm_eps,
      )
      for _ in range(num_layers)
    )
    self.pooler = nn.Linear(hidden_size, hidden_size)
    self.dropout = nn.Dropout(dropout_rate)
    self.classifier = nn.Linear(hidden_size, num_classes)

  def forward(self, input_ids, attention_mask):
    bias = torch.where(attention_mask[:, None, None, :] > 0, 0.0, MASK_BIAS)
    x = self.embeddings(input_ids)
    for layer in self.layers:
      x = layer(x, bias)
    pooled = torch.tanh(self.pooler(x[:, 0]))
    return self.classifier(self.dropout(pooled))


class BiLSTMClassifier(nn.Module):
  """kdjax.models.bilstm.BiLSTMClassifier: embedding -> BiLSTM -> masked max-pool -> MLP.

  Flax's LSTM cell has one bias per gate, torch's two (b_ih and b_hh); b_hh is held at zero and
  frozen so the trained parameters match kdjax's one to one. Rows of different lengths are
  packed, so (as in kdjax) the backward direction starts at each row's last real token.
  """

  def __init__(
    self,
    vocab_size,
    num_classes,
    embed_dim,
    hidden_size,
    mlp_dim,
    num_layers=1,
    dropout_rate=0.1,
  ):
    super().__init__()
    self.embedding = nn.Embedding(vocab_size, embed_dim)
    self.lstm = nn.LSTM(
      embed_dim, hidden_size, num_layers=num_layers, batch_first=True, bidirectional=True
    )
    for name, param in self.lstm.named_parameters():
      if name.startswith('bias_hh'):
        param.data.zero_()
        param.requires_grad_(False)
    self.dropout = nn.Dropout(dropout_rate)
    self.mlp = nn.Linear(2 * hidden_size, mlp_dim)
    self.classifier = nn.Linear(mlp_dim, num_classes)

  def forward(self, input_ids, attention_mask):
    seq_len = input_ids.shape[1]
    lengths = attention_mask.sum(-1).cpu()
    x = self.embedding(input_ids)
    packed = rnn_utils.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    x, _ = self.lstm(packed)
    x, _ = rnn_utils.pad_packed_sequence(x, batch_first=True, total_length=seq_len)
    keep = (attention_mask > 0)[:, :, None]
    pooled = x.masked_fill(~keep, -math.inf).amax(dim=1)
    pooled = torch.where(keep.any(dim=1), pooled, 0.0)
    h = F.relu(self.mlp(self.dropout(pooled)))
    return self.classifier(h)


class MLPClassifier(nn.Module):
  """kdjax.models.mlp.MLPClassifier: Hinton et al. (2015)'s fully connected nets."""

  def __init__(
    self, hidden_sizes, num_classes=10, input_dropout=0.0, hidden_dropout=0.0, inputs=784
  ):
    super().__init__()
    widths = (inputs, *hidden_sizes)
    self.input_dropout = nn.Dropout(input_dropout)
    self.dense = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
    self.hidden_dropout = nn.Dropout(hidden_dropout)
    self.classifier = nn.Linear(widths[-1], num_classes)

  def forward(self, images):
    x = self.input_dropout(images.reshape(images.shape[0], -1))
    for dense in self.dense:
      x = self.hidden_dropout(F.relu(dense(x)))
    return self.classifier(x)


MODELS = {'bert': BertClassifier, 'bilstm': BiLSTMClassifier, 'mlp': MLPClassifier}


def build_model(name: str, **kwargs) -> nn.Module:
  return MODELS[name](**kwargs)


def count_params(model: nn.Module) -> int:
  """Trained parameters (the frozen LSTM b_hh is not one)."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Losses: kdjax.losses.cross_entropy and kdjax.kd.output.forward_kl, as weighted means.


def cross_entropy(logits, labels, weights):
  nll = F.cross_entropy(logits.float(), labels, reduction='none')
  return (nll * weights).sum() / weights.sum().clamp(min=1.0)


def forward_kl(student_logits, teacher_logits, temperature, weights):
  """T² · KL(p_T ‖ q_T), p the teacher's tempered softmax, averaged with `weights`."""
  log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
  log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
  per_item = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2
  return (per_item * weights).sum() / weights.sum().clamp(min=1.0)


def distill_loss(student_logits, teacher_logits, labels, weights, temperature, w_ce, w_kl):
  return w_ce * cross_entropy(student_logits, labels, weights) + w_kl * forward_kl(
    student_logits, teacher_logits, temperature, weights
  )


def make_train_step(model, teacher, loss_cfg: dict, learning_rate: float, compile: bool):
  """A full step (forward, loss, backward, AdamW update) on a batch of tensors.

  `loss_cfg`: {'temperature', 'ce', 'kl'}; teacher=None trains `model` on CE alone. The frozen
  teacher runs in eval mode under no_grad (PyTorch's stop_gradient). AdamW uses optax.adamw's
  defaults (weight decay 1e-4, eps 1e-8), not torch's (weight decay 1e-2).
  """
  model.train()
  if teacher is not None:
    teacher.eval().requires_grad_(False)
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-4, eps=1e-8)

  def loss_fn(inputs, labels, weights):
    logits = model(*inputs)
    if teacher is None:
      return cross_entropy(logits, labels, weights)
    with torch.no_grad():
      teacher_logits = teacher(*inputs)
    return distill_loss(
      logits,
      teacher_logits,
      labels,
      weights,
      loss_cfg['temperature'],
      loss_cfg['ce'],
      loss_cfg['kl'],
    )

  compute = torch.compile(loss_fn) if compile else loss_fn

  def step(batch):
    optimizer.zero_grad(set_to_none=True)
    loss = compute(batch['inputs'], batch['labels'], batch['weights'])
    loss.backward()
    optimizer.step()
    return loss

  step.loss_fn = loss_fn
  step.optimizer = optimizer
  return step


def measured_bytes(step, batch, model) -> int:
  """Bytes a step holds at once, measured: parameters + gradients + AdamW's two moments (after
  one step) + the batch + every distinct tensor autograd saves for the backward pass (hooked
  with saved_tensors_hooks). Transient buffers inside a kernel or the backward are not seen.
  """
  step(batch)  # AdamW's moments exist after the first update
  params = [p for p in model.parameters() if p.requires_grad]
  state = sum(
    t.numel() * t.element_size()
    for s in step.optimizer.state.values()
    for t in s.values()
    if torch.is_tensor(t)
  )
  storages = {}

  def pack(t):
    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t

  with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = step.loss_fn(batch['inputs'], batch['labels'], batch['weights'])
  loss.backward()
  step.optimizer.zero_grad(set_to_none=True)
  param_bytes = sum(p.numel() * p.element_size() for p in params)
  batch_bytes = sum(
    t.numel() * t.element_size()
    for t in (*batch['inputs'], batch['labels'], batch['weights'])
    if torch.is_tensor(t)
  )
  return 2 * param_bytes + state + batch_bytes + sum(storages.values())


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """Best-of-`repeats` float32 FLOP/s of an n×n @ n×n torch.mm (the torch side's ceiling),
  with the caller's torch.set_num_threads."""
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.mm(a, b)
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best
