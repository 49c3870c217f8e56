"""The package's layering rules, checked on the source (DeepSpeed fails commits that use torch.distributed
outside deepspeed/comm; these are ours; docs/architecture.md explains them):

* imports go one way, down the layers of ``LAYERS`` (function-level imports included), with no cycle;
* the private attributes of an engine (DeepSpeed, FSDP2, accelerate, the Trainer) and the engine-specific
  public names (``ENGINE_NAMES``) are used only under ``gradpruner_ds/backends/``;
* every collective GradPruner issues lives in ``gradpruner_ds/consensus.py`` or goes through a backend;
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
ENGINE_NAMES = {
    # DeepSpeed
    "ds_tensor", "ds_shape", "ds_numel", "ds_status", "ds_persist", "zero_optimization_stage", "GatheredParameters",
    "safe_get_local_grad", "safe_get_local_fp32_param", "safe_set_local_fp32_param",
    "safe_get_local_optimizer_state", "safe_set_local_optimizer_state", "DeepSpeedEngine", "dp_process_group",
    # FSDP2 / DTensor
    "full_tensor", "to_local", "from_local", "fully_shard", "FSDPModule", "DTensor", "device_mesh",
}  # fmt: skip
"""Names that tie code to one engine: used only in ``gradpruner_ds/backends/`` (the picker recognises engines)."""

LAYERS = [
    {"errors", "log", "io", "diagnostics", "core"},  # foundations: pure math, files, logging
    {"peft_support", "arch", "surgery", "config", "stages"},  # the model's layout (peft's included), the settings
    {"engine", "consensus"},  # the engine contract; collectives across ranks
    {"statistics"},  # what the window measures (through the contract)
    {"backends"},  # one adapter per engine and the picker
    {"window", "merging", "repair", "recovery", "report", "checkpoint", "resume", "guards", "state_check"},  # the prune's phases, its files
    {"pruner"},  # the in-job driver
    {"integrations", "export", "cli", "args", "scale", "evaluate", "__init__"},  # entry points
]
"""The package's layers, bottom up: a module imports from its own layer or below, never above."""


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


def _top(module: str) -> str:
    """``gradpruner_ds.a.b`` -> ``a`` (the root package itself: ``__init__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """The gradpruner_ds modules ``path`` imports (at any depth of the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gradpruner_ds":
                out |= {f"gradpruner_ds.{a.name}" for a in node.names if not a.name.startswith("__")}
            elif node.module.startswith("gradpruner_ds."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gradpruner_ds.")}
    return out


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_imports_go_down_the_layers_without_cycles():
    level = {name: i for i, group in enumerate(LAYERS) for name in group}
    graph: dict[str, set[str]] = {}
    wrong = []
    for path in _sources():
        me = _module(path)
        if _top(me) not in level:
            wrong.append(f"{me}: not in any layer of LAYERS (add it, and to docs/architecture.md)")
            continue
        graph[me] = {d for d in _imports(path) if d != me}
        for dep in graph[me]:
            if level.get(_top(dep), 99) > level[_top(me)]:
                wrong.append(f"{me} (layer {level[_top(me)]}) imports {dep} (layer {level.get(_top(dep))})")
    assert not wrong, "\n".join(wrong)
    # no cycles between modules (a package's __init__ may import its own submodules lazily)
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d.startswith(m + "."):  # a package importing its own submodule
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, m, d]))
            if state.get(d) is None:
                visit(d, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_engine_specific_names_are_used_only_in_backends():
    found = []
    for path in _sources(exclude="backends"):
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.Name):
                name = node.id
            elif isinstance(node, ast.alias):
                name = node.name.rsplit(".", 1)[-1]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                name = node.value
            if name in ENGINE_NAMES:
                found.append(f"{path.relative_to(PKG)}:{getattr(node, 'lineno', '?')}: {name}")
    assert not found, "engine-specific code belongs in gradpruner_ds/backends/:\n" + "\n".join(found)


def test_collectives_live_in_consensus_or_backends():
    found = []
    for path in _sources(exclude="backends"):
        if path.name in ("consensus.py", "diagnostics.py"):  # diagnostics only names them, to count them
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
    from gradpruner_ds.backends.deepspeed import DeepSpeedBackend
    from gradpruner_ds.backends.fsdp2 import FSDP2Backend
    from gradpruner_ds.backends.plain import Backend
    from gradpruner_ds.engine import EngineAdapter

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
