"""Typed errors. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


class CurriculumError(Exception):
    """A failure with a message meant for the user. Exit code 1 at the CLI."""

    exit_code = 1


class ConfigError(CurriculumError):
    """A usage or config error: a bad key, value or path. Exit code 2, nothing written."""

    exit_code = 2


class StageError(CurriculumError):
    """A stage failed at run time; the message names the stage."""


class ModelLoadError(CurriculumError):
    """A model or tokenizer could not be loaded; the message names the model."""


class UnreadableInputError(CurriculumError):
    """An input file could not be read at all (a corrupt gzip, a broken parquet footer); names the file.

    Raised inside Ray read tasks, where Ray wraps it; ``find_cause`` digs it out again in the driver.
    """


def find_cause(exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
    """The innermost exception of type ``kind`` (a type or a tuple of types) in ``exc``'s chain (causes,
    contexts, Ray's wrapped ``cause``): Ray re-raises a task's error as a subclass whose message is
    the whole traceback."""
    seen: set[int] = set()
    queue: list[BaseException | None] = [exc]
    found = None
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            found = current
        queue.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
    return found


class FieldError(ValueError):
    """A config value that is wrong only together with others, raised by a validator that checks
    several fields; ``key`` is the dotted path of the field at fault, relative to the model that
    raised it, so the error line names that key and not the whole section."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
