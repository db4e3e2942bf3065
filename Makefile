# Two commands do the whole set-up on a fresh machine:
#   make run   - create .venv, install NanoIoT, start the server with the embedded SQLite database and demo data
#   make test  - create .venv, install NanoIoT with its test extras (and Debian's chromium + chromium-driver for
#                the dashboard's browser tests, when missing), run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test venv browser clean

# tests/browser drive Debian's headless Chromium through chromedriver (Playwright's own download cannot work here).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/twistd -n nanoiot --demo

browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; fi

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
