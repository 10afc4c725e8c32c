#!/usr/bin/env python3
"""A strict RFC 5424 syslog receiver for the gridward-syslog tests (standard library only).

Listens on 127.0.0.1 over UDP (RFC 5426: one message per datagram) or TCP (RFC 6587
octet counting), optionally inside TLS (RFC 5425), and checks every message against the
ABNF of RFC 5424 section 6:

    SYSLOG-MSG      = HEADER SP STRUCTURED-DATA [SP MSG]
    HEADER          = PRI VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID
    PRI             = "<" PRIVAL ">"          ; 0..191, no leading zero
    VERSION         = "1"
    TIMESTAMP       = NILVALUE / FULL-DATE "T" FULL-TIME   ; RFC 3339, <= 6 fraction digits
    HOSTNAME        = NILVALUE / 1*255PRINTUSASCII
    APP-NAME        = NILVALUE / 1*48PRINTUSASCII
    PROCID          = NILVALUE / 1*128PRINTUSASCII
    MSGID           = NILVALUE / 1*32PRINTUSASCII
    STRUCTURED-DATA = NILVALUE / 1*SD-ELEMENT
    SD-ELEMENT      = "[" SD-ID *(SP SD-PARAM) "]"
    SD-PARAM        = PARAM-NAME "=" %d34 PARAM-VALUE %d34   ; '"', '\' and ']' escaped
    SD-NAME         = 1*32PRINTUSASCII except '=', SP, ']', %d34
    MSG             = MSG-ANY / MSG-UTF8  ; MSG-UTF8 = BOM UTF-8-STRING

On top of the ABNF: an SD-ID is either IANA-registered (timeQuality, origin, meta) or
NAME@PEN (section 7.2.2 / 6.3.2), an SD-ID appears at most once per message, leap seconds
(:60) are refused, UTF-8 must be valid, and (unless --allow-msg-any) MSG must start with the BOM.

Output: first line "LISTENING <port>", then one JSON object per valid message:
{"pri", "facility", "severity", "timestamp", "hostname", "app", "procid", "msgid",
 "sd": [[sd_id, [[name, value], ...]], ...], "msg", "bom", "transport", "peer_cn"}
On the first invalid message or frame: "INVALID: <reason>" on stderr and exit status 2.
After --count messages: exit status 0. Nothing for --timeout seconds: exit status 3.
"""

import argparse
import datetime
import json
import os
import re
import socket
import ssl
import sys
import threading

PRINTUSASCII = set(range(33, 127))
BOM = b"\xef\xbb\xbf"
IANA_SD_IDS = {"timeQuality", "origin", "meta"}
TIMESTAMP_RE = re.compile(
    rb"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$"
)
PEN_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class Invalid(Exception):
    pass


class Parser:
    def __init__(self, data):
        self.d = data
        self.i = 0

    def peek(self):
        return self.d[self.i] if self.i < len(self.d) else None

    def expect(self, byte, what):
        if self.peek() != byte:
            raise Invalid("expected %s at offset %d" % (what, self.i))
        self.i += 1

    def token(self):
        """Bytes up to the next SP or the end."""
        j = self.d.find(b" ", self.i)
        if j < 0:
            j = len(self.d)
        tok = self.d[self.i : j]
        self.i = j
        return tok


def header_field(p, name, limit):
    tok = p.token()
    if not tok:
        raise Invalid("%s is empty (use NILVALUE)" % name)
    if len(tok) > limit:
        raise Invalid("%s longer than %d: %r" % (name, limit, tok))
    bad = [b for b in tok if b not in PRINTUSASCII]
    if bad:
        raise Invalid("%s has non-PRINTUSASCII bytes: %r" % (name, tok))
    return tok.decode("ascii")


def check_timestamp(tok):
    if tok == b"-":
        return "-"
    m = TIMESTAMP_RE.match(tok)
    if not m:
        raise Invalid("TIMESTAMP not RFC 3339 (<= 6 fractional digits): %r" % tok)
    year, month, day, hour, minute, second = (int(m.group(k)) for k in range(1, 7))
    if second == 60:
        raise Invalid("leap second in TIMESTAMP: %r" % tok)
    try:
        datetime.datetime(year, month, day, hour, minute, second)
    except ValueError as e:
        raise Invalid("TIMESTAMP out of range (%s): %r" % (e, tok))
    off = m.group(8)
    if off != b"Z":
        oh, om = int(off[1:3]), int(off[4:6])
        if oh > 23 or om > 59:
            raise Invalid("TIMESTAMP offset out of range: %r" % tok)
    return tok.decode("ascii")


