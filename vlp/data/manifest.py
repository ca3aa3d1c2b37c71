"""Dataset manifests: one YAML file names a dataset once.

```yaml
name: cc3m
modality: pair                 # pair | image | text | vqa | retrieval | interleaved | nlvr2 | ve | text_pair
license: ...
splits:
  train: {urls: "${VLP_DATA_ROOT:-data}/cc3m/{00000..00331}.tar", num_samples: 3318333}
  val:   {urls: "${VLP_DATA_ROOT:-data}/cc3m/val-{00000..00001}.tar", num_samples: 15840}
fields: {image: "jpg;png;jpeg;webp", text: txt}   # optional, img2dataset defaults
```

A split may override ``modality`` (COCO Karpathy: ``pair`` for training, ``retrieval``
for test). ``urls`` is a brace pattern, a list, or a local glob; anything webdataset
opens (local path, ``pipe:``, ``s3://``/``gs://``/``http(s)://``) is allowed.
"""

from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import yaml

from vlp.errors import ConfigError, DataError
from vlp.utils.paths import expand_vars

MODALITIES = ("pair", "image", "text", "vqa", "retrieval", "interleaved", "nlvr2", "ve", "text_pair", "pair_cls")

#: img2dataset-compatible default field names per role; ";" separates alternatives.
DEFAULT_FIELDS = {
    "image": "jpg;jpeg;png;webp",
    "text": "txt",
    "json": "json",
    "label": "cls",
}

_REMOTE_PREFIXES = ("pipe:", "s3://", "gs://", "http://", "https://", "hf://", "ais://")


@dataclass
class Split:
    urls: str | list[str]
    num_samples: int
    modality: str | None = None
    shard_sizes: list[int] | None = None  # samples per shard, in url order

    def __post_init__(self) -> None:
        if int(self.num_samples) < 0:
            raise ConfigError(f"num_samples must be >= 0, got {self.num_samples}")
        self.num_samples = int(self.num_samples)
        if self.modality is not None and self.modality not in MODALITIES:
            raise ConfigError(f"unknown modality {self.modality!r}; expected one of {MODALITIES}")
        if self.shard_sizes is not None:
            sizes = self.shard_sizes
            if not isinstance(sizes, list) or any(type(n) is not int or n < 0 for n in sizes):
                raise ConfigError(f"shard_sizes must be a list of integers >= 0, got {sizes!r}")
            if sum(sizes) != self.num_samples:
                raise ConfigError(f"shard_sizes sum to {sum(sizes)}, but num_samples is {self.num_samples}")


@dataclass
class Manifest:
    name: str
    modality: str
    splits: dict[str, Split]
    fields: dict[str, str] = field(default_factory=dict)
    license: str = "unknown"
    description: str = ""
    homepage: str = ""
    citation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    path: str | None = None  # where it was read from (for error messages)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ConfigError(
                f"manifest {self.name!r}: unknown modality {self.modality!r}; expected one of {MODALITIES}"
            )
        self.splits = {k: v if isinstance(v, Split) else _make_split(self.name, k, v) for k, v in self.splits.items()}
        unknown = set(self.fields) - set(DEFAULT_FIELDS)
        if unknown:
            raise ConfigError(
                f"manifest {self.name!r}: unknown field role(s) {sorted(unknown)}; expected {sorted(DEFAULT_FIELDS)}"
            )
        self.fields = {**DEFAULT_FIELDS, **self.fields}

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise ConfigError(
                f"manifest {self.name!r} ({self.path or 'in memory'}) has no split {name!r}; "
                f"it has {sorted(self.splits)}"
            )
        return self.splits[name]

    def modality_of(self, split: str) -> str:
        return self.split(split).modality or self.modality

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        d["splits"] = {k: {kk: vv for kk, vv in asdict(v).items() if vv is not None} for k, v in self.splits.items()}
        d["fields"] = {k: v for k, v in self.fields.items() if DEFAULT_FIELDS.get(k) != v}
        return {k: v for k, v in d.items() if v not in ("", {}, None)}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


def _make_split(name: str, split: str, value: Any) -> Split:
    if not isinstance(value, dict):
        raise ConfigError(f"manifest {name!r}: split {split!r} must be a mapping with urls and num_samples")
    unknown = set(value) - {"urls", "num_samples", "modality", "shard_sizes"}
    missing = {"urls", "num_samples"} - set(value)
    if unknown or missing:
        raise ConfigError(
            f"manifest {name!r}: split {split!r} has unknown keys {sorted(unknown)} / missing keys {sorted(missing)}"
        )
    return Split(**value)


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest YAML; errors name the file and the key."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"manifest file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"manifest {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"manifest {path} must be a mapping")
    known = {"name", "modality", "splits", "fields", "license", "description", "homepage", "citation", "extra"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"manifest {path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
    for key in ("name", "modality", "splits"):
        if key not in raw:
            raise ConfigError(f"manifest {path}: missing required key {key!r}")
    try:
        return Manifest(**raw, path=path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace-expand, expand ``${VARS}``, and glob local patterns; keeps order, drops duplicates."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for part in expand_vars(item).split("::"):  # webdataset's multi-pattern separator
            for url in braceexpand.braceexpand(part):
                if not url.startswith(_REMOTE_PREFIXES) and any(c in url for c in "*?["):
                    out.extend(sorted(glob.glob(os.path.expanduser(url))))
                else:
                    out.append(url)
    return list(dict.fromkeys(out))


def check_local_shards(urls: list[str], what: str) -> None:
    """Report every missing local shard by path before training starts."""
    if not urls:
        raise DataError(f"{what}: the url pattern matched no shards")
    missing = [u for u in urls if not u.startswith(_REMOTE_PREFIXES) and not os.path.isfile(u.removeprefix("file:"))]
    if missing:
        shown = "\n  ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{what}: {len(missing)} of {len(urls)} shard(s) not found:\n  {shown}{more}")
