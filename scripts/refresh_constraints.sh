#!/usr/bin/env bash
# Refresh constraints.txt on purpose: resolve every extra afresh from the registry in a
# throw-away venv and pin what it got. Then run `CI=true bash .ci/run` on a clean clone
# and commit constraints.txt with the test results; a release that breaks us shows up
# here, in review, instead of on a new user's machine.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q '.[local,otlp,test,tokenizers]'
{
  echo "# Tested versions of every dependency, used by the README's commands and .ci/run"
  echo "# (pip install -c constraints.txt ...). Refresh on purpose: bash scripts/refresh_constraints.sh"
  echo "# Generated $(date -u +%Y-%m-%d) with $("$venv/bin/python" --version) on $(uname -m)."
  # --all: setuptools is a test dependency (the wheel test builds offline), so it is pinned too.
  "$venv/bin/pip" freeze --all --exclude lloom --exclude pip | LC_ALL=C sort -f
} > constraints.txt
rm -rf "$(dirname "$venv")"
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
