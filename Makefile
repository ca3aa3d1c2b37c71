# Every target does its own set-up: on a fresh clone `make demo` or `make test` works first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VLP := $(VENV)/bin/vlp
# torch is pinned to the build this project is tested with; override for another CUDA/CPU build,
# e.g. make install TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
SHAPES ?= data/shapes

.PHONY: install test demo demo-albef demo-meter demo-meter-encdec demo-flava demo-flamingo demo-seeds ablation-albef bench lint data clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev,demo]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

data: install
	test -f $(SHAPES)/pair/support-000000.tar || $(VLP) data synth --out $(SHAPES)

demo: data
	$(VLP) fit --config recipes/tiny/clip.yaml
	$(VLP) test --ckpt runs/tiny_clip/checkpoints/last.ckpt

# ALBEF next to the dual encoder of the same size and budget (~20 min on 2 CPU cores)
demo-albef: data
	$(VLP) fit --config recipes/tiny/albef.yaml
	$(VLP) test --ckpt runs/tiny_albef/checkpoints/last.ckpt
	$(VLP) fit --config recipes/tiny/clip_minilm.yaml
	$(VLP) test --ckpt runs/tiny_clip_minilm/checkpoints/last.ckpt
	$(VLP) compare runs/tiny_clip_minilm runs/tiny_albef

# METER: pretrain (MLM + ITM), fine-tune on the VQA split, co-attention beside merged
# attention of equal size; VQA accuracy by question type against the majority answer
# (~30 min on 2 CPU cores)
demo-meter: data
	$(VLP) fit --config recipes/tiny/meter.yaml
	$(VLP) fit --config recipes/finetune/tiny_meter_vqa.yaml
	$(VLP) test --ckpt runs/tiny_meter_vqa/checkpoints/last.ckpt
	$(VLP) fit --config recipes/tiny/meter.yaml --config recipes/ablations/meter_tiny_merged.yaml
	$(VLP) fit --config recipes/finetune/tiny_meter_vqa.yaml --config recipes/ablations/meter_tiny_merged_vqa.yaml
	$(VLP) test --ckpt runs/tiny_meter_merged_vqa/checkpoints/last.ckpt
	$(VLP) compare runs/tiny_meter_vqa runs/tiny_meter_merged_vqa --names co-attention,merged

# FLAVA: build the shapes image tokenizer (k-means codes of 16 px patches), pretrain full
# FLAVA (pairs + images + text, round robin) and FLAVA_C (contrastive on pairs only) at the
# same budget, fine-tune both on the VQA split; tables of retrieval, zero-shot and linear
# probe on the image split, and VQA, each beside chance / the majority answer
demo-flava: data
	test -f data/shapes_tokenizer.safetensors || $(VLP) data tokenizer --data data_manifests/shapes_pair.yaml \
		--out data/shapes_tokenizer.safetensors --codes 512 --patch 16 --image_size 64
	$(VLP) fit --config recipes/tiny/flava.yaml
	$(VLP) test --ckpt runs/tiny_flava/checkpoints/last.ckpt
	$(VLP) fit --config recipes/tiny/flava.yaml --config recipes/ablations/flava_tiny_contrastive.yaml
	$(VLP) test --ckpt runs/tiny_flava_c/checkpoints/last.ckpt
	$(VLP) fit --config recipes/finetune/tiny_flava_vqa.yaml
	$(VLP) test --ckpt runs/tiny_flava_vqa/checkpoints/last.ckpt
	$(VLP) fit --config recipes/finetune/tiny_flava_vqa.yaml --config recipes/ablations/flava_tiny_contrastive_vqa.yaml
	$(VLP) test --ckpt runs/tiny_flava_c_vqa/checkpoints/last.ckpt
	$(VLP) compare runs/tiny_flava_c runs/tiny_flava --names FLAVA_C,FLAVA
	$(VLP) compare runs/tiny_flava_c_vqa runs/tiny_flava_vqa --names FLAVA_C,FLAVA

# METER encoder-only vs encoder-decoder (after demo-meter, whose co-attention VQA run it is
# compared with): pretrain with DenoisingLM + GenerativeITM, fine-tune the decoder to write
# VQA answers (~25 min on 2 CPU cores)
demo-meter-encdec: data
	$(VLP) fit --config recipes/tiny/meter.yaml --config recipes/ablations/meter_tiny_encdec.yaml
	$(VLP) fit --config recipes/finetune/tiny_meter_vqa.yaml --config recipes/ablations/meter_tiny_encdec_vqa.yaml
	$(VLP) test --ckpt runs/tiny_meter_encdec_vqa/checkpoints/last.ckpt
	$(VLP) compare runs/tiny_meter_vqa runs/tiny_meter_encdec_vqa --names encoder-only,encoder-decoder

# ALBEF's Table 1 on shapes, one tiny run per row: MLM + ITM; ITC + MLM + ITM; + hard
# negatives; + momentum distillation (~50 min on 2 CPU cores)
ALBEF_ROWS := mlm_itm itc_mlm_itm itc_mlm_itm_hard itc_mlm_itm_hard_mod
ablation-albef: data
	for row in $(ALBEF_ROWS); do \
	  $(VLP) fit --config recipes/tiny/albef.yaml --config recipes/ablations/albef_tiny_$$row.yaml && \
	  $(VLP) test --ckpt runs/tiny_albef_$$row/checkpoints/last.ckpt || exit 1; \
	done
	$(VLP) compare $(addprefix runs/tiny_albef_,$(ALBEF_ROWS)) --names MLM+ITM,+ITC,+hard,+MoD

# The demos over 3 seeds (seed_everything and data order varied): mean, spread and range of
# every score in runs/seeds/summary.md (2 CPU cores: CLIP ~30 min, ALBEF + its dual encoder
# ~2 h, METER pretraining + VQA ~1.5 h)
SEED_RUNS ?= clip albef clip_minilm meter_vqa
# Flamingo-lite: the frozen towers (a short tiny CLIP, a tiny LM on the captions; kept when
# present), the bridge on pairs + interleaved documents, then few-shot tables at 0/4/8 shots
# with random and RICES demonstrations, beside the frozen LM alone (gates held at 0).
demo-flamingo: data
	test -f runs/tiny_flamingo_clip/checkpoints/last.ckpt || $(VLP) fit --config recipes/tiny/clip.yaml --config recipes/tiny/flamingo_clip.yaml
	test -f runs/tiny_flamingo_lm/checkpoints/last.ckpt || $(VLP) fit --config recipes/tiny/flamingo_lm.yaml
	$(VLP) fit --config recipes/tiny/flamingo.yaml
	$(VLP) test --ckpt runs/tiny_flamingo/checkpoints/last.ckpt
	$(VLP) test --ckpt runs/tiny_flamingo/checkpoints/last.ckpt --config recipes/tiny/flamingo_rices.yaml
	$(VLP) fit --config recipes/tiny/flamingo.yaml --config recipes/ablations/flamingo_tiny_frozen_gates.yaml
	$(VLP) test --ckpt runs/flamingo_tiny_frozen_gates/checkpoints/last.ckpt
	$(VLP) compare runs/flamingo_tiny_frozen_gates runs/tiny_flamingo runs/tiny_flamingo_rices --names LM_alone,random,RICES

demo-seeds: data
	$(PY) bench/seeds.py --runs $(SEED_RUNS) --seeds 0 1 2

bench: install
	$(PY) bench/run.py

lint: install
	$(VENV)/bin/ruff check vlp tests bench
	$(VENV)/bin/ruff format --check vlp tests bench

clean:
	rm -rf runs lightning_logs .pytest_cache
