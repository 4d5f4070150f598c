# cairn: every target does its own set-up, so `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CAIRN := $(VENV)/bin/cairn

.PHONY: install lock system-deps demo up down test test-durations test-fast lint bench schemas clean

install: $(VENV)/.installed system-deps

# Debian's chromium (the auditor's page is tested in a real browser through Playwright, which
# uses this system browser and downloads none), wrk (load for bench/serve.py) and postgresql
# (pg_ctl: the tests start a private PostgreSQL server for the production stores) and iproute2
# (`ip netns`: network namespaces as hosts, harness/hosts.py; root only) and prometheus (promtool
# tests the alert rules, and the tests run their own Prometheus: tests/test_alerts.py,
# tests/test_prometheus.py; where systemd runs, the package also starts one on :9090). Under CI=true
# a test that finds one missing fails instead of skipping (tests/conftest.py).
SYSTEM_PACKAGES := chromium wrk postgresql iproute2 prometheus
system-deps:
	@command -v chromium >/dev/null && command -v wrk >/dev/null && command -v ip >/dev/null \
	  && command -v prometheus >/dev/null && command -v promtool >/dev/null \
	  && { command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null || { apt-get update -q && apt-get install -y -q $(SYSTEM_PACKAGES); }; \
	  else echo "install Debian's $(SYSTEM_PACKAGES) (sudo apt-get install $(SYSTEM_PACKAGES)) for the browser, PostgreSQL, load and alert tests"; fi; }

# Exactly the locked versions, each file checked against its hash; then cairn itself, without
# resolving anything. docs/DEPENDENCIES.md says how the lock is made and how to upgrade.
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Regenerate requirements.lock from pyproject.toml (runtime and dev), keeping every pin it already
# holds that still fits; `make lock UPGRADE=mlflow` moves one package (UPGRADE=all: every one). uv
# reads no pip configuration, so it is handed pip's indexes and find-links (the CPU torch wheel lies
# on local disk) and, like pip, takes the best match across all of them: the hashes are those of the
# files pip will install.
UPGRADE ?=
lock: $(VENV)/.installed
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
	  --index-strategy unsafe-best-match --custom-compile-command 'make lock' -o requirements.lock -q \
	  $$(for u in $$($(PY) -m pip config get global.extra-index-url 2>/dev/null); do echo --extra-index-url $$u; done) \
	  $$(for l in $$($(PY) -m pip config get global.find-links 2>/dev/null) $$PIP_FIND_LINKS; do echo --find-links $$l; done) \
	  $(if $(filter all,$(UPGRADE)),--upgrade,$(foreach p,$(UPGRADE),--upgrade-package $(p)))

demo: install
	$(PY) -m services.tools.demo

up: install
	$(CAIRN) up

down: install
	$(CAIRN) down

# Two workers (pytest-xdist), one per core, modules longest first (tests/module_order.py). From a
# fresh clone, 2026-12-07, install included: 14:49 and 14:24. Three workers took 12:58 to 14:12 in four runs
# and up to 1,242 s of CPU against 1,084 s, but the extra load is where the partition and fault tests
# are weakest: in one of those runs a 30 s minority partition recorded five trial results twice
# (docs/RELIABILITY.md, known limits). A test module runs whole on one worker, so its module-scoped
# fixtures are built once. Every test starts its own servers on free ports and namespaces of its
# own tag, so the workers share nothing. PYTEST_WORKERS=0 runs the suite in this process.
PYTEST_WORKERS ?= 2
# KServe's Python client has its own venv (its pins conflict with the lock): made before the suite.
test: install
	$(PY) -m tests.peers.kserve_venv
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=25

# Each module's wall seconds into tests/module_seconds.json, which orders the modules longest first
# (tests/module_order.py): refresh it after adding or much changing a slow module.
test-durations: install
	rm -rf .test-durations
	CAIRN_TEST_DURATIONS=.test-durations $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile
	$(PY) -c "import glob, json; t = {}; [t.update(json.load(open(f))) for f in glob.glob('.test-durations/*.json')]; open('tests/module_seconds.json', 'w').write(json.dumps(dict(sorted(t.items())), indent=1) + '\n')"

test-fast: install
	$(PY) -m pytest -m "not slow and not k8s"

lint: install
	$(VENV)/bin/ruff check contracts services tests bench harness
	$(VENV)/bin/lint-imports

# The throughput figures last (bench/summary.py): each with its spread, its target and the
# machine's speed, from what bus, shell_80, study_peers and scale wrote to bench/results/.
bench: install
	$(PY) bench/bus.py --repeats 5
	$(PY) bench/shell_80.py
	$(PY) bench/study_peers.py
	$(PY) bench/serve.py
	$(PY) bench/cache.py
	$(PY) bench/scale.py --trials 10000
	$(PY) bench/startup.py
	$(PY) bench/cluster.py
	$(PY) bench/public_api.py
	$(PY) bench/summary.py

schemas: install
	$(CAIRN) schemas

clean:
	rm -rf $(VENV)
