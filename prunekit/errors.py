"""Errors that carry the process exit code, so the CLI maps them without guessing."""


class PrunekitError(Exception):
    """Unexpected failure inside prunekit (exit 1)."""

    exit_code = 1


class UserInputError(PrunekitError):
    """Bad input from the user: the message says what to do instead (exit 2)."""

    exit_code = 2


class QualityGateFailed(PrunekitError):
    """The pruned model missed a quality threshold; artifacts are still written (exit 3)."""

    exit_code = 3


class MissingExtraError(UserInputError):
    """An optional dependency is not installed; name the extra that brings it."""

    def __init__(self, module: str, extra: str):
        super().__init__(f"{module} is not installed: run `pip install 'prunekit[{extra}]'`")
