"""One exception type for every user-facing problem: its message is one line naming the problem and the fix."""


class EdgepackError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line and exits non-zero."""
