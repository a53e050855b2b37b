"""User-facing errors.

Every mistake a user can make (a bad option, a missing file, a cache from another
version) raises a subclass of `AlignKDError` whose message is one sentence naming the
file, sample or option. The CLI prints that sentence and exits non-zero without a
traceback; anything else is a bug and keeps its traceback.
"""


class AlignKDError(Exception):
    """A user error: the message is shown as is, with no traceback."""


class ConfigError(AlignKDError):
    """An option or combination of options is invalid."""


class NotBuiltError(AlignKDError):
    """A command that exists in the interface but is not implemented yet."""
