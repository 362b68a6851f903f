"""A DNS server on loopback for tests: the stand-in for Docker's embedded DNS (127.0.0.11) or a
Kubernetes cluster DNS, whose answers a test changes while the proxy runs.

    dns = TestDNS()                                         # UDP and TCP on 127.0.0.1, a free port
    dns.set("tasks.user", ["127.0.0.21", "127.0.0.22"], ttl=1)
    ... point dns_resolvers at 127.0.0.1:dns.port ...
    dns.set("tasks.user", ["127.0.0.21"])                   # a replica went away
    dns.servfail("tasks.user")                              # the DNS server is in trouble
    assert dns.queries("tasks.user", "A") >= 2
    dns.close()

Names not set answer NXDOMAIN. Names are matched without regard to case or a trailing dot.

From a shell (prints "127.0.0.1:PORT" once it listens, then serves until killed):

    python3 tests/support/dns_server.py --port 5353 --record tasks.user=127.0.0.21,127.0.0.22 --ttl 1
    python3 tests/support/dns_server.py --check    # starts one, asks it over UDP and TCP, exits 0 or 1

Needs dnslib (pip install dnslib).
"""

import argparse
import ipaddress
import random
import signal
import sys
import threading

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.dns import DNSError
from dnslib.server import DNSHandler, DNSServer

# What a name answers besides its addresses.
ANSWER, NXDOMAIN, SERVFAIL, REFUSED, EMPTY, DROP = "answer", "nxdomain", "servfail", "refused", "empty", "drop"


def _key(name):
    return str(name).rstrip(".").lower()


class _Drop(DNSError):
    """Raised by the resolver to send nothing: dnslib's handler logs a DNSError and moves on."""


class _QuietLogger:
    def __getattr__(self, _name):
        return lambda *args, **kwargs: None


class _Entry:
    def __init__(self, addresses=(), ttl=30, mode=ANSWER, truncate=False, shuffle=False):
        self.addresses, self.ttl, self.mode, self.truncate = list(addresses), ttl, mode, truncate
        self.shuffle = shuffle


class TestDNS:
    """UDP and TCP DNS on one loopback port, answering A and AAAA from a table the test changes
    at run time, and counting the queries per name and type."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, port=0, host="127.0.0.1"):
        self.host = host
        self._lock = threading.Lock()
        self._entries = {}
        self._counts = {}
        resolver = _Resolver(self)
        # UDP first to learn the port, then TCP on the same number (TC answers send clients there).
        # The UDP port the system picks may be taken for TCP: then try another.
        for attempt in range(20):
            self._udp = DNSServer(resolver, address=host, port=port, logger=_QuietLogger())
            self.port = self._udp.server.server_address[1]
            try:
                self._tcp = DNSServer(resolver, address=host, port=self.port, tcp=True, logger=_QuietLogger())
                break
            except OSError:
                self._udp.server.server_close()
                if port or attempt == 19:
                    raise
        self._udp.start_thread()
        self._tcp.start_thread()

    @property
    def address(self):
        """`host:port`, as an Envoy socket_address would say it."""
        return f"{self.host}:{self.port}"

    # -- what names answer

    def set(self, name, addresses, ttl=30, shuffle=False):
        """Answer A with the IPv4 and AAAA with the IPv6 addresses in `addresses` (either may be
        none: an empty NOERROR for that type). Clears any error mode and truncation set before.
        With `shuffle`, every answer lists them in a new order, as Docker's DNS does."""
        for address in addresses:
            ipaddress.ip_address(address)  # a typo in a test should fail here, not as a bad answer
        with self._lock:
            self._entries[_key(name)] = _Entry(addresses, ttl, shuffle=shuffle)

    def remove(self, name):
        """Forget the name: NXDOMAIN from now on."""
        with self._lock:
            self._entries.pop(_key(name), None)

    def nxdomain(self, name):
        self._mode(name, NXDOMAIN)

    def servfail(self, name):
        self._mode(name, SERVFAIL)

    def refused(self, name):
        self._mode(name, REFUSED)

    def empty(self, name):
        """NOERROR with no records, for both types: the name exists, without addresses."""
        self._mode(name, EMPTY)

    def drop(self, name):
        """Never answer queries for the name, so that clients time out."""
        self._mode(name, DROP)

    def truncate(self, name, on=True):
        """Answer over UDP with TC set and no records, so that clients must ask again over TCP
        (which gets the whole answer)."""
        with self._lock:
            self._entries.setdefault(_key(name), _Entry(mode=NXDOMAIN)).truncate = on

    def _mode(self, name, mode):
        with self._lock:
            entry = self._entries.setdefault(_key(name), _Entry())
            entry.mode = mode

    # -- what was asked

    def queries(self, name, qtype=None, protocol=None):
        """How many queries for `name` arrived, of one type ("A", "AAAA") and over one protocol
        ("udp", "tcp") if given."""
        with self._lock:
            return sum(count for (n, t, p), count in self._counts.items()
                       if n == _key(name) and qtype in (None, t) and protocol in (None, p))

    def reset_counts(self):
        with self._lock:
            self._counts.clear()

    # -- life

    def close(self):
        for server in (self._udp, self._tcp):
            server.stop()
            server.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _answer(self, request, protocol):
        question = request.q
        name, qtype = _key(question.qname), QTYPE[question.qtype]
        with self._lock:
            self._counts[(name, qtype, protocol)] = self._counts.get((name, qtype, protocol), 0) + 1
            entry = self._entries.get(name)
            entry = entry and _Entry(entry.addresses, entry.ttl, entry.mode, entry.truncate)
            if entry is not None and self._entries[name].shuffle:
                random.shuffle(entry.addresses)
        reply = request.reply()
        if entry is None or entry.mode == NXDOMAIN:
            reply.header.rcode = RCODE.NXDOMAIN
        elif entry.mode == DROP:
            raise _Drop("dropped on purpose")
        elif entry.mode == SERVFAIL:
            reply.header.rcode = RCODE.SERVFAIL
        elif entry.mode == REFUSED:
            reply.header.rcode = RCODE.REFUSED
        if entry is not None and entry.truncate and protocol == "udp":
            reply.header.tc = 1
            return reply
        if entry is not None and entry.mode == ANSWER:
            for address in entry.addresses:
                ip = ipaddress.ip_address(address)
                if qtype == "A" and ip.version == 4:
                    reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=entry.ttl))
                elif qtype == "AAAA" and ip.version == 6:
                    reply.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=entry.ttl))
        return reply


