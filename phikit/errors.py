"""The exception phikit raises for mistakes a user can make or fix, and its one special case."""


class PhikitError(Exception):
    """A problem the user can act on: the message names the file, the field and the fix.

    The CLI prints it as one line (``phikit: error: ...``) instead of a traceback.
    """


class ConversationRefused(PhikitError, ValueError):
    """A chat template refused a conversation (its ``raise_exception``, or its sandbox): one line in the CLI,
    and, being a ValueError too, a 400 on HTTP as any other bad request body."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a container's or a batch system's stop), raised by the command line where
    a Ctrl-C would be, so every command cleans up after it as after a Ctrl-C (temporaries removed, a run's
    dashboard and trackers told); unlike a Ctrl-C it is never taken as "stop this reply" (``phikit chat``)."""


def first_line(e: BaseException) -> str:
    """What a library's exception says, for a one-line message: its first line (200 characters at most), or
    its type's name where it says nothing."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
