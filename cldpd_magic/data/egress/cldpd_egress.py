"""The process of cldpd's egress container: Squid for the allowlist, and the credential broker.

Its whole configuration comes as one JSON line on stdin, so that a brokered key is in
no environment, file, label or ``docker inspect`` output:

    {"subnet": "172.30.0.0/16", "proxy_port": 3128, "broker_port": 8080,
     "allow": [["api.example.com", null], [".example.org", 8443]],
     "credentials": {"anthropic": {"upstream": "https://api.anthropic.com",
                                   "header": "x-api-key", "value": "..."}}}

A host beginning with "." is a suffix (``*.example.org``); a null port means 80 and 443.
Squid's access log goes to stdout as ``CLDPD-ACCESS`` lines, which cldpd follows.
``cldpd-egress probe HOST PORT`` exits 0 when it can connect there (the isolation check).
``cldpd-egress rules SUBNET`` (as root, in the host's network namespace) exits 0 when the
host's firewall has Docker's DROP rule for that internal subnet, 1 when Docker's chains are
there without it (the engine runs with --iptables=false), 2 when it cannot tell.
"""

from __future__ import annotations

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
#: Headers that describe one connection, not the message (RFC 9110 section 7.6.1).
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
}


def squid_conf(config: dict) -> str:
    """Squid's configuration: allow only the allowlist, only from the pod's subnet."""
    lines = [
        f"http_port {int(config['proxy_port'])}",
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
        "shutdown_lifetime 1 seconds",
        f"acl pods src {config['subnet']}",
        "acl default_ports port 80 443",
        "http_access deny !pods",
    ]
    for index, (host, port) in enumerate(config["allow"]):
        lines.append(f"acl allow{index} dstdomain {host}")
        if port is None:
            lines.append(f"http_access allow allow{index} default_ports")
        else:
            lines.append(f"acl port{index} port {int(port)}")
            lines.append(f"http_access allow allow{index} port{index}")
    lines.append("http_access deny all")
    return "\n".join(lines) + "\n"


class Broker(BaseHTTPRequestHandler):
    """Forwards a pod's API requests upstream, with the real key in place of the placeholder."""

    protocol_version = "HTTP/1.1"
    credential: dict = {}
    subnet = ipaddress.ip_network("0.0.0.0/32")

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the pod's requests are not ours to log."""

    def _forward(self) -> None:
        if ipaddress.ip_address(self.client_address[0]) not in self.subnet:
            self.send_error(403)
            return
        upstream = urllib.parse.urlsplit(self.credential["upstream"])
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        for name in ("x-api-key", "authorization"):
            headers = {k: v for k, v in headers.items() if k.lower() != name}
        headers[self.credential["header"]] = self.credential["value"]
        kind = (
            http.client.HTTPSConnection
            if upstream.scheme == "https"
            else http.client.HTTPConnection
        )
        conn = kind(upstream.hostname, upstream.port, timeout=600)
        try:
            conn.request(self.command, upstream.path.rstrip("/") + self.path, body, headers)
            response = conn.getresponse()
            self.send_response(response.status, response.reason)
            chunked = response.getheader("content-length") is None
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP:
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
        except OSError as exc:
            if not self.wfile.closed:
                message = f"cldpd broker: upstream unreachable ({type(exc).__name__})"
                self.send_error(502, message)
        finally:
            conn.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward


def serve_broker(config: dict) -> None:
    """Serve the first credential (one kind per pod today) in daemon threads."""
    for credential in config.get("credentials", {}).values():
        handler = type("Handler", (Broker,), {"credential": credential})
        handler.subnet = ipaddress.ip_network(config["subnet"])
        server = ThreadingHTTPServer(("0.0.0.0", int(config["broker_port"])), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return


def wait_listening(port: int, proc: subprocess.Popen, seconds: float = 60.0) -> bool:
    """Whether Squid accepts connections on its port before it exits or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def probe(host: str, port: str) -> int:
    """Exit 0 when a TCP connection to host:port succeeds: cldpd's isolation check."""
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return 1
    return 0


def rules(subnet: str) -> int:
    """Exit 0 when the host's firewall isolates ``subnet`` as Docker does, 1 if not, 2 unknown."""
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
        return rules(sys.argv[2])
    config = json.loads(sys.stdin.readline())
    sys.stdin.close()
    with open(CONF, "w", encoding="utf-8") as f:
        f.write(squid_conf(config))
    squid = subprocess.Popen(["squid", "-N", "-f", CONF])
    signal.signal(signal.SIGTERM, lambda *_: squid.terminate())
    signal.signal(signal.SIGINT, lambda *_: squid.terminate())
    serve_broker(config)
    if wait_listening(int(config["proxy_port"]), squid):
        # One write(2): Squid writes its log to the same pipe, and must not split the line.
        os.write(1, (READY + "\n").encode())
    code = squid.wait()
    os._exit(code if code >= 0 else 0)


if __name__ == "__main__":
    sys.exit(main())
