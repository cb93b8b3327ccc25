"""Error types carrying the exit code the CLI reports (see README, "Exit codes"). A store
failure is a StoreError; its subclasses tell "not found" from "permanent" from "try again"."""

EXIT_OK = 0
EXIT_ERROR = 1          # generic failure
EXIT_USAGE = 2          # bad option or argument (typer uses 2 too)
EXIT_STORE = 3          # store missing, unreadable, corrupt or unwritable
EXIT_WORKSPACE = 4      # cargo workspace / target dir problem
EXIT_FORMAT = 5         # manifest from a newer rsnap or malformed
EXIT_LOCKED = 6         # another rsnap or cargo holds the lock
EXIT_NOSPACE = 7        # disk full


class RsnapError(Exception):
    """An expected failure: the CLI prints `rsnap: <message>` and exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


class StoreError(RsnapError):
    opendal_kind = ""   # the OpenDAL error class behind it, if any (e.g. "AlreadyExists")

    def __init__(self, message: str):
        super().__init__(message, EXIT_STORE)


class FormatError(RsnapError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_FORMAT)


class NotFoundError(StoreError):
    """The object (or the store itself) does not exist."""


class PermanentStoreError(StoreError):
    """Retrying will not help: access denied, no such bucket, invalid configuration."""


class TransientStoreError(StoreError):
    """Worth another try later: throttled, unreachable, timed out, a server error."""


class NewerFormatError(FormatError):
    """A manifest written by a newer rsnap: not damage, the reader must be upgraded."""
