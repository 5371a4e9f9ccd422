"""The action registry and its built-ins (chassis.actions)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chassis import actions
from chassis.errors import ActionError, ConfigError, UnknownAction


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Names a test registers; unregistered afterwards."""
    registered: list[str] = []
    yield registered
    for name in registered:
        actions.unregister(name)


def test_builtins_are_registered_on_import() -> None:
    assert {"noop", "echo", "sleep", "fail"} <= actions.registered()
    assert isinstance(actions.registered(), frozenset)


def test_noop_and_echo() -> None:
    params = {"a": 1, "b": [1, 2]}
    assert actions.get("noop")({"input": 1}, params) == {}
    out = actions.get("echo")({}, params)
    assert out == params
    assert out is not params


def test_sleep_waits_params_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    waited: list[float] = []
    monkeypatch.setattr(actions.time, "sleep", waited.append)
    assert actions.get("sleep")({}, {"seconds": "0.25"}) == {}
    assert actions.get("sleep")({}, {}) == {}
    assert waited == [0.25, 0.0]


@pytest.mark.parametrize("seconds", ["soon", None, -1, float("inf"), float("nan")])
def test_sleep_refuses_bad_seconds(seconds: object) -> None:
    with pytest.raises(ActionError, match="sleep: 'seconds' must be"):
        actions.get("sleep")({}, {"seconds": seconds})


def test_fail_raises_its_message() -> None:
    with pytest.raises(ActionError) as info:
        actions.get("fail")({}, {"message": "boom"})
    assert str(info.value) == "boom"
    with pytest.raises(ActionError, match="^step failed by the 'fail' action$"):
        actions.get("fail")({}, {})


def test_decorator_with_a_name(names: list[str]) -> None:
    names.append("t_named")

    @actions.action("t_named")
    def anything(data: dict[str, Any], params: dict[str, Any]) -> int:
        return 42

    assert actions.get("t_named") is anything
    assert anything({}, {}) == 42
    assert "t_named" in actions.registered()


def test_bare_decorator_takes_the_function_name(names: list[str]) -> None:
    names.append("t_bare")

    @actions.action
    def t_bare(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        return {"seen": data}

    assert actions.get("t_bare") is t_bare
    assert t_bare({"x": 1}, {}) == {"seen": {"x": 1}}


def test_empty_parentheses_take_the_function_name(names: list[str]) -> None:
    names.append("t_paren")

    @actions.action()
    def t_paren(data: dict[str, Any], params: dict[str, Any]) -> None:
        return None

    assert actions.get("t_paren") is t_paren


def test_registering_a_name_twice(names: list[str]) -> None:
    names.append("t_twice")

    def first(data: dict[str, Any], params: dict[str, Any]) -> int:
        return 1

    def second(data: dict[str, Any], params: dict[str, Any]) -> int:
        return 2

    actions.action("t_twice")(first)
    actions.action("t_twice")(first)  # the same function again is fine
    with pytest.raises(ValueError, match="already registered by .*first.*replace=True"):
        actions.action("t_twice")(second)
    assert actions.get("t_twice") is first
    actions.action("t_twice", replace=True)(second)
    assert actions.get("t_twice") is second


@pytest.mark.parametrize("name", ["fan_out", "pause_for_human_input", "complete_workflow", ""])
def test_reserved_and_empty_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        actions.action(name)(lambda data, params: None)
    assert name not in actions.registered()


def test_unknown_action_lists_what_is_registered() -> None:
    with pytest.raises(UnknownAction) as info:
        actions.get("summarize")
    message = str(info.value)
    assert "'summarize'" in message
    listed = message.split("(registered: ", 1)[1].split(")", 1)[0].split(", ")
    assert listed == sorted(actions.registered())


def test_unregister_is_quiet_for_unknown_names() -> None:
    actions.unregister("never_registered")


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("user_actions_"):
            del sys.modules[name]


def test_load_modules_imports_user_actions(module_dir: Path, names: list[str]) -> None:
    module = f"user_actions_{uuid.uuid4().hex}"
    action_name = f"t_{module}"
    names.append(action_name)
    (module_dir / f"{module}.py").write_text(
        "from chassis.actions import action\n\n"
        f"@action({action_name!r})\n"
        "def summarize(data, params):\n"
        "    return {'summary': params.get('text', '')[:5]}\n"
    )
    actions.load_modules([module])
    assert actions.get(action_name)({}, {"text": "hello world"}) == {"summary": "hello"}
    actions.load_modules([module])  # importing again registers nothing new


def test_load_modules_names_a_missing_module() -> None:
    with pytest.raises(ConfigError) as info:
        actions.load_modules(["no_such_actions_module"])
    assert "cannot import actions module 'no_such_actions_module'" in str(info.value)
    assert "ModuleNotFoundError" in str(info.value)


def test_load_modules_names_a_module_that_fails_on_import(module_dir: Path) -> None:
    module = f"user_actions_{uuid.uuid4().hex}"
    (module_dir / f"{module}.py").write_text("raise RuntimeError('no API key')\n")
    with pytest.raises(ConfigError) as info:
        actions.load_modules([module])
    assert str(info.value) == (
        f"cannot import actions module {module!r}: RuntimeError: no API key")
