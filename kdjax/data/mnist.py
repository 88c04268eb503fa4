"""MNIST from the original IDX files, and resumable, optionally jittered image batches.

The four gzipped IDX files ship with kdjax (kdjax/data/raw/mnist, see its SOURCE.md); any
folder holding the same four files (gzipped or not) can be used instead.
"""

import gzip
import pathlib

import numpy as np

from kdjax.data.errors import DataError

SHIPPED_DIR = pathlib.Path(__file__).parent / 'raw' / 'mnist'
FILES = {
  'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
  'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
NUM_CLASSES = 10
# Train-set pixel mean and std on a 0-1 scale (kdjax/data/raw/mnist/SOURCE.md in the shared
# data); inputs are standardised with them so the MLPs start in a well-scaled regime.
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path:
  for name in (stem + '.gz', stem):
    if (directory / name).is_file():
      return directory / name
  raise DataError(f'MNIST file {stem}[.gz] not found in {directory}; expected the 4 IDX files')


def read_idx(path: str | pathlib.Path, magic: int) -> np.ndarray:
  """uint8 array of an IDX file (idx3 images [N, rows, cols] or idx1 labels [N])."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == '.gz' else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f'{path}: unreadable ({type(e).__name__}: {e})') from None
  ndim = 3 if magic == IMAGE_MAGIC else 1
  header = 4 + 4 * ndim
  if len(raw) < header or int.from_bytes(raw[:4], 'big') != magic:
    found = int.from_bytes(raw[:4], 'big') if len(raw) >= 4 else None
    raise DataError(f'{path}: IDX magic number {found}, expected {magic}')
  dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim)]
  expected = header + int(np.prod(dims))
  if len(raw) != expected:
    raise DataError(
      f'{path}: {len(raw)} bytes, expected {expected} for shape {tuple(dims)} (truncated?)'
    )
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_split(split: str, directory: str = '') -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels int32 [N]) of 'train' or 'test'."""
  if split not in FILES:
    raise DataError(f'MNIST split {split!r} does not exist; valid: {", ".join(FILES)}')
  folder = pathlib.Path(directory).expanduser() if directory else SHIPPED_DIR
  image_stem, label_stem = FILES[split]
  images = read_idx(_find(folder, image_stem), IMAGE_MAGIC)
  labels = read_idx(_find(folder, label_stem), LABEL_MAGIC).astype(np.int32)
  if len(images) != len(labels):
    raise DataError(f'{folder}: {split} has {len(images)} images but {len(labels)} labels')
  if labels.max(initial=0) >= NUM_CLASSES:
    raise DataError(f'{folder}: {split} labels reach {labels.max()}, expected 0..9')
  return images, labels


def standardize(images: np.ndarray) -> np.ndarray:
  """uint8 [N, 28, 28] -> float32 [N, 784], zero mean and unit variance on the train set."""
  x = images.reshape(len(images), -1).astype(np.float32) / 255.0
  return (x - PIXEL_MEAN) / PIXEL_STD


def jitter(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
  """Each image translated by an independent (dy, dx) in [-max_shift, max_shift]², the
  uncovered border filled with background (0), as in Hinton et al.'s 'jittered by up to
  two pixels in any direction'."""
  if max_shift == 0:
    return images
  n, h, w = images.shape
  padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
  shifts = rng.integers(0, 2 * max_shift + 1, size=(n, 2))
  rows = shifts[:, 0, None] + np.arange(h)[None, :]  # [N, H]
  cols = shifts[:, 1, None] + np.arange(w)[None, :]  # [N, W]
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


class ImageBatches:
  """Endless shuffled batches of {'image', 'labels', 'weights'[, extra rows]}, resumable.

  The position is (epoch, index within the epoch); the permutation and the jitter of a batch
  are drawn from (seed, epoch, index), so a resumed run sees exactly the batches an
  uninterrupted one would. `row_data` adds per-example arrays (e.g. cached teacher logits).
  """

  def __init__(
    self,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    max_shift: int = 0,
    row_data: dict | None = None,
  ):
    if batch_size > len(images):
      raise DataError(f'batch size {batch_size} exceeds the {len(images)} training images')
    self.images, self.labels = images, labels
    self.batch_size, self.seed, self.max_shift = batch_size, seed, max_shift
    self.row_data = row_data or {}
    self.epoch, self.index = 0, 0
    self._perm = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

  def get_state(self) -> dict:
    return {'epoch': self.epoch, 'index': self.index}

  def set_state(self, state: dict) -> None:
    self.epoch, self.index = int(state['epoch']), int(state['index'])
    self._perm = self._permutation(self.epoch)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    # Incomplete tail batches are dropped: every step sees batch_size real examples.
    if self.index + self.batch_size > len(self.images):
      self.epoch, self.index = self.epoch + 1, 0
      self._perm = self._permutation(self.epoch)
    rows = self._perm[self.index : self.index + self.batch_size]
    rng = np.random.default_rng([self.seed, self.epoch, self.index, 1])
    self.index += self.batch_size
    batch = {
      'image': standardize(jitter(self.images[rows], self.max_shift, rng)),
      'labels': self.labels[rows],
      'weights': np.ones(len(rows), np.float32),
    }
    batch.update({k: v[rows] for k, v in self.row_data.items()})
    return batch


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int):
  """One ordered pass with the last batch padded to full size (weight 0), so one compile."""
  for start in range(0, len(images), batch_size):
    x, y = images[start : start + batch_size], labels[start : start + batch_size]
    pad = batch_size - len(x)
    yield {
      'image': standardize(np.pad(x, ((0, pad), (0, 0), (0, 0)))),
      'labels': np.pad(y, (0, pad)),
      'weights': np.pad(np.ones(len(x), np.float32), (0, pad)),
    }
