# dfa-lightning: every workflow starts here. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
RECIPE ?= recipes/gcn_dfa.yaml
ARGS ?=
SEEDS ?= 0 1 2 3 4
LOGDIR ?= logs
OUT ?= benchmarks/results

.PHONY: help install train test test-slow test-gpu gpu-check tensorboard bench bench-gpu bench-compiled profile kernels loop-overhead reproduce-cora reproduce-lm reproduce-nerf-sample reproduce-graphs reproduce-placements failure-map failure-map-lm feedback-norm-parts labelled-nodes ctr-bias-walk ln-affine transport-map clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-16s %s\n", $$1, $$2}'

install: ## create .venv and install the pinned requirements and the package (editable)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .

train: ## train one recipe: make train RECIPE=recipes/gcn_dfa.yaml ARGS="--trainer.devices 4 --trainer.strategy ddp"
	@test -n "$(strip $(RECIPE))" || { echo "error: RECIPE is empty; e.g. make train RECIPE=recipes/gcn_dfa.yaml" >&2; exit 2; }
	$(PYTHON) -m dfa_lightning fit --config $(RECIPE) $(ARGS)

test: ## the fast suite (CPU, < 15 min): everything but the `slow` marker
	$(PYTHON) -m pytest -q -m "not slow" $(ARGS)

test-slow: ## the slow real-data tests too
	$(PYTHON) -m pytest -q $(ARGS)

test-gpu: ## the tests marked `gpu` (CUDA: fp16 AMP, CUDA-graph replay, syncs per step); they skip without a GPU
	$(PYTHON) -m pytest -q -m gpu -rs $(ARGS)

GPU_DEADLINE ?= 560
gpu-check: ## everything a GPU session runs, in one command: bench-gpu, GPU profile, compiled bench, loop overhead, compiled LM (alone), then CUDA tests, Cora and NeRF sample runs at once (into OUT; ends within GPU_DEADLINE s, 0 = no cap)
	OUT=$(OUT) PYTHON=$(PYTHON) DEADLINE=$(GPU_DEADLINE) bash benchmarks/gpu_check.sh

tensorboard: ## watch every run under logs/
	$(PYTHON) -m tensorboard.main --logdir $(LOGDIR)

bench: ## CPU benchmarks (step time, memory) into benchmarks/results/ (one thread, as the README's table)
	$(PYTHON) -m benchmarks.run --preset cpu --threads 1 --out $(OUT) $(ARGS)

bench-gpu: ## GPU benchmarks into benchmarks/results/ (one H100/H200, < 6 min)
	$(PYTHON) -m benchmarks.run --preset gpu --out $(OUT) $(ARGS)

bench-compiled: ## the CPU benchmark's models under torch.compile (Inductor: needs a C compiler) into bench_cpu_compiled.*
	$(PYTHON) -m benchmarks.run --preset cpu --compile default --threads 1 --out $(OUT) $(ARGS)

profile: ## one DFA step per model under torch.profiler: one projection, no discarded gradients (ARGS="--preset gpu")
	$(PYTHON) -m benchmarks.profile_step --out $(OUT) $(ARGS)

kernels: ## kernel time per training step of BP and DFA on the GPU: where each step's time goes (ARGS="--models mlp nerf")
	$(PYTHON) -m benchmarks.profile_kernels --preset gpu --out $(OUT) $(ARGS)

loop-overhead: ## what Trainer.fit adds per step to the bare step, BP and DFA (ARGS="--preset gpu" on a GPU)
	$(PYTHON) -m benchmarks.loop_overhead --threads 1 --out $(OUT) $(ARGS)

SWEEP_OPTS ?=  # options of dfa_lightning.sweep for the reproduce-* sweeps, e.g. --rerun (train again, not read back)

reproduce-cora: ## GCN on Cora, BP / DFA / shallow over SEEDS: writes benchmarks/results/cora_gcn.md
	$(PYTHON) -m dfa_lightning.sweep --recipes recipes/gcn_bp.yaml recipes/gcn_dfa.yaml recipes/gcn_shallow.yaml \
		--seeds $(SEEDS) --metric test/acc --out benchmarks/results/cora_gcn.md --root $(LOGDIR)/sweeps $(SWEEP_OPTS) \
		--reference '{"gcn_bp": 0.801, "gcn_dfa": 0.799, "gcn_shallow": 0.370}'

LM_RECIPES ?= recipes/lm_bp.yaml recipes/lm_dfa_macro.yaml recipes/lm_dfa_micro.yaml recipes/lm_dfa_macro_after_vocab.yaml recipes/lm_shallow.yaml
LM_SEEDS ?= 0
LM_OUT ?= benchmarks/results/lm_wikitext2.md

