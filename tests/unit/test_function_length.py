"""tools/function_length.py, the lint check that holds every function of
anbao/, client/ and bench/ to 70 lines (issue 21 item 4)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("function_length", ROOT / "tools" / "function_length.py")
assert spec is not None and spec.loader is not None
function_length = importlib.util.module_from_spec(spec)
spec.loader.exec_module(function_length)


def _function(lines: int) -> str:
    return "async def f():\n" + "    x = 1\n" * (lines - 1)


def test_a_function_over_the_limit_is_named_with_its_length(tmp_path):
    (tmp_path / "ok.py").write_text(_function(70))
    (tmp_path / "long.py").write_text("class C:\n    " + _function(71).replace("\n    ", "\n        "))
    found = function_length.too_long(tmp_path / "long.py")
    assert found == [f"{tmp_path / 'long.py'}:2: f is 71 lines (at most 70)"]
    assert function_length.too_long(tmp_path / "ok.py") == []
    assert function_length.main([str(tmp_path)]) == 1


def test_the_project_keeps_to_it():
    assert function_length.main([str(ROOT / d) for d in ("anbao", "client", "bench")]) == 0
