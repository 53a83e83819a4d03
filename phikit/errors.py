"""The one exception type phikit raises for mistakes a user can make or fix."""


class PhikitError(Exception):
    """A problem the user can act on: the message names the file, the field and the fix.

    The CLI prints it as one line (``phikit: error: ...``) instead of a traceback.
    """