reproduce-lm: ## LM recipes on WikiText-2 (paper Table 5's methods) over LM_SEEDS: test perplexity into LM_OUT; ARGS go to every run
	$(PYTHON) -m dfa_lightning.sweep --recipes $(LM_RECIPES) --seeds $(LM_SEEDS) --metric test/ppl --out $(LM_OUT) \
		--root $(LOGDIR)/sweeps $(SWEEP_OPTS) -- $(ARGS)

NERF_SEEDS ?= 0

reproduce-nerf-sample: ## NeRF BP / DFA / shallow on the 100-pixel lego (CPU-sized, recipes/sample/nerf_lego_100px.yaml): test PSNR into benchmarks/results/nerf_lego_100px.md
	$(PYTHON) -m dfa_lightning.sweep --recipes recipes/nerf_bp.yaml recipes/nerf_dfa.yaml recipes/nerf_shallow.yaml \
		--seeds $(NERF_SEEDS) --metric test/psnr --out benchmarks/results/nerf_lego_100px.md --root $(LOGDIR)/sweeps $(SWEEP_OPTS) \
		-- --config recipes/sample/nerf_lego_100px.yaml $(ARGS)

GRAPH_DATASETS ?= Cora
GRAPH_MODELS ?= gcn cheb spline gat dna gae
GRAPHS_OUT ?= benchmarks/results/graphs_cora.md
# pyg: PyG's SplineConv with pyg-lib's compiled kernels; torch: the plain-PyTorch SplineConv (no install, slower)
SPLINE_KERNELS ?= torch    # as the README's table was measured (pyg-lib has no wheel for torch 2.13)

reproduce-graphs: ## paper graph tables (3, 4, A.2, A.4): GRAPH_MODELS x BP/DFA/shallow on GRAPH_DATASETS over SEEDS, + hidden-layer PCA
	$(PYTHON) -m dfa_lightning.graphs_reproduce --datasets $(GRAPH_DATASETS) --models $(GRAPH_MODELS) --seeds $(SEEDS) \
		--spline-kernels $(SPLINE_KERNELS) --root $(LOGDIR)/graphs --out $(GRAPHS_OUT) $(ARGS)
	$(if $(and $(filter Cora,$(GRAPH_DATASETS)),$(filter gcn,$(GRAPH_MODELS)),$(filter 0,$(SEEDS))),\
	$(PYTHON) -m dfa_lightning.embedding --hidden $(LOGDIR)/graphs/Cora/gcn_bp/seed0/hidden.pt \
		$(LOGDIR)/graphs/Cora/gcn_dfa/seed0/hidden.pt $(LOGDIR)/graphs/Cora/gcn_shallow/seed0/hidden.pt \
		--png benchmarks/results/cora_gcn_hidden_pca.png --logdir $(LOGDIR)/embedding,\
	@echo "no PCA plot: it needs Cora, gcn and seed 0 among GRAPH_DATASETS, GRAPH_MODELS and SEEDS")

CRITEO_SEEDS ?= 0 1 2

reproduce-placements: ## is f' needed? GCN on Cora (SEEDS) and DeepFM on the Criteo sample (CRITEO_SEEDS) with points after the block, after the ReLU and before it: accuracy and alignment into benchmarks/results/placements_*.md
	$(PYTHON) -m dfa_lightning.placements --recipe recipes/gcn_dfa.yaml --seeds $(SEEDS) --metric test/acc \
		--placements paper=hidden after_relu=hidden.0 before_relu=conv1 \
		--root $(LOGDIR)/placements --out benchmarks/results/placements_cora_gcn.md -- $(ARGS)
	$(PYTHON) -m dfa_lightning.placements --recipe recipes/deepfm_dfa.yaml --seeds $(CRITEO_SEEDS) --metric test/auroc \
		--placements "paper=mlp.*" "after_relu=mlp.*.2" "before_relu=mlp.*.1" \
		--root $(LOGDIR)/placements --out benchmarks/results/placements_criteo_deepfm.md \
		-- --config recipes/sample/criteo_10k.yaml $(ARGS)

MAP_SEEDS ?= 0 1 2
STACK := recipes/gcn_stack_bp.yaml recipes/gcn_stack_dfa.yaml recipes/gcn_stack_shallow.yaml
STACK_ARGS := model.model.init_args

