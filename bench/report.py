"""Write one benchmark's section of docs/benchmarks.md, with the machine, versions and date."""

import datetime
import os
import platform
import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "docs" / "benchmarks.md"

HEADER = """# Benchmarks

Every figure on this page is written by a command in `bench/`; each section names the command
and when it ran. Rerun a command to replace its section.
"""


def environment_line(packages=("numpy", "pandas", "scikit-learn", "statsmodels")) -> str:
    """Describe the machine, Python and package versions in one line."""
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    cpu = platform.processor() or platform.machine()
    cores = os.cpu_count()
    today = datetime.date.today().isoformat()
    return f"{today}; {cpu}, {cores} cores; Python {platform.python_version()}; " + ", ".join(versions)


def write_section(name: str, title: str, body: str) -> Path:
    """Replace (or append) the section ``name`` of docs/benchmarks.md."""
    text = BENCHMARKS.read_text(encoding="utf-8") if BENCHMARKS.exists() else HEADER
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS.parent.mkdir(parents=True, exist_ok=True)
    BENCHMARKS.write_text(text, encoding="utf-8")
    return BENCHMARKS
