PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint bench clean

# System libraries: Mooncake (the PD transfer engine) loads libibverbs.so.1 even for TCP.
SYSLIBS := $(VENV)/.syslibs

$(SYSLIBS):
	@ldconfig -p | grep -q 'libibverbs.so.1 ' || { \
	  echo "installing Debian package libibverbs1 (needed by the Mooncake transfer engine)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q libibverbs1; }
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml $(SYSLIBS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# All tests, the slow real-model ones included.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Unit tests without the slow real-model ones (target: under 5 minutes).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check swakv tests bench

clean:
	rm -rf $(VENV) build *.egg-info

# The OpenAI-compatible server on the default model (Gemma 3 270M) at 127.0.0.1:8000.
# Extra flags: make serve ARGS="--port 9000 --kv-memory 2GiB"
.PHONY: serve
serve: $(STAMP)
	$(BIN)/swakv serve $(ARGS)