class _Resolver:
    def __init__(self, dns):
        self.dns = dns

    def resolve(self, request, handler):
        return self.dns._answer(request, handler.protocol)


def _ask(port, name, qtype, tcp=False):
    reply = DNSRecord.parse(DNSRecord.question(name, qtype).send("127.0.0.1", port, tcp=tcp, timeout=2))
    return RCODE[reply.header.rcode], bool(reply.header.tc), sorted(str(rr.rdata) for rr in reply.rr), \
        sorted(rr.ttl for rr in reply.rr)


def check():
    """Asks a fresh server every kind of answer, over UDP and TCP; raises on the first surprise."""
    import socket
    with TestDNS() as dns:
        dns.set("tasks.user", ["127.0.0.21", "127.0.0.22", "fd00::5"], ttl=1)
        assert _ask(dns.port, "tasks.user", "A") == ("NOERROR", False, ["127.0.0.21", "127.0.0.22"], [1, 1])
        assert _ask(dns.port, "Tasks.User.", "AAAA", tcp=True) == ("NOERROR", False, ["fd00::5"], [1])
        assert _ask(dns.port, "missing", "A")[0] == "NXDOMAIN"
        dns.servfail("tasks.user")
        assert _ask(dns.port, "tasks.user", "A")[0] == "SERVFAIL"
        dns.empty("tasks.user")
        assert _ask(dns.port, "tasks.user", "A") == ("NOERROR", False, [], [])
        dns.set("tasks.user", ["127.0.0.21"], ttl=5)
        dns.truncate("tasks.user")
        assert _ask(dns.port, "tasks.user", "A") == ("NOERROR", True, [], [])
        assert _ask(dns.port, "tasks.user", "A", tcp=True) == ("NOERROR", False, ["127.0.0.21"], [5])
        dns.drop("tasks.user")
        try:
            _ask(dns.port, "tasks.user", "A")
            raise AssertionError("a dropped name was answered")
        except socket.timeout:
            pass
        assert dns.queries("tasks.user") == 7
        assert dns.queries("tasks.user", "A", "tcp") == 1
        assert dns.queries("TASKS.USER.", "AAAA") == 1
        dns.remove("tasks.user")
        assert _ask(dns.port, "tasks.user", "A")[0] == "NXDOMAIN"


def main(argv=None):
    parser = argparse.ArgumentParser(description="A loopback DNS server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--ttl", type=int, default=30)
    parser.add_argument("--record", action="append", default=[], metavar="NAME=ADDR,ADDR",
                        help="answer NAME with these IPv4/IPv6 addresses")
    for mode in (NXDOMAIN, SERVFAIL, REFUSED, EMPTY, DROP):
        parser.add_argument(f"--{mode}", action="append", default=[], metavar="NAME")
    parser.add_argument("--truncate", action="append", default=[], metavar="NAME",
                        help="answer NAME over UDP with TC set and no records")
    parser.add_argument("--check", action="store_true", help="test this server against dnslib's client and exit")
    args = parser.parse_args(argv)
    if args.check:
        check()
        print("ok")
        return 0

    dns = TestDNS(port=args.port, host=args.host)
    for record in args.record:
        name, _, addresses = record.partition("=")
        dns.set(name, [a for a in addresses.split(",") if a], ttl=args.ttl)
    for mode in (NXDOMAIN, SERVFAIL, REFUSED, EMPTY, DROP):
        for name in getattr(args, mode):
            getattr(dns, mode)(name)
    for name in args.truncate:
        dns.truncate(name)
    print(dns.address, flush=True)
    # A parent may start us with signals blocked (Foundation's Process inherits the spawning
    # thread's mask); SIGTERM must still stop the server.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    dns.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
