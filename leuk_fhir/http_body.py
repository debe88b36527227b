"""Reading an HTTP answer whole, but never more than a bound (EHR answers, DICOMweb answers).

A peer that misbehaves (an endless body, a compression bomb) must cost at most the bound.
The body is counted as decoded, so a gzip-encoded answer is bounded by what it inflates to.
"""

from __future__ import annotations

import requests

#: Bytes read at a time.
CHUNK = 64 * 1024


class BodyTooLargeError(Exception):
    """The answer went past the bound; what was read of it is dropped."""


def read_body(response: requests.Response, max_bytes: int) -> bytes:
    """The decoded body of a ``stream=True`` ``response``, at most ``max_bytes``.

    Raises :class:`BodyTooLargeError` beyond it; errors of the connection or of decoding come
    as ``requests`` raises them (``ConnectionError``, ``ChunkedEncodingError``, ...).
    """
    body = bytearray()
    for chunk in response.iter_content(CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise BodyTooLargeError(f"the answer exceeds {max_bytes} bytes")
    return bytes(body)
