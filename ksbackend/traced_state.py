"""What a stored trace depends on that its saved guards no longer check.

``trace_cache`` stores Dynamo's trace with the guards on its arguments and closure only: guards on module globals
have no meaning in another process, and Dynamo never checks module hooks (``skip_nnmodule_hook_guards``). Without
more, a later process would run a stale graph after a library patched ``modeling_llama.rotate_half`` (as Liger
does), after a class's ``forward`` changed, or with a hook registered. Three descriptions close that:

- ``module_tree``: each submodule's path and class, the code of every method of its classes, its instance
  overrides and hooks, and the global module hooks. It goes into the compile cache's key.
- ``namespaces``: every function, class and module named in the namespaces of the Python modules the trace read,
  and transformers' attention registries. Stored with each entry and compared when a later process loads it.
- ``Identities``: the same objects by identity, checked before each call in the process that holds the entry (a
  patch made after the first call), cheap enough for that.

Code is described by its bytecode, names and constants, never by address, so descriptions agree across processes.
"""

import functools
import hashlib
import re
import sys
import types

import torch

# the hooks a forward runs (each registered hook has its entry here; the kwargs and always-called sets only flag them)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")
_PLAIN = (int, float, str, bytes, bool, type(None), complex)
_DYNAMO_NAME = re.compile(r"_\d+_c\d+|__.*")  # the globals Dynamo installs (named by object ids), and dunders


def digest(lines) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


def describe(value, depth=0) -> str:
    """An address-free description of a value a trace may have inlined: deep for functions (code, defaults,
    closure), by name for classes and modules, by type for other objects."""
    if depth > 4:
        return type(value).__qualname__
    if isinstance(value, _PLAIN):
        return repr(value)
    if isinstance(value, (tuple, list, frozenset)):
        items = [describe(v, depth + 1) for v in value]
        return "(" + ",".join(sorted(items) if isinstance(value, frozenset) else items) + ")"
    if isinstance(value, types.CodeType):
        consts = ",".join(describe(c, depth + 1) for c in value.co_consts)
        return f"code[{hashlib.sha256(value.co_code).hexdigest()[:16]};{','.join(value.co_names)};{consts}]"
    if isinstance(value, functools.partial):
        keywords = tuple(sorted(value.keywords.items()))
        return f"partial({describe(value.func, depth + 1)},{describe(value.args, depth)},{describe(keywords, depth)})"
    if isinstance(value, types.MethodType):
        return f"method({describe(value.__func__, depth + 1)},{type(value.__self__).__qualname__})"
    if isinstance(value, (staticmethod, classmethod)):
        return describe(value.__func__, depth + 1)
    if isinstance(value, property):
        return "property(" + ",".join(describe(f, depth + 1) for f in (value.fget, value.fset) if f) + ")"
    if isinstance(value, types.FunctionType):
        cells = [describe(c.cell_contents, depth + 1) for c in value.__closure__ or () if _filled(c)
                 and c.cell_contents is not value]
        wrapped = getattr(value, "__wrapped__", None)
        return (f"fn({value.__module__}.{value.__qualname__},{describe(value.__code__, depth)},"
                f"{describe(value.__defaults__, depth)},[{','.join(cells)}]"
                + (f",wrapped={describe(wrapped, depth + 1)}" if wrapped is not None else "") + ")")
    if isinstance(value, types.ModuleType):
        return f"module({value.__name__})"
    if isinstance(value, type):
        return f"class({value.__module__}.{value.__qualname__})"
    if isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return f"builtin({getattr(value, '__module__', None)}.{value.__qualname__})"
    return f"obj({type(value).__module__}.{type(value).__qualname__})"


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _methods(cls) -> dict:
    return {name: v for name, v in vars(cls).items()
            if isinstance(v, (types.FunctionType, staticmethod, classmethod, property))}


def _overrides(module) -> dict:
    """Callables set on the instance: they shadow the class's methods."""
    return {k: v for k, v in vars(module).items()
            if callable(v) and not isinstance(v, (torch.nn.Module, torch.Tensor, type))}


