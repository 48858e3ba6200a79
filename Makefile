# Discus: the two commands operators and CI call are `make demo` and `make test`.
SHELL := /bin/bash
export TCP_NODELAY := 1

.PHONY: install demo stop test bench

install:
	bash deploy/install.sh

demo: install
	bash deploy/demo.sh

stop:
	bash deploy/stop.sh

test: install
	.venv/bin/ruff check dicom_io models training worker tests
	.venv/bin/python -m pytest -q tests

bench: install
	.venv/bin/python -m tests.bench.run_all
