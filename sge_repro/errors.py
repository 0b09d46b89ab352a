"""The one exception type for errors a user can cause.

The CLI prints its message as one line and exits with status 2; a traceback only with --debug.
The message names the file / key / id at fault and what was expected.
"""

from typing import Sequence


class UserError(Exception):
    """Bad input from the user: params, data layout, corrupt file, incompatible checkpoint."""

    exit_code = 2

    def __init__(self, *args):
        # torch's DataLoader re-raises a loader worker's exception in the main process as
        # type(error)("Caught <type> in DataLoader worker process N.\nOriginal Traceback ...\n
        # <module>.<type>: <message>\n"): keep the one-line message, the traceback says nothing
        # the message does not.
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") \
                and " in DataLoader worker process " in args[0].partition("\n")[0]:
            marker = f"\n{type(self).__module__}.{type(self).__qualname__}: "
            _, found, message = args[0].rstrip("\n").rpartition(marker)
            if found:
                args = (message,)
        super().__init__(*args)


def preview(names: Sequence[str], limit: int = 5) -> str:
    """The first `limit` names and how many more, for a one-line message: "a, b and 3 more"."""
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def not_utf8(name: object, error: UnicodeDecodeError, expected: str) -> UserError:
    """The one-line error for a file that does not decode as UTF-8, naming the first bad byte."""
    return UserError(f"{name}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
                     f"expected {expected}")
