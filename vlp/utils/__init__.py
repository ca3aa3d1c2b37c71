from vlp.utils.paths import resolve_path

__all__ = ["resolve_path"]
