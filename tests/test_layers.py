"""The package's layers import only downward, and no import cycle exists (house style: config ->
data / networks -> process -> pipeline -> training -> CLI / app). Imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src"

# lowest first; a module may import its own layer and the layers below it
LAYERS = [
    ["sundae", "sundae.errors", "sundae.config"],
    ["sundae.checkpoint", "sundae.runtime", "sundae.distributed", "sundae.models"],
    ["sundae.data", "sundae.tokenizer", "sundae.denoiser", "sundae.eval.metrics", "sundae.eval.classifier",
     "sundae.var.tokenizer", "sundae.var.transformer"],
    ["sundae.sundae", "sundae.sampler", "sundae.var", "sundae.var.objective", "sundae.var.sampler"],
    ["sundae.pipeline", "sundae.pipelines", "sundae.video", "sundae.speed", "sundae.eval", "sundae.var.pipeline"],
    ["sundae.training", "sundae.var.training"],
    ["sundae.cli", "sundae.app"],
]


def layer_of(module: str) -> int:
    """The layer of the longest listed prefix of ``module``."""
    matches = [(len(prefix), index) for index, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS"
    return max(matches)[1]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in (SOURCE / "sundae").rglob("*.py"):
        module = ".".join(path.relative_to(SOURCE).with_suffix("").parts).removesuffix(".__init__")
        imported = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            imported.update(name for name in names if name == "sundae" or name.startswith("sundae."))
    return graph


GRAPH = import_graph()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_a_module_imports_only_its_layer_and_below(module):
    upward = sorted(name for name in GRAPH[module] if layer_of(name) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports a higher layer: {upward}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a package importing its own submodules' parent is no cycle)."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for name in sorted(graph.get(module, ())):
            if name != module and not module.startswith(name + "."):
                cycle = visit(name, path + [module])
                if cycle:
                    return cycle
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module, []))), None)


def test_there_is_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_checks_catch_a_planted_cycle_and_upward_import():
    planted = {**GRAPH, "sundae.tokenizer.vqgan": GRAPH["sundae.tokenizer.vqgan"] | {"sundae.tokenizer.taming"}}
    cycle = find_cycle(planted)  # found from whichever of its modules the walk meets first
    assert cycle in (["sundae.tokenizer.taming", "sundae.tokenizer.vqgan", "sundae.tokenizer.taming"],
                     ["sundae.tokenizer.vqgan", "sundae.tokenizer.taming", "sundae.tokenizer.vqgan"])
    assert layer_of("sundae.cli") > layer_of("sundae.training.prior") > layer_of("sundae.pipeline")
    assert "sundae.pipeline" in GRAPH["sundae.training.prior"]  # real edges, imports inside functions too
