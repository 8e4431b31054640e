"""Errors a user can fix. The CLI prints them as one line (no traceback wall) and exits non-zero."""


class UserError(Exception):
    """Base class: the message alone must tell the user what to fix (file, key, line or module name).

    ``key``: the config key of the setting at fault, for a refusal raised once the run has begun (an optimizer group,
    a feedback point matching nothing), where the raiser knows the setting but not the file that set it: the CLI
    then names the recipe, or the command line, before the message."""

    def __init__(self, *args: object, key: str | None = None) -> None:
        super().__init__(*args)
        self.key = key


class ConfigError(UserError, ValueError):
    """A recipe or callback setting is wrong (unknown key, feedback pattern matching nothing, bad shape)."""


class DatasetError(UserError, FileNotFoundError):
    """A dataset is missing, incomplete, fails its checksum, or has malformed rows."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite; training stops before anything is saved from that step."""
