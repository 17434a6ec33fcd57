"""The embedded default's recipe: `python -m embedded train | evaluate | examples ...` from the repository root.

    python -m embedded train --out runs/target1 --steps 3600 --export runs/target1_export   # one stage
    python -m embedded evaluate --target src/sparrow/assets/target --clips 50                # its quality
    python -m embedded examples --out src/sparrow/assets/clips                                # the demo's clips

`embedded/build.sh` chains the stages that made the shipped weights. Errors are one line and exit code 2, as in
`sparrow`'s own commands.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"train": "embedded.train_target", "evaluate": "embedded.evaluate", "examples": "embedded.examples"}


def main(argv: list[str] | None = None) -> int:
    from sparrow.errors import SparrowError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv else sys.stdout)
        return 2 if argv and argv[0] not in ("-h", "--help") else 0
    try:
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0
    except SparrowError as e:
        print(f"embedded {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
