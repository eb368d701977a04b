"""Shared defaults for every stage. A field's meaning is the comment beside it."""

import ml_collections


def model_config(size: str = "tiny") -> ml_collections.ConfigDict:
  """Decoder config. `size` picks a preset; every field can be overridden."""
  m = ml_collections.ConfigDict()
  m.vocab_size = 264          # byte tokenizer: 256 bytes + pad/bos/eos, rounded up to a multiple of 8
  m.embed_dim = 128           # width of the residual stream
  m.num_layers = 2
  m.num_heads = 4             # query heads
  m.num_kv_heads = 4          # key/value heads; < num_heads is grouped-query attention
  m.head_dim = 32
  m.mlp_dim = 384             # hidden width of the MLP
  m.max_len = 256             # longest sequence (learned positions, rotary cache)
  m.norm = "rms"              # "rms" (Llama) or "layer" (GPT-2)
  m.norm_eps = 1e-5
  m.position = "rope"         # "rope" (Llama) or "learned" (GPT-2)
  m.rope_theta = 10000.0
  m.mlp = "swiglu"            # "swiglu" (Llama) or "gelu" (GPT-2)
  m.use_bias = False          # biases on every dense layer (GPT-2)
  m.qkv_bias = False          # biases on q, k, v only (Qwen2)
  m.tie_embeddings = True     # LM head shares the token embedding
  m.dtype = "float32"         # compute dtype
  m.param_dtype = "float32"   # parameter (master weight) dtype
  m.remat = "none"            # activation rematerialisation: "none", "full", "dots"
  if size == "tiny":          # unit tests: compiles in seconds
    m.update(embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
             mlp_dim=192, max_len=128)
  elif size == "small":       # the testbed model: a few million parameters
    m.update(embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64,
             mlp_dim=768, max_len=128)
  elif size == "bench":       # fixed benchmark model
    m.update(embed_dim=512, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=64,
             mlp_dim=1536, max_len=256)
  else:
    raise ValueError(f"config.model: unknown size preset {size!r}")
  return m


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "sft"             # which rlhf_jax.stages module runs: sft, pretrain, reward, dpo, ppo
  c.seed = 0                  # seeds init, data order, dropout-free sampling: the run is a function of (config, seed)
  c.model = model_config("tiny")

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "byte"   # "byte" (no file needed) or "json" (a Hugging Face tokenizer.json)
  c.tokenizer.path = ""       # tokenizer.json path when kind == "json"

  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = ""      # initialise params from this workdir's latest checkpoint (or a step dir)
  c.init.hf_dir = ""          # initialise from a Hugging Face directory

  c.data = ml_collections.ConfigDict()
  c.data.seq_len = 128        # tokens per training example (prompt + response), padded or truncated
  c.data.batch_size = 16      # global batch size, examples per optimizer step
  c.data.eval_batch_size = 32
  c.data.data_dir = ""        # where TFDS datasets are prepared; "" means <workdir>/data
  c.data.source = "testbed"   # testbed | jsonl | alpaca | hh | dataset (see rlhf_jax/data/sources.py)
  c.data.train_file = ""      # JSONL(.gz) file for the jsonl / alpaca / hh sources
  c.data.eval_file = ""       # held-out file; "" splits eval_fraction off train_file
  c.data.eval_fraction = 0.1
  c.data.split_seed = 0       # seeds that split, independent of the run seed
  c.data.on_error = "raise"   # malformed record: "raise" (naming file:line) or "skip" (counted)
  c.data.dataset_dir = ""     # a prepared dataset, for source "dataset"
  c.data.corpus_seed = 0      # testbed corpus: the same seed gives the same corpus byte for byte
  c.data.corpus_train = 100_000
  c.data.corpus_test = 5_000
  c.data.max_train_records = 0   # train on the first N records of the train split (0: all)
  c.data.prompt_len = 32      # left-padded prompt length for sampling stages

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3   # peak learning rate
  c.optimizer.schedule = "cosine"    # "cosine", "linear" or "constant" after warm-up
  c.optimizer.warmup_steps = 20
  c.optimizer.end_lr_fraction = 0.1  # final lr as a fraction of the peak
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 1.0   # global-norm clipping; 0 disables
  c.optimizer.grad_accum_steps = 1   # micro-batches per update (summed in a lax.scan: train/step.gradients)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 200
  c.train.log_every = 10
  c.train.eval_every = 100           # 0 disables periodic eval (a final eval always runs)
  c.train.eval_batches = 4           # batches per evaluation
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 2         # the latest N checkpoints are kept; 0 keeps all

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                   # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  # Logical axis name -> mesh axes. FSDP shards the embed dim of weights over 'fsdp';
  # tensor parallelism shards heads and MLP over 'tensor'.
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = (
      ("batch", ("data", "fsdp")),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("head_dim", None),
      ("layers", None),
  )

  # Sampling from a policy: evaluation, preference labelling, PPO rollouts.
  c.sampling = ml_collections.ConfigDict()
  c.sampling.max_new_tokens = 48     # response tokens after the prompt
  c.sampling.temperature = 1.0       # logits / temperature (1: the policy itself, as the KL needs)
  c.sampling.top_k = 0               # 0: no top-k filtering
  c.sampling.top_p = 1.0             # 1: no nucleus filtering
  c.sampling.eval_prompts = 256      # held-out prompts per policy evaluation
  c.sampling.eval_batch_size = 64    # prompts per sampling call
  c.sampling.eval_texts = 4          # sampled texts (prompt + response) kept in eval metrics
  c.sampling.gold_reward = "gold"    # text reward (rlhf_jax/rl/rewards.py) behind the sampled
                                     # evaluation's gold_* metrics; "" for none. "gold" is the
                                     # testbed's VADER, registered by importing rlhf_jax.testbed
  return c
