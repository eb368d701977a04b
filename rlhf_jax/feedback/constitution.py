"""A constitution: written principles and the prompt templates that put them to a model.

A constitution file (JSON, or YAML when PyYAML is installed) holds:

  name, version         what the file is (recorded with every dataset made from it)
  principles            [{name, critique_request, revision_request, comparison_question,
                        verdict_question}]; verdict_question is optional, but every
                        principle needs one when there is a verdict template
  options               the two answer labels of a comparison, e.g. ["A", "B"]; each
                        must be one token of the judge's tokenizer
  verdict_options       the two answer labels of a verdict, meaning [yes, no], e.g.
                        ["Y", "N"]; one token each; required with a verdict template
  templates             one per task, each {user, answer}: `user` is the request (a user
                        turn), `answer` the start of the model's reply (it may hold
                        {prompt}), after which the model writes (a critique, a revision)
                        or names an option (comparison)
    response            {prompt}: how a prompt is put to the policy (SL-CAI's first sample)
    critique            {prompt} {response} {critique_request}
    revision            {prompt} {response} {critique_request} {critique} {revision_request}
    comparison          {prompt} {response_a} {response_b} {question}
    verdict             optional: {prompt} {response} {question} ({response} and
                        {question} required): the judge answers yes/no about one
                        response, its log-odds the reward of direct RLAIF
                        (`feedback/direct.py`)
  formats               how a (user, answer) turn becomes text:
    plain               {preamble}: text = preamble + user + answer, after a BOS token
    chat                {system}: the model's chat template renders [system, user] with
                        add_generation_prompt, then `answer` is appended (no BOS added:
                        the template writes its own)

Placeholders are `str.format` fields ({{ and }} for literal braces); a template that
lacks a required placeholder or names an unknown one is an error. Every error names the
file and the field (`principles[1].revision_request`), and bad JSON its line.
"""

import dataclasses
import hashlib
import json
import os
import string
from typing import Any, Mapping, Sequence

import numpy as np

PRINCIPLE_FIELDS = ("name", "critique_request", "revision_request", "comparison_question")
OPTIONAL_PRINCIPLE_FIELDS = ("verdict_question",)
TEMPLATE_FIELDS = ("user", "answer")
# task -> (required placeholders, allowed placeholders)
TASKS = {
    "response": ({"prompt"}, {"prompt"}),
    "critique": ({"response", "critique_request"}, {"prompt", "response", "critique_request"}),
    "revision": ({"response", "critique", "revision_request"},
                 {"prompt", "response", "critique_request", "critique", "revision_request"}),
    "comparison": ({"response_a", "response_b", "question"},
                   {"prompt", "response_a", "response_b", "question"}),
    "verdict": ({"response", "question"}, {"prompt", "response", "question"}),
}
OPTIONAL_TASKS = ("verdict",)   # a file may leave these templates out
FORMATS = {"plain": ("preamble",), "chat": ("system",)}
TOP_LEVEL = ("name", "version", "principles", "options", "verdict_options", "templates",
             "formats")
# How principles are chosen for a pair or a prompt: one drawn per item with a seed, all
# of them (the judge's probabilities averaged), or one named principle.
PRINCIPLE_MODES = ("sample", "all")


class ConstitutionError(ValueError):
  """A malformed constitution file; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Principle:
  name: str
  critique_request: str
  revision_request: str
  comparison_question: str
  verdict_question: str = ""    # '' when the file has no verdict template


@dataclasses.dataclass(frozen=True)
class Template:
  user: str     # the request, with placeholders
  answer: str   # the start of the model's reply


@dataclasses.dataclass(frozen=True)
class Constitution:
  name: str
  version: str
  principles: tuple[Principle, ...]
  options: tuple[str, str]
  templates: Mapping[str, Template]     # keys: TASKS (those of OPTIONAL_TASKS when present)
  formats: Mapping[str, Mapping[str, str]]
  path: str = ""
  digest: str = ""                      # sha256 of the file's bytes, first 12 hex digits
  verdict_options: tuple[str, str] | None = None   # [yes, no]; None when the file has none

  @property
  def has_verdict(self) -> bool:
    """Whether the file has a verdict template (then every principle has a question)."""
    return "verdict" in self.templates

  def principle(self, name: str) -> Principle:
    for p in self.principles:
      if p.name == name:
        return p
    raise ValueError(f"{self.path or 'constitution'}: no principle {name!r} (principles: "
                     f"{', '.join(p.name for p in self.principles)})")

  def turn(self, task: str, **fields: str) -> tuple[str, str]:
    """(user, answer) of `task`'s template with `fields` filled in."""
    template = self.templates[task]
    return template.user.format(**fields), template.answer.format(prompt=fields.get("prompt", ""))

  def describe(self) -> dict:
    """What a dataset records about the constitution it was made with."""
    return {"path": os.path.abspath(self.path) if self.path else "", "name": self.name,
            "version": self.version, "digest": self.digest,
            "principles": [p.name for p in self.principles]}


