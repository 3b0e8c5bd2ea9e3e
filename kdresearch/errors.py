"""The one exception type users see as a clean one-line message instead of a traceback."""


class KDResearchError(Exception):
    """A problem the user can fix (bad config, missing data, wrong checkpoint, divergence).

    `train.py` prints its message on one line and exits non-zero; anything else is a bug and
    keeps its traceback.
    """
