# `make demo` and `make test` each set up .venv on first use, then run.
VENV   ?= .venv
# The browser test drives Debian's chromium (never a downloaded one: `playwright install` is not used).
CHROMIUM ?= /usr/bin/chromium
PY     := $(VENV)/bin/python
# pytest-xdist workers for `make test`: a test's subprocess spends seconds importing on one core.
TEST_WORKERS ?= 2
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean chromium

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --no-cache-dir -e '.[dev,ray]'
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

chromium: $(CHROMIUM)

$(CHROMIUM):
	$$( [ "$$(id -u)" -eq 0 ] || echo sudo ) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium'

test: $(STAMP) $(CHROMIUM)
	CLIPALIGN_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15

clean:
	rm -rf demo_out .pytest_cache
