"""The shape of the package, checked over its source with ``ast``:

- no import cycle among pinnace's modules, counting imports inside functions and under
  ``TYPE_CHECKING`` (importing ``a.b.c`` imports the packages ``a.b`` too);
- no module imports another module's ``_private`` name, or reaches one through an
  attribute of something that is not its own (``other._name``);
- every exception class pinnace defines lives in errors.py and derives from PinnaceError.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pinnace
from pinnace import errors

SRC = Path(pinnace.__file__).parent
# The public facade imports everything lazily (PEP 562) and under TYPE_CHECKING for
# type checkers; nothing imports it back but by its public names.
FACADE = "pinnace"
# Private names of the standard library that are part of its documented API.
STDLIB_PRIVATE = {"_exit", "_asdict", "_replace", "_fields", "_make"}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def resolve(mod: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_package(path) else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mod: str, path: Path, known: set[str]) -> dict[str, set[str]]:
    """Modules of pinnace that ``mod`` imports, with the names it takes from each."""
    out: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pinnace"):
                    out.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom):
            target = resolve(mod, path, node)
            if not target.startswith("pinnace"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # `from . import switch`: the submodule itself
                    out.setdefault(sub, set())
                else:
                    out.setdefault(target, set()).add(alias.name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        ancestors = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        for target in imports(mod, path, known):
            if target in known and target != mod and target != FACADE:
                edges[mod].add(target)
            # Importing a.b.c runs a/__init__ and a/b/__init__ first; but a package of
            # our own is already running (it is how we were reached), so that is no cycle.
            parts = target.split(".")
            for i in range(2, len(parts)):
                dep = ".".join(parts[:i])
                if dep in known and dep not in ancestors and dep not in (mod, FACADE):
                    edges[mod].add(dep)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def own_private_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, attributes it assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if n.startswith("_")}


def private_uses(mod: str, path: Path, known: set[str]) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for target, names in imports(mod, path, known).items():
        for name in names:
            if name.startswith("_") and not name.startswith("__"):
                found.append(f"{mod} imports {target}.{name}")
    own = own_private_names(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or attr.startswith("__") or attr in STDLIB_PRIVATE:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        if attr in own:
            continue  # one of this module's own (another object of its own classes)
        found.append(f"{mod}:{node.lineno} uses {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_private_names():
    mods = modules()
    problems = [p for mod, path in mods.items() for p in private_uses(mod, path, set(mods))]
    assert problems == []


def test_the_private_check_sees_a_private_call(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from pinnace.machine import _secret\n\ndef f(m):\n    return m._locked()\n")
    problems = private_uses("pinnace.bad", bad, {"pinnace.machine"})
    assert problems == ["pinnace.bad imports pinnace.machine._secret",
                        "pinnace.bad:4 uses m._locked"]


def exception_classes() -> list[tuple[str, str, list[str]]]:
    """(module, class, base names) of every class in the package that derives, by name,
    from an exception (a class whose base's name ends in Error/Exception, or a known one)."""
    out = []
    exceptionish = {"Exception", "BaseException"} | {
        n for n, v in vars(errors).items() if inspect.isclass(v) and issubclass(v, Exception)}
    changed = True
    classes: list[tuple[str, str, list[str]]] = []
    for mod, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases]
                classes.append((mod, node.name, bases))
    while changed:  # classes deriving from classes that derive from an exception
        changed = False
        for _mod, name, bases in classes:
            if name not in exceptionish and (
                    set(bases) & exceptionish or any(b.endswith(("Error", "Exception"))
                                                     for b in bases)):
                exceptionish.add(name)
                changed = True
    for mod, name, bases in classes:
        if name in exceptionish:
            out.append((mod, name, bases))
    return out


def test_every_exception_class_is_in_the_error_tree():
    found = exception_classes()
    assert len(found) > 20  # the check sees them (errors.py alone has more)
    # The modules copied into the guest use the standard library only; the host turns
    # their errors into its own (FrameError into ProtocolError) where they meet.
    guest_side = {"pinnace.agent.protocol", "pinnace.agent.guest", "pinnace.agent.netconf"}
    elsewhere = [f"{m}.{n}" for m, n, _ in found
                 if m != "pinnace.errors" and m not in guest_side]
    assert elsewhere == []
    for mod, name, _ in found:
        if mod == "pinnace.errors":
            cls = getattr(errors, name)
            assert issubclass(cls, errors.PinnaceError), name
            assert cls.__doc__, f"{name} has no docstring"
            assert name in errors.__doc__, f"{name} is not drawn in errors.py's tree"


def test_every_error_is_public():
    public = {n for n in pinnace.__all__ if n.endswith(("Error", "InUse", "Failed", "Timeout",
                                                        "Crashed", "Disconnected", "Archive"))}
    defined = {n for n, v in vars(errors).items()
               if inspect.isclass(v) and issubclass(v, errors.PinnaceError)}
    assert defined == public
