"""Microsoft Entra ID's v2.0 token endpoint, client-credentials grant, for app registrations.

This is what the ``client_secret`` and ``workload`` identity sources talk to. It is served on the
emulator's HTTPS listener (the Key Vault port), because Entra is HTTPS-only and azure-identity refuses
an ``http://`` authority; the authority host is that listener's origin.

* ``POST /{tenant}/oauth2/v2.0/token``: form ``grant_type=client_credentials``, ``client_id``, one
  ``scope`` ending in ``/.default``, and either ``client_secret`` or ``client_assertion_type=<jwt-bearer>``
  + ``client_assertion``. The token's ``aud`` is the scope without ``/.default``.
* ``GET /{tenant}/v2.0/.well-known/openid-configuration``: only MSAL-based (synchronous) clients read it,
  and only with ``disable_instance_discovery=True`` (otherwise MSAL asks login.microsoftonline.com, which
  no local server can answer). azure-identity's async ``AadClient`` posts straight to the token URL.

Apps must be registered (``Emulator.register_app``), like in a real tenant. Workload identity is modelled
as a federated identity credential: ``Emulator.federated_token`` mints the service-account token a
Kubernetes node would project into ``AZURE_FEDERATED_TOKEN_FILE`` (signed by this emulator's issuer,
audience ``api://AzureADTokenExchange``), and the endpoint checks issuer, subject, audience, signature and
lifetime the way Entra checks a federated credential. Error bodies carry Entra's fields; the AADSTS codes
are Entra's own for each refusal (7000215 wrong secret, 700016 unknown app, 90002 unknown tenant, 700213
unknown subject, ...), approximations only for injected faults and for sending two credentials at once.
No error ever repeats a secret or an assertion.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
from aiohttp import web

from .faults import status_phrase
from .tokens import TokenIssuer, app_identity

log = logging.getLogger(__name__)

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
DEFAULT_SUBJECT = "system:serviceaccount:default:workload"
TOKEN_PATH = "/{tenant}/oauth2/v2.0/token"
OPENID_PATH = "/{tenant}/v2.0/.well-known/openid-configuration"

_AAD_PATH = re.compile(r"^/[^/]+/(?:oauth2/v2\.0/token|v2\.0/\.well-known/openid-configuration)$")
_ALGORITHM = "HS256"

# Error name and a representative AADSTS code per status, for injected faults: Entra's real codes depend on
# the cause, which an injected fault does not have.
_FAULT_ERRORS: dict[int, tuple[str, int]] = {
    400: ("invalid_request", 900144),
    401: ("invalid_client", 7000215),
    403: ("unauthorized_client", 700016),
    404: ("invalid_request", 90002),
    429: ("temporarily_unavailable", 50196),
    500: ("server_error", 90033),
    503: ("temporarily_unavailable", 90033),
}


def is_aad_path(path: str) -> bool:
    """Whether a path on the HTTPS listener belongs to Entra ID rather than to Key Vault."""
    return _AAD_PATH.match(path) is not None


def error_response(status: int, error: str, code: int, description: str) -> web.Response:
    """Entra's error body: the description leads with the AADSTS code and ends with trace ids and time."""
    trace_id, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
    timestamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    body = {
        "error": error,
        "error_description": (
            f"AADSTS{code}: {description} Trace ID: {trace_id} Correlation ID: {correlation_id} "
            f"Timestamp: {timestamp}"
        ),
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }
    return _no_store(web.json_response(body, status=status))


def fault_response(status: int) -> web.Response:
    error, code = _FAULT_ERRORS.get(status, (status_phrase(status).lower().replace(" ", "_"), 90033))
    return error_response(status, error, code, f"Injected fault: the endpoint answered {status}.")


