"""AWS Signature Version 4, just what signing a Bedrock request needs, and `AWSSigV4`,
the BackendAuth that applies it.

Written here rather than taken from botocore: botocore costs ~300 ms to import and tens of
MB per worker, for a few HMACs. Only header-based signing is implemented (no presigned
URLs, no chunked payloads); the tests check it against AWS's published examples and
against botocore's SigV4Auth on random requests.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from llmux_extproc.errors import GatewayError
from llmux_extproc.providers.auth import BackendAuth, litellm_param

if TYPE_CHECKING:
    from llmux_extproc.control.config import Deployment
    from llmux_extproc.providers.base import UpstreamRequest

ALGORITHM = "AWS4-HMAC-SHA256"
# RFC 3986 unreserved characters: the only ones SigV4 leaves unencoded.
_UNRESERVED = "-_.~"


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def encode_segment(segment: str) -> str:
    """One path segment as it is sent: ':' and '/' in Bedrock model ids become %3A, %2F."""
    return quote(segment, safe=_UNRESERVED)


def canonical_path(path: str) -> str:
    """The sent (already encoded) path, encoded once more: every AWS service but S3 signs
    the path double-encoded, so `/model/a%3A0` is signed as `/model/a%253A0`."""
    return quote(path or "/", safe="/~")


def canonical_query(query: str) -> str:
    """Pairs decoded then re-encoded strictly and sorted, so equivalent spellings agree."""
    if not query:
        return ""
    pairs = []
    for item in query.split("&"):
        key, _, value = item.partition("=")
        pairs.append(
            (quote(unquote(key), safe=_UNRESERVED), quote(unquote(value), safe=_UNRESERVED))
        )
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def _trim(value: str) -> str:
    # SigV4's Trimall: strip, and runs of spaces become one.
    return " ".join(value.split())


def canonical_request(
    method: str, path: str, query: str, headers: Mapping[str, str], payload_hash: str
) -> tuple[str, str]:
    """The canonical request and its signed-headers list; `headers` are all signed."""
    lowered = sorted((name.lower(), _trim(value)) for name, value in headers.items())
    signed = ";".join(name for name, _ in lowered)
    lines = "".join(f"{name}:{value}\n" for name, value in lowered)
    text = "\n".join(
        (method.upper(), canonical_path(path), canonical_query(query), lines, signed, payload_hash)
    )
    return text, signed


@lru_cache(maxsize=32)
def _signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    # Depends on the day only: cached so a busy worker derives it once a day per key.
    key = _hmac(f"AWS4{secret_key}".encode(), date)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return key


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sign(
    *,
    method: str,
    host: str,
    path: str,
    body: bytes,
    credentials: Credentials,
    region: str,
    service: str,
    query: str = "",
    headers: Mapping[str, str] | None = None,
    now: datetime | None = None,
    content_sha256: bool = False,
) -> dict[str, str]:
    """The headers to add to the request: x-amz-date, x-amz-security-token, authorization.

    `path` and `query` are exactly as sent (already percent-encoded); `headers` are extra
    headers to sign (such as content-type), sent unchanged by the caller; `body` is the final
    body. `host` must equal the Host/:authority the upstream sees.
    """
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    payload_hash = hashlib.sha256(body).hexdigest()
    added = {"x-amz-date": amz_date}
    if credentials.session_token:
        added["x-amz-security-token"] = credentials.session_token
    if content_sha256:
        added["x-amz-content-sha256"] = payload_hash
    to_sign = {**(headers or {}), "host": host, **added}
    request_text, signed = canonical_request(method, path, query, to_sign, payload_hash)
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        (ALGORITHM, amz_date, scope, hashlib.sha256(request_text.encode()).hexdigest())
    )
    key = _signing_key(credentials.secret_key, amz_date[:8], region, service)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    added["authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    return added


# -- where credentials and region come from ---------------------------------------------


# litellm_params strings, `os.environ/NAME` read from the environment as LiteLLM does.
_param = litellm_param


def credentials_for(params: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Credentials:
    """litellm_params first, then the standard AWS variables; 401 when neither has a pair."""
    env = os.environ if env is None else env
    access = _param(params, "aws_access_key_id", env)
    secret = _param(params, "aws_secret_access_key", env)
    token = _param(params, "aws_session_token", env)
    if not (access and secret):
        # Mixing a key id from the config with a secret from the environment would sign
        # with a mismatched pair: the environment is used only as a whole.
        access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        token = env.get("AWS_SESSION_TOKEN") or None
    if not (access and secret):
        raise GatewayError(
            401,
            "No AWS credentials for this Bedrock deployment: set litellm_params "
            "aws_access_key_id and aws_secret_access_key, or the AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY environment variables.",
            code="missing_credentials",
        )
    return Credentials(access, secret, token)


def region_for(params: Mapping[str, Any], host: str, env: Mapping[str, str] | None = None) -> str:
    """aws_region_name, the AWS variables, else the region in a bedrock-runtime host name."""
    env = os.environ if env is None else env
    region = (
        _param(params, "aws_region_name", env)
        or env.get("AWS_REGION")
        or env.get("AWS_DEFAULT_REGION")
        or env.get("AWS_REGION_NAME")
    )
    if region:
        return region
    labels = host.split(".")
    if len(labels) >= 4 and labels[0].startswith("bedrock") and "amazonaws" in labels[2:]:
        return labels[1]
    raise GatewayError(
        500,
        f"Cannot tell the AWS region of Bedrock host {host!r}: set litellm_params.aws_region_name.",
        code="missing_region",
    )


# -- as a provider's BackendAuth -----------------------------------------------------------


class AWSSigV4(BackendAuth):
    """SigV4 over the final path, body and host; a provider API key (Bedrock's) is sent as
    a bearer token instead, unsigned."""

    headers = frozenset(
        {"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"}
    )
    # Signed along with host and the x-amz-* headers; others (accept) may change en route.
    signed_headers = ("content-type",)

    def __init__(self, service: str) -> None:
        self.service = service

    def apply(self, dep: Deployment, request: UpstreamRequest) -> None:
        if dep.api_key:
            request.headers["authorization"] = f"Bearer {dep.api_key}"
            return
        assert dep.upstream is not None
        if request.body is None:
            # The signature covers the body, and a forwarded client body is not seen here.
            raise GatewayError(500, "SigV4 signing needs the translated request body")
        path, _, query = request.path.partition("?")
        request.headers.update(
            sign(
                method="POST",
                host=dep.upstream.authority,
                path=path,
                query=query,
                body=request.body,
                headers={
                    k: request.headers[k] for k in self.signed_headers if k in request.headers
                },
                credentials=credentials_for(dep.params),
                region=region_for(dep.params, dep.upstream.host),
                service=self.service,
            )
        )