def sd_name(p, what):
    start = p.i
    while p.peek() is not None and p.peek() in PRINTUSASCII and p.peek() not in b'= ]"':
        p.i += 1
    name = p.d[start : p.i]
    if not 1 <= len(name) <= 32:
        raise Invalid("%s must be 1 to 32 SD-NAME characters: %r" % (what, name))
    return name.decode("ascii")


def param_value(p):
    out = bytearray()
    while True:
        c = p.peek()
        if c is None:
            raise Invalid("unterminated PARAM-VALUE")
        if c == 0x22:  # closing quote
            p.i += 1
            break
        if c == 0x5D:
            raise Invalid("unescaped ']' in PARAM-VALUE at offset %d" % p.i)
        if c == 0x5C:  # backslash
            nxt = p.d[p.i + 1] if p.i + 1 < len(p.d) else None
            if nxt in (0x22, 0x5C, 0x5D):
                out.append(nxt)
                p.i += 2
                continue
            # RFC 5424 6.3.3: any other backslash is a literal backslash.
        out.append(c)
        p.i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Invalid("PARAM-VALUE is not UTF-8: %s" % e)


def structured_data(p):
    if p.peek() == 0x2D:  # NILVALUE
        p.i += 1
        return []
    if p.peek() != 0x5B:
        raise Invalid("STRUCTURED-DATA must be NILVALUE or SD-ELEMENTs")
    elements = []
    seen = set()
    while p.peek() == 0x5B:
        p.i += 1
        sd_id = sd_name(p, "SD-ID")
        if sd_id not in IANA_SD_IDS:
            name, at, pen = sd_id.partition("@")
            if not at or not name or not PEN_RE.match(pen):
                raise Invalid("SD-ID neither IANA-registered nor NAME@PEN: %r" % sd_id)
        if sd_id in seen:
            raise Invalid("SD-ID %r appears twice" % sd_id)
        seen.add(sd_id)
        params = []
        while p.peek() == 0x20:
            p.i += 1
            name = sd_name(p, "PARAM-NAME")
            p.expect(0x3D, "'=' after PARAM-NAME")
            p.expect(0x22, "'\"' opening PARAM-VALUE")
            params.append([name, param_value(p)])
        p.expect(0x5D, "']' closing SD-ELEMENT")
        elements.append([sd_id, params])
    return elements


def parse(data, allow_msg_any=False):
    p = Parser(data)
    p.expect(0x3C, "'<'")
    start = p.i
    while p.peek() is not None and 0x30 <= p.peek() <= 0x39:
        p.i += 1
    digits = data[start : p.i]
    if not 1 <= len(digits) <= 3 or (len(digits) > 1 and digits[0:1] == b"0"):
        raise Invalid("PRIVAL must be 1 to 3 digits without leading zero: %r" % digits)
    pri = int(digits)
    if pri > 191:
        raise Invalid("PRIVAL %d out of range 0..191" % pri)
    p.expect(0x3E, "'>'")
    version = p.token()
    if version != b"1":
        raise Invalid("VERSION must be 1: %r" % version)
    p.expect(0x20, "SP after VERSION")
    timestamp = check_timestamp(p.token())
    p.expect(0x20, "SP after TIMESTAMP")
    hostname = header_field(p, "HOSTNAME", 255)
    p.expect(0x20, "SP after HOSTNAME")
    app = header_field(p, "APP-NAME", 48)
    p.expect(0x20, "SP after APP-NAME")
    procid = header_field(p, "PROCID", 128)
    p.expect(0x20, "SP after PROCID")
    msgid = header_field(p, "MSGID", 32)
    p.expect(0x20, "SP after MSGID")
    sd = structured_data(p)
    msg = None
    bom = False
    if p.i < len(data):
        p.expect(0x20, "SP before MSG")
        raw = data[p.i :]
        if raw.startswith(BOM):
            bom = True
            try:
                msg = raw[len(BOM) :].decode("utf-8")
            except UnicodeDecodeError as e:
                raise Invalid("MSG-UTF8 is not UTF-8: %s" % e)
        elif allow_msg_any:
            msg = raw.decode("utf-8", errors="replace")
        else:
            raise Invalid("MSG does not start with the BOM")
    return {
        "pri": pri,
        "facility": pri // 8,
        "severity": pri % 8,
        "timestamp": timestamp,
        "hostname": hostname,
        "app": app,
        "procid": procid,
        "msgid": msgid,
        "sd": sd,
        "msg": msg,
        "bom": bom,
    }


