"""The one exception type for errors a user can cause.

The CLI prints its message as one line and exits with status 2; a traceback only with --debug.
The message names the file / key / id at fault and what was expected.
"""

from typing import Sequence


class UserError(Exception):
    """Bad input from the user: params, data layout, corrupt file, incompatible checkpoint."""

    exit_code = 2


def preview(names: Sequence[str], limit: int = 5) -> str:
    """The first `limit` names and how many more, for a one-line message: "a, b and 3 more"."""
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