failure-map: ## where does DFA fail? GCN stacks on Cora over depth x skip x norm, then graph x width, then where the feedback lands around BatchNorm, then the feedback-norm rescues, layer and orthogonal (MAP_SEEDS): gap to BP and alignment per layer into benchmarks/results/failure_map_cora_*.md
	$(PYTHON) -m dfa_lightning.failure_map --recipes $(STACK) --seeds $(MAP_SEEDS) --metric test/acc \
		--axis depth=$(STACK_ARGS).num_layers:2,4,8 --axis skip=$(STACK_ARGS).residual:false,true \
		--axis norm=$(STACK_ARGS).norm:none,layer,batch \
		--root $(LOGDIR)/failure_map --out benchmarks/results/failure_map_cora_depth.md -- $(ARGS)
	$(PYTHON) -m dfa_lightning.failure_map --recipes $(STACK) --seeds $(MAP_SEEDS) --metric test/acc \
		--axis graph=$(STACK_ARGS).conv:gcn,linear --axis depth=$(STACK_ARGS).num_layers:2,4 \
		--axis width=$(STACK_ARGS).hidden:16,64 \
		--root $(LOGDIR)/failure_map --out benchmarks/results/failure_map_cora_graph.md -- $(ARGS)
	$(PYTHON) -m dfa_lightning.failure_map --recipes $(STACK) --seeds $(MAP_SEEDS) --metric test/acc \
		--axis depth=$(STACK_ARGS).num_layers:2,4,8 --axis skip=$(STACK_ARGS).residual:false,true \
		--axis dropout=$(STACK_ARGS).dropout:0.1 \
		--root $(LOGDIR)/failure_map --out benchmarks/results/failure_map_cora_same_dropout.md -- $(ARGS)
	for depth in 2 8; do $(PYTHON) -m dfa_lightning.placements --recipe recipes/gcn_stack_dfa.yaml --seeds $(MAP_SEEDS) \
		--metric test/acc --placements "after_block=blocks.*" "after_norm=blocks.*.norm" "before_norm=blocks.*.conv" \
		--root $(LOGDIR)/placements/depth$$depth --out benchmarks/results/failure_map_cora_batchnorm_depth$$depth.md \
		-- --model.model.init_args.norm batch --model.model.init_args.num_layers $$depth $(ARGS) || exit 1; done
	$(PYTHON) -m dfa_lightning.failure_map --recipes recipes/gcn_stack_bp.yaml \
		benchmarks/recipes/gcn_stack_dfa_feedback_norm.yaml --seeds $(MAP_SEEDS) --metric test/acc \
		--axis depth=$(STACK_ARGS).num_layers:2,8 --axis norm=$(STACK_ARGS).norm:none,batch \
		--root $(LOGDIR)/failure_map --out benchmarks/results/failure_map_cora_feedback_norm.md -- $(ARGS)
	$(PYTHON) -m dfa_lightning.failure_map --recipes recipes/gcn_stack_bp.yaml \
		benchmarks/recipes/gcn_stack_dfa_feedback_orthogonal.yaml --seeds $(MAP_SEEDS) --metric test/acc \
		--axis depth=$(STACK_ARGS).num_layers:2,8 --axis norm=$(STACK_ARGS).norm:none,batch \
		--root $(LOGDIR)/failure_map --out benchmarks/results/failure_map_cora_feedback_orthogonal.md -- $(ARGS)

feedback-norm-parts: ## which part of LayerNorm's backward (centring, removing the radial component, 1/scale) makes feedback_norm rescue DFA on Cora with BatchNorm and hurt the deep plain stack? 6 parts x 4 cells x 3 seeds (about 25 min on 2 cores) into benchmarks/results/feedback_norm_parts_cora.md
	$(PYTHON) -m benchmarks.feedback_norm_parts --seeds $(MAP_SEEDS) --root $(LOGDIR)/feedback_norm_parts $(ARGS)

labelled-nodes: ## why BatchNorm breaks DFA on Cora: the labelled nodes' block outputs against the rest's, per rule (BP, DFA, orthogonal, DFA with the norm frozen, DFA with the bias before the norm frozen), on the public split, on 20 % labels and on the full split's 1,208 (about 35 min on one core) into benchmarks/results/labelled_nodes_cora*.md
	OMP_NUM_THREADS=1 $(PYTHON) -m benchmarks.labelled_nodes --seeds $(MAP_SEEDS) --rules bp dfa orthogonal dfa_frozen_norm dfa_frozen_bias \
		--root $(LOGDIR)/labelled_nodes $(ARGS)
	OMP_NUM_THREADS=1 $(PYTHON) -m benchmarks.labelled_nodes --seeds $(MAP_SEEDS) --rules bp dfa orthogonal dfa_frozen_norm dfa_frozen_bias \
		--split dna_kfold --root $(LOGDIR)/labelled_nodes --out benchmarks/results/labelled_nodes_cora_dna_kfold.md $(ARGS)
	OMP_NUM_THREADS=1 $(PYTHON) -m benchmarks.labelled_nodes --seeds $(MAP_SEEDS) --rules bp dfa dfa_frozen_bias orthogonal \
		--cells 2:batch 8:batch 2:none --split full --root $(LOGDIR)/labelled_nodes \
		--out benchmarks/results/labelled_nodes_cora_full.md $(ARGS)

