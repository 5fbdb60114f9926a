"""What netvm reads of xtables matches: the state of a `conntrack --ctstate` match.

The legacy tables (backends/iptables.py) hold them as xt_entry_match; iptables-nft writes
them into nf_tables as `xt` expressions, which libnftables lists without their contents
(elements.py reads those from the kernel). The bytes are the same struct in both.
"""

from __future__ import annotations

import struct

XT_CONNTRACK_STATE = 1
# struct xt_conntrack_mtinfo3: four address/mask pairs (128 bytes), expires_min/max (8),
# l4proto and four ports (10), then match_flags, invert_flags, state_mask (u16 each).
_CONNTRACK3 = struct.Struct("=146xHHH")
CT_STATES = {1 << 0: "INVALID", 1 << 1: "ESTABLISHED", 1 << 2: "RELATED", 1 << 3: "NEW"}


def conntrack_states(info: bytes, revision: int) -> tuple[str, ...] | None:
    """The states of a plain `--ctstate A,B` match (revision 3), upper case; None for
    any other conntrack match (another revision, other options, an inversion)."""
    if revision != 3 or len(info) < _CONNTRACK3.size:
        return None
    flags, invert, mask = _CONNTRACK3.unpack_from(info)
    known = sum(bit for bit in CT_STATES if mask & bit)
    if flags != XT_CONNTRACK_STATE or invert or mask != known:
        return None
    return tuple(name for bit, name in CT_STATES.items() if mask & bit)
