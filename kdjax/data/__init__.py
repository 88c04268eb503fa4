"""SST-2 data layer: tfds builder over local GLUE TSVs, word vocab, numpy batching."""

from kdjax.data.errors import DataError
from kdjax.data.pipeline import BatchIterator, encode, load_split
from kdjax.data.vocab import WordVocab

__all__ = ['BatchIterator', 'DataError', 'WordVocab', 'encode', 'load_split']
