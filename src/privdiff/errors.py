"""Errors that the CLI turns into one-line messages and a non-zero exit."""


class PrivdiffError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(PrivdiffError):
    """An invalid run configuration or command-line option."""


class DataError(PrivdiffError):
    """A dataset that cannot be used as given (names the offending file)."""


class OutOfMemory(PrivdiffError):
    """The device ran out of memory; names the option that lowers it."""


class ModelError(PrivdiffError):
    """A checkpoint or adapter that cannot be loaded or does not match."""


class FailedOnMainProcess(ConfigError):
    """The main process of a torchrun launch refused the run and printed why; the others exit quietly."""


class ProcessGroupError(PrivdiffError):
    """Another process of a torchrun launch failed (or its connection broke) during a collective step."""
