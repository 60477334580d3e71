# The two commands a user needs (README): `make demo` runs a real backup + restore of a real VM,
# `make test` runs every test (unit, contract, e2e on real libvirt/QEMU guests).
.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/vmkeep lab demo

# Two pytest workers (one test module each at a time, each with its own lab VMs); the tests
# marked serial (they kill libvirtd) run alone afterwards.
test: setup
	.venv/bin/pytest -n 2 --dist loadfile -m "not serial" --junitxml=.pytest-report.xml tests
	.venv/bin/pytest -m serial --junitxml=.pytest-report-serial.xml tests

lint: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench
	.venv/bin/mypy

bench: setup
	.venv/bin/python bench/backup.py
