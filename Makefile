# Two entry points: `make demo` (offline CPU demo) and `make test` (the test suite). Each makes
# its own virtualenv in .venv with pinned versions; torch goes in first so that nothing pulls
# another build of it. The project itself is installed editable, so its scripts import it from here.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo demo-real test test-numerics lint install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# The RL frameworks the consumer tests run: requirements-consumers.txt says why those go in without their deps.
$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt requirements-consumers.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt -c constraints.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-consumers.txt -c constraints.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	bash training_scripts/cpu/run_demo.sh $(OUTPUT)

# all-MiniLM-L6-v2 (from PyPI) on real HH-RLHF pairs, about 8 minutes on 2 cores.
demo-real: install
	bash training_scripts/cpu/run_real_demo.sh $(OUTPUT)

# CPUs of this project's machines differ (AVX-512 with or without bf16, or only AVX2), and rounding
# differs with the kernels each one runs. The tests marked `numerics` (equal computations compared
# to a stated tolerance) run again as on a CPU without AVX-512 and as on one without bf16
# instructions, so a tolerance that holds on one CPU only fails here, not on the next machine.
# Each setting names the CPU flag it needs: forcing AVX-512 kernels on a CPU without them stops
# the process with an illegal instruction, so a setting this CPU cannot run is skipped, said so.
# It also names the flags (an extended regular expression) of a CPU whose own kernels differ from
# the setting's: on a CPU with none of them, the first run already ran the setting's kernels (AVX2
# is what PyTorch and oneDNN pick on a CPU without AVX-512 or VNNI), so the rerun is skipped too.
NUMERICS_ISAS := "avx2:avx512f|avx_vnni|avx_vnni_int8|avx_ne_convert|amx_[a-z0-9]+:ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" \
                 "avx512f:.+:ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE"

# One pytest process per core (pytest-xdist), each with its share of the threads (tests/conftest.py);
# a test file stays in one process, so the runs its tests share are trained once.
test: install-dev
	$(BIN)/python -m pytest -q --durations=15 -n auto --dist loadfile --no-loadscope-reorder
	$(MAKE) --no-print-directory test-numerics

test-numerics: install-dev
	@for isa in $(NUMERICS_ISAS); do \
		flag=$${isa%%:*}; rest=$${isa#*:}; differs=$${rest%%:*}; settings=$${rest#*:}; \
		if ! grep -qw $$flag /proc/cpuinfo; then \
			echo "numerics tests with $$settings: skipped, this CPU has no $$flag"; continue; \
		fi; \
		if ! grep -qwE "$$differs" /proc/cpuinfo; then \
			echo "numerics tests with $$settings: skipped, the first run used these kernels (no $$differs)"; \
			continue; \
		fi; \
		echo "numerics tests with $$settings"; \
		env $$settings $(BIN)/python -m pytest -q -n auto --dist loadfile -m numerics || exit 1; \
	done

lint: install-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) output_cpu_demo output_real_demo
