"""User-facing errors.

Every failure a user can cause (a bad file, a missing option, an unavailable backend) is raised as a
`JwthError` whose message is one line that names the file and the problem. The CLI prints exactly
that line to stderr and exits with `exit_code`; anything else escaping is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import re


class JwthError(Exception):
    """An error the user can act on; `str(err)` is one self-contained line.

    Messages speak the Python API's vocabulary (`batch_size must be >= 1`); `field` names the
    setting at fault, so that the CLI can say `--batch-size` instead (`cli_message`)."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None):
        # One line, always: native libraries like to end messages with newlines or embed them.
        super().__init__(" ".join(str(message).split()))
        self.field = field

    def cli_message(self, flag: str) -> str:
        """The message with the setting's name replaced by its command-line flag."""
        if not self.field:
            return str(self)
        return re.sub(rf"(?<![\w-]){re.escape(self.field)}\b", flag, str(self))


class SlideError(JwthError):
    """The slide file cannot be opened or read; the message starts with the path."""

    def __init__(self, path: str | os.PathLike, problem: str, *, field: str | None = None):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}", field=field)


class MppError(SlideError):
    """The slide's microns-per-pixel is missing or implausible; the fix is the `mpp` setting."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(path, problem, field="mpp")


class ModelError(JwthError):
    """Weights, presets or head files that do not fit together."""


class BackendUnavailable(JwthError):
    """A requested backend or device is not installed or not present; says what to install."""


class ConfigError(JwthError):
    """Options that contradict each other or an output folder that cannot be used."""


class FitError(JwthError):
    """Training a head cannot proceed: labels file, tile images or training settings."""


class OutputError(JwthError):
    """An output folder that cannot take what a run writes (disk full), or outputs on disk that do
    not fit together (an interrupted or foreign write); the message names the folder or file."""


class DiskFull(OutputError):
    """The output folder's file system is full; nothing half-written is left, and a rerun after
    space is freed resumes."""
