PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint bench clean

$(STAMP): pyproject.toml
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
