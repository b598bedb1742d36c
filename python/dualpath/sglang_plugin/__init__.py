"""The SGLang side of DualPath (imports SGLang: load only inside an SGLang server process).

`load` is the `sglang.srt.plugins` entry point: SGLang calls it in every process it starts
(launcher, scheduler, detokenizer). It registers hooks only in servers started by
`python -m dualpath.launch_server` (DUALPATH_PLUGIN_CONFIG): the launcher hooks always, the
dual-path hooks with --enable-dual-path; otherwise installing dualpath changes nothing in SGLang.
"""

from __future__ import annotations

import logging

log = logging.getLogger("dualpath.plugin")


def launcher_config():
    """The PluginConfig of a process started by `python -m dualpath.launch_server`, else None."""
    from dualpath import env
    from dualpath.config import PluginConfig

    raw = env.PLUGIN_CONFIG.get()
    return PluginConfig.from_json(raw) if raw else None


def enabled_config():
    """The PluginConfig of this process when the dual path is enabled, else None."""
    cfg = launcher_config()
    return cfg if cfg is not None and cfg.enable_dual_path else None


def load() -> None:
    cfg = launcher_config()
    if cfg is None:
        return
    from dualpath.sglang_plugin.hooks import register_all

    register_all(dual_path=cfg.enable_dual_path, prefetch_queue_on=cfg.prefetch_queue,
                 pd_engine=cfg.pd_engine, h2d_ours=cfg.h2d_kernel == "ours",
                 async_pages=cfg.async_page_indices)
    log.info("dualpath plugin loaded (dual path %s, role %s, agent port %d)",
             "on" if cfg.enable_dual_path else "off", cfg.role or "-", cfg.agent_port)
