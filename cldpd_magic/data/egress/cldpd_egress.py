"""The process of cldpd's egress container: Squid for the allowlist, and the credential broker.

Its whole configuration comes as one JSON line on stdin, so that a brokered key is in
no environment, file, label or ``docker inspect`` output:

    {"subnet": "172.30.0.0/16", "proxy_port": 3128, "broker_port": 8080,
     "allow": [["api.example.com", null], [".example.org", 8443], ["10.1.2.3", 80]],
     "credentials": {"anthropic": {"upstream": "https://api.anthropic.com",
                                   "header": "x-api-key", "value": "...", "token": "...",
                                   "methods": ["GET", "POST"], "paths": ["/v1/"]}}}

A host beginning with "." is a suffix (``*.example.org``); a null port means 80 and 443.
Squid and the broker listen only on this container's address on the pod's own network
(``subnet``), never on its other network, so nothing but that pod reaches them.
Squid's access log goes to stdout as ``CLDPD-ACCESS`` lines, which cldpd follows.
``cldpd-egress probe HOST PORT`` exits 0 when it can connect there (the isolation check).
``cldpd-egress rules SUBNET GATEWAY`` (as root, in the host's network namespace) exits 0
when the host's firewall has Docker's DROP rule for that internal subnet and the host holds
no address on it, 1 when either is missing (the engine runs with --iptables=false, or
gave the host an address on the network), 2 when it cannot tell.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import http.client
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONF = "/tmp/cldpd-squid.conf"
READY = "cldpd-egress ready"
#: Headers that describe one connection, not the message (RFC 9110 section 7.6.1), and
#: the ones the broker sets itself.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
#: Destinations no hostname rule may reach: only an allowlist entry naming the address
#: itself opens one of them (a test server, a service on the host's network).
PRIVATE_RANGES = (
    "0.0.0.0/8 10.0.0.0/8 100.64.0.0/10 127.0.0.0/8 169.254.0.0/16 172.16.0.0/12 "
    "192.0.0.0/24 192.168.0.0/16 198.18.0.0/15 224.0.0.0/4 240.0.0.0/4 "
    "::/127 ::ffff:0:0/96 64:ff9b::/96 fc00::/7 fe80::/10 ff00::/8"
)
#: Request hosts that are addresses (IPv4, bracketed or bare IPv6), as Squid regexes.
IP_LITERAL_PATTERNS = r"^[0-9.]+$ ^\[[0-9a-fA-F:.]+\]$ ^[0-9a-fA-F]*:[0-9a-fA-F:.]*$"
#: A request body larger than this is refused (the Messages API takes at most 32 MB).
MAX_BODY_BYTES = 32 * 1024 * 1024
#: Connections the broker serves at once; more are refused at once.
MAX_CONNECTIONS = 32
#: Seconds the broker waits for a pod's next bytes (request line, headers, body).
IDLE_SECONDS = 60
#: Seconds the broker waits for the upstream's answer.
UPSTREAM_SECONDS = 600


def is_ip(host: str) -> bool:
    """Whether an allowlist host is an IP address (it is then matched as an address)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def squid_conf(config: dict) -> str:
    """Squid's configuration: only the allowlist, only from the pod's subnet, no needless DNS.

    Host names are matched with ``dstdomain -n`` (no reverse lookup of an IP-literal
    request, whose bytes a lookup would carry out), addresses with ``dst`` only for
    IP-literal requests (no lookup of a refused name); a name resolving to a private,
    loopback or link-local address is refused unless that address is allowlisted.
    """
    listen = config.get("listen")
    port = int(config["proxy_port"])
    lines = [
        f"http_port {listen}:{port}" if listen else f"http_port {port}",
        "pid_filename none",
        "cache deny all",
        "cache_mem 8 MB",
        "coredump_dir /tmp",
        "cache_log stdio:/dev/stderr",
        "logfile_rotate 0",
        "logformat cldpd CLDPD-ACCESS %ts.%03tu %>a %Ss %>Hs %rm %>rd %>rP",
        "access_log stdio:/dev/stdout logformat=cldpd",
        "pinger_enable off",
        "via off",
        "forwarded_for delete",
        "httpd_suppress_version_string on",
        "visible_hostname cldpd-egress",
        "shutdown_lifetime 1 seconds",
        f"acl pods src {config['subnet']}",
        "acl default_ports port 80 443",
        f"acl ip_literal dstdom_regex -n {IP_LITERAL_PATTERNS}",
        f"acl private_dst dst {PRIVATE_RANGES}",
        "http_access deny !pods",
    ]
    for index, (host, rule_port) in enumerate(config["allow"]):
        if is_ip(host):
            lines.append(f"acl allow{index} dst {host}")
            match = f"ip_literal allow{index}"
        else:
            lines.append(f"acl allow{index} dstdomain -n {host}")
            match = f"allow{index}"
        guard = "" if is_ip(host) else " !private_dst"
        if rule_port is None:
            lines.append(f"http_access allow {match} default_ports{guard}")
        else:
            lines.append(f"acl port{index} port {int(rule_port)}")
            lines.append(f"http_access allow {match} port{index}{guard}")
    lines.append("http_access deny all")
    return "\n".join(lines) + "\n"


