# The two commands a user needs (README): `make demo` runs a real backup + restore of a real VM,
# `make test` runs every test (unit, contract, e2e on real libvirt/QEMU guests).
.PHONY: setup demo test lint bench regolden

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/vmkeep lab demo

# Two pytest workers (one test module each at a time, each with its own lab VMs); the tests
# marked serial (they kill libvirtd) run alone afterwards. Both passes run the modules, and the
# tests within each module, in a random order (pytest-random-order): every test must stand alone.
# The seed is printed; `make test SEED=N` replays an order. Every xdist worker must collect the
# same order: so the seed is chosen here, once, never by each worker.
SEED := $(shell od -An -N3 -tu4 /dev/urandom | tr -d ' ')
RANDOM_ORDER = -p random_order --random-order-bucket=module --random-order-seed=$(SEED)

test: setup
	@echo "make test: random order seed $(SEED) (replay: make test SEED=$(SEED))"
	.venv/bin/pytest -n 2 --dist loadfile $(RANDOM_ORDER) -m "not serial" --junitxml=.pytest-report.xml tests
	.venv/bin/pytest $(RANDOM_ORDER) -m serial --junitxml=.pytest-report-serial.xml tests

# Golden files (tests/unit/data/*.xml): a test never rewrites them. After a deliberate change of
# the generated XML, rewrite them here, review `git diff`, and commit them.
regolden: setup
	REGOLDEN=1 .venv/bin/pytest -q tests/unit/test_backup_xml.py || true
	git status --short tests/unit/data

lint: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench
	.venv/bin/mypy

bench: setup
	.venv/bin/python bench/backup.py
