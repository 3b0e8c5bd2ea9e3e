"""The one exception type users see as a clean one-line message instead of a traceback."""


class KDResearchError(Exception):
    """A problem the user can fix (bad config, missing data, wrong checkpoint, divergence).

    `train.py` prints its message on one line and exits non-zero; anything else is a bug and
    keeps its traceback.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of a library's multi-line message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
