"""Errors a user can fix. The CLI prints them as one line and exits with `exit_code`."""


class PipelineError(Exception):
    """Bad input: config, data, or command-line usage. Exit code 2."""

    exit_code = 2


class ConfigError(PipelineError):
    """params.yaml is not valid; the message names the key."""


class DataError(PipelineError):
    """A data file or archive is unusable; the message names the file."""


class PromotionRefused(PipelineError):
    """A model is worse than the current champion. Exit code 1: a verdict, not a usage error."""

    exit_code = 1


class TrainingDiverged(PipelineError):
    """The training loss became NaN or infinite. Exit code 1: the settings ran, and failed."""

    exit_code = 1
