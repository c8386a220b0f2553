"""One exception type for every user-facing error: the CLI prints its message on one line
and exits non-zero, without a traceback."""


class CrateEdgeError(Exception):
    """A problem with the user's input or environment, stated in one line."""


class BackendUnavailable(CrateEdgeError):
    """A target's library, hardware or OS is not present on this machine."""
