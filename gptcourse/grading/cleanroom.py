"""What the batch grader runs of a submitted notebook: the graded function and
the definitions it uses, read from the source, never the notebook's other cells.

    room = clean_room(cells, "scaled_dot_product_attention", forbidden=("scaled_dot_product",))
    room.source      the statements a fresh process runs before calling the function (text)
    room.problem     None, or why the grader will not run them (0 points; the student is told)
    room.forbidden   None, or the ready-made implementation the code names (0 points)

Why: nothing computed or recorded inside a process that runs untrusted code can
be trusted by the code beside it (Python has no in-process security). So the
grader decides here, on the notebook's text, what may run, and trusts only the
outputs that come back, compared with its own reference on inputs drawn from a
secret seed.

Reading. Every code cell is parsed; a cell that does not parse is skipped (a
notebook run would fail there too). Starting from the graded name, the reader
keeps the statements that bind or change each name it needs, and then the names
those statements read, until nothing new is needed:

  * a name read when a statement runs (an assignment's value, a decorator, a
    default) needs its bindings BEFORE that statement, from the last complete
    one (an assignment, a def, an import) on;
  * a name read inside a function's body needs its FINAL value: the bindings
    from the last complete one in the whole notebook on;
  * `table.append(x)` and `table[k] = v` at the top level change `table`.

So a function redefined in a later cell is graded as last defined, a helper
from another cell comes along, and a demo, a `check(...)` call or anything
else the function does not use never runs.

Vetting. The statements kept may use the language, the builtins that cannot
reach objects by name, and these modules only: ALLOWED_MODULES. Refused, with
the cell and line: names and attributes that begin with an underscore (but
`__init__`, for `super().__init__()`), the builtins that turn a string into an
object or open files (BLOCKED_NAMES), the attributes of frames, generators,
tracebacks and code objects, and the attributes that reach files, raw memory,
other processes or torch's dispatcher (BLOCKED_ATTRIBUTES), special methods
other than ALLOWED_SPECIAL_METHODS (a property `__array_interface__` would hand
NumPy any address), and `type` other than as `type(x)`. The modules the allowed
ones import (torch.os, fractions.sys, numpy.ma's inspect) are reached by
attribute, so every attribute the program reads is rewritten into a call of
the worker's guard (_Guarded), which refuses to read from, or hand out, a module
outside ALLOWED_MODULES. An honest solution
(loops, einsum, float64 inside, NumPy, tuples, a helper, a class) never needs
them; the exercise notebooks' `check()` says so before submission.
"""
import ast
import copy
from dataclasses import dataclass, field

ALLOWED_MODULES = ("torch", "torch.nn", "torch.nn.functional", "torch.nn.init", "torch.linalg", "torch.fft",
                   "torch.special", "math", "cmath", "numpy", "numpy.linalg", "numpy.random", "itertools", "functools", "collections", "heapq", "bisect",
                   "statistics", "random", "re", "fractions", "decimal", "copy")
# builtins that reach an object from a string, open files, or read the caller's variables
BLOCKED_NAMES = frozenset({
    "eval", "exec", "compile", "getattr", "setattr", "delattr", "globals", "locals", "vars", "open",
    "breakpoint", "input", "help", "exit", "quit", "memoryview", "classmethod_descriptor"})
# attributes that reach files, raw memory, processes, or torch's dispatcher and compilers
BLOCKED_ATTRIBUTES = frozenset({
    "ctypes", "ctypeslib", "lib", "stride_tricks", "as_strided", "core", "f2py", "distutils", "testing",
    "memmap", "fromfile", "from_file", "load", "loadtxt", "genfromtxt", "fromregex", "save", "savez",
    "savez_compressed", "savetxt", "tofile", "ops", "library", "overrides", "utils", "jit", "fx", "compile",
    "export", "hub", "package", "multiprocessing", "distributed", "classes", "data_ptr", "untyped_storage",
    "storage", "set_", "get_type_hints", "modules", "builtins", "system", "mro", "backends"})
# frames, generators, coroutines, tracebacks, code objects: the way to other code's variables
# (func_globals, func_code: Cython functions' names for __globals__ and __code__; im_: methods')
FRAME_PREFIXES = ("f_", "gi_", "cr_", "ag_", "tb_", "co_", "func_", "im_")
ALLOWED_DUNDERS = ("__init__",)
# special methods a graded class may define: the ones an nn.Module, a container or a
# printable value needs. Others (__array_interface__, __dlpack__, __torch_function__,
# __reduce__, __del__, __getattr__, ...) hand C code or the worker a hook, and are refused
ALLOWED_SPECIAL_METHODS = ("__init__", "__call__", "__len__", "__getitem__", "__setitem__", "__contains__",
                           "__iter__", "__next__", "__repr__", "__str__")
GUARD = "_grader_attr"     # what `obj.name` becomes in the program sent to the worker (see _Guarded)


