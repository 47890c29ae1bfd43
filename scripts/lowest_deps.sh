#!/usr/bin/env bash
# The default test run (no --runslow) against the LOWEST versions pyproject.toml admits.
#
# Each `name>=X` of [project].dependencies becomes `name==X` in a constraint file, so the floors
# in pyproject.toml are exactly what is tested (a floor pip cannot install here, e.g. for want of
# a wheel for this Python, fails the install: raise it in pyproject.toml). torch is the
# exception: it stays at $TORCH_SPEC (default torch==2.13.0, the build the tests run on;
# pip prefers a local +cpu wheel of that version where its find-links has one). The [test]
# extra's packages (datasets, pyarrow, trackers, pytest) are left to pip, within their ranges.
#
# usage: scripts/lowest_deps.sh [pytest args...]     (default: tests -q -p no:cacheprovider)
# env:   LOWEST_VENV  where the venv goes (default ${TMPDIR:-/tmp}/archsearch-lowest; rebuilt
#                     each time unless LOWEST_REUSE=1)
#        PYTHON       the interpreter to build it from (default python3)
#        TORCH_SPEC   the torch requirement (default torch==2.13.0)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${LOWEST_VENV:-${TMPDIR:-/tmp}/archsearch-lowest}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

lows=$("$python" - "$root/pyproject.toml" "$torch_spec" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(sys.argv[2])
for dep in deps:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*([^;]*)", dep)
    name, spec = m.group(1), m.group(3)
    if name.lower() == "torch":
        continue
    low = re.search(r">=\s*([^,\s]+)", spec)
    if low is None:
        sys.exit(f"lowest_deps.sh: {dep!r} in pyproject.toml has no '>=' floor")
    print(f"{name}=={low.group(1)}")
EOF
)

if [[ ${LOWEST_REUSE:-0} != 1 || ! -x $venv/bin/python ]]; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi
printf '%s\n' "$lows" > "$venv/lows.txt"
echo "lowest_deps: constraints ($venv/lows.txt):"; sed 's/^/  /' "$venv/lows.txt"
# (this machine's pip config names index folders that may be missing: drop those warnings)
"$venv/bin/pip" install -q --constraint "$venv/lows.txt" -e "$root[test]" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

# the installed versions must be the floors (a constraint pip silently dropped would hide one)
"$venv/bin/python" - "$venv/lows.txt" <<'EOF'
import sys
from importlib.metadata import version
from packaging.version import Version
bad = []
for line in open(sys.argv[1]):
    name, want = line.strip().split("==")
    got = version(name)
    if Version(Version(got).public) != Version(want):
        bad.append(f"{name}: wanted {want}, installed {got}")
if bad:
    sys.exit("lowest_deps: " + "; ".join(bad))
EOF
echo "lowest_deps: installed:"
"$venv/bin/pip" list --format=freeze | sed 's/^/  /'

cd "$root"
if [[ $# -eq 0 ]]; then set -- tests -q -p no:cacheprovider; fi
exec env PYTHONPATH="$root" "$venv/bin/python" -m pytest "$@"