class BadRequest(Exception):
    """A request the broker refuses: its status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Broker(BaseHTTPRequestHandler):
    """Forwards a pod's API requests upstream, with the real key in place of the run's token.

    A request is forwarded only with the run's token in place of the key, only in
    origin form (a path, never an absolute URL or CONNECT), only with the API's methods
    and paths, and always to the configured origin with Host set from it: the pod can
    neither use the key without the token nor choose where it goes.
    """

    protocol_version = "HTTP/1.1"
    server_version = "cldpd-broker"
    sys_version = ""
    timeout = IDLE_SECONDS
    credential: dict = {}

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the pod's requests are not ours to log."""

    def _refuse(self, status: int, reason: str) -> None:
        """Answer with the API's error format and close the connection."""
        kind = {401: "authentication_error", 413: "request_too_large"}.get(
            status, "invalid_request_error"
        )
        body = json.dumps(
            {"type": "error", "error": {"type": kind, "message": f"cldpd broker: {reason}"}}
        ).encode()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    def _target(self) -> str:
        """The upstream request-target: the configured base path and the pod's path."""
        if not self.path.startswith("/") or self.path.startswith("//"):
            raise BadRequest(400, "only origin-form requests (a path) are forwarded")
        if self.command not in self.credential.get("methods", ("GET", "POST")):
            raise BadRequest(405, f"method {self.command[:16]} is not forwarded")
        parts = urllib.parse.urlsplit(self.path)
        path = parts.path
        decoded = urllib.parse.unquote(path)
        segments = decoded.split("/")
        if ".." in segments or "." in segments or "\\" in decoded or "\0" in decoded:
            raise BadRequest(400, "the path may not hold dot segments")
        if not any(path.startswith(p) for p in self.credential.get("paths", ("/",))):
            raise BadRequest(404, "that path is not part of the API")
        base = urllib.parse.urlsplit(self.credential["upstream"]).path.rstrip("/")
        return base + path + (f"?{parts.query}" if parts.query else "")

    def _authorised(self) -> bool:
        """Whether the request carries the run's token as its key."""
        token = self.credential.get("token", "")
        offered = self.headers.get("x-api-key", "")
        bearer = self.headers.get("authorization", "")
        if bearer[:7].lower() == "bearer ":
            offered = offered or bearer[7:].strip()
        return bool(token) and hmac.compare_digest(offered.encode(), token.encode())

    def _length(self) -> int:
        """The request body's length; BadRequest for a body the broker will not take."""
        if self.headers.get("transfer-encoding"):
            raise BadRequest(411, "send the body with a Content-Length")
        values = self.headers.get_all("content-length") or []
        if not values:
            return 0
        if len(set(values)) != 1 or not values[0].strip().isdigit():
            raise BadRequest(400, "the Content-Length header is not a number")
        length = int(values[0])
        if length > MAX_BODY_BYTES:
            raise BadRequest(413, f"the body is over {MAX_BODY_BYTES} bytes")
        return length

    def _forward(self) -> None:
        try:
            target = self._target()
            if not self._authorised():
                raise BadRequest(401, "the request does not carry this run's key")
            length = self._length()
        except BadRequest as refused:
            self._refuse(refused.status, refused.reason)
            return
        upstream = urllib.parse.urlsplit(self.credential["upstream"])
        kind = (
            http.client.HTTPSConnection
            if upstream.scheme == "https"
            else http.client.HTTPConnection
        )
        conn = kind(upstream.hostname, upstream.port, timeout=UPSTREAM_SECONDS)
        try:
            conn.putrequest(self.command, target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", upstream.netloc.rpartition("@")[2])
            for name, value in self.headers.items():
                lower = name.lower()
                if lower in HOP_BY_HOP or lower in ("x-api-key", "authorization"):
                    continue
                conn.putheader(name, value)
            conn.putheader(self.credential["header"], self.credential["value"])
            if length or self.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(length))
            conn.endheaders()
            left = length
            while left:
                data = self.rfile.read(min(left, 65536))
                if not data:
                    raise BadRequest(400, "the body ended before its Content-Length")
                conn.send(data)
                left -= len(data)
            self._relay(conn.getresponse())
        except BadRequest as refused:
            self._refuse(refused.status, refused.reason)
        except (OSError, http.client.HTTPException) as exc:
            self.close_connection = True
            if not self.wfile.closed:
                self._refuse(502, f"upstream unreachable ({type(exc).__name__})")
        finally:
            conn.close()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        """Send the upstream's response to the pod as it comes."""
        self.send_response(response.status, response.reason)
        chunked = response.getheader("content-length") is None
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP or name.lower() == "content-length":
                self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while True:
            data = response.read1(65536)
            if not data:
                break
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.wfile.write(data)
            self.wfile.flush()
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _not_forwarded(self) -> None:
        self._refuse(405, f"method {self.command[:16]} is not forwarded")

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _forward
    do_CONNECT = do_OPTIONS = do_TRACE = do_HEAD = _not_forwarded


