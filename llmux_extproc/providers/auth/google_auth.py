"""Google OAuth access tokens for Vertex AI: fetched asynchronously, cached, shared.
`GoogleOAuth` is the BackendAuth that adds them to a translated request.

Vertex takes `Authorization: Bearer <access token>`. A token comes from one of, in the
order Google's own libraries look for them: `litellm_params.vertex_credentials` (a key's
JSON text, a path to it, or `os.environ/NAME` holding either), the file named by
GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default credentials file, or the
metadata server of the Google Cloud machine LLMux runs on. A service-account key is
exchanged by signing a JWT assertion (RS256) and posting it to the key's `token_uri`.

Adapters are pure, so tokens are fetched in `prepare` (awaited by the gateway before
`request`) and read from the cache by `request`. A token is refreshed five minutes
before it expires; requests arriving while a fetch runs wait for that one fetch.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from llmux_extproc.errors import GatewayError
from llmux_extproc.providers.auth import BackendAuth

if TYPE_CHECKING:
    from llmux_extproc.control.config import Deployment
    from llmux_extproc.providers.base import UpstreamRequest

log = logging.getLogger("llmux.google_auth")

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME_S = 3600
REFRESH_MARGIN_S = 300.0
# After a failed fetch, requests get the same error for this long instead of each one
# hitting the token endpoint again.
FAILURE_BACKOFF_S = 5.0
HTTP_TIMEOUT_S = 10.0
METADATA_TIMEOUT_S = 3.0

# Where the credentials come from: ("json", text) | ("file", path) | ("env", missing name)
# | ("adc", ""). It keys every cache, so deployments sharing credentials share a token.
Source = tuple[str, str]


class CredentialsError(Exception):
    """Credentials are missing or malformed: a configuration problem, answered 401."""


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str
    expires_at: float  # time.monotonic() seconds
    refresh_at: float


class Credentials(Protocol):
    project_id: str | None
    extra_headers: dict[str, str]

    @property
    def label(self) -> str:
        """Names the identity in messages, never the secret."""
        ...

    async def fetch(self, http: httpx.AsyncClient) -> tuple[str, float]:
        """(access token, lifetime in seconds)."""
        ...


@dataclass(slots=True)
class ServiceAccount:
    client_email: str
    private_key: rsa.RSAPrivateKey
    private_key_id: str | None
    token_uri: str
    project_id: str | None
    extra_headers: dict[str, str]

    @property
    def label(self) -> str:
        return f"service account {self.client_email}"

    def assertion(self, now: int) -> str:
        header: dict[str, Any] = {"alg": "RS256", "typ": "JWT"}
        if self.private_key_id:
            header["kid"] = self.private_key_id
        claims = {
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
        }
        signing_input = f"{_b64url(orjson.dumps(header))}.{_b64url(orjson.dumps(claims))}"
        signature = self.private_key.sign(
            signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{signing_input}.{_b64url(signature)}"

    async def fetch(self, http: httpx.AsyncClient) -> tuple[str, float]:
        form = {"grant_type": JWT_BEARER, "assertion": self.assertion(int(time.time()))}
        return await _token_request(http, self.token_uri, form, self.label)


@dataclass(slots=True)
class AuthorizedUser:
    """gcloud's `application-default login` credentials: a user's refresh token."""

    client_id: str
    client_secret: str
    refresh_token: str
    token_uri: str
    project_id: str | None
    extra_headers: dict[str, str]

    @property
    def label(self) -> str:
        return "gcloud application-default user credentials"

    async def fetch(self, http: httpx.AsyncClient) -> tuple[str, float]:
        form = {
            "grant_type": "refresh_token",
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "refresh_token": self.refresh_token,
        }
        return await _token_request(http, self.token_uri, form, self.label)


@dataclass(slots=True)
class MetadataServer:
    """The attached service account of a Google Cloud VM, GKE pod or Cloud Run service."""

    host: str
    project_id: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"the metadata server at {self.host}"

    async def fetch(self, http: httpx.AsyncClient) -> tuple[str, float]:
        base = f"http://{self.host}/computeMetadata/v1"
        headers = {"metadata-flavor": "Google"}
        try:
            resp = await http.get(
                f"{base}/instance/service-accounts/default/token",
                headers=headers,
                timeout=METADATA_TIMEOUT_S,
            )
            if self.project_id is None and resp.status_code == 200:
                project = await http.get(
                    f"{base}/project/project-id", headers=headers, timeout=METADATA_TIMEOUT_S
                )
                if project.status_code == 200 and project.text.strip():
                    self.project_id = project.text.strip()
        except httpx.HTTPError as exc:
            raise CredentialsError(
                "no credentials are configured (set litellm_params.vertex_credentials or "
                "GOOGLE_APPLICATION_CREDENTIALS) and no Google Cloud metadata server answered"
            ) from exc
        return _read_token_response(resp, self.label)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def _token_request(
    http: httpx.AsyncClient, uri: str, form: dict[str, str], label: str
) -> tuple[str, float]:
    try:
        resp = await http.post(uri, data=form, headers={"accept": "application/json"})
    except httpx.HTTPError as exc:
        log.warning("Google token endpoint %s unreachable: %r", uri, exc)
        raise GatewayError(
            503,
            f"Vertex AI authentication failed: the Google token endpoint is unreachable ({label}).",
        ) from exc
    return _read_token_response(resp, label)


def _read_token_response(resp: httpx.Response, label: str) -> tuple[str, float]:
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code == 200 and isinstance(data, dict):
        token = data.get("access_token")
        lifetime = data.get("expires_in", 3600)
        if isinstance(token, str) and token and isinstance(lifetime, int | float):
            return token, float(lifetime)
    reason = _oauth_error(data) or f"HTTP {resp.status_code}"
    log.warning("Google token request for %s failed: %s", label, reason)
    # 4xx: the credentials were refused (revoked key, wrong clock, bad JWT); 5xx: Google's.
    status = 401 if 400 <= resp.status_code < 500 else 503
    raise GatewayError(
        status, f"Vertex AI authentication failed: Google refused a token for {label}: {reason}"
    )


def _oauth_error(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    error: Any = data.get("error")
    description: Any = data.get("error_description")
    if isinstance(error, dict):  # the metadata server and some proxies use Google's shape
        description = error.get("message")
        error = error.get("status")
    parts = [p for p in (error, description) if isinstance(p, str) and p]
    return ": ".join(parts) or None


# -- loading credentials ------------------------------------------------------------------


def credentials_source(dep: Deployment) -> Source:
    """Where `dep`'s credentials come from; cheap, as it runs on every request."""
    raw = dep.params.get("vertex_credentials")
    if isinstance(raw, dict):
        return ("json", orjson.dumps(raw, option=orjson.OPT_SORT_KEYS).decode())
    if isinstance(raw, str) and raw.strip():
        if raw.startswith("os.environ/"):
            name = raw[len("os.environ/") :]
            if name not in os.environ:
                return ("env", name)
            raw = os.environ[name]
        text = raw.strip()
        return ("json", text) if text.startswith("{") else ("file", os.path.expanduser(text))
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    return ("file", path) if path else ("adc", "")


