"""The one exception type users see."""


class LrsdError(Exception):
    """A user-facing failure: bad input, bad option or an unusable model.

    The message is one line; the CLI prints it without a traceback and exits 1
    (usage errors: 2).
    """


def runtime_message(exc: BaseException) -> str:
    """An onnxruntime exception's message on one line, without the status prefix, the model
    path and the C++ source location it carries."""
    import re

    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .*? failed:\s*", "", text)
    text = re.sub(r"^/\S+:\d+ [^(]*\([^)]*\)\s*", "", text)
    return text or type(exc).__name__
