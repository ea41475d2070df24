"""The shape of the code, measured: `python3 dev.py structure`.

Reads the sources of `keras_ema/` and `zoo/` (with the standard library's
`ast`; nothing is imported) and prints four sections:

- lines per file, flagging files over `MAX_FILE_LINES`;
- the longest function or method of each file, flagging those over
  `MAX_FUNCTION_LINES` (a nested function counts in its own right and inside
  the one that holds it);
- import circles between the project's modules: imports at module level and
  inside functions both count (`from keras_ema import files` is an import of
  `keras_ema.files`; importing a submodule is not counted as importing its
  package's `__init__`);
- uses of private framework API outside the two files that may hold them
  (`PRIVATE_API_FILES`): imports of `keras.src`, `tensorflow.python` or
  `jax._src`; reads or writes of a `_name` attribute that no project file
  defines (so it belongs to Keras, TensorFlow, JAX or the standard library);
  assignments to attributes of framework classes or objects (monkeypatches),
  including `object.__setattr__` and `setattr`.

`tests/test_structure.py` asserts the figures met today, so that they stay
met; tighten its thresholds as the code improves.
"""

import ast
import collections
import dataclasses
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("keras_ema", "zoo")
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 60
# The files allowed to use private framework API, one per package.
PRIVATE_API_FILES = ("keras_ema/_keras_private.py", "zoo/_keras_private.py")
FRAMEWORKS = ("keras", "tensorflow", "tf", "jax", "jnp", "absl", "h5py")
PRIVATE_MODULES = ("keras.src", "tensorflow.python", "jax._src")
# `_name` attributes of the standard library that are documented API.
PUBLIC_UNDERSCORE = {"_exit", "_replace", "_asdict", "_fields", "_make",
                     "_field_defaults", "_getframe"}
# `_name` attributes a project file sets on a project object from outside
# its class (so `self._name = ...` does not declare them).
PROJECT_ATTRIBUTES = {"_after", "_last"}  # posthoc's `Report`


def source_files(root=ROOT):
    """Paths (relative to `root`, with `/`) of every `.py` file of the packages."""
    paths = []
    for package in PACKAGES:
        for directory, dirs, files in os.walk(os.path.join(root, package)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    full = os.path.join(directory, name)
                    paths.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return paths


def module_name(path):
    """`keras_ema/files.py` -> `keras_ema.files`; a package is its `__init__`."""
    parts = path[:-3].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _parse(root, path):
    with open(os.path.join(root, path), encoding="utf-8") as f:
        text = f.read()
    return text, ast.parse(text, filename=path)


# -- lines and functions -----------------------------------------------------


def line_counts(root=ROOT):
    """`{path: number of lines}`."""
    counts = {}
    for path in source_files(root):
        with open(os.path.join(root, path), encoding="utf-8") as f:
            counts[path] = sum(1 for _ in f)
    return counts


def longest_functions(root=ROOT):
    """`{path: (lines, qualified name)}` of each file's longest function."""
    longest = {}
    for path in source_files(root):
        _, tree = _parse(root, path)
        best = (0, "")
        for lines, name in _functions(tree, ""):
            best = max(best, (lines, name))
        if best[0]:
            longest[path] = best
    return longest


def _functions(node, prefix):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + child.name
            yield child.end_lineno - child.lineno + 1, name
            yield from _functions(child, name + ".")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, prefix + child.name + ".")
        else:
            yield from _functions(child, prefix)


# -- import circles ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Edge:
    source: str  # module
    target: str  # module
    line: int
    in_function: bool


def import_edges(root=ROOT):
    """Every import of one project module by another, as `Edge`s."""
    paths = source_files(root)
    modules = {module_name(p): p for p in paths}
    edges = []
    for path in paths:
        source = module_name(path)
        is_package = path.endswith("__init__.py")
        _, tree = _parse(root, path)
        for node, in_function in _imports(tree, False):
            for target in _targets(node, source, is_package, modules):
                if target != source:
                    edges.append(Edge(source, target, node.lineno, in_function))
    return edges


