"""The layers, read from the imports: launch → trainers → runtime → compressors, one way, no circles.

* ``compressors`` imports no ``rayq``, ``trainers``, ``ray`` or ``torch.distributed`` (codecs know no transport);
* the runtime (``rayq`` but ``rayq.launch``) imports neither ``trainers`` nor the launch layer;
* no module imports another module's ``_private`` name;
* no import circle between modules (imports inside functions count: they are still a dependency; imports
  under ``if TYPE_CHECKING:`` do not: they are annotations);
* only the launch layer prints (``print(`` as a call, anywhere else, fails).

The checker is a function, so a test can also show that it fails when a forbidden import is added.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("compressors", "rayq", "trainers")


@dataclass(frozen=True)
class Import:
    module: str       # the importing module, dotted
    target: str       # the imported module, dotted (resolved to a module of ours where possible)
    names: tuple[str, ...]
    line: int


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources(root: Path = REPO) -> dict[str, str]:
    """``{module: source}`` for every module of the three packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if "resources" in path.parts[len(root.parts):][1:2]:
                continue
            out[module_name(path, root)] = path.read_text()
    return out


def imports(module: str, source: str, known: set[str]) -> list[Import]:
    """Every import statement of ``module`` (top level or nested), targets resolved to our modules."""
    out = []
    package = module if module in known and any(k.startswith(module + ".") for k in known) else \
        module.rpartition(".")[0]
    tree = ast.parse(source)
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports are annotations, not dependencies
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append(Import(module, a.name, (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:  # `from pkg import module`
                    out.append(Import(module, sub, (), node.lineno))
                else:
                    out.append(Import(module, base, (a.name,), node.lineno))
    return out


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def layer(module: str) -> str:
    if module.startswith("compressors"):
        return "compressors"
    if module.startswith("trainers"):
        return "trainers"
    if module == "rayq.launch" or module.startswith("rayq.launch.") or module == "rayq.__main__":
        return "launch"
    return "runtime"


def violations(mods: dict[str, str]) -> list[str]:
    """Everything that breaks the layering rules in ``mods`` (``{module: source}``)."""
    known = set(mods)
    found = []
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, src in mods.items():
        for imp in imports(m, src, known):
            top = imp.target.split(".")[0]
            where = f"{m}:{imp.line} imports {imp.target}"
            if layer(m) == "compressors" and (top in ("rayq", "trainers", "ray")
                                              or imp.target.startswith("torch.distributed")):
                found.append(f"{where}: codecs know no runtime, Ray or transport")
            if layer(m) == "runtime" and (top == "trainers" or layer(imp.target) == "launch"):
                if top in ("rayq", "trainers"):
                    found.append(f"{where}: the runtime imports neither trainers nor the launch layer")
            if layer(m) == "trainers" and top == "rayq" and layer(imp.target) == "launch":
                found.append(f"{where}: trainers do not import the launch layer")
            for name in imp.names:
                if name.startswith("_") and not name.startswith("__") and imp.target.split(".")[0] in PACKAGES:
                    found.append(f"{where}: private name {name!r} imported across modules")
            if imp.target in known and imp.target != m:
                graph[m].add(imp.target)
    found += [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def printing(mods: dict[str, str]) -> list[str]:
    """``print(`` calls outside the launch layer."""
    found = []
    for m, src in mods.items():
        if layer(m) == "launch":
            continue
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{m}:{node.lineno} prints; only the launch layer prints (the runtime logs)")
    return found


# ---------------------------------------------------------------------------------------- the rules hold


def test_the_layers_import_one_way_without_circles_or_private_names():
    assert violations(sources()) == []


def test_only_the_launch_layer_prints():
    assert printing(sources()) == []


def test_no_module_is_much_longer_than_500_lines():
    long = {m: src.count("\n") for m, src in sources().items() if src.count("\n") > 550}
    assert long == {}


# ---------------------------------------------------------------------------------------- the checker can fail


def test_a_forbidden_import_is_reported():
    mods = sources()
    mods["compressors.qsgd"] += "\nimport ray\nfrom rayq.collective import CompressedGroup\n"
    mods["rayq.netsim"] += "\nfrom trainers.sync import train_loop\n"
    found = violations(mods)
    assert any(v.startswith("compressors.qsgd") and "imports ray" in v for v in found)
    assert any(v.startswith("compressors.qsgd") and "imports rayq.collective" in v for v in found)
    assert any(v.startswith("rayq.netsim") and "trainers" in v for v in found)


def test_a_circle_and_a_private_import_are_reported():
    mods = sources()
    mods["rayq.netsim"] += "\nfrom rayq.run import make_plan\n"        # run imports netsim: a circle
    mods["rayq.faults"] += "\nfrom rayq.collective import _forbidden\n"  # a private name
    found = violations(mods)
    assert any(v.startswith("import circle") and "rayq.netsim" in v and "rayq.run" in v for v in found)
    assert any("private name '_forbidden'" in v for v in found)


def test_a_print_in_the_runtime_is_reported():
    mods = sources()
    mods["rayq.netsim"] += "\n\ndef shout():\n    print('hi')\n"
    assert any(v.startswith("rayq.netsim") for v in printing(mods))
