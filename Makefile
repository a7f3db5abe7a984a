# The two set-up commands of the README: `make demo` and `make test`.
.PHONY: demo test lint bench venv

venv:
	./scripts/bootstrap.sh

demo: venv
	.venv/bin/spectdose demo demo-out

test:
	./scripts/bootstrap.sh --test-tools
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -m "not slow" -q

bench: venv
	.venv/bin/python bench/bench_dvk.py
