#!/usr/bin/env python3
"""A recording SMTP server for mailroot's end-to-end tests, on aiosmtpd.

Every connection and every message is appended to JSON lines in --out, so
tests can check exactly what reached the server. Options inject the replies
real servers give: a 4xx to MAIL, a 5xx/4xx to chosen recipients.

    smtp_peer.py --listen 127.0.0.2:2525 --out DIR [--mail-reply "451 4.3.2 busy"]
                 [--rcpt-reply "gone@=550 5.1.1 no such user"] [--rcpt-fail-first "later@=1"]
                 [--reply-delay 0.5]

--reply-delay makes it a slow server: every reply, the greeting included,
waits that long. Each connection's end is recorded too, so that tests can
see how many sessions a client held at once.
"""
import argparse
import asyncio
import json
import os
import select
import signal
import ssl
import time

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Recorder:
    sync = True

    def __init__(self, out, mail_reply, rcpt_replies, rcpt_fail_first):
        self.out = out
        self.mail_reply = mail_reply
        self.rcpt_replies = rcpt_replies
        # prefix -> how many more RCPTs for it get a 451 before it is accepted
        self.rcpt_fail_first = dict(rcpt_fail_first)

    def record(self, kind, **fields):
        with open(os.path.join(self.out, "events.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")
            f.flush()
            if self.sync:
                os.fsync(f.fileno())

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        for prefix, reply in self.rcpt_replies:
            if address.startswith(prefix):
                return reply
        for prefix, left in self.rcpt_fail_first.items():
            if address.startswith(prefix) and left > 0:
                self.rcpt_fail_first[prefix] = left - 1
                return "451 4.2.0 mailbox busy, try again"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.record(
            "message",
            mail_from=envelope.mail_from,
            mail_options=envelope.mail_options,
            rcpt_tos=envelope.rcpt_tos,
            tls=session.ssl is not None,
            auth_user=(session.auth_data.login.decode() if session.authenticated and isinstance(session.auth_data, LoginPassword) else None),
            # latin-1 maps every byte to one code point: the bytes survive JSON.
            data=envelope.original_content.decode("latin-1"),
        )
        return "250 2.0.0 OK queued"


class RecordingSMTP(SMTP):
    reply_delay = 0.0

    # Connections whose clients have not closed them yet, by file
    # descriptor, watched by the kernel for the client's close (EPOLLRDHUP):
    # a new connection then costs a look at the ones that closed, not at
    # every open one.
    watched = {}
    watcher = select.epoll()

    def connection_made(self, transport):
        self.peer_name = str(transport.get_extra_info("peername"))
        self.client_closed = False
        # The event loop may get to a new connection before it reads the end
        # of an old one that the client closed first: ask the kernel, so
        # that "client-closed" events come in the order the client acted.
        RecordingSMTP.note_closed_clients()
        # After STARTTLS the TLS transport is made on the same socket, and
        # this is called again: it is watched already.
        sock = transport.get_extra_info("socket")
        if sock is not None and getattr(self, "watched_fd", None) is None:
            self.watched_fd = sock.fileno()
            RecordingSMTP.watcher.register(self.watched_fd, select.EPOLLRDHUP)
            RecordingSMTP.watched[self.watched_fd] = self
        self.event_handler.record("connect", peer=self.peer_name)
        super().connection_made(transport)

    @classmethod
    def note_closed_clients(cls):
        for fd, events in cls.watcher.poll(0):
            connection = cls.watched.get(fd)
            if connection is not None and events & (select.EPOLLRDHUP | select.EPOLLHUP):
                connection.note_client_closed()

    def note_client_closed(self):
        """Record "client-closed" once the client has shut its side (the
        server may still be finishing a delayed QUIT reply)."""
        if not self.client_closed:
            self.client_closed = True
            self.event_handler.record("client-closed", peer=self.peer_name)
        self.unwatch()

    def unwatch(self):
        fd, self.watched_fd = getattr(self, "watched_fd", None), None
        if fd is not None and RecordingSMTP.watched.get(fd) is self:
            del RecordingSMTP.watched[fd]
            RecordingSMTP.watcher.unregister(fd)

    def eof_received(self):
        self.note_client_closed()
        return super().eof_received()

    def connection_lost(self, exc):
        # Before asyncio closes the socket, whose number may come back.
        self.unwatch()
        self.event_handler.record("disconnect", peer=self.peer_name)
        super().connection_lost(exc)

    async def push(self, status):
        # One delay per reply: the lines of a multi-line reply (EHLO) go
        # together once its last line is due.
        if self.reply_delay and status[3:4] != "-":
            await asyncio.sleep(self.reply_delay)
        await super().push(status)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mail-reply")
    parser.add_argument("--rcpt-reply", action="append", default=[])
    parser.add_argument("--tls-cert", help="offer STARTTLS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    parser.add_argument("--auth", help="USER:PASSWORD: require AUTH (only after STARTTLS)")
    parser.add_argument("--no-smtputf8", action="store_true", help="do not offer SMTPUTF8")
    parser.add_argument("--rcpt-fail-first", action="append", default=[],
                        help="PREFIX=N: answer 451 to the first N RCPTs starting with PREFIX")
    parser.add_argument("--reply-delay", type=float, default=0.0,
                        help="SECS: wait this long before every reply (a slow server)")
    parser.add_argument("--no-sync", action="store_true",
                        help="do not fsync each event (benchmarks: the peer must not be the bottleneck)")
    args = parser.parse_args()
    RecordingSMTP.reply_delay = args.reply_delay
    Recorder.sync = not args.no_sync
    host, port = args.listen.rsplit(":", 1)
    rcpt_replies = [tuple(r.split("=", 1)) for r in args.rcpt_reply]
    rcpt_fail_first = [(p, int(n)) for p, n in (r.rsplit("=", 1) for r in args.rcpt_fail_first)]
    handler = Recorder(args.out, args.mail_reply, rcpt_replies, rcpt_fail_first)
    loop = asyncio.get_running_loop()
    options = dict(decode_data=False, enable_SMTPUTF8=not args.no_smtputf8, ident="mailroot test peer")
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        options.update(tls_context=context)
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == user and auth_data.password.decode() == password
            return AuthResult(success=ok, handled=False, auth_data=auth_data)

        options.update(authenticator=authenticator, auth_required=True, auth_require_tls=True)
    server = await loop.create_server(
        lambda: RecordingSMTP(handler, **options),
        host=host,
        port=int(port),
        # A thousand relay sessions may arrive at once: a short accept
        # queue would drop their handshakes and stall them for a minute.
        backlog=4096,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with open(os.path.join(args.out, "ready"), "w") as f:
        f.write("ready\n")
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
