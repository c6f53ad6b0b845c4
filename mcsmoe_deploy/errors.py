"""The one exception type for expected user mistakes.

The CLI prints a UserError as a single line on stderr and exits non-zero;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An expected mistake in the input: a missing file, an unsupported model, a bad option."""