LN_AFFINE := recipes/lm_bp.yaml recipes/lm_dfa_macro.yaml recipes/lm_dfa_micro.yaml \
	benchmarks/recipes/lm_dfa_micro_ffn_orthogonal.yaml benchmarks/recipes/lm_dfa_micro_residual_orthogonal.yaml \
	benchmarks/recipes/lm_dfa_micro_feedback_orthogonal.yaml benchmarks/recipes/lm_dfa_micro_frozen_ln.yaml \
	benchmarks/recipes/lm_dfa_micro_residual_orthogonal_frozen_ln.yaml benchmarks/recipes/lm_dfa_macro_frozen_ln.yaml \
	benchmarks/recipes/lm_dfa_macro_feedback_orthogonal.yaml

ln-affine: ## where does `orthogonal` at post-LN micro's LayerNorm outputs act? micro (and macro) DFA rescues beside the norms' scale and shift frozen, 2 seeds (about 1.3 h of one-core runs), then the gradient routes at the final weights, into benchmarks/results/{failure_map_lm_micro_ln_affine,lm_micro_ln_affine}.md
	OMP_NUM_THREADS=1 $(PYTHON) -m dfa_lightning.failure_map --recipes $(LN_AFFINE) --seeds 0 1 --metric test/ppl \
		--axis heads=$(STACK_ARGS).n_heads:4 --root $(LOGDIR)/ln_affine \
		--out benchmarks/results/failure_map_lm_micro_ln_affine.md -- --config recipes/sample/lm_wikitext2_cpu.yaml $(ARGS)
	OMP_NUM_THREADS=1 $(PYTHON) -m benchmarks.ln_affine --root $(LOGDIR)/ln_affine --seeds 0 1

ctr-bias-walk: ## does the bias before BatchNorm walk under DFA in the CTR MLPs too? DeepFM and Deep&Cross, BP and DFA, 3 seeds on the Criteo sample (about 4 min) into benchmarks/results/ctr_bias_walk.md
	OMP_NUM_THREADS=1 $(PYTHON) -m benchmarks.ctr_bias_walk --models deepfm deepcross $(ARGS)

LM_MAP := recipes/lm_bp.yaml recipes/lm_dfa_macro.yaml recipes/lm_shallow.yaml

