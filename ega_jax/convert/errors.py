"""The one error type of the converter: its message is the whole report shown to the user.

Its own module so that every other convert module (and each family) can raise it without import
cycles.
"""


class ConversionError(ValueError):
  """A checkpoint or a request that cannot be converted; the message is the whole report."""
