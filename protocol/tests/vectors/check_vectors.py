#!/usr/bin/env python3
"""Independent checker for the p2pchat v1 known-answer vectors.

Written from docs/PROTOCOL.md alone (never from the Rust sources), so that a
disagreement between this script and the vectors points at a bug in either
the document or the reference implementation.

Usage:  python3 check_vectors.py [DIR]
DIR holds kdf.json, key_exchange.json, ratchet.json, group.json, relay.json
and payloads.json; it defaults to the directory this script lives in.

Every individual comparison is counted. A mismatch prints its name, the
expected value (from the vectors) and the value computed here, and the run
continues. The last line is `vectors: N passed, M failed`; the exit status is
1 if anything failed.

Needs PyNaCl (X25519, Ed25519, secretbox) and `cryptography` (HKDF).
"""

import copy
import hashlib
import hmac
import json
import os
import re
import sys

import nacl.bindings
import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand


# ---------------------------------------------------------------------------
# Constants (§2, §4, §6.4)
# ---------------------------------------------------------------------------

CONVERSATION_ID = b"p2pchat/v1/conversation-id"
KX_REQUEST = b"p2pchat/v1/kx-request"
KX_ACK = b"p2pchat/v1/kx-ack"
KX_TRANSCRIPT = b"p2pchat/v1/kx-transcript"
KX_ROOT = b"p2pchat/v1/kx-root"
RATCHET_AD = b"p2pchat/v1/ratchet-ad"
RATCHET_ROOT = b"p2pchat/v1/ratchet-root"
RATCHET_MESSAGE = b"p2pchat/v1/ratchet-message"
SENDER_MESSAGE = b"p2pchat/v1/sender-key/message"
SENDER_CHAIN = b"p2pchat/v1/sender-key/chain"
SENDER_KEYS = b"p2pchat/v1/sender-key/keys"
GROUP_MESSAGE = b"p2pchat/v1/group-message"

VERSION = b"\x01"
MAX_ENVELOPE_LEN = 262_144
MAX_SKIP = 1_000
RETIRED_KEYS_REMEMBERED = 8

# Envelope kinds (§4.1) and PairwisePayload kinds (§4.2).
KIND_KX_REQUEST, KIND_KX_ACK, KIND_RATCHET, KIND_GROUP = 0, 1, 2, 3
PAYLOAD_CHAT, PAYLOAD_DELIVERY, PAYLOAD_READ = 0, 1, 2
PAYLOAD_SENDER_KEY_DISTRIBUTION, PAYLOAD_SENDER_KEY_REQUEST = 3, 4
PAYLOAD_GROUP_CONTROL, PAYLOAD_SESSION_CONFIRM, PAYLOAD_TRACKED = 5, 6, 7
PAYLOAD_ACK, PAYLOAD_GROUP_CHAT = 8, 9
PAYLOAD_NAMES = ["Chat", "DeliveryReceipt", "ReadReceipt",
                 "SenderKeyDistribution", "SenderKeyRequest", "GroupControl",
                 "SessionConfirm", "Tracked", "Ack", "GroupChat"]


# ---------------------------------------------------------------------------
# Check bookkeeping
# ---------------------------------------------------------------------------

def show(value):
    """Render a value for a failure line: bytes as hex, the rest as repr."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    return repr(value)


class Checker:
    """Counts checks; prints each failure as it happens and carries on."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def fail(self, name, detail):
        self.failed += 1
        print(f"FAIL {name}: {detail}")

    def equal(self, name, expected, got):
        """One check: the vector's value `expected` equals our `got`."""
        if expected == got:
            self.passed += 1
            return True
        self.fail(name, f"expected {show(expected)}, got {show(got)}")
        return False

    def true(self, name, condition, detail="condition is false"):
        if condition:
            self.passed += 1
            return True
        self.fail(name, detail)
        return False

    def section(self, name, function, *args):
        """Run one group of checks; an exception there is one failure, and
        the other sections still run."""
        try:
            return function(self, *args)
        except Exception as error:  # report and continue, never abort
            self.fail(name, f"aborted: {type(error).__name__}: {error}")
            return None


# ---------------------------------------------------------------------------
# Vector loading: remember which fields were looked at, so that a field the
# checker never examines is reported rather than silently trusted.
# ---------------------------------------------------------------------------

class Fields(dict):
    """A JSON object that records which of its keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def load_json(directory, name):
    with open(os.path.join(directory, name), encoding="utf-8") as f:
        return json.load(f, object_hook=Fields)


def unread_fields(value, path):
    """Paths of JSON fields that were never read."""
    found = []
    if isinstance(value, Fields):
        for key, item in dict.items(value):
            sub = f"{path}.{key}"
            if key not in value.read:
                found.append(sub)
            else:
                found.extend(unread_fields(item, sub))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.extend(unread_fields(item, f"{path}[{i}]"))
    return found


def h(text):
    """Vector bytes are lowercase hex (§9)."""
    return bytes.fromhex(text)


# ---------------------------------------------------------------------------
# Primitives (§1)
# ---------------------------------------------------------------------------

def be32(n):
    return n.to_bytes(4, "big")


def be64(n):
    return n.to_bytes(8, "big")


def sha256(data):
    return hashlib.sha256(data).digest()


def hmac_sha256(key, message):
    return hmac.new(key, message, hashlib.sha256).digest()


def hkdf(salt, ikm, info, length):
    """HKDF-SHA256, extract then expand (RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt,
                info=info).derive(ikm)


def hkdf_expand(prk, info, length):
    """The expand step alone, with the 32-byte key used directly as PRK."""
    return HKDFExpand(algorithm=hashes.SHA256(), length=length,
                      info=info).derive(prk)


class ZeroDH(Exception):
    pass


def x25519(secret, public):
    """X25519, refusing the all-zero output of a small-order peer key (§1).
    libsodium refuses it too; the explicit test makes the rule visible."""
    try:
        out = nacl.bindings.crypto_scalarmult(secret, public)
    except Exception as error:
        raise ZeroDH(f"X25519 refused: {error}") from error
    if out == bytes(32):
        raise ZeroDH("X25519 output is all zeros")
    return out


def x25519_public(secret):
    return nacl.bindings.crypto_scalarmult_base(secret)


def secretbox_seal(key, nonce, plaintext):
    """crypto_secretbox_easy layout: 16-byte tag, then the ciphertext."""
    return nacl.bindings.crypto_secretbox_easy(plaintext, nonce, key)


def secretbox_open(key, nonce, boxed):
    """Returns the plaintext, or None if the Poly1305 tag does not verify."""
    try:
        return nacl.bindings.crypto_secretbox_open_easy(boxed, nonce, key)
    except nacl.exceptions.CryptoError:
        return None


def ed25519_public(seed):
    """The RFC 8032 32-byte secret key ("seed") to its public key."""
    return bytes(nacl.signing.SigningKey(seed).verify_key)


def ed25519_sign(seed, message):
    """Ed25519 is deterministic, so re-signing must reproduce the vector."""
    return nacl.signing.SigningKey(seed).sign(message).signature


# --- strict Ed25519 verification -------------------------------------------
# §1 asks for ed25519-dalek's verify_strict: R and A canonical and not of
# small order, S < l. libsodium's verify enforces most of this itself, but
# the rules are spelled out here on a tiny affine Edwards implementation so
# the checker states exactly what the document states.

