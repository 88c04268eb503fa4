"""Errors raised by the data layer."""


class DataError(ValueError):
  """A data file or prepared dataset is missing or malformed.

  Messages are one line and name the file (and line, where there is one) and
  what would have been valid, so a broken input can be fixed without a debugger.
  """
