"""The errors a command answers with one line and exit code 2 (cli.main).

Kept free of torch and diffusers: the command line catches these before it has imported
anything heavy, so that a refusal answers in well under a second. The modules that raise them
re-export them under their old names (data.base.DataError, io.CheckpointError, ...).
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad user data: an empty folder, missing files, mixed sizes, a bad bias level."""


class CheckpointError(RuntimeError):
    """A missing, corrupt or mismatched checkpoint, model or run folder."""


class UnknownPromptError(KeyError):
    """A prompt the model was not trained on (embedded bases know a fixed prompt set)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class AttentionBackendError(RuntimeError):
    """An attention backend that is not installed or cannot run the model."""


class OutputError(FileExistsError):
    """An output folder invdiff may not write to or replace (not its own, locked, or unsafe)."""


class OfflineError(FileNotFoundError):
    """Something would have to be downloaded, and the user has not allowed downloads."""


# What cli.main turns into one line and exit code 2.
USER_ERRORS = (DataError, CheckpointError, UnknownPromptError, AttentionBackendError, FileExistsError,
               FileNotFoundError, PermissionError, ValueError)