def load_credentials(source: Source) -> Credentials:
    kind, value = source
    if kind == "env":
        raise CredentialsError(
            f"vertex_credentials names the environment variable {value!r}, which is not set"
        )
    if kind == "json":
        return credentials_from_info(_parse(value, "vertex_credentials"))
    if kind == "file":
        return credentials_from_info(_read_file(value))
    adc = _gcloud_adc_path()
    if adc.is_file():
        return credentials_from_info(_read_file(str(adc)))
    return MetadataServer(os.environ.get("GCE_METADATA_HOST", "metadata.google.internal"))


def _gcloud_adc_path() -> Path:
    config = os.environ.get("CLOUDSDK_CONFIG")
    if config:
        return Path(config) / "application_default_credentials.json"
    if os.name == "nt":
        return Path(os.environ.get("APPDATA", "")) / "gcloud/application_default_credentials.json"
    return Path.home() / ".config/gcloud/application_default_credentials.json"


def _read_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        # The path stays in the log: a client need not learn the server's file layout.
        log.warning("cannot read Google credentials file %s: %s", path, exc)
        raise CredentialsError(f"the credentials file cannot be read ({exc.strerror})") from exc
    return _parse(text, "the credentials file")


def _parse(text: str, what: str) -> dict[str, Any]:
    try:
        info = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise CredentialsError(f"{what} is not valid JSON") from exc
    if not isinstance(info, dict):
        raise CredentialsError(f"{what} must be a JSON object")
    return info


def credentials_from_info(info: dict[str, Any]) -> Credentials:
    kind = info.get("type")
    quota = info.get("quota_project_id")
    # Bills the API call to the key's quota project, as Google's client libraries do.
    headers = {"x-goog-user-project": quota} if isinstance(quota, str) and quota else {}
    if kind == "service_account":
        email = _field(info, "client_email")
        return ServiceAccount(
            client_email=email,
            private_key=_private_key(_field(info, "private_key")),
            private_key_id=info.get("private_key_id") or None,
            token_uri=info.get("token_uri") or DEFAULT_TOKEN_URI,
            project_id=info.get("project_id") or None,
            extra_headers=headers,
        )
    if kind == "authorized_user":
        return AuthorizedUser(
            client_id=_field(info, "client_id"),
            client_secret=_field(info, "client_secret"),
            refresh_token=_field(info, "refresh_token"),
            token_uri=info.get("token_uri") or DEFAULT_TOKEN_URI,
            project_id=quota or None,
            extra_headers=headers,
        )
    raise CredentialsError(
        f"credentials of type {kind!r} are not supported (use a service_account key or "
        "authorized_user application-default credentials)"
    )


