"""tfpar._registry.Registry: one normalization, aliases, override=, the unknown-name error."""

from __future__ import annotations

import pytest

from tfpar._registry import Registry, normalize


def _registry() -> Registry[int]:
    registry: Registry[int] = Registry("model")
    registry.register("vgg16", 16)
    registry.register("vgg16_bn", 161)
    registry.alias("vgg", "vgg16")
    return registry


def test_normalize_ignores_case_spaces_dashes_and_underscores():
    assert normalize(" VGG-16_bn ") == normalize("vgg16bn") == "vgg16bn"


def test_lookup_by_any_spelling_and_through_aliases():
    registry = _registry()
    assert registry.resolve("VGG-16") == "vgg16" and registry.get("Vgg16-BN") == 161
    assert registry.get("VGG") == 16 and "vgg" in registry and "vgg19" not in registry
    assert registry.names() == ["vgg", "vgg16", "vgg16_bn"] == list(registry)


def test_unknown_name_lists_the_names_and_suggests_the_closest():
    with pytest.raises(ValueError, match=r"^Unknown model 'vgg61'\. Did you mean 'vgg16'\? "
                       r"Available names: vgg, vgg16, vgg16_bn\. Received: name='vgg61'$"):
        _registry().get("vgg61")
    with pytest.raises(ValueError, match=r"^Unknown model 'inception'\. Available names: "):
        _registry().get("inception")
    with pytest.raises(TypeError, match=r"Received: name=3 \(of type int\)"):
        _registry().get(3)


def test_override_replaces_an_entry_whatever_its_spelling():
    registry = _registry()
    with pytest.raises(ValueError, match=r"A model named 'vgg16' is already registered\. Pass override=True "
                       r"to replace it\. Received: name='VGG-16'"):
        registry.register("VGG-16", 0)
    registry.register("VGG-16", 0, override=True)
    assert registry.names() == ["VGG-16", "vgg", "vgg16_bn"]
    assert registry.get("vgg") == 0  # the alias follows the override


def test_aliases_live_with_their_target_and_cannot_be_removed_alone():
    registry = _registry()
    with pytest.raises(ValueError, match=r"'vgg' is an alias of 'vgg16'"):
        registry.unregister("vgg")
    registry.unregister("vgg16")
    assert registry.names() == ["vgg16_bn"]
    with pytest.raises(ValueError, match=r"Unknown model 'vgg'"):
        registry.get("vgg")


def test_empty_names_and_copies():
    registry = _registry()
    with pytest.raises(ValueError, match=r"non-empty string\. Received: name='_ '"):
        registry.register("_ ", 1)
    twin = registry.copy()
    twin.register("alexnet", 1)
    assert "alexnet" in twin and "alexnet" not in registry
