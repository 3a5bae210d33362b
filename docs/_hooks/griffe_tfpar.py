"""Griffe extension for tfpar's API reference (mkdocs.yml: mkdocstrings' python handler, ``extensions``).

The reference is read from the source by static analysis (no TensorFlow import). Two things the
source does that static analysis does not see, and one docstring habit Markdown does not render:

* ``tfpar/__init__.py`` re-exports its top-level names lazily (PEP 562, the ``_EXPORTS`` table),
  and so does ``tfpar.cluster`` for the names that need TensorFlow (``_LAZY``): ``tfpar.scope``
  and ``tfpar.cluster.resolve`` exist only at run time. For every module with a ``__getattr__``
  this extension reads its lazy-import tables and adds each entry as an alias, so the pages can
  say ``::: tfpar.scope`` and keep working when the module behind a name moves (the table moves
  with it).
* Docstrings are Google style with a few reST habits: roles (``:func:`shard```) become code spans,
  and ``Example:`` blocks (indented code, or ``>>>`` lines at the header's own indentation) become
  fenced code inside an "Example" admonition, so code keeps its lines and doctests are highlighted.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`~?([^`]+)`")
_SECTION = re.compile(r"^\s*(?P<name>[A-Z][A-Za-z ]*):\s*$")
_ARGS_SECTIONS = ("args", "arguments", "params", "parameters", "keyword args", "keyword arguments")
_SHARED = re.compile(r"^(?P<indent>\s+)(?P<names>[A-Za-z_]\w*(?:, [A-Za-z_]\w*)+): (?P<text>.*)$")
_EXAMPLE = re.compile(r"^(?P<indent>\s*)(?P<title>Examples?):\s*$")


class TfparExtension(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        # Every docstring of the package, before _prefer_imported_names hides submodules from walks.
        for obj in (pkg, *_walk(pkg)):
            if not obj.is_alias and obj.docstring is not None:
                obj.docstring.value = markdown_docstring(obj.docstring.value)
        if pkg.path != "tfpar":
            return
        for module in (pkg, *(obj for obj in _walk(pkg) if not obj.is_alias and obj.is_module)):
            if "__getattr__" not in module.members or module.filepath is None:
                continue
            for name, target in _lazy_exports(Path(str(module.filepath))).items():
                if name not in module.members:
                    module.set_member(name, griffe.Alias(name, target, parent=module))
        _prefer_imported_names(pkg)


def _lazy_exports(path: Path) -> dict[str, str]:
    """``{name: "module.attribute"}`` from the lazy-import tables of a module with ``__getattr__``.

    A table is a module-level dict literal whose values are module paths (``{"resolve":
    "tfpar.cluster._resolve"}``: the attribute has the key's name) or ``(module, attribute)``
    pairs (tfpar/__init__.py's ``_EXPORTS``; an attribute of None is the module itself, which
    griffe already knows as a submodule).
    """
    exports: dict[str, str] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if not isinstance(value, ast.Dict):
            continue
        try:
            table = ast.literal_eval(value)
        except ValueError:
            continue
        for name, target in table.items():
            if isinstance(target, str) and target.startswith("tfpar"):
                exports[name] = f"{target}.{name}"
            elif isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], str) and target[1]:
                exports[name] = f"{target[0]}.{target[1]}"
    return exports


def _prefer_imported_names(pkg: griffe.Module) -> None:
    """``tfpar.data.shard`` is the function, as at run time, not the submodule it shadows.

    ``from tfpar.data.shard import shard`` in a package's ``__init__`` rebinds the attribute, so
    Python users get the function; griffe keeps the submodule. For each such name the submodule's
    own aliases are resolved first (they are looked up through the submodule's path), then the
    package's member becomes an alias of the imported object. The submodule stays reachable from
    the objects it holds, and every ``::: tfpar.data.shard`` in the pages documents the function.
    """
    shadowed = []
    packages = [pkg]
    while packages:
        package = packages.pop()
        for name, member in list(package.members.items()):
            if member.is_alias or not member.is_module:
                continue
            packages.append(member)
            imported = package.imports.get(name)
            if imported and imported != member.path and imported.startswith(member.path + "."):
                shadowed.append((package, name, member, imported))
    aliases = [obj for obj in _walk(pkg) if obj.is_alias]
    for _, _, module, _ in shadowed:
        for alias in aliases:
            if alias.target_path.startswith(module.path + "."):
                try:
                    alias.resolve_target()
                except griffe.AliasResolutionError:
                    pass
    for package, name, module, imported in shadowed:
        target = module.get_member(imported[len(module.path) + 1 :])
        package.members[name] = griffe.Alias(name, target, parent=package)


def _walk(obj: griffe.Object):
    for member in list(obj.members.values()):
        yield member
        if not member.is_alias:
            yield from _walk(member)


def markdown_docstring(text: str) -> str:
    text = _ROLE.sub(r"`\1`", text)
    text = re.sub(r"(?<=\S)::$", ":", text, flags=re.M)  # reST literal-block marker
    return _fence_examples(_split_shared_arguments(text))


def _split_shared_arguments(text: str) -> str:
    """``a, b: As in X.`` in an ``Args:`` section becomes one entry per name (griffe wants one)."""
    lines = text.splitlines()
    out: list[str] = []
    section = None  # (indent of the "Args:" line) while inside an Args section
    i = 0
    while i < len(lines):
        line = lines[i]
        header = _SECTION.match(line)
        if header:
            section = _indentation(line) if header.group("name").lower() in _ARGS_SECTIONS else None
        elif section is not None and line.strip() and _indentation(line) <= section:
            section = None
        shared = _SHARED.match(line) if section is not None else None
        if not shared:
            out.append(line)
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() and _indentation(lines[end]) > _indentation(line):
            end += 1
        for name in shared.group("names").split(", "):
            out.append(f"{shared.group('indent')}{name}: {shared.group('text')}")
            out.extend(lines[i + 1 : end])
        i = end
    return "\n".join(out)


def _fence_examples(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _EXAMPLE.match(lines[i])
        first = i + 1
        while match and first < len(lines) and not lines[first].strip():
            first += 1
        if not match or first == len(lines):
            out.append(lines[i])
            i += 1
            continue
        indent = len(match.group("indent"))
        head = lines[first]
        if head.lstrip().startswith("```"):  # fenced already
            out.append(lines[i])
            i += 1
            continue
        if _indentation(head) > indent:  # an indented block: up to the next line at the header's level
            end = first
            while end < len(lines) and (not lines[end].strip() or _indentation(lines[end]) > indent):
                end += 1
            body = textwrap.dedent("\n".join(lines[first:end]).rstrip("\n")).splitlines()
        elif head.lstrip().startswith(">>>"):  # doctest lines at the header's level: up to a blank line
            end = first
            while end < len(lines) and lines[end].strip():
                end += 1
            body = [line[indent:] for line in lines[first:end]]
        else:
            out.append(lines[i])
            i += 1
            continue
        language = "pycon" if any(line.lstrip().startswith(">>>") for line in body) else "python"
        pad = " " * (indent + 4)
        out.append(f"{' ' * indent}Example:")  # an admonition; "Examples:" would be griffe's doctest section
        out.append(f"{pad}```{language}")
        out.extend(pad + line if line.strip() else "" for line in body)
        out.append(f"{pad}```")
        if end < len(lines):
            out.append("")
        i = end
    return "\n".join(out)


def _indentation(line: str) -> int:
    return len(line) - len(line.lstrip())
