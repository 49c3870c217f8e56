"""The package's layering rules, checked on the source (DeepSpeed fails commits that use torch.distributed
outside deepspeed/comm; these are ours):

* the private attributes of an engine (DeepSpeed, FSDP2, accelerate, the Trainer) are touched only under
  ``gradpruner_ds/backends/``;
* every collective GradPruner issues lives in ``gradpruner_ds/dist.py`` or goes through a backend;
* ``gradpruner_ds/core`` is pure tensor math (no torch.distributed, deepspeed, transformers, accelerate);
* ``import gradpruner_ds`` loads no engine and no torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "gradpruner_ds"

ALLOWED_PRIVATE = {
    (
        "arch.py",
        "_orig_mod",
    ): "torch.compile's wrapper keeps the compiled module there (unwrapping, not an engine)",
    ("log.py", "_gradpruner_configured"): "our own marker on our own logger",
}
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier", "reduce_scatter"}


def _sources(exclude: str | None = None) -> list[Path]:
    return [
        p for p in sorted(PKG.rglob("*.py")) if exclude is None or exclude not in p.relative_to(PKG).parts
    ]


def _private_accesses(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        name = None
        if isinstance(node, ast.Attribute) and not (
            isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
        ):
            name = node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            name = node.args[1].value
        if name and name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
            if (path.name, name) not in ALLOWED_PRIVATE:
                out.append(f"{path.relative_to(PKG)}:{node.lineno}: {name}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "__setattr__"
        ):
            out.append(f"{path.relative_to(PKG)}:{node.lineno}: __setattr__ (rebinding an object)")
    return out


def test_engine_private_attributes_are_touched_only_in_backends():
    found = [hit for path in _sources(exclude="backends") for hit in _private_accesses(path)]
    assert not found, (
        "move these into gradpruner_ds/backends/ (or allow them here with a reason):\n" + "\n".join(found)
    )


def test_collectives_live_in_dist_or_backends():
    found = []
    for path in _sources(exclude="backends"):
        if path.name in ("dist.py", "diagnostics.py"):  # diagnostics only names them, to count them
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
                found.append(f"{path.relative_to(PKG)}:{node.lineno}: {node.attr}")
    assert not found, found


def test_core_is_pure_tensor_math():
    banned = ("torch.distributed", "deepspeed", "transformers", "accelerate")
    for path in (PKG / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.startswith(banned)], f"{path}: {names}"


def test_import_is_cheap():
    code = "import sys, gradpruner_ds; print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_engine_adapter_provides_the_contract():
    from gradpruner_ds.backends.base import Backend, EngineAdapter
    from gradpruner_ds.backends.deepspeed import DeepSpeedBackend
    from gradpruner_ds.backends.fsdp2 import FSDP2Backend

    wanted = [n for n in vars(EngineAdapter) if not n.startswith("_")]
    from gradpruner_ds.backends.zero3 import Zero3Backend
    from gradpruner_ds.backends.zero12 import Zero12Backend

    for cls in (Backend, DeepSpeedBackend, Zero12Backend, Zero3Backend, FSDP2Backend):
        missing = [
            n
            for n in wanted
            if not callable(getattr(cls, n, None)) and n not in ("rank", "world_size", "timeout_s")
        ]
        assert not missing, (cls.__name__, missing)
    assert isinstance(Backend(), EngineAdapter)
