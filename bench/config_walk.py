"""How far a reader walks when following the config: stops and climbs from `flows/train_flow.py`'s flow, statically.

The method, in one sentence: from the flow function `train_flow`, follow (depth first, in source order) each call
that passes the config object, a field read from it (`config.lr`) or a method of it (`config.identity()`) into a
function of the project (a `def` in flows/, tasks/, tracking/, serving/ or rnnlm/, named directly, through an
imported module, or as `self.method` of a class holding the config in `self.config`); every function entered counts
as a stop, and every return to a caller in another module as a climb. A function already on the path is not entered
again (no cycles); the same function reached from two places counts twice, as a reader meets it twice.

    .venv/bin/python bench/config_walk.py               # this checkout
    .venv/bin/python bench/config_walk.py --root DIR    # another checkout (e.g. `git archive` of an older commit)
    .venv/bin/python bench/config_walk.py --path        # also print the walk, one stop a line
"""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("flows", "tasks", "tracking", "serving", "rnnlm")
CONFIG_CLASS = ("rnnlm.config", "TrainConfig")


@dataclass
class Function:
    """One `def` of the project: where it is and what it needs to be walked."""

    module: str
    qualname: str
    node: ast.FunctionDef
    owner: str | None = None  # the class a method belongs to

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}"


@dataclass
class Module:
    """A parsed module: its top-level functions and classes (with their methods) and what its imports bind."""

    name: str
    functions: dict[str, Function] = field(default_factory=dict)
    classes: dict[str, dict[str, Function]] = field(default_factory=dict)
    names: dict[str, tuple[str, str]] = field(default_factory=dict)  # local name -> (module, attribute)
    modules: dict[str, str] = field(default_factory=dict)  # local name -> module


def load(root: Path) -> dict[str, Module]:
    """Every module of the project's packages under `root`, parsed."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []:
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = parse(name, path.read_text(), is_package=parts[-1] == "__init__")
    return found


def parse(name: str, source: str, is_package: bool) -> Module:
    module = Module(name)
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .y import x
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                local = alias.asname or alias.name
                module.names[local] = (base, alias.name)
                module.modules[local] = f"{base}.{alias.name}"  # `from pkg import module` binds a module too
        elif isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds `a`; `import a.b as c` binds `c` to a.b
                top = alias.name.split(".")[0]
                module.modules[alias.asname or top] = alias.name if alias.asname else top
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            module.functions[node.name] = Function(name, node.name, node)
        elif isinstance(node, ast.ClassDef):
            module.classes[node.name] = {
                item.name: Function(name, f"{node.name}.{item.name}", item, owner=node.name)
                for item in node.body
                if isinstance(item, ast.FunctionDef)
            }
    return module


class Walk:
    """The walk itself: `stops` and `climbs` so far, and the path for printing."""

    def __init__(self, modules: dict[str, Module]):
        self.modules, self.stops, self.climbs, self.path = modules, 0, 0, []

    def resolve(self, module: Module, name: str) -> Function | None:
        """The project function (or class's __init__) a name in `module` stands for."""
        if name in module.functions:
            return module.functions[name]
        if name in module.classes:
            return module.classes[name].get("__init__")
        if name in module.names:
            source, attribute = module.names[name]
            if source in self.modules and source != module.name:
                return self.resolve(self.modules[source], attribute)
        return None

    def callee(self, module: Module, func: ast.expr, owner: str | None) -> Function | None:
        """The project function a call's function expression names, if it is one."""
        if isinstance(func, ast.Name):
            return self.resolve(module, func.id)
        parts = dotted(func)
        if not parts:
            return None
        if parts[0] == "self" and owner is not None and len(parts) == 2:
            return module.classes[owner].get(parts[1])
        target = ".".join([module.modules.get(parts[0], ""), *parts[1:-1]])  # a module, named as imported
        if target in self.modules:
            return self.resolve(self.modules[target], parts[-1])
        return None

    def enter(self, function: Function, config_names: set[str], stack: list[str], depth: int) -> None:
        """One stop at `function`, where `config_names` hold the config; then its calls, in source order."""
        self.stops += 1
        self.path.append("  " * depth + function.name)
        module = self.modules[function.module]
        for call in calls_in(function.node):
            callee = self.config_callee(module, function, call, config_names)
            if callee is None or callee.name in stack:
                continue
            self.enter(callee, self.bound(callee, call, config_names, function), [*stack, callee.name], depth + 1)
            if callee.module != function.module:
                self.climbs += 1

    def config_callee(self, module: Module, function: Function, call: ast.Call, names: set[str]) -> Function | None:
        """The project function `call` enters if it passes or reads the config, else None."""
        func = call.func
        if isinstance(func, ast.Attribute) and carries(func.value, names):  # config.method(...)
            config = self.modules.get(CONFIG_CLASS[0])
            return config.classes.get(CONFIG_CLASS[1], {}).get(func.attr) if config else None
        carried_by_self = "self.config" in names and isinstance(func, ast.Attribute) and is_self(func.value)
        arguments = [*call.args, *(k.value for k in call.keywords)]
        if not carried_by_self and not any(carries(a, names) or reads(a, names) for a in arguments):
            return None
        return self.callee(module, func, function.owner)

    def bound(self, callee: Function, call: ast.Call, names: set[str], caller: Function) -> set[str]:
        """The names that hold the config inside `callee`, from how `call` passes it."""
        func = call.func
        if isinstance(func, ast.Attribute) and carries(func.value, names):
            return {"self"}
        if isinstance(func, ast.Attribute) and is_self(func.value) and "self.config" in names:
            return {"self.config"}
        params = [a.arg for a in callee.node.args.posonlyargs + callee.node.args.args]
        if callee.owner is not None and params and params[0] == "self":
            params = params[1:]
        found = set()
        for index, argument in enumerate(call.args):
            if carries(argument, names) and index < len(params):
                found.add(params[index])
        found |= {k.arg for k in call.keywords if k.arg and carries(k.value, names)}
        if callee.qualname.endswith(".__init__") and any(holds_config(callee.node, name) for name in found):
            found.add("self.config")
        return found


def calls_in(node: ast.FunctionDef) -> list[ast.Call]:
    """The calls in a function's body (not in nested functions' or classes'), in source order."""
    found = []

    def visit(item: ast.AST) -> None:
        for child in ast.iter_child_nodes(item):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
                continue
            if isinstance(child, ast.Call):
                found.append(child)
            visit(child)

    for statement in node.body:
        if not isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):  # closures run later
            visit(statement)
    return sorted(found, key=lambda c: (c.lineno, c.col_offset))


