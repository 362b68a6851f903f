"""The loopback DNS server the discovery tests lean on answers as a real one would."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
import dns_server  # noqa: E402


def test_every_kind_of_answer_over_udp_and_tcp():
    dns_server.check()
