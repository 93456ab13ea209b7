# Two commands: `make demo` and `make test`. Each creates .venv when missing and
# installs distgan into it with the CPU faiss build (torch/torchvision/ray pinned by constraints.txt).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test install browser clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test,cpu]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/distgan pipeline --dataset digits --out demo --overwrite

test: $(STAMP) browser
	$(VENV)/bin/python -m pytest -q --durations=15 tests

# The report test renders report.html in headless Chromium (Debian's package).
# Installed when missing and we are root with apt; otherwise that test skips, saying why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ; } || \
	  echo "chromium not installed: the report rendering test will be skipped"

clean:
	rm -rf $(VENV) demo runs
