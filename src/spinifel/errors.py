"""The exception hierarchy of spinifel-mpi.

Every error that a user can cause (bad config, bad dataset, unusable output directory)
is a :class:`SpinifelError`. The command-line entry point turns one into a single line
on stderr and exit code 2 (:data:`EXIT_USER_ERROR`); anything else is a bug or a crash
and ends the whole MPI job through the excepthook of the parallel layer.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class SpinifelError(Exception):
    """Base class of all errors caused by the user's input or environment."""

    exit_code = EXIT_USER_ERROR


class ConfigError(SpinifelError, ValueError):
    """Invalid configuration: unknown key, wrong type, value out of range, unset variable."""


class DatasetError(SpinifelError, ValueError):
    """Invalid input dataset: missing file or dataset, wrong shape/dtype, bad values.

    The message names the file, the dataset and what was expected versus found.
    """

    def __init__(self, path: object, dataset: str | None, message: str):
        where = f"{path}" if dataset is None else f"{path}:{dataset}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.dataset = dataset


class OutputError(SpinifelError, OSError):
    """The output directory cannot be used (not writable, holds a previous result...)."""


class CheckpointError(SpinifelError, ValueError):
    """A checkpoint cannot be used to resume this run."""