def _field(info: dict[str, Any], name: str) -> str:
    value = info.get(name)
    if not isinstance(value, str) or not value:
        raise CredentialsError(f"the credentials have no {name!r}")
    return value


def _private_key(pem: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError("the credentials' private_key is not a valid PEM key") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CredentialsError("the credentials' private_key is not an RSA key")
    return key


# -- the cache ----------------------------------------------------------------------------


class GoogleAuth:
    """Access tokens per credentials source, for every Vertex deployment of a process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[Source, AccessToken] = {}
        self._credentials: dict[Source, Credentials] = {}
        self._inflight: dict[Source, asyncio.Task[AccessToken]] = {}
        self._failures: dict[Source, tuple[float, GatewayError]] = {}

    def ready(self, dep: Deployment) -> bool:
        token = self._tokens.get(credentials_source(dep))
        return token is not None and self._clock() < token.refresh_at

    def headers(self, dep: Deployment) -> dict[str, str]:
        """Authorization (and quota project) headers; 503 if `prepare` got no token."""
        source = credentials_source(dep)
        token = self._tokens.get(source)
        if token is None or self._clock() >= token.expires_at:
            raise GatewayError(503, "Vertex AI authentication failed: no access token available.")
        creds = self._credentials.get(source)
        extra = creds.extra_headers if creds is not None else {}
        return {"authorization": f"Bearer {token.value}", **extra}

    def project_id(self, dep: Deployment) -> str | None:
        creds = self._credentials.get(credentials_source(dep))
        return creds.project_id if creds is not None else None

    async def prepare(self, dep: Deployment) -> None:
        source = credentials_source(dep)
        if self.ready(dep):
            return  # another request refreshed it while this one waited
        failure = self._failures.get(source)
        if failure is not None and self._clock() < failure[0]:
            if self._usable(source):
                return
            raise failure[1]
        task = self._inflight.get(source)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._refresh(source))
            self._inflight[source] = task
            task.add_done_callback(lambda done: self._settle(source, done))
        try:
            # Shielded: a client that goes away must not cancel the fetch others await.
            await asyncio.shield(task)
        except GatewayError:
            if self._usable(source):
                return  # refresh failed early; the current token still has minutes left
            raise

    def _usable(self, source: Source) -> bool:
        token = self._tokens.get(source)
        return token is not None and self._clock() < token.expires_at

    def _settle(self, source: Source, task: asyncio.Task[AccessToken]) -> None:
        if self._inflight.get(source) is task:
            del self._inflight[source]
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not logged as lost

    async def _refresh(self, source: Source) -> AccessToken:
        try:
            return await self._fetch(source)
        except GatewayError as err:
            self._failures[source] = (self._clock() + FAILURE_BACKOFF_S, err)
            raise

    async def _fetch(self, source: Source) -> AccessToken:
        try:
            # Re-read on every refresh, so a rotated key file is picked up within the hour.
            creds = load_credentials(source)
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as http:
                value, lifetime = await creds.fetch(http)
        except CredentialsError as exc:
            raise GatewayError(401, f"Vertex AI authentication failed: {exc}.") from exc
        now = self._clock()
        # Short-lived tokens (the metadata server hands out its cached one) refresh at
        # half-life, so a token is never refreshed on every request.
        margin = min(REFRESH_MARGIN_S, lifetime / 2)
        token = AccessToken(value, now + lifetime, now + lifetime - margin)
        self._credentials[source] = creds
        self._tokens[source] = token
        self._failures.pop(source, None)
        log.info("fetched a Google access token for %s, valid %ds", creds.label, lifetime)
        return token


AUTH = GoogleAuth()


class GoogleOAuth(BackendAuth):
    """Vertex AI's BackendAuth: the process-wide token cache's bearer token.

    It reads the module's `AUTH` on every call rather than holding it, so a test (or a
    reload) that swaps the cache swaps it for every adapter at once.
    """

    headers = frozenset({"authorization", "x-goog-user-project"})

    def ready(self, dep: Deployment) -> bool:
        return AUTH.ready(dep)

    async def prepare(self, dep: Deployment) -> None:
        await AUTH.prepare(dep)

    def apply(self, dep: Deployment, request: UpstreamRequest) -> None:
        request.headers.update(AUTH.headers(dep))
