"""Direct RLAIF: verdict scores against a hand-computed difference of the judge's logits at
the yes/no tokens, the average over principles, malformed verdict sections, config errors,
and the reward 'judge' scoring a rollout and running GRPO iterations."""

import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import grpo as grpo_config
from configs import ppo as ppo_config
from rlhf_jax.feedback import constitution as constitution_lib
from rlhf_jax.feedback import direct
from rlhf_jax.rl import models as models_lib
from rlhf_jax.rl import rewards
from rlhf_jax.rl import rollout as rollout_lib
from rlhf_jax.stages import ppo
from rlhf_jax.train import sharding as sharding_lib
from rlhf_jax.train import validate
from tests.feedback import tiny
from tests.feedback.test_constitution import DEFAULT, default_dict, write

PROMPTS = ["The film", "Honestly, the acting was", "I"]
RESPONSES = [" was a joy from start to finish.", " wooden.", " hated every minute of it."]
# Cheaper compiles for the tiny RL programs (as tests/stages/test_ppo.py).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
QUESTIONS = ["Does the review criticise the film without insulting any person?",
             "Is the review's opinion of the film clear and specific?"]


def verdict_dict():
  """The shipped constitution plus a verdict section."""
  data = copy.deepcopy(default_dict())
  for principle, question in zip(data["principles"], QUESTIONS):
    principle["verdict_question"] = question
  data["verdict_options"] = ["Y", "N"]
  data["templates"]["verdict"] = {"user": "Review: {prompt}{response}\nQuestion: {question}\n",
                                  "answer": "Answer (Y/N): "}
  return data


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("direct")
  tiny.write_run(str(root / "judge"), seed=5)
  return {"judge": str(root / "judge"), "constitution": write(root, verdict_dict()),
          "root": root}


@pytest.fixture(scope="module")
def lm():
  return tiny.byte_lm(seed=2)


def hand_gap(model, params, prompt, response, question):
  """logit[Y] - logit[N] after the hand-written verdict text: a full forward pass."""
  text = f"Review: {prompt}{response}\nQuestion: {question}\nAnswer (Y/N): "
  logits = tiny.full_forward_last_logits(model, params, tiny.byte_ids(text))
  return logits[ord("Y") + 3] - logits[ord("N") + 3]


def test_verdict_scores_are_the_yes_no_logit_difference_averaged(lm, files):
  c = constitution_lib.load(files["constitution"])
  fmt = constitution_lib.make_format(c, "plain")
  hand = np.array([[hand_gap(lm.model, lm.params, p, r, q) for q in QUESTIONS]
                   for p, r in zip(PROMPTS, RESPONSES)])                  # [N, S]
  assert np.ptp(hand) > 0.05                # the random judge tells the texts apart
  # batch_size 2: several padded batches (6 rows for 'all').
  scores = direct.verdict_scores(lm, c, fmt, PROMPTS, RESPONSES, "all", batch_size=2, bucket=64)
  assert scores.dtype == np.float64 and scores.shape == (3,)
  np.testing.assert_allclose(scores, hand.mean(axis=1), rtol=1e-4, atol=1e-4)
  for s, name in enumerate(["harmless", "helpful"]):
    one = direct.verdict_scores(lm, c, fmt, PROMPTS, RESPONSES, name, batch_size=4)
    np.testing.assert_allclose(one, hand[:, s], rtol=1e-4, atol=1e-4)
  assert direct.verdict_scores(lm, c, fmt, [], []).shape == (0,)


def test_verdict_errors(lm, files):
  c = constitution_lib.load(files["constitution"])
  fmt = constitution_lib.make_format(c, "plain")
  with pytest.raises(ValueError, match=r"principles='kind': expected 'all' or a principle .*"
                                       r"harmless, helpful"):
    direct.verdict_scores(lm, c, fmt, PROMPTS, RESPONSES, "kind")
  with pytest.raises(ValueError, match=f"{DEFAULT}: no templates.verdict"):
    direct.verdict_scores(lm, constitution_lib.load(DEFAULT), fmt, PROMPTS, RESPONSES)
  data = verdict_dict()
  data["verdict_options"] = ["Yes", "No"]
  path = write(files["root"], data, "multi_token.json")
  with pytest.raises(ValueError, match=rf"{path}: field verdict_options: option 'Yes' is 3 "
                                       "tokens"):
    direct.verdict_scores(lm, constitution_lib.load(path), fmt, PROMPTS, RESPONSES)


