"""Every torch.hub call the docs show runs, offline, as written.

The snippets are collected from README.md, docs/**/*.md and hubconf.py's docstring: fenced (Markdown) or indented
(docstring) code blocks that mention ``torch.hub.``, and inline code that calls ``torch.hub.<fn>(...)``. They run in a
fresh interpreter whose sockets refuse to connect, from a folder holding the ``export/`` the snippets name, with
only the placeholder ``/path/to/dino-simpool`` (and the bare name ``repo``) bound to this checkout.
"""
import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dino_simpool.export import export_backbone
from dino_simpool.models.backbones import build_backbone

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER = "/path/to/dino-simpool"
_FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
_MD_INLINE = re.compile(r"`([^`\n]*torch\.hub\.\w+\([^`\n]*)`")
_RST_INLINE = re.compile(r"``([^`]*torch\.hub\.\w+\([^`]*)``")


def _doc_files() -> list[Path]:
    return [REPO / "README.md", REPO / "hubconf.py", *sorted((REPO / "docs").rglob("*.md"))]


def _indented_blocks(text: str) -> list[str]:
    """Consecutive lines indented by 4+ spaces (the code examples of a docstring)."""
    blocks, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("    ") and line.strip():
            cur.append(line)
        elif cur:
            blocks.append(textwrap.dedent("\n".join(cur)))
            cur = []
    return blocks


def doc_snippets() -> list[dict]:
    out = []
    for path in _doc_files():
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".py":
            text = ast.get_docstring(ast.parse(text)) or ""
            blocks, inline = _indented_blocks(text), _RST_INLINE.findall(text)
        else:
            blocks = [textwrap.dedent(b) for b in _FENCE.findall(text)]
            inline = _MD_INLINE.findall(_FENCE.sub("", text))
        out += [{"file": path.name, "code": b} for b in blocks if "torch.hub." in b]
        out += [{"file": path.name, "code": c} for c in inline]
    return out


RUNNER = r'''
import json, socket, sys
def _offline(*a, **k):
    raise OSError("network access attempted by an offline doc snippet")
socket.socket.connect = socket.socket.connect_ex = _offline
socket.create_connection = _offline
import torch
results = []
for snip in json.load(open(sys.argv[1])):
    ns = {"torch": torch, "repo": sys.argv[2]}
    try:
        exec(compile(snip["code"], snip["file"], "exec"), ns)
        model = ns.get("model")
        results.append({**snip, "error": None,
                        "model": None if model is None else [type(model).__name__, model.config["arch"],
                                                              model.config["pooling"], model.config["depth"]]})
    except BaseException as e:
        results.append({**snip, "error": f"{type(e).__name__}: {e}"})
print(json.dumps(results))
'''


@pytest.mark.slow
def test_every_documented_hub_call_runs_offline(tmp_path):
    snippets = doc_snippets()
    files = {s["file"] for s in snippets}
    assert {"export.md", "hubconf.py"} <= files, files  # the collector found the known examples
    # the export the snippets name ("export/", relative to where they run): a vit_small/simpool, one block deep
    export_backbone(build_backbone("vit_small", pooling="simpool", depth=1, img_size=32).eval(), tmp_path / "export")
    for s in snippets:
        s["code"] = s["code"].replace(PLACEHOLDER, str(REPO))
    (tmp_path / "snippets.json").write_text(json.dumps(snippets))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "snippets.json"), str(REPO)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = [f"{r['file']}: {r['code']!r} -> {r['error']}" for r in results if r["error"]]
    assert not failed, "documented hub calls that fail:\n" + "\n".join(failed)
    # what the README's two loads give: the export (depth 1, from its config.json) and a random-init ViT-S
    models = [r["model"] for r in results if r["model"]]
    assert ["ViTBackbone", "vit_small", "simpool", 1] in models  # weights="export/"
    assert ["ViTBackbone", "vit_small", "simpool", None] in models  # random init, the full depth


def test_collector_sees_inline_calls_and_blocks(tmp_path):
    """The collector is what makes the test above mean something: it must see inline calls like the one hubconf's
    docstring used to show (``torch.hub.list(repo, source="local")``, a TypeError) and fenced blocks."""
    md = 'Text `torch.hub.list(repo, source="local")` and\n\n```python\nm = torch.hub.load("x", "y")\n```\n'
    assert _MD_INLINE.findall(_FENCE.sub("", md)) == ['torch.hub.list(repo, source="local")']
    assert [textwrap.dedent(b) for b in _FENCE.findall(md)] == ['m = torch.hub.load("x", "y")\n']
    doc = 'Entries (``torch.hub.list(repo, source="local")`` lists them).\n\n    a = torch.hub.load(1)\n    b = 2\n'
    assert _RST_INLINE.findall(doc) == ['torch.hub.list(repo, source="local")']
    assert _indented_blocks(doc) == ["a = torch.hub.load(1)\nb = 2"]


def test_entries_are_what_torch_hub_lists():
    """hubconf.ENTRIES (the offline answer to torch.hub.list) follows torch.hub's rule: public callables."""
    spec = importlib.util.spec_from_file_location("hubconf_entries", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    listed = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert list(hubconf.ENTRIES) == listed and "vit_small_simpool" in listed and "ENTRIES" not in listed
    assert "vit_small with simpool pooling" in hubconf.vit_small_simpool.__doc__