def dotted(node: ast.expr) -> list[str]:
    """`a.b.c` as ["a", "b", "c"]; empty for anything but names and attributes."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute) and (base := dotted(node.value)):
        return [*base, node.attr]
    return []


def is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def carries(node: ast.expr, names: set[str]) -> bool:
    """Whether `node` is the config itself."""
    if isinstance(node, ast.Name):
        return node.id in names
    return isinstance(node, ast.Attribute) and is_self(node.value) and node.attr == "config" and "self.config" in names


def reads(node: ast.expr, names: set[str]) -> bool:
    """Whether `node` is a field of the config or a value one of its methods gives (`config.lr`, `config.x()`)."""
    if isinstance(node, ast.Call):
        node = node.func
    return isinstance(node, ast.Attribute) and carries(node.value, names)


def holds_config(init: ast.FunctionDef, name: str) -> bool:
    """Whether an __init__ keeps its argument `name` as `self.config`."""
    for node in ast.walk(init):
        if isinstance(node, ast.Assign):
            targets = [t for tg in node.targets for t in (tg.elts if isinstance(tg, ast.Tuple) else [tg])]
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for target, value in zip(targets, values, strict=False):
                if isinstance(target, ast.Attribute) and target.attr == "config" and isinstance(value, ast.Name):
                    if value.id == name:
                        return True
    return False


def walk(root: Path) -> Walk:
    """The walk from `flows/train_flow.py`'s `train_flow` under `root`."""
    modules = load(root)
    start = modules["flows.train_flow"].functions["train_flow"]
    result = Walk(modules)
    result.enter(start, {"config"}, [start.name], 0)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout")
    parser.add_argument("--path", action="store_true", help="print every stop, indented by depth")
    args = parser.parse_args(argv)
    result = walk(args.root)
    if args.path:
        print("\n".join(result.path))
    print(f"{result.stops} stops, {result.climbs} climbs (following the config from flows/train_flow.py)")


if __name__ == "__main__":
    main()