def _fail(path: str, field: str, message: str):
  raise ConstitutionError(f"{path}: field {field}: {message}")


def _check_keys(path: str, field: str, value: Any, required: Sequence[str],
                optional: Sequence[str] = ()) -> dict:
  if not isinstance(value, Mapping):
    _fail(path, field, f"expected an object, got {type(value).__name__}")
  known = tuple(required) + tuple(optional)
  for key in value:
    if key not in known:
      _fail(path, f"{field}.{key}" if field else key,
            f"unknown key (expected one of {', '.join(known)})")
  for key in required:
    if key not in value:
      _fail(path, f"{field}.{key}" if field else key, "missing")
  return dict(value)


def _string(path: str, field: str, value: Any, allow_empty: bool = False) -> str:
  if not isinstance(value, str):
    _fail(path, field, f"expected a string, got {type(value).__name__} ({value!r:.40})")
  if not allow_empty and not value.strip():
    _fail(path, field, "is empty")
  return value


def _placeholders(path: str, field: str, text: str) -> set[str]:
  try:
    parsed = list(string.Formatter().parse(text))
  except ValueError as e:
    _fail(path, field, f"not a valid template ({e}); write literal braces as {{{{ and }}}}")
  names = set()
  for _, name, spec, conversion in parsed:
    if name is None:
      continue
    if not name.isidentifier() or spec or conversion:
      _fail(path, field, f"placeholder {{{name}}} must be a plain name such as {{prompt}}")
    names.add(name)
  return names


def _parse(path: str, text: str) -> Any:
  if path.endswith((".yaml", ".yml")):
    try:
      import yaml  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConstitutionError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), "
                              "or write the constitution as JSON") from None
    try:
      return yaml.safe_load(text)
    except yaml.YAMLError as e:
      mark = getattr(e, "problem_mark", None)
      where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
      raise ConstitutionError(f"{path}: {where}invalid YAML: "
                              f"{getattr(e, 'problem', None) or e}") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ConstitutionError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON: "
                            f"{e.msg}") from None


def _two_labels(path: str, field: str, value: Any) -> tuple[str, str]:
  if (not isinstance(value, list) or len(value) != 2
      or not all(isinstance(o, str) and o for o in value) or value[0] == value[1]):
    _fail(path, field, f"expected two different non-empty strings, got {value!r}")
  return value[0], value[1]


def from_dict(data: Any, path: str = "<constitution>", digest: str = "") -> Constitution:
  """Validates a parsed constitution; `path` names it in errors."""
  top = _check_keys(path, "", data, ("name", "principles", "templates"),
                    ("version", "options", "verdict_options", "formats"))
  name = _string(path, "name", top["name"])
  version = top.get("version", "1")
  if isinstance(version, bool) or not isinstance(version, (str, int)):
    _fail(path, "version", f"expected a string or an int, got {type(version).__name__}")

  principles_value = top["principles"]
  if not isinstance(principles_value, list) or not principles_value:
    _fail(path, "principles", "expected a non-empty list of principles")
  principles, seen = [], set()
  for i, value in enumerate(principles_value):
    field = f"principles[{i}]"
    fields = _check_keys(path, field, value, PRINCIPLE_FIELDS, OPTIONAL_PRINCIPLE_FIELDS)
    texts = {k: _string(path, f"{field}.{k}", fields[k])
             for k in PRINCIPLE_FIELDS + OPTIONAL_PRINCIPLE_FIELDS if k in fields}
    if texts["name"] in seen:
      _fail(path, f"{field}.name", f"{texts['name']!r} names an earlier principle too")
    seen.add(texts["name"])
    principles.append(Principle(**texts))

  options = _two_labels(path, "options", top.get("options", ["A", "B"]))

  templates_value = _check_keys(path, "templates", top["templates"],
                                tuple(t for t in TASKS if t not in OPTIONAL_TASKS),
                                OPTIONAL_TASKS)
  templates = {}
  for task, (required, allowed) in TASKS.items():
    if task not in templates_value:
      continue
    field = f"templates.{task}"
    fields = _check_keys(path, field, templates_value[task], ("user",), ("answer",))
    user = _string(path, f"{field}.user", fields["user"])
    answer = _string(path, f"{field}.answer", fields.get("answer", ""), allow_empty=True)
    extra = _placeholders(path, f"{field}.answer", answer) - {"prompt"}
    if extra:
      _fail(path, f"{field}.answer", f"unknown placeholder(s) "
            f"{', '.join('{%s}' % n for n in sorted(extra))} (allowed: {{prompt}})")
    found = _placeholders(path, f"{field}.user", user)
    if found - allowed:
      _fail(path, f"{field}.user", f"unknown placeholder(s) "
            f"{', '.join('{%s}' % n for n in sorted(found - allowed))} (allowed: "
            f"{', '.join('{%s}' % n for n in sorted(allowed))})")
    if required - found:
      _fail(path, f"{field}.user", f"missing placeholder(s) "
            f"{', '.join('{%s}' % n for n in sorted(required - found))}")
    templates[task] = Template(user=user, answer=answer)

  verdict_options = None
  if "verdict" in templates:
    for i, principle in enumerate(principles):
      if not principle.verdict_question:
        _fail(path, f"principles[{i}].verdict_question",
              "missing (every principle needs one: the file has a templates.verdict)")
    if "verdict_options" not in top:
      _fail(path, "verdict_options", 'missing (templates.verdict needs the two answer labels '
            '[yes, no], e.g. ["Y", "N"])')
  if "verdict_options" in top:
    verdict_options = _two_labels(path, "verdict_options", top["verdict_options"])

  formats_value = _check_keys(path, "formats", top.get("formats", {}), (), tuple(FORMATS))
  formats = {}
  for fmt, keys in FORMATS.items():
    fields = _check_keys(path, f"formats.{fmt}", formats_value.get(fmt, {}), (), keys)
    formats[fmt] = {k: _string(path, f"formats.{fmt}.{k}", fields.get(k, ""), allow_empty=True)
                    for k in keys}
  return Constitution(name=name, version=str(version), principles=tuple(principles),
                      options=options, templates=templates, formats=formats,
                      path=path, digest=digest, verdict_options=verdict_options)


