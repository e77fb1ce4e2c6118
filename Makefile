# Thin wrappers around dev.sh (which needs only bash and python3).
.PHONY: setup demo test test-fast bench
setup:
	bash dev.sh setup
demo:
	bash dev.sh demo
test:
	bash dev.sh test
test-fast:
	bash dev.sh test -m "not slow and not slurm"
bench: setup
	for b in benchmarks/*.py; do .venv/bin/python $$b || exit 1; done
