"""Errors that mean "bad input", not "bug": the command line prints them as one clear line."""


class MinidbError(Exception):
    """Base for every error minidb raises on purpose about the user's input."""


class CheckpointError(MinidbError, ValueError):
    """A model file (or a LoRA file) is missing, unreadable, of another model family, or does not fit the config."""


class StateError(CheckpointError):
    """A training state (<run>/checkpoints/step_N.pt) is missing, unreadable or does not fit the run.
    A CheckpointError too, so `except CheckpointError` still catches every file minidb could not use."""


class ConfigError(MinidbError, ValueError):
    """A config file or option is wrong."""


class DataError(MinidbError, ValueError):
    """Training images or prompts are unusable."""


class DiskFull(MinidbError, OSError):
    """The disk (or quota) filled up while minidb wrote a file; the message names the file and what was kept."""


class RunFolderBusy(MinidbError):
    """Another process is writing into the run folder (it holds the folder's lock)."""
