"""Text files are UTF-8 whatever the locale: under LC_ALL=C with PYTHONUTF8=0 (or a Latin-1 locale),
Python's default text encoding is ASCII (or Latin-1), and `train` failed at its very end writing the
model card (its "±"), after the whole training."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "imdb_lora"


def _text_io_without_encoding(tree: ast.AST) -> list[int]:
    """Lines of calls that read or write text in the locale's encoding: open() in text mode,
    read_text()/write_text(), and a subprocess run with text=True, each without encoding=."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "open":
            modes = [*node.args[1:2], *(k.value for k in node.keywords if k.arg == "mode")]
            if not any(isinstance(m, ast.Constant) and "b" in str(m.value) for m in modes):
                lines.append(node.lineno)
        elif isinstance(f, ast.Attribute) and f.attr in ("read_text", "write_text"):
            lines.append(node.lineno)
        elif any(k.arg in ("text", "universal_newlines") for k in node.keywords):
            lines.append(node.lineno)
    return lines


def test_every_text_file_is_opened_with_an_explicit_encoding():
    unspecified = [
        f"{path.relative_to(SRC.parent)}:{line}"
        for path in sorted(SRC.rglob("*.py"))
        for line in _text_io_without_encoding(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert unspecified == []


def test_a_run_file_is_written_as_utf8_under_an_ascii_locale(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from imdb_lora.runs.rundir import atomic_write_text
        assert sys.getfilesystemencoding() == "ascii"  # the locale this test is about
        atomic_write_text(Path(sys.argv[1]), "95% interval \\u00b1 2 points \\u65e5\\u672c")
        """
    )
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONPATH": str(SRC.parent)}
    out = tmp_path / "README.md"
    r = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes().decode("utf-8") == "95% interval \u00b1 2 points \u65e5\u672c"
