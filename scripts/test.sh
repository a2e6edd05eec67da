#!/usr/bin/env bash
# Sets up this machine for the test suite and runs it: Debian packages the tests need (PostgreSQL
# server binaries, docker-compose to check the compose file, Chromium for the dashboard
# screenshot), a virtual environment with the project at the exact versions CI tests
# (constraints/ci.txt), then ruff, the import contracts (lint-imports) and pytest. Extra arguments go
# to pytest alone.
#
# Without arguments (as CI runs it) a second, shorter run follows: the worker, storage and
# dashboard tests against the oldest Optuna and optuna-dashboard that pyproject.toml admits
# (constraints/min.txt), in .venv-min. .venv-min reuses .venv's packages (torch among them) through
# a .pth line, the way a venv made with --system-site-packages sees the system's, so only the two
# old packages are installed there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -c constraints/ci.txt -e '.[test]'
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi

status=0
# Lint and the layout's import contracts (pyproject.toml: [tool.ruff], [tool.importlinter]).
.venv/bin/ruff check --no-cache nkat_search tests benchmarks || status=$?
.venv/bin/lint-imports || status=$?
.venv/bin/python -m pytest || status=$?

purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
[ -x .venv-min/bin/python ] || .venv/bin/python -m venv .venv-min  # the same base Python as .venv
echo '*' > .venv-min/.gitignore
purelib .venv/bin/python > "$(purelib .venv-min/bin/python)/nkat-search-base.pth"
.venv-min/bin/pip install -q -c constraints/min.txt optuna optuna-dashboard
.venv-min/bin/pip install -q --no-deps -e .
echo "oldest supported: $(.venv-min/bin/python -c 'import optuna, optuna_dashboard as d; print("optuna", optuna.__version__, "optuna-dashboard", d.__version__)')"
# What depends on the Optuna version: the journal storage and trial ends (test_worker), RDBStorage
# with heartbeat_stale_trial_callback (test_postgres) and its retry of a dead worker's trial (one
# test of test_reliability), the storage calls our retrying storage overrides, the budget lock on
# every storage and orphaned trials (test_storage, test_chaos), notes, figures and serving in
# optuna-dashboard (test_dashboard, test_plots). Left to the main run, so that the whole suite stays
# under 15 minutes: signals, two and three workers of `start` on one budget (test_storage's two
# processes per storage stay), 48 workers, the two minute-long chaos runs, resuming, a killed journal
# worker, the worker that dies while claiming (the lost reply and the killed worker here use the same
# stale and orphan checks), and two command-line runs of `start` (their code uses no Optuna API that
# the tests here leave out).
.venv-min/bin/python -m pytest -p no:cacheprovider \
  -k "(not test_reliability or killed_worker) and not signal_fails and not workers_share and not 48_workers \
      and not drop_every_few_seconds and not outage_longer and not max_failures_reaches and not start_resumes \
      and not resume_after_all_workers and not killed_worker_is_detected and not dies_while_claiming" \
  tests/test_worker.py tests/test_postgres.py tests/test_reliability.py tests/test_storage.py tests/test_chaos.py \
  tests/test_dashboard.py tests/test_plots.py || status=$?
exit $status
