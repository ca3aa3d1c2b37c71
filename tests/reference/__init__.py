"""Reference implementations built from third-party modules only (timm, transformers), for parity tests."""