def _hook_dicts(model) -> list:
    global_hooks = [getattr(torch.nn.modules.module, name, {}) for name in _GLOBAL_HOOKS]
    return global_hooks + [getattr(m, name) for m in model.modules() for name in _HOOK_DICTS if hasattr(m, name)]


def _classes(model) -> list:
    """Every class of the module tree, with its bases, once."""
    seen = {}
    for m in model.modules():
        for klass in type(m).__mro__:
            if klass is not object:
                seen.setdefault(klass, None)
    return list(seen)


def module_tree(model) -> str:
    """Digest of the module tree as code sees it: paths and classes, methods, instance overrides, hooks."""
    lines = []
    for path, m in model.named_modules(remove_duplicate=False):
        lines.append(f"{path}:{type(m).__module__}.{type(m).__qualname__}")
        lines += [f"{path}.{k}={describe(v)}" for k, v in sorted(_overrides(m).items())]
    for klass in _classes(model):
        lines += [f"{klass.__module__}.{klass.__qualname__}.{k}={describe(v)}" for k, v in
                  sorted(_methods(klass).items())]
    lines += [",".join(describe(h) for h in hooks.values()) for hooks in _hook_dicts(model)]
    return digest(lines)


def traced_modules(function, model) -> list:
    """The Python modules whose globals a compiled function's code may have read: those Dynamo recorded (where its
    ahead-of-time API says), and always those defining the classes of the model's modules."""
    names = {type(m).__module__ for m in model.modules()}
    info = getattr(function, "source_info", None)
    if info is not None:
        names |= {source.module for source in info().inlined_sources}
    return sorted(names)


def _namespace_dicts(module_names) -> dict:
    """label -> mapping: the namespaces of those modules (imported or not), and transformers' attention and mask
    registries (which function an implementation name resolves to)."""
    dicts = {name: vars(sys.modules[name]) if name in sys.modules else {} for name in module_names}
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return dicts
    for registry in (ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS):
        for mapping in ("_global_mapping", "_local_mapping"):
            dicts[f"{type(registry).__name__}.{mapping}"] = getattr(registry, mapping, {})
    return dicts


def _inlinable(key, value) -> bool:
    """What traced code can name: callables and modules (not Dynamo's own globals, nor dunders)."""
    return not _DYNAMO_NAME.fullmatch(key) and (callable(value) or isinstance(value, types.ModuleType))


def namespaces(module_names) -> str:
    """Digest of what ``module_names`` name (classes with their methods): a patched function or method changes it."""
    lines = []
    for label, mapping in _namespace_dicts(module_names).items():
        lines.append(f"{label}:{'imported' if mapping else 'absent'}")
        for key, value in sorted(mapping.items()):
            if not _inlinable(key, value):
                continue
            if isinstance(value, type) and value.__module__ == label:  # its own classes, method by method
                lines.append(f"{label}.{key}=" + ";".join(f"{k}={describe(v)}" for k, v in
                                                          sorted(_methods(value).items())))
            else:
                lines.append(f"{label}.{key}={describe(value)}")
    return digest(lines)


class Identities:
    """The objects ``namespaces`` and ``module_tree`` describe, by identity: ``changed()`` says, in well under a
    millisecond, whether one was replaced since, or a hook or class attribute added."""

    def __init__(self, module_names, model):
        self.held = [(mapping, key, value) for mapping in _namespace_dicts(module_names).values()
                     for key, value in mapping.items() if _inlinable(key, value)]
        classes = [vars(klass) for klass in _classes(model)]
        self.held += [(mapping, key, value) for mapping in classes for key, value in mapping.items()]
        for m in model.modules():  # the instance attributes that shadow a method, and forward's (if set later)
            own = vars(m)
            self.held += [(own, key, value) for key, value in {"forward": None, **_overrides(m)}.items()]
        self.sized = [(mapping, len(mapping)) for mapping in classes + _hook_dicts(model)]

    def changed(self) -> str | None:
        for mapping, key, value in self.held:
            if mapping.get(key) is not value:
                return f"{key!r} changed since the trace"
        if any(len(mapping) != size for mapping, size in self.sized):
            return "a hook or a class attribute was added since the trace"
        return None
