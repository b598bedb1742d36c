"""The SGLang side of DualPath (imports SGLang: load only inside an SGLang server process).

`load` is the `sglang.srt.plugins` entry point: SGLang calls it in every process it starts
(launcher, scheduler, detokenizer). It registers DualPath's hooks only when the process was
started by `python -m dualpath.launch_server --enable-dual-path` (DUALPATH_PLUGIN_CONFIG);
otherwise installing dualpath changes nothing in SGLang.
"""

from __future__ import annotations

import logging

log = logging.getLogger("dualpath.plugin")


def enabled_config():
    """The PluginConfig of this process when the dual path is enabled, else None."""
    from dualpath import env
    from dualpath.config import PluginConfig

    raw = env.PLUGIN_CONFIG.get()
    if not raw:
        return None
    cfg = PluginConfig.from_json(raw)
    return cfg if cfg.enable_dual_path else None


def load() -> None:
    cfg = enabled_config()
    if cfg is None:
        return
    from dualpath.sglang_plugin.hooks import register_all

    register_all()
    log.info("dualpath plugin loaded (role %s, agent port %d)", cfg.role or "-", cfg.agent_port)
