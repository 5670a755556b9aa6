"""invdiff.sampling is one home for sampling with no import cycles (issue 15).

Every import between invdiff modules counts, the ones inside functions too: a lazy import hides a
cycle from Python, not from the reader. The graph is built from the source with ast.
"""
import ast
import os

import invdiff

PACKAGE_DIR = os.path.dirname(invdiff.__file__)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _resolve(module: str, is_package: bool, node: ast.ImportFrom):
    """The absolute module names one `from X import a, b` names (X itself, and X.a if a is a module)."""
    if node.level:
        parts = module.split(".")
        base = parts if is_package else parts[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def import_graph():
    modules = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                modules[_module_name(path)] = path
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names.update(_resolve(module, path.endswith("__init__.py"), node))
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        graph[module] = {n for n in names if n in modules and n != module}
    return graph


def find_cycle(graph, start):
    """A cycle through `start` as a list of modules, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    # sampler.py imports the engine at module level; job.py imports the sampler inside a function.
    assert "invdiff.sampling.engine" in graph["invdiff.sampling.sampler"]
    assert "invdiff.sampling.sampler" in graph["invdiff.sampling.job"]
    assert find_cycle({"a": {"b"}, "b": {"a"}}, "a") == ["a", "b", "a"]


def test_sampling_modules_are_in_no_import_cycle():
    graph = import_graph()
    sampling = sorted(m for m in graph if m == "invdiff.sampling" or m.startswith("invdiff.sampling."))
    assert {"invdiff.sampling.sampler", "invdiff.sampling.engine", "invdiff.sampling.step_coeffs",
            "invdiff.sampling.job"} <= set(sampling)
    serving = sorted(m for m in graph if m == "invdiff.serve" or m.startswith("invdiff.serve."))
    assert {"invdiff.serve.worker", "invdiff.serve.engine_process", "invdiff.serve.app",
            "invdiff.serve.ray_serve"} <= set(serving)
    cycles = {m: find_cycle(graph, m) for m in sampling + serving}
    assert not any(cycles.values()), {m: " -> ".join(c) for m, c in cycles.items() if c}


def test_serving_imports_sampling_and_never_the_reverse():
    # invdiff.serve takes requests to the engine; the engine knows nothing of HTTP.
    graph = import_graph()
    assert "invdiff.sampling.engine" in graph["invdiff.serve.worker"]
    for module in (m for m in graph if m == "invdiff.sampling" or m.startswith("invdiff.sampling.")):
        assert not any(n == "invdiff.serve" or n.startswith("invdiff.serve.") for n in graph[module]), (module, graph[module])
    # One way inside serving too: settings, errors, metrics -> admission -> worker -> engine_process -> app -> ray_serve.
    layers = [("settings", "errors", "metrics"), ("admission",), ("worker",), ("engine_process",), ("app",), ("ray_serve",)]
    for i, layer in enumerate(layers):
        later = {f"invdiff.serve.{name}" for names in layers[i + 1:] for name in names}
        for module in (f"invdiff.serve.{name}" for name in layer):
            assert not graph[module] & later, (module, graph[module] & later)


def test_the_ops_do_not_import_sampling():
    # The guided step's coefficient layout lives beside its reference, so ops never reach up.
    graph = import_graph()
    for module in ("invdiff.ops", "invdiff.ops.reference", "invdiff._ext"):
        assert not any(n.startswith("invdiff.sampling") for n in graph[module]), graph[module]
