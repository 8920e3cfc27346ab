"""Errors a user can act on. The CLI prints them without a traceback and exits non-zero."""


class NlaError(Exception):
    """Base class: the message says what is wrong and where."""


class ConfigError(NlaError):
    """A param or profile is missing, unknown, mistyped or out of range."""


class DataValidationError(NlaError):
    """A stage input or output breaks its schema; the message names file, column and rows."""


class SourceError(NlaError):
    """An external input (wheel, hub repo, local model, corpus file) is missing or wrong."""
