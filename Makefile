# Every target sets itself up on a fresh machine: .venv, the project (editable) with what it needs,
# and Debian's Fashion-MNIST package when it is missing and apt is usable.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-dev
EXTRAS  := test,numba,torch,demo,bench,keras,keras-jax,lightning,huggingface,ann,dask,docs,lint
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Tests run in 2 pytest workers on 2 cores: one BLAS/Numba thread per worker avoids oversubscription
# (spinning OpenMP threads on a busy machine slow small kernels by an order of magnitude).
# CRESTCORE_TEST_REQUIRE_JAX=1: the keras-jax extra is installed here, so the jax-backend tests fail
# instead of skipping when jax does not import.
TEST_ENV := OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 CRESTCORE_TEST_REQUIRE_JAX=1

.PHONY: setup test test-lower test-slow test-gpu demo bench clean fashion-mnist docs lint wheel

setup: $(STAMP) fashion-mnist

$(STAMP): pyproject.toml constraints-dev.txt Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -c constraints-dev.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

fashion-mnist:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null \
	      || echo "warning: could not install dataset-fashion-mnist; tests that need it will skip"; \
	  else echo "warning: dataset-fashion-mnist missing and apt unusable; tests that need it will skip"; fi; \
	fi

test: setup
	$(TEST_ENV) $(VPY) -m pytest -q -m "not slow and not gpu" -n 2 tests

# The oldest versions the core declares (pyproject.toml: numpy>=1.24, array-api-compat>=1.9, numba>=0.59,
# pinned in constraints-lower.txt), in an environment of their own without torch or the other extras: the
# core's and the backends' tests against them (the adapters and the applications need their frameworks:
# the default suite runs those). A core test that uses torch is skipped there, named (tests/conftest.py).
LOWER   := .venv-lower
test-lower:
	test -x $(LOWER)/bin/python || $(PY) -m venv $(LOWER)
	$(LOWER)/bin/python -m pip install -q --upgrade pip
	$(LOWER)/bin/python -m pip install -q -c constraints-lower.txt numpy array-api-compat numba pytest pytest-xdist \
	  pytest-timeout hypothesis array-api-strict scikit-learn
	$(LOWER)/bin/python -m pip install -q --no-deps -e .
	$(LOWER)/bin/python -c "import numpy, numba, array_api_compat; print('lower bounds: numpy', numpy.__version__, \
	  '| numba', numba.__version__, '| array-api-compat', array_api_compat.__version__)"
	OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(LOWER)/bin/python -m pytest -q \
	  -m "not slow and not gpu" -n 2 tests --ignore=tests/adapters --ignore=tests/test_cli.py \
	  --ignore=tests/test_train_demo.py

test-slow: setup
	$(TEST_ENV) $(VPY) -m pytest -q -m "slow" tests

test-gpu: setup
	$(VPY) -m pytest -q -m "gpu" tests

# ruff on the whole tree (crestcore/.ruff.toml bans the frameworks in the core); mypy on the core and
# the backends, laid out as installed (crestcore/backends) by scripts/typecheck
lint: setup
	$(VENV)/bin/ruff check .
	$(VPY) scripts/typecheck

# the documentation site: guides, benchmark tables and the API reference from the docstrings, into site/
# (no -q: it silences the warnings, and --strict then counts none of them)
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# the wheel, shipping the Numba kernels of a first selection compiled for this machine's CPU
# (scripts/warm_kernels.py; used only where the CPU, Python and Numba match, compiled anywhere else)
wheel: setup
	rm -rf dist build/lib build/bdist.*  # stale files of moved modules would ship otherwise
	env -u NUMBA_CACHE_DIR $(VPY) scripts/warm_kernels.py
	$(VPY) -m build --wheel --outdir dist .

demo: setup
	$(VENV)/bin/crest demo

bench: setup
	$(VENV)/bin/crest bench selection --out docs/benchmarks.md
	$(VENV)/bin/crest bench e2e --out docs/benchmarks.md

clean:
	rm -rf $(VENV) .venv-wheel .venv-lower build dist site *.egg-info .pytest_cache .hypothesis
	find . -path ./.git -prune -o \( -name '*.nbi' -o -name '*.nbc' \) -type f -print0 | xargs -0 rm -f
