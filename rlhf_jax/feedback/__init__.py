"""How pairs get labelled by a model instead of a person (RLAIF, Constitutional AI).

  constitution  a versionable file of principles + the prompt templates that put them
                to a model (plain text or a chat template); validated, errors name file
                and field
  models        a feedback model: an rlhf_jax run or a Hugging Face directory, with its
                tokenizer and chat template; batched encoding and sampling of texts
  judge         the AI labeller: P(a > b) from the judge's next-token probabilities of
                the two option labels, both orders averaged (position bias reported);
                writes the preference dataset format with the log-odds as `margin`
  revision      critique and revision (SL-CAI): (prompt, revision) demonstrations
  direct        direct RLAIF (d-RLAIF): the judge's yes/no log-odds about one response as
                the RL reward itself, reward "judge" (`config.rl.reward = "judge"`)

Entry points: `experiments.label_preferences --labeler=ai` and
`experiments.critique_revise`. The simulated annotators stay in the testbed
(`rlhf_jax/testbed/annotators.py`): they need gold scores, which only a testbed has.
"""