failure-map-lm: ## where does DFA fail on a Transformer? the CPU-sized WikiText-2 LM (recipes/sample/lm_wikitext2_cpu.yaml) over depth x LayerNorm placement, then heads x macro/micro feedback, then the feedback-norm rescues (layer, orthogonal) on macro and on micro feedback (every point, then per point), seed 0, and the pre-LN rescue at seed 1 (about 3.3 h of one-core runs) into benchmarks/results/failure_map_lm*.md
	$(PYTHON) -m dfa_lightning.failure_map --recipes $(LM_MAP) --seeds 0 --metric test/ppl \
		--axis depth=$(STACK_ARGS).n_layers:2,4 --axis norm=$(STACK_ARGS).norm:post,pre \
		--root $(LOGDIR)/failure_map --out benchmarks/results/failure_map_lm.md \
		-- --config recipes/sample/lm_wikitext2_cpu.yaml $(ARGS)
	$(PYTHON) -m dfa_lightning.failure_map --recipes recipes/lm_bp.yaml recipes/lm_dfa_macro.yaml \
		recipes/lm_dfa_micro.yaml recipes/lm_shallow.yaml --seeds 0 --metric test/ppl \
		--axis heads=$(STACK_ARGS).n_heads:1,4 \
		--root $(LOGDIR)/failure_map --out benchmarks/results/failure_map_lm_attention.md \
		-- --config recipes/sample/lm_wikitext2_cpu.yaml $(ARGS)
	$(PYTHON) -m dfa_lightning.failure_map --recipes recipes/lm_bp.yaml benchmarks/recipes/lm_dfa_macro_feedback_norm.yaml \
		--seeds 0 --metric test/ppl --axis depth=$(STACK_ARGS).n_layers:2,4 --axis norm=$(STACK_ARGS).norm:post,pre \
		--root $(LOGDIR)/failure_map --out benchmarks/results/failure_map_lm_feedback_norm.md \
		-- --config recipes/sample/lm_wikitext2_cpu.yaml $(ARGS)
	$(PYTHON) -m dfa_lightning.failure_map --recipes recipes/lm_bp.yaml \
		benchmarks/recipes/lm_dfa_macro_feedback_orthogonal.yaml --seeds 0 --metric test/ppl \
		--axis depth=$(STACK_ARGS).n_layers:2,4 --axis norm=$(STACK_ARGS).norm:post,pre \
		--root $(LOGDIR)/failure_map --out benchmarks/results/failure_map_lm_feedback_orthogonal.md \
		-- --config recipes/sample/lm_wikitext2_cpu.yaml $(ARGS)
	$(PYTHON) -m dfa_lightning.failure_map --recipes recipes/lm_bp.yaml benchmarks/recipes/lm_dfa_micro_feedback_norm.yaml \
		benchmarks/recipes/lm_dfa_micro_feedback_orthogonal.yaml --seeds 0 --metric test/ppl \
		--axis heads=$(STACK_ARGS).n_heads:4 \
		--root $(LOGDIR)/failure_map --out benchmarks/results/failure_map_lm_micro_feedback_norm.md \
		-- --config recipes/sample/lm_wikitext2_cpu.yaml $(ARGS)
	$(PYTHON) -m dfa_lightning.failure_map --recipes recipes/lm_bp.yaml benchmarks/recipes/lm_dfa_micro_ffn_orthogonal.yaml \
		benchmarks/recipes/lm_dfa_micro_residual_orthogonal.yaml --seeds 0 --metric test/ppl \
		--axis heads=$(STACK_ARGS).n_heads:4 \
		--root $(LOGDIR)/failure_map --out benchmarks/results/failure_map_lm_micro_feedback_norm_per_point.md \
		-- --config recipes/sample/lm_wikitext2_cpu.yaml $(ARGS)
	$(PYTHON) -m dfa_lightning.failure_map --recipes recipes/lm_bp.yaml recipes/lm_dfa_macro.yaml \
		benchmarks/recipes/lm_dfa_macro_feedback_norm.yaml benchmarks/recipes/lm_dfa_macro_feedback_orthogonal.yaml \
		--seeds 1 --metric test/ppl --axis depth=$(STACK_ARGS).n_layers:2 --axis norm=$(STACK_ARGS).norm:pre \
		--root $(LOGDIR)/failure_map --out benchmarks/results/failure_map_lm_pre_ln_seed1.md \
		-- --config recipes/sample/lm_wikitext2_cpu.yaml $(ARGS)

rules = $(foreach m,$(2),recipes/$(1)_$(m).yaml)
transport-map: ## where is W^T still used? one audited training step per recipe (BP, DFA, shallow of every task): tables and model diagrams into benchmarks/results/weight_transport_*.md (about 5 min; SplineConv audited with its plain-PyTorch kernels: the same layer)
	$(PYTHON) -m dfa_lightning.transport_map --out benchmarks/results/weight_transport_graphs.md --recipes \
		$(call rules,gcn,bp dfa shallow) $(call rules,gat,bp dfa) $(call rules,cheb,bp dfa) \
		$(call rules,dna,bp dfa) $(call rules,gae,bp dfa) -- $(ARGS)
	$(PYTHON) -m dfa_lightning.transport_map --out benchmarks/results/weight_transport_spline.md --recipes \
		$(call rules,spline,bp dfa) -- --model.model.init_args.kernels torch $(ARGS)
	$(PYTHON) -m dfa_lightning.transport_map --out benchmarks/results/weight_transport_ctr.md --recipes \
		$(call rules,deepfm,bp dfa) $(call rules,deepcross,bp dfa) $(call rules,autoint,bp dfa) \
		$(call rules,afn,bp dfa) -- --config recipes/sample/criteo_10k.yaml $(ARGS)
	$(PYTHON) -m dfa_lightning.transport_map --out benchmarks/results/weight_transport_lm.md --recipes \
		$(call rules,lm,bp dfa_macro dfa_micro dfa_macro_after_vocab shallow) -- $(ARGS)
	$(PYTHON) -m dfa_lightning.transport_map --out benchmarks/results/weight_transport_nerf.md --recipes \
		$(call rules,nerf,bp dfa shallow) -- --data.init_args.folder nerf_synthetic_100px $(ARGS)

clean: ## remove logs and checkpoints (not the data cache)
	rm -rf $(LOGDIR) checkpoints lightning_logs
