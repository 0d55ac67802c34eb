"""The add-on's one user-facing error type (pure Python)."""


class ReconLoopError(Exception):
    """An error to show the user as it is: plain language, what went wrong and what to do.

    Operators turn it into ``self.report({'ERROR'}, str(err))`` (and a popup); nothing else catches it.
    """
