"""The plugin's start-up fix for nerfstudio's external-method placeholders (utils/startup.py)."""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("nerfstudio")

from nerfstudio.configs import external_methods  # noqa: E402

import nerfstudio_splat_ext.method_configs  # noqa: E402,F401  (applies the fix, as nerfstudio's plugin discovery does)
from nerfstudio_splat_ext.utils.startup import skip_external_method_stack_walk  # noqa: E402


def test_placeholders_are_built_without_walking_the_stack(monkeypatch):
    def no_stack_walk(*args, **kwargs):
        raise AssertionError("inspect.stack() was called while building the external-method placeholders")

    monkeypatch.setattr(inspect, "stack", no_stack_walk)
    configs, descriptions = external_methods.get_external_methods()
    assert len(configs) == sum(len(m.configurations) for m in external_methods.external_methods) > 0
    assert set(configs) == set(descriptions)
    assert all(isinstance(c, external_methods.ExternalMethodDummyTrainerConfig) for c in configs.values())


def test_placeholder_from_the_command_line_still_offers_the_install(monkeypatch):
    # Built anywhere but get_external_methods (tyro builds it when a user asks for a method that is not installed),
    # the placeholder prints the method's instructions, asks whether to install it and exits.
    asked = []
    monkeypatch.setattr(external_methods.Confirm, "ask", lambda *a, **k: asked.append(a) or False)
    method = external_methods.external_methods[0]
    with pytest.raises(SystemExit) as exit_info:
        external_methods.ExternalMethodDummyTrainerConfig(method_name=method.configurations[0][0], method=method)
    assert exit_info.value.code == 0
    assert len(asked) == (1 if method.pip_package else 0)


def test_fix_is_applied_once():
    assert getattr(external_methods.ExternalMethodDummyTrainerConfig.__post_init__, "_splat_ext_fast", False)
    assert skip_external_method_stack_walk() is False  # already applied: nothing to do