class Receiver:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.count = 0

    def invalid(self, reason):
        with self.lock:
            sys.stderr.write("INVALID: %s\n" % reason)
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(2)

    def accept_message(self, data, transport, peer_cn=None):
        try:
            parsed = parse(data, self.args.allow_msg_any)
        except Invalid as e:
            self.invalid("%s in %r" % (e, data[:300]))
            return
        parsed["transport"] = transport
        parsed["peer_cn"] = peer_cn
        with self.lock:
            sys.stdout.write(json.dumps(parsed, ensure_ascii=True) + "\n")
            sys.stdout.flush()
            self.count += 1
            if self.args.count and self.count >= self.args.count:
                os._exit(0)

    # ----- UDP -----

    def serve_udp(self, sock):
        while True:
            data, _ = sock.recvfrom(65535)
            if len(data) > self.args.max_size:
                self.invalid("datagram of %d bytes, more than %d" % (len(data), self.args.max_size))
            self.accept_message(data, "udp")

    # ----- TCP (octet counting) -----

    def serve_tcp(self, listener, ctx):
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self.connection, args=(conn, ctx), daemon=True).start()

    def connection(self, conn, ctx):
        peer_cn = None
        transport = "tcp"
        try:
            if ctx is not None:
                transport = "tls"
                try:
                    conn = ctx.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    sys.stderr.write("handshake failed: %s\n" % e)
                    conn.close()
                    return
                cert = conn.getpeercert()
                if cert:
                    for rdn in cert.get("subject", ()):
                        for key, value in rdn:
                            if key == "commonName":
                                peer_cn = value
            self.frames(conn, transport, peer_cn)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def frames(self, conn, transport, peer_cn):
        buf = b""
        handled = 0
        while True:
            # MSG-LEN = NONZERO-DIGIT *DIGIT, then SP.
            while b" " not in buf[:11]:
                if len(buf) > 10:
                    self.invalid("octet count longer than 10 digits: %r" % buf[:20])
                chunk = self.recv(conn)
                if not chunk:
                    if buf:
                        self.invalid("connection closed inside a frame header: %r" % buf)
                    return
                buf += chunk
            head, _, rest = buf.partition(b" ")
            if not head or not head.isdigit() or head[0:1] == b"0":
                self.invalid("bad MSG-LEN %r (octet counting expected)" % head)
            length = int(head)
            while len(rest) < length:
                chunk = self.recv(conn)
                if not chunk:
                    self.invalid("connection closed inside a frame (%d of %d bytes)" % (len(rest), length))
                rest += chunk
            self.accept_message(rest[:length], transport, peer_cn)
            buf = rest[length:]
            handled += 1
            if self.args.close_after and handled >= self.args.close_after:
                return

    def recv(self, conn):
        try:
            return conn.recv(65536)
        except ssl.SSLEOFError:
            return b""
        except ConnectionResetError:
            return b""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proto", choices=["udp", "tcp"], required=True)
    ap.add_argument("--port", type=int, default=0, help="0: a free port, printed")
    ap.add_argument("--tls-cert", help="server certificate chain (PEM); enables TLS (tcp only)")
    ap.add_argument("--tls-key", help="server private key (PEM)")
    ap.add_argument("--tls-ca", help="CA certificates (PEM) for client certificates")
    ap.add_argument("--require-client-cert", action="store_true")
    ap.add_argument("--count", type=int, default=0, help="exit 0 after this many messages")
    ap.add_argument("--timeout", type=float, default=30.0, help="exit 3 if idle this long")
    ap.add_argument("--max-size", type=int, default=65507, help="largest UDP datagram accepted")
    ap.add_argument("--close-after", type=int, default=0, help="close each TCP connection after N messages")
    ap.add_argument("--allow-msg-any", action="store_true", help="accept MSG without BOM")
    ap.add_argument("--check", help="parse this file as one message and exit (self-test)")
    args = ap.parse_args()

    if args.check:
        with open(args.check, "rb") as f:
            data = f.read()
        try:
            print(json.dumps(parse(data, args.allow_msg_any)))
        except Invalid as e:
            sys.stderr.write("INVALID: %s\n" % e)
            sys.exit(2)
        return

    rx = Receiver(args)
    ctx = None
    if args.tls_cert:
        if args.proto != "tcp":
            ap.error("TLS needs --proto tcp")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_ca:
            ctx.load_verify_locations(args.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if args.require_client_cert else ssl.CERT_OPTIONAL

    if args.proto == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", args.port))
        target, targs = rx.serve_udp, (sock,)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", args.port))
        sock.listen(16)
        target, targs = rx.serve_tcp, (sock, ctx)
    print("LISTENING %d" % sock.getsockname()[1], flush=True)

    threading.Thread(target=target, args=targs, daemon=True).start()
    # Idle timeout: reset by every message.
    last = -1
    while True:
        threading.Event().wait(args.timeout)
        with rx.lock:
            if rx.count == last:
                sys.stderr.write("TIMEOUT: no message for %.1f s\n" % args.timeout)
                sys.stderr.flush()
                os._exit(3)
            last = rx.count


if __name__ == "__main__":
    main()
