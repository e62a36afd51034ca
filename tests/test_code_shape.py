"""The package's shape, checked from its source (STYLE.md: one object per concern): files and
classes stay small, no module writes another module's objects' attributes, and no module
reaches into another hvd_topk module's private names."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hvd_topk"
FILES = sorted(p for p in PACKAGE.rglob("*.py"))

MAX_FILE_LINES = 400
MAX_CLASS_LINES = 250
# (file, object, attribute) writes that are allowed: a parameter's ``grad`` is torch's own API,
# and ``stats`` in stats.py is that module's own CommStats.
ALLOWED_WRITES = {("*", "p", "grad"), ("stats.py", "stats", "*")}
# Horovod's optimizer class is what hvd.DistributedOptimizer itself builds on; GradScaler keeps
# its scale in ``_scale`` (reading it there is what avoids a host sync).
ALLOWED_PRIVATE = {"_DistributedOptimizer", "_allreduce_grad_async", "_grouped_allreduce_grad_async",
                   "_scale", "_foreach_norm",
                   # torch's own: a tensor's version counter and the autograd engine's
                   # end-of-backward callbacks (torch's FSDP uses both; no public equivalent)
                   "_version", "_execution_engine"}


def _tree(path):
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_classes_are_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.name}: {lines} lines"
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{path.name}: class {node.name} is {size} lines"


def _writes(tree):
    """``(line, object, attribute)`` of every ``name.attr = ...`` whose object is not self/cls."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for sub in (target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]):
                if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
                        and sub.value.id not in ("self", "cls") and not sub.attr.startswith("__")):
                    yield node.lineno, sub.value.id, sub.attr


def _allowed(path, obj, attr):
    return any(f in ("*", path.name) and o == obj and a in ("*", attr) for f, o, a in ALLOWED_WRITES)


def test_no_module_writes_another_objects_attributes():
    found = [f"{p.name}:{line} {obj}.{attr}" for p in FILES for line, obj, attr in _writes(_tree(p))
             if not _allowed(p, obj, attr)]
    assert not found, ("attributes written from outside their object (give the owner a method): "
                       + ", ".join(found))


def _private(name):
    return name.startswith("_") and not name.startswith("__")


def test_no_private_names_across_modules():
    found = []
    for path in FILES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.level > 0:
                found += [f"{path.name}:{node.lineno} from .{node.module} import {a.name}"
                          for a in node.names if _private(a.name)]
            if (isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in ALLOWED_PRIVATE
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert not found, "private names used across modules: " + ", ".join(found)
