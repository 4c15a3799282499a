# Developer shortcuts. `make docs` builds the documentation site offline (no Quarto) into _docs/.
PYTHON ?= python
JOBS ?= 1

.PHONY: docs docs-check

# Execute every notebook in _quarto.yml's sidebar (fast path), process it with nbdev and write _docs/ (see tools/build_site.py).
docs:
	$(PYTHON) tools/build_site.py --jobs $(JOBS)

# Build the site and check every page in headless Chromium (screenshots in _docs/screenshots/).
docs-check:
	$(PYTHON) -m pytest -q tests/test_site.py
