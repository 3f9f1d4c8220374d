"""Editing methods, one sub-package each; every sub-package registers itself on import."""
