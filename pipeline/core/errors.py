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


class FieldError(ValueError):
    """A config value that is wrong only together with others, raised by a validator that checks
    several fields; ``key`` is the dotted path of the field at fault, relative to the model that
    raised it, so the error line names that key and not the whole section."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
