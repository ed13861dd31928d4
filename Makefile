# Two entry points on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.plinius-installed

.PHONY: demo test lint typecheck unit bench bench-quick clean sysdeps

# System packages (Debian): swtpm runs the TPM counter tests against a software
# TPM; libtss2-dev, pkg-config and a C compiler build tpm2-pytss (the 'tpm' extra).
# A warm machine skips the install; without apt (or root/sudo) it says what to
# install by hand, and the TPM tests skip (under CI they fail instead).
SYSDEPS := swtpm libtss2-dev pkg-config

sysdeps:
	@missing=""; \
	for p in $(SYSDEPS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	command -v cc >/dev/null 2>&1 || missing="$$missing gcc"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "sysdeps: no apt-get here; install$$missing (or your system's equivalent) by hand. Until then the TPM tests skip."; \
		exit 0; \
	fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "sysdeps: not root and no password-less sudo; run: sudo apt-get install$$missing. Until then the TPM tests skip."; exit 0; fi; \
	echo "sysdeps: installing$$missing"; \
	$$sudo apt-get update -q && \
	DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends $$missing

# sysdeps is order-only: it runs first, but does not by itself force a reinstall.
$(STAMP): pyproject.toml constraints.txt | sysdeps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# constraints.txt pins the CPU build of torch so no CUDA build is ever pulled.
	# The 'tpm' extra builds against libtss2: install it only where sysdeps could.
	if pkg-config --exists tss2-esys 2>/dev/null; then extras=dev,plots,lightning,hf,tpm; \
	else extras=dev,plots,lightning,hf; echo "libtss2 not found: installing without the 'tpm' extra"; fi; \
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$$extras]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/plinius demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

# Two pytest workers, each taking whole files (a module's fixtures are built once):
# most tests wait on child processes (torchrun, kills, restarts), so two overlap
# well on two cores (16.7 min serial, 11.3 min so on the 2-core development VM).
unit: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test: lint typecheck unit

bench-quick: $(STAMP)
	$(BIN)/plinius bench --quick --out bench-out

bench: $(STAMP)
	$(BIN)/plinius bench --out bench-out

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench-out demo-out
