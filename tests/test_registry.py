import pytest

from rlhf_jax import registry


def test_lookup_names_field_and_known_names():
  r = registry.Registry("widget", "config.widget", hint="import my.plugin")
  r.register("b", 2)
  r.register("a", 1)
  assert r.get("a") == 1 and r.names() == ("a", "b") and "b" in r and list(r) == ["a", "b"]
  with pytest.raises(ValueError, match=r"config\.widget: unknown widget 'c'; known: a, b \(import my.plugin\)"):
    r.get("c")
  with pytest.raises(ValueError, match=r"config\.other: unknown widget"):
    r.get("c", field="config.other")


def test_registering_a_name_twice_fails():
  r = registry.Registry("widget", "config.widget")
  r.register("a", 1)
  with pytest.raises(ValueError, match="registered twice"):
    r.register("a", 2)
