"""A webhook receiver for the tests: checks every delivery's signature with the Standard
Webhooks reference library (`standardwebhooks`), and writes what it received as JSON lines.

    usage: webhook_receiver.py <port file> <secret file> <log file> <failures>

It listens on a free loopback port (written to <port file>), answers the first <failures>
requests with 500, then 204 for a delivery whose signature checks out (logged with its
`webhook-id`), 401 otherwise. The secret is read from <secret file> at each request, so the
subscription can be made once the receiver listens.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

port_file, secret_file, log_file, failures = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
seen = {"requests": 0}


def log(entry):
    with open(log_file, "a") as out:
        out.write(json.dumps(entry) + "\n")


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        seen["requests"] += 1
        if seen["requests"] <= failures:
            log({"refused": self.headers.get("webhook-id")})
            self.send_response(500)
            self.end_headers()
            return
        try:
            with open(secret_file) as f:
                secret = f.read().strip()
            payload = Webhook(secret).verify(body, dict(self.headers))
        except (WebhookVerificationError, OSError, ValueError) as e:
            log({"bad_signature": self.headers.get("webhook-id"), "error": str(e)})
            self.send_response(401)
            self.end_headers()
            return
        log({"id": self.headers.get("webhook-id"), "type": payload["type"], "data": payload["data"]})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
import os  # noqa: E402

os.rename(port_file + ".tmp", port_file)
server.serve_forever()
