"""Exceptions that cross module boundaries, and the exit status each maps to."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An exception as a summary's reason: its class and the first line of its message
    (the message alone for one that says all, such as "cannot resolve HOST")."""
    text = str(exc)
    if getattr(exc, "reason_is_message", False) and text:
        return text.splitlines()[0]
    return f"{exc.__class__.__name__}: {text.splitlines()[0] if text else ''}"


class HarvestError(Exception):
    """A failure the CLI reports in one line instead of a traceback."""

    exit_status = 1

    def lines(self) -> list[str]:
        """What the CLI prints, a ``harvest: error:`` line each."""
        return [str(self)]


class UsageError(HarvestError):
    """Bad input from the user: a recipe, an argument, a secret, a file."""

    exit_status = 2


class DiskFull(HarvestError):
    """No space left where the run writes: nothing more can be stored, so the run stops
    (what it committed stays; the next run resumes from there)."""

    def __init__(self, where):
        self.where = where
        super().__init__(f"no space left on the device of {where}; free some space and run "
                         f"again to resume")


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full."""
    import errno
    import sqlite3

    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.Error) and "full" in str(exc).lower()


class RecipeError(UsageError):
    """A recipe problem, located by file, key path and (when YAML knows it) line."""

    def __init__(self, file, key_path: str, message: str, line: int | None = None):
        self.file = str(file)
        self.key_path = key_path
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.key_path:
            where = f"{where}: {self.key_path}"
        return f"{where}: {self.message}"


class RecipeErrors(RecipeError):
    """Every error found in one recipe (at most ``shown`` of them said), so that a recipe
    is fixed in one round, not one error per try. Its fields are the first error's."""

    shown = 20

    def __init__(self, errors: list[RecipeError]):
        self.errors = errors
        first = errors[0]
        super().__init__(first.file, first.key_path, first.message, first.line)

    def lines(self) -> list[str]:
        said = [str(error) for error in self.errors[:self.shown]]
        if len(self.errors) > self.shown:
            said.append(f"{self.file}: and {len(self.errors) - self.shown} more errors")
        return said

    def __str__(self) -> str:
        return "\n".join(self.lines()) if hasattr(self, "errors") else super().__str__()


class PluginConfigError(UsageError):
    """A plugin found at start-up that its configuration cannot work (e.g. an API key refused)."""


class RecordError(Exception):
    """One record failed; the run goes on.

    ``permanent`` failures (404, not an image, too large) are not retried on the next run;
    transient ones (timeouts, 5xx after retries) are.
    """

    def __init__(self, reason: str, *, permanent: bool = True, dropped: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        # Not a failure: the recipe does not want this image (too small, say); counted
        # with the drops, and never fetched again.
        self.dropped = dropped
