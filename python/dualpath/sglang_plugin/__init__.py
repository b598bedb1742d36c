"""The SGLang side of DualPath (imports SGLang: load only inside an SGLang server process)."""
