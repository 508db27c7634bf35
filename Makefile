# The two commands of the README: `make demo` and `make test`. Each sets up what it needs.
VENV ?= .venv
DEVICES ?= 8
WORKDIR ?= demo-workspace

.PHONY: setup demo test bench campaign clean

setup:
	@VENV=$(VENV) ./scripts/setup.sh

demo: setup
	$(VENV)/bin/stampline demo --devices $(DEVICES) --workdir $(WORKDIR)

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python bench/issuance.py
	$(VENV)/bin/python bench/line_time.py
	$(VENV)/bin/python bench/jitr.py

# The hostile-input and fault campaigns at full size (the test suite runs seeded samples of each).
campaign: setup
	$(VENV)/bin/python bench/fuzz.py
	$(VENV)/bin/python bench/faults.py

clean:
	rm -rf $(WORKDIR) .pytest_cache