def _imports(node, in_function):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        inner = in_function or isinstance(
            child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _imports(child, inner)


def _targets(node, source, is_package, modules):
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return [m for m in (_known(n, modules) for n in names) if m]
    base = node.module or ""
    if node.level:
        parts = source.split(".")
        if not is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    found = []
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if submodule in modules:
            found.append(submodule)
        else:
            known = _known(base, modules)
            if known:
                found.append(known)
    return found


def _known(name, modules):
    """The project module `name` (or its nearest project parent), or None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_circles(root=ROOT):
    """The import circles: one `(modules, edges within)` per strongly
    connected group of more than one module, largest first."""
    edges = import_edges(root)
    graph = collections.defaultdict(set)
    for e in edges:
        graph[e.source].add(e.target)
    groups = _strongly_connected(graph)
    circles = []
    for group in groups:
        if len(group) > 1:
            inside = sorted(
                {(e.source, e.target, e.line, e.in_function) for e in edges
                 if e.source in group and e.target in group})
            circles.append((sorted(group), inside))
    circles.sort(key=lambda c: (-len(c[0]), c[0]))
    return circles


def _strongly_connected(graph):
    """Tarjan's algorithm, iterative."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []
    counter = 0
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                groups.append(group)
    return groups


# -- private framework API ---------------------------------------------------


def _project_private_names(root):
    """Every `_name` the project defines: functions, classes, attributes,
    module-level names, keyword arguments."""
    names = set()
    for path in source_files(root) + _top_level_scripts(root):
        _, tree = _parse(root, path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                 ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(
                    node.ctx, ast.Store) and isinstance(node.value, ast.Name) \
                    and node.value.id in ("self", "cls"):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
    return {n for n in names if n.startswith("_")} | PROJECT_ATTRIBUTES


def _keras_classes():
    """`{class name: (base names, its `_name` methods)}` of Keras' sources.

    Read line by line (faster than parsing them): a top-level `class` line
    and the methods indented once under it.
    """
    import importlib.util

    spec = importlib.util.find_spec("keras")
    classes = {}
    if spec is None or not spec.submodule_search_locations:
        return classes
    class_line = re.compile(r"^class (\w+)(?:\((.*?)\)?)?:?\s*$")
    method_line = re.compile(r"^    def (_[a-zA-Z]\w*)\(")
    for base in spec.submodule_search_locations:
        for directory, _, files in os.walk(os.path.join(base, "src")):
            for name in files:
                if not name.endswith(".py"):
                    continue
                current = None
                with open(os.path.join(directory, name), encoding="utf-8",
                          errors="replace") as f:
                    for line in f:
                        match = class_line.match(line)
                        if match:
                            bases = [b.strip().split(".")[-1] for b in
                                     (match.group(2) or "").split(",")]
                            current = classes.setdefault(
                                match.group(1), (set(), set()))
                            current[0].update(b for b in bases if b)
                        elif line[:1] not in ("", " ", "\n", "#", ")"):
                            current = None
                        elif current is not None:
                            method = method_line.match(line)
                            if method and not method.group(1).endswith("__"):
                                current[1].add(method.group(1))
    return classes


def _private_methods(classes, name, seen=None):
    """The `_name` methods of Keras class `name` and of its Keras bases."""
    seen = set() if seen is None else seen
    if name in seen or name not in classes:
        return set()
    seen.add(name)
    bases, methods = classes[name]
    found = set(methods)
    for b in bases:
        found |= _private_methods(classes, b, seen)
    return found


def _top_level_scripts(root):
    return sorted(n for n in os.listdir(root)
                  if n.endswith(".py") and os.path.isfile(os.path.join(root, n)))


def _framework_names(tree):
    """Names bound in a module to framework modules or objects imported from them."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FRAMEWORKS:
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module.split(".")[0] in FRAMEWORKS):
            for alias in node.names:
                bound.add(alias.asname or alias.name)
    return bound


def _root_name(node):
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def private_api_uses(root=ROOT):
    """`[(path, line, what)]` of private framework API outside the allowed files."""
    project = _project_private_names(root)
    keras_classes = _keras_classes()
    uses = []
    for path in source_files(root) + _top_level_scripts(root):
        if path in PRIVATE_API_FILES:
            continue
        _, tree = _parse(root, path)
        framework = _framework_names(tree)
        for node in ast.walk(tree):
            uses += [(path, node.lineno, what)
                     for what in _private_use(node, project, framework)]
            if isinstance(node, ast.ClassDef):
                inherited = set()
                for b in node.bases:
                    if _root_name(b) in framework:
                        inherited |= _private_methods(
                            keras_classes, ast.unparse(b).split(".")[-1])
                uses += [(path, f.lineno, f"overrides {node.name}.{f.name} "
                          "(a private framework method)")
                         for f in node.body
                         if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                         and f.name in inherited]
    return sorted(set(uses))


def _private_use(node, project, framework):
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        if node.module.startswith(PRIVATE_MODULES):
            yield f"imports {node.module}"
    elif isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith(PRIVATE_MODULES):
                yield f"imports {alias.name}"
    elif isinstance(node, ast.Attribute):
        name = node.attr
        if (name.startswith("_") and not name.startswith("__")
                and name not in project and name not in PUBLIC_UNDERSCORE):
            yield f"private attribute .{name}"
        if isinstance(node.ctx, ast.Store) and (
                _root_name(node) in framework):
            yield f"assigns {ast.unparse(node)} (monkeypatch)"
    elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute,
                                                               ast.Name)):
        text = ast.unparse(node.func)
        if text in ("object.__setattr__", "setattr") and node.args:
            target = node.args[0]
            if text == "object.__setattr__" or _root_name(target) in framework:
                yield f"{text}({ast.unparse(target)}, ...) (monkeypatch)"


# -- report ------------------------------------------------------------------


def report(root=ROOT, out=sys.stdout):
    """Prints the four sections; returns the number of flagged findings."""
    flagged = 0
    counts = line_counts(root)
    longest = longest_functions(root)
    print(f"Lines per file (flag: over {MAX_FILE_LINES}) and longest function "
          f"(flag: over {MAX_FUNCTION_LINES} lines):", file=out)
    for path in sorted(counts):
        lines = counts[path]
        fn_lines, fn = longest.get(path, (0, "-"))
        big = lines > MAX_FILE_LINES
        long_fn = fn_lines > MAX_FUNCTION_LINES
        flagged += big + long_fn
        print(f"  {'!' if big else ' '}{lines:5d}  {path:36s} "
              f"{'!' if long_fn else ' '}{fn_lines:4d}  {fn}", file=out)
    total = sum(counts.values())
    print(f"  {total:6d}  lines in {len(counts)} files; "
          f"{sum(v > MAX_FILE_LINES for v in counts.values())} over "
          f"{MAX_FILE_LINES}, "
          f"{sum(v[0] > MAX_FUNCTION_LINES for v in longest.values())} files "
          f"with a function over {MAX_FUNCTION_LINES}", file=out)

    circles = import_circles(root)
    print(f"\nImport circles: {len(circles)}", file=out)
    for modules, inside in circles:
        flagged += 1
        print(f"  ! {len(modules)} modules: {', '.join(modules)}", file=out)
        for source, target, line, in_function in inside:
            where = " (in a function)" if in_function else ""
            print(f"      {source}:{line} -> {target}{where}", file=out)

    uses = private_api_uses(root)
    print(f"\nPrivate framework API outside {', '.join(PRIVATE_API_FILES)}: "
          f"{len(uses)}", file=out)
    for path, line, what in uses:
        flagged += 1
        print(f"  ! {path}:{line}  {what}", file=out)
    return flagged


if __name__ == "__main__":
    report()