def test_a_file_without_a_verdict_section_still_loads():
  c = constitution_lib.load(DEFAULT)
  assert not c.has_verdict and c.verdict_options is None
  assert all(p.verdict_question == "" for p in c.principles)


@pytest.mark.parametrize("edit,field,message", [
    (lambda d: d["principles"][1].pop("verdict_question"), "principles[1].verdict_question",
     "missing (every principle needs one"),
    (lambda d: d["principles"][0].update(verdict_question=3), "principles[0].verdict_question",
     "expected a string, got int"),
    (lambda d: d.pop("verdict_options"), "verdict_options", "missing"),
    (lambda d: d.update(verdict_options=["Y", "Y"]), "verdict_options", "two different"),
    (lambda d: d.update(verdict_options="YN"), "verdict_options", "two different"),
    (lambda d: d["templates"]["verdict"].update(user="{prompt}{response}"),
     "templates.verdict.user", "missing placeholder(s) {question}"),
    (lambda d: d["templates"]["verdict"].update(user="{response_a} {response} {question}"),
     "templates.verdict.user", "unknown placeholder(s) {response_a}"),
    (lambda d: d["templates"]["verdict"].update(answer="{question}"),
     "templates.verdict.answer", "unknown placeholder(s) {question}"),
    (lambda d: d["templates"]["verdict"].pop("user"), "templates.verdict.user", "missing"),
])
def test_malformed_verdict_sections_are_named(tmp_path, edit, field, message):
  data = verdict_dict()
  edit(data)
  path = write(tmp_path, data)
  with pytest.raises(constitution_lib.ConstitutionError) as e:
    constitution_lib.load(path)
  assert str(e.value).startswith(f"{path}: field {field}: ") and message in str(e.value)


# ------------------------------------------------------------------------ the reward

def judge_config(files, **rl_fields):
  """A tiny GRPO config (4 prompts x 2 samples) with reward 'judge'; no data source."""
  c = grpo_config.get_config()
  c.model = ppo_config.base.model_config("tiny")
  c.model.update(num_layers=1, max_len=32)
  c.data.update(prompt_len=16, batch_size=4)
  c.mesh.update(data=2, fsdp=1, tensor=1)
  c.rl.update(samples_per_prompt=2, epochs=1, num_minibatches=1, reward="judge",
              reward_checkpoint="", judge=files["judge"],
              judge_constitution=files["constitution"], judge_batch_size=4)
  c.rl.update(**rl_fields)
  c.sampling.update(max_new_tokens=8, temperature=1.0)
  c.optimizer.update(learning_rate=1e-3, warmup_steps=0)
  return c


def prompt_batch(texts, length, samples):
  """Left-padded byte prompts [len(texts) * samples, length], BOS first, each repeated."""
  ids = [tiny.byte_ids(t) for t in texts for _ in range(samples)]
  tokens, mask = np.zeros((len(ids), length), np.int32), np.zeros((len(ids), length), np.int32)
  for i, row in enumerate(ids):
    tokens[i, length - len(row):], mask[i, length - len(row):] = row, 1
  return jnp.asarray(tokens), jnp.asarray(mask)


def one_device_mesh():
  return sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                                jax.devices()[:1])


def test_config_errors_name_the_field(files):
  mesh = one_device_mesh()
  assert validate.problems(judge_config(files), mesh) == []
  cases = [
      (dict(judge=""), r"config.rl.judge='': reward 'judge' needs the judge"),
      (dict(judge=str(files["root"])), r"config.rl.judge='.*': no config.json there"),
      (dict(judge_constitution=""), r"config.rl.judge_constitution='': reward 'judge' needs"),
      (dict(judge_constitution=DEFAULT), r"config.rl.judge_constitution='.*': the file has no "
                                         r"templates.verdict"),
      (dict(judge_principles="kind"), r"config.rl.judge_principles='kind': expected 'all' or "
                                      r"a principle of .*\(harmless, helpful\)"),
      (dict(judge_batch_size=0), r"config.rl.judge_batch_size=0: expected an int >= 1"),
      (dict(judge_prompt_format="html"), r"config.rl.judge_prompt_format='html'"),
  ]
  for fields, message in cases:
    config = judge_config(files, **fields)
    with pytest.raises(validate.ConfigError, match=message):
      validate.check(config, mesh)
    with pytest.raises(ValueError, match="reward 'judge': " + message):
      rewards.get(config).make_fn(config, None)
  bad = verdict_dict()
  bad["principles"][0].pop("verdict_question")
  path = write(files["root"], bad, "bad.json")
  with pytest.raises(validate.ConfigError, match=rf"config.rl.judge_constitution='{path}': "
                     rf"{path}: field principles\[0\].verdict_question: missing"):
    validate.check(judge_config(files, judge_constitution=path), mesh)


