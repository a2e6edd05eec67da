#!/usr/bin/env bash
# Downloads into wheels/ (git-ignored) what scripts/gpu-check.sh installs on the lent GPU machine,
# which has no network: wheels for CPython 3.12 on Linux x86_64 of everything nkat-search needs
# beyond what that machine has preinstalled (torch 2.11, torchvision 0.26, einops, pandas, pyarrow,
# safetensors, rich, psutil and their dependencies), at the versions CI tests (constraints/ci.txt),
# plus the project's own wheel. Run it here, where PyPI is reachable; then check that the wheels
# resolve for Python 3.12 against stand-ins of the preinstalled packages, offline.
#
#   bash scripts/gpu-wheels.sh          # then: run(carry=["wheels"], command="bash scripts/gpu-check.sh")
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=wheels
PY=${PYTHON:-python3}
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
echo '*' > "$WHEELS/.gitignore"  # ignored by git, carried by the device tool only when asked

# The project's runtime needs minus the preinstalled packages, the test runner, and setuptools for
# building the project there. Versions come from constraints/ci.txt; --platform is every manylinux
# tag that torch 2.11's own manylinux_2_28 wheels imply the machine runs.
platforms=()
for minor in 28 27 26 25 24 17 12 5; do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
# tomllib is stdlib on 3.12; the ranges are read from pyproject.toml so the two never drift.
mapfile -t needs < <("$PY" - <<'EOF'
import tomllib
from packaging.requirements import Requirement
preinstalled = {"torch", "torchvision", "einops", "pandas", "pyarrow", "safetensors", "rich", "psutil"}
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for text in project["dependencies"] + ["pytest>=8", "hypothesis>=6.100", "setuptools>=68"]:
    if Requirement(text).name not in preinstalled:
        print(text)
EOF
)
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  "${platforms[@]}" -c constraints/ci.txt -d "$WHEELS" "${needs[@]}"
# numpy and pillow come with torch/torchvision/pandas there; 20 MB we need not carry.
rm -f "$WHEELS"/numpy-*.whl "$WHEELS"/pillow-*.whl
"$PY" -m pip wheel -q --no-deps -w "$WHEELS" .

# Offline check: a Python 3.12 venv whose only packages are stand-ins (bare metadata) of what the
# GPU machine has preinstalled; pip must resolve nkat-search and the test runner from wheels/ alone.
PY312=${PY312:-}
for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
  if [ -z "$PY312" ] && "$candidate" -c 'import venv' 2>/dev/null; then PY312=$candidate; fi
done
if [ -z "$PY312" ]; then
  echo "no python3.12 here: skipped the offline resolution check" >&2
else
  check=$(mktemp -d)
  trap 'rm -rf "$check"' EXIT
  "$PY312" -m venv "$check/venv"
  site=$("$check/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for pkg in torch==2.11.0 torchvision==0.26.0 einops==0.8.1 pandas==2.3.3 pyarrow==21.0.0 safetensors==0.6.2 \
             rich==14.1.0 psutil==7.1.0 numpy==2.3.3 pillow==11.3.0; do
    name=${pkg%%==*} version=${pkg##*==}
    mkdir -p "$site/$name-$version.dist-info"
    printf 'Metadata-Version: 2.1\nName: %s\nVersion: %s\n' "$name" "$version" > "$site/$name-$version.dist-info/METADATA"
    echo pip > "$site/$name-$version.dist-info/INSTALLER"
  done
  "$check/venv/bin/python" -m pip install -q --dry-run --no-index --find-links "$WHEELS" \
    nkat-search pytest hypothesis 'setuptools>=68'
  echo "wheels/ resolves offline for Python 3.12 beside torch 2.11 and torchvision 0.26"
fi
du -sh "$WHEELS"
ls "$WHEELS" | wc -l
