"""The one exception type that user-facing code raises for bad input.

Every `SparrowError` carries a single line that names the problem and the fix; the CLI prints it and exits with
code 2 instead of showing a traceback.
"""


class SparrowError(ValueError):
    """Bad input or an unusable setting, described in one line (problem and fix)."""


def positive_list(flag: str, text: str, example: str, empty_ok: bool = False) -> list[int]:
    """A command-line list of positive whole numbers, "500,1500,8000" -> [500, 1500, 8000].

    Raises SparrowError naming `flag` and showing `example` if an item is not a whole number or is below 1, or if the
    list is empty and `empty_ok` is False ('' is then the way to ask for none)."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = [0]
    if any(x < 1 for x in out) or not (out or empty_ok):
        raise SparrowError(f"{flag} {text!r}: give positive whole numbers separated by commas, like {example}")
    return out


def at_least(minimum: int, *pairs: tuple[str, int | None]) -> None:
    """Check (flag, value) pairs from a command line: a value below `minimum` raises SparrowError ("--steps 0: give 1
    or more"); None (a flag left unset) passes."""
    for flag, value in pairs:
        if value is not None and value < minimum:
            raise SparrowError(f"{flag} {value}: give {minimum} or more")
