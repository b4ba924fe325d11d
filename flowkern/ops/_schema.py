"""An op's schema, its one argument list (docs/ops.md): parsed here for the fake kernels and the Triton launchers, which
read their arguments by name from `Arguments(SCHEMA)`, and for the C++ argument structs (csrc/gen_op_args.py loads
this file). Standard library only: the build imports it without flowkern or torch.
"""

from __future__ import annotations

import ast
import collections
import re

_SCHEMA = re.compile(r"^\s*(\w+)\((.*)\)\s*->\s*(.+?)\s*$", re.S)
REQUIRED = object()  # the default of an argument without one


def parse(schema: str) -> tuple[str, list[tuple[str, str, object]], int]:
    """(op name, [(type, argument name, default or REQUIRED)], number of returns) of
    `name(Type arg[=default], ...) -> ...`."""
    match = _SCHEMA.match(schema)
    if match is None:
        raise ValueError(f"not a schema: {schema!r}")
    name, args_text, returns = match.groups()
    args = []
    for item in filter(None, (a.strip() for a in args_text.split(","))):
        decl, _, default = item.partition("=")
        type_, arg = decl.split()
        args.append((type_, arg, ast.literal_eval(default.strip()) if default else REQUIRED))
    n_returns = returns.count(",") + 1 if returns.startswith("(") else 1
    return name, args, n_returns


def Arguments(schema: str) -> type:
    """A namedtuple of the schema's arguments in order (trailing defaults filled in): `a = Arguments(SCHEMA)(*args)`."""
    name, args, _ = parse(schema)
    defaults = [d for _, _, d in args if d is not REQUIRED]
    return collections.namedtuple(f"{name}_args", [a for _, a, _ in args], defaults=defaults or None)
