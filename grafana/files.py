"""Write generated files, or check that the committed copies match them."""

import sys
from pathlib import Path


def write_or_check(files: dict[str, str], output: Path, check: bool, command: str) -> int:
    """Write ``files`` into ``output``, or with ``check`` report the stale ones; returns the exit status."""
    if check:
        stale = [name for name, text in files.items()
                 if not (output / name).is_file() or (output / name).read_text(encoding="utf-8") != text]
        for name in stale:
            print(f"{output / name} is missing or out of date; run {command}", file=sys.stderr)
        return 1 if stale else 0

    output.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (output / name).write_text(text, encoding="utf-8")
        print(f"wrote {output / name}")
    return 0
