"""Domain errors. The library raises these; only the CLI turns them into a message and exit code 2."""

from __future__ import annotations


class HemError(Exception):
    """Base class of every error a user can cause with bad input or a bad config."""


class ConfigError(HemError):
    """A config file or override is invalid (unknown key, wrong type, out of range)."""


class DataError(HemError):
    """Imagery or labels are missing, unreadable or inconsistent."""


class ModelError(HemError):
    """A detector cannot be built, or weights do not fit it."""


class TrainingError(HemError):
    """Training cannot start or had to stop (no positives, non-finite loss)."""


class RunError(HemError):
    """A run directory is locked, inconsistent with its config, or cannot be resumed."""
