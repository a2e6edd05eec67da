#!/usr/bin/env bash
# Sets up this machine for the test suite and runs it: Debian packages the tests need (PostgreSQL
# server binaries, docker-compose (and trixie's compose v2) to check the compose files, the Docker
# engine and debootstrap to run the compose stack, Chromium for the dashboard screenshot, Slurm for
# a one-node cluster), a virtual environment with the project at the exact versions CI tests
# (constraints/ci.txt), then ruff (lint and format), the import contracts (lint-imports), mypy and pytest in parallel
# processes. Extra arguments go to pytest alone.
#
# Without arguments (as CI runs it) a second, shorter run follows: the worker, storage and
# dashboard tests against the oldest Optuna and optuna-dashboard that pyproject.toml admits
# (constraints/min.txt), in .venv-min, which sees .venv's packages the way a venv made with
# --system-site-packages sees the system's.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v chromium >/dev/null || need+=(chromium)
command -v slurmctld >/dev/null || need+=(slurmctld slurmd slurm-client)  # tests/test_deploy.py's one-node cluster
# tests/test_compose_stack.py: a private Docker engine, and debootstrap for the local base image
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Debian's compose v2 (the package of trixie, Debian 13: bookworm has only 1.29), unpacked into the
# git-ignored cache, so that tests/test_compose.py checks the compose files with both versions.
compose_v2=.cache/docker/compose-v2
if [ ! -x "$compose_v2/docker-compose" ]; then
  mirror=http://deb.debian.org/debian
  deb=$(curl -fsS "$mirror/dists/trixie/main/binary-$(dpkg --print-architecture)/Packages.xz" | xz -d |
    awk '/^Package: docker-compose$/ {p = 1} p && /^Filename:/ && !done {print $2; done = 1}')  # reads to the end: no SIGPIPE under pipefail
  mkdir -p "$compose_v2/deb"
  curl -fsS -o "$compose_v2/deb/compose.deb" "$mirror/$deb"
  dpkg-deb -x "$compose_v2/deb/compose.deb" "$compose_v2/deb"
  mv "$compose_v2/deb/usr/libexec/docker/cli-plugins/docker-compose" "$compose_v2/docker-compose"
  rm -rf "$compose_v2/deb"
fi

# Every component a test needs is installed above: a test that cannot find one fails instead of
# skipping (tests/helpers.py: unavailable; tests/pg_server.py), so a missing install step shows.
export CI="${CI:-true}"

# Disk: .venv holds PyPI's torch 2.14.1, a CUDA build (6.4 GB), and the compose stack's engine keeps
# its images in .cache/docker/engine (6.6 GB); a full run from a fresh clone needs about 14 GB in
# this folder. Said up front: pip or the engine running out of space midway fails in a traceback.
need_gb=1
[ -x .venv/bin/python ] || need_gb=$((need_gb + 7))
[ -d .cache/docker/engine/image ] || need_gb=$((need_gb + 7))
free_gb=$(($(df -Pk . | awk 'NR == 2 {print $4}') / 1048576))
if [ "$free_gb" -lt "$need_gb" ]; then
  echo "scripts/test.sh: $free_gb GB free on the disk of $PWD, and this run needs about $need_gb GB (the torch of .venv and the compose stack's images); free some space (an old clone's .venv and .cache/docker are most of it) and run it again." >&2
  exit 1
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -c constraints/ci.txt -e '.[test]'
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi

status=0
# Lint, format and the layout's import contracts (pyproject.toml: [tool.ruff], [tool.importlinter]).
.venv/bin/ruff check --no-cache nkat_search tests benchmarks || status=$?
.venv/bin/ruff format --check --no-cache nkat_search tests benchmarks || status=$?
.venv/bin/lint-imports || status=$?
# While the main pass runs (much of its time is spent waiting): the type check (pyproject.toml
# [tool.mypy]) and the oldest-Optuna environment of the second pass. .venv-min reuses .venv's
# packages (torch among them) through a .pth line, so only the two old packages are installed there.
.venv/bin/mypy nkat_search > .venv/mypy.log 2>&1 &
mypy_pid=$!
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
(
  set -e
  [ -x .venv-min/bin/python ] || .venv/bin/python -m venv .venv-min  # the same base Python as .venv
  echo '*' > .venv-min/.gitignore
  purelib .venv/bin/python > "$(purelib .venv-min/bin/python)/nkat-search-base.pth"
  .venv-min/bin/pip install -q -c constraints/min.txt optuna optuna-dashboard
) > .venv/min-setup.log 2>&1 &
min_pid=$!
# In parallel processes (pytest-xdist): most of a test's time is waiting (worker processes starting,
# heartbeats going stale, a server restarting), so more processes than cores pay off. A module's
# tests stay on one process (loadfile), so that a module's session fixtures (the bad-input table's
# outcomes, the retrained study) are built once. (xdist_group marks did not group anything under
# pytest 9.2 with xdist 3.8: measured, the bad-input table was built on all three processes.)
# xdist hands the modules out in its own order, those with more tests first, which leaves the compose
# stack (two tests) to the end. The longest modules first, or the compose stack first, were no faster
# from fresh clones (docs/performance.md, "Test suite timings").
PARALLEL=(-n "${NKAT_TEST_PROCESSES:-3}" --dist loadfile)
.venv/bin/python -m pytest "${PARALLEL[@]}" || status=$?
wait "$mypy_pid" || status=$?
cat .venv/mypy.log
if ! wait "$min_pid"; then
  cat .venv/min-setup.log
  exit 1
fi

.venv-min/bin/pip install -q --no-deps -e .
echo "oldest supported: $(.venv-min/bin/python -c 'import optuna, optuna_dashboard as d; print("optuna", optuna.__version__, "optuna-dashboard", d.__version__)')"
# What depends on the Optuna version is marked optuna_api (pyproject.toml): the journal storage and
# trial ends, RDBStorage's heartbeats and stale-trial retry, the storage calls our retrying storage
# overrides, the budget lock, notes, figures and serving in optuna-dashboard. The long multi-process
# runs among them (marked long) stay in the main run: they use no Optuna API the others leave out.
.venv-min/bin/python -m pytest -p no:cacheprovider "${PARALLEL[@]}" -m "optuna_api and not long" || status=$?
exit $status