def test_more_than_two_devices_is_refused_at_start_up(files):
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=1, tensor=1)),
                                jax.devices()[:4])
  with pytest.raises(validate.ConfigError, match="reward='judge' over 4 devices"):
    validate.check(judge_config(files), mesh)


def decode_bytes(tokens, mask):
  """Byte-tokenizer decoding by hand: ids 3..258 are bytes, the rest dropped."""
  return [bytes(int(t) - 3 for t, m in zip(row, keep) if m and 3 <= t < 259).decode(
      "utf-8", errors="replace") for row, keep in zip(np.asarray(tokens), np.asarray(mask))]


def test_rollout_scores_are_the_verdicts_of_its_decoded_texts(files):
  """The reward inside a jitted rollout on a 2-device mesh (the judge's jitted forward runs
  in the host callback) equals verdict_scores of the prompt and response decoded apart."""
  config = judge_config(files, judge_principles="helpful")
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:2])
  prompts = ["The film was", "Honestly,", "I", "A slow and"]
  tokens, mask = prompt_batch(prompts, config.data.prompt_len, 2)
  models = models_lib.make_models(config)
  reward_fn = rewards.get(config).make_fn(config, models)
  with jax.set_mesh(mesh):
    state = ppo.init(config, jax.random.key(0), mesh)
    args = (state.params, state.extras, tokens, mask, jax.random.key(3))
    rollout = jax.jit(lambda prm, ext, t, m, r: rollout_lib.rollout(
        config, models, reward_fn, prm, ext, t, m, r)).lower(*args).compile(FAST_COMPILE)
    out = jax.device_get(rollout(*args))
  responses = decode_bytes(out["response_tokens"], out["response_mask"])
  assert len(set(responses)) > 1
  c = constitution_lib.load(files["constitution"])
  judge_lm = direct._load_judge(files["judge"])
  expected = direct.verdict_scores(judge_lm, c, constitution_lib.make_format(c, "plain"),
                                   [p for p in prompts for _ in range(2)], responses, "helpful",
                                   batch_size=3)
  assert np.ptp(expected) > 0.01
  np.testing.assert_allclose(out["scores"], expected, rtol=1e-5, atol=1e-5)
  # ... and the hand-computed logit difference of the first row.
  first = hand_gap(judge_lm.model, judge_lm.params, prompts[0], responses[0], QUESTIONS[1])
  np.testing.assert_allclose(out["scores"][0], first, rtol=1e-4, atol=1e-4)


def test_grpo_iterations_with_the_judge_as_reward(files, monkeypatch):
  """Two GRPO iterations; each step's mean score is the mean verdict of the texts the
  judge was shown: the step's own prompts, the responses it sampled."""
  calls = []
  real = direct.verdict_scores

  def recorded(lm, c, fmt, prompts, responses, *args, **kwargs):
    scores = real(lm, c, fmt, prompts, responses, *args, **kwargs)
    calls.append((list(prompts), list(responses), scores))
    return scores

  monkeypatch.setattr(direct, "verdict_scores", recorded)
  config = judge_config(files)
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:2])
  prompts = ["The film was", "Honestly,", "I", "A slow and"]
  batch = dict(zip(("prompt_tokens", "prompt_mask"),
                   prompt_batch(prompts, config.data.prompt_len, 1)))
  with jax.set_mesh(mesh):
    state = ppo.init(config, jax.random.key(0), mesh)
    step = jax.jit(ppo.make_step(config)).lower(state, batch, jax.random.key(0)).compile(
        FAST_COMPILE)
    history = []
    for i in range(2):
      state, metrics = step(state, batch, jax.random.key(i))
      history.append(jax.device_get(metrics))
  assert len(calls) == 2
  c = constitution_lib.load(files["constitution"])
  judge_lm = direct._load_judge(files["judge"])
  for (seen_prompts, responses, scores), metrics in zip(calls, history):
    assert seen_prompts == [p for p in prompts for _ in range(2)]
    expected = real(judge_lm, c, constitution_lib.make_format(c, "plain"), seen_prompts,
                    responses, "all", batch_size=8)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert metrics["score"] == pytest.approx(np.mean(expected), abs=1e-5)
    assert metrics["score_std"] == pytest.approx(np.std(expected), abs=1e-5)
    assert np.isfinite(metrics["loss"])
  assert calls[0][1] != calls[1][1]
