#!/usr/bin/env python3
"""Independent verifier of a Gridward audit log, written from docs/audit-format.md alone.

Usage: audit_verify.py DB_PATH VERIFIER_KEY

Exit status 0 and "ok N entries, M checkpoints" when the chain and every checkpoint hold;
1 and "FAIL <finding> ..." naming the first problem otherwise; 2 on usage or I/O errors.
Needs only the standard library and the `cryptography` package (Ed25519).
"""

import base64
import binascii
import hashlib
import re
import sqlite3
import struct
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

TAG = "gridward-audit-entry-v1"
GENESIS = bytes(32)
TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
ACTION_RE = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
OUTCOMES = ("success", "failure", "denied")
MAX_RENUMBER = 4096
EM_DASH = "\u2014"


class Bad(Exception):
    """A finding: kind, seq, message."""

    def __init__(self, kind, seq, message):
        super().__init__(message)
        self.kind, self.seq, self.message = kind, seq, message


class BadCheckpoint(Exception):
    pass


def b64decode_strict(text):
    raw = base64.b64decode(text, validate=True)
    if base64.b64encode(raw).decode() != text:
        raise ValueError("non-canonical base64")
    return raw


def valid_name(name):
    return name != "" and "+" not in name and not any(c.isspace() for c in name)


# --- verifier key ---------------------------------------------------------------------------

def key_id(name, public_key):
    return hashlib.sha256(name.encode() + b"\n" + b"\x01" + public_key).digest()[:4]


def parse_verifier_key(text):
    name, kid_hex, key_b64 = text.strip().split("+", 2)
    if not valid_name(name) or not re.fullmatch(r"[0-9a-f]{8}", kid_hex):
        raise ValueError("malformed verifier key")
    raw = b64decode_strict(key_b64)
    if len(raw) != 33 or raw[0] != 0x01:
        raise ValueError("not an Ed25519 verifier key")
    public_key = raw[1:]
    if key_id(name, public_key).hex() != kid_hex:
        raise ValueError("verifier key id does not match")
    return name, bytes.fromhex(kid_hex), public_key


# --- entries --------------------------------------------------------------------------------

def field(text):
    raw = text.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw


def encode(seq, time, actor, action, target, outcome, source, detail, prev):
    out = field(TAG) + struct.pack(">Q", seq) + field(time) + field(actor) + field(action)
    out += field(target) + field(outcome)
    out += b"\x00" if source is None else b"\x01" + field(source)
    return out + field(detail) + prev


class Entry:
    def __init__(self, row):
        (self.seq, self.time, self.actor, self.action, self.target, self.outcome,
         self.source, self.detail, self.prev, self.hash) = row

    def hash_with_seq(self, seq):
        return hashlib.sha256(encode(seq, self.time, self.actor, self.action, self.target,
                                     self.outcome, self.source, self.detail, self.prev)).digest()

    def hash_ok(self):
        return self.hash_with_seq(self.seq) == self.hash


def readable(row):
    """Whether a row parses as an entry (docs: 'A row that does not parse ...')."""
    seq, time, actor, action, target, outcome, source, detail, prev, hsh = row
    if not isinstance(seq, int) or seq < 1:
        return False
    if not all(isinstance(v, str) for v in (time, actor, action, target, outcome, detail)):
        return False
    if source is not None and not isinstance(source, str):
        return False
    if not TIME_RE.match(time):
        return False
    if not (actor == "system" or (actor.startswith("user:") and len(actor) > 5)
            or (actor.startswith("cert:") and len(actor) > 5)):
        return False
    if outcome not in OUTCOMES:
        return False
    return isinstance(prev, bytes) and len(prev) == 32 and isinstance(hsh, bytes) and len(hsh) == 32


def walk(entries):
    """Rules 1 to 7 of 'Verification'; returns (kind, seq) or None."""
    by_hash = {}
    for i, e in enumerate(entries):
        by_hash.setdefault(e.hash, i)
    for i, e in enumerate(entries):
        prev_entry = entries[i - 1] if i > 0 else None
        expected = prev_entry.seq + 1 if prev_entry else 1
        link = prev_entry.hash if prev_entry else GENESIS
        if e.seq < expected:
            if prev_entry is not None and prev_entry.seq != e.seq:
                return ("reordered", e.seq)
            return ("inserted", e.seq)
        if e.seq > expected:
            if any(later.seq == expected for later in entries[i + 1:]):
                return ("reordered", e.seq)
            return ("deleted", expected)
        if e.prev == link:
            if e.hash_ok():
                continue
            return ("changed", e.seq)
        # Positions: 0 is before the first entry, entry i is at position i + 1.
        if e.prev == GENESIS:
            pos = 0
        elif e.prev in by_hash:
            pos = by_hash[e.prev] + 1
        else:
            pos = None
        if pos is not None and pos > i + 1:
            return ("reordered", e.seq)
        if pos is not None and pos < i:
            return ("inserted", entries[pos].seq)
        if i + 1 < len(entries) and entries[i + 1].prev == link:
            return ("inserted", e.seq)
        if not e.hash_ok():
            if any(e.hash_with_seq(e.seq + d) == e.hash for d in range(1, MAX_RENUMBER + 1)):
                return ("deleted", e.seq)
            return ("changed", e.seq)
        return ("changed", prev_entry.seq if prev_entry else e.seq)
    return None


