"""The one exception type users see: a one-line message that names the fix."""


class LLMPruneError(Exception):
    """Bad input or an unmet requirement. The CLI prints it on one line and exits 2."""