@dataclass
class CleanRoom:
    source: str = ""
    problem: str = None
    forbidden: str = None
    statements: list = field(default_factory=list)      # (code cell, line) of each kept statement

    def refusal(self):
        """None when the program may run; else (status, why): ("forbidden", ...) when it
        names the ready-made implementation, ("error", problem) when it is refused."""
        if self.forbidden:
            return "forbidden", f"uses {self.forbidden}, which this exercise asks you to write yourself"
        if self.problem:
            return "error", self.problem
        return None


@dataclass
class _Info:
    binds: set            # names the statement binds at the top level
    complete: set         # ... of which it rebinds whole (assignment, def, class, import)
    changes: set          # names it changes in place (table.append(x), table[k] = v)
    eager: set            # names read when the statement runs
    lazy: set             # names read later, inside a function's body


def parse_cells(cells):
    """The top-level statements of the notebook's code cells, in order: [(cell, node)]."""
    statements = []
    for i, source in enumerate(cells):
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        statements += [(i, node) for node in tree.body]
    return statements


def _root(node):
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _alias_name(alias, from_import):
    return alias.asname or (alias.name if from_import else alias.name.split(".")[0])


def _reads(node, lazy_depth=0, out=None):
    """(eager, lazy): the names read by node, split by whether they are read inside a function body."""
    out = out if out is not None else (set(), set())
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        for part in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            _reads(part, lazy_depth, out)
        for part in getattr(node, "decorator_list", []):
            _reads(part, lazy_depth, out)
        body = node.body if isinstance(node.body, list) else [node.body]
        for part in body:
            _reads(part, lazy_depth + 1, out)
        return out
    if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Load, ast.Del)):
        out[1 if lazy_depth else 0].add(node.id)
    for child in ast.iter_child_nodes(node):
        _reads(child, lazy_depth, out)
    return out


