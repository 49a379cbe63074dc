"""Managed-identity token endpoints, in the three shapes azure-identity speaks.

* App Service / Azure Automation, protocol 2019-08-01: ``/msi/token``, authenticated by the
  ``X-IDENTITY-HEADER`` header. GET takes query parameters; POST takes a form body, as Azure Automation
  does (its clients send no api-version, so POST does not require one).
* IMDS: ``/metadata/identity/oauth2/token``, GET only, guarded by ``Metadata: true``; every field of
  the answer is a string, as IMDS sends them.
* Azure Arc (himds): the same path, told apart by Arc's api-versions (``arc.ARC_API_VERSIONS``). A
  request without ``Authorization: Basic <key>`` gets 401 with ``WWW-Authenticate: Basic realm=<key
  file>``; the answer is IMDS-shaped. Arc machines have only their system-assigned identity, and like an
  agent without user-assigned support the emulator ignores client_id & co. and answers for it anyway,
  which is what azure-identity's ``_validate_user_assigned_identity`` exists to catch.

Both take a resource (``https://vault.azure.net``), never an AAD v2 scope: ``.../.default`` is refused
the way Entra refuses an unknown resource, which catches clients that forget to strip it.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Mapping

from aiohttp import web

from .arc import ARC_API_VERSIONS, ArcKey
from .faults import status_phrase
from .tokens import IssuedToken, TokenIssuer, system_identity, user_identity

log = logging.getLogger(__name__)

APP_SERVICE_PATH = "/msi/token"
IMDS_PATH = "/metadata/identity/oauth2/token"
APP_SERVICE_API_VERSION = "2019-08-01"

# Aliases a caller may use to name a user-assigned identity: App Service spells object and resource ids
# principal_id and mi_res_id, IMDS spells them object_id and msi_res_id.
_CLIENT_ID_KEYS = ("client_id",)
_OBJECT_ID_KEYS = ("object_id", "principal_id")
_RESOURCE_ID_KEYS = ("mi_res_id", "msi_res_id")

_FAULT_ERRORS: dict[int, str] = {
    400: "invalid_request",
    401: "unauthorized_client",
    403: "access_denied",
    404: "not_found",
    410: "gone",
    429: "too_many_requests",
    500: "server_error",
    503: "temporarily_unavailable",
}


def error_response(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def fault_response(status: int) -> web.Response:
    error = _FAULT_ERRORS.get(status, status_phrase(status).lower().replace(" ", "_"))
    return error_response(status, error, f"Injected fault: the endpoint answered {status}.")


class IdentityRequestError(Exception):
    def __init__(self, status: int, error: str, description: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        response = error_response(self.status, self.error, self.description)
        response.headers.update(self.headers)
        return response


class IdentityService:
    """Issues tokens; lifetime and refresh hint are read per request so they can change at runtime."""

    def __init__(
        self, issuer: TokenIssuer, identity_header: str, *, token_lifetime: float, refresh_in: float | None
    ) -> None:
        self._issuer = issuer
        self.identity_header = identity_header
        self.token_lifetime = token_lifetime
        self.refresh_in = refresh_in
        self.tokens_issued = 0
        # Set by the Emulator once it has (or has failed to) put a key file where azure-identity looks.
        self.arc: ArcKey | None = None
        self.arc_problem = "the emulator has not started"

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(APP_SERVICE_PATH, self.app_service),
            web.post(APP_SERVICE_PATH, self.app_service),
            web.route("*", IMDS_PATH, self.imds),
        ]

    async def app_service(self, request: web.Request) -> web.Response:
        params: dict[str, str] = dict(request.query)
        if request.method == "POST":
            params.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        try:
            self._check_identity_header(request)
            version = params.get("api-version")
            # Azure Automation's documented POST carries no api-version; App Service's GET must.
            if request.method == "GET" and not version:
                raise IdentityRequestError(
                    400, "invalid_request", "Required query parameter 'api-version' is missing."
                )
            if version and version != APP_SERVICE_API_VERSION:
                raise IdentityRequestError(
                    400,
                    "invalid_request",
                    f"Unsupported api-version '{version}'; this endpoint speaks {APP_SERVICE_API_VERSION}.",
                )
            resource = self._resource(params, "Required parameter 'resource' is missing.")
            token = self._issue(resource, params)
        except IdentityRequestError as exc:
            return exc.response()
        body: dict[str, object] = {
            "access_token": token.access_token,
            "expires_on": str(token.expires_on),
            "resource": token.resource,
            "token_type": "Bearer",
            "client_id": token.identity.client_id,
        }
        if self.refresh_in is not None:
            body["refresh_in"] = math.ceil(self.refresh_in)
        return _no_store(web.json_response(body))

    async def imds(self, request: web.Request) -> web.Response:
        try:
            if request.method != "GET":
                raise IdentityRequestError(405, "invalid_request", "Only GET is supported.")
            if request.headers.get("Metadata", "").lower() != "true":
                raise IdentityRequestError(400, "invalid_request", "Required metadata header not specified")
            # IMDS refuses proxied requests, so a misconfigured proxy shows up here rather than in Azure.
            if "X-Forwarded-For" in request.headers:
                raise IdentityRequestError(
                    400, "invalid_request", "Requests with X-Forwarded-For header are not allowed"
                )
            if not request.query.get("api-version"):
                raise IdentityRequestError(
                    400, "invalid_request", "Required query variable 'api-version' is missing"
                )
            params = dict(request.query)
            is_arc = params["api-version"] in ARC_API_VERSIONS
            if is_arc:
                self._check_arc_key(request)
            resource = self._resource(params, "Required audience parameter not specified")
            # Arc: the machine's one identity, whatever ids were asked for (see the module docstring).
            token = self._issue(resource, {} if is_arc else params)
        except IdentityRequestError as exc:
            return exc.response()
        body = {
            "access_token": token.access_token,
            "client_id": token.identity.client_id,
            "expires_in": str(token.expires_in),
            "expires_on": str(token.expires_on),
            "ext_expires_in": str(token.expires_in),
            "not_before": str(token.not_before),
            "resource": token.resource,
            "token_type": "Bearer",
        }
        if self.refresh_in is not None:
            body["refresh_in"] = str(math.ceil(self.refresh_in))
        return _no_store(web.json_response(body))

    def _check_arc_key(self, request: web.Request) -> None:
        if self.arc is None:
            raise IdentityRequestError(
                400,
                "invalid_request",
                f"api-version {request.query['api-version']} is Azure Arc's, and Arc is off in this emulator: "
                f"{self.arc_problem}",
            )
        if not self.arc.matches(request.headers.get("Authorization", "")):
            raise IdentityRequestError(
                401,
                "unauthorized_client",
                "Authorization: Basic <content of the key file named in WWW-Authenticate> is missing or wrong.",
                headers={"WWW-Authenticate": self.arc.challenge},
            )

    def _check_identity_header(self, request: web.Request) -> None:
        given = request.headers.get("X-IDENTITY-HEADER", "")
        if not hmac.compare_digest(given.encode(), self.identity_header.encode()):
            raise IdentityRequestError(
                401,
                "unauthorized_client",
                "The X-IDENTITY-HEADER header is missing or does not match IDENTITY_HEADER.",
            )

    def _resource(self, params: Mapping[str, str], missing: str) -> str:
        resource = params.get("resource", "").strip()
        if not resource:
            raise IdentityRequestError(400, "invalid_request", missing)
        if resource.endswith("/.default"):
            raise IdentityRequestError(
                400,
                "invalid_resource",
                f"AADSTS500011: The resource principal named {resource} was not found in the tenant named "
                f"{self._issuer.tenant_id}. Managed identity endpoints take a resource, not a scope: "
                "drop the '/.default' suffix.",
            )
        return resource

    def _issue(self, resource: str, params: Mapping[str, str]) -> IssuedToken:
        client_id = _first(params, _CLIENT_ID_KEYS)
        object_id = _first(params, _OBJECT_ID_KEYS)
        resource_id = _first(params, _RESOURCE_ID_KEYS)
        chosen = [v for v in (client_id, object_id, resource_id) if v]
        if len(chosen) > 1:
            raise IdentityRequestError(
                400, "invalid_request", "Specify at most one of client_id, object_id/principal_id, mi_res_id."
            )
        tenant = self._issuer.tenant_id
        identity = (
            user_identity(tenant, client_id=client_id, object_id=object_id, resource_id=resource_id)
            if chosen
            else system_identity(tenant)
        )
        token = self._issuer.issue(resource, identity, self.token_lifetime)
        self.tokens_issued += 1
        log.debug("issued a token for %s to client %s", resource, identity.client_id)
        return token


def _first(params: Mapping[str, str], keys: tuple[str, ...]) -> str | None:
    return next((params[k] for k in keys if params.get(k)), None)


def _no_store(response: web.Response) -> web.Response:
    response.headers["Cache-Control"] = "no-store"
    return response
