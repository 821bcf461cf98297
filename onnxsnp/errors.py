"""The one exception type the CLI turns into a one-line message and exit code 2."""


class SnpError(Exception):
    """Bad input or a model onnxsnp cannot prune safely. The message is shown to the user as is."""
