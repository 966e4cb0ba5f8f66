"""HTTP/1 request framing, read off a connection's raw bytes before the HTTP layer.

hypercorn's HTTP/1 parser (h11) keeps no HTTP/1.0 connection alive and treats any
byte after a request that ends its connection as an error: a client pipelining two
HTTP/1.0 requests got one bare 400 and no answer to the first, valid one. And it
honours any chunk size up to 20 hex digits, so a chunk announcing more than the body
limit held its request until the body timeout. :class:`RequestFraming` follows the
framing of each request on a connection, as h11 does, and says how much of what
arrived the HTTP layer may see:

* after a request that ends its connection (HTTP/1.0, ``Connection: close``, or
  both ``Content-Length`` and ``Transfer-Encoding``, which RFC 9112 §6.3 says
  must close it), nothing: that request is answered and the connection closed;
* from a chunk whose announced size would take the body past its limit, nothing,
  and :attr:`refusal` says so (the listener fails that request's body with it).

It never changes a byte. Where it cannot follow the framing exactly as h11 would
(an upgrade, HTTP/2, a version or header h11 refuses anyway, an obsolete line fold),
it passes everything on from there and stops looking: h11 then behaves as before.
Pure: bytes in, a count out; no I/O, no clock.
"""

from __future__ import annotations

import enum
import re

import attrs

from coordinator import errors

# h11 0.16's framing rules, mirrored: a head (or a trailer section) ends at the first
# "\n\n" or "\n\r\n", or at once when it starts with an empty line; a chunk-size line
# ends at "\r\n"; chunk data is followed by exactly "\r\n".
_BLANK_LINE = re.compile(rb"\n\r?\n")
_CHUNK_HEADER = re.compile(rb"(?P<size>[0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*\r\n", re.DOTALL)
_VERSION = re.compile(rb"HTTP/(?P<version>[0-9]\.[0-9])")
_DIGITS = re.compile(rb"[0-9]{1,20}")
# A head or line longer than this is past h11's own limit (16 KiB): it refuses it.
MAX_LINE_BYTES = 64 * 1024


class Stage(enum.Enum):
    HEAD = "head"
    LENGTH = "length"  # in a Content-Length body
    CHUNK_SIZE = "chunk size"
    CHUNK_DATA = "chunk data"
    CHUNK_END = "chunk end"  # the CRLF after a chunk's data
    TRAILER = "trailer"
    ENDED = "ended"  # after a request that ends the connection: nothing more
    REFUSED = "refused"  # a chunk announced more than the body may hold: nothing more
    PASS = "pass"  # framing not followed any more (upgrade, HTTP/2, odd input)