class AadRequestError(Exception):
    def __init__(self, status: int, error: str, code: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.code = code
        self.description = description

    def response(self) -> web.Response:
        return error_response(self.status, self.error, self.code, self.description)


@dataclass
class _App:
    client_id: str
    secret: str | None = field(default=None, repr=False)
    subjects: set[str] = field(default_factory=set)  # federated identity credentials (this emulator's issuer)


class AadService:
    """App registrations and the token endpoint; lifetime and refresh hint are shared with managed identity."""

    def __init__(
        self,
        issuer: TokenIssuer,
        *,
        token_lifetime: Callable[[], float],
        refresh_in: Callable[[], float | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._issuer = issuer
        self._token_lifetime = token_lifetime
        self._refresh_in = refresh_in
        self._clock = clock
        self._apps: dict[str, _App] = {}
        # The stand-in for a cluster's OIDC issuer; ".invalid" so nothing could ever try to fetch from it.
        self.federation_issuer = f"https://oidc.tokenbroker-emulator.invalid/{issuer.tenant_id}/"
        self._federation_key = secrets.token_bytes(32)
        self.tokens_issued = 0

    # registrations

    def register(self, client_id: str, secret: str | None = None) -> str:
        """Add an app (or replace its secret); returns the secret, a random one unless given."""
        if not client_id:
            raise ValueError("client_id must not be empty")
        if secret == "":
            raise ValueError("secret must not be empty (pass None for a random one)")
        app = self._apps.setdefault(client_id.lower(), _App(client_id))
        app.secret = secret if secret is not None else secrets.token_urlsafe(30)
        return app.secret

    def federated_token(self, client_id: str, subject: str = DEFAULT_SUBJECT, lifetime: float = 3600) -> str:
        """Trust ``subject`` for the app and mint its service-account token, as the content of a token file."""
        app = self._apps.get(client_id.lower())
        if app is None:
            raise KeyError(f"no app registration {client_id!r}: register_app() it first")
        if not (lifetime > 0 and math.isfinite(lifetime)):
            raise ValueError(f"lifetime must be a positive number of seconds, not {lifetime}")
        app.subjects.add(subject)
        now = self._clock()
        claims = {
            "iss": self.federation_issuer,
            "sub": subject,
            "aud": [TOKEN_EXCHANGE_AUDIENCE],
            "iat": math.floor(now),
            "nbf": math.floor(now),
            "exp": math.ceil(now + lifetime),
        }
        return jwt.encode(claims, self._federation_key, algorithm=_ALGORITHM, headers={"typ": "JWT"})

    # routes

    def routes(self) -> list[web.RouteDef]:
        # "*" so a GET gets Entra's answer rather than falling through to Key Vault's catch-all route.
        return [web.route("*", TOKEN_PATH, self.token), web.get(OPENID_PATH, self.openid_configuration)]

    async def openid_configuration(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        try:
            self._check_tenant(tenant)
        except AadRequestError as exc:
            return exc.response()
        base = f"{request.url.origin()}/{tenant}"
        return web.json_response(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "issuer": f"{base}/v2.0",
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "tenant_region_scope": "EU",
            }
        )

    async def token(self, request: web.Request) -> web.Response:
        try:
            if request.method != "POST":
                raise AadRequestError(
                    405,
                    "invalid_request",
                    900561,
                    f"The endpoint only accepts POST requests. Received a {request.method} request.",
                )
            self._check_tenant(request.match_info["tenant"])
            form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
            if _required(form, "grant_type") != "client_credentials":
                raise AadRequestError(
                    400,
                    "unsupported_grant_type",
                    70003,
                    "The app requested an unsupported grant type; this endpoint serves 'client_credentials'.",
                )
            client_id = _required(form, "client_id")
            resource = _resource(_required(form, "scope"))
            app = self._apps.get(client_id.lower())
            if app is None:
                raise AadRequestError(
                    400,
                    "unauthorized_client",
                    700016,
                    f"Application with identifier '{client_id}' was not found in the directory "
                    f"'{self._issuer.tenant_id}'.",
                )
            self._authenticate(app, form)
        except AadRequestError as exc:
            log.debug("entra: token request refused: AADSTS%d", exc.code)
            return exc.response()
        identity = app_identity(self._issuer.tenant_id, app.client_id)
        issued = self._issuer.issue(resource, identity, self._token_lifetime())
        self.tokens_issued += 1
        log.debug("entra: issued a token for %s to app %s", resource, app.client_id)
        # Relative, as Entra sends it. Counted from the start of the issuing second, so a client adding it to
        # its own (earlier or equal) request time never believes the token outlives its exp claim.
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "expires_in": issued.expires_in,
            "ext_expires_in": issued.expires_in,
            "access_token": issued.access_token,
        }
        refresh_in = self._refresh_in()
        if refresh_in is not None:
            body["refresh_in"] = math.ceil(refresh_in)
        return _no_store(web.json_response(body))

    # checks

    def _check_tenant(self, tenant: str) -> None:
        if tenant.lower() != self._issuer.tenant_id.lower():
            raise AadRequestError(
                400,
                "invalid_request",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
                "into the correct cloud.",
            )

    def _authenticate(self, app: _App, form: Mapping[str, str]) -> None:
        secret = form.get("client_secret")
        assertion = form.get("client_assertion")
        if secret is not None and assertion is not None:
            # The emulator's choice of code: what Entra answers here is not documented.
            raise AadRequestError(
                400, "invalid_request", 90014, "Send either client_secret or client_assertion, not both."
            )
        if secret is not None:
            if app.secret is None or not hmac.compare_digest(secret.encode(), app.secret.encode()):
                raise AadRequestError(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                    f"secret value, not the client secret ID, for a secret added to app '{app.client_id}'.",
                )
            return
        if assertion is None:
            raise AadRequestError(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            )
        if form.get("client_assertion_type") != JWT_BEARER:
            raise AadRequestError(
                400, "invalid_request", 50027, f"client_assertion_type must be '{JWT_BEARER}'."
            )
        self._check_assertion(app, assertion)

    def _check_assertion(self, app: _App, assertion: str) -> None:
        try:
            claims = jwt.decode(assertion.strip(), options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise AadRequestError(400, "invalid_request", 50027, "JWT token is invalid or malformed.") from None
        issuer, subject, audience = claims.get("iss"), claims.get("sub"), claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        # Matched against the app's federated credentials first, as Entra does, so a wrong file says why.
        if issuer != self.federation_issuer:
            raise AadRequestError(
                401,
                "invalid_client",
                700211,
                f"No matching federated identity record found for presented assertion issuer '{issuer}'. "
                f"This emulator's issuer is '{self.federation_issuer}'.",
            )
        if subject not in app.subjects:
            raise AadRequestError(
                401,
                "invalid_client",
                700213,
                f"No matching federated identity record found for presented assertion subject '{subject}'. "
                "Please check your federated identity credential Subject, Audience and Issuer against the "
                "presented assertion.",
            )
        if TOKEN_EXCHANGE_AUDIENCE not in audiences:
            raise AadRequestError(
                401,
                "invalid_client",
                700212,
                f"No matching federated identity record found for presented assertion audience '{audience}'.",
            )
        try:
            jwt.decode(
                assertion.strip(),
                self._federation_key,
                algorithms=[_ALGORITHM],
                audience=TOKEN_EXCHANGE_AUDIENCE,
                options={"require": ["exp", "iat"]},
            )
        except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError):
            raise AadRequestError(
                401, "invalid_client", 700024, "Client assertion is not within its valid time range."
            ) from None
        except jwt.InvalidTokenError:
            raise AadRequestError(
                401, "invalid_client", 700027, "Client assertion failed signature validation."
            ) from None


def _required(form: Mapping[str, str], name: str) -> str:
    value = form.get(name, "").strip()
    if not value:
        raise AadRequestError(
            400, "invalid_request", 900144, f"The request body must contain the following parameter: '{name}'."
        )
    return value


def _resource(scope: str) -> str:
    scopes = scope.split()
    if len(scopes) != 1 or not scopes[0].endswith("/.default") or scopes[0] == "/.default":
        raise AadRequestError(
            400,
            "invalid_scope",
            1002012,
            f"The provided value for scope {scope} is not valid. Client credential flows must have a scope value "
            "with /.default suffixed to the resource identifier (application ID URI).",
        )
    return scopes[0].removesuffix("/.default")


def _no_store(response: web.Response) -> web.Response:
    response.headers["Cache-Control"] = "no-store, no-cache"
    response.headers["Pragma"] = "no-cache"
    return response