def _top_level_nodes(node):
    """The nodes of a top-level statement that run at the top level (not inside
    a function's or class's body, a lambda or a comprehension)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if n is not node and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
                                            ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        if n is node and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        stack.extend(ast.iter_child_nodes(n))


def _info(node, imported):
    binds, complete, changes = set(), set(), set()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        binds.add(node.name)
        complete.add(node.name)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
        names = {_alias_name(a, isinstance(node, ast.ImportFrom)) for a in node.names if a.name != "*"}
        binds |= names
        complete |= names
    else:
        for n in _top_level_nodes(node):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                binds.add(n.id)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n is not node:
                binds.add(n.name)
            elif isinstance(n, (ast.Attribute, ast.Subscript)) and isinstance(n.ctx, (ast.Store, ast.Del)):
                changes.add(_root(n))
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
                changes.add(_root(n.func))
        if isinstance(node, ast.Assign):
            for target in node.targets:
                elements = target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
                complete |= {t.id for t in elements if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and node.value is not None and isinstance(node.target, ast.Name):
            complete.add(node.target.id)
    changes = {c for c in changes if c and c not in imported}
    eager, lazy = _reads(node)
    if isinstance(node, ast.ClassDef):                  # a class body runs now; its methods later
        eager |= lazy
    return _Info(binds, complete, changes, eager, lazy)


def _slice(statements, infos, function):
    """Indices of the statements needed to define `function`, and the names requested."""
    keep, seen, requested = set(), set(), set()
    todo = [(function, None)]
    while todo:
        name, before = todo.pop()
        if (name, before) in seen:
            continue
        seen.add((name, before))
        requested.add(name)
        end = len(statements) if before is None else before
        hits = [i for i in range(end) if name in infos[i].binds or name in infos[i].changes]
        whole = [i for i in hits if name in infos[i].complete]
        start = whole[-1] if whole else 0
        for i in hits:
            if i >= start and i not in keep:
                keep.add(i)
                todo += [(n, i) for n in infos[i].eager] + [(n, None) for n in infos[i].lazy]
    return sorted(keep), requested


def _where(cell, node):
    return f"code cell {cell + 1}, line {getattr(node, 'lineno', '?')}"


def _vet(cell, node, forbidden):
    """(problem, forbidden_name) for one kept statement: the first thing refused, or (None, None)."""
    # type(x) may ask an object's class; type(name, bases, namespace) would make a class
    # whose attributes are given as strings (special methods past the checks below)
    one_argument_type = {id(n.func) for n in ast.walk(node) if isinstance(n, ast.Call) and
                         isinstance(n.func, ast.Name) and len(n.args) == 1 and not n.keywords}
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id == "type" and id(n) not in one_argument_type:
            return f"{_where(cell, n)}: uses type other than as type(x), which graded code may not do", None
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            if isinstance(n, ast.ImportFrom) and (n.level or n.module is None):
                return f"{_where(cell, n)}: a relative import; graded code imports only {', '.join(ALLOWED_MODULES)}", None
            modules = [n.module] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names]
            for module in modules:
                if module not in ALLOWED_MODULES:
                    return (f"{_where(cell, n)}: imports {module}; graded code may import only "
                            f"{', '.join(ALLOWED_MODULES)}"), None
            for a in n.names:
                if a.name == "*":
                    return f"{_where(cell, n)}: `from {n.module} import *`; import the names you use", None
                if isinstance(n, ast.ImportFrom):
                    hit = _forbidden_in(a.name, forbidden)
                    if hit:
                        return None, f"{n.module}.{a.name}"
                    problem = _attribute_problem(a.name)
                    if problem:
                        return f"{_where(cell, n)}: imports {a.name}, {problem}", None
        elif isinstance(n, ast.Name):
            if n.id in BLOCKED_NAMES:
                return (f"{_where(cell, n)}: uses `{n.id}`, which graded code may not use (it reaches objects by "
                        f"name or opens files); write the name out"), None
            if n.id.startswith("__") and n.id.endswith("__"):
                return f"{_where(cell, n)}: uses `{n.id}`, a name graded code may not use", None
        elif isinstance(n, ast.Attribute):
            hit = _forbidden_in(n.attr, forbidden)
            if hit and not isinstance(n.ctx, ast.Store):
                return None, ast.unparse(n)[:80]
            problem = _attribute_problem(n.attr)
            if problem:
                return f"{_where(cell, n)}: uses `.{n.attr}`, {problem}", None
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if n.name.startswith("__") and n.name.endswith("__") and n.name not in ALLOWED_SPECIAL_METHODS:
                return (f"{_where(cell, n)}: defines {n.name}, a special method graded code may not define "
                        f"(allowed: {', '.join(ALLOWED_SPECIAL_METHODS)})"), None
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            bad = [name for name in n.names if name.startswith("__")]
            if bad:
                return f"{_where(cell, n)}: declares {bad[0]}, a name graded code may not use", None
    return None, None


class _Guarded(ast.NodeTransformer):
    """`obj.name` (read) becomes `_grader_attr(obj, "name")`: in the worker, that
    function refuses to read from, or hand out, a module outside ALLOWED_MODULES,
    so the modules that allowed ones import (torch.os, fractions.sys, numpy's
    inspect, ...) stay out of reach. Stores and deletes keep their form."""

    def visit_Attribute(self, node):
        self.generic_visit(node)
        if not isinstance(node.ctx, ast.Load):
            return node
        call = ast.Call(func=ast.Name(id=GUARD, ctx=ast.Load()), args=[node.value, ast.Constant(node.attr)],
                        keywords=[])
        return ast.copy_location(call, node)


def _forbidden_in(name, forbidden):
    return next((p for p in forbidden if p in name), None)


def _attribute_problem(attr):
    if attr.startswith("_") and attr not in ALLOWED_DUNDERS:
        return "an attribute that begins with an underscore (private or special), which graded code may not use"
    if attr.startswith(FRAME_PREFIXES):
        return "an attribute of frames, generators, functions or code objects, which graded code may not use"
    if attr in BLOCKED_ATTRIBUTES:
        return "which reaches files, raw memory, other processes or torch's internals: graded code may not use it"
    return None


def clean_room(cells, function, forbidden=()):
    """What the grader runs for one graded function of a notebook; see the module's docstring.

    cells: the code cells' sources (str); function: the graded name;
    forbidden: parts of names whose use earns zero (e.g. "scaled_dot_product")."""
    if not isinstance(function, str) or not function.isidentifier():
        raise ValueError(f"function must be a Python name, got {function!r}")
    statements = parse_cells(cells)
    imported = set()
    for _, node in statements:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {_alias_name(a, isinstance(node, ast.ImportFrom)) for a in node.names}
    infos = [_info(node, imported) for _, node in statements]
    keep, requested = _slice(statements, infos, function)
    if not any(function in infos[i].binds for i in keep):
        return CleanRoom(problem=f"no function named {function} was found")
    room = CleanRoom()
    parts = []
    for i in keep:
        cell, node = statements[i]
        if isinstance(node, (ast.Import, ast.ImportFrom)):          # only the names the function uses
            names = [a for a in node.names if _alias_name(a, isinstance(node, ast.ImportFrom)) in requested]
            node = type(node)(**{**{f: getattr(node, f) for f in node._fields}, "names": names})
            ast.copy_location(node, statements[i][1])
        problem, hit = _vet(cell, node, forbidden)
        if hit:
            return CleanRoom(forbidden=hit, statements=[(cell, node.lineno)])
        if problem:
            return CleanRoom(problem=problem, statements=[(cell, node.lineno)])
        parts.append(ast.unparse(_Guarded().visit(copy.deepcopy(node))))
        room.statements.append((cell, node.lineno))
    room.source = "\n".join(parts) + "\n"
    return room