class BrokerServer(ThreadingHTTPServer):
    """The broker's server: a thread per connection, at most MAX_CONNECTIONS of them."""

    daemon_threads = True
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], handler: type[Broker]) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        """Serve the connection in a thread if a slot is free, else refuse it at once."""
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: tuple) -> None:
        """Serve, then give the slot back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve_broker(config: dict, listen: str) -> None:
    """Serve the first credential (one kind per pod today) in daemon threads."""
    for credential in config.get("credentials", {}).values():
        handler = type("Handler", (Broker,), {"credential": credential})
        server = BrokerServer((listen, int(config["broker_port"])), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return


def address_in(subnet: str) -> str:
    """This container's address on ``subnet``: the source the kernel picks to reach it."""
    network = ipaddress.ip_network(subnet)
    family = socket.AF_INET6 if network.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((str(network.network_address + 1), 9))  # no packet is sent
        address = sock.getsockname()[0]
    if ipaddress.ip_address(address) not in network:
        raise SystemExit(f"cldpd-egress: no address on {subnet}")
    return address


def wait_listening(address: str, port: int, proc: subprocess.Popen, seconds: float = 60.0) -> bool:
    """Whether Squid accepts connections on its port before it exits or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def probe(host: str, port: str) -> int:
    """Exit 0 when host:port answers, with a connection or a refusal: cldpd's isolation check.

    A refusal proves a way there as well as a connection does (nothing listens on the
    egress container's outer side); a firewall's drop ends in a time-out instead.
    """
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return 0
    except OSError:
        return 1
    return 0


def host_holds(address: str) -> bool:
    """Whether this network namespace (the host's) has ``address`` on an interface."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


def rules(subnet: str, gateway: str = "") -> int:
    """Exit 0 when the host isolates ``subnet`` as cldpd needs, 1 if not, 2 when unknown."""
    if gateway and host_holds(gateway):
        return 1
    seen_docker = False
    for tool in ("iptables-nft", "iptables-legacy"):
        try:
            listing = subprocess.run(
                [tool, "-w", "5", "-S"], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in listing.splitlines():
            seen_docker = seen_docker or "DOCKER-ISOLATION" in line
            if subnet in line.split() and line.rstrip().endswith("-j DROP"):
                return 0
    return 1 if seen_docker else 2


def main() -> int:
    """Read the configuration, start Squid and the broker, say ready, and run until stopped."""
    if sys.argv[1:2] == ["probe"]:
        return probe(*sys.argv[2:4])
    if sys.argv[1:2] == ["rules"]:
        return rules(*sys.argv[2:4])
    config = json.loads(sys.stdin.readline())
    sys.stdin.close()
    listen = address_in(config["subnet"])
    config["listen"] = listen
    with open(CONF, "w", encoding="utf-8") as f:
        f.write(squid_conf(config))
    squid = subprocess.Popen(["squid", "-N", "-f", CONF])
    signal.signal(signal.SIGTERM, lambda *_: squid.terminate())
    signal.signal(signal.SIGINT, lambda *_: squid.terminate())
    serve_broker(config, listen)
    if wait_listening(listen, int(config["proxy_port"]), squid):
        # One write(2): Squid writes its log to the same pipe, and must not split the line.
        os.write(1, (READY + "\n").encode())
    code = squid.wait()
    os._exit(code if code >= 0 else 0)


if __name__ == "__main__":
    sys.exit(main())
