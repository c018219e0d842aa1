"""The run-config key ``plugins``: user modules imported before any spec is parsed.

The plug-in module is ``tests/plugins/tiny_plugin.py`` (a codec stage ``half``, a
strategy ``plain-mean``, a task ``blobs``); every test restores the registries,
``sys.modules`` and the record of failed plug-ins.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from flowerpress import registry
from flowerpress.compression import registry as stages
from flowerpress.config import ConfigError, validate
from flowerpress.registry import PluginError, import_plugins, plugin_modules
from flowerpress.strategies.registry import STRATEGIES
from flowerpress.tasks.registry import TASKS

PLUGINS = Path(__file__).resolve().parent / "plugins"


@pytest.fixture()
def plugin_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """``tests/plugins`` and ``tmp_path`` on sys.path; registries and modules restored."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_FAILED", {})
    saved_stages = dict(stages._BY_NAME), dict(stages._BY_WIRE)
    with STRATEGIES.restored(), TASKS.restored():
        try:
            yield tmp_path
        finally:
            # Only the plug-ins: forgetting what they imported (torch's lazy
            # submodules) would make the next import register ops twice.
            for name in ("tiny_plugin", "broken_plugin"):
                sys.modules.pop(name, None)
            stages._BY_NAME.clear()
            stages._BY_NAME.update(saved_stages[0])
            stages._BY_WIRE.clear()
            stages._BY_WIRE.update(saved_stages[1])


def test_a_plugin_registers_its_short_names_once(plugin_path: Path) -> None:
    # Execute: imported twice, as every message on a node asks for it
    first = import_plugins("tiny_plugin")
    second = import_plugins(" tiny_plugin, ")
    # Assert: the names resolve, and the module ran once (no duplicate registration)
    assert first == second == ("tiny_plugin",)
    assert sys.modules["tiny_plugin"].IMPORTS == [1]
    assert "half" in stages.available_stages()
    assert STRATEGIES.get("plain-mean") is not None and TASKS.get("blobs") is not None


def test_plugins_are_imported_before_the_specs_that_name_them(plugin_path: Path) -> None:
    # Execute: plugins given last, after the keys that use its names
    config = validate({"compression": "half+zstd", "strategy": "plain-mean",
                       "task": "blobs", "plugins": "tiny_plugin"})
    # Assert
    assert config["plugins"] == "tiny_plugin" and config["compression"] == "half+zstd"


def test_without_plugins_the_short_names_are_unknown(plugin_path: Path) -> None:
    with pytest.raises(ConfigError, match="strategy='plain-mean' is not allowed"):
        validate({"strategy": "plain-mean"})


@pytest.mark.parametrize(("source", "cause"), [
    (None, "ModuleNotFoundError: No module named 'no_such_plugin'"),
    ("raise RuntimeError('no GPU here')", "RuntimeError: no GPU here"),
    ("from flowerpress.strategies import FedAvg, register_strategy\n"
     "register_strategy('fedavg', FedAvg)", "ValueError: strategy 'fedavg' is already"),
])
def test_a_plugin_that_fails_is_one_line_naming_it(plugin_path: Path, source: str | None,
                                                   cause: str) -> None:
    # Prepare
    name = "no_such_plugin" if source is None else "broken_plugin"
    if source is not None:
        (plugin_path / f"{name}.py").write_text(source + "\n", encoding="utf-8")
    # Execute
    with pytest.raises(ConfigError) as caught:
        validate({"plugins": f"tiny_plugin,{name}"})
    # Assert: one line, naming the module and the cause; the same line a second time
    line = str(caught.value)
    assert "\n" not in line and f"cannot import plug-in module {name!r}" in line
    assert cause in line
    with pytest.raises(PluginError) as again:
        import_plugins(name)
    assert str(again.value) in line


@pytest.mark.parametrize(("text", "message"), [
    ("mypkg/codecs.py", "'mypkg/codecs.py' is not a module name"),
    ("a.b,a.b", "'a.b' is named twice"),
    ("mypkg.", "is not a module name"),
])
def test_plugin_names_are_checked(text: str, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        plugin_modules(text)


def test_empty_plugins_import_nothing() -> None:
    assert plugin_modules("") == () and plugin_modules(" , ") == ()


def _query(run_config: dict[str, bool | int | float | str]) -> tuple[Message, Context]:
    msg = Message(RecordDict(), dst_node_id=1, message_type="query")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                      run_config=run_config)
    return msg, context


def test_plugins_mod_imports_before_the_app_and_replies_with_the_error(
        plugin_path: Path) -> None:
    # Prepare
    from flowerpress.client.mods import plugins_mod
    from flowerpress.testing import server_identity

    seen: list[bool] = []

    def app(msg: Message, context: Context) -> Message:
        seen.append("tiny_plugin" in sys.modules)
        return Message(RecordDict(), reply_to=msg)

    with server_identity():
        ok_msg, ok_context = _query({"plugins": "tiny_plugin"})
        bad_msg, bad_context = _query({"plugins": "no_such_plugin"})
        # Execute
        ok = plugins_mod(ok_msg, ok_context, app)
        bad = plugins_mod(bad_msg, bad_context, app)
    # Assert: the app ran after the import; a missing module is an error reply naming it
    assert seen == [True] and not ok.has_error()
    assert bad.has_error() and "no_such_plugin" in bad.error.reason


def test_short_names_from_a_plugin_run_a_federation(plugin_path: Path) -> None:
    # Prepare: a plug-in codec, strategy and task, named only by their short names
    from flowerpress import client_app, serve
    from flowerpress.testing import InProcessGrid, server_identity

    config = validate({"plugins": "tiny_plugin", "task": "blobs", "compression": "half",
                       "strategy": "plain-mean", "num-clients": 3, "clients-per-round": 3,
                       "rounds": 2})
    # Execute
    with server_identity():
        result = serve(InProcessGrid(client_app(), 3, run_config=config), config)
    # Assert: every reply was encoded and decoded with the plug-in's codec; the task learnt
    rows = result["rounds"]
    assert [r["clients"] for r in rows] == [3, 3] and all(r["rejected"] == 0 for r in rows)
    assert rows[-1]["accuracy"] > 0.8
    assert result["summary"]["task"]["name"] == "blobs"
