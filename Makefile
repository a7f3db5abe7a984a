# The two set-up commands of the README: `make demo` and `make test`.
.PHONY: demo serve test lint bench venv

venv:
	./scripts/bootstrap.sh

# Main job: bring the whole service up (local Redis, gateway, DICOM node, worker), push a
# virtual patient to it over DICOM, show where the RT Dose came back, then stop.
demo:
	./scripts/bootstrap.sh --service-tools
	.venv/bin/spectdose serve --http-port 8000 --dicom-port 11112 --ae-title SPECTDOSE \
		--data-dir demo-service --demo --exit-after-demo

# The same, but keep serving afterwards (push studies with storescu or POST /studies).
serve:
	./scripts/bootstrap.sh --service-tools
	.venv/bin/spectdose serve --http-port 8000 --dicom-port 11112 --ae-title SPECTDOSE --data-dir demo-service --demo

test:
	./scripts/bootstrap.sh --test-tools
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -m "not slow" -q

bench: venv
	.venv/bin/python bench/bench_dvk.py
