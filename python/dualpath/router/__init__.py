"""The DualPath router: the global scheduler behind an SGLang-compatible HTTP front end."""
