"""PD transfer polling without a collective when there is nobody to agree with.

SGLang 0.5.17's prefill and decode schedulers poll their KV senders/receivers several times per
event-loop iteration (bootstrap queue, inflight queue, decode prealloc and transfer queues) and
make every rank agree on the states with a gloo `all_reduce` (MIN), first over the attention-TP
group and then, on the prefill, over the attention-CP group, even when each group has one rank.
On 2x H100 (17ce76c, stack samples of the dual-path 1P1D run) those one-rank all-reduces were
11% of the prefill scheduler thread's samples and 8% of the decode's, for no agreement at all.

With one rank in every group involved, the hooks below return the polls as SGLang's own
functions would after the reduction (the same per-request values: the uint8 round trip is the
identity on KVPoll's values); with more ranks they call SGLang's functions unchanged.
"""

from __future__ import annotations

import torch.distributed as dist


def one_rank(group) -> bool:
    """True when `group` has exactly one rank (None: the default group's size counts)."""
    try:
        return dist.get_world_size(group=group) == 1
    except (RuntimeError, ValueError):  # not initialised: let SGLang's own code decide
        return False


def poll_and_all_reduce(original, pollers, gloo_group, decode_reqs=None, metadata_buffers=None,
                        server_args=None):
    """AROUND sglang.srt.disaggregation.utils.poll_and_all_reduce."""
    if not one_rank(gloo_group):
        return original(pollers, gloo_group, decode_reqs, metadata_buffers, server_args)
    from sglang.srt.disaggregation import utils

    polls = utils._poll_with_failure_injection(pollers)
    if decode_reqs is not None and metadata_buffers is not None and server_args is not None:
        utils._apply_metadata_gate(polls, decode_reqs, metadata_buffers, server_args)
    return [int(p) & 0xFF for p in polls]  # what torch.uint8 -> tolist() gives back


def poll_and_all_reduce_attn_cp_tp_group(original, pollers, attn_cp_cpu_group,
                                         attn_tp_cpu_group):
    """AROUND sglang.srt.disaggregation.utils.poll_and_all_reduce_attn_cp_tp_group."""
    if not (one_rank(attn_cp_cpu_group) and one_rank(attn_tp_cpu_group)):
        return original(pollers, attn_cp_cpu_group, attn_tp_cpu_group)
    return poll_and_all_reduce(None, pollers, attn_tp_cpu_group)
