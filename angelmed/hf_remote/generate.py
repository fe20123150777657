"""Build the two remote-code files from angelmed's own modules (one source of truth, never a hand copy).

- configuration_bailing_moe_v2.py = angelmed/config.py + the config part of angelmed/hf.py (`HF_CONFIG_PART`);
- modeling_bailing_moe_v2.py = angelmed/model.py + angelmed/checkpoint.py + the rest of angelmed/hf.py.

Code and comments are copied verbatim, statement by statement. Imports are rewritten with the AST: a
`from angelmed.X import …` becomes a relative import of the generated file that holds X, or disappears when X lands
in the same file (inside a function it becomes `pass`, so the block stays valid); other imports are kept once, at
the top. An angelmed module outside `BUNDLE`, or a name defined by two modules of one file, is an error, so a
change to the sources that the bundle cannot express fails loudly (tests/test_hf.py generates on every run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import angelmed

PACKAGE_DIR = Path(angelmed.__file__).resolve().parent
CONFIG_FILE = "configuration_bailing_moe_v2.py"
MODELING_FILE = "modeling_bailing_moe_v2.py"

# angelmed module -> generated file that holds it
BUNDLE = {
    "angelmed.config": CONFIG_FILE,
    "angelmed.model": MODELING_FILE,
    "angelmed.checkpoint": MODELING_FILE,
    "angelmed.hf": MODELING_FILE,
}
# Top-level definitions of angelmed.hf that go to the configuration file: the config class and its helpers.
HF_CONFIG_PART = frozenset({"_HF_OWNED_KEYS", "_model_config_keys", "_dtype_name", "BailingMoeV2Config"})
# (module, names to take: None = all, or ("only", names) / ("except", names)) per generated file, in order
LAYOUT: dict[str, list[tuple[str, tuple[str, frozenset[str]] | None]]] = {
    CONFIG_FILE: [("angelmed.config", None), ("angelmed.hf", ("only", HF_CONFIG_PART))],
    MODELING_FILE: [("angelmed.model", None), ("angelmed.checkpoint", None),
                    ("angelmed.hf", ("except", HF_CONFIG_PART))],
}
DOCSTRINGS = {
    CONFIG_FILE: "BailingMoeV2 (Ling-2.0 / AntAngelMed) configuration for transformers (`model_type` bailing_moe).",
    MODELING_FILE: "BailingMoeV2 (Ling-2.0 / AntAngelMed) causal LM for transformers, built on angelmed's model.",
}


class RemoteCodeError(RuntimeError):
    pass


def _source_path(module: str) -> Path:
    return PACKAGE_DIR.joinpath(*module.split(".")[1:]).with_suffix(".py")


def _defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
        node, (ast.AnnAssign, ast.AugAssign)) else []
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def _used_names(nodes: list[ast.stmt]) -> set[str]:
    return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)}


def _is_angelmed(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and (node.module or "").split(".")[0] == "angelmed"
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "angelmed" for a in node.names)
    return False


def _rewrite_angelmed_import(node: ast.Import | ast.ImportFrom, here: str, where: str) -> str | None:
    """The import line for file `here`, or None when the names are already defined in it."""
    if isinstance(node, ast.Import) or node.module not in BUNDLE:
        what = ast.unparse(node)
        raise RemoteCodeError(f"{where}: `{what}` needs a module outside the remote-code bundle "
                              f"{sorted(BUNDLE)}; add it to angelmed.hf_remote.generate.BUNDLE")
    target = BUNDLE[node.module]
    if target == here:
        return None
    names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)
    return f"from .{Path(target).stem} import {names}"


def _module_parts(module: str, select, here: str) -> tuple[list[str], list[str], set[str]]:
    """(import lines, code segments, defined names) of `module` for generated file `here`."""
    path = _source_path(module)
    src = path.read_text(encoding="utf-8")
    lines = src.splitlines(keepends=True)
    tree = ast.parse(src, filename=str(path))
    where = f"{path.name}"
    kept: list[ast.stmt] = []
    segments: list[str] = []
    defined: set[str] = set()
    imports: list[ast.stmt] = []
    prev_end = 0
    for i, node in enumerate(tree.body):
        # a statement owns the comments and blank lines since the previous statement ended
        segment_start, prev_end = prev_end, node.end_lineno
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
            continue
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # module docstring
        names = _defined_names(node)
        if select is not None:
            mode, chosen = select
            take = bool(names & chosen) if mode == "only" else not (names and names <= chosen)
            if not take:
                continue
        kept.append(node)
        defined |= names
        body = lines[segment_start:node.end_lineno]
        for inner in ast.walk(node):
            if _is_angelmed(inner):
                line = _rewrite_angelmed_import(inner, here, f"{where}:{inner.lineno}")
                first, last = inner.lineno - 1 - segment_start, inner.end_lineno - 1 - segment_start
                indent = body[first][: len(body[first]) - len(body[first].lstrip())]
                body[first:last + 1] = [f"{indent}{line or 'pass'}\n"] + [""] * (last - first)
        segments.append("".join(body).rstrip("\n") + "\n")
    used = _used_names(kept) if select is not None and select[0] == "only" else None
    import_lines: list[str] = []
    for node in imports:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if used is not None:
            aliases = [a for a in node.names if (a.asname or a.name.split(".")[0]) in used]
            if not aliases:
                continue
            node = type(node)(**{**{f: getattr(node, f) for f in node._fields}, "names": aliases})
        if _is_angelmed(node):
            line = _rewrite_angelmed_import(node, here, where)
            if line:
                import_lines.append(line)
        else:
            import_lines.append(ast.unparse(node))
    return import_lines, segments, defined


def render_remote_code() -> dict[str, str]:
    """{file name: source text} of the two remote-code files."""
    rendered: dict[str, str] = {}
    for here, parts in LAYOUT.items():
        imports: list[str] = []
        body: list[str] = []
        owner: dict[str, str] = {}
        for module, select in parts:
            import_lines, segments, defined = _module_parts(module, select, here)
            for name in defined:
                if name in owner and owner[name] != module:
                    raise RemoteCodeError(f"{here}: {name!r} is defined in both {owner[name]} and {module}")
                owner[name] = module
            imports += [line for line in import_lines if line not in imports]
            body.append(f"\n\n# ======== from {module.replace('.', '/')}.py ========")
            body += segments
        # names of a split module defined in the other file
        for module, select in parts:
            if select is not None and select[0] == "except":
                other = next(f for f, p in LAYOUT.items() if f != here and any(m == module for m, _ in p))
                line = f"from .{Path(other).stem} import {', '.join(sorted(select[1]))}"
                if line not in imports:
                    imports.append(line)
        sources = ", ".join(f"angelmed/{m.split('.')[-1]}.py" for m, _ in parts)
        header = (
            "# Generated by angelmed.hf_remote (angelmed " + angelmed.__version__ + ") from " + sources + ".\n"
            "# Do not edit: regenerate with `angelmed convert SRC DST --hf-remote-code`. License: Apache-2.0.\n"
            f'"""{DOCSTRINGS[here]}"""\n\nfrom __future__ import annotations\n\n'
        )
        text = header + "\n".join(imports) + "\n" + "".join(body).rstrip("\n") + "\n"
        try:
            compile(text, here, "exec")
        except SyntaxError as e:
            raise RemoteCodeError(f"generated {here} does not compile: {e}") from None
        rendered[here] = text
    return rendered