@attrs.define
class RequestFraming:
    """The framing of the requests on one HTTP/1 connection, as h11 reads them."""

    body_limit: int
    stage: Stage = Stage.HEAD
    requests: int = 0  # request heads read so far
    refusal: errors.ApiError | None = None  # why the body of request ``requests`` stops
    _pending: bytearray = attrs.field(factory=bytearray)  # a head or line not yet whole
    _remaining: int = 0  # bytes left in the body (LENGTH) or the chunk (CHUNK_DATA)
    _body: int = 0  # chunked body bytes announced so far
    _last: bool = False  # the current request ends the connection

    def feed(self, data: bytes | bytearray) -> int:
        """How many leading bytes of ``data`` the HTTP layer may have (the rest is dropped)."""
        at = 0
        while at < len(data):
            stage = self.stage
            if stage is Stage.PASS:
                return len(data)
            if stage is Stage.ENDED or stage is Stage.REFUSED:
                return at
            if stage is Stage.LENGTH or stage is Stage.CHUNK_DATA:
                step = min(self._remaining, len(data) - at)
                self._remaining -= step
                at += step
                if not self._remaining:
                    if stage is Stage.LENGTH:
                        self._message_end()
                    else:
                        self.stage = Stage.CHUNK_END
            elif stage is Stage.CHUNK_END:
                at = self._chunk_end(data, at)
            else:
                at = self._line(data, at)
        if self.stage is Stage.LENGTH and not self._remaining:
            self._message_end()  # a head announcing an empty body ends its message at once
        return at

    def _line(self, data: bytes | bytearray, at: int) -> int:
        """Take bytes into a head, a chunk-size line or a trailer until it is whole."""
        end = self._end_of(data, at)
        if end is None:
            self._pending += data[at:]
            if len(self._pending) > MAX_LINE_BYTES:
                self._pass()
            return len(data)
        self._pending += data[at:end]
        whole = bytes(self._pending)
        del self._pending[:]
        stage = self.stage
        if stage is Stage.HEAD:
            self._head(whole)
        elif stage is Stage.CHUNK_SIZE:
            self._chunk_size(whole)
            if self.stage is Stage.REFUSED:
                return at  # h11 never sees this line whole, so never acts on it
        else:
            self._message_end()
        return end

    def _end_of(self, data: bytes | bytearray, at: int) -> int | None:
        """Where in ``data`` the line (chunk size) or section (head, trailer) begun in
        :attr:`_pending` ends; None if not in ``data``. Searches ``data`` in place: a
        body of many tiny chunks costs a pass over its bytes, not a copy per chunk."""
        tail = bytes(self._pending[-2:])
        if self.stage is Stage.CHUNK_SIZE:
            if tail.endswith(b"\r") and data[at:at + 1] == b"\n":
                return at + 1
            found = data.find(b"\r\n", at)
            return None if found < 0 else found + 2
        if not self._pending:  # h11 takes an empty first line as the whole section
            if data[at:at + 1] == b"\n":
                return at + 1
            if data[at:at + 2] == b"\r\n":
                return at + 2
        elif self._pending == b"\r" and data[at:at + 1] == b"\n":
            return at + 1
        if tail.endswith(b"\n") and data[at:at + 1] == b"\n":
            return at + 1
        if tail.endswith(b"\n") and data[at:at + 2] == b"\r\n":
            return at + 2
        if tail == b"\n\r" and data[at:at + 1] == b"\n":
            return at + 1
        match = _BLANK_LINE.search(data, at)
        return None if match is None else match.end()

    def _head(self, head: bytes) -> None:
        parsed = _parse_head(head)
        if parsed is None:
            self._pass()
            return
        version, headers = parsed
        self.requests += 1
        lengths = [v for n, v in headers if n == b"content-length"]
        codings = [v for n, v in headers if n == b"transfer-encoding"]
        tokens = {t.strip().lower() for n, v in headers if n == b"connection"
                  for t in v.split(b",")}
        if any(n == b"upgrade" for n, _ in headers) or len(codings) > 1:
            self._pass()  # the upgrade is hypercorn's; a repeated coding h11 refuses
            return
        self._last = version == b"1.0" or b"close" in tokens or bool(lengths and codings)
        if codings:
            if codings[0].lower() != b"chunked":
                self._pass()
                return
            self._body = 0
            self.stage = Stage.CHUNK_SIZE
            return
        length = _content_length(lengths)
        if length is None:
            self._pass()
            return
        self._remaining = length
        self.stage = Stage.LENGTH  # an empty body ends at once (feed)

    def _chunk_size(self, line: bytes) -> None:
        match = _CHUNK_HEADER.fullmatch(line)
        if match is None:
            self._pass()
            return
        size = int(match["size"], 16)
        if self._body + size > self.body_limit:
            self.stage = Stage.REFUSED
            self.refusal = errors.too_large(self.body_limit)
            return
        self._body += size
        if size:
            self._remaining = size
            self.stage = Stage.CHUNK_DATA
        else:
            self.stage = Stage.TRAILER

    def _chunk_end(self, data: bytes | bytearray, at: int) -> int:
        taken = data[at:at + 2 - len(self._pending)]
        self._pending += taken
        if not b"\r\n".startswith(self._pending):
            self._pass()  # h11 refuses it
        elif len(self._pending) == 2:
            del self._pending[:]
            self.stage = Stage.CHUNK_SIZE
        return at + len(taken)

    def _message_end(self) -> None:
        self.stage = Stage.ENDED if self._last else Stage.HEAD

    def _pass(self) -> None:
        self.stage = Stage.PASS
        del self._pending[:]


def _parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """The version and headers (names lower-cased) of a request head h11 would read
    the same way; None for anything else."""
    lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        return None
    request_line = lines[0].split(b" ")
    version = _VERSION.fullmatch(request_line[-1]) if len(request_line) == 3 else None
    if version is None or version["version"] not in (b"1.0", b"1.1"):
        return None
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or line[:1] in (b" ", b"\t") or name != name.strip():
            return None  # h11 refuses it, or folds it (obsolete): not ours to follow
        headers.append((name.lower(), value.strip(b" \t")))
    return version["version"], headers


def _content_length(values: list[bytes]) -> int | None:
    """The body length h11 reads from these Content-Length values; None where it refuses."""
    lengths = {part.strip() for value in values for part in value.split(b",")}
    if not lengths:
        return 0
    if len(lengths) != 1:
        return None
    length = lengths.pop()
    return int(length) if _DIGITS.fullmatch(length) else None
