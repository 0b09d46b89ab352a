"""The one exception type for errors a user can cause.

The CLI prints its message as one line and exits with status 2; a traceback only with --debug.
The message names the file / key / id at fault and what was expected.
"""


class UserError(Exception):
    """Bad input from the user: params, data layout, corrupt file, incompatible checkpoint."""

    exit_code = 2
