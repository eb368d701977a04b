"""Constitution files: the shipped one loads; malformed ones fail naming file and field."""

import copy
import json
import os

import pytest

from rlhf_jax.feedback import constitution as constitution_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT = os.path.join(ROOT, "configs", "constitutions", "sentiment_reviews.json")
CHATML = os.path.join(ROOT, "configs", "constitutions", "chatml.jinja")


def default_dict():
  with open(DEFAULT) as f:
    return json.load(f)


def write(tmp_path, data, name="c.json"):
  path = str(tmp_path / name)
  with open(path, "w") as f:
    f.write(data if isinstance(data, str) else json.dumps(data, indent=2))
  return path


def test_shipped_constitution_renders_both_formats():
  c = constitution_lib.load(DEFAULT)
  assert [p.name for p in c.principles] == ["harmless", "helpful"] and c.options == ("A", "B")
  assert len(c.digest) == 12
  fields = dict(prompt="The film", response_a=" was fine.", response_b=" was dull.",
                question=c.principles[0].comparison_question)
  plain = constitution_lib.make_format(c, "plain").render(c.turn("comparison", **fields))
  assert plain == ("Review (A): The film was fine.\nReview (B): The film was dull.\n"
                   "Question: Which review criticises the film without insulting any person?\n"
                   "Answer: (")
  with open(CHATML) as f:
    chat = constitution_lib.make_format(c, "auto", f.read())
  assert chat.kind == "chat" and not chat.add_bos
  text = chat.render(c.turn("revision", prompt="The film", response=" was dull.",
                            critique_request="Q", critique=" K", revision_request="R"))
  assert text == ("<|im_start|>system\n" + c.formats["chat"]["system"] + "<|im_end|>\n"
                  "<|im_start|>user\nReview: The film was dull.\nCritique request: Q\n"
                  "Critique: K\nRevision request: R\n<|im_end|>\n<|im_start|>assistant\n"
                  "Revision: The film")


def test_yaml_is_read_like_json(tmp_path):
  yaml = pytest.importorskip("yaml")
  path = write(tmp_path, yaml.safe_dump(default_dict()), "c.yaml")
  a, b = constitution_lib.load(path), constitution_lib.load(DEFAULT)
  assert (a.principles, a.templates, a.formats) == (b.principles, b.templates, b.formats)


def broken(edit):
  data = copy.deepcopy(default_dict())
  edit(data)
  return data


@pytest.mark.parametrize("edit,field,message", [
    (lambda d: d["principles"][1].pop("revision_request"), "principles[1].revision_request",
     "missing"),
    (lambda d: d["principles"][0].update(critique_request=3), "principles[0].critique_request",
     "expected a string, got int"),
    (lambda d: d["principles"][0].update(severity="high"), "principles[0].severity",
     "unknown key"),
    (lambda d: d.update(principle=[]), "principle", "unknown key"),
    (lambda d: d.update(principles=[]), "principles", "non-empty list"),
    (lambda d: d["principles"].append(dict(d["principles"][0])), "principles[2].name",
     "names an earlier principle"),
    (lambda d: d.update(options=["A", "A"]), "options", "two different"),
    (lambda d: d["templates"].pop("critique"), "templates.critique", "missing"),
    (lambda d: d["templates"]["comparison"].update(user="{prompt} {response_a} {question}"),
     "templates.comparison.user", "missing placeholder(s) {response_b}"),
    (lambda d: d["templates"]["critique"].update(user="{response} {critique_request} {foo}"),
     "templates.critique.user", "unknown placeholder(s) {foo}"),
    (lambda d: d["templates"]["critique"].update(answer="{response}"),
     "templates.critique.answer", "unknown placeholder(s) {response}"),
    (lambda d: d["templates"]["critique"].update(user="{response} {critique_request} {"),
     "templates.critique.user", "not a valid template"),
    (lambda d: d["formats"].update(chat={"sytem": "x"}), "formats.chat.sytem", "unknown key"),
])
def test_malformed_fields_are_named(tmp_path, edit, field, message):
  path = write(tmp_path, broken(edit))
  with pytest.raises(constitution_lib.ConstitutionError) as e:
    constitution_lib.load(path)
  assert str(e.value).startswith(f"{path}: field {field}: ") and message in str(e.value)


def test_bad_json_names_its_line(tmp_path):
  text = json.dumps(default_dict(), indent=2).splitlines()
  text[5] = text[5] + " oops"
  path = write(tmp_path, "\n".join(text))
  with pytest.raises(constitution_lib.ConstitutionError, match=f"^{path}: line 6 column "):
    constitution_lib.load(path)


def test_bad_yaml_names_its_line(tmp_path):
  pytest.importorskip("yaml")
  path = write(tmp_path, "name: x\nprinciples: [\n  - a: b\n", "c.yaml")
  with pytest.raises(constitution_lib.ConstitutionError, match=f"^{path}: line \\d+ column "):
    constitution_lib.load(path)


def test_missing_file_and_chat_without_template(tmp_path):
  with pytest.raises(constitution_lib.ConstitutionError, match="no such constitution file"):
    constitution_lib.load(str(tmp_path / "none.json"))
  c = constitution_lib.load(DEFAULT)
  with pytest.raises(ValueError, match="needs a chat template"):
    constitution_lib.make_format(c, "chat")
  with pytest.raises(ValueError, match="prompt_format='html'"):
    constitution_lib.make_format(c, "html")


def test_choose_principles():
  c = constitution_lib.load(DEFAULT)
  assert constitution_lib.choose_principles(c, 2, "all", 0) == [(0, 1), (0, 1)]
  assert constitution_lib.choose_principles(c, 2, "helpful", 0) == [(1,), (1,)]
  drawn = constitution_lib.choose_principles(c, 200, "sample", 3)
  assert drawn == constitution_lib.choose_principles(c, 200, "sample", 3)
  assert {d for (d,) in drawn} == {0, 1}
  with pytest.raises(ValueError, match="'kind'.*harmless, helpful"):
    constitution_lib.choose_principles(c, 2, "kind", 0)