def load(path: str) -> Constitution:
  """Reads and validates a constitution file (.json, or .yaml / .yml)."""
  if not os.path.isfile(path):
    raise ConstitutionError(f"{path}: no such constitution file")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ConstitutionError(f"{path}: not UTF-8 text ({e})") from None
  return from_dict(_parse(path, text), path, hashlib.sha256(raw).hexdigest()[:12])


def choose_principles(constitution: Constitution, count: int, mode: str,
                      seed: int) -> list[tuple[int, ...]]:
  """The principles (indices) each of `count` items is judged or revised under.

  mode: 'sample' (one per item, uniform, from `np.random.default_rng(seed)`), 'all'
  (every principle: their probabilities are averaged) or a principle's name.
  """
  if mode == "all":
    return [tuple(range(len(constitution.principles)))] * count
  if mode == "sample":
    draws = np.random.default_rng(seed).integers(0, len(constitution.principles), size=count)
    return [(int(d),) for d in draws]
  names = [p.name for p in constitution.principles]
  if mode not in names:
    raise ValueError(f"principles={mode!r}: expected 'sample', 'all' or a principle of "
                     f"{constitution.path or constitution.name} ({', '.join(names)})")
  return [(names.index(mode),)] * count


# ---------------------------------------------------------------------------------------
# Prompt formats: a (user, answer) turn -> the text a model continues.

@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How a turn becomes text. kind 'plain': preamble + user + answer (a BOS token is
  prepended at tokenisation, as for training prompts); 'chat': a Jinja chat template
  (Hugging Face's `tokenizer_config.json` convention) renders the messages with
  `add_generation_prompt=True`, then the answer is appended."""
  kind: str                      # 'plain' | 'chat'
  preamble: str = ""             # plain
  system: str = ""               # chat
  chat_template: str = ""        # chat: Jinja source
  special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @property
  def add_bos(self) -> bool:
    return self.kind == "plain"

  def render(self, turn: tuple[str, str]) -> str:
    """(user, answer) -> the text the model continues."""
    user, answer = turn
    if self.kind == "plain":
      return self.preamble + user + answer
    messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
        {"role": "user", "content": user}]
    return render_chat(self.chat_template, messages, self.special_tokens) + answer


def make_format(constitution: Constitution, kind: str, chat_template: str = "",
                special_tokens: Mapping[str, str] | None = None) -> PromptFormat:
  """kind: 'plain', 'chat' (needs `chat_template`) or 'auto' (chat when there is a template)."""
  if kind == "auto":
    kind = "chat" if chat_template else "plain"
  if kind not in FORMATS:
    raise ValueError(f"prompt_format={kind!r}: expected 'auto', 'plain' or 'chat'")
  if kind == "chat" and not chat_template:
    raise ValueError("prompt_format='chat' needs a chat template: the model's "
                     "tokenizer_config.json 'chat_template', or pass a .jinja file")
  return PromptFormat(kind=kind, preamble=constitution.formats["plain"]["preamble"],
                      system=constitution.formats["chat"]["system"],
                      chat_template=chat_template if kind == "chat" else "",
                      special_tokens=dict(special_tokens or {}))


def _raise_exception(message):
  raise ValueError(f"chat template: {message}")


def render_chat(template: str, messages: list[dict], special_tokens: Mapping[str, str],
                add_generation_prompt: bool = True) -> str:
  """Renders a Hugging Face chat template (Jinja) as `apply_chat_template(tokenize=False)`
  does: sandboxed, trim_blocks and lstrip_blocks, `raise_exception` available."""
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = _raise_exception
  try:
    compiled = env.from_string(template)
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           **special_tokens)
  except jinja2.TemplateError as e:
    raise ValueError(f"chat template: {type(e).__name__}: {e}") from None
