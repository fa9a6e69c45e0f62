#!/usr/bin/env bash
# Print the path of a virtualenv with the project's dependencies, creating it when needed.
#
# The virtualenv is keyed on a hash of pyproject.toml, so repeated runs and fresh clones
# with the same dependency list reuse it. This script installs only the dependencies.
# `make test` adds an editable install of the checkout for the console script, and the
# Makefile puts the checkout first on PYTHONPATH, so whichever clone runs is the one tested.
# Set VENV_EXTRAS to add optional extras (for example "tensorflow").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
extras="test${VENV_EXTRAS:+,$VENV_EXTRAS}"
key=$( { cat "$root/pyproject.toml"; echo "$extras"; "$python" --version; } | sha256sum | cut -c1-16)
cache=${ANOMALY_EXPORTER_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/anomaly-exporter}
venv="$cache/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "creating virtualenv $venv" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  requirements=$("$venv/bin/python" - "$root/pyproject.toml" "$extras" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
wanted = list(project["dependencies"])
for extra in sys.argv[2].split(","):
    wanted += project.get("optional-dependencies", {}).get(extra, [])
print("\n".join(wanted))
PY
)
  echo "$requirements" > "$venv/requirements.txt"
  "$venv/bin/python" -m pip install --quiet -r "$venv/requirements.txt" >&2
  touch "$venv/.complete"
fi
echo "$venv"
