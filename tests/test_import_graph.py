"""No import cycle anywhere in invdiff or its kernels, and the import order the kernels rely on.

The graph is built from the source with ast, over the whole `invdiff` package and the top-level
kernels/ folder (installed as `invdiff.kernels`, setup.py's package_dir). Every import counts,
the ones inside functions too: a lazy import hides a cycle from Python, not from the reader.
An import also runs the __init__ of every package above the module it names (importing
invdiff.ops.reference runs invdiff/ops/__init__.py first), so those packages count as imported
too, except a module's own enclosing packages, which always start before it does. Reading a name
from an enclosing package's __init__ (`from . import name`, name not a module) does count.
Imports by a string (PEP 562 `__getattr__` tables, importlib.import_module) are not seen.
"""
import ast
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where each package's source lies (setup.py: packages invdiff.*, package_dir invdiff.kernels -> kernels).
SOURCES = {"invdiff": os.path.join(REPO, "invdiff"), "invdiff.kernels": os.path.join(REPO, "kernels")}


def modules():
    """Module name -> source path, for every .py file under SOURCES."""
    found = {}
    for package, folder in SOURCES.items():
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and os.path.isfile(os.path.join(root, d, "__init__.py")))
            rel = os.path.relpath(root, folder)
            prefix = package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}"
            for name in sorted(files):
                if name.endswith(".py"):
                    found[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = os.path.join(root, name)
    return found


def _ancestors(name: str):
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(module: str, path: str, known) -> set:
    """The modules of `known` that `module` (source at `path`) imports, anywhere in its source."""
    is_package = path.endswith("__init__.py")
    own = set(_ancestors(module)) | {module}  # started before `module` runs: importing them again is a no-op
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    edges = set()

    def named(target: str) -> None:
        """`target` is imported: it runs, and so does every package above it."""
        edges.update(p for p in _ancestors(target) + [target] if p not in own)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                named(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            named(source)
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    named(f"{source}.{alias.name}")
                elif source in known:
                    edges.add(source)  # a name read from source's namespace: it must have run first
    return {e for e in edges if e in known and e != module}


def import_graph():
    known = modules()
    return {module: imports_of(module, path, known) for module, path in known.items()}


def cycles(graph):
    """The import cycles, as readable chains `a -> b -> a`: for every strongly connected component
    of more than one module (or a module importing itself), a shortest cycle through each of its
    modules, each cycle once."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(limit)
    chains = []
    for component in sorted(found):
        for start in component:
            loop = _shortest_cycle(graph, start, set(component))
            first = loop.index(min(loop))
            chain = " -> ".join(loop[first:] + loop[:first] + [min(loop)])  # each cycle told from its first module
            if chain not in chains:
                chains.append(chain)
    return chains


def _shortest_cycle(graph, start, inside):
    """The modules of a shortest cycle through `start` within `inside` (start first, not repeated)."""
    paths, frontier = {start: [start]}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for w in sorted(set(graph.get(node, ())) & inside):
                if w == start:
                    return paths[node]
                if w not in paths:
                    paths[w] = paths[node] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def test_the_graph_covers_the_package_and_the_kernels():
    graph = import_graph()
    assert {"invdiff", "invdiff.cli", "invdiff.config", "invdiff.ops", "invdiff.ops.reference",
            "invdiff.kernels", "invdiff.kernels.utils", "invdiff.kernels.guidance_combine",
            "invdiff.kernels.invariant_loss", "invdiff.models.sd", "invdiff.sampling.engine"} <= set(graph)
    # Imports inside functions count: ops builds its Triton backend from the kernels in a function.
    assert "invdiff.kernels.guidance_combine" in graph["invdiff.ops"]
    # Relative imports inside kernels/ resolve to invdiff.kernels.*; a name read from the package counts.
    assert "invdiff.kernels.utils" in graph["invdiff.kernels.guidance_combine"]
    assert "invdiff.kernels" in graph["invdiff.kernels.utils"]  # `from . import interpreting`
    # Importing a module runs the packages above it: config.py is torch-free and imports nothing of invdiff.
    assert graph["invdiff.config"] == set()


def test_the_cycle_finder():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == ["a -> b -> a"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "b"}}) == ["a -> b -> c -> a", "b -> c -> b"]
    # The shape this test found when it was written: a package whose __init__ loads its backends,
    # which import a module inside that package (so run its __init__).
    assert cycles({"ops": {"ext", "k1", "k2"}, "ext": {"ops"}, "k1": {"ops"}, "k2": {"ops"}}) == [
        "ext -> ops -> ext", "k1 -> ops -> k1", "k2 -> ops -> k2"]
    assert cycles({"a": {"a"}}) == ["a -> a"]
    assert cycles({"a": {"b"}, "b": set()}) == []
    # A parent package run by importing its submodule closes a cycle through the package's __init__.
    known = {"p": "p/__init__.py", "p.r": "p/r.py", "q": "q/__init__.py"}
    tree = {"p": "def f():\n    import q\n", "p.r": "", "q": "from p.r import x\n"}
    graph = {m: _edges_from_text(m, known[m], tree[m], known) for m in known}
    assert cycles(graph) == ["p -> q -> p"]


def _edges_from_text(module, path, text, known):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        file = os.path.join(folder, os.path.basename(path))  # imports_of tells a package by its file name
        with open(file, "w") as f:
            f.write(text)
        return imports_of(module, file, known)


def test_no_import_cycle_in_invdiff_or_its_kernels():
    found = cycles(import_graph())
    assert not found, "import cycles:\n  " + "\n  ".join(found)


def _fresh_python(code: str, **env) -> str:
    """Run `code` in a fresh interpreter from the repository root; its stdout."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=environ,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_importing_invdiff_kernels_does_not_import_triton():
    """`import invdiff.kernels` (what the dispatch's checks use) defines no kernel and leaves
    Triton unimported, so the kernels' capability checks are safe before TRITON_INTERPRET is set."""
    out = _fresh_python("""
        import sys
        import invdiff.kernels
        print(sorted(m for m in sys.modules if m == "triton" or m.startswith(("triton.", "invdiff.kernels."))))
    """)
    assert out == "[]"


HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed: invdiff.ops then defines no kernel")
def test_triton_interpret_must_be_set_before_importing_invdiff_ops():
    """invdiff.ops imports the kernel modules when it is imported (not on first use), and Triton
    decides at each kernel's definition whether it is interpreted: TRITON_INTERPRET=1 set before
    `import invdiff.ops` gives interpreted kernels, set after it changes nothing."""
    code = """
        import os, sys
        if {before}:
            os.environ["TRITON_INTERPRET"] = "1"
        import invdiff.ops
        print("invdiff.kernels.guidance_combine" in sys.modules and "invdiff.kernels.invariant_loss" in sys.modules)
        os.environ["TRITON_INTERPRET"] = "1"
        from invdiff.kernels import guidance_combine, invariant_loss
        import triton
        kernels = [v for m in (guidance_combine, invariant_loss) for v in vars(m).values()
                   if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
        print(len(kernels) > 0, sorted({{type(v).__name__ for v in kernels}}))
    """
    loaded, kinds = _fresh_python(code.format(before=True)).splitlines()
    assert loaded == "True"
    assert kinds == "True ['InterpretedFunction']"
    loaded, kinds = _fresh_python(code.format(before=False)).splitlines()
    assert loaded == "True"
    assert kinds == "True ['JITFunction']"


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed: the kernel modules cannot be imported")
@pytest.mark.parametrize("first", ["invdiff.kernels.guidance_combine", "invdiff.kernels.invariant_loss"])
def test_a_kernel_module_imported_first_loads(first):
    """The kernels do not import invdiff.ops (whose __init__ builds the backend table from them):
    importing one first used to stop with 'partially initialized module' from inside invdiff.ops."""
    out = _fresh_python(f"""
        import {first}
        import invdiff.ops
        print(sorted(b.name for b in invdiff.ops.BACKENDS))
    """, TRITON_INTERPRET="1")
    assert out == str(sorted(["triton", "reference", "cpp"]))


def test_the_clones_kernels_folder_never_shadows_a_top_level_kernels_package():
    # Run from the root of a clone, `import kernels` finds the kernels/ folder first. It must not
    # be taken for the Hugging Face `kernels` package (transformers >= 5.25 requires it, and
    # diffusers imports it when it is installed): diffusers' UNet must import from there, and
    # where that package is installed, `kernels` must be it.
    installed = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('kernels') is not None)"],
                               cwd=os.path.dirname(REPO), capture_output=True, text=True, check=True).stdout.strip() == "True"
    code = textwrap.dedent("""
        import os, sys
        from diffusers import UNet2DConditionModel  # imports diffusers.loaders.peft, which imports kernels if installed
        import kernels
        print(os.path.abspath(kernels.__file__))
    """)
    found = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr[-2000:]
    inside_clone = found.stdout.strip().startswith(os.path.join(REPO, "kernels") + os.sep)
    assert inside_clone is not installed, (installed, found.stdout)
