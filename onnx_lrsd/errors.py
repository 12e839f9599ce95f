"""The one exception type users see."""


class LrsdError(Exception):
    """A user-facing failure: bad input, bad option or an unusable model.

    The message is one line; the CLI prints it without a traceback and exits with
    `exit_code` (1; usage errors: 2).
    """

    exit_code = 1


class UsageError(LrsdError):
    """An option or argument out of its documented range (exit 2, as click's usage errors)."""

    exit_code = 2


class NothingToCompress(LrsdError):
    """No layer was factorized: the output would be a copy of the input (exit 3)."""

    exit_code = 3


class OutputErrorTooLarge(LrsdError):
    """The verified output error is above `CompressConfig.max_output_error`; the model is not
    written (exit 4)."""

    exit_code = 4


def runtime_message(exc: BaseException) -> str:
    """An onnxruntime exception's message on one line, without the status prefix, the model
    path and the C++ source location it carries."""
    import re

    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .*? failed:\s*", "", text)
    text = re.sub(r"^/\S+:\d+ [^(]*\([^)]*\)\s*", "", text)
    return text or type(exc).__name__