ED_P = 2**255 - 19
ED_L = 2**252 + 27742317777372353535851937790883648493
ED_D = (-121665 * pow(121666, -1, ED_P)) % ED_P
ED_SQRT_M1 = pow(2, (ED_P - 1) // 4, ED_P)
ED_IDENTITY = (0, 1)


def ed_decode(encoding):
    """Decode a compressed point (RFC 8032 §5.1.3); None if the encoding is
    not canonical (y >= p, or x = 0 with the sign bit set) or not on the
    curve."""
    y = int.from_bytes(encoding, "little") & ((1 << 255) - 1)
    sign = encoding[31] >> 7
    if y >= ED_P:
        return None
    u = (y * y - 1) % ED_P
    v = (ED_D * y * y + 1) % ED_P
    x2 = u * pow(v, -1, ED_P) % ED_P
    x = pow(x2, (ED_P + 3) // 8, ED_P)
    if (x * x - x2) % ED_P:
        x = x * ED_SQRT_M1 % ED_P
    if (x * x - x2) % ED_P:
        return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = ED_P - x
    return (x, y)


def ed_add(p, q):
    """Complete twisted Edwards addition, a = -1, affine coordinates."""
    (x1, y1), (x2, y2) = p, q
    t = ED_D * x1 * x2 * y1 * y2 % ED_P
    x3 = (x1 * y2 + y1 * x2) * pow(1 + t, -1, ED_P) % ED_P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, -1, ED_P) % ED_P
    return (x3, y3)


def ed_is_small_order(point):
    """A point has small order iff 8·P is the identity."""
    for _ in range(3):
        point = ed_add(point, point)
    return point == ED_IDENTITY


def ed25519_verify_strict(public, message, signature):
    """Returns None if the signature verifies strictly, else the reason."""
    if len(public) != 32 or len(signature) != 64:
        return "wrong length"
    if int.from_bytes(signature[32:], "little") >= ED_L:
        return "S is not below l"
    for name, encoding in (("public key", public), ("R", signature[:32])):
        point = ed_decode(encoding)
        if point is None:
            return f"{name} is not a canonical point"
        if ed_is_small_order(point):
            return f"{name} has small order"
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
    except nacl.exceptions.BadSignatureError:
        return "equation does not hold"
    return None


# ---------------------------------------------------------------------------
# Identifiers (§3)
# ---------------------------------------------------------------------------

def peer_id(identity_public):
    return sha256(identity_public)[:20]


def uuid_text(u):
    """8-4-4-4-12 lowercase hex groups."""
    x = u.hex()
    return f"{x[0:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:32]}"


def uuid_from_text(text):
    return h(text.replace("-", ""))


def has_uuid_bits(u, version):
    """Version nibble in u[6], RFC 9562 variant (10xxxxxx) in u[8]."""
    return u[6] >> 4 == version and u[8] & 0xC0 == 0x80


def conversation_id(peer_a, peer_b):
    """1:1 ID: hash of the two peer IDs in byte order, UUID v8 bits set."""
    lo, hi = sorted((peer_a, peer_b))
    u = bytearray(sha256(CONVERSATION_ID + lo + hi)[:16])
    u[6] = (u[6] & 0x0F) | 0x80
    u[8] = (u[8] & 0x3F) | 0x80
    return bytes(u)


# ---------------------------------------------------------------------------
# KDFs (§5.2, §6.1, §7.2)
# ---------------------------------------------------------------------------

def kx_root(transcript_hash, dh):
    """First root key and the responder's first sending chain key."""
    okm = hkdf(transcript_hash, dh, KX_ROOT, 64)
    return okm[:32], okm[32:]


def kdf_rk(root_key, dh):
    """Double Ratchet root step: (new root key, new chain key)."""
    okm = hkdf(root_key, dh, RATCHET_ROOT, 64)
    return okm[:32], okm[32:]


def kdf_ck(chain_key):
    """Ratchet chain step: (message key, next chain key)."""
    return hmac_sha256(chain_key, b"\x01"), hmac_sha256(chain_key, b"\x02")


def ratchet_message_keys(message_key):
    """(cipher key, nonce, header key) from one ratchet message key."""
    okm = hkdf_expand(message_key, RATCHET_MESSAGE, 88)
    return okm[:32], okm[32:56], okm[56:88]


def sender_chain_step(chain_key):
    """Sender-key chain step: (message key, next chain key)."""
    return (hmac_sha256(chain_key, SENDER_MESSAGE),
            hmac_sha256(chain_key, SENDER_CHAIN))


def sender_message_keys(message_key):
    """(cipher key, nonce) from one sender-key message key."""
    okm = hkdf_expand(message_key, SENDER_KEYS, 56)
    return okm[:32], okm[32:56]


def binding(ik_initiator, ik_responder, conv_id, session_id):
    """The session's associated-data binding (§5.2)."""
    return sha256(RATCHET_AD + ik_initiator + ik_responder + conv_id
                  + session_id)


def ratchet_header(session_id, ratchet_key, pn, n):
    """The 56 authenticated header bytes (§6.2 step 3)."""
    return session_id + ratchet_key + be32(pn) + be32(n)


def header_tag(header_key, bind, header):
    return hmac_sha256(header_key, bind + header)[:16]


# ---------------------------------------------------------------------------
# Transcripts (§5.1, §7.3)
# ---------------------------------------------------------------------------

def request_transcript(id_i, id_r, e_i, t, nonce):
    return KX_REQUEST + VERSION + id_i + id_r + e_i + be64(t) + nonce


def ack_transcript(id_i, id_r, e_i, t, nonce, e_r):
    return KX_ACK + VERSION + id_i + id_r + e_i + be64(t) + nonce + e_r


def group_transcript(group_id, sender, key_id, n, ciphertext):
    return (GROUP_MESSAGE + VERSION + group_id + sender + be32(key_id)
            + be32(n) + ciphertext)


# ---------------------------------------------------------------------------
# Postcard decoding (§4)
# ---------------------------------------------------------------------------

class Malformed(Exception):
    """Bytes that are not a canonical v1 encoding. Its subclasses are the
    other decoding refusals of §8; `refusal` is the name §8 gives."""
    refusal = "malformed"


class Empty(Malformed):
    refusal = "empty"


class TooLarge(Malformed):
    refusal = "too large"


class UnsupportedVersion(Malformed):
    refusal = "unsupported version"


class UnknownKind(Malformed):
    refusal = "unknown kind"


class Reader:
    """Reads postcard values from a byte string, refusing anything that does
    not decode exactly."""

    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise Malformed(f"need {n} bytes at offset {self.pos}, "
                            f"only {len(self.data) - self.pos} left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self):
        return self.take(1)[0]

    def varint(self, bits):
        """Unsigned LEB128. A value too wide for the type is refused; so is a
        non-minimal encoding (a zero final group after the first byte), which
        §4's "every value one encoding" implies."""
        value, shift = 0, 0
        for i in range((bits + 6) // 7):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if i > 0 and byte == 0:
                    raise Malformed("non-minimal varint")
                if value >> bits:
                    raise Malformed(f"varint exceeds u{bits}")
                return value
            shift += 7
        raise Malformed(f"varint longer than a u{bits}")

    def u32(self):
        return self.varint(32)

    def u64(self):
        return self.varint(64)

    def fixed(self, n):
        """[u8; N]: exactly N raw bytes, no length."""
        return self.take(n)

    def byte_string(self):
        # Lengths are usize; taken as 64-bit here.
        return self.take(self.varint(64))

    def string(self):
        raw = self.byte_string()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise Malformed(f"string is not UTF-8: {error}") from error

    def list_of(self, read_one):
        return [read_one() for _ in range(self.varint(64))]

    def finish(self):
        """Refuse trailing bytes (§4)."""
        if self.pos != len(self.data):
            raise Malformed(f"{len(self.data) - self.pos} trailing bytes")


def read_key_exchange_request(r):
    return {
        "initiator_identity": r.fixed(32),
        "responder": r.fixed(20),
        "ephemeral": r.fixed(32),
        "timestamp": r.u64(),
        "nonce": r.fixed(16),
        "signature": r.fixed(64),
    }


def read_key_exchange_ack(r):
    return {
        "responder_identity": r.fixed(32),
        "initiator_ephemeral": r.fixed(32),
        "request_nonce": r.fixed(16),
        "ephemeral": r.fixed(32),
        "signature": r.fixed(64),
    }


def read_ratchet_message(r):
    header = {
        "session_id": r.fixed(16),
        "ratchet_key": r.fixed(32),
        "previous_chain_length": r.u32(),
        "message_number": r.u32(),
    }
    return {"header": header, "header_tag": r.fixed(16),
            "ciphertext": r.byte_string()}


def read_group_message(r):
    return {
        "group_id": r.fixed(16),
        "sender": r.fixed(20),
        "key_id": r.u32(),
        "message_number": r.u32(),
        "ciphertext": r.byte_string(),
        "signature": r.fixed(64),
    }


ENVELOPE_BODIES = {
    KIND_KX_REQUEST: read_key_exchange_request,
    KIND_KX_ACK: read_key_exchange_ack,
    KIND_RATCHET: read_ratchet_message,
    KIND_GROUP: read_group_message,
}


def parse_envelope(data):
    """VERSION, then the postcard enum (kind varint + body). Returns
    (kind, fields); raises Malformed with the §4 refusal reason."""
    if not data:
        raise Empty("empty input")
    if len(data) > MAX_ENVELOPE_LEN:
        raise TooLarge("envelope over MAX_ENVELOPE_LEN")
    if data[:1] != VERSION:
        raise UnsupportedVersion(f"unsupported version {data[0]}")
    r = Reader(data[1:])
    kind = r.u32()
    if kind not in ENVELOPE_BODIES:
        raise UnknownKind(f"unknown kind {kind}")
    body = ENVELOPE_BODIES[kind](r)
    r.finish()
    return kind, body


def read_chat_content(r):
    return {"message_id": r.fixed(16), "sent_at": r.u64(),
            "content": r.string()}


def read_roster_entry(r):
    return {"peer_id": r.fixed(20), "epoch": r.u64()}


def read_group_control(r):
    """GroupControl (§4.2), with its kind as a name."""
    kind = r.u32()
    if kind == 0:
        return {"kind": "Invite", "group_id": r.fixed(16),
                "name": r.string(), "admin": r.fixed(20),
                "members": r.list_of(lambda: read_roster_entry(r)),
                "created_at": r.u64()}
    if kind == 1:
        return {"kind": "MemberAdded", "group_id": r.fixed(16),
                "member": read_roster_entry(r)}
    if kind == 2:
        return {"kind": "Leave", "group_id": r.fixed(16), "epoch": r.u64()}
    if kind == 3:
        return {"kind": "MemberLeft", "group_id": r.fixed(16),
                "member": read_roster_entry(r)}
    raise UnknownKind(f"unknown GroupControl kind {kind}")


def read_pairwise_payload(r, inside_tracked=False):
    """PairwisePayload (§4.2); the variant index is returned as "kind".

    A Tracked payload holds one payload that is neither Tracked nor Ack: the
    inner kind is checked before anything of it is decoded."""
    kind = r.u32()
    if inside_tracked and kind in (PAYLOAD_TRACKED, PAYLOAD_ACK):
        raise Malformed(f"a Tracked payload may not hold kind {kind}")
    if kind == PAYLOAD_CHAT:
        body = read_chat_content(r)
    elif kind == PAYLOAD_DELIVERY:
        body = {"message_ids": r.list_of(lambda: r.fixed(16))}
    elif kind == PAYLOAD_READ:
        body = {"message_ids": r.list_of(lambda: r.fixed(16)),
                "read_at": r.u64()}
    elif kind == PAYLOAD_SENDER_KEY_DISTRIBUTION:
        body = {"group_id": r.fixed(16), "sender": r.fixed(20),
                "key_id": r.u32(), "message_number": r.u32(),
                "chain_key": r.fixed(32), "signing_public": r.fixed(32)}
    elif kind == PAYLOAD_SENDER_KEY_REQUEST:
        body = {"group_id": r.fixed(16)}
    elif kind == PAYLOAD_GROUP_CONTROL:
        body = {"control": read_group_control(r)}
    elif kind == PAYLOAD_SESSION_CONFIRM:
        body = {}
    elif kind == PAYLOAD_TRACKED:
        body = {"id": r.u64(),
                "payload": read_pairwise_payload(r, inside_tracked=True)}
    elif kind == PAYLOAD_ACK:
        body = {"ids": r.list_of(r.u64)}
    elif kind == PAYLOAD_GROUP_CHAT:
        body = {"group_id": r.fixed(16), "key_id": r.u32(),
                "message_number": r.u32(), "content": read_chat_content(r)}
    else:
        raise UnknownKind(f"unknown PairwisePayload kind {kind}")
    body["kind"] = kind
    return body


def payload_as_vector(payload):
    """A decoded payload in the form payloads.json writes: kinds by name,
    bytes as hex, a ChatContent under "chat"."""
    def plain(value):
        if isinstance(value, bytes):
            return value.hex()
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    out = {"kind": PAYLOAD_NAMES[payload["kind"]]}
    if payload["kind"] == PAYLOAD_CHAT:
        out["chat"] = plain({k: payload[k]
                             for k in ("message_id", "sent_at", "content")})
        return out
    for key, value in payload.items():
        if key == "kind":
            continue
        if key == "payload":
            out[key] = payload_as_vector(value)
        elif key == "content":
            out["chat"] = plain(value)
        else:
            out[key] = plain(value)
    return out


def equal_fields(c, name, expected, got):
    """Compare a vector's JSON with decoded values, reading every field of
    the vector (so coverage sees it) and requiring the same field names."""
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            c.fail(name, f"expected an object, got {show(got)}")
            return
        c.equal(f"{name} fields", sorted(dict.keys(expected)), sorted(got))
        for key in dict.keys(expected):
            if key in got:
                equal_fields(c, f"{name}.{key}", expected[key], got[key])
    elif isinstance(expected, list):
        if not isinstance(got, list) or len(got) != len(expected):
            c.fail(name, f"expected {len(expected)} items, got {show(got)}")
            return
        for i, (e, g) in enumerate(zip(expected, got)):
            equal_fields(c, f"{name}[{i}]", e, g)
    else:
        c.equal(name, expected, got)


def parse_exact(data, read):
    """Decode a whole payload with `read`, refusing trailing bytes."""
    r = Reader(data)
    value = read(r)
    r.finish()
    return value


def check_refused(c, name, expected, decide):
    """One refusal vector: `decide()` gives the refusal (or None for
    accepted); a decoding error counts as its own refusal."""
    try:
        got = decide()
    except Malformed as error:
        got = error.refusal if error.refusal == expected else f"{error.refusal} ({error})"
    c.equal(f"{name} is refused as {expected}", expected, got)


def check_parse(c, name, data, read):
    """Parse a payload as one check; None if it does not decode exactly."""
    try:
        value = parse_exact(data, read)
    except Malformed as error:
        c.fail(name, f"does not decode: {error}")
        return None
    c.true(name, True)
    return value


def check_envelope(c, name, data, kind, expected):
    """Parse an envelope (one check: decodes exactly, all bytes consumed),
    check its kind, then compare each parsed field with `expected`."""
    try:
        got_kind, body = parse_envelope(data)
    except Malformed as error:
        c.fail(f"{name} parses", str(error))
        return None
    c.true(f"{name} parses and consumes every byte", True)
    c.equal(f"{name} kind", kind, got_kind)
    if got_kind != kind:
        return None
    flat = dict(body)
    flat.update(body.get("header", {}))
    for field, value in expected.items():
        c.equal(f"{name} .{field}", value, flat[field])
    return body


# ---------------------------------------------------------------------------
# kdf.json
# ---------------------------------------------------------------------------

def check_kdf(c, v):
    s = v["peer_id"]
    c.equal("kdf peer_id", h(s["peer_id"]), peer_id(h(s["identity_public"])))

    s = v["conversation_id"]
    a, b = h(s["peer_a"]), h(s["peer_b"])
    c.equal("kdf conversation_id", s["conversation_id"],
            uuid_text(conversation_id(a, b)))
    # Both peers compute the same ID whatever order they name each other in.
    c.equal("kdf conversation_id is symmetric",
            conversation_id(a, b), conversation_id(b, a))

    s = v["kx_root_step"]
    root, chain = kx_root(h(s["transcript_hash"]), h(s["dh"]))
    c.equal("kdf kx_root_step root_key", h(s["root_key"]), root)
    c.equal("kdf kx_root_step chain_key", h(s["chain_key"]), chain)

    s = v["ratchet_root_step"]
    root, chain = kdf_rk(h(s["root_key"]), h(s["dh"]))
    c.equal("kdf ratchet_root_step next_root_key", h(s["next_root_key"]), root)
    c.equal("kdf ratchet_root_step chain_key", h(s["chain_key"]), chain)

    s = v["ratchet_chain_step"]
    mk, ck = kdf_ck(h(s["chain_key"]))
    c.equal("kdf ratchet_chain_step message_key", h(s["message_key"]), mk)
    c.equal("kdf ratchet_chain_step next_chain_key", h(s["next_chain_key"]), ck)

    s = v["ratchet_message_keys"]
    key, nonce, hk = ratchet_message_keys(h(s["message_key"]))
    c.equal("kdf ratchet_message_keys cipher_key", h(s["cipher_key"]), key)
    c.equal("kdf ratchet_message_keys nonce", h(s["nonce"]), nonce)
    c.equal("kdf ratchet_message_keys header_key", h(s["header_key"]), hk)

    s = v["ratchet_header_tag"]
    c.equal("kdf ratchet_header_tag header is 56 bytes", 56, len(h(s["header"])))
    c.equal("kdf ratchet_header_tag tag", h(s["tag"]),
            header_tag(h(s["header_key"]), h(s["binding"]), h(s["header"])))

    s = v["sender_chain_step"]
    mk, ck = sender_chain_step(h(s["chain_key"]))
    c.equal("kdf sender_chain_step message_key", h(s["message_key"]), mk)
    c.equal("kdf sender_chain_step next_chain_key", h(s["next_chain_key"]), ck)

    s = v["sender_message_keys"]
    key, nonce = sender_message_keys(h(s["message_key"]))
    c.equal("kdf sender_message_keys cipher_key", h(s["cipher_key"]), key)
    c.equal("kdf sender_message_keys nonce", h(s["nonce"]), nonce)

    s = v["secretbox"]
    key, nonce, plaintext = h(s["key"]), h(s["nonce"]), h(s["plaintext"])
    boxed = secretbox_seal(key, nonce, plaintext)
    c.equal("kdf secretbox seal", h(s["ciphertext"]), boxed)
    c.equal("kdf secretbox length is len(m) + 16", len(plaintext) + 16,
            len(h(s["ciphertext"])))
    c.equal("kdf secretbox open", plaintext,
            secretbox_open(key, nonce, h(s["ciphertext"])))


# ---------------------------------------------------------------------------
# key_exchange.json
# ---------------------------------------------------------------------------

def check_identity(c, name, person):
    ik = ed25519_public(h(person["seed"]))
    c.equal(f"kx {name} identity_public", h(person["identity_public"]), ik)
    c.equal(f"kx {name} peer_id", h(person["peer_id"]), peer_id(ik))
    return ik, peer_id(ik)


def check_signature(c, name, seed, public, transcript, signature):
    """Re-sign (deterministic) and verify strictly."""
    c.equal(f"{name} signature reproduces", signature,
            ed25519_sign(seed, transcript))
    reason = ed25519_verify_strict(public, transcript, signature)
    c.true(f"{name} signature verifies strictly", reason is None, str(reason))


def check_key_exchange(c, v):
    """Alice (initiator) and Bob (responder), per §5. Returns the session
    material the ratchet walk starts from."""
    seed_a, seed_b = h(v["alice"]["seed"]), h(v["bob"]["seed"])
    ik_a, id_a = check_identity(c, "alice", v["alice"])
    ik_b, id_b = check_identity(c, "bob", v["bob"])

    req, ack = v["request"], v["ack"]
    e_i_secret, e_r_secret = h(req["ephemeral_secret"]), h(ack["ephemeral_secret"])
    e_i = x25519_public(e_i_secret)
    e_r = x25519_public(e_r_secret)
    c.equal("kx request ephemeral_public", h(req["ephemeral_public"]), e_i)
    c.equal("kx ack ephemeral_public", h(ack["ephemeral_public"]), e_r)
    t, nonce = req["timestamp_ms"], h(req["nonce"])
    c.equal("kx request nonce is 16 bytes", 16, len(nonce))

    # §5.1 transcripts, rebuilt from the parts, then signed and verified.
    req_t = request_transcript(id_a, id_b, e_i, t, nonce)
    c.equal("kx request transcript", h(req["transcript"]), req_t)
    check_signature(c, "kx request", seed_a, ik_a, req_t, h(req["signature"]))
    ack_t = ack_transcript(id_a, id_b, e_i, t, nonce, e_r)
    c.equal("kx ack transcript", h(ack["transcript"]), ack_t)
    check_signature(c, "kx ack", seed_b, ik_b, ack_t, h(ack["signature"]))

    # §4.1 envelopes.
    request = check_envelope(c, "kx request envelope", h(req["envelope"]),
                             KIND_KX_REQUEST, {
                                 "initiator_identity": ik_a,
                                 "responder": id_b,
                                 "ephemeral": e_i,
                                 "timestamp": t,
                                 "nonce": nonce,
                                 "signature": h(req["signature"]),
                             })
    ack_body = check_envelope(c, "kx ack envelope", h(ack["envelope"]),
                              KIND_KX_ACK, {
                                  "responder_identity": ik_b,
                                  "initiator_ephemeral": e_i,
                                  "request_nonce": nonce,
                                  "ephemeral": e_r,
                                  "signature": h(ack["signature"]),
                              })

    # The acceptance rules of §5.1 steps 2.1–2.3 and 3, applied to the
    # parsed envelopes as a receiver would (clock and freshness checks need a
    # local clock and history, so they are out of scope here).
    if request is not None:
        c.equal("kx request is for bob (not for us)", id_b, request["responder"])
        c.equal("kx request identity hashes to alice's peer ID", id_a,
                peer_id(request["initiator_identity"]))
        reason = ed25519_verify_strict(
            request["initiator_identity"],
            request_transcript(peer_id(request["initiator_identity"]),
                               request["responder"], request["ephemeral"],
                               request["timestamp"], request["nonce"]),
            request["signature"])
        c.true("kx bob accepts the parsed request", reason is None, str(reason))
    if ack_body is not None:
        c.equal("kx ack identity hashes to bob's peer ID", id_b,
                peer_id(ack_body["responder_identity"]))
        reason = ed25519_verify_strict(
            ack_body["responder_identity"],
            ack_transcript(id_a, id_b, ack_body["initiator_ephemeral"], t,
                           ack_body["request_nonce"], ack_body["ephemeral"]),
            ack_body["signature"])
        c.true("kx alice accepts the parsed ack", reason is None, str(reason))

    # §5.2 derivation, from both sides.
    dh_r = x25519(e_r_secret, e_i)  # responder: X25519(e_r, E_i)
    dh_i = x25519(e_i_secret, e_r)  # initiator: X25519(e_i, E_r)
    c.equal("kx dh (responder side)", h(v["dh"]), dh_r)
    c.equal("kx dh (initiator side)", h(v["dh"]), dh_i)
    th = sha256(KX_TRANSCRIPT + ack_t)
    c.equal("kx transcript_hash", h(v["transcript_hash"]), th)
    root, ck_r = kx_root(th, dh_r)
    c.equal("kx root_key", h(v["root_key"]), root)
    c.equal("kx responder_chain_key", h(v["responder_chain_key"]), ck_r)
    session_id = th[:16]
    c.equal("kx session_id", h(v["session_id"]), session_id)
    conv = conversation_id(id_a, id_b)
    c.equal("kx conversation_id", v["conversation_id"], uuid_text(conv))
    c.true("kx conversation_id has UUID v8 bits", has_uuid_bits(conv, 8))
    bind = binding(ik_a, ik_b, conv, session_id)
    c.equal("kx binding", h(v["binding"]), bind)

    return {
        "alice_ik": ik_a, "bob_ik": ik_b, "alice_id": id_a, "bob_id": id_b,
        "e_i": (e_i_secret, e_i), "e_r": (e_r_secret, e_r),
        "root_key": root, "responder_chain_key": ck_r,
        "session_id": session_id, "binding": bind,
    }


MAX_REQUEST_CLOCK_SKEW_MS = 600_000


def small_order_dh(public, some_secret):
    """Whether X25519 with this public key gives all zeros (§5.1 step 6)."""
    try:
        x25519(some_secret, public)
        return False
    except ZeroDH:
        return True


def request_refusal(id_r, from_id, data, now, mark, some_secret):
    """What R refuses a request for (§5.1 step 2), or None if it accepts it
    (as new or as a repeat of the one it marked)."""
    kind, req = parse_envelope(data)
    if kind != KIND_KX_REQUEST:
        raise Malformed(f"envelope kind {kind} is not a key exchange request")
    if req["responder"] != id_r:
        return "not for us"
    ik = req["initiator_identity"]
    if peer_id(ik) != from_id:
        return "identity mismatch"
    point = ed_decode(ik)
    if point is None or ed_is_small_order(point):
        return "invalid key"
    t, nonce = req["timestamp"], req["nonce"]
    if abs(t - now) > MAX_REQUEST_CLOCK_SKEW_MS:
        return "stale"
    transcript = request_transcript(from_id, id_r, req["ephemeral"], t, nonce)
    # A mark too far ahead of our clock is set aside.
    if mark is not None and mark["timestamp_ms"] - now <= MAX_REQUEST_CLOCK_SKEW_MS:
        held = (mark["timestamp_ms"], h(mark["nonce"]))
        same_ephemeral = req["ephemeral"] == h(mark["initiator_ephemeral"])
        if (t, nonce) == held and same_ephemeral:
            return "bad signature" if ed25519_verify_strict(
                ik, transcript, req["signature"]) else None
        if (t, nonce) <= held:
            return "replayed"
    if ed25519_verify_strict(ik, transcript, req["signature"]):
        return "bad signature"
    if small_order_dh(req["ephemeral"], some_secret):
        return "invalid ephemeral key"
    return None


def ack_refusal(id_i, id_r, e_i_secret, t, nonce, data):
    """What I refuses an ack for while its request is pending (§5.1 step
    3), or None if it accepts it."""
    kind, ack = parse_envelope(data)
    if kind != KIND_KX_ACK:
        raise Malformed(f"envelope kind {kind} is not a key exchange ack")
    ik = ack["responder_identity"]
    if peer_id(ik) != id_r:
        return "identity mismatch"
    point = ed_decode(ik)
    if point is None or ed_is_small_order(point):
        return "invalid key"
    e_i = x25519_public(e_i_secret)
    if ack["initiator_ephemeral"] != e_i or ack["request_nonce"] != nonce:
        return "ack mismatch"
    transcript = ack_transcript(id_i, id_r, e_i, t, nonce, ack["ephemeral"])
    if ed25519_verify_strict(ik, transcript, ack["signature"]):
        return "bad signature"
    if small_order_dh(ack["ephemeral"], e_i_secret):
        return "invalid ephemeral key"
    return None


def check_kx_refusals(c, v):
    id_a = bytes.fromhex(v["alice"]["peer_id"])
    id_b = bytes.fromhex(v["bob"]["peer_id"])
    req = v["request"]
    e_i_secret = h(req["ephemeral_secret"])
    e_r_secret = h(v["ack"]["ephemeral_secret"])
    for i, vector in enumerate(v["refusals"]):
        name = f"key_exchange.json refusals[{i}] {vector['name']}"
        data = h(vector["envelope"])
        if vector["to"] == "bob":
            check_refused(c, name, vector["refusal"], lambda: request_refusal(
                id_b, bytes.fromhex(vector["from"]), data, vector["now_ms"],
                vector["mark"], e_r_secret))
        else:
            check_refused(c, name, vector["refusal"], lambda: ack_refusal(
                id_a, id_b, e_i_secret, req["timestamp_ms"], h(req["nonce"]),
                data))
    # The accepted request itself passes the same rules (so the refusals
    # above are not refused for some other reason).
    c.equal("key_exchange.json the request is accepted", None,
            request_refusal(id_b, id_a, h(req["envelope"]), req["timestamp_ms"] + 40,
                            None, e_r_secret))
    c.equal("key_exchange.json the ack is accepted", None,
            ack_refusal(id_a, id_b, e_i_secret, req["timestamp_ms"], h(req["nonce"]),
                        h(v["ack"]["envelope"])))


# ---------------------------------------------------------------------------
# ratchet.json: the Double Ratchet of §5.3 and §6
# ---------------------------------------------------------------------------

class RatchetState:
    """One party's session state (§5.3 table, §6)."""

    def __init__(self, name, root, own, peer_public, send_ck, recv_ck,
                 session_id, bind):
        self.name = name
        self.root = root
        self.own_secret, self.own_public = own
        self.peer_public = peer_public
        self.send_ck, self.send_n = send_ck, 0   # None: no sending chain
        self.recv_ck, self.recv_n = recv_ck, 0   # None: no receiving chain
        self.pn = 0
        self.skipped = {}                        # (ratchet key, N) -> mk
        self.retired = []                        # old peer ratchet keys
        self.session_id = session_id
        self.binding = bind


def ratchet_send(c, state, m, tag):
    """§6.2 from the sender's side; every intermediate value is compared
    with the vector. The new ratchet secret of a DH step is random in the
    reference, so it is the one input taken from the vector."""
    step = m["dh_step"]
    if state.send_ck is None:
        if not c.true(f"{tag} starts a chain, so has a dh_step",
                      step is not None, "dh_step is null"):
            return
        secret = h(step["sender_ratchet_secret"])
        public = x25519_public(secret)
        c.equal(f"{tag} dh_step sender_ratchet_public",
                h(step["sender_ratchet_public"]), public)
        c.equal(f"{tag} dh_step receiver_ratchet_public",
                h(step["receiver_ratchet_public"]), state.peer_public)
        dh = x25519(secret, state.peer_public)
        c.equal(f"{tag} dh_step dh", h(step["dh"]), dh)
        c.equal(f"{tag} dh_step root_key_before",
                h(step["root_key_before"]), state.root)
        root, chain = kdf_rk(state.root, dh)
        c.equal(f"{tag} dh_step root_key_after", h(step["root_key_after"]), root)
        c.equal(f"{tag} dh_step chain_key", h(step["chain_key"]), chain)
        state.own_secret, state.own_public = secret, public
        state.root, state.send_ck, state.send_n = root, chain, 0
    else:
        c.true(f"{tag} continues a chain, so has no dh_step", step is None,
               "dh_step is present")

    c.equal(f"{tag} chain_key", h(m["chain_key"]), state.send_ck)
    mk, next_ck = kdf_ck(state.send_ck)
    c.equal(f"{tag} message_key", h(m["message_key"]), mk)
    c.equal(f"{tag} next_chain_key", h(m["next_chain_key"]), next_ck)
    key, nonce, hk = ratchet_message_keys(mk)
    c.equal(f"{tag} cipher_key", h(m["cipher_key"]), key)
    c.equal(f"{tag} nonce", h(m["nonce"]), nonce)
    c.equal(f"{tag} header_key", h(m["header_key"]), hk)

    header = m["header"]
    c.equal(f"{tag} header.session_id", h(header["session_id"]), state.session_id)
    c.equal(f"{tag} header.ratchet_key", h(header["ratchet_key"]), state.own_public)
    c.equal(f"{tag} header.previous_chain_length",
            header["previous_chain_length"], state.pn)
    c.equal(f"{tag} header.message_number", header["message_number"], state.send_n)
    header_bytes = ratchet_header(state.session_id, state.own_public,
                                  state.pn, state.send_n)
    c.equal(f"{tag} header_bytes", h(m["header_bytes"]), header_bytes)
    c.equal(f"{tag} binding", h(m["binding"]), state.binding)
    c.equal(f"{tag} header_tag", h(m["header_tag"]),
            header_tag(hk, state.binding, header_bytes))
    c.equal(f"{tag} ciphertext (sealed from plaintext)", h(m["ciphertext"]),
            secretbox_seal(key, nonce, h(m["plaintext"])))

    check_envelope(c, f"{tag} envelope", h(m["envelope"]), KIND_RATCHET, {
        "session_id": state.session_id,
        "ratchet_key": state.own_public,
        "previous_chain_length": state.pn,
        "message_number": state.send_n,
        "header_tag": h(m["header_tag"]),
        "ciphertext": h(m["ciphertext"]),
    })
    state.send_ck, state.send_n = next_ck, state.send_n + 1


def skip_keys(cand, until):
    """Step the receiving chain up to message number `until`, caching the
    keys passed over (§6.3)."""
    while cand.recv_n < until:
        mk, cand.recv_ck = kdf_ck(cand.recv_ck)
        cand.skipped[(cand.peer_public, cand.recv_n)] = mk
        cand.recv_n += 1


def ratchet_receive(c, state, m, tag, chain_starts):
    """§6.3 from the receiver's side, working only from the envelope bytes
    and the receiver's own state. `chain_starts` maps a sender ratchet public
    key to the sender's dh_step that created that chain, so the receiver's
    root step can be compared with the sender's (the message that reveals a
    new chain need not be the one that started it). Returns the new state
    (committed only on success, §6.3) and the plaintext."""
    try:
        kind, body = parse_envelope(h(m["envelope"]))
    except Malformed as error:
        c.fail(f"{tag} envelope", str(error))
        return state, None
    if not c.equal(f"{tag} envelope kind", KIND_RATCHET, kind):
        return state, None
    hdr = body["header"]
    c.equal(f"{tag} session_id names the session", state.session_id,
            hdr["session_id"])
    k, pn, n = hdr["ratchet_key"], hdr["previous_chain_length"], hdr["message_number"]

    cand = copy.deepcopy(state)  # candidate; the real state moves on success
    if (k, n) in cand.skipped:                         # step 1
        mk = cand.skipped.pop((k, n))
        how = "skipped-key cache"
    elif k == cand.peer_public:                        # step 2
        if cand.recv_ck is None:
            c.fail(tag, "unknown chain (no receiving chain)")
            return state, None
        if n < cand.recv_n:
            c.fail(tag, "duplicate")
            return state, None
        if n - cand.recv_n > MAX_SKIP:
            c.fail(tag, "too far ahead")
            return state, None
        skip_keys(cand, n)
        c.equal(f"{tag} receiver chain_key at N", h(m["chain_key"]), cand.recv_ck)
        mk, cand.recv_ck = kdf_ck(cand.recv_ck)
        cand.recv_n += 1
        how = "current chain"
    elif k in cand.retired:                            # step 3
        c.fail(tag, "duplicate (retired ratchet key)")
        return state, None
    else:                                              # step 4: new chain
        if cand.recv_ck is not None and pn > cand.recv_n:
            if pn - cand.recv_n > MAX_SKIP:
                c.fail(tag, "too far ahead (PN)")
                return state, None
            skip_keys(cand, pn)
        if n > MAX_SKIP:
            c.fail(tag, "too far ahead")
            return state, None
        dh = x25519(cand.own_secret, k)
        sender_step = chain_starts.get(k)
        root_before = cand.root
        cand.root, cand.recv_ck = kdf_rk(cand.root, dh)
        cand.recv_n = 0
        # The receiver's root step must land where the sender's did.
        if sender_step is not None:
            c.equal(f"{tag} receiver root_key before = sender root_key_before",
                    h(sender_step["root_key_before"]), root_before)
            c.equal(f"{tag} receiver dh = sender dh", h(sender_step["dh"]), dh)
            c.equal(f"{tag} receiver root_key = sender root_key_after",
                    h(sender_step["root_key_after"]), cand.root)
            c.equal(f"{tag} receiver chain_key = sender new chain_key",
                    h(sender_step["chain_key"]), cand.recv_ck)
        else:
            c.fail(f"{tag} new chain",
                   f"no message's dh_step introduces ratchet key {k.hex()}")
        cand.retired = (cand.retired + [cand.peer_public])[-RETIRED_KEYS_REMEMBERED:]
        cand.peer_public = k
        skip_keys(cand, n)
        c.equal(f"{tag} receiver chain_key at N", h(m["chain_key"]), cand.recv_ck)
        mk, cand.recv_ck = kdf_ck(cand.recv_ck)
        cand.recv_n += 1
        # §6.3 step 4: PN becomes the old sending chain's next number; with
        # no sending chain since the last new chain, PN keeps its value.
        if cand.send_ck is not None:
            cand.pn = cand.send_n
        cand.send_ck, cand.send_n = None, 0
        how = "new chain"

    # Step 5: expand, check the header tag, open.
    c.equal(f"{tag} receiver message_key ({how})", h(m["message_key"]), mk)
    key, nonce, hk = ratchet_message_keys(mk)
    c.equal(f"{tag} receiver cipher_key", h(m["cipher_key"]), key)
    c.equal(f"{tag} receiver nonce", h(m["nonce"]), nonce)
    c.equal(f"{tag} receiver header_key", h(m["header_key"]), hk)
    header_bytes = ratchet_header(hdr["session_id"], k, pn, n)
    expected_tag = header_tag(hk, cand.binding, header_bytes)
    if not c.true(f"{tag} receiver header_tag verifies",
                  hmac.compare_digest(expected_tag, body["header_tag"]),
                  f"header mismatch: computed {expected_tag.hex()}, "
                  f"envelope has {body['header_tag'].hex()}"):
        return state, None
    plaintext = secretbox_open(key, nonce, body["ciphertext"])
    if not c.true(f"{tag} receiver secretbox opens", plaintext is not None,
                  "bad MAC"):
        return state, None
    c.equal(f"{tag} receiver plaintext", h(m["plaintext"]), plaintext)
    return cand, plaintext


def ratchet_refusal(state, data):
    """What a receiver in `state` refuses an envelope for (§6.3), or None
    if it opens it. The state is not changed."""
    kind, body = parse_envelope(data)
    if kind != KIND_RATCHET:
        raise Malformed(f"envelope kind {kind} is not a ratchet message")
    hdr = body["header"]
    if hdr["session_id"] != state.session_id:
        return "unknown session"
    k, pn, n = hdr["ratchet_key"], hdr["previous_chain_length"], hdr["message_number"]
    cand = copy.deepcopy(state)
    if (k, n) in cand.skipped:
        mk = cand.skipped.pop((k, n))
    elif k == cand.peer_public:
        if cand.recv_ck is None:
            return "unknown chain"
        if n < cand.recv_n:
            return "duplicate"
        if n - cand.recv_n > MAX_SKIP:
            return "too far ahead"
        skip_keys(cand, n)
        mk, cand.recv_ck = kdf_ck(cand.recv_ck)
    elif k in cand.retired:
        # §6.3 step 3: its unused keys, if any, were in the cache of step 1.
        return "duplicate"
    else:
        if cand.recv_ck is not None and pn > cand.recv_n:
            if pn - cand.recv_n > MAX_SKIP:
                return "too far ahead"
            skip_keys(cand, pn)
        if n > MAX_SKIP:
            return "too far ahead"
        try:
            dh = x25519(cand.own_secret, k)
        except ZeroDH:
            return "invalid ratchet key"
        cand.root, cand.recv_ck = kdf_rk(cand.root, dh)
        cand.recv_n = 0
        cand.peer_public = k
        skip_keys(cand, n)
        mk, cand.recv_ck = kdf_ck(cand.recv_ck)
    key, nonce, hk = ratchet_message_keys(mk)
    expected_tag = header_tag(hk, cand.binding, ratchet_header(hdr["session_id"], k, pn, n))
    if not hmac.compare_digest(expected_tag, body["header_tag"]):
        return "header mismatch"
    if secretbox_open(key, nonce, body["ciphertext"]) is None:
        return "bad MAC"
    return None


def check_ratchet_refusals(c, v, alice):
    """Alice, having received every message, refuses each envelope of
    `refusals` for the reason it names."""
    for i, vector in enumerate(v["refusals"]):
        name = f"ratchet.json refusals[{i}] {vector['name']}"
        check_refused(c, name, vector["refusal"],
                      lambda: ratchet_refusal(alice, h(vector["envelope"])))


def sending_timeline(message_count, delivery_order):
    """Interleave sends and deliveries: messages are sent in index order and
    each is delivered as soon as it and every message listed before it in
    `delivery_order` have been sent. Messages missing from the order are
    delivered last, in index order. Yields ("send"|"deliver", index)."""
    order = list(delivery_order) + [i for i in range(message_count)
                                    if i not in delivery_order]
    pending = 0
    for i in range(message_count):
        yield "send", i
        while pending < len(order) and order[pending] <= i:
            yield "deliver", order[pending]
            pending += 1
    for j in order[pending:]:
        yield "deliver", j


def timeline_events(v, message_count):
    """The order of sends and deliveries: the vector's `timeline` (§9) when
    present, checked against `delivery_order`; otherwise inferred."""
    if "timeline" not in v:
        yield from sending_timeline(message_count, v["delivery_order"])
        return
    events = []
    for entry in v["timeline"]:
        action, index = entry.split()
        events.append((action, int(index)))
    delivered = [i for action, i in events if action == "deliver"]
    if delivered != list(v["delivery_order"]):
        raise ValueError("timeline deliveries disagree with delivery_order")
    yield from events


def check_ratchet(c, v, kx):
    c.equal("ratchet alice_identity_public", h(v["alice_identity_public"]),
            kx["alice_ik"])
    c.equal("ratchet bob_identity_public", h(v["bob_identity_public"]),
            kx["bob_ik"])
    v["note"]  # descriptive text only

    # §5.3: the ephemeral pairs become the first ratchet key pairs.
    e_i, e_r = kx["e_i"], kx["e_r"]
    states = {
        "bob": RatchetState("bob", kx["root_key"], e_r, e_i[1],
                            send_ck=kx["responder_chain_key"], recv_ck=None,
                            session_id=kx["session_id"], bind=kx["binding"]),
        "alice": RatchetState("alice", kx["root_key"], e_i, e_r[1],
                              send_ck=None, recv_ck=kx["responder_chain_key"],
                              session_id=kx["session_id"], bind=kx["binding"]),
    }
    messages = v["messages"]
    chain_starts = {h(m["dh_step"]["sender_ratchet_public"]): m["dh_step"]
                    for m in messages if m["dh_step"] is not None}
    payloads = {}
    for action, i in timeline_events(v, len(messages)):
        m = messages[i]
        if action == "send":
            sender = m["sender"]
            c.true(f"ratchet[{i}] sender/receiver are alice and bob",
                   {sender, m["receiver"]} == {"alice", "bob"},
                   f"{sender} -> {m['receiver']}")
            ratchet_send(c, states[sender], m, f"ratchet[{i}] send")
        else:
            receiver = m["receiver"]
            states[receiver], plaintext = ratchet_receive(
                c, states[receiver], m, f"ratchet[{i}] recv", chain_starts)
            if plaintext is not None:
                payloads[i] = check_parse(
                    c, f"ratchet[{i}] plaintext is a PairwisePayload",
                    plaintext, read_pairwise_payload)

    for i, payload in sorted(payloads.items()):
        if payload is None:
            continue
        if payload["kind"] == PAYLOAD_CHAT:
            c.true(f"ratchet[{i}] message_id has UUID v4 bits",
                   has_uuid_bits(payload["message_id"], 4),
                   payload["message_id"].hex())
            print(f"ratchet[{i}] {messages[i]['sender']}: "
                  f"{payload['content']!r}")
        else:
            print(f"ratchet[{i}] {messages[i]['sender']}: "
                  f"PairwisePayload kind {payload['kind']}")
    c.section("ratchet.json refusals", check_ratchet_refusals, v,
              states["alice"])
    return messages


# ---------------------------------------------------------------------------
# group.json: Sender Keys (§7)
# ---------------------------------------------------------------------------

def check_group(c, v, kx, ratchet_messages):
    bob_id, alice_id = kx["bob_id"], kx["alice_id"]
    group_id = uuid_from_text(v["group_id"])
    c.equal("group group_id round-trips as UUID text", v["group_id"],
            uuid_text(group_id))
    c.true("group group_id has UUID v4 bits", has_uuid_bits(group_id, 4))
    members = [h(x) for x in v["members"]]
    sender = h(v["sender"])
    c.equal("group sender is bob", bob_id, sender)
    c.true("group sender is a member", sender in members)
    c.true("group alice (the receiver) is a member", alice_id in members)

    # §7.4 distribution, carried inside the pairwise session.
    d = v["distribution"]
    payload = h(d["payload"])
    match = re.fullmatch(r"ratchet\.json messages\[(\d+)\]", d["carried_by"])
    if c.true("group distribution names its carrying message",
              match is not None, d["carried_by"]):
        carrier = ratchet_messages[int(match.group(1))]
        c.equal("group distribution payload = carrying ratchet plaintext",
                payload, h(carrier["plaintext"]))
        # "only if it arrived over the pairwise session with the very peer
        # named in sender"
        c.equal("group distribution carried by bob", "bob", carrier["sender"])
    dist = check_parse(c, "group distribution payload decodes", payload,
                       read_pairwise_payload)
    if dist is None:
        return
    # §4.2: a distribution travels inside the tracked wrapper.
    c.equal("group distribution travels tracked", PAYLOAD_TRACKED, dist["kind"])
    if dist["kind"] == PAYLOAD_TRACKED:
        dist = dist["payload"]
    c.equal("group distribution kind", PAYLOAD_SENDER_KEY_DISTRIBUTION,
            dist["kind"])
    c.equal("group distribution .group_id", group_id, dist["group_id"])
    c.equal("group distribution .sender", sender, dist["sender"])
    c.equal("group distribution .key_id", d["key_id"], dist["key_id"])
    c.equal("group distribution .message_number", d["message_number"],
            dist["message_number"])
    c.equal("group distribution .chain_key", h(d["chain_key"]),
            dist["chain_key"])
    c.equal("group distribution .signing_public", h(d["signing_public"]),
            dist["signing_public"])
    c.true("group signing_public is a valid point",
           (p := ed_decode(dist["signing_public"])) is not None
           and not ed_is_small_order(p))

    key_id, spk = dist["key_id"], dist["signing_public"]

    # Sender side: walk the chain from the distributed position.
    ck, n = dist["chain_key"], dist["message_number"]
    messages = v["messages"]
    for i, m in enumerate(messages):
        tag = f"group[{i}] send"
        c.equal(f"{tag} message_number", m["message_number"], n)
        c.equal(f"{tag} chain_key", h(m["chain_key"]), ck)
        mk, next_ck = sender_chain_step(ck)
        c.equal(f"{tag} message_key", h(m["message_key"]), mk)
        c.equal(f"{tag} next_chain_key", h(m["next_chain_key"]), next_ck)
        key, nonce = sender_message_keys(mk)
        c.equal(f"{tag} cipher_key", h(m["cipher_key"]), key)
        c.equal(f"{tag} nonce", h(m["nonce"]), nonce)
        c.equal(f"{tag} ciphertext (sealed from plaintext)",
                h(m["ciphertext"]), secretbox_seal(key, nonce, h(m["plaintext"])))
        transcript = group_transcript(group_id, sender, key_id, n,
                                      h(m["ciphertext"]))
        c.equal(f"{tag} transcript", h(m["transcript"]), transcript)
        reason = ed25519_verify_strict(spk, transcript, h(m["signature"]))
        c.true(f"{tag} signature verifies strictly", reason is None, str(reason))
        check_envelope(c, f"{tag} envelope", h(m["envelope"]), KIND_GROUP, {
            "group_id": group_id, "sender": sender, "key_id": key_id,
            "message_number": n, "ciphertext": h(m["ciphertext"]),
            "signature": h(m["signature"]),
        })
        ck, n = next_ck, n + 1

    # Receiver side (alice): from the envelope bytes only, in delivery order.
    recv = {"ck": dist["chain_key"], "n": dist["message_number"],
            "skipped": {}}
    for i in v["delivery_order"]:
        m = messages[i]
        tag = f"group[{i}] recv"
        try:
            kind, body = parse_envelope(h(m["envelope"]))
        except Malformed as error:
            c.fail(f"{tag} envelope", str(error))
            continue
        if not c.equal(f"{tag} envelope kind", KIND_GROUP, kind):
            continue
        c.equal(f"{tag} group (wrong group)", group_id, body["group_id"])
        c.true(f"{tag} sender is a member", body["sender"] in members)
        c.equal(f"{tag} key_id is held (unknown chain)", key_id, body["key_id"])
        # Verify strictly before any state moves (§7.3).
        transcript = group_transcript(body["group_id"], body["sender"],
                                      body["key_id"], body["message_number"],
                                      body["ciphertext"])
        reason = ed25519_verify_strict(spk, transcript, body["signature"])
        if not c.true(f"{tag} signature verifies strictly", reason is None,
                      str(reason)):
            continue
        n = body["message_number"]
        cand = copy.deepcopy(recv)
        if n in cand["skipped"]:
            mk = cand["skipped"].pop(n)
        else:
            if n < cand["n"] or n - cand["n"] > MAX_SKIP:
                c.fail(tag, "duplicate or too far ahead")
                continue
            while cand["n"] < n:
                cand["skipped"][cand["n"]], cand["ck"] = sender_chain_step(cand["ck"])
                cand["n"] += 1
            mk, cand["ck"] = sender_chain_step(cand["ck"])
            cand["n"] += 1
        c.equal(f"{tag} receiver message_key", h(m["message_key"]), mk)
        key, nonce = sender_message_keys(mk)
        c.equal(f"{tag} receiver cipher_key", h(m["cipher_key"]), key)
        c.equal(f"{tag} receiver nonce", h(m["nonce"]), nonce)
        plaintext = secretbox_open(key, nonce, body["ciphertext"])
        if not c.true(f"{tag} secretbox opens", plaintext is not None, "bad MAC"):
            continue
        recv = cand  # commit only after everything succeeded
        c.equal(f"{tag} plaintext", h(m["plaintext"]), plaintext)
        content = check_parse(c, f"{tag} plaintext is a ChatContent",
                              plaintext, read_chat_content)
        if content is not None:
            c.true(f"{tag} message_id has UUID v4 bits",
                   has_uuid_bits(content["message_id"], 4))
            print(f"group[{i}] content: {content['content']!r}")
    c.equal("group every message delivered once",
            sorted(range(len(messages))), sorted(v["delivery_order"]))
    held = {"group_id": group_id, "members": members, "sender": sender,
            "key_id": key_id, "signing_public": spk, "recv": recv}
    c.section("group.json refusals", check_group_refusals, v, held)


def group_refusal(held, data):
    """What a receiver holding one sender key (`held`) refuses a group
    envelope for (§7.3), or None if it opens it. Nothing is changed."""
    kind, body = parse_envelope(data)
    if kind != KIND_GROUP:
        raise Malformed(f"envelope kind {kind} is not a group message")
    if body["group_id"] != held["group_id"]:
        return "wrong group"
    if body["sender"] not in held["members"]:
        return "not a member"
    if (body["sender"], body["key_id"]) != (held["sender"], held["key_id"]):
        return "unknown chain"
    transcript = group_transcript(body["group_id"], body["sender"],
                                  body["key_id"], body["message_number"],
                                  body["ciphertext"])
    if ed25519_verify_strict(held["signing_public"], transcript, body["signature"]):
        return "bad signature"
    n, recv = body["message_number"], held["recv"]
    if n in recv["skipped"]:
        mk = recv["skipped"][n]
    else:
        if n < recv["n"]:
            return "duplicate"
        if n - recv["n"] > MAX_SKIP:
            return "too far ahead"
        ck = recv["ck"]
        for _ in range(n - recv["n"]):
            _, ck = sender_chain_step(ck)
        mk, _ = sender_chain_step(ck)
    key, nonce = sender_message_keys(mk)
    if secretbox_open(key, nonce, body["ciphertext"]) is None:
        return "bad MAC"
    return None


def distribution_refusal(held, channel_peer, data):
    """What a member holding one sender key (`held`) refuses a tracked
    distribution for (§7.4), or None if it takes (or ignores) it."""
    payload = parse_exact(data, read_pairwise_payload)
    if payload["kind"] == PAYLOAD_TRACKED:
        payload = payload["payload"]
    if payload["kind"] != PAYLOAD_SENDER_KEY_DISTRIBUTION:
        raise Malformed(f"payload kind {payload['kind']} is not a distribution")
    if payload["group_id"] != held["group_id"]:
        return "wrong group"
    if payload["sender"] != channel_peer:
        return "forwarded key"
    if payload["sender"] not in held["members"]:
        return "not a member"
    if (payload["sender"], payload["key_id"]) == (held["sender"], held["key_id"]):
        return None if payload["signing_public"] == held["signing_public"] else "conflicting key"
    point = ed_decode(payload["signing_public"])
    if point is None or ed_is_small_order(point):
        return "invalid signing key"
    return None


def check_group_refusals(c, v, held):
    for i, vector in enumerate(v["distribution_refusals"]):
        name = f"group.json distribution_refusals[{i}] {vector['name']}"
        check_refused(c, name, vector["refusal"], lambda: distribution_refusal(
            held, bytes.fromhex(vector["from"]), h(vector["payload"])))
    for i, vector in enumerate(v["refusals"]):
        name = f"group.json refusals[{i}] {vector['name']}"
        check_refused(c, name, vector["refusal"],
                      lambda: group_refusal(held, h(vector["envelope"])))


# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# relay.json (§7a): relay frames
# ---------------------------------------------------------------------------

# Kinds 0 to 14 exist (§7a); a higher one is refused by every reader.
RELAY_FRAME_KINDS = 15
MAX_FRAME_LEN = 263_168

REFUSALS = ["Quota", "Rate", "TooLarge", "RecipientOffline", "NotRegistered",
            "UnknownRecipient"]
PUBLISH_REFUSALS = ["NotRegistered", "Rate", "OtherPeer", "LifetimeTooLong",
                    "Invalid", "Stale", "Full", "TooManyFromAddress"]
PEER_RECORD_LABEL = b"p2pchat/v1/peer-record"


def read_option(r, read_one):
    """option<T>: byte 0 for none, 1 then the value."""
    tag = r.u8()
    if tag == 0:
        return None
    if tag == 1:
        return read_one()
    raise Malformed(f"option tag {tag}")


def read_bool(r):
    byte = r.u8()
    if byte not in (0, 1):
        raise Malformed(f"bool byte {byte}")
    return byte == 1


def read_refusal(r):
    kind = r.u32()
    if kind >= len(REFUSALS):
        raise Malformed(f"unknown refusal {kind}")
    return REFUSALS[kind]


def read_publish_refusal(r):
    kind = r.u32()
    if kind >= len(PUBLISH_REFUSALS):
        raise Malformed(f"unknown publish refusal {kind}")
    return PUBLISH_REFUSALS[kind]


def read_peer_record(r):
    """PeerRecord (§7a), with bytes as hex as the vectors write them."""
    return {"peer_id": r.fixed(20).hex(), "identity_key": r.fixed(32).hex(),
            "direct_addresses": r.list_of(r.string),
            "relay_addresses": r.list_of(r.string),
            "timestamp": r.u64(), "expires_at": r.u64(),
            "sequence": r.u64(), "signature": r.fixed(64).hex()}


# The frame kinds this checker reads, by number, with their fields in order
# as §7a lists them. Values come back as the vectors write them: bytes as
# hex, none as None.
RELAY_FRAMES = {
    0: ("Register", []),
    1: ("Registered", []),
    2: ("Publish", [("record", read_peer_record)]),
    3: ("Lookup", [("peer", lambda r: r.fixed(20).hex())]),
    4: ("LookupResult", [("peer", lambda r: r.fixed(20).hex()),
                         ("record",
                          lambda r: read_option(r, lambda: read_peer_record(r)))]),
    5: ("Forward", [("to", lambda r: r.fixed(20).hex()), ("id", Reader.u64),
                    ("mailbox_allowed", read_bool),
                    ("envelope", lambda r: r.byte_string().hex())]),
    6: ("Forwarded", [("id", Reader.u64)]),
    7: ("Held", [("id", Reader.u64)]),
    8: ("Refused", [("id", Reader.u64), ("reason", read_refusal)]),
    9: ("Deliver", [("from", lambda r: r.fixed(20).hex()),
                    ("mailbox_id", lambda r: read_option(r, r.u64)),
                    ("envelope", lambda r: r.byte_string().hex())]),
    10: ("FetchMailbox", []),
    11: ("MailboxAck", [("ids", lambda r: r.list_of(r.u64))]),
    12: ("Published", [("sequence", Reader.u64)]),
    13: ("PublishRefused", [("sequence", Reader.u64),
                            ("reason", read_publish_refusal)]),
    14: ("Observed", [("address", Reader.string)]),
}


def read_relay_frame(r):
    if not r.data:
        raise Empty("empty frame")
    if len(r.data) > MAX_FRAME_LEN:
        raise TooLarge("frame over the 263,168-byte limit")
    if r.u8() != VERSION[0]:
        raise UnsupportedVersion("not version 1")
    kind = r.u32()
    if kind >= RELAY_FRAME_KINDS:
        raise UnknownKind(f"unknown relay frame kind {kind}")
    if kind not in RELAY_FRAMES:
        raise NotImplementedError(f"relay frame kind {kind} is not read by this checker")
    name, fields = RELAY_FRAMES[kind]
    frame = {"kind": name}
    for field, read in fields:
        frame[field] = read(r)
    return frame


def check_peer_record(c, v):
    """The signed record: its key is the seed's, hashes to its peer ID, and
    signs the transcript of §7a (the record with a zeroed signature)."""
    name = "relay.json peer_record"
    seed = h(v["identity_seed"])
    record = check_parse(c, f"{name} decodes exactly", h(v["encoding"]),
                         read_peer_record)
    if record is None:
        return
    equal_fields(c, f"{name} .record", v["record"], record)
    key = h(record["identity_key"])
    c.equal(f"{name} key is the seed's", ed25519_public(seed), key)
    c.equal(f"{name} key hashes to peer_id", peer_id(key),
            h(record["peer_id"]))
    encoding = h(v["encoding"])
    transcript = PEER_RECORD_LABEL + VERSION + encoding[:-64] + bytes(64)
    c.equal(f"{name} transcript", h(v["transcript"]), transcript)
    signature = h(record["signature"])
    c.equal(f"{name} signature", ed25519_sign(seed, transcript), signature)
    reason = ed25519_verify_strict(key, transcript, signature)
    c.true(f"{name} signature verifies strictly", reason is None, reason)


MAX_ADDRESSES, MAX_ADDRESS_LEN = 16, 256


def record_refusal(encoding, now, known_sequence):
    """What a reader refuses a peer record for (§7a), or None if it takes
    it: sizes, the key against the peer ID, the key itself, the strict
    signature, the expiry, the sequence against one held."""
    record = parse_exact(encoding, read_peer_record)
    for kind in ("direct_addresses", "relay_addresses"):
        addresses = record[kind]
        if len(addresses) > MAX_ADDRESSES or any(
                len(a.encode()) > MAX_ADDRESS_LEN for a in addresses):
            return "too large"
    key = h(record["identity_key"])
    if peer_id(key) != h(record["peer_id"]):
        return "identity mismatch"
    point = ed_decode(key)
    if point is None or ed_is_small_order(point):
        return "invalid key"
    transcript = PEER_RECORD_LABEL + VERSION + encoding[:-64] + bytes(64)
    if ed25519_verify_strict(key, transcript, h(record["signature"])):
        return "bad signature"
    if record["expires_at"] <= now:
        return "expired"
    if known_sequence is not None and record["sequence"] <= known_sequence:
        return "stale"
    return None


def check_record_refusals(c, refusals):
    for i, vector in enumerate(refusals):
        name = f"relay.json record_refusals[{i}] {vector['name']}"
        check_refused(c, name, vector["refusal"], lambda: record_refusal(
            h(vector["record"]), vector["now"], vector["known_sequence"]))


def check_relay(c, v):
    c.section("relay.json peer_record", check_peer_record, v["peer_record"])
    c.section("relay.json record_refusals", check_record_refusals,
              v["record_refusals"])
    c.equal("relay.json covers every frame kind",
            sorted(name for name, _ in RELAY_FRAMES.values()),
            sorted({vector["kind"] for vector in v["frames"]}))
    for i, vector in enumerate(v["frames"]):
        name = f"relay.json frames[{i}] {vector['kind']}"
        frame = check_parse(c, f"{name} decodes exactly",
                            h(vector["encoding"]), read_relay_frame)
        if frame is None:
            continue
        for field, value in frame.items():
            equal_fields(c, f"{name} .{field}", vector[field], value)
        # Every field the vector names was decoded from the bytes.
        c.equal(f"{name} fields", sorted(set(dict.keys(vector)) - {"encoding"}),
                sorted(frame))


def check_payloads(c, v):
    """Every pairwise payload kind and group control kind decodes from its
    encoding to exactly the fields the vector names (§4.2)."""
    seen = set()
    for i, vector in enumerate(v["payloads"]):
        name = f"payloads.json payloads[{i}] {vector['kind']}"
        payload = check_parse(c, f"{name} decodes exactly",
                              h(vector["encoding"]), read_pairwise_payload)
        if payload is None:
            continue
        expected = {k: vector[k] for k in dict.keys(vector) if k != "encoding"}
        equal_fields(c, name, expected, payload_as_vector(payload))
        seen.add(PAYLOAD_NAMES[payload["kind"]])
        if payload["kind"] == PAYLOAD_GROUP_CONTROL:
            seen.add("GroupControl." + payload["control"]["kind"])
    every = set(PAYLOAD_NAMES) | {"GroupControl." + k for k in
                                  ("Invite", "MemberAdded", "Leave",
                                   "MemberLeft")}
    c.equal("payloads.json covers every kind", sorted(every), sorted(seen))


def check_refusals(c, file, refusals, decoders):
    """Each refusal (§8): the input is refused, for the reason named."""
    for i, vector in enumerate(refusals):
        name = f"{file} refusals[{i}] {vector['name']}"
        read = decoders[vector["decode_as"]]
        data = h(vector["input"])
        if "pad_to" in vector:
            data = data + bytes(vector["pad_to"] - len(data))
        def decide():
            if read is None:
                parse_envelope(data)
            else:
                parse_exact(data, read)
            return None  # decoded: the check fails, as it must be refused

        check_refused(c, name, vector["refusal"], decide)


def main(argv):
    directory = argv[1] if len(argv) > 1 else os.path.dirname(
        os.path.abspath(__file__))
    c = Checker()
    docs = {}
    for name in ("kdf.json", "key_exchange.json", "ratchet.json", "group.json",
                 "relay.json", "payloads.json"):
        try:
            docs[name] = load_json(directory, name)
        except (OSError, ValueError) as error:
            c.fail(f"load {name}", str(error))

    if "kdf.json" in docs:
        c.section("kdf.json", check_kdf, docs["kdf.json"])
    kx = None
    if "key_exchange.json" in docs:
        kx = c.section("key_exchange.json", check_key_exchange,
                       docs["key_exchange.json"])
        c.section("key_exchange.json refusals", check_kx_refusals,
                  docs["key_exchange.json"])
    ratchet_messages = None
    if kx is not None and "ratchet.json" in docs:
        c.equal("ratchet.json names key_exchange.json", "key_exchange.json",
                docs["ratchet.json"]["key_exchange"])
        ratchet_messages = c.section("ratchet.json", check_ratchet,
                                     docs["ratchet.json"], kx)
    if ratchet_messages is not None and "group.json" in docs:
        c.section("group.json", check_group, docs["group.json"], kx,
                  ratchet_messages)
    if "relay.json" in docs:
        c.section("relay.json", check_relay, docs["relay.json"])
    if "payloads.json" in docs:
        c.section("payloads.json", check_payloads, docs["payloads.json"])
    decoders = {"PairwisePayload": read_pairwise_payload,
                "RelayFrame": read_relay_frame, "Envelope": None}
    for name in ("payloads.json", "relay.json"):
        if name in docs:
            c.section(f"{name} refusals", check_refusals, name,
                      docs[name]["refusals"], decoders)

    # Coverage: a vector field nobody looked at was not checked.
    for name, doc in docs.items():
        for path in unread_fields(doc, name):
            print(f"note: vector field not examined: {path}")

    print(f"vectors: {c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
