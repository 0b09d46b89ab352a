from sge_repro.errors import UserError


class LaunchError(UserError):
    """A launched stage's worker failed (one line: which rank / job, its own error)."""
