#!/usr/bin/env bash
# Re-resolve requirements/constraints.txt: install the project unpinned into a fresh virtual environment (the torch
# pair of the reference machine first), then pin every installed package with `pip freeze`. Review the diff, run
# the tests and the demo (`python bench/demo.py`), and commit the new file with the figures it produced.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PAIR=${TORCH_PAIR:-"torch==2.14.1 torchvision==0.29.1"}
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install --quiet $TORCH_PAIR
"$venv/bin/python" -m pip install --quiet -e '.[dev,mutation,docs,ray]'
{
  echo "# Every package the project installs, pinned (pip constraints: they pin what gets installed, add nothing)."
  echo "# Resolved by requirements/refresh.sh on $(date -u +%Y-%m-%d), Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -m)."
  echo "# Use: pip install -c requirements/constraints.txt -e '.[dev,docs,ray]'   (mutation testing: '.[dev,docs,ray,mutation]')"
  "$venv/bin/python" -m pip freeze --exclude-editable
} > requirements/constraints.txt
rm -rf "$(dirname "$venv")"
echo "wrote requirements/constraints.txt ($(grep -vc '^#' requirements/constraints.txt) pins)"