# --- checkpoints ----------------------------------------------------------------------------

def open_checkpoint(note, vkey):
    name, kid, public_key = vkey
    split = note.rfind("\n\n")
    if split < 0:
        raise BadCheckpoint("no signatures")
    body, sigs = note[: split + 1], note[split + 2:]
    if sigs == "" or not sigs.endswith("\n"):
        raise BadCheckpoint("no or unterminated signatures")
    lines = sigs[:-1].split("\n")
    if len(lines) > 100:
        raise BadCheckpoint("too many signatures")
    ours = []
    for line in lines:
        if not line.startswith(EM_DASH + " "):
            raise BadCheckpoint("malformed signature line")
        parts = line[2:].split(" ")
        if len(parts) != 2 or not valid_name(parts[0]):
            raise BadCheckpoint("malformed signature line")
        try:
            blob = b64decode_strict(parts[1])
        except (ValueError, binascii.Error):
            raise BadCheckpoint("malformed signature base64")
        if len(blob) < 5:
            raise BadCheckpoint("short signature")
        if parts[0] == name and blob[:4] == kid:
            ours.append(blob[4:])
    if len(ours) != 1:
        raise BadCheckpoint("not signed (exactly once) by the verifier key")
    try:
        if len(ours[0]) != 64:
            raise InvalidSignature()
        Ed25519PublicKey.from_public_bytes(public_key).verify(ours[0], body.encode("utf-8"))
    except InvalidSignature:
        raise BadCheckpoint("bad signature")
    blines = body[:-1].split("\n")
    if len(blines) != 4:
        raise BadCheckpoint("body is not four lines")
    origin, size, head, time = blines
    if origin != name:
        raise BadCheckpoint("origin is not the key name")
    if not re.fullmatch(r"0|[1-9][0-9]*", size) or int(size) >= 2**64:
        raise BadCheckpoint("bad size")
    try:
        head = b64decode_strict(head)
    except (ValueError, binascii.Error):
        raise BadCheckpoint("bad head")
    if len(head) != 32:
        raise BadCheckpoint("bad head length")
    if not time.startswith("time ") or not TIME_RE.match(time[5:]):
        raise BadCheckpoint("bad time line")
    return int(size), head


# --- the whole log --------------------------------------------------------------------------

def finding_seq(f):
    kind, seq = f
    return seq


def verify(db_path, vkey_text):
    vkey = parse_verifier_key(vkey_text)
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    rows = conn.execute(
        "SELECT seq, time, actor, action, target, outcome, source, detail, prev, hash"
        " FROM entries ORDER BY seq").fetchall()
    notes = [r[0] for r in conn.execute("SELECT note FROM checkpoints ORDER BY id")]
    conn.close()

    entries, unreadable = [], None
    for row in rows:
        if not readable(row):
            unreadable = ("inserted", 0) if not isinstance(row[0], int) or row[0] < 1 \
                else ("changed", row[0])
            break
        entries.append(Entry(row))

    chain = walk(entries)
    last = max((e.seq for e in entries), default=0)
    by_seq = {}
    for e in entries:
        by_seq.setdefault(e.seq, e.hash)
    cp_finding = None
    for index, note in enumerate(notes, start=1):
        try:
            size, head = open_checkpoint(note, vkey)
        except BadCheckpoint as err:
            raise Bad("bad-checkpoint", None, f"checkpoint {index} does not verify: {err}")
        if size == 0:
            f = None if head == GENESIS else ("checkpoint-mismatch", 0)
        elif size > last:
            f = ("truncated", last + 1, size, last)
        elif by_seq.get(size) != head:
            f = ("checkpoint-mismatch", size)
        else:
            f = None
        if f is not None and (cp_finding is None or f[1] < cp_finding[1]):
            cp_finding = f
    candidates = [f for f in (chain, cp_finding) if f is not None]
    first = min(candidates, key=lambda f: f[1]) if candidates else None
    if chain is not None and first is not None and chain[1] <= first[1]:
        first = chain
    if unreadable is not None and (first is None or unreadable[1] <= first[1]):
        first = unreadable
    if first is not None:
        if first[0] == "truncated":
            raise Bad("truncated", first[1],
                      f"log ends at entry {first[3]}, a checkpoint covers {first[2]}")
        raise Bad(first[0], first[1], f"entry {first[1]}: {first[0]}")
    return len(rows), len(notes)


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    try:
        n, m = verify(argv[1], argv[2])
    except Bad as bad:
        where = "" if bad.seq is None else f" seq={bad.seq}"
        print(f"FAIL {bad.kind}{where}: {bad.message}")
        return 1
    except (sqlite3.Error, ValueError, binascii.Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"ok {n} entries, {m} checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
