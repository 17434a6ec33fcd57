"""The one exception type that user-facing code raises for bad input.

Every `SparrowError` carries a single line that names the problem and the fix; the CLI prints it and exits with
code 2 instead of showing a traceback.
"""


class SparrowError(ValueError):
    """Bad input or an unusable setting, described in one line (problem and fix)."""
